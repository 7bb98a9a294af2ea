"""Save an APT generator for the core loaders, and export the graph's settings as a headless run config.

APTSaveGenerator writes either a full checkpoint in Wan keys into models/diffusion_models (loads with
'Load Diffusion Model' / UNETLoader) or the trained LoRA in ComfyUI-native keys into models/loras
(loads with LoraLoaderModelOnly on the base model, every key used). It never overwrites a file
unless `overwrite` is on (a file that already holds exactly these weights is left as it is: a
re-queued training graph saves again without an error). APTExportTrainConfig reads the APT nodes of the queued graph (hidden input
PROMPT) and writes the headless trainer's TOML (training/config.py), so a run designed on one GPU
continues on a cluster with `python -m training --config FILE`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .comfy_backbone import apt_weights, check_model, combine_loras

if TYPE_CHECKING:
    from pathlib import Path

CATEGORY = "APT/io"
DTYPES = ("bf16", "fp16", "fp32")


def lora_for_saving(model: Any) -> dict:
    """The LoRA(s) APT trained into this MODEL as one ComfyUI-native LoRA, or a ValueError saying why not."""
    w = apt_weights(model)
    if w is None or (not w.loras and not w.full):
        raise ValueError("this MODEL carries no APT-trained weights (connect APT Consistency Distill / APT Train output); "
                         "to copy a model file as is, use format=full")
    if w.full:
        raise ValueError("this generator's weights were fine-tuned in full (lora_rank 0), so there is no LoRA; save it with format=full")
    total = sum(len(v) for v in model.patches.values())
    if total != w.patch_count:
        raise ValueError(f"this MODEL carries {total - w.patch_count} weight patches that APT did not create (a LoRA applied "
                         "with LoraLoaderModelOnly before or after training); a LoRA file of APT's weights alone would not "
                         "reproduce it. Save with format=full (all baked into one checkpoint), or save before adding a LoRA after APT.")
    return combine_loras(w.loras)


def target_path(kind: str, filename: str) -> Path:
    """models/<loras|diffusion_models>/<filename>.safetensors, checked to stay inside that folder."""
    from .comfy_env import model_folder, resolve_path

    name = filename.strip()
    if not name.endswith(".safetensors"):
        name += ".safetensors"
    folder = model_folder("loras" if kind == "lora" else "diffusion_models")
    return resolve_path(name, str(folder), "filename")


class APTSaveGenerator:
    DESCRIPTION = ("Save the generator: format=full writes the whole network in Wan keys to models/diffusion_models (UNETLoader); "
                   "format=lora writes the trained LoRA to models/loras (LoraLoaderModelOnly on the base Wan model).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_TOOLTIPS = ("The file written.",)
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The generator (APT Train / APT Consistency Distill output)."}),
            "format": (["lora", "full"], {"default": "lora", "tooltip": "lora: small file, apply to the base model with LoraLoaderModelOnly. full: standalone checkpoint for UNETLoader."}),
            "filename": ("STRING", {"default": "apt/wan2.1_t2v_apt_1step", "tooltip": "Name inside models/loras or models/diffusion_models (subfolders allowed); .safetensors is added."}),
            "dtype": (list(DTYPES), {"default": "bf16", "tooltip": "Tensor dtype of the file."}),
            "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace an existing file of that name (off: refuse)."}),
        }}

    def save(self, model, format, filename, dtype, overwrite):
        import torch

        from apt_core.fileio import refuse_overwrite
        from apt_core.models.io import save_state_dict_file

        from .comfy_backbone import effective_state_dict

        check_model(model)
        dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
        path = target_path(format, filename)
        info = apt_weights(model).info if apt_weights(model) else {}
        meta = {"apt.format": format, **{f"apt.{k}": str(v) for k, v in info.items()}}
        if not overwrite and (not path.exists() or not same_metadata(path, meta)):
            refuse_overwrite(path, overwrite, "turn on 'overwrite'")  # before the (slow) weight export
        if format == "lora":
            sd = {k: v.to(dt) if k.endswith(".weight") else v.float() for k, v in lora_for_saving(model).items()}
        else:
            sd = effective_state_dict(model, dt)
        if not overwrite and path.exists():  # the same run's weights (a re-queued graph after a restart): done already
            if not same_tensors(path, sd):
                refuse_overwrite(path, overwrite, "turn on 'overwrite'")
            text = f"{path} already holds this {format} ({len(sd)} tensors, {dtype}): left as it is"
            return {"ui": {"text": [text]}, "result": (str(path),)}
        save_state_dict_file(sd, path, metadata=meta, overwrite=overwrite)
        text = f"saved {format} ({len(sd)} tensors, {dtype}) to {path}"
        return {"ui": {"text": [text]}, "result": (str(path),)}


def same_metadata(path: Path, meta: dict[str, str]) -> bool:
    """Whether the safetensors file at `path` carries exactly these apt.* metadata (format, stage, steps)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            found = f.metadata() or {}
    except Exception:  # not a safetensors file: another file, never replaced without 'overwrite'
        return False
    return {k: v for k, v in found.items() if k.startswith("apt.")} == meta


