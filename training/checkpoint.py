"""Resumable checkpoints with torch.distributed.checkpoint (DCP), written atomically.

Layout: `<run.dir>/checkpoints/step-N/` holds DCP's shard files + `.metadata`, the resolved
`config.toml` and a `COMPLETE` marker (JSON: step, world size, time). A save goes to
`step-N.tmp/` first; once every rank has written its shards, rank 0 writes the marker and renames
the folder to `step-N`. A process killed during a save leaves only `step-N.tmp/`, which `latest()`
ignores and the next run deletes. DCP reshards on load, so a run can resume at another world size.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from training.distributed import World, barrier, broadcast_object, rng_state, set_rng_state

COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class ModelOptimState(Stateful):
    """A model and (optionally) its optimiser as one DCP entry, through get_state_dict/set_state_dict
    (FQNs without FSDP/DDP/compile wrapper prefixes, optimiser state keyed by parameter name)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        if self.optimizer is None:
            return {"model": get_model_state_dict(self.model)}
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.optimizer is None:
            set_model_state_dict(self.model, state["model"])
        else:
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


class ObjectState(Stateful):
    """Anything with state_dict()/load_state_dict() (EMA, data loader) as a DCP entry."""

    def __init__(self, obj: Any):
        self.obj = obj

    def state_dict(self) -> dict[str, Any]:
        return self.obj.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.obj.load_state_dict(state)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class CheckpointManager:
    """Save / find / load / prune the DCP checkpoints of one run directory (collective calls)."""

    def __init__(self, run_dir: str | os.PathLike, world: World, keep: int = 3):
        if keep < 0:
            raise ValueError(f"checkpoint.keep must be >= 0, got {keep}")
        self.dir = Path(run_dir) / "checkpoints"
        self.world, self.keep = world, keep

    # -- discovery ------------------------------------------------------------------------------
    def complete(self) -> list[tuple[int, Path]]:
        """(step, path) of every complete checkpoint (COMPLETE marker + DCP .metadata), oldest first."""
        return _complete(self.dir)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None (half-written `.tmp` folders never count)."""
        found = self.complete()
        return found[-1][1] if found else None

    def resume_point(self) -> tuple[Path | None, list[str]]:
        """The newest complete checkpoint that `verify` finds intact (None if none), and one warning per
        newer damaged one, naming its files. Rank 0 decides; every rank gets the same answer."""
        choice: tuple[str | None, list[str]] = (None, [])
        if self.world.is_main:
            warnings_: list[str] = []
            for _, path in reversed(self.complete()):
                problems = verify(path)
                if not problems:
                    choice = (str(path), warnings_)
                    break
                warnings_.append(f"checkpoint {path} is damaged ({'; '.join(problems)}); "
                                 "falling back to the previous complete checkpoint")
            else:
                choice = (None, warnings_)
        path, warnings_ = broadcast_object(choice)
        return (Path(path) if path else None), warnings_

    def clean_partial(self) -> list[Path]:
        """Delete `step-*.tmp` folders left by a killed save (rank 0; call before training starts)."""
        removed = []
        if self.world.is_main and self.dir.is_dir():
            for p in self.dir.glob("step-*.tmp"):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
        barrier()
        return removed

    # -- save / load ----------------------------------------------------------------------------
    def _with_rng(self, state: Mapping[str, Any]) -> dict[str, Any]:
        # each rank stores its own generator state under its own key (DCP keeps every rank's entry)
        return {**state, "rng": {f"rank{self.world.rank}": rng_state()}}

    def save(
        self, step: int, state: Mapping[str, Any], files: Mapping[str, str] | None = None, info: Mapping[str, Any] | None = None
    ) -> Path:
        """Write `state` (+ per-rank RNG) as `step-N/` atomically; `files` = extra text files (config.toml),
        `info` = JSON fields for the COMPLETE marker (readable without loading: `read_info`)."""
        final = self.dir / f"step-{step}"
        tmp = self.dir / f"step-{step}.tmp"
        if self.world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        dcp.save(self._with_rng(state), checkpoint_id=str(tmp))
        barrier()  # every rank's shards are on disk
        if self.world.is_main:
            for name, text in (files or {}).items():
                (tmp / name).write_text(text)
            sizes = {f.name: f.stat().st_size for f in sorted(tmp.iterdir()) if f.is_file()}  # checked by verify()
            marker = {**(info or {}), "step": step, "world_size": self.world.world_size, "time": time.time(), "files": sizes}
            with open(tmp / COMPLETE, "w") as f:
                json.dump(marker, f)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            if final.exists():  # re-saving a step (resumed from an older checkpoint): replace it
                old = final.with_name(final.name + ".old")
                os.replace(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, final)
            _fsync_dir(self.dir)
            self.prune()
        barrier()
        return final

    def prune(self) -> list[Path]:
        """Delete all but the newest `keep` complete checkpoints (rank 0 only; keep 0 = keep all), never the
        newest one whose weights were finite (COMPLETE marker `finite`; markers without it count as finite)."""
        if not self.world.is_main or self.keep == 0:
            return []
        found = self.complete()
        old = [p for _, p in found[: -self.keep]]
        good = [p for _, p in found if is_finite(p)]
        if good and good[-1] in old:  # the last known-good state survives any run of bad saves
            old.remove(good[-1])
        for p in old:
            shutil.rmtree(p, ignore_errors=True)
        return old

    def load(self, path: str | os.PathLike, state: dict[str, Any]) -> dict[str, Any]:
        """Load `path` into `state` in place (Stateful entries get load_state_dict); restores RNG if this
        rank's state was saved (same world size). Returns `state` with plain values replaced."""
        path = Path(path)
        if not (path / COMPLETE).is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE} marker); pick another step-N folder")
        keys = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
        mine = f"rank{self.world.rank}"
        with_rng = any(k.startswith(f"rng.{mine}.") for k in keys)
        full = self._with_rng(state) if with_rng else dict(state)
        try:
            dcp.load(full, checkpoint_id=str(path))
        except (CheckpointException, OSError, EOFError) as e:  # reading failed (not a state mismatch)
            raise RuntimeError(f"loading checkpoint {path} failed ({type(e).__name__}: {e}); it may be damaged: "
                               "resume from an older step-N folder with --resume PATH") from e
        if with_rng:
            set_rng_state(full["rng"][mine])
        for k in state:
            state[k] = full[k]
        return state


