"""Integration suite against a REAL ComfyUI (skipped unless COMFYUI_DIR and COMFYUI_VENV are set).

See docs/COMFYUI.md ("Real-ComfyUI suite"). The server runs on CPU, bound to 127.0.0.1,
with this pack, shared/comfyui/tools/testnodes and tests/comfyui/apt_testnodes linked into the
custom_nodes/ of its own temporary base directory (harness.Comfy; the checkout's custom_nodes/ is left
alone). One server serves the session (conftest.py). Models: the tiny random Wan 2.1 of make_tiny_wan.py (+ its random VAE) and
make_tiny_variants.py. The umT5 text encoder cannot be had: prompts use testnodes'
TestZeroConditioning and the dataset node's CLIP input apt_testnodes' APTTestStandInCLIP (stand-ins).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nodes.node_run import STOP_REASON
from tests.comfyui.harness import (
    A14B_HIGH,
    A14B_LOW,
    I2V,
    PACK_NAME,
    ROOT,
    RUN,
    T2V_3,
    TI2V,
    TINY_VAE,
    TINY_WAN,
    Comfy,
    api_twin,
    error_of,
    texts,
    tiny,
)
from tests.nodes.comfy_schema import our_object_info
from tests.nodes.make_workflows import workflows
from training.checkpoint import checkpoint_step, find_latest

COMFYUI_DIR, COMFYUI_VENV = os.environ.get("COMFYUI_DIR"), os.environ.get("COMFYUI_VENV")
pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.slow,
    pytest.mark.skipif(not (COMFYUI_DIR and COMFYUI_VENV), reason="real ComfyUI suite: set COMFYUI_DIR and COMFYUI_VENV (docs/COMFYUI.md)"),
]


def log_text(comfy: Comfy) -> str:
    return comfy.log.read_text(errors="replace")


def lines(run: Path) -> list[dict]:
    """The rows and events of a run dir's metrics.jsonl."""
    path = run / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def metric_rows(run: Path) -> list[dict]:
    return [r for r in lines(run) if "event" not in r]


def test_extension_loads_and_serves_every_node(comfy):
    log = log_text(comfy)
    assert "ComfyUI-APT" in log and "IMPORT FAILED" not in log and "Cannot import" not in log, log[-3000:]
    served = comfy.get("/object_info")
    for name, ours in our_object_info().items():
        assert name in served, f"{name} missing from /object_info"
        got = served[name]
        for key in ("input", "input_order", "output", "output_name", "category", "display_name", "output_node", "output_tooltips"):
            assert got[key] == ours[key], f"{name}.{key}: served {got[key]} != declared {ours[key]}"


def loaded_packs(log: Path) -> list[str]:
    """The custom-node folders a server imported (the import-time list of its log)."""
    return [line.split(": ", 1)[1].strip() for line in log.read_text(errors="replace").splitlines()
            if " seconds" in line and ": " in line and "custom_nodes" in line]


def custom_nodes_entries(folder: Path) -> list[tuple[str, str | None]]:
    return sorted((p.name, os.readlink(p) if p.is_symlink() else None) for p in folder.iterdir())


def test_harness_leaves_custom_nodes_as_found_and_loads_the_pack_once(tmp_path):
    """Issue 15, defect 5: the harness used to leave its links in ComfyUI's custom_nodes/, so the
    pack stayed installed after the tests and was loaded twice next to another copy of it. Now each
    server loads the packs from its own base directory, and a stale link is removed at start."""
    custom = Path(COMFYUI_DIR) / "custom_nodes"
    stale, second = custom / PACK_NAME, custom / "apt_test_second_copy"
    if stale.exists() and not stale.is_symlink() or second.exists():
        pytest.skip(f"{stale} or {second} is a real install: not touched")
    if stale.is_symlink():
        stale.unlink()
    found = custom_nodes_entries(custom)
    stale.symlink_to(ROOT, target_is_directory=True)  # what the earlier harness left behind
    second.symlink_to(ROOT, target_is_directory=True)  # another copy (an install under another name)
    try:
        for i in range(2):
            c = Comfy(Path(COMFYUI_DIR), Path(COMFYUI_VENV), tmp_path / f"run{i}")
            c.start()
            try:
                packs = [p for p in loaded_packs(c.log) if Path(p).resolve() == ROOT.resolve()]
                assert len(packs) == 1, f"run {i}: the pack was loaded {len(packs)} times: {packs}"
            finally:
                c.stop()
            assert custom_nodes_entries(custom) == sorted(found + [(second.name, str(ROOT))]), f"run {i} changed {custom}"
    finally:
        for link in (stale, second):
            if link.is_symlink():
                link.unlink()


def test_workflows_appear_as_templates(comfy):
    templates = comfy.get("/workflow_templates")
    assert sorted(templates["ComfyUI-APT"]) == sorted(workflows()), templates
    ui = comfy.get("/api/workflow_templates/ComfyUI-APT/apt_t2v_one_step.json")
    assert ui == json.loads((ROOT / "workflows" / "apt_t2v_one_step.json").read_text())


