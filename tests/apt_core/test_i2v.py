"""Wan 2.1 I2V family: the public key set and shapes (public config), numerics against the public
Wan 2.1 code on random tiny weights (WAN21_REPO), one-step image-to-video generation, and APT
steps with the first frame as the condition."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from apt_core.backbone import WanCond, build_flow_model, cat_cond
from apt_core.discriminator import APTDiscriminator
from apt_core.flow import generate_one_step
from apt_core.models import get_config
from apt_core.models.io import infer_wan_config, load_wan, save_wan
from apt_core.models.registry import comfy_family, detect_family, get_family
from apt_core.models.wan import WanModel
from apt_core.trainer import APTConfig, APTTrainer, make_rmsprop
from tests.apt_core.test_wan import _load_public_wan, randomize_all

FAMILY = get_family("wan2.1-i2v")


def _i2v_cond(b: int, frames: int, h: int, w: int, text_dim: int, seed: int = 0) -> WanCond:
    g = torch.Generator().manual_seed(seed)
    clip, y = FAMILY.image_condition(torch.randn(b, 16, 1, h, w, generator=g), frames, torch.randn(b, 257, 1280, generator=g))
    return WanCond(torch.randn(b, 5, text_dim, generator=g), clip_fea=clip, y=y)


def _public_i2v_keys(cfg) -> dict[str, tuple[int, ...]]:
    """The public I2V state dict's names and shapes, written out from Wan2.1 wan/modules/model.py (model_type 'i2v')."""
    d, f = cfg.dim, cfg.ffn_dim
    keys = {"patch_embedding.weight": (d, cfg.in_dim, *cfg.patch_size), "patch_embedding.bias": (d,),
            "text_embedding.0.weight": (d, cfg.text_dim), "text_embedding.0.bias": (d,), "text_embedding.2.weight": (d, d),
            "text_embedding.2.bias": (d,), "time_embedding.0.weight": (d, cfg.freq_dim), "time_embedding.0.bias": (d,),
            "time_embedding.2.weight": (d, d), "time_embedding.2.bias": (d,), "time_projection.1.weight": (6 * d, d),
            "time_projection.1.bias": (6 * d,), "head.head.weight": (4 * cfg.out_dim, d), "head.head.bias": (4 * cfg.out_dim,),
            "head.modulation": (1, 2, d),
            "img_emb.proj.0.weight": (1280,), "img_emb.proj.0.bias": (1280,), "img_emb.proj.1.weight": (1280, 1280),
            "img_emb.proj.1.bias": (1280,), "img_emb.proj.3.weight": (d, 1280), "img_emb.proj.3.bias": (d,),
            "img_emb.proj.4.weight": (d,), "img_emb.proj.4.bias": (d,)}
    for i in range(cfg.num_layers):
        p = f"blocks.{i}."
        keys[p + "modulation"] = (1, 6, d)
        for attn, names in (("self_attn", "qkvo"), ("cross_attn", ("q", "k", "v", "o", "k_img", "v_img"))):
            for n in names:
                keys[f"{p}{attn}.{n}.weight"], keys[f"{p}{attn}.{n}.bias"] = (d, d), (d,)
            keys[f"{p}{attn}.norm_q.weight"] = keys[f"{p}{attn}.norm_k.weight"] = (d,)
        keys[p + "cross_attn.norm_k_img.weight"] = (d,)
        keys[p + "norm3.weight"] = keys[p + "norm3.bias"] = (d,)
        keys[p + "ffn.0.weight"], keys[p + "ffn.0.bias"], keys[p + "ffn.2.weight"], keys[p + "ffn.2.bias"] = (f, d), (f,), (d, f), (d,)
    return keys


def test_i2v_14b_key_set_and_shapes_are_the_public_ones():
    # public config wan/configs/wan_i2v_14B.py: dim 5120, ffn 13824, 40 heads, 40 layers, in_dim 36 (16 + 4 mask + 16 image)
    cfg = get_config("wan2.1-i2v-14b")
    assert (cfg.dim, cfg.ffn_dim, cfg.num_heads, cfg.num_layers, cfg.in_dim, cfg.out_dim) == (5120, 13824, 40, 40, 36, 16)
    ours = {k: tuple(v.shape) for k, v in build_flow_model(cfg, device="meta").state_dict().items()}
    assert ours == _public_i2v_keys(cfg)
    assert detect_family(build_flow_model("tiny-i2v", device="meta").state_dict()) is FAMILY
    assert comfy_family("WAN21", {"image_model": "wan2.1", "model_type": "i2v", "in_dim": 36}) is FAMILY


def test_i2v_file_round_trip_and_config_from_shapes(tmp_path):
    torch.manual_seed(0)
    model = build_flow_model("tiny-comfy-i2v")
    sd = model.state_dict()
    assert infer_wan_config(sd) == get_config("tiny-comfy-i2v")  # model_type from img_emb, channels from the shapes
    again = load_wan(save_wan(model, tmp_path / "i2v.safetensors"))
    assert again.config.model_type == "i2v" and set(again.state_dict()) == set(sd)


