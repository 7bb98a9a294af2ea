"""The training nodes' side of the one runner (training.loop.train): what goes in, what comes out.

APT Consistency Distill and APT Train build a RunConfig from their widgets (nodes.run_config) and call
`run`: the graph's models go in as a training.models.MemorySource (base weights = each MODEL's
effective weights, the CD teacher = ComfyUI's own diffusion model), ComfyUI's ProgressBar follows the
steps and Stop asks the runner to save a checkpoint and return. The node outputs come from the run
folder the runner leaves, the headless trainer's (config.toml, checkpoints/, metrics.jsonl, samples/,
export/): either front end resumes it. Everything but `run` and `model_source` works without ComfyUI.
"""

from __future__ import annotations

import logging
import shlex
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

STOP_REASON = "Stop pressed in ComfyUI"
# what a run folder holds (the runner's files, the node's run inputs); other files mean it is not one
RUN_FILES = {"config.toml", "checkpoints", "metrics.jsonl", "samples", "export", "tb", "run.lock",
             "val_prompts.safetensors", "negative.safetensors", "node_inputs.json", "state.json"}
OLD_STATE = "state.json"  # the run state of ComfyUI-APT's earlier node-only loop


def check_start(run_dir: Path, resume: bool) -> None:
    """Before a run: refuse a folder that is not a run's (other files in it: e.g. an absolute run_name naming
    a home folder), to start over silently (resume off on a folder with checkpoints) and a folder of the
    earlier node-only format. Nothing in the folder is deleted."""
    from training.checkpoint import find_latest

    latest = find_latest(run_dir)
    foreign = sorted(p.name for p in run_dir.iterdir() if p.name not in RUN_FILES) if run_dir.is_dir() else []
    if foreign and not any((run_dir / name).exists() for name in ("config.toml", "checkpoints", INPUTS_FILE, OLD_STATE)):
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ValueError(f"run_name: {run_dir} is a folder with other files in it ({shown}), not a run folder; a run "
                         "would write its checkpoints, exports and samples among them. Give a run_name that is new or "
                         "a run's folder (a plain name goes under output/apt/runs)")
    if latest is None and (run_dir / OLD_STATE).is_file():
        raise ValueError(f"run folder {run_dir} holds a run state of an earlier ComfyUI-APT version ({OLD_STATE}), which "
                         "this version cannot resume; choose another run_name (the folder is left as it is)")
    if latest is not None and not resume:
        raise ValueError(f"run folder {run_dir} already holds checkpoints (newest: {latest.name}) and resume is off: set "
                         "resume=true to continue that run (or to output it, if it is complete), or choose another run_name "
                         "for a new run; to start over under this name, delete the folder yourself")


INPUTS_FILE = "node_inputs.json"  # what the graph fed a node run: its MODELs' fingerprints, its dataset
INPUT_NAMES = {"generator": "generator MODEL", "teacher": "teacher MODEL", "discriminator": "discriminator's MODEL",
               "dataset": "dataset"}


def check_inputs(run_dir: Path, inputs: dict[str, str]) -> None:
    """Refuse to resume a run that the graph now feeds other inputs (another model or dataset): the run
    continues from its checkpoint, so the new inputs would be ignored and the node would output the old
    run's model. The inputs are recorded in <run_dir>/node_inputs.json (kept while the folder holds no
    checkpoint, so a run that never saved one starts over freely); a folder without the file (a headless
    run continued in the node) takes this graph's inputs."""
    import json

    from apt_core.fileio import atomic_write_text
    from training.checkpoint import find_latest

    path = Path(run_dir) / INPUTS_FILE
    old = json.loads(path.read_text()) if path.is_file() and find_latest(run_dir) is not None else {}
    changed = [k for k in inputs if k in old and old[k] != inputs[k]]
    if changed:
        what = ", ".join(f"{INPUT_NAMES.get(k, k)}" + (f" ({old[k]} there, {inputs[k]} now)" if k == "dataset" else "")
                         for k in changed)
        raise ValueError(f"run folder {run_dir} holds a run started from another {what} than this graph's: resuming "
                         f"it would continue that run from its checkpoint and ignore the new input. Choose another "
                         f"run_name for a run on this graph's inputs, connect the original ones, or delete {path} "
                         "to continue the run anyway")
    if old != inputs:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(inputs, indent=1, sort_keys=True) + "\n")


def with_run_checkpoints(cfg: Any) -> Any:
    """`cfg` with the checkpoint settings (every, keep) of the run it continues, if its folder holds one: a
    headless run continued in the node keeps its own (e.g. keep = 0, every checkpoint kept) rather than the
    node's last-2 default, which would delete its older checkpoints."""
    import dataclasses

    from training.checkpoint import find_latest
    from training.config import tomllib

    path = Path(cfg.run.dir) / "config.toml"
    if find_latest(cfg.run.dir) is None or not path.is_file():
        return cfg
    old = tomllib.loads(path.read_text()).get("checkpoint", {})
    kept = {k: old[k] for k in ("every", "keep") if isinstance(old.get(k), int)}
    return dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, **kept)) if kept else cfg


