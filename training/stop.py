"""Graceful stop: SIGTERM / SIGUSR1 (a scheduler's time-limit warning or preemption) or the death of
the torchrun launcher ask the loop to save a checkpoint and exit with EXIT_STOPPED.

Any rank may receive the request (a signal can reach one rank only); `StopRequest.agreed` is a
collective (MAX all-reduce of one flag) called by every rank after every step, so all ranks stop
after the same step and save the same checkpoint: no rank is left waiting in a collective.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import torch
import torch.distributed as dist

from training.distributed import World

EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped on request, checkpoint saved; rerunning the command resumes
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
LAUNCHER_DIED = "launcher died"
REASONS = (LAUNCHER_DIED, *(s.name for s in SIGNALS))  # the causes every rank can name, most telling first


class StopRequest:
    """Records the first stop request (signal name or 'launcher died'); install() in the main thread."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}
        self._watcher: threading.Thread | None = None
        self._done = threading.Event()

    def request(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.request(signal.Signals(signum).name)  # repeated signals (torchrun forwards them too) are no-ops

    def install(self, watch_parent: bool | None = None, grace_s: float = 600.0) -> StopRequest:
        """Handle SIGTERM/SIGUSR1; under torchrun (or `watch_parent=True`) also watch for the launcher's
        death: request a stop, and end the process `grace_s` seconds later if it is still running."""
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        if watch_parent is None:
            watch_parent = "TORCHELASTIC_RUN_ID" in os.environ  # a torchrun worker
        if watch_parent:
            parent = os.getppid()
            self._watcher = threading.Thread(target=self._watch, args=(parent, grace_s), daemon=True, name="apt-parent-watch")
            self._watcher.start()
        return self

    def _watch(self, parent: int, grace_s: float) -> None:
        while not self._done.wait(0.5):
            if os.getppid() != parent:  # re-parented: the launcher is gone (SIGKILL, OOM killer, node agent)
                self.request(LAUNCHER_DIED)
                if not self._done.wait(grace_s):
                    os._exit(EXIT_STOPPED)  # the graceful stop did not finish in time (e.g. a rank is stuck)
                return

    def uninstall(self) -> None:
        """Restore the previous signal handlers and stop watching the launcher."""
        self._done.set()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def agreed(self, world: World) -> str | None:
        """Collective: the stop reason if ANY rank was asked to stop, else None (every rank calls it).

        Each rank marks its own reason in a slot per known reason (MAX all-reduce), so every rank
        reports the real cause, e.g. "launcher died" when another rank's watcher saw it first.
        """
        if world.world_size == 1 or not dist.is_initialized():
            return self.reason
        slots = torch.zeros(len(REASONS) + 1, device=world.device)
        if self.reason:
            slots[REASONS.index(self.reason) if self.reason in REASONS else len(REASONS)] = 1.0
        dist.all_reduce(slots, op=dist.ReduceOp.MAX)
        if slots.max().item() == 0:
            return None
        if self.reason:
            return self.reason
        seen = [REASONS[i] for i in range(len(REASONS)) if slots[i].item() > 0]
        return seen[0] if seen else "stop requested on another rank"
