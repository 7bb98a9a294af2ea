"""Small digit classifiers whose penultimate features are the demo's Frechet-distance feature space.

- `image` net: one frame [N, 1, 1, 16, 16] -> digit (10 classes); also used frame by frame on videos
  (identity agreement).
- `video` net: the frames of a clip stacked as channels [N, 1, 5, 16, 16] -> digit (10) and initial
  direction (4); its features give the video Frechet distance (an FVD in miniature).

Both are trained only on the real train split (fresh random placements every epoch), seeded; the
weights are committed in `assets/` (`python -m training.demo.classifier` re-creates them).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from training.demo.digits import FRAMES, load_split

ASSETS = Path(__file__).resolve().parent / "assets"
FEATURE_DIM = 64


class DigitNet(nn.Module):
    """Conv net on [N, 1, F, 16, 16] (frames as channels) -> (digit logits, direction logits or None)."""

    def __init__(self, frames: int = 1, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.frames = frames
        self.body = nn.Sequential(
            nn.Conv2d(frames, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 4 * 4, feature_dim), nn.ReLU(),
        )  # fmt: skip
        self.digit = nn.Linear(feature_dim, 10)
        self.direction = nn.Linear(feature_dim, 4) if frames > 1 else None

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != 1 or x.shape[2] != self.frames or x.shape[-2:] != (16, 16):
            raise ValueError(f"DigitNet(frames={self.frames}) expects [N, 1, {self.frames}, 16, 16], got {tuple(x.shape)}")
        return x[:, 0]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations [N, feature_dim]."""
        return self.body(self._check(x))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.features(x)
        return self.digit(h), (self.direction(h) if self.direction is not None else None)


def weights_path(frames: int) -> Path:
    return ASSETS / ("classifier_image.safetensors" if frames == 1 else f"classifier_video{frames}.safetensors")


def train_classifier(frames: int = 1, epochs: int = 30, copies: int = 4, seed: int = 0, log=print) -> DigitNet:
    """Train on the real train split with new random placements every epoch (Adam, cosine lr)."""
    torch.manual_seed(seed)
    net = DigitNet(frames)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        data = load_split("train", frames=frames, copies=copies, seed=10_000 + 100 * frames + epoch)
        net.train()
        for idx in torch.randperm(len(data), generator=gen).split(128):
            x = data.pixels[idx]
            x = x + 0.05 * torch.randn(x.shape, generator=gen)  # robustness to small generator noise
            logits, dir_logits = net(x)
            loss = F.cross_entropy(logits, data.labels[idx])
            if dir_logits is not None:
                loss = loss + F.cross_entropy(dir_logits, data.directions[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        acc = accuracy(net, load_split("val", frames=frames))
        log(f"classifier frames={frames} epoch {epoch + 1}/{epochs} loss {loss.item():.3f} val {acc}")
    return net.eval()


@torch.no_grad()
def accuracy(net: DigitNet, data) -> dict[str, float]:
    """Digit (and direction) accuracy of `net` on a DigitSet."""
    net.eval()
    logits, dir_logits = net(data.pixels)
    out = {"digit": (logits.argmax(1) == data.labels).float().mean().item()}
    if dir_logits is not None:
        out["direction"] = (dir_logits.argmax(1) == data.directions).float().mean().item()
    return out


def load_classifier(frames: int = 1, path: Path | None = None) -> DigitNet:
    """The committed classifier for `frames` (1 = image net); raises naming the file if missing."""
    from safetensors.torch import load_file

    path = Path(path or weights_path(frames))
    if not path.exists():
        raise FileNotFoundError(f"classifier weights {path} missing; re-create with `python -m training.demo.classifier`")
    net = DigitNet(frames)
    net.load_state_dict(load_file(str(path)))
    return net.eval().requires_grad_(False)


def main(argv: list[str] | None = None) -> None:
    """Re-create the committed classifier weights (image and video nets)."""
    from safetensors.torch import save_file

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--out", type=Path, default=ASSETS)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    for frames in (1, FRAMES):
        net = train_classifier(frames)
        test = accuracy(net, load_split("test", frames=frames))
        path = args.out / weights_path(frames).name
        sd = {k: v.contiguous() for k, v in net.state_dict().items()}
        save_file(sd, str(path), metadata={"test_accuracy": repr(test), "recreate": "python -m training.demo.classifier"})
        print(f"wrote {path} (test accuracy {test})")


if __name__ == "__main__":
    main()
