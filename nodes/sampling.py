"""One- and two-step APT sampling through ComfyUI's own sampling machinery.

`sample_apt` is a k-diffusion-convention sampler function (`model(x, sigma)` returns the denoised
x0): with sigmas `[1, 0]` it is the APT generator `x0 = G(z)`; with `[1, t_mid, 0]` it re-noises
that x0 to `t_mid` with fresh noise (rectified flow: `x = (1 - s) x0 + s eps`) and takes one more
step. Wrapped in `comfy.samplers.KSAMPLER`, it runs under CFGGuider, so model patches, LoRAs,
progress, previews and Stop behave as with any core sampler.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .comfy_backbone import check_latent, check_model, conditioning_context

CATEGORY = "APT/sampling"


def apt_sigmas(steps: int, t_mid: float = 0.5) -> torch.Tensor:
    """`[1, 0]` for one step, `[1, t_mid, 0]` for two (t = sigma for flow models, independent of shift)."""
    if steps == 1:
        return torch.tensor([1.0, 0.0])
    if steps == 2:
        if not 0.0 < t_mid < 1.0:
            raise ValueError(f"t_mid must be in (0, 1) for 2 steps, got {t_mid}")
        return torch.tensor([1.0, float(t_mid), 0.0])
    raise ValueError(f"APT samples in 1 or 2 steps (more gives artifacts), got steps={steps}")


@torch.no_grad()
def sample_apt(
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict | None = None,
    callback: Callable[[dict], None] | None = None,
    disable: bool | None = None,
) -> torch.Tensor:
    """k-diffusion sampler: x0 = model(x, sigma_i); re-noise to sigma_{i+1} with fresh noise if > 0.

    The re-noising noise comes from a CPU generator seeded with `extra_args["seed"] + 1` (ComfyUI
    passes the sampler seed there), so results repeat for a seed and differ from the initial noise.
    """
    extra_args = {} if extra_args is None else extra_args
    seed = extra_args.get("seed")
    gen = torch.Generator().manual_seed(int(seed) + 1) if seed is not None else None
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        s = sigmas[i + 1]
        if s > 0:
            eps = torch.randn(x.shape, generator=gen, dtype=x.dtype, device="cpu").to(x.device)
            x = (1 - s) * denoised + s * eps
        else:
            x = denoised
    return x


def apt_sampler() -> Any:
    """The APT sampler as a ComfyUI SAMPLER object."""
    import comfy.samplers

    return comfy.samplers.KSAMPLER(sample_apt)


class APTOneStepSampler:
    DESCRIPTION = "Generate with an APT one-step generator: 1 step from pure noise, or 2 steps (re-noise to t_mid, one more step). No CFG."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The generated latent (decode it with VAEDecode).",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "An APT one-step Wan generator (UNETLoader, or a base model + APT LoRA); a Wan 2.1 I2V one takes its first frame from WanImageToVideo's conditioning."}),
            "positive": ("CONDITIONING", {"tooltip": "The prompt (CLIPTextEncode with a Wan umT5 CLIP); for image-to-video, WanImageToVideo's positive output. One-step models use no negative prompt."}),
            "latent": ("LATENT", {"tooltip": "Sets size and length, e.g. EmptyHunyuanLatentVideo (length 1 for an image), or WanImageToVideo's latent."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                             "tooltip": "Seed of the initial noise (and of the re-noising noise for 2 steps)."}),
            "steps": ("INT", {"default": 1, "min": 1, "max": 2, "tooltip": "1: the one-step generator. 2: re-noise to t_mid and refine once (more detail)."}),
            "t_mid": ("FLOAT", {"default": 0.5, "min": 0.05, "max": 0.95, "step": 0.01,
                                "tooltip": "Re-noising level (0..1, flow time = sigma) for the second step; ignored for 1 step."}),
        }}

    def sample(self, model, positive, latent, seed, steps, t_mid):
        import comfy.model_management
        import comfy.sample
        import comfy.utils
        import latent_preview
        from comfy_extras.nodes_custom_sampler import Guider_Basic

        check_model(model, use="sampling")
        samples = check_latent(model, latent["samples"])
        conditioning_context(positive)
        sigmas = apt_sigmas(steps, t_mid)
        noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
        guider = Guider_Basic(model)
        guider.set_conds(positive)
        callback = latent_preview.prepare_callback(model, len(sigmas) - 1)
        out = guider.sample(noise, samples, apt_sampler(), sigmas, denoise_mask=latent.get("noise_mask"), callback=callback,
                            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        result = {k: v for k, v in latent.items() if k != "noise_mask"}
        result["samples"] = out.to(comfy.model_management.intermediate_device())
        return (result,)


class APTSamplerSelect:
    DESCRIPTION = "The APT one/two-step sampler as a SAMPLER, for SamplerCustom / SamplerCustomAdvanced (pair it with APT Sigmas)."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("SAMPLER",)
    RETURN_NAMES = ("sampler",)
    OUTPUT_TOOLTIPS = ("x0 = model(noise at sigma 1); for each further sigma: re-noise with fresh noise, one more step.",)
    FUNCTION = "get_sampler"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def get_sampler(self):
        return (apt_sampler(),)


class APTSigmas:
    DESCRIPTION = "Sigmas for APT sampling: [1, 0] (one step) or [1, t_mid, 0] (two steps)."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("SIGMAS",)
    RETURN_NAMES = ("sigmas",)
    OUTPUT_TOOLTIPS = ("Descending sigmas ending at 0, for SamplerCustomAdvanced with APT Sampler.",)
    FUNCTION = "get_sigmas"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "steps": ("INT", {"default": 1, "min": 1, "max": 2, "tooltip": "1 or 2 sampling steps."}),
            "t_mid": ("FLOAT", {"default": 0.5, "min": 0.05, "max": 0.95, "step": 0.01,
                                "tooltip": "Re-noising level of the second step (ignored for 1 step)."}),
        }}

    def get_sigmas(self, steps, t_mid):
        return (apt_sigmas(steps, t_mid),)


NODE_CLASS_MAPPINGS = {"APTOneStepSampler": APTOneStepSampler, "APTSamplerSelect": APTSamplerSelect, "APTSigmas": APTSigmas}
NODE_DISPLAY_NAME_MAPPINGS = {
    "APTOneStepSampler": "APT One-Step Sampler",
    "APTSamplerSelect": "APT Sampler (SAMPLER)",
    "APTSigmas": "APT Sigmas",
}
