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


# ----------------------------------------------------------------------------------------------
# Value scale and corrupt samples (docs/SHARDS.md "Values the trainer accepts")
# ----------------------------------------------------------------------------------------------


def test_uint8_pixel_shards_train_on_minus_one_to_one(tmp_path: Path) -> None:
    frames = torch.tensor([0, 255, 128, 64], dtype=torch.uint8).reshape(1, 1, 2, 2).repeat(3, 2, 1, 1)
    with ShardWriter(tmp_path / "u8", {"space": "pixels"}) as w:  # value_range defaults to [0, 255] for uint8
        w.add(frames, torch.zeros(2, 3), "pixels")
    with ShardWriter(tmp_path / "u8r", {"space": "pixels", "value_range": [0, 255]}) as w:
        w.add(frames, torch.zeros(2, 3), "pixels")
    with ShardWriter(tmp_path / "unit", {"space": "pixels", "value_range": [0, 1]}) as w:
        w.add(frames.float() / 255, torch.zeros(2, 3), "pixels in [0, 1]")
    expected = frames.float() / 127.5 - 1
    for name in ("u8", "u8r", "unit"):
        x = ShardDataset(tmp_path / name)[0].latent
        assert x.dtype == torch.float32 and x.min() == -1 and x.max() == 1, name
        torch.testing.assert_close(x, expected, atol=1e-6, rtol=0)
    batch = next(BucketedLoader(ShardDataset(tmp_path / "u8"), batch_size=1))
    assert batch.latent.dtype == torch.float32 and batch.latent.abs().max() == 1


def test_corrupt_samples_are_refused_by_file_and_index(tmp_path: Path) -> None:
    with ShardWriter(tmp_path / "nan_text", META) as w, pytest.raises(ValueError, match="text_emb has NaN/Inf"):
        w.add(torch.zeros(4, 1, 2, 2), torch.tensor([[0.0, float("nan"), 0.0]]), "x")
    with ShardWriter(tmp_path / "big", META, samples_per_shard=2) as w:
        for i in range(4):
            w.add(torch.full((4, 1, 2, 2), 1e30 if i == 3 else 0.5), torch.zeros(2, 3), f"c{i}")
    ds = ShardDataset(tmp_path / "big")
    assert float(ds[2].latent.max()) == 0.5
    with pytest.raises(ValueError, match=r"shard-00000-000001\.safetensors: sample 1 \(dataset index 3.*magnitude 1e\+30"):
        ds[3]
    # another producer wrote a NaN into a stored latent (the writer itself refuses them)
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    # (its shards carry no checksums or sizes: on a checksummed shard bit rot fails its CRC-32 first)
    shard = tmp_path / "big/shard-00000-000000.safetensors"
    with safe_open(str(shard), "pt") as f:
        header = f.metadata()
    header["samples"] = json.dumps([{k: v for k, v in d.items() if k != "crc32"} for d in json.loads(header["samples"])])
    tensors = load_file(shard)
    tensors["1.latent"][2, 0, 1, 1] = float("nan")
    save_file(tensors, str(shard), metadata=header)
    part = tmp_path / "big/dataset-00000.json"
    index = json.loads(part.read_text())
    index["shards"] = [{k: v for k, v in e.items() if k != "bytes"} for e in index["shards"]]
    part.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"shard-00000-000000\.safetensors: sample 1 \(dataset index 1.* 1 NaN/Inf values in 1\.latent"):
        ShardDataset(tmp_path / "big")[1]
    with pytest.raises(ValueError, match="NaN/Inf"):  # the loader passes the error on
        for _ in range(4):
            next(BucketedLoader(ds, batch_size=2))
    with ShardWriter(tmp_path / "p", {"space": "pixels"}) as w:  # float pixels in 0..255 without value_range
        w.add(torch.full((3, 1, 2, 2), 200.0), torch.zeros(2, 3), "x")
    with pytest.raises(ValueError, match=r"sample 0 .* pixels outside the metadata value_range"):
        ShardDataset(tmp_path / "p")[0]


