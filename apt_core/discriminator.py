"""The APT discriminator: a copy of the original diffusion model plus cross-attention heads.

APT (Lin et al. 2025, sec. 3.3): the backbone is initialised from the ORIGINAL diffusion weights and
trained in full; new cross-attention-only heads tap its hidden states after blocks 16, 26 and 36 of
36. Each head has one learnable query token that attends over all visual tokens of its layer and is
followed by an MLP, both with residuals; the head outputs are concatenated on channels,
LayerNorm-ed and projected to ONE logit per sample. The input is a CLEAN latent (no noise) with a
timestep drawn per sample from `shift(U(0, 1), s)` (s = 1 images, 12 video): a timestep ensemble.

The backbone's output head (`backbone.head` for Wan) is never run; it stays in the module tree so
the discriminator's backbone loads the same checkpoint keys as the generator.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn

from apt_core.backbone import unwrap
from apt_core.flow import sample_timesteps
from apt_core.models.attention import sdpa_single_query
from apt_core.models.io import compare_shapes, describe_mismatch

PAPER_TAPS = (16, 26, 36)  # 1-based "after block k" of a 36-block model (APT sec. 3.3)
PAPER_DEPTH = 36
MODES = ("full", "lora", "frozen")


def default_head_layers(num_layers: int) -> list[int]:
    """The paper's taps 16/26/36 of 36 scaled to `num_layers`, as 0-based block indices (deduped).

    36 -> [15, 25, 35]; 30 (Wan 1.3B) -> [12, 21, 29]; 2 -> [0, 1]; 1 -> [0]. The deepest tap is
    always the last block, as in the paper.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    out: list[int] = []
    for k in PAPER_TAPS:
        one_based = min(num_layers, max(1, math.floor(k * num_layers / PAPER_DEPTH + 0.5)))
        if one_based - 1 not in out:
            out.append(one_based - 1)
    return out


class CrossAttentionHead(nn.Module):
    """One learnable query token cross-attending over a layer's visual tokens, then an MLP.

    `h = q + Attn(q, LN(tokens))`, `h = h + MLP(LN(h))` with MLP = Linear, GELU, Linear; out [B, dim].
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"head width {dim} must split into {num_heads} attention heads")
        self.num_heads = num_heads
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm_kv = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n, d = tokens.shape  # tokens: [B, N, dim]
        h_, hd = self.num_heads, d // self.num_heads
        query = self.query.expand(b, -1, -1)  # [B, 1, dim]
        kv = self.norm_kv(tokens)
        q = self.q(query).view(b, 1, h_, hd).transpose(1, 2)  # [B, heads, 1, hd]
        k = self.k(kv).view(b, n, h_, hd).transpose(1, 2)
        v = self.v(kv).view(b, n, h_, hd).transpose(1, 2)
        attn = sdpa_single_query(q, k, v).transpose(1, 2).reshape(b, 1, d)
        h = query + self.o(attn)
        h = h + self.mlp(self.norm_mlp(h))
        return h[:, 0]


def init_heads(module: nn.Module) -> None:
    """Head init: xavier Linear weights, zero biases, query ~ N(0, 0.02), unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.LayerNorm):
            m.reset_parameters()
        elif isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, CrossAttentionHead):
            nn.init.normal_(m.query, std=0.02)


