"""Dataset shards: encoded training samples (latent or pixels + text embedding + caption) in safetensors.

Written by the ComfyUI dataset node and by headless preprocessing, read by the trainer. The format
is specified in docs/SHARDS.md: shard files ``shard-<writer>-<seq>.safetensors`` holding tensors
``<i>.latent`` / ``<i>.text_emb`` with per-sample JSON in the header, plus one index part
``dataset-<writer>.json`` per writer. Every file is written atomically (temp file + os.replace), so
several writers (different ``shard_index``) can fill one directory concurrently.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from apt_core.fileio import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

FORMAT = "apt-shards"
FORMAT_VERSION = 1
WRITE_MODES = ("new", "overwrite", "append")
_SHARD_RE = re.compile(r"^shard-(\d{5})-(\d{6})\.safetensors$")
_INDEX_RE = re.compile(r"^dataset-(\d{5})\.json$")


def shard_name(shard_index: int, seq: int) -> str:
    """File name of a writer's ``seq``-th shard."""
    return f"shard-{shard_index:05d}-{seq:06d}.safetensors"


def index_name(shard_index: int) -> str:
    """File name of a writer's index part."""
    return f"dataset-{shard_index:05d}.json"


def writer_slice(items: Sequence, shard_index: int, num_shards: int) -> list:
    """The items writer ``shard_index`` of ``num_shards`` should process (every num_shards-th one)."""
    _check_writer(shard_index, num_shards)
    return list(items[shard_index::num_shards])


def _check_writer(shard_index: int, num_shards: int) -> None:
    if not (isinstance(num_shards, int) and num_shards >= 1 and isinstance(shard_index, int)
            and 0 <= shard_index < num_shards and num_shards <= 99999):
        raise ValueError(f"need 0 <= shard_index < num_shards <= 99999, got shard_index={shard_index!r}, "
                         f"num_shards={num_shards!r}")


class BadSample(ValueError):
    """A stored sample the trainer must not use (NaN/Inf, absurd values); the message names file and index."""


@dataclass
class Sample:
    """One training sample: latent (or pixels) [C, F, H, W], text embedding [L, D] and provenance."""

    latent: torch.Tensor
    text_emb: torch.Tensor
    text_len: int
    caption: str
    source: str = ""
    fps: float = 0.0
    frame_indices: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable per-sample info
    image_emb: torch.Tensor | None = None  # optional [tokens, D] image embedding (I2V: CLIP tokens of the first frame)
    image_latent: torch.Tensor | None = None  # optional [C, F, H, W] like latent (Wan 2.1 I2V: VAE latent of condition_video)


