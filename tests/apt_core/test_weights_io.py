"""Weights I/O: real safetensors files, strict checks with useful messages, atomic writes, meta loads."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from apt_core.backbone import WanFlowModel, build_flow_model
from apt_core.models.io import (
    CONFIG_METADATA_KEY,
    WeightsMismatchError,
    infer_wan_config,
    load_into,
    load_state_dict_file,
    load_wan,
    read_metadata,
    save_state_dict_file,
    save_wan,
    strip_prefix,
)
from apt_core.models.wan import WanConfig, build_wan, get_config


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (incl. the zero-initialised head) so outputs depend on all weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _inputs(cfg: WanConfig, b: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cfg.in_dim, 2, 4, 6, generator=g)
    t = torch.rand(b, generator=g)
    ctx = torch.randn(b, 5, cfg.text_dim, generator=g)
    return x, t, ctx


@pytest.fixture
def tiny():
    return _randomize(build_flow_model("tiny"))


def test_round_trip_is_bit_exact(tmp_path, tiny):
    path = save_wan(tiny, tmp_path / "m.safetensors")
    meta = read_metadata(path)
    assert json.loads(meta[CONFIG_METADATA_KEY]) == tiny.config.to_dict()
    loaded = load_wan(path)
    assert isinstance(loaded, WanFlowModel) and loaded.config == tiny.config
    x, t, ctx = _inputs(tiny.config)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, ctx), tiny(x, t, ctx))
    for (k1, a), (k2, b) in zip(tiny.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(a, b)


def test_meta_load_adopts_file_tensors(tmp_path, tiny):
    path = save_wan(tiny, tmp_path / "m.safetensors")
    model = load_wan(path, dtype=torch.float64)
    params = list(model.named_parameters())
    assert params and not any(p.is_meta for _, p in params)
    assert all(p.dtype == torch.float64 and p.requires_grad and isinstance(p, torch.nn.Parameter) for _, p in params)
    assert torch.equal(model.head.head.weight, tiny.head.head.weight.double())
    # loading through load_into on a meta-built model adopts (assign) rather than copying
    sd = load_state_dict_file(path)
    with torch.device("meta"):
        meta_model = WanFlowModel(tiny.config)
    load_into(meta_model, sd)
    assert meta_model.blocks[0].ffn[0].weight.data_ptr() == sd["blocks.0.ffn.0.weight"].data_ptr()


def test_meta_load_large_config_allocates_nothing_until_load():
    model = build_wan("wan2.1-t2v-14b", device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 14_288_491_584  # "14.289 B" in the docs


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "diffusion_model."])
def test_prefixed_keys_load(tmp_path, tiny, prefix):
    sd = {prefix + k: v for k, v in tiny.state_dict().items()}
    sd["first_stage_model.decoder.conv.weight"] = torch.zeros(3)  # bundled VAE keys are ignored
    path = save_state_dict_file(sd, tmp_path / "p.safetensors", config=tiny.config)
    assert set(load_state_dict_file(path)) == set(tiny.state_dict())
    loaded = load_wan(path)
    x, t, ctx = _inputs(tiny.config)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, ctx), tiny(x, t, ctx))


def test_without_metadata_config_is_inferred(tmp_path):
    cfg = get_config("tiny-comfy", num_layers=3, text_dim=48, ffn_dim=192)
    model = _randomize(build_flow_model(cfg))
    path = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))  # no apt metadata
    assert CONFIG_METADATA_KEY not in read_metadata(path)
    loaded = load_wan(path, text_len=cfg.text_len)
    assert loaded.config == cfg
    # head_dim != 128 cannot be inferred: the error says what to pass
    small = build_flow_model("tiny")
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, str(tmp_path / "t.safetensors"))
    with pytest.raises(ValueError, match=r"dim 64 .*num_heads"):
        load_wan(tmp_path / "t.safetensors")
    loaded = load_wan(tmp_path / "t.safetensors", num_heads=2, text_len=16)
    assert loaded.config == small.config


def test_infer_wan_config_real_sizes():
    for name in ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b"):
        sd = build_wan(name, device="meta").state_dict()
        assert infer_wan_config(sd) == get_config(name)
        assert infer_wan_config({"model.diffusion_model." + k: v for k, v in sd.items()}) == get_config(name)
    sd = build_wan(get_config("wan2.1-t2v-1.3b", in_dim=36, out_dim=16, text_dim=2048), device="meta").state_dict()
    cfg = infer_wan_config(sd)
    assert (cfg.in_dim, cfg.out_dim, cfg.text_dim) == (36, 16, 2048)
    with pytest.raises(KeyError, match="head.modulation"):
        infer_wan_config({"foo.weight": torch.zeros(1)})
    sd["img_emb.proj.0.bias"] = torch.zeros(1)
    assert infer_wan_config(sd).model_type == "i2v"  # an I2V file (CLIP image embedding) is read as one
    sd["img_emb.emb_pos"] = torch.zeros(1)
    with pytest.raises(ValueError, match="FLF2V"):
        infer_wan_config(sd)


def _mismatch(tmp_path, tiny, edit) -> str:
    sd = dict(tiny.state_dict())
    edit(sd)
    path = save_state_dict_file(sd, tmp_path / "bad.safetensors", config=tiny.config)
    with pytest.raises(WeightsMismatchError) as info:
        load_wan(path)
    msg = str(info.value)
    assert str(path) in msg
    return msg


def test_missing_key_is_reported(tmp_path, tiny):
    def edit(sd):
        del sd["blocks.1.self_attn.q.weight"]
        del sd["head.modulation"]

    msg = _mismatch(tmp_path, tiny, edit)
    assert "2 missing key(s)" in msg and "blocks.1.self_attn.q.weight" in msg and "head.modulation" in msg


def test_unexpected_key_is_reported(tmp_path, tiny):
    msg = _mismatch(tmp_path, tiny, lambda sd: sd.update({"blocks.9.extra.weight": torch.zeros(2)}))
    assert "1 unexpected key(s)" in msg and "blocks.9.extra.weight" in msg and "missing key" not in msg


def test_shape_mismatch_is_reported(tmp_path, tiny):
    msg = _mismatch(tmp_path, tiny, lambda sd: sd.update({"blocks.0.ffn.0.weight": torch.zeros(100, 64)}))
    assert "1 shape mismatch(es)" in msg and "blocks.0.ffn.0.weight: file [100, 64] vs model [128, 64]" in msg


def test_many_missing_keys_are_counted_and_truncated(tiny):
    model = build_flow_model(get_config("tiny", num_layers=4))
    with pytest.raises(WeightsMismatchError) as info:
        load_into(model, tiny.state_dict())
    n = len([k for k in model.state_dict() if k.startswith(("blocks.2.", "blocks.3."))])
    assert f"{n} missing key(s)" in str(info.value) and len(info.value.missing) == n
    assert str(info.value).count("blocks.") <= 5


def test_non_strict_allows_extra_but_not_shape_mismatch(tiny):
    model = build_flow_model("tiny")
    sd = dict(tiny.state_dict(), **{"extra.weight": torch.zeros(1)})
    load_into(model, sd, strict=False)
    assert torch.equal(model.patch_embedding.weight, tiny.patch_embedding.weight)
    sd["head.head.bias"] = torch.zeros(7)
    with pytest.raises(WeightsMismatchError, match="head.head.bias: file \\[7\\]"):
        load_into(model, sd, strict=False)


def test_no_overwrite_without_flag(tmp_path, tiny):
    path = save_wan(tiny, tmp_path / "m.safetensors")
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_wan(build_flow_model("tiny"), path)
    assert path.read_bytes() == before
    save_wan(build_flow_model("tiny"), path, overwrite=True)
    assert path.read_bytes() != before


def test_failed_write_leaves_old_file_and_no_temp(tmp_path, tiny):
    path = save_wan(tiny, tmp_path / "m.safetensors")
    before = path.read_bytes()
    bad = dict(tiny.state_dict(), broken=torch.empty(3, device="meta"))  # cannot be serialised
    with pytest.raises(Exception):  # noqa: B017 (whatever torch/safetensors raise)
        save_state_dict_file(bad, path, overwrite=True)
    bad = dict(tiny.state_dict(), broken=[1, 2])
    with pytest.raises(TypeError, match="broken"):
        save_state_dict_file(bad, path, overwrite=True)
    with pytest.raises(TypeError, match="metadata"):
        save_state_dict_file(tiny.state_dict(), path, metadata={"step": 3}, overwrite=True)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_failure_after_temp_file_was_written_cleans_up(tmp_path, tiny):
    # the target is a non-empty directory: the temp file is fully written, then os.replace fails
    target = tmp_path / "d.safetensors"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    with pytest.raises(OSError):
        save_state_dict_file(tiny.state_dict(), target, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.safetensors"]
    assert (target / "keep.txt").read_text() == "x"


def test_shared_and_view_tensors_are_saved(tmp_path):
    base = torch.arange(12.0)
    sd = {"a": base, "b": base[:6].view(2, 3), "c": base}
    path = save_state_dict_file(sd, tmp_path / "v.safetensors")
    back = load_file(str(path))
    assert torch.equal(back["b"], torch.arange(6.0).view(2, 3)) and torch.equal(back["c"], base)


def test_only_safetensors(tmp_path):
    p = tmp_path / "m.pt"
    torch.save({"a": torch.zeros(1)}, p)
    with pytest.raises(ValueError, match="only .safetensors"):
        load_state_dict_file(p)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_wan(tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match=".safetensors"):
        save_state_dict_file({"a": torch.zeros(1)}, tmp_path / "x.bin")


def test_strip_prefix_variants():
    t = torch.zeros(1)
    assert set(strip_prefix({"model.diffusion_model.a": t, "vae.b": t})) == {"a"}
    assert set(strip_prefix({"diffusion_model.a": t})) == {"a"}
    assert set(strip_prefix({"a": t, "b": t})) == {"a", "b"}
    assert math.prod((1, 2, 2)) == 4


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_written_files_get_the_mode_open_would_give(tmp_path, tiny, umask, mode):
    """Exports, shards and atomic text files: 0666 minus the umask (safetensors alone writes 0600)."""
    import os
    import stat

    from apt_core.fileio import atomic_write_text
    from apt_core.shards import ShardWriter

    old = os.umask(umask)
    try:
        paths = [save_wan(tiny, tmp_path / "export.safetensors"), atomic_write_text(tmp_path / "notes.txt", "x")]
        with ShardWriter(tmp_path / "shards", {"space": "latent"}) as w:
            w.add(torch.zeros(16, 1, 2, 2), torch.zeros(3, 8), "a caption")
        paths += [*w.files, tmp_path / "shards/dataset-00000.json"]
        assert os.umask(umask) == umask  # reading the umask left it as it was
    finally:
        os.umask(old)
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in paths} == {p.name: oct(mode) for p in paths}
