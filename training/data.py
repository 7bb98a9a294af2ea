"""Training data: shard directories as a dataset, and a shape-bucketed, rank-split, resumable loader.

The loader plans each epoch's *global* batches (``batch_size * world_size`` samples of one latent
shape) from ``seed`` and the epoch only, so every rank computes the same plan without talking to the
others; rank r takes the r-th contiguous slice. The union over ranks is therefore exactly the batch a
single process with the same global batch would see, in the same order.
"""

from __future__ import annotations

import logging
import math
import os
import random
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from apt_core.shards import BadSample, Sample, ShardReader

log = logging.getLogger(__name__)

MAX_ABS_VALUE = 1e4  # |x| above this after scaling is corrupt data (model-space latents are O(1), pixels in [-1, 1])
PIXEL_SLACK = 1e-2  # pixels may exceed [-1, 1] by this much after scaling (bf16/fp16 rounding)
SPACES = ("latent", "pixels")


@dataclass(frozen=True)
class ValueScale:
    """How a dataset's stored values become the model's inputs: pixels map `value_range` linearly onto
    [-1, 1]; latents are used as stored (model space). `limit` bounds |x| after the mapping."""

    space: str
    value_range: tuple[float, float] | None  # pixels: the stored range (None: [0, 255] for uint8, else [-1, 1])
    limit: float

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any], channels: int, where: str) -> ValueScale:
        """Check `space`, `value_range` and `latent_norm` of a dataset's metadata (docs/SHARDS.md)."""
        space = metadata.get("space", "latent")
        if space not in SPACES:
            raise ValueError(f"{where}: dataset metadata space={space!r}; expected one of {list(SPACES)}")
        vr = metadata.get("value_range")
        if vr is not None:
            if space != "pixels":
                raise ValueError(f"{where}: metadata value_range={vr!r} is only meaningful with space='pixels' "
                                 f"(latents are used as stored); remove it or set space='pixels'")
            ok = (isinstance(vr, list) and len(vr) == 2 and all(isinstance(v, (int, float)) for v in vr)
                  and all(math.isfinite(v) for v in vr) and vr[0] < vr[1])
            if not ok:
                raise ValueError(f"{where}: metadata value_range={vr!r}; expected [low, high] with low < high")
            vr = (float(vr[0]), float(vr[1]))
        if "latent_norm" in metadata:
            norm = metadata["latent_norm"]
            if space != "latent":
                raise ValueError(f"{where}: metadata latent_norm is set but space={space!r}")
            if norm is None:
                raise ValueError(f"{where}: metadata latent_norm is null, i.e. the latents are stored raw; the model "
                                 f"trains on normalised latents (z - mean) / std: re-encode with the normalisation "
                                 f"(the dataset node and apt-prepare store it) and record it as latent_norm")
            ok = isinstance(norm, dict) and all(
                isinstance(norm.get(k), list) and len(norm[k]) == channels
                and all(isinstance(v, (int, float)) and math.isfinite(v) for v in norm[k]) for k in ("mean", "std"))
            if not ok or not all(v > 0 for v in norm["std"]):
                raise ValueError(f"{where}: metadata latent_norm={norm!r}; expected {{'mean': [{channels} floats], "
                                 f"'std': [{channels} floats > 0]}} for {channels}-channel latents")
        return cls(space, vr, 1.0 + PIXEL_SLACK if space == "pixels" else MAX_ABS_VALUE)

    def apply(self, x: torch.Tensor, where: str) -> torch.Tensor:
        """Stored sample -> model input (float pixels in [-1, 1], latents as stored); refuses bad values."""
        if self.space == "latent" and not x.is_floating_point():
            raise BadSample(f"{where}: a latent stored as {x.dtype}; latents must be floating point "
                             f"(pixel datasets say so with metadata space='pixels')")
        if self.space == "pixels":
            lo, hi = self.value_range or ((0.0, 255.0) if x.dtype == torch.uint8 else (-1.0, 1.0))
            if x.dtype == torch.uint8 or (lo, hi) != (-1.0, 1.0):
                x = (x.float() - lo) * (2.0 / (hi - lo)) - 1.0
        peak = float(x.abs().max()) if x.numel() else 0.0
        if not peak <= self.limit:  # also catches NaN
            what = (f"pixels outside the metadata value_range {list(self.value_range or ())} (after mapping to "
                    f"[-1, 1]: max |x| = {peak:.4g})" if self.space == "pixels" else
                    f"a value of magnitude {peak:.4g} (> {self.limit:g}: corrupt or unnormalised latents)")
            raise BadSample(f"{where} has {what}; fix or remove that sample")
        return x


