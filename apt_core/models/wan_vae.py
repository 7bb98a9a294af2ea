"""Wan 2.1 VAE, encoder side, in pure PyTorch: pixels [B, 3, F, H, W] in [-1, 1] -> normalised latents
[B, 16, 1 + (F-1)/4, H/8, W/8], for headless dataset preparation.

Module tree and state-dict keys follow the public Wan 2.1 code (`wan/modules/vae.py`, `WanVAE_`):
`encoder.*` (Encoder3d: conv1, downsamples, middle, head) and `conv1.*` (the 1x1x1 conv giving mean and
log-variance). A full VAE file (ComfyUI's `wan_2.1_vae.safetensors`, or the official
`Wan2.1_VAE.pth` converted to safetensors) also holds `decoder.*` / `conv2.*`; those are ignored.
Encoding is causal and chunked like the original: the first frame alone, then 4 frames at a time,
each causal convolution carrying the last frames of the previous chunk, so memory does not grow with
the clip length. The mean is normalised with Wan's per-channel latent mean/std (`(mu - mean) / std`,
= ComfyUI's `Wan21.process_in`), which is what the DiT is trained on.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

# Wan 2.1 latent statistics (wan/modules/vae.py WanVAE; ComfyUI latent_formats.Wan21).
WAN21_LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                     0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
CACHE_T = 2  # frames of the previous chunk a 3-tap causal conv needs


@dataclass
class WanVAEConfig:
    """Architecture of the Wan VAE encoder (Wan 2.1: dim 96, z_dim 16, mults 1,2,4,4, 2 res blocks)."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: Sequence[int] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: Sequence[float] = ()
    temporal_downsample: Sequence[bool] = (False, True, True)
    latent_mean: Sequence[float] | None = field(default=WAN21_LATENT_MEAN)
    latent_std: Sequence[float] | None = field(default=WAN21_LATENT_STD)

    def __post_init__(self) -> None:
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"WanVAEConfig: temporal_downsample needs len(dim_mult) - 1 = {len(self.dim_mult) - 1} "
                             f"entries, got {list(self.temporal_downsample)}")
        for name in ("latent_mean", "latent_std"):
            v = getattr(self, name)
            if v is not None and len(v) != self.z_dim:
                raise ValueError(f"WanVAEConfig.{name} has {len(v)} values, z_dim is {self.z_dim}")

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(bool(t) for t in self.temporal_downsample)


class CausalConv3d(nn.Conv3d):
    """3D conv padded causally in time (all padding before the first frame), spatially symmetric."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        p = self.padding
        self._pad = (p[2], p[2], p[1], p[1], 2 * p[0], 0)
        self.padding = (0, 0, 0)

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None) -> torch.Tensor:
        pad = list(self._pad)
        if cache is not None and pad[4] > 0:
            x = torch.cat([cache.to(x), x], dim=2)
            pad[4] -= cache.shape[2]
        return super().forward(F.pad(x, pad))


def _cached(conv: CausalConv3d, x: torch.Tensor, state: dict | None) -> torch.Tensor:
    """Run a causal conv on one chunk, keeping its last CACHE_T input frames for the next chunk."""
    if state is None:
        return conv(x)
    prev = state.get(id(conv))
    keep = x[:, :, -CACHE_T:]
    if keep.shape[2] < CACHE_T and prev is not None:
        keep = torch.cat([prev[:, :, -1:], keep], dim=2)
    out = conv(x, prev)
    state[id(conv)] = keep
    return out


class RMS_norm(nn.Module):  # noqa: N801 - the public code's name
    """L2-normalise over channels, times sqrt(dim) and a learned gain."""

    def __init__(self, dim: int, channel_first: bool = True, images: bool = True, bias: bool = False) -> None:
        super().__init__()
        shape = (dim, *((1, 1) if images else (1, 1, 1))) if channel_first else (dim,)
        self.channel_first = channel_first
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.normalize(x, dim=1 if self.channel_first else -1) * self.scale * self.gamma
        return out + self.bias if self.bias is not None else out


def _frames_2d(fn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D module to every frame of [B, C, T, H, W]."""
    b, t = x.shape[0], x.shape[2]
    y = fn(x.transpose(1, 2).flatten(0, 1))
    return y.unflatten(0, (b, t)).transpose(1, 2)


