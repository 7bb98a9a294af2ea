"""Training curves rendered with matplotlib (Agg) into a ComfyUI IMAGE tensor [1, H, W, 3] in 0..1,
from a run's metrics.jsonl (the runner's metric rows and validation events)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

# row keys that are bookkeeping or throughput, not training curves
NOT_PLOTTED = frozenset({"step", "phase", "event", "message", "it_s", "samples_s", "peak_mem_gib", "mfu", "world_size"})


def metrics_history(rows: Iterable[Mapping]) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl rows -> {name: [(step, value), ...]}: metric rows and the numbers of validation events.

    A resumed run writes again the steps after its checkpoint: a step at or before a metric's last
    one drops that metric's later points (the curve shows the run that continued). Nulls (NaN/Inf) are skipped.
    """
    out: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        kind = row.get("event")
        if (kind is not None and kind != "validation") or not isinstance(row.get("step"), int):
            continue
        step = row["step"]
        for k, v in row.items():
            if k in NOT_PLOTTED or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            points = out.setdefault(k, [])
            while points and points[-1][0] >= step:
                points.pop()
            points.append((step, float(v)))
    return {k: v for k, v in out.items() if v}


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a metrics.jsonl ([] if there is none); a torn last line (a killed run) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def render_metrics(
    history: Mapping[str, Sequence[tuple[int, float]]],
    title: str = "",
    groups: Sequence[Sequence[str]] | None = None,
    size: tuple[float, float] = (8.0, 2.6),
    dpi: int = 100,
) -> torch.Tensor:
    """One panel per group of metric names (default: one per metric), x = step. Returns [1, H, W, 3].

    `history[name]` is a list of (step, value); empty or missing metrics are skipped.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [n for n in history if len(history[n])]
    groups = [[n for n in g if n in names] for g in (groups or [[n] for n in names])]
    groups = [g for g in groups if g] or [[]]
    fig = Figure(figsize=(size[0], size[1] * len(groups)), dpi=dpi)
    canvas = FigureCanvasAgg(fig)  # Agg: no display, no global pyplot state
    axes = fig.subplots(len(groups), 1, squeeze=False)[:, 0]
    for ax, group in zip(axes, groups):
        for name in group:
            steps, values = zip(*history[name])
            ax.plot(steps, values, label=name, linewidth=1.2)
        if group:
            ax.legend(loc="best", fontsize=8)
        else:
            ax.text(0.5, 0.5, "no metrics yet", ha="center", va="center", transform=ax.transAxes)
        ax.grid(alpha=0.3)
        ax.set_xlabel("step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return torch.from_numpy(rgba[..., :3].copy()).float().div(255.0).unsqueeze(0)
