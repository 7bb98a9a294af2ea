"""The run config: one TOML file as nested dataclasses, checked at load, with `--section.key=value` overrides.

The schema (the sections, their keys with type, default, help and allowed values, `RunConfig`) is in
training.config_schema; every name there is importable from here too. `docs/TRAINING.md` lists the keys
(`python -m training.config` prints the table). Unknown keys, wrong types and values outside a key's
choices are reported by their dotted name, with the allowed keys/values, before anything runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import types
import typing
from pathlib import Path
from typing import Any

from training.config_schema import (  # noqa: F401  (public names, importable from training.config as before)
    ARCH_REQUIRED,
    AT_LEAST_1,
    DECAY,
    FINITE,
    NONNEG,
    POSITIVE,
    STAGES,
    APTPhase,
    APTSection,
    ArchSection,
    Bounds,
    CDSection,
    CheckpointSection,
    ConfigError,
    DataSection,
    DistributedSection,
    ExportSection,
    ModelSection,
    MonitorSection,
    ParallelSection,
    RunConfig,
    RunSection,
    SFVSection,
    TeacherSection,
    opt,
)

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


# ----------------------------------------------------------------------------------------------
# Building dataclasses from TOML dicts, with checks
# ----------------------------------------------------------------------------------------------


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))


def _check_value(name: str, value: Any, tp: Any, choices: tuple | None) -> Any:
    """Return `value` converted to `tp` (int -> float only), or raise ConfigError naming `name`."""
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (item_tp,) = typing.get_args(tp)[:1] or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list of {item_tp.__name__}, got {type(value).__name__} {value!r}")
        return [_check_value(f"{name}[{i}]", v, item_tp, None) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{name}: union types are not supported in the config schema")
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (tp is str and isinstance(value, str))
    )
    if not ok:
        raise ConfigError(f"{name}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    if tp is float:
        value = float(value)
    if choices is not None and value not in choices:
        raise ConfigError(f"{name}: {value!r} is not allowed; choose one of {list(choices)}")
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a (TOML) dict; unknown keys and bad values raise ConfigError by name."""
    return update(cls(), data, prefix)


