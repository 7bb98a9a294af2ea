"""Run config: TOML -> nested dataclasses, checked at load (keys, types, choices, cross-field rules),
`--section.key=value` overrides, resolved-config round trip, CLI errors, docs listing every key."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.__main__ import main, parse_args
from training.config import (
    ConfigError,
    RunConfig,
    check_bounds,
    dumps,
    load_config,
    save_config,
    schema_markdown,
    schema_rows,
    split_override_args,
)
from training.loop import plan_phases

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "run.toml"
    p.write_text(text)
    return p


def test_example_configs_load():
    tiny = load_config(ROOT / "configs/tiny_cpu.toml")
    assert tiny.run.stage == "apt" and tiny.model.preset == "tiny" and tiny.parallel.strategy == "fsdp"
    assert (tiny.apt.image.steps, tiny.apt.video.steps) == (4, 4)
    big = load_config(ROOT / "configs/wan1.3b_h100.toml")
    assert big.model.preset == "wan2.1-t2v-1.3b" and big.parallel.mixed_precision == "bf16"
    assert big.parallel.activation_checkpointing and big.apt.video.d_timestep_shift == 12.0
    # the paper's global batches on the documented 64 GPUs: ~9k images, 2048 videos
    batches = {p.name: p.micro_batch * p.grad_accum * 64 for p in plan_phases(big)}
    assert batches == {"image": 9216, "video": 2048}


def test_defaults_follow_the_paper():
    cfg = RunConfig()
    assert cfg.apt.lr == 5e-6 and cfg.apt.video.lr == 3e-6 and cfg.apt.ema_decay == 0.995
    assert (cfg.apt.image.r1_sigma, cfg.apt.video.r1_sigma) == (0.01, 0.1)
    assert (cfg.apt.image.d_timestep_shift, cfg.apt.video.d_timestep_shift) == (1.0, 12.0)
    assert cfg.apt.r1_lambda == 100.0 and cfg.apt.disc_mode == "full"


def test_overrides_parse_types_and_nesting(tmp_path):
    path = write(tmp_path, '[run]\nstage = "apt"\n[data]\npath = "d"\n[apt.video]\nsteps = 7\n')
    cfg = load_config(path, ["--apt.lr=1e-5", "--apt.image.lr=2e-6", "--parallel.compile=true",
                             "--monitor.val_seeds=[3, 4]", "--run.dir=runs/x y", "--teacher.lr=1"])
    assert cfg.apt.lr == 1e-5 and cfg.apt.image.lr == 2e-6 and cfg.parallel.compile is True
    assert cfg.monitor.val_seeds == [3, 4] and cfg.run.dir == "runs/x y"
    assert cfg.teacher.lr == 1.0 and isinstance(cfg.teacher.lr, float)  # int accepted for a float key
    # a partial [apt.video] table keeps that phase's other defaults
    assert cfg.apt.video.steps == 7 and cfg.apt.video.lr == 3e-6 and cfg.apt.video.d_timestep_shift == 12.0
    # `--key value` pairs from argparse leftovers
    assert split_override_args(["--apt.lr", "1e-5", "--run.seed=3"]) == ["--apt.lr=1e-5", "--run.seed=3"]
    args, overrides = parse_args(["--config", str(path), "--resume", "--apt.lr", "2e-5"])
    assert args.resume is True and overrides == ["--apt.lr=2e-5"]


@pytest.mark.parametrize(
    "text, overrides, match",
    [
        ('[run]\nstgae = "apt"\n', [], r"unknown key\(s\) \['run.stgae'\] in \[run\]; allowed keys: \['device', 'dir'"),
        ("[bogus]\nx = 1\n", [], r"unknown key\(s\) \['bogus'\] in \[top level\]; allowed keys: \['apt', 'cd', 'checkpoint'"),
        ('[apt.image]\nlr = "fast"\n', [], r"apt.image.lr: expected float, got str 'fast'"),
        ("[run]\nsteps = 1.5\n", [], r"run.steps: expected int, got float 1.5"),
        ("[run]\nseed = true\n", [], r"run.seed: expected int, got bool True"),
        ('[run]\nstage = "gan"\n', [], r"run.stage: 'gan' is not allowed; choose one of \['teacher', 'cd', 'apt'\]"),
        ('[parallel]\nstrategy = "zero3"\n', [], r"choose one of \['fsdp', 'ddp', 'none'\]"),
        ("[monitor]\nval_seeds = [1, \"a\"]\n", [], r"monitor.val_seeds\[1\]: expected int"),
        ("[apt]\nimage = 3\n", [], r"apt.image: expected a table"),
        ("", ["--apt.nope=1"], r"unknown key\(s\) \['apt.nope'\]"),
        ("", ["--apt.lr"], r"--section.key=value"),
        ("", ["--data.micro_batch=0"], r"data.micro_batch must be >= 1, got 0"),
        ('[run]\nstage = "cd"\n', [], r"stage cd needs a teacher: set model.init_from"),
        ("[apt.image]\nsteps = 0\n[apt.video]\nsteps = 0\n", ["--run.stage=apt"], r"apt.image.steps \+ apt.video.steps"),
        ('[parallel]\nattention = "flash2"\n', [], r"choose one of \['default', 'auto', 'flash', 'cudnn'"),
        ("", ["--parallel.compile=true", "--parallel.attention=auto"], r"parallel.attention='auto' has no effect under"),
        ('[apt]\ndisc_kind = "gigagan"\n', [], r"apt.disc_kind: 'gigagan' is not allowed; choose one of \['apt', 'sfv'\]"),
        ('[apt]\nloss = "wgan"\n', [], r"choose one of \['nonsaturating', 'relativistic', 'hinge'\]"),
        ('[apt]\nr1_mode = "exakt"\n', [], r"apt.r1_mode: 'exakt' is not allowed; choose one of \['approx', 'exact'\]"),
        ("[apt.sfv]\np_std = 0\n", [], r"apt.sfv.p_std must be > 0, got 0.0"),
        ("[apt.sfv]\nbackbone_blocks = -1\n", [], r"apt.sfv.backbone_blocks must be >= 0"),
        ("[apt.sfv]\nbackbone_blocks = 4\nhead_layers = [1, 4]\n", [],
         r"apt.sfv.head_layers \[1, 4\]: need distinct 0-based block indices < apt.sfv.backbone_blocks=4"),
        ("[apt.sfv]\nbogus = 1\n", [], r"unknown key\(s\) \['apt.sfv.bogus'\] in \[apt.sfv\]; allowed keys: \['backbone_blocks'"),
        ('[run]\nstage = "apt"\n[apt]\nr1_mode = "exact"\n', [], r"apt.r1_mode='exact' does not run with parallel.strategy='fsdp'"),
        ('[run]\nstage = "apt"\n[apt]\nr1_mode = "exact"\nloss = "relativistic"\n', ["--parallel.strategy=none"],
         r"apt.r1_mode='exact' with apt.loss='relativistic'"),
    ],
)
def test_errors_name_the_key_and_the_allowed_values(tmp_path, text, overrides, match):
    path = write(tmp_path, text + ("" if "[data]" in text else '\n[data]\npath = "d"\n'))
    with pytest.raises(ConfigError, match=match):
        load_config(path, overrides)


@pytest.mark.parametrize(
    "toml, override, match",
    [
        ("[teacher]\nlr = 0.0\n", "--teacher.lr=0", r"teacher.lr must be > 0, got 0.0"),
        ("[apt]\nlr = -1e-5\n", "--apt.lr=-1e-5", r"apt.lr must be > 0, got -1e-05"),
        ("[apt]\nlr = nan\n", "--apt.lr=nan", r"apt.lr must be > 0, got nan"),
        ("[cd]\nlr = inf\n", "--cd.lr=inf", r"cd.lr must be > 0, got inf"),
        ("[apt]\nema_decay = 1.5\n", "--apt.ema_decay=1.5", r"apt.ema_decay must be in \[0, 1\), got 1.5"),
        ("[teacher]\nema_decay = -0.1\n", "--teacher.ema_decay=-0.1", r"teacher.ema_decay must be in \[0, 1\), got -0.1"),
        ("[apt]\nr1_lambda = -1\n", "--apt.r1_lambda=-1", r"apt.r1_lambda must be >= 0, got -1.0"),
        ("[apt.video]\nr1_sigma = 0\n", "--apt.video.r1_sigma=0", r"apt.video.r1_sigma must be > 0, got 0.0"),
        ("[apt.image]\nd_timestep_shift = -2\n", "--apt.image.d_timestep_shift=-2",
         r"apt.image.d_timestep_shift must be > 0, got -2.0"),
        ("[monitor]\nval_fps = 0\n", "--monitor.val_fps=0", r"monitor.val_fps must be >= 1, got 0"),
        ('[data]\npath = "d"\ngrad_accum = 0\n', "--data.grad_accum=0", r"data.grad_accum must be >= 1, got 0"),
        ("[apt.video]\nmicro_batch = -1\n", "--apt.video.micro_batch=-1", r"apt.video.micro_batch must be >= 0, got -1"),
        ("[teacher]\nbetas = [0.9, 1.0]\n", "--teacher.betas=[0.9, 1.0]", r"teacher.betas\[1\] must be in \[0, 1\), got 1.0"),
        ("[monitor]\nval_seeds = [0, -3]\n", "--monitor.val_seeds=[0,-3]", r"monitor.val_seeds\[1\] must be >= 0, got -3"),
        ("[cd]\ngrid_steps = 0\n", "--cd.grid_steps=0", r"cd.grid_steps must be >= 1, got 0"),
        ("[checkpoint]\nkeep = -1\n", "--checkpoint.keep=-1", r"checkpoint.keep must be >= 0, got -1"),
        ("[monitor]\ndiversity_threshold = -0.5\n", "--monitor.diversity_threshold=-0.5",
         r"monitor.diversity_threshold must be >= 0, got -0.5"),
        ('[run]\nstage = "teacher"\nsteps = 0\n', "--run.steps=0", r"run.steps must be >= 1 for stage 'teacher', got 0"),
        ("[model]\nlora_rank = 4\n", "--model.lora_rank=4",
         r"model.lora_rank = 4 on a seeded init \(model.init_from = ''\).*every LoRA gradient is zero"),
    ],
)
def test_value_ranges_name_the_key_in_toml_and_overrides(tmp_path, toml, override, match):
    base = '[data]\npath = "d"\n'
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, toml if "[data]" in toml else base + toml))
    path = write(tmp_path, base + ('[run]\nstage = "teacher"\n' if "run.steps" in override else ""))
    with pytest.raises(ConfigError, match=match):
        load_config(path, [override])


def test_every_numeric_key_has_bounds_and_defaults_pass():
    cfg = RunConfig()
    check_bounds(cfg)  # the defaults are inside their own ranges
    import dataclasses
    import typing

    def leaves(obj, prefix=""):
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            v, tp = getattr(obj, f.name), hints[f.name]
            if dataclasses.is_dataclass(v):
                yield from leaves(v, prefix + f.name + ".")
            else:
                yield prefix + f.name, (typing.get_args(tp) or (tp,))[0], f.metadata  # list[int] -> int

    unbounded = [k for k, tp, meta in leaves(cfg) if meta.get("bounds") is None and tp in (int, float)]
    assert not unbounded, f"numeric keys without bounds= in opt(): {unbounded}"
    assert "(> 0)" in dict((k, h) for k, _, _, h in schema_rows())["apt.lr"]  # the docs table shows the range


def test_missing_data_path_is_reported(tmp_path):
    with pytest.raises(ConfigError, match=r"data.path is empty"):
        load_config(write(tmp_path, "[run]\nseed = 1\n"))


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(ROOT / "configs/wan1.3b_h100.toml", ["--apt.lr=1e-5", "--apt.head_layers=[3, 9]"])
    cfg.run.dir = 'runs/"quoted" \\ back\nslash \u00e9t\u00e9'  # strings TOML must escape
    cfg.monitor.d_loss_floor = float("inf")
    saved = save_config(cfg, tmp_path / "out/config.toml")
    again = load_config(saved)
    assert again == cfg
    assert dumps(again) == saved.read_text()
    assert "[apt.video]\nsteps = 300\n" in saved.read_text()


def test_sfv_settings_round_trip(tmp_path):
    cfg = load_config(ROOT / "configs/tiny_cpu.toml", ["--apt.disc_kind=sfv", "--apt.loss=hinge", "--apt.r1_mode=exact",
                                                       "--parallel.strategy=ddp", "--apt.sfv.backbone_blocks=2",
                                                       "--apt.sfv.head_layers=[0, 1]", "--apt.sfv.p_mean=-2",
                                                       "--apt.sfv.p_std=0.5", "--apt.sfv.head_channels=32"])
    s = cfg.apt.sfv
    assert (cfg.apt.disc_kind, cfg.apt.loss, cfg.apt.r1_mode) == ("sfv", "hinge", "exact")
    assert (s.backbone_blocks, s.head_layers, s.p_mean, s.p_std, s.head_channels) == (2, [0, 1], -2.0, 0.5, 32)
    saved = save_config(cfg, tmp_path / "config.toml")
    assert "[apt.sfv]\nbackbone_blocks = 2\n" in saved.read_text()
    assert load_config(saved) == cfg
    d = RunConfig()  # defaults: the APT paper's D; SF-V's noise level when chosen
    assert (d.apt.disc_kind, d.apt.r1_mode, d.apt.sfv.p_mean, d.apt.sfv.p_std) == ("apt", "approx", -1.0, 1.0)


def test_cli_reports_config_errors_and_prints_config(tmp_path, capsys):
    path = write(tmp_path, '[data]\npath = "d"\n[run]\nstage = "teacher"\n')
    assert main(["--config", str(path), "--print-config", "--teacher.lr=0.5"]) == 0
    out = capsys.readouterr().out
    assert "[teacher]\nlr = 0.5" in out
    assert main(["--config", str(path), "--teacher.lrr=1"]) == 2
    assert "unknown key(s) ['teacher.lrr']" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.toml")]) == 2


def test_docs_list_every_key():
    rows = schema_rows()
    assert len(rows) == len({k for k, *_ in rows}) > 60
    table = schema_markdown()
    docs = (ROOT / "docs/TRAINING.md").read_text()
    missing = [k for k, *_ in rows if f"`{k}`" not in docs]
    assert not missing, f"docs/TRAINING.md lacks {missing}; paste `python -m training.config` output"
    assert table.splitlines()[0] == "| key | type | default | meaning |"
