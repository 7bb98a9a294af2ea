"""Rectified-flow conventions, timestep samplers and the samplers built on a velocity model.

Conventions (APT / Wan): `x_t = (1 - t) x0 + t eps`, `t in [0, 1]`, velocity `v = eps - x0`,
so `x0 = x_t - t v`. A velocity model is any callable `velocity(x_t, t[B], cond) -> v`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def add_noise(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """`x_t = (1 - t) x0 + t eps` with t [B] broadcast over the other dims."""
    t = expand_like(t, x0)
    return (1 - t) * x0 + t * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The flow-matching regression target `eps - x0`."""
    return eps - x0


def x0_from_velocity(x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Clean-sample estimate `x_t - t v`."""
    return x_t - expand_like(t, x_t) * v


def expand_like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1] matching x's rank and dtype."""
    return t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def shift_time(t: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """`shift(t, s) = s t / (1 + (s - 1) t)`; moves mass toward t = 1 for s > 1; shift(1, s) = 1."""
    return shift * t / (1 + (shift - 1) * t)


def sample_timesteps(
    n: int,
    kind: str = "uniform",
    shift: float = 1.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Training timesteps [n] in (0, 1): `uniform`, `shifted` (shift(U)), or `logit_normal` (then shifted)."""
    if kind == "uniform":
        t = torch.rand(n, generator=generator, device=device)
    elif kind == "shifted":
        t = shift_time(torch.rand(n, generator=generator, device=device), shift)
    elif kind == "logit_normal":
        z = torch.randn(n, generator=generator, device=device) * logit_std + logit_mean
        t = shift_time(torch.sigmoid(z), shift)
    else:
        raise ValueError(f"unknown timestep sampler {kind!r}; choose uniform, shifted or logit_normal")
    return t.clamp(1e-5, 1.0)


def timestep_schedule(steps: int, shift: float = 1.0, device: torch.device | str | None = None) -> torch.Tensor:
    """Descending times [steps + 1] from 1 to 0, shifted (Wan's `shift` for sampling)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t = torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64)
    return shift_time(t, shift).float()


@torch.no_grad()
def euler_sample(
    velocity: VelocityFn,
    noise: torch.Tensor,
    cond: Any,
    steps: int = 25,
    shift: float = 1.0,
    cfg_scale: float = 1.0,
    neg_cond: Any = None,
    cat_cond: Callable[[Any, Any], Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Multi-step Euler ODE sampler with classifier-free guidance (the teacher baseline).

    With `cfg_scale != 1` the conditional and negative/empty condition run in one batched call
    (2 forwards' worth per step): `v = v_neg + s (v_pos - v_neg)`.
    """
    if cfg_scale != 1.0 and neg_cond is None:
        raise ValueError("cfg_scale != 1 needs a negative (or empty) condition `neg_cond`")
    if cat_cond is None:
        from apt_core.backbone import cat_cond as _cat

        cat_cond = _cat
    ts = timestep_schedule(steps, shift, device=noise.device)
    x = noise
    b = x.shape[0]
    both = cat_cond(cond, neg_cond) if cfg_scale != 1.0 else None
    for i in range(steps):
        t = ts[i].expand(b)
        if cfg_scale != 1.0:
            v_pos, v_neg = velocity(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
            v = v_neg + cfg_scale * (v_pos - v_neg)
        else:
            v = velocity(x, t, cond)
        x = x + (ts[i + 1] - ts[i]) * v
        if progress is not None:
            progress(i + 1, steps)
    return x


def generate_one_step(velocity: VelocityFn, z: torch.Tensor, cond: Any) -> torch.Tensor:
    """APT generator `G(z, c) = z - v(z, t=1, c)`: pure noise in, x0 out, one forward."""
    t = torch.ones(z.shape[0], device=z.device)
    return z - velocity(z, t, cond)


def generate_two_step(
    velocity: VelocityFn,
    z: torch.Tensor,
    cond: Any,
    t_mid: float = 0.5,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Zero-shot 2-step APT: one step to x0, re-noise to `t_mid`, one more step from there."""
    if not 0.0 < t_mid < 1.0:
        raise ValueError(f"t_mid must be in (0, 1), got {t_mid}")
    x0 = generate_one_step(velocity, z, cond)
    if noise is None:
        noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
    t = torch.full((z.shape[0],), t_mid, device=z.device)
    x_t = add_noise(x0, noise, t)
    return x0_from_velocity(x_t, t, velocity(x_t, t, cond))
