#!/usr/bin/env python3
"""Tiny random Wan checkpoints for the real-ComfyUI error tests (run with ComfyUI's venv, like make_tiny_wan.py).

    $COMFYUI_VENV/bin/python tests/comfyui/make_tiny_variants.py

models/diffusion_models/apt_test_tiny_wan21_t2v_3layers.safetensors  a T2V model with another depth
models/diffusion_models/apt_test_tiny_wan21_i2v.safetensors          a Wan 2.1 I2V stand-in (in_dim 36, img_emb; preset tiny-comfy-i2v)
models/diffusion_models/apt_test_tiny_wan22_ti2v.safetensors         a Wan 2.2 TI2V-5B stand-in (48 channels; ComfyUI class WAN22)
models/diffusion_models/apt_test_tiny_wan22_a14b_{high,low}_noise.safetensors
                                                                     the two Wan 2.2 A14B experts (each a WAN21 t2v file; other weights)
Files already there are left alone (other sessions may be reading them).
"""
import os
import sys

COMFY_ROOT = os.environ["COMFYUI_DIR"]
sys.path.insert(0, COMFY_ROOT)

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


def random_sd(module, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.zeros(v.shape) if k.endswith("bias") else torch.ones(v.shape) if v.ndim == 1 else torch.randn(v.shape, generator=g) * 0.02)
            for k, v in module.state_dict().items()}


def main():
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.ops
    from comfy.ldm.wan.model import WanModel

    out = os.path.join(COMFY_ROOT, "models", "diffusion_models")
    common = dict(patch_size=(1, 2, 2), dim=128, ffn_dim=256, freq_dim=256, text_dim=4096, out_dim=16, num_heads=1,
                  operations=comfy.ops.disable_weight_init, device="cpu", dtype=torch.float32)
    t2v = dict(model_type="t2v", in_dim=16, num_layers=2)
    for name, kw, seed in (("apt_test_tiny_wan21_t2v_3layers", dict(model_type="t2v", in_dim=16, num_layers=3), 0),
                           ("apt_test_tiny_wan21_i2v", dict(model_type="i2v", in_dim=36, num_layers=2), 0),
                           ("apt_test_tiny_wan22_ti2v", dict(model_type="t2v", in_dim=48, out_dim=48, num_layers=2), 0),
                           ("apt_test_tiny_wan22_a14b_high_noise", t2v, 1),
                           ("apt_test_tiny_wan22_a14b_low_noise", t2v, 2)):
        path = os.path.join(out, f"{name}.safetensors")
        if os.path.exists(path):
            continue
        tmp = os.path.join(out, f".{name}.tmp")
        save_file(random_sd(WanModel(**{**common, **kw}), seed), tmp)
        os.replace(tmp, path)
        print("wrote", path)


if __name__ == "__main__":
    main()
