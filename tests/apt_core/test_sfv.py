"""SF-V discriminator: frozen truncated backbone, spatial / temporal heads, noised inputs, hinge loss, R1."""

import math

import pytest
import torch

from apt_core import losses
from apt_core.backbone import WanCond, build_flow_model, token_grid
from apt_core.sfv import SFVDiscriminator, SpatialHead, TemporalHead, default_sfv_head_layers
from apt_core.trainer import APTConfig, APTTrainer, make_rmsprop


def _inputs(b=4, frames=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 16, frames, 8, 8, generator=g), WanCond(torch.randn(b, 5, 32, generator=g))


@pytest.fixture()
def gen():
    torch.manual_seed(0)
    return build_flow_model("tiny", num_layers=4)


def _trainer(gen, D, **cfg):
    return APTTrainer(gen, D, make_rmsprop(gen.parameters(), 1e-3), make_rmsprop(D.trainable_parameters(), 1e-3),
                      APTConfig(**cfg))


def test_default_taps_and_backbone_half():
    assert default_sfv_head_layers(15) == [3, 7, 10, 14]  # Wan 1.3B's first half
    assert default_sfv_head_layers(20) == [4, 9, 14, 19]  # Wan 14B's
    assert default_sfv_head_layers(2) == [0, 1] and default_sfv_head_layers(1) == [0]
    with pytest.raises(ValueError, match="backbone_blocks"):
        default_sfv_head_layers(0)


def test_backbone_is_the_frozen_first_half_and_the_generator_is_untouched(gen):
    D = SFVDiscriminator(gen)
    assert D.backbone_blocks == 2 and len(D.backbone.blocks) == 2 and D.head_layers == [0, 1]
    assert len(gen.blocks) == 4  # the generator keeps its blocks (D copied only the first half)
    assert not any(p.requires_grad for p in D.backbone.parameters())
    heads = {id(p) for m in (D.spatial, D.temporal) for p in m.parameters()}
    assert {id(p) for p in D.trainable_parameters()} == heads
    gsd = gen.state_dict()
    for k, v in D.backbone.state_dict().items():
        torch.testing.assert_close(v, gsd[k], rtol=0, atol=0)
    assert D.backbone.blocks[0].ffn[0].weight.data_ptr() != gen.blocks[0].ffn[0].weight.data_ptr()
    D.check_compatible(gen)
    with pytest.raises(ValueError, match="different model"):
        D.check_compatible(build_flow_model("tiny"))  # 2 blocks, not 4


def test_bad_settings_are_named(gen):
    with pytest.raises(ValueError, match="backbone_blocks=5 must be in"):
        SFVDiscriminator(gen, backbone_blocks=5)
    with pytest.raises(ValueError, match=r"head_layers \[2\].*backbone_blocks=2"):
        SFVDiscriminator(gen, head_layers=[2])
    with pytest.raises(ValueError, match="p_std"):
        SFVDiscriminator(gen, p_std=0.0)
    with pytest.raises(TypeError, match="token_grid"):
        SFVDiscriminator(torch.nn.Linear(2, 2))


def test_token_grid_is_the_patched_shape(gen):
    assert gen.token_grid((2, 16, 3, 8, 12)) == (3, 4, 6) == token_grid((2, 16, 3, 8, 12), (1, 2, 2))
    with pytest.raises(ValueError, match="rank 5"):
        token_grid((2, 16, 8, 8), (1, 2, 2))


def test_logits_one_per_sample_and_samples_independent(gen):
    D = SFVDiscriminator(gen, backbone_blocks=3, head_layers=[0, 2])
    x, c = _inputs(3)
    t = torch.tensor([0.2, 0.5, 0.9])
    out = D(x, c, t)
    assert out.shape == (3,) and out.dtype == torch.float32 and torch.isfinite(out).all()
    heads = D.head_logits(x, c, t)
    assert heads.shape == (3, 4)  # spatial + temporal per tap
    torch.testing.assert_close(out, heads.mean(1))
    torch.testing.assert_close(D(x[1:2], WanCond(c.context[1:2]), t[1:2]), out[1:2], rtol=1e-5, atol=1e-6)
    assert D(x, c).shape == (3,)


