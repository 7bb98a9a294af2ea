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
resident size (`VmRSS`) measured just before the first step, with the models built and the Adam
state already allocated; tracemalloc does not see torch's allocator and torch.profiler's per-op
records do not give a peak, so RSS is the honest CPU number (it includes allocator slack, and
memory freed back to glibc before the baseline can hide a little of the rise). On CUDA: the rise of
`torch.cuda.max_memory_allocated()` above `memory_allocated()` at the same point.
The ratio exact / approx is computed from one run of this script.

    python -m bench.r1_cost [--quick] [--device cuda] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

CASES = {
    # name: (preset, latent shape [C, F, H, W], batch)
    "tiny": ("tiny", (16, 3, 16, 16), 4),
    "small": ("small", (16, 2, 16, 16), 2),
}
VARIANTS = ("none", "approx", "exact")


def _rss_bytes() -> int:
    """Current resident set size (Linux /proc/self/status VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found in /proc/self/status (Linux only)")


def run_worker(case: str, variant: str, device: str, steps: int, threads: int) -> dict:
    """Build G and D, take warm-up + `steps` D steps of one variant; return time and peak memory."""
    from apt_core.backbone import WanCond, build_flow_model
    from apt_core.discriminator import APTDiscriminator
    from apt_core.trainer import APTConfig, APTTrainer, make_rmsprop
    from bench.common import tokens_of

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    preset, shape, batch = CASES[case]
    gen = build_flow_model(preset, device=dev)
    D = APTDiscriminator(gen)
    cfg = APTConfig(r1_lambda=0.0 if variant == "none" else 100.0, r1_sigma=0.01, r1_mode="exact" if variant == "exact" else "approx")
    opt_d = make_rmsprop(D.trainable_parameters(), 1e-5)
    trainer = APTTrainer(gen, D, make_rmsprop(gen.parameters(), 1e-5), opt_d, cfg)
    x = torch.randn(batch, *shape, device=dev)
    c = WanCond(torch.randn(batch, gen.config.text_len, gen.config.text_dim, device=dev))
    # allocate Adam's state now (a zero-grad step moves nothing) so the baseline includes it
    for p in D.trainable_parameters():
        p.grad = torch.zeros_like(p)
    opt_d.step()
    opt_d.zero_grad(set_to_none=True)

    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    times, cpu_times = [], []
    for i in range(steps + 1):
        start, cpu_start = time.perf_counter(), time.process_time()
        m = trainer.d_step(x, c)
        float(m["d_loss"])  # sync
        if i > 0:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times.sort()
    cpu_times.sort()
    return {
        "case": case,
        "variant": variant,
        "preset": preset,
        "shape": [batch, *shape],
        "tokens": tokens_of(gen.config, shape),
        "d_params_trainable": sum(p.numel() for p in D.trainable_parameters()),
        "step_ms": 1e3 * times[len(times) // 2],
        "step_cpu_ms": 1e3 * cpu_times[len(cpu_times) // 2],
        "peak_mib": peak / 2**20,
        "d_forward_batch": batch * (3 if variant == "approx" else 2),
    }


def _spawn(case: str, variant: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "bench.r1_cost", "--worker", case, variant,
           "--device", args.device, "--steps", str(args.steps), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if out.returncode != 0:
        raise RuntimeError(f"worker {case}/{variant} failed (exit {out.returncode}):\n{out.stderr[-2000:]}")
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main(argv: list[str] | None = None) -> dict:
    """Run every (case, variant) in its own process, print the table, write bench/results/r1_cost.json."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny case only")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--steps", type=int, default=3, help="timed D steps per variant (after 1 warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per worker")
    parser.add_argument("--worker", nargs=2, metavar=("CASE", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(run_worker(*args.worker, args.device, args.steps, args.threads)))
        return {}

    from bench.common import print_table, write_results

    cases = ["tiny"] if args.quick else list(CASES)
    rows = [_spawn(case, variant, args) for case in cases for variant in VARIANTS]
    for case in cases:
        by = {r["variant"]: r for r in rows if r["case"] == case}
        for r in by.values():
            r["time_vs_approx"] = r["step_ms"] / by["approx"]["step_ms"]
            r["cpu_vs_approx"] = r["step_cpu_ms"] / by["approx"]["step_cpu_ms"]
            r["mem_vs_approx"] = r["peak_mib"] / max(by["approx"]["peak_mib"], 1e-9)
    print_table(
        f"APT D step: approximated vs exact R1 ({args.device}, float32, 1 process per variant)",
        rows,
        ["case", "variant", "shape", "tokens", "d_forward_batch", "step_ms", "step_cpu_ms", "peak_mib",
         "time_vs_approx", "cpu_vs_approx", "mem_vs_approx"],
    )
    results = {
        "name": "r1_cost",
        "command": " ".join(["python -m bench.r1_cost", *(sys.argv[1:] if argv is None else argv)]),
        "device": args.device,
        "dtype": "float32",
        "steps": args.steps,
        "threads": args.threads,
        "method": "fresh subprocess per variant; median step time after 1 warm-up; peak = "
        + ("cuda max_memory_allocated - memory_allocated before the first step" if args.device == "cuda"
           else "ru_maxrss - VmRSS before the first step (models and Adam state already allocated)"),
        "rows": rows,
        # Machine-stable ratios for the suite's regression check: what exact R1 costs over aR1.
        "checks": {
            f"{r['case']}.exact_r1_{kind}_vs_approx": {"value": r[f"{kind}_vs_approx"], "higher_is_better": True}
            for r in rows
            if r["variant"] == "exact"
            for kind in ("cpu", "mem")
        },
    }
    path = write_results("r1_cost", results)
    print(f"\nwrote {path}")
    return results


if __name__ == "__main__":
    main()
