"""Actionable checks, LoRA combination, path handling and the cluster-config export (no ComfyUI needed)."""

import json
from types import SimpleNamespace

import pytest
import torch

from apt_core.models.wan import build_wan, get_config
from nodes.comfy_backbone import (
    combine_loras,
    conditioning_context,
    context_problem,
    family_problem,
    latent_problem,
    model_signature,
)
from nodes.comfy_env import resolve_path
from nodes.io import run_config_from_prompt
from nodes.train import DiscriminatorSpec, parse_layers, run_dir
from tests.nodes.comfy_schema import ROOT


def test_family_problem_names_the_model_and_the_fix():
    assert family_problem("WAN21", {"image_model": "wan2.1", "model_type": "t2v", "in_dim": 16}) is None
    msg = family_problem("Flux", {})
    assert "Flux" in msg and "WAN21" in msg and "UNETLoader" in msg
    msg = family_problem("WAN21", {"model_type": "i2v", "in_dim": 36})
    assert "i2v" in msg and "in_dim=36" in msg


def test_wan21_i2v_is_taken_by_the_sampler_node_and_refused_by_the_training_nodes():
    # issue 17: every node refused I2V, the sampler included, though ComfyUI's own WAN21 I2V model takes the
    # image condition WanImageToVideo puts into the CONDITIONING; the training nodes still pass text only
    i2v = {"image_model": "wan2.1", "model_type": "i2v", "in_dim": 36}
    assert family_problem("WAN21", i2v, use="sampling") is None
    msg = family_problem("WAN21", i2v, use="training")
    assert msg.startswith("APT training nodes do not take this MODEL") and "Wan 2.1 I2V" in msg
    assert "APT One-Step Sampler" in msg and "headless trainer" in msg
    assert "Wan 2.1 I2V" not in msg.split("Supported here:")[1]  # the list names only what the training nodes take
    msg = family_problem("Flux", {}, use="sampling")
    assert msg.startswith("APT nodes do not support") and "Wan 2.1 I2V" in msg.split("Supported here:")[1]
    with pytest.raises(ValueError, match="use must be one of"):
        family_problem("WAN21", i2v, use="train")


def test_latent_problem():
    assert latent_problem((1, 16, 3, 8, 8)) is None
    assert "rank 4" in latent_problem((1, 16, 8, 8))
    assert "4 channels" in latent_problem((1, 4, 3, 8, 8))
    assert "H=7" in latent_problem((1, 16, 3, 7, 8))
    assert "EmptyHunyuanLatentVideo" in latent_problem((1, 4, 8, 8))


def test_conditioning_checks_and_batching():
    assert context_problem((1, 512, 4096)) is None
    assert "CLIPLoader(type=wan)" in context_problem((1, 77, 768))
    ctx = torch.randn(1, 7, 4096)
    assert conditioning_context([[ctx, {}]], batch=3).shape == (3, 7, 4096)
    with pytest.raises(ValueError, match="4096"):
        conditioning_context([[torch.zeros(1, 77, 2048), {}]])
    with pytest.raises(ValueError, match="empty"):
        conditioning_context([])


def test_combine_loras_is_exactly_the_sum():
    g = torch.Generator().manual_seed(0)

    def lora(rank, alpha):
        return {"diffusion_model.m.lora_up.weight": torch.randn(6, rank, generator=g),
                "diffusion_model.m.lora_down.weight": torch.randn(rank, 5, generator=g),
                "diffusion_model.m.alpha": torch.tensor(float(alpha))}

    def delta(sd):
        up, down = sd["diffusion_model.m.lora_up.weight"], sd["diffusion_model.m.lora_down.weight"]
        return float(sd["diffusion_model.m.alpha"]) / down.shape[0] * up @ down

    a, b = lora(4, 2.0), lora(2, 8.0)
    c = combine_loras([a, b])
    assert c["diffusion_model.m.lora_down.weight"].shape == (6, 5) and float(c["diffusion_model.m.alpha"]) == 6.0
    torch.testing.assert_close(delta(c), delta(a) + delta(b))
    assert combine_loras([a]) == a


def test_parse_layers():
    assert parse_layers("auto", 30) is None
    assert parse_layers(" 12, 21,29 ", 30) == [12, 21, 29]
    for bad in ["30", "1,1", "x", ","]:
        with pytest.raises(ValueError):
            parse_layers(bad, 30)


def test_resolve_path_stays_inside(tmp_path):
    assert resolve_path("a/b", str(tmp_path), "x") == tmp_path.resolve() / "a" / "b"
    assert resolve_path("/abs/p", str(tmp_path), "x").as_posix() == "/abs/p"
    with pytest.raises(ValueError, match="leaves"):
        resolve_path("../../etc", str(tmp_path), "filename")
    with pytest.raises(ValueError, match="empty"):
        resolve_path("  ", str(tmp_path), "filename")