@pytest.fixture(scope="module")
def dataset(comfy):
    entry = comfy.run(tiny(api_twin("apt_dataset_prepare"), RUN))
    return entry


def test_dataset_preparation_skips_and_reports_bad_files(comfy, dataset):
    report = "\n".join(texts(dataset))
    assert "wrote 3 new samples" in report
    assert "broken.mp4" in report and "corrupt" in report and "uncaptioned.png" in report and "missing_caption" in report
    root = comfy.output / "apt" / "datasets" / RUN
    assert (root / "dataset-00000.json").is_file() and list(root.glob("shard-00000-*.safetensors"))


@pytest.fixture(scope="module")
def trained(comfy, dataset):
    t0 = time.time()
    entry = comfy.run(tiny(api_twin("apt_train_single_gpu"), RUN))
    return entry, time.time() - t0


def test_train_end_to_end_saves_previews_and_state(comfy, trained):
    entry, _ = trained
    out = entry["outputs"]
    report = "\n".join(texts(entry))
    assert "saved lora" in report and "saved full" in report and "APT: 2 steps" in report
    assert (comfy.dir / "models" / "loras" / "apt_test" / RUN / "lora.safetensors").is_file()
    assert (comfy.dir / "models" / "diffusion_models" / "apt_test" / RUN / "full.safetensors").is_file()
    assert out["12"]["images"] and out["13"]["images"]  # APT metrics plot, CD loss plot
    video = out["16"]["images"][0]
    assert (comfy.output / video["subfolder"] / video["filename"]).stat().st_size > 0
    run = comfy.output / "apt" / "runs" / f"{RUN}-apt"  # the runner's run dir (issue 17): checkpoints, metrics, samples, export
    assert (run / "checkpoints" / "step-2" / "COMPLETE").is_file() and (run / "export" / "apt_generator_lora.safetensors").is_file()
    assert [e["step"] for e in lines(run) if e.get("event") == "validation"] == [1, 2]
    assert (run / "samples" / "step-2" / "samples.safetensors").is_file()
    assert 'source = "caller"' in (run / "config.toml").read_text()


@pytest.mark.parametrize("name", ["apt_t2v_one_step", "apt_t2i_one_step", "apt_t2v_two_step_refine"])
def test_saved_generator_reloads_with_core_loader_and_samples(comfy, trained, name):
    entry = comfy.run(tiny(api_twin(name), RUN, unet=f"apt_test/{RUN}/full.safetensors"))
    files = [f for o in entry["outputs"].values() for f in o.get("images", [])]
    assert files and all((comfy.output / f["subfolder"] / f["filename"]).stat().st_size > 0 for f in files)


def one_step_latent(comfy: Comfy, model_nodes: dict, tag: str, seed: int = 5) -> torch.Tensor:
    """Run model_nodes (ending in node "m") + a one-step sample from the tiny latent; return the saved latent."""
    g = {**model_nodes,
         "c": {"class_type": "TestZeroConditioning", "inputs": {"batch": 1, "length": 16, "dim": 4096}},
         "l": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 64, "height": 64, "length": 5, "batch_size": 1}},
         "s": {"class_type": "APTOneStepSampler", "inputs": {"model": ["m", 0], "positive": ["c", 0], "latent": ["l", 0], "seed": seed,
                                                             "steps": 1, "t_mid": 0.5}},
         "o": {"class_type": "SaveLatent", "inputs": {"samples": ["s", 0], "filename_prefix": f"apt_test/{RUN}/{tag}"}}}
    entry = comfy.run(g)
    f = entry["outputs"]["o"]["latents"][0]
    return load_file(str(comfy.output / f["subfolder"] / f["filename"]))["latent_tensor"]


