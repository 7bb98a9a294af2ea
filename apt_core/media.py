"""Media I/O with PyAV and Pillow: decode videos/images into fixed-size uint8 clips, encode videos.

Everything here is pure Python/PyTorch (no ComfyUI), so the ComfyUI dataset node and the headless
trainer share one decoder. Frames are ``uint8 [F, H, W, 3]`` RGB, channels last. Scanning a folder
of media + captions into a training list lives in `apt_core.media_scan` (its names are also
importable from here).
"""

from __future__ import annotations

import math
import os
import random
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from apt_core.fileio import atomic_path, refuse_overwrite

VIDEO_EXTS = frozenset({".mp4", ".m4v", ".webm", ".mov", ".mkv", ".avi"})
IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
START_MODES = ("first", "center", "random")
_TIE_EPS = 1e-6  # seconds; a target exactly between two frames takes the earlier one

# Errors a broken file can raise while being opened/decoded (caught per file, never globally).
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    av.error.FFmpegError, OSError, EOFError, SyntaxError, ValueError, UnidentifiedImageError,
    Image.DecompressionBombError,
)


class MediaError(Exception):
    """A media file cannot be turned into a clip; ``reason`` is a report category."""

    reason = "corrupt"


class ClipTooShortError(MediaError):
    """The video has fewer frames / less duration than the requested clip."""

    reason = "too_short"


class EmptyMediaError(MediaError):
    """The file is empty or has no decodable frames."""

    reason = "empty"


class NotMediaError(MediaError):
    """The file is not a video or image this module reads."""

    reason = "not_media"


# ----------------------------------------------------------------------------- config / results
@dataclass
class DecodeConfig:
    """How to turn a media file into a clip.

    fps: resample to this frame rate (None: keep source frames). num_frames: clip length, must be
    4k+1 (None: all frames). size: output (H, W) after resize + centre crop; buckets: candidate (H, W)
    sizes, the one nearest in aspect ratio is used (overrides size). start: "first" | "center" |
    "random" (random needs an rng).
    """

    fps: float | None = None
    num_frames: int | None = None
    size: tuple[int, int] | None = None
    buckets: Sequence[tuple[int, int]] | None = None
    start: str = "first"

    def __post_init__(self) -> None:
        if self.fps is not None and not (self.fps > 0 and math.isfinite(self.fps)):
            raise ValueError(f"DecodeConfig.fps must be a positive number or None, got {self.fps!r}")
        if self.num_frames is not None and (self.num_frames < 1 or (self.num_frames - 1) % 4 != 0):
            raise ValueError(f"DecodeConfig.num_frames must be 4k+1 (1, 5, 9, ..., 81), got {self.num_frames!r}; "
                             f"the Wan VAE compresses time by 4 after the first frame")
        if self.size is not None:
            self.size = _check_size(self.size, "DecodeConfig.size")
        if self.buckets is not None:
            if len(self.buckets) == 0:
                raise ValueError("DecodeConfig.buckets is empty; give at least one (H, W) or None")
            self.buckets = tuple(_check_size(b, "DecodeConfig.buckets entry") for b in self.buckets)
        if self.start not in START_MODES:
            raise ValueError(f"DecodeConfig.start must be one of {START_MODES}, got {self.start!r}")


def _check_size(size: Sequence[int], what: str) -> tuple[int, int]:
    if len(size) != 2 or any(int(s) != s or s < 1 for s in size):
        raise ValueError(f"{what} must be (height, width) positive ints, got {size!r}")
    return int(size[0]), int(size[1])


@dataclass
class ClipInfo:
    """Where a clip came from: source fps/size, chosen source frame indices and their timestamps."""

    path: str
    kind: str  # "video" | "image"
    source_fps: float  # 0.0 for images
    fps: float  # frame rate of the returned clip (0.0 for images)
    frame_indices: list[int]
    timestamps: list[float]  # seconds from the first source frame, one per returned frame
    original_size: tuple[int, int]  # (H, W) of the source as displayed (rotation applied)
    size: tuple[int, int]  # (H, W) of the returned frames
    num_source_frames: int


