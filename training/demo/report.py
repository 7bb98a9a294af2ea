"""The demo's outputs: JSON + markdown report, PNG grids, animated GIF (and MP4) samples, curve plots.

`results` (what `write_report` takes) is a plain dict, written verbatim as `report.json`:
```
{"time_s", "quick", "settings": {...},
 "images" / "videos": {"n", "seeds", "floor": {metric: stat}, "rows": {name: {"steps", "nfe", "what",
                       "metrics": {metric: stat}}}},
 "curves": {name: [{"step": int, "val_fd": float, ...}]}, "selected": {run: step},
 "timing": {...}, "checks": [{"name", "row", "value", "threshold", "passed", "detail"}]}
```
where a `stat` is `{"mean", "std", "values"}` over evaluation seeds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

# apt_reference.md section 5, for the side-by-side table
PAPER = [
    ("COCO-5K FID, diffusion 25 steps (images)", "26.9", "teacher 25 steps, best CFG"),
    ("COCO-5K FID, CD 1 step", "119.6", "CD 1 step"),
    ("COCO-5K FID, APT 1 step", "27.9", "APT 1 step"),
    ("VBench, diffusion 25 steps (video)", "82.15", "teacher 25 steps, best CFG (video FD)"),
    ("VBench, CD 1 step", "67.05", "CD 1 step (video FD)"),
    ("VBench, APT 1 step", "82.00", "APT 1 step (video FD)"),
    ("Without aR1", "D loss -> 0, G collapses to flat colour plates", "APT without aR1 (end of training)"),
    ("SF-V (frozen half-encoder D), UCF-101 FVD, 1 step vs SVD 16 steps", "180.9 vs 194.4", "APT with SF-V discriminator (images)"),
    ("Latency, 1 step vs 25 steps + CFG", "1 NFE vs 50 NFE (2 s 720p clip: 6.03 s on 1 H100, VAE dominated)", "measured side by side"),
    ("Human preference vs 25-step baseline, images", "fidelity +37.2 %, structure -13.1 %, text alignment -8.1 %", "not measured (no raters)"),
]


def stat(values: Sequence[float]) -> dict:
    """`{"mean", "std", "values"}` (std with ddof=1; 0 for a single value)."""
    v = [float(x) for x in values]
    return {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "values": v}


def differs(a: dict, b: dict) -> bool:
    """True when two stats' means differ by more than the sum of their spreads (else: noise)."""
    return abs(a["mean"] - b["mean"]) > a["std"] + b["std"]


# ---------------------------------------------------------------------------------------- images


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return (((x.float().clamp(-1, 1) + 1) / 2) * 255).round().to(torch.uint8).numpy()


def tile(pixels: torch.Tensor, cols: int = 10, frame: int | None = 0, pad: int = 1) -> np.ndarray:
    """[N, 1, F, H, W] in [-1, 1] -> uint8 grid [rows*(H+pad), cols*(W+pad)] of one frame (or all frames in a row)."""
    x = pixels[:, 0]  # [N, F, H, W]
    if frame is None:  # each sample becomes a row of its frames
        n, f, h, w = x.shape
        x, cols = x.reshape(n * f, h, w), f
    else:
        x = x[:, frame]
    n, h, w = x.shape
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + pad), cols * (w + pad)), 40, dtype=np.uint8)
    imgs = _to_uint8(x)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[r * (h + pad) : r * (h + pad) + h, c * (w + pad) : c * (w + pad) + w] = imgs[i]
    return grid


def save_png(path: Path, grid: np.ndarray, scale: int = 4) -> Path:
    """Save a uint8 grid, upscaled by `scale` (nearest)."""
    from PIL import Image

    img = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def save_gif(path: Path, videos: torch.Tensor, cols: int = 8, scale: int = 4, fps: int = 4) -> Path:
    """Animated GIF of clips [N, 1, F, H, W] tiled `cols` wide, looping."""
    from PIL import Image

    frames = [Image.fromarray(tile(videos, cols, frame=f)) for f in range(videos.shape[2])]
    frames = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in frames]
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
    return path


def save_mp4(path: Path, videos: torch.Tensor, cols: int = 8, scale: int = 4, fps: int = 4) -> Path | None:
    """MP4 of tiled clips through apt_core.media.write_video (PyAV); None if that is unavailable."""
    try:
        from apt_core.media import write_video
    except ImportError:
        return None
    frames = []
    for f in range(videos.shape[2]):
        g = np.kron(tile(videos, cols, frame=f), np.ones((scale, scale), dtype=np.uint8))
        frames.append(np.repeat(g[..., None], 3, axis=-1))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(path, np.stack(frames), fps, overwrite=True)
    return path


