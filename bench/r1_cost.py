"""Cost of the R1 penalty in one APT discriminator step: approximated R1 (APT) vs exact R1.

Variants of `APTTrainer.d_step` on the same models and batch:
- `none`:   adversarial loss only (the floor),
- `approx`: + approximated R1, one D forward over cat([real, fake, real + sigma n]) (APT eq. 5),
- `exact`:  + exact R1, grad_x D by autograd.grad(create_graph=True) and a double backward
            (SDPA math kernel, the only one with a double backward).

Method. Every (case, variant) runs in a FRESH subprocess so peaks do not leak between variants.
Time: median wall time and median process CPU time (`time.process_time`) of `--steps` D steps
after one warm-up step; with one torch thread (the default) CPU time is the compute and is the
figure to trust on a shared machine, where wall time also counts waiting for a core. Peak memory: on CPU, the rise
of the process's peak resident set size (`resource.getrusage(RUSAGE_SELF).ru_maxrss`) above the
resident size (`VmRSS`) measured just before the first step, with the models built and the RMSProp
state already allocated; tracemalloc does not see torch's allocator and torch.profiler's per-op
records do not give a peak, so RSS is the honest CPU number (it includes allocator slack, and
memory freed back to glibc before the baseline can hide a little of the rise). On CUDA: the rise of
`torch.cuda.max_memory_allocated()` above `memory_allocated()` at the same point.
The ratio exact / approx is computed from one run of this script.

    python -m bench.r1_cost [--quick] [--device cuda] [--cases A,B] [--steps N] [--rehearse]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

import torch

CASES = {
    # name: (preset, latent shape [C, F, H, W], batch)
    "tiny": ("tiny", (16, 3, 16, 16), 4),
    "small": ("small", (16, 2, 16, 16), 2),
}
# CUDA: Wan 2.1 1.3B at 480p, bf16 autocast, per-block activation checkpointing. One frame (latent
# F=1, 1,560 tokens: APT's image phase), where exact R1 fits: its math-kernel double backward keeps
# about three fp32 N x N matrices per attention layer alive (~21 GB here, ~176 GB at 9 frames). And
# the real 81 frames (32,760 tokens), where exact R1 is expected to run out of memory: recorded.
GPU_CASES = {
    "wan1.3b-480p-1f": ("wan2.1-t2v-1.3b", (16, 1, 60, 104), 1),
    "wan1.3b-480p-81f": ("wan2.1-t2v-1.3b", (16, 21, 60, 104), 1),
}
# at 81 frames (device time): no no-R1 floor, and one timed step after the warm-up
CASE_VARIANTS = {"wan1.3b-480p-81f": ("approx", "exact")}
CASE_STEPS = {"wan1.3b-480p-81f": 1}
# The CUDA code path (bf16 autocast + checkpointing) at a stand-in size, for `--rehearse` on CPU.
REHEARSAL_CASES = {"tiny-comfy-rehearsal": ("tiny-comfy", (16, 3, 8, 8), 2)}
ALL_CASES = {**CASES, **GPU_CASES, **REHEARSAL_CASES}
VARIANTS = ("none", "approx", "exact")
WORKER_TIMEOUT_S = 50  # a GPU variant that runs longer is recorded as stopped, not waited for


def double_backward_support(device: torch.device | str, dtype: torch.dtype = torch.float32) -> dict:
    """Which SDPA backends give a double backward (what exact R1 needs), on a small attention.

    For each backend forced alone: forward, `autograd.grad(create_graph=True)` to q, then a backward
    of the gradient's norm. Records "ok" or the first line of the error.
    """
    from torch.nn.attention import sdpa_kernel

    from apt_core.models.attention import BACKENDS
    from bench.common import first_line

    out = {}
    g = torch.Generator(device="cpu").manual_seed(0)
    for backend in BACKENDS.values():
        q, k, v = (torch.randn(1, 2, 64, 64, generator=g).to(device, dtype).requires_grad_(True) for _ in range(3))
        try:
            with sdpa_kernel([backend]):
                y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
                (grad_q,) = torch.autograd.grad(y.float().square().sum(), q, create_graph=True)
                grad_q.float().square().sum().backward()
            out[backend.name] = "ok" if k.grad is not None else "no second-order gradient reached k"
        except RuntimeError as err:
            out[backend.name] = first_line(err, 200)
    return out


def run_worker(case: str, variant: str, device: str, steps: int, threads: int) -> dict:
    """Build G and D, take warm-up + `steps` D steps of one variant; return time and peak memory."""
    from apt_core.backbone import WanCond, build_flow_model
    from apt_core.discriminator import APTDiscriminator
    from apt_core.trainer import APTConfig, APTTrainer, make_rmsprop
    from bench.common import error_text, rss_bytes, tokens_of

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    preset, shape, batch = ALL_CASES[case]
    gpu_path = case not in CASES  # bf16 autocast + activation checkpointing, as training runs on CUDA
    gen = build_flow_model(preset, device=dev)
    gen.gradient_checkpointing = gpu_path
    D = APTDiscriminator(gen)
    cfg = APTConfig(r1_lambda=0.0 if variant == "none" else 100.0, r1_sigma=0.01, r1_mode="exact" if variant == "exact" else "approx",
                    autocast_dtype="bf16" if gpu_path else None)
    opt_d = make_rmsprop(D.trainable_parameters(), 1e-5)
    trainer = APTTrainer(gen, D, make_rmsprop(gen.parameters(), 1e-5), opt_d, cfg)
    x = torch.randn(batch, *shape, device=dev)
    c = WanCond(torch.randn(batch, gen.config.text_len, gen.config.text_dim, device=dev))
    # allocate RMSProp's state now (a zero-grad step moves nothing) so the baseline includes it
    for p in D.trainable_parameters():
        p.grad = torch.zeros_like(p)
    opt_d.step()
    opt_d.zero_grad(set_to_none=True)

    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
    row = {"case": case, "variant": variant, "preset": preset, "shape": [batch, *shape],
           "tokens": tokens_of(gen.config, shape), "dtype": "bf16 autocast" if gpu_path else "float32",
           "activation_checkpointing": gpu_path, "d_forward_batch": batch * (3 if variant == "approx" else 2),
           "timed_steps": steps,
           "d_params_trainable": sum(p.numel() for p in D.trainable_parameters())}
    times, cpu_times = [], []
    try:
        for i in range(steps + 1):
            start, cpu_start = time.perf_counter(), time.process_time()
            m = trainer.d_step(x, c)
            float(m["d_loss"])  # sync
            if i > 0:
                times.append(time.perf_counter() - start)
                cpu_times.append(time.process_time() - cpu_start)
    except RuntimeError as err:  # exact R1 at the real shape: record what happens (OOM is a RuntimeError)
        return row | {"error": error_text(err)}
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return row | {
        "step_ms": 1e3 * statistics.median(times),
        "step_cpu_ms": 1e3 * statistics.median(cpu_times),
        "peak_mib": peak / 2**20,
    }


def _spawn(case: str, variant: str, args: argparse.Namespace) -> dict:
    from bench.common import spawn_worker

    return spawn_worker("bench.r1_cost", case, variant, args, CASE_STEPS.get(case, args.steps), must_run=case in CASES,
                        timeout=None if case in CASES else WORKER_TIMEOUT_S)


def main(argv: list[str] | None = None) -> dict:
    """Run every (case, variant) in its own process, print the table, write results/r1_cost.json."""
    from bench.common import add_ratios, default_device, print_table, write_results

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one case only (tiny on CPU, 1 frame on CUDA)")
    parser.add_argument("--device", default=default_device(), help="cpu or cuda (default: cuda if visible)")
    parser.add_argument("--rehearse", action="store_true", help="the CUDA code path at a stand-in size (CPU check)")
    parser.add_argument("--cases", help="comma-separated cases (default: the device's set)")
    parser.add_argument("--steps", type=int, default=None, help="timed D steps per variant after 1 warm-up (3 CPU, 2 CUDA)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per worker")
    parser.add_argument("--worker", nargs=2, metavar=("CASE", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.steps = args.steps or (2 if cuda else 3)
    if args.worker:
        print("RESULT " + json.dumps(run_worker(*args.worker, args.device, args.steps, args.threads)))
        return {}

    cases = list(REHEARSAL_CASES if args.rehearse else GPU_CASES if cuda else CASES)
    if args.cases:
        unknown = set(args.cases.split(",")) - set(ALL_CASES)
        if unknown:
            parser.error(f"unknown --cases {sorted(unknown)}; choose from {sorted(ALL_CASES)}")
        cases = args.cases.split(",")
    elif args.quick:
        cases = cases[:1]
    probe_dtype = torch.bfloat16 if cuda else torch.float32
    double_backward = double_backward_support(args.device, probe_dtype)
    print(f"SDPA double backward ({args.device}, {probe_dtype}): {json.dumps(double_backward)}")
    rows = []
    for case in cases:
        for variant in CASE_VARIANTS.get(case, VARIANTS):
            rows.append(_spawn(case, variant, args))
            print(f"{case}/{variant}: {rows[-1].get('step_ms', rows[-1].get('error'))}", flush=True)
            write_results("r1_cost", {"name": "r1_cost", "device": args.device, "rows": rows, "partial": True})
    add_ratios(rows, "approx", {"time": "step_ms", "cpu": "step_cpu_ms", "mem": "peak_mib"})
    print_table(
        f"APT D step: approximated vs exact R1 ({args.device}, 1 process per variant)",
        rows,
        ["case", "variant", "dtype", "shape", "tokens", "d_forward_batch", "step_ms", "step_cpu_ms", "peak_mib",
         "time_vs_approx", "cpu_vs_approx", "mem_vs_approx", "error"],
    )
    # Machine-stable ratios for the suite's regression check: what exact R1 costs over aR1
    # (process CPU time on CPU, where it is the compute; wall time on CUDA).
    kinds = ("time", "mem") if cuda else ("cpu", "mem")
    results = {
        "name": "r1_cost",
        "command": " ".join(["python -m bench.r1_cost", *(sys.argv[1:] if argv is None else argv)]),
        "device": args.device,
        "rehearsal": args.rehearse,
        "steps": args.steps,
        "threads": args.threads,
        "method": "fresh subprocess per variant; median step time after 1 warm-up; peak = "
        + ("cuda max_memory_allocated - memory_allocated before the first step" if cuda
           else "ru_maxrss - VmRSS before the first step (models and RMSProp state already allocated)"),
        "sdpa_double_backward": {"dtype": str(probe_dtype).removeprefix("torch."), **double_backward},
        "rows": rows,
        "checks": {
            f"{r['case']}.exact_r1_{kind}_vs_approx": {"value": r[f"{kind}_vs_approx"], "higher_is_better": True}
            for r in rows
            if r["variant"] == "exact"
            for kind in kinds
            if f"{kind}_vs_approx" in r
        },
    }
    path = write_results("r1_cost", results)
    print(f"\nwrote {path}")
    return results


if __name__ == "__main__":
    main()