def test_lora_loads_with_core_loader_fully_and_equals_the_full_checkpoint(comfy, trained):
    before = len(log_text(comfy))
    with_lora = one_step_latent(comfy, {
        "b": {"class_type": "UNETLoader", "inputs": {"unet_name": TINY_WAN, "weight_dtype": "default"}},
        "m": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["b", 0], "lora_name": f"apt_test/{RUN}/lora.safetensors",
                                                              "strength_model": 1.0}}}, "lora")
    full = one_step_latent(comfy, {"m": {"class_type": "UNETLoader", "inputs": {"unet_name": f"apt_test/{RUN}/full.safetensors",
                                                                                "weight_dtype": "default"}}}, "full")
    base = one_step_latent(comfy, {"m": {"class_type": "UNETLoader", "inputs": {"unet_name": TINY_WAN, "weight_dtype": "default"}}}, "base")
    new_log = log_text(comfy)[before:]
    assert "lora key not loaded" not in new_log and "NOT LOADED" not in new_log, new_log[-2000:]
    torch.testing.assert_close(with_lora, full, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(full, base, atol=1e-4), "training changed nothing"


def test_stop_ends_training_within_a_step_and_leaves_the_model_untouched(comfy, dataset):
    base = {"m": {"class_type": "UNETLoader", "inputs": {"unet_name": TINY_WAN, "weight_dtype": "default"}}}
    before = one_step_latent(comfy, base, "untouched-before")
    graph = {
        "m": base["m"],
        "d": {"class_type": "APTLoadDataset", "inputs": {"path": f"apt/datasets/{RUN}"}},
        "D": {"class_type": "APTDiscriminator", "inputs": {"model": ["m", 0], "mode": "frozen", "head_layers": "auto", "lora_rank": 2}},
        "t": {"class_type": "APTTrain", "inputs": {**api_twin("apt_train_single_gpu")["9"]["inputs"], "generator": ["m", 0],
                                                   "discriminator": ["D", 0], "dataset": ["d", 0], "steps": 100000, "val_every": 0,
                                                   "lora_rank": 4, "precision": "fp32", "run_name": f"{RUN}-stop", "resume": False}},
        "p": {"class_type": "PreviewAny", "inputs": {"source": ["t", 3]}},
    }
    for k in ("val_conditioning", "val_latent"):
        graph["t"]["inputs"].pop(k)
    run = comfy.output / "apt" / "runs" / f"{RUN}-stop"
    pid = comfy.submit(graph)
    t0 = time.time()
    while not metric_rows(run):  # the runner writes a row after every step of a node run
        assert time.time() - t0 < 120, "training did not start"
        time.sleep(0.2)
    time.sleep(3.0)
    t_stop = time.time()
    comfy.post("/interrupt")
    entry = comfy.wait(pid, 120)
    elapsed = time.time() - t_stop
    assert entry["status"]["status_str"] == "error" and error_of(entry).startswith("interrupted"), error_of(entry)
    stopped = [e for e in lines(run) if e.get("event") == "stopped"]
    step = checkpoint_step(find_latest(run))  # Stop saved a checkpoint of the step it ended
    assert stopped and stopped[-1]["reason"] == STOP_REASON and stopped[-1]["step"] == step
    per_step = 3.0 / max(1, step)
    assert step >= 1 and elapsed < 2 * per_step + 5.0, (elapsed, step)
    after = one_step_latent(comfy, base, "untouched-after")
    assert torch.equal(before, after), "the input MODEL changed"
    # queue again with resume on: it continues from the saved step
    graph["t"]["inputs"].update(steps=step + 2, resume=True)
    report = "\n".join(texts(comfy.run(graph)))
    assert f"APT: {step + 2} steps" in report
    assert [r["step"] for r in metric_rows(run)][-3:] == [step, step + 1, step + 2]
    # the stopped and resumed run ends with the weights of an uninterrupted one
    graph["t"]["inputs"].update(run_name=f"{RUN}-nostop", resume=False)
    comfy.run(graph)
    a, b = (load_file(str(comfy.output / "apt" / "runs" / name / "export" / "apt_generator_lora.safetensors"))
            for name in (f"{RUN}-stop", f"{RUN}-nostop"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stop_during_setup_ends_the_run_before_its_first_step(comfy, dataset):
    """Stop pressed while APT Train's runner reads the generator's weights (setup; minutes on a large model):
    the node sees it then and the run ends before step 1, with no checkpoint, as interrupted."""
    graph = {
        "b": {"class_type": "UNETLoader", "inputs": {"unet_name": TINY_WAN, "weight_dtype": "default"}},
        "m": {"class_type": "APTTestStopDuringSetup", "inputs": {"model": ["b", 0], "seconds": 1.0}},
        "d": {"class_type": "APTLoadDataset", "inputs": {"path": f"apt/datasets/{RUN}"}},
        "D": {"class_type": "APTDiscriminator", "inputs": {"model": ["b", 0], "mode": "frozen", "head_layers": "auto", "lora_rank": 2}},
        "t": {"class_type": "APTTrain", "inputs": {**api_twin("apt_train_single_gpu")["9"]["inputs"], "generator": ["m", 0],
                                                   "discriminator": ["D", 0], "dataset": ["d", 0], "steps": 3, "val_every": 0,
                                                   "lora_rank": 4, "precision": "fp32", "run_name": f"{RUN}-setup-stop",
                                                   "resume": False}},
        "p": {"class_type": "PreviewAny", "inputs": {"source": ["t", 3]}},
    }
    for k in ("val_conditioning", "val_latent"):
        graph["t"]["inputs"].pop(k)
    run = comfy.output / "apt" / "runs" / f"{RUN}-setup-stop"
    entry = comfy.wait(comfy.submit(graph), 300)
    assert entry["status"]["status_str"] == "error" and error_of(entry).startswith("interrupted"), error_of(entry)
    (stopped,) = [e for e in lines(run) if e.get("event") == "stopped"]
    assert stopped["reason"] == STOP_REASON and stopped["step"] == 0 and stopped["checkpoint"] is None
    assert metric_rows(run) == [] and find_latest(run) is None


@pytest.mark.parametrize("case, expect", [
    ("i2v", "supported by the APT One-Step Sampler and the headless trainer"),
    ("latent", "not divisible by the patch size"),
    ("empty_folder", "no usable media"),
    ("disc_mismatch", "different model"),
])
def test_actionable_errors(comfy, dataset, case, expect):
    cond = {"class_type": "TestZeroConditioning", "inputs": {"batch": 1, "length": 16, "dim": 4096}}
    loader = lambda name: {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}}  # noqa: E731
    if case == "i2v":  # the sampler takes I2V (test_one_step_image_to_video_wan21_i2v); the training nodes refuse it
        graph = {"m": loader(I2V), "s": {"class_type": "APTSaveGenerator", "inputs": {"model": ["m", 0], "format": "full", "dtype": "fp32",
                                                                                      "filename": f"apt_test/{RUN}/i2v", "overwrite": False}}}
    elif case == "latent":
        graph = {"m": loader(TINY_WAN), "c": cond,
                 "l": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 72, "height": 64, "length": 5, "batch_size": 1}},
                 "s": {"class_type": "APTOneStepSampler", "inputs": {"model": ["m", 0], "positive": ["c", 0], "latent": ["l", 0], "seed": 0, "steps": 1, "t_mid": 0.5}},
                 "o": {"class_type": "SaveLatent", "inputs": {"samples": ["s", 0], "filename_prefix": f"apt_test/{RUN}/err"}}}
    elif case == "empty_folder":
        (comfy.input / "apt_empty").mkdir(exist_ok=True)
        graph = tiny(api_twin("apt_dataset_prepare"), RUN + "-empty", overrides={"4": {"folder": "apt_empty"}})
    else:
        graph = {"m": loader(TINY_WAN), "m3": loader(T2V_3), "d": {"class_type": "APTLoadDataset", "inputs": {"path": f"apt/datasets/{RUN}"}},
                 "D": {"class_type": "APTDiscriminator", "inputs": {"model": ["m3", 0], "mode": "frozen", "head_layers": "auto", "lora_rank": 2}},
                 "t": {"class_type": "APTTrain", "inputs": {**{k: v for k, v in api_twin("apt_train_single_gpu")["9"]["inputs"].items()
                                                               if not isinstance(v, list)},
                                                            "generator": ["m", 0], "discriminator": ["D", 0], "dataset": ["d", 0]}},
                 "p": {"class_type": "PreviewAny", "inputs": {"source": ["t", 3]}}}
    entry = comfy.wait(comfy.submit(graph), 300)
    assert entry["status"]["status_str"] == "error" and expect in error_of(entry), error_of(entry)


