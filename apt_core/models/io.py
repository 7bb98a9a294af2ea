"""Weights I/O for the Wan DiT: safetensors only, strict key/shape checks, meta-device loading.

Files may hold the original Wan keys or the same keys under ComfyUI's `model.diffusion_model.` /
`diffusion_model.` prefix. Files written here carry their `WanConfig` as JSON in the safetensors
metadata (`apt.wan_config`), so they can be rebuilt without guessing; other files go through
`infer_wan_config`, ComfyUI's detection rule (plus `text_dim`, which the weights do reveal).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from apt_core.fileio import atomic_path, refuse_overwrite
from apt_core.models.wan import WanConfig, get_config

if TYPE_CHECKING:  # backbone imports this module
    from apt_core.backbone import WanFlowModel

CONFIG_METADATA_KEY = "apt.wan_config"
KEY_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
_SHOW = 5  # example keys per category in error messages


Mismatch = tuple[str, tuple, tuple]  # (key, shape found, shape expected)


def compare_shapes(
    expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]]
) -> tuple[list[str], list[str], list[Mismatch]]:
    """(missing, unexpected, shape mismatches) of the names/shapes `found` against those `expected`."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mismatched = [(k, tuple(s), tuple(expected[k])) for k, s in found.items() if k in expected and tuple(s) != tuple(expected[k])]
    return missing, unexpected, mismatched


def describe_mismatch(
    missing: list[str],
    unexpected: list[str],
    mismatched: list[Mismatch],
    labels: tuple[str, str] = ("missing key(s)", "unexpected key(s)"),
    sides: tuple[str, str] = ("file", "model"),
) -> str:
    """'N missing key(s) (e.g. ...); M unexpected key(s) (e.g. ...); K shape mismatch(es) (e.g. k: file [..] vs model [..])'."""
    parts = []
    for keys, label in ((missing, labels[0]), (unexpected, labels[1])):
        if keys:
            parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:_SHOW])})")
    if mismatched:
        shown = ", ".join(f"{k}: {sides[0]} {list(a)} vs {sides[1]} {list(b)}" for k, a, b in mismatched[:_SHOW])
        parts.append(f"{len(mismatched)} shape mismatch(es) (e.g. {shown})")
    return "; ".join(parts)


class WeightsMismatchError(ValueError):
    """A state dict does not fit the model: missing / unexpected keys or shape mismatches."""

    def __init__(
        self,
        missing: list[str],
        unexpected: list[str],
        mismatched: list[Mismatch],
        source: str | os.PathLike | None = None,
        hint: str = "pass config=... to load_wan, or strict=False to allow missing/extra keys",
    ):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        self.source = str(source) if source is not None else None
        where = f"weights in {self.source}" if self.source else "state dict"
        super().__init__(
            f"{where} do not match the model: {describe_mismatch(missing, unexpected, mismatched)}. "
            f"Check that the file is a Wan DiT of a registered family and the same size as the config ({hint})."
        )


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


def _check_safetensors_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(
            f"{path}: only .safetensors weights are supported (pickled .pt/.ckpt/.bin files can run code); "
            "convert with safetensors.torch.save_file(torch.load(f, weights_only=True), 'out.safetensors')"
        )
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    return path


def strip_prefix(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove ComfyUI's `model.diffusion_model.` / `diffusion_model.` key prefix.

    When a file holds prefixed keys, only those are kept: the rest belongs to other components
    bundled in a full checkpoint (VAE, text encoder).
    """
    for prefix in KEY_PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    return dict(sd)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The safetensors header metadata of a file (empty dict if it has none)."""
    path = _check_safetensors_path(path)
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_state_dict_file(
    path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Read a safetensors file, prefixes stripped; tensors go one at a time to `device`/`dtype`."""
    path = _check_safetensors_path(path)
    sd: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            sd[key] = t.to(device)
    return strip_prefix(sd)


def save_state_dict_file(
    sd: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
    config: WanConfig | None = None,
) -> Path:
    """Write tensors to a safetensors file atomically (temp file in the same folder + `os.replace`).

    Refuses to replace an existing file unless `overwrite=True`. With `config`, the WanConfig is
    stored as JSON under the metadata key `apt.wan_config` so `load_wan` can rebuild the model.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: weights are written as .safetensors only; use a .safetensors file name")
    refuse_overwrite(path, overwrite)
    meta = {"format": "pt"}
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"safetensors metadata must map str to str; key {k!r} has a {type(v).__name__} value")
        meta[k] = v
    if config is not None:
        meta[CONFIG_METADATA_KEY] = json.dumps(config.to_dict(), sort_keys=True)
    tensors = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"state dict entry {k!r} is a {type(v).__name__}, expected a torch.Tensor")
        if hasattr(v, "full_tensor"):  # DTensor shard -> the full tensor
            v = v.full_tensor()
        tensors[k] = v.detach().to("cpu").contiguous()
    _dedupe_shared(tensors)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)
    return path


def _dedupe_shared(tensors: dict[str, torch.Tensor]) -> None:
    """safetensors refuses tensors sharing storage (views, tied weights): give each its own copy."""
    seen: set[tuple[int, int]] = set()
    for k, v in tensors.items():
        sid = (v.untyped_storage().data_ptr(), v.untyped_storage().nbytes())
        if sid in seen or v.untyped_storage().nbytes() != v.numel() * v.element_size():
            tensors[k] = v.clone()
        seen.add(sid)


def save_wan(model: nn.Module, path: str | os.PathLike, metadata: Mapping[str, str] | None = None, overwrite: bool = False) -> Path:
    """Save a WanModel's weights (original Wan keys) with its config in the metadata."""
    return save_state_dict_file(model.state_dict(), path, metadata=metadata, overwrite=overwrite, config=model.config)