def test_run_name_absolute_or_under_the_runs_folder(tmp_path):
    """An absolute run_name is the state folder itself (the error text offers it), not output/apt/runs/<abs>
    (issue 15, defect 6); a relative one stays inside the runs folder."""
    runs = tmp_path / "output" / "apt" / "runs"
    elsewhere = tmp_path / "big_disk" / "apt_run"
    assert run_dir(str(elsewhere), str(runs)) == elsewhere
    assert run_dir(str(elsewhere)) == elsewhere  # needs no ComfyUI folder lookup
    assert run_dir("cd", str(runs)) == runs.resolve() / "cd"
    assert run_dir("exp/2", str(runs)) == runs.resolve() / "exp" / "2"
    with pytest.raises(ValueError, match="run_name '../x' leaves .*absolute path"):
        run_dir("../x", str(runs))
    called = []
    assert resolve_path("/abs/p", lambda: called.append(1) or str(tmp_path), "x").as_posix() == "/abs/p" and not called
    assert resolve_path("p", lambda: str(tmp_path), "x") == tmp_path.resolve() / "p"


def test_export_reads_the_graphs_settings(tmp_path):
    from training.config import load_config, save_config

    prompt = json.loads((ROOT / "workflows" / "api" / "apt_export_cluster_config.json").read_text())
    prompt["5"]["inputs"].update(lr=3e-6, steps=123, r1_sigma=0.1, d_timestep_shift=12.0)
    prompt["4"]["inputs"].update(mode="frozen", head_layers="12,21,29")
    cfg = run_config_from_prompt(prompt, "apt", "/m/wan.safetensors", "/d/shards", "runs/x", "/r/cd.safetensors")
    assert cfg.run.stage == "apt" and cfg.model.init_from == "/m/wan.safetensors" and cfg.data.path == "/d/shards"
    assert cfg.apt.lr == 3e-6 and cfg.apt.image.steps == 123 and cfg.apt.image.r1_sigma == 0.1
    assert cfg.apt.image.d_timestep_shift == 12.0 and cfg.apt.disc_mode == "frozen" and cfg.apt.head_layers == [12, 21, 29]
    assert cfg.data.micro_batch * cfg.data.grad_accum == 8 and cfg.model.lora_rank == 16 and cfg.apt.generator_init == "/r/cd.safetensors"
    assert cfg.cd.grid_steps == 32 and cfg.apt.video.steps == 0
    path = save_config(cfg, tmp_path / "run.toml")
    back = load_config(path)
    assert back == cfg
    prompt["4"]["inputs"].update(mode="sfv", head_layers="3,7")  # the SF-V discriminator: its kind and hinge loss
    sfv = run_config_from_prompt(prompt, "apt", "/m/wan.safetensors", "/d/shards", "runs/x", "/r/cd.safetensors")
    assert (sfv.apt.disc_kind, sfv.apt.loss, sfv.apt.sfv.head_layers, sfv.apt.head_layers) == ("sfv", "hinge", [3, 7], [])
    assert load_config(save_config(sfv, tmp_path / "sfv.toml")) == sfv
    cd = run_config_from_prompt({}, "cd", "/m/wan.safetensors", "/d/shards", "runs/cd")
    assert cd.run.stage == "cd" and cd.run.steps == 500 and cd.model.lora_rank == 32


def test_discriminator_spec_names_what_differs_from_the_generator():
    """APT Train refuses a generator of another architecture, naming the tensors and both shapes."""

    def model(**overrides):  # what model_signature reads of a ComfyUI MODEL: .model.diffusion_model
        return SimpleNamespace(model=SimpleNamespace(diffusion_model=build_wan(get_config("tiny", **overrides), device="meta")))

    base = model()
    spec = DiscriminatorSpec(base, None, "lora", 4, model_signature(base))
    spec.check_generator(model())
    with pytest.raises(ValueError, match=r"different model.*27 tensor\(s\) only in the generator \(e.g. blocks.2"):
        spec.check_generator(model(num_layers=3))
    with pytest.raises(ValueError, match=r"shape mismatch.*blocks.0.ffn.0.weight: G \[96, 64\] vs D \[128, 64\]"):
        spec.check_generator(model(ffn_dim=96))


def test_family_problem_accepts_wan22_ti2v_5b_and_lists_the_families():
    # ComfyUI loads the 5B as model class WAN22 (supported_models.WAN22_T2V); refused before the registry
    assert family_problem("WAN22", {"image_model": "wan2.1", "model_type": "t2v", "in_dim": 48, "out_dim": 48}) is None
    assert latent_problem((1, 48, 2, 4, 4), channels=48) is None
    msg = family_problem("WAN22", {"model_type": "s2v", "in_dim": 48, "out_dim": 48})
    assert "WAN22" in msg and "s2v" in msg and "Wan 2.2 TI2V-5B" in msg and "Wan 2.1 T2V" in msg


def test_dataset_node_picks_the_latent_format_by_the_vaes_channels():
    # the Wan 2.2 VAE (48 channels) was refused; each family's VAE now gets that family's ComfyUI latent format
    from types import SimpleNamespace

    from nodes.dataset import vae_family

    assert vae_family(SimpleNamespace(latent_channels=48)).comfy_latent_format == "Wan22"
    assert vae_family(SimpleNamespace(latent_channels=16)).comfy_latent_format == "Wan21"
    with pytest.raises(ValueError, match="4-channel latents"):
        vae_family(SimpleNamespace(latent_channels=4))