class ShardDataset(torch.utils.data.Dataset):
    """All samples of one or more shard directories (metadata must agree); ``shapes`` for bucketing."""

    def __init__(self, roots: str | os.PathLike | ShardReader | Sequence[str | os.PathLike | ShardReader],
                 require_complete: bool = False) -> None:
        if isinstance(roots, (str, os.PathLike, ShardReader)):
            roots = [roots]
        if len(roots) == 0:
            raise ValueError("ShardDataset needs at least one shard directory")
        self.readers = [r if isinstance(r, ShardReader) else ShardReader(r, require_complete=require_complete)
                        for r in roots]
        self.metadata: dict[str, Any] = self.readers[0].metadata
        for r in self.readers[1:]:
            if r.metadata != self.metadata:
                keys = sorted(k for k in set(r.metadata) | set(self.metadata) if r.metadata.get(k) != self.metadata.get(k))
                raise ValueError(f"shard directories {self.readers[0].root} and {r.root} disagree on metadata keys "
                                 f"{keys}; they were encoded differently and cannot be trained on together")
        self._offsets = [0]
        self.shapes: list[tuple[int, ...]] = []
        for r in self.readers:
            self._offsets.append(self._offsets[-1] + len(r))
            self.shapes.extend(r.shapes)
        channels = self.shapes[0][0] if self.shapes else 0
        self.scale = ValueScale.from_metadata(self.metadata, channels, f"shard directory {self.readers[0].root}")

    def __len__(self) -> int:
        return self._offsets[-1]

    def __getitem__(self, i: int) -> Sample:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        k = bisect_right(self._offsets, i) - 1
        reader, j = self.readers[k], i - self._offsets[k]
        sample = reader[j]
        path, pos = reader.locate(j)
        where = f"{path}: sample {pos} (dataset index {i}, source {sample.source!r})"
        sample.latent = self.scale.apply(sample.latent, where)
        if sample.image_latent is not None:
            sample.image_latent = self.scale.apply(sample.image_latent, f"{where} image_latent")
        return sample

    def has_image_latent(self) -> bool:
        """Whether the samples carry `image_latent` (Wan 2.1 I2V's image latent): every directory's first sample does
        (read from its shard header, no tensors)."""
        return len(self) > 0 and all(bool(r.info(0).get("image_latent")) for r in self.readers if len(r))


@dataclass
class Batch:
    """A collated batch: latent [B,C,F,H,W], text_emb [B,L,D] zero-padded to the longest, text_len [B]."""

    latent: torch.Tensor
    text_emb: torch.Tensor
    text_len: torch.Tensor
    captions: list[str]
    sources: list[str]
    indices: torch.Tensor  # dataset indices of the samples
    image_emb: torch.Tensor | None = None  # [B, N, E] when the shards hold image embeddings (I2V)
    image_latent: torch.Tensor | None = None  # [B, C, F, H, W] when the shards hold Wan's I2V image latent

    def __len__(self) -> int:
        return self.latent.shape[0]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None, non_blocking: bool = False) -> Batch:
        """Move tensors to ``device`` (latent/text_emb cast to ``dtype`` if given)."""
        return Batch(self.latent.to(device, dtype, non_blocking=non_blocking),
                     self.text_emb.to(device, dtype, non_blocking=non_blocking),
                     self.text_len.to(device, non_blocking=non_blocking), self.captions, self.sources,
                     self.indices.to(device, non_blocking=non_blocking),
                     None if self.image_emb is None else self.image_emb.to(device, dtype, non_blocking=non_blocking),
                     None if self.image_latent is None else self.image_latent.to(device, dtype, non_blocking=non_blocking))