# ----------------------------------------------------------------------------------------------
# Checking and loading into a model
# ----------------------------------------------------------------------------------------------


def check_state_dict(
    model: nn.Module, sd: Mapping[str, torch.Tensor]
) -> tuple[list[str], list[str], list[Mismatch]]:
    """(missing, unexpected, shape mismatches) of `sd` against `model.state_dict()`."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return compare_shapes(expected, {k: tuple(v.shape) for k, v in sd.items()})


def load_into(
    model: nn.Module, sd: Mapping[str, torch.Tensor], strict: bool = True, source: str | os.PathLike | None = None
) -> nn.Module:
    """Load `sd` into `model`; raise `WeightsMismatchError` on any mismatch (shape ones even if not strict).

    A model on the meta device adopts the tensors (`assign=True`, no second copy); a materialised one
    copies them into its own parameters (keeping its device and dtype).
    """
    sd = strip_prefix(sd)
    missing, unexpected, mismatched = check_state_dict(model, sd)
    if mismatched or (strict and (missing or unexpected)):
        raise WeightsMismatchError(missing, unexpected, mismatched, source)
    on_meta = any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    if on_meta and missing:
        # strict=False cannot help here: a missing key would stay an unallocated meta parameter
        raise WeightsMismatchError(missing, [], [], source, hint="a model built on the meta device needs every key")
    model.load_state_dict(sd, strict=strict, assign=on_meta)
    return model


_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")


def infer_wan_config(sd: Mapping[str, torch.Tensor], num_heads: int | None = None, **overrides) -> WanConfig:
    """A WanConfig from the tensor shapes, following ComfyUI's Wan detection (`num_heads = dim // 128`).

    Unlike ComfyUI, `text_dim` is read from `text_embedding.0.weight`. Not detectable from weights:
    `text_len` (512), `eps` (1e-6); override those (and `num_heads` for head_dim != 128) by keyword.
    """
    sd = strip_prefix(sd)

    def shape(key: str) -> tuple[int, ...]:
        if key not in sd:
            raise KeyError(f"cannot infer a Wan config: key {key!r} is missing (is this a Wan DiT state dict?)")
        return tuple(sd[key].shape)

    if "head.modulation" not in sd:
        raise KeyError(
            f"not a Wan DiT state dict: no 'head.modulation' key (first keys: {sorted(sd)[:_SHOW]}); "
            f"the key prefixes understood are {KEY_PREFIXES}"
        )
    for key, kind in (("img_emb.emb_pos", "FLF2V"), ("vace_patch_embedding.weight", "VACE")):
        if key in sd:
            raise ValueError(f"found {key!r}: this is a Wan {kind} checkpoint; only T2V and I2V checkpoints are supported")
    dim = shape("head.modulation")[-1]
    if num_heads is None:
        if dim % 128:
            raise ValueError(
                f"dim {dim} is not a multiple of 128, so num_heads = dim // 128 (ComfyUI's rule) does not apply; "
                "pass num_heads=... (or load a file saved with its config in the metadata)"
            )
        num_heads = dim // 128
    pe = shape("patch_embedding.weight")  # [dim, in_dim, pf, ph, pw]
    patch = tuple(pe[2:])
    layers = {int(m.group(1)) for k in sd if (m := _BLOCK_KEY.match(k))}
    if layers != set(range(len(layers))):
        raise ValueError(f"block indices {sorted(layers)} are not contiguous from 0")
    fields = dict(
        dim=dim,
        num_heads=num_heads,
        ffn_dim=shape("blocks.0.ffn.0.weight")[0],
        num_layers=len(layers),
        in_dim=pe[1],
        out_dim=shape("head.head.weight")[0] // math.prod(patch),
        text_dim=shape("text_embedding.0.weight")[1],
        freq_dim=shape("time_embedding.0.weight")[1],
        patch_size=patch,
        qk_norm="blocks.0.self_attn.norm_q.weight" in sd,
        cross_attn_norm="blocks.0.norm3.weight" in sd,
        model_type="i2v" if "img_emb.proj.0.bias" in sd else "t2v",
    )
    fields.update(overrides)
    return WanConfig(**fields)


def config_from_metadata(metadata: Mapping[str, str], source: str | os.PathLike | None = None) -> WanConfig | None:
    """The WanConfig stored under `apt.wan_config`, or None if the file has none."""
    raw = metadata.get(CONFIG_METADATA_KEY)
    if raw is None:
        return None
    try:
        return WanConfig.from_dict(json.loads(raw))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{source}: metadata {CONFIG_METADATA_KEY!r} is not a valid WanConfig JSON ({e}): {raw[:200]}") from e


def load_wan(
    path: str | os.PathLike,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    config: WanConfig | str | None = None,
    strict: bool = True,
    **infer_overrides,
) -> WanFlowModel:
    """Build a `WanFlowModel` from a safetensors file: config from `config`, the file's metadata, or the
    weights' shapes (in that order); built on the meta device, then the file's tensors are adopted
    (each moved/cast once), so a 14B model never exists twice in memory.
    """
    from apt_core.backbone import WanFlowModel

    path = _check_safetensors_path(path)
    sd = load_state_dict_file(path, device=device or "cpu", dtype=dtype)
    if isinstance(config, str):
        config = get_config(config)
    if config is None:
        config = config_from_metadata(read_metadata(path), path)
    if config is None:
        config = infer_wan_config(sd, **infer_overrides)
    with torch.device("meta"):
        model = WanFlowModel(config)
    load_into(model, sd, strict=strict, source=path)
    return model
