"""Model families: the registry (presets, detection from a state dict, ComfyUI mapping) and the
Wan 2.2 TI2V-5B family on a tiny 48-channel stand-in (public key names and shapes, save/load,
one-step sampling)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from apt_core.backbone import WanCond, build_flow_model
from apt_core.flow import generate_one_step
from apt_core.models import get_config
from apt_core.models.io import infer_wan_config, load_wan, save_wan
from apt_core.models.registry import (
    FAMILY_MODULES,
    comfy_family,
    detect_family,
    families,
    family_for_latent_channels,
    family_of_preset,
    get_family,
)
from apt_core.models.wan import WanModel
from tests.apt_core.test_wan import _load_public_wan, randomize_all


def test_every_family_file_registers_once_and_owns_its_presets():
    fams = families()
    assert len(fams) == len(FAMILY_MODULES) and {"wan2.1-t2v", "wan2.2-ti2v"} <= set(fams)
    for fam in fams.values():
        for name, cfg in fam.presets.items():
            assert family_of_preset(name) is fam and get_config(name) == cfg
            assert fam.matches_config(cfg), f"{name}: latent channels {cfg.in_dim}/{cfg.out_dim} vs {fam.latent_channels}"
    with pytest.raises(KeyError, match="registered"):
        get_family("wan9")
    with pytest.raises(KeyError, match="wan2.2-ti2v-5b"):  # the message lists every family's presets
        get_config("nope")


def test_ti2v_5b_preset_is_the_public_config():
    # Wan-Video/Wan2.2 wan/configs/wan_ti2v_5B.py: dim 3072, ffn 14336, 24 heads, 30 layers, patch (1,2,2)
    cfg = get_config("wan2.2-ti2v-5b")
    assert (cfg.dim, cfg.ffn_dim, cfg.num_heads, cfg.num_layers) == (3072, 14336, 24, 30)
    assert (cfg.in_dim, cfg.out_dim, cfg.patch_size, cfg.text_dim, cfg.text_len, cfg.freq_dim) == (48, 48, (1, 2, 2), 4096, 512, 256)
    fam = get_family("wan2.2-ti2v")
    assert fam.vae_stride == (4, 16, 16) and fam.sample_shift == 5.0 and fam.latent_channels == 48
    model = build_flow_model("wan2.2-ti2v-5b", device="meta")
    n = sum(p.numel() for p in model.parameters())
    assert 4.9e9 < n < 5.1e9, n  # "5B"
    sd = model.state_dict()
    assert tuple(sd["patch_embedding.weight"].shape) == (3072, 48, 1, 2, 2)
    assert tuple(sd["head.head.weight"].shape) == (48 * 4, 3072)
    assert {k.split(".")[1] for k in sd if k.startswith("blocks.")} == {str(i) for i in range(30)}


def test_ti2v_stand_in_has_the_public_key_names_of_wan():
    # the 5B's public keys are the Wan 2.1 T2V keys (no img_emb, no extra layers): same names, 48 channels
    t2v = build_flow_model("tiny", device="meta").state_dict()
    ti2v = build_flow_model("tiny-ti2v", device="meta").state_dict()
    assert set(ti2v) == set(t2v)
    for k in ti2v:
        if k not in ("patch_embedding.weight", "head.head.weight", "head.head.bias"):
            assert ti2v[k].shape == t2v[k].shape, k
    assert tuple(ti2v["patch_embedding.weight"].shape) == (64, 48, 1, 2, 2)
    assert tuple(ti2v["head.head.weight"].shape) == (4 * 48, 64)


def test_detection_from_weights_and_from_comfyui(tmp_path):
    torch.manual_seed(0)
    five = build_flow_model("tiny-comfy-ti2v")
    path = tmp_path / "ti2v.safetensors"
    sd = {f"model.diffusion_model.{k}": v for k, v in five.state_dict().items()}  # ComfyUI-style prefix
    from apt_core.models.io import save_state_dict_file

    save_state_dict_file(sd, path)  # no config metadata: the family and config come from the shapes
    assert detect_family(sd).name == "wan2.2-ti2v"
    assert detect_family(build_flow_model("tiny", device="meta").state_dict()).name == "wan2.1-t2v"
    assert infer_wan_config(sd) == get_config("tiny-comfy-ti2v")
    loaded = load_wan(path)
    assert loaded.config == get_config("tiny-comfy-ti2v")
    for k, v in five.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)
    # ComfyUI: the 5B is model class WAN22 (supported_models.WAN22_T2V: model_type t2v, out_dim 48)
    assert comfy_family("WAN22", {"image_model": "wan2.1", "model_type": "t2v", "out_dim": 48, "in_dim": 48}).name == "wan2.2-ti2v"
    assert comfy_family("WAN21", {"image_model": "wan2.1", "model_type": "t2v", "in_dim": 16}).name == "wan2.1-t2v"
    assert comfy_family("WAN21", {"image_model": "wan2.1"}).name == "wan2.1-t2v"  # defaults left out by detection
    assert comfy_family("WAN21", {"model_type": "vace", "in_dim": 16}) is None
    assert comfy_family("Flux", {}) is None
    assert family_for_latent_channels(48).name == "wan2.2-ti2v" and family_for_latent_channels(16).name == "wan2.1-t2v"
    assert family_for_latent_channels(4) is None


def test_ti2v_stand_in_one_step_sampling_and_save_load_round_trip(tmp_path):
    torch.manual_seed(1)
    gen = build_flow_model("tiny-ti2v").eval()
    with torch.no_grad():
        gen.head.head.weight.normal_(std=0.02)  # Wan zero-inits the head: make the output depend on the input
    cfg = gen.config
    z = torch.randn(2, 48, 2, 4, 6)
    cond = WanCond(torch.randn(2, 5, cfg.text_dim))
    with torch.no_grad():
        x0 = generate_one_step(gen, z, cond)
    assert x0.shape == z.shape and torch.isfinite(x0).all()
    assert not torch.allclose(x0, z)
    path = save_wan(gen, tmp_path / "g.safetensors")
    again = load_wan(path).eval()
    with torch.no_grad():
        torch.testing.assert_close(generate_one_step(again, z, cond), x0, rtol=0, atol=0)
    with pytest.raises(ValueError, match="in_dim=48"):  # a 16-channel latent is refused, naming both sizes
        gen(torch.randn(1, 16, 1, 4, 4), torch.ones(1), cond.context[:1])


def test_preview_projection_per_family():
    # 16- and 48-channel latents get their family's ComfyUI latent->RGB projection
    for channels in (16, 48):
        fam = family_for_latent_channels(channels)
        assert len(fam.latent_rgb) == channels and len(fam.latent_rgb_bias) == 3
        assert all(math.isfinite(v) for row in fam.latent_rgb for v in row)


def test_a14b_experts_follow_the_public_boundary():
    # Wan-Video/Wan2.2 wan/configs/wan_t2v_A14B.py: boundary 0.875; text2video.py: t >= boundary -> high-noise expert
    fam = get_family("wan2.2-t2v-a14b")
    cfg = get_config("wan2.2-t2v-a14b")
    assert (cfg.dim, cfg.ffn_dim, cfg.num_heads, cfg.num_layers, cfg.in_dim) == (5120, 13824, 40, 40, 16)
    assert fam.sample_shift == 12.0 and [e.name for e in fam.experts] == ["high_noise", "low_noise"]
    assert fam.expert_for(1.0).name == "high_noise" and fam.expert_for(0.875).name == "high_noise"
    assert fam.expert_for(0.87).name == "low_noise" and fam.expert_for(0.0).name == "low_noise"
    assert fam.expert(fam.generator_expert).covers(1.0)  # the one-step generator starts from pure noise, t = 1
    assert fam.generator_expert == fam.discriminator_expert == "high_noise"
    files = {"high_noise": "h.safetensors", "low_noise": "l.safetensors"}
    assert fam.expert_inits(files) == ("h.safetensors", "h.safetensors")
    assert fam.expert_inits(files, discriminator="low_noise") == ("h.safetensors", "l.safetensors")
    with pytest.raises(ValueError, match="missing: \\['low_noise'\\]"):
        fam.expert_inits({"high_noise": "h.safetensors"})
    # one expert file has a 14B T2V file's shapes: detected as Wan 2.1 T2V, as ComfyUI loads it (WAN21)
    assert detect_family(build_flow_model("tiny-a14b", device="meta").state_dict()).name == "wan2.1-t2v"


@pytest.mark.skipif(not os.environ.get("WAN22_REPO"), reason="set WAN22_REPO to a Wan-Video/Wan2.2 checkout")
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_ti2v_matches_public_wan22_code(monkeypatch):
    # Wan 2.2 embeds the timestep per token; with one t per clip (text-to-video, every APT pass) it equals ours
    public = _load_public_wan(Path(os.environ["WAN22_REPO"]), monkeypatch)
    cfg = get_config("tiny-ti2v")
    theirs = public.WanModel(model_type="ti2v", patch_size=cfg.patch_size, text_len=cfg.text_len, in_dim=cfg.in_dim, dim=cfg.dim,
                             ffn_dim=cfg.ffn_dim, freq_dim=cfg.freq_dim, text_dim=cfg.text_dim, out_dim=cfg.out_dim,
                             num_heads=cfg.num_heads, num_layers=cfg.num_layers, qk_norm=cfg.qk_norm,
                             cross_attn_norm=cfg.cross_attn_norm, eps=cfg.eps)
    ours = WanModel(cfg)
    theirs.load_state_dict(randomize_all(ours), strict=True)  # identical key sets and shapes
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 48, 2, 4, 6, generator=g)
    t = torch.tensor([999.0, 250.0])
    ctx_list = [torch.randn(n, cfg.text_dim, generator=g) for n in (7, 4)]
    ctx = torch.stack([F.pad(c, (0, 0, 0, 7 - c.shape[0])) for c in ctx_list])
    with torch.no_grad():
        out = ours(x, t, ctx)
        # per-token timesteps [B, seq_len], as the public TI2V pipeline passes them
        ref = torch.stack(theirs(list(x), t[:, None].expand(-1, 2 * 2 * 3), ctx_list, seq_len=2 * 2 * 3))
    assert ref.abs().mean() > 0.05
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
