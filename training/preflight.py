"""Checks that run before any model is built, so a typo fails in a second, not after a whole phase.

Every path the config names (every phase's shard directory, the weights files, the validation
prompts) must exist and be readable as what its key says; a LoRA run must be able to train at all.
Errors are ConfigErrors naming the dotted key and the path.
"""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

from apt_core.models.io import KEY_PREFIXES
from apt_core.shards import ShardReader
from training.config import ConfigError, RunConfig, generator_init

HEAD_KEY = "head.head.weight"  # Wan's output projection (the last Linear of the model)


def shard_dirs(cfg: RunConfig) -> list[tuple[str, str]]:
    """(dotted key, path) of every shard directory the run reads, in phase order."""
    if cfg.run.stage != "apt":
        return [("data.path", cfg.data.path)]
    out = []
    for name in ("image", "video"):
        p = getattr(cfg.apt, name)
        if p.steps:
            out.append((f"apt.{name}.data", p.data) if p.data else ("data.path", cfg.data.path))
    return out


def weight_files(cfg: RunConfig) -> list[tuple[str, str, str | None]]:
    """(dotted key, path, tensor the file must hold or None) of every safetensors file the run reads."""
    c = cfg
    out: list[tuple[str, str, str | None]] = [("model.init_from", c.model.init_from, None)]
    if c.run.stage == "cd":
        out.append(("cd.teacher_from", c.cd.teacher_from, None))
        if c.cd.cfg_scale != 1.0:
            out.append(("cd.negative_embedding", c.cd.negative_embedding, "context"))
    for i, entry in enumerate(c.model.expert_files):  # 'expert=path' (the form is checked by loop.original_weights)
        out.append((f"model.expert_files[{i}]", entry.partition("=")[2].strip(), None))
    if c.run.stage == "apt":
        out.append(("apt.generator_init", c.apt.generator_init, None))
    if c.monitor.val_every:
        out.append(("monitor.val_prompts", c.monitor.val_prompts, "context"))
    return [(k, p, t) for k, p, t in out if p]


def _open_safetensors(key: str, path: str):
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{key} = {path!r}: file not found" + (" (it is a directory)" if p.is_dir() else ""))
    if p.suffix != ".safetensors":
        raise ConfigError(f"{key} = {path!r}: only .safetensors files are read (pickled weights can run code)")
    try:
        return safe_open(str(p), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise ConfigError(f"{key} = {path!r}: not a readable safetensors file ({e})") from None


def _head_key(keys: list[str]) -> str | None:
    for prefix in ("", *KEY_PREFIXES):
        if prefix + HEAD_KEY in keys:
            return prefix + HEAD_KEY
    return None


def check_paths(cfg: RunConfig) -> None:
    """Every shard directory and file of the config exists and opens; ConfigError names the key and path."""
    for key, path in shard_dirs(cfg):
        try:
            ShardReader(path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{key} = {path!r}: {e}") from None
    for key, path, tensor in weight_files(cfg):
        with _open_safetensors(key, path) as f:
            if tensor is not None and tensor not in f.keys():
                raise ConfigError(f"{key} = {path!r}: has no {tensor!r} tensor (found {sorted(f.keys())[:5]})")


def check_lora_trains(cfg: RunConfig) -> None:
    """Refuse LoRA on weights whose output head is all zero: the head is frozen, so every LoRA gradient is 0."""
    path, key = generator_init(cfg)
    if cfg.model.lora_rank and not path and cfg.model.expert_files:
        from training.models import original_weights  # the family picks G's expert

        path, key = original_weights(cfg)[0], "model.expert_files"
    if not cfg.model.lora_rank or not path:  # lora on a seeded init is refused by config.validate
        return
    with _open_safetensors(key, path) as f:
        head = _head_key(list(f.keys()))
        if head is None or bool(f.get_tensor(head).any()):
            return
    raise ConfigError(f"model.lora_rank = {cfg.model.lora_rank} with {key} = {path!r}, whose output head "
                      f"({HEAD_KEY}) is all zero: LoRA keeps the head frozen, so every LoRA gradient is zero and "
                      "nothing would train; start from trained weights, or set model.lora_rank = 0 to train all weights")


def preflight(cfg: RunConfig) -> None:
    """All checks that need the filesystem but no model: paths, then whether LoRA can train."""
    check_paths(cfg)
    check_lora_trains(cfg)