def same_tensors(path: Path, sd: dict) -> bool:
    """Whether the file at `path` holds exactly these tensors (names, dtypes, values)."""
    import torch
    from safetensors.torch import load_file

    old = load_file(str(path))
    return old.keys() == sd.keys() and all(old[k].dtype == v.dtype and torch.equal(old[k], v.cpu()) for k, v in sd.items())


# ----------------------------------------------------------------------------------------------
# Export of the graph's settings as a headless run config
# ----------------------------------------------------------------------------------------------


def _widgets(prompt: dict, class_type: str) -> dict | None:
    """Literal inputs of the first node of `class_type` in an API-format prompt (links dropped)."""
    ids = sorted((k for k, v in prompt.items() if v.get("class_type") == class_type), key=lambda k: (len(k), k))
    if not ids:
        return None
    return {k: v for k, v in prompt[ids[0]]["inputs"].items() if not isinstance(v, list)}


def run_config_from_prompt(prompt: dict, stage: str, init_from: str, data_path: str, run_dir: str, generator_init: str = "") -> Any:
    """A checked training.config.RunConfig from the APT nodes of an API-format graph.

    Values not in the graph keep the nodes' defaults; paths are the cluster's (given here). The same
    mapping as the nodes' own runs (nodes.run_config): batch_size / grad_accum become
    data.micro_batch = batch_size / grad_accum and data.grad_accum (the same global batch on one GPU;
    it grows with the cluster's world size).
    """
    from .run_config import checked, widget_config, widget_defaults
    from .train import APTConsistencyDistill, APTDiscriminatorNode, APTTrain, parse_layers

    cd = {**widget_defaults(APTConsistencyDistill), **(_widgets(prompt, "APTConsistencyDistill") or {})}
    apt = {**widget_defaults(APTTrain), **(_widgets(prompt, "APTTrain") or {})}
    disc = {**widget_defaults(APTDiscriminatorNode), **(_widgets(prompt, "APTDiscriminator") or {})}
    disc["head_layers"] = parse_layers(disc["head_layers"], 10**6) or []
    media = _widgets(prompt, "APTDatasetFromFolder") or {}
    data = widget_config(stage, cd, apt, disc, data_path, run_dir, {"init_from": init_from}, {"generator_init": generator_init})
    if media.get("fps"):
        data["monitor"]["val_fps"] = int(round(float(media["fps"])))
    return checked(data)


class APTExportTrainConfig:
    DESCRIPTION = ("Write the headless trainer's TOML config from this graph's APT nodes (dataset, CD, discriminator, APT Train "
                   "settings), to continue on a cluster: python -m training --config FILE. Training nodes without a connected "
                   "output are not run.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_TOOLTIPS = ("The TOML file written.",)
    FUNCTION = "export"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "stage": (["apt", "cd"], {"default": "apt", "tooltip": "Which stage the config runs: cd (consistency distillation) or apt (adversarial post-training)."}),
            "init_from": ("STRING", {"default": "/data/models/wan2.1_t2v_1.3B_fp16.safetensors", "tooltip": "Path of the ORIGINAL Wan 2.1 weights on the cluster."}),
            "generator_init": ("STRING", {"default": "", "tooltip": "Stage apt: the CD export on the cluster ('' = start G from init_from)."}),
            "data_path": ("STRING", {"default": "/data/apt/datasets/my_dataset", "tooltip": "Shard directory on the cluster (copy the dataset's output folder there)."}),
            "run_dir": ("STRING", {"default": "runs/apt", "tooltip": "Run directory on the cluster (checkpoints, metrics, samples, export)."}),
            "filename": ("STRING", {"default": "apt/configs/apt_run", "tooltip": "Output file under ComfyUI's output/ folder; .toml is added."}),
            "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace an existing file of that name."}),
        }, "hidden": {"prompt": "PROMPT"}}

    def export(self, stage, init_from, generator_init, data_path, run_dir, filename, overwrite, prompt=None):
        from apt_core.fileio import refuse_overwrite
        from training.config import save_config

        from .comfy_env import output_dir, resolve_path

        cfg = run_config_from_prompt(prompt or {}, stage, init_from, data_path, run_dir, generator_init)
        name = filename.strip() if filename.strip().endswith(".toml") else filename.strip() + ".toml"
        path = resolve_path(name, output_dir(), "filename")
        refuse_overwrite(path, overwrite, "turn on 'overwrite'")
        save_config(cfg, path)
        text = f"wrote {path} (stage {stage}); run: python -m training --config {path.name}"
        return {"ui": {"text": [text]}, "result": (str(path),)}


NODE_CLASS_MAPPINGS = {"APTSaveGenerator": APTSaveGenerator, "APTExportTrainConfig": APTExportTrainConfig}
NODE_DISPLAY_NAME_MAPPINGS = {"APTSaveGenerator": "APT Save Generator", "APTExportTrainConfig": "APT Export Train Config (TOML)"}
