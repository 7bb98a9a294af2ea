"""`python -m training.demo [--quick]`: the paper's comparison on real digits, on a CPU, end to end.

From the committed teacher (`assets/teacher.safetensors`) it runs, through the headless trainer and
the `configs/demo_*.toml` configs: consistency distillation (stage 1), APT on images, APT on clips
(G from the best image EMA, D fresh from the teacher), APT without aR1 (lambda 0) and the EMA-only
control (CD continued with APT's EMA, no discriminator). EMA checkpoints are picked on the
validation split; every row is then evaluated on the test split over several noise seeds. Writes
`outputs/demo/` (report.md/json, PNG grids, GIF/MP4 clips, curves), prints the time taken and exits
with status 1 naming every acceptance check that missed (`--quick` only checks that APT beats CD).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from training.demo.pipeline import ROOT, TEACHER_PATH


@dataclass
class Settings:
    """Step counts and evaluation sizes; `quick()` is the CI variant."""

    cd_steps: int = 600
    apt_image_steps: int = 500  # the EMA-only control runs as many updates
    apt_video_steps: int = 250
    no_r1_steps: int = 800  # run on past APT's length: without aR1 the damage grows with updates
    every: int = 25  # EMA checkpoint / validation interval
    seeds: tuple[int, ...] = (0, 1, 2)
    n_image: int = 0  # test samples per seed (0 = the whole test split)
    n_video: int = 200
    n_val: int = 0
    cfg_scales: tuple[float, ...] = (1.0, 1.5, 2.0, 4.0)
    teacher_steps: int = 25
    two_step_t: float = 0.5
    timing_batch: int = 64
    workers: int = 2  # the stage-2 runs (APT images then clips; no-aR1, then EMA-only control) side by side
    quick: bool = False

    @classmethod
    def quick_mode(cls) -> Settings:
        return cls(cd_steps=60, apt_image_steps=80, apt_video_steps=10, no_r1_steps=20, every=20, seeds=(0, 1),
                   n_image=120, n_video=40, n_val=120, cfg_scales=(1.0, 2.0), timing_batch=16, quick=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m training.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shortened run for CI (a few minutes); thresholds not enforced")
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "demo", help="output folder (default outputs/demo)")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch CPU threads (default 2); the parallel stage-2 workers get threads // workers each")
    ap.add_argument("--workers", type=int, default=2,
                    help="processes for the independent stage-2 runs (default 2, one per core; 1 = one after another)")
    ap.add_argument("--teacher", type=Path, default=TEACHER_PATH, help="teacher weights (default: the committed one)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings.quick_mode() if args.quick else Settings()
    settings.workers = args.workers
    torch.set_num_threads(args.threads)
    if not args.teacher.is_file():
        print(f"teacher weights {args.teacher} not found; re-create them with `python -m training.demo.make_teacher --install`",
              file=sys.stderr)
        return 2
    from training.demo.run import run_demo

    t0 = time.perf_counter()
    results = run_demo(args.out, settings, args.teacher, t0)
    minutes = (time.perf_counter() - t0) / 60
    print(f"\n[demo] report: {args.out / 'report.md'}")
    print(f"[demo] time taken: {minutes:.1f} min ({args.threads} CPU thread(s), {args.workers} worker process(es))")
    missed = [c for c in results["checks"] if not c["passed"]]
    for c in results["checks"]:
        print(f"[demo] {'pass' if c['passed'] else 'MISS'}: {c['name']} ({c['row']}): {c['value']:.3f} vs {c['threshold']}")
    if missed:
        print("[demo] FAILED: " + "; ".join(f"{c['row']}: {c['name']}" for c in missed), file=sys.stderr)
        return 1
    print(f"[demo] all {len(results['checks'])} acceptance checks passed")
    return 0


def settings_dict(s: Settings) -> dict:
    return asdict(s)


if __name__ == "__main__":
    sys.exit(main())
