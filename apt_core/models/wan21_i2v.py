"""Family: Wan 2.1 image-to-video (14B, 480P / 720P): the first frame as condition.

Module tree: apt_core.models.wan with `model_type="i2v"` (public Wan-Video/Wan2.1 `WanModel`,
model_type 'i2v'): `patch_embedding` takes 36 channels = 16 noisy latents + `y` (4 mask channels +
16 image-latent channels), `img_emb` (MLPProj: LayerNorm, Linear 1280->1280, GELU, Linear 1280->dim,
LayerNorm) turns the 257 CLIP ViT-H/14 image tokens into extra cross-attention tokens, and every
block's cross-attention has `k_img`, `v_img`, `norm_k_img` for them. Public config
(`wan/configs/wan_i2v_14B.py`): dim 5120, ffn 13824, 40 heads, 40 layers, Wan 2.1 VAE. ComfyUI loads
these files as model class WAN21 with unet_config model_type 'i2v', in_dim 36.

Condition (`image_condition`): as the public `WanI2V.generate`, the mask is 1 on the first latent frame
(its 4 channels = the 4 pixel frames that latent frame stands for) and 0 after; the image latent is the
VAE latent of [first frame, zero frames...] in pixel space [-1, 1] (zero = mid-grey; `condition_video`
builds those pixels; ComfyUI's WanImageToVideo encodes the same, with 0.5 grey in its [0, 1] images).
Callers with the VAE pass that whole latent (the headless trainer: the shards' `image_latent`, which
`apt-prepare --image-latent` encodes with WanVAEEncoder.encode_image_condition). Its first latent frame is the
first frame's own latent (the VAE is causal), so callers without it (the headless trainer on shards without
`image_latent`) may pass that one frame: the later frames are then zero here, where Wan has the VAE latent of
grey frames, which is not zero ((mu - mean) / std of grey frames; tests/apt_core/test_i2v.py).
"""

from __future__ import annotations

import torch

from apt_core.models.registry import ModelFamily
from apt_core.models.wan import CLIP_DIM, WanConfig
from apt_core.models.wan21_t2v import LATENT_RGB, LATENT_RGB_BIAS

MASK_CHANNELS = 4  # one per pixel frame of a latent frame (the VAE's temporal stride)
CLIP_TOKENS = 257  # CLIP ViT-H/14 at 224 px: 256 patches + the class token


def condition_video(first_frame: torch.Tensor, num_frames: int) -> torch.Tensor:
    """The pixels whose VAE latent is Wan 2.1 I2V's image latent: the first frame, then zeros (mid-grey).

    first_frame: [B, 3, H, W] or [B, 3, 1, H, W] in [-1, 1]; num_frames: pixel frames of the video (1 + 4k).
    Returns [B, 3, num_frames, H, W], for the Wan VAE (apt_core.models.wan_vae.WanVAEEncoder.encode).
    """
    frame = first_frame[:, :, None] if first_frame.ndim == 4 else first_frame
    if frame.ndim != 5 or frame.shape[1] != 3 or frame.shape[2] != 1:
        raise ValueError(f"first_frame must be [B, 3, H, W] or [B, 3, 1, H, W], got shape {tuple(first_frame.shape)}")
    if num_frames < 1 or (num_frames - 1) % MASK_CHANNELS:
        raise ValueError(f"num_frames must be 1 + {MASK_CHANNELS}k (the VAE's temporal stride), got {num_frames}")
    b, _, _, h, w = frame.shape
    return torch.cat([frame, frame.new_zeros(b, 3, num_frames - 1, h, w)], dim=2)


def image_condition(image_latent: torch.Tensor, num_frames: int, clip_fea: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(clip_fea, y) of WanCond for `num_frames` latent frames from the first frame.

    image_latent: [B, 16, num_frames, H, W] (the VAE latent of `condition_video`, as Wan) or [B, 16, 1, H, W]
    (the first frame's latent only: the later frames are zero, see the module docstring); clip_fea: [B, 257, 1280].
    """
    if image_latent.ndim != 5 or image_latent.shape[2] not in (1, num_frames):
        raise ValueError(f"image_latent must be [B, C, 1 or {num_frames}, H, W], got shape {tuple(image_latent.shape)}")
    if clip_fea.ndim != 3 or clip_fea.shape[0] != image_latent.shape[0] or clip_fea.shape[2] != CLIP_DIM:
        raise ValueError(f"clip_fea must be [B={image_latent.shape[0]}, {CLIP_TOKENS}, {CLIP_DIM}], got shape {tuple(clip_fea.shape)}")
    b, _, f, h, w = image_latent.shape
    if f == 1 and num_frames > 1:
        image_latent = torch.cat([image_latent, image_latent.new_zeros(b, image_latent.shape[1], num_frames - 1, h, w)], dim=2)
    mask = image_latent.new_zeros(b, MASK_CHANNELS, num_frames, h, w)
    mask[:, :, 0] = 1.0
    return clip_fea, torch.cat([mask, image_latent], dim=1)


PRESETS = {
    "wan2.1-i2v-14b": WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36, out_dim=16, model_type="i2v"),
    # Tiny stand-ins: CPU tests, and one ComfyUI can detect (dim multiple of 128, text_dim 4096).
    "tiny-i2v": WanConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, in_dim=36, out_dim=16, text_dim=32, text_len=16,
                          model_type="i2v"),
    "tiny-comfy-i2v": WanConfig(dim=128, ffn_dim=256, num_heads=1, num_layers=2, in_dim=36, out_dim=16, model_type="i2v"),
}

FAMILY = ModelFamily(
    name="wan2.1-i2v",
    title="Wan 2.1 I2V (image-to-video)",
    presets=PRESETS,
    comfy_class="WAN21",
    comfy_unet={"model_type": "i2v", "in_dim": 36},
    latent_channels=16,
    vae="Wan 2.1 VAE (wan_2.1_vae.safetensors)",
    vae_stride=(4, 8, 8),
    sample_shift=5.0,
    example_file="wan2.1_i2v_480p_14B_fp16.safetensors",
    comfy_latent_format="Wan21",
    latent_rgb=LATENT_RGB,
    latent_rgb_bias=LATENT_RGB_BIAS,
    in_dim=36,
    model_type="i2v",
    image_condition=image_condition,
    marker_keys=("img_emb.proj.0.bias",),
    # The sampler node runs ComfyUI's own WAN21 I2V model, which takes the image condition WanImageToVideo puts into
    # the CONDITIONING; the training nodes' trainable copy and frozen callables pass text only so far.
    in_training_nodes=False,
)
