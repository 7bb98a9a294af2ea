"""Test-only ComfyUI node for the real-ComfyUI suite (never shipped in the node pack).

APTTestStandInCLIP is a STAND-IN for CLIPLoader(type=wan) with the 5.7B-parameter umT5-XXL text
encoder, which cannot be downloaded here. It returns an object with the two methods ComfyUI's
CLIPTextEncode path calls (`tokenize`, `encode_from_tokens_scheduled`) and produces what umT5 does
in shape: CONDITIONING [[context [1, 16, 4096], {"pooled_output": None}]] with one row per word
(deterministic per text) and zero rows after them (umT5's padding is zeroed the same way). Used only
where a node needs a CLIP object (APT Dataset From Folder); prompts use testnodes' TestZeroConditioning.

APTTestStandInClipVisionOutput is a STAND-IN for CLIPVisionLoader (CLIP ViT-H/14, 632M parameters) +
CLIPVisionEncode: a CLIP_VISION_OUTPUT whose `penultimate_hidden_states` (what ComfyUI's WAN21 I2V
model reads as `clip_fea`) are seeded random tokens of the real shape [1, 257, 1280].
"""

import hashlib
import json
import sys
from pathlib import Path

import torch

PACK_INIT = Path(__file__).resolve().parents[3] / "__init__.py"


class StandInCLIP:
    """Stand-in for comfy.sd.CLIP with the Wan umT5 encoder (see module docstring)."""

    length, dim = 16, 4096

    def tokenize(self, text):
        return {"text": text}

    def encode_from_tokens_scheduled(self, tokens):
        text = tokens["text"]
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
        n = max(1, min(self.length, len(text.split())))
        ctx = torch.zeros(1, self.length, self.dim)
        ctx[0, :n] = torch.randn(n, self.dim, generator=torch.Generator().manual_seed(seed))
        return [[ctx, {"pooled_output": None}]]


class APTTestStandInCLIP:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    CATEGORY = "testing/apt"

    def load(self):
        return (StandInCLIP(),)


def _pack_module(sub: str):
    """A submodule of the loaded ComfyUI-APT pack (ComfyUI imports it under a path-derived name)."""
    import importlib

    for name, mod in list(sys.modules.items()):
        if getattr(mod, "__file__", None) and Path(mod.__file__).resolve() == PACK_INIT:
            return importlib.import_module(f"{name}.{sub}")
    raise RuntimeError("the ComfyUI-APT pack is not loaded")