def export_weights(run_dir: Path, stage: str, lora_rank: int) -> tuple[str, dict[str, torch.Tensor], dict]:
    """("lora" | "full", tensors, the export's metadata) of the run's final export in <run_dir>/export:
    the LoRA in ComfyUI keys when the run trained one, else the full weights in Wan keys."""
    from safetensors.torch import load_file

    from training.export import export_files, read_export_info
    from training.loop import STAGES

    path = export_files(run_dir / "export", STAGES[stage].export_name, lora_rank, merged=False)[-1]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the run's final export (the node's output). Export it again with "
                                f"python -m training --config {run_dir / 'config.toml'} --export-only, or choose another run_name")
    return ("lora" if lora_rank else "full"), load_file(str(path)), read_export_info(path)


def validation_latents(run_dir: Path, result: dict | None = None, up_to: int | None = None) -> torch.Tensor | None:
    """The last validation samples [prompts * seeds, C, F, H, W] (model space): the run's `result`, else
    the newest samples/step-N/ of the folder (N <= up_to); None if the run has none."""
    from safetensors.torch import load_file

    path = ((result or {}).get("validation") or {}).get("val_latents")
    if not path:
        found = []
        for f in Path(run_dir, "samples").glob("step-*/samples.safetensors"):
            step = f.parent.name[len("step-"):]
            if step.isdigit() and (up_to is None or int(step) <= up_to):
                found.append((int(step), f))
        if not found:
            return None
        path = max(found)[1]
    x = load_file(str(path))["samples"]
    return x.flatten(0, 1) if x.ndim == 6 else x


def history(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """The run's curves from its metrics.jsonl (nodes.plot.metrics_history)."""
    from .plot import metrics_history, read_metrics

    return metrics_history(read_metrics(Path(run_dir) / "metrics.jsonl"))


def report(title: str, step: int, run_dir: Path, curves: dict[str, list[tuple[int, float]]], note: str = "",
           stage: str = "apt") -> str:
    """The node's report: steps, run folder, how to continue headless, the last value of each curve."""
    last = ", ".join(f"{k}={v[-1][1]:.4g}" for k, v in curves.items())
    teacher = " (replace TEACHER_WEIGHTS.safetensors by the teacher's weights file)" if stage == "cd" else ""
    text = (f"{title}: {step} steps, run folder {run_dir}{note}; continue headless (here to {2 * step} steps{teacher}) with: "
            f"{headless_command(run_dir, step, stage)}; last {last}")
    warned = run_warnings(run_dir)
    if warned:  # the runner's warnings (D winning, mode collapse, divergence) reach the console only otherwise
        text += f"\n{len(warned)} warning(s) in metrics.jsonl, the last: " + in_node_terms(warned[-1])
    return text


def run_warnings(run_dir: Path) -> list[str]:
    """The runner's warning events of the run ("step N: message"), from its metrics.jsonl."""
    from .plot import read_metrics

    return [f"step {r.get('step')}: {r.get('message')}" for r in read_metrics(Path(run_dir) / "metrics.jsonl")
            if r.get("event") == "warning"]


def headless_command(run_dir: Path, step: int, stage: str = "apt") -> str:
    """A shell command that continues the run to 2 * `step` steps with the headless trainer: ComfyUI's own
    Python, run from this pack's folder (where `-m training` imports), paths quoted. A CD run also needs
    its teacher's weights file, which the node cannot know (a placeholder to replace)."""
    import sys

    more = f"--run.steps={2 * step} --cd.teacher_from=TEACHER_WEIGHTS.safetensors" if stage == "cd" else f"--apt.image.steps={2 * step}"
    pack = Path(__file__).resolve().parents[1]
    return (f"cd {shlex.quote(str(pack))} && {shlex.quote(sys.executable)} -m training --resume {shlex.quote(str(run_dir))} "
            f"{more}")


def in_node_terms(message: str) -> str:
    """A runner message in the node's words: its run dir is the node's run_name, a config key the widget
    that sets it (e.g. "apt.lr (APT Train widget 'lr')")."""
    import re

    from .run_config import WIDGET_OF_KEY

    for old in ("another --run.dir", "--run.dir=<new dir>", "another run.dir"):
        message = message.replace(old, "another run_name")

    def widget(m: re.Match) -> str:
        node, name = WIDGET_OF_KEY[m.group(0)]
        return f"{m.group(0)} ({node + ' ' if node else ''}widget {name!r})"

    keys = "|".join(re.escape(k) for k in sorted(WIDGET_OF_KEY, key=len, reverse=True))
    return re.sub(rf"(?<![\w.-])(?:{keys})(?![\w.])", widget, message)


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """A run input file (validation prompts, negative prompt) in the run folder, replaced atomically."""
    from apt_core.models.io import save_state_dict_file

    save_state_dict_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, path, overwrite=True)
    return str(path)


