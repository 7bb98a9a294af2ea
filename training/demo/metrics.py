"""Evaluation of generated digits and moving-digit videos against a held-out real split.

- Frechet distance (FD) between Gaussian fits of classifier features (`classifier.DigitNet`
  penultimate layer: the image net for images, the frame-stacked video net for videos), with the
  real-vs-real floor (`Evaluator.real_floor`: train-split digits, class counts matched, vs the split).
- k-NN precision / recall (Kynkaanniemi et al. 2019) in the same features.
- caption accuracy: the image net's digit on each generated image (the video net's on a video) vs the
  caption's digit; for video also the video net's direction vs the caption's direction.
- diversity: mean pairwise feature distance within each caption's digit, generated / real, averaged
  over digits (1.0 = as varied as real data; a generator collapsed per caption scores ~0).
- video: identity agreement (fraction of frames whose image-net digit equals the clip's majority
  digit) and motion smoothness (mean |second difference| of the digit's centre of mass, px/frame^2;
  lower is smoother; real clips have some from their bounces) plus mean speed (px/frame).
- `time_per_sample`: median wall time per generated sample.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from training.demo.classifier import DigitNet, load_classifier
from training.demo.digits import DigitSet, load_raw, render, split_indices, upscale


def _np64(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)).astype(np.float64)


def frechet_distance(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """`|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2)` of features [N, D] (float64, symmetric sqrt)."""
    a, b = _np64(a), _np64(b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"frechet_distance needs two [N >= 2, D] feature arrays, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr sqrt(S_a S_b) = tr sqrt(S_a^1/2 S_b S_a^1/2), a symmetric PSD matrix
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(root_a @ s_b @ root_a)
    tr_sqrt = np.sqrt(np.clip(cross, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_sqrt)


def _kth_radius(x: torch.Tensor, k: int) -> torch.Tensor:
    d = torch.cdist(x, x)
    return d.kthvalue(k + 1, dim=1).values  # +1: the point itself is at distance 0


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """k-NN precision (fake inside the real manifold) and recall (real inside the fake manifold)."""
    real, fake = torch.as_tensor(real).double(), torch.as_tensor(fake).double()
    r_real, r_fake = _kth_radius(real, k), _kth_radius(fake, k)
    d = torch.cdist(fake, real)  # [Nf, Nr]
    precision = (d <= r_real[None]).any(1).double().mean().item()
    recall = (d.T <= r_fake[None]).any(1).double().mean().item()
    return precision, recall


def diversity(fake: torch.Tensor, fake_labels: torch.Tensor, real: torch.Tensor, real_labels: torch.Tensor) -> float:
    """Within-digit mean pairwise feature distance of `fake` relative to `real`, averaged over digits."""
    ratios = []
    for c in torch.unique(real_labels).tolist():
        f, r = fake[fake_labels == c].double(), real[real_labels == c].double()
        if len(f) < 2 or len(r) < 2:
            continue
        ratios.append(torch.pdist(f).mean().item() / max(torch.pdist(r).mean().item(), 1e-12))
    if not ratios:
        raise ValueError("diversity needs at least two samples of some digit in both sets")
    return float(np.mean(ratios))


def identity_agreement(frame_preds: torch.Tensor) -> float:
    """Mean fraction of frames whose predicted digit equals the clip's majority digit; [N, F] ints."""
    mode = torch.mode(frame_preds, dim=1).values
    return (frame_preds == mode[:, None]).double().mean().item()


def centre_of_mass(videos: torch.Tensor) -> torch.Tensor:
    """(y, x) centre of mass [N, F, 2] of the ink (pixels mapped from [-1, 1] to [0, 1]) per frame."""
    w = ((videos[:, 0].double() + 1) / 2).clamp(min=0) + 1e-6  # [N, F, H, W]
    h, wd = w.shape[-2:]
    ys = torch.arange(h, dtype=torch.float64)[:, None]
    xs = torch.arange(wd, dtype=torch.float64)[None, :]
    total = w.sum((-2, -1))
    return torch.stack([(w * ys).sum((-2, -1)) / total, (w * xs).sum((-2, -1)) / total], dim=-1)


