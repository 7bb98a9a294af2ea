"""A tiny headless APT run (`python -m training`) per model family, on a tiny stand-in preset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from apt_core.models.io import load_wan
from apt_core.models.wan import get_config
from bench.trainer_scaling import write_synthetic_shards

ROOT = Path(__file__).resolve().parents[2]


def _headless(tmp_path: Path, data: Path, *overrides: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-m", "training", "--config", str(ROOT / "configs/tiny_cpu.toml"),
                           f"--run.dir={tmp_path}", f"--data.path={data}", "--parallel.strategy=none", "--apt.image.steps=1",
                           "--apt.video.steps=1", "--monitor.val_every=0", "--checkpoint.every=0", "--monitor.log_every=1",
                           *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "event" not in r]


@pytest.mark.parametrize("preset,channels", [("tiny-ti2v", 48)])
def test_tiny_headless_apt_run_per_family(tmp_path, preset, channels):
    data = write_synthetic_shards(tmp_path / "data", num=4, latent_shape=(channels, 1, 4, 4))
    rows = _headless(tmp_path / "run", data, f"--model.preset={preset}")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite(r[k]) for r in rows for k in ("d_loss", "g_loss"))
    gen = load_wan(tmp_path / "run/export/apt_generator.safetensors")
    assert gen.config == get_config(preset)