# ----------------------------------------------------------------------------------------------
# With ComfyUI
# ----------------------------------------------------------------------------------------------


def wan_config_of(model: Any) -> Any:
    """The apt_core WanConfig of a ComfyUI MODEL's diffusion model (from its shapes and head count)."""
    from apt_core.models.io import infer_wan_config

    from .comfy_backbone import model_signature

    dm = model.model.diffusion_model
    shapes = {k: torch.empty(s, device="meta") for k, s in model_signature(model).items()}
    return infer_wan_config(shapes, num_heads=int(dm.num_heads))


def model_source(generator: Any, discriminator: Any = None, teacher: Any = None, dtype: torch.dtype | None = None) -> Any:
    """The runner's models from ComfyUI MODELs: G's (and D's) base weights = the MODEL's effective weights
    (read when the runner builds it), the CD teacher = a ready frozen module (ComfyFlowModel)."""
    from training.models import MemorySource

    from .comfy_backbone import effective_state_dict

    d = (lambda: effective_state_dict(discriminator, dtype)) if discriminator is not None else None
    return MemorySource(wan_config_of(generator), lambda: effective_state_dict(generator, dtype), d, teacher=teacher)


def progress_and_stop(total: int) -> tuple[Callable[[int, int, dict], None], Any]:
    """(on_step, stop): on_step moves ComfyUI's ProgressBar; when Stop was pressed it asks the runner to
    stop (the runner saves a checkpoint after the step and returns) instead of raising mid-step."""
    import comfy.model_management as mm
    import comfy.utils

    from training.stop import StopRequest

    stop = StopRequest()
    pbar = comfy.utils.ProgressBar(total)

    def on_step(step: int, total: int, metrics: dict) -> None:
        if stop.reason is not None:
            return
        try:
            if mm.processing_interrupted():
                raise mm.InterruptProcessingException()
            pbar.update_absolute(min(step, total), total)  # ComfyUI's hook raises there when Stop is pressed
        except mm.InterruptProcessingException:
            stop.request(STOP_REASON)

    return on_step, stop


@contextmanager
def watching(interrupted: Callable[[], bool], stop: Any, interval_s: float = 0.2) -> Iterator[threading.Thread]:
    """While the block runs, a daemon thread polls `interrupted()` (ComfyUI's Stop flag) every `interval_s` and
    asks `stop` to stop once it is set: a Stop pressed while the runner builds its models or loads a checkpoint
    (minutes on a large model) ends the run before its first step, not after it."""
    done = threading.Event()

    def poll() -> None:
        while True:
            if interrupted():
                stop.request(STOP_REASON)
                return
            if done.wait(interval_s):
                return

    thread = threading.Thread(target=poll, daemon=True, name="apt-stop-watch")
    thread.start()
    try:
        yield thread
    finally:
        done.set()
        thread.join()


def run(cfg: Any, models: Any, title: str) -> tuple[dict | None, bool]:
    """Run the config with the runner inside ComfyUI: (result, complete). complete: the run folder already
    held the finished run (re-queued with resume on): nothing trained, the outputs come from its folder.
    Stop (watched from the start: also during setup): the runner saves a checkpoint of the step it ended (none
    if it ended before its first step), then ComfyUI's InterruptProcessingException is raised."""
    import comfy.model_management as mm

    from training.config import ConfigError
    from training.loop import RunComplete, train
    from training.runlock import RunDirBusy

    from .comfy_env import training_mode

    cfg = with_run_checkpoints(cfg)
    total = cfg.run.steps if cfg.run.stage != "apt" else cfg.apt.image.steps + cfg.apt.video.steps
    on_step, stop = progress_and_stop(total)
    log.info("APT %s: training to step %d (run folder: %s)", cfg.run.stage, total, cfg.run.dir)
    try:
        with training_mode(), watching(mm.processing_interrupted, stop):
            result = train(cfg, models=models, on_step=on_step, stop=stop)
    except RunComplete:
        log.info("%s: %s is complete; outputting its export", title, cfg.run.dir)
        return None, True
    except (ConfigError, RunDirBusy, FloatingPointError) as e:  # a refusal with its reason, in the node's words
        raise type(e)(in_node_terms(str(e))) from e
    if result.get("stopped"):
        mm.interrupt_current_processing(False)
        raise mm.InterruptProcessingException()
    return result, False