def _complete(root: Path) -> list[tuple[int, Path]]:
    out = []
    if root.is_dir():
        for p in root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir() and (p / COMPLETE).is_file() and (p / ".metadata").is_file():
                out.append((int(m.group(1)), p))
    return sorted(out)


def verify(path: str | os.PathLike) -> list[str]:
    """What makes a checkpoint folder unusable, one line per damaged file (names it); [] = intact.

    Cheap (no tensor reads): the COMPLETE marker parses, every file it lists has the size it had when
    saved, the DCP `.metadata` unpickles, and every shard file reaches the last byte `.metadata` points to.
    """
    path = Path(path)
    try:
        info = read_info(path)
    except FileNotFoundError as e:
        return [str(e)]
    problems = []
    for name, size in (info.get("files") or {}).items():
        f = path / name
        if not f.is_file():
            problems.append(f"{f} is missing")
        elif f.stat().st_size != size:
            problems.append(f"{f} has {f.stat().st_size} bytes, {size} when saved (truncated or overwritten)")
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # a damaged pickle raises anything
        return problems + [f"{path / '.metadata'} is unreadable ({type(e).__name__}: {e})"]
    ends: dict[str, int] = {}
    for item in (metadata.storage_data or {}).values():
        ends[item.relative_path] = max(ends.get(item.relative_path, 0), item.offset + item.length)
    for rel, end in sorted(ends.items()):
        f = path / rel
        if not f.is_file():
            problems.append(f"{f} is missing")
        elif f.stat().st_size < end:
            problems.append(f"{f} has {f.stat().st_size} bytes, .metadata points to byte {end} (truncated)")
    return list(dict.fromkeys(problems))


def find_latest(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete `step-N` checkpoint of a run directory (no process group needed)."""
    found = _complete(Path(run_dir) / "checkpoints")
    return found[-1][1] if found else None


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step of a `step-N` checkpoint folder."""
    m = _STEP_DIR.match(Path(path).name)
    if not m:
        raise ValueError(f"{path} is not a step-N checkpoint folder")
    return int(m.group(1))


def is_finite(path: str | os.PathLike) -> bool:
    """False only where the checkpoint's COMPLETE marker records non-finite weights (`"finite": false`)."""
    try:
        return json.loads((Path(path) / COMPLETE).read_text()).get("finite", True) is not False
    except (OSError, ValueError):
        return True


def read_info(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON of a checkpoint's COMPLETE marker (step, world_size, time and the `info` given to save)."""
    marker = Path(path) / COMPLETE
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{marker}: missing or unreadable ({e}); {path} is not a complete checkpoint") from e
