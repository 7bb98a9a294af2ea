"""The two callables the APT algorithm sees, and the Wan adapter that provides them.

A flow model is an `nn.Module` with `forward(x_t, t, cond) -> velocity` (t [B] in [0, 1]) and
`features(x, t, cond, layers) -> list[[B, tokens, hidden_dim]]`, plus `num_layers` and
`hidden_dim`. `cond` is opaque to the algorithm; the helpers below batch it whatever it holds
(a Tensor, a dict of tensors, or a dataclass of tensors).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn as nn

from apt_core.models.wan import WanConfig, WanModel


@runtime_checkable
class FlowModel(Protocol):
    """Protocol for models the APT algorithm trains (see docs/DESIGN.md)."""

    num_layers: int
    hidden_dim: int

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor: ...

    def features(self, x: torch.Tensor, t: torch.Tensor, cond: Any, layers: Sequence[int]) -> list[torch.Tensor]: ...


@dataclass
class WanCond:
    """Condition for Wan: text context [B, L, text_dim] (zero-padded rows are fine); image-to-video
    models also take `clip_fea` [B, 257, 1280] (CLIP image tokens) and `y` [B, mask + image latent, F, H, W]."""

    context: torch.Tensor
    clip_fea: torch.Tensor | None = None
    y: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------------
# Condition batching (the algorithm never looks inside a condition)
# ----------------------------------------------------------------------------------------------


def _map(cond: Any, fn) -> Any:
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return fn(cond)
    if isinstance(cond, dict):
        return {k: _map(v, fn) for k, v in cond.items()}
    if dataclasses.is_dataclass(cond):
        return dataclasses.replace(cond, **{f.name: _map(getattr(cond, f.name), fn) for f in dataclasses.fields(cond)})
    if isinstance(cond, (list, tuple)):
        return type(cond)(_map(v, fn) for v in cond)
    return cond


def _zip(conds: Sequence[Any], fn) -> Any:
    first = conds[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        return fn(list(conds))
    if isinstance(first, dict):
        return {k: _zip([c[k] for c in conds], fn) for k in first}
    if dataclasses.is_dataclass(first):
        return dataclasses.replace(
            first, **{f.name: _zip([getattr(c, f.name) for c in conds], fn) for f in dataclasses.fields(first)}
        )
    if isinstance(first, (list, tuple)):
        return type(first)(_zip([c[i] for c in conds], fn) for i in range(len(first)))
    return first


def cat_cond(*conds: Any) -> Any:
    """Concatenate conditions along the batch dim (pads text length with zero rows if they differ)."""

    def cat(ts: list[torch.Tensor]) -> torch.Tensor:
        if ts[0].ndim == 3 and len({t.shape[1] for t in ts}) > 1:
            n = max(t.shape[1] for t in ts)
            ts = [torch.nn.functional.pad(t, (0, 0, 0, n - t.shape[1])) for t in ts]
        return torch.cat(ts)

    return _zip(conds, cat)


def repeat_cond(cond: Any, n: int) -> Any:
    """Repeat a condition n times along the batch dim (`[c0, c1] -> [c0, c1, c0, c1, ...]`)."""
    return _map(cond, lambda t: t.repeat(n, *([1] * (t.ndim - 1))))


def index_cond(cond: Any, index: torch.Tensor | slice) -> Any:
    """Select batch entries of a condition."""
    return _map(cond, lambda t: t[index])


# ----------------------------------------------------------------------------------------------
# Wan adapter
# ----------------------------------------------------------------------------------------------


def _context(cond: Any) -> torch.Tensor:
    if isinstance(cond, WanCond):
        return cond.context
    if isinstance(cond, torch.Tensor):
        return cond
    if isinstance(cond, dict) and "context" in cond:
        return cond["context"]
    raise TypeError(f"Wan condition must be WanCond, a context tensor or {{'context': tensor}}, got {type(cond).__name__}")


def _image(cond: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(clip_fea, y) of an image-to-video condition; (None, None) for text-only ones."""
    if isinstance(cond, WanCond):
        return cond.clip_fea, cond.y
    if isinstance(cond, dict):
        return cond.get("clip_fea"), cond.get("y")
    return None, None


class WanFlowModel(WanModel):
    """WanModel speaking the flow-model protocol: `t in [0, 1]` -> Wan `timestep = 1000 t`.

    It *is* a WanModel (same state-dict keys, no wrapper prefix), so checkpoints, LoRA paths and
    FSDP sharding see the original module tree.
    """

    timestep_scale = 1000.0

    def __init__(self, config: WanConfig):
        super().__init__(config)

    @property
    def num_layers(self) -> int:
        """Transformer depth (the discriminator's tap depths scale to it)."""
        return len(self.blocks)

    @property
    def hidden_dim(self) -> int:
        """Width of the tapped hidden states."""
        return self.config.dim

    def token_grid(self, x_shape: Sequence[int]) -> tuple[int, int, int]:
        """(F, H, W) of the token grid for an input of shape [B, C, F, H, W] (its sizes over the patch size)."""
        return token_grid(x_shape, self.config.patch_size)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:  # type: ignore[override]
        """Velocity at flow time t [B] in [0, 1]."""
        return super().forward(x_t, t * self.timestep_scale, _context(cond), *_image(cond))

    def features(self, x: torch.Tensor, t: torch.Tensor, cond: Any, layers: Sequence[int]) -> list[torch.Tensor]:
        """Hidden states [B, tokens, dim] after the 0-based blocks `layers` (runs only as deep as needed)."""
        return self.forward_features(x, t * self.timestep_scale, _context(cond), layers, *_image(cond))


def token_grid(x_shape: Sequence[int], patch_size: Sequence[int]) -> tuple[int, int, int]:
    """(F, H, W) after patching [B, C, F, H, W] with `patch_size` (tokens are F-major, then H, then W)."""
    if len(x_shape) != 5:
        raise ValueError(f"x must be [B, C, F, H, W] (rank 5), got shape {tuple(x_shape)}")
    f, h, w = (int(n) // int(p) for n, p in zip(x_shape[2:], patch_size))
    return f, h, w


def build_flow_model(config: WanConfig | str, device: torch.device | str | None = None, **overrides) -> WanFlowModel:
    """Build a WanFlowModel from a preset name or config (`device="meta"` for no allocation).

    With no `device`, the ambient default device is used (an enclosing `with torch.device("meta")`).
    """
    from apt_core.models.wan import get_config

    cfg = get_config(config, **overrides) if isinstance(config, str) else dataclasses.replace(config, **overrides)
    with torch.device(device or torch.get_default_device()):
        return WanFlowModel(cfg)


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model
