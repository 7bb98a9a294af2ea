"""Test-only ComfyUI node for the real-ComfyUI suite (never shipped in the node pack).

APTTestStandInCLIP is a STAND-IN for CLIPLoader(type=wan) with the 5.7B-parameter umT5-XXL text
encoder, which cannot be downloaded here. It returns an object with the two methods ComfyUI's
CLIPTextEncode path calls (`tokenize`, `encode_from_tokens_scheduled`) and produces what umT5 does
in shape: CONDITIONING [[context [1, 16, 4096], {"pooled_output": None}]] with one row per word
(deterministic per text) and zero rows after them (umT5's padding is zeroed the same way). Used only
where a node needs a CLIP object (APT Dataset From Folder); prompts use testnodes' TestZeroConditioning.
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


NODE_CLASS_MAPPINGS = {"APTTestStandInCLIP": APTTestStandInCLIP, "APTTestAdapterCheck": APTTestAdapterCheck}
NODE_DISPLAY_NAME_MAPPINGS = {"APTTestStandInCLIP": "Test: stand-in Wan text encoder (CLIP)",
                              "APTTestAdapterCheck": "Test: APT adapter check (ComfyUI model vs apt_core copy)"}
