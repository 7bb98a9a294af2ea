"""Checks around a run: may a checkpoint be resumed with this config, are the weights and metrics finite,
which exports will this run write and may it write them.

All of them refuse with a message naming the setting, file or tensor and what to do instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from apt_core.models.wan import WanConfig
from training.checkpoint import CheckpointManager
from training.config import ConfigError, RunConfig, load_config, to_dict
from training.export import export_files, read_export_info
from training.models import resolve_wan_config
from training.monitor import nonfinite_metrics
from training.stages import STAGES, Phase, Stage

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


class RunComplete(RuntimeError):
    """run.dir already holds a checkpoint at the run's last step: re-running would train nothing."""


class ResumeMismatch(ConfigError):
    """The config differs from a resumed checkpoint's in a setting that fixes its tensors or entries."""


# settings whose change makes a checkpoint unloadable: (dotted key, stages it matters for)
RESUME_KEYS = (("run.stage", None), ("model.lora_rank", None), ("apt.disc_kind", ("apt",)), ("apt.disc_mode", ("apt",)),
               ("apt.disc_lora_rank", ("apt",)), ("apt.head_layers", ("apt",)), ("apt.sfv.backbone_blocks", ("apt",)),
               ("apt.sfv.head_layers", ("apt",)), ("apt.sfv.head_channels", ("apt",)))
ARCH_KEYS = ("model.preset", "model.in_dim", "model.arch", "model.init_from", "model.expert_files")


