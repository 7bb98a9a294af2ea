"""Family: Wan 2.2 T2V-A14B, two experts with the Wan 2.1 14B module tree, one file each.

Public config (Wan-Video/Wan2.2 `wan/configs/wan_t2v_A14B.py`): dim 5120, ffn 13824, 40 heads,
40 layers, Wan 2.1 VAE, boundary 0.875: the high-noise expert denoises t >= 0.875 (timestep >= 875
of 1000), the low-noise expert the rest; sample_shift 12.

APT with two experts: the one-step generator maps pure noise (t = 1) to a sample, and t = 1 lies in
the high-noise expert's range, so the high-noise expert initialises G. The discriminator sees
t ~ shift(U(0, 1), 12) (video), which lands in [0.875, 1] for 63% of draws (u >= 0.368), so the
high-noise expert initialises D as well by default; `model.discriminator_expert` picks the other.
A single expert file has exactly the shapes of a Wan 2.1 14B T2V file, so a file is never detected
as this family (it loads as Wan 2.1 T2V, which is what ComfyUI does too: WAN21, model_type 't2v').
"""

from apt_core.models.registry import Expert, ModelFamily
from apt_core.models.wan import WanConfig
from apt_core.models.wan21_t2v import LATENT_RGB, LATENT_RGB_BIAS

BOUNDARY = 0.875

PRESETS = {
    "wan2.2-t2v-a14b": WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    # Tiny two-expert stand-in for CPU tests (each expert one file of this config).
    "tiny-a14b": WanConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32, text_len=16),
}

FAMILY = ModelFamily(
    name="wan2.2-t2v-a14b",
    title="Wan 2.2 T2V-A14B (two experts)",
    presets=PRESETS,
    comfy_class="WAN21",
    comfy_unet={"model_type": "t2v", "in_dim": 16},
    latent_channels=16,
    vae="Wan 2.1 VAE (wan_2.1_vae.safetensors)",
    vae_stride=(4, 8, 8),
    sample_shift=12.0,
    experts=(Expert("high_noise", BOUNDARY, 1.0), Expert("low_noise", 0.0, BOUNDARY)),
    generator_expert="high_noise",
    discriminator_expert="high_noise",
    example_file="wan2.2_t2v_high_noise_14B_fp16.safetensors + wan2.2_t2v_low_noise_14B_fp16.safetensors",
    comfy_latent_format="Wan21",
    latent_rgb=LATENT_RGB,
    latent_rgb_bias=LATENT_RGB_BIAS,
    detectable=False,
)
