"""The embedded demo: teacher vs consistency distillation vs APT on the real UCI digits, on a CPU.

`python -m training.demo` (= `./run.sh demo`) runs every stage through the headless trainer with
`configs/demo_*.toml` and writes `outputs/demo/`; `--quick` is the CI variant. Modules: `digits`
(data), `text` (caption tokenizer + frozen encoder), `classifier` + `metrics` (evaluation),
`pipeline` (shards, stage runs, EMA checkpoints, samplers), `run` (the demo), `report` (outputs),
`make_teacher` (re-creates the committed teacher). Assets and data licence: `assets/README.md`.
"""
