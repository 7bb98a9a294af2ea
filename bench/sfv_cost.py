"""Cost of one discriminator step: APT's D (full trainable copy) vs SF-V's D (frozen first half + heads).

Variants of `APTTrainer.d_step` on the same generator and batch:
- `apt`:       APTDiscriminator, mode full (the paper), approximated R1, non-saturating loss,
- `sfv`:       SFVDiscriminator (first half of the blocks, frozen), approximated R1, hinge loss,
- `sfv-exact`: the same with exact R1 at the noised input (SF-V's recipe; math-kernel double backward).

Method (as bench.r1_cost): every (case, variant) runs in a FRESH subprocess; median step time and
median process CPU time of `--steps` D steps after one warm-up step; the step's peak memory is the
rise above the memory held just before the first step, with G, D and D's optimiser state already
allocated (CPU: `ru_maxrss` over `VmRSS`; CUDA: `max_memory_allocated` over `memory_allocated`).
D's standing memory is counted exactly from its tensors: parameters (the backbone copy included) and
optimiser state. `total` = standing + step peak: what D costs beyond the generator. Ratios are SF-V
over APT from one run of this script.

    python -m bench.sfv_cost [--quick] [--device cuda] [--cases A,B] [--steps N] [--rehearse]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

import torch

from bench.r1_cost import CASES, GPU_CASES, REHEARSAL_CASES

ALL_CASES = {**CASES, **GPU_CASES, **REHEARSAL_CASES}
VARIANTS = ("apt", "sfv", "sfv-exact")
# at 81 frames exact R1's math-kernel attention needs ~170 GB and more: the approximated variants only
CASE_VARIANTS = {"wan1.3b-480p-81f": ("apt", "sfv")}
CASE_STEPS = {"wan1.3b-480p-81f": 1}
WORKER_TIMEOUT_S = 50  # a GPU variant that runs longer is recorded as stopped, not waited for


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def run_worker(case: str, variant: str, device: str, steps: int, threads: int) -> dict:
    """Build G and one D, take warm-up + `steps` D steps; return time, standing and peak memory."""
    from apt_core.backbone import WanCond, build_flow_model
    from apt_core.discriminator import APTDiscriminator
    from apt_core.sfv import SFVDiscriminator
    from apt_core.trainer import APTConfig, APTTrainer, make_rmsprop
    from bench.common import error_text, rss_bytes, tokens_of

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    preset, shape, batch = ALL_CASES[case]
    gpu_path = case not in CASES  # bf16 autocast + activation checkpointing, as training runs on CUDA
    gen = build_flow_model(preset, device=dev)
    gen.gradient_checkpointing = gpu_path  # the D copies inherit it
    amp = "bf16" if gpu_path else None
    if variant == "apt":
        D = APTDiscriminator(gen)
        cfg = APTConfig(r1_sigma=0.01, autocast_dtype=amp)
    else:
        D = SFVDiscriminator(gen)
        cfg = APTConfig(loss="hinge", r1_sigma=0.01, r1_mode="exact" if variant == "sfv-exact" else "approx", autocast_dtype=amp)
    opt_d = make_rmsprop(D.trainable_parameters(), 1e-5)
    trainer = APTTrainer(gen, D, make_rmsprop(gen.parameters(), 1e-5), opt_d, cfg)
    x = torch.randn(batch, *shape, device=dev)
    c = WanCond(torch.randn(batch, gen.config.text_len, gen.config.text_dim, device=dev))
    for p in D.trainable_parameters():  # allocate the optimiser state now (a zero-grad step moves nothing)
        p.grad = torch.zeros_like(p)
    opt_d.step()
    opt_d.zero_grad(set_to_none=True)
    opt_bytes = _bytes(v for s in opt_d.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim > 0)

    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
    row = {"case": case, "variant": variant, "preset": preset, "shape": [batch, *shape], "tokens": tokens_of(gen.config, shape),
           "dtype": "bf16 autocast" if gpu_path else "float32", "activation_checkpointing": gpu_path, "timed_steps": steps,
           "loss": cfg.loss, "r1_mode": cfg.r1_mode,
           "d_blocks": len(D.backbone.blocks), "d_params": sum(p.numel() for p in D.parameters()),
           "d_params_trainable": sum(p.numel() for p in D.trainable_parameters()),
           "d_params_mib": _bytes(D.parameters()) / 2**20, "d_optimizer_mib": opt_bytes / 2**20}
    times, cpu_times = [], []
    try:
        for i in range(steps + 1):
            start, cpu_start = time.perf_counter(), time.process_time()
            m = trainer.d_step(x, c)
            float(m["d_loss"])  # sync
            if i > 0:
                times.append(time.perf_counter() - start)
                cpu_times.append(time.process_time() - cpu_start)
    except RuntimeError as err:  # record what happens (OOM is a RuntimeError)
        return row | {"error": error_text(err)}
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return row | {
        "step_ms": 1e3 * statistics.median(times),
        "step_cpu_ms": 1e3 * statistics.median(cpu_times),
        "peak_mib": peak / 2**20,
        "total_mib": row["d_params_mib"] + row["d_optimizer_mib"] + peak / 2**20,
        "finite": bool(torch.isfinite(m["d_loss"]).item()),
    }


def main(argv: list[str] | None = None) -> dict:
    """Run every (case, variant) in its own process, print the table, write results/sfv_cost.json."""
    from bench.common import add_ratios, default_device, print_table, spawn_worker, write_results

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

    # on CUDA the 81-frame case first: the real clip length is where the memory matters
    cases = list(REHEARSAL_CASES if args.rehearse else reversed(GPU_CASES) if cuda else CASES)
    if args.cases:
        unknown = set(args.cases.split(",")) - set(ALL_CASES)
        if unknown:
            parser.error(f"unknown --cases {sorted(unknown)}; choose from {sorted(ALL_CASES)}")
        cases = args.cases.split(",")
    elif args.quick:
        cases = cases[:1]
    rows = []
    for case in cases:
        for variant in CASE_VARIANTS.get(case, VARIANTS):
            rows.append(spawn_worker("bench.sfv_cost", case, variant, args, CASE_STEPS.get(case, args.steps),
                                     must_run=case in CASES, timeout=None if case in CASES else WORKER_TIMEOUT_S))
            print(f"{case}/{variant}: {rows[-1].get('step_ms', rows[-1].get('error'))}", flush=True)
            write_results("sfv_cost", {"name": "sfv_cost", "device": args.device, "rows": rows, "partial": True})
    add_ratios(rows, "apt", {"time": "step_ms", "cpu": "step_cpu_ms", "mem": "peak_mib", "total": "total_mib"})
    print_table(
        f"D step: APT's discriminator vs SF-V's ({args.device}, 1 process per variant)",
        rows,
        ["case", "variant", "dtype", "shape", "d_blocks", "d_params_trainable", "d_params_mib", "d_optimizer_mib", "step_ms",
         "step_cpu_ms", "peak_mib", "total_mib", "time_vs_apt", "cpu_vs_apt", "mem_vs_apt", "total_vs_apt", "error"],
    )
    # what SF-V's D costs over APT's (lower is better): CPU time on CPU, wall time on CUDA; memory
    kinds = ("time", "mem", "total") if cuda else ("cpu", "mem", "total")
    results = {
        "name": "sfv_cost",
        "command": " ".join(["python -m bench.sfv_cost", *(sys.argv[1:] if argv is None else argv)]),
        "device": args.device,
        "rehearsal": args.rehearse,
        "steps": args.steps,
        "threads": args.threads,
        "method": "fresh subprocess per variant; median step time after 1 warm-up; peak = "
        + ("cuda max_memory_allocated - memory_allocated before the first step" if cuda
           else "ru_maxrss - VmRSS before the first step")
        + " (G, D, D's optimiser state allocated); total = D parameters + D optimiser state + peak",
        "rows": rows,
        "checks": {
            f"{r['case']}.sfv_{kind}_vs_apt": {"value": r[f"{kind}_vs_apt"], "higher_is_better": False}
            for r in rows
            if r["variant"] == "sfv"
            for kind in kinds
            if f"{kind}_vs_apt" in r
        },
    }
    path = write_results("sfv_cost", results)
    print(f"\nwrote {path}")
    return results


if __name__ == "__main__":
    main()
