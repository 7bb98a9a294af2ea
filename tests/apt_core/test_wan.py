"""WanModel against the Wan 2.1 spec: parameter table, an independent reference forward, input errors,
feature taps and activation checkpointing. With WAN21_REPO set to a checkout of Wan-Video/Wan2.1,
also against the public `wan/modules/model.py` itself.
"""

import copy
import importlib.util
import math
import os
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from apt_core.backbone import build_flow_model
from apt_core.models.wan import WanConfig, WanModel, build_wan, get_config

# ----------------------------------------------------------------------------------------------
# (a) parameter names and shapes, from shared/docs/wan21_reference.md ("State-dict keys")
# ----------------------------------------------------------------------------------------------


def spec_shapes(dim, ffn_dim, num_layers, in_dim=16, out_dim=16, text_dim=4096, freq_dim=256, patch=(1, 2, 2)):
    """The Wan 2.1 T2V key -> shape table, written from the spec (not from our module)."""
    s = {
        "patch_embedding.weight": (dim, in_dim, *patch),
        "patch_embedding.bias": (dim,),
        "text_embedding.0.weight": (dim, text_dim),
        "text_embedding.0.bias": (dim,),
        "text_embedding.2.weight": (dim, dim),
        "text_embedding.2.bias": (dim,),
        "time_embedding.0.weight": (dim, freq_dim),
        "time_embedding.0.bias": (dim,),
        "time_embedding.2.weight": (dim, dim),
        "time_embedding.2.bias": (dim,),
        "time_projection.1.weight": (6 * dim, dim),
        "time_projection.1.bias": (6 * dim,),
        "head.modulation": (1, 2, dim),
        "head.head.weight": (math.prod(patch) * out_dim, dim),
        "head.head.bias": (math.prod(patch) * out_dim,),
    }
    for i in range(num_layers):
        b = f"blocks.{i}."
        s[b + "modulation"] = (1, 6, dim)
        for attn in ("self_attn", "cross_attn"):
            for p in "qkvo":
                s[f"{b}{attn}.{p}.weight"] = (dim, dim)
                s[f"{b}{attn}.{p}.bias"] = (dim,)
            s[f"{b}{attn}.norm_q.weight"] = (dim,)
            s[f"{b}{attn}.norm_k.weight"] = (dim,)
        s[b + "norm3.weight"] = (dim,)
        s[b + "norm3.bias"] = (dim,)
        s[b + "ffn.0.weight"] = (ffn_dim, dim)
        s[b + "ffn.0.bias"] = (ffn_dim,)
        s[b + "ffn.2.weight"] = (dim, ffn_dim)
        s[b + "ffn.2.bias"] = (dim,)
    return s


@pytest.mark.parametrize(
    "name,dim,ffn,layers,billions",
    [("wan2.1-t2v-1.3b", 1536, 8960, 30, 1.419), ("wan2.1-t2v-14b", 5120, 13824, 40, 14.289)],
)
def test_real_configs_match_the_public_parameter_table(name, dim, ffn, layers, billions):
    model = build_wan(name, device="meta")
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = spec_shapes(dim, ffn, layers)
    assert got.keys() == want.keys(), (sorted(got.keys() - want.keys())[:5], sorted(want.keys() - got.keys())[:5])
    assert got == want
    n = sum(p.numel() for p in model.parameters())
    assert n == sum(math.prod(s) for s in want.values())
    assert abs(n / 1e9 - billions) <= 0.001  # 1.3B: 1,418,996,800; 14B: 14,288,491,584 ("14.289" rounded up)
    if name == "wan2.1-t2v-1.3b":
        assert round(n / 1e9, 3) == 1.419 and n == 1_418_996_800
    assert not list(model.buffers())  # nothing outside the checkpoint's keys


def test_builders_respect_an_enclosing_meta_device():
    """No `device` argument: the ambient `with torch.device("meta")` wins (the 14B preset would take 57 GB on CPU)."""
    def on_meta(model):
        return {p.device.type for p in model.parameters()} == {"meta"}

    with torch.device("meta"):  # tiny models first: a regression must not reach the 57 GB build
        tiny = build_wan("tiny", dtype=torch.bfloat16)
        assert on_meta(tiny) and on_meta(build_flow_model("tiny")) and next(tiny.parameters()).dtype == torch.bfloat16
        assert on_meta(build_wan("wan2.1-t2v-14b")) and on_meta(build_flow_model("wan2.1-t2v-14b"))
    assert next(build_wan("tiny").parameters()).device.type == "cpu"  # no context: the default device
    with torch.device("meta"):
        assert next(build_wan("tiny", device="cpu").parameters()).device.type == "cpu"  # an explicit device wins


