"""The example workflows, described once in Python; writes the UI files and their API twins.

    .venv/bin/python -m tests.nodes.make_workflows          # rewrite workflows/*.json + workflows/api/*.json

UI files (workflows/*.json, format v0.4) are what ComfyUI lists as templates (its glob is
`<pack>/workflows/*.json`, so the twins in workflows/api/ are served but not listed). Widget values
are given by name and laid out positionally from the node schemas (core: tests/fixtures/object_info.json,
ours: generated from INPUT_TYPES), control_after_generate values included. tests/nodes/test_workflows.py
checks that the committed files are exactly what this script writes, and validates them independently.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.nodes.comfy_schema import ROOT, VIRTUAL_NODES, all_object_info, socket_inputs, widget_slots

OUT_UI = ROOT / "workflows"
OUT_API = ROOT / "workflows" / "api"
HF = "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files"
UMT5 = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
VAE = "wan_2.1_vae.safetensors"
BASE = "wan2.1_t2v_1.3B_fp16.safetensors"
APT_FULL = "apt/wan2.1_t2v_apt_1step"  # what the training workflow's full save writes (models/diffusion_models)
MODELS = {
    UMT5: {"name": UMT5, "url": f"{HF}/text_encoders/{UMT5}", "directory": "text_encoders"},
    VAE: {"name": VAE, "url": f"{HF}/vae/{VAE}", "directory": "vae"},
    BASE: {"name": BASE, "url": f"{HF}/diffusion_models/{BASE}", "directory": "diffusion_models"},
}
PROMPT = "A red fox trots through fresh snow in a sunlit pine forest, its breath steaming, cinematic, shallow depth of field."
NOTE_GENERATOR = ("**APT one-step generator.** `apt/wan2.1_t2v_apt_1step.safetensors` (models/diffusion_models) is written by "
                  "the *APT Save Generator (full)* node of `apt_train_single_gpu`. Or load the base Wan 2.1 1.3B model with "
                  "UNETLoader and the trained LoRA with LoraLoaderModelOnly. One step, no CFG, no negative prompt.")


@dataclass
class N:
    """A node: id, type, widget values by name, links {input: (source id, output slot)}."""

    id: int
    type: str
    widgets: dict[str, Any] = field(default_factory=dict)
    links: dict[str, tuple[int, int]] = field(default_factory=dict)
    title: str | None = None
    models: tuple[str, ...] = ()
    control: str = "fixed"  # control_after_generate value of seed widgets


def loader_nodes(first_id: int, unet: str | None = BASE) -> list[N]:
    """UNETLoader (if unet), CLIPLoader(type wan), VAELoader with their model entries."""
    out = []
    if unet is not None:
        out.append(N(first_id, "UNETLoader", {"unet_name": unet, "weight_dtype": "default"}, models=(unet,) if unet in MODELS else ()))
    out.append(N(first_id + 1, "CLIPLoader", {"clip_name": UMT5, "type": "wan", "device": "default"}, models=(UMT5,)))
    out.append(N(first_id + 2, "VAELoader", {"vae_name": VAE}, models=(VAE,)))
    return out


def workflows() -> dict[str, list[N]]:
    video = {"width": 832, "height": 480, "length": 33, "batch_size": 1}
    t2v = [
        *loader_nodes(1, f"{APT_FULL}.safetensors"),
        N(4, "CLIPTextEncode", {"text": PROMPT}, {"clip": (2, 0)}, title="Prompt"),
        N(5, "EmptyHunyuanLatentVideo", video),
        N(6, "APTOneStepSampler", {"seed": 42, "steps": 1, "t_mid": 0.5}, {"model": (1, 0), "positive": (4, 0), "latent": (5, 0)}),
        N(7, "VAEDecode", {}, {"samples": (6, 0), "vae": (3, 0)}),
        N(8, "CreateVideo", {"fps": 16.0}, {"images": (7, 0)}),
        N(9, "SaveVideo", {"filename_prefix": "video/apt_t2v_1step", "format": "auto", "codec": "auto"}, {"video": (8, 0)}),
        N(10, "MarkdownNote", {"text": NOTE_GENERATOR}),
    ]
    t2i = [
        *loader_nodes(1, f"{APT_FULL}.safetensors"),
        N(4, "CLIPTextEncode", {"text": "A lighthouse on a cliff at golden hour, waves breaking below, photograph."}, {"clip": (2, 0)}, title="Prompt"),
        N(5, "EmptyHunyuanLatentVideo", {**video, "length": 1}, title="Image size (length 1)"),
        N(6, "APTOneStepSampler", {"seed": 7, "steps": 1, "t_mid": 0.5}, {"model": (1, 0), "positive": (4, 0), "latent": (5, 0)}),
        N(7, "VAEDecode", {}, {"samples": (6, 0), "vae": (3, 0)}),
        N(8, "SaveImage", {"filename_prefix": "apt_t2i_1step"}, {"images": (7, 0)}),
        N(9, "MarkdownNote", {"text": NOTE_GENERATOR}),
    ]
    refine = [
        *loader_nodes(1, f"{APT_FULL}.safetensors"),
        N(4, "CLIPTextEncode", {"text": PROMPT}, {"clip": (2, 0)}, title="Prompt"),
        N(5, "EmptyHunyuanLatentVideo", video),
        N(6, "APTSamplerSelect"),
        N(7, "APTSigmas", {"steps": 2, "t_mid": 0.5}),
        N(8, "RandomNoise", {"noise_seed": 42}),
        N(9, "BasicGuider", {}, {"model": (1, 0), "conditioning": (4, 0)}),
        N(10, "SamplerCustomAdvanced", {}, {"noise": (8, 0), "guider": (9, 0), "sampler": (6, 0), "sigmas": (7, 0), "latent_image": (5, 0)}),
        N(11, "VAEDecode", {}, {"samples": (10, 0), "vae": (3, 0)}),
        N(12, "CreateVideo", {"fps": 16.0}, {"images": (11, 0)}),
        N(13, "SaveVideo", {"filename_prefix": "video/apt_t2v_2step", "format": "auto", "codec": "auto"}, {"video": (12, 0)}),
        N(14, "MarkdownNote", {"text": "**Two-step refine.** Step 1 generates x0 in one step; APT Sigmas [1, t_mid, 0] re-noises it to "
                                         "t_mid with fresh noise and the generator refines it once (more detail; more than 2 steps gives "
                                         "artifacts). Works with SamplerCustom / SamplerCustomAdvanced. " + NOTE_GENERATOR}),
    ]
    dataset_widgets = {"folder": "apt_media", "output_dir": "apt/datasets/my_dataset", "width": 832, "height": 480, "num_frames": 33,
                       "fps": 16.0, "caption_policy": "error", "shard_index": 0, "num_shards": 1, "mode": "append"}
    prepare = [
        *loader_nodes(1, None),
        N(4, "APTDatasetFromFolder", dataset_widgets, {"vae": (3, 0), "clip": (2, 0)}),
        N(5, "PreviewAny", {}, {"source": (4, 1)}, title="Report"),
        N(6, "MarkdownNote", {"text": "**Dataset preparation.** Put videos/images in `ComfyUI/input/apt_media` with captions in "
                                        "`manifest.jsonl` ({\"file\", \"caption\"} per line) or a `<file>.txt` each. Several ComfyUI "
                                        "instances can share one folder: give each its `shard_index` and the same `num_shards`. "
                                        "Unreadable files are skipped and listed in the report."}),
    ]
    cd_widgets = {"iterations": 500, "lr": 1e-5, "batch_size": 1, "grad_accum": 1, "cd_steps": 32, "grid_shift": 24.0, "cfg": 1.0,
                  "lora_rank": 32, "seed": 0, "precision": "bf16", "gradient_checkpointing": True, "run_name": "cd", "resume": True}
    apt_widgets = {"steps": 350, "lr": 5e-6, "batch_size": 1, "grad_accum": 1, "r1_sigma": 0.01, "r1_lambda": 100.0, "d_timestep_shift": 1.0,
                   "ema_decay": 0.995, "lora_rank": 16, "val_every": 50, "val_seed": 0, "seed": 0, "precision": "bf16",
                   "gradient_checkpointing": True, "run_name": "apt", "resume": True}
    disc_widgets = {"mode": "lora", "head_layers": "auto", "lora_rank": 16}
    train = [
        *loader_nodes(1, BASE),
        N(4, "APTDatasetFromFolder", dataset_widgets, {"vae": (3, 0), "clip": (2, 0)}),
        N(5, "APTConsistencyDistill", cd_widgets, {"teacher": (1, 0), "dataset": (4, 0)}),
        N(6, "APTDiscriminator", disc_widgets, {"model": (1, 0)}),
        N(7, "CLIPTextEncode", {"text": PROMPT}, {"clip": (2, 0)}, title="Validation prompt"),
        N(8, "EmptyHunyuanLatentVideo", video, title="Validation size"),
        N(9, "APTTrain", apt_widgets, {"generator": (5, 0), "discriminator": (6, 0), "dataset": (4, 0), "val_conditioning": (7, 0),
                                      "val_latent": (8, 0)}),
        N(10, "APTSaveGenerator", {"format": "lora", "filename": f"{APT_FULL}_lora", "dtype": "bf16", "overwrite": False}, {"model": (9, 0)},
          title="APT Save Generator (LoRA)"),
        N(11, "APTSaveGenerator", {"format": "full", "filename": APT_FULL, "dtype": "bf16", "overwrite": False}, {"model": (9, 0)},
          title="APT Save Generator (full)"),
        N(12, "PreviewImage", {}, {"images": (9, 1)}, title="APT metrics"),
        N(13, "PreviewImage", {}, {"images": (5, 1)}, title="CD loss"),
        N(14, "VAEDecode", {}, {"samples": (9, 2), "vae": (3, 0)}),
        N(15, "CreateVideo", {"fps": 16.0}, {"images": (14, 0)}),
        N(16, "SaveVideo", {"filename_prefix": "video/apt_train_preview", "format": "auto", "codec": "auto"}, {"video": (15, 0)}),
        N(17, "PreviewAny", {}, {"source": (9, 3)}, title="APT report"),
        N(18, "PreviewAny", {}, {"source": (4, 1)}, title="Dataset report"),
        N(19, "MarkdownNote", {"text": "**Single-GPU APT, end to end.** Dataset -> consistency distillation (LoRA) -> discriminator "
                                         "(LoRA backbone on the original model) -> adversarial post-training -> save (LoRA for "
                                         "LoraLoaderModelOnly, full for UNETLoader) -> preview. Stop ends training within one step; "
                                         "queue again with resume on to continue from output/apt/runs/<run_name>. Memory: see "
                                         "docs/COMFYUI.md (Wan 1.3B at 480p x 33 frames fits 24 GB with these settings, estimate)."}),
    ]
    export = [
        N(1, "UNETLoader", {"unet_name": BASE, "weight_dtype": "default"}, models=(BASE,)),
        N(2, "APTLoadDataset", {"path": "apt/datasets/my_dataset"}),
        N(3, "APTConsistencyDistill", cd_widgets, {"teacher": (1, 0), "dataset": (2, 0)}),
        N(4, "APTDiscriminator", disc_widgets, {"model": (1, 0)}),
        N(5, "APTTrain", {**apt_widgets, "batch_size": 8, "grad_accum": 8}, {"generator": (3, 0), "discriminator": (4, 0), "dataset": (2, 0)}),
        N(6, "APTExportTrainConfig", {"stage": "apt", "init_from": f"/data/models/{BASE}", "generator_init": "/data/runs/cd/export/generator.safetensors",
                                      "data_path": "/data/apt/datasets/my_dataset", "run_dir": "runs/apt", "filename": "apt/configs/apt_run",
                                      "overwrite": True}),
        N(7, "PreviewAny", {}, {"source": (6, 0)}, title="Config file"),
        N(8, "MarkdownNote", {"text": "**Export a cluster config.** The export node reads the settings of the APT nodes in this graph "
                                        "(they do not run: nothing consumes their outputs) and writes the headless trainer's TOML to "
                                        "output/apt/configs/. On the cluster: `python -m training --config apt_run.toml` (or "
                                        "`torchrun ... -m training`). Paths are the cluster's."}),
    ]
    return {
        "apt_t2v_one_step": t2v,
        "apt_t2i_one_step": t2i,
        "apt_t2v_two_step_refine": refine,
        "apt_dataset_prepare": prepare,
        "apt_train_single_gpu": train,
        "apt_export_cluster_config": export,
    }


# ----------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------


def _depths(nodes: list[N]) -> dict[int, int]:
    depth: dict[int, int] = {}

    def d(n: N) -> int:
        if n.id not in depth:
            by_id = {m.id: m for m in nodes}
            depth[n.id] = 1 + max((d(by_id[s]) for s, _ in n.links.values()), default=-1)
        return depth[n.id]

    for n in nodes:
        d(n)
    return depth


def workflow_id(name: str) -> str:
    """The workflow's graph id: a UUID (the frontend's schema requires one), the same on every generation."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"https://github.com/comfyui-apt/ComfyUI-APT/workflows/{name}.json"))


