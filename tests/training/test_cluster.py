"""Cluster operation with real processes (gloo, CPU): a run asked to stop by SIGUSR1 / SIGTERM saves a
checkpoint at a step every rank agrees on, exits 75 and resumes to the same result; a killed torchrun
leaves no worker training; a stalled rank ends the job after distributed.timeout_s; the SLURM script
runs locally with stand-ins for srun / scontrol / scancel (SLURM is not installed here) and requeues.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench.trainer_scaling import write_synthetic_shards
from training.checkpoint import COMPLETE, read_info
from training.stop import EXIT_STOPPED

ROOT = Path(__file__).resolve().parents[2]
SBATCH = ROOT / "training/slurm/apt_train.sbatch"
ATOL = 1e-6  # same world size, same ops: resumed == uninterrupted up to fp32 noise


def env() -> dict[str, str]:
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        e.pop(k, None)
    return e


def torchrun(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "training", *args]


def run_args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    # 2 ranks x micro batch 2; checkpoints only at the end (or on a stop request)
    return ["--config", str(ROOT / "configs/tiny_cpu.toml"), f"--run.dir={run_dir}", f"--data.path={data}",
            "--apt.image.steps=6", "--apt.video.steps=6", "--checkpoint.every=0", "--checkpoint.keep=0",
            "--monitor.log_every=1", "--monitor.val_every=0", *extra]


def descendants(pid: int) -> list[int]:
    """Child processes of `pid`, recursively (from /proc)."""
    children: dict[int, list[int]] = {}
    for st in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = st.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(st.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def workers(proc: subprocess.Popen, n: int = 2, timeout: float = 60) -> list[int]:
    """PIDs of the `python -m training` processes under `proc` (torchrun's workers / the srun stand-in's tasks)."""
    end = time.time() + timeout
    while time.time() < end:
        found = [p for p in descendants(proc.pid) if b"training" in _cmdline(p) and b"torch.distributed.run" not in _cmdline(p)]
        if len(found) >= n:
            return found
        time.sleep(0.05)
    raise AssertionError(f"{n} trainer processes did not start")


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def rank_of(pid: int) -> int:
    return int(dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)["RANK"])


def lines(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 120) -> None:
    end = time.time() + timeout
    while not any(r.get("step", 0) >= step and "event" not in r for r in lines(run_dir)):
        assert proc.poll() is None, f"run ended (rc {proc.returncode}) before step {step}"
        assert time.time() < end, f"step {step} not reached in {timeout} s"
        time.sleep(0.05)


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def stopped_events(run_dir: Path) -> list[dict]:
    return [e for e in lines(run_dir) if e.get("event") == "stopped"]


def assert_same_result(ref: Path, run: Path) -> None:
    """Same final EMA export and the same per-step losses as the uninterrupted run."""
    a = load_file(ref / "export/apt_generator.safetensors")
    b = load_file(run / "export/apt_generator.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=ATOL, rtol=0, msg=k)
    rows = {r["step"]: r for r in lines(run) if "event" not in r}  # a resumed run rewrites no step twice
    for r in (r for r in lines(ref) if "event" not in r):
        assert rows[r["step"]]["g_loss"] == pytest.approx(r["g_loss"], abs=1e-5), r["step"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_synthetic_shards(tmp_path_factory.mktemp("shards") / "tiny", num=12)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ref") / "run"
    proc = subprocess.run(torchrun(run_args(data, run)), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run


@pytest.mark.slow  # ~40 s: three torchrun jobs
def test_sigusr1_to_one_rank_and_sigterm_to_torchrun_save_stop_and_resume(data, reference, tmp_path):
    run = tmp_path / "run"
    # 1) SIGUSR1 to rank 1 only: both ranks stop after the same step (collective agreement), save, exit 75
    proc = subprocess.Popen(torchrun(run_args(data, run)), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    pids = []
    try:
        pids = workers(proc)
        wait_for_step(proc, run, 2)
        os.kill(next(p for p in pids if rank_of(p) == 1), signal.SIGUSR1)
        out, _ = proc.communicate(timeout=120)
    finally:
        kill_all([proc.pid, *pids])
    (first,) = stopped_events(run)
    assert first["reason"] == "SIGUSR1"  # written by rank 0, which got no signal: it names rank 1's cause
    assert f"rerun the same command to resume (exit code {EXIT_STOPPED})" in out, out[-3000:]
    ckpt = Path(first["checkpoint"])
    assert (ckpt / COMPLETE).is_file() and read_info(ckpt)["step"] == first["step"] < 12
    assert not (run / "export/apt_generator.safetensors").exists()  # a stopped run exports nothing

    # 2) resume; SIGTERM to torchrun (as a scheduler does): it forwards SIGTERM to its workers
    proc = subprocess.Popen(torchrun(run_args(data, run)), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    pids = []
    try:
        pids = workers(proc)
        wait_for_step(proc, run, first["step"] + 2)
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        kill_all([proc.pid, *pids])
    second = stopped_events(run)[-1]
    assert second["reason"] == "SIGTERM" and first["step"] < second["step"] < 12
    assert (Path(second["checkpoint"]) / COMPLETE).is_file()

    # 3) resume to the end: the same weights and losses as the uninterrupted run
    proc = subprocess.run(torchrun(run_args(data, run)), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    resumes = [e["step"] for e in lines(run) if e.get("event") == "resume"]
    assert resumes == [first["step"], second["step"]]
    assert_same_result(reference, run)


@pytest.mark.slow
def test_killed_launcher_leaves_no_worker_training(data, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(torchrun(run_args(data, run, "--apt.image.steps=5000")), cwd=ROOT, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pids = []
    try:
        pids = workers(proc)
        wait_for_step(proc, run, 1)
        os.kill(proc.pid, signal.SIGKILL)  # the launcher dies without forwarding anything
        proc.wait(timeout=10)
        end = time.time() + 60
        while any(alive(p) for p in pids) and time.time() < end:
            time.sleep(0.1)
        assert not any(alive(p) for p in pids), "workers still training after their launcher was SIGKILLed"
    finally:
        kill_all(pids)
    (ev,) = stopped_events(run)
    assert ev["reason"] == "launcher died" and (Path(ev["checkpoint"]) / COMPLETE).is_file()


@pytest.mark.slow
def test_stalled_rank_ends_the_job_after_the_collective_timeout(data, tmp_path):
    run = tmp_path / "run"
    e = {**env(), "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "2"}  # torchrun: SIGKILL a worker 2 s after SIGTERM
    proc = subprocess.Popen(torchrun(run_args(data, run, "--apt.image.steps=5000", "--distributed.timeout_s=5")),
                            cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pids = []
    try:
        pids = workers(proc)
        wait_for_step(proc, run, 1)
        t0 = time.time()
        os.kill(next(p for p in pids if rank_of(p) == 1), signal.SIGSTOP)  # rank 1 hangs (as on a dead GPU)
        out, _ = proc.communicate(timeout=90)  # the 30-minute default would make this time out
        took = time.time() - t0
    finally:
        kill_all([proc.pid, *pids])
    assert proc.returncode != 0 and took < 60, (proc.returncode, took)
    assert "distributed.timeout_s = 5 s" in out, out[-3000:]


# ----------------------------------------------------------------------------------------------
# The SLURM script
# ----------------------------------------------------------------------------------------------

# Stand-ins for the SLURM commands the script calls (SLURM is not installed here). srun: start
# SLURM_NTASKS copies of the command with SLURM_PROCID / SLURM_LOCALID set (what srun does on one
# node) and record their pids; scancel --signal=SIG JOB: send SIG to those tasks (SLURM signals every
# process of the job's steps); scontrol: `show hostnames` lists SLURM_JOB_NODELIST, `requeue` is logged.
FAKE_SRUN = r"""#!{python}
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
while args and args[0].startswith("--"):
    args = args[1:]