def test_export_cluster_config(comfy, dataset):
    from training.config import load_config

    entry = comfy.run(tiny(api_twin("apt_export_cluster_config"), RUN))
    path = Path(entry["outputs"]["6"]["text"][0].split("wrote ")[1].split(" (stage")[0])
    cfg = load_config(path)
    apt = api_twin("apt_export_cluster_config")["5"]["inputs"]
    assert cfg.run.stage == "apt" and cfg.apt.image.steps == 2 and cfg.apt.lr == 1e-3 != apt["lr"]
    assert cfg.data.micro_batch * cfg.data.grad_accum == 1 and cfg.apt.disc_mode == "lora"


def test_comfy_adapter_matches_apt_core_copy(comfy):
    """ComfyFlowModel (through ComfyUI's Wan, t * 1000, text padded to 512, block taps via patches_replace)
    gives the same velocity and features as the apt_core WanFlowModel built from the MODEL's weights."""
    entry = comfy.run({"m": {"class_type": "UNETLoader", "inputs": {"unet_name": TINY_WAN, "weight_dtype": "default"}},
                       "c": {"class_type": "APTTestAdapterCheck", "inputs": {"model": ["m", 0]}}})
    r = json.loads(texts(entry)[0])
    assert r["num_layers"] == 2 and r["feature_shapes"] == [[2, 48, 128], [2, 48, 128]]
    assert r["velocity_max_abs_diff"] <= 1e-4 * max(1.0, r["velocity_scale"]), r
    assert r["features_max_abs_diff"] <= 1e-4 * max(1.0, r["features_scale"]), r


@pytest.mark.parametrize("unet,channels", [(TINY_WAN, 16), (TI2V, 48)])
def test_one_step_sampling_per_family(comfy, unet, channels):
    # every family the nodes take: a tiny random stand-in through UNETLoader -> APT One-Step Sampler;
    # the Wan 2.2 TI2V-5B stand-in is a WAN22 MODEL with 48-channel latents (refused before the registry)
    x = one_step_latent(comfy, {"m": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}}},
                        f"family-{channels}")
    assert x.shape[:2] == (1, channels) and torch.isfinite(x).all() and x.abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# One runner (issue 17): a run folder of the APT Train node is the headless trainer's run dir
# ----------------------------------------------------------------------------------------------