def test_spatial_head_ignores_frame_order_and_temporal_head_does_not():
    torch.manual_seed(0)
    spatial, temporal = SpatialHead(32, 16), TemporalHead(32, 16)
    grid = torch.randn(2, 5, 3, 4, 32)  # [B, F, H, W, dim]
    perm = torch.tensor([3, 0, 4, 2, 1])
    with torch.no_grad():
        torch.testing.assert_close(spatial(grid[:, perm]), spatial(grid), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(temporal(grid[:, perm]), temporal(grid), atol=1e-4)
        # and the converse: the temporal head ignores where a position is, the spatial head does not
        flip = grid.flip(2).flip(3)
        torch.testing.assert_close(temporal(flip), temporal(grid), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(spatial(flip), spatial(grid), atol=1e-4)
        # each head regroups: a frame (spatial) / a position (temporal) is scored on its own
        one = grid[:, 2:3]
        torch.testing.assert_close(spatial(one), SpatialHead.run(spatial, spatial.norm(one[:, 0]).permute(0, 3, 1, 2)).mean((1, 2, 3)))


def test_noise_levels_are_log_normal_sigma_as_flow_time(gen):
    D = SFVDiscriminator(gen, p_mean=-1.0, p_std=1.0)
    torch.manual_seed(0)
    t = D.sample_t(20000)
    sigma = t / (1 - t)  # noise-to-signal ratio of x_t = (1 - t) x + t eps
    log_sigma = sigma.log()
    assert abs(float(log_sigma.mean()) + 1.0) < 0.03 and abs(float(log_sigma.std()) - 1.0) < 0.03
    D2 = SFVDiscriminator(gen, p_mean=1.0, p_std=0.5)
    log_sigma2 = (lambda t: (t / (1 - t)).log())(D2.sample_t(20000))
    assert abs(float(log_sigma2.mean()) - 1.0) < 0.03 and abs(float(log_sigma2.std()) - 0.5) < 0.03
    # the trainer draws D's t from the discriminator, not from the APT timestep ensemble
    tr = _trainer(gen, D)
    torch.manual_seed(1)
    t_tr = tr.sample_t(20000, torch.device("cpu"))
    assert abs(float((t_tr / (1 - t_tr)).log().mean()) + 1.0) < 0.03


def test_d_and_g_steps_score_noised_inputs(gen):
    D = SFVDiscriminator(gen)
    x, c = _inputs(2)
    z, t = torch.randn_like(x), torch.tensor([0.3, 0.8])
    nr, nf = torch.randn_like(x), torch.randn_like(x)
    seen = []
    D.register_forward_pre_hook(lambda m, args: seen.append((args[0].detach().clone(), args[2].clone())))
    tr = _trainer(gen, D, loss="hinge", r1_lambda=0.0)
    tr.d_step(x, c, z=z, t_d=t, noise_real=nr, noise_fake=nf)
    xin, tin = seen[-1]
    with torch.no_grad():
        fake = tr.generate(z, c)
    tt = t[:, None, None, None, None]
    torch.testing.assert_close(xin[:2], (1 - tt) * x + tt * nr)
    torch.testing.assert_close(xin[2:4], (1 - tt) * fake + tt * nf, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tin, t.repeat(2))
    tr.g_step(c, z=z, t_d=t, noise_fake=nf)
    xin, _ = seen[-1]
    torch.testing.assert_close(xin, (1 - tt) * fake + tt * nf, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="noise_real"):
        tr.d_step(x, c, noise_real=torch.randn(1, 16, 3, 8, 8))


def test_only_heads_train_no_backbone_grad_state_or_graph(gen):
    D = SFVDiscriminator(gen)
    x, c = _inputs(2)
    tr = _trainer(gen, D, loss="hinge", r1_mode="approx")
    back = {k: v.clone() for k, v in D.backbone.state_dict().items()}
    heads = {n: p.detach().clone() for n, p in D.named_parameters() if p.requires_grad}
    graph = []  # does autograd record through the frozen backbone in the D step? (it must not)
    D.backbone.blocks[0].register_forward_hook(lambda m, a, out: graph.append(out.requires_grad))
    tr.d_step(x, c)
    assert graph == [False]
    for k, v in D.backbone.state_dict().items():
        torch.testing.assert_close(v, back[k], rtol=0, atol=0)
    assert all(p.grad is None for p in D.backbone.parameters())
    changed = [n for n, p in D.named_parameters() if p.requires_grad and not torch.equal(p, heads[n])]
    assert changed and all(n.startswith(("spatial.", "temporal.")) for n in changed)
    state = tr.opt_d.state
    assert {id(p) for p in state} == {id(p) for p in D.trainable_parameters()}  # no optimiser state for the backbone
    # the G step back-propagates through the frozen backbone into G, and leaves D alone
    graph.clear()
    g0 = {n: p.detach().clone() for n, p in gen.named_parameters()}
    tr.g_step(c, x_real=x)
    assert graph == [True]
    assert any(not torch.equal(p, g0[n]) for n, p in gen.named_parameters())
    assert all(torch.equal(p, heads[n]) or n.startswith(("spatial.", "temporal.")) for n, p in D.named_parameters() if n in heads)


def test_hinge_loss_by_hand():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 0.5])
    # relu(1 - real) = [0, 0.5, 2]; relu(1 + fake) = [0, 1, 1.5]
    assert math.isclose(float(losses.d_loss_hinge(real, fake)), 2.5 / 3 + 2.5 / 3, rel_tol=1e-6)
    assert math.isclose(float(losses.g_loss_hinge(fake)), 0.5, rel_tol=1e-6)
    assert math.isclose(float(losses.d_loss_hinge_fake(fake)), 2.5 / 3, rel_tol=1e-6)
    with pytest.raises(ValueError, match="loss"):
        APTConfig(loss="wasserstein")