def _json(obj: Any, what: str) -> str:
    try:
        return json.dumps(obj, ensure_ascii=False, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be JSON-serialisable (str/int/float/bool/list/dict, finite numbers): {e}") from e


class ShardWriter:
    """Append samples; every ``samples_per_shard`` of them become one shard file plus an index update.

    metadata: dataset-level JSON dict (encoder names, latent normalisation, ...), stored in every
    shard header and index part. shard_index/num_shards name this writer so several writers can share
    ``out_dir``. mode: "new" (refuse if this writer's files exist), "overwrite" (delete them first),
    "append" (continue after them; ``written_sources`` lists what is already there).
    """

    def __init__(self, out_dir: str | os.PathLike, metadata: dict[str, Any], samples_per_shard: int = 64,
                 shard_index: int = 0, num_shards: int = 1, mode: str = "new") -> None:
        _check_writer(shard_index, num_shards)
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        if mode not in WRITE_MODES:
            raise ValueError(f"mode must be one of {WRITE_MODES}, got {mode!r}")
        if not isinstance(metadata, dict):
            raise ValueError(f"metadata must be a dict, got {type(metadata).__name__}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.metadata = json.loads(_json(metadata, "ShardWriter metadata"))
        self.samples_per_shard = samples_per_shard
        self.shard_index, self.num_shards = shard_index, num_shards
        self._pending: list[Sample] = []
        self._shards: list[dict[str, Any]] = []
        self._dtypes: tuple[torch.dtype, torch.dtype, int, int] | None = None
        self.closed = False
        self._open_existing(mode)

    def _own_files(self) -> list[Path]:
        own = [p for p in self.out_dir.iterdir()
               if (m := _SHARD_RE.match(p.name)) and int(m.group(1)) == self.shard_index]
        index = self.out_dir / index_name(self.shard_index)
        return sorted(own) + ([index] if index.exists() else [])

    def _open_existing(self, mode: str) -> None:
        existing = self._own_files()
        if not existing:
            return
        if mode == "new":
            raise FileExistsError(f"{self.out_dir} already has files of writer {self.shard_index} "
                                  f"({', '.join(p.name for p in existing[:3])}...); use mode='append' to continue "
                                  f"or mode='overwrite' to replace them")
        if mode == "overwrite":
            for p in existing:
                p.unlink()
            return
        index = self.out_dir / index_name(self.shard_index)
        if not index.exists():
            raise FileNotFoundError(f"cannot append: {index} is missing but shard files of writer "
                                    f"{self.shard_index} exist; use mode='overwrite'")
        part = _load_index_part(index)
        if part["metadata"] != self.metadata:
            raise ValueError(f"cannot append to {index}: its metadata {part['metadata']} differs from {self.metadata}")
        self._shards = part["shards"]

    @property
    def num_samples(self) -> int:
        """Samples added so far (written + pending), including those found in append mode."""
        return sum(s["num_samples"] for s in self._shards) + len(self._pending)

    @property
    def written_sources(self) -> list[str]:
        """Sources of the samples already in shard files (for resuming an interrupted run)."""
        return [src for s in self._shards for src in s["sources"]]

    @property
    def files(self) -> list[Path]:
        """Shard files written by this writer."""
        return [self.out_dir / s["file"] for s in self._shards]

    def add(self, latent: torch.Tensor, text_emb: torch.Tensor, caption: str, *, text_len: int | None = None,
            source: str = "", fps: float = 0.0, frame_indices: Sequence[int] = (),
            extra: dict[str, Any] | None = None, image_emb: torch.Tensor | None = None,
            image_latent: torch.Tensor | None = None) -> int:
        """Add one sample (latent [C,F,H,W], text_emb [L,D], optional image_emb [N,E] and image_latent shaped like
        latent); returns its number within this writer."""
        return self.add_sample(Sample(latent, text_emb, text_emb.shape[0] if text_len is None else text_len,
                                      caption, source, fps, list(frame_indices), dict(extra or {}), image_emb,
                                      image_latent))

    def add_sample(self, s: Sample) -> int:
        """Validate and queue a Sample; flushes a shard when ``samples_per_shard`` are queued."""
        if self.closed:
            raise RuntimeError(f"ShardWriter for {self.out_dir} is closed")
        where = f"sample {self.num_samples} (source {s.source!r})"
        if not isinstance(s.latent, torch.Tensor) or s.latent.ndim != 4:
            raise ValueError(f"{where}: latent must be a tensor [C, F, H, W], got {_shape(s.latent)}")
        if not isinstance(s.text_emb, torch.Tensor) or s.text_emb.ndim != 2:
            raise ValueError(f"{where}: text_emb must be a tensor [L, D], got {_shape(s.text_emb)}")
        if not (0 <= int(s.text_len) <= s.text_emb.shape[0]):
            raise ValueError(f"{where}: text_len {s.text_len} outside [0, L={s.text_emb.shape[0]}]")
        if s.latent.is_floating_point() and not bool(torch.isfinite(s.latent).all()):
            raise ValueError(f"{where}: latent has NaN/Inf values; check the VAE encode")
        if s.text_emb.is_floating_point() and not bool(torch.isfinite(s.text_emb).all()):
            raise ValueError(f"{where}: text_emb has NaN/Inf values; check the text encoder")
        if s.image_emb is not None and (not isinstance(s.image_emb, torch.Tensor) or s.image_emb.ndim != 2
                                        or not bool(torch.isfinite(s.image_emb).all())):
            raise ValueError(f"{where}: image_emb must be a finite tensor [N, E], got {_shape(s.image_emb)}")
        if s.image_latent is not None:
            il = s.image_latent
            if not isinstance(il, torch.Tensor) or il.shape != s.latent.shape or il.dtype != s.latent.dtype:
                got = f"{_shape(il)}, {il.dtype}" if isinstance(il, torch.Tensor) else _shape(il)
                raise ValueError(f"{where}: image_latent must be shaped like the latent {tuple(s.latent.shape)} "
                                 f"with its dtype {s.latent.dtype}, got {got}")
            if il.is_floating_point() and not bool(torch.isfinite(il).all()):
                raise ValueError(f"{where}: image_latent has NaN/Inf values; check the VAE encode")
        kind = (s.latent.dtype, s.text_emb.dtype, s.latent.shape[0], s.text_emb.shape[1])
        if self._dtypes is None:
            self._dtypes = kind
        elif kind != self._dtypes:
            raise ValueError(f"{where}: (latent dtype, text dtype, C, D) = {kind} differs from earlier samples "
                             f"{self._dtypes}; one dataset needs one encoder setup")
        info = {"caption": str(s.caption), "source": str(s.source), "fps": float(s.fps),
                "frame_indices": [int(i) for i in s.frame_indices], "text_len": int(s.text_len),
                "extra": s.extra}
        if not math.isfinite(info["fps"]):
            raise ValueError(f"{where}: fps must be finite, got {s.fps}")
        _json(info, f"{where} fields")
        self._pending.append(Sample(s.latent.detach().cpu().clone(memory_format=torch.contiguous_format),
                                    s.text_emb.detach().cpu().clone(memory_format=torch.contiguous_format),
                                    info["text_len"], info["caption"], info["source"], info["fps"],
                                    info["frame_indices"], s.extra,
                                    None if s.image_emb is None else s.image_emb.detach().cpu().contiguous().clone(),
                                    None if s.image_latent is None else s.image_latent.detach().cpu().contiguous().clone()))
        n = self.num_samples - 1
        if len(self._pending) >= self.samples_per_shard:
            self.flush()
        return n

    def flush(self) -> Path | None:
        """Write queued samples as one shard file and rewrite the index part; None if nothing queued."""
        if not self._pending:
            return None
        seq = max((int(_SHARD_RE.match(s["file"]).group(2)) for s in self._shards), default=-1) + 1
        path = self.out_dir / shard_name(self.shard_index, seq)
        tensors: dict[str, torch.Tensor] = {}
        infos = []
        for i, s in enumerate(self._pending):
            tensors[f"{i}.latent"] = s.latent
            tensors[f"{i}.text_emb"] = s.text_emb
            info = {"caption": s.caption, "source": s.source, "fps": s.fps,
                    "frame_indices": s.frame_indices, "text_len": s.text_len, "extra": s.extra,
                    "crc32": [tensor_crc32(s.latent), tensor_crc32(s.text_emb)]}
            if s.image_emb is not None:
                tensors[f"{i}.image_emb"] = s.image_emb
                info["image_emb"] = True
                info["crc32"].append(tensor_crc32(s.image_emb))
            if s.image_latent is not None:
                tensors[f"{i}.image_latent"] = s.image_latent
                info["image_latent"] = True
                info["crc32"].append(tensor_crc32(s.image_latent))
            infos.append(info)
        header = {"format": FORMAT, "format_version": str(FORMAT_VERSION),
                  "dataset": _json(self.metadata, "metadata"), "samples": _json(infos, "samples"),
                  "writer": _json({"shard_index": self.shard_index, "num_shards": self.num_shards, "seq": seq},
                                  "writer")}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=header)
        self._shards.append({"file": path.name, "bytes": path.stat().st_size, "num_samples": len(infos),
                             "latent_shapes": [list(s.latent.shape) for s in self._pending],
                             "sources": [s.source for s in self._pending]})
        self._pending = []
        self._write_index(complete=False)
        return path

    def _write_index(self, complete: bool) -> None:
        part = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "writer": {"shard_index": self.shard_index, "num_shards": self.num_shards},
                "metadata": self.metadata, "complete": complete,
                "num_samples": sum(s["num_samples"] for s in self._shards), "shards": self._shards}
        atomic_write_text(self.out_dir / index_name(self.shard_index), json.dumps(part, ensure_ascii=False, indent=1))

    def close(self) -> None:
        """Flush and mark this writer's index part complete."""
        if self.closed:
            return
        self.flush()
        self._write_index(complete=True)
        self.closed = True

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # keep what was encoded, but leave the part marked incomplete
            self.flush()
            self.closed = True