NODE_WIDGETS = {"lr": 1e-3, "batch_size": 1, "grad_accum": 1, "r1_sigma": 0.01, "r1_lambda": 100.0, "d_timestep_shift": 1.0,
                "ema_decay": 0.9, "lora_rank": 4, "val_every": 1, "val_seed": 0, "seed": 7, "precision": "fp32",
                "gradient_checkpointing": False}
NODE_DISC = {"mode": "lora", "head_layers": "auto", "lora_rank": 2}


def train_graph(run_name: str, steps: int, resume: bool, save: str | None = None) -> dict:
    """APT Train on the tiny base model (its own discriminator), report previewed; optionally the output saved full."""
    g = {"m": {"class_type": "UNETLoader", "inputs": {"unet_name": TINY_WAN, "weight_dtype": "default"}},
         "d": {"class_type": "APTLoadDataset", "inputs": {"path": f"apt/datasets/{RUN}"}},
         "D": {"class_type": "APTDiscriminator", "inputs": {"model": ["m", 0], **NODE_DISC}},
         "t": {"class_type": "APTTrain", "inputs": {**NODE_WIDGETS, "generator": ["m", 0], "discriminator": ["D", 0], "dataset": ["d", 0],
                                                    "steps": steps, "run_name": run_name, "resume": resume}},
         "p": {"class_type": "PreviewAny", "inputs": {"source": ["t", 3]}}}
    if save:
        g["s"] = {"class_type": "APTSaveGenerator", "inputs": {"model": ["t", 0], "format": "full", "filename": save, "dtype": "fp32",
                                                               "overwrite": True}}
    return g


def clean_env() -> dict[str, str]:
    """This environment without a process group's variables (a fresh process, as on a cluster). Its thread count
    is the test server's (both inherit this environment): with another one, CPU reductions sum in another order
    and the node-vs-headless losses differ by ~1e-6 (seen: 3.8e-6 on a d_loss of 2.8e-3 with 1 thread vs 2)."""
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}


def headless(*args: str) -> None:
    """python -m training ARGS in this checkout's venv (a fresh process, as on a cluster)."""
    import sys

    env = clean_env() | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "training", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def losses(run: Path) -> dict[int, tuple[float, float]]:
    return {r["step"]: (r["d_loss"], r["g_loss"]) for r in metric_rows(run)}


def tiny_file() -> Path:
    return Path(COMFYUI_DIR) / "models" / "diffusion_models" / TINY_WAN


def test_node_run_continues_headless_and_matches_a_headless_run(comfy, dataset, tmp_path):
    """Issue 17 (a) and (c): a run the APT Train node started resumes with `python -m training --resume <run dir>`
    from the node's step; the same settings and seed give the same losses headless (weights from the model file)."""
    from training.config import load_config, save_config

    run = comfy.output / "apt" / "runs" / f"{RUN} a: v1"  # a run_name with a space and a colon
    report = "\n".join(texts(comfy.run(train_graph(run.name, 2, False))))
    node = losses(run)
    assert sorted(node) == [1, 2]
    # (c) the node's config, run headless from step 0 on the file the node's MODEL was loaded from
    fresh = tmp_path / "headless"
    cfg = load_config(run / "config.toml", [f"--run.dir={fresh}", "--model.source=files", f"--model.init_from={tiny_file()}",
                                            "--model.arch.dim=0", "--apt.image.steps=4"])
    headless("--config", str(save_config(cfg, tmp_path / "headless.toml")))
    other = losses(fresh)
    for step in (1, 2):
        torch.testing.assert_close(torch.tensor(node[step]), torch.tensor(other[step]), rtol=1e-4, atol=1e-6)
    # (a) continue the node's run headless: from its checkpoint, without the ComfyUI MODEL, with the command its
    # report printed, pasted into a shell as it is (ComfyUI's Python, from the pack's folder, to 2 x 2 steps)
    command = report.split(" with: ", 1)[1].rsplit("; last ", 1)[0]
    shell = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert shell.returncode == 0, (command, shell.stderr[-4000:])
    resumed = [e for e in lines(run) if e.get("event") == "resume"]
    assert resumed and resumed[-1]["checkpoint"] == str(run / "checkpoints" / "step-2")
    assert [r["step"] for r in metric_rows(run)] == [1, 2, 3, 4]
    for step in (3, 4):  # the continued run is the uninterrupted one
        torch.testing.assert_close(torch.tensor(losses(run)[step]), torch.tensor(other[step]), rtol=1e-4, atol=1e-6)
    # queued again with resume on and 4 steps, the node finds the run complete and outputs its export
    entry = comfy.run(train_graph(run.name, 4, True, save=f"apt_test/{RUN}/complete"))
    assert "APT: 4 steps" in "\n".join(texts(entry)) and "already complete" in "\n".join(texts(entry))
    saved = load_file(str(comfy.dir / "models" / "diffusion_models" / "apt_test" / RUN / "complete.safetensors"))
    # the run folder holds the LoRA only (export.merged = false); the documented recipe adds the merged model
    assert sorted(p.name for p in (run / "export").iterdir()) == ["apt_generator_lora.safetensors"]
    headless("--resume", str(run), "--export-only", "--export.merged=true")
    export = load_file(str(run / "export" / "apt_generator.safetensors"))
    assert saved.keys() == export.keys()
    for k in export:
        torch.testing.assert_close(saved[k].float(), export[k].float(), rtol=1e-5, atol=1e-5)
    # resume off on that folder: a clear error naming it, nothing deleted
    entry = comfy.wait(comfy.submit(train_graph(run.name, 5, False)), 300)
    assert entry["status"]["status_str"] == "error" and f"run folder {run} already holds checkpoints" in error_of(entry)
    assert (run / "checkpoints" / "step-4" / "COMPLETE").is_file()


