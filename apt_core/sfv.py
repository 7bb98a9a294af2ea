"""The SF-V discriminator: a FROZEN truncated backbone with light spatial and temporal heads.

SF-V (Zhang et al., NeurIPS 2024, sec. 3): the discriminator's backbone is the pre-trained
denoiser's encoder, frozen; only heads on its features train. Here the backbone is the first
`backbone_blocks` blocks of the DiT (default: half of them; the deeper blocks are not even kept), and
after each tapped block sit two heads:
- spatial: every frame an independent sample (time merged into the batch), Conv2D-ResBlock2D-Conv2D
  on `[B*F, C, H, W]` -> a logit map, averaged over space and frames;
- temporal: every spatial position an independent sample (space merged into the batch),
  Conv1D-ResBlock1D-Conv1D on `[B*H*W, C, F]` -> a logit per position and frame, averaged.
Each head gives one logit per sample; D's logit [B] is their mean. With the backbone frozen, D must
see NOISY inputs (SF-V sec. 3.3): the trainer turns real and fake alike into
`x_t = (1 - t) x + t eps` at D's t, drawn as a log-normal sigma (P_mean -1, P_std 1) mapped to flow
time `t = sigma / (1 + sigma)` (the t whose noise-to-signal ratio t / (1 - t) is sigma), i.e.
`t = sigmoid(N(P_mean, P_std^2))`, before calling D. `forward` therefore takes x_t and t.

Memory: no optimiser state or gradients for the backbone, and in the D step no autograd graph
through it at all (its inputs need no gradient, its weights none either), except under exact R1.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from apt_core.backbone import unwrap
from apt_core.discriminator import param_signature
from apt_core.flow import sample_timesteps
from apt_core.models.io import compare_shapes, describe_mismatch

SFV_P_MEAN = -1.0  # SF-V's log-normal sigma of the D input noise (its ablation: -2 lets D win too fast, 0 / 1 too noisy)
SFV_P_STD = 1.0
DEFAULT_TAPS = 4  # heads after this many evenly spaced depths of the truncated backbone


def default_backbone_blocks(num_layers: int) -> int:
    """SF-V's 'encoder' of a DiT: the first half of its blocks (at least one)."""
    return max(1, num_layers // 2)


def default_sfv_head_layers(backbone_blocks: int, taps: int = DEFAULT_TAPS) -> list[int]:
    """`taps` evenly spaced 0-based blocks of the truncated backbone, the last one included (deduped).

    15 (Wan 1.3B's half) -> [3, 7, 10, 14]; 2 -> [0, 1]; 1 -> [0].
    """
    if backbone_blocks < 1:
        raise ValueError(f"backbone_blocks must be >= 1, got {backbone_blocks}")
    out: list[int] = []
    for k in range(1, taps + 1):
        i = max(1, math.floor(k * backbone_blocks / taps + 0.5)) - 1
        if i not in out:
            out.append(i)
    return out


def _groups(channels: int) -> int:
    return math.gcd(32, channels)


class ResBlock(nn.Module):
    """`x + Conv(SiLU(GN(Conv(SiLU(GN(x))))))` in 1-D or 2-D (kernel 3, same padding)."""

    def __init__(self, channels: int, conv: type[nn.Conv1d] | type[nn.Conv2d]):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(channels), channels)
        self.conv1 = conv(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(channels), channels)
        self.conv2 = conv(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class _Head(nn.Module):
    """LayerNorm on the tokens, then Conv-ResBlock-Conv down to one logit channel (SF-V's head)."""

    conv: type[nn.Conv1d] | type[nn.Conv2d]

    def __init__(self, dim: int, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.conv_in = self.conv(dim, channels, 3, padding=1)
        self.block = ResBlock(channels, self.conv)
        self.conv_out = self.conv(channels, 1, 1)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.block(self.conv_in(x)))


class SpatialHead(_Head):
    """Each frame an independent sample: `[B, F, H, W, dim] -> [B*F, dim, H, W]` -> logits [B]."""

    conv = nn.Conv2d

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        b, f, h, w, d = grid.shape
        x = self.norm(grid).reshape(b * f, h, w, d).permute(0, 3, 1, 2)
        return self.run(x).reshape(b, f * h * w).mean(1)  # mean over the frames' logit maps


class TemporalHead(_Head):
    """Each position an independent sample: `[B, F, H, W, dim] -> [B*H*W, dim, F]` -> logits [B]."""

    conv = nn.Conv1d

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        b, f, h, w, d = grid.shape
        x = self.norm(grid).permute(0, 2, 3, 4, 1).reshape(b * h * w, d, f)
        return self.run(x).reshape(b, h * w * f).mean(1)  # mean over positions and frames


def init_sfv_heads(module: nn.Module) -> None:
    """Head init: PyTorch's conv init with zero biases, unit norms."""
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            m.reset_parameters()
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
            m.reset_parameters()


def _truncate(backbone: nn.Module, blocks: int, copy_backbone: bool) -> nn.Module:
    """The backbone keeping only its first `blocks` blocks (a copy unless `copy_backbone=False`).

    A backbone without a `blocks` ModuleList is kept whole (`features` runs only as deep as asked).
    """
    full = getattr(backbone, "blocks", None)
    if not isinstance(full, nn.ModuleList):
        return copy.deepcopy(backbone) if copy_backbone else backbone
    if not copy_backbone:
        backbone.blocks = nn.ModuleList(list(full)[:blocks])
        return backbone
    backbone.blocks = nn.ModuleList(list(full)[:blocks])  # copy only what D keeps
    try:
        return copy.deepcopy(backbone)
    finally:
        backbone.blocks = full


class SFVDiscriminator(nn.Module):
    """Frozen first `backbone_blocks` blocks + a spatial and a temporal head per tap -> logits [B].

    `head_channels` is the heads' width (default min(hidden_dim, 128)). `noised_inputs` tells the trainer to noise D's inputs (real and fake) to x_t at D's t
    (`sample_t`) before calling it. The backbone needs `token_grid(x_shape) -> (F, H, W)`, the
    token grid after patching (apt_core.backbone.WanFlowModel and nodes' ComfyFlowModel have it).
    """

    noised_inputs = True

    def __init__(
        self,
        backbone: nn.Module,
        backbone_blocks: int | None = None,
        head_layers: Sequence[int] | None = None,
        p_mean: float = SFV_P_MEAN,
        p_std: float = SFV_P_STD,
        head_channels: int | None = None,
        copy_backbone: bool = True,
    ):
        super().__init__()
        backbone = unwrap(backbone)
        if not callable(getattr(backbone, "token_grid", None)):
            raise TypeError(f"the SF-V discriminator needs backbone.token_grid(x_shape) -> (F, H, W); "
                            f"{type(backbone).__name__} has none (see docs/DESIGN.md, the flow-model protocol)")
        depth, dim = int(backbone.num_layers), int(backbone.hidden_dim)
        blocks = default_backbone_blocks(depth) if backbone_blocks is None else int(backbone_blocks)
        if not 1 <= blocks <= depth:
            raise ValueError(f"sfv backbone_blocks={blocks} must be in [1, {depth}] (the backbone has {depth} blocks)")
        layers = list(default_sfv_head_layers(blocks) if head_layers is None else head_layers)
        bad = [i for i in layers if not 0 <= int(i) < blocks]
        if not layers or bad or len(set(layers)) != len(layers):
            raise ValueError(f"sfv head_layers {layers} must be distinct 0-based block indices in [0, {blocks - 1}] "
                             f"(the first backbone_blocks={blocks} blocks)")
        if p_std <= 0:
            raise ValueError(f"sfv p_std must be > 0, got {p_std}")
        head_channels = min(dim, 128) if head_channels is None else int(head_channels)
        if head_channels < 1:
            raise ValueError(f"sfv head_channels must be >= 1, got {head_channels}")
        self.signature = param_signature(backbone)
        self.backbone = _truncate(backbone, blocks, copy_backbone)
        self.backbone.requires_grad_(False)  # frozen: no gradients, no optimiser state
        self.backbone_blocks, self.head_layers = blocks, [int(i) for i in layers]
        self.p_mean, self.p_std = float(p_mean), float(p_std)
        self.spatial = nn.ModuleList([SpatialHead(dim, head_channels) for _ in self.head_layers])
        self.temporal = nn.ModuleList([TemporalHead(dim, head_channels) for _ in self.head_layers])
        self.reset_heads()
        p0 = next(self.backbone.parameters())
        for m in (self.spatial, self.temporal):
            m.to(device=p0.device, dtype=p0.dtype)

    def reset_heads(self) -> None:
        """(Re-)initialise the heads (after `to_empty` on a meta-built D)."""
        init_sfv_heads(self.spatial)
        init_sfv_heads(self.temporal)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The heads' parameters: the only ones the D optimiser should own."""
        return (p for p in self.parameters() if p.requires_grad)

    def check_compatible(self, generator: nn.Module) -> None:
        """Raise ValueError if `generator` is not the architecture this discriminator was built from."""
        missing, extra, shapes = compare_shapes(self.signature, param_signature(generator))
        if missing or extra or shapes:
            found = describe_mismatch(
                missing, extra, shapes, ("parameter(s) only in D's backbone", "parameter(s) only in the generator"), ("G", "D")
            )
            raise ValueError(f"discriminator built from a different model than the generator: {found}. "
                             "Build the discriminator from the same base model as the generator.")

    def sample_t(self, n: int, device: torch.device | str | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """D's noise levels [n]: sigma ~ LogNormal(p_mean, p_std) as flow time sigma / (1 + sigma)."""
        return sample_timesteps(n, "logit_normal", logit_mean=self.p_mean, logit_std=self.p_std, generator=generator, device=device)

    def head_logits(self, x_t: torch.Tensor, cond: Any, t: torch.Tensor) -> torch.Tensor:
        """Every head's logit [B, 2 * taps] (spatial then temporal per tap) for NOISED x_t at t."""
        if t.shape != (x_t.shape[0],):
            raise ValueError(f"t must be [B={x_t.shape[0]}], got shape {tuple(t.shape)}")
        f, h, w = (int(n) for n in self.backbone.token_grid(tuple(x_t.shape)))
        feats = self.backbone.features(x_t, t, cond, self.head_layers)
        dtype = self.spatial[0].conv_in.weight.dtype
        out = []
        for spatial, temporal, feat in zip(self.spatial, self.temporal, feats):
            if feat.shape[1] != f * h * w:
                raise ValueError(f"backbone features have {feat.shape[1]} tokens, token_grid says {f}x{h}x{w}")
            grid = feat.to(dtype).reshape(feat.shape[0], f, h, w, feat.shape[-1])
            out += [spatial(grid), temporal(grid)]
        return torch.stack(out, dim=1)

    def forward(self, x_t: torch.Tensor, cond: Any, t: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B] (fp32): the mean of the heads' logits for NOISED x_t [B, C, F, H, W] at t [B] (drawn if None)."""
        if t is None:
            t = self.sample_t(x_t.shape[0], device=x_t.device)
        return self.head_logits(x_t, cond, t).mean(1).float().clone()  # a fresh tensor, not a view (FSDP2)
