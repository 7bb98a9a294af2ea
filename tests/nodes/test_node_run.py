"""The training nodes' glue around the one runner (nodes.node_run, nodes.run_config), without ComfyUI: a run
with the node's config and in-memory weights (as APT Train passes them) leaves the folder the node reads
its outputs from, the same losses as the same settings headless, and the start checks that protect a folder."""

from __future__ import annotations

import json
import shlex
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from apt_core.backbone import WanFlowModel
from apt_core.models.io import save_wan
from apt_core.models.wan import get_config
from bench.trainer_scaling import write_synthetic_shards
from nodes.node_run import (
    STOP_REASON,
    check_inputs,
    check_start,
    export_weights,
    history,
    in_node_terms,
    report,
    validation_latents,
    watching,
    write_tensors,
)
from nodes.run_config import node_run_config, widget_defaults
from nodes.train import APTConsistencyDistill, APTTrain
from tests.single_process import single_process_env
from training.config import load_config
from training.distributed import destroy
from training.loop import ResumeMismatch, RunComplete, train
from training.models import MemorySource
from training.stop import StopRequest

TINY = get_config("tiny")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("node_run")
    torch.manual_seed(3)
    model = WanFlowModel(TINY)
    with torch.no_grad():  # a "trained" head: Wan zero-initialises it, which would block every LoRA gradient
        model.head.head.weight.normal_(std=0.05)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    return {"data": write_synthetic_shards(root / "shards", num=6), "sd": sd, "base": save_wan(model, root / "base.safetensors")}


@pytest.fixture
def env(monkeypatch):
    """A 1-process group on a free port, as ComfyUI's process gets on the first run; torn down after."""
    single_process_env(monkeypatch)
    yield
    destroy()


def apt_config(files, folder, lora_rank=4, steps=2):
    w = {**widget_defaults(APTTrain), "steps": steps, "lr": 1e-3, "batch_size": 2, "grad_accum": 1, "lora_rank": lora_rank,
         "val_every": 1, "precision": "fp32", "gradient_checkpointing": False}
    disc = {"mode": "lora", "head_layers": [], "lora_rank": 2}
    return node_run_config("apt", w, str(files["data"]), str(folder), disc, {"source": "caller"}, device="cpu")


def losses(folder):
    rows = [r for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines()) if "event" not in r]
    return [(r["step"], r["d_loss"], r["g_loss"]) for r in rows]


def test_a_node_run_leaves_what_the_node_outputs(env, files, tmp_path):
    folder = tmp_path / "run"
    check_start(folder, resume=False)  # a new folder: nothing to protect
    result = train(apt_config(files, folder), models=MemorySource(TINY, lambda: dict(files["sd"])))
    assert result["step"] == 2 and not result["stopped"]
    kind, lora, info = export_weights(folder, "apt", 4)
    assert kind == "lora" and info["step"] == 2 and info["ema"]
    assert lora and all(k.startswith("diffusion_model.") for k in lora)  # ComfyUI-native keys, as with_lora takes them
    # the run folder holds the LoRA only (no merged full model per run); the documented recipe exports the
    # merged one from the checkpoint alone (no ComfyUI MODEL): the LoRA on the input weights is that generator
    assert sorted(p.name for p in (folder / "export").iterdir()) == ["apt_generator_lora.safetensors"]
    again = train(load_config(folder / "config.toml", ["--export.merged=true"]), export_only=True)
    assert sorted(again["export"]) == ["lora", "model"]
    full = load_file(str(folder / "export" / "apt_generator.safetensors"))
    ups = [k for k in lora if k.endswith(".lora_up.weight")]
    assert ups
    for k in ups:
        base = k[len("diffusion_model."):-len(".lora_up.weight")]
        scale = float(lora[f"diffusion_model.{base}.alpha"]) / lora[k].shape[1]
        merged = files["sd"][f"{base}.weight"] + scale * lora[k].float() @ lora[k.replace("lora_up", "lora_down")].float()
        torch.testing.assert_close(full[f"{base}.weight"], merged, atol=1e-5, rtol=1e-5)
    assert any(not torch.equal(full[f"{k[16:-15]}.weight"], files["sd"][f"{k[16:-15]}.weight"]) for k in ups)
    # preview: the last validation latents, [prompts * seeds, C, F, H, W]
    last = validation_latents(folder, result)
    saved = load_file(str(folder / "samples" / "step-2" / "samples.safetensors"))["samples"]
    assert last.shape == (2 * 2, 16, 1, 4, 4) and torch.equal(last, saved.flatten(0, 1))
    assert torch.equal(validation_latents(folder, None, up_to=2), last)  # a finished run re-queued: from the folder
    earlier = validation_latents(folder, None, up_to=1)
    assert earlier.shape == last.shape and not torch.equal(earlier, last)
    curves = history(folder)
    assert [s for s, _ in curves["d_loss"]] == [1, 2] and [s for s, _ in curves["val_std"]] == [1, 2]
    text = report("APT", 2, folder, curves)
    assert text.startswith(f"APT: 2 steps, run folder {folder}") and f"python -m training --resume {folder}" in text
    # re-queued: resume off refuses (naming the folder), resume on finds the run complete
    with pytest.raises(ValueError, match=f"run folder {folder} already holds checkpoints .newest: step-2. and resume is off"):
        check_start(folder, resume=False)
    check_start(folder, resume=True)
    with pytest.raises(RunComplete):
        train(apt_config(files, folder), models=MemorySource(TINY, lambda: dict(files["sd"])))


