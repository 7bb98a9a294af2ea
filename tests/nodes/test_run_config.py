"""The training nodes' widgets as the headless runner's config (nodes.run_config; no ComfyUI needed)."""

import pytest

from nodes.run_config import node_run_config, widget_defaults
from nodes.train import APTConsistencyDistill, APTTrain
from training.config import ConfigError, load_config, save_config

MODEL = {"source": "caller"}  # the base weights come from the graph's MODELs


def apt_widgets(**changes):
    return {**widget_defaults(APTTrain), **changes}


def cd_widgets(**changes):
    return {**widget_defaults(APTConsistencyDistill), **changes}


def test_apt_train_widgets_become_the_runners_config(tmp_path):
    w = apt_widgets(steps=7, lr=3e-6, batch_size=8, grad_accum=4, r1_sigma=0.1, r1_lambda=50.0, d_timestep_shift=12.0,
                    ema_decay=0.99, lora_rank=8, val_every=3, val_seed=10, seed=42, precision="fp32", gradient_checkpointing=False)
    disc = {"mode": "frozen", "head_layers": [0, 1], "lora_rank": 4}
    cfg = node_run_config("apt", w, "/d/shards", str(tmp_path / "run"), disc, MODEL)
    assert (cfg.run.stage, cfg.run.dir, cfg.run.seed) == ("apt", str(tmp_path / "run"), 42)
    assert (cfg.data.path, cfg.data.micro_batch, cfg.data.grad_accum) == ("/d/shards", 2, 4)
    assert cfg.apt.lr == 3e-6 and cfg.apt.image.learning_rates(cfg.apt.lr) == (3e-6, 3e-6)
    assert (cfg.apt.image.steps, cfg.apt.image.r1_sigma, cfg.apt.image.d_timestep_shift, cfg.apt.video.steps) == (7, 0.1, 12.0, 0)
    assert (cfg.apt.r1_lambda, cfg.apt.ema_decay, cfg.model.lora_rank) == (50.0, 0.99, 8)
    assert (cfg.apt.disc_kind, cfg.apt.disc_mode, cfg.apt.head_layers, cfg.apt.disc_lora_rank) == ("apt", "frozen", [0, 1], 4)
    assert (cfg.monitor.val_every, cfg.monitor.val_seeds) == (3, [10, 11])
    assert (cfg.parallel.mixed_precision, cfg.parallel.activation_checkpointing, cfg.parallel.strategy) == ("fp32", False, "none")
    assert cfg.export.final and cfg.export.overwrite and cfg.export.dtype == "fp32" and cfg.checkpoint.keep == 2
    assert not cfg.monitor.progress and not cfg.monitor.tensorboard
    assert load_config(save_config(cfg, tmp_path / "config.toml")) == cfg  # what a headless resume reads back


def test_val_every_zero_means_only_at_the_end_and_bf16_exports_bf16(tmp_path):
    cfg = node_run_config("apt", apt_widgets(steps=9, val_every=0), "/d", str(tmp_path), None, MODEL)
    assert cfg.monitor.val_every == 9  # the runner validates at the last step of a phase too
    assert cfg.parallel.mixed_precision == "bf16" and cfg.export.dtype == "bf16"


def test_sfv_discriminator_runs_with_the_hinge_loss(tmp_path):
    cfg = node_run_config("apt", apt_widgets(), "/d", str(tmp_path), {"mode": "sfv", "head_layers": [3], "lora_rank": 16}, MODEL)
    assert (cfg.apt.disc_kind, cfg.apt.loss, cfg.apt.sfv.head_layers, cfg.apt.head_layers) == ("sfv", "hinge", [3], [])


def test_consistency_distill_widgets(tmp_path):
    w = cd_widgets(iterations=11, lr=2e-5, batch_size=3, grad_accum=3, cd_steps=8, grid_shift=5.0, cfg=1.0, lora_rank=0, seed=3)
    cfg = node_run_config("cd", w, "/d/shards", str(tmp_path), model=MODEL)
    assert (cfg.run.stage, cfg.run.steps, cfg.run.seed, cfg.model.lora_rank) == ("cd", 11, 3, 0)
    assert (cfg.cd.lr, cfg.cd.weight_decay, cfg.cd.grid_steps, cfg.cd.grid_shift, cfg.cd.cfg_scale) == (2e-5, 0.01, 8, 5.0, 1.0)
    assert (cfg.data.micro_batch, cfg.data.grad_accum, cfg.cd.ema_decay) == (1, 3, 0.0)


@pytest.mark.parametrize("stage, changes, expect", [
    ("apt", {"batch_size": 6, "grad_accum": 4}, "APT Train: batch_size=6 must be a multiple of grad_accum=4"),
    ("cd", {"batch_size": 1, "grad_accum": 2}, "APT Consistency Distill: batch_size=1 must be a multiple of grad_accum=2"),
    ("apt", {"lr": 0.0}, "APT Train widget 'lr' (apt.lr must be > 0, got 0.0)"),
    ("apt", {"d_timestep_shift": -1.0}, "APT Train widget 'd_timestep_shift' (apt.image.d_timestep_shift must be > 0"),
    ("apt", {"ema_decay": 1.0}, "APT Train widget 'ema_decay' (apt.ema_decay must be in [0, 1)"),
    ("cd", {"cd_steps": 0}, "APT Consistency Distill widget 'cd_steps' (cd.grid_steps must be >= 1"),
    ("cd", {"seed": -1}, "APT Consistency Distill widget 'seed' (run.seed must be >= 0"),
    ("apt", {"precision": "fp8"}, "APT Train: precision 'fp8'"),
])
def test_a_bad_widget_value_is_named(tmp_path, stage, changes, expect):
    w = apt_widgets(**changes) if stage == "apt" else cd_widgets(**changes)
    with pytest.raises(ConfigError) as e:
        node_run_config(stage, w, "/d", str(tmp_path), None, MODEL)
    assert expect in str(e.value), str(e.value)
