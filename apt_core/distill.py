"""Stage 1 of APT: discrete consistency distillation (CD) of a flow teacher into a one-step student.

Derivation (rectified flow, `x_t = (1 - t) x0 + t eps`, velocity `v = eps - x0`):

1. The consistency function maps any point of a probability-flow trajectory to its t = 0 end.
   Parametrise it by the student's velocity: `f(x, t) = x - t v_s(x, t)` (the x0 prediction).
   The boundary condition `f(x, 0) = x` then holds exactly, with no skip/out scalings.
2. Grid: `0 = t_0 < t_1 < ... < t_N = 1`, `t_n = shift(n / N, s)` (AAPT: N = 32, shifted).
   `shift(1, s) = 1` and we pin `t_N = 1.0` exactly, so the top grid point is the generator's
   input time: `f(z, 1) = z - v_s(z, 1) = G(z)`, the APT one-step generator, is trained directly.
3. Sample n ~ U{1..N}, eps ~ N(0, I): `x_{t_n} = (1 - t_n) x0 + t_n eps`.
4. Teacher ODE step (Euler, CFG optional): `x_{t_{n-1}} = x_{t_n} + (t_{n-1} - t_n) v_T(x_{t_n}, t_n)`
   with `v_T = v_neg + w (v_pos - v_neg)` when `cfg_scale = w != 1`.
5. Target without EMA (iCT, Song & Dhariwal 2023; AAPT): the stop-gradient STUDENT at the adjacent
   earlier point, `y = sg f(x_{t_{n-1}}, t_{n-1})`. For n = 1, t_0 = 0 and `f(x, 0) = x`, so the
   target is the teacher-step point itself (the data-side boundary that anchors the chain).
6. Loss: `MSE(f(x_{t_n}, t_n), y)` (plain mean over all elements, as AAPT).
"""

from __future__ import annotations

from typing import Any

import torch

from apt_core.backbone import cat_cond
from apt_core.flow import add_noise, expand_like, shift_time, x0_from_velocity


def cd_grid(steps: int = 32, shift: float = 1.0, device: torch.device | str | None = None) -> torch.Tensor:
    """Ascending grid [steps + 1]: `t_n = shift(n / steps, shift)`, `t_0 = 0`, `t_N = 1` exactly."""
    if steps < 1:
        raise ValueError(f"CD steps must be >= 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"CD grid shift must be > 0, got {shift}")
    t = shift_time(torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64), shift)
    t[0], t[-1] = 0.0, 1.0
    return t.float().to(device)


def teacher_velocity(
    teacher: Any, x: torch.Tensor, t: torch.Tensor, cond: Any, cfg_scale: float = 1.0, neg_cond: Any = None
) -> torch.Tensor:
    """Teacher velocity, with classifier-free guidance `v_neg + w (v_pos - v_neg)` in one batched call."""
    if cfg_scale == 1.0:
        return teacher(x, t, cond)
    if neg_cond is None:
        raise ValueError(f"cfg_scale={cfg_scale} needs a negative (or empty) condition `neg_cond`")
    v_pos, v_neg = teacher(torch.cat([x, x]), torch.cat([t, t]), cat_cond(cond, neg_cond)).chunk(2)
    return v_neg + cfg_scale * (v_pos - v_neg)


def sample_step_index(n: int, steps: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Grid indices [n] uniform in {1, ..., steps} (the later point of each adjacent pair)."""
    return torch.randint(1, steps + 1, (n,), device=device)


def consistency_loss(
    student: Any,
    teacher: Any,
    x0: torch.Tensor,
    cond: Any,
    eps: torch.Tensor,
    step_index: torch.Tensor,
    grid: torch.Tensor,
    cfg_scale: float = 1.0,
    neg_cond: Any = None,
) -> torch.Tensor:
    """Discrete CD loss (module docstring): `MSE(f(x_{t_n}, t_n), sg f(x_{t_{n-1}}, t_{n-1}))`.

    Gradients flow only through the student's prediction at t_n; teacher and target are no-grad.
    """
    if eps.shape != x0.shape:
        raise ValueError(f"eps must have x0's shape {tuple(x0.shape)}, got {tuple(eps.shape)}")
    steps = grid.numel() - 1
    bad_range = step_index.device.type == "cpu" and bool(((step_index < 1) | (step_index > steps)).any())
    if step_index.shape != (x0.shape[0],) or bad_range:  # (range checked on CPU only: no device sync)
        raise ValueError(f"step_index must be [B={x0.shape[0]}] with values in 1..{steps}, got {step_index.tolist()}")
    grid = grid.to(x0.device)
    t_n, t_prev = grid[step_index], grid[step_index - 1]
    x_n = add_noise(x0, eps, t_n)
    with torch.no_grad():
        v_t = teacher_velocity(teacher, x_n, t_n, cond, cfg_scale, neg_cond)
        x_prev = x_n + expand_like(t_prev - t_n, x_n) * v_t.to(x_n.dtype)
        target = x0_from_velocity(x_prev, t_prev, student(x_prev, t_prev, cond).to(x_n.dtype))
        target = torch.where(expand_like(t_prev == 0, x_prev).bool(), x_prev, target)  # f(x, 0) = x
    pred = x0_from_velocity(x_n, t_n, student(x_n, t_n, cond))
    return (pred.float() - target.float()).pow(2).mean()
