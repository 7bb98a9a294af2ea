"""Optimiser-state memory of APT's RMSProp: `python -m bench.optimizer_state [--preset small]`.

Builds G and a full-mode D of a preset, takes one real step with `make_rmsprop` (torch RMSprop) and
with the Adam(betas=(0, 0.9)) it replaced, and reports the bytes each keeps as state (per-parameter
tensors; the 0-d step counters aside). RMSprop keeps one fp32 copy of the trainable parameters,
Adam two (its first moment is never used with beta1 = 0). Exact byte counts: no timing involved.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch

from apt_core.backbone import build_flow_model
from apt_core.discriminator import APTDiscriminator
from apt_core.trainer import make_rmsprop

OPTIMISERS: dict[str, Callable] = {
    "rmsprop": lambda params: make_rmsprop(params, 1e-5),
    "adam_beta1_0": lambda params: torch.optim.Adam(params, lr=1e-5, betas=(0.0, 0.9), eps=1e-8),
}


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the optimiser's per-parameter state tensors (the 0-d step counters excluded)."""
    return sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step")


def measure(preset: str = "small") -> dict:
    """State bytes after one step, per model (G full, D full) and optimiser; plus the trainable parameter bytes."""
    torch.manual_seed(0)
    gen = build_flow_model(preset)
    models = {"generator": gen, "discriminator": APTDiscriminator(gen)}
    out: dict = {"preset": preset}
    for name, model in models.items():
        params = [p for p in model.parameters() if p.requires_grad]
        row = {"trainable_params": sum(p.numel() for p in params), "param_bytes_fp32": sum(4 * p.numel() for p in params)}
        for kind, make in OPTIMISERS.items():
            opt = make(params)
            for p in params:
                p.grad = torch.ones_like(p)
            opt.step()
            row[f"{kind}_state_bytes"] = state_bytes(opt)
            for p in params:
                p.grad = None
        out[name] = row
    out["saved_bytes"] = sum(out[m]["adam_beta1_0_state_bytes"] - out[m]["rmsprop_state_bytes"] for m in models)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", help="apt_core.models.wan preset (default: small)")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.preset), indent=1))


if __name__ == "__main__":
    main()
