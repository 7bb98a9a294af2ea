"""A tiny headless APT run (`python -m training`) per model family, on a tiny stand-in preset; for the
two-expert Wan 2.2 A14B, G and D initialised from their experts' own files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from apt_core.backbone import build_flow_model
from apt_core.models.io import load_state_dict_file, load_wan, save_wan
from apt_core.models.wan import get_config
from bench.trainer_scaling import write_synthetic_shards
from tests.single_process import single_process_env
from training.config import ConfigError, load_config
from training.data import ShardDataset, collate
from training.distributed import destroy, init_distributed
from training.loop import APTStage, _cond, original_weights, plan_phases, resolve_wan_config

ROOT = Path(__file__).resolve().parents[2]


def test_i2v_condition_uses_the_shards_image_latent(tmp_path):
    # with image_latent in the shards (Wan's: the VAE latent of [first frame, grey frames]) y = mask + that latent,
    # all frames of it, not the first-latent-frame fallback
    data = write_synthetic_shards(tmp_path / "data", num=2, latent_shape=(16, 3, 4, 4), image_emb_shape=(257, 1280),
                                  image_latent=True)
    batch = collate([ShardDataset(data)[i] for i in range(2)])
    assert batch.image_latent.shape == batch.latent.shape
    cond = _cond(batch, get_config("tiny-i2v"))
    assert torch.equal(cond.clip_fea, batch.image_emb) and cond.y.shape == (2, 20, 3, 4, 4)
    assert torch.equal(cond.y[:, 4:], batch.image_latent)
    assert torch.equal(cond.y[:, :4, 0], torch.ones(2, 4, 4, 4)) and cond.y[:, :4, 1:].abs().sum() == 0
    batch.image_latent = None
    fallback = _cond(batch, get_config("tiny-i2v"))
    assert torch.equal(fallback.y[:, :4], cond.y[:, :4]) and not torch.equal(fallback.y[:, 4:], cond.y[:, 4:])
    assert torch.equal(fallback.y[:, 4:, :1], batch.latent[:, :, :1]) and fallback.y[:, 4:, 1:].abs().sum() == 0


def test_i2v_condition_comes_from_each_clips_first_frame(tmp_path):
    data = write_synthetic_shards(tmp_path / "data", num=2, latent_shape=(16, 3, 4, 4), image_emb_shape=(257, 1280))
    batch = collate([ShardDataset(data)[i] for i in range(2)])
    cond = _cond(batch, get_config("tiny-i2v"))
    assert torch.equal(cond.clip_fea, batch.image_emb) and cond.y.shape == (2, 20, 3, 4, 4)
    assert torch.equal(cond.y[:, 4:, :1], batch.latent[:, :, :1]) and cond.y[:, 4:, 1:].abs().sum() == 0
    assert torch.equal(cond.y[:, :4, 0], torch.ones(2, 4, 4, 4)) and cond.y[:, :4, 1:].abs().sum() == 0
    assert _cond(batch, get_config("tiny")).y is None  # text-to-video families take text only
    with pytest.raises(ValueError, match="hold none"):
        _cond(collate([ShardDataset(write_synthetic_shards(tmp_path / "plain", num=1, latent_shape=(16, 3, 4, 4)))[0]]),
              get_config("tiny-i2v"))


def _headless(tmp_path: Path, data: Path, *overrides: str, events: list | None = None) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-m", "training", "--config", str(ROOT / "configs/tiny_cpu.toml"),
                           f"--run.dir={tmp_path}", f"--data.path={data}", "--parallel.strategy=none", "--apt.image.steps=1",
                           "--apt.video.steps=1", "--monitor.val_every=0", "--checkpoint.every=0", "--monitor.log_every=1",
                           *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    if events is not None:
        events.extend(r for r in rows if "event" in r)
    return [r for r in rows if "event" not in r]


@pytest.mark.parametrize("preset,latent,image_emb,image_latent", [
    ("tiny", (16, 2, 4, 4), None, False), ("tiny-ti2v", (48, 1, 4, 4), None, False),
    ("tiny-i2v", (16, 2, 4, 4), (257, 1280), False), ("tiny-i2v", (16, 2, 4, 4), (257, 1280), True)])
def test_tiny_headless_apt_run_per_family(tmp_path, preset, latent, image_emb, image_latent):
    # one per family with one file (Wan 2.1 T2V, Wan 2.2 TI2V-5B, Wan 2.1 I2V; the two-expert A14B below);
    # tiny-i2v: the first frame (the shards' image latent, else the first latent frame, + its CLIP image tokens) is the
    # condition; without image_latent the run says once that this differs from Wan
    data = write_synthetic_shards(tmp_path / "data", num=4, latent_shape=latent, image_emb_shape=image_emb,
                                  image_latent=image_latent)
    events: list[dict] = []
    rows = _headless(tmp_path / "run", data, f"--model.preset={preset}", events=events)
    assert [r["step"] for r in rows] == [1, 2]
    fallback = [e for e in events if e["event"] == "warning" and "no image_latent" in e["message"]]
    if preset == "tiny-i2v" and not image_latent:
        assert len(fallback) == 1 and "mid-grey frames" in fallback[0]["message"] and fallback[0]["phase"] == "image"
    else:
        assert fallback == []
    assert all(np.isfinite(r[k]) for r in rows for k in ("d_loss", "g_loss"))
    gen = load_wan(tmp_path / "run/export/apt_generator.safetensors")
    assert gen.config == get_config(preset)


# ----------------------------------------------------------------------------------------------
# Wan 2.2 A14B: two experts, one file each; G and D start from the configured experts
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    """Two tiny expert files (tiny-a14b, different random weights) and shards for them."""
    root = tmp_path_factory.mktemp("a14b")
    out = {}
    for seed, name in ((1, "high_noise"), (2, "low_noise")):
        torch.manual_seed(seed)
        model = build_flow_model("tiny-a14b")
        with torch.no_grad():
            model.head.head.weight.normal_(std=0.02)
        out[name] = save_wan(model, root / f"{name}.safetensors")
    out["data"] = write_synthetic_shards(root / "data", num=4)
    return out


def _expert_files(experts) -> str:
    return f'--model.expert_files=["high_noise={experts["high_noise"]}", "low_noise={experts["low_noise"]}"]'


@pytest.mark.parametrize("d_expert", ["", "low_noise"])
def test_a14b_generator_and_discriminator_start_from_their_expert_files(monkeypatch, experts, tmp_path, d_expert):
    # default: both from the high-noise expert (t = 1 and most shifted D times lie in [0.875, 1]); D configurable
    single_process_env(monkeypatch)
    overrides = [f"--run.dir={tmp_path}", f"--data.path={experts['data']}", "--model.preset=tiny-a14b", _expert_files(experts),
                 "--parallel.strategy=none"]
    cfg = load_config(ROOT / "configs/tiny_cpu.toml", overrides + ([f"--model.discriminator_expert={d_expert}"] if d_expert else []))
    world = init_distributed("cpu", "gloo")
    try:
        stage = APTStage(cfg, world, resolve_wan_config(cfg))
        image, _ = plan_phases(cfg)
        stage.begin_phase(image, first=True)
        high, low = load_state_dict_file(experts["high_noise"]), load_state_dict_file(experts["low_noise"])
        for k, v in stage.generator.state_dict().items():
            torch.testing.assert_close(v, high[k], rtol=0, atol=0)
        want = low if d_expert == "low_noise" else high
        back = {k[len("backbone."):]: v for k, v in stage.discriminator.state_dict().items() if k.startswith("backbone.")}
        assert back
        for k, v in back.items():
            torch.testing.assert_close(v, want[k], rtol=0, atol=0)
    finally:
        destroy()


def test_a14b_expert_files_are_checked(experts, tmp_path):
    def cfg(*extra: str):
        return load_config(ROOT / "configs/tiny_cpu.toml", [f"--run.dir={tmp_path}", "--model.preset=tiny-a14b", *extra])

    with pytest.raises(ConfigError, match="missing: \\['low_noise'\\]"):
        original_weights(cfg(f'--model.expert_files=["high_noise={experts["high_noise"]}"]'))
    with pytest.raises(ConfigError, match="unknown: \\['mid'\\]"):
        original_weights(cfg(_expert_files(experts)[:-1] + ', "mid=x.safetensors"]'))
    with pytest.raises(ConfigError, match="not both"):
        original_weights(cfg(_expert_files(experts), f"--model.init_from={experts['high_noise']}"))
    with pytest.raises(ConfigError, match="no expert 'middle'"):
        original_weights(cfg(_expert_files(experts), "--model.generator_expert=middle"))
    with pytest.raises(ConfigError, match="stage 'teacher'"):
        original_weights(cfg(_expert_files(experts), "--run.stage=teacher"))
    with pytest.raises(ConfigError, match="has no experts"):
        original_weights(load_config(ROOT / "configs/tiny_cpu.toml", [_expert_files(experts)]))  # preset tiny: one file
    assert original_weights(cfg(_expert_files(experts), "--model.generator_expert=low_noise")) == (
        str(experts["low_noise"]), str(experts["high_noise"]))


def test_a14b_tiny_headless_apt_run_from_two_expert_files(experts, tmp_path):
    rows = _headless(tmp_path / "run", experts["data"], "--model.preset=tiny-a14b", _expert_files(experts))
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["g_loss"]) for r in rows)
    assert load_wan(tmp_path / "run/export/apt_generator.safetensors").config == get_config("tiny-a14b")
