"""Real small data for the demo: the 1,797 UCI handwritten digits (8x8) as images and moving-digit videos.

Source: scikit-learn's bundled copy of the UCI "Optical Recognition of Handwritten Digits" test set
(CC BY 4.0), loaded offline with `sklearn.datasets.load_digits`. See `assets/README.md`.

Rendering (deterministic given a seed):
- every digit is upscaled 8x8 -> 12x12 (bilinear, antialiased) and pasted on a 16x16 black canvas at
  an integer offset in [0, 4] x [0, 4]; pixels are mapped from [0, 16] to [-1, 1];
- image  = one such frame, offset uniform, caption "a seven";
- video  = `frames` (4k+1, default 5) frames of one digit moving 1 px per frame along one axis and
  bouncing off the canvas border, caption "a seven moving to the left" (the initial direction; the
  start is chosen so the first move goes that way). Shape [1, F, 16, 16] (C, F, H, W).

Splits are stratified per class with a fixed permutation: 70 % train, 10 % validation, 20 % test.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from training.demo.text import DIRECTIONS, image_caption, video_caption

CANVAS = 16
DIGIT = 12
MAX_OFFSET = CANVAS - DIGIT  # 4
FRAMES = 5
SPLIT_SEED = 0
SPLITS = ("train", "val", "test")
# (dy, dx) per direction index: left, right, up, down
DIRECTION_STEPS = ((0, -1), (0, 1), (-1, 0), (1, 0))


@dataclass
class DigitSet:
    """One split of rendered samples: pixels [N, 1, F, H, W] in [-1, 1], labels, directions, captions."""

    pixels: torch.Tensor
    labels: torch.Tensor
    directions: torch.Tensor  # -1 for images
    captions: list[str]
    offsets: torch.Tensor  # [N, F, 2] (y, x) of the digit's top-left corner per frame

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: slice | torch.Tensor) -> DigitSet:
        """The samples at `index` (a slice or an index tensor) as a new DigitSet."""
        idx = torch.arange(len(self))[index]
        return DigitSet(self.pixels[idx], self.labels[idx], self.directions[idx], [self.captions[i] for i in idx.tolist()],
                        self.offsets[idx])


def load_raw() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digits as float32 [N, 8, 8] in [0, 16] and int64 labels [N]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


def split_indices(labels: np.ndarray, seed: int = SPLIT_SEED) -> dict[str, np.ndarray]:
    """Deterministic stratified 70/10/20 split of the digit indices into train/val/test."""
    rng = np.random.RandomState(seed)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_val, n_test = round(0.1 * len(idx)), round(0.2 * len(idx))
        parts["val"].append(idx[:n_val])
        parts["test"].append(idx[n_val : n_val + n_test])
        parts["train"].append(idx[n_val + n_test :])
    return {s: np.sort(np.concatenate(p)) for s, p in parts.items()}


def upscale(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """[N, 8, 8] in [0, 16] -> [N, 12, 12] in [0, 1] (bilinear, antialiased)."""
    x = torch.as_tensor(images, dtype=torch.float32)[:, None] / 16.0
    return F.interpolate(x, size=(DIGIT, DIGIT), mode="bilinear", antialias=True, align_corners=False)[:, 0].clamp(0, 1)


def bounce_track(start: int, step: int, frames: int) -> list[int]:
    """Positions in [0, MAX_OFFSET] moving by `step` per frame and reflecting at the borders."""
    pos, out = start, [start]
    for _ in range(frames - 1):
        if not 0 <= pos + step <= MAX_OFFSET:
            step = -step
        pos += step
        out.append(pos)
    return out


def paste(digits: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """digits [N, 12, 12] in [0, 1], offsets [N, F, 2] -> pixels [N, 1, F, 16, 16] in [-1, 1]."""
    n, f = offsets.shape[:2]
    out = torch.zeros(n, f, CANVAS, CANVAS)
    frame_digits = digits[:, None].expand(n, f, DIGIT, DIGIT)
    for y in range(MAX_OFFSET + 1):
        for x in range(MAX_OFFSET + 1):
            sel = (offsets[..., 0] == y) & (offsets[..., 1] == x)  # [N, F]
            if sel.any():
                out[:, :, y : y + DIGIT, x : x + DIGIT][sel] = frame_digits[sel]
    return out[:, None] * 2 - 1


def render(
    digits: torch.Tensor, labels: np.ndarray | torch.Tensor, frames: int, seed: int, copies: int = 1
) -> DigitSet:
    """Render `copies` random placements (images if frames == 1, else moving videos) of each digit."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    rng = np.random.RandomState(seed)
    n = len(labels) * copies
    offsets = np.zeros((n, frames, 2), dtype=np.int64)
    directions = np.full(n, -1, dtype=np.int64)
    src = torch.arange(len(labels)).repeat(copies)
    for i in range(n):
        if frames == 1:
            offsets[i, 0] = rng.randint(0, MAX_OFFSET + 1, size=2)
            continue
        d = int(rng.randint(4))
        dy, dx = DIRECTION_STEPS[d]
        axis, step = (0, dy) if dy else (1, dx)
        # start so that the first move is possible in the caption's direction
        lo, hi = (1, MAX_OFFSET) if step < 0 else (0, MAX_OFFSET - 1)
        offsets[i, :, axis] = bounce_track(int(rng.randint(lo, hi + 1)), step, frames)
        offsets[i, :, 1 - axis] = int(rng.randint(0, MAX_OFFSET + 1))
        directions[i] = d
    offsets, directions = torch.from_numpy(offsets), torch.from_numpy(directions)
    lab = labels[src]
    caps = [image_caption(int(c)) if frames == 1 else video_caption(int(c), int(d)) for c, d in zip(lab, directions)]
    return DigitSet(paste(digits[src], offsets), lab, directions, caps, offsets)