def tensor_crc32(t: torch.Tensor) -> int:
    """CRC-32 of a tensor's bytes (row-major): stored per sample so the reader can tell a damaged file."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return zlib.crc32(flat.view(torch.uint8).numpy()) if flat.numel() else 0


def _damaged(path: Path, what: str) -> ValueError:
    return ValueError(f"shard file {path} is damaged: {what}; re-write it (or remove it from the index part)")


def _shape(x: Any) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def _load_index_part(path: Path) -> dict[str, Any]:
    try:
        part = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); the index part is damaged") from e
    if not isinstance(part, dict) or part.get("format") != FORMAT:
        raise ValueError(f"{path}: not an {FORMAT} index part (format={part.get('format') if isinstance(part, dict) else None!r})")
    if int(part.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {part['format_version']} is newer than this reader "
                         f"({FORMAT_VERSION}); update ComfyUI-APT")
    for key in ("metadata", "shards", "writer"):
        if key not in part:
            raise ValueError(f"{path}: index part lacks key {key!r}")
    return part


class ShardReader:
    """Random access to all samples of a shard directory; tensors load lazily via safetensors safe_open.

    Samples are ordered by (writer index, shard sequence, position in shard). ``shapes[i]`` is the
    latent shape of sample i (from the index, no tensor reads) for bucketing.
    """

    def __init__(self, root: str | os.PathLike, require_complete: bool = False, max_open: int = 8) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise NotADirectoryError(f"shard directory {self.root} does not exist")
        parts = sorted(p for p in self.root.iterdir() if _INDEX_RE.match(p.name))
        if not parts:
            raise FileNotFoundError(f"{self.root}: no index parts (dataset-NNNNN.json); write the directory "
                                    f"with apt_core.shards.ShardWriter")
        self.metadata: dict[str, Any] = {}
        self.files: list[Path] = []
        self.shapes: list[tuple[int, ...]] = []
        self._locate: list[tuple[int, int]] = []  # sample -> (file number, index in shard)
        first_part, num_shards = None, set()
        for part_path in parts:
            part = _load_index_part(part_path)
            if first_part is None:
                first_part, self.metadata = part_path, part["metadata"]
            elif part["metadata"] != self.metadata:
                diff = sorted(k for k in set(part["metadata"]) | set(self.metadata)
                              if part["metadata"].get(k) != self.metadata.get(k))
                raise ValueError(f"{part_path} and {first_part} disagree on metadata keys {diff}; shards from "
                                 f"different encoders/normalisations cannot be mixed in one directory")
            num_shards.add(int(part["writer"]["num_shards"]))
            if not part.get("complete", False):
                msg = f"{part_path}: writer {part['writer']['shard_index']} has not finished (complete=false)"
                if require_complete:
                    raise ValueError(msg)
                log.warning("%s; reading the %d samples written so far", msg, part.get("num_samples", 0))
            for shard in part["shards"]:
                path = self.root / shard["file"]
                if not path.is_file():
                    raise FileNotFoundError(f"{path} is listed in {part_path} but missing")
                size = path.stat().st_size
                if "bytes" in shard and size != shard["bytes"]:
                    raise _damaged(path, f"{size} bytes, {shard['bytes']} when written ({part_path}); "
                                         f"{'truncated' if size < shard['bytes'] else 'changed'}")
                self.files.append(path)
                shapes = [tuple(int(d) for d in s) for s in shard["latent_shapes"]]
                if len(shapes) != shard["num_samples"]:
                    raise ValueError(f"{part_path}: {shard['file']} lists {len(shapes)} shapes for "
                                     f"{shard['num_samples']} samples")
                self.shapes.extend(shapes)
                self._locate.extend((len(self.files) - 1, j) for j in range(len(shapes)))
        found = {int(_INDEX_RE.match(p.name).group(1)) for p in parts}
        for n in num_shards:
            missing = sorted(set(range(n)) - found)
            if missing:
                log.warning("%s: index parts of writers %s (of num_shards=%d) are missing", self.root, missing[:10], n)
        listed = {p.name for p in self.files}
        orphans = sorted(p.name for p in self.root.iterdir() if _SHARD_RE.match(p.name) and p.name not in listed)
        if orphans:
            log.warning("%s: shard files not listed in any index part are ignored: %s", self.root, orphans[:5])
        self._max_open = max(1, max_open)
        self._open: OrderedDict[int, tuple[Any, list[dict[str, Any]]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._locate)

    def _handle(self, file_no: int) -> tuple[Any, list[dict[str, Any]]]:
        if file_no in self._open:
            self._open.move_to_end(file_no)
            return self._open[file_no]
        path = self.files[file_no]
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:  # safetensors' own error type: truncated file, garbled header
            raise _damaged(path, str(e)) from None
        header = handle.metadata() or {}
        if header.get("format") != FORMAT:
            raise ValueError(f"{path}: header format {header.get('format')!r}, expected {FORMAT!r}")
        try:
            entry = (handle, json.loads(header["samples"]))
        except (KeyError, ValueError) as e:
            raise _damaged(path, f"header 'samples' unreadable ({e})") from None
        self._open[file_no] = entry
        if len(self._open) > self._max_open:
            self._open.popitem(last=False)
        return entry

    def _index(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for {n} samples in {self.root}")
        return i % n

    def info(self, i: int) -> dict[str, Any]:
        """Per-sample JSON fields (caption, source, fps, frame_indices, text_len, extra) without tensors."""
        file_no, j = self._locate[self._index(i)]
        return dict(self._handle(file_no)[1][j])

    def __getitem__(self, i: int) -> Sample:
        i = self._index(i)
        file_no, j = self._locate[i]
        handle, infos = self._handle(file_no)
        latent = handle.get_tensor(f"{j}.latent")
        if tuple(latent.shape) != self.shapes[i]:
            raise ValueError(f"{self.files[file_no]}: tensor {j}.latent has shape {tuple(latent.shape)}, "
                             f"index says {self.shapes[i]}")
        d = infos[j]
        text_emb = handle.get_tensor(f"{j}.text_emb")
        image_emb = handle.get_tensor(f"{j}.image_emb") if d.get("image_emb") else None
        image_latent = handle.get_tensor(f"{j}.image_latent") if d.get("image_latent") else None
        if image_latent is not None and tuple(image_latent.shape) != self.shapes[i]:
            raise ValueError(f"{self.files[file_no]}: sample {j} (dataset index {i}, source {d.get('source', '')!r}): "
                             f"tensor {j}.image_latent has shape {tuple(image_latent.shape)}, expected the latent's "
                             f"{self.shapes[i]} (the VAE latent of the clip's first frame + grey frames)")
        present = [(k, t) for k, t in (("latent", latent), ("text_emb", text_emb), ("image_emb", image_emb),
                                       ("image_latent", image_latent)) if t is not None]
        if "crc32" in d:  # written since checksums were added; older shards are read unchecked
            for (name, t), crc in zip(present, d["crc32"]):
                if tensor_crc32(t) != crc:
                    raise _damaged(self.files[file_no], f"tensor {j}.{name} (sample {i}) fails its CRC-32 check")
        for key, t in present:
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise BadSample(f"{self.files[file_no]}: sample {j} (dataset index {i}, source "
                                f"{d.get('source', '')!r}) has {bad} NaN/Inf values in {j}.{key}; "
                                f"re-encode that sample or remove its shard")
        return Sample(latent, text_emb, int(d["text_len"]), d["caption"], d["source"],
                      float(d["fps"]), list(d["frame_indices"]), dict(d.get("extra", {})), image_emb, image_latent)

    def locate(self, i: int) -> tuple[Path, int]:
        """(shard file, position in that file) of sample i, for error messages."""
        file_no, j = self._locate[self._index(i)]
        return self.files[file_no], j

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]

    def buckets(self) -> dict[tuple[int, ...], list[int]]:
        """Sample indices grouped by latent shape (sorted by shape; indices ascending)."""
        out: dict[tuple[int, ...], list[int]] = {}
        for i, s in enumerate(self.shapes):
            out.setdefault(s, []).append(i)
        return dict(sorted(out.items()))

    def __getstate__(self) -> dict[str, Any]:  # open handles are not picklable (DataLoader workers)
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state
