"""apt_core.shards: real safetensors round trips, concurrent writers, atomicity, resume and error paths."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from apt_core.shards import FORMAT, FORMAT_VERSION, Sample, ShardReader, ShardWriter, writer_slice

META = {"space": "latent", "vae": "wan_2.1_vae", "text_encoder": "umt5_xxl_fp8",
        "latent_norm": {"mean": [0.1, -0.2], "std": [1.5, 0.5]}, "fps": 16}


def make_sample(i: int, dtype: torch.dtype = torch.bfloat16, shape=(4, 2, 3, 5), dim: int = 8) -> Sample:
    g = torch.Generator().manual_seed(i)
    length = 3 + i % 4
    return Sample(latent=torch.randn(shape, generator=g).to(dtype),
                  text_emb=torch.randn(length, dim, generator=g).to(dtype),
                  text_len=length - i % 2, caption=f"caption {i} – ünïcode", source=f"/data/clip_{i}.mp4",
                  fps=16.0 + i, frame_indices=[i, i + 2, i + 4], extra={"aesthetic": i / 10})


def assert_same(a: Sample, b: Sample) -> None:
    assert a.latent.dtype == b.latent.dtype and torch.equal(a.latent, b.latent)
    assert a.text_emb.dtype == b.text_emb.dtype and torch.equal(a.text_emb, b.text_emb)
    assert (a.text_len, a.caption, a.source, a.fps, a.frame_indices, a.extra) == \
        (b.text_len, b.caption, b.source, b.fps, b.frame_indices, b.extra)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.uint8])
def test_round_trip_bit_exact_with_metadata(tmp_path: Path, dtype: torch.dtype) -> None:
    samples = [make_sample(i, torch.float32) for i in range(7)]
    if dtype == torch.uint8:  # pixel-space datasets store frames as given
        samples = [Sample((s.latent.abs() * 40).to(torch.uint8), s.text_emb.to(torch.float16), s.text_len, s.caption,
                          s.source, s.fps, s.frame_indices, s.extra) for s in samples]
    else:
        samples = [Sample(s.latent.to(dtype), s.text_emb.to(dtype), s.text_len, s.caption, s.source, s.fps,
                          s.frame_indices, s.extra) for s in samples]
    with ShardWriter(tmp_path, META, samples_per_shard=3) as w:
        for s in samples:
            w.add_sample(s)
    assert [p.name for p in w.files] == ["shard-00000-000000.safetensors", "shard-00000-000001.safetensors",
                                         "shard-00000-000002.safetensors"]
    r = ShardReader(tmp_path)
    assert len(r) == 7 and r.metadata == META
    for i, s in enumerate(samples):
        assert_same(r[i], s)
    assert_same(r[-1], samples[-1])
    assert r.shapes == [(4, 2, 3, 5)] * 7
    assert r.info(4)["caption"] == "caption 4 – ünïcode"
    with pytest.raises(IndexError, match="sample 7 out of range"):
        r[7]
    with safe_open(str(w.files[1]), framework="pt") as f:  # the documented header layout
        header = f.metadata()
        assert sorted(f.keys()) == ["0.latent", "0.text_emb", "1.latent", "1.text_emb", "2.latent", "2.text_emb"]
    assert header["format"] == FORMAT and header["format_version"] == str(FORMAT_VERSION)
    assert json.loads(header["dataset"]) == META
    assert [d["source"] for d in json.loads(header["samples"])] == [s.source for s in samples[3:6]]
    assert json.loads(header["writer"]) == {"shard_index": 0, "num_shards": 1, "seq": 1}
    index = json.loads((tmp_path / "dataset-00000.json").read_text())
    assert index["complete"] is True and index["num_samples"] == 7 and index["metadata"] == META


def test_add_keyword_form_and_defaults(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, {}) as w:
        assert w.add(torch.zeros(16, 1, 2, 2), torch.ones(5, 4), "a cat") == 0
        assert w.add(torch.zeros(16, 1, 2, 2), torch.ones(5, 4), "a dog", text_len=2, source="x.png") == 1
    r = ShardReader(tmp_path)
    assert [(s.caption, s.text_len, s.source, s.fps, s.frame_indices) for s in r] == [
        ("a cat", 5, "", 0.0, []), ("a dog", 2, "x.png", 0.0, [])]


def _write_part(out_dir: str, shard_index: int, num_shards: int, n: int) -> None:
    mine = writer_slice(list(range(n)), shard_index, num_shards)
    with ShardWriter(out_dir, META, samples_per_shard=2, shard_index=shard_index, num_shards=num_shards) as w:
        for i in mine:
            w.add_sample(make_sample(i, shape=(4, 1 + i % 2, 2, 2)))


def test_two_concurrent_writers_one_directory(tmp_path: Path) -> None:
    proc = mp.get_context("spawn").Process(target=_write_part, args=(str(tmp_path), 1, 2, 9))
    proc.start()  # writer 1 in another process while this one is writer 0
    _write_part(str(tmp_path), 0, 2, 9)
    proc.join(60)
    assert proc.exitcode == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["dataset-00000.json", "dataset-00001.json",
                     "shard-00000-000000.safetensors", "shard-00000-000001.safetensors",
                     "shard-00000-000002.safetensors",
                     "shard-00001-000000.safetensors", "shard-00001-000001.safetensors"]
    r = ShardReader(tmp_path)
    assert len(r) == 9
    assert [s.source for s in r] == [f"/data/clip_{i}.mp4" for i in (0, 2, 4, 6, 8, 1, 3, 5, 7)]
    for i in range(9):
        assert_same(r[i], make_sample(int(r[i].source.split("_")[1][:-4]), shape=r.shapes[i]))
    assert r.buckets() == {(4, 1, 2, 2): [0, 1, 2, 3, 4], (4, 2, 2, 2): [5, 6, 7, 8]}


def test_atomic_writes_leave_no_temp_files_and_reader_ignores_stale_ones(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path, META, samples_per_shard=2)
    for i in range(3):
        w.add_sample(make_sample(i))
    # mid-run: one shard flushed, index part already readable, marked incomplete
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset-00000.json", "shard-00000-000000.safetensors"]
    (tmp_path / ".shard-00000-000001.safetensors.tmp-1-abc").write_bytes(b"half a file")  # a crashed write
    r = ShardReader(tmp_path)
    assert len(r) == 2
    with pytest.raises(ValueError, match="has not finished"):
        ShardReader(tmp_path, require_complete=True)
    (tmp_path / ".shard-00000-000001.safetensors.tmp-1-abc").unlink()
    w.close()
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    assert len(ShardReader(tmp_path, require_complete=True)) == 3


def test_failed_write_removes_temp_file(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path, META)
    w.add_sample(make_sample(0))
    (tmp_path / "shard-00000-000000.safetensors").mkdir()  # os.replace onto a directory fails
    with pytest.raises(OSError):
        w.flush()
    assert [p.name for p in tmp_path.iterdir()] == ["shard-00000-000000.safetensors"]


def test_writer_modes_new_overwrite_append(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, META, samples_per_shard=2) as w:
        for i in range(3):
            w.add_sample(make_sample(i))
    with pytest.raises(FileExistsError, match="mode='append'"):
        ShardWriter(tmp_path, META)
    with ShardWriter(tmp_path, META, samples_per_shard=2, mode="append") as w:
        assert w.written_sources == [f"/data/clip_{i}.mp4" for i in range(3)] and w.num_samples == 3
        w.add_sample(make_sample(3))
    r = ShardReader(tmp_path)
    assert [s.source for s in r] == [f"/data/clip_{i}.mp4" for i in range(4)] and len(r.files) == 3
    with pytest.raises(ValueError, match="metadata"):
        ShardWriter(tmp_path, {**META, "vae": "other"}, mode="append")
    with ShardWriter(tmp_path, META, mode="overwrite") as w:
        w.add_sample(make_sample(9))
    assert [s.source for s in ShardReader(tmp_path)] == ["/data/clip_9.mp4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset-00000.json", "shard-00000-000000.safetensors"]


def test_invalid_samples_are_rejected_by_name(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path, META)
    with pytest.raises(ValueError, match=r"latent must be a tensor \[C, F, H, W\], got shape \(2, 3\)"):
        w.add(torch.zeros(2, 3), torch.zeros(4, 8), "x", source="a.mp4")
    with pytest.raises(ValueError, match="text_len 9 outside"):
        w.add(torch.zeros(4, 1, 2, 2), torch.zeros(4, 8), "x", text_len=9)
    with pytest.raises(ValueError, match="source 'nan.mp4'.*NaN/Inf"):
        w.add(torch.full((4, 1, 2, 2), float("nan")), torch.zeros(4, 8), "x", source="nan.mp4")
    w.add(torch.zeros(4, 1, 2, 2), torch.zeros(4, 8), "x")
    with pytest.raises(ValueError, match="differs from earlier samples"):
        w.add(torch.zeros(4, 1, 2, 2, dtype=torch.float16), torch.zeros(4, 8), "x")
    with pytest.raises(ValueError, match="JSON-serialisable"):
        w.add(torch.zeros(4, 1, 2, 2), torch.zeros(4, 8), "x", extra={"t": torch.zeros(1)})
    with pytest.raises(ValueError, match="JSON-serialisable"):
        ShardWriter(tmp_path / "b", {"bad": object()})
    with pytest.raises(ValueError, match="shard_index=2, num_shards=2"):
        ShardWriter(tmp_path / "c", META, shard_index=2, num_shards=2)


def test_reader_errors_name_the_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(FileNotFoundError, match="no index parts"):
        ShardReader(tmp_path)
    for k in range(2):
        with ShardWriter(tmp_path, {**META, "vae": f"vae{k}"}, shard_index=k, num_shards=3) as w:
            w.add_sample(make_sample(k))
    with pytest.raises(ValueError, match=r"dataset-00001.json and .*dataset-00000.json disagree on metadata keys \['vae'\]"):
        ShardReader(tmp_path)
    (tmp_path / "dataset-00001.json").unlink()
    with caplog.at_level(logging.WARNING, logger="apt_core.shards"):
        r = ShardReader(tmp_path)
    assert len(r) == 1
    assert any("writers [1, 2]" in m for m in caplog.messages)  # missing index parts are reported
    assert any("shard-00001-000000.safetensors" in m and "not listed" in m for m in caplog.messages)
    (tmp_path / "shard-00000-000000.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="shard-00000-000000.safetensors is listed in .*dataset-00000.json"):
        ShardReader(tmp_path)
    part = tmp_path / "dataset-00000.json"
    part.write_text(json.dumps({**json.loads(part.read_text()), "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99 is newer"):
        ShardReader(tmp_path)


def test_reader_pickles_without_open_handles(tmp_path: Path) -> None:
    import pickle

    with ShardWriter(tmp_path, META) as w:
        w.add_sample(make_sample(0))
    r = ShardReader(tmp_path)
    _ = r[0]
    r2 = pickle.loads(pickle.dumps(r))
    assert_same(r2[0], make_sample(0))


def test_reader_refuses_non_finite_values_by_file_and_index(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    with ShardWriter(tmp_path, META, samples_per_shard=2) as w:
        for i in range(4):
            w.add_sample(make_sample(i, torch.float32))
        with pytest.raises(ValueError, match=r"sample 4 .*text_emb has NaN/Inf"):  # the writer checks text too
            w.add(torch.zeros(4, 2, 3, 5), torch.full((2, 8), float("inf")), "bad")
    # another producer (no checksums; bit rot in a checksummed shard fails its CRC-32 first, see below):
    # an Inf in a stored text embedding and a NaN in a latent
    shard = tmp_path / "shard-00000-000001.safetensors"
    with safe_open(str(shard), framework="pt") as f:
        header = f.metadata()
    header["samples"] = json.dumps([{k: v for k, v in d.items() if k != "crc32"} for d in json.loads(header["samples"])])
    tensors = load_file(shard)
    tensors["0.text_emb"][1, 2] = float("inf")
    tensors["1.latent"][0, 0, 0, :2] = float("nan")
    save_file(tensors, str(shard), metadata=header)
    part = tmp_path / "dataset-00000.json"  # nor file sizes
    index = json.loads(part.read_text())
    index["shards"] = [{k: v for k, v in e.items() if k != "bytes"} for e in index["shards"]]
    part.write_text(json.dumps(index))
    r = ShardReader(tmp_path)
    assert_same(r[1], make_sample(1, torch.float32))
    with pytest.raises(ValueError, match=r"shard-00000-000001\.safetensors: sample 0 \(dataset index 2, source "
                                         r"'/data/clip_2\.mp4'\) has 1 NaN/Inf values in 0\.text_emb"):
        r[2]
    with pytest.raises(ValueError, match=r"shard-00000-000001\.safetensors: sample 1 .* 2 NaN/Inf values in 1\.latent"):
        r[3]
    assert r.locate(3) == (shard, 1)
    # the optional image embedding (I2V) is checked the same way
    with ShardWriter(tmp_path / "i2v", META) as w:
        w.add(torch.zeros(4, 2, 3, 5), torch.zeros(2, 8), "x", image_emb=torch.ones(3, 6))
    shard = tmp_path / "i2v/shard-00000-000000.safetensors"
    with safe_open(str(shard), framework="pt") as f:
        header = f.metadata()
    header["samples"] = json.dumps([{k: v for k, v in d.items() if k != "crc32"} for d in json.loads(header["samples"])])
    tensors = load_file(shard)
    tensors["0.image_emb"][2, 5] = float("nan")
    save_file(tensors, str(shard), metadata=header)
    part = tmp_path / "i2v/dataset-00000.json"
    index = json.loads(part.read_text())
    index["shards"] = [{k: v for k, v in e.items() if k != "bytes"} for e in index["shards"]]
    part.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"sample 0 .* 1 NaN/Inf values in 0\.image_emb"):
        ShardReader(tmp_path / "i2v")[0]


def _damage_copies(tmp_path: Path) -> tuple[Path, list[Sample]]:
    samples = [make_sample(i) for i in range(6)]
    with ShardWriter(tmp_path / "clean", META, samples_per_shard=3) as w:
        for s in samples:
            w.add_sample(s)
    return tmp_path / "clean", samples


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_shard_is_named_when_the_directory_opens(tmp_path: Path) -> None:
    from training.data import ShardDataset

    clean, samples = _damage_copies(tmp_path)
    bad = _copy(clean, tmp_path / "truncated")
    shard = bad / "shard-00000-000001.safetensors"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size - 100])  # a copy that stopped early
    with pytest.raises(ValueError, match=rf"shard file {shard} is damaged: {size - 100} bytes, {size} when written "
                                         r"\(.*dataset-00000.json\); truncated"):
        ShardDataset(bad)
    # a shard directory written before sizes were recorded: named when the file is first read
    part = bad / "dataset-00000.json"
    index = json.loads(part.read_text())
    for entry in index["shards"]:
        del entry["bytes"]
    part.write_text(json.dumps(index))
    r = ShardReader(bad)
    assert_same(r[0], samples[0])  # the intact shard still reads
    with pytest.raises(ValueError, match=rf"shard file {shard} is damaged: .*incomplete metadata"):
        r[3]


def test_byte_flipped_shard_is_named(tmp_path: Path) -> None:
    clean, samples = _damage_copies(tmp_path)
    for where in ("data", "header"):
        bad = _copy(clean, tmp_path / where)
        shard = bad / "shard-00000-000001.safetensors"
        raw = bytearray(shard.read_bytes())
        header_len = int.from_bytes(raw[:8], "little")
        raw[8 + header_len + 5 if where == "data" else 12] ^= 0x10  # one bit of tensor data / of the JSON header
        shard.write_bytes(bytes(raw))
        r = ShardReader(bad)  # same size: opens
        for i in range(3):
            assert_same(r[i], samples[i])  # the other shard is fine
        errors = []
        for i in range(3, 6):
            try:
                assert_same(r[i], samples[i])
            except ValueError as e:
                errors.append(str(e))
        assert len(errors) == (1 if where == "data" else 3), errors
        assert all(e.startswith(f"shard file {shard} is damaged: ") for e in errors)
        if where == "data":
            assert "fails its CRC-32 check" in errors[0]


def _rewrite_shard(shard: Path, change) -> None:
    """Rewrite a shard's tensors through `change(tensors)`, without the CRCs and sizes that would name the change."""
    from safetensors.torch import load_file, save_file

    with safe_open(str(shard), framework="pt") as f:
        header = f.metadata()
    header["samples"] = json.dumps([{k: v for k, v in d.items() if k != "crc32"} for d in json.loads(header["samples"])])
    tensors = load_file(shard)
    change(tensors)
    save_file(tensors, str(shard), metadata=header)
    part = shard.parent / "dataset-00000.json"
    index = json.loads(part.read_text())
    index["shards"] = [{k: v for k, v in e.items() if k != "bytes"} for e in index["shards"]]
    part.write_text(json.dumps(index))


