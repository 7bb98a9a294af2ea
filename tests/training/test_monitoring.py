"""What a cluster user sees: a start banner, 'checkpoint saved' lines, one progress line per log
interval when the output is not a terminal, learning rate (with warmup) / samples/s / peak memory in
metrics.jsonl, TensorBoard scalars and validation images, and no config that turns TensorBoard on
without it being a default dependency. In-process 1-process runs of the tiny config."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from bench.trainer_scaling import write_synthetic_shards
from tests.single_process import single_process_env
from training.config import load_config, tomllib
from training.distributed import destroy
from training.loop import train

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def run(monkeypatch, tmp_path_factory):
    data = write_synthetic_shards(tmp_path_factory.mktemp("shards") / "tiny", num=8)

    def go(run_dir: Path, *overrides: str):
        single_process_env(monkeypatch)
        cfg = load_config(ROOT / "configs/tiny_cpu.toml", [f"--run.dir={run_dir}", f"--data.path={data}",
                                                           "--monitor.val_every=0", *overrides])
        try:
            result = train(cfg)
        finally:
            destroy()
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return result, [r for r in lines if "event" not in r], [r for r in lines if "event" in r]

    return go


def test_non_tty_output_banner_checkpoint_lines_and_one_line_per_log_interval(run, tmp_path, capsys):
    # pytest captures stdout/stderr (not terminals): no tqdm bar, one line per flush of 2 steps
    run(tmp_path / "r", "--monitor.progress=true", "--monitor.log_every=2", "--checkpoint.every=4")
    out, err = capsys.readouterr()
    lines = out.splitlines()
    progress = [x for x in lines if x.startswith("step ")]
    assert [x.split()[1] for x in progress] == ["2/8", "4/8", "6/8", "8/8"]
    assert "[image]" in progress[0] and "[video]" in progress[-1] and "samples_s=" in progress[0]
    assert lines[0].startswith("[step 0] apt-train apt: run dir ") and "world size 1 (gloo, cpu)" in lines[0]
    assert "image steps 1-4" in lines[0] and "video steps 5-8" in lines[0] and "fresh start at step 0 of 8" in lines[0]
    saved = [x for x in lines if "checkpoint saved:" in x]
    assert len(saved) == 2 and saved[0].endswith("checkpoints/step-4") and saved[1].endswith("checkpoints/step-8")
    assert "\r" not in err and "it/s" not in err  # no tqdm bar redrawn into a log file


def _run_on_terminal(tmp_path: Path, name: str, stdout_is_terminal: bool) -> tuple[str, str]:
    """`python -m training` with stderr (and stdout, if asked) on a 120-column pseudo-terminal: (terminal, pipe)."""
    data = tmp_path / "shards"
    if not data.exists():
        write_synthetic_shards(data, num=8)
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "training", "--config", str(ROOT / "configs/tiny_cpu.toml"), f"--run.dir={tmp_path / name}",
           f"--data.path={data}", "--monitor.val_every=0", "--monitor.progress=true", "--apt.video.steps=0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=secondary if stdout_is_terminal else subprocess.PIPE,
                            stderr=secondary)
    os.close(secondary)
    out = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(primary)
    piped = proc.stdout.read().decode() if proc.stdout else ""
    assert proc.wait(timeout=120) == 0, out[-2000:]
    return out.decode(errors="replace"), piped


def test_terminal_gets_a_tqdm_bar_and_redirected_stdout_gets_lines(tmp_path):
    terminal, _ = _run_on_terminal(tmp_path, "tty", stdout_is_terminal=True)
    assert "apt-train tty:" in terminal and "4/4" in terminal  # the tqdm bar
    assert not any(x.startswith("step 2/4") for x in terminal.splitlines())
    # `apt-train ... > log` from a terminal: the log gets one line per flush, the terminal no bar
    terminal, piped = _run_on_terminal(tmp_path, "log", stdout_is_terminal=False)
    assert [x.split()[1] for x in piped.splitlines() if x.startswith("step ")] == ["2/4", "4/4"]
    assert "apt-train log:" not in terminal


def test_metrics_have_lr_with_warmup_samples_per_second_and_peak_memory(run, tmp_path):
    _, rows, events = run(tmp_path / "r", "--monitor.log_every=2", "--run.warmup_steps=2")
    base_image, base_video = 1e-4, 5e-5  # tiny_cpu.toml: apt.lr, apt.video.lr
    lr = {r["step"]: r["lr"] for r in rows}
    assert lr == pytest.approx({1: base_image / 2, 2: base_image, 3: base_image, 4: base_image,
                                5: base_video / 2, 6: base_video, 7: base_video, 8: base_video}, rel=1e-6)
    assert all(r["lr_d"] == r["lr"] for r in rows)  # warmup on both optimisers (same lr here)
    flushed = [r for r in rows if "it_s" in r]
    assert [r["step"] for r in flushed] == [2, 4, 6, 8]
    for r in flushed:
        assert r["samples_s"] == pytest.approx(r["it_s"] * 2)  # global batch 2 x 1 rank
        assert 0.05 < r["peak_mem_gib"] < 64  # process peak RSS on CPU
    assert [e["event"] for e in events][:1] == ["start"]
    assert not any("mfu" in r for r in rows)  # CPU without monitor.peak_tflops: no MFU


def test_mfu_from_the_counted_flops_of_a_step(run, tmp_path):
    # MFU is reported on known GPUs; a configured peak turns it on anywhere (here 1 GFLOP/s)
    _, rows, _ = run(tmp_path / "r", "--monitor.log_every=2", "--monitor.peak_tflops=0.001")
    flushed = [r for r in rows if "it_s" in r]
    flops = [r["mfu"] * 1e9 / r["it_s"] for r in flushed]  # = counted FLOPs of one step on one rank
    assert flops[0] > 1e6 and flops == pytest.approx([flops[0]] * 4, rel=1e-9)  # same shapes in both phases


def test_tensorboard_scalars_and_validation_images(run, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(tmp_path / "r", "--monitor.tensorboard=true", "--monitor.log_every=2", "--monitor.val_every=4",
        "--monitor.peak_tflops=0.001")
    acc = EventAccumulator(str(tmp_path / "r/tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"d_loss", "g_loss", "lr", "samples_s", "peak_mem_gib", "mfu"} <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("d_loss")] == list(range(1, 9))
    images = acc.Images("validation/grid")
    assert [e.step for e in images] == [4, 8] and images[0].width > 0 and images[0].height > 0


def test_configs_enable_tensorboard_only_if_the_default_install_has_it():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    default = {d.split(">")[0].split("=")[0].split(";")[0].strip().lower() for d in project["dependencies"]}
    for path in sorted((ROOT / "configs").glob("*.toml")):
        if tomllib.loads(path.read_text()).get("monitor", {}).get("tensorboard"):
            assert "tensorboard" in default, f"{path.name} turns TensorBoard on but it is not a default dependency"
