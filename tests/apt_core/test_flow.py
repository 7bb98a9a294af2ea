"""Rectified-flow conventions, timestep samplers, Euler + CFG, and the 1-/2-step APT samplers."""

import pytest
import torch

from apt_core.backbone import WanCond, build_flow_model
from apt_core.flow import (
    add_noise,
    euler_sample,
    generate_one_step,
    generate_two_step,
    sample_timesteps,
    shift_time,
    timestep_schedule,
    velocity_target,
    x0_from_velocity,
)


def _data(b: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, 2, 3, 5, generator=g, dtype=torch.float64), torch.randn(
        b, 4, 2, 3, 5, generator=g, dtype=torch.float64
    )


def test_noise_velocity_x0_identities():
    x0, eps = _data()
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    x_t = add_noise(x0, eps, t)
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[2], eps[2])
    torch.testing.assert_close(x_t[1], 0.7 * x0[1] + 0.3 * eps[1])
    v = velocity_target(x0, eps)
    assert torch.equal(v, eps - x0)
    torch.testing.assert_close(x0_from_velocity(x_t, t, v), x0, rtol=0, atol=1e-12)
    # x_t moves along v: d x_t / dt = v
    h = 1e-6
    torch.testing.assert_close((add_noise(x0, eps, t + h) - x_t) / h, v, rtol=0, atol=1e-6)


def test_shift_properties():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    for s in (0.5, 1.0, 3.0, 5.0, 12.0):
        st = shift_time(t, s)
        assert st[0] == 0 and st[-1] == 1 and shift_time(1.0, s) == 1.0
        assert torch.all(st[1:] > st[:-1])  # strictly increasing
    assert torch.equal(shift_time(t, 1.0), t)
    assert torch.all(shift_time(t[1:-1], 5.0) > t[1:-1]) and torch.all(shift_time(t[1:-1], 0.5) < t[1:-1])
    assert shift_time(0.5, 3.0) == pytest.approx(0.75)  # 3*0.5 / (1 + 2*0.5)


def test_timestep_samplers():
    g = torch.Generator().manual_seed(0)
    n = 20000
    uni = sample_timesteps(n, "uniform", generator=g)
    sh = sample_timesteps(n, "shifted", shift=3.0, generator=g)
    ln = sample_timesteps(n, "logit_normal", generator=g)
    for t in (uni, sh, ln):
        assert t.shape == (n,) and t.min() >= 1e-5 and t.max() <= 1.0
    assert abs(uni.mean().item() - 0.5) < 0.01
    # the mean of shift(U, 3), integrated numerically
    grid = torch.linspace(0, 1, 100001, dtype=torch.float64)
    assert abs(sh.mean().item() - shift_time(grid, 3.0).mean().item()) < 0.01
    assert sh.mean() > uni.mean() + 0.1
    assert abs(ln.mean().item() - 0.5) < 0.01 and ln.std() < uni.std()  # logit-normal(0, 1) is peaked
    a = sample_timesteps(5, "shifted", shift=12.0, generator=torch.Generator().manual_seed(7))
    b = sample_timesteps(5, "shifted", shift=12.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="unknown timestep sampler 'beta'"):
        sample_timesteps(3, "beta")


def test_timestep_schedule():
    ts = timestep_schedule(4, shift=8.0)
    assert ts.shape == (5,) and ts[0] == 1.0 and ts[-1] == 0.0 and torch.all(ts[1:] < ts[:-1])
    torch.testing.assert_close(ts, torch.tensor([1.0, 0.96, 0.8889, 0.7273, 0.0]), rtol=0, atol=1e-4)  # ComfyUI's
    with pytest.raises(ValueError, match="steps"):
        timestep_schedule(0)


def _straight_line_field(x0: torch.Tensor):
    """The exact velocity of the flow that carries every noise sample to the single point x0."""

    def velocity(x, t, cond):
        return (x - x0) / t.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))

    return velocity


@pytest.mark.parametrize("steps,shift", [(1, 1.0), (7, 3.0), (25, 5.0)])
def test_euler_integrates_a_linear_field_exactly(steps, shift):
    x0, eps = _data()
    out = euler_sample(_straight_line_field(x0), eps, cond=None, steps=steps, shift=shift)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-10)


def test_euler_constant_field_and_progress():
    x0, eps = _data()
    calls = []
    out = euler_sample(lambda x, t, c: eps - x0, eps, None, steps=5, progress=lambda i, n: calls.append((i, n)))
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-12)
    assert calls == [(i, 5) for i in range(1, 6)]


def test_cfg_formula_with_a_toy_velocity():
    _, eps = _data(b=2)
    pos = torch.tensor([1.0, -2.0], dtype=torch.float64)
    neg = torch.tensor([0.5, 0.25], dtype=torch.float64)
    batches = []

    def velocity(x, t, cond):  # v depends on the condition only
        batches.append(x.shape[0])
        return cond.view(-1, 1, 1, 1, 1).expand_as(x)

    out = euler_sample(velocity, eps, pos, steps=3, cfg_scale=4.0, neg_cond=neg)
    guided = neg + 4.0 * (pos - neg)
    torch.testing.assert_close(out, eps - guided.view(-1, 1, 1, 1, 1), rtol=0, atol=1e-12)
    assert batches == [4, 4, 4]  # cond and negative run in one batched call per step
    batches.clear()
    out = euler_sample(velocity, eps, pos, steps=3)
    torch.testing.assert_close(out, eps - pos.view(-1, 1, 1, 1, 1), rtol=0, atol=1e-12)
    assert batches == [2, 2, 2]
    with pytest.raises(ValueError, match="neg_cond"):
        euler_sample(velocity, eps, pos, steps=2, cfg_scale=3.0)


def test_one_and_two_step_on_toy_models():
    x0, z = _data()
    seen_t = []

    def perfect(x, t, cond):
        seen_t.append(t.clone())
        return _straight_line_field(cond)(x, t, None)

    torch.testing.assert_close(generate_one_step(perfect, z, x0), x0, rtol=0, atol=1e-12)
    assert torch.equal(seen_t[0], torch.ones(3))
    n = torch.randn_like(z)
    torch.testing.assert_close(generate_two_step(perfect, z, x0, t_mid=0.3, noise=n), x0, rtol=0, atol=1e-12)
    assert torch.allclose(seen_t[-1], torch.full((3,), 0.3))

    def identity(x, t, cond):  # G = z - z = 0; then x_t = t n, x0_hat = x_t - t x_t
        return x

    assert torch.equal(generate_one_step(identity, z, None), torch.zeros_like(z))
    out = generate_two_step(identity, z, None, t_mid=0.25, noise=n)
    torch.testing.assert_close(out, 0.75 * 0.25 * n, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="t_mid"):
        generate_two_step(identity, z, None, t_mid=1.0)


def test_samplers_on_a_tiny_wan():
    torch.manual_seed(0)
    model = build_flow_model("tiny").eval()
    z = torch.randn(2, 16, 3, 4, 6)
    cond = WanCond(torch.randn(2, 5, 32))
    with torch.no_grad():
        one = generate_one_step(model, z, cond)
        two = generate_two_step(model, z, cond, generator=torch.Generator().manual_seed(1))
    many = euler_sample(model, z, cond, steps=2, cfg_scale=2.0, neg_cond=WanCond(torch.zeros(2, 3, 32)))
    for out in (one, two, many):
        assert out.shape == z.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.equal(one, z)  # a fresh Wan head is zero-initialised: v = 0
