"""SDPA backend choice (apt_core.models.attention): every choice computes the same attention, "auto"
times once per shape, and an enclosing kernel restriction (exact R1's math kernel) always wins."""

import pytest
import torch

from apt_core.losses import math_attention
from apt_core.models import attention as attn
from apt_core.models.wan import WanModel, WanSelfAttention, get_config


def _qkv(b=2, n=24, m=24, heads=2, dim=16, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, heads, dim, generator=g)
    k, v = torch.randn(b, m, heads, dim, generator=g), torch.randn(b, m, heads, dim, generator=g)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def _reference(q, k, v):
    """Plain softmax attention, written out (no SDPA), [B, N, H*D]."""
    scores = torch.einsum("bnhd,bmhd->bhnm", q, k) / q.shape[-1] ** 0.5
    return torch.einsum("bhnm,bmhd->bnhd", scores.softmax(-1), v).flatten(2)


@pytest.mark.parametrize("choice", attn.CHOICES)
def test_every_choice_computes_the_same_attention(choice):
    q, k, v = _qkv(m=7)  # cross-attention shape: fewer keys than queries
    out = attn.attention(q, k, v, choice)
    assert out.shape == (2, 24, 32)
    torch.testing.assert_close(out, _reference(q, k, v), rtol=1e-4, atol=1e-5)


def test_auto_times_once_per_shape_and_keeps_a_backend_that_runs_here():
    attn._FASTEST.clear()
    q, k, v = _qkv(n=40)
    attn.attention(q, k, v, "auto")
    (picked,) = attn.auto_choices().values()
    assert picked in attn.BACKENDS
    with torch.nn.attention.sdpa_kernel([attn.BACKENDS[picked]]):  # the pick really runs these inputs
        torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
    attn.attention(q, k, v, "auto")
    assert len(attn.auto_choices()) == 1  # same shape: no second timing
    attn.attention(*_qkv(n=41), "auto")
    assert len(attn.auto_choices()) == 2  # a new shape is timed once more


def test_an_enclosing_math_restriction_wins_so_exact_r1_keeps_its_double_backward():
    # CPU flash attention has no double backward: if "flash" overrode math_attention, this would raise
    q, k, v = _qkv(grad=True)
    with math_attention(q.device):
        out = attn.attention(q, k, v, "flash")
        (grad_q,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
        grad_q.square().sum().backward()
    assert k.grad is not None and torch.isfinite(k.grad).all()


def test_model_setter_reaches_every_attention_layer_and_rejects_unknown_names():
    model = WanModel(get_config("tiny"))
    layers = [m for m in model.modules() if isinstance(m, WanSelfAttention)]
    assert len(layers) == 2 * 2  # self + cross attention in each of 2 blocks
    model.set_attention_backend("auto")
    assert {m.attention_backend for m in layers} == {"auto"}
    with pytest.raises(ValueError, match="'fastest' unknown; choose one of .*cudnn"):
        model.set_attention_backend("fastest")


def test_model_outputs_agree_across_choices():
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
