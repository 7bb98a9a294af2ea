"""Checkpoints: atomic DCP saves, resume picking only complete ones, and a SIGKILLed distributed run
that resumes to the same weights as an uninterrupted one (also at another world size)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from bench.trainer_scaling import write_synthetic_shards
from tests.single_process import single_process_env
from training.checkpoint import (
    COMPLETE,
    CheckpointManager,
    ModelOptimState,
    ObjectState,
    checkpoint_step,
    find_latest,
    read_info,
)
from training.distributed import destroy, init_distributed

ROOT = Path(__file__).resolve().parents[2]
ATOL = 1e-6  # same ops in the same order: resumed == uninterrupted up to fp32 noise
ELASTIC_ATOL, ELASTIC_RTOL = 1e-5, 1e-4  # 1 vs 2 ranks: fp32 reduction order differs (as in test_distributed)
# Attention key biases whose gradient is exactly zero in exact arithmetic (a softmax is invariant to a
# shift shared by all its logits: D heads' single query, Wan's cross-attention to text). Their fp32
# gradients are rounding noise, which RMSProp/Adam normalise to +-lr steps in a noise-dependent
# direction; they change no output, so runs with different reduction orders are compared without them.
INVARIANT = re.compile(r"(heads\.\d+\.k\.bias|cross_attn\.k\.bias)(\.|$)")


def command(nproc: int, args: list[str]) -> tuple[list[str], dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    if nproc == 1:
        return [sys.executable, "-m", "training", *args], env
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "training", *args], env


def descendants(pid: int) -> list[int]:
    """Child processes of `pid`, recursively (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def launch(nproc: int, args: list[str]) -> None:
    cmd, env = command(nproc, args)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"


def run_args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "--config", str(ROOT / "configs/tiny_cpu.toml"), f"--run.dir={run_dir}", f"--data.path={data}",
        "--apt.image.steps=3", "--apt.video.steps=2", "--checkpoint.every=1", "--checkpoint.keep=0",
        "--monitor.log_every=1", "--monitor.val_every=0", *extra,
    ]


def final_state(run_dir: Path, tmp: Path) -> dict:
    """The newest checkpoint as one plain dict (DCP -> torch.save, read back with weights_only)."""
    ckpt = find_latest(run_dir)
    out = tmp / f"{run_dir.name}.pt"
    dcp_to_torch_save(str(ckpt), str(out))
    return torch.load(out, weights_only=True)


def assert_same_state(a: dict, b: dict, prefix: str = "", atol: float = ATOL) -> None:
    assert a.keys() == b.keys(), prefix
    for k in a:
        if k == "rng" or (atol > ATOL and INVARIANT.search(f"{prefix}{k}")):
            continue
        if isinstance(a[k], dict):
            assert_same_state(a[k], b[k], f"{prefix}{k}.", atol)
        elif isinstance(a[k], torch.Tensor):
            # optimiser states hold raw squared gradients (RMSProp: square_avg), noisier than weights
            tol = (atol, 0.0) if atol == ATOL else (10 * atol, 10 * ELASTIC_RTOL) if ".optim." in prefix else (atol, ELASTIC_RTOL)
            torch.testing.assert_close(a[k], b[k], atol=tol[0], rtol=tol[1], msg=lambda m, k=k: f"{prefix}{k}: {m}")
        else:
            assert a[k] == b[k], f"{prefix}{k}"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_synthetic_shards(tmp_path_factory.mktemp("shards") / "tiny", num=12)


