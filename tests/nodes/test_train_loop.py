"""The training runs behind APT Train / APT Consistency Distill, on a tiny apt_core Wan and real shards."""

import json
import math

import pytest
import torch

from apt_core.backbone import build_flow_model
from apt_core.discriminator import APTDiscriminator
from apt_core.lora import load_lora_state_dict, lora_modules
from apt_core.models.io import read_metadata
from apt_core.shards import ShardWriter
from nodes.train_loop import (
    STEP_KEY,
    APTRun,
    APTSettings,
    CDRun,
    CDSettings,
    export_weights,
    load_tensors,
    make_loader,
    make_trainable,
    run_loop,
    save_tensors,
    to_cond,
    trainable_state,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    g = torch.Generator().manual_seed(0)
    with ShardWriter(root, {"producer": "test"}, samples_per_shard=3) as w:
        for i in range(6):
            w.add(torch.randn(16, 1, 4, 4, generator=g), torch.randn(3 + i % 2, 32, generator=g), f"caption {i}", source=f"s{i}")
    return root


def generator(rank=4, seed=0):
    torch.manual_seed(seed)
    g = build_flow_model("tiny")
    with torch.no_grad():  # a "trained" head: Wan zero-initialises it, which would block all gradients
        g.head.head.weight.normal_(0, 0.05)
    return make_trainable(g, rank)


def discriminator(mode="lora", seed=1):
    torch.manual_seed(seed)
    return APTDiscriminator(build_flow_model("tiny"), mode=mode, lora_rank=2, copy_backbone=False)


def apt_run(shards, state_dir, settings=None, mode="lora"):
    s = settings or APTSettings(steps=3, lr=1e-3, batch_size=2, lora_rank=4, val_every=2)
    val_cond = to_cond(torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(5)), CPU)
    return APTRun(generator(s.lora_rank), discriminator(mode), make_loader(shards, s.batch_size, s.seed), s, CPU, state_dir,
                  val_cond, (2, 16, 1, 4, 4))


def test_apt_run_trains_validates_and_saves(shards, tmp_path):
    torch.manual_seed(0)
    run = apt_run(shards, tmp_path / "run")
    before = {k: v.clone() for k, v in run.generator.state_dict().items() if "lora_up" in k}
    steps = []
    run_loop(run, 3, lambda s, m: steps.append((s, sorted(m))), val_every=2)
    assert [s for s, _ in steps] == [1, 2, 3]
    assert {"d_loss", "g_loss", "ar1", "logits_real", "logits_fake"} <= set(steps[0][1])
    assert [s for s, _ in run.history["val_std"]] == [2, 3] and "val_diversity" in run.history
    after = {k: v for k, v in run.generator.state_dict().items() if "lora_up" in k}
    assert any(not torch.equal(before[k], after[k]) for k in before), "LoRA did not train"
    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert files == ["discriminator.safetensors", "generator.safetensors", "generator_ema.safetensors", "optim.pt", "samples", "state.json"]
    assert sorted(p.name for p in (tmp_path / "run" / "samples").iterdir()) == ["step-000002.safetensors", "step-000003.safetensors"]
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["step"] == 3 and state["kind"] == "apt"
    assert run.last_samples.shape == (2, 16, 1, 4, 4)
    # the exported EMA LoRA is in ComfyUI keys and loads into a fresh model
    kind, lora = export_weights(run.generator, run.ema)
    assert kind == "lora" and all(k.startswith("diffusion_model.blocks.") for k in lora)
    fresh = build_flow_model("tiny")
    assert len(load_lora_state_dict(fresh, lora)) == len(lora_modules(run.generator))
    ema_up = run.ema_state()["blocks.0.self_attn.q.lora_up.weight"]
    torch.testing.assert_close(lora["diffusion_model.blocks.0.self_attn.q.lora_up.weight"], ema_up)


def test_stop_saves_state_and_resume_continues(shards, tmp_path):
    torch.manual_seed(0)
    run = apt_run(shards, tmp_path / "run", APTSettings(steps=4, lr=1e-3, batch_size=2, lora_rank=4, val_every=0))

    class Stop(Exception):
        pass

    def stop_at_2(step, metrics):
        if step == 2:
            raise Stop

    with pytest.raises(Stop):
        run_loop(run, 4, stop_at_2)
    assert json.loads((tmp_path / "run" / "state.json").read_text())["step"] == 2
    saved = {k: v.clone() for k, v in run.generator.named_parameters() if v.requires_grad}

    again = apt_run(shards, tmp_path / "run", APTSettings(steps=4, lr=1e-3, batch_size=2, lora_rank=4, val_every=0))
    assert again.resume() and again.step_count == 2
    for k, v in again.generator.named_parameters():
        if v.requires_grad:
            torch.testing.assert_close(v, saved[k])
    assert again.loader.state_dict()["position"] == run.loader.state_dict()["position"]
    run_loop(again, 4)
    assert again.step_count == 4 and [s for s, _ in again.history["d_loss"]] == [1, 2, 3, 4]

    changed = apt_run(shards, tmp_path / "run", APTSettings(steps=4, lr=1e-3, batch_size=2, lora_rank=8))
    with pytest.raises(ValueError, match="lora_rank"):
        changed.resume()


