"""Family: Wan 2.2 TI2V-5B, used text-to-video (48-channel latents of the Wan 2.2 VAE).

Public config (Wan-Video/Wan2.2 `wan/configs/wan_ti2v_5B.py`): dim 3072, ffn 14336, 24 heads,
30 layers, patch (1, 2, 2), VAE stride (4, 16, 16), sample_shift 5. The network is the Wan 2.1
module tree (apt_core.models.wan) with in/out_dim 48; the public keys are the same. Wan 2.2 computes
the time embedding per token, which equals Wan 2.1's per-sample embedding whenever every token has
the same t (text-to-video, and every APT pass). ComfyUI loads it as model class WAN22 with
unet_config model_type 't2v', out_dim 48 (latent format Wan22).
"""

from apt_core.models.registry import ModelFamily
from apt_core.models.wan import WanConfig

# ComfyUI's latent -> RGB preview projection (comfy.latent_formats.Wan22): rgb = latent^T W + b.
LATENT_RGB = (
    (0.0119, 0.0103, 0.0046), (-0.1062, -0.0504, 0.0165), (0.0140, 0.0409, 0.0491), (-0.0813, -0.0677, 0.0607),
    (0.0656, 0.0851, 0.0808), (0.0264, 0.0463, 0.0912), (0.0295, 0.0326, 0.0590), (-0.0244, -0.0270, 0.0025),
    (0.0443, -0.0102, 0.0288), (-0.0465, -0.0090, -0.0205), (0.0359, 0.0236, 0.0082), (-0.0776, 0.0854, 0.1048),
    (0.0564, 0.0264, 0.0561), (0.0006, 0.0594, 0.0418), (-0.0319, -0.0542, -0.0637), (-0.0268, 0.0024, 0.0260),
    (0.0539, 0.0265, 0.0358), (-0.0359, -0.0312, -0.0287), (-0.0285, -0.1032, -0.1237), (0.1041, 0.0537, 0.0622),
    (-0.0086, -0.0374, -0.0051), (0.0390, 0.0670, 0.2863), (0.0069, 0.0144, 0.0082), (0.0006, -0.0167, 0.0079),
    (0.0313, -0.0574, -0.0232), (-0.1454, -0.0902, -0.0481), (0.0714, 0.0827, 0.0447), (-0.0304, -0.0574, -0.0196),
    (0.0401, 0.0384, 0.0204), (-0.0758, -0.0297, -0.0014), (0.0568, 0.1307, 0.1372), (-0.0055, -0.0310, -0.0380),
    (0.0239, -0.0305, 0.0325), (-0.0663, -0.0673, -0.0140), (-0.0416, -0.0047, -0.0023), (0.0166, 0.0112, -0.0093),
    (-0.0211, 0.0011, 0.0331), (0.1833, 0.1466, 0.2250), (-0.0368, 0.0370, 0.0295), (-0.3441, -0.3543, -0.2008),
    (-0.0479, -0.0489, -0.0420), (-0.0660, -0.0153, 0.0800), (-0.0101, 0.0068, 0.0156), (-0.0690, -0.0452, -0.0927),
    (-0.0145, 0.0041, 0.0015), (0.0421, 0.0451, 0.0373), (0.0504, -0.0483, -0.0356), (-0.0837, 0.0168, 0.0055),
)
LATENT_RGB_BIAS = (0.0317, -0.0878, -0.1388)

PRESETS = {
    "wan2.2-ti2v-5b": WanConfig(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_dim=48, out_dim=48),
    # Tiny stand-ins with the family's 48 latent channels: CPU tests, and one ComfyUI can detect.
    "tiny-ti2v": WanConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, in_dim=48, out_dim=48, text_dim=32, text_len=16),
    "tiny-comfy-ti2v": WanConfig(dim=128, ffn_dim=256, num_heads=1, num_layers=2, in_dim=48, out_dim=48),
}

FAMILY = ModelFamily(
    name="wan2.2-ti2v",
    title="Wan 2.2 TI2V-5B (text-to-video)",
    presets=PRESETS,
    comfy_class="WAN22",
    comfy_unet={"model_type": "t2v", "out_dim": 48},
    latent_channels=48,
    vae="Wan 2.2 VAE (wan2.2_vae.safetensors)",
    vae_stride=(4, 16, 16),
    sample_shift=5.0,
    example_file="wan2.2_ti2v_5B_fp16.safetensors",
    comfy_latent_format="Wan22",
    latent_rgb=LATENT_RGB,
    latent_rgb_bias=LATENT_RGB_BIAS,
)
