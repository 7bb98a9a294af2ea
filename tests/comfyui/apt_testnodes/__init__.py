"""Test-only ComfyUI node for the real-ComfyUI suite (never shipped in the node pack).

APTTestStandInCLIP is a STAND-IN for CLIPLoader(type=wan) with the 5.7B-parameter umT5-XXL text
encoder, which cannot be downloaded here. It returns an object with the two methods ComfyUI's
CLIPTextEncode path calls (`tokenize`, `encode_from_tokens_scheduled`) and produces what umT5 does
in shape: CONDITIONING [[context [1, 16, 4096], {"pooled_output": None}]] with one row per word
(deterministic per text) and zero rows after them (umT5's padding is zeroed the same way). Used only
where a node needs a CLIP object (APT Dataset From Folder); prompts use testnodes' TestZeroConditioning.
"""

import hashlib

import torch


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


NODE_CLASS_MAPPINGS = {"APTTestStandInCLIP": APTTestStandInCLIP}
NODE_DISPLAY_NAME_MAPPINGS = {"APTTestStandInCLIP": "Test: stand-in Wan text encoder (CLIP)"}
