"""Training curves rendered with matplotlib (Agg) into a ComfyUI IMAGE tensor [1, H, W, 3] in 0..1."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch


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