# ----------------------------------------------------------------------------- frame selection
def sample_clip(timestamps: Sequence[float], fps: float | None = None, num_frames: int | None = None,
                start: str = "first", rng: random.Random | np.random.Generator | None = None) -> list[int]:
    """Pick source frame indices for a clip: targets ``t0 + k/fps``, each mapped to the nearest frame.

    ``timestamps`` are sorted source presentation times (seconds). The clip starts on a source frame
    (first, centre, or for start="random" drawn from rng, among those that leave room for the whole
    clip) and never runs past the last frame. fps=None keeps consecutive source frames;
    num_frames=None takes all that fit.
    Raises ClipTooShortError when the source cannot hold num_frames.
    """
    ts = [float(t) for t in timestamps]
    n_src = len(ts)
    if n_src == 0:
        raise EmptyMediaError("no frames")
    if start == "random" and rng is None:
        raise ValueError("start='random' needs an rng (random.Random or numpy Generator)")
    if fps is None:
        n = n_src if num_frames is None else num_frames
        if n > n_src:
            raise ClipTooShortError(f"needs {n} frames, source has {n_src}")
        s = _pick_start(n_src - n + 1, start, rng)
        return list(range(s, s + n))
    dt = 1.0 / fps
    if num_frames is None:
        s = _pick_start(1, start, rng)
        n = int(math.floor((ts[-1] - ts[s]) / dt + _TIE_EPS)) + 1
    else:
        n = num_frames
        span = (n - 1) * dt
        valid = bisect_right(ts, ts[-1] - span + _TIE_EPS)  # starts i with ts[i] + span <= ts[-1]
        if valid == 0:
            have = ts[-1] - ts[0]
            raise ClipTooShortError(f"needs {span:.3f}s for {n} frames at {fps:g} fps, source spans {have:.3f}s")
        s = _pick_start(valid, start, rng)
    return [_nearest(ts, ts[s] + k * dt) for k in range(n)]


def _pick_start(count: int, start: str, rng) -> int:
    """Index in [0, count) for the clip start: 0, the middle, or drawn from rng for "random"."""
    if start == "random":
        if isinstance(rng, np.random.Generator):
            return int(rng.integers(0, count))
        return rng.randrange(count)
    return 0 if start == "first" else (count - 1) // 2


def _nearest(ts: list[float], t: float) -> int:
    i = bisect_left(ts, t)
    if i == 0:
        return 0
    if i == len(ts):
        return len(ts) - 1
    return i - 1 if (t - ts[i - 1]) <= (ts[i] - t) + _TIE_EPS else i