def param_signature(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Base parameter names -> shapes, ignoring LoRA adapters (what 'the same architecture' means)."""
    return {
        name: tuple(p.shape)
        for name, p in unwrap(model).named_parameters()
        if "lora_down" not in name and "lora_up" not in name
    }


class APTDiscriminator(nn.Module):
    """Backbone copy + multi-depth cross-attention heads -> one logit per sample.

    mode: "full" trains the whole backbone (paper), "lora" trains LoRA adapters injected into it,
    "frozen" trains the heads only. `copy_backbone=False` takes ownership of `backbone` as given
    (e.g. a fresh model built on the meta device for FSDP); by default it is deep-copied, so the
    generator passed in is never shared.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head_layers: Sequence[int] | None = None,
        mode: str = "full",
        timestep_shift: float = 1.0,
        lora_rank: int = 16,
        attn_heads: int | None = None,
        copy_backbone: bool = True,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"discriminator mode {mode!r} unknown; choose one of {MODES}")
        if timestep_shift <= 0:
            raise ValueError(f"timestep_shift must be > 0 (1 images, 12 video), got {timestep_shift}")
        backbone = unwrap(backbone)
        self.signature = param_signature(backbone)  # before LoRA injection
        self.backbone = copy.deepcopy(backbone) if copy_backbone else backbone
        depth, dim = int(self.backbone.num_layers), int(self.backbone.hidden_dim)
        layers = list(default_head_layers(depth) if head_layers is None else head_layers)
        bad = [i for i in layers if not 0 <= int(i) < depth]
        if not layers or bad or len(set(layers)) != len(layers):
            raise ValueError(f"head_layers {layers} must be distinct 0-based block indices in [0, {depth - 1}]")
        self.head_layers = [int(i) for i in layers]
        self.mode = mode
        self.timestep_shift = float(timestep_shift)
        if attn_heads is None:
            cfg = getattr(self.backbone, "config", None)
            attn_heads = getattr(cfg, "num_heads", None) or max(1, dim // 128)
        self.heads = nn.ModuleList([CrossAttentionHead(dim, attn_heads) for _ in self.head_layers])
        self.norm_out = nn.LayerNorm(dim * len(self.head_layers))
        self.proj_out = nn.Linear(dim * len(self.head_layers), 1)
        self.reset_heads()
        p0 = next(self.backbone.parameters())
        for m in (self.heads, self.norm_out, self.proj_out):
            m.to(device=p0.device, dtype=p0.dtype)
        self._configure_trainable(lora_rank)

    def reset_heads(self) -> None:
        """(Re-)initialise what D adds to the backbone: the heads and, in lora mode, the adapters.

        Call after `to_empty` on a meta-built D (then load the backbone's base weights).
        """
        from apt_core.lora import lora_modules

        for m in (self.heads, self.norm_out, self.proj_out):
            init_heads(m)
        for m in lora_modules(self.backbone).values():
            m.reset_lora_parameters()

    # -- trainable sets -----------------------------------------------------------------------
    def _configure_trainable(self, lora_rank: int) -> None:
        self.backbone.requires_grad_(self.mode == "full")
        if self.mode == "lora":
            from apt_core.lora import inject_lora

            self.lora_modules = inject_lora(self.backbone, lora_rank)
            for name, p in self.backbone.named_parameters():
                p.requires_grad_("lora_down" in name or "lora_up" in name)
        for name, p in self.backbone.named_parameters():  # never-run parts get no grads: freeze them
            if not self._backbone_param_used(name):
                p.requires_grad_(False)

    def _backbone_param_used(self, name: str) -> bool:
        """False for the output head and for blocks deeper than the deepest tap (never run by D)."""
        parts = name.split(".")
        if "head" in parts[:-1]:
            return False
        if "blocks" in parts[:-1]:
            i = parts.index("blocks")
            if i + 1 < len(parts) and parts[i + 1].isdigit():
                return int(parts[i + 1]) <= max(self.head_layers)
        return True

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters the D optimiser should own (heads + backbone part per mode)."""
        return (p for p in self.parameters() if p.requires_grad)

    # -- compatibility ------------------------------------------------------------------------
    def check_compatible(self, generator: nn.Module) -> None:
        """Raise ValueError if `generator` is not the architecture this discriminator was built from."""
        missing, extra, shapes = compare_shapes(self.signature, param_signature(generator))
        if missing or extra or shapes:
            found = describe_mismatch(
                missing, extra, shapes, ("parameter(s) only in D's backbone", "parameter(s) only in the generator"), ("G", "D")
            )
            raise ValueError(
                f"discriminator built from a different model than the generator: {found}. "
                "Build the discriminator from the same base model as the generator."
            )

    # -- forward ------------------------------------------------------------------------------
    def sample_t(self, n: int, device: torch.device | str | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Timestep ensemble: t ~ shift(U(0, 1), timestep_shift), one per sample, [n]."""
        return sample_timesteps(n, "shifted", shift=self.timestep_shift, generator=generator, device=device)

    def forward(self, x: torch.Tensor, cond: Any, t: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B] (fp32) for CLEAN x [B, C, F, H, W]; t [B] in [0, 1] (drawn if None)."""
        if t is None:
            t = self.sample_t(x.shape[0], device=x.device)
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must be [B={x.shape[0]}], got shape {tuple(t.shape)}")
        feats = self.backbone.features(x, t, cond, self.head_layers)
        dtype = self.proj_out.weight.dtype
        h = torch.cat([head(f.to(dtype)) for head, f in zip(self.heads, feats)], dim=-1)
        # A fresh tensor, not a view: FSDP2 hooks the output for backward.
        return self.proj_out(self.norm_out(h))[:, 0].float().clone()
