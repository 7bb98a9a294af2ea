"""Stages and loop, in-process on a 1-process FSDP2 group: teacher learns and gradient accumulation is
exact, CD runs with CFG, the APT image -> video transition (G from the image EMA, D from the ORIGINAL
weights), validation outputs without side effects, and the monitor's files and warnings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from apt_core.backbone import build_flow_model
from apt_core.discriminator import APTDiscriminator
from apt_core.models.io import load_state_dict_file, save_wan
from apt_core.sfv import SFVDiscriminator
from apt_core.shards import ShardWriter
from bench.trainer_scaling import write_synthetic_shards
from tests.single_process import single_process_env
from training.config import load_config
from training.data import BucketedLoader, ShardDataset
from training.distributed import World, destroy, init_distributed
from training.loop import APTStage, plan_phases, resolve_wan_config, train
from training.monitor import CollapseDetector, MetricsLogger, pairwise_distance, preview_rgb

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def run(monkeypatch):
    """`run(*overrides)`: train() the tiny config in this process; returns (result, metric rows, events)."""

    def go(*overrides: str):
        single_process_env(monkeypatch)
        cfg = load_config(ROOT / "configs/tiny_cpu.toml", ["--monitor.log_every=1", "--checkpoint.every=0", *overrides])
        try:
            result = train(cfg)
        finally:
            destroy()
        lines = [json.loads(x) for x in (Path(cfg.run.dir) / "metrics.jsonl").read_text().splitlines()]
        return result, [r for r in lines if "event" not in r], [r for r in lines if "event" in r]

    return go


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    torch.manual_seed(5)
    base = build_flow_model("tiny")
    with torch.no_grad():
        base.head.head.weight.normal_(std=0.02)
    # one clean latent under 8 captions: flow matching can fit it, so the loss must fall within a few steps
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(16, 1, 4, 4, generator=g)
    with ShardWriter(root / "one_latent", {"kind": "one latent"}) as w:
        for i in range(8):
            w.add(x0, torch.randn(4, 32, generator=g), f"caption {i}")
    return {"data": write_synthetic_shards(root / "shards", num=8), "base": save_wan(base, root / "base.safetensors"),
            "one_latent": root / "one_latent"}


def test_teacher_learns_and_grad_accum_is_exact(run, files, tmp_path):
    common = ["--run.stage=teacher", "--run.steps=16", f"--data.path={files['one_latent']}", "--teacher.lr=3e-3",
              "--teacher.timesteps=uniform", "--monitor.val_every=0"]
    _, rows, _ = run(*common, f"--run.dir={tmp_path / 'a'}", "--data.micro_batch=4")
    _, rows_accum, _ = run(*common, f"--run.dir={tmp_path / 'b'}", "--data.micro_batch=2", "--data.grad_accum=2")
    _, rows_ac, _ = run(*common, f"--run.dir={tmp_path / 'c'}", "--data.micro_batch=4", "--run.steps=3",
                        "--parallel.activation_checkpointing=true")
    loss = [r["loss"] for r in rows]
    assert len(loss) == 16 and all(np.isfinite(loss))
    assert np.mean(loss[-4:]) < 0.8 * np.mean(loss[:4]), loss
    np.testing.assert_allclose([r["loss"] for r in rows_accum], loss, rtol=1e-5)
    np.testing.assert_allclose([r["loss"] for r in rows_ac], loss[:3], rtol=1e-6)  # recompute changes nothing
    assert (tmp_path / "a/export/teacher.safetensors").is_file()


def test_cd_stage_with_cfg(run, files, tmp_path):
    result, rows, _ = run("--run.stage=cd", "--run.steps=3", f"--run.dir={tmp_path}", f"--data.path={files['data']}",
                          f"--model.init_from={files['base']}", "--cd.cfg_scale=3.0", "--cd.grid_steps=4",
                          "--cd.lr=1e-3", "--export.dtype=fp32", "--monitor.val_every=0",
                          "--parallel.strategy=none")  # plain single-process path (no FSDP)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
    student = load_file(result["export"]["model"])
    teacher = load_state_dict_file(files["base"])
    assert student.keys() == teacher.keys()
    assert any(not torch.equal(student[k], teacher[k]) for k in teacher)  # the student moved off the teacher


def test_apt_video_phase_starts_from_image_ema_and_original_discriminator(monkeypatch, files, tmp_path):
    single_process_env(monkeypatch)
    cfg = load_config(ROOT / "configs/tiny_cpu.toml", [f"--run.dir={tmp_path}", f"--data.path={files['data']}",
                                                      f"--model.init_from={files['base']}", "--apt.ema_decay=0.5"])
    world = init_distributed("cpu", "gloo")
    try:
        stage = APTStage(cfg, world, resolve_wan_config(cfg))
        image, video = plan_phases(cfg)
        stage.begin_phase(image, first=True)
        d_init = {k: v.full_tensor().clone() for k, v in stage.discriminator.state_dict().items()}
        loader = BucketedLoader(ShardDataset(image.data), image.micro_batch, 0, 1, seed=0)
        for step in range(2):
            stage.step(step, next(loader))
        ema = {n: s.full_tensor().clone() for n, s in zip(stage.ema.names, stage.ema.shadow)}
        g_raw = {n: p.full_tensor().clone() for n, p in stage.generator.named_parameters()}
        d_trained = {k: v.full_tensor().clone() for k, v in stage.discriminator.state_dict().items()}
        assert any(not torch.equal(ema[n], g_raw[n]) for n in ema)
        assert any(not torch.equal(d_trained[k], d_init[k]) for k in d_init)

        stage.begin_phase(video, first=False)
        g = {n: p.full_tensor() for n, p in stage.generator.named_parameters()}
        for n in ema:  # G starts the video phase at the image phase's EMA
            torch.testing.assert_close(g[n], ema[n], rtol=0, atol=0)
        d_video = {k: v.full_tensor() for k, v in stage.discriminator.state_dict().items()}
        base = load_state_dict_file(files["base"])
        for k, v in d_video.items():  # D: original diffusion weights + the same fresh seeded heads
            if k.startswith("backbone."):
                torch.testing.assert_close(v, base[k[len("backbone."):]], rtol=0, atol=0)
            torch.testing.assert_close(v, d_init[k], rtol=0, atol=0)
        assert isinstance(stage.discriminator, APTDiscriminator) and stage.discriminator.timestep_shift == 12.0
        assert stage.trainer.config.r1_sigma == 0.1 and stage.trainer.config.d_timestep_shift == 12.0
        assert stage.ema.num_updates == 0 and not stage.opt_g.state and not stage.opt_d.state
        assert stage.opt_g.param_groups[0]["lr"] == cfg.apt.video.lr
        metrics = stage.step(2, next(loader))
        assert {"d_loss", "g_loss", "d_acc", "logits_real", "logits_fake", "ar1"} <= set(metrics)
    finally:
        destroy()


def test_sfv_discriminator_stage_trains_heads_only_on_a_frozen_half(monkeypatch, files, tmp_path):
    # apt.disc_kind = "sfv" under FSDP2 (approximated R1): D = the ORIGINAL weights' first block, frozen, + heads
    single_process_env(monkeypatch)
    cfg = load_config(ROOT / "configs/tiny_cpu.toml", [f"--run.dir={tmp_path}", f"--data.path={files['data']}",
                                                      f"--model.init_from={files['base']}", "--apt.disc_kind=sfv",
                                                      "--apt.loss=hinge", "--apt.sfv.p_mean=-0.5"])
    world = init_distributed("cpu", "gloo")
    try:
        stage = APTStage(cfg, world, resolve_wan_config(cfg))
        image, _ = plan_phases(cfg)
        stage.begin_phase(image, first=True)
        D = stage.discriminator
        assert isinstance(D, SFVDiscriminator) and D.backbone_blocks == 1 and D.head_layers == [0] and D.p_mean == -0.5
        base = load_state_dict_file(files["base"])
        back = {k: v.full_tensor().clone() for k, v in D.state_dict().items() if k.startswith("backbone.")}
        assert {k[len("backbone."):] for k in back} == {k for k in base if not k.startswith("blocks.1.")}  # block 1 not kept
        for k, v in back.items():
            torch.testing.assert_close(v, base[k[len("backbone."):]], rtol=0, atol=0)
        loader = BucketedLoader(ShardDataset(image.data), image.micro_batch, 0, 1, seed=0)
        for step in range(2):
            metrics = stage.step(step, next(loader))
        assert all(torch.isfinite(v) for v in metrics.values()) and {"d_loss", "g_loss", "ar1"} <= set(metrics)
        for k, v in D.state_dict().items():
            if k.startswith("backbone."):
                torch.testing.assert_close(v.full_tensor(), back[k], rtol=0, atol=0)
        heads = {id(p) for n, p in D.named_parameters() if n.startswith(("spatial.", "temporal."))}
        assert {id(p) for p in stage.opt_d.state} == heads  # optimiser state for the heads only
    finally:
        destroy()


def test_sfv_headless_run_with_exact_r1_finishes_with_finite_losses(files, tmp_path):
    # the CLI, end to end: SF-V's recipe (hinge, exact R1 on the noised input) on one process
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-m", "training", "--config", str(ROOT / "configs/tiny_cpu.toml"),
                           f"--run.dir={tmp_path}", f"--data.path={files['data']}", "--apt.disc_kind=sfv", "--apt.loss=hinge",
                           "--apt.r1_mode=exact", "--parallel.strategy=none", "--apt.image.steps=2", "--apt.video.steps=1",
                           "--monitor.val_every=0", "--checkpoint.every=0", "--monitor.log_every=1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "event" not in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(np.isfinite(r[k]) for r in rows for k in ("d_loss", "g_loss", "r1"))
    assert (tmp_path / "export/apt_generator.safetensors").is_file()


def test_validation_outputs_and_no_side_effects(run, files, tmp_path):
    common = [f"--data.path={files['data']}", "--apt.image.steps=2", "--apt.video.steps=1", "--monitor.val_seeds=[0, 1, 2]",
              "--monitor.val_num_prompts=2"]
    res, rows, events = run(*common, f"--run.dir={tmp_path / 'val'}", "--monitor.val_every=1")
    _, rows_plain, _ = run(*common, f"--run.dir={tmp_path / 'plain'}", "--monitor.val_every=0")
    for a, b in zip(rows, rows_plain):  # validating with EMA weights swapped in changes nothing
        assert a["d_loss"] == pytest.approx(b["d_loss"], abs=1e-6) and a["g_loss"] == pytest.approx(b["g_loss"], abs=1e-6)
    vals = [e for e in events if e["event"] == "validation"]
    assert [e["step"] for e in vals] == [1, 2, 3]
    assert all(e["val_finite"] and e["val_diversity"] > 0.1 for e in vals)
    folder = tmp_path / "val/samples/step-3"
    with av.open(str(folder / "prompt1_seed2.mp4")) as f:
        frames = [fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)]
    assert len(frames) == 1 and frames[0].shape == (32, 32, 3)  # F=1 latent frame, 4x4 latent x8 preview
    grid = Image.open(folder / "grid.png")
    assert grid.size == (3 * 34 + 2, 2 * 34 + 2)  # 3 seeds x 2 prompts, 32 px tiles, 2 px gutters
    assert load_file(folder / "samples.safetensors")["samples"].shape == (2, 3, 16, 1, 4, 4)
    assert res["step"] == 3 and Path(res["export"]["model"]).name == "apt_generator.safetensors"


def test_export_only_from_checkpoint(run, monkeypatch, files, tmp_path):
    args = [f"--run.dir={tmp_path}", f"--data.path={files['data']}", "--apt.image.steps=2", "--apt.video.steps=0",
            "--monitor.val_every=0"]
    result, _, _ = run(*args)
    first = load_file(result["export"]["model"])
    Path(result["export"]["model"]).unlink()
    single_process_env(monkeypatch)
    try:
        again = train(load_config(ROOT / "configs/tiny_cpu.toml", args), export_only=True)
    finally:
        destroy()
    assert again["step"] == 2 and again["resumed_from"].endswith("step-2")
    second = load_file(again["export"]["model"])
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_resume_flag_without_checkpoint_fails(monkeypatch, files, tmp_path):
    single_process_env(monkeypatch)
    cfg = load_config(ROOT / "configs/tiny_cpu.toml", [f"--run.dir={tmp_path}", f"--data.path={files['data']}"])
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        try:
            train(cfg, resume=True)
        finally:
            destroy(barrier=False)


# ----------------------------------------------------------------------------------------------
# Monitor pieces
# ----------------------------------------------------------------------------------------------


def test_metrics_logger_buffers_and_writes_every_step(monkeypatch, tmp_path):
    single_process_env(monkeypatch)
    world = init_distributed("cpu", "gloo")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            logger = MetricsLogger(tmp_path, world, total_steps=7, log_every=3, progress=True, tensorboard=True)
        # TensorBoard is optional: event files when installed, else one warning naming the package
        assert logger.tb is not None or any("pip install tensorboard" in str(w.message) for w in caught)
        flushed = [logger.log(s, {"d_loss": torch.tensor(float(s)), "d_acc": torch.tensor(0.5)}, "image") for s in range(1, 8)]
        assert [f is not None for f in flushed] == [False, False, True, False, False, True, False]
        logger.close()  # writes the tail (step 7)
    finally:
        destroy()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 8))
    assert [r["d_loss"] for r in rows] == [float(s) for s in range(1, 8)] and rows[0]["phase"] == "image"
    assert "it_s" in rows[2] and "it_s" in rows[5]


def test_collapse_warnings():
    det = CollapseDetector(window=4, d_loss_floor=0.01, diversity_threshold=0.05)
    assert det.observe([{"step": s, "d_loss": 0.5} for s in range(1, 5)]) is None
    assert det.observe([{"step": 5, "d_loss": 0.001}, {"step": 6, "d_loss": 0.002}, {"step": 7, "d_loss": 0.003}]) is None
    msg = det.observe([{"step": 8, "d_loss": 0.001}])
    assert msg and "D is winning" in msg
    same = torch.randn(1, 16, 1, 4, 4).repeat(4, 1, 1, 1, 1)
    real = torch.randn(6, 16, 1, 4, 4)
    assert pairwise_distance(same) == 0.0
    assert det.diversity_warning(pairwise_distance(same) / pairwise_distance(real)) is not None
    assert det.diversity_warning(pairwise_distance(torch.randn(4, 16, 1, 4, 4)) / pairwise_distance(real)) is None


def test_preview_rgb_latents_and_pixels():
    latent = torch.zeros(16, 2, 3, 5)
    rgb = preview_rgb(latent, upscale=2)
    assert rgb.shape == (2, 6, 10, 3) and rgb.dtype == np.uint8
    # zero latent -> the projection's bias: (-0.1835, -0.0868, -0.3360) mapped from [-1, 1]
    assert tuple(rgb[0, 0, 0]) == tuple(round((b + 1) * 127.5) for b in (-0.1835, -0.0868, -0.3360))
    pixels = torch.ones(3, 1, 2, 2)  # pixel models: [-1, 1] shown directly
    assert (preview_rgb(pixels, upscale=1) == 255).all()


def test_world_is_main():
    assert World(0, 2, 0, torch.device("cpu"), "gloo").is_main and not World(1, 2, 1, torch.device("cpu"), "gloo").is_main
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        World(0, 1, 0, torch.device("cpu"), "gloo")
