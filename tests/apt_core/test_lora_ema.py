"""LoRA injection / ComfyUI-native export / merge, and the EMA (incl. FSDP2 DTensor parameters)."""

import copy

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from apt_core.backbone import build_flow_model
from apt_core.ema import EMA
from apt_core.lora import (
    DEFAULT_TARGETS,
    LoRALinear,
    base_state_dict,
    inject_lora,
    load_lora_state_dict,
    lora_parameters,
    lora_state_dict,
    merge_lora,
)
from apt_core.models.io import save_state_dict_file
from apt_core.models.wan import build_wan


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _model(seed: int = 0):
    return _randomize(build_flow_model("tiny"), seed)


def _inputs(b: int = 2):
    g = torch.Generator().manual_seed(5)
    return torch.randn(b, 16, 2, 4, 4, generator=g), torch.rand(b, generator=g), torch.randn(b, 3, 32, generator=g)


def _randomize_lora(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_lora_linear_is_a_linear_with_peft_init():
    lin = nn.Linear(12, 20)
    lora = LoRALinear.from_linear(lin, rank=4, alpha=8)
    assert isinstance(lora, nn.Linear) and lora.weight is lin.weight and lora.bias is lin.bias
    assert lora.lora_down.weight.shape == (4, 12) and lora.lora_up.weight.shape == (20, 4)
    assert torch.count_nonzero(lora.lora_up.weight) == 0 and lora.lora_down.weight.std() > 0
    assert lora.scale == 2.0
    bound = (1 / 12) ** 0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 12
    assert lora.lora_down.weight.abs().max() <= bound
    assert set(dict(lora.named_parameters())) == {"weight", "bias", "lora_down.weight", "lora_up.weight"}
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(3, 3, rank=0)


def test_export_keys_are_comfy_native_and_name_wan_modules():
    model = build_wan("wan2.1-t2v-1.3b", device="meta")
    paths = inject_lora(model, rank=8, alpha=4)
    assert len(paths) == 30 * 10
    sd = lora_state_dict(model)
    assert sd["diffusion_model.blocks.0.self_attn.q.lora_up.weight"].shape == (1536, 8)
    assert sd["diffusion_model.blocks.0.self_attn.q.lora_down.weight"].shape == (8, 1536)
    assert sd["diffusion_model.blocks.29.ffn.0.lora_down.weight"].shape == (8, 1536)
    assert sd["diffusion_model.blocks.29.ffn.2.lora_up.weight"].shape == (1536, 8)
    alpha = sd["diffusion_model.blocks.0.cross_attn.o.alpha"]
    assert alpha.ndim == 0 and alpha.item() == 4.0
    wan_keys = set(build_wan("wan2.1-t2v-1.3b", device="meta").state_dict())
    assert set(base_state_dict(model)) == wan_keys
    for key in sd:
        assert key.startswith("diffusion_model.")
        path = key[len("diffusion_model.") :].rsplit(".lora_", 1)[0].removesuffix(".alpha")
        assert f"{path}.weight" in wan_keys, key
        assert path.endswith(DEFAULT_TARGETS)
    assert len(sd) == 3 * 300


def test_fresh_adapter_changes_nothing_and_freezes_base():
    model = _model()
    x, t, ctx = _inputs()
    with torch.no_grad():
        before = model(x, t, ctx)
    inject_lora(model, rank=4)
    with torch.no_grad():
        assert torch.equal(model(x, t, ctx), before)
    with pytest.raises(ValueError, match="already have LoRA adapters"):
        inject_lora(model, rank=4)
    with pytest.raises(ValueError, match="no nn.Linear module path ends with one of the LoRA targets"):
        inject_lora(_model(), rank=4, targets=("nope",))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_down." in n or ".lora_up." in n for n in trainable)
    model(x, t, ctx).square().mean().backward()
    for n, p in model.named_parameters():
        if ".lora_" in n:
            assert p.grad is not None
        else:
            assert p.grad is None, n
    ups = [m.lora_up.weight.grad for m in model.modules() if isinstance(m, LoRALinear)]
    assert all(g.abs().sum() > 0 for g in ups)


def test_training_the_adapter_changes_the_output():
    model = _model()
    inject_lora(model, rank=2)
    x, t, ctx = _inputs()
    with torch.no_grad():
        before = model(x, t, ctx)
    opt = torch.optim.SGD(lora_parameters(model), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(x, t, ctx).square().mean().backward()
        opt.step()
    with torch.no_grad():
        assert not torch.allclose(model(x, t, ctx), before)


def test_merge_equals_unmerged_forward():
    model = _model()
    inject_lora(model, rank=3, alpha=1.5)
    _randomize_lora(model)
    x, t, ctx = _inputs()
    with torch.no_grad():
        unmerged = model(x, t, ctx)
    m = model.blocks[0].self_attn.q
    expected_w = m.weight + 0.5 * m.lora_up.weight @ m.lora_down.weight
    merged = merge_lora(model)
    assert len(merged) == 20 and not any(isinstance(mod, LoRALinear) for mod in model.modules())
    assert type(model.blocks[0].self_attn.q) is nn.Linear
    torch.testing.assert_close(model.blocks[0].self_attn.q.weight, expected_w, rtol=0, atol=1e-6)
    assert set(model.state_dict()) == set(build_flow_model("tiny").state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, ctx), unmerged, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(unmerged, _model()(x, t, ctx), atol=1e-3)  # the adapter mattered


@pytest.mark.parametrize("prefix", ["diffusion_model.", "model.diffusion_model.", ""])
def test_load_round_trip_through_a_file(tmp_path, prefix):
    model = _model()
    inject_lora(model, rank=4, alpha=2)
    _randomize_lora(model)
    sd = {prefix + k.removeprefix("diffusion_model."): v for k, v in lora_state_dict(model).items()}
    path = save_state_dict_file(sd, tmp_path / "lora.safetensors")
    fresh = _model()  # same base weights, no adapters yet
    loaded = load_lora_state_dict(fresh, load_file(str(path)))
    assert len(loaded) == 20
    x, t, ctx = _inputs()
    with torch.no_grad():
        assert torch.equal(fresh(x, t, ctx), model(x, t, ctx))
    assert lora_state_dict(fresh).keys() == lora_state_dict(model).keys()
    # loading into an already injected model of another rank replaces the adapter
    other = _model()
    inject_lora(other, rank=1)
    load_lora_state_dict(other, sd)
    assert other.blocks[1].ffn[2].rank == 4 and other.blocks[1].ffn[2].alpha == 2.0


def test_load_errors_name_the_keys():
    model = _model()
    inject_lora(model, rank=2)
    sd = lora_state_dict(model)
    bad = dict(sd, **{"diffusion_model.blocks.7.self_attn.q.lora_up.weight": torch.zeros(64, 2)})
    with pytest.raises(ValueError, match=r"1 LoRA module path\(s\) name no module.*blocks\.7\.self_attn\.q"):
        load_lora_state_dict(_model(), bad)
    bad = dict(sd, **{"diffusion_model.blocks.0.ffn.0.lora_down.weight": torch.zeros(2, 65)})
    with pytest.raises(ValueError, match=r"blocks\.0\.ffn\.0.*\[2, 65\].*expected \[2, 64\]"):
        load_lora_state_dict(_model(), bad)
    with pytest.raises(ValueError, match=r"unsupported kind.*blocks\.0\.ffn\.0\.diff"):
        load_lora_state_dict(_model(), dict(sd, **{"diffusion_model.blocks.0.ffn.0.diff": torch.zeros(1)}))
    with pytest.raises(ValueError, match="not an nn.Linear"):
        load_lora_state_dict(_model(), {"diffusion_model.blocks.0.norm3.lora_up.weight": torch.zeros(64, 2),
                                         "diffusion_model.blocks.0.norm3.lora_down.weight": torch.zeros(2, 64)})


def test_missing_alpha_means_scale_one_and_wrappers_are_invisible():
    model = _model()
    inject_lora(model, rank=4, alpha=4)
    _randomize_lora(model)
    sd = {k: v for k, v in lora_state_dict(model).items() if not k.endswith(".alpha")}
    fresh = _model()
    load_lora_state_dict(fresh, sd)
    assert fresh.blocks[0].self_attn.k.scale == 1.0
    compiled = torch.compile(model)  # adds `_orig_mod.` to every name; never called here
    assert lora_state_dict(compiled).keys() == lora_state_dict(model).keys()
    assert set(base_state_dict(compiled)) == set(build_flow_model("tiny").state_dict())


# ----------------------------------------------------------------------------------------------
# EMA
# ----------------------------------------------------------------------------------------------


def _step(model: nn.Module, k: int) -> None:
    g = torch.Generator().manual_seed(100 + k)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # a DTensor of a 1-process mesh holds the whole tensor locally
                local = p.to_local() if hasattr(p, "to_local") else p
                local.add_(torch.randn(p.shape, generator=g, dtype=p.dtype))


def test_ema_follows_its_formula():
    model = _model().double()
    ema = EMA(model, decay=0.9, dtype=torch.float64)
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    for k in range(3):
        _step(model, k)
        ema.update(model)
        for n, p in model.named_parameters():
            expected[n] = 0.9 * expected[n] + 0.1 * p.detach()
    assert ema.num_updates == 3
    for n, s in ema.state_dict()["shadow"].items():
        torch.testing.assert_close(s, expected[n], rtol=0, atol=1e-12)
    # bf16 parameters, fp32 shadow (the mul_ + add_ path)
    model = _model().bfloat16()
    ema = EMA(model, decay=0.5)
    assert all(s.dtype == torch.float32 for s in ema.shadow)
    start = {n: p.detach().float() for n, p in model.named_parameters()}
    _step(model, 0)
    ema.update(model)
    for n, p in model.named_parameters():
        torch.testing.assert_close(ema.state_dict()["shadow"][n], 0.5 * start[n] + 0.5 * p.float(), rtol=0, atol=1e-6)


def test_ema_tracks_only_trainable_params_and_copies_back():
    model = _model()
    inject_lora(model, rank=2)
    ema = EMA(model, decay=0.8)
    assert len(ema.names) == 40 and all(".lora_" in n for n in ema.names)
    initial = copy.deepcopy(model.state_dict())
    _step(model, 1)
    trained = copy.deepcopy(model.state_dict())
    ema.update(model)
    x, t, ctx = _inputs()
    with ema.swap_into(model), torch.no_grad():
        in_swap = model(x, t, ctx)
        up = model.blocks[0].self_attn.q.lora_up.weight.clone()
    torch.testing.assert_close(up, 0.2 * trained["blocks.0.self_attn.q.lora_up.weight"], rtol=0, atol=1e-7)
    for k, v in model.state_dict().items():  # restored exactly
        assert torch.equal(v, trained[k]), k
    ema.copy_to(model)
    with torch.no_grad():
        assert torch.equal(model(x, t, ctx), in_swap)
    assert torch.equal(model.blocks[0].ffn[0].weight, initial["blocks.0.ffn.0.weight"])  # frozen base untouched


def test_ema_state_dict_round_trip_and_errors():
    model = _model()
    ema = EMA(model, decay=0.99)
    _step(model, 2)
    ema.update(model)
    other = EMA(_model(seed=3), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.99 and other.num_updates == 1
    assert all(torch.equal(a, b) for a, b in zip(other.shadow, ema.shadow))
    state = ema.state_dict()
    del state["shadow"]["head.modulation"]
    with pytest.raises(KeyError, match="1 missing.*head.modulation"):
        other.load_state_dict(state)
    with pytest.raises(KeyError, match="lacks"):
        ema.update(build_flow_model("tiny", num_layers=1))
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.5)


def test_ema_on_fsdp2_dtensor_params(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        plain = _model()
        sharded = copy.deepcopy(plain)
        for block in sharded.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(sharded, mesh=mesh)
        assert isinstance(sharded.blocks[0].ffn[0].weight, DTensor)
        ema_s, ema_p = EMA(sharded, decay=0.7), EMA(plain, decay=0.7)
        assert all(isinstance(s, DTensor) for s in ema_s.shadow)
        for k in range(2):
            _step(sharded, k)
            _step(plain, k)
            ema_s.update(sharded)
            ema_p.update(plain)
        for n, s, p in zip(ema_s.names, ema_s.shadow, ema_p.shadow):
            assert torch.equal(s.full_tensor(), p), n
        ema_s.copy_to(sharded)
        assert torch.equal(sharded.head.modulation.full_tensor(), ema_p.shadow[ema_p.names.index("head.modulation")])
    finally:
        dist.destroy_process_group()
