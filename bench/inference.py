"""Inference benchmark: APT one step vs the teacher's 25 steps with CFG, and DiT forward latency/MFU.

CPU (tiny/small configs): per-sample time of both samplers side by side in one run, and the ratio.
GPU: Wan 1.3B at 832x480x81 and 1280x720x81 (and 14B at 720p if it fits), bf16, random weights in
the real shapes: latency, MFU against the dense bf16 peak, tokens/s, peak memory, and which SDPA
backends (flash / cuDNN / efficient / math) run.

    python -m bench.inference [--quick] [--compile | --only-compiled] [--cases wan1.3b-480p-81f,...] [--rehearse]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from functools import partial

import torch

from apt_core.backbone import WanCond, build_flow_model
from apt_core.flow import euler_sample, generate_one_step
from apt_core.models.attention import BACKENDS
from apt_core.models.wan import WanRMSNorm
from bench.common import (
    default_device,
    error_text,
    first_line,
    machine_info,
    measured_matmul_tflops,
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


# The GPU code path at stand-in sizes: `--rehearse` runs it on CPU (and tests/bench does), so a
# device session is not spent finding a crash.
REHEARSAL_CASES = {"tiny-comfy-rehearsal": ("tiny-comfy", (16, 3, 8, 8))}


def sdpa_backends_check(device: torch.device, shape: tuple[int, int, int, int], dtype: torch.dtype) -> dict:
    """Which SDPA backends run a [B, heads, tokens, head_dim] self-attention here, and how fast.

    `default` is the dispatcher's own choice (what the model uses): the check is that it is as fast
    as the fastest forced backend.
    """
    from torch.nn.attention import sdpa_kernel

    q = torch.randn(*shape, device=device, dtype=dtype)
    attend = partial(torch.nn.functional.scaled_dot_product_attention, q, q, q)
    out = {"shape": list(shape), "dtype": str(dtype).removeprefix("torch.")}
    for backend in BACKENDS.values():
        try:
            with sdpa_kernel([backend]):
                out[backend.name] = {"ok": True, "ms": 1e3 * time_fn(attend, device, repeat=5)}
        except RuntimeError as err:
            out[backend.name] = {"ok": False, "error": first_line(err)}
    out["default"] = {"ok": True, "ms": 1e3 * time_fn(attend, device, repeat=5)}
    return out


def forward_by_backend(model: torch.nn.Module, z: torch.Tensor, cond: WanCond, device: torch.device) -> dict:
    """Seconds of the whole one-step forward under each attention choice of the model
    (`set_attention_backend`: default dispatcher, auto, and each kernel where it takes the inputs)."""
    from apt_core.models import attention as attn

    step = partial(generate_one_step, model, z, cond)
    out = {}
    with torch.no_grad():
        for name in attn.CHOICES:
            model.set_attention_backend(name)
            try:  # the math kernel is slow at real sizes: one timed call is enough to rank it
                out[name] = time_fn(step, device, warmup=1, repeat=1 if name == "math" else 2)
            except RuntimeError as err:
                out[name] = first_line(err)
        model.set_attention_backend("default")
    out["auto_picked"] = attn.auto_choices()
    return out


def build_random(preset: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Random weights in a preset's real shapes, allocated once in `dtype` on `device` (meta first).

    `to_empty` leaves memory uninitialised and `init_weights` covers the Linear/conv weights only, so
    every parameter is drawn first and the norms and modulation tables are set as WanModel builds them.
    """
    model = build_flow_model(preset, device="meta").to(dtype)
    model.to_empty(device=device)
    with torch.no_grad():
        for param in model.parameters():  # anything init_weights leaves (e.g. the patch conv's bias)
            param.normal_(std=0.02)
    model.init_weights()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (WanRMSNorm, torch.nn.LayerNorm)) and module.weight is not None:
                module.weight.fill_(1.0)
            if isinstance(module, torch.nn.LayerNorm) and module.bias is not None:
                module.bias.zero_()
        for name, param in model.named_parameters():
            if name.endswith("modulation"):
                param.normal_(std=model.config.dim**-0.5)
    return model.eval()


