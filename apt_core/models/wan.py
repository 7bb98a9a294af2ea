"""Wan 2.1 diffusion transformer (text-to-video and image-to-video), compatible with the public checkpoints.

Same module tree, parameter names, shapes and math as Wan-Video/Wan2.1 `wan/modules/model.py`
(model_type 't2v' and 'i2v'), so the original `.safetensors` files load untouched. Differences are only in plumbing:
batched tensors instead of lists, attention through `F.scaled_dot_product_attention` in the input
dtype (kernel choice: `set_attention_backend`), RoPE tables cached per grid shape, optional
per-block activation checkpointing, and a feature tap (`forward_features`) for the APT discriminator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from apt_core.models.attention import attention, check_choice, keep_backends


@dataclass(frozen=True)
class WanConfig:
    """Hyper-parameters of a Wan 2.1 DiT; names follow the public `WanModel.__init__`."""

    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    model_type: str = "t2v"  # "i2v": image latent + mask channels in x, CLIP image tokens in cross-attention

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.dim // self.num_heads

    def to_dict(self) -> dict:
        """JSON-ready fields (patch_size as a list), stored in safetensors metadata."""
        d = asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> WanConfig:
        """The inverse of to_dict; unknown fields are an error naming them."""
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown WanConfig fields {sorted(unknown)}; allowed: {sorted(cls.__dataclass_fields__)}")
        d = dict(d)
        if "patch_size" in d:
            d["patch_size"] = tuple(d["patch_size"])
        return cls(**d)


def get_config(name: str, **overrides) -> WanConfig:
    """A named preset of any registered family (apt_core.models.registry), optionally with fields
    replaced (e.g. `in_dim=3` for pixel models)."""
    from apt_core.models.registry import all_presets

    presets = all_presets()
    if name not in presets:
        raise KeyError(f"unknown Wan config {name!r}; choose one of {sorted(presets)}")
    return replace(presets[name], **overrides)


def _hi(x: torch.Tensor) -> torch.Tensor:
    """Norms and modulation run in fp32 (fp64 stays fp64, for precision tests)."""
    return x if x.dtype == torch.float64 else x.float()


# ----------------------------------------------------------------------------------------------
# Embeddings
# ----------------------------------------------------------------------------------------------


def sinusoidal_embedding_1d(dim: int, position: torch.Tensor) -> torch.Tensor:
    """Wan's timestep sinusoid: float64, `cat([cos, sin])`, frequencies 10000^(-i/half)."""
    half = dim // 2
    position = position.to(torch.float64)
    sinusoid = torch.outer(position, torch.pow(10000, -torch.arange(half, device=position.device).to(position).div(half)))
    return torch.cat([torch.cos(sinusoid), torch.sin(sinusoid)], dim=1)


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Real dims given to the (time, height, width) axes: 44/42/42 for head_dim 128."""
    return head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6)


def rope_cos_sin(
    grid: tuple[int, int, int], head_dim: int, device: torch.device, theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [tokens, head_dim // 2] for a (F, H, W) patch grid, in fp32 (computed in fp64)."""
    angles = []
    for size, axis_dim in zip(grid, rope_axis_dims(head_dim)):
        inv_freq = 1.0 / torch.pow(theta, torch.arange(0, axis_dim, 2, dtype=torch.float64, device=device) / axis_dim)
        angles.append(torch.outer(torch.arange(size, dtype=torch.float64, device=device), inv_freq))
    f, h, w = grid
    table = torch.cat(
        [
            angles[0][:, None, None, :].expand(f, h, w, -1),
            angles[1][None, :, None, :].expand(f, h, w, -1),
            angles[2][None, None, :, :].expand(f, h, w, -1),
        ],
        dim=-1,
    ).reshape(f * h * w, head_dim // 2)
    return table.cos().float(), table.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (2i, 2i+1) of x [B, N, heads, head_dim] as complex numbers, in fp32."""
    xf = _hi(x).unflatten(-1, (-1, 2))
    real, imag = xf[..., 0], xf[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
    return out.flatten(-2).type_as(x)


# ----------------------------------------------------------------------------------------------
# Layers (names match the public checkpoint keys)
# ----------------------------------------------------------------------------------------------


class WanRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = _hi(x)
        return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 (affine only for `norm3`)."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False):
        super().__init__(dim, elementwise_affine=elementwise_affine, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # weight and bias too: a bf16 model (or FSDP's bf16 params) must not meet an fp32 input
        weight = None if self.weight is None else _hi(self.weight)
        bias = None if self.bias is None else _hi(self.bias)
        return F.layer_norm(_hi(x), self.normalized_shape, weight, bias, self.eps).type_as(x)


class WanSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.norm_k = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.attention_backend = "default"  # SDPA kernel choice: WanModel.set_attention_backend

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, n = x.shape[:2]
        q = self.norm_q(self.q(x)).view(b, n, self.num_heads, self.head_dim)
        k = self.norm_k(self.k(x)).view(b, n, self.num_heads, self.head_dim)
        v = self.v(x).view(b, n, self.num_heads, self.head_dim)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return self.o(attention(q, k, v, self.attention_backend))


class WanT2VCrossAttention(WanSelfAttention):
    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        b = x.shape[0]
        q = self.norm_q(self.q(x)).view(b, -1, self.num_heads, self.head_dim)
        k = self.norm_k(self.k(context)).view(b, -1, self.num_heads, self.head_dim)
        v = self.v(context).view(b, -1, self.num_heads, self.head_dim)
        return self.o(attention(q, k, v, self.attention_backend))


class WanI2VCrossAttention(WanSelfAttention):
    """Cross-attention to the CLIP image tokens (k_img / v_img) and to the text, outputs summed before `o`."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6, text_len: int = 512):
        super().__init__(dim, num_heads, qk_norm, eps)
        self.k_img = nn.Linear(dim, dim)
        self.v_img = nn.Linear(dim, dim)
        self.norm_k_img = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.text_len = text_len

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # context = [image tokens | text_len text tokens], as the public code concatenates them
        b, n, d = x.shape[0], self.num_heads, self.head_dim
        split = context.shape[1] - self.text_len
        context_img, context = context[:, :split], context[:, split:]
        q = self.norm_q(self.q(x)).view(b, -1, n, d)
        k = self.norm_k(self.k(context)).view(b, -1, n, d)
        v = self.v(context).view(b, -1, n, d)
        k_img = self.norm_k_img(self.k_img(context_img)).view(b, -1, n, d)
        v_img = self.v_img(context_img).view(b, -1, n, d)
        img_x = attention(q, k_img, v_img, self.attention_backend)
        return self.o(attention(q, k, v, self.attention_backend) + img_x)


class MLPProj(nn.Module):
    """CLIP image tokens [B, 257, 1280] -> [B, 257, dim] (the public `img_emb`)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim),
                                  nn.LayerNorm(out_dim))

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.proj(image_embeds)


CLIP_DIM = 1280  # width of the CLIP ViT-H/14 image tokens the I2V models take (257 tokens per image)
MODEL_TYPES = ("t2v", "i2v")


class WanAttentionBlock(nn.Module):
    """One DiT block: modulated self-attention, cross-attention to text, modulated FFN."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        dim = cfg.dim
        self.norm1 = WanLayerNorm(dim, cfg.eps)
        self.self_attn = WanSelfAttention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm3 = WanLayerNorm(dim, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        if cfg.model_type == "i2v":
            self.cross_attn = WanI2VCrossAttention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps, cfg.text_len)
        else:
            self.cross_attn = WanT2VCrossAttention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm2 = WanLayerNorm(dim, cfg.eps)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e0: torch.Tensor, context: torch.Tensor, rope) -> torch.Tensor:
        # x: [B, N, dim]; e0: [B, 6, dim] fp32; context: [B, text_len, dim]
        # 1. modulation, in fp32
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (_hi(self.modulation) + e0).chunk(6, dim=1)
        # 2. self-attention on the modulated, normalised tokens
        y = self.self_attn((_hi(self.norm1(x)) * (1 + scale_msa) + shift_msa).type_as(x), rope)
        x = (_hi(x) + _hi(y) * gate_msa).type_as(x)
        # 3. cross-attention to the text (no modulation, no gate)
        x = x + self.cross_attn(self.norm3(x), context)
        # 4. feed-forward on the modulated, normalised tokens
        y = self.ffn((_hi(self.norm2(x)) * (1 + scale_mlp) + shift_mlp).type_as(x))
        return (_hi(x) + _hi(y) * gate_mlp).type_as(x)