# ----------------------------------------------------------------------------- resize
def nearest_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The (H, W) bucket whose aspect ratio is closest (in log space) to height/width; first wins ties."""
    ar = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[1] / b[0]) - ar))


def resize_center_crop(frames: np.ndarray | torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize uint8 [F, H, W, 3] (antialiased bilinear) to cover ``size`` = (H, W), then centre-crop."""
    x = torch.as_tensor(frames)
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
        raise ValueError(f"resize_center_crop expects uint8 [F, H, W, 3], got {x.dtype} {tuple(x.shape)}")
    th, tw = _check_size(size, "size")
    h, w = x.shape[1], x.shape[2]
    if (h, w) == (th, tw):
        return x.contiguous()
    scale = max(th / h, tw / w)
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    out = torch.empty((x.shape[0], th, tw, 3), dtype=torch.uint8)
    top, left = (nh - th) // 2, (nw - tw) // 2
    for i in range(0, x.shape[0], 16):  # chunks bound the float32 working memory
        chunk = x[i:i + 16].permute(0, 3, 1, 2).float()
        if (nh, nw) != (h, w):
            chunk = F.interpolate(chunk, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
        chunk = chunk[:, :, top:top + th, left:left + tw]
        out[i:i + 16] = chunk.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return out


def _target_size(h: int, w: int, size, buckets) -> tuple[int, int] | None:
    if buckets:
        return nearest_bucket(h, w, buckets)
    return size


# ----------------------------------------------------------------------------- decoding
def media_kind(path: str | os.PathLike) -> str | None:
    """"video" / "image" by file extension, None for anything else."""
    ext = Path(path).suffix.lower()
    return "video" if ext in VIDEO_EXTS else "image" if ext in IMAGE_EXTS else None


def read_image(path: str | os.PathLike, size: tuple[int, int] | None = None, *,
               buckets: Sequence[tuple[int, int]] | None = None) -> tuple[torch.Tensor, ClipInfo]:
    """Decode an image (EXIF orientation applied) as a 1-frame clip uint8 [1, H, W, 3]."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise EmptyMediaError(f"{path}: empty file (0 bytes)")
    with Image.open(path) as img:
        img.load()
        img = ImageOps.exif_transpose(img).convert("RGB")
        arr = np.asarray(img, dtype=np.uint8)
    frames = torch.from_numpy(arr.copy())[None]
    h, w = arr.shape[:2]
    target = _target_size(h, w, size, buckets)
    if target is not None:
        frames = resize_center_crop(frames, target)
    info = ClipInfo(str(path), "image", 0.0, 0.0, [0], [0.0], (h, w), tuple(frames.shape[1:3]), 1)
    return frames, info


def _probe_timestamps(path: Path) -> tuple[list[int] | None, list[float], float, tuple[int, int]]:
    """Demux (no decoding) the first video stream: sorted pts (None if unusable), seconds, fps, (H, W)."""
    with av.open(str(path), metadata_errors="ignore") as container:
        if not container.streams.video:
            raise NotMediaError(f"{path}: no video stream")
        stream = container.streams.video[0]
        size = (stream.codec_context.height, stream.codec_context.width)
        tb = stream.time_base
        pts: list[int | None] = [p.pts for p in container.demux(stream) if p.size > 0]
        rate = stream.average_rate or stream.guessed_rate
        declared = stream.frames  # from the container header (0 when unknown, e.g. Matroska)
    if not pts:
        raise EmptyMediaError(f"{path}: video stream has no frames")
    if declared and len(pts) < declared:
        raise MediaError(f"{path}: truncated: the header declares {declared} frames but only {len(pts)} are readable")
    usable = tb is not None and all(p is not None for p in pts) and len(set(pts)) == len(pts)
    if usable:
        ordered = sorted(pts)
        secs = [float((p - ordered[0]) * tb) for p in ordered]
        fps = float(rate) if rate else (len(secs) - 1) / secs[-1] if secs[-1] > 0 else 0.0
        return ordered, secs, fps, size
    fps = float(rate) if rate else 25.0
    return None, [i / fps for i in range(len(pts))], fps, size


def _decode_selected(path: Path, pts: list[int] | None, wanted: Sequence[int], keep) -> dict[int, torch.Tensor]:
    """Decode frames whose presentation index is in ``wanted``; seeks near the first one when pts are known."""
    needed = set(wanted)
    last = max(needed)
    for attempt_seek in ((pts is not None and min(needed) > 0), False):
        got: dict[int, torch.Tensor] = {}
        index_of = {p: i for i, p in enumerate(pts)} if pts is not None else None
        restart = False
        with av.open(str(path), metadata_errors="ignore") as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            if attempt_seek:
                container.seek(pts[min(needed)], stream=stream, backward=True, any_frame=False)
            for ordinal, frame in enumerate(container.decode(stream)):
                if index_of is not None:
                    idx = index_of.get(frame.pts)
                    if idx is None:
                        continue
                    if attempt_seek and not got and idx > min(needed):
                        restart = True  # seek overshot: decode from the start instead
                        break
                else:
                    idx = ordinal
                if idx in needed and idx not in got:
                    got[idx] = keep(frame)
                if idx >= last and len(got) == len(needed):
                    break
        if restart:
            continue
        return got
    return got


def read_video(path: str | os.PathLike, fps: float | None = None, num_frames: int | None = None,
               size: tuple[int, int] | None = None, *, start: str = "first",
               rng: random.Random | np.random.Generator | None = None,
               buckets: Sequence[tuple[int, int]] | None = None) -> tuple[torch.Tensor, ClipInfo]:
    """Decode a clip from a video: resample to ``fps``, take ``num_frames`` (4k+1), resize + centre-crop.

    Returns uint8 [F, H, W, 3] and a ClipInfo. Raises MediaError subclasses (too short, empty, no
    video stream, truncated) or PyAV errors for undecodable files.
    """
    cfg = DecodeConfig(fps=fps, num_frames=num_frames, size=size, buckets=buckets, start=start)
    path = Path(path)
    if path.stat().st_size == 0:
        raise EmptyMediaError(f"{path}: empty file (0 bytes)")
    pts, secs, src_fps, (h, w) = _probe_timestamps(path)
    indices = sample_clip(secs, cfg.fps, cfg.num_frames, cfg.start, rng)
    shown: dict[str, tuple[int, int] | None] = {}  # display size/target, known from the first frame

    def keep(frame: av.VideoFrame) -> torch.Tensor:
        arr = frame.to_ndarray(format="rgb24")
        k = round((frame.rotation or 0) / 90) % 4  # display matrix (phone videos): counter-clockwise degrees
        if k:
            arr = np.ascontiguousarray(np.rot90(arr, k))
        if not shown:
            shown["size"] = arr.shape[:2]
            shown["target"] = _target_size(arr.shape[0], arr.shape[1], cfg.size, cfg.buckets)
        x = torch.from_numpy(arr)[None]
        return resize_center_crop(x, shown["target"])[0] if shown["target"] is not None else x[0]

    got = _decode_selected(path, pts, indices, keep)
    missing = sorted(set(indices) - set(got))
    if missing:
        raise MediaError(f"{path}: truncated or corrupt: source frames {missing[:5]}{'...' if len(missing) > 5 else ''} "
                         f"could not be decoded ({len(got)} of {len(set(indices))} needed frames decoded)")
    frames = torch.stack([got[i] for i in indices])
    out_fps = cfg.fps if cfg.fps is not None else src_fps
    info = ClipInfo(str(path), "video", src_fps, out_fps, indices, [secs[i] for i in indices],
                    tuple(shown.get("size") or (h, w)), tuple(frames.shape[1:3]), len(secs))
    return frames, info


def read_media(path: str | os.PathLike, config: DecodeConfig | None = None,
               rng: random.Random | np.random.Generator | None = None) -> tuple[torch.Tensor, ClipInfo]:
    """Decode a video or an image (by extension) with one DecodeConfig; images are 1-frame clips."""
    cfg = config or DecodeConfig()
    kind = media_kind(path)
    if kind == "image":
        return read_image(path, cfg.size, buckets=cfg.buckets)
    if kind == "video":
        return read_video(path, cfg.fps, cfg.num_frames, cfg.size, start=cfg.start, rng=rng, buckets=cfg.buckets)
    raise NotMediaError(f"{path}: extension {Path(path).suffix!r} is not a video {sorted(VIDEO_EXTS)} "
                        f"or image {sorted(IMAGE_EXTS)}")


# ----------------------------------------------------------------------------- encoding
_H264 = ("libx264", "h264", "mpeg4")
_DEFAULT_CODECS = {".webm": ("libvpx-vp9", "libvpx"), ".mp4": _H264, ".m4v": _H264, ".mov": _H264,
                   ".mkv": _H264, ".avi": ("mpeg4", "libx264")}


def has_encoder(name: str) -> bool:
    """True if this PyAV build can encode with codec ``name``."""
    try:
        av.codec.Codec(name, "w")
    except Exception:  # noqa: BLE001 - PyAV raises UnknownCodecError or ValueError by version
        return False
    return True


def default_codec(path: str | os.PathLike) -> str:
    """Encoder for a file extension: h264 (libx264) if available else mpeg4; VP9/VP8 for .webm."""
    ext = Path(path).suffix.lower()
    if ext not in _DEFAULT_CODECS:
        raise ValueError(f"{path}: cannot write video with extension {ext!r}; use one of {sorted(_DEFAULT_CODECS)}")
    for name in _DEFAULT_CODECS[ext]:
        if has_encoder(name):
            return name
    raise RuntimeError(f"{path}: no encoder among {_DEFAULT_CODECS[ext]} in this PyAV build")


def _to_uint8_frames(frames: np.ndarray | torch.Tensor) -> np.ndarray:
    x = torch.as_tensor(frames).detach().cpu()
    if x.ndim != 4 or x.shape[-1] != 3 or x.shape[0] == 0:
        raise ValueError(f"write_video expects frames [F>0, H, W, 3], got shape {tuple(x.shape)}")
    if x.is_floating_point():  # ComfyUI IMAGE convention: float in [0, 1]
        x = (x.float().clamp(0, 1) * 255).round().to(torch.uint8)
    elif x.dtype != torch.uint8:
        raise ValueError(f"write_video expects uint8 or float [0, 1] frames, got {x.dtype}")
    return np.ascontiguousarray(x.numpy())


def write_video(path: str | os.PathLike, frames: np.ndarray | torch.Tensor, fps: float, codec: str | None = None, *,
                crf: int | None = None, overwrite: bool = False) -> Path:
    """Encode uint8 (or float [0,1]) frames [F, H, W, 3] to ``path`` atomically (temp + os.replace).

    codec None picks by extension (h264 if available else mpeg4; VP9 for .webm). Odd sizes are padded
    by one edge pixel (yuv420p needs even dims). Refuses to replace an existing file unless overwrite.
    """
    path = Path(path)
    refuse_overwrite(path, overwrite)
    if not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"write_video fps must be positive, got {fps!r}")
    arr = _to_uint8_frames(frames)
    codec = codec or default_codec(path)
    pad_h, pad_w = arr.shape[1] % 2, arr.shape[2] % 2
    if pad_h or pad_w:
        arr = np.pad(arr, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    rate = Fraction(fps).limit_denominator(10000)
    options = {}
    if codec in ("libx264", "h264"):
        options = {"crf": str(18 if crf is None else crf), "preset": "medium"}
    elif codec in ("libvpx-vp9", "libvpx"):
        options = {"crf": str(24 if crf is None else crf), "b:v": "0"}
        if codec == "libvpx-vp9":
            options.update({"deadline": "realtime", "cpu-used": "8"})
    with atomic_path(path, keep_suffix=True) as tmp, av.open(str(tmp), "w") as container:
        stream = container.add_stream(codec, rate=rate, options=options)
        stream.width, stream.height, stream.pix_fmt = arr.shape[2], arr.shape[1], "yuv420p"
        if codec == "mpeg4":
            stream.bit_rate = max(2_000_000, int(arr.shape[1] * arr.shape[2] * float(rate) * 2))
        for i, img in enumerate(arr):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            frame.time_base = 1 / rate
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


# Folder scanning moved to apt_core.media_scan; its public names stay importable from here.
_SCAN_NAMES = frozenset({"CAPTION_POLICIES", "MANIFEST_NAMES", "DecodedClip", "DecodeReport", "MediaItem", "MediaReport",
                         "ScanReport", "iter_decoded", "scan_media_folder"})


def __getattr__(name: str):
    """Lazy re-export of apt_core.media_scan's names (it imports this module, so not at import time)."""
    if name in _SCAN_NAMES:
        from apt_core import media_scan

        return getattr(media_scan, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