def _image_latent_shards(root: Path) -> list[Sample]:
    samples = [make_sample(i) for i in range(3)]
    for i, s in enumerate(samples):
        s.image_latent = (s.latent.float() * 0.5 + i).to(s.latent.dtype)
    with ShardWriter(root, META, samples_per_shard=3) as w:
        for s in samples:
            w.add_sample(s)
    return samples


def test_image_latent_round_trip_and_crc(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    # Wan 2.1 I2V's image latent: stored next to the latent (no image_emb needed), read back bit-exact, CRC-checked
    samples = _image_latent_shards(tmp_path / "ok")
    r = ShardReader(tmp_path / "ok")
    for i, s in enumerate(samples):
        got = r[i]
        assert_same(got, s)
        assert got.image_latent.dtype == s.latent.dtype and torch.equal(got.image_latent, s.image_latent)
        assert got.image_emb is None and r.info(i)["image_latent"] is True
    with ShardWriter(tmp_path / "plain", META) as w:
        w.add_sample(make_sample(0))
    assert ShardReader(tmp_path / "plain")[0].image_latent is None and "image_latent" not in ShardReader(tmp_path / "plain").info(0)
    shard = tmp_path / "ok/shard-00000-000000.safetensors"
    with safe_open(str(shard), framework="pt") as f:
        header = f.metadata()
    tensors = load_file(shard)
    tensors["1.image_latent"][0, 0, 0, 0] += 1  # same size, other bytes: only the CRC can tell
    save_file(tensors, str(shard), metadata=header)
    with pytest.raises(ValueError, match=r"shard-00000-000000\.safetensors is damaged: tensor 1\.image_latent \(sample 1\) "
                                         r"fails its CRC-32 check"):
        ShardReader(tmp_path / "ok")[1]


def test_image_latent_of_wrong_shape_or_not_finite_is_refused_by_file_and_sample(tmp_path: Path) -> None:
    samples = _image_latent_shards(tmp_path / "shape")
    _rewrite_shard(tmp_path / "shape/shard-00000-000000.safetensors",
                   lambda t: t.__setitem__("2.image_latent", t["2.image_latent"][:, :1].contiguous()))
    r = ShardReader(tmp_path / "shape")
    assert torch.equal(r[1].image_latent, samples[1].image_latent)
    with pytest.raises(ValueError, match=r"shard-00000-000000\.safetensors: sample 2 \(dataset index 2, source "
                                         r"'/data/clip_2\.mp4'\): tensor 2\.image_latent has shape \(4, 1, 3, 5\), "
                                         r"expected the latent's \(4, 2, 3, 5\)"):
        r[2]
    _image_latent_shards(tmp_path / "nan")
    _rewrite_shard(tmp_path / "nan/shard-00000-000000.safetensors",
                   lambda t: t["1.image_latent"].view(-1)[:3].fill_(float("inf")))
    with pytest.raises(ValueError, match=r"shard-00000-000000\.safetensors: sample 1 \(dataset index 1, source "
                                         r"'/data/clip_1\.mp4'\) has 3 NaN/Inf values in 1\.image_latent"):
        ShardReader(tmp_path / "nan")[1]
    # the writer refuses them up front, naming the sample
    with ShardWriter(tmp_path / "w", META) as w:
        s = make_sample(0)
        with pytest.raises(ValueError, match=r"sample 0 \(source '/data/clip_0\.mp4'\): image_latent must be shaped like "
                                             r"the latent \(4, 2, 3, 5\) with its dtype torch\.bfloat16, got shape \(4, 1, 3, 5\)"):
            w.add(s.latent, s.text_emb, "x", source=s.source, image_latent=s.latent[:, :1])
        with pytest.raises(ValueError, match="image_latent must be shaped like"):
            w.add(s.latent, s.text_emb, "x", image_latent=s.latent.float())
        bad = s.latent.clone()
        bad[0, 0, 0, 0] = float("nan")
        with pytest.raises(ValueError, match="sample 0 .*image_latent has NaN/Inf"):
            w.add(s.latent, s.text_emb, "x", image_latent=bad)
        assert w.num_samples == 0