class APTTestAdapterCheck:
    """Compares nodes/comfy_backbone's two views of a MODEL on random inputs: ComfyFlowModel (ComfyUI's own
    diffusion_model, hooks via patches_replace) vs trainable_wan (the apt_core WanFlowModel copy)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "check"
    CATEGORY = "testing/apt"
    OUTPUT_NODE = True

    def check(self, model):
        bb = _pack_module("nodes.comfy_backbone")
        from apt_core.backbone import WanCond

        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 16, 3, 8, 8, generator=g)
        t = torch.tensor([0.3, 1.0])
        ctx = torch.randn(2, 7, 4096, generator=g)
        with torch.inference_mode(False), torch.no_grad():
            comfy_flow = bb.ComfyFlowModel(model).load()
            apt_flow = bb.trainable_wan(model, "cpu", torch.float32)
            v_comfy, v_apt = comfy_flow(x, t, ctx), apt_flow(x, t, WanCond(ctx))
            layers = [0, comfy_flow.num_layers - 1]
            f_comfy, f_apt = comfy_flow.features(x, t, ctx, layers), apt_flow.features(x, t, WanCond(ctx), layers)
        out = {"velocity_max_abs_diff": float((v_comfy - v_apt).abs().max()), "velocity_scale": float(v_apt.abs().max()),
               "features_max_abs_diff": max(float((a - b).abs().max()) for a, b in zip(f_comfy, f_apt)),
               "features_scale": max(float(b.abs().max()) for b in f_apt), "feature_shapes": [list(f.shape) for f in f_comfy],
               "num_layers": comfy_flow.num_layers}
        text = json.dumps(out)
        return {"ui": {"text": [text]}, "result": (text,)}


class APTTestI2VCheck:
    """APT One-Step Sampler on a Wan 2.1 I2V MODEL with WanImageToVideo's conditioning, against apt_core's own I2V
    network (WanFlowModel from the MODEL's weights) with the condition built by the family's `image_condition` from
    the same VAE latent and CLIP tokens: x0 = noise - v(noise, t=1), in LATENT space (ComfyUI's process_out)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "positive": ("CONDITIONING",), "latent": ("LATENT",),
                             "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1})}}

    RETURN_TYPES = ("LATENT", "STRING")
    FUNCTION = "check"
    CATEGORY = "testing/apt"
    OUTPUT_NODE = True

    def check(self, model, positive, latent, seed):
        import comfy.sample

        from apt_core.backbone import WanCond, WanFlowModel
        from apt_core.models.io import infer_wan_config, load_into
        from apt_core.models.registry import get_family

        bb, sampling = _pack_module("nodes.comfy_backbone"), _pack_module("nodes.sampling")
        (out,) = sampling.APTOneStepSampler().sample(model, positive, latent, seed, 1, 0.5)
        with torch.inference_mode(False), torch.no_grad():
            sd = bb.effective_state_dict(model, torch.float32)
            with torch.device("meta"):
                flow = WanFlowModel(infer_wan_config(sd))
            load_into(flow, sd, strict=True, source="ComfyUI MODEL")
            ctx, opts = positive[0]
            image = bb.to_model_space(model, opts["concat_latent_image"].float())
            noise = comfy.sample.prepare_noise(latent["samples"], seed)
            clip_fea, y = get_family("wan2.1-i2v").image_condition(image, noise.shape[2],
                                                                   opts["clip_vision_output"].penultimate_hidden_states.float())
            v = flow(noise, torch.ones(1), WanCond(ctx.float(), clip_fea, y))  # apt_core zero-pads the text to 512 rows
            ref = bb.to_latent_space(model, noise - v)
        mine = out["samples"].float()
        report = {"max_abs_diff": float((mine - ref).abs().max()), "scale": float(ref.abs().max()),
                  "velocity_scale": float(v.abs().max()), "model_type": flow.config.model_type,
                  "weights_abs_sum": sum(float(w.double().abs().sum()) for w in sd.values()),
                  "mask_first_frame_only": bool(y[:, :4, 0].eq(1).all() and y[:, :4, 1:].eq(0).all())}
        text = json.dumps(report)
        return {"ui": {"text": [text]}, "result": (out, text)}


class APTTestStandInClipVisionOutput:
    """Stand-in for CLIPVisionEncode's output with ViT-H/14 (see module docstring)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1})}}

    RETURN_TYPES = ("CLIP_VISION_OUTPUT",)
    FUNCTION = "encode"
    CATEGORY = "testing/apt"

    def encode(self, seed):
        from comfy.clip_vision import Output

        out = Output()
        out["penultimate_hidden_states"] = torch.randn(1, 257, 1280, generator=torch.Generator().manual_seed(seed))
        return (out,)


class APTTestStopDuringSetup:
    """A MODEL whose effective weights press Stop: a no-op weight patch on one FFN weight (not one that
    nodes.comfy_backbone.weights_fingerprint reads) that sets ComfyUI's interrupt flag when a training node's
    runner reads the weights (its setup), then takes `seconds` more, as setup on a large model goes on."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "seconds": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 60.0})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "testing/apt"

    def patch(self, model, seconds):
        import time

        import comfy.model_management as mm
        from comfy.weight_adapter.base import WeightAdapterBase

        class PressStop(WeightAdapterBase):
            name = "apt_test_press_stop"

            def __init__(self):
                self.loaded_keys, self.weights = set(), []

            def calculate_weight(self, weight, key, *args, **kwargs):
                mm.interrupt_current_processing(True)
                time.sleep(seconds)
                return weight

        out = model.clone()
        assert out.add_patches({"diffusion_model.blocks.0.ffn.0.weight": PressStop()}), "no blocks.0.ffn.0.weight"
        return (out,)


NODE_CLASS_MAPPINGS = {"APTTestStandInCLIP": APTTestStandInCLIP, "APTTestAdapterCheck": APTTestAdapterCheck,
                       "APTTestStandInClipVisionOutput": APTTestStandInClipVisionOutput, "APTTestI2VCheck": APTTestI2VCheck,
                       "APTTestStopDuringSetup": APTTestStopDuringSetup}
NODE_DISPLAY_NAME_MAPPINGS = {"APTTestStandInCLIP": "Test: stand-in Wan text encoder (CLIP)",
                              "APTTestStandInClipVisionOutput": "Test: stand-in CLIP vision output (ViT-H/14 shape)",
                              "APTTestAdapterCheck": "Test: APT adapter check (ComfyUI model vs apt_core copy)",
                              "APTTestI2VCheck": "Test: APT I2V one-step (ComfyUI vs apt_core)",
                              "APTTestStopDuringSetup": "Test: MODEL whose weights press Stop when read"}