def test_full_weights_output_when_lora_rank_is_0(env, files, tmp_path):
    folder = tmp_path / "full"
    train(apt_config(files, folder, lora_rank=0, steps=1), models=MemorySource(TINY, lambda: dict(files["sd"])))
    kind, weights, info = export_weights(folder, "apt", 0)
    assert kind == "full" and info["step"] == 1 and weights.keys() == files["sd"].keys()
    assert not torch.equal(weights["head.head.weight"], files["sd"]["head.head.weight"])


def test_the_nodes_settings_give_the_same_losses_headless(env, files, tmp_path):
    """Issue 17: the same settings and seed give the same losses whichever front end runs them: the node's
    run (weights in memory) and `python -m training` on its config.toml with the weights from a file."""
    node = tmp_path / "node"
    train(apt_config(files, node), models=MemorySource(TINY, lambda: dict(files["sd"])))
    headless = tmp_path / "headless"
    cfg = load_config(node / "config.toml", [f"--run.dir={headless}", "--model.source=files", f"--model.init_from={files['base']}",
                                             "--model.arch.dim=0"])
    train(cfg)
    a, b = losses(node), losses(headless)
    assert len(a) == 2 and [s for s, *_ in a] == [s for s, *_ in b]
    np.testing.assert_allclose(np.array(b)[:, 1:], np.array(a)[:, 1:], rtol=1e-5, atol=1e-7)


def test_stop_pressed_while_the_runner_builds_its_models_ends_the_run_before_a_step(env, files, tmp_path):
    """The node watches ComfyUI's Stop flag from the start (nodes.node_run.watching): a Stop pressed during setup
    (here: while G's weights are read, as effective_state_dict does on a large model) trains no step."""
    folder = tmp_path / "run"
    pressed = threading.Event()
    stop = StopRequest()

    def weights() -> dict[str, torch.Tensor]:
        pressed.set()  # Stop pressed
        time.sleep(1.0)  # setup goes on for a while (minutes on a real model)
        assert stop.reason == STOP_REASON  # seen during setup, not after a step
        return dict(files["sd"])

    with watching(pressed.is_set, stop, interval_s=0.05) as watcher:
        result = train(apt_config(files, folder, steps=3), models=MemorySource(TINY, weights), stop=stop)
    assert not watcher.is_alive()
    assert result["stopped"] == STOP_REASON and result["step"] == 0 and losses(folder) == []
    assert result["checkpoint"] is None and not list(folder.glob("checkpoints/step-*"))
    calm = StopRequest()
    with watching(lambda: False, calm, interval_s=0.05) as watcher:  # no Stop: the run trains; the watcher ends with it
        done = train(apt_config(files, folder, steps=1), models=MemorySource(TINY, lambda: dict(files["sd"])), stop=calm)
    assert not watcher.is_alive() and calm.reason is None and done["step"] == 1 and not done["stopped"]


def test_a_changed_lora_rank_is_refused_in_the_nodes_words(env, files, tmp_path):
    folder = tmp_path / "run"
    stop = StopRequest()
    first = train(apt_config(files, folder, steps=3), models=MemorySource(TINY, lambda: dict(files["sd"])), stop=stop,
                  on_step=lambda step, total, m: stop.request("Stop pressed in ComfyUI"))  # as the node's Stop does
    assert first["stopped"] and first["step"] == 1
    with pytest.raises(ResumeMismatch) as e:
        train(apt_config(files, folder, lora_rank=8, steps=3), models=MemorySource(TINY, lambda: dict(files["sd"])))
    text = in_node_terms(str(e.value))
    assert "model.lora_rank (widget 'lora_rank') = 4 there, 8 now" in text and "another run_name" in text and "--run.dir" not in text


