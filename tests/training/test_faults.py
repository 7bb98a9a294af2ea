"""Faults that must never corrupt a run silently or lose work: corrupt samples, divergence (NaN/Inf),
checkpoint pruning, exports that would replace files, a second run on the same directory, and a resume
whose config no longer fits the checkpoint. Real tiny runs in-process (1-process gloo group) or as
`python -m training` processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from apt_core.shards import BadSample, ShardWriter
from bench.trainer_scaling import write_synthetic_shards
from tests.single_process import single_process_env
from training.checkpoint import COMPLETE, CheckpointManager, ModelOptimState
from training.config import load_config
from training.distributed import destroy, init_distributed
from training.loop import (
    ResumeMismatch,
    TeacherStage,
    check_weights,
    make_validator,
    plan_phases,
    resolve_wan_config,
    train,
    validate,
)
from training.monitor import CollapseDetector, MetricsLogger
from training.runlock import RunDirBusy, run_lock

ROOT = Path(__file__).resolve().parents[2]
TEACHER = ["--run.stage=teacher", "--monitor.val_every=0", "--monitor.log_every=1", "--export.dtype=fp32"]


@pytest.fixture
def run(monkeypatch):
    """`run(*overrides, export_only=False, resume=False)`: train() the tiny config in this process."""

    def go(*overrides: str, export_only: bool = False, resume: bool | str = False):
        single_process_env(monkeypatch)
        cfg = load_config(ROOT / "configs/tiny_cpu.toml", list(overrides))
        ok = False
        try:
            result = train(cfg, resume=resume, export_only=export_only)
            ok = True
        finally:
            destroy(barrier=ok)
        return result

    return go


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_synthetic_shards(tmp_path_factory.mktemp("faults") / "shards", num=8)


def strict_rows(path: Path) -> list[dict]:
    """metrics.jsonl parsed as strict JSON (the NaN / Infinity tokens are not JSON)."""
    def refuse(token):
        raise ValueError(f"invalid JSON token {token} in {path}")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_one_corrupt_sample_stops_the_run_by_file_and_index(run, tmp_path):
    data = tmp_path / "bad_shards"
    with ShardWriter(data, {"space": "latent"}, samples_per_shard=2) as w:
        for i in range(4):  # sample 3 holds one absurd (finite) value; NaN never gets past the writer
            latent = torch.randn(16, 1, 4, 4)
            if i == 3:
                latent[5, 0, 1, 2] = 1e30
            w.add(latent, torch.randn(4, 32), f"caption {i}")
    run_dir = tmp_path / "run"
    with pytest.raises(BadSample, match=r"shard-00000-000001\.safetensors: sample 1 \(dataset index 3.*magnitude 1e\+30"):
        run(*TEACHER, f"--run.dir={run_dir}", f"--data.path={data}", "--run.steps=4", "--checkpoint.every=1",
            "--checkpoint.keep=2")
    assert not (run_dir / "export").exists()
    rows = strict_rows(run_dir / "metrics.jsonl")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)


def test_uint8_pixel_shards_train_in_minus_one_to_one(run, tmp_path):
    g = torch.Generator().manual_seed(0)
    with ShardWriter(tmp_path / "pixels", {"space": "pixels"}) as w:  # frames as decoded: uint8 0..255
        for i in range(4):
            w.add(torch.randint(0, 256, (3, 1, 4, 4), generator=g, dtype=torch.uint8), torch.randn(4, 32, generator=g), f"c{i}")
    run(*TEACHER, f"--run.dir={tmp_path / 'run'}", f"--data.path={tmp_path / 'pixels'}", "--model.in_dim=3",
        "--run.steps=2", "--checkpoint.every=0", "--export.final=false")
    losses = [r["loss"] for r in strict_rows(tmp_path / "run/metrics.jsonl") if "loss" in r]
    # target eps - x0 with x0 in [-1, 1]: MSE ~ 1 + E[x0^2] ~ 1.3 (on 0..255 it was ~ 2e4)
    assert len(losses) == 2 and all(0.5 < v < 3 for v in losses), losses


def test_divergence_stops_before_saving_and_logs_null(run, data, tmp_path):
    # lr 1e30: the first update blows the weights up to ~1e30, the second forward overflows
    with pytest.raises(FloatingPointError, match=r"step 2: non-finite .*loss.*stopped without saving. Newest checkpoint: .*step-1"):
        run(*TEACHER, f"--run.dir={tmp_path}", f"--data.path={data}", "--run.steps=4", "--teacher.lr=1e30",
            "--checkpoint.every=1", "--checkpoint.keep=2")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-1"]
    assert json.loads((tmp_path / "checkpoints/step-1" / COMPLETE).read_text())["finite"] is True
    assert not (tmp_path / "export").exists()
    rows = [r for r in strict_rows(tmp_path / "metrics.jsonl") if "event" not in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert isinstance(rows[0]["loss"], float) and rows[1]["loss"] is None  # valid JSON null, not dropped


def test_metrics_logger_keeps_nan_as_null_and_on_the_console(monkeypatch, tmp_path, capsys):
    single_process_env(monkeypatch)
    world = init_distributed("cpu", "gloo")
    try:
        logger = MetricsLogger(tmp_path, world, total_steps=2, log_every=2, progress=True)
        logger.log(1, {"d_loss": torch.tensor(0.5), "g_loss": torch.tensor(1.0)})
        rows = logger.log(2, {"d_loss": torch.tensor(float("nan")), "g_loss": torch.tensor(float("inf"))})
        assert str(rows[1]["d_loss"]) == "nan" and rows[1]["g_loss"] == float("inf")
        shown = logger.bar.postfix if logger.bar is not None else capsys.readouterr().out  # tqdm bar or log lines
        assert "d_loss=nan" in shown and "g_loss=inf" in shown
        logger.close()
    finally:
        destroy()
    rows = strict_rows(tmp_path / "metrics.jsonl")
    assert rows[1]["d_loss"] is None and rows[1]["g_loss"] is None and rows[0]["d_loss"] == 0.5


def test_weights_checked_by_name_and_validation_warns(monkeypatch, data, tmp_path):
    single_process_env(monkeypatch)
    cfg = load_config(ROOT / "configs/tiny_cpu.toml", [*TEACHER, f"--run.dir={tmp_path}", f"--data.path={data}",
                                                      "--teacher.ema_decay=0.5", "--monitor.val_every=1"])
    world = init_distributed("cpu", "gloo")
    try:
        stage = TeacherStage(cfg, world, resolve_wan_config(cfg))
        stage.begin_phase(plan_phases(cfg)[0], first=True)
        ckpt = CheckpointManager(tmp_path, world)
        check_weights(stage, 0, ckpt)  # finite: passes
        with torch.no_grad():
            stage.ema.shadow[3].view(-1)[0] = float("inf")
        with pytest.raises(FloatingPointError, match=rf"step 7: ema\.{stage.ema.names[3]} holds NaN/Inf"):
            check_weights(stage, 7, ckpt)
        name, param = next((n, p) for n, p in stage.generator.named_parameters() if "blocks.1.ffn.0.weight" in n)
        with torch.no_grad():
            (param.to_local() if hasattr(param, "to_local") else param).view(-1)[0] = float("nan")
        with pytest.raises(FloatingPointError, match=rf"generator\.{name} holds NaN/Inf"):
            check_weights(stage, 7, ckpt)
        logger = MetricsLogger(tmp_path, world, total_steps=1, progress=False)
        validator = make_validator(cfg, world, __import__("training.data").data.ShardDataset(str(data)), tmp_path)
        with pytest.warns(RuntimeWarning, match="validation samples contain NaN/Inf"):
            result = validate(stage, validator, 1, logger, CollapseDetector())
        assert result["val_finite"] is False
        logger.close()
    finally:
        destroy()
    events = [r for r in strict_rows(tmp_path / "metrics.jsonl") if r.get("event")]
    assert [e["event"] for e in events] == ["validation", "warning"] and events[0]["val_mean"] is None


def test_pruning_keeps_the_newest_finite_checkpoint(monkeypatch, tmp_path):
    single_process_env(monkeypatch)
    world = init_distributed("cpu", "gloo")
    try:
        model = nn.Linear(3, 2)
        ckpt = CheckpointManager(tmp_path, world, keep=2)
        state = {"model": ModelOptimState(model)}
        ckpt.save(1, state, info={"finite": True})
        ckpt.save(2, state)  # a marker without the field (older checkpoints) counts as finite
        for step in (3, 4, 5):
            with torch.no_grad():
                model.weight.fill_(float("nan"))
            ckpt.save(step, state, info={"finite": False})
    finally:
        destroy()
    assert [p.name for _, p in ckpt.complete()] == ["step-2", "step-4", "step-5"]


def test_export_only_without_checkpoint_is_refused(run, data, tmp_path):
    with pytest.raises(FileNotFoundError, match="--export-only: no complete checkpoint .* nothing trained to export"):
        run(*TEACHER, f"--run.dir={tmp_path}", f"--data.path={data}", export_only=True)
    assert not (tmp_path / "export").exists()


def test_exports_never_replace_a_file_unless_asked(run, data, tmp_path):
    args = [*TEACHER, f"--run.dir={tmp_path}", f"--data.path={data}", "--run.steps=3", "--checkpoint.every=1",
            "--checkpoint.keep=0"]
    first = run(*args)
    final = Path(first["export"]["model"])
    assert final.name == "teacher.safetensors"
    before = load_file(final)
    # an earlier step goes to a step-named file, the final export stays as it was
    again = run(*args, export_only=True, resume=str(tmp_path / "checkpoints/step-1"))
    assert Path(again["export"]["model"]).name == "teacher_step-1.safetensors" and again["step"] == 1
    assert all(torch.equal(before[k], v) for k, v in load_file(final).items())
    with pytest.raises(FileExistsError, match=r"teacher\.safetensors already exists \(exported at step 3\).*--overwrite"):
        run(*args, export_only=True)
    # a new run on a directory whose checkpoints are gone but whose export is not: refused before training
    for p in (tmp_path / "checkpoints").iterdir():
        __import__("shutil").rmtree(p)
    (tmp_path / "metrics.jsonl").unlink()
    with pytest.raises(FileExistsError, match="teacher.safetensors already exists"):
        run(*args, "--teacher.lr=1e-2")
    assert not (tmp_path / "metrics.jsonl").exists() and not any((tmp_path / "checkpoints").iterdir())
    assert all(torch.equal(before[k], v) for k, v in load_file(final).items())
    run(*args, "--teacher.lr=1e-2", "--export.overwrite=true")
    assert any(not torch.equal(before[k], v) for k, v in load_file(final).items())


def test_resumed_run_rewrites_its_own_exports(run, data, tmp_path):
    """Killed after the image export (or the final one) but before the next checkpoint: resuming re-exports the
    same step without --overwrite."""
    args = [f"--run.dir={tmp_path}", f"--data.path={data}", "--apt.image.steps=1", "--apt.video.steps=1",
            "--checkpoint.every=1", "--checkpoint.keep=0", "--monitor.val_every=0"]
    run(*args)
    image = load_file(tmp_path / "export/apt_image_ema.safetensors")
    __import__("shutil").rmtree(tmp_path / "checkpoints/step-2")  # as if killed before the video checkpoint
    result = run(*args)
    assert result["resumed_from"].endswith("step-1") and result["step"] == 2
    assert all(torch.equal(image[k], v) for k, v in load_file(tmp_path / "export/apt_image_ema.safetensors").items())


def test_resume_with_another_preset_names_the_setting(run, data, tmp_path):
    args = [*TEACHER, f"--run.dir={tmp_path}", f"--data.path={data}", "--run.steps=1", "--checkpoint.every=1",
            "--export.final=false"]
    run(*args)
    written = (tmp_path / "config.toml").read_text()
    with pytest.raises(ResumeMismatch, match=r"step-1: model\.preset = 'tiny' there, 'small' now: the model architecture changes"):
        run(*args, "--run.steps=2", "--model.preset=small")
    # (model.lora_rank on this seeded init is refused at config load: a LoRA there trains nothing)
    with pytest.raises(ResumeMismatch, match=r"teacher\.ema_decay = 0\.0 there, 0\.9 now"):
        run(*args, "--run.steps=2", "--teacher.ema_decay=0.9")
    assert (tmp_path / "config.toml").read_text() == written  # checked before config.toml is rewritten
    run(*args, "--run.steps=2", "--teacher.lr=1e-5")  # other settings may change on resume
    assert "lr = 1e-05" in (tmp_path / "config.toml").read_text()
    apt = [f"--run.dir={tmp_path / 'apt'}", f"--data.path={data}", "--apt.image.steps=1", "--apt.video.steps=0",
           "--monitor.val_every=0", "--export.final=false"]
    run(*apt)
    with pytest.raises(ResumeMismatch, match=r"apt\.disc_kind = 'apt' there, 'sfv' now"):
        run(*apt, "--apt.image.steps=2", "--apt.disc_kind=sfv")


def test_run_lock_in_process(monkeypatch, tmp_path):
    single_process_env(monkeypatch)
    world = init_distributed("cpu", "gloo")
    try:
        with run_lock(tmp_path, world):
            holder = json.loads((tmp_path / "run.lock").read_text())
            assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
            with pytest.raises(RunDirBusy, match=rf"in use by another training run: pid {os.getpid()} on host"):
                with run_lock(tmp_path, world):
                    pass
        with run_lock(tmp_path, world):  # released at the end of the block
            pass
    finally:
        destroy()


def test_second_run_on_the_same_dir_is_refused_and_a_killed_run_leaves_no_lock(data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "training", "--config", str(ROOT / "configs/tiny_cpu.toml"), *TEACHER,
           f"--run.dir={tmp_path}", f"--data.path={data}", "--run.steps=100000", "--checkpoint.every=5",
           "--checkpoint.keep=2", "--monitor.progress=false"]
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not list((tmp_path / "checkpoints").glob("step-*[0-9]")):
            assert first.poll() is None and time.time() < deadline, "the first run did not start"
            time.sleep(0.1)
        second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 1, second.stderr[-3000:]
        assert f"in use by another training run: pid {first.pid} on host {socket.gethostname()}" in second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None, "the second run must not disturb the first"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    # the kernel dropped the lock with the killed process: exporting its newest checkpoint works
    export = subprocess.run([*cmd, "--export-only"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert export.returncode == 0, export.stderr[-3000:]
    exported = list((tmp_path / "export").glob("teacher_step-*.safetensors"))
    assert len(exported) == 1 and not (tmp_path / "export/teacher.safetensors").exists()
