"""Re-create the committed demo teacher: `python -m training.demo.make_teacher [--steps N] [--threads T]`.

1. writes the teacher's shards from the digits train split (images + 5-frame clips, 10 % empty
   captions) and a seeded init of the demo architecture (`pipeline.demo_wan_config`);
2. runs the `teacher` stage through the headless trainer (`configs/demo_teacher.toml`, i.e.
   `python -m training --config configs/demo_teacher.toml`) once per segment of a step-decayed
   learning-rate schedule (the stage's lr is constant): each segment starts from the previous
   segment's exported EMA weights with a fresh optimiser;
3. copies the exported EMA weights to `training/demo/assets/teacher.safetensors` (with `--install`)
   and prints its validation Frechet distance at 25 steps.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

from training.demo.pipeline import (
    ROOT,
    TEACHER_PATH,
    DataPlan,
    demo_wan_config,
    load_flow,
    run_stage,
    write_datasets,
)

OUT = ROOT / "outputs" / "demo" / "make_teacher"
SCHEDULE = "4000:2e-3,2500:7e-4,1500:2e-4"


def seeded_init(path: Path, seed: int = 0) -> Path:
    """Write the demo architecture's seeded initial weights (Wan keys, config in the metadata)."""
    from apt_core.backbone import WanFlowModel
    from apt_core.models.io import save_wan

    torch.manual_seed(seed)
    return save_wan(WanFlowModel(demo_wan_config()), path, overwrite=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.demo.make_teacher", description=__doc__.splitlines()[0])
    ap.add_argument("--schedule", default=SCHEDULE, help="segments 'steps:lr,steps:lr,...' (default %(default)s)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--install", action="store_true", help=f"copy the result to {TEACHER_PATH.relative_to(ROOT)}")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    from training.demo.text import CaptionEmbedder

    data = write_datasets(args.out / "data", DataPlan(), CaptionEmbedder(), teacher=True)
    exported = seeded_init(args.out / "init.safetensors")
    for k, seg in enumerate(args.schedule.split(",")):
        steps, lr = seg.split(":")
        run_dir = args.out / f"run-{k}"
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, never a resume of an older one
        result = run_stage("demo_teacher", {"run.dir": str(run_dir), "run.seed": k, "run.steps": int(steps),
                                            "teacher.lr": float(lr), "model.init_from": str(exported),
                                            "data.path": str(data["teacher"])})
        exported = Path(result["export"]["model"])
    print(f"[make_teacher] trained in {(time.perf_counter() - t0) / 60:.1f} min -> {exported}")
    if args.install:
        shutil.copyfile(exported, TEACHER_PATH)
        print(f"[make_teacher] installed {TEACHER_PATH} ({TEACHER_PATH.stat().st_size / 1e6:.2f} MB)")
    from training.demo import digits
    from training.demo.metrics import Evaluator
    from training.demo.pipeline import Sampler

    model, sampler = load_flow(exported), Sampler(CaptionEmbedder())
    for frames in (1, digits.FRAMES):
        ev = Evaluator(digits.load_split("val", frames=frames))
        for cfg in (1.0, 2.0):
            x = sampler.run(model, ev.reference.captions, frames, seed=0, method="euler", steps=25, cfg=cfg)
            m = ev.evaluate(x, ev.reference.labels, ev.reference.directions if frames > 1 else None)
            print(f"[make_teacher] val frames={frames} 25 steps cfg {cfg}: " + " ".join(f"{k}={v:.3f}" for k, v in m.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
