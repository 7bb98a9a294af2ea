"""SDPA backend choice (apt_core.models.attention): the chosen kernel really runs (seen by the
profiler), every choice computes the same attention, "auto" times once per shape, an enclosing
restriction (exact R1's math kernel) wins, and checkpoint recomputes keep the forward's kernels."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from apt_core.backbone import WanCond, build_flow_model
from apt_core.discriminator import APTDiscriminator
from apt_core.losses import exact_r1, math_attention
from apt_core.models import attention as attn
from apt_core.models.wan import WanModel, WanSelfAttention, get_config

CPU_KERNELS = {"math": "aten::_scaled_dot_product_attention_math",
               "flash": "aten::_scaled_dot_product_flash_attention_for_cpu"}


def _qkv(b=2, n=24, m=24, heads=2, dim=16, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, heads, dim, generator=g)
    k, v = torch.randn(b, m, heads, dim, generator=g), torch.randn(b, m, heads, dim, generator=g)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def _reference(q, k, v):
    """Plain softmax attention, written out (no SDPA), [B, N, H*D]."""
    scores = torch.einsum("bnhd,bmhd->bhnm", q, k) / q.shape[-1] ** 0.5
    return torch.einsum("bhnm,bmhd->bnhd", scores.softmax(-1), v).flatten(2)


def _kernels_run(fn) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = {e.key for e in prof.key_averages()}
    return {name for name, kernel in CPU_KERNELS.items() if kernel in names}


@pytest.mark.parametrize("choice", attn.CHOICES)
def test_every_choice_computes_the_same_attention(choice):
    q, k, v = _qkv(m=7)  # cross-attention shape: fewer keys than queries
    out = attn.attention(q, k, v, choice)
    assert out.shape == (2, 24, 32)
    torch.testing.assert_close(out, _reference(q, k, v), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("choice, ran", [("math", {"math"}), ("flash", {"flash"}), ("default", {"flash"}),
                                         ("efficient", {"flash"}), ("cudnn", {"flash"})])
def test_the_chosen_kernel_is_the_one_that_runs(choice, ran):
    # on CPU: math and flash exist; efficient and cuDNN refuse, and the dispatcher (flash) takes over
    q, k, v = _qkv(n=33)
    assert _kernels_run(lambda: attn.attention(q, k, v, choice)) == ran
    if choice in ("efficient", "cudnn"):
        assert (choice, *attn._key(q.transpose(1, 2), k.transpose(1, 2))) in attn._REFUSED


def test_auto_times_once_per_shape_and_keeps_a_fused_backend_that_runs_here():
    attn._FASTEST.clear()
    q, k, v = _qkv(n=40)
    assert _kernels_run(lambda: attn.attention(q, k, v, "auto")) >= {"flash"}
    assert list(attn.auto_choices().values()) == ["flash"]  # math is not timed where a fused kernel runs
    attn.attention(q, k, v, "auto")
    assert len(attn.auto_choices()) == 1  # same shape: no second timing
    attn.attention(*_qkv(n=41), "auto")
    assert len(attn.auto_choices()) == 2  # a new shape is timed once more


def test_an_enclosing_math_restriction_wins_so_exact_r1_keeps_its_double_backward():
    # CPU flash attention has no double backward: if "flash" overrode math_attention, this would raise
    q, k, v = _qkv(grad=True)
    with math_attention(q.device):
        assert attn.enabled_backends() == ["math"]
        out = attn.attention(q, k, v, "flash")
        (grad_q,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
        grad_q.square().sum().backward()
    assert k.grad is not None and torch.isfinite(k.grad).all()
    with math_attention(q.device):
        assert _kernels_run(lambda: attn.attention(q, k, v, "auto")) == {"math"}


def test_single_query_attention_drops_only_cudnn_from_what_is_enabled():
    assert attn.single_query_backends() == ["flash", "efficient", "math"]
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]):
        assert attn.single_query_backends() == ["math"]
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):  # cuDNN alone was asked for: left alone
        assert attn.single_query_backends() == []
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):
        assert attn.single_query_backends() == []  # no cuDNN enabled: nothing to change
    q, k, v = (t.transpose(1, 2) for t in _qkv(n=1, m=30))
    torch.testing.assert_close(attn.sdpa_single_query(q, k, v).transpose(1, 2).flatten(2),
                               _reference(*(t.transpose(1, 2) for t in (q, k, v))), rtol=1e-4, atol=1e-5)


def test_checkpointed_exact_r1_can_be_backpropagated_outside_the_math_context():
    # losses.exact_r1 runs D under the math kernel; the caller's backward comes later, outside it.
    # The checkpoint recompute must take the forward's kernels again (a CheckpointError before).
    torch.manual_seed(0)
    D = APTDiscriminator(build_flow_model("tiny"))
    D.backbone.gradient_checkpointing = True
    x, c, t = torch.randn(2, 16, 1, 4, 4), WanCond(torch.randn(2, 5, 32)), torch.rand(2)
    exact_r1(D, x, c, t).backward()
    grads = [p.grad for p in D.trainable_parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_model_setter_reaches_every_attention_layer_and_rejects_unknown_names():
    model = WanModel(get_config("tiny"))
    layers = [m for m in model.modules() if isinstance(m, WanSelfAttention)]
    assert len(layers) == 2 * 2  # self + cross attention in each of 2 blocks
    model.set_attention_backend("auto")
    assert {m.attention_backend for m in layers} == {"auto"}
    with pytest.raises(ValueError, match="'fastest' unknown; choose one of .*cudnn"):
        model.set_attention_backend("fastest")


def test_model_outputs_agree_across_choices_and_the_math_choice_runs_math():
    torch.manual_seed(0)
    model = WanModel(get_config("tiny")).eval()
    with torch.no_grad():
        model.head.head.weight.normal_(std=0.1)
    x, t, c = torch.randn(1, 16, 2, 4, 4), torch.tensor([500.0]), torch.randn(1, 5, 32)
    with torch.no_grad():
        ref = model(x, t, c)
        for choice in ("auto", "flash", "math", "efficient"):
            model.set_attention_backend(choice)
            torch.testing.assert_close(model(x, t, c), ref, rtol=1e-4, atol=1e-5, msg=choice)
        model.set_attention_backend("math")
        assert _kernels_run(lambda: model(x, t, c)) == {"math"}
