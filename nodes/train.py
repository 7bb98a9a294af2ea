"""Training nodes: consistency distillation (stage 1), the APT discriminator, adversarial post-training.

The nodes train with the headless trainer's runner (training.loop.train, through nodes.node_run):
their widgets become a run config (nodes.run_config), the graph's MODELs the runner's base weights.
Every node leaves its input MODEL untouched (also when stopped): the runner trains its own copies and
results come back as patched clones of the input. Memory-lean defaults: LoRA generator, frozen/LoRA
discriminator backbone, per-block activation checkpointing, bf16. A run's folder (output/apt/runs/
<run_name>/, or an absolute run_name) is the headless trainer's run dir: checkpoints/, config.toml,
metrics.jsonl, samples/, export/; it resumes in the node or with python -m training --resume <folder>.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .comfy_backbone import check_model, conditioning_context, model_signature, weights_fingerprint
from .dataset import DATASET_TYPE

CATEGORY = "APT/training"
DISC_TYPE = "APT_DISCRIMINATOR"
RUN_DIR = "apt/runs"

# control_after_generate False: the frontend would otherwise add a 'randomize' control to an INT named
# seed (its legacy rule), so the seed would change after each queue and resume would refuse the run.
_SEED = {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": False,
         "tooltip": "Seed of the data order and the training noise; fixed for the run (resume needs the same seed)."}
_PRECISION = (["bf16", "fp32"], {"default": "bf16", "tooltip": "bf16: bf16 frozen weights + bf16 autocast, fp32 trainable tensors (GPU). fp32: everything fp32 (CPU always uses fp32)."})
_CHECKPOINTING = ("BOOLEAN", {"default": True, "tooltip": "Recompute each transformer block in the backward pass: much less activation memory, ~30% slower."})
_RESUME = ("BOOLEAN", {"default": True, "tooltip": "Continue the run in the run_name folder from its newest checkpoint if there is one (a finished run outputs its model). Off: a folder holding checkpoints is an error, never overwritten."})


def parse_layers(text: str, num_layers: int) -> list[int] | None:
    """'auto' -> None (the paper's taps scaled to the depth), else comma-separated 0-based block indices."""
    text = text.strip().lower()
    if text in ("", "auto"):
        return None
    try:
        layers = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"head_layers {text!r}: write 'auto' or comma-separated block indices, e.g. '12,21,29'") from None
    bad = [i for i in layers if not 0 <= i < num_layers]
    if not layers or bad or len(set(layers)) != len(layers):
        raise ValueError(f"head_layers {layers}: need distinct block indices in 0..{num_layers - 1} (this model has {num_layers} blocks)")
    return layers


@dataclasses.dataclass
class DiscriminatorSpec:
    """An APT_DISCRIMINATOR: how to build D from the ORIGINAL diffusion MODEL (built inside APT Train)."""

    model: Any
    head_layers: list[int] | None
    mode: str
    lora_rank: int
    signature: dict

    def check_generator(self, generator: Any) -> None:
        """ValueError if the generator is not the architecture D was built from."""
        from apt_core.models.io import compare_shapes, describe_mismatch

        missing, extra, shapes = compare_shapes(self.signature, model_signature(generator))
        if missing or extra or shapes:
            found = describe_mismatch(missing, extra, shapes, ("tensor(s) only in D's model", "tensor(s) only in the generator"), ("G", "D"))
            raise ValueError(f"the discriminator was built from a different model than the generator: {found}. "
                             "Build APT Discriminator from the base Wan model the generator was distilled from.")


def result_model(model: Any, kind: str, weights: dict, info: dict) -> Any:
    """The trained weights as a patched clone of `model` (LoRA patches, or 'set' patches for full weights)."""
    from .comfy_backbone import with_lora, with_weights

    return with_lora(model, weights, info) if kind == "lora" else with_weights(model, weights, info)


def run_dir(run_name: str, runs_root: str | None = None) -> Path:
    """The run's state folder: `run_name` itself if absolute, else <runs_root>/<run_name>, checked to stay
    inside runs_root (default: ComfyUI's output/apt/runs)."""
    from .comfy_env import output_dir, resolve_path

    return resolve_path(run_name, runs_root if runs_root is not None else lambda: f"{output_dir()}/{RUN_DIR}", "run_name")