def test_headless_run_continues_in_the_node(comfy, dataset, tmp_path):
    """Issue 17 (b): a headless run on the tiny model file resumes in the APT Train node (absolute run_name)."""
    from nodes.run_config import node_run_config
    from training.config import save_config

    run = tmp_path / "cluster_run"
    widgets = {**NODE_WIDGETS, "steps": 2}
    disc = {**NODE_DISC, "head_layers": []}
    cfg = node_run_config("apt", widgets, str(comfy.output / "apt" / "datasets" / RUN), str(run), disc,
                          {"init_from": str(tiny_file())}, device="cpu")
    cfg.checkpoint.every, cfg.checkpoint.keep = 1, 0  # a headless run that keeps every checkpoint
    headless("--config", str(save_config(cfg, tmp_path / "cluster.toml")))
    assert [r["step"] for r in metric_rows(run)] == [1, 2]
    entry = comfy.run(train_graph(str(run), 4, True))
    assert "APT: 4 steps" in "\n".join(texts(entry))
    resumed = [e for e in lines(run) if e.get("event") == "resume"]
    assert resumed and resumed[-1]["checkpoint"] == str(run / "checkpoints" / "step-2")
    assert [r["step"] for r in metric_rows(run)] == [1, 2, 3, 4]
    # the node kept the run's own checkpoint settings: none of its checkpoints deleted (the node's default keeps 2)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1", "step-2", "step-3", "step-4"]


def test_resume_refuses_a_run_of_another_model_or_dataset(comfy, dataset):
    """With resume on (the bundled workflows' default, with fixed run_names), a graph that now feeds another
    model or dataset must not silently get the old run's model ("already complete") or continue it: refused,
    naming the input; the same inputs still resume."""
    from bench.trainer_scaling import write_synthetic_shards

    name, run = f"{RUN}-inputs", comfy.output / "apt" / "runs" / f"{RUN}-inputs"
    comfy.run(train_graph(name, 1, True))
    other_model = train_graph(name, 1, True)
    other_model["h"] = {"class_type": "UNETLoader", "inputs": {"unet_name": A14B_HIGH, "weight_dtype": "default"}}  # same shapes
    other_model["t"]["inputs"]["generator"] = ["h", 0]
    entry = comfy.wait(comfy.submit(other_model), 300)
    assert entry["status"]["status_str"] == "error" and "started from another generator MODEL than this graph's" in error_of(entry)
    write_synthetic_shards(comfy.output / "apt" / "datasets" / f"{RUN}-other", num=2, latent_shape=(16, 2, 4, 4), text_len=16, text_dim=4096)
    other_data = train_graph(name, 1, True)
    other_data["d"]["inputs"]["path"] = f"apt/datasets/{RUN}-other"
    entry = comfy.wait(comfy.submit(other_data), 300)
    assert entry["status"]["status_str"] == "error" and f"another dataset ({comfy.output / 'apt' / 'datasets' / RUN} there" in error_of(entry)
    report = "\n".join(texts(comfy.run(train_graph(name, 2, True))))
    assert "APT: 2 steps" in report and [r["step"] for r in metric_rows(run)] == [1, 2]


def test_requeue_after_a_cache_reset_saves_without_an_error(comfy, dataset):
    """The bundled training workflows save with overwrite off. Queued again after ComfyUI forgot its cache (a
    restart), the finished run outputs the same weights: APT Save Generator leaves the identical file as it
    is instead of failing; weights of more steps are still refused."""
    name = f"{RUN}-requeue"
    graph = train_graph(name, 1, True, save=f"apt_test/{RUN}/requeue")
    graph["s"]["inputs"]["overwrite"] = False
    assert "saved full" in "\n".join(texts(comfy.run(graph)))
    path = comfy.dir / "models" / "diffusion_models" / "apt_test" / RUN / "requeue.safetensors"
    mtime = path.stat().st_mtime_ns
    # as a restart: every node runs again. ComfyUI's worker takes the flag when it wakes in its queue wait (a
    # flag set while it is still finishing the last prompt waits for the next one): let it get there first
    time.sleep(2.0)
    comfy.post("/free", {"free_memory": True})
    time.sleep(1.0)
    report = "\n".join(texts(comfy.run(graph)))
    assert "already complete" in report and f"{path} already holds this full" in report, report
    assert path.stat().st_mtime_ns == mtime
    graph["t"]["inputs"]["steps"] = 2
    entry = comfy.wait(comfy.submit(graph), 300)
    assert entry["status"]["status_str"] == "error" and f"{path} already exists; turn on 'overwrite'" in error_of(entry), error_of(entry)
    assert path.stat().st_mtime_ns == mtime


