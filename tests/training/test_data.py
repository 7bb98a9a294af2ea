"""training.data: bucketed, rank-split, resumable loading over real shard directories."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest
import torch

from apt_core.shards import ShardWriter
from training.data import BucketedLoader, ShardDataset, collate

SHAPES = {(4, 1, 2, 2): 10, (4, 3, 2, 4): 7, (4, 1, 4, 2): 5}  # bucket sizes
META = {"space": "latent", "vae": "test"}


def write_dataset(root: Path, shapes: dict = SHAPES, start: int = 0) -> int:
    """Samples whose latent is filled with their global number and whose text length varies."""
    n = start
    with ShardWriter(root, META, samples_per_shard=4) as w:
        for shape, count in shapes.items():
            for _ in range(count):
                length = 2 + n % 5
                w.add(torch.full(shape, float(n), dtype=torch.bfloat16),
                      torch.full((length, 3), float(n)), f"caption {n}", text_len=length - 1, source=f"s{n}")
                n += 1
    return n


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> ShardDataset:
    root = tmp_path_factory.mktemp("shards")
    write_dataset(root)
    return ShardDataset(root)


def take(loader: BucketedLoader, n: int) -> list[list[int]]:
    return [next(loader).indices.tolist() for _ in range(n)]


def test_batches_are_collated_from_one_bucket(dataset: ShardDataset) -> None:
    loader = BucketedLoader(dataset, batch_size=3, seed=1)
    assert len(loader) == 3 + 2 + 1
    for _ in range(2 * len(loader)):
        b = next(loader)
        assert b.latent.ndim == 5 and b.latent.shape[0] == 3 and b.latent.dtype == torch.bfloat16
        assert {dataset.shapes[i] for i in b.indices.tolist()} == {tuple(b.latent.shape[1:])}
        for k, i in enumerate(b.indices.tolist()):  # rows are the right samples
            assert torch.all(b.latent[k] == i)
            length = 2 + i % 5
            assert torch.all(b.text_emb[k, :length] == i) and torch.all(b.text_emb[k, length:] == 0)
            assert b.text_len[k] == length - 1 and b.captions[k] == f"caption {i}" and b.sources[k] == f"s{i}"
        assert b.text_emb.shape == (3, max(2 + i % 5 for i in b.indices.tolist()), 3)
    assert loader.epoch == 1 and loader.position == len(loader)


def test_epoch_plan_deterministic_and_covers_each_sample_once(dataset: ShardDataset) -> None:
    a = BucketedLoader(dataset, batch_size=2, seed=7)
    b = BucketedLoader(dataset, batch_size=2, seed=7)
    c = BucketedLoader(dataset, batch_size=2, seed=8)
    n = len(a)
    assert n == 5 + 3 + 2
    ea, eb, ec = take(a, 2 * n), take(b, 2 * n), take(c, 2 * n)
    assert ea == eb and ea != ec
    assert ea[:n] != ea[n:]  # reshuffled each epoch
    for epoch in (ea[:n], ea[n:]):
        counts = Counter(i for batch in epoch for i in batch)
        assert max(counts.values()) == 1 and len(counts) == 10 + 6 + 4  # drop_last drops each bucket's tail
    assert a.epoch == 1 and a.position == n
    next(a)
    assert a.epoch == 2 and a.position == 1


def test_rank_slices_union_equals_single_process_global_batch(dataset: ShardDataset) -> None:
    single = BucketedLoader(dataset, batch_size=4, world_size=1, seed=3)
    ranks = [BucketedLoader(dataset, batch_size=2, rank=r, world_size=2, seed=3) for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1])
    for _ in range(2 * len(single) + 1):  # crosses epoch boundaries
        full = next(single)
        parts = [next(r) for r in ranks]
        assert torch.cat([p.indices for p in parts]).tolist() == full.indices.tolist()
        assert torch.equal(torch.cat([p.latent for p in parts]), full.latent)
        assert [c for p in parts for c in p.captions] == full.captions
    four = [BucketedLoader(dataset, batch_size=1, rank=r, world_size=4, seed=3) for r in range(4)]
    assert [next(x).indices.item() for x in four] == BucketedLoader(dataset, 4, seed=3).next_indices()


def test_resume_mid_epoch_gives_identical_remaining_sequence(dataset: ShardDataset) -> None:
    ref = BucketedLoader(dataset, batch_size=2, rank=1, world_size=2, seed=5)
    take(ref, 3)
    state = json.loads(json.dumps(ref.state_dict()))  # survives a JSON checkpoint
    assert state["epoch"] == 0 and state["position"] == 3
    expected = take(ref, 2 * len(ref))
    resumed = BucketedLoader(dataset, batch_size=2, rank=1, world_size=2, seed=5)
    resumed.load_state_dict(state)
    assert take(resumed, 2 * len(resumed)) == expected
    # resuming with a different world size but the same global batch is allowed and consistent
    other = BucketedLoader(dataset, batch_size=4, world_size=1, seed=5)
    other.load_state_dict(state)
    assert [b[2:] for b in take(other, 3)] == expected[:3]
    for bad in ({"seed": 6}, {"global_batch_size": 2}, {"num_samples": 99}):
        with pytest.raises(ValueError, match=list(bad)[0]):
            BucketedLoader(dataset, batch_size=2, rank=1, world_size=2, seed=5).load_state_dict({**state, **bad})


def test_drop_last_false_fills_tails_from_the_same_bucket(dataset: ShardDataset) -> None:
    loader = BucketedLoader(dataset, batch_size=4, seed=0, drop_last=False)
    assert len(loader) == 3 + 2 + 2
    epoch = take(loader, len(loader))
    assert {i for b in epoch for i in b} == set(range(22))
    for b in epoch:
        assert len(b) == 4 and len({dataset.shapes[i] for i in b}) == 1


def test_small_buckets_and_errors(dataset: ShardDataset, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="training.data"):
        loader = BucketedLoader(dataset, batch_size=3, world_size=2, seed=0)
    assert len(loader) == 1 + 1 and "(4, 1, 4, 2): 5" in caplog.text
    with pytest.raises(ValueError, match="no shape bucket has a full global batch of 22"):
        BucketedLoader(dataset, batch_size=11, world_size=2)
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        BucketedLoader(dataset, batch_size=1, rank=2, world_size=2)
    a, b = dataset[0], dataset[10]
    with pytest.raises(ValueError, match="different shapes"):
        collate([a, b])


def test_dataset_over_several_directories(tmp_path: Path) -> None:
    n = write_dataset(tmp_path / "a", {(4, 1, 2, 2): 3})
    write_dataset(tmp_path / "b", {(4, 1, 2, 2): 2}, start=n)
    ds = ShardDataset([tmp_path / "a", tmp_path / "b"])
    assert len(ds) == 5 and [ds[i].caption for i in range(5)] == [f"caption {i}" for i in range(5)]
    with pytest.raises(IndexError):
        ds[5]
    with ShardWriter(tmp_path / "c", {"space": "pixels"}) as w:
        w.add(torch.zeros(3, 1, 2, 2), torch.zeros(1, 3), "x")
    with pytest.raises(ValueError, match=r"disagree on metadata keys \['space', 'vae'\]"):
        ShardDataset([tmp_path / "a", tmp_path / "c"])
    batch = next(BucketedLoader(ds, batch_size=5)).to("cpu", torch.float32)
    assert batch.latent.dtype == torch.float32 and sorted(batch.indices.tolist()) == list(range(5))
