"""apt_core.media: real PyAV/Pillow encode+decode of generated files; frame indices are coded in pixels."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from apt_core.media import (
    ClipTooShortError,
    DecodeConfig,
    DecodeReport,
    MediaItem,
    has_encoder,
    iter_decoded,
    nearest_bucket,
    read_image,
    read_media,
    read_video,
    resize_center_crop,
    sample_clip,
    scan_media_folder,
    write_video,
)

BLOCK = 16  # frame index bit b is a white 16x16 block at (b // 4, b % 4): robust to any lossy codec


def coded_frames(n: int, extra_h: int = 0, extra_w: int = 0) -> np.ndarray:
    """Frames [n, 32+extra_h, 64+extra_w, 3] whose top-left 32x64 area encodes the frame index in 8 bits."""
    f = np.full((n, 2 * BLOCK + extra_h, 4 * BLOCK + extra_w, 3), 0, np.uint8)
    for i in range(n):
        for b in range(8):
            if (i >> b) & 1:
                r, c = divmod(b, 4)
                f[i, r * BLOCK:(r + 1) * BLOCK, c * BLOCK:(c + 1) * BLOCK] = 255
    return f


def decode_indices(frames: torch.Tensor) -> list[int]:
    out = []
    for fr in frames.numpy():
        v = 0
        for b in range(8):
            r, c = divmod(b, 4)
            if fr[r * BLOCK + 4:(r + 1) * BLOCK - 4, c * BLOCK + 4:(c + 1) * BLOCK - 4].mean() > 127:
                v |= 1 << b
        out.append(v)
    return out


CONTAINERS = [(".mp4", "libx264"), (".mp4", "mpeg4"), (".webm", "libvpx-vp9"), (".webm", "libvpx"),
              (".mov", "libx264"), (".mkv", "libx264"), (".mkv", "mpeg4"), (".avi", "mpeg4")]
STREAM_CODEC = {"libx264": "h264", "mpeg4": "mpeg4", "libvpx-vp9": "vp9", "libvpx": "vp8"}


@pytest.mark.parametrize("ext,codec", CONTAINERS)
def test_roundtrip_each_container_and_codec(tmp_path: Path, ext: str, codec: str) -> None:
    if not has_encoder(codec):
        pytest.skip(f"{codec} encoder not in this PyAV build")
    path = write_video(tmp_path / f"clip{ext}", coded_frames(40), fps=30, codec=codec)
    with av.open(str(path)) as c:  # the file really uses the codec we asked for
        assert c.streams.video[0].codec_context.name == STREAM_CODEC[codec]
    frames, info = read_video(path)
    assert frames.dtype == torch.uint8 and frames.shape == (40, 32, 64, 3)
    assert decode_indices(frames) == list(range(40))
    assert info.frame_indices == list(range(40)) and info.num_source_frames == 40
    assert info.source_fps == pytest.approx(30.0) and info.fps == pytest.approx(30.0)
    assert info.original_size == (32, 64) and info.kind == "video"
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_default_codec_is_h264_for_mp4(tmp_path: Path) -> None:
    path = write_video(tmp_path / "a.mp4", coded_frames(5), fps=24)
    with av.open(str(path)) as c:
        assert c.streams.video[0].codec_context.name == ("h264" if has_encoder("libx264") else "mpeg4")


@pytest.mark.parametrize("src_fps,fps,expected", [
    (30, 10, [0, 3, 6, 9, 12, 15, 18, 21, 24]),
    (30, 12, [0, 2, 5, 7, 10, 12, 15, 17, 20]),  # t = 2.5k source frames: ties take the earlier frame
    (24, 16, [0, 1, 3, 4, 6, 7, 9, 10, 12]),
    (30, 60, [0, 0, 1, 1, 2, 2, 3, 3, 4]),  # upsampling repeats frames
    (30, 30, [0, 1, 2, 3, 4, 5, 6, 7, 8]),
])
def test_fps_resampling_picks_nearest_frames(tmp_path: Path, src_fps: int, fps: int, expected: list[int]) -> None:
    path = write_video(tmp_path / "v.mp4", coded_frames(60), fps=src_fps)
    frames, info = read_video(path, fps=fps, num_frames=9)
    assert info.frame_indices == expected
    assert decode_indices(frames) == expected
    assert info.fps == fps and info.source_fps == pytest.approx(src_fps)
    assert info.timestamps == pytest.approx([i / src_fps for i in expected])


def test_fps_resampling_all_frames_and_mid_video_seek(tmp_path: Path) -> None:
    path = write_video(tmp_path / "long.mkv", coded_frames(200), fps=25)
    frames, info = read_video(path, fps=5)  # all of it: 0, 5, ..., 195
    assert info.frame_indices == list(range(0, 200, 5)) == decode_indices(frames)
    frames, info = read_video(path, num_frames=9, start="center")  # starts mid-stream: exercises seeking
    assert info.frame_indices == list(range(95, 104)) == decode_indices(frames)


@pytest.mark.parametrize("degrees", [90, -90, 180])
def test_display_rotation_is_applied(tmp_path: Path, degrees: int) -> None:
    path = tmp_path / "phone.mov"  # phones store landscape frames plus a display matrix
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = 64, 32, "yuv420p"
        s.set_display_rotation(degrees)
        for f in coded_frames(5):
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode(None))
    frames, info = read_video(path)
    shown = (32, 64) if degrees == 180 else (64, 32)
    assert info.original_size == shown and frames.shape[1:3] == shown
    k = degrees // 90  # counter-clockwise quarter turns
    assert decode_indices(torch.from_numpy(np.rot90(frames.numpy(), -k, axes=(1, 2)).copy())) == list(range(5))
    # frame 1 has only its top-left block white: where does that corner end up on screen?
    corner = {90: (-1, 0), -90: (0, -1), 180: (-1, -1)}[degrees]
    assert frames[1, corner[0], corner[1]].min() > 200 and frames[1, 0, 0].max() < 50


def test_num_frames_must_be_4k_plus_1(tmp_path: Path) -> None:
    for bad in (0, 2, 8, 16, 80):
        with pytest.raises(ValueError, match="4k\\+1"):
            DecodeConfig(num_frames=bad)
    path = write_video(tmp_path / "v.mp4", coded_frames(30), fps=30)
    with pytest.raises(ValueError, match="4k\\+1.*got 6"):
        read_video(path, num_frames=6)
    for good in (1, 5, 9, 17, 29):
        frames, _ = read_video(path, num_frames=good)
        assert frames.shape[0] == good
    with pytest.raises(ClipTooShortError, match="33 frames"):
        read_video(path, num_frames=33)


def test_start_modes_and_rng(tmp_path: Path) -> None:
    path = write_video(tmp_path / "v.webm", coded_frames(50), fps=25)
    first, _ = read_video(path, num_frames=5)
    assert decode_indices(first) == [0, 1, 2, 3, 4]
    _, centre = read_video(path, num_frames=5, start="center")
    assert centre.frame_indices == [22, 23, 24, 25, 26]  # 46 valid starts, centre (46-1)//2 = 22
    starts = []
    for seed in range(6):
        a, info_a = read_video(path, fps=12.5, num_frames=9, start="random", rng=random.Random(seed))
        _, info_b = read_video(path, fps=12.5, num_frames=9, start="random", rng=random.Random(seed))
        assert info_a.frame_indices == info_b.frame_indices == decode_indices(a)
        s = info_a.frame_indices[0]
        assert info_a.frame_indices == list(range(s, s + 17, 2)) and s + 16 <= 49
        starts.append(s)
    assert len(set(starts)) > 1
    _, info_np = read_video(path, num_frames=5, start="random", rng=np.random.default_rng(3))
    assert 0 <= info_np.frame_indices[0] <= 45
    _, info_first = read_video(path, num_frames=5, rng=random.Random(0))  # rng alone does not randomise
    assert info_first.frame_indices == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="needs an rng"):
        list(iter_decoded([MediaItem(path, "x")], DecodeConfig(start="random")))
    with pytest.raises(ValueError, match="rng"):
        sample_clip([0.0, 0.1], num_frames=1, start="random")


def test_sample_clip_variable_frame_rate() -> None:
    ts = [0.0, 0.1, 0.15, 0.4, 0.45, 0.5, 1.0]
    assert sample_clip(ts, fps=10, num_frames=5) == [0, 1, 2, 3, 3]  # targets 0, .1, .2, .3, .4
    assert sample_clip(ts, fps=2, num_frames=3) == [0, 5, 6]
    with pytest.raises(ClipTooShortError, match="needs"):
        sample_clip(ts, fps=2, num_frames=5)


def test_resize_center_crop_shape_and_content(tmp_path: Path) -> None:
    img = np.zeros((1, 32, 128, 3), np.uint8)  # red | green (middle half) | blue
    img[:, :, :32, 0] = 255
    img[:, :, 32:96, 1] = 255
    img[:, :, 96:, 2] = 255
    out = resize_center_crop(img, (16, 32))  # cover scale 0.5 -> 16x64, centre 32 columns: all green
    assert out.shape == (1, 16, 32, 3) and out.dtype == torch.uint8
    inner = out[:, :, 1:-1]  # the antialiasing kernel blends one edge column with the cropped-away colours
    assert inner[..., 1].min() == 255 and inner[..., 0].max() == 0 and inner[..., 2].max() == 0
    assert out[..., 1].min() >= 200
    tall = resize_center_crop(img, (64, 16))  # upscale to 64x256, keep centre 16 columns
    assert tall.shape == (1, 64, 16, 3) and tall[..., 1].float().mean() == 255
    path = write_video(tmp_path / "v.mp4", coded_frames(9, extra_h=16, extra_w=30), fps=8)  # 48 x 94
    frames, info = read_video(path, num_frames=5, size=(24, 40))
    assert frames.shape == (5, 24, 40, 3) and info.size == (24, 40) and info.original_size == (48, 94)
    assert nearest_bucket(480, 832, [(512, 512), (480, 832), (832, 480)]) == (480, 832)
    assert nearest_bucket(1080, 1920, [(512, 512), (480, 832), (832, 480)]) == (480, 832)
    frames, info = read_video(path, buckets=[(32, 32), (24, 48)])
    assert frames.shape[1:3] == (24, 48)


def test_image_inputs_become_one_frame_clips(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    Image.fromarray(arr).save(tmp_path / "a.jpg", quality=95)
    Image.fromarray(arr).save(tmp_path / "a.webp", lossless=True)
    frames, info = read_image(tmp_path / "a.png")
    assert frames.shape == (1, 20, 30, 3) and torch.equal(frames[0], torch.from_numpy(arr))
    assert info.kind == "image" and info.frame_indices == [0] and info.original_size == (20, 30)
    frames, _ = read_image(tmp_path / "a.webp")
    assert torch.equal(frames[0], torch.from_numpy(arr))
    frames, info = read_media(tmp_path / "a.jpg", DecodeConfig(num_frames=17, size=(16, 16)))
    assert frames.shape == (1, 16, 16, 3) and info.size == (16, 16)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW": the decoded image must come out 30 x 20
    Image.fromarray(arr).save(tmp_path / "rot.jpg", exif=exif)
    frames, _ = read_image(tmp_path / "rot.jpg")
    assert frames.shape == (1, 30, 20, 3)


def test_write_video_refuses_overwrite_pads_odd_sizes_accepts_float(tmp_path: Path) -> None:
    path = write_video(tmp_path / "a.mp4", coded_frames(5, extra_h=1, extra_w=1), fps=10)  # 33 x 65
    frames, _ = read_video(path)
    assert frames.shape == (5, 34, 66, 3) and decode_indices(frames) == list(range(5))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_video(path, coded_frames(5), fps=10)
    write_video(path, torch.from_numpy(coded_frames(3)).float() / 255, fps=10, overwrite=True)
    assert read_video(path)[0].shape[0] == 3
    with pytest.raises(ValueError, match=r"\[F>0, H, W, 3\]"):
        write_video(tmp_path / "b.mp4", np.zeros((2, 8, 8), np.uint8), fps=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4"]


def _make_bad_folder(root: Path) -> None:
    write_video(root / "good.mp4", coded_frames(20), fps=20)
    (root / "good.txt").write_text("a good video\n")
    Image.fromarray(np.full((32, 48, 3), 128, np.uint8)).save(root / "pic.png")
    (root / "pic.txt").write_text("a grey picture")
    (root / "sub").mkdir()
    write_video(root / "sub" / "clip.webm", coded_frames(12), fps=12)
    (root / "sub" / "clip.webm.txt").write_text("nested webm")
    (root / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    (root / "corrupt.txt").write_text("c")
    (root / "empty.mp4").write_bytes(b"")
    (root / "empty.txt").write_text("e")
    (root / "weights.bin").write_bytes(b"\x00" * 64)
    (root / "notes.json").write_text(json.dumps({"x": 1}))
    data = write_video(root / "full.mp4", coded_frames(30), fps=30).read_bytes()
    (root / "full.mp4").unlink()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 2])  # moov atom (at the end) is gone
    (root / "truncated.txt").write_text("t")
    write_video(root / "nocap.mp4", coded_frames(10), fps=10)
    (root / ".DS_Store").write_bytes(b"junk")


def test_scan_reports_each_bad_file_by_name(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _make_bad_folder(tmp_path)
    with caplog.at_level(logging.WARNING, logger="apt_core.media_scan"):
        items, report = scan_media_folder(tmp_path, caption_policy="error")
    assert [(i.path.relative_to(tmp_path).as_posix(), i.caption, i.kind) for i in items] == [
        ("good.mp4", "a good video", "video"), ("pic.png", "a grey picture", "image"),
        ("sub/clip.webm", "nested webm", "video")]
    names = {r: sorted(Path(p).name for p in report.paths(r)) for r in report.REASONS}
    assert names == {"corrupt": ["corrupt.mp4", "truncated.mp4"], "empty": ["empty.mp4"],
                     "not_media": ["notes.json", "weights.bin"], "missing_caption": ["nocap.mp4"],
                     "missing_file": [], "too_short": []}
    assert report.ok == 3 and len(report.skipped) == 6
    summary = report.summary()
    assert "3 ok, 6 skipped" in summary
    for name in ("corrupt.mp4", "truncated.mp4", "empty.mp4", "notes.json", "weights.bin", "nocap.mp4"):
        assert name in summary
        assert any(name in rec.getMessage() for rec in caplog.records)
    with pytest.raises(ValueError, match="nocap.mp4"):
        scan_media_folder(tmp_path, caption_policy="error", strict=True)


def test_iter_decoded_skips_truncated_and_short_files(tmp_path: Path) -> None:
    write_video(tmp_path / "ok.mp4", coded_frames(24), fps=24)
    write_video(tmp_path / "short.mkv", coded_frames(4), fps=24)
    src = tmp_path / "fast.mp4"  # moov at the front: opens fine, frames at the end are missing
    with av.open(str(src), "w", options={"movflags": "faststart"}) as c:
        s = c.add_stream("mpeg4", rate=24)
        s.width, s.height, s.pix_fmt = 64, 32, "yuv420p"
        for f in coded_frames(24):
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode(None))
    data = src.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: int(len(data) * 0.7)])
    src.unlink()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "img.png")
    (tmp_path / "bad.png").write_bytes(Image.open(tmp_path / "img.png").tobytes()[:10] + b"garbage")
    items = [MediaItem(tmp_path / n, n) for n in ("ok.mp4", "short.mkv", "cut.mp4", "img.png", "bad.png",
                                                   "gone.mp4")]
    report = DecodeReport()
    clips = list(iter_decoded(items, DecodeConfig(num_frames=17, size=(16, 16)), report))
    assert [c.item.path.name for c in clips] == ["ok.mp4", "img.png"]
    assert clips[0].frames.shape == (17, 16, 16, 3) and clips[1].frames.shape == (1, 16, 16, 3)
    assert clips[0].info.frame_indices == list(range(17))
    assert [Path(p).name for p in report.paths("too_short")] == ["short.mkv"]
    assert sorted(Path(p).name for p in report.paths("corrupt")) == ["bad.png", "cut.mp4"]
    assert [Path(p).name for p in report.paths("missing_file")] == ["gone.mp4"]
    assert report.ok == 2 and "cut.mp4" in report.summary()


def _caption_folder(root: Path) -> None:
    for name in ("a.mp4", "b_clip-two.mp4"):
        write_video(root / name, coded_frames(5), fps=5)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "c.jpg")
    (root / "a.txt").write_text("  sidecar caption \n")


def test_captions_from_sidecar_and_missing_policies(tmp_path: Path) -> None:
    _caption_folder(tmp_path)
    items, report = scan_media_folder(tmp_path, "error")
    assert [(i.path.name, i.caption) for i in items] == [("a.mp4", "sidecar caption")]
    assert sorted(Path(p).name for p in report.paths("missing_caption")) == ["b_clip-two.mp4", "c.jpg"]
    items, report = scan_media_folder(tmp_path, "empty")
    assert [(i.path.name, i.caption) for i in items] == [("a.mp4", "sidecar caption"), ("b_clip-two.mp4", ""),
                                                         ("c.jpg", "")]
    assert report.skipped == []
    items, _ = scan_media_folder(tmp_path, "filename")
    assert [i.caption for i in items] == ["sidecar caption", "b clip two", "c"]
    with pytest.raises(ValueError, match="caption_policy"):
        scan_media_folder(tmp_path, "skip")


def test_captions_from_jsonl_and_csv_manifests(tmp_path: Path) -> None:
    _caption_folder(tmp_path)
    (tmp_path / "caps.jsonl").write_text(
        json.dumps({"file": "b_clip-two.mp4", "caption": "from jsonl"}) + "\n\n"
        + json.dumps({"file": "a.mp4", "caption": "manifest wins"}) + "\n"
        + json.dumps({"file": "missing.mp4", "caption": "x"}) + "\n")
    items, report = scan_media_folder(tmp_path, "error", manifest=tmp_path / "caps.jsonl")
    assert [(i.path.name, i.caption) for i in items] == [("a.mp4", "manifest wins"), ("b_clip-two.mp4", "from jsonl")]
    assert [Path(p).name for p in report.paths("missing_caption")] == ["c.jpg"]
    assert [Path(p).name for p in report.paths("missing_file")] == ["missing.mp4"]
    assert report.paths("not_media") == []  # the manifest itself is not reported
    (tmp_path / "caps.jsonl").unlink()
    (tmp_path / "metadata.csv").write_text('file,caption\nc.jpg,"a picture, with comma"\nb_clip-two.mp4,from csv\n')
    items, report = scan_media_folder(tmp_path, "error")  # auto-detected by name
    assert [(i.path.name, i.caption) for i in items] == [
        ("a.mp4", "sidecar caption"), ("b_clip-two.mp4", "from csv"), ("c.jpg", "a picture, with comma")]
    assert report.skipped == []
    (tmp_path / "bad.jsonl").write_text('{"file": "a.mp4", "caption": "ok"}\n{"file": "a.mp4"\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        scan_media_folder(tmp_path, "error", manifest=tmp_path / "bad.jsonl")
    (tmp_path / "bad.csv").write_text("name,desc\na.mp4,x\n")
    with pytest.raises(ValueError, match="bad.csv:2.*caption"):
        scan_media_folder(tmp_path, "error", manifest=tmp_path / "bad.csv")


def test_scan_names_stay_importable_from_media() -> None:
    """apt_core.media re-exports apt_core.media_scan's names, whichever module is imported first."""
    import subprocess
    import sys

    import apt_core.media as media
    import apt_core.media_scan as media_scan

    for name in ("scan_media_folder", "iter_decoded", "MediaItem", "MediaReport", "ScanReport", "DecodeReport",
                 "DecodedClip", "CAPTION_POLICIES", "MANIFEST_NAMES"):
        assert getattr(media, name) is getattr(media_scan, name)
    with pytest.raises(AttributeError, match="no_such_name"):
        media.no_such_name  # noqa: B018
    code = "import apt_core.media_scan; from apt_core.media import scan_media_folder, MediaItem"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
