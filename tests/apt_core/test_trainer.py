"""APTTrainer d_step / g_step and CDTrainer.cd_step on the tiny Wan config."""

import copy

import pytest
import torch

from apt_core import losses
from apt_core.backbone import WanCond, build_flow_model
from apt_core.discriminator import APTDiscriminator
from apt_core.distill import cd_grid, consistency_loss
from apt_core.ema import EMA
from apt_core.trainer import APTConfig, APTTrainer, CDConfig, CDTrainer, is_finite_metrics, make_rmsprop

SHAPE = (4, 16, 1, 4, 4)


def _setup(config=None, seed=0, lr=1e-4, ema=False):
    torch.manual_seed(seed)
    gen = build_flow_model("tiny")
    with torch.no_grad():
        gen.head.head.weight.normal_(std=0.05)  # a generator that is not identically zero
    D = APTDiscriminator(build_flow_model("tiny"))
    tr = APTTrainer(
        gen, D, make_rmsprop(gen.parameters(), lr), make_rmsprop(D.trainable_parameters(), lr),
        config or APTConfig(), ema=EMA(gen, decay=0.9) if ema else None,
    )
    return tr


def _data(seed=1, b=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, *SHAPE[1:], generator=g)
    c = WanCond(torch.randn(b, 5, 32, generator=g))
    noise = {"z": torch.randn(x.shape, generator=g), "t_d": torch.rand(b, generator=g)}
    return x, c, noise


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _changed(module, before):
    return {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}


def test_make_rmsprop_is_rmsprop_with_alpha_0_9():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = make_rmsprop([p], lr=0.1)
    grads = [torch.tensor([0.5, -4.0, 0.0]), torch.tensor([1.0, 2.0, -3.0])]
    v, want = torch.zeros(3), p.detach().clone()
    for g in grads:  # v = 0.9 v + 0.1 g^2; p -= lr g / (sqrt(v) + eps): no momentum, no bias correction
        v = 0.9 * v + 0.1 * g**2
        want -= 0.1 * g / (v.sqrt() + 1e-8)
        p.grad = g.clone()
        opt.step()
        torch.testing.assert_close(p.detach(), want)
    torch.testing.assert_close(want[:2], torch.tensor([1.0, -2.0]) - 0.1 / 0.1**0.5 * torch.tensor([1.0, -1.0])
                               - 0.1 * grads[1][:2] / (0.9 * 0.1 * grads[0][:2] ** 2 + 0.1 * grads[1][:2] ** 2).sqrt())


def test_rmsprop_state_is_one_fp32_copy_of_the_trainable_params():
    """No Adam first moment (exp_avg): the state is `square_avg` (one fp32 tensor per param) and a step count."""
    tr = _setup()
    x, c, noise = _data()
    tr.d_step(x, c, **noise)
    tr.g_step(c, **noise)
    for opt, module in ((tr.opt_d, tr.discriminator), (tr.opt_g, tr.generator)):
        trainable = [p for p in module.parameters() if p.requires_grad]
        assert len(opt.state) == len(trainable)
        assert all(set(s) == {"step", "square_avg"} for s in opt.state.values())
        state_bytes = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step")
        assert state_bytes == sum(p.numel() * 4 for p in trainable)


def test_config_validation_names_the_value():
    with pytest.raises(ValueError, match="loss='wasserstein'"):
        APTConfig(loss="wasserstein")
    with pytest.raises(ValueError, match="grad_accum"):
        APTConfig(grad_accum=0)
    with pytest.raises(ValueError, match="r1_sigma"):
        APTConfig(r1_sigma=0.0)
    with pytest.raises(ValueError, match="r1_mode"):
        APTConfig(r1_mode="lazy")
    with pytest.raises(ValueError, match="steps"):
        CDConfig(steps=0)