def collate(samples: Sequence[Sample], indices: Sequence[int] | None = None) -> Batch:
    """Stack same-shape latents and zero-pad text embeddings to the longest L in the batch."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    shapes = {tuple(s.latent.shape) for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"collate got latents of different shapes {sorted(shapes)}; batches must come from one bucket")
    dims = {(s.text_emb.shape[1], s.text_emb.dtype) for s in samples}
    if len(dims) != 1:
        raise ValueError(f"collate got text embeddings with different (D, dtype) {sorted(map(str, dims))}")
    max_len = max(s.text_emb.shape[0] for s in samples)
    text = samples[0].text_emb.new_zeros((len(samples), max_len, samples[0].text_emb.shape[1]))
    for b, s in enumerate(samples):
        text[b, : s.text_emb.shape[0]] = s.text_emb
    idx = torch.tensor(list(indices) if indices is not None else [-1] * len(samples), dtype=torch.long)
    has_image = {s.image_emb is not None for s in samples}
    if len(has_image) != 1:
        raise ValueError("collate got samples with and without image_emb; one dataset needs one encoder setup")
    image = torch.stack([s.image_emb for s in samples]) if has_image == {True} else None
    has_latent = {s.image_latent is not None for s in samples}
    if len(has_latent) != 1:
        raise ValueError("collate got samples with and without image_latent; one dataset needs one encoder setup")
    image_latent = torch.stack([s.image_latent for s in samples]) if has_latent == {True} else None
    return Batch(torch.stack([s.latent for s in samples]), text,
                 torch.tensor([s.text_len for s in samples], dtype=torch.long),
                 [s.caption for s in samples], [s.source for s in samples], idx, image, image_latent)


class BucketedLoader:
    """Infinite iterator of this rank's batches; each global batch holds one latent shape.

    Epoch plan (same on every rank): each shape bucket is shuffled with ``Random(f"{seed}:{epoch}")``,
    cut into global batches of ``batch_size * world_size``, and the batches of all buckets are shuffled
    together. drop_last=True drops each bucket's incomplete tail (it reappears in other epochs with a
    different shuffle); drop_last=False fills it by wrapping around the same bucket. state_dict() =
    (epoch, position) resumes mid-epoch exactly.
    """

    def __init__(self, dataset: Any, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 drop_last: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.dataset, self.batch_size, self.rank, self.world_size = dataset, batch_size, rank, world_size
        self.seed, self.drop_last = int(seed), drop_last
        self.global_batch_size = batch_size * world_size
        shapes = getattr(dataset, "shapes", None)
        if shapes is None:  # generic dataset: read each sample once
            shapes = [tuple(dataset[i].latent.shape) for i in range(len(dataset))]
        self.buckets: dict[tuple[int, ...], list[int]] = {}
        for i, s in enumerate(shapes):
            self.buckets.setdefault(tuple(s), []).append(i)
        self.buckets = dict(sorted(self.buckets.items()))
        g = self.global_batch_size
        sizes = {s: len(v) for s, v in self.buckets.items()}
        if drop_last:
            small = {s: n for s, n in sizes.items() if n < g}
            if len(small) == len(sizes):
                raise ValueError(f"no shape bucket has a full global batch of {g} (= batch_size {batch_size} x "
                                 f"world_size {world_size}); bucket sizes {sizes}. Lower batch_size, add data "
                                 f"or use drop_last=False")
            if small:
                log.warning("shape buckets smaller than the global batch %d are never used: %s", g, small)
        elif not sizes:
            raise ValueError("the dataset is empty")
        self.epoch, self.position = 0, 0
        self._plan: list[list[int]] | None = None
        self._plan_epoch = -1

    def plan(self, epoch: int) -> list[list[int]]:
        """Global batches (dataset indices) of ``epoch``; identical on every rank."""
        rng = random.Random(f"apt-bucketed-loader:{self.seed}:{epoch}")
        g = self.global_batch_size
        batches: list[list[int]] = []
        for idx in self.buckets.values():
            idx = list(idx)
            rng.shuffle(idx)
            full = len(idx) // g
            batches.extend(idx[b * g:(b + 1) * g] for b in range(full))
            tail = idx[full * g:]
            if tail and not self.drop_last:
                batches.append(tail + [idx[k % len(idx)] for k in range(g - len(tail))])
        rng.shuffle(batches)
        return batches

    def __len__(self) -> int:
        """Batches per epoch."""
        g = self.global_batch_size
        if self.drop_last:
            return sum(len(v) // g for v in self.buckets.values())
        return sum(-(-len(v) // g) for v in self.buckets.values())

    def _current_plan(self) -> list[list[int]]:
        if self._plan_epoch != self.epoch:
            self._plan, self._plan_epoch = self.plan(self.epoch), self.epoch
        return self._plan

    def next_indices(self) -> list[int]:
        """Advance one step and return this rank's dataset indices (no tensors loaded)."""
        plan = self._current_plan()
        if self.position >= len(plan):
            self.epoch, self.position = self.epoch + 1, 0
            plan = self._current_plan()
        global_batch = plan[self.position]
        self.position += 1
        return global_batch[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def __iter__(self) -> BucketedLoader:
        return self

    def __next__(self) -> Batch:
        local = self.next_indices()
        return collate([self.dataset[i] for i in local], local)

    def state_dict(self) -> dict[str, Any]:
        """Position to resume from (JSON-serialisable), plus what must match on resume."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "global_batch_size": self.global_batch_size, "drop_last": self.drop_last,
                "num_samples": sum(len(v) for v in self.buckets.values())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at (epoch, position); the seed, global batch, drop_last and dataset size must match."""
        current = self.state_dict()
        for key in ("seed", "global_batch_size", "drop_last", "num_samples"):
            if key in state and state[key] != current[key]:
                raise ValueError(f"loader state has {key}={state[key]!r} but this loader has {current[key]!r}; "
                                 f"resuming would replay a different sample order (global batch = batch_size x "
                                 f"world_size must stay the same)")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or position < 0:
            raise ValueError(f"loader state epoch/position must be >= 0, got {epoch}/{position}")
        self.epoch, self.position = epoch, position