n, log = int(os.environ["SLURM_NTASKS"]), os.environ["FAKE_SLURM_LOG"]
procs = [subprocess.Popen(args, env={{**os.environ, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)}}) for i in range(n)]
with open(log, "a") as f:
    f.write(json.dumps({{"srun": args, "pids": [p.pid for p in procs], "master": [os.environ["MASTER_ADDR"],
                        os.environ["MASTER_PORT"]], "python": shutil.which(args[0])}}) + "\n")
sys.exit(max(p.wait() for p in procs))
"""
FAKE_SCANCEL = r"""#!{python}
import json, os, signal, sys
sig = next(a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--signal="))
rows = [json.loads(x) for x in open(os.environ["FAKE_SLURM_LOG"])]
with open(os.environ["FAKE_SLURM_LOG"], "a") as f:
    f.write(json.dumps({{"scancel": sys.argv[1:]}}) + "\n")
for pid in next(r for r in reversed(rows) if "pids" in r)["pids"]:
    os.kill(pid, getattr(signal, "SIG" + sig))
"""
FAKE_SCONTROL = r"""#!/bin/bash
case "$1 $2" in
  "show hostnames") echo "$SLURM_JOB_NODELIST" | tr ',' '\n' ;;
  *) echo "{{\"scontrol\": \"$*\"}}" >> "$FAKE_SLURM_LOG" ;;