def test_one_step_sampling_wan22_a14b_experts(comfy):
    # each A14B expert is its own WAN21 t2v file: the high-noise one (G's and by default D's init) samples in one
    # step, and the low-noise one loads as a MODEL too; the two stand-ins have other random weights
    loader = lambda name: {"m": {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}}}  # noqa: E731
    high, low = one_step_latent(comfy, loader(A14B_HIGH), "a14b-high"), one_step_latent(comfy, loader(A14B_LOW), "a14b-low")
    for x in (high, low):
        assert x.shape == (1, 16, 2, 8, 8) and torch.isfinite(x).all() and x.abs().sum() > 0
    assert not torch.allclose(high, low, atol=1e-4), "both expert files gave the same model"


@pytest.mark.parametrize("unet", [A14B_HIGH, TI2V])
def test_training_nodes_run_on_the_a14b_high_noise_expert_and_the_ti2v(comfy, dataset, unet):
    # A14B, the README's wiring: the high-noise expert file as the generator and, by default, APT Discriminator's
    # model. TI2V-5B: 48-channel latents (shards as the dataset node writes them with the Wan 2.2 VAE; random
    # here: no Wan 2.2 VAE stand-in). APT Train runs 2 steps; its generator samples in one step and has changed
    from bench.trainer_scaling import write_synthetic_shards

    name, data = unet.removesuffix(".safetensors"), f"apt/datasets/{RUN}"
    if unet == TI2V:
        data = f"apt/datasets/{RUN}-ti2v"
        if not (comfy.output / data).exists():
            write_synthetic_shards(comfy.output / data, num=4, latent_shape=(48, 2, 4, 4), text_len=16, text_dim=4096)
    loader = {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}}
    graph = {
        "h": loader,
        "d": {"class_type": "APTLoadDataset", "inputs": {"path": data}},
        "D": {"class_type": "APTDiscriminator", "inputs": {"model": ["h", 0], "mode": "frozen", "head_layers": "auto", "lora_rank": 2}},
        "t": {"class_type": "APTTrain", "inputs": {**api_twin("apt_train_single_gpu")["9"]["inputs"], "generator": ["h", 0],
                                                   "discriminator": ["D", 0], "dataset": ["d", 0], "steps": 2, "lr": 1e-3, "ema_decay": 0.0,
                                                   "val_every": 0, "lora_rank": 4, "precision": "fp32", "run_name": f"{RUN}-{name}",
                                                   "resume": True}},  # (queued again below: the finished run's export)
        "p": {"class_type": "PreviewAny", "inputs": {"source": ["t", 3]}},
    }
    for k in ("val_conditioning", "val_latent"):
        graph["t"]["inputs"].pop(k)
    assert "APT: 2 steps" in "\n".join(texts(comfy.run(graph)))
    base = one_step_latent(comfy, {"m": loader}, f"{name}-base")
    trained = one_step_latent(comfy, {"m": graph["t"], **{k: graph[k] for k in ("h", "d", "D")}}, f"{name}-trained")
    assert trained.shape == base.shape and torch.isfinite(trained).all()
    assert not torch.allclose(trained, base, atol=1e-4), "training changed nothing"


def write_start_images(folder: Path) -> tuple[str, str]:
    """Two small real PNG start frames with different content (a gradient and its mirror with a square)."""
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, 64, dtype=np.float32)
    a = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (64, 1)), np.tile(ramp[:, None], (1, 64))], -1)
    b = a[::-1, ::-1].copy()
    b[16:48, 16:48] = (255, 32, 0)
    names = ("apt_i2v_start_a.png", "apt_i2v_start_b.png")
    for name, img in zip(names, (a, b)):
        Image.fromarray(img.astype(np.uint8)).save(folder / name)
    return names


