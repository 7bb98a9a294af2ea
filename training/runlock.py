"""One run at a time per run directory: rank 0 holds an exclusive `flock` on `<run.dir>/run.lock`.

A second run on the same directory (a double submit, a requeued job whose first copy still runs)
would delete the first run's in-progress checkpoint (`clean_partial`) and interleave checkpoints.
The lock is taken before anything in the run directory is touched and released when the run ends;
the kernel drops it when the holding process dies (also on SIGKILL), so a killed run never leaves a
stale lock. The file holds the holder's pid, host and start time, for the error message.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from training.distributed import World, broadcast_object

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"


class RunDirBusy(RuntimeError):
    """Another process holds the run directory's lock (the message names its pid and host)."""


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "a process that is just starting"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("time", 0)))
    return f"pid {info.get('pid')} on host {info.get('host')} (since {since})"


def acquire(run_dir: str | os.PathLike) -> int | None:
    """Take the lock (non-blocking) and record this process in it; the fd, or None where the filesystem
    cannot lock (warned). RunDirBusy if another process holds it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunDirBusy(f"run directory {run_dir} is in use by another training run: {_holder(path)} holds "
                         f"{path}. Wait for it to end (or stop it), or choose another --run.dir") from None
    except OSError as e:  # e.g. a network filesystem mounted without lock support
        os.close(fd)
        log.warning("cannot lock %s (%s): nothing stops a second run on this run directory from deleting this "
                    "run's checkpoints; mount the filesystem with lock support (Lustre: -o flock)", path, e)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}).encode())
    os.fsync(fd)
    return fd


def release(fd: int | None) -> None:
    """Drop the lock (closing the fd releases it)."""
    if fd is not None:
        os.close(fd)


@contextmanager
def run_lock(run_dir: str | os.PathLike, world: World) -> Iterator[None]:
    """Hold the run directory's lock on rank 0 for the block; every rank raises RunDirBusy if it is taken
    (collective: one broadcast)."""
    fd, error = None, None
    if world.is_main:
        try:
            fd = acquire(run_dir)
        except RunDirBusy as e:
            error = str(e)
    error = broadcast_object(error)
    if error is not None:
        raise RunDirBusy(error)
    try:
        yield
    finally:
        release(fd)