@pytest.mark.slow  # ~30 s: several real torchrun jobs
def test_sigkill_and_resume_matches_uninterrupted_run(data, tmp_path):
    launch(2, run_args(data, tmp_path / "full"))

    # the same run, killed (whole process group, SIGKILL) once step-2 is on disk; it crosses the
    # image -> video boundary only after resuming
    run = tmp_path / "killed"
    cmd, env = command(2, run_args(data, run))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run / "checkpoints/step-2" / COMPLETE).exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.02)
    for pid in [proc.pid, *descendants(proc.pid)]:  # torchrun and its workers (own sessions), like a node dying
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "export/apt_generator.safetensors").exists(), "killed too late: the run had finished"

    # nothing half-written is visible as a checkpoint: every step-N folder is complete
    folders = [p for p in (run / "checkpoints").iterdir() if not p.name.endswith(".tmp")]
    assert folders and all((p / COMPLETE).is_file() and (p / ".metadata").is_file() for p in folders)
    newest = find_latest(run)
    assert checkpoint_step(newest) >= 2
    # a save killed mid-way (only .tmp) and a folder without the marker must both be ignored
    shutil.copytree(newest, run / "checkpoints/step-90.tmp")
    (run / "checkpoints/step-90.tmp" / COMPLETE).unlink()
    (run / "checkpoints/step-91.tmp").mkdir()
    (run / "checkpoints/step-91.tmp/.metadata").write_bytes(b"\x00half")
    shutil.copytree(newest, run / "checkpoints/step-95")
    (run / "checkpoints/step-95" / COMPLETE).unlink()
    assert find_latest(run) == newest

    launch(2, run_args(data, run, "--resume"))
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    resumes = [e for e in events if e.get("event") == "resume"]
    assert len(resumes) == 1 and resumes[0]["checkpoint"] == str(newest)
    assert not list((run / "checkpoints").glob("*.tmp")), "stale .tmp folders are cleaned on start"

    full, resumed = final_state(tmp_path / "full", tmp_path), final_state(run, tmp_path)
    assert_same_state(full, resumed)
    assert full["ema"]["num_updates"] == 2  # video phase: fresh EMA, 2 G updates
    for name in ("apt_generator", "apt_image_ema"):
        from safetensors.torch import load_file

        a = load_file(tmp_path / "full/export" / f"{name}.safetensors")
        b = load_file(run / "export" / f"{name}.safetensors")
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=ATOL, rtol=0, msg=f"{name} {k}")

    # elastic: resume the 2-process run's step-4 checkpoint on 1 process (same global batch 2x2 = 4)
    elastic = tmp_path / "elastic"
    shutil.copytree(tmp_path / "full/checkpoints/step-4", elastic / "checkpoints/step-4")
    launch(1, run_args(data, elastic, "--data.micro_batch=4"))
    assert_same_state(full, final_state(elastic, tmp_path), atol=ELASTIC_ATOL)


# ----------------------------------------------------------------------------------------------
# CheckpointManager on a 1-process group (in-process)
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def world(monkeypatch):
    single_process_env(monkeypatch)
    w = init_distributed("cpu", "gloo")
    yield w
    destroy()


class Counter:
    def __init__(self):
        self.n = 0

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, s):
        self.n = int(s["n"])


def test_save_load_roundtrip_rng_keep_and_partial(world, tmp_path):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    counter = Counter()
    mgr = CheckpointManager(tmp_path, world, keep=2)
    for step in (1, 2, 3):
        counter.n = step * 10
        torch.manual_seed(step)
        state = {"gen": ModelOptimState(model, opt), "counter": ObjectState(counter), "progress": {"step": step}}
        mgr.save(step, state, files={"config.toml": "[run]\n"}, info={"phase": "image"})
    after_save = torch.rand(3)  # the RNG stream right after the step-3 save
    assert [s for s, _ in mgr.complete()] == [2, 3]  # keep = 2 pruned step-1
    assert read_info(mgr.latest())["phase"] == "image" and (mgr.latest() / "config.toml").is_file()

    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    counter.n = -1
    torch.manual_seed(999)
    state = {"gen": ModelOptimState(model, opt), "counter": ObjectState(counter), "progress": {"step": 0}}
    mgr.load(mgr.latest(), state)
    assert state["progress"]["step"] == 3 and counter.n == 30
    torch.testing.assert_close(model.state_dict()["weight"], saved["weight"], rtol=0, atol=0)
    assert opt.state_dict()["state"][0]["step"] == 1
    torch.testing.assert_close(torch.rand(3), after_save, rtol=0, atol=0)  # RNG restored

    # a partial save is never picked; loading a folder without the marker is refused with its name
    (tmp_path / "checkpoints/step-7.tmp").mkdir()
    partial = tmp_path / "checkpoints/step-8"
    shutil.copytree(mgr.latest(), partial)
    (partial / COMPLETE).unlink()
    assert mgr.latest().name == "step-3"
    with pytest.raises(FileNotFoundError, match="step-8"):
        mgr.load(partial, state)
    assert mgr.clean_partial() == [tmp_path / "checkpoints/step-7.tmp"]
    assert dist.is_initialized()