def _dotted(d: dict, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def check_resume_config(cfg: RunConfig, config: WanConfig, start_path: Path) -> None:
    """Refuse to resume `start_path` (by setting name) when its config.toml differs from `cfg` in the model
    architecture, LoRA, D layout, stage or EMA presence; other settings (lr, steps, ...) may change."""
    path = Path(start_path) / "config.toml"
    if not path.is_file():
        return
    try:
        old = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return
    new = to_dict(cfg)
    diffs = [f"{key} = {_dotted(old, key)!r} there, {_dotted(new, key)!r} now" for key, stages in RESUME_KEYS
             if (stages is None or cfg.run.stage in stages) and _dotted(old, key) is not None
             and _dotted(old, key) != _dotted(new, key)]
    if cfg.run.stage in ("teacher", "cd"):
        key = f"{cfg.run.stage}.ema_decay"
        was = _dotted(old, key)
        if was is not None and (was > 0) != (_dotted(new, key) > 0):
            diffs.append(f"{key} = {was!r} there, {_dotted(new, key)!r} now (an EMA is kept only when > 0)")
    try:
        old_config = resolve_wan_config(load_config(path))
    except (ConfigError, OSError, ValueError, RuntimeError):
        old_config = None  # an older schema or a moved init_from file: compare the keys only
    if old_config is not None and old_config != config:
        fields = [f for f in old_config.__dataclass_fields__ if getattr(old_config, f) != getattr(config, f)]
        arch = ", ".join(f"{f} {getattr(old_config, f)} -> {getattr(config, f)}" for f in fields)
        changed = [f"{k} = {_dotted(old, k)!r} there, {_dotted(new, k)!r} now" for k in ARCH_KEYS
                   if _dotted(old, k) != _dotted(new, k)] or ["the weights file model.init_from"]
        diffs.append(f"{'; '.join(changed)}: the model architecture changes ({arch})")
    if diffs:
        raise ResumeMismatch(f"cannot resume from {start_path}: {'; '.join(diffs)}. These settings fix what the checkpoint "
                             f"holds: set them back (its config.toml has the values), or start a new run with another "
                             f"--run.dir")


def load_checkpoint(ckpt: CheckpointManager, path: Path, state: dict[str, Any]) -> None:
    """ckpt.load, with a shape or key mismatch (a setting the checks above do not cover) named as such."""
    try:
        ckpt.load(path, state)
    except (RuntimeError, ValueError, KeyError) as e:
        if isinstance(e, ResumeMismatch) or not any(w in str(e).lower() for w in ("size", "shape", "missing", "unexpected")):
            raise
        first = str(e).strip().splitlines()[0][:300]
        raise ResumeMismatch(f"checkpoint {path} does not fit this config ({first}); compare the config with its "
                             f"config.toml (model.*, apt.disc_*, apt.head_layers), or start a new run with another "
                             f"--run.dir") from e


def stop_if_diverged(rows: list[dict[str, Any]] | None, ckpt: CheckpointManager) -> None:
    """FloatingPointError when a logged metric is NaN/Inf (same rows on every rank: all stop together)."""
    bad = nonfinite_metrics(rows or [])
    if bad is not None:
        step, keys = bad
        raise FloatingPointError(f"step {step}: non-finite {', '.join(keys)} (NaN/Inf): training diverged; stopped "
                                 f"without saving. Newest checkpoint: {ckpt.latest()}. Lower the learning rate (or "
                                 f"raise apt.r1_lambda) and resume from it with --resume path/to/step-N")


def first_nonfinite(stage: Stage) -> str | None:
    """Name of the first generator / discriminator / EMA tensor holding NaN/Inf on any rank, or None
    (collective: one all-reduce)."""
    named: list[tuple[str, torch.Tensor]] = []
    for prefix in ("generator", "discriminator"):
        model = getattr(stage, prefix, None)
        if model is not None:
            named += [(f"{prefix}.{n}", p.detach()) for n, p in model.named_parameters()]
    if stage.ema is not None:
        named += [(f"ema.{n}", t) for n, t in zip(stage.ema.names, stage.ema.shadow)]
    dev = stage.world.device
    ok = [torch.isfinite(t.to_local() if hasattr(t, "to_local") else t).all().to(dev) for _, t in named]
    bad = (~torch.stack(ok)).nonzero() if ok else torch.zeros(0, 1)
    first = torch.tensor([int(bad[0, 0]) if len(bad) else len(named)], device=dev)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(first, op=dist.ReduceOp.MIN)
    i = int(first)
    return named[i][0] if i < len(named) else None


def check_weights(stage: Stage, step: int, ckpt: CheckpointManager) -> None:
    """FloatingPointError naming the first non-finite weight, before anything is saved or exported."""
    name = first_nonfinite(stage)
    if name is not None:
        raise FloatingPointError(f"step {step}: {name} holds NaN/Inf: the weights diverged; nothing was saved or "
                                 f"exported. Newest checkpoint: {ckpt.latest()}. Lower the learning rate and resume "
                                 f"from it with --resume path/to/step-N")


def export_name(name: str, step: int, final_step: int) -> str:
    """`name` for the run's final step; `name_step-N` for an earlier step (never the final export's file)."""
    return name if step == final_step else f"{name}_step-{step}"


def planned_exports(cfg: RunConfig, phases: list[Phase], k: int, step: int, export_only: bool) -> dict[str, dict]:
    """File stem -> `apt.export` metadata of every export this call of train() will write (from phase k, at step)."""
    out: dict[str, dict] = {}
    if not export_only:
        for i in range(k, len(phases) - 1):
            if phases[i].name == "image":
                out["apt_image_ema"] = {"step": phases[i].end, "phase": "image"}
    if cfg.export.final or export_only:
        end = step if export_only else phases[-1].end
        out[export_name(STAGES[cfg.run.stage].export_name, end, phases[-1].end)] = {"stage": cfg.run.stage, "step": end}
    return out


def check_export_targets(out_dir: Path, planned: dict[str, dict], lora_rank: int, overwrite: bool, resumed: bool,
                         merged: bool = True) -> None:
    """Before training: FileExistsError for an export file this run would replace, unless `overwrite`. A resumed
    run may rewrite its own export of the same step (left by the interrupted attempt: same weights)."""
    if overwrite:
        return
    for name, meta in planned.items():
        for path in export_files(out_dir, name, lora_rank, merged):
            if not path.exists():
                continue
            old = read_export_info(path)
            if resumed and all(old.get(key) == v for key, v in meta.items()):
                continue
            raise FileExistsError(f"{path} already exists (exported at step {old.get('step', '?')}); this run would "
                                  f"replace it. Pass --overwrite (export.overwrite = true) to allow that, move the "
                                  f"file, or use another --run.dir")