def test_discriminator_and_config_must_agree_on_the_timestep_shift():
    """D's timestep_shift and APTConfig.d_timestep_shift name one thing: a mismatch is an error, not a silent pick."""
    torch.manual_seed(0)
    gen = build_flow_model("tiny")
    D = APTDiscriminator(gen, timestep_shift=12.0)
    opts = make_rmsprop(gen.parameters(), 1e-4), make_rmsprop(D.trainable_parameters(), 1e-4)
    with pytest.raises(ValueError, match=r"d_timestep_shift=1.0 differs from the discriminator's timestep_shift=12.0"):
        APTTrainer(gen, D, *opts, APTConfig())
    tr = APTTrainer(gen, D, *opts, APTConfig(d_timestep_shift=12.0))
    assert float(tr.sample_t(4000, torch.device("cpu")).mean()) > 0.8  # shift 12: mass near t = 1


def test_d_step_moves_only_d_and_g_step_moves_only_g():
    tr = _setup()
    x, c, noise = _data()
    g0, d0 = _snapshot(tr.generator), _snapshot(tr.discriminator)
    m = tr.d_step(x, c, **noise)
    trainable_d = {n for n, p in tr.discriminator.named_parameters() if p.requires_grad}
    assert _changed(tr.generator, g0) == set()
    assert _changed(tr.discriminator, d0) == trainable_d  # every trainable D tensor, nothing else
    assert all(p.grad is None for p in tr.generator.parameters())  # fakes made under no_grad
    for v in m.values():
        assert v.ndim == 0 and not v.requires_grad
    assert {"d_loss", "d_loss_real", "d_loss_fake", "logits_real", "logits_fake", "d_acc", "ar1", "grad_norm_d"} <= set(m)

    g1, d1 = _snapshot(tr.generator), _snapshot(tr.discriminator)
    d_grads = {n: p.grad.clone() for n, p in tr.discriminator.named_parameters() if p.grad is not None}
    d_opt_state = copy.deepcopy(tr.opt_d.state_dict())
    m = tr.g_step(c, z=noise["z"], t_d=noise["t_d"])
    assert _changed(tr.discriminator, d1) == set()
    assert _changed(tr.generator, g1) == {n for n, p in tr.generator.named_parameters() if p.requires_grad}
    assert {n for n, p in tr.discriminator.named_parameters() if p.requires_grad} == trainable_d  # restored
    for n, p in tr.discriminator.named_parameters():  # no D grads accumulated in the G step
        assert (p.grad is None) == (n not in d_grads) and (p.grad is None or torch.equal(p.grad, d_grads[n]))
    assert str(tr.opt_d.state_dict()) == str(d_opt_state)
    assert {"g_loss", "logits_fake_g", "grad_norm_g"} <= set(m) and all(v.ndim == 0 for v in m.values())


