"""Atomic file writes for weights, shards, videos and run states: all of the new file or none of it.

A writer gets a hidden temp path beside the target (same filesystem, so `os.replace` is atomic);
once it has written there the file gets the mode a plain open() would give (umask respected), is
fsynced and renamed onto the target. On any error the temp file is removed and an existing target
is left as it was.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def refuse_overwrite(path: str | os.PathLike, overwrite: bool, how: str = "pass overwrite=True") -> None:
    """FileExistsError if `path` exists and `overwrite` is off; `how` tells the user how to allow it."""
    if Path(path).exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; {how} to replace it, or choose another name")


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's data to disk (before it is renamed into place)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else by set-and-restore."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(path: str | os.PathLike) -> None:
    """Give a new file the mode a plain open() would (0666 minus the umask, e.g. 0644).

    Some writers (safetensors) create files 0600, which hides shards and exports from the other
    users of a shared cluster or ComfyUI folder."""
    os.chmod(path, 0o666 & ~_umask())


@contextmanager
def atomic_path(path: str | os.PathLike, keep_suffix: bool = False) -> Iterator[Path]:
    """Yield a hidden temp path beside `path`; after the block it is fsynced and renamed onto `path`.

    keep_suffix: the temp name ends with `path`'s suffix, for writers that pick the format by
    extension (PyAV). An exception in the block removes the temp file and propagates.
    """
    path = Path(path)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = path.with_name(f".{path.stem}.tmp-{tag}{path.suffix}" if keep_suffix else f".{path.name}.tmp-{tag}")
    try:
        yield tmp
        default_mode(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 text to `path` atomically (replaces an existing file)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