def build_ui(name: str, nodes: list[N], infos: dict[str, dict]) -> dict:
    """UI-format (v0.4) workflow of a node list."""
    depth = _depths(nodes)
    order = {n.id: i for i, n in enumerate(sorted(nodes, key=lambda n: (depth[n.id], n.id)))}
    links: list[list] = []
    out_links: dict[tuple[int, int], list[int]] = {}
    in_links: dict[tuple[int, str], int] = {}
    for n in sorted(nodes, key=lambda n: n.id):
        for inp, (src, slot) in n.links.items():
            kind = infos[[m for m in nodes if m.id == src][0].type]["output"][slot]
            lid = len(links) + 1
            dst_slot = list(socket_inputs(infos[n.type])).index(inp)
            links.append([lid, src, slot, n.id, dst_slot, kind])
            out_links.setdefault((src, slot), []).append(lid)
            in_links[(n.id, inp)] = lid
    rows: dict[int, int] = {}
    ui_nodes = []
    for n in sorted(nodes, key=lambda n: n.id):
        col = depth[n.id]
        row = rows.get(col, 0)
        rows[col] = row + 1
        node: dict[str, Any] = {"id": n.id, "type": n.type, "pos": [40 + 380 * col, 40 + 260 * row], "size": [340, 220],
                                "flags": {}, "order": order[n.id], "mode": 0}
        if n.title:
            node["title"] = n.title
        if n.type in VIRTUAL_NODES:
            node.update(inputs=[], outputs=[], properties={}, widgets_values=[n.widgets["text"]], color="#432", bgcolor="#653")
            ui_nodes.append(node)
            continue
        info = infos[n.type]
        node["inputs"] = [{"name": s, "type": tp, "link": in_links.get((n.id, s))} for s, (tp, _) in socket_inputs(info).items()]
        node["outputs"] = [{"name": oname, "type": tp, "slot_index": i, "links": out_links.get((n.id, i), [])}
                           for i, (oname, tp) in enumerate(zip(info["output_name"], info["output"]))]
        props: dict[str, Any] = {"Node name for S&R": n.type}
        if n.models:
            props["models"] = [MODELS[m] for m in n.models]
        node["properties"] = props
        values = []
        for wname, tp, opts in widget_slots(info):
            if wname is None:
                values.append("" if tp == "FILTER" else n.control)
            else:
                values.append(n.widgets[wname] if wname in n.widgets else opts.get("default"))
        unknown = set(n.widgets) - {s for s, *_ in widget_slots(info)}
        if unknown:
            raise ValueError(f"{name}: node {n.id} ({n.type}) has no widgets {sorted(unknown)}")
        node["widgets_values"] = values
        ui_nodes.append(node)
    return {"id": workflow_id(name), "revision": 0, "last_node_id": max(n.id for n in nodes), "last_link_id": len(links),
            "nodes": ui_nodes, "links": links, "groups": [], "config": {},
            "extra": {"ds": {"scale": 0.75, "offset": [0, 0]}, "frontendVersion": "1.27.10"}, "version": 0.4}


def build_api(nodes: list[N], infos: dict[str, dict]) -> dict:
    """API-format (prompt) twin of a node list."""
    out = {}
    for n in sorted(nodes, key=lambda n: n.id):
        if n.type in VIRTUAL_NODES:
            continue
        info = infos[n.type]
        inputs = {w: n.widgets.get(w, opts.get("default")) for w, _tp, opts in widget_slots(info) if w is not None}
        inputs.update({k: [str(s), slot] for k, (s, slot) in n.links.items()})
        out[str(n.id)] = {"inputs": inputs, "class_type": n.type, "_meta": {"title": n.title or info["display_name"]}}
    return out


def render(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def generated() -> dict[Path, str]:
    """File path -> text of every workflow file."""
    infos = all_object_info()
    files = {}
    for name, nodes in workflows().items():
        files[OUT_UI / f"{name}.json"] = render(build_ui(name, nodes, infos))
        files[OUT_API / f"{name}.json"] = render(build_api(nodes, infos))
    return files


def main() -> None:
    OUT_API.mkdir(parents=True, exist_ok=True)
    for path, text in generated().items():
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
