"""APTDiscriminator: tap depths, logits, timestep ensemble, trainable sets per mode, compatibility."""

import pytest
import torch

from apt_core.backbone import WanCond, build_flow_model
from apt_core.discriminator import APTDiscriminator, default_head_layers

HEAD_KEYS = ("heads.", "norm_out.", "proj_out.")


def _inputs(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 16, 1, 4, 4, generator=g), WanCond(torch.randn(b, 5, 32, generator=g))


@pytest.fixture(scope="module")
def gen():
    torch.manual_seed(0)
    return build_flow_model("tiny")


def test_default_head_layers_scale_the_papers_taps():
    assert default_head_layers(36) == [15, 25, 35]
    assert default_head_layers(30) == [12, 21, 29]  # Wan 1.3B: 13.3, 21.7, 30 of 30
    assert default_head_layers(40) == [17, 28, 39]  # Wan 14B
    assert default_head_layers(2) == [0, 1]  # 0.9 and 1.4 both round to block 1: deduped
    assert default_head_layers(1) == [0]
    for n in range(1, 61):
        layers = default_head_layers(n)
        assert layers == sorted(set(layers)) and layers[-1] == n - 1 and layers[0] >= 0
    with pytest.raises(ValueError, match="num_layers"):
        default_head_layers(0)


def test_logits_one_per_sample_fp32_and_deterministic_for_clean_inputs(gen):
    D = APTDiscriminator(gen)
    x, c = _inputs(3)
    t = torch.tensor([0.2, 0.5, 0.9])
    out = D(x, c, t)
    assert out.shape == (3,) and out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(D(x, c, t), out, rtol=0, atol=0)  # no noise is added to the input
    assert not torch.allclose(D(x, c, torch.tensor([0.7, 0.1, 0.3])), out)  # t matters
    assert D(x, c).shape == (3,)  # t drawn when not given
    # samples are independent (no batch statistics): needed for the batched R1 pairs
    torch.testing.assert_close(D(x[1:2], WanCond(c.context[1:2]), t[1:2]), out[1:2], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="t must be"):
        D(x, c, torch.zeros(2))


def test_timestep_ensemble_shift():
    torch.manual_seed(0)
    D1 = APTDiscriminator(build_flow_model("tiny"), timestep_shift=1.0)
    D12 = APTDiscriminator(build_flow_model("tiny"), timestep_shift=12.0)
    t1, t12 = D1.sample_t(4000), D12.sample_t(4000)
    assert t1.min() > 0 and t12.max() <= 1
    assert abs(float(t1.mean()) - 0.5) < 0.03
    assert float(t12.mean()) > 0.8  # shift 12 puts most mass near t = 1 (video)
    with pytest.raises(ValueError, match="timestep_shift"):
        APTDiscriminator(build_flow_model("tiny"), timestep_shift=0.0)


def test_backbone_is_a_copy_of_the_generator(gen):
    D = APTDiscriminator(gen)
    gsd = gen.state_dict()
    for k, v in D.backbone.state_dict().items():
        torch.testing.assert_close(v, gsd[k], rtol=0, atol=0)
    with torch.no_grad():
        D.backbone.blocks[0].ffn[0].weight.add_(1.0)
    assert not torch.equal(D.backbone.blocks[0].ffn[0].weight, gen.blocks[0].ffn[0].weight)


def _trainable(D):
    return {n for n, p in D.named_parameters() if p.requires_grad}


