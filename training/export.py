"""Model-only exports: the (EMA) generator as one safetensors file in original Wan keys, plus the
LoRA adapters in ComfyUI-native keys when LoRA was trained.

`<name>.safetensors` loads in ComfyUI's UNETLoader ("Load Diffusion Model") and in
`apt_core.models.io.load_wan`; `<name>_lora.safetensors` loads in LoraLoaderModelOnly on top of the
base model. Gathering the full weights is collective (every rank calls `export_generator`); only
rank 0 builds CPU tensors and writes files.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from apt_core.backbone import WanFlowModel
from apt_core.fileio import refuse_overwrite
from apt_core.lora import base_state_dict, clean_path, inject_lora, lora_state_dict, merge_lora
from apt_core.models.io import load_into, save_state_dict_file
from apt_core.models.wan import WanConfig
from training.distributed import World, broadcast_object
from training.parallelize import reshard

EXPORT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on rank 0's CPU (empty elsewhere), keys without wrapper prefixes. Collective.

    Tensors never alias the live parameters (on 1 rank / CPU, `full_tensor()` and `.cpu()` return the
    parameter storage itself, which e.g. `EMA.swap_into` restores afterwards): aliasing ones are cloned.
    """
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = get_model_state_dict(model, options=opts)
    live = set()
    for t in [*model.parameters(), *model.buffers()]:
        local = t.to_local() if hasattr(t, "to_local") else t
        live.add(local.untyped_storage().data_ptr())
    return {clean_path(k): v.clone() if v.untyped_storage().data_ptr() in live else v for k, v in sd.items()}


def export_generator(
    model: nn.Module,
    out_dir: str | os.PathLike,
    name: str,
    world: World,
    wan_config: WanConfig,
    ema: Any = None,
    lora_rank: int = 0,
    lora_alpha: float | None = None,
    dtype: str = "bf16",
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
    merged: bool = True,
) -> dict[str, Path]:
    """Write `<out_dir>/<name>.safetensors` (Wan keys, LoRA merged; with a LoRA only if `merged`) and
    `<name>_lora.safetensors` (ComfyUI LoRA keys, if `lora_rank`); EMA weights when `ema` is given.
    Returns the paths (rank 0).
    An existing file is refused (FileExistsError, before the weights are gathered) unless `overwrite`."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export.dtype={dtype!r}; choose one of {sorted(EXPORT_DTYPES)}")
    error = None
    if world.is_main:  # rank 0 writes the files; every rank must stop before the collective gather
        try:
            for path in export_files(out_dir, name, lora_rank, merged):
                refuse_overwrite(path, overwrite, "pass --overwrite (export.overwrite = true)")
        except FileExistsError as e:
            error = str(e)
    error = broadcast_object(error)
    if error is not None:
        raise FileExistsError(error)
    reshard(model)  # after an inference forward FSDP2 may still expose unsharded parameters
    swap = ema.swap_into(model) if ema is not None else contextlib.nullcontext()
    with swap:
        sd = full_state_dict(model)
    if not world.is_main:
        return {}
    out_dir = Path(out_dir)
    meta = {"apt.export": json.dumps({"ema": ema is not None, **(metadata or {})}, sort_keys=True)}
    paths: dict[str, Path] = {}
    if lora_rank:
        cpu = _cpu_model(wan_config)
        inject_lora(cpu, lora_rank, lora_alpha)
        load_into(cpu, sd)
        lora = {k: v.float() if k.endswith(".alpha") else v.to(EXPORT_DTYPES[dtype]) for k, v in lora_state_dict(cpu).items()}
        paths["lora"] = save_state_dict_file(lora, out_dir / f"{name}_lora.safetensors", metadata=meta, overwrite=overwrite)
        if not merged:
            return paths
        merge_lora(cpu)
        sd = base_state_dict(cpu)
    cast = {k: v.to(EXPORT_DTYPES[dtype]) if v.is_floating_point() else v for k, v in sd.items()}
    paths["model"] = save_state_dict_file(
        cast, out_dir / f"{name}.safetensors", metadata=meta, overwrite=overwrite, config=wan_config
    )
    return paths


def export_files(out_dir: str | os.PathLike, name: str, lora_rank: int = 0, merged: bool = True) -> list[Path]:
    """The files `export_generator(out_dir, name, ...)` writes: the full weights (unless a LoRA run with
    `merged` off), then the LoRA (if `lora_rank`)."""
    out_dir = Path(out_dir)
    full = [out_dir / f"{name}.safetensors"] if merged or not lora_rank else []
    return full + ([out_dir / f"{name}_lora.safetensors"] if lora_rank else [])


def read_export_info(path: str | os.PathLike) -> dict[str, Any]:
    """The `apt.export` metadata of an exported file (step, stage or phase, ema); {} if absent or unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("apt.export", "{}"))
    except Exception:  # noqa: BLE001 - a damaged or foreign file just has no provenance
        return {}


def _cpu_model(config: WanConfig) -> WanFlowModel:
    with torch.device("meta"):
        model = WanFlowModel(config)
    return model.to_empty(device="cpu")
