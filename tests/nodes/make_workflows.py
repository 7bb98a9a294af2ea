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
import math
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.nodes.comfy_schema import (
    ROOT,
    TITLE_HEIGHT,
    VIRTUAL_NODES,
    all_object_info,
    frontend_size,
    socket_inputs,
    text_width,
    widget_slots,
)

OUT_UI = ROOT / "workflows"
OUT_API = ROOT / "workflows" / "api"
HF = "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files"
UMT5 = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
VAE = "wan_2.1_vae.safetensors"
BASE = "wan2.1_t2v_1.3B_fp16.safetensors"
APT_FULL = "apt/wan2.1_t2v_apt_1step"  # what the training workflow's full save writes (models/diffusion_models)
APT_FROM_LORA = "apt/wan2.1_t2v_apt_from_lora_1step"  # apt_train_from_lora's full save
APT_I2V = "apt/wan2.1_i2v_480p_apt_1step.safetensors"  # an I2V generator exported by the headless trainer (models/diffusion_models)
CLIP_VISION = "clip_vision_h.safetensors"
FEW_STEP_LORA = "apt/wan2.1_t2v_1.3B_few_step_lora.safetensors"  # the user's distilled LoRA (models/loras), a placeholder name
MODELS = {
    UMT5: {"name": UMT5, "url": f"{HF}/text_encoders/{UMT5}", "directory": "text_encoders"},
    VAE: {"name": VAE, "url": f"{HF}/vae/{VAE}", "directory": "vae"},
    BASE: {"name": BASE, "url": f"{HF}/diffusion_models/{BASE}", "directory": "diffusion_models"},
    CLIP_VISION: {"name": CLIP_VISION, "url": f"{HF}/clip_vision/{CLIP_VISION}", "directory": "clip_vision"},
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


@dataclass
class G:
    """A group of nodes: title, columns of node ids (each top to bottom), the note placed beside it."""

    title: str
    columns: list[list[int]]
    note: int | None = None
    color: str = "#3f789e"


@dataclass
class W:
    """A workflow: its nodes and their groups (left to right)."""

    nodes: list[N]
    groups: list[G]


BLUE, GREEN, PURPLE, YELLOW = "#3f789e", "#8A8", "#a1309b", "#b58b2a"  # the frontend's group colours


def generation(sample: list[int], output: list[int], note: int) -> list[G]:
    """Groups of the generation workflows: models (with the note on the generator file) | prompt and size | sample | decode and save."""
    return [G("Models", [[1, 2, 3]], note, BLUE), G("Prompt and size", [[4, 5]], None, GREEN),
            G("Sample", [sample], None, PURPLE), G("Decode and save", [output], None, YELLOW)]


def workflows() -> dict[str, W]:
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
    i2v = [
        *loader_nodes(1, APT_I2V),
        N(4, "CLIPVisionLoader", {"clip_name": CLIP_VISION}, models=(CLIP_VISION,)),
        N(5, "LoadImage", {"image": "example.png"}, title="Start image (first frame)"),
        N(6, "CLIPVisionEncode", {"crop": "none"}, {"clip_vision": (4, 0), "image": (5, 0)}),
        N(7, "CLIPTextEncode", {"text": "The fox turns its head and trots away through the snow, cinematic."}, {"clip": (2, 0)},
          title="Prompt"),
        N(8, "WanImageToVideo", {**video}, {"positive": (7, 0), "negative": (7, 0), "vae": (3, 0), "clip_vision_output": (6, 0),
                                           "start_image": (5, 0)}, title="WanImageToVideo"),
        N(9, "APTOneStepSampler", {"seed": 42, "steps": 1, "t_mid": 0.5}, {"model": (1, 0), "positive": (8, 0), "latent": (8, 2)}),
        N(10, "VAEDecode", {}, {"samples": (9, 0), "vae": (3, 0)}),
        N(11, "CreateVideo", {"fps": 16.0}, {"images": (10, 0)}),
        N(12, "SaveVideo", {"filename_prefix": "video/apt_i2v_1step", "format": "auto", "codec": "auto"}, {"video": (11, 0)}),
        N(13, "MarkdownNote", {"text": "**APT one-step image-to-video (Wan 2.1 I2V 14B).** The generator file "
                                         f"`{APT_I2V}` (models/diffusion_models) is the headless trainer's export "
                                         "(`<run dir>/export/apt_generator.safetensors` of a `wan2.1-i2v-14b` run): the training nodes "
                                         "do not take I2V models yet. WanImageToVideo puts the start image's VAE latent and its CLIP "
                                         "vision tokens into the conditioning; the prompt goes to both of its inputs (one step uses no "
                                         "negative prompt). One step, no CFG."}),
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
    note_dataset = ("**Data.** Put videos/images in `ComfyUI/input/apt_media` with captions in `manifest.jsonl` "
                    "({\"file\", \"caption\"} per line) or a `<file>.txt` each. Unreadable files are skipped and listed in the "
                    "report. The shards are built once: queuing again reuses them until a source file or a dataset setting changes.")
    prepare = [
        *loader_nodes(1, None),
        N(4, "APTDatasetFromFolder", dataset_widgets, {"vae": (3, 0), "clip": (2, 0)}),
        N(5, "PreviewAny", {}, {"source": (4, 1)}, title="Report"),
        N(6, "MarkdownNote", {"text": note_dataset + " Several ComfyUI instances can share one folder: give each its `shard_index` "
                                                    "and the same `num_shards`."}),
    ]
    cd_widgets = {"iterations": 500, "lr": 1e-5, "batch_size": 1, "grad_accum": 1, "cd_steps": 32, "grid_shift": 24.0, "cfg": 1.0,
                  "lora_rank": 32, "seed": 0, "precision": "bf16", "gradient_checkpointing": True, "run_name": "cd", "resume": True}
    apt_widgets = {"steps": 350, "lr": 5e-6, "batch_size": 1, "grad_accum": 1, "r1_sigma": 0.01, "r1_lambda": 100.0, "d_timestep_shift": 1.0,
                   "ema_decay": 0.995, "lora_rank": 16, "val_every": 50, "val_seed": 0, "seed": 0, "precision": "bf16",
                   "gradient_checkpointing": True, "run_name": "apt", "resume": True}
    disc_widgets = {"mode": "lora", "head_layers": "auto", "lora_rank": 16}
    note_stage2 = ("**Stage 2: adversarial post-training.** The discriminator is built from the ORIGINAL model (LoRA backbone + "
                   "heads); APT Train alternates D and G steps with approximated R1 and outputs the EMA generator. Stop ends "
                   "training within one step; queue again with resume on to continue from output/apt/runs/<run_name>. "
                   "Memory: see docs/COMFYUI.md (Wan 1.3B at 480p x 33 frames fits 24 GB with these settings, estimate).")
    note_outputs = ("**Outputs.** The LoRA loads with LoraLoaderModelOnly on the base model, the full file with UNETLoader "
                    "(`apt_t2v_one_step`). Saves refuse to overwrite unless `overwrite` is on. The metrics plot and the decoded "
                    "validation video show how training went.")
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
        N(19, "MarkdownNote", {"text": "**Single-GPU APT, end to end:** data -> stage 1 -> stage 2 -> outputs. " + note_dataset}),
        N(20, "MarkdownNote", {"text": "**Stage 1: consistency distillation.** Distils the base model (teacher) into a blurry one-step "
                                         "generator (a LoRA) that stage 2 sharpens. Already hold a distilled few-step LoRA? Use "
                                         "`apt_train_from_lora` and skip this stage."}),
        N(21, "MarkdownNote", {"text": note_stage2}),
        N(22, "MarkdownNote", {"text": note_outputs}),
    ]
    from_lora = [
        *loader_nodes(1, BASE),
        N(4, "LoraLoaderModelOnly", {"lora_name": FEW_STEP_LORA, "strength_model": 1.0}, {"model": (1, 0)}, title="Distilled few-step LoRA"),
        N(5, "APTDatasetFromFolder", dataset_widgets, {"vae": (3, 0), "clip": (2, 0)}),
        N(6, "APTDiscriminator", disc_widgets, {"model": (1, 0)}),
        N(7, "CLIPTextEncode", {"text": PROMPT}, {"clip": (2, 0)}, title="Validation prompt"),
        N(8, "EmptyHunyuanLatentVideo", video, title="Validation size"),
        N(9, "APTTrain", {**apt_widgets, "run_name": "apt_from_lora"}, {"generator": (4, 0), "discriminator": (6, 0), "dataset": (5, 0),
                                                                       "val_conditioning": (7, 0), "val_latent": (8, 0)}),
        N(10, "APTSaveGenerator", {"format": "full", "filename": APT_FROM_LORA, "dtype": "bf16", "overwrite": False}, {"model": (9, 0)},
          title="APT Save Generator (full)"),
        N(11, "PreviewImage", {}, {"images": (9, 1)}, title="APT metrics"),
        N(12, "VAEDecode", {}, {"samples": (9, 2), "vae": (3, 0)}),
        N(13, "CreateVideo", {"fps": 16.0}, {"images": (12, 0)}),
        N(14, "SaveVideo", {"filename_prefix": "video/apt_from_lora_preview", "format": "auto", "codec": "auto"}, {"video": (13, 0)}),
        N(15, "PreviewAny", {}, {"source": (9, 3)}, title="APT report"),
        N(16, "PreviewAny", {}, {"source": (5, 1)}, title="Dataset report"),
        N(17, "MarkdownNote", {"text": "**APT from a distilled LoRA:** data -> your few-step LoRA (instead of stage 1) -> stage 2 -> "
                                         "outputs. " + note_dataset}),
        N(18, "MarkdownNote", {"text": "**Instead of stage 1: a distilled few-step LoRA.** Put a few-step (e.g. 4-step) distillation "
                                         "LoRA for Wan 2.1 T2V 1.3B in `models/loras` and pick it in `lora_name`; the LoRA-applied "
                                         "model is the generator APT starts from. The discriminator is still built from the "
                                         "ORIGINAL model (UNETLoader, without the LoRA)."}),
        N(19, "MarkdownNote", {"text": note_stage2.replace("output/apt/runs/<run_name>", "output/apt/runs/apt_from_lora")}),
        N(20, "MarkdownNote", {"text": "**Outputs.** The full save bakes your LoRA and APT's into one checkpoint for UNETLoader "
                                         "(`apt_t2v_one_step`): a LoRA file of APT's weights alone would not reproduce the generator "
                                         "without your LoRA, so the LoRA format is refused for this MODEL."}),
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
        "apt_t2v_one_step": W(t2v, generation([6], [7, 8, 9], 10)),
        "apt_t2i_one_step": W(t2i, generation([6], [7, 8], 9)),
        "apt_i2v_one_step": W(i2v, [G("Models", [[1, 2, 3, 4]], 13, BLUE), G("Start image and prompt", [[5], [6, 7]], None, GREEN),
                                    G("Sample", [[8, 9]], None, PURPLE), G("Decode and save", [[10, 11, 12]], None, YELLOW)]),
        "apt_t2v_two_step_refine": W(refine, [G("Models", [[1, 2, 3]], None, BLUE), G("Prompt and size", [[4, 5]], None, GREEN),
                                              G("Two-step sampling", [[6, 7, 8], [9, 10]], 14, PURPLE),
                                              G("Decode and save", [[11, 12, 13]], None, YELLOW)]),
        "apt_dataset_prepare": W(prepare, [G("Encoders", [[2, 3]], None, BLUE), G("Data", [[4], [5]], 6, GREEN)]),
        "apt_train_single_gpu": W(train, [G("Data", [[1, 2, 3], [4, 18]], 19, BLUE), G("Stage 1: consistency distillation", [[5, 13]], 20, GREEN),
                                          G("Stage 2: adversarial post-training", [[6, 7, 8], [9]], 21, PURPLE),
                                          G("Outputs", [[10, 11, 17], [12], [14, 15, 16]], 22, YELLOW)]),
        "apt_train_from_lora": W(from_lora, [G("Data", [[1, 2, 3], [5, 16]], 17, BLUE), G("Distilled LoRA (instead of stage 1)", [[4]], 18, GREEN),
                                             G("Stage 2: adversarial post-training", [[6, 7, 8], [9]], 19, PURPLE),
                                             G("Outputs", [[10, 15], [11], [12, 13, 14]], 20, YELLOW)]),
        "apt_export_cluster_config": W(export, [G("Model and data", [[1, 2]], None, BLUE),
                                                G("Training settings (not run)", [[3], [4, 5]], None, PURPLE),
                                                G("Export", [[6, 7]], 8, YELLOW)]),
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


# Layout (graph units): nodes in columns inside their group, groups left to right, each note above its group;
# nodes that show a preview after a run (it can make them taller) come last in their column
PAD, HEADER, GAP, GROUP_GAP, NOTE_GAP = 20, 50, 30, 80, 40
MIN_WIDTH = 320  # wide enough to read a model file name in a combo
MIN_SIZE = {"CLIPTextEncode": (400, 200), "PreviewImage": (360, 300), "PreviewAny": (360, 160), "SaveImage": (360, 320),
            "SaveVideo": (360, 460), "LoadImage": (320, 400)}  # room for the text / the image or video shown after a run (a square video: 460)


def note_height(text: str, width: float) -> float:
    """Room for a markdown note's text at `width` (~7.5 px per character, 22 px lines), generously."""
    per_line = max(1, int((width - 40) / 7.5))
    lines = sum(-(-max(1, len(par)) // per_line) for par in text.split("\n"))
    return 60 + 22 * lines


def layout(w: W, infos: dict[str, dict]) -> tuple[dict[int, tuple[list[float], list[float]]], list[dict]]:
    """{node id: (pos, size)} and the UI groups: sizes are at least what the frontend computes for the
    node (so it keeps them on load), columns as wide as their widest node, nothing overlapping."""
    by_id = {n.id: n for n in w.nodes}
    placed: dict[int, tuple[list[float], list[float]]] = {}
    groups = []
    x = 0
    for g in w.groups:
        cx, bottom = x + PAD, 0
        for col in g.columns:
            sizes = {}
            for i in col:
                n = by_id[i]
                info = infos[n.type]
                cw, ch = frontend_size(n.type, info, n.title or info["display_name"])
                mw, mh = MIN_SIZE.get(n.type, (MIN_WIDTH, 0))
                sizes[i] = (max(math.ceil(cw / 10) * 10, mw, MIN_WIDTH), max(math.ceil(ch / 10) * 10, mh))
            width = max(sz[0] for sz in sizes.values())
            y = HEADER + TITLE_HEIGHT
            for i in col:
                placed[i] = ([cx, y], [width, sizes[i][1]])
                y += sizes[i][1] + GAP + TITLE_HEIGHT
            bottom = max(bottom, y - GAP - TITLE_HEIGHT)
            cx += width + GAP
        gw = max(cx - GAP + PAD - x, math.ceil(text_width(g.title) * 24 / 14 / 10) * 10 + 2 * PAD)  # the title (24px) fits
        gh = bottom + PAD
        groups.append({"id": len(groups) + 1, "title": g.title, "bounding": [x, 0, gw, gh], "color": g.color, "font_size": 24,
                       "flags": {}})
        if g.note is not None:  # above the group: nodes that grow after a run (image/video previews) grow downwards
            nh = math.ceil(note_height(by_id[g.note].widgets["text"], gw) / 10) * 10
            placed[g.note] = ([x, -NOTE_GAP - nh], [gw, nh])
        x += gw + GROUP_GAP
    missing = sorted(set(by_id) - set(placed))
    if missing:
        raise ValueError(f"nodes {missing} are in no group")
    return placed, groups


def build_ui(name: str, w: W, infos: dict[str, dict]) -> dict:
    """UI-format (v0.4) workflow of a workflow description."""
    nodes = w.nodes
    placed, groups = layout(w, infos)
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
    ui_nodes = []
    for n in sorted(nodes, key=lambda n: n.id):
        pos, size = placed[n.id]
        node: dict[str, Any] = {"id": n.id, "type": n.type, "pos": pos, "size": size, "flags": {}, "order": order[n.id], "mode": 0}
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
    # no extra.ds: the frontend then fits the view to the whole graph
    return {"id": workflow_id(name), "revision": 0, "last_node_id": max(n.id for n in nodes), "last_link_id": len(links),
            "nodes": ui_nodes, "links": links, "groups": groups, "config": {}, "extra": {"frontendVersion": "1.27.10"}, "version": 0.4}


def build_api(w: W, infos: dict[str, dict]) -> dict:
    """API-format (prompt) twin of a workflow description."""
    out = {}
    for n in sorted(w.nodes, key=lambda n: n.id):
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
    for name, w in workflows().items():
        files[OUT_UI / f"{name}.json"] = render(build_ui(name, w, infos))
        files[OUT_API / f"{name}.json"] = render(build_api(w, infos))
    return files


def main() -> None:
    OUT_API.mkdir(parents=True, exist_ok=True)
    for path, text in generated().items():
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