class APTConsistencyDistill:
    DESCRIPTION = ("Stage 1: consistency-distil the diffusion MODEL (teacher) into an initial one-step generator (a LoRA, or all weights). "
                   "Blurry by design: APT Train sharpens it.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "IMAGE", "STRING")
    RETURN_NAMES = ("generator", "loss_plot", "report")
    OUTPUT_TOOLTIPS = ("A patched clone of the teacher: the one-step CD student.", "Training curves.", "Where the state was saved; final metrics.")
    FUNCTION = "distill"

    @classmethod
    def INPUT_TYPES(cls):
        from apt_core.trainer import CDConfig

        return {"required": {
            "teacher": ("MODEL", {"tooltip": "The original Wan 2.1 T2V diffusion model (UNETLoader). It is not modified."}),
            "dataset": (DATASET_TYPE, {"tooltip": "Shards from APT Dataset From Folder / APT Load Dataset."}),
            "iterations": ("INT", {"default": 500, "min": 1, "max": 1000000, "tooltip": "Optimiser steps (AAPT: 5k at large batch)."}),
            "lr": ("FLOAT", {"default": 1e-5, "min": 1e-8, "max": 1e-2, "step": 1e-6, "round": False, "tooltip": "AdamW learning rate (AAPT: 1e-5, weight decay 0.01)."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 256, "tooltip": "Samples per step (one latent shape per batch)."}),
            "grad_accum": ("INT", {"default": 1, "min": 1, "max": 256, "tooltip": "Micro-batches per step: batch_size must be divisible by it; memory scales with batch_size / grad_accum."}),
            "cd_steps": ("INT", {"default": 32, "min": 1, "max": 1000, "tooltip": "Consistency grid size N (AAPT: 32)."}),
            "grid_shift": ("FLOAT", {"default": CDConfig.shift, "min": 0.1, "max": 100.0, "step": 0.1, "tooltip": "Grid shift s of t_n = shift(n/N, s) (AAPT: 24)."}),
            "cfg": ("FLOAT", {"default": 1.0, "min": 1.0, "max": 20.0, "step": 0.1, "tooltip": "Teacher CFG scale (APT: 7.5 with a negative prompt; 1 = off, one teacher pass)."}),
            "lora_rank": ("INT", {"default": 32, "min": 0, "max": 1024, "tooltip": "Train a LoRA of this rank (memory-lean); 0 = fine-tune all weights (needs far more memory)."}),
            "seed": ("INT", _SEED),
            "precision": _PRECISION,
            "gradient_checkpointing": _CHECKPOINTING,
            "run_name": ("STRING", {"default": "cd", "tooltip": "State folder (resume, checkpoints): a name under output/apt/runs/, or an absolute path."}),
            "resume": _RESUME,
        }, "optional": {
            "negative": ("CONDITIONING", {"tooltip": "Negative prompt for the teacher's CFG (needed when cfg > 1)."}),
        }}

    def distill(self, teacher, dataset, iterations, lr, batch_size, grad_accum, cd_steps, grid_shift, cfg, lora_rank, seed,
                precision, gradient_checkpointing, run_name, resume, negative=None):
        import torch

        from .comfy_backbone import ComfyFlowModel
        from .comfy_env import compute_setup, free_vram
        from .node_run import (
            check_inputs,
            check_start,
            export_weights,
            history,
            model_source,
            report,
            run,
            write_tensors,
        )
        from .plot import render_metrics
        from .run_config import node_run_config

        check_model(teacher)
        folder = run_dir(run_name)
        check_start(folder, resume)
        check_inputs(folder, {"teacher": weights_fingerprint(teacher), "dataset": str(Path(dataset.path).resolve())})
        if cfg != 1.0 and negative is None:
            raise ValueError(f"cfg={cfg} needs a negative CONDITIONING (connect one, or set cfg to 1)")
        widgets = dict(iterations=iterations, lr=lr, batch_size=batch_size, grad_accum=grad_accum, cd_steps=cd_steps,
                       grid_shift=grid_shift, cfg=cfg, lora_rank=lora_rank, seed=seed, precision=precision,
                       gradient_checkpointing=gradient_checkpointing)
        device = compute_setup(precision)[0]
        extra = {}
        if negative is not None:  # a run file: a headless resume (with cd.teacher_from) uses the same one
            extra["negative_embedding"] = write_tensors(folder / "negative.safetensors", {"context": conditioning_context(negative)[0]})
        config = node_run_config("cd", widgets, dataset.path, str(folder), model={"source": "caller"}, cd_extra=extra,
                                 device=device.type)
        free_vram()
        models = model_source(teacher, teacher=ComfyFlowModel(teacher).load(), dtype=torch.float32)
        _, complete = run(config, models, "APT Consistency Distill")
        kind, weights, info = export_weights(folder, "cd", lora_rank)
        step = int(info.get("step", iterations))
        out = result_model(teacher, kind, weights, {"stage": "cd", "cd_steps": step})
        curves = history(folder)
        text = report("CD", step, folder, curves, " (already complete: its export)" if complete else "", stage="cd")
        return (out, render_metrics(curves, "consistency distillation", [["loss"], ["grad_norm"]]), text)


class APTDiscriminatorNode:
    DESCRIPTION = ("The APT discriminator: a copy of the ORIGINAL diffusion model with cross-attention heads on the hidden states of "
                   "a few blocks; or (mode sfv) SF-V's: the model's first half, frozen, with spatial and temporal heads on noised "
                   "inputs. Built when APT Train runs.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (DISC_TYPE,)
    RETURN_NAMES = ("discriminator",)
    OUTPUT_TOOLTIPS = ("For APT Train.",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The ORIGINAL Wan 2.1 diffusion model (not the distilled one), as in the paper."}),
            "mode": (["lora", "frozen", "full", "sfv"], {"default": "lora", "tooltip": "Backbone training: lora = LoRA adapters (memory-lean), frozen = heads only (leanest), full = all weights (paper; needs a large GPU). sfv = the SF-V discriminator: only the model's first half, frozen, with spatial + temporal heads on noised inputs (log-normal noise level, mean -1, std 1), trained with the hinge loss; no backbone gradients or optimiser state, and half the blocks."}),
            "head_layers": ("STRING", {"default": "auto", "tooltip": "0-based blocks the heads tap: 'auto' = the paper's 16/26/36 of 36 scaled to the depth, or e.g. '12,21,29'. Mode sfv: blocks of the first half; 'auto' = 4 evenly spaced ones."}),
            "lora_rank": ("INT", {"default": 16, "min": 1, "max": 1024, "tooltip": "Rank of the backbone LoRA (mode lora only)."}),
        }}

    def make(self, model, mode, head_layers, lora_rank):
        check_model(model)
        layers = parse_layers(head_layers, len(model.model.diffusion_model.blocks))
        return (DiscriminatorSpec(model, layers, mode, lora_rank, model_signature(model)),)


class APTTrain:
    DESCRIPTION = ("Stage 2, adversarial post-training: the generator (from APT Consistency Distill) against the discriminator. "
                   "Outputs the EMA generator. Stop ends it within one step; the state is saved and resumes.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "IMAGE", "LATENT", "STRING")
    RETURN_NAMES = ("generator", "metrics_plot", "preview", "report")
    OUTPUT_TOOLTIPS = ("EMA generator: a patched clone of the input generator.", "GAN losses, logits, R1, validation statistics.",
                       "Last validation samples (fixed prompts and seeds); decode with VAEDecode.", "State folder and final metrics.")
    FUNCTION = "train"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "generator": ("MODEL", {"tooltip": "The one-step generator to post-train (APT Consistency Distill output). It is not modified."}),
            "discriminator": (DISC_TYPE, {"tooltip": "From APT Discriminator (built from the original model)."}),
            "dataset": (DATASET_TYPE, {"tooltip": "Real samples: shards from APT Dataset From Folder / APT Load Dataset."}),
            "steps": ("INT", {"default": 350, "min": 1, "max": 1000000, "tooltip": "Generator updates (D and G alternate 1:1). Paper: ~350 (images), 300 (video) at huge batch; quality can degrade later: watch the previews."}),
            "lr": ("FLOAT", {"default": 5e-6, "min": 1e-8, "max": 1e-2, "step": 1e-7, "round": False, "tooltip": "G and D learning rate, RMSProp alpha 0.9 (paper: 5e-6 images, 3e-6 video)."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 256, "tooltip": "Samples per step; the paper needs large batches against mode collapse, small GPUs use grad_accum."}),
            "grad_accum": ("INT", {"default": 1, "min": 1, "max": 256, "tooltip": "Micro-batches per step: batch_size must be divisible by it."}),
            "r1_sigma": ("FLOAT", {"default": 0.01, "min": 1e-4, "max": 1.0, "step": 0.001, "round": False, "tooltip": "Approximated-R1 perturbation std (paper: 0.01 images, 0.1 video)."}),
            "r1_lambda": ("FLOAT", {"default": 100.0, "min": 0.0, "max": 10000.0, "step": 1.0, "tooltip": "Approximated-R1 weight (paper: 100). 0 disables it (D wins, G collapses)."}),
            "d_timestep_shift": ("FLOAT", {"default": 1.0, "min": 0.1, "max": 100.0, "step": 0.1, "tooltip": "D timestep ensemble t ~ shift(U(0,1), s): 1 images, 12 video."}),
            "ema_decay": ("FLOAT", {"default": 0.995, "min": 0.0, "max": 0.99999, "step": 0.001, "round": False, "tooltip": "EMA of the generator (the EMA is the output; paper: 0.995)."}),
            "lora_rank": ("INT", {"default": 16, "min": 0, "max": 1024, "tooltip": "Generator LoRA rank (memory-lean); 0 = fine-tune all weights."}),
            "val_every": ("INT", {"default": 50, "min": 0, "max": 100000, "tooltip": "Validation samples every N steps (saved under the run folder) and at the end; 0 = only at the end."}),
            "val_seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "Noise seed of the first validation sample (then +1, +2, ...), fixed for the run."}),
            "seed": ("INT", _SEED),
            "precision": _PRECISION,
            "gradient_checkpointing": _CHECKPOINTING,
            "run_name": ("STRING", {"default": "apt", "tooltip": "State folder (resume, validation samples): a name under output/apt/runs/, or an absolute path."}),
            "resume": _RESUME,
        }, "optional": {
            "val_conditioning": ("CONDITIONING", {"tooltip": "Validation prompt(s); default: the first two dataset captions."}),
            "val_latent": ("LATENT", {"tooltip": "Validation size/length (e.g. EmptyHunyuanLatentVideo); default: the first dataset sample's."}),
        }}

    def train(self, generator, discriminator, dataset, steps, lr, batch_size, grad_accum, r1_sigma, r1_lambda, d_timestep_shift, ema_decay,
              lora_rank, val_every, val_seed, seed, precision, gradient_checkpointing, run_name, resume, val_conditioning=None, val_latent=None):
        import torch

        from .comfy_backbone import check_latent, to_latent_space
        from .comfy_env import compute_setup, free_vram
        from .node_run import (
            check_inputs,
            check_start,
            export_weights,
            history,
            model_source,
            report,
            run,
            validation_latents,
            write_tensors,
        )
        from .plot import render_metrics
        from .run_config import node_run_config, val_seeds

        check_model(generator)
        discriminator.check_generator(generator)
        folder = run_dir(run_name)
        check_start(folder, resume)
        check_inputs(folder, {"generator": weights_fingerprint(generator), "discriminator": weights_fingerprint(discriminator.model),
                              "dataset": str(Path(dataset.path).resolve())})
        widgets = dict(steps=steps, lr=lr, batch_size=batch_size, grad_accum=grad_accum, r1_sigma=r1_sigma, r1_lambda=r1_lambda,
                       d_timestep_shift=d_timestep_shift, ema_decay=ema_decay, lora_rank=lora_rank, val_every=val_every,
                       val_seed=val_seed, seed=seed, precision=precision, gradient_checkpointing=gradient_checkpointing)
        disc = {"mode": discriminator.mode, "head_layers": discriminator.head_layers or [], "lora_rank": discriminator.lora_rank}
        device = compute_setup(precision)[0]
        monitor: dict = {}
        if val_conditioning is not None:  # fixed prompts as a run file: a headless resume validates the same
            monitor["val_prompts"] = write_tensors(folder / "val_prompts.safetensors", {"context": conditioning_context(val_conditioning)})
        if val_latent is not None:  # its size and length; its batch = the number of seeds per prompt
            x = check_latent(generator, val_latent["samples"])
            monitor |= {"val_shape": list(x.shape[1:]), "val_seeds": val_seeds(val_seed, x.shape[0])}
        config = node_run_config("apt", widgets, dataset.path, str(folder), disc, {"source": "caller"}, monitor_extra=monitor,
                                 device=device.type)
        free_vram()
        models = model_source(generator, discriminator.model, dtype=torch.float32)
        result, complete = run(config, models, "APT Train")
        kind, weights, info = export_weights(folder, "apt", lora_rank)
        step = int(info.get("step", steps))
        out = result_model(generator, kind, weights, {"stage": "apt", "apt_steps": step})
        latents = validation_latents(folder, result, up_to=step)
        if latents is None:  # (a finished run whose samples/ was removed)
            latents = torch.zeros(1, generator.get_model_object("latent_format").latent_channels, 1, 8, 8)
        preview = {"samples": to_latent_space(generator, latents)}
        curves = history(folder)
        plot = render_metrics(curves, "APT", [["d_loss", "g_loss"], ["logits_real", "logits_fake"], ["ar1"], ["val_std", "val_diversity"]])
        text = report("APT", step, folder, curves, " (already complete: its export)" if complete else "")
        return (out, plot, preview, text)


NODE_CLASS_MAPPINGS = {"APTConsistencyDistill": APTConsistencyDistill, "APTDiscriminator": APTDiscriminatorNode, "APTTrain": APTTrain}
NODE_DISPLAY_NAME_MAPPINGS = {
    "APTConsistencyDistill": "APT Consistency Distill",
    "APTDiscriminator": "APT Discriminator",
    "APTTrain": "APT Train (adversarial post-training)",
}