def test_consistency_distill_with_the_nodes_negative_prompt_file(env, files, tmp_path):
    """APT Consistency Distill's run: the frozen teacher is the caller's module (ComfyUI's model in the node) and
    its negative CONDITIONING a run file (cd.negative_embedding) that the teacher's CFG uses."""
    teacher = WanFlowModel(TINY)
    teacher.load_state_dict(files["sd"])
    w = {**widget_defaults(APTConsistencyDistill), "iterations": 2, "lr": 1e-3, "batch_size": 2, "cd_steps": 4, "cfg": 3.0,
         "lora_rank": 4, "precision": "fp32", "gradient_checkpointing": False}
    runs = {}
    for name, neg in (("zeros", torch.zeros(5, 32)), ("prompt", torch.randn(5, 32, generator=torch.Generator().manual_seed(1)))):
        folder = tmp_path / name
        extra = {"negative_embedding": write_tensors(folder / "negative.safetensors", {"context": neg})}
        cfg = node_run_config("cd", w, str(files["data"]), str(folder), model={"source": "caller"}, cd_extra=extra, device="cpu")
        train(cfg, models=MemorySource(TINY, lambda: dict(files["sd"]), teacher=teacher))
        kind, _, info = export_weights(folder, "cd", 4)
        assert kind == "lora" and info["step"] == 2 and load_config(folder / "config.toml").cd.negative_embedding == extra["negative_embedding"]
        runs[name] = [r["loss"] for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines()) if "event" not in r]
        text = report("CD", 2, folder, history(folder), stage="cd")
        assert f"--resume {folder} --run.steps=4 --cd.teacher_from=TEACHER_WEIGHTS.safetensors" in text and "loss=" in text
    assert len(runs["zeros"]) == 2 and runs["zeros"] != runs["prompt"]  # the negative prompt reaches the teacher's CFG


def test_the_reports_headless_command_runs_verbatim_in_a_shell(tmp_path):
    """The report's continue command is one shell command: ComfyUI's Python from this pack's folder (where
    `-m training` imports; the pack is not installed in ComfyUI's venv), paths quoted, a real step count."""
    folder = tmp_path / "my run: v1?*"
    text = report("APT", 3, folder, {"d_loss": [(3, 0.5)]})
    command = text.split(" with: ", 1)[1].rsplit("; last ", 1)[0]
    assert shlex.split(command) == ["cd", str(ROOT), "&&", sys.executable, "-m", "training", "--resume", str(folder),
                                    "--apt.image.steps=6"]


def test_a_run_refuses_to_resume_on_other_inputs(env, files, tmp_path):
    """node_inputs.json: once the run holds a checkpoint, another model or dataset is refused (resuming would
    ignore it and output the old run's model); before that a new start takes the new inputs."""
    folder = tmp_path / "run"
    inputs = {"generator": "g1", "discriminator": "d1", "dataset": str(files["data"])}
    check_inputs(folder, {**inputs, "generator": "g0"})
    check_inputs(folder, inputs)  # no checkpoint yet: a new start, whatever was recorded
    train(apt_config(files, folder, steps=1), models=MemorySource(TINY, lambda: dict(files["sd"])))
    check_inputs(folder, inputs)  # the same inputs resume
    with pytest.raises(ValueError, match=f"run folder {folder} holds a run started from another generator MODEL than this graph's"):
        check_inputs(folder, {**inputs, "generator": "g2"})
    with pytest.raises(ValueError, match=f"another dataset \\({files['data']} there, /elsewhere now\\).*another run_name"):
        check_inputs(folder, {**inputs, "dataset": "/elsewhere"})
    (folder / "node_inputs.json").unlink()  # the way out the message names: the folder takes this graph's inputs
    check_inputs(folder, {**inputs, "generator": "g2"})
    with pytest.raises(ValueError, match="another generator MODEL"):
        check_inputs(folder, inputs)


def test_the_report_shows_the_runs_warnings(env, files, tmp_path):
    """The runner's warnings (here: D winning, with a floor every D loss is under) reach the node's report,
    not only ComfyUI's console."""
    folder = tmp_path / "run"
    cfg = apt_config(files, folder)
    cfg.monitor.collapse_window, cfg.monitor.d_loss_floor = 1, 1e9
    train(cfg, models=MemorySource(TINY, lambda: dict(files["sd"])))
    text = report("APT", 2, folder, history(folder))
    assert "\n2 warning(s) in metrics.jsonl, the last: step 2: D loss below 1000000000.0 for 1 steps" in text, text
    assert "raise apt.r1_lambda (APT Train widget 'r1_lambda'), lower apt.lr (APT Train widget 'lr')" in text  # in widget names


def test_start_checks_protect_the_folder(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / "state.json").write_text('{"kind": "apt", "step": 3}')  # the earlier node-only run state
    for resume in (True, False):
        with pytest.raises(ValueError, match=f"run folder {old} holds a run state of an earlier ComfyUI-APT version"):
            check_start(old, resume)
    assert (old / "state.json").is_file()
    home = tmp_path / "home"  # an absolute run_name naming a folder of other files: not sprayed with a run's files
    (home / "photos").mkdir(parents=True)
    (home / "notes.txt").write_text("mine")
    for resume in (True, False):
        with pytest.raises(ValueError, match=f"run_name: {home} is a folder with other files in it .notes.txt, photos., not a run folder"):
            check_start(home, resume)
    assert sorted(p.name for p in home.iterdir()) == ["notes.txt", "photos"]
    fresh = tmp_path / "fresh"  # a new folder, or one a run started (its files only), is fine
    (fresh / "samples").mkdir(parents=True)
    (fresh / "val_prompts.safetensors").write_bytes(b"")
    check_start(fresh, resume=False)
    with pytest.raises(FileNotFoundError, match="apt_generator.safetensors is missing"):
        export_weights(tmp_path / "none", "apt", 0)
    assert validation_latents(tmp_path / "none") is None