@pytest.mark.skipif(not os.environ.get("WAN21_REPO"), reason="set WAN21_REPO to a Wan-Video/Wan2.1 checkout")
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_i2v_matches_public_wan21_code(monkeypatch):
    public = _load_public_wan(Path(os.environ["WAN21_REPO"]), monkeypatch)
    # the public code splits image from text tokens at context length - 512, so text_len is 512 here
    cfg = get_config("tiny-i2v", text_len=512)
    theirs = public.WanModel(model_type="i2v", patch_size=cfg.patch_size, text_len=cfg.text_len, in_dim=cfg.in_dim, dim=cfg.dim,
                             ffn_dim=cfg.ffn_dim, freq_dim=cfg.freq_dim, text_dim=cfg.text_dim, out_dim=cfg.out_dim,
                             num_heads=cfg.num_heads, num_layers=cfg.num_layers, qk_norm=cfg.qk_norm,
                             cross_attn_norm=cfg.cross_attn_norm, eps=cfg.eps)
    ours = WanModel(cfg)
    theirs.load_state_dict(randomize_all(ours), strict=True)  # identical key sets and shapes
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 3, 4, 6, generator=g)
    y = torch.randn(2, 20, 3, 4, 6, generator=g)
    clip = torch.randn(2, 257, 1280, generator=g)
    t = torch.tensor([999.0, 250.0])
    ctx_list = [torch.randn(n, cfg.text_dim, generator=g) for n in (7, 4)]
    ctx = torch.stack([F.pad(c, (0, 0, 0, 7 - c.shape[0])) for c in ctx_list])
    with torch.no_grad():
        out = ours(x, t, ctx, clip_fea=clip, y=y)
        ref = torch.stack(theirs(list(x), t, ctx_list, seq_len=3 * 2 * 3, clip_fea=clip, y=list(y)))
    assert ref.abs().mean() > 0.05
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_one_step_image_to_video_depends_on_the_first_frame():
    torch.manual_seed(1)
    gen = build_flow_model("tiny-i2v").eval()
    randomize_all(gen)
    z = torch.randn(2, 16, 3, 4, 4)
    a, b = _i2v_cond(2, 3, 4, 4, 32, seed=0), _i2v_cond(2, 3, 4, 4, 32, seed=0)
    b.y = b.y.clone()
    b.y[:, 4:, 0] += 1.0  # another first frame
    with torch.no_grad():
        xa, xb = generate_one_step(gen, z, a), generate_one_step(gen, z, b)
    assert xa.shape == z.shape and torch.isfinite(xa).all()
    assert (xa - xb).abs().max() > 1e-3
    assert a.y.shape == (2, 20, 3, 4, 4) and torch.equal(a.y[:, :4, 0], torch.ones(2, 4, 4, 4)) and a.y[:, :4, 1:].abs().sum() == 0
    assert a.y[:, 4:, 1:].abs().sum() == 0  # later image-latent frames are zero (no VAE here)
    with pytest.raises(ValueError, match="needs clip_fea"):
        gen(z, torch.ones(2), WanCond(a.context))
    merged = cat_cond(a, b)  # batching keeps the image parts
    assert merged.y.shape[0] == 4 and merged.clip_fea.shape[0] == 4


def test_image_latent_from_the_wan_vae_and_what_the_first_frame_only_latent_leaves_out():
    # Wan encodes [first frame, zero (mid-grey) frames] with its VAE (callers with the VAE pass that latent, as
    # ComfyUI's WanImageToVideo does); callers with only each clip's latent pass its first frame: equal there (the VAE
    # is causal), zero after, where Wan's latent of grey frames is not zero
    from apt_core.models.wan21_i2v import condition_video, image_condition
    from apt_core.models.wan_vae import WanVAEConfig, WanVAEEncoder

    torch.manual_seed(3)
    vae = WanVAEEncoder(WanVAEConfig(dim=4, num_res_blocks=1)).eval()
    frame = torch.rand(1, 3, 16, 16) * 2 - 1
    video = condition_video(frame, 9)
    assert video.shape == (1, 3, 9, 16, 16) and torch.equal(video[:, :, 0], frame) and video[:, :, 1:].abs().sum() == 0
    assert torch.equal(condition_video(frame[:, :, None], 9), video)
    full, first = vae.encode(video), vae.encode(video[:, :, :1])
    assert full.shape == (1, 16, 3, 2, 2)
    torch.testing.assert_close(full[:, :, :1], first, rtol=1e-5, atol=1e-5)
    clip = torch.randn(1, 257, 1280)
    _, y_wan = image_condition(full, 3, clip)
    _, y_first = image_condition(first, 3, clip)
    assert torch.equal(y_wan[:, 4:], full) and torch.equal(y_wan[:, :4], y_first[:, :4])
    assert torch.equal(y_first[:, 4:, :1], first) and y_first[:, 4:, 1:].abs().sum() == 0
    assert full[:, :, 1:].abs().mean() > 0.1  # the grey frames' normalised latent: what the first-frame-only path leaves out
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        condition_video(frame, 8)
    with pytest.raises(ValueError, match="first_frame must be"):
        condition_video(frame[:, :1], 9)


def test_apt_steps_with_the_first_frame_as_condition():
    # APT on I2V: G(z, c) makes a video from the real clip's first frame; D judges (video, same condition)
    torch.manual_seed(2)
    gen = build_flow_model("tiny-i2v")
    with torch.no_grad():
        gen.head.head.weight.normal_(std=0.05)
    disc = APTDiscriminator(build_flow_model("tiny-i2v"))
    tr = APTTrainer(gen, disc, make_rmsprop(gen.parameters(), 1e-4), make_rmsprop(disc.trainable_parameters(), 1e-4), APTConfig())
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 16, 3, 4, 4, generator=g)
    clip, y = FAMILY.image_condition(x[:, :, :1], 3, torch.randn(2, 257, 1280, generator=g))  # the real first frame
    cond = WanCond(torch.randn(2, 5, 32, generator=g), clip_fea=clip, y=y)
    before = {n: p.detach().clone() for n, p in gen.named_parameters()}
    md = tr.d_step(x, cond)
    mg = tr.g_step(cond)
    assert all(torch.isfinite(v).all() for v in (*md.values(), *mg.values()))
    moved = {n for n, p in gen.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("img_emb.") for n in moved) and any("k_img" in n for n in moved)  # the image path is trained