esac
"""


def fake_slurm(tmp: Path) -> Path:
    bin_dir = tmp / "fake_slurm_bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scancel", FAKE_SCANCEL), ("scontrol", FAKE_SCONTROL)):
        path = bin_dir / name
        path.write_text(text.format(python=sys.executable))
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return bin_dir


def job_id_with_free_port() -> int:
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if 20000 <= port < 40000:
            return 100000 + port - 20000  # the script's port: 20000 + job id % 20000
    pytest.skip("no free port in 20000-39999")


def test_sbatch_script_parses_and_has_the_cluster_settings():
    assert subprocess.run(["bash", "-n", str(SBATCH)]).returncode == 0
    text = SBATCH.read_text()
    directives = [line.split()[1] for line in text.splitlines() if line.startswith("#SBATCH")]
    assert "--open-mode=append" in directives and "--signal=B:USR1@120" in directives and "--requeue" in directives
    output = next(d for d in directives if d.startswith("--output="))
    assert "/" not in output.split("=", 1)[1], "SLURM does not create folders for --output: the job would log nowhere"
    assert "trap on_time_limit USR1" in text and "scontrol requeue" in text and "SLURM_JOB_ID % 20000" in text


@pytest.mark.slow  # ~25 s: two 2-task jobs
def test_sbatch_script_runs_stops_on_usr1_requeues_and_resumes(data, reference, tmp_path):
    log = tmp_path / "slurm.log"
    job = job_id_with_free_port()
    e = {**env(), "PATH": f"{fake_slurm(tmp_path)}:{os.environ['PATH']}", "FAKE_SLURM_LOG": str(log),
         "SLURM_JOB_ID": str(job), "SLURM_JOB_NODELIST": "localhost", "SLURM_NNODES": "1", "SLURM_NTASKS": "2",
         "SLURM_NTASKS_PER_NODE": "2", "SLURM_SUBMIT_DIR": str(ROOT), "APT_VENV": str(Path(sys.executable).parents[1])}
    e.pop("PYTHONPATH")  # the script's venv must provide the package
    run = tmp_path / "run"
    # relative config path, started from elsewhere: the script must cd to the submit dir
    args = ["bash", str(SBATCH), "configs/tiny_cpu.toml", *run_args(data, run)[2:]]
    proc = subprocess.Popen(args, cwd=tmp_path, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pids = []
    try:
        pids = workers(proc)
        wait_for_step(proc, run, 2)
        os.kill(proc.pid, signal.SIGUSR1)  # what --signal=B:USR1@120 does
        out, _ = proc.communicate(timeout=120)
    finally:
        kill_all([proc.pid, *pids])
    assert proc.returncode == EXIT_STOPPED, out[-3000:]
    records = [json.loads(x) for x in log.read_text().splitlines()]
    srun = next(r for r in records if "srun" in r)
    assert srun["master"] == ["localhost", str(20000 + job % 20000)]
    assert Path(srun["python"]).resolve() == Path(sys.executable).resolve()  # the venv was activated
    assert {"scancel": ["--signal=USR1", str(job)]} in records and {"scontrol": f"requeue {job}"} in records
    (ev,) = stopped_events(run)
    assert (Path(ev["checkpoint"]) / COMPLETE).is_file()

    # the requeued job: the same script and job id again; it resumes and finishes without a requeue
    log.write_text("")
    proc = subprocess.run(args, cwd=tmp_path, env={**e, "SLURM_RESTART_COUNT": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "restart 1" in proc.stdout and "requeue" not in log.read_text()
    assert [e["step"] for e in lines(run) if e.get("event") == "resume"] == [ev["step"]]
    assert_same_result(reference, run)