def motion_stats(videos: torch.Tensor) -> dict[str, float]:
    """`jerk`: mean |2nd difference| of the centre of mass (px/frame^2); `speed`: mean |1st difference|."""
    com = centre_of_mass(videos)
    vel = com[:, 1:] - com[:, :-1]
    acc = vel[:, 1:] - vel[:, :-1]
    return {"jerk": acc.norm(dim=-1).mean().item(), "speed": vel.norm(dim=-1).mean().item()}


def time_per_sample(generate: Callable[[], torch.Tensor], batch: int, repeats: int = 3, warmup: int = 1) -> float:
    """Median seconds per sample of `generate()` (which makes `batch` samples), after warm-up calls."""
    for _ in range(warmup):
        generate()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        generate()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) / batch


def class_matched_real(reference: DigitSet, frames: int, seed: int) -> DigitSet:
    """Train-split digits with the reference's digit counts, freshly placed: the 'perfect generator'."""
    images, labels = load_raw()
    train = split_indices(labels)["train"]
    rng = np.random.RandomState(seed)
    pick = []
    for c in range(10):
        n = int((reference.labels == c).sum())
        pool = train[labels[train] == c]
        pick.append(rng.choice(pool, size=n, replace=n > len(pool)))
    idx = np.concatenate(pick)
    return render(upscale(images[idx]), labels[idx], frames, seed=seed + 7)


class Evaluator:
    """Holds the classifiers and a real reference split; `evaluate(pixels, labels, directions)` -> metrics."""

    def __init__(self, reference: DigitSet, image_net: DigitNet | None = None, video_net: DigitNet | None = None):
        self.reference = reference
        self.frames = reference.pixels.shape[2]
        self.image_net = image_net or load_classifier(1)
        self.video_net = None
        if self.frames > 1:
            self.video_net = video_net or load_classifier(self.frames)
        self.ref_feats = self.features(reference.pixels)
        self.ref_motion = motion_stats(reference.pixels) if self.frames > 1 else None

    @property
    def net(self) -> DigitNet:
        return self.video_net if self.video_net is not None else self.image_net

    @torch.no_grad()
    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Feature vectors [N, 64] of images or clips (batched to bound memory)."""
        return torch.cat([self.net.features(x.float()) for x in pixels.split(512)])

    @torch.no_grad()
    def evaluate(self, pixels: torch.Tensor, labels: torch.Tensor, directions: torch.Tensor | None = None) -> dict[str, float]:
        """All metrics of generated `pixels` [N, 1, F, 16, 16] conditioned on digit `labels` (+ directions)."""
        if pixels.shape[1:] != self.reference.pixels.shape[1:]:
            raise ValueError(f"generated shape {tuple(pixels.shape)} does not match reference {tuple(self.reference.pixels.shape)}")
        pixels = pixels.float().clamp(-1, 1)
        feats = self.features(pixels)
        precision, recall = precision_recall(self.ref_feats, feats)
        out = {
            "fd": frechet_distance(feats, self.ref_feats),
            "precision": precision,
            "recall": recall,
            "diversity": diversity(feats, labels, self.ref_feats, self.reference.labels),
        }
        logits, dir_logits = self.net(pixels)
        out["caption_accuracy"] = (logits.argmax(1) == labels).double().mean().item()
        if self.frames > 1:
            if directions is not None:
                out["direction_accuracy"] = (dir_logits.argmax(1) == directions).double().mean().item()
            n, f = pixels.shape[0], self.frames
            frame_logits, _ = self.image_net(pixels.transpose(1, 2).reshape(n * f, 1, 1, *pixels.shape[-2:]))
            out["identity_agreement"] = identity_agreement(frame_logits.argmax(1).view(n, f))
            motion = motion_stats(pixels)
            out["jerk"], out["speed"] = motion["jerk"], motion["speed"]
        return out

    def real_floor(self, seed: int) -> dict[str, float]:
        """Metrics of class-matched real train-split samples: the floor no generator should beat."""
        real = class_matched_real(self.reference, self.frames, seed)
        return self.evaluate(real.pixels, real.labels, real.directions if self.frames > 1 else None)
