"""The benchmark suite: `python -m bench [--quick] [--only NAME ...] [--check] [--write-baseline]`.

Runs each benchmark (printing its table and writing `bench/results/<name>.json`, or `--out DIR`),
then collects the figures every benchmark reports under "checks". `--check` compares them with the
stored baseline (`bench/baseline_cpu.json`, or `baseline_gpu.json` on CUDA) within its tolerance and
exits non-zero on a regression; `--write-baseline` stores the current figures as the new baseline.
On CPU the checks are side-by-side ratios (they stay stable across machines); on CUDA, MFU.

On a GPU the suite runs the real Wan shapes (inference, then the training iteration, then R1 cost,
then the D step of APT's discriminator vs SF-V's).
`--rehearse` runs those same GPU code paths on CPU at stand-in sizes, to find a crash before a
device session is spent on it (tests/bench runs it in CI).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path

import torch

from apt_core.fileio import atomic_write_text
from bench.common import RESULTS_ENV, machine_info, write_results

BENCHMARKS = ["inference", "trainer_scaling", "r1_cost", "sfv_cost"]  # on a GPU: the headline figures first
HERE = Path(__file__).resolve().parent


def baseline_path() -> Path:
    """The stored ratios to compare with: one file for CPU runs, one for CUDA runs."""
    return HERE / ("baseline_gpu.json" if torch.cuda.is_available() else "baseline_cpu.json")


def compare(checks: dict[str, float], baseline: dict, ran: list[str] | None = None) -> list[str]:
    """Regressions: each baseline entry {value, higher_is_better, rel_tol} against the measured value.

    A baseline figure of a benchmark that ran (`ran`; default all) but is missing now, because
    that case failed or ran out of memory, counts as a regression too.
    """
    failures = []
    for name, ref in baseline.get("checks", {}).items():
        if ran is not None and name.split(".", 1)[0] not in ran:
            continue
        if name not in checks:
            print(f"  {'MISSING':10s} {name}: not measured in this run (baseline {ref['value']:.4g})")
            failures.append(name)
            continue
        value, tol = checks[name], ref.get("rel_tol", 0.5)
        if ref.get("higher_is_better", True):
            ok = value >= ref["value"] * (1 - tol)
        else:
            ok = value <= ref["value"] * (1 + tol)
        status = "ok" if ok else "REGRESSION"
        print(f"  {status:10s} {name}: {value:.4g} (baseline {ref['value']:.4g}, rel_tol {tol})")
        if not ok:
            failures.append(name)
    return failures


def run_suite(args: argparse.Namespace) -> tuple[dict[str, dict], list[str]]:
    """Run the chosen benchmarks in order; return their checks ("<benchmark>.<key>" -> spec) and names."""
    checks: dict[str, dict] = {}
    cuda = torch.cuda.is_available()
    ran = args.only or BENCHMARKS
    for name in ran:
        module = importlib.import_module(f"bench.{name}")
        print(f"\n=== bench.{name} ===", flush=True)
        module_argv = ["--quick"] * args.quick + ["--rehearse"] * args.rehearse
        if name == "inference":
            module_argv += ["--compile"] * args.compile + ["--no-cpu"] * (cuda or args.rehearse)
        result = module.main(module_argv)
        checks |= {f"{name}.{key}": spec for key, spec in (result or {}).get("checks", {}).items()}
    return checks, ran


def collect(folder: Path) -> tuple[dict[str, dict], list[str], dict]:
    """Checks of the results JSON already in `folder` (e.g. what bench/device_run.sh brought back),
    keyed as a suite run keys them; also the benchmarks found and the machine they ran on."""
    checks: dict[str, dict] = {}
    ran: list[str] = []
    machine: dict = {}
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        name = data.get("name") if isinstance(data, dict) else None
        if name not in BENCHMARKS:
            continue
        ran.append(name)
        machine = machine or data.get("machine", {})
        checks |= {f"{name}.{key}": spec for key, spec in data.get("checks", {}).items()}
    if not ran:
        raise SystemExit(f"--collect {folder}: no benchmark results (*.json named {BENCHMARKS}) there")
    return checks, sorted(set(ran)), machine


def main(argv: list[str] | None = None) -> int:
    """Run the suite; with --check, exit 1 on a regression against the stored baseline (2 without one)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU-friendly sizes (well under 3 minutes)")
    parser.add_argument("--only", nargs="*", choices=BENCHMARKS, help="run only these benchmarks")
    parser.add_argument("--check", action="store_true", help="compare the figures with the stored baseline")
    parser.add_argument("--write-baseline", nargs="?", const="", metavar="PATH",
                        help="store the measured figures as the baseline (default path: the device's bench/baseline_*.json)")
    parser.add_argument("--rehearse", action="store_true", help="the GPU code paths on CPU at stand-in sizes")
    parser.add_argument("--compile", action="store_true", help="inference: also time torch.compile'd blocks")
    parser.add_argument("--out", type=Path, help="write the results JSON here instead of bench/results/")
    parser.add_argument("--collect", type=Path, metavar="DIR",
                        help="run nothing: take the figures from results JSON already in DIR (then --check / --write-baseline)")
    parser.add_argument("--baseline", type=Path, help="the baseline for --check (default: the device's bench/baseline_*.json)")
    args = parser.parse_args(argv)
    if args.rehearse and (args.check or args.write_baseline is not None):
        parser.error("--rehearse checks that the GPU code paths run; it has no baseline (drop --check/--write-baseline)")
    if args.out:
        os.environ[RESULTS_ENV] = str(args.out.resolve())  # the benchmarks' subprocesses inherit it

    if args.collect:
        specs, ran, machine = collect(args.collect)
        print(f"collected {len(specs)} figures of {', '.join(ran)} from {args.collect}")
    else:
        start = time.perf_counter()
        specs, ran = run_suite(args)
        elapsed = time.perf_counter() - start
        summary = {"name": "suite", "quick": args.quick, "rehearsal": args.rehearse, "seconds": elapsed,
                   "checks": {k: float(v["value"]) for k, v in specs.items()}}
        print(f"\nsuite finished in {elapsed:.1f} s; results in {write_results('suite', summary).parent}")
        machine = machine_info()
    checks = {k: float(v["value"]) for k, v in specs.items()}

    if args.write_baseline is not None:
        base = {"machine": machine, "checks": {
            k: {"value": v, "higher_is_better": bool(specs[k].get("higher_is_better", True)),
                "rel_tol": float(specs[k].get("rel_tol", 0.5))} for k, v in checks.items()}}
        target = Path(args.write_baseline) if args.write_baseline else baseline_path()
        atomic_write_text(target, json.dumps(base, indent=2) + "\n")
        print(f"wrote baseline {target}")
    if args.check:
        path = args.baseline or baseline_path()
        if not path.exists():
            print(f"no baseline at {path}; run with --write-baseline first", file=sys.stderr)
            return 2
        print(f"\nchecking against {path}")
        failures = compare(checks, json.loads(path.read_text()), ran=ran)
        if failures:
            print(f"{len(failures)} regression(s): {', '.join(failures)}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