@pytest.mark.parametrize("meta, message", [
    ({"space": "rgb"}, r"space='rgb'; expected one of \['latent', 'pixels'\]"),
    ({"space": "latent", "latent_norm": None}, "stored raw"),
    ({"space": "latent", "latent_norm": {"mean": [0.0], "std": [1.0]}}, r"\[4 floats\]"),
    ({"latent_norm": {"mean": [0.0] * 4, "std": [1.0, 1.0, 0.0, 1.0]}}, "floats > 0"),
    ({"space": "pixels", "value_range": [1, 0]}, "low < high"),
    ({"space": "latent", "value_range": [0, 255]}, "only meaningful with space='pixels'"),
])
def test_dataset_metadata_is_checked(tmp_path: Path, meta: dict, message: str) -> None:
    with ShardWriter(tmp_path, meta) as w:
        w.add(torch.zeros(4, 1, 2, 2), torch.zeros(2, 3), "x")
    with pytest.raises(ValueError, match=message):
        ShardDataset(tmp_path)


def test_uint8_latents_are_refused(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, {"space": "latent"}) as w:
        w.add(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.zeros(2, 3), "x")
    with pytest.raises(ValueError, match="latent stored as torch.uint8"):
        ShardDataset(tmp_path)[0]
    norm = {"space": "latent", "latent_norm": {"mean": [0.0] * 4, "std": [1.0] * 4}}
    with ShardWriter(tmp_path / "n", norm) as w:  # normalised latents are the model's space: used as stored
        w.add(torch.full((4, 1, 2, 2), 2.5), torch.zeros(2, 3), "x")
    assert torch.equal(ShardDataset(tmp_path / "n")[0].latent, torch.full((4, 1, 2, 2), 2.5))


def test_image_latents_are_batched_with_their_samples(tmp_path: Path) -> None:
    # Wan 2.1 I2V's image latent (docs/SHARDS.md): batched row by row with the latents, moved with them, value-checked
    with ShardWriter(tmp_path / "i2v", META, samples_per_shard=3) as w:
        for n in range(5):
            w.add(torch.full((4, 3, 2, 2), float(n), dtype=torch.bfloat16), torch.full((2, 3), float(n)), f"c{n}",
                  image_latent=torch.full((4, 3, 2, 2), 100.0 + n, dtype=torch.bfloat16))
    ds = ShardDataset(tmp_path / "i2v")
    assert ds.has_image_latent()
    loader = BucketedLoader(ds, batch_size=2, seed=3)
    for _ in range(3):
        b = next(loader)
        assert b.image_latent.shape == b.latent.shape == (2, 4, 3, 2, 2) and b.image_latent.dtype == torch.bfloat16
        for k, i in enumerate(b.indices.tolist()):
            assert torch.all(b.latent[k] == i) and torch.all(b.image_latent[k] == 100 + i)
        moved = b.to("cpu", torch.float32)
        assert moved.image_latent.dtype == torch.float32 and torch.equal(moved.image_latent, b.image_latent.float())
    plain = tmp_path / "plain"
    write_dataset(plain, {(4, 3, 2, 2): 2})
    assert not ShardDataset(plain).has_image_latent() and next(BucketedLoader(ShardDataset(plain), 2)).image_latent is None
    with pytest.raises(ValueError, match="with and without image_latent"):
        collate([ds[0], ShardDataset(plain)[0]])
    assert not ShardDataset([tmp_path / "i2v", plain]).has_image_latent()  # one directory without: not all have it
    with ShardWriter(tmp_path / "big", META) as w:  # corrupt (unnormalised) image latents are refused like latents
        w.add(torch.zeros(4, 1, 2, 2), torch.zeros(2, 3), "x", source="clip.mp4", image_latent=torch.full((4, 1, 2, 2), 1e30))
    with pytest.raises(ValueError, match=r"shard-00000-000000\.safetensors: sample 0 \(dataset index 0, source "
                                         r"'clip\.mp4'\) image_latent has a value of magnitude 1e\+30"):
        ShardDataset(tmp_path / "big")[0]
