"""Scan a folder of videos/images + captions into a training list, and decode such a list, with a
per-file report: a broken, empty, uncaptioned or too-short file is skipped and named, never fatal.

Captions come from a manifest (JSONL/CSV, one of MANIFEST_NAMES in the folder or given) or a sidecar
`<name>.txt`. Decoding is `apt_core.media`'s; the ComfyUI dataset node and headless preprocessing
share both.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image

from apt_core.media import (
    DECODE_ERRORS,
    ClipInfo,
    DecodeConfig,
    MediaError,
    NotMediaError,
    media_kind,
    read_media,
)

log = logging.getLogger(__name__)

MANIFEST_NAMES = ("manifest.jsonl", "manifest.csv", "metadata.jsonl", "metadata.csv",
                  "captions.jsonl", "captions.csv")
CAPTION_POLICIES = ("error", "empty", "filename")
_FILE_KEYS = ("file", "file_name", "path", "video", "image")
_CAPTION_KEYS = ("caption", "text", "prompt")


@dataclass
class MediaItem:
    """One usable media file and its caption."""

    path: Path
    caption: str
    kind: str = ""

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.kind = self.kind or (media_kind(self.path) or "")


@dataclass
class MediaReport:
    """Files skipped per reason (path, detail), with a warning logged for each; summary() for humans."""

    title: str = "media"
    ok: int = 0
    corrupt: list[tuple[str, str]] = field(default_factory=list)
    empty: list[tuple[str, str]] = field(default_factory=list)
    not_media: list[tuple[str, str]] = field(default_factory=list)
    missing_caption: list[tuple[str, str]] = field(default_factory=list)
    missing_file: list[tuple[str, str]] = field(default_factory=list)
    too_short: list[tuple[str, str]] = field(default_factory=list)

    REASONS = ("corrupt", "empty", "not_media", "missing_caption", "missing_file", "too_short")

    def add(self, reason: str, path: str | os.PathLike, detail: str = "") -> None:
        """Record a skipped file under ``reason`` and log a warning naming it."""
        if reason not in self.REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; expected one of {self.REASONS}")
        getattr(self, reason).append((str(path), detail))
        log.warning("%s: skipping %s (%s%s)", self.title, path, reason, f": {detail}" if detail else "")

    @property
    def skipped(self) -> list[tuple[str, str, str]]:
        """All skipped files as (reason, path, detail)."""
        return [(r, p, d) for r in self.REASONS for p, d in getattr(self, r)]

    def paths(self, reason: str) -> list[str]:
        """Skipped paths for one reason."""
        return [p for p, _ in getattr(self, reason)]

    def summary(self) -> str:
        """Multi-line human-readable summary: counts, then each skipped file with its reason."""
        skipped = self.skipped
        lines = [f"{self.title}: {self.ok} ok, {len(skipped)} skipped"]
        for r in self.REASONS:
            entries = getattr(self, r)
            if entries:
                lines.append(f"  {r} ({len(entries)}):")
                lines.extend(f"    {p}" + (f": {d}" if d else "") for p, d in entries)
        return "\n".join(lines)


class ScanReport(MediaReport):
    """Report of scan_media_folder."""


class DecodeReport(MediaReport):
    """Report of iter_decoded."""


def _read_manifest(manifest: Path, root: Path) -> dict[Path, str]:
    """Captions from JSONL ({"file", "caption"} per line) or CSV (file,caption header); paths relative to root."""
    out: dict[Path, str] = {}

    def put(entry: dict, where: str) -> None:
        fkey = next((k for k in _FILE_KEYS if k in entry), None)
        ckey = next((k for k in _CAPTION_KEYS if k in entry), None)
        if fkey is None or ckey is None:
            raise ValueError(f"{manifest}{where}: needs a file column {_FILE_KEYS} and a caption column "
                             f"{_CAPTION_KEYS}, got keys {sorted(entry)}")
        p = Path(str(entry[fkey]))
        out[(p if p.is_absolute() else root / p).resolve()] = "" if entry[ckey] is None else str(entry[ckey])

    if manifest.suffix.lower() == ".jsonl":
        for n, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{manifest}:{n}: invalid JSON ({e.msg}); expected {{\"file\", \"caption\"}}") from e
                if not isinstance(entry, dict):
                    raise ValueError(f"{manifest}:{n}: expected a JSON object, got {type(entry).__name__}")
                put(entry, f":{n}")
    elif manifest.suffix.lower() == ".csv":
        with open(manifest, newline="", encoding="utf-8") as f:
            for n, row in enumerate(csv.DictReader(f), 2):
                put({k.strip(): v for k, v in row.items() if k is not None}, f":{n}")
    else:
        raise ValueError(f"{manifest}: manifest must be .jsonl or .csv")
    return out


def _sidecar_caption(path: Path) -> str | None:
    for cand in (path.with_suffix(".txt"), path.with_name(path.name + ".txt")):
        if cand.is_file():
            text = cand.read_text(encoding="utf-8", errors="replace").strip()
            return text or None
    return None


def _probe(path: Path, kind: str) -> None:
    """Cheap validity check: open the container / image header (raises on corrupt files)."""
    if kind == "image":
        with Image.open(path) as img:
            img.verify()
        return
    with av.open(str(path), metadata_errors="ignore") as c:
        if not c.streams.video:
            raise NotMediaError("no video stream")


def scan_media_folder(root: str | os.PathLike, caption_policy: str = "error",
                      manifest: str | os.PathLike | None = None, *, recursive: bool = True,
                      probe: bool = True, strict: bool = False) -> tuple[list[MediaItem], ScanReport]:
    """List media files under ``root`` with captions; skipped files are reported by reason, not raised.

    Captions: manifest (JSONL/CSV; auto-detected as one of MANIFEST_NAMES in root) first, then a
    sidecar ``<name>.txt``. Missing caption: "error" skips the file (reported), "empty" uses "",
    "filename" uses the file stem with _ and - as spaces. probe opens each file's header to catch
    corrupt files early. strict raises ValueError with the summary if anything was skipped.
    """
    if caption_policy not in CAPTION_POLICIES:
        raise ValueError(f"caption_policy must be one of {CAPTION_POLICIES}, got {caption_policy!r}")
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"media folder {root} does not exist or is not a directory")
    if manifest is None:
        manifest = next((root / n for n in MANIFEST_NAMES if (root / n).is_file()), None)
    captions = _read_manifest(Path(manifest), root) if manifest is not None else {}
    manifest_path = Path(manifest).resolve() if manifest is not None else None
    report = ScanReport(title=f"scan {root}")
    files = sorted(p for p in (root.rglob("*") if recursive else root.iterdir())
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    seen: set[Path] = set()
    items: list[MediaItem] = []
    for p in files:
        rp = p.resolve()
        if rp == manifest_path or p.suffix.lower() == ".txt":
            continue
        kind = media_kind(p)
        if kind is None:
            report.add("not_media", p, f"extension {p.suffix or '(none)'!r} is not a video or image")
            continue
        seen.add(rp)
        if p.stat().st_size == 0:
            report.add("empty", p, "0 bytes")
            continue
        if probe:
            try:
                _probe(p, kind)
            except NotMediaError as e:
                report.add("not_media", p, str(e))
                continue
            except DECODE_ERRORS as e:
                report.add("corrupt", p, f"{type(e).__name__}: {e}")
                continue
        caption = captions.get(rp)
        if caption is None:
            caption = _sidecar_caption(p)
        if caption is None:
            if caption_policy == "error":
                report.add("missing_caption", p, "no manifest entry or sidecar .txt")
                continue
            caption = "" if caption_policy == "empty" else p.stem.replace("_", " ").replace("-", " ").strip()
        items.append(MediaItem(p, caption, kind))
    for rp in sorted(set(captions) - seen):
        report.add("missing_file", rp, f"listed in {manifest} but not found")
    report.ok = len(items)
    if strict and report.skipped:
        raise ValueError(report.summary())
    return items, report


@dataclass
class DecodedClip:
    """A decoded media item: frames uint8 [F, H, W, 3] and where they came from."""

    item: MediaItem
    frames: torch.Tensor
    info: ClipInfo


def iter_decoded(items: Iterable[MediaItem], config: DecodeConfig | None = None,
                 report: DecodeReport | None = None,
                 rng: random.Random | np.random.Generator | None = None) -> Iterator[DecodedClip]:
    """Decode items one by one; a file that fails is logged, recorded in ``report`` and skipped."""
    cfg = config or DecodeConfig()
    if cfg.start == "random" and rng is None:  # a config error, not a per-file one: fail before the loop
        raise ValueError("DecodeConfig.start='random' needs an rng (random.Random or numpy Generator)")
    report = report if report is not None else DecodeReport(title="decode")
    for item in items:
        try:
            frames, info = read_media(item.path, cfg, rng)
        except MediaError as e:
            report.add(e.reason, item.path, str(e))
            continue
        except FileNotFoundError as e:
            report.add("missing_file", item.path, str(e))
            continue
        except DECODE_ERRORS as e:
            report.add("corrupt", item.path, f"{type(e).__name__}: {e}")
            continue
        report.ok += 1
        yield DecodedClip(item, frames, info)