class Resample(nn.Module):
    """Spatial 2x downsample (zero-pad right/bottom, 3x3 stride 2), plus 2x causal time downsample in 3d mode."""

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        if mode not in ("downsample2d", "downsample3d"):
            raise ValueError(f"Resample mode {mode!r}: only the encoder's downsample2d/downsample3d are implemented")
        self.mode = mode
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=(2, 2)))
        if mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0))

    def forward(self, x: torch.Tensor, state: dict | None = None) -> torch.Tensor:
        x = _frames_2d(self.resample, x)
        if self.mode != "downsample3d":
            return x
        if state is None:  # the whole clip at once: frame 0 passes, then stride-2 windows from frame 0
            return torch.cat([x[:, :, :1], self.time_conv(x)], dim=2) if x.shape[2] > 1 else x
        prev = state.get(id(self))
        state[id(self)] = x[:, :, -1:]
        if prev is None:  # first chunk (the first frame): passes through unchanged
            return x
        return self.time_conv(torch.cat([prev, x], dim=2))


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            RMS_norm(in_dim, images=False), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMS_norm(out_dim, images=False), nn.SiLU(), nn.Dropout(dropout), CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, state: dict | None = None) -> torch.Tensor:
        h = self.shortcut(x)
        for layer in self.residual:
            x = _cached(layer, x, state) if isinstance(layer, CausalConv3d) else layer(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention within each frame."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMS_norm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def _frame(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q, k, v = self.to_qkv(self.norm(x)).reshape(n, 1, c * 3, h * w).permute(0, 1, 3, 2).chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous())
        return self.proj(y.squeeze(1).permute(0, 2, 1).reshape(n, c, h, w))

    def forward(self, x: torch.Tensor, state: dict | None = None) -> torch.Tensor:
        return x + _frames_2d(self._frame, x)


class Encoder3d(nn.Module):
    def __init__(self, dim: int, z_dim: int, dim_mult: Sequence[int], num_res_blocks: int,
                 attn_scales: Sequence[float], temporal_downsample: Sequence[bool], dropout: float = 0.0) -> None:
        super().__init__()
        dims = [dim * u for u in [1, *dim_mult]]
        scale = 1.0
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        downsamples: list[nn.Module] = []
        out_dim = dims[0]
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                downsamples.append(ResidualBlock(in_dim, out_dim, dropout))
                if scale in attn_scales:
                    downsamples.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                downsamples.append(Resample(out_dim, "downsample3d" if temporal_downsample[i] else "downsample2d"))
                scale /= 2.0
        self.downsamples = nn.Sequential(*downsamples)
        self.middle = nn.Sequential(ResidualBlock(out_dim, out_dim, dropout), AttentionBlock(out_dim),
                                    ResidualBlock(out_dim, out_dim, dropout))
        self.head = nn.Sequential(RMS_norm(out_dim, images=False), nn.SiLU(), CausalConv3d(out_dim, z_dim, 3, padding=1))

    def forward(self, x: torch.Tensor, state: dict | None = None) -> torch.Tensor:
        x = _cached(self.conv1, x, state)
        for layer in [*self.downsamples, *self.middle]:
            x = layer(x, state)
        for layer in self.head:
            x = _cached(layer, x, state) if isinstance(layer, CausalConv3d) else layer(x)
        return x


class WanVAEEncoder(nn.Module):
    """The encoder half of Wan 2.1's `WanVAE_` (keys `encoder.*`, `conv1.*`); `encode` gives normalised latents."""

    def __init__(self, config: WanVAEConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or WanVAEConfig()
        self.encoder = Encoder3d(c.dim, c.z_dim * 2, c.dim_mult, c.num_res_blocks, c.attn_scales, c.temporal_downsample)
        self.conv1 = CausalConv3d(c.z_dim * 2, c.z_dim * 2, 1)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError unless x is [B, 3, 1 + k*t, H, W] with H, W multiples of the spatial factor."""
        c = self.config
        t, s = c.temporal_factor, c.spatial_factor
        if x.ndim != 5 or x.shape[1] != 3:
            raise ValueError(f"Wan VAE input must be [B, 3, F, H, W] in [-1, 1], got shape {tuple(x.shape)}")
        if (x.shape[2] - 1) % t:
            raise ValueError(f"Wan VAE input has {x.shape[2]} frames; it needs 1 + {t}k (1, {1 + t}, {1 + 2 * t}, ...)")
        if x.shape[3] % s or x.shape[4] % s:
            raise ValueError(f"Wan VAE input size {x.shape[3]}x{x.shape[4]} must be a multiple of {s}")

    @torch.no_grad()
    def encode_mean(self, x: torch.Tensor, chunked: bool = True) -> torch.Tensor:
        """Raw (unnormalised) latent mean of pixels [B, 3, F, H, W] in [-1, 1]; chunked = first frame, then
        temporal_factor frames at a time with causal caches (the original's memory-bounded order)."""
        self.check_input(x)
        if not chunked:
            out = self.encoder(x)
        else:
            t, state = self.config.temporal_factor, {}
            chunks = [x[:, :, :1]] + [x[:, :, i:i + t] for i in range(1, x.shape[2], t)]
            out = torch.cat([self.encoder(chunk, state) for chunk in chunks], dim=2)
        return self.conv1(out).chunk(2, dim=1)[0]

    def normalise(self, mu: torch.Tensor) -> torch.Tensor:
        """(mu - latent_mean) / latent_std per channel (no-op if the config has no statistics)."""
        c = self.config
        if c.latent_mean is None or c.latent_std is None:
            return mu
        shape = (1, c.z_dim, 1, 1, 1)
        mean = torch.tensor(c.latent_mean, dtype=mu.dtype, device=mu.device).view(shape)
        std = torch.tensor(c.latent_std, dtype=mu.dtype, device=mu.device).view(shape)
        return (mu - mean) / std

    def encode(self, x: torch.Tensor, chunked: bool = True) -> torch.Tensor:
        """Normalised latents [B, z_dim, 1 + (F-1)/4, H/8, W/8] (what the Wan DiT trains on)."""
        return self.normalise(self.encode_mean(x, chunked))

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 frames [F, H, W, 3] (apt_core.media) -> normalised latent [z_dim, F', h, w] in float32."""
        p = next(self.parameters())
        x = frames.to(p.device).permute(3, 0, 1, 2)[None].float().div(127.5).sub(1.0).to(p.dtype)
        return self.encode(x)[0].float().cpu()

    def encode_image_condition(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 frames [F, H, W, 3] -> Wan 2.1 I2V's image latent [z_dim, F', h, w] (float32): the normalised latent of
        [first frame, F - 1 mid-grey frames] (apt_core.models.wan21_i2v.condition_video), as WanI2V.generate encodes."""
        from apt_core.models.wan21_i2v import condition_video

        p = next(self.parameters())
        first = frames[:1].to(p.device).permute(3, 0, 1, 2)[None].float().div(127.5).sub(1.0).to(p.dtype)
        return self.encode(condition_video(first, frames.shape[0]))[0].float().cpu()


_DOWN_KEY = re.compile(r"^encoder\.downsamples\.(\d+)\.")
_ENCODER_PREFIXES = ("encoder.", "conv1.")
_OTHER_PREFIXES = ("decoder.", "conv2.")
VAE_KEY_PREFIXES = ("first_stage_model.", "vae.")


def encoder_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder's tensors of a full Wan VAE state dict (`decoder.*` / `conv2.*` dropped, prefixes stripped)."""
    for prefix in VAE_KEY_PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    return {k: v for k, v in sd.items() if not k.startswith(_OTHER_PREFIXES)}


def infer_vae_config(sd: Mapping[str, torch.Tensor], **overrides) -> WanVAEConfig:
    """A WanVAEConfig from an encoder state dict's shapes (dim, z_dim, dim_mult, res blocks, attention, time downsampling)."""
    if "encoder.conv1.weight" not in sd or "conv1.weight" not in sd:
        raise KeyError(f"not a Wan VAE state dict: needs 'encoder.conv1.weight' and 'conv1.weight' "
                       f"(first keys: {sorted(sd)[:5]})")
    dim, z_dim = sd["encoder.conv1.weight"].shape[0], sd["conv1.weight"].shape[0] // 2
    parts: dict[int, set[str]] = {}
    for k in sd:
        if m := _DOWN_KEY.match(k):
            parts.setdefault(int(m.group(1)), set()).add(k[m.end():].split(".")[0])
    if not parts:
        raise KeyError("not a Wan VAE state dict: no 'encoder.downsamples.*' keys")
    groups: list[list[tuple[int, str]]] = [[]]
    temporal: list[bool] = []
    for i in sorted(parts):
        p = parts[i]
        if "residual" in p or "to_qkv" in p:
            groups[-1].append((i, "res" if "residual" in p else "attn"))
        else:
            temporal.append("time_conv" in p)
            groups.append([])
    mults, attn_scales = [], []
    for level, group in enumerate(groups):
        res = [i for i, kind in group if kind == "res"]
        if not res:
            raise KeyError(f"Wan VAE state dict: level {level} of encoder.downsamples has no residual block")
        mults.append(sd[f"encoder.downsamples.{res[-1]}.residual.6.weight"].shape[0] // dim)
        if any(kind == "attn" for _, kind in group):
            attn_scales.append(1.0 / 2**level)
    fields = dict(dim=dim, z_dim=z_dim, dim_mult=tuple(mults), num_res_blocks=sum(k == "res" for _, k in groups[0]),
                  attn_scales=tuple(attn_scales), temporal_downsample=tuple(temporal))
    if z_dim != len(WAN21_LATENT_MEAN):
        fields.update(latent_mean=None, latent_std=None)
    fields.update(overrides)
    return WanVAEConfig(**fields)


def load_wan_vae(path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 config: WanVAEConfig | None = None) -> WanVAEEncoder:
    """The Wan 2.1 VAE encoder from a safetensors file (official or ComfyUI keys); config inferred from shapes."""
    from apt_core.models.io import compare_shapes, describe_mismatch, load_state_dict_file

    sd = encoder_state_dict(load_state_dict_file(path, dtype=dtype))
    config = config or infer_vae_config(sd)
    with torch.device("meta"):  # no random init of billions of weights that are replaced at once
        model = WanVAEEncoder(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected, mismatched = compare_shapes(expected, {k: tuple(v.shape) for k, v in sd.items()})
    if missing or unexpected or mismatched:
        raise ValueError(f"VAE weights in {path} do not fit a Wan 2.1 VAE encoder {config}: "
                         f"{describe_mismatch(missing, unexpected, mismatched)}; expected the Wan 2.1 VAE "
                         f"(wan_2.1_vae.safetensors / Wan2.1_VAE.pth converted), keys encoder.* and conv1.*")
    model.load_state_dict(sd, assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
