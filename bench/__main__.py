"""The benchmark suite: `python -m bench [--quick] [--only NAME ...] [--check] [--write-baseline]`.

Runs each benchmark (printing its table and writing `bench/results/<name>.json`), then collects the
side-by-side ratios every benchmark reports under "checks". `--check` compares those ratios with the
stored baseline (`bench/baseline_cpu.json`, or `baseline_gpu.json` on CUDA) within its tolerance and
exits non-zero on a regression; `--write-baseline` stores the current ratios as the new baseline.
Ratios, not absolute times, are compared on CPU: they are what stays stable across machines.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import torch

from apt_core.fileio import atomic_write_text
from bench.common import write_results

BENCHMARKS = ["inference", "r1_cost", "trainer_scaling"]
HERE = Path(__file__).resolve().parent


def baseline_path() -> Path:
    """The stored ratios to compare with: one file for CPU runs, one for CUDA runs."""
    return HERE / ("baseline_gpu.json" if torch.cuda.is_available() else "baseline_cpu.json")


def compare(checks: dict[str, float], baseline: dict) -> list[str]:
    """Regressions: each baseline entry {value, higher_is_better, rel_tol} against the measured value."""
    failures = []
    for name, ref in baseline.get("checks", {}).items():
        if name not in checks:
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


def main(argv: list[str] | None = None) -> int:
    """Run the suite; with --check, exit 1 on a regression against the stored baseline (2 without one)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU-friendly sizes (well under 3 minutes)")
    parser.add_argument("--only", nargs="*", choices=BENCHMARKS, help="run only these benchmarks")
    parser.add_argument("--check", action="store_true", help="compare ratios with the stored baseline")
    parser.add_argument("--write-baseline", action="store_true", help="store the measured ratios as baseline")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    checks: dict[str, float] = {}
    directions: dict[str, bool] = {}
    for name in args.only or BENCHMARKS:
        module = importlib.import_module(f"bench.{name}")
        print(f"\n=== bench.{name} ===")
        result = module.main(["--quick"] if args.quick else [])
        for key, spec in (result or {}).get("checks", {}).items():
            checks[f"{name}.{key}"] = float(spec["value"])
            directions[f"{name}.{key}"] = bool(spec.get("higher_is_better", True))
    elapsed = time.perf_counter() - start
    summary = {"name": "suite", "quick": args.quick, "seconds": elapsed, "checks": checks}
    print(f"\nsuite finished in {elapsed:.1f} s; results in {write_results('suite', summary).parent}")

    if args.write_baseline:
        base = {"checks": {k: {"value": v, "higher_is_better": directions[k], "rel_tol": 0.5} for k, v in checks.items()}}
        atomic_write_text(baseline_path(), json.dumps(base, indent=2) + "\n")
        print(f"wrote baseline {baseline_path()}")
    if args.check:
        path = baseline_path()
        if not path.exists():
            print(f"no baseline at {path}; run with --write-baseline first", file=sys.stderr)
            return 2
        print(f"\nchecking against {path}")
        failures = compare(checks, json.loads(path.read_text()))
        if failures:
            print(f"{len(failures)} regression(s): {', '.join(failures)}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