# ----------------------------------------------------------------------------------------------
# (b) an independent reference forward, in the public code's style (list of samples, complex RoPE)
# ----------------------------------------------------------------------------------------------


def ref_sinusoidal_embedding_1d(dim, position):
    half = dim // 2
    position = position.type(torch.float64)
    sinusoid = torch.outer(position, torch.pow(10000, -torch.arange(half).to(position).div(half)))
    return torch.cat([torch.cos(sinusoid), torch.sin(sinusoid)], dim=1)


def ref_rope_params(max_seq_len, dim, theta=10000):
    freqs = torch.outer(torch.arange(max_seq_len), 1.0 / torch.pow(theta, torch.arange(0, dim, 2).to(torch.float64).div(dim)))
    return torch.polar(torch.ones_like(freqs), freqs)


def ref_rope_apply_one(x, grid, freqs):
    """x [L, n, d] of one sample; complex multiply in float64, as Wan's rope_apply."""
    n, c = x.size(1), x.size(2) // 2
    freqs = freqs.split([c - 2 * (c // 3), c // 3, c // 3], dim=1)
    f, h, w = grid
    seq_len = f * h * w
    x_i = torch.view_as_complex(x[:seq_len].to(torch.float64).reshape(seq_len, n, -1, 2))
    freqs_i = torch.cat(
        [
            freqs[0][:f].view(f, 1, 1, -1).expand(f, h, w, -1),
            freqs[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
            freqs[2][:w].view(1, 1, w, -1).expand(f, h, w, -1),
        ],
        dim=-1,
    ).reshape(seq_len, 1, -1)
    return torch.view_as_real(x_i * freqs_i).flatten(2).float()


def ref_rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight


def ref_attention(q, k, v):
    """Explicit softmax attention, q [Lq, n, d], k/v [Lk, n, d] -> [Lq, n*d]."""
    scores = torch.einsum("lnd,mnd->nlm", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("nlm,mnd->lnd", scores.softmax(dim=-1), v).flatten(1)


def ref_forward(P, cfg: WanConfig, xs, t, contexts):
    """Wan 2.1 T2V forward over a list of samples xs [C, F, H, W] and contexts [L_i, text_dim]."""
    dim, n, eps = cfg.dim, cfg.num_heads, cfg.eps
    d = dim // n
    lin = lambda x, name: F.linear(x, P[name + ".weight"], P[name + ".bias"])  # noqa: E731
    freqs = torch.cat(
        [ref_rope_params(1024, d - 4 * (d // 6)), ref_rope_params(1024, 2 * (d // 6)), ref_rope_params(1024, 2 * (d // 6))],
        dim=1,
    )
    # time embeddings (batched, as the public code)
    e = lin(F.silu(lin(ref_sinusoidal_embedding_1d(cfg.freq_dim, t).float(), "time_embedding.0")), "time_embedding.2")
    e0 = lin(F.silu(e), "time_projection.1").unflatten(1, (6, dim))
    outs = []
    for i, u in enumerate(xs):
        u = F.conv3d(u.unsqueeze(0), P["patch_embedding.weight"], P["patch_embedding.bias"], stride=cfg.patch_size)
        grid = tuple(u.shape[2:])
        x = u.flatten(2).transpose(1, 2)[0]  # [L, dim]
        c = contexts[i]
        c = torch.cat([c, c.new_zeros(cfg.text_len - c.size(0), c.size(1))])
        c = lin(F.gelu(lin(c, "text_embedding.0"), approximate="tanh"), "text_embedding.2")
        for b in range(cfg.num_layers):
            pre = f"blocks.{b}."
            m = (P[pre + "modulation"] + e0[i : i + 1]).chunk(6, dim=1)  # each [1, 1, dim]
            m = [v[0] for v in m]  # [1, dim]
            # self-attention
            y = F.layer_norm(x, (dim,), eps=eps) * (1 + m[1]) + m[0]
            q = ref_rms_norm(lin(y, pre + "self_attn.q"), P[pre + "self_attn.norm_q.weight"], eps).view(-1, n, d)
            k = ref_rms_norm(lin(y, pre + "self_attn.k"), P[pre + "self_attn.norm_k.weight"], eps).view(-1, n, d)
            v = lin(y, pre + "self_attn.v").view(-1, n, d)
            y = lin(ref_attention(ref_rope_apply_one(q, grid, freqs), ref_rope_apply_one(k, grid, freqs), v), pre + "self_attn.o")
            x = x + y * m[2]
            # cross-attention
            y = F.layer_norm(x, (dim,), P[pre + "norm3.weight"], P[pre + "norm3.bias"], eps=eps)
            q = ref_rms_norm(lin(y, pre + "cross_attn.q"), P[pre + "cross_attn.norm_q.weight"], eps).view(-1, n, d)
            k = ref_rms_norm(lin(c, pre + "cross_attn.k"), P[pre + "cross_attn.norm_k.weight"], eps).view(-1, n, d)
            v = lin(c, pre + "cross_attn.v").view(-1, n, d)
            x = x + lin(ref_attention(q, k, v), pre + "cross_attn.o")
            # ffn
            y = F.layer_norm(x, (dim,), eps=eps) * (1 + m[4]) + m[3]
            y = lin(F.gelu(lin(y, pre + "ffn.0"), approximate="tanh"), pre + "ffn.2")
            x = x + y * m[5]
        hm = (P["head.modulation"] + e[i].view(1, 1, dim)).chunk(2, dim=1)
        x = lin(F.layer_norm(x, (dim,), eps=eps) * (1 + hm[1][0]) + hm[0][0], "head.head")
        # unpatchify
        x = x.view(*grid, *cfg.patch_size, cfg.out_dim)
        x = torch.einsum("fhwpqrc->cfphqwr", x)
        outs.append(x.reshape(cfg.out_dim, *[g * p for g, p in zip(grid, cfg.patch_size)]))
    return outs


def randomize_all(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values for every parameter, incl. the zero-initialised head and the modulations."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * r if "norm" in name else 0.15 * r)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


CASES = {
    # name: (config, x shape without batch, context lengths, timesteps)
    "tiny video, non-square": (get_config("tiny"), (16, 3, 4, 6), (5, 16), (999.0, 250.5)),
    "head_dim 24, image, tall": (WanConfig(dim=96, ffn_dim=160, num_heads=4, num_layers=2, text_dim=24, text_len=7),
                                 (16, 1, 6, 2), (7, 2), (0.0, 731.0)),
    "head_dim 128 (44/42/42 rope)": (get_config("tiny-comfy", num_layers=1, text_dim=40, text_len=6),
                                     (16, 2, 2, 4), (3, 6), (500.0, 1000.0)),
    "in 4 / out 8 channels, patch 2x2x2": (WanConfig(dim=64, ffn_dim=96, num_heads=2, num_layers=2, in_dim=4, out_dim=8,
                                                      text_dim=16, text_len=4, patch_size=(2, 2, 2)),
                                           (4, 4, 2, 6), (4, 1), (10.0, 900.0)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_independent_reference(case):
    cfg, shape, ctx_lens, ts = CASES[case]
    model = WanModel(cfg)
    P = randomize_all(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(len(ctx_lens), *shape, generator=g)
    t = torch.tensor(ts)
    ctx_list = [torch.randn(n, cfg.text_dim, generator=g) for n in ctx_lens]
    ctx = torch.stack([F.pad(c, (0, 0, 0, max(ctx_lens) - c.shape[0])) for c in ctx_list])  # zero rows = padding
    with torch.no_grad():
        ours = model(x, t, ctx)
        ref = torch.stack(ref_forward(P, cfg, list(x), t, ctx_list))
    assert ours.shape == x.shape[:1] + (cfg.out_dim,) + x.shape[2:] and ours.dtype == torch.float32
    assert ref.abs().mean() > 0.05  # the comparison is not between two near-zero tensors
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_reference_detects_a_rope_axis_swap():
    """The reference is sensitive to the RoPE layout: swapping H and W of the input changes the output."""
    cfg, shape, ctx_lens, ts = CASES["tiny video, non-square"]
    model = WanModel(cfg)
    P = randomize_all(model)
    x = torch.randn(1, 16, 2, 4, 4)
    ctx = [torch.randn(3, cfg.text_dim)]
    with torch.no_grad():
        a = ref_forward(P, cfg, [x[0]], torch.tensor([300.0]), ctx)[0]
        b = ref_forward(P, cfg, [x[0].transpose(-1, -2)], torch.tensor([300.0]), ctx)[0].transpose(-1, -2)
        ours = model(x, torch.tensor([300.0]), ctx[0][None])[0]
    assert (a - b).abs().max() > 1e-3
    torch.testing.assert_close(ours, a, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# (c) against the public Wan2.1 code (WAN21_REPO=/path/to/Wan2.1 checkout)
# ----------------------------------------------------------------------------------------------


def _sdpa_flash_attention(q, k, v, q_lens=None, k_lens=None, dropout_p=0.0, softmax_scale=None, q_scale=None,
                          causal=False, window_size=(-1, -1), deterministic=False, dtype=None, version=None):
    """Stand-in for Wan's flash_attention: fp32 SDPA with the same key-padding semantics (k_lens)."""
    mask = None
    if k_lens is not None:
        mask = (torch.arange(k.shape[1])[None, :] < k_lens[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2).float(), k.transpose(1, 2).float(), v.transpose(1, 2).float(), attn_mask=mask, scale=softmax_scale
    )
    return out.transpose(1, 2).type_as(q)


def _load_public_wan(repo: Path, monkeypatch) -> types.ModuleType:
    """Import wan/modules/model.py alone, with diffusers and flash_attention stubbed out."""
    diffusers = types.ModuleType("diffusers")
    cfg_utils = types.ModuleType("diffusers.configuration_utils")
    cfg_utils.ConfigMixin = object
    cfg_utils.register_to_config = lambda fn: fn
    models = types.ModuleType("diffusers.models")
    modeling = types.ModuleType("diffusers.models.modeling_utils")
    modeling.ModelMixin = torch.nn.Module
    pkg = types.ModuleType("wan21_public")
    pkg.__path__ = []
    attention = types.ModuleType("wan21_public.attention")
    attention.flash_attention = _sdpa_flash_attention
    for name, mod in [("diffusers", diffusers), ("diffusers.configuration_utils", cfg_utils),
                      ("diffusers.models", models), ("diffusers.models.modeling_utils", modeling),
                      ("wan21_public", pkg), ("wan21_public.attention", attention)]:
        monkeypatch.setitem(sys.modules, name, mod)
    spec = importlib.util.spec_from_file_location("wan21_public.model", repo / "wan" / "modules" / "model.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "wan21_public.model", module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not os.environ.get("WAN21_REPO"), reason="set WAN21_REPO to a Wan-Video/Wan2.1 checkout")
@pytest.mark.parametrize("case", ["tiny video, non-square", "head_dim 128 (44/42/42 rope)"])
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_matches_public_wan21_code(case, monkeypatch):
    repo = Path(os.environ["WAN21_REPO"])
    public = _load_public_wan(repo, monkeypatch)
    cfg, shape, ctx_lens, ts = CASES[case]
    theirs = public.WanModel(
        model_type="t2v", patch_size=cfg.patch_size, text_len=cfg.text_len, in_dim=cfg.in_dim, dim=cfg.dim,
        ffn_dim=cfg.ffn_dim, freq_dim=cfg.freq_dim, text_dim=cfg.text_dim, out_dim=cfg.out_dim,
        num_heads=cfg.num_heads, num_layers=cfg.num_layers, qk_norm=cfg.qk_norm,
        cross_attn_norm=cfg.cross_attn_norm, eps=cfg.eps,
    )
    ours = WanModel(cfg)
    theirs.load_state_dict(randomize_all(ours), strict=True)  # identical key sets and shapes
    g = torch.Generator().manual_seed(2)
    x = torch.randn(len(ctx_lens), *shape, generator=g)
    t = torch.tensor(ts)
    ctx_list = [torch.randn(n, cfg.text_dim, generator=g) for n in ctx_lens]
    ctx = torch.stack([F.pad(c, (0, 0, 0, max(ctx_lens) - c.shape[0])) for c in ctx_list])
    tokens = math.prod(s // p for s, p in zip(shape[1:], cfg.patch_size))
    with torch.no_grad():
        out = ours(x, t, ctx)
        for seq_len in (tokens, tokens + 5):  # + 5: padded tokens masked out via k_lens
            ref = torch.stack(theirs(list(x), t, ctx_list, seq_len=seq_len))
            assert ref.abs().mean() > 0.05
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# (d) input errors name the problem
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    model = WanModel(get_config("tiny"))
    randomize_all(model)
    return model


def _ok():
    return torch.randn(2, 16, 2, 4, 4), torch.tensor([10.0, 20.0]), torch.randn(2, 3, 32)


@pytest.mark.parametrize(
    "edit,pattern",
    [
        (lambda x, t, c: (x[:, :, 0], t, c), r"rank 5.*\(2, 16, 4, 4\)"),
        (lambda x, t, c: (x[:, :8], t, c), r"8 channels.*in_dim=16"),
        (lambda x, t, c: (x[..., :3, :], t, c), r"size 3 on axis H is not divisible by patch size 2"),
        (lambda x, t, c: (x[..., :3], t, c), r"size 3 on axis W is not divisible by patch size 2"),
        (lambda x, t, c: (x, t, c[..., :31]), r"text_dim=32.*\(2, 3, 31\)"),
        (lambda x, t, c: (x, t, c[:1]), r"context must be \[B=2"),
        (lambda x, t, c: (x, t[:1], c), r"timestep must be \[B=2\], got shape \(1,\)"),
        (lambda x, t, c: (x, t, torch.randn(2, 17, 32)), r"17 tokens, more than text_len=16"),
    ],
)
def test_bad_inputs_are_named(tiny, edit, pattern):
    with pytest.raises(ValueError, match=pattern):
        tiny(*edit(*_ok()))


def test_frame_count_not_divisible_by_temporal_patch():
    model = WanModel(CASES["in 4 / out 8 channels, patch 2x2x2"][0])
    with pytest.raises(ValueError, match=r"size 3 on axis F is not divisible by patch size 2"):
        model(torch.randn(1, 4, 3, 2, 2), torch.tensor([1.0]), torch.randn(1, 2, 16))


def test_non_finite_inputs_with_check_enabled(tiny):
    x, t, c = _ok()
    x[1, 3, 0, 0, 0] = float("nan")
    with torch.no_grad():
        assert torch.isnan(tiny(x, t, c)).any()  # unchecked by default (no host sync)
        tiny.check_inputs_finite = True
        try:
            with pytest.raises(ValueError, match="x contains NaN or Inf"):
                tiny(x, t, c)
            c[0, 0, 0] = float("inf")
            with pytest.raises(ValueError, match="context contains NaN or Inf"):
                tiny(_ok()[0], t, c)
        finally:
            tiny.check_inputs_finite = False


# ----------------------------------------------------------------------------------------------
# (e) feature taps and activation checkpointing
# ----------------------------------------------------------------------------------------------


def test_feature_tap_equals_hidden_states_of_a_full_forward():
    model = WanModel(get_config("tiny", num_layers=4))
    randomize_all(model)
    x, t, c = _ok()
    captured: dict[int, list[torch.Tensor]] = {}
    hooks = [
        blk.register_forward_hook(lambda mod, args, out, i=i: captured.setdefault(i, []).append(out))
        for i, blk in enumerate(model.blocks)
    ]
    try:
        with torch.no_grad():
            model(x, t, c)
            full = {i: v[0] for i, v in captured.items()}
            captured.clear()
            feats = model.forward_features(x, t, c, layers=[2, 0])
    finally:
        for h in hooks:
            h.remove()
    assert sorted(captured) == [0, 1, 2]  # ran only as deep as the deepest tap
    assert len(feats) == 2 and feats[0].shape == (2, 2 * 2 * 2, 64)
    assert torch.equal(feats[0], full[2]) and torch.equal(feats[1], full[0])
    assert not torch.allclose(full[2], full[3])
    for bad in ([], [4], [-1]):
        with pytest.raises(ValueError, match="feature layers"):
            model.forward_features(x, t, c, layers=bad)


def test_flow_adapter_maps_t_to_timestep_1000t():
    model = build_flow_model("tiny")
    randomize_all(model)
    x, _, c = _ok()
    t = torch.tensor([0.25, 0.9])
    with torch.no_grad():
        assert torch.equal(model(x, t, c), WanModel.forward(model, x, t * 1000, c))
        a = model.features(x, t, {"context": c}, [1])[0]
        assert torch.equal(a, model.forward_features(x, t * 1000, c, [1])[0])
    assert model.num_layers == 2 and model.hidden_dim == 64


def test_a_bf16_model_runs_and_tracks_the_fp32_one():
    # Pure bf16 weights (GPU inference, FSDP's bf16 params): the fp32 norms must cast their affine
    # weights too, or layer_norm meets an fp32 input with a bf16 weight and raises.
    model = WanModel(get_config("tiny"))
    randomize_all(model)
    x, t, c = _ok()
    with torch.no_grad():
        ref = model(x, t, c)
        out = copy.deepcopy(model).to(torch.bfloat16)(x.bfloat16(), t, c.bfloat16())
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    err = (out - ref).norm() / ref.norm()
    assert err < 0.05, f"bf16 output strays {err:.3f} (relative) from fp32"


def test_gradient_checkpointing_gives_identical_outputs_and_grads():
    model = WanModel(get_config("tiny", num_layers=3))
    randomize_all(model)
    x, t, c = _ok()
    x.requires_grad_(True)

    block_forward = model.blocks[1].forward
    calls = []

    def counting_forward(*args):  # the real block forward, counted
        calls.append(1)
        return block_forward(*args)

    model.blocks[1].forward = counting_forward

    def run():
        model.zero_grad()
        x.grad = None
        calls.clear()
        saved = [0]

        def pack(t):
            saved[0] += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x, t, c)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        return out.detach(), grads, x.grad.clone(), len(calls), saved[0]

    out0, grads0, xg0, calls0, saved0 = run()
    model.gradient_checkpointing = True
    out1, grads1, xg1, calls1, saved1 = run()
    model.gradient_checkpointing = False
    assert (calls0, calls1) == (1, 2)  # the block really was recomputed in backward
    assert saved1 < saved0 / 3  # and its activations were not kept
    assert torch.equal(out0, out1)
    torch.testing.assert_close(xg1, xg0, rtol=0, atol=0)
    for n in grads0:
        torch.testing.assert_close(grads1[n], grads0[n], rtol=0, atol=0, msg=lambda m, n=n: f"{n}: {m}")
    assert all(g.abs().sum() > 0 for n, g in grads0.items() if n.startswith("blocks.1."))


def test_rope_tables_are_built_once_per_grid_and_match_a_per_position_loop():
    from apt_core.models.wan import rope_axis_dims, rope_cos_sin

    model = WanModel(get_config("tiny"))
    x, t, c = _ok()
    with torch.no_grad():
        model(x, t, c)
        model(x, t, c)
    assert len(model._rope_cache) == 1  # two forwards of one shape: one table
    grid = next(iter(model._rope_cache))[0]
    assert model.rope(grid, x.device)[0] is model._rope_cache[(grid, str(x.device))][0]  # served, not rebuilt
    model.rope((2, 3, 5), x.device)
    assert len(model._rope_cache) == 2
    # the vectorised table equals the per-position definition: angle = pos_axis * theta^(-2i / axis_dim)
    head_dim, (f, h, w) = 12, (2, 3, 5)
    cos, sin = rope_cos_sin((f, h, w), head_dim, torch.device("cpu"))
    dims = rope_axis_dims(head_dim)
    for index, (pf, ph, pw) in enumerate((a, b, d) for a in range(f) for b in range(h) for d in range(w)):
        angles = [pos / 10000.0 ** (2 * i / dim) for pos, dim in zip((pf, ph, pw), dims) for i in range(dim // 2)]
        expected = torch.tensor(angles, dtype=torch.float64)
        torch.testing.assert_close(cos[index], expected.cos().float())
        torch.testing.assert_close(sin[index], expected.sin().float())