def test_full_mode_trains_backbone_except_unused_parts_and_every_trainable_param_gets_a_grad():
    torch.manual_seed(0)
    D = APTDiscriminator(build_flow_model("small"), head_layers=[1, 3])  # blocks 4, 5 and head unused
    names = _trainable(D)
    assert {n for n in names if n.startswith(HEAD_KEYS)} == {n for n, _ in D.named_parameters() if n.startswith(HEAD_KEYS)}
    assert "backbone.blocks.3.ffn.0.weight" in names and "backbone.patch_embedding.weight" in names
    assert not any(n.startswith(("backbone.head.", "backbone.blocks.4.", "backbone.blocks.5.")) for n in names)
    assert set(map(id, D.trainable_parameters())) == {id(p) for p in D.parameters() if p.requires_grad}
    x, c = torch.randn(2, 16, 1, 4, 4), WanCond(torch.randn(2, 5, 256))
    D(x, c, torch.tensor([0.3, 0.8])).sum().backward()
    no_grad = [n for n, p in D.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert no_grad == []
    assert all(p.grad is None for n, p in D.named_parameters() if not p.requires_grad)


def test_frozen_mode_trains_heads_only(gen):
    D = APTDiscriminator(gen, mode="frozen")
    names = _trainable(D)
    assert names and all(n.startswith(HEAD_KEYS) for n in names)
    assert len(names) == len([n for n, _ in D.named_parameters() if n.startswith(HEAD_KEYS)])


def test_lora_mode_trains_adapters_and_heads_only(gen):
    D = APTDiscriminator(gen, mode="lora", lora_rank=4)
    names = _trainable(D)
    lora = {n for n in names if ".lora_down." in n or ".lora_up." in n}
    assert lora and all(n.startswith("backbone.blocks.") for n in lora)
    assert names - lora == {n for n, _ in D.named_parameters() if n.startswith(HEAD_KEYS)}
    assert not any(".lora_" in n for n, _ in gen.named_parameters())  # the generator is untouched
    x, c = _inputs(2)
    assert D(x, c, torch.tensor([0.5, 0.5])).shape == (2,)
    D.check_compatible(gen)  # LoRA adapters do not change the base architecture


def test_check_compatible_names_the_mismatch(gen):
    D = APTDiscriminator(gen)
    D.check_compatible(gen)
    with pytest.raises(ValueError, match="different model.*only in the generator.*blocks.2"):
        D.check_compatible(build_flow_model("tiny", num_layers=3))
    with pytest.raises(ValueError, match=r"different model.*6 shape mismatch.*blocks.0.ffn.0.weight: G \[96, 64\] vs D \[128, 64\]"):
        D.check_compatible(build_flow_model("tiny", ffn_dim=96))


def test_bad_arguments_are_reported(gen):
    with pytest.raises(ValueError, match="mode"):
        APTDiscriminator(gen, mode="half")
    with pytest.raises(ValueError, match=r"head_layers \[0, 2\]"):
        APTDiscriminator(gen, head_layers=[0, 2])
    with pytest.raises(ValueError, match="head_layers"):
        APTDiscriminator(gen, head_layers=[1, 1])


def test_meta_build_in_lora_mode_resets_the_adapters_too(gen):
    """After to_empty (uninitialised memory, here NaN) reset_heads also gives the adapters PEFT's init."""
    D = APTDiscriminator(build_flow_model("tiny", device="meta"), mode="lora", lora_rank=2, copy_backbone=False)
    D.to_empty(device="cpu")
    with torch.no_grad():
        for p in D.parameters():
            p.fill_(float("nan"))
    missing, unexpected = D.backbone.load_state_dict(gen.state_dict(), strict=False)
    assert not unexpected and missing and all(".lora_" in k for k in missing)
    D.reset_heads()
    ups = [p for n, p in D.named_parameters() if ".lora_up." in n]
    assert ups and all(torch.equal(p, torch.zeros_like(p)) for p in ups)
    assert all(torch.isfinite(p).all() for p in D.parameters())
    x, c = _inputs(2)
    ref = APTDiscriminator(gen, mode="frozen")  # zero adapters: the backbone computes what the base weights do
    ref.load_state_dict({k: v for k, v in D.state_dict().items() if ".lora_" not in k})
    t = torch.tensor([0.5, 0.5])
    torch.testing.assert_close(D(x, c, t), ref(x, c, t))


def test_meta_build_then_load_backbone_weights(gen):
    D = APTDiscriminator(build_flow_model("tiny", device="meta"), copy_backbone=False)
    assert all(p.is_meta for p in D.parameters())
    D.to_empty(device="cpu")
    D.backbone.load_state_dict(gen.state_dict())  # same keys as the generator's checkpoint
    D.reset_heads()
    x, c = _inputs(2)
    ref = APTDiscriminator(gen)
    ref.load_state_dict(D.state_dict())
    t = torch.tensor([0.5, 0.5])
    torch.testing.assert_close(D(x, c, t), ref(x, c, t))
    assert torch.isfinite(D(x, c, t)).all()