def load_split(split: str, frames: int = 1, copies: int = 1, seed: int | None = None) -> DigitSet:
    """Rendered samples of one split (`train`, `val`, `test`); default seeds are fixed per split."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    images, labels = load_raw()
    idx = split_indices(labels)[split]
    if seed is None:
        seed = 1000 * (SPLITS.index(split) + 1) + frames
    return render(upscale(images[idx]), labels[idx], frames, seed, copies)


def direction_of(offsets: torch.Tensor) -> torch.Tensor:
    """Direction index (see DIRECTIONS) of each track's first move, from offsets [N, F, 2]."""
    dy, dx = (offsets[:, 1] - offsets[:, 0]).unbind(-1)
    out = torch.full_like(dy, -1)
    out[dx < 0], out[dx > 0], out[dy < 0], out[dy > 0] = 0, 1, 2, 3
    return out


def write_shards(out_dir: Path, sets: list[DigitSet], embedder, null_fraction: float = 0.0, seed: int = 0) -> Path:
    """Write rendered sets as one `apt_core.shards` dataset: pixels [1, F, 16, 16], text embedding, caption.

    `null_fraction` of the samples (chosen with `seed`) get the empty caption "" (zero context,
    text_len 0): caption dropout baked into the data, so the teacher also learns the unconditional
    velocity that classifier-free guidance needs.
    """
    from apt_core.shards import ShardWriter

    meta = {
        "dataset": "UCI optical recognition of handwritten digits (sklearn load_digits), CC BY 4.0",
        "space": "pixels",
        "value_range": [-1, 1],
        "text_encoder": "training.demo.text.TextEncoder (frozen, seed 0)",
        "negative_prompt": "",
    }
    rng = np.random.RandomState(seed)
    with ShardWriter(Path(out_dir), meta, samples_per_shard=4096, mode="overwrite") as w:
        for k, data in enumerate(sets):
            captions = [("" if rng.rand() < null_fraction else c) for c in data.captions]
            ctx, lengths = embedder(captions)
            frames = data.pixels.shape[2]
            for i in range(len(data)):
                w.add(data.pixels[i], ctx[i], captions[i], text_len=int(lengths[i]), source=f"set{k}/{i}",
                      fps=8.0 if frames > 1 else 0.0, frame_indices=list(range(frames)))
    return Path(out_dir)


__all__ = ["DIRECTIONS", "DigitSet", "load_raw", "load_split", "render", "split_indices", "upscale", "write_shards"]
