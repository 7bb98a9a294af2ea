"""Family: Wan 2.1 text-to-video (1.3B, 14B) and the tiny CPU stand-ins of its module tree.

Module tree: apt_core.models.wan (public Wan-Video/Wan2.1 `WanModel`, model_type 't2v'); keys are
the public ones, ComfyUI's `model.diffusion_model.` prefix is stripped on load. ComfyUI loads these
files as model class WAN21 with unet_config model_type 't2v', in_dim 16.
"""

from apt_core.models.registry import ModelFamily
from apt_core.models.wan import WanConfig

# ComfyUI's latent -> RGB preview projection (comfy.latent_formats.Wan21): rgb = latent^T W + b.
LATENT_RGB = (
    (-0.1299, -0.1692, 0.2932), (0.0671, 0.0406, 0.0442), (0.3568, 0.2548, 0.1747), (0.0372, 0.2344, 0.1420),
    (0.0313, 0.0189, -0.0328), (0.0296, -0.0956, -0.0665), (-0.3477, -0.4059, -0.2925), (0.0166, 0.1902, 0.1975),
    (-0.0412, 0.0267, -0.1364), (-0.1293, 0.0740, 0.1636), (0.0680, 0.3019, 0.1128), (0.0032, 0.0581, 0.0639),
    (-0.1251, 0.0927, 0.1699), (0.0060, -0.0633, 0.0005), (0.3477, 0.2275, 0.2950), (0.1984, 0.0913, 0.1861),
)
LATENT_RGB_BIAS = (-0.1835, -0.0868, -0.3360)

PRESETS = {
    "wan2.1-t2v-1.3b": WanConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "wan2.1-t2v-14b": WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    # ComfyUI-detectable tiny model (dim multiple of 128, heads = dim // 128, text_dim 4096).
    "tiny-comfy": WanConfig(dim=128, ffn_dim=256, num_heads=1, num_layers=2),
    # CPU-test sizes.
    "tiny": WanConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32, text_len=16),
    "small": WanConfig(dim=256, ffn_dim=1024, num_heads=2, num_layers=6, text_dim=256, text_len=64),
}

FAMILY = ModelFamily(
    name="wan2.1-t2v",
    title="Wan 2.1 T2V",
    presets=PRESETS,
    comfy_class="WAN21",
    comfy_unet={"model_type": "t2v", "in_dim": 16},
    latent_channels=16,
    vae="Wan 2.1 VAE (wan_2.1_vae.safetensors)",
    vae_stride=(4, 8, 8),
    sample_shift=5.0,
    example_file="wan2.1_t2v_1.3B_fp16.safetensors",
    comfy_latent_format="Wan21",
    latent_rgb=LATENT_RGB,
    latent_rgb_bias=LATENT_RGB_BIAS,
)
