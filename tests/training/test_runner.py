"""The one runner driven in-process as a front end drives it: weights from memory (ModelSource) give the same
losses as the same weights from a file, on_step / a caller-owned StopRequest, resume of such a run by
`python -m training --resume RUN_DIR` from its checkpoint alone ([model.arch], no init_from), train() twice
in a worker thread, the validation latents file, and the bf16 frozen-weight policy."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from apt_core.backbone import WanCond, WanFlowModel
from apt_core.lora import inject_lora
from apt_core.models.io import save_wan
from apt_core.models.wan import WanConfig, get_config
from bench.trainer_scaling import write_synthetic_shards
from tests.single_process import single_process_env
from training.config import ConfigError, load_config, set_arch
from training.distributed import destroy
from training.loop import train
from training.models import MemorySource, cast_frozen, frozen_dtype
from training.monitor import read_metrics
from training.stop import StopRequest

ROOT = Path(__file__).resolve().parents[2]
# a stand-in that matches no preset (as a tiny ComfyUI model would): only [model.arch] can rebuild it
ODD = WanConfig(dim=48, ffn_dim=96, num_heads=2, num_layers=2, in_dim=16, out_dim=16, text_dim=32, text_len=16, freq_dim=64)


def _weights(config: WanConfig, seed: int) -> dict[str, torch.Tensor]:
    """Trained-looking weights (non-zero output head, so LoRA trains) as a CPU state dict."""
    torch.manual_seed(seed)
    model = WanFlowModel(config)
    with torch.no_grad():
        model.head.head.weight.normal_(std=0.02)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("runner")
    sd = _weights(get_config("tiny"), 5)
    model = WanFlowModel(get_config("tiny"))
    model.load_state_dict(sd)
    return {"data": write_synthetic_shards(root / "shards", num=8), "base": save_wan(model, root / "base.safetensors"), "sd": sd}


def _cfg(tmp_path: Path, *overrides: str):
    return load_config(ROOT / "configs/tiny_cpu.toml", ["--monitor.log_every=1", "--checkpoint.every=0",
                                                       "--monitor.val_every=0", f"--run.dir={tmp_path}", *overrides])


def _run(monkeypatch, cfg, **kw) -> dict:
    single_process_env(monkeypatch)
    try:
        return train(cfg, **kw)
    finally:
        destroy()


def _losses(result: dict) -> list[dict[str, float]]:
    rows = read_metrics(result["metrics_file"])
    return [{k: v for k, v in r.items() if k.endswith("loss")} for r in rows]


@pytest.mark.parametrize("stage", ["apt_lora", "apt_full", "cd"])
def test_memory_source_gives_the_same_losses_as_the_weights_file(monkeypatch, files, tmp_path, stage):
    common = {"apt_lora": ["--apt.image.steps=2", "--apt.video.steps=0", "--model.lora_rank=4"],
              "apt_full": ["--apt.image.steps=2", "--apt.video.steps=0"],
              "cd": ["--run.stage=cd", "--run.steps=2", "--cd.grid_steps=4", "--cd.lr=1e-3", "--cd.cfg_scale=2.0",
                     "--parallel.strategy=none"]}[stage]
    common = [*common, f"--data.path={files['data']}", "--export.final=false"]
    by_file = _run(monkeypatch, _cfg(tmp_path / "file", f"--model.init_from={files['base']}", *common))
    teacher = None
    if stage == "cd":  # the caller's own frozen teacher module (a ComfyUI model in the nodes)
        teacher = WanFlowModel(get_config("tiny"))
        teacher.load_state_dict(files["sd"])
        calls: list[int] = []
        teacher.register_forward_hook(lambda *_: calls.append(1))
    source = MemorySource(get_config("tiny"), generator=lambda: dict(files["sd"]), teacher=teacher)
    cfg = _cfg(tmp_path / "memory", "--model.source=caller", *common)
    in_memory = _run(monkeypatch, cfg, models=source)
    a, b = _losses(by_file), _losses(in_memory)
    assert len(a) == len(b) == 2 and all(a[0].values())
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        np.testing.assert_allclose(list(rb.values()), list(ra.values()), rtol=1e-5, atol=1e-7)
    if teacher is not None:  # the caller's module is used, not copied, and left as it was
        assert len(calls) >= 2  # one (CFG-batched) teacher call per step
        assert all(torch.equal(v, files["sd"][k]) for k, v in teacher.state_dict().items())
        assert all(p.requires_grad for p in teacher.parameters())
    saved = load_config(tmp_path / "memory/config.toml")
    assert saved.model.source == "caller" and saved.model.init_from == ""
    assert dataclasses.asdict(saved.model.arch)["dim"] == get_config("tiny").dim  # recorded for a resume without the caller
    assert cfg.model.arch.dim == 0  # the caller's config is left as it was


def test_on_step_and_a_stop_from_it_save_a_checkpoint_and_the_next_call_resumes(monkeypatch, files, tmp_path, capfd):
    cfg = _cfg(tmp_path, f"--data.path={files['data']}", f"--model.init_from={files['base']}", "--apt.image.steps=4",
               "--apt.video.steps=0", "--export.final=true")
    calls: list[tuple[int, int, dict[str, float]]] = []
    stop = StopRequest()

    def on_step(step: int, total: int, metrics: dict[str, float]) -> None:
        calls.append((step, total, metrics))
        if step == 2:
            stop.request("Stop button")

    first = _run(monkeypatch, cfg, on_step=on_step, stop=stop)
    assert [c[0] for c in calls] == [1, 2] and {c[1] for c in calls} == {4}
    for _, _, m in calls:
        assert {"d_loss", "g_loss", "lr", "lr_d"} <= m.keys()
        assert all(isinstance(v, float) and math.isfinite(v) for v in m.values())
    assert first["stopped"] == "Stop button" and first["step"] == 2
    assert first["checkpoint"] == str(tmp_path / "checkpoints/step-2") and Path(first["checkpoint"], "COMPLETE").is_file()
    assert "export" not in first
    out, err = capfd.readouterr()  # monitor.progress = false: no bar, no step lines (a node shows its own)
    assert "apt-train" not in err + out and "step 1/" not in out
    calls.clear()
    second = _run(monkeypatch, cfg, on_step=on_step)
    assert second["resumed_from"] == str(tmp_path / "checkpoints/step-2")
    assert [c[0] for c in calls] == [3, 4] and second["stopped"] is None and second["step"] == 4
    assert Path(second["export"]["model"]).is_file()


def test_a_stop_asked_for_during_setup_ends_the_run_before_its_first_step(monkeypatch, files, tmp_path):
    """Stop while the runner builds its models (a node's Stop during minutes of setup on a large model): it
    returns stopped at the resume step without training a step or writing a checkpoint; the next call trains."""
    cfg = _cfg(tmp_path, f"--data.path={files['data']}", "--model.source=caller", "--apt.image.steps=2",
               "--apt.video.steps=0", "--checkpoint.every=2", "--export.final=true")
    stop = StopRequest()

    def weights_then_stop() -> dict[str, torch.Tensor]:
        stop.request("Stop button")  # pressed while G's weights are read
        return dict(files["sd"])

    steps: list[int] = []
    fresh = _run(monkeypatch, cfg, models=MemorySource(get_config("tiny"), weights_then_stop), stop=stop,
                 on_step=lambda step, total, m: steps.append(step))
    assert fresh["stopped"] == "Stop button" and fresh["step"] == 0 and steps == []
    assert fresh["checkpoint"] is None and not list(tmp_path.glob("checkpoints/step-*")) and "export" not in fresh
    events = [json.loads(x) for x in Path(fresh["metrics_file"]).read_text().splitlines()]
    (ev,) = [e for e in events if e.get("event") == "stopped"]
    assert ev["step"] == 0 and ev["reason"] == "Stop button" and ev["checkpoint"] is None
    done = _run(monkeypatch, cfg, models=MemorySource(get_config("tiny"), lambda: dict(files["sd"])),
                on_step=lambda step, total, m: steps.append(step))  # the run lock was released
    assert done["stopped"] is None and steps == [1, 2] and done["step"] == 2
    # resumed with more steps, the stop already asked for: nothing trained, no checkpoint beside step-2
    more = _cfg(tmp_path, f"--data.path={files['data']}", "--model.source=caller", "--apt.image.steps=4",
                "--apt.video.steps=0", "--checkpoint.every=2", "--export.final=true", "--export.overwrite=true")
    stop = StopRequest()
    stop.request("Stop button")
    steps.clear()
    resumed = _run(monkeypatch, more, models=MemorySource(get_config("tiny"), lambda: dict(files["sd"])), stop=stop,
                   on_step=lambda step, total, m: steps.append(step))
    assert resumed["stopped"] == "Stop button" and resumed["step"] == 2 and steps == []
    assert resumed["resumed_from"] == resumed["checkpoint"] == str(tmp_path / "checkpoints/step-2")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-2"]
    rows = [r["step"] for r in read_metrics(resumed["metrics_file"])]
    assert rows == [1, 2]
    final = _run(monkeypatch, more, models=MemorySource(get_config("tiny"), lambda: dict(files["sd"])),
                 on_step=lambda step, total, m: steps.append(step))
    assert final["stopped"] is None and steps == [3, 4] and final["resumed_from"] == str(tmp_path / "checkpoints/step-2")
    assert Path(final["export"]["model"]).is_file()


def _caller_run(monkeypatch, tmp_path: Path, files) -> Path:
    """A run started in-process on the ODD architecture from memory, stopped at step 2 of 2 + 2."""
    run_dir = tmp_path / "run"
    cfg = _cfg(run_dir, f"--data.path={files['data']}", "--model.source=caller", "--apt.image.steps=4",
               "--apt.video.steps=0", "--model.lora_rank=4", "--checkpoint.every=2", "--data.micro_batch=1")
    stop = StopRequest()
    result = _run(monkeypatch, cfg, models=MemorySource(ODD, _weights(ODD, 3)), stop=stop,
                  on_step=lambda step, total, m: stop.request("Stop button") if step == 2 else None)
    assert result["stopped"] and result["step"] == 2
    return run_dir


def test_cli_resumes_a_caller_run_from_its_run_dir_with_arch_and_no_init_from(monkeypatch, files, tmp_path):
    run_dir = _caller_run(monkeypatch, tmp_path, files)
    text = (run_dir / "config.toml").read_text()
    assert 'init_from = ""' in text and 'source = "caller"' in text and "[model.arch]\ndim = 48" in text
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-m", "training", "--resume", str(run_dir), "--apt.image.steps=6"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resume = [e for e in lines if e.get("event") == "resume"]
    assert resume and resume[-1]["checkpoint"] == str(run_dir / "checkpoints/step-2")
    assert [r["step"] for r in lines if "event" not in r] == [1, 2, 3, 4, 5, 6]
    with safe_open(str(run_dir / "export/apt_generator.safetensors"), "pt") as f:
        assert tuple(f.get_slice("head.head.weight").get_shape()) == (16 * 4, ODD.dim)  # the ODD model, not a preset


def test_cli_refuses_a_caller_run_it_cannot_rebuild(monkeypatch, files, tmp_path):
    from training.__main__ import main

    run_dir = _caller_run(monkeypatch, tmp_path, files)
    single_process_env(monkeypatch)
    try:  # the video phase would build a fresh D from the ORIGINAL weights, which only the caller had
        with pytest.raises(ConfigError, match=r"apt video phase builds a fresh D .* apt.video.steps = 0"):
            train(load_config(run_dir / "config.toml", ["--apt.video.steps=2"]))
    finally:
        destroy()
    empty = tmp_path / "empty"
    cfg = load_config(run_dir / "config.toml", [f"--run.dir={empty}"])
    single_process_env(monkeypatch)
    try:
        with pytest.raises(ConfigError, match="no checkpoint to take them from"):
            train(cfg)
    finally:
        destroy()
    assert main(["--resume", str(tmp_path / "nowhere")]) == 2
    assert main(["--print-config"]) == 2  # neither --config nor --resume


def test_train_twice_in_a_worker_thread(monkeypatch, files, tmp_path):
    single_process_env(monkeypatch)
    cfg = _cfg(tmp_path, f"--data.path={files['data']}", f"--model.init_from={files['base']}", "--apt.image.steps=2",
               "--apt.video.steps=0", "--export.overwrite=true")
    more = dataclasses.replace(cfg, apt=dataclasses.replace(cfg.apt, image=dataclasses.replace(cfg.apt.image, steps=3)))
    out: dict = {}

    def work() -> None:
        try:
            out["a"] = train(cfg)
            out["b"] = train(more)  # the process group is still up
        except BaseException as e:  # noqa: BLE001 - reported by the assert below
            out["error"] = e

    t = threading.Thread(target=work, name="prompt-worker")
    try:
        t.start()
        t.join(300)
    finally:
        destroy()
    assert "error" not in out, repr(out.get("error"))
    assert out["a"]["step"] == 2 and out["b"]["step"] == 3
    assert out["b"]["resumed_from"] == str(tmp_path / "checkpoints/step-2")


def test_validation_latents_file_and_shape_override(monkeypatch, files, tmp_path):
    prompts = tmp_path / "prompts.safetensors"
    save_file({"context": torch.randn(3, 5, 32)}, str(prompts))
    cfg = _cfg(tmp_path / "run", f"--data.path={files['data']}", f"--model.init_from={files['base']}",
               "--apt.image.steps=1", "--apt.video.steps=0", "--monitor.val_every=1", f"--monitor.val_prompts={prompts}",
               "--monitor.val_shape=[16, 1, 6, 4]", "--monitor.val_seeds=[7, 8]")
    result = _run(monkeypatch, cfg)
    val = result["validation"]
    path = Path(val["val_latents"])
    assert path == tmp_path / "run/samples/step-1/samples.safetensors"
    x = load_file(path)["samples"]
    assert x.shape == (3, 2, 16, 1, 6, 4) and x.dtype == torch.float32 and torch.isfinite(x).all()
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["seeds"]) == [7, 8] and meta["space"] == "model"


def test_model_arch_and_val_shape_are_checked():
    base = ["--data.path=x"]
    with pytest.raises(ConfigError, match=r"model.arch.dim = 48 sets .*model.arch.ffn_dim"):
        load_config(None, [*base, "--model.arch.dim=48"])
    with pytest.raises(ConfigError, match=r"model.arch.dim must be >= 0"):
        load_config(None, [*base, "--model.arch.dim=-1"])
    with pytest.raises(ConfigError, match=r"monitor.val_shape must be \[C, F, H, W\]"):
        load_config(None, [*base, "--monitor.val_shape=[16, 1, 4]"])
    with pytest.raises(ConfigError, match="model.source"):
        load_config(None, [*base, "--model.source=memory"])
    cfg = set_arch(load_config(None, base), ODD)
    from training.models import resolve_wan_config

    assert resolve_wan_config(cfg) == ODD
    again = load_config(None, [*base, *(f"--model.arch.{k}={json.dumps(v) if isinstance(v, (list, tuple)) else v}"
                                        for k, v in ODD.to_dict().items() if k not in ("model_type", "qk_norm", "cross_attn_norm"))])
    assert resolve_wan_config(again) == ODD
    # a caller run may leave init_from empty with LoRA / stage cd: its weights come from memory or the checkpoint
    load_config(None, [*base, "--model.source=caller", "--model.lora_rank=4", "--run.stage=cd"])
    with pytest.raises(ConfigError, match="stage cd needs a teacher"):
        load_config(None, [*base, "--run.stage=cd"])


def test_frozen_weights_stay_bf16_only_on_one_cuda_device_asked_for_bf16():
    cfg = load_config(None, ["--data.path=x", "--parallel.strategy=none", "--parallel.mixed_precision=bf16"])
    assert frozen_dtype(cfg, torch.device("cuda", 0)) == torch.bfloat16
    assert frozen_dtype(cfg, torch.device("cpu")) is None
    cfg.parallel.mixed_precision = "auto"
    assert frozen_dtype(cfg, torch.device("cuda", 0)) is None
    cfg.parallel.mixed_precision, cfg.parallel.strategy = "bf16", "fsdp"
    assert frozen_dtype(cfg, torch.device("cuda", 0)) is None
    model = WanFlowModel(get_config("tiny"))
    inject_lora(model, 4)
    assert cast_frozen(model, torch.bfloat16) > 0
    dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
    assert dtypes == {torch.float32} and all(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = model(torch.randn(1, 16, 1, 4, 4), torch.tensor([0.5]), WanCond(torch.randn(1, 4, 32)))
    assert torch.isfinite(v.float()).all()


def test_bf16_frozen_weights_train_and_round_trip_a_checkpoint(monkeypatch, files, tmp_path):
    """What a CUDA node run does (frozen base and D backbone bf16, adapters and heads fp32, bf16 autocast),
    here on CPU: finite steps, only fp32 tensors train, and a DCP checkpoint restores the same state."""
    from training.checkpoint import CheckpointManager
    from training.data import BucketedLoader, ShardDataset
    from training.distributed import init_distributed
    from training.loop import APTStage, plan_phases, resolve_wan_config

    single_process_env(monkeypatch)
    cfg = _cfg(tmp_path, f"--data.path={files['data']}", f"--model.init_from={files['base']}", "--model.lora_rank=4",
               "--apt.disc_mode=lora", "--parallel.strategy=none", "--apt.video.steps=0")
    world = init_distributed("cpu", "gloo")
    try:
        def stage_() -> APTStage:
            s = APTStage(cfg, world, resolve_wan_config(cfg))
            s.begin_phase(plan_phases(cfg)[0], first=True)
            assert cast_frozen(s.generator, torch.bfloat16) and cast_frozen(s.discriminator, torch.bfloat16)
            s.amp = "bf16"
            s.remember_lr()
            return s

        stage = stage_()
        for model in (stage.generator, stage.discriminator):
            assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
        loader = BucketedLoader(ShardDataset(str(files["data"])), 2, 0, 1, seed=0)
        frozen = {n: p.clone() for n, p in stage.generator.named_parameters() if not p.requires_grad}
        for step in range(2):
            metrics = stage.step(step, next(loader))
            assert all(math.isfinite(float(v)) for v in metrics.values()), metrics
        assert all(torch.equal(p, frozen[n]) for n, p in stage.generator.named_parameters() if not p.requires_grad)
        ckpt = CheckpointManager(tmp_path, world)
        path = ckpt.save(2, stage.state(), info={"phase": "image"})
        again = stage_()
        ckpt.load(path, again.state())
        for a, b in ((stage.generator, again.generator), (stage.discriminator, again.discriminator)):
            sa, sb = a.state_dict(), b.state_dict()
            assert all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)
    finally:
        destroy()


def test_frozen_weights_are_allocated_and_loaded_in_bf16_on_one_process(monkeypatch, files):
    """The single-process path materialises frozen weights straight in their cast dtype from rank 0's CPU state
    (a consumer GPU never holds them in fp32); adapters stay fp32 with exactly the seeded values."""
    from training.distributed import init_distributed
    from training.parallelize import parallelize

    cfg = load_config(None, ["--data.path=x", "--parallel.strategy=none", "--parallel.mixed_precision=bf16"])
    single_process_env(monkeypatch)
    world = init_distributed("cpu", "gloo")
    try:
        with torch.device("meta"):
            model = WanFlowModel(get_config("tiny"))
        inject_lora(model, 4)
        ref = WanFlowModel(get_config("tiny"))
        ref.load_state_dict(files["sd"])
        inject_lora(ref, 4)
        with torch.no_grad():
            for p in ref.parameters():
                if p.requires_grad:
                    p.normal_()
        full = ref.state_dict()
        assert cast_frozen(model, torch.bfloat16) > 0 and all(p.is_meta for p in model.parameters())
        model = parallelize(model, full, cfg.parallel, world)
        for n, t in model.state_dict().items():
            want = full[n].to(t.dtype)
            assert t.device.type == "cpu" and torch.equal(t, want), n
        trained = dict(model.named_parameters())
        assert all(trained[n].dtype == (torch.float32 if trained[n].requires_grad else torch.bfloat16) for n in trained)
    finally:
        destroy()