class Head(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.norm = WanLayerNorm(cfg.dim, cfg.eps)
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        shift, scale = (_hi(self.modulation) + _hi(e).unsqueeze(1)).chunk(2, dim=1)
        return self.head((_hi(self.norm(x)) * (1 + scale) + shift).type_as(x))


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


def _recompute_like_forward() -> tuple[AbstractContextManager, AbstractContextManager]:
    """Checkpoint contexts: the recompute in backward gets the SDPA backends the forward had (exact
    R1 runs its forward under the math kernel; a backward outside that context must not recompute
    with flash, whose saved tensors differ)."""
    return nullcontext(), keep_backends()


class WanModel(nn.Module):
    """Wan 2.1 DiT. `forward(x [B,C,F,H,W], timestep [B] in [0,1000], context [B,L,text_dim])`; I2V models
    (`model_type="i2v"`) also take `clip_fea` [B, 257, 1280] and `y` [B, in_dim - out_dim, F, H, W] (mask + image latent)."""

    def __init__(self, config: WanConfig):
        super().__init__()
        cfg = config
        if cfg.dim % cfg.num_heads or cfg.head_dim % 2:
            raise ValueError(f"dim {cfg.dim} must split into {cfg.num_heads} heads of even size")
        if cfg.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {cfg.model_type!r} is not supported; choose one of {MODEL_TYPES}")
        self.config = cfg
        self.patch_embedding = nn.Conv3d(cfg.in_dim, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.dim, cfg.dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, cfg.dim * 6))
        self.blocks = nn.ModuleList([WanAttentionBlock(cfg) for _ in range(cfg.num_layers)])
        self.head = Head(cfg)
        if cfg.model_type == "i2v":
            self.img_emb = MLPProj(CLIP_DIM, cfg.dim)
        self.gradient_checkpointing = False
        self.check_inputs_finite = False
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    # -- init ------------------------------------------------------------------------------
    def init_weights(self) -> None:
        """Wan's init: xavier Linear, zero bias, normal(0.02) text/time embeddings, zero head."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for m in [*self.text_embedding.modules(), *self.time_embedding.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)

    # -- helpers ---------------------------------------------------------------------------
    def set_attention_backend(self, name: str) -> None:
        """SDPA kernel for every attention layer: "default" (PyTorch's dispatcher), "auto" (fastest,
        timed once per shape), or "flash" / "cudnn" / "efficient" / "math" wherever that kernel takes
        the inputs (apt_core.models.attention)."""
        check_choice(name)
        for m in self.modules():
            if isinstance(m, WanSelfAttention):
                m.attention_backend = name

    def rope(self, grid: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached RoPE cos/sin for a patch grid (computed once per shape and device)."""
        key = (grid, str(device))
        if key not in self._rope_cache:
            self._rope_cache[key] = rope_cos_sin(grid, self.config.head_dim, device)
        return self._rope_cache[key]

    def validate_inputs(
        self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, clip_fea: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> None:
        """Raise a ValueError naming the offending input, its shape and what was expected."""
        cfg = self.config
        if x.ndim != 5:
            raise ValueError(f"x must be [B, C, F, H, W] (rank 5), got shape {tuple(x.shape)}")
        if cfg.model_type == "i2v":
            if clip_fea is None or y is None:
                raise ValueError("this I2V model needs clip_fea [B, 257, 1280] (CLIP image tokens) and y [B, mask + image "
                                 f"latent = {cfg.in_dim - x.shape[1]}, F, H, W]; got clip_fea={clip_fea is not None}, y={y is not None}")
            if y.shape[0] != x.shape[0] or y.shape[2:] != x.shape[2:] or x.shape[1] + y.shape[1] != cfg.in_dim:
                raise ValueError(f"y {tuple(y.shape)} must match x {tuple(x.shape)} in batch and F/H/W, and x + y channels "
                                 f"must make in_dim={cfg.in_dim}")
            if clip_fea.ndim != 3 or clip_fea.shape[0] != x.shape[0] or clip_fea.shape[2] != CLIP_DIM:
                raise ValueError(f"clip_fea must be [B={x.shape[0]}, tokens, {CLIP_DIM}], got shape {tuple(clip_fea.shape)}")
        elif clip_fea is not None or y is not None:
            raise ValueError(f"clip_fea / y are inputs of I2V models; this model is model_type={cfg.model_type!r}")
        channels = x.shape[1] + (y.shape[1] if y is not None else 0)
        if channels != cfg.in_dim:
            raise ValueError(f"x has {channels} channels, the model expects in_dim={cfg.in_dim} (shape {tuple(x.shape)})")
        for axis, size, p in zip("FHW", x.shape[2:], cfg.patch_size):
            if size % p:
                raise ValueError(f"x size {size} on axis {axis} is not divisible by patch size {p} (shape {tuple(x.shape)})")
        if timestep.ndim != 1 or timestep.shape[0] != x.shape[0]:
            raise ValueError(f"timestep must be [B={x.shape[0]}], got shape {tuple(timestep.shape)}")
        if context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[2] != cfg.text_dim:
            raise ValueError(
                f"context must be [B={x.shape[0]}, L, text_dim={cfg.text_dim}], got shape {tuple(context.shape)}"
            )
        if context.shape[1] > cfg.text_len:
            raise ValueError(f"context has {context.shape[1]} tokens, more than text_len={cfg.text_len}")
        if self.check_inputs_finite:
            for name, t in (("x", x), ("timestep", timestep), ("context", context)):
                if not torch.isfinite(t).all():
                    raise ValueError(f"{name} contains NaN or Inf values")

    def embed(
        self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, clip_fea: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int, int]]:
        """Patchify + time + text (+ image) embeddings: tokens [B,N,dim], e [B,dim], e0 [B,6,dim], context, grid."""
        self.validate_inputs(x, timestep, context, clip_fea, y)
        cfg = self.config
        if y is not None:
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        tokens = self.patch_embedding(x.to(self.patch_embedding.weight.dtype))
        grid = tuple(tokens.shape[2:])
        tokens = tokens.flatten(2).transpose(1, 2)
        # time embedding and its 6-way projection, in fp32
        with torch.autocast(device_type=x.device.type, enabled=False):
            e = self.time_embedding(sinusoidal_embedding_1d(cfg.freq_dim, timestep).to(self.time_embedding[0].weight.dtype))
            e0 = _hi(self.time_projection(e).unflatten(1, (6, cfg.dim)))
            e = _hi(e)
        # text: zero-pad to text_len rows, as the public code does
        if context.shape[1] < cfg.text_len:
            context = F.pad(context, (0, 0, 0, cfg.text_len - context.shape[1]))
        context = self.text_embedding(context.to(self.text_embedding[0].weight.dtype))
        if clip_fea is not None:  # image tokens first, as the public code concatenates them
            context = torch.cat([self.img_emb(clip_fea.to(context.dtype)), context], dim=1)
        return tokens, e, e0, context, grid

    def run_block(
        self, i: int, x: torch.Tensor, e0: torch.Tensor, context: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """Block i, recomputed in the backward pass when gradient_checkpointing is on (and grads are)."""
        block = self.blocks[i]
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, e0, context, rope, use_reentrant=False, context_fn=_recompute_like_forward)
        return block(x, e0, context, rope)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, N, prod(patch)*C] -> [B, C, F, H, W]."""
        c, (pf, ph, pw), (f, h, w) = self.config.out_dim, self.config.patch_size, grid
        x = x.view(x.shape[0], f, h, w, pf, ph, pw, c)
        x = torch.einsum("bfhwpqrc->bcfphqwr", x)
        return x.reshape(x.shape[0], c, f * pf, h * ph, w * pw)

    # -- forward ---------------------------------------------------------------------------
    def forward(
        self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, clip_fea: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity `eps - x0` for x [B,C,F,H,W] at timestep [B] in [0, 1000], as fp32."""
        tokens, e, e0, context, grid = self.embed(x, timestep, context, clip_fea, y)
        rope = self.rope(grid, tokens.device)
        for i in range(len(self.blocks)):
            tokens = self.run_block(i, tokens, e0, context, rope)
        out = self.head(tokens, e)
        return _hi(self.unpatchify(out, grid))

    def forward_features(
        self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, layers: Sequence[int],
        clip_fea: torch.Tensor | None = None, y: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Hidden states [B, N, dim] after each block index in `layers` (0-based); stops at the deepest."""
        layers = list(layers)
        bad = [i for i in layers if not 0 <= i < len(self.blocks)]
        if bad or not layers:
            raise ValueError(f"feature layers {layers} must be non-empty and within [0, {len(self.blocks) - 1}]")
        tokens, _, e0, context, grid = self.embed(x, timestep, context, clip_fea, y)
        rope = self.rope(grid, tokens.device)
        wanted, feats = set(layers), {}
        for i in range(max(layers) + 1):
            tokens = self.run_block(i, tokens, e0, context, rope)
            if i in wanted:
                feats[i] = tokens
        return [feats[i] for i in layers]


def build_wan(config: WanConfig | str, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> WanModel:
    """Build a WanModel; `device="meta"` allocates nothing (for large configs and FSDP).

    With no `device`, the ambient default device is used (an enclosing `with torch.device("meta")`).
    """
    cfg = get_config(config) if isinstance(config, str) else config
    with torch.device(device or torch.get_default_device()):
        model = WanModel(cfg)
    if dtype is not None:
        model = model.to(dtype)
    return model
