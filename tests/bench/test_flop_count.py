"""The FLOP count behind every MFU figure equals what torch.utils.flop_counter counts in a real forward."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from apt_core.backbone import WanCond, build_flow_model
from bench.common import tokens_of, wan_forward_flops


def _counted(fn) -> int:
    # the math kernel decomposes attention into matmuls, which the counter sees on CPU
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("preset, shape", [("tiny", (16, 3, 16, 16)), ("tiny-comfy", (16, 3, 8, 12)),
                                           ("small", (16, 5, 16, 16))])
def test_forward_flops_match_the_flop_counter(preset, shape):
    torch.manual_seed(0)
    model = build_flow_model(preset).eval()
    cfg = model.config
    z, cond = torch.randn(1, *shape), WanCond(torch.randn(1, cfg.text_len, cfg.text_dim))
    tokens = tokens_of(cfg, shape)
    assert _counted(lambda: model(z, torch.ones(1), cond)) == wan_forward_flops(cfg, tokens)
    # the discriminator's truncated forward: blocks up to the tap, no output head
    taps = [0] if cfg.num_layers == 2 else [1, 3]
    counted = _counted(lambda: model.features(z, torch.ones(1), cond, taps))
    assert counted == wan_forward_flops(cfg, tokens, num_layers=max(taps) + 1, head=False)


def test_real_configs_give_the_reference_figures():
    # docs/wan21_reference.md: 283 TFLOP per 1.3B forward at 832x480x81 (32,760 tokens)
    from apt_core.models.wan import get_config

    assert round(wan_forward_flops(get_config("wan2.1-t2v-1.3b"), 32760) / 1e12) == 283
    assert round(wan_forward_flops(get_config("wan2.1-t2v-14b"), 75600) / 1e12) == 6523