def update(obj: Any, data: dict, prefix: str = "") -> Any:
    """Set the keys of `data` onto dataclass instance `obj` (recursing into sub-tables), checking each."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a table, got {type(data).__name__} {data!r}")
    hints = _hints(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = prefix.rstrip(".") or "top level"
        raise ConfigError(f"unknown key(s) {[prefix + k for k in unknown]} in [{where}]; allowed keys: {sorted(fields)}")
    for key, value in data.items():
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            # onto the default sub-section, so per-section defaults (apt.video.lr, ...) survive
            update(getattr(obj, key), value, f"{prefix}{key}.")
        else:
            setattr(obj, key, _check_value(prefix + key, value, tp, fields[key].metadata.get("choices")))
    return obj


def to_dict(cfg: Any) -> dict:
    """Dataclass -> plain nested dict (TOML-writable)."""
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------------------------
# Overrides, loading, saving
# ----------------------------------------------------------------------------------------------


def parse_override_value(raw: str) -> Any:
    """`1e-5` -> float, `true` -> bool, `[0, 1]` -> list, anything else not valid TOML -> the string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Merge `--section.key=value` (or `section.key=value`) strings into a TOML dict (checked later)."""
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text:
            raise ConfigError(f"override {item!r} must look like --section.key=value")
        dotted, raw = text.split("=", 1)
        keys = dotted.strip().split(".")
        if len(keys) < 2 or not all(keys):
            raise ConfigError(f"override {item!r}: key must be section.key (e.g. --apt.lr=1e-5)")
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {k!r} is a value, not a section")
        node[keys[-1]] = parse_override_value(raw.strip())
    return data


def split_override_args(argv: list[str]) -> list[str]:
    """Join `--a.b value` pairs into `--a.b=value` (for argparse's leftover args)."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--") and "=" not in a and "." in a and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out.append(f"{a}={argv[i + 1]}")
            i += 2
        else:
            if not a.startswith("--") or "." not in a:
                raise ConfigError(f"unexpected argument {a!r}; overrides look like --section.key=value")
            out.append(a)
            i += 1
    return out


def generator_init(cfg: RunConfig) -> tuple[str, str]:
    """(path, dotted key) the trained generator starts from: apt.generator_init or model.init_from; '' = seeded init."""
    if cfg.run.stage == "apt" and cfg.apt.generator_init:
        return cfg.apt.generator_init, "apt.generator_init"
    return cfg.model.init_from, "model.init_from"


def check_bounds(obj: Any, prefix: str = "") -> None:
    """Every numeric key (and list item) within its field's `bounds`, else ConfigError naming the dotted key."""
    for f in dataclasses.fields(obj):
        value, name = getattr(obj, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            check_bounds(value, name + ".")
            continue
        bounds = f.metadata.get("bounds")
        if bounds is None:
            continue
        items = [(f"{name}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, list) else [(name, value)]
        for key, v in items:
            if not bounds.allows(v):
                raise ConfigError(f"{key} must be {bounds}, got {v!r}")


def validate(cfg: RunConfig) -> RunConfig:
    """Value ranges of every key (field `bounds`), then cross-field checks that single values cannot express."""
    check_bounds(cfg)
    if cfg.run.stage in ("teacher", "cd") and cfg.run.steps < 1:
        raise ConfigError(f"run.steps must be >= 1 for stage {cfg.run.stage!r}, got {cfg.run.steps}")
    if not cfg.data.path and (cfg.run.stage != "apt" or any(p.steps and not p.data for p in (cfg.apt.image, cfg.apt.video))):
        raise ConfigError("data.path is empty: set it to a shard directory (apt_core.shards.ShardWriter output)")
    _validate_model(cfg)
    g_init, g_key = generator_init(cfg)
    caller = cfg.model.source == "caller"  # base weights given in-process (or, on resume, by the checkpoint)
    if cfg.model.lora_rank and not g_init and not cfg.model.expert_files and not caller:
        raise ConfigError(f"model.lora_rank = {cfg.model.lora_rank} on a seeded init ({g_key} = ''): Wan's init zeroes the "
                          "output head and LoRA keeps it frozen, so every LoRA gradient is zero and nothing would train; "
                          f"set {g_key} to trained weights, or model.lora_rank = 0 to train all weights")
    if cfg.run.stage == "cd" and not (cfg.model.init_from or cfg.cd.teacher_from or caller):
        raise ConfigError("stage cd needs a teacher: set model.init_from (or cd.teacher_from) to a safetensors file")
    if cfg.run.stage == "apt":
        if cfg.apt.image.steps + cfg.apt.video.steps < 1:
            raise ConfigError("stage apt: apt.image.steps + apt.video.steps must be >= 1")
    _validate_discriminator(cfg)
    if cfg.parallel.compile and cfg.parallel.attention != "default":
        raise ConfigError(f"parallel.attention={cfg.parallel.attention!r} has no effect under parallel.compile=true "
                          "(compiled blocks take PyTorch's dispatcher); set parallel.attention='default' or compile=false")
    if len(cfg.teacher.betas) != 2:
        raise ConfigError(f"teacher.betas must have 2 values, got {cfg.teacher.betas}")
    if cfg.monitor.val_every and not cfg.monitor.val_seeds:
        raise ConfigError("monitor.val_seeds is empty but monitor.val_every > 0")
    if cfg.monitor.val_shape and len(cfg.monitor.val_shape) != 4:
        raise ConfigError(f"monitor.val_shape must be [C, F, H, W] (4 values) or [], got {cfg.monitor.val_shape}")
    return cfg


def arch_config(cfg: RunConfig) -> Any:
    """The [model.arch] table as an apt_core WanConfig, or None when it is unset (arch.dim = 0)."""
    a = cfg.model.arch
    if not a.dim:
        return None
    from apt_core.models.wan import WanConfig

    return WanConfig(**{k: (tuple(v) if k == "patch_size" else v) for k, v in dataclasses.asdict(a).items()})


def set_arch(cfg: RunConfig, config: Any) -> RunConfig:
    """Record an apt_core WanConfig as cfg's [model.arch] table (in place; returns cfg)."""
    d = dataclasses.asdict(config)
    cfg.model.arch = ArchSection(**{k: (list(v) if k == "patch_size" else v) for k, v in d.items()})
    return cfg


def _validate_model(cfg: RunConfig) -> None:
    """[model.arch] set completely or not at all, with a head width that divides the model width."""
    a = cfg.model.arch
    if not a.dim:
        return
    missing = [f"model.arch.{k}" for k in ARCH_REQUIRED if not getattr(a, k)]
    if missing:
        raise ConfigError(f"model.arch.dim = {a.dim} sets the [model.arch] table, which then needs every size: {missing} "
                          "are 0 (or set model.arch.dim = 0 to take the architecture from model.init_from / model.preset)")
    if len(a.patch_size) != 3:
        raise ConfigError(f"model.arch.patch_size must have 3 values [F, H, W], got {a.patch_size}")
    if a.dim % a.num_heads:
        raise ConfigError(f"model.arch.dim = {a.dim} is not a multiple of model.arch.num_heads = {a.num_heads}")
    if a.out_dim > a.in_dim:
        raise ConfigError(f"model.arch.out_dim = {a.out_dim} exceeds model.arch.in_dim = {a.in_dim}")


def _validate_discriminator(cfg: RunConfig) -> None:
    """The discriminator settings that only make sense together."""
    a, s = cfg.apt, cfg.apt.sfv
    bad = [i for i in s.head_layers if i < 0 or (s.backbone_blocks and i >= s.backbone_blocks)]
    if bad or len(set(s.head_layers)) != len(s.head_layers):
        limit = f"< apt.sfv.backbone_blocks={s.backbone_blocks}" if s.backbone_blocks else ">= 0"
        raise ConfigError(f"apt.sfv.head_layers {s.head_layers}: need distinct 0-based block indices {limit}")
    if cfg.run.stage != "apt" or a.r1_mode != "exact":
        return
    if a.loss == "relativistic":
        raise ConfigError("apt.r1_mode='exact' with apt.loss='relativistic': the relativistic recipe's R2 is approximated only; "
                          "use apt.r1_mode='approx' or another loss")
    if cfg.parallel.strategy == "fsdp":
        raise ConfigError("apt.r1_mode='exact' does not run with parallel.strategy='fsdp' (its double backward reaches "
                          "resharded parameters); use parallel.strategy='ddp' or 'none', or apt.r1_mode='approx'")


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a TOML run config, apply `--section.key=value` overrides, check everything, return RunConfig."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from e
    apply_overrides(data, list(overrides or []))
    try:
        return validate(from_dict(RunConfig, data))
    except ConfigError as e:
        raise ConfigError(f"{path or 'config'}: {e}") from None


def dumps(cfg: RunConfig) -> str:
    """TOML text of a config (every key, resolved); no TOML-writer dependency."""
    return _toml(to_dict(cfg))


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("nan" if v != v else ("inf" if v > 0 else "-inf"))
    if isinstance(v, int):
        return str(v)
    raise TypeError(f"cannot write {type(v).__name__} {v!r} as TOML")


def _toml(d: dict, prefix: str = "") -> str:
    """Scalars of a table under its [header], then its sub-tables (blank line between tables)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in d.items() if not isinstance(v, dict)]
    parts = [(f"[{prefix}]\n" if prefix else "") + "".join(line + "\n" for line in lines)] if lines or prefix else []
    for k, v in d.items():
        if isinstance(v, dict):
            parts.append(_toml(v, f"{prefix}.{k}" if prefix else k))
    return "\n".join(p for p in parts if p)


def save_config(cfg: RunConfig, path: str | Path) -> Path:
    """Write the resolved config as TOML (atomically), loadable by load_config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from apt_core.fileio import atomic_write_text

    return atomic_write_text(path, dumps(cfg))


def schema_rows(obj: Any = None, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, help) for every leaf key of a config instance: the docs table."""
    obj = RunConfig() if obj is None else obj
    hints, rows = _hints(type(obj)), []
    for f in dataclasses.fields(obj):
        tp, value = hints[f.name], getattr(obj, f.name)
        if dataclasses.is_dataclass(tp):
            rows += schema_rows(value, f"{prefix}{f.name}.")
            continue
        t = tp.__name__ if typing.get_origin(tp) is None else f"list[{typing.get_args(tp)[0].__name__}]"
        helptext = f.metadata.get("help", "")
        if f.metadata.get("choices"):
            helptext += f" ({' / '.join(map(str, f.metadata['choices']))})"
        if f.metadata.get("bounds") is not None:
            helptext += f" ({'each ' if isinstance(value, list) else ''}{f.metadata['bounds']})"
        rows.append((prefix + f.name, t, repr(value), helptext))
    return rows


def schema_markdown() -> str:
    """Markdown table of every config key (type, default, meaning)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{k}` | {t} | `{d}` | {h} |" for k, t, d, h in schema_rows()]
    return "\n".join(lines)


if __name__ == "__main__":
    print(schema_markdown())
