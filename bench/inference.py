"""Inference benchmark: APT one step vs the teacher's 25 steps with CFG, and DiT forward latency/MFU.

CPU (tiny/small configs): per-sample time of both samplers side by side in one run, and the ratio.
GPU: Wan 1.3B at 832x480x81 and 1280x720x81 (and 14B at 720p if it fits), bf16, random weights in
the real shapes: latency, MFU against the dense bf16 peak, tokens/s, peak memory, and which SDPA
backends (flash / cuDNN / efficient / math) run.

    python -m bench.inference [--quick] [--compile]
"""

from __future__ import annotations

import argparse
from functools import partial

import torch

from apt_core.backbone import WanCond, build_flow_model
from apt_core.flow import euler_sample, generate_one_step
from bench.common import (
    machine_info,
    peak_tflops,
    print_table,
    sync,
    time_fn,
    tokens_of,
    wan_forward_flops,
    write_results,
)

CPU_CASES = {
    # name: (preset, latent shape [C, F, H, W], batch)
    "tiny": ("tiny", (16, 3, 16, 16), 4),
    "small": ("small", (16, 5, 16, 16), 2),
}
GPU_CASES = {
    "wan1.3b-480p-81f": ("wan2.1-t2v-1.3b", (16, 21, 60, 104)),
    "wan1.3b-720p-81f": ("wan2.1-t2v-1.3b", (16, 21, 90, 160)),
    "wan14b-720p-81f": ("wan2.1-t2v-14b", (16, 21, 90, 160)),
}


def bench_samplers_cpu(quick: bool) -> list[dict]:
    """APT 1 step vs teacher 25 steps + CFG (50 forwards), per sample, on the same model."""
    rows = []
    cases = {"tiny": CPU_CASES["tiny"]} if quick else CPU_CASES
    for name, (preset, shape, batch) in cases.items():
        torch.manual_seed(0)
        model = build_flow_model(preset).eval()
        cfg = model.config
        z = torch.randn(batch, *shape)
        cond = WanCond(torch.randn(batch, cfg.text_len, cfg.text_dim))
        neg = WanCond(torch.zeros(batch, cfg.text_len, cfg.text_dim))
        steps = 25
        with torch.no_grad():
            t_one = time_fn(partial(generate_one_step, model, z, cond), repeat=3 if quick else 5)
            t_multi = time_fn(
                partial(euler_sample, model, z, cond, steps=steps, shift=5.0, cfg_scale=5.0, neg_cond=neg),
                warmup=1,
                repeat=1 if quick else 3,
            )
        rows.append(
            {
                "case": name,
                "shape": list(shape),
                "batch": batch,
                "tokens": tokens_of(cfg, shape),
                "apt_1step_ms_per_sample": 1e3 * t_one / batch,
                "teacher_25step_cfg_ms_per_sample": 1e3 * t_multi / batch,
                "speedup": t_multi / t_one,
            }
        )
    return rows


def _sdpa_backends_check(device: torch.device) -> dict:
    """Which SDPA backends accept a bf16 [1, 12, 4096, 128] attention on this device, and their time."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 12, 4096, 128, device=device, dtype=torch.bfloat16)
    out = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
        try:
            with sdpa_kernel([backend]):
                t = time_fn(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q), device, repeat=5)
            out[backend.name] = {"ok": True, "ms": 1e3 * t}
        except RuntimeError as err:
            out[backend.name] = {"ok": False, "error": str(err).splitlines()[0][:200]}
    return out


def bench_dit_gpu(compile_blocks: bool) -> list[dict]:
    """One-step DiT forward latency and MFU for the real Wan shapes (bf16, random weights)."""
    device = torch.device("cuda")
    rows = []
    peak = peak_tflops()
    for name, (preset, shape) in GPU_CASES.items():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        model = None
        try:
            model = build_flow_model(preset, device="meta")
            model.to_empty(device=device)
            model.init_weights()
            model = model.to(torch.bfloat16).eval()
            if compile_blocks:
                for block in model.blocks:
                    block.compile()
            cfg = model.config
            z = torch.randn(1, *shape, device=device, dtype=torch.bfloat16)
            cond = WanCond(torch.randn(1, cfg.text_len, cfg.text_dim, device=device, dtype=torch.bfloat16))
            with torch.no_grad():
                seconds = time_fn(partial(generate_one_step, model, z, cond), device, warmup=2, repeat=5)
            tokens = tokens_of(cfg, shape)
            flops = wan_forward_flops(cfg.dim, cfg.ffn_dim, cfg.num_layers, tokens, cfg.text_len, cfg.text_dim)
            rows.append(
                {
                    "case": name,
                    "tokens": tokens,
                    "tflop_per_forward": flops / 1e12,
                    "seconds": seconds,
                    "ideal_seconds": flops / 1e12 / peak if peak else None,
                    "mfu": flops / seconds / 1e12 / peak if peak else None,
                    "tokens_per_s": tokens / seconds,
                    "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
                }
            )
        except torch.OutOfMemoryError:
            rows.append({"case": name, "error": "out of memory"})
        finally:
            del model
            sync(device)
    return rows


def main(argv: list[str] | None = None) -> dict:
    """Run the inference benchmark, print its tables, write bench/results/inference.json; return the results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny config only (CI-friendly)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block (GPU cases)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable on a shared machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results: dict = {"name": "inference", "dtype_cpu": "float32"}
    rows = bench_samplers_cpu(args.quick)
    print_table(
        "APT 1 step vs teacher 25 steps + CFG (CPU, fp32, same model)",
        rows,
        ["case", "tokens", "batch", "apt_1step_ms_per_sample", "teacher_25step_cfg_ms_per_sample", "speedup"],
    )
    results["samplers_cpu"] = rows
    results["checks"] = {f"{r['case']}.speedup_1step_vs_25step_cfg": {"value": r["speedup"]} for r in rows}
    if torch.cuda.is_available():
        results["sdpa_backends"] = _sdpa_backends_check(torch.device("cuda"))
        print("\nSDPA backends:", results["sdpa_backends"])
        gpu_rows = bench_dit_gpu(args.compile)
        print_table(
            f"One-step Wan DiT forward, bf16 ({machine_info().get('gpu')})",
            gpu_rows,
            ["case", "tokens", "tflop_per_forward", "seconds", "ideal_seconds", "mfu", "tokens_per_s", "peak_mem_gib"],
        )
        results["dit_gpu"] = gpu_rows
    path = write_results("inference", results)
    print(f"\nwrote {path}")
    return results


if __name__ == "__main__":
    main()