def i2v_one_step_latent(comfy: Comfy, image: str | None, tag: str, clip_seed: int = 0, check: bool = False,
                        unet: str = I2V) -> tuple[torch.Tensor, dict]:
    """Tiny Wan 2.1 I2V stand-in -> WanImageToVideo (start image or none, tiny VAE, stand-in CLIP vision tokens) ->
    APT One-Step Sampler (check: through APTTestI2VCheck, which also computes it with apt_core); the saved latent
    and the check's report."""
    cond = {"class_type": "TestZeroConditioning", "inputs": {"batch": 1, "length": 16, "dim": 4096}}
    i2v = {"positive": ["c", 0], "negative": ["c", 0], "vae": ["v", 0], "width": 64, "height": 64, "length": 5, "batch_size": 1,
           "clip_vision_output": ["cv", 0]}
    g = {"m": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
         "v": {"class_type": "VAELoader", "inputs": {"vae_name": TINY_VAE}},
         "c": cond,
         "cv": {"class_type": "APTTestStandInClipVisionOutput", "inputs": {"seed": clip_seed}},
         "i": {"class_type": "WanImageToVideo", "inputs": i2v},
         "s": {"class_type": "APTTestI2VCheck" if check else "APTOneStepSampler",
               "inputs": {"model": ["m", 0], "positive": ["i", 0], "latent": ["i", 2], "seed": 5,
                          **({} if check else {"steps": 1, "t_mid": 0.5})}},
         "o": {"class_type": "SaveLatent", "inputs": {"samples": ["s", 0], "filename_prefix": f"apt_test/{RUN}/{tag}"}}}
    if image is not None:
        g["img"] = {"class_type": "LoadImage", "inputs": {"image": image}}
        i2v["start_image"] = ["img", 0]
    entry = comfy.run(g)
    f = entry["outputs"]["o"]["latents"][0]
    return load_file(str(comfy.output / f["subfolder"] / f["filename"]))["latent_tensor"], json.loads(texts(entry)[0]) if check else {}


def test_one_step_image_to_video_wan21_i2v(comfy):
    # issue 17: every node refused Wan 2.1 I2V; the sampler runs ComfyUI's own WAN21 I2V model, which takes the
    # first frame (VAE latent of [start image, grey frames] + mask) and CLIP image tokens from WanImageToVideo
    a_name, b_name = write_start_images(comfy.input)
    a, report = i2v_one_step_latent(comfy, a_name, "i2v-a", check=True)
    # what the sampler node computed = apt_core's I2V network (numerics checked against the public Wan code in
    # tests/apt_core/test_i2v.py) on the condition the family's image_condition builds from the same latent/tokens
    assert report["model_type"] == "i2v" and report["mask_first_frame_only"], report
    assert report["max_abs_diff"] <= 1e-4 * max(1.0, report["scale"]), report
    b, _ = i2v_one_step_latent(comfy, b_name, "i2v-b")
    a_other_clip, _ = i2v_one_step_latent(comfy, a_name, "i2v-a-clip1", clip_seed=1)
    no_image, _ = i2v_one_step_latent(comfy, None, "i2v-none")
    for x in (a, b, a_other_clip, no_image):
        assert x.shape == (1, 16, 2, 8, 8) and torch.isfinite(x).all() and x.abs().sum() > 0
    # same seed and prompt: another start image, no start image, or other CLIP image tokens give another video (the
    # runs are deterministic on CPU; the random VAE stand-in maps different images to close latents, hence the small
    # bound for a vs b: 4e-3 measured)
    assert (a - b).abs().max() > 1e-4, "the start image did not change the output"
    assert (a - no_image).abs().max() > 1e-2, "the first-frame condition did not change the output"
    assert (a - a_other_clip).abs().max() > 1e-2, "the CLIP image tokens did not change the output"


def test_headless_i2v_generator_file_loads_with_unetloader_and_samples(comfy):
    # what COMFYUI.md tells I2V users: the headless trainer's export (apt_core save_wan, Wan keys + config metadata)
    # goes into models/diffusion_models; UNETLoader detects it as WAN21 i2v and the sampler runs it like ComfyUI's own
    from apt_core.backbone import build_flow_model
    from apt_core.models.io import save_wan

    torch.manual_seed(4)
    gen = build_flow_model("tiny-comfy-i2v")
    with torch.no_grad():
        for p in gen.parameters():
            p.normal_(std=0.02)
    name = f"apt_test/{RUN}/apt_generator_i2v.safetensors"
    save_wan(gen, comfy.dir / "models" / "diffusion_models" / name)
    a_name, _ = write_start_images(comfy.input)
    x, report = i2v_one_step_latent(comfy, a_name, "i2v-export", check=True, unet=name)
    assert x.shape == (1, 16, 2, 8, 8) and torch.isfinite(x).all()
    assert report["model_type"] == "i2v" and report["max_abs_diff"] <= 1e-4 * max(1.0, report["scale"]), report
    want = sum(float(v.double().abs().sum()) for v in gen.state_dict().values())
    assert abs(report["weights_abs_sum"] - want) <= 1e-6 * want, (report["weights_abs_sum"], want)  # the file's weights, all of them


def test_i2v_workflow_runs_on_the_stand_ins(comfy):
    # the shipped apt_i2v_one_step (API twin) with the tiny I2V stand-in, tiny VAE, a real start image and the
    # text / CLIP vision stand-ins: it writes a video
    a_name, _ = write_start_images(comfy.input)
    entry = comfy.run(tiny(api_twin("apt_i2v_one_step"), RUN, unet=I2V, overrides={"5": {"image": a_name}}))
    files = [f for o in entry["outputs"].values() for f in o.get("images", [])]
    assert files and all((comfy.output / f["subfolder"] / f["filename"]).stat().st_size > 0 for f in files)