def test_hinge_step_moves_logits_the_right_way(gen):
    D = SFVDiscriminator(gen)
    x, c = _inputs(4)
    z, t, nr, nf = torch.randn_like(x), torch.full((4,), 0.2), torch.randn_like(x), torch.randn_like(x)
    tr = _trainer(gen, D, loss="hinge", r1_lambda=0.0)
    m0 = tr.d_step(x, c, z=z, t_d=t, noise_real=nr, noise_fake=nf)
    for _ in range(5):
        m = tr.d_step(x, c, z=z, t_d=t, noise_real=nr, noise_fake=nf)
    assert float(m["logits_real"] - m["logits_fake"]) > float(m0["logits_real"] - m0["logits_fake"])
    assert float(m["d_adv"]) < float(m0["d_adv"])


def test_exact_r1_is_the_input_gradient_at_the_noised_input(gen):
    D = SFVDiscriminator(gen)
    x, c = _inputs(2)
    z, t, nr, nf = torch.randn_like(x), torch.tensor([0.3, 0.6]), torch.randn_like(x), torch.randn_like(x)
    tr = _trainer(gen, D, loss="hinge", r1_mode="exact", r1_lambda=100.0, r1_sigma=0.1)
    # independent reference, before the step changes the heads: sum_b ||d D(x_t)_b / d x_t||^2 / B
    xt = ((1 - t[:, None, None, None, None]) * x + t[:, None, None, None, None] * nr).requires_grad_(True)
    (grad,) = torch.autograd.grad(D(xt, c, t).sum(), xt)
    ref = grad.pow(2).sum() / 2
    back = {k: v.clone() for k, v in D.backbone.state_dict().items()}
    m = tr.d_step(x, c, z=z, t_d=t, noise_real=nr, noise_fake=nf)
    torch.testing.assert_close(m["r1"], ref, rtol=1e-4, atol=1e-10)
    assert float(m["r1"]) > 0
    torch.testing.assert_close(m["d_loss"], m["d_adv"] + 100.0 * 0.1**2 * m["r1"], rtol=1e-5, atol=1e-6)
    for k, v in D.backbone.state_dict().items():  # R1's double backward reaches the heads only
        torch.testing.assert_close(v, back[k], rtol=0, atol=0)
