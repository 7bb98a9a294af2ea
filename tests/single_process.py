"""Test helper: the env of a 1-process torch.distributed group on a free 127.0.0.1 port, as torchrun sets it."""

from __future__ import annotations

import socket

import pytest


def single_process_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT for an in-process train() call."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(k, v)