def bench_dit(
    device: torch.device,
    cases: dict[str, tuple[str, tuple[int, ...]]],
    dtype: torch.dtype = torch.bfloat16,
    compile_blocks: bool = False,
    backends_on_first: bool = True,
    on_row: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """One-step DiT forward latency, MFU, tokens/s and peak memory per case (random weights, batch 1).

    The first call is the warm-up; with `compile_blocks`, `compile_s` is its time above a steady
    call: the compile cost. The first case also times the whole forward under each attention
    choice (`forward_by_backend`). `on_row(rows)` runs after every case (to save partial results).
    """
    rows = []
    peak = peak_tflops() if device.type == "cuda" else None
    for i, (name, (preset, shape)) in enumerate(cases.items()):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            model = build_random(preset, device, dtype)
            if compile_blocks:
                for block in model.blocks:
                    block.compile()
            cfg = model.config
            z = torch.randn(1, *shape, device=device, dtype=dtype)
            cond = WanCond(torch.randn(1, cfg.text_len, cfg.text_dim, device=device, dtype=dtype))
            step = partial(generate_one_step, model, z, cond)
            with torch.no_grad():
                start = time.perf_counter()
                finite = bool(torch.isfinite(step()).all())  # a NaN from a kernel would show here
                first = time.perf_counter() - start
                seconds = time_fn(step, device, warmup=int(compile_blocks), repeat=3 if cfg.dim > 4000 else 5)
            tokens = tokens_of(cfg, shape)
            flops = wan_forward_flops(cfg, tokens)
            row = {
                "case": name,
                "preset": preset,
                "latent_shape": [1, *shape],
                "dtype": str(dtype).removeprefix("torch."),
                "compiled": compile_blocks,
                "tokens": tokens,
                "tflop_per_forward": flops / 1e12,
                "seconds": seconds,
                "first_call_s": first,
                "output_finite": finite,
                "compile_s": first - seconds if compile_blocks else None,
                "compiled_graphs": _compiled_graphs() if compile_blocks else None,
                "ideal_seconds": flops / 1e12 / peak if peak else None,
                "mfu": flops / seconds / 1e12 / peak if peak else None,
                "tokens_per_s": tokens / seconds,
                "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
            }
            if i == 0 and backends_on_first and not compile_blocks:
                row["forward_s_by_sdpa_backend"] = forward_by_backend(model, z, cond, device)
            rows.append(row)
        except RuntimeError as err:  # out of memory (a RuntimeError too) or a kernel refusing the case
            rows.append({"case": name, "preset": preset, "latent_shape": [1, *shape], "error": error_text(err)})
        finally:
            model = z = cond = step = None  # free this case before the next is built
            sync(device)
        print(f"{name}: {rows[-1].get('seconds', rows[-1].get('error'))}", flush=True)
        if on_row:
            on_row(rows)
    return rows


def _compiled_graphs() -> int | None:
    """How many graphs dynamo captured so far (1: every block shares one compiled graph)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return None
    return int(counters["stats"]["unique_graphs"])


def gpu_checks(rows: list[dict]) -> dict:
    """Regression checks for the GPU baseline: eager MFU per case (higher is better). Compiled rows
    are recorded, not checked: compiling is optional, so a run without it must not count as missing."""
    return {f"{r['case']}.mfu": {"value": r["mfu"], "higher_is_better": True, "rel_tol": 0.15}
            for r in rows if r.get("mfu") and not r.get("compiled")}


def save_partial(results: dict, name: str, earlier: list[dict], rows: list[dict]) -> None:
    """Write what is measured so far, so a run stopped at its time limit still leaves its figures."""
    write_results(name, results | {"dit": earlier + rows, "partial": True})


def main(argv: list[str] | None = None) -> dict:
    """Run the inference benchmark, print its tables, write results/inference.json; return the results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny config only (CI-friendly)")
    parser.add_argument("--device", default=default_device(), help="where the DiT figures run (default: cuda if visible)")
    parser.add_argument("--rehearse", action="store_true", help="the GPU code path at stand-in sizes (CPU check)")
    parser.add_argument("--cases", help=f"comma-separated DiT cases (default: all of {', '.join(GPU_CASES)})")
    parser.add_argument("--compile", action="store_true", help="also time the DiT with torch.compile on each block")
    parser.add_argument("--only-compiled", action="store_true",
                        help="time only the compiled DiT of the (first) case: its own run, for bench/device_run.sh")
    parser.add_argument("--name", default="inference", help="results file name (results/<name>.json)")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU sampler comparison")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable on a shared machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results: dict = {"name": "inference", "dtype_cpu": "float32", "checks": {}}
    if args.only_compiled:
        args.no_cpu = True
    if not args.no_cpu:
        rows = bench_samplers_cpu(args.quick)
        print_table(
            "APT 1 step vs teacher 25 steps + CFG (CPU, fp32, same model)",
            rows,
            ["case", "tokens", "batch", "apt_1step_ms_per_sample", "teacher_25step_cfg_ms_per_sample", "speedup"],
        )
        results["samplers_cpu"] = rows
        results["checks"] |= {f"{r['case']}.speedup_1step_vs_25step_cfg": {"value": r["speedup"]} for r in rows}
    if device.type == "cuda" or args.rehearse:
        cases = REHEARSAL_CASES if args.rehearse else GPU_CASES
        if args.cases:
            unknown = set(args.cases.split(",")) - set(cases)
            if unknown:
                parser.error(f"unknown --cases {sorted(unknown)}; choose from {sorted(cases)}")
            cases = {k: v for k, v in cases.items() if k in args.cases.split(",")}
        first_preset, first_shape = next(iter(cases.values()))
        cfg = build_flow_model(first_preset, device="meta").config
        attn_shape = (1, cfg.num_heads, tokens_of(cfg, first_shape), cfg.head_dim)
        gpu_rows = []
        if not args.only_compiled:
            results["matmul_tflops_measured"] = measured_matmul_tflops(device)
            results["sdpa_backends"] = sdpa_backends_check(device, attn_shape, torch.bfloat16)
            print(f"\nmeasured bf16 matmul: {results['matmul_tflops_measured']} TFLOP/s")
            print("SDPA backends:", json.dumps(results["sdpa_backends"]))
            gpu_rows = bench_dit(device, cases, on_row=partial(save_partial, results, args.name, []))
        if args.compile or args.only_compiled:
            eager = list(gpu_rows)
            gpu_rows += bench_dit(device, dict(list(cases.items())[:1]), compile_blocks=True,
                                  on_row=partial(save_partial, results, args.name, eager))
        print_table(
            f"One-step Wan DiT forward, bf16, batch 1 ({machine_info().get('gpu', device.type)})",
            gpu_rows,
            ["case", "compiled", "tokens", "tflop_per_forward", "seconds", "ideal_seconds", "mfu", "tokens_per_s",
             "peak_mem_gib", "compile_s", "compiled_graphs", "error"],
        )
        results["dit"] = gpu_rows
        results["dit_device"] = str(device)
        results["rehearsal"] = args.rehearse
        results["checks"] |= gpu_checks(gpu_rows)
    path = write_results(args.name, results)
    print(f"\nwrote {path}")
    return results


if __name__ == "__main__":
    main()