def plot_curves(path: Path, curves: dict[str, list[dict]], key: str = "val_fd", title: str = "", floor: float | None = None) -> Path:
    """Line plot of `key` against step for each named curve (log y), with an optional floor line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, pts in curves.items():
        pts = [p for p in pts if key in p]
        if pts:
            ax.plot([p["step"] for p in pts], [p[key] for p in pts], marker="o", ms=3, label=name)
    if floor is not None:
        ax.axhline(floor, color="grey", ls="--", label="real-vs-real floor")
    ax.set_yscale("log")
    ax.set_xlabel("updates")
    ax.set_ylabel(key)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------- report


def _fmt(s: dict | None, digits: int = 2) -> str:
    if s is None:
        return "-"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}" if s["std"] else f"{s['mean']:.{digits}f}"


def _table(section: dict, metrics: list[tuple[str, str, int]]) -> list[str]:
    head = "| row | steps (NFE) | " + " | ".join(m[1] for m in metrics) + " |"
    lines = [head, "|" + "---|" * (len(metrics) + 2)]
    floor = section.get("floor")
    if floor:
        lines.append("| real data (floor) | - | " + " | ".join(_fmt(floor.get(m[0]), m[2]) for m in metrics) + " |")
    for name, row in section["rows"].items():
        cells = [_fmt(row["metrics"].get(m[0]), m[2]) for m in metrics]
        lines.append(f"| {name} | {row['steps']} ({row['nfe']}) | " + " | ".join(cells) + " |")
    return lines


def _comparisons(section: dict, pairs: list[tuple[str, str]]) -> list[str]:
    out = []
    rows = section["rows"]
    for a, b in pairs:
        if a in rows and b in rows:
            sa, sb = rows[a]["metrics"]["fd"], rows[b]["metrics"]["fd"]
            verdict = "a real difference" if differs(sa, sb) else "noise (within the seeds' spread)"
            out.append(f"- FD {a} {sa['mean']:.2f} vs {b} {sb['mean']:.2f}: {verdict}")
    return out


IMAGE_METRICS = [("fd", "FD", 2), ("precision", "precision", 3), ("recall", "recall", 3),
                 ("caption_accuracy", "caption acc.", 3), ("diversity", "diversity", 3)]  # fmt: skip
VIDEO_METRICS = IMAGE_METRICS + [("direction_accuracy", "direction acc.", 3), ("identity_agreement", "identity agr.", 3),
                                 ("jerk", "jerk px/f²", 3), ("speed", "speed px/f", 3)]  # fmt: skip


def markdown(results: dict) -> str:
    """The human-readable report."""
    lines = ["# APT on real digits: teacher vs consistency distillation vs adversarial post-training", ""]
    status = "PASSED" if all(c["passed"] for c in results.get("checks", [])) else "FAILED"
    mode = " (quick mode: shortened, thresholds not meaningful)" if results.get("quick") else ""
    lines += [f"Whole demo: **{results['time_s'] / 60:.1f} min**{mode}. Acceptance: **{status}**.", ""]
    lines += [results.get("intro", ""), ""]
    for key, title, metrics in (("images", "Images", IMAGE_METRICS), ("videos", "Videos (5 frames)", VIDEO_METRICS)):
        sec = results.get(key)
        if not sec:
            continue
        lines += [f"## {title}: test split, {sec['n']} samples, mean ± std over seeds {sec['seeds']}", ""]
        lines += _table(sec, metrics) + [""]
        lines += _comparisons(sec, results.get("comparisons", [])) + [""]
    if results.get("timing"):
        t = results["timing"]
        lines += ["## Generation time (measured side by side, same batch, same threads)", ""]
        lines += ["| generator | ms / sample |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in t.get("ms_per_sample", {}).items()]
        lines += ["", f"Speed-up of APT 1 step over teacher 25 steps + CFG: **{t.get('speedup', float('nan')):.0f}x**.", ""]
    if results.get("selected"):
        lines += ["## Checkpoints picked on the validation split (best EMA; the no-aR1 row is its last)", ""]
        lines += [f"- {k}: update {v}" for k, v in results["selected"].items()] + [""]
    if results.get("curves"):
        lines += ["## 1-step validation FD of the EMA generator over training (update: FD)", ""]
        for name, pts in results["curves"].items():
            lines.append(f"- {name}: " + ", ".join(f"{p['step']}: {p['val_fd']:.1f}" for p in pts))
        lines += ["", "Plots: `curves_val_fd.png`, `curves_val_fd_video.png`, `curves_d_logits.png`.", ""]
    if results.get("d_logits"):
        lines += ["## Discriminator at the end of training (mean over the last 10 % of updates)", "",
                  "| run | D(real) | D(fake) | D loss |", "|---|---|---|---|"]
        for name, d in results["d_logits"].items():
            lines.append(f"| {name} | {d.get('logits_real', float('nan')):.2f} | {d.get('logits_fake', float('nan')):.2f} | "
                         f"{d.get('d_loss', float('nan')):.3f} |")
        lines.append("")
    if results.get("checks"):
        lines += ["## Acceptance checks", "", "| check | row | ours | threshold | result |", "|---|---|---|---|---|"]
        for c in results["checks"]:
            lines.append(f"| {c['name']} | {c['row']} | {c['value']:.3f} | {c['threshold']} | {'pass' if c['passed'] else '**MISS**'} |")
        lines.append("")
    lines += ["## The paper's figures next to ours (apt_reference.md section 5)", "", "| paper | paper's value | our counterpart | ours |", "|---|---|---|---|"]
    for what, value, ours_name in PAPER:
        lines.append(f"| {what} | {value} | {ours_name} | {results.get('paper_ours', {}).get(ours_name, '-')} |")
    lines += ["", "## Files", ""]
    lines += [f"- `{f}`" for f in results.get("files", [])]
    return "\n".join(lines) + "\n"


def write_report(out_dir: Path, results: dict) -> tuple[Path, Path]:
    """Write `report.json` and `report.md` into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    j = out_dir / "report.json"
    j.write_text(json.dumps(results, indent=1, default=float))
    m = out_dir / "report.md"
    m.write_text(markdown(results))
    return j, m
