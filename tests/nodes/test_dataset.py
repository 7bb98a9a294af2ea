"""Dataset node logic: real media files -> apt_core.media decode -> encoders -> real shards, bad files reported.

The ComfyUI VAE and CLIP cannot be had in CI: `stand_in_vae` / `stand_in_text_encoder` below are
stand-ins at that boundary (same input/output contract: uint8 frames [F, H, W, 3] -> latent
[16, (F-1)//4+1, H/8, W/8]; caption -> [L, D] with trailing zero padding rows, like umT5's).
"""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from apt_core.media import DecodeConfig, scan_media_folder, write_video
from apt_core.shards import ShardReader, ShardWriter, writer_slice
from nodes.dataset import APTDatasetFromFolder, encode_folder, folder_fingerprint, open_dataset, trim_text

PROJ = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))


def stand_in_vae(frames):
    """Stand-in for comfy VAE.encode + Wan21 process_in: 4x time, 8x space, 16 channels."""
    x = frames.float().div(255)[::4].permute(0, 3, 1, 2)  # [F', 3, H, W]
    x = torch.nn.functional.avg_pool2d(x, 8)
    return torch.einsum("fchw,cd->dfhw", x, PROJ)


def stand_in_text_encoder(caption):
    """Stand-in for CLIPTextEncode with umT5: one row per word, zero rows up to 8."""
    g = torch.Generator().manual_seed(sum(map(ord, caption)))
    n = len(caption.split())
    return torch.cat([torch.randn(n, 32, generator=g), torch.zeros(8 - n, 32)]).to(torch.bfloat16)


@pytest.fixture()
def media(tmp_path):
    root = tmp_path / "media"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        write_video(root / f"clip{i}.mp4", rng.integers(0, 255, (12, 40, 48, 3), dtype=np.uint8), fps=8)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    (root / "broken.mp4").write_bytes(b"\x00not a video" * 50)
    (root / "uncaptioned.png").write_bytes((root / "img0.png").read_bytes())
    manifest = [{"file": f"clip{i}.mp4", "caption": f"a clip number {i}"} for i in range(3)]
    manifest += [{"file": f"img{i}.png", "caption": "a still"} for i in range(2)] + [{"file": "broken.mp4", "caption": "x"}]
    (root / "manifest.jsonl").write_text("\n".join(json.dumps(m) for m in manifest))
    return root


def test_encode_folder_writes_shards_and_reports_bad_files(media, tmp_path):
    items, scan = scan_media_folder(media, "error")
    assert scan.paths("missing_caption") == [str(media / "uncaptioned.png")]
    assert scan.paths("corrupt") == [str(media / "broken.mp4")]
    out = tmp_path / "shards"
    progress = []
    with ShardWriter(out, {"producer": "test"}, samples_per_shard=2) as w:
        n, report = encode_folder(items, w, DecodeConfig(fps=8, num_frames=9, size=(32, 32)), stand_in_vae,
                                  stand_in_text_encoder, on_item=progress.append)
    assert n == 5 and report.ok == 5 and progress == [1, 2, 3, 4, 5]
    ds = open_dataset(out)
    assert ds.num_samples == 5 and ds.buckets == {(16, 3, 4, 4): 3, (16, 1, 4, 4): 2}
    r = ShardReader(out)
    s = r[0]
    assert s.caption == "a clip number 0" and s.text_emb.shape == (4, 32) and s.text_len == 4
    torch.testing.assert_close(s.text_emb, stand_in_text_encoder("a clip number 0")[:4])
    assert "5 samples" in ds.describe() and str(out) in ds.describe()


def test_two_writers_split_one_folder(media, tmp_path):
    items, _ = scan_media_folder(media, "error")
    out = tmp_path / "shards"
    for k in range(2):
        with ShardWriter(out, {"producer": "test"}, shard_index=k, num_shards=2) as w:
            encode_folder(writer_slice(items, k, 2), w, DecodeConfig(num_frames=5, size=(16, 16)), stand_in_vae, stand_in_text_encoder)
    sources = sorted(ShardReader(out).info(i)["source"] for i in range(5))
    assert sources == sorted(str(it.path) for it in items)


def test_undecodable_clip_is_skipped_not_fatal(media, tmp_path):
    items, _ = scan_media_folder(media, "filename")
    with ShardWriter(tmp_path / "s", {"producer": "test"}) as w:
        n, report = encode_folder(items, w, DecodeConfig(fps=8, num_frames=41, size=(16, 16)), stand_in_vae, stand_in_text_encoder)
    assert n == 3 and len(report.paths("too_short")) == 3  # 12-frame clips cannot give 41 frames; the images still can


def test_empty_or_missing_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        open_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="index"):
        open_dataset(tmp_path / "empty")


def test_trim_text_and_fingerprint(tmp_path):
    emb = torch.cat([torch.ones(3, 4), torch.zeros(5, 4)])
    assert trim_text(emb).shape == (3, 4) and trim_text(torch.zeros(4, 4)).shape == (1, 4)
    a = folder_fingerprint(tmp_path)
    (tmp_path / "f.txt").write_text("x")
    assert folder_fingerprint(tmp_path) != a


def test_dataset_change_check_ignores_the_shards_it_writes(media, tmp_path):
    """IS_CHANGED (ComfyUI's cache key) is equal across runs that rewrite the shard folder, so a second
    identical queue is a cache hit; it changes when a source file or a widget changes (issue 15, defect 4)."""
    out = tmp_path / "shards"
    widgets = {"folder": str(media), "output_dir": str(out), "width": 32, "height": 32, "num_frames": 9, "fps": 8.0,
               "caption_policy": "error", "shard_index": 0, "num_shards": 1, "mode": "append", "vae": None, "clip": None}
    key = APTDatasetFromFolder.IS_CHANGED(**widgets)
    items, _ = scan_media_folder(media, "error")
    for _ in range(2):  # what build() does to the output folder on each run (the second appends nothing)
        with ShardWriter(out, {"producer": "test"}, mode="append") as w:
            done = set(w.written_sources)
            encode_folder([it for it in items if str(it.path) not in done], w, DecodeConfig(fps=8, num_frames=9, size=(32, 32)),
                          stand_in_vae, stand_in_text_encoder)
        assert open_dataset(out).num_samples == 5
        assert APTDatasetFromFolder.IS_CHANGED(**widgets) == key
    assert APTDatasetFromFolder.IS_CHANGED(**{**widgets, "output_dir": str(tmp_path / "other")}) != key
    assert APTDatasetFromFolder.IS_CHANGED(**{**widgets, "width": 64}) != key
    st = (media / "clip1.mp4").stat()
    os.utime(media / "clip1.mp4", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert APTDatasetFromFolder.IS_CHANGED(**widgets) != key
