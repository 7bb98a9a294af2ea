"""What a run shows: a tqdm bar, metrics.jsonl, optional TensorBoard, validation samples, GAN health.

Step functions return detached 0-d tensors; `MetricsLogger.log` only buffers them. Every
`log_every` steps one stacked tensor is averaged over ranks and copied to the host (one sync), and
every buffered step becomes one JSON line. `flush` is collective: every rank calls `log` at the same
steps. Validation renders one-step samples for fixed prompts and seeds as mp4s and a PNG grid, and
measures how different the seeds' samples are (mode-collapse check).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from apt_core.fileio import atomic_path
from training.distributed import World, all_reduce_mean


def _to_local(v: torch.Tensor) -> torch.Tensor:
    """A metric as a plain 0-d fp32 tensor (DTensor metrics, e.g. FSDP grad norms, are gathered: collective)."""
    if hasattr(v, "full_tensor"):
        v = v.full_tensor()
    return v.detach().float().reshape(())


def to_floats(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """A step's metrics as host floats of this rank (one host copy; collective for DTensor metrics)."""
    if not metrics:
        return {}
    keys = list(metrics)
    values = torch.stack([_to_local(metrics[k]).cpu() for k in keys]).tolist()
    return dict(zip(keys, values))


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The metric rows of a run's metrics.jsonl (events left out; null read back as NaN), oldest first."""
    rows = []
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        if "event" not in row:
            rows.append({k: float("nan") if v is None else v for k, v in row.items()})
    return rows


