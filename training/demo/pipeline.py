"""The demo's plumbing: data shards, the teacher's architecture, stage runs through `training.loop`,
EMA snapshots read back from the run's checkpoints, validation-based selection and samplers.

Every stage runs through the headless trainer (`training.loop.train`) from a committed
`configs/demo_*.toml` plus overrides (directories, quick-mode step counts), exactly as
`python -m training --config configs/demo_X.toml --section.key=value ...` would.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from apt_core.backbone import WanCond, WanFlowModel
from apt_core.flow import euler_sample, generate_one_step, generate_two_step
from apt_core.models.wan import WanConfig, get_config
from training.demo import digits
from training.demo.text import TEXT_DIM, TEXT_LEN, CaptionEmbedder

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
ASSETS = Path(__file__).resolve().parent / "assets"
TEACHER_PATH = ASSETS / "teacher.safetensors"


def demo_wan_config() -> WanConfig:
    """The teacher's architecture: a 4-block, 64-wide Wan 2.1 DiT on 1-channel 16x16 pixels, 4x4 patches."""
    return get_config("tiny", in_dim=1, out_dim=1, text_dim=TEXT_DIM, text_len=TEXT_LEN, dim=64, ffn_dim=128,
                      num_heads=2, num_layers=4, patch_size=(1, 4, 4))


# ---------------------------------------------------------------------------------------- data


@dataclass
class DataPlan:
    """How many random placements of each train digit go into the shards."""

    image_copies: int = 4
    video_copies: int = 4
    cd_video_copies: int = 1  # CD's mix: 4 image copies + 1 clip copy (a fifth of the batches are clips)
    teacher_image_copies: int = 8
    teacher_video_copies: int = 8
    null_fraction: float = 0.1  # caption dropout for the teacher (CFG's unconditional branch)


def write_datasets(data_dir: Path, plan: DataPlan, embedder: CaptionEmbedder, teacher: bool = False) -> dict[str, Path]:
    """Shards from the train split: `images`, `videos`, `mixed` (CD); with teacher=True also `teacher`."""
    data_dir = Path(data_dir)
    img = digits.load_split("train", frames=1, copies=plan.image_copies, seed=11)
    vid = digits.load_split("train", frames=digits.FRAMES, copies=plan.video_copies, seed=12)
    out = {
        "images": digits.write_shards(data_dir / "images", [img], embedder),
        "videos": digits.write_shards(data_dir / "videos", [vid], embedder),
        "mixed": digits.write_shards(data_dir / "mixed", [img, vid[: plan.cd_video_copies * len(vid) // plan.video_copies]],
                                     embedder),
    }
    if teacher:
        t_img = digits.load_split("train", frames=1, copies=plan.teacher_image_copies, seed=21)
        t_vid = digits.load_split("train", frames=digits.FRAMES, copies=plan.teacher_video_copies, seed=22)
        out["teacher"] = digits.write_shards(data_dir / "teacher", [t_img, t_vid], embedder, plan.null_fraction, seed=23)
    return out


# -------------------------------------------------------------------------------------- stages


def run_stage(config_name: str, overrides: dict[str, Any], log: Callable[[str], None] = print) -> dict[str, Any]:
    """`python -m training --config configs/<config_name>.toml --k=v ...`, in this process."""
    from training.config import load_config
    from training.loop import train

    args = [f"--{k}={_toml(v)}" for k, v in overrides.items()]
    cfg = load_config(CONFIGS / f"{config_name}.toml", args)
    log(f"[demo] python -m training --config configs/{config_name}.toml {' '.join(args)}")
    t0 = time.perf_counter()
    result = train(cfg)
    result["time_s"] = time.perf_counter() - t0
    result["config"] = cfg
    return result


def _stage_worker(config_name: str, overrides: dict[str, Any], threads: int) -> dict[str, Any]:
    """One job in a spawned worker (its first job also leaves the parent's process-group env behind)."""
    if not torch.distributed.is_initialized():
        # the parent's 1-process group holds its MASTER_PORT: each worker makes its own on a free port
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(var, None)
    torch.set_num_threads(threads)
    return run_stage(config_name, overrides)


class StagePool:
    """`run_stage` jobs in `workers` spawned processes of `threads` threads each; `submit` returns a Future.

    On a small CPU the tiny demo models run fastest on one thread each, so two runs side by side on two
    cores take about the time of one. Each job is seeded by its own config: the results do not depend
    on which worker ran it. workers <= 1 runs each job here, at submit time, one after another.
    """

    def __init__(self, workers: int = 2, threads: int = 1):
        self.workers, self.threads, self._pool = workers, threads, None

    def __enter__(self) -> StagePool:
        if self.workers > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=mp.get_context("spawn"))
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=exc[0] is not None)

    def submit(self, config_name: str, overrides: dict[str, Any]) -> Future:
        if self._pool is not None:
            return self._pool.submit(_stage_worker, config_name, overrides, self.threads)
        done: Future = Future()
        done.set_result(run_stage(config_name, overrides))
        return done


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "/") + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return repr(v)


