"""Exports: the EMA generator as one Wan-key safetensors file that apt_core's loader rebuilds with
identical outputs, and LoRA adapters in ComfyUI-native keys (1-process FSDP2 group, in-process)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from apt_core.backbone import WanCond, build_flow_model
from apt_core.lora import DEFAULT_TARGETS, load_lora_state_dict
from apt_core.models.io import load_wan, save_wan
from bench.trainer_scaling import write_synthetic_shards
from tests.single_process import single_process_env
from training.config import load_config
from training.data import BucketedLoader, ShardDataset
from training.distributed import destroy, init_distributed
from training.export import export_generator
from training.loop import TeacherStage, plan_phases, resolve_wan_config

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


@pytest.fixture
def world(monkeypatch):
    single_process_env(monkeypatch)
    w = init_distributed("cpu", "gloo")
    yield w
    destroy()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(3)
    base = build_flow_model("tiny")
    with torch.no_grad():  # a non-zero head, so every weight matters for the output
        base.head.head.weight.normal_(std=0.02)
    return {"data": write_synthetic_shards(root / "shards", num=8), "base": save_wan(base, root / "base.safetensors")}


def trained_stage(world, files, tmp_path, *overrides: str) -> TeacherStage:
    """A teacher stage initialised from the base file, trained 2 steps with EMA."""
    cfg = load_config(ROOT / "configs/tiny_cpu.toml", [
        "--run.stage=teacher", f"--run.dir={tmp_path}", f"--data.path={files['data']}",
        f"--model.init_from={files['base']}", "--teacher.lr=1e-3", "--teacher.ema_decay=0.5", *overrides,
    ])
    stage = TeacherStage(cfg, world, resolve_wan_config(cfg))
    phase = plan_phases(cfg)[0]
    stage.begin_phase(phase, first=True)
    loader = BucketedLoader(ShardDataset(phase.data), phase.micro_batch, world.rank, world.world_size, seed=0)
    for step in range(2):
        stage.step(step, next(loader))
    return stage


def probe(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 16, 1, 4, 4, generator=g), torch.rand(2, generator=g), WanCond(torch.randn(2, 6, 32, generator=g))


def test_exported_generator_reloads_with_identical_outputs(world, files, tmp_path):
    stage = trained_stage(world, files, tmp_path)
    paths = export_generator(stage.generator, tmp_path / "export", "gen", world, stage.config, stage.ema, dtype="fp32",
                             metadata={"step": 2})
    assert set(paths) == {"model"}
    x, t, c = probe()
    with torch.no_grad(), stage.ema.swap_into(stage.generator):
        expected = stage.generator(x, t, c)
    with torch.no_grad():
        raw = stage.generator(x, t, c)
    assert not torch.allclose(raw, expected, atol=1e-5), "EMA and raw weights should differ after training"

    sd = load_file(paths["model"])
    # original Wan key names, no ComfyUI prefix: what UNETLoader / load_wan expect
    assert set(sd) == set(build_flow_model("tiny", device="meta").state_dict())
    with safe_open(str(paths["model"]), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["apt.export"]) == {"ema": True, "step": 2}
    reloaded = load_wan(paths["model"])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x, t, c), expected, atol=1e-6, rtol=0)
    # the training model's parameters were restored after the EMA swap
    with torch.no_grad():
        torch.testing.assert_close(stage.generator(x, t, c), raw, atol=0, rtol=0)

    bf16 = export_generator(stage.generator, tmp_path / "export", "gen_bf16", world, stage.config, stage.ema)
    assert {v.dtype for v in load_file(bf16["model"]).values()} == {torch.bfloat16}


def test_lora_export_uses_comfyui_keys_and_matches_merged_model(world, files, tmp_path):
    stage = trained_stage(world, files, tmp_path, "--model.lora_rank=4", "--model.lora_alpha=8")
    paths = export_generator(stage.generator, tmp_path / "export", "gen", world, stage.config, stage.ema,
                             lora_rank=4, lora_alpha=8.0, dtype="fp32")
    assert set(paths) == {"model", "lora"}
    lora = load_file(paths["lora"])
    modules = {f"blocks.{b}.{t}" for b in range(2) for t in DEFAULT_TARGETS}
    expected_keys = {f"diffusion_model.{m}.{s}" for m in modules for s in ("lora_up.weight", "lora_down.weight", "alpha")}
    assert set(lora) == expected_keys
    assert lora["diffusion_model.blocks.0.self_attn.q.lora_down.weight"].shape == (4, 64)
    assert lora["diffusion_model.blocks.0.ffn.0.lora_up.weight"].shape == (128, 4)
    assert float(lora["diffusion_model.blocks.1.ffn.2.alpha"]) == 8.0
    assert any(lora[k].abs().max() > 0 for k in lora if k.endswith("lora_up.weight")), "adapters were trained"

    x, t, c = probe(1)
    with torch.no_grad(), stage.ema.swap_into(stage.generator):
        expected = stage.generator(x, t, c)
    # base weights + the LoRA file (as ComfyUI's LoraLoaderModelOnly applies it) == the training model
    base = load_wan(files["base"])
    load_lora_state_dict(base, lora)
    merged = load_wan(paths["model"])  # the merged export: plain Wan keys again
    assert not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(base(x, t, c), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(merged(x, t, c), expected, atol=1e-5, rtol=0)


def test_export_files_merged_off_keeps_the_lora_only(tmp_path):
    """export.merged = false: a LoRA run exports the LoRA file only; a full fine-tune still its full weights."""
    from training.export import export_files

    assert [p.name for p in export_files(tmp_path, "g", 4)] == ["g.safetensors", "g_lora.safetensors"]
    assert [p.name for p in export_files(tmp_path, "g", 4, merged=False)] == ["g_lora.safetensors"]
    assert [p.name for p in export_files(tmp_path, "g", 0, merged=False)] == ["g.safetensors"]