class MetricsLogger:
    """Buffer per-step metric tensors; every `log_every` steps reduce over ranks and write them out."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        world: World,
        total_steps: int,
        log_every: int = 10,
        progress: bool = True,
        tensorboard: bool = False,
        start_step: int = 0,
    ):
        self.world, self.log_every = world, max(1, log_every)
        self.path = Path(run_dir) / "metrics.jsonl"
        self._buffer: list[tuple[int, str, dict[str, torch.Tensor]]] = []
        self._last_time, self._last_step = time.perf_counter(), start_step
        self.bar = self.tb = None
        self.total_steps = total_steps
        self.global_batch = 0  # samples per optimiser step (set by the loop per phase): samples_s
        self.step_flops = 0.0  # FLOPs of one optimiser step on one rank (counted by the loop): mfu
        self.peak_tflops = 0.0  # one device's dense peak (peak_tflops()); 0 = no mfu
        self.rows: list[dict[str, Any]] = []  # the rows written by the last flush
        # console output (rank 0, monitor.progress): a tqdm bar (stderr) when stdout and stderr are a
        # terminal, else one line per flush on stdout (log files get no bar redraws)
        self.lines = progress and world.is_main and not (sys.stdout.isatty() and sys.stderr.isatty())
        self.verbose = progress and world.is_main
        if world.is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if progress and not self.lines:
                from tqdm import tqdm

                self.bar = tqdm(total=total_steps, initial=start_step, desc=f"apt-train {Path(run_dir).name}", dynamic_ncols=True)
            if tensorboard:
                self.tb = _tensorboard_writer(Path(run_dir) / "tb")

    def console(self, message: str) -> None:
        """One line on the console (rank 0, when monitor.progress is on), above the bar if there is one."""
        if not self.verbose:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def restart_clock(self, step: int) -> None:
        """Measure it/s from now (excludes model building, checkpoint loading, validation set-up)."""
        self._last_time, self._last_step = time.perf_counter(), step

    def log(self, step: int, metrics: dict[str, torch.Tensor], phase: str = "") -> list[dict[str, Any]] | None:
        """Buffer the metrics of `step` (no host sync); flush every `log_every` steps (returns the rows)."""
        self._buffer.append((step, phase, metrics))
        if len(self._buffer) >= self.log_every:
            return self.flush()
        return None

    def flush(self) -> list[dict[str, Any]]:
        """Average the buffered metrics over ranks (one collective + one host copy) and write them."""
        if not self._buffer:
            return []
        keys = sorted({k for _, _, m in self._buffer for k in m})
        nan = torch.tensor(float("nan"))
        table = torch.stack(
            [torch.stack([_to_local(m[k]).cpu() if k in m else nan for k in keys]) for _, _, m in self._buffer]
        )
        table = all_reduce_mean(table.to(self.world.device) if self.world.backend == "nccl" else table).cpu()
        values = table.tolist()
        now = time.perf_counter()
        last_step = self._buffer[-1][0]
        it_s = (last_step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_time, self._last_step = now, last_step
        rows = []
        for (step, phase, m), vals in zip(self._buffer, values):
            row: dict[str, Any] = {"step": step}
            if phase:
                row["phase"] = phase
            row.update({k: v for k, v in zip(keys, vals) if k in m})  # a NaN the step returned stays NaN
            rows.append(row)
        rows[-1]["it_s"] = it_s
        if self.global_batch:
            rows[-1]["samples_s"] = it_s * self.global_batch
        rows[-1]["peak_mem_gib"] = _peak_memory_gib(self.world)
        if self.step_flops and self.peak_tflops:
            rows[-1]["mfu"] = self.step_flops * it_s / (self.peak_tflops * 1e12)
        self._buffer = []
        self.rows = rows
        if self.world.is_main:
            with open(self.path, "a") as f:
                for row in rows:
                    f.write(json_line(row) + "\n")
            if self.tb is not None:
                for row in rows:
                    for k, v in row.items():
                        if isinstance(v, float):
                            self.tb.add_scalar(k, v, row["step"])
            shown = {k: f"{v:.4g}" for k, v in rows[-1].items() if k in _BAR_KEYS}
            if self.bar is not None:
                self.bar.set_postfix(shown, refresh=False)
                self.bar.update(last_step - self.bar.n)
            elif self.lines:
                phase = f" [{rows[-1]['phase']}]" if "phase" in rows[-1] else ""
                print(f"step {last_step}/{self.total_steps}{phase} " + " ".join(f"{k}={v}" for k, v in shown.items()), flush=True)
        return rows

    def event(self, step: int, kind: str, message: str, **fields: Any) -> None:
        """Write a non-metric line (warnings, validation results) to metrics.jsonl and the console (rank 0)."""
        if not self.world.is_main:
            return
        with open(self.path, "a") as f:
            f.write(json_line({"step": step, "event": kind, "message": message, **fields}) + "\n")
        if kind == "warning":
            warnings.warn(f"step {step}: {message}", RuntimeWarning, stacklevel=2)
        self.console(f"[step {step}] {kind}: {message}" if kind in ("warning", "validation") else f"[step {step}] {message}")

    def image(self, tag: str, path: Path, step: int) -> None:
        """A PNG (the validation grid) in TensorBoard's Images tab, if TensorBoard is on (rank 0)."""
        if self.world.is_main and self.tb is not None:
            from PIL import Image

            with Image.open(path) as im:
                self.tb.add_image(tag, np.asarray(im.convert("RGB")), step, dataformats="HWC")
            self.tb.flush()

    def close(self) -> None:
        self.flush()
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def json_line(row: dict[str, Any]) -> str:
    """One valid JSON line: NaN and +-Inf (diverged metrics) become null, never the invalid `NaN` token."""
    return json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()},
                      allow_nan=False)


def nonfinite_metrics(rows: list[dict[str, Any]]) -> tuple[int, list[str]] | None:
    """(step, metric names) of the first row with a NaN/Inf metric, or None."""
    for row in rows:
        bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            return row["step"], bad
    return None


_BAR_KEYS = ("loss", "d_loss", "g_loss", "d_acc", "logits_real", "logits_fake", "lr", "it_s", "samples_s", "peak_mem_gib", "mfu")


def _peak_memory_gib(world: World) -> float:
    """Peak memory of the most loaded rank (collective): CUDA allocated on GPU, else the process's peak RSS."""
    if world.device.type == "cuda":
        local = torch.cuda.max_memory_allocated(world.device) / 2**30
    else:
        import resource

        local = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    t = torch.tensor([local], device=world.device if world.backend == "nccl" else "cpu")
    if torch.distributed.is_initialized() and world.world_size > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t.item())


# Dense bf16 peak TFLOP/s by GPU name (substring), for MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0, "B200": 2250.0}


def peak_tflops(device: torch.device, configured: float = 0.0) -> float:
    """One device's dense peak for MFU: the configured value, else a known GPU's, else 0 (no mfu)."""
    if configured > 0:
        return configured
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in sorted(PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])) if k in name), 0.0)