def test_d_step_uses_one_batched_forward_with_paired_t_and_noise():
    """The step's adversarial and aR1 terms equal separate passes with the same t, c and noise."""
    cfg = APTConfig(r1_sigma=0.05)
    tr = _setup(cfg)
    x, c, noise = _data()
    r1_noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    D, t = tr.discriminator, noise["t_d"]
    with torch.no_grad():
        fake = tr.generate(noise["z"], c)
        l_real, l_fake = D(x, c, t), D(fake, c, t)
        l_pert = D(x + cfg.r1_sigma * r1_noise, c, t)
    m = tr.d_step(x, c, r1_noise=r1_noise, **noise)
    ar1 = losses.approx_r1(l_real, l_pert)
    assert ar1 > 0
    torch.testing.assert_close(m["ar1"], ar1, rtol=1e-4, atol=1e-7)
    adv = losses.d_loss_nonsaturating(l_real, l_fake)
    torch.testing.assert_close(m["d_loss"], adv + cfg.r1_lambda * ar1, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(m["logits_fake"], l_fake.mean(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(m["grad_norm_d"], m["grad_norm_d"].clamp(min=1e-6))  # > 0, finite


@pytest.mark.parametrize("mismatch_weight", [0.0, 0.5])
def test_grad_accum_gives_the_same_gradients_as_one_batch(mismatch_weight):
    x, c, noise = _data()
    r1_noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    grads, metrics = [], []
    for accum in (1, 2, 4):  # 4: micro batches of one sample
        tr = _setup(APTConfig(grad_accum=accum, mismatch_weight=mismatch_weight))
        m = tr.d_step(x, c, r1_noise=r1_noise, **noise)
        m.update(tr.g_step(c, **noise))
        metrics.append(m)
        grads.append([p.grad.clone() for p in [*tr.discriminator.trainable_parameters(), *tr.generator.parameters()]])
    keys = ["d_loss", "ar1", "d_acc", "g_loss"] + (["d_mismatch"] if mismatch_weight else [])
    assert set(keys) <= set(metrics[0])
    for other_grads, other_metrics in zip(grads[1:], metrics[1:]):
        for a, b in zip(grads[0], other_grads):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
        for k in keys:
            torch.testing.assert_close(metrics[0][k], other_metrics[k], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="grad_accum=3"):
        _setup(APTConfig(grad_accum=3)).d_step(x, c)


def test_relativistic_with_r2_runs_and_pairs_logits():
    cfg = APTConfig(loss="relativistic", r2=True, r1_lambda=1000.0, r2_lambda=1000.0, r1_sigma=0.1)
    tr = _setup(cfg)
    x, c, noise = _data()
    m = tr.d_step(x, c, **noise)
    assert {"ar1", "ar2", "d_adv"} <= set(m) and m["ar2"] > 0 and is_finite_metrics(m)
    with pytest.raises(ValueError, match="x_real"):
        tr.g_step(c, **noise)
    with torch.no_grad():
        D, t = tr.discriminator, noise["t_d"]
        expect = losses.g_loss_relativistic(D(x, c, t), D(tr.generate(noise["z"], c), c, t))
    m = tr.g_step(c, x_real=x, **noise)
    torch.testing.assert_close(m["g_loss"], expect, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss", ["nonsaturating", "relativistic"])
def test_mismatch_term_scores_real_samples_under_rolled_captions(loss):
    relativistic = loss == "relativistic"
    cfg = APTConfig(loss=loss, r2=relativistic, mismatch_weight=0.5)
    tr = _setup(cfg)
    x, c, noise = _data()
    D, t = tr.discriminator, noise["t_d"]
    with torch.no_grad():
        l_real, l_mis = D(x, c, t), D(x, WanCond(c.context.roll(-1, 0)), t)  # sample i under caption i+1
    expect = losses.d_loss_relativistic(l_real, l_mis) if relativistic else losses.d_loss_fake(l_mis)
    m = tr.d_step(x, c, **noise)
    torch.testing.assert_close(m["d_mismatch"], expect, rtol=1e-4, atol=1e-6)
    total = m["d_adv"] + cfg.r1_lambda * m["ar1"] + (cfg.r2_lambda * m["ar2"] if relativistic else 0) + 0.5 * m["d_mismatch"]
    torch.testing.assert_close(m["d_loss"], total, rtol=1e-4, atol=1e-6)
    assert "d_mismatch" not in _setup(APTConfig(loss=loss, r2=relativistic)).d_step(x, c, **noise)
    one = {k: v[:1] for k, v in noise.items()}  # a batch of one has no other caption: term skipped
    assert "d_mismatch" not in _setup(cfg).d_step(x[:1], WanCond(c.context[:1]), **one)
    with pytest.raises(ValueError, match="mismatch_weight"):
        APTConfig(mismatch_weight=-1.0)


@pytest.mark.parametrize("accum", [1, 2, 4])
def test_mismatch_never_scores_a_sample_under_its_own_caption(accum):
    """Each real sample is scored once under the NEXT sample's caption of the whole batch, whatever the micro batch."""
    tr = _setup(APTConfig(grad_accum=accum, mismatch_weight=1.0))
    x, c, noise = _data()
    seen = []  # (sample index, caption index) of every mismatched row D scored

    def record(module, args):
        xs, conds = args[0].chunk(4), args[1].context.chunk(4)  # [real, fake, real + sigma n, mismatched real]
        for row_x, row_c in zip(xs[3], conds[3]):
            sample = [i for i in range(len(x)) if torch.equal(row_x, x[i])]
            caption = [j for j in range(len(x)) if torch.equal(row_c, c.context[j])]
            seen.append((sample, caption))

    handle = tr.discriminator.register_forward_pre_hook(record)
    m = tr.d_step(x, c, **noise)
    handle.remove()
    assert "d_mismatch" in m
    assert seen == [([i], [(i + 1) % 4]) for i in range(4)]


class TwoLayerD(torch.nn.Module):
    """`D(x, c, t) = (1 + t) w2 . tanh(W1 x + U c + b)`: a discriminator whose input gradient has a closed form."""

    def __init__(self, d_in: int, d_c: int, hidden: int = 8):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.w1 = torch.nn.Parameter(torch.randn(hidden, d_in, generator=g) / d_in**0.5)
        self.u = torch.nn.Parameter(torch.randn(hidden, d_c, generator=g) / d_c**0.5)
        self.b = torch.nn.Parameter(0.1 * torch.randn(hidden, generator=g))
        self.w2 = torch.nn.Parameter(torch.randn(hidden, generator=g))

    def pre(self, x, c):
        return x.flatten(1) @ self.w1.T + c @ self.u.T + self.b

    def forward(self, x, c, t):
        return (1 + t) * (torch.tanh(self.pre(x, c)) @ self.w2)

    def r1_by_hand(self, x, c, t):
        """mean_b ||grad_x D_b||^2 with grad_x D_b = (1 + t_b) W1^T (w2 * (1 - tanh^2(a_b))), written out."""
        slope = 1 - torch.tanh(self.pre(x, c)) ** 2  # [B, hidden]
        grad = (1 + t)[:, None] * ((slope * self.w2) @ self.w1)  # [B, d_in]
        return grad.pow(2).sum(1).mean()


class ScaleG(torch.nn.Module):
    """A one-parameter velocity model `v = a z` (G(z) = (1 - a) z)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.3))

    def forward(self, x_t, t, cond):
        return self.a * x_t


def test_exact_r1_d_step_matches_a_hand_written_double_backward():
    """Exact R1 and the whole exact-mode D gradient against a closed-form input gradient (no shared code)."""
    g = torch.Generator().manual_seed(3)
    x, z = torch.randn(3, 2, 1, 1, 3, generator=g), torch.randn(3, 2, 1, 1, 3, generator=g)
    c, t = torch.randn(3, 4, generator=g), torch.rand(3, generator=g)
    D, G = TwoLayerD(6, 4), ScaleG()
    cfg = APTConfig(r1_mode="exact", r1_lambda=10.0, r1_sigma=0.1)
    penalty = D.r1_by_hand(x, c, t)
    fake = (1 - G.a.detach()) * z
    loss = (torch.nn.functional.softplus(-D(x, c, t)).mean() + torch.nn.functional.softplus(D(fake, c, t)).mean()
            + cfg.r1_lambda * cfg.r1_sigma**2 * penalty)
    expect = torch.autograd.grad(loss, list(D.parameters()))
    torch.testing.assert_close(losses.exact_r1(D, x, c, t), penalty, rtol=1e-5, atol=1e-7)
    tr = APTTrainer(G, D, make_rmsprop(G.parameters(), 1e-3), make_rmsprop(D.parameters(), 1e-3), cfg)
    m = tr.d_step(x, c, z=z, t_d=t)
    torch.testing.assert_close(m["r1"], penalty.detach(), rtol=1e-5, atol=1e-7)
    assert float(penalty.detach()) > 0.1  # not a vanishing term
    for p, want in zip(D.parameters(), expect):
        torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("accum", [1, 2])
def test_r2_pairs_each_fake_with_its_own_perturbation_and_t(accum):
    """aR2 = mean_i (D(G(z_i), c_i, t_i) - D(G(z_i) + sigma n_i, c_i, t_i))^2, pair by pair."""
    cfg = APTConfig(loss="relativistic", r2=True, r1_lambda=1000.0, r2_lambda=1000.0, r1_sigma=0.1, grad_accum=accum)
    tr = _setup(cfg)
    x, c, noise = _data()
    g = torch.Generator().manual_seed(9)
    r1_noise, r2_noise = torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g)
    D, t = tr.discriminator, noise["t_d"]
    with torch.no_grad():
        fake = tr.generate(noise["z"], c)
        l_fake = D(fake, c, t)

        def ar2(n, tt):
            return ((l_fake - D(fake + cfg.r1_sigma * n, c, tt)) ** 2).mean()

        paired, other_noise, other_t = ar2(r2_noise, t), ar2(r2_noise.roll(1, 0), t), ar2(r2_noise, t.roll(1))
        same_as_r1 = ar2(r1_noise, t)
    m = tr.d_step(x, c, r1_noise=r1_noise, r2_noise=r2_noise, **noise)
    torch.testing.assert_close(m["ar2"], paired, rtol=1e-4, atol=1e-8)
    for wrong in (other_noise, other_t, same_as_r1):  # the check can tell a mis-pairing apart
        assert abs(float(wrong / paired) - 1) > 0.01, (float(wrong), float(paired))


@pytest.mark.parametrize("loss", ["nonsaturating", "relativistic"])
def test_one_d_step_raises_real_and_lowers_fake_logits_and_one_g_step_raises_fake_logits(loss):
    tr = _setup(APTConfig(loss=loss, r1_lambda=0.0), lr=1e-4)
    x, c, noise = _data()
    D, t, z = tr.discriminator, noise["t_d"], noise["z"]

    def logits():
        with torch.no_grad():
            return D(x, c, t).mean(), D(tr.generate(z, c), c, t).mean()

    real0, fake0 = logits()
    tr.d_step(x, c, **noise)
    real1, fake1 = logits()
    assert real1 > real0 + 1e-2 and fake1 < fake0 - 1e-2, (real0, real1, fake0, fake1)
    tr.g_step(c, x_real=x, **noise)
    real2, fake2 = logits()
    assert fake2 > fake1 + 1e-2 and real2 == real1, (fake1, fake2)


def test_exact_r1_mode_matches_the_reference():
    cfg = APTConfig(r1_mode="exact")
    tr = _setup(cfg)
    x, c, noise = _data()
    ref = losses.exact_r1(tr.discriminator, x, c, noise["t_d"]).detach()
    tr.discriminator.zero_grad(set_to_none=True)
    m = tr.d_step(x, c, **noise)
    assert "ar1" not in m and m["r1"] > 0
    torch.testing.assert_close(m["r1"], ref, rtol=1e-4, atol=1e-7)


def test_exact_r1_under_activation_checkpointing_gives_the_same_update():
    # The backward recomputes checkpointed blocks: they must take the math kernel again, or the
    # recomputed tensors differ from the forward's (a crash before this was fixed).
    results = []
    for checkpointing in (False, True):
        tr = _setup(APTConfig(r1_mode="exact"))
        tr.discriminator.backbone.gradient_checkpointing = checkpointing
        x, c, noise = _data()
        m = tr.d_step(x, c, **noise)
        results.append((m, _snapshot(tr.discriminator)))
    (m0, d0), (m1, d1) = results
    for key in ("d_loss", "r1", "grad_norm_d"):
        torch.testing.assert_close(m1[key], m0[key])
    for name in d0:
        torch.testing.assert_close(d1[name], d0[name], msg=name)


def test_g_step_updates_the_ema():
    tr = _setup(ema=True)
    x, c, noise = _data()
    before = {n: s.clone() for n, s in zip(tr.ema.names, tr.ema.shadow)}
    tr.d_step(x, c, **noise)
    assert tr.ema.num_updates == 0
    tr.g_step(c, **noise)
    assert tr.ema.num_updates == 1
    params = dict(tr.generator.named_parameters())
    for n, s in zip(tr.ema.names, tr.ema.shadow):
        torch.testing.assert_close(s, 0.9 * before[n] + 0.1 * params[n].detach())
    assert not torch.equal(dict(zip(tr.ema.names, tr.ema.shadow))["head.head.weight"], before["head.head.weight"])


def test_g_step_draws_z_with_the_last_real_shape():
    tr = _setup()
    x, c, _ = _data()
    with pytest.raises(ValueError, match="latent shape"):
        tr.g_step(c)
    tr.d_step(x, c)
    assert is_finite_metrics(tr.g_step(c))


def test_apt_run_of_a_few_hundred_tiny_steps_stays_finite():
    tr = _setup(APTConfig(r1_sigma=0.1), lr=3e-4, ema=True)
    g = torch.Generator().manual_seed(3)
    base = torch.randn(8, *SHAPE[1:], generator=g)  # a tiny "dataset" of 8 latents with fixed captions
    ctx = torch.randn(8, 5, 32, generator=g)
    for step in range(200):
        idx = torch.randint(0, 8, (4,), generator=g)
        c = WanCond(ctx[idx])
        md = tr.d_step(base[idx], c)
        mg = tr.g_step(c)
        if step % 50 == 49:
            assert is_finite_metrics(md) and is_finite_metrics(mg), (step, md, mg)
    assert all(torch.isfinite(p).all() for p in [*tr.generator.parameters(), *tr.discriminator.parameters()])
    assert tr.ema.num_updates == 200 and all(torch.isfinite(s).all() for s in tr.ema.shadow)
    with torch.no_grad():
        out = tr.generate(torch.randn(SHAPE, generator=g), WanCond(ctx[:4]))
    assert torch.isfinite(out).all() and out.std() > 1e-3


# ---------------------------------------------------------------------------------------------
# consistency distillation
# ---------------------------------------------------------------------------------------------


def _cd_setup(cfg):
    torch.manual_seed(0)
    teacher = build_flow_model("tiny")
    with torch.no_grad():
        teacher.head.head.weight.normal_(std=0.1)
    teacher.requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True)
    with torch.no_grad():
        student.head.head.weight.add_(0.1 * torch.randn_like(student.head.head.weight))
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.01)
    return CDTrainer(student, teacher, opt, cfg, ema=EMA(student, decay=0.9))


def test_cd_run_lowers_its_loss_on_toy_data():
    cfg = CDConfig(steps=8, shift=3.0, cfg_scale=2.0)
    tr = _cd_setup(cfg)
    g = torch.Generator().manual_seed(4)
    data, ctx, neg = torch.randn(8, *SHAPE[1:], generator=g), torch.randn(8, 5, 32, generator=g), torch.zeros(8, 5, 32)
    eval_eps = torch.randn(data.shape, generator=g)
    eval_n = torch.randint(1, 9, (8,), generator=g)

    def eval_loss():
        with torch.no_grad():
            return float(consistency_loss(tr.student, tr.teacher, data, WanCond(ctx), eval_eps, eval_n,
                                          cd_grid(8, 3.0), 2.0, WanCond(neg)))

    first = eval_loss()
    for _ in range(60):
        idx = torch.randint(0, 8, (4,), generator=g)
        m = tr.cd_step(data[idx], WanCond(ctx[idx]), neg_cond=WanCond(neg[idx]))
    assert set(m) == {"loss", "grad_norm", "t_mean"} and all(v.ndim == 0 and not v.requires_grad for v in m.values())
    assert tr.ema.num_updates == 60
    last = eval_loss()
    assert last < 0.5 * first, (first, last)
    with pytest.raises(ValueError, match="neg_cond"):
        tr.cd_step(data[:4], WanCond(ctx[:4]))


def test_cd_step_grad_accum_and_explicit_draws_are_reproducible():
    g = torch.Generator().manual_seed(5)
    x0, ctx = torch.randn(4, *SHAPE[1:], generator=g), torch.randn(4, 5, 32, generator=g)
    eps, n = torch.randn(x0.shape, generator=g), torch.tensor([1, 3, 8, 5])
    out = []
    for accum in (1, 2):
        tr = _cd_setup(CDConfig(steps=8, shift=3.0, grad_accum=accum))
        m = tr.cd_step(x0, WanCond(ctx), eps=eps, step_index=n)
        out.append((m, [p.grad.clone() for p in tr.student.parameters()]))
        assert all(p.grad is None for p in tr.teacher.parameters())
    torch.testing.assert_close(out[0][0]["loss"], out[1][0]["loss"], rtol=1e-5, atol=1e-7)
    for a, b in zip(out[0][1], out[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    tr = _cd_setup(CDConfig(steps=8, shift=3.0, grad_accum=2))
    with pytest.raises(ValueError, match=r"step_index must be \[B=4\].*got shape \(3,\)"):
        tr.cd_step(x0, WanCond(ctx), eps=eps, step_index=n[:3])
    with pytest.raises(ValueError, match=r"eps must have shape \(4, 16, 1, 4, 4\)"):
        tr.cd_step(x0, WanCond(ctx), eps=eps[:, :8], step_index=n)