def load_flow(path: Path | str) -> WanFlowModel:
    """A WanFlowModel from a safetensors file written by the trainer (config from its metadata), in fp32, eval."""
    from apt_core.models.io import load_wan

    return load_wan(str(path), dtype=torch.float32).eval().requires_grad_(False)


@dataclass
class Snapshot:
    """The EMA generator at one checkpoint of a run."""

    step: int
    phase: str
    state: dict[str, torch.Tensor] = field(repr=False)


def checkpoint_emas(run_dir: Path, template: torch.nn.Module, decay: float) -> list[Snapshot]:
    """Read the EMA shadow of every complete checkpoint of a run (DCP, only the `ema` entry)."""
    import torch.distributed.checkpoint as dcp

    from apt_core.ema import EMA
    from training.checkpoint import COMPLETE, ObjectState, checkpoint_step, read_info

    done = [p for p in (Path(run_dir) / "checkpoints").glob("step-*") if (p / COMPLETE).is_file()]
    out = []
    for path in sorted(done, key=checkpoint_step):
        step = checkpoint_step(path)
        ema = EMA(template, decay, only_trainable=False)
        state = {"ema": ObjectState(ema)}
        dcp.load(state, checkpoint_id=str(path))
        out.append(Snapshot(step, read_info(path).get("phase", ""), dict(zip(ema.names, [s.clone() for s in ema.shadow]))))
    return out


def with_weights(model: WanFlowModel, state: dict[str, torch.Tensor]) -> WanFlowModel:
    """Load a (partial, EMA-tracked) state into a copy of `model`."""
    import copy

    m = copy.deepcopy(model)
    missing = m.load_state_dict(state, strict=False)
    if missing.unexpected_keys:
        raise KeyError(f"snapshot has keys the model lacks: {missing.unexpected_keys[:5]}")
    return m.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------ samplers


class Sampler:
    """Captions -> samples [N, 1, F, 16, 16] with fixed per-seed noise; one-step, two-step or Euler + CFG."""

    def __init__(self, embedder: CaptionEmbedder, batch: int = 512):
        self.embedder, self.batch = embedder, batch

    def cond(self, captions: list[str]) -> WanCond:
        return WanCond(self.embedder(captions)[0])

    def noise(self, n: int, frames: int, seed: int) -> torch.Tensor:
        return torch.randn(n, 1, frames, digits.CANVAS, digits.CANVAS, generator=torch.Generator().manual_seed(seed))

    @torch.no_grad()
    def run(self, model: WanFlowModel, captions: list[str], frames: int, seed: int, method: str = "one",
            steps: int = 25, cfg: float = 1.0, t_mid: float = 0.5) -> torch.Tensor:
        """`method`: one (G(z) = z - v(z, 1)), two (one step, re-noise to t_mid, one step) or euler."""
        z_all = self.noise(len(captions), frames, seed)
        gen = torch.Generator().manual_seed(seed + 10_000)
        out = []
        for s in range(0, len(captions), self.batch):
            caps, z = captions[s : s + self.batch], z_all[s : s + self.batch]
            c = self.cond(caps)
            if method == "one":
                out.append(generate_one_step(model, z, c))
            elif method == "two":
                out.append(generate_two_step(model, z, c, t_mid=t_mid, generator=gen))
            elif method == "euler":
                neg = WanCond(torch.zeros_like(c.context)) if cfg != 1.0 else None
                out.append(euler_sample(model, z, c, steps=steps, cfg_scale=cfg, neg_cond=neg))
            else:
                raise ValueError(f"unknown sampling method {method!r}; choose one, two or euler")
        return torch.cat(out).clamp(-1, 1)
