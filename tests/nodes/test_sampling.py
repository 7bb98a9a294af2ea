"""The APT sampler function (k-diffusion convention) on a tiny apt_core Wan equals apt_core's generators."""

import pytest
import torch

from apt_core.backbone import WanCond, build_flow_model
from apt_core.flow import add_noise, generate_one_step, x0_from_velocity
from nodes.sampling import apt_sigmas, sample_apt


@pytest.fixture(scope="module")
def flow():
    torch.manual_seed(0)
    model = build_flow_model("tiny").eval()
    with torch.no_grad():  # the zero-initialised head would make every output equal to x_t
        model.head.head.weight.normal_(0, 0.05)
    return model


def denoiser(flow, cond):
    """What ComfyUI's k-diffusion wrapper gives a sampler for a flow model: model(x, sigma) -> x0 = x - sigma v."""
    calls = []

    def model(x, sigma, **extra):
        calls.append(float(sigma[0]))
        return x0_from_velocity(x, sigma, flow(x, sigma, cond))

    model.calls = calls
    return model


def test_sigmas():
    assert apt_sigmas(1).tolist() == [1.0, 0.0]
    assert apt_sigmas(2, 0.3).tolist() == pytest.approx([1.0, 0.3, 0.0])
    for bad in [(3, 0.5), (0, 0.5), (2, 0.0), (2, 1.0)]:
        with pytest.raises(ValueError):
            apt_sigmas(*bad)


def test_one_step_is_the_apt_generator(flow):
    cond = WanCond(torch.randn(2, 5, 32))
    z = torch.randn(2, 16, 1, 4, 4)
    model = denoiser(flow, cond)
    seen = []
    out = sample_apt(model, z, apt_sigmas(1), extra_args={"seed": 3}, callback=seen.append)
    with torch.no_grad():
        ref = generate_one_step(flow, z, cond)
    torch.testing.assert_close(out, ref)
    assert model.calls == [1.0] and [s["i"] for s in seen] == [0]
    torch.testing.assert_close(seen[0]["denoised"], ref)
    assert not torch.allclose(out, z)


def test_two_step_renoises_with_seeded_fresh_noise(flow):
    cond = WanCond(torch.randn(1, 5, 32))
    z = torch.randn(1, 16, 1, 4, 4)
    out = sample_apt(denoiser(flow, cond), z, apt_sigmas(2, 0.4), extra_args={"seed": 11})
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        x0 = generate_one_step(flow, z, cond)
        t = torch.full((1,), 0.4)
        x_t = add_noise(x0, eps, t)
        ref = x0_from_velocity(x_t, t, flow(x_t, t, cond))
    torch.testing.assert_close(out, ref)
    again = sample_apt(denoiser(flow, cond), z, apt_sigmas(2, 0.4), extra_args={"seed": 11})
    other = sample_apt(denoiser(flow, cond), z, apt_sigmas(2, 0.4), extra_args={"seed": 12})
    torch.testing.assert_close(out, again)
    assert not torch.allclose(out, other)
