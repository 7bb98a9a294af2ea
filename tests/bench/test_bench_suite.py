"""The benchmark suite: the GPU code paths run (rehearsed on CPU at stand-in sizes) and the check
mode flags regressions. No speed is asserted here: speed is the benchmark's job, not the tests'."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import compare

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("rehearsal")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "-m", "bench", "--rehearse", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}


def test_rehearsal_writes_every_benchmark_with_its_machine_and_command(rehearsal):
    assert set(rehearsal) == {"inference", "trainer_scaling", "r1_cost", "sfv_cost", "suite"}
    for name, result in rehearsal.items():
        assert result["machine"]["torch"] and result["machine"]["cpu_cores"] >= 1, name
        assert "command" in result and result["time"], name
    assert rehearsal["suite"]["rehearsal"] is True


def test_rehearsal_runs_the_dit_forward_path_in_bf16(rehearsal):
    inf = rehearsal["inference"]
    assert inf["rehearsal"] and "samplers_cpu" not in inf  # the GPU path only
    (row,) = inf["dit"]
    assert "error" not in row and row["dtype"] == "bfloat16" and row["seconds"] > 0
    assert row["output_finite"] is True  # every weight initialised (to_empty leaves garbage), no NaN kernel
    assert row["tokens"] == 3 * 4 * 4 and row["tflop_per_forward"] > 0
    timed = row["forward_s_by_sdpa_backend"]
    for choice in ("default", "auto", "flash", "cudnn", "efficient", "math"):  # CPU falls back where needed
        assert isinstance(timed[choice], float) and timed[choice] > 0, (choice, timed[choice])
    assert timed["auto_picked"] and set(timed["auto_picked"].values()) <= {"flash", "cudnn", "efficient", "math"}
    backends = inf["sdpa_backends"]
    assert backends["MATH"]["ok"] and backends["default"]["ok"]  # the CPU fallback works
    assert backends["shape"] == [1, 1, 48, 128]


def test_rehearsal_runs_the_training_iteration_with_the_gpu_settings(rehearsal):
    (row,) = rehearsal["trainer_scaling"]["rows"]
    assert row["mixed_precision"] == "bf16" and row["activation_checkpointing"] is True
    assert row["attention"] == "auto"  # parallel.attention reaches the models through parallelize
    assert row["step_s"] > 0 and row["tflop_per_sample"] > 0 and row["processes"] == 1
    assert row["metrics_finite"] is True and set(row["last_losses_rank0"]) == {"d_loss", "g_loss"}


def test_rehearsal_runs_every_r1_variant_and_probes_double_backward(rehearsal):
    r1 = rehearsal["r1_cost"]
    rows = {r["variant"]: r for r in r1["rows"]}
    assert set(rows) == {"none", "approx", "exact"}
    for variant, r in rows.items():
        assert "error" not in r, (variant, r.get("error"))
        assert r["dtype"] == "bf16 autocast" and r["activation_checkpointing"] is True
        assert r["step_ms"] > 0
    assert rows["approx"]["d_forward_batch"] == 3 * 2 and rows["exact"]["d_forward_batch"] == 2 * 2
    # exact R1 needs a double backward: the math kernel has one
    assert r1["sdpa_double_backward"]["MATH"] == "ok"
    assert set(r1["sdpa_double_backward"]) >= {"FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"}


def test_rehearsal_runs_apt_and_sfv_discriminator_steps(rehearsal):
    rows = {r["variant"]: r for r in rehearsal["sfv_cost"]["rows"]}
    assert set(rows) == {"apt", "sfv", "sfv-exact"}
    for variant, r in rows.items():
        assert "error" not in r, (variant, r.get("error"))
        assert r["dtype"] == "bf16 autocast" and r["activation_checkpointing"] is True and r["finite"] is True
        assert r["step_ms"] > 0 and r["total_mib"] > 0
    apt, sfv = rows["apt"], rows["sfv"]
    assert (apt["d_blocks"], sfv["d_blocks"]) == (2, 1)  # tiny-comfy: SF-V keeps the first half, frozen
    assert sfv["d_params"] < apt["d_params"] and sfv["d_params_trainable"] < sfv["d_params"]
    assert sfv["d_optimizer_mib"] < apt["d_optimizer_mib"]  # optimiser state for the heads only
    assert (sfv["loss"], sfv["r1_mode"], rows["sfv-exact"]["r1_mode"]) == ("hinge", "approx", "exact")
    assert "total_vs_apt" in sfv and rehearsal["sfv_cost"]["rehearsal"] is True


def test_compare_flags_regressions_in_either_direction_and_missing_figures(capsys):
    baseline = {"checks": {
        "inference.speedup": {"value": 40.0, "higher_is_better": True, "rel_tol": 0.5},
        "r1_cost.time": {"value": 2.0, "higher_is_better": False, "rel_tol": 0.1},
        "trainer_scaling.mfu": {"value": 0.4, "higher_is_better": True, "rel_tol": 0.15},
    }}
    ok = {"inference.speedup": 21.0, "r1_cost.time": 2.19, "trainer_scaling.mfu": 0.35}
    assert compare(ok, baseline) == []
    slow = {"inference.speedup": 19.0, "r1_cost.time": 2.3, "trainer_scaling.mfu": 0.35}
    assert compare(slow, baseline) == ["inference.speedup", "r1_cost.time"]
    # a figure that is gone (that case failed or ran out of memory) is a regression ...
    assert compare({"inference.speedup": 40.0, "r1_cost.time": 2.0}, baseline) == ["trainer_scaling.mfu"]
    assert "MISSING" in capsys.readouterr().out
    # ... but not when its benchmark was not run at all
    assert compare({"inference.speedup": 40.0}, baseline, ran=["inference"]) == []


def test_rehearse_refuses_a_baseline():
    proc = subprocess.run([sys.executable, "-m", "bench", "--rehearse", "--check"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "--rehearse" in proc.stderr


def test_the_prepared_device_script_runs_every_part(tmp_path):
    # bench/device_run.sh is what a GPU session runs first; REHEARSE=1 runs its parts on CPU.
    env = {**os.environ, "REHEARSE": "1", "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "bench/device_run.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["inference.json", "inference_compiled.json", "log.txt", "machine.txt", "r1_cost.json",
                     "sfv_cost.json", "trainer_scaling.json"]
    assert len(files) + 1 <= 8  # + baseline_gpu.json on a GPU; the device tool returns at most 8 files
    log = (tmp_path / "log.txt").read_text()
    assert log.count("=== exit 0 after") == 5, log[-2000:]
    (row,) = json.loads((tmp_path / "inference_compiled.json").read_text())["dit"]
    assert row["compiled"] and row["compile_s"] is not None and row["compiled_graphs"] == 1


def test_a_hung_training_job_is_stopped_with_its_workers(tmp_path):
    # bench.trainer_scaling stops a GPU job at its time limit; its torchrun workers must go too, or
    # one would keep holding the GPU for the parts after it. A real torchrun job that hangs.
    from bench.trainer_scaling import _run_job

    marker = f"apt_hang_{os.getpid()}"
    script = tmp_path / f"{marker}.py"
    script.write_text("import time\nprint('started', flush=True)\ntime.sleep(600)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", str(script)]
    returncode, stderr = _run_job(cmd, env, tmp_path, timeout=8)
    assert returncode == -9 and "stopped after 8 s" in stderr
    left = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
    assert not left, f"processes left running: {left}"