def test_resume_refuses_a_state_torn_by_an_interrupted_save(shards, tmp_path):
    """Files of two different steps (a save killed between files) are an error naming them, not a silent mix."""
    torch.manual_seed(0)
    settings = APTSettings(steps=2, lr=1e-3, batch_size=2, lora_rank=4, val_every=0)
    run = run_loop(apt_run(shards, tmp_path / "run", settings), 2)
    assert read_metadata(tmp_path / "run" / "generator.safetensors")[STEP_KEY] == "2"
    assert apt_run(shards, tmp_path / "run", settings).resume()
    run.step_count = 3  # the next save got as far as the generator file only
    save_tensors(tmp_path / "run" / "generator.safetensors", trainable_state(run.generator), {STEP_KEY: "3"})
    with pytest.raises(ValueError, match=r"state.json is from step 2 but \{'generator.safetensors': '3'\}"):
        apt_run(shards, tmp_path / "run", settings).resume()


def test_resume_refuses_an_optimiser_state_of_another_kind(shards, tmp_path):
    """An optim.pt holding Adam states (saved before make_rmsprop was RMSprop) is named, not a KeyError mid-step."""
    settings = APTSettings(steps=1, lr=1e-3, batch_size=2, lora_rank=4, val_every=0)
    run = run_loop(apt_run(shards, tmp_path / "run", settings), 1)
    adam = torch.optim.Adam([p for p in run.generator.parameters() if p.requires_grad], betas=(0.0, 0.9))
    optim = torch.load(tmp_path / "run" / "optim.pt", weights_only=True)
    torch.save({**optim, "g": adam.state_dict()}, tmp_path / "run" / "optim.pt")
    with pytest.raises(ValueError, match=r"optim.pt \['g'\] is not a RMSprop state \(it lacks \['alpha'\]\)"):
        apt_run(shards, tmp_path / "run", settings).resume()


def test_full_generator_and_frozen_discriminator(shards, tmp_path):
    run = apt_run(shards, None, APTSettings(steps=1, lr=1e-4, batch_size=2, lora_rank=0, val_every=0), mode="frozen")
    assert all(not p.requires_grad for p in run.discriminator.backbone.parameters())
    run_loop(run, 1)
    kind, weights = export_weights(run.generator, run.ema)
    assert kind == "full" and "head.modulation" in weights and not any("lora" in k for k in weights)


def test_sfv_discriminator_run_uses_hinge_and_saves_the_heads_only(shards, tmp_path):
    """APT Discriminator mode sfv: APT Train trains SF-V's heads with the hinge loss; the state holds the heads only."""
    from apt_core.sfv import SFVDiscriminator

    torch.manual_seed(1)
    d = SFVDiscriminator(build_flow_model("tiny"), copy_backbone=False)
    s = APTSettings(steps=2, lr=1e-3, batch_size=2, lora_rank=4, val_every=0)
    run = APTRun(generator(4), d, make_loader(shards, 2, 0), s, CPU, tmp_path / "run")
    assert run.trainer.config.loss == "hinge"
    run_loop(run, 2)
    assert [st for st, _ in run.history["d_loss"]] == [1, 2] and all(math.isfinite(v) for _, v in run.history["d_loss"])
    saved = load_tensors(tmp_path / "run" / "discriminator.safetensors")
    assert saved and all(k.startswith(("spatial.", "temporal.")) for k in saved)
    again = APTRun(generator(4), SFVDiscriminator(build_flow_model("tiny"), copy_backbone=False), make_loader(shards, 2, 0), s,
                   CPU, tmp_path / "run")
    assert again.resume() and again.step_count == 2
    for k, v in again.discriminator.state_dict().items():
        if k in saved:
            torch.testing.assert_close(v, saved[k])


def test_cd_run_with_cfg(shards, tmp_path):
    torch.manual_seed(0)
    teacher = build_flow_model("tiny").requires_grad_(False)
    student = generator(4)
    s = CDSettings(steps=2, lr=1e-3, batch_size=2, grid_steps=4, grid_shift=2.0, cfg_scale=2.0, lora_rank=4)
    with pytest.raises(ValueError, match="negative"):
        CDRun(student, teacher, make_loader(shards, 2, 0), s, CPU, None)
    run = CDRun(student, teacher, make_loader(shards, 2, 0), s, CPU, tmp_path / "cd", neg_context=torch.zeros(1, 2, 32))
    run_loop(run, 2)
    assert [s for s, _ in run.history["loss"]] == [1, 2] and (tmp_path / "cd" / "state.json").is_file()
    kind, lora = export_weights(student)
    assert kind == "lora" and lora


def test_nothing_to_train_is_an_error(shards):
    frozen = build_flow_model("tiny").requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        APTRun(frozen, discriminator("frozen"), make_loader(shards, 1, 0), APTSettings(), CPU)


def test_cd_grid_shift_has_one_default():
    """CDConfig states the CD grid shift (AAPT: 24); the node, its settings and the headless config read it."""
    from apt_core.trainer import CDConfig
    from nodes.train import APTConsistencyDistill
    from training.config import RunConfig

    widget = APTConsistencyDistill.INPUT_TYPES()["required"]["grid_shift"][1]["default"]
    assert CDConfig().shift == 24.0
    assert (widget, CDSettings().grid_shift, RunConfig().cd.grid_shift) == (24.0, 24.0, 24.0)