def count_flops(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """`fn(*args)` under torch.utils.flop_counter (matmuls, convolutions, attention); returns (result, FLOPs).
    Counts what runs, so recomputed forwards (activation checkpointing) are included."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = fn(*args)
    return out, float(counter.get_total_flops())


_TB_MISSING_WARNED = False


def _tensorboard_writer(path: Path):
    """A SummaryWriter, or None (with one warning per process) if tensorboard is not installed."""
    global _TB_MISSING_WARNED
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if not _TB_MISSING_WARNED:
            _TB_MISSING_WARNED = True
            warnings.warn("monitor.tensorboard = true but the tensorboard package is not installed: no TensorBoard "
                          "events are written (metrics.jsonl has the same values); pip install tensorboard "
                          "(or pip install 'comfyui-apt[train]')", stacklevel=2)
        return None
    return SummaryWriter(str(path))


# ----------------------------------------------------------------------------------------------
# GAN health
# ----------------------------------------------------------------------------------------------


class CollapseDetector:
    """Warn when the D loss stays near zero for a window (D wins -> G collapses to flat plates) or the
    samples of different seeds become near-identical (mode collapse)."""

    def __init__(self, window: int = 50, d_loss_floor: float = 0.01, diversity_threshold: float = 0.05):
        self.window, self.floor, self.threshold = window, d_loss_floor, diversity_threshold
        self._d_losses: deque[float] = deque(maxlen=max(1, window))
        self._warned_at = -(10**9)

    def observe(self, rows: list[dict[str, Any]]) -> str | None:
        """Feed logged rows; a warning message once the last `window` D losses are all below the floor."""
        msg = None
        for row in rows:
            if "d_loss" not in row:
                continue
            self._d_losses.append(row["d_loss"])
            full = len(self._d_losses) == self._d_losses.maxlen
            if full and max(self._d_losses) < self.floor and row["step"] - self._warned_at >= self.window:
                self._warned_at = row["step"]
                msg = (
                    f"D loss below {self.floor} for {self.window} steps (max {max(self._d_losses):.2e}): D is winning, "
                    "G tends to collapse (raise apt.r1_lambda, lower apt.lr, or pick an earlier EMA checkpoint)"
                )
        return msg

    def diversity_warning(self, diversity: float) -> str | None:
        if diversity < self.threshold:
            return (
                f"samples of different seeds are near-identical (pairwise distance {diversity:.3f} of the real "
                f"data's < {self.threshold}): mode collapse (use a larger global batch)"
            )
        return None


def pairwise_distance(x: torch.Tensor) -> float:
    """Mean L2 distance between all pairs of rows of x [N, ...] (0 for N < 2)."""
    flat = x.flatten(1).double()
    if flat.shape[0] < 2:
        return 0.0
    d = torch.cdist(flat, flat)
    n = flat.shape[0]
    return float(d.sum() / (n * (n - 1)))


# ----------------------------------------------------------------------------------------------
# Validation samples
# ----------------------------------------------------------------------------------------------


def preview_rgb(x: torch.Tensor, upscale: int = 8) -> np.ndarray:
    """[C, F, H, W] -> uint8 frames [F, H*up, W*up, 3]: latents of a registered model family through
    its fixed C->3 projection (ComfyUI's), pixels ([-1, 1], C = 3) directly, other counts by their first 3 channels."""
    from apt_core.models.registry import family_for_latent_channels

    x = x.detach().float().cpu()
    c = x.shape[0]
    fam = family_for_latent_channels(c) if c != 3 else None
    if fam is not None and fam.latent_rgb:
        w, b = torch.tensor(fam.latent_rgb), torch.tensor(fam.latent_rgb_bias)
        rgb = torch.einsum("cfhw,cr->frhw", x, w) + b[None, :, None, None]
    elif c >= 3:
        rgb = x[:3].permute(1, 0, 2, 3)
    else:
        rgb = x[:1].expand(3, *x.shape[1:]).permute(1, 0, 2, 3)
    rgb = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [F, 3, H, W]
    if upscale > 1:
        rgb = rgb.repeat_interleave(upscale, dim=2).repeat_interleave(upscale, dim=3)
    return rgb.permute(0, 2, 3, 1).contiguous().numpy()


def save_grid(frames: list[list[np.ndarray]], path: Path) -> Path:
    """PNG grid: one row per prompt, one column per seed (first frame of each sample), 2 px gutters."""
    from PIL import Image

    h, w = frames[0][0].shape[1:3]
    rows, cols, gap = len(frames), max(len(r) for r in frames), 2
    canvas = np.full((rows * (h + gap) + gap, cols * (w + gap) + gap, 3), 255, np.uint8)
    for i, row in enumerate(frames):
        for j, clip in enumerate(row):
            canvas[gap + i * (h + gap) : gap + i * (h + gap) + h, gap + j * (w + gap) : gap + j * (w + gap) + w] = clip[0]
    with atomic_path(path) as tmp:
        Image.fromarray(canvas).save(tmp, format="PNG")
    return path


def write_mp4(path: Path, frames: np.ndarray, fps: int) -> Path:
    """Encode uint8 frames [F, H, W, 3] through PyAV (apt_core.media.write_video)."""
    from apt_core.media import write_video

    return write_video(path, frames, fps=fps, overwrite=True)


LATENTS_FILE = "samples.safetensors"  # in samples/step-N/: `samples` [prompts, seeds, C, F, H, W] fp32


class Validator:
    """One-step samples for fixed prompt embeddings x fixed seeds; all ranks run G, rank 0 writes files."""

    def __init__(
        self,
        out_dir: str | os.PathLike,
        world: World,
        contexts: torch.Tensor,
        latent_shape: tuple[int, ...],
        seeds: list[int],
        reference: torch.Tensor | None = None,
        fps: int = 16,
    ):
        if contexts.ndim != 3:
            raise ValueError(f"validation prompt embeddings must be [P, L, D], got shape {tuple(contexts.shape)}")
        self.out_dir, self.world, self.fps = Path(out_dir), world, fps
        self.contexts, self.latent_shape, self.seeds = contexts, tuple(latent_shape), list(seeds)
        # fixed noise, independent of the world size and of the step
        self.noise = torch.stack(
            [torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(s)) for s in self.seeds]
        )
        ref = reference if reference is not None and reference.shape[0] >= 2 else self.noise
        self.reference_distance = pairwise_distance(ref)

    @torch.no_grad()
    def run(self, generate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], step: int) -> dict[str, Any]:
        """`generate(z [N, C, F, H, W], context [N, L, D]) -> x0` on this rank's device; returns metrics."""
        p, s = self.contexts.shape[0], len(self.seeds)
        dev = self.world.device
        z = self.noise.repeat(p, 1, 1, 1, 1).to(dev)  # prompt-major: [p0s0, p0s1, ..., p1s0, ...]
        ctx = self.contexts.repeat_interleave(s, dim=0).to(dev)
        x = generate(z, ctx).float().cpu().view(p, s, *self.latent_shape)
        diversity = [pairwise_distance(x[i]) / max(self.reference_distance, 1e-12) for i in range(p)]
        result = {
            "val_diversity": float(np.mean(diversity)) if s >= 2 else float("nan"),
            "val_mean": float(x.mean()),
            "val_std": float(x.std()),
            "val_finite": bool(torch.isfinite(x).all()),
        }
        if self.world.is_main:
            folder = self.out_dir / f"step-{step}"
            folder.mkdir(parents=True, exist_ok=True)
            grid = []
            for i in range(p):
                row = []
                for j, seed in enumerate(self.seeds):
                    frames = preview_rgb(x[i, j])
                    write_mp4(folder / f"prompt{i}_seed{seed}.mp4", frames, self.fps)
                    row.append(frames)
                grid.append(row)
            save_grid(grid, folder / "grid.png")
            from safetensors.torch import save_file

            latents = folder / LATENTS_FILE  # raw one-step outputs (model space, fp32), to VAE-decode later
            meta = {"space": "model", "layout": "prompt, seed, C, F, H, W", "seeds": json.dumps(self.seeds), "step": str(step)}
            with atomic_path(latents) as tmp:
                save_file({"samples": x.contiguous()}, str(tmp), metadata=meta)
            result["val_dir"] = str(folder)
            result["val_latents"] = str(latents)
        return result
