"""One `apply_*` per parallelism technique, applied to models that know nothing about distribution.

Order (as torchtitan): activation checkpointing, then compile, then FSDP2 `fully_shard` on every
transformer block and finally on the root. FSDP models are built on the meta device, sharded,
then materialised (`materialize`: `to_empty` + the full weights broadcast from rank 0), so no rank
ever holds an unsharded copy except rank 0's CPU state dict. DDP wraps an already materialised
model.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from apt_core.models.wan import WanAttentionBlock, WanModel
from training.config import ParallelSection
from training.distributed import World

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """Every Wan transformer block in the module tree (generator, or D's backbone copy)."""
    return [m for m in model.modules() if isinstance(m, WanAttentionBlock)]


def wan_models(model: nn.Module) -> list[WanModel]:
    """Every Wan model in the module tree (the generator, and D's backbone copy)."""
    return [m for m in model.modules() if isinstance(m, WanModel)]


def param_dtype(cfg: ParallelSection, device: torch.device) -> torch.dtype:
    """Compute dtype: `auto` = bf16 on CUDA, fp32 on CPU."""
    if cfg.mixed_precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[cfg.mixed_precision]


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute every transformer block in backward (the Wan model's own per-block checkpoint).

    Returns the number of Wan models switched; blocks keep their names, so state dicts do not change.
    """
    wans = wan_models(model)
    for m in wans:
        m.gradient_checkpointing = True
    return len(wans)


def apply_attention_backend(model: nn.Module, name: str) -> int:
    """Set every Wan model's SDPA kernel choice (`parallel.attention`); returns how many were set."""
    wans = wan_models(model)
    for m in wans:
        m.set_attention_backend(name)
    return len(wans)


def apply_compile(model: nn.Module) -> int:
    """`torch.compile` each transformer block in place (`Module.compile`: parameter names unchanged)."""
    blocks = transformer_blocks(model)
    for block in blocks:
        block.compile()
    return len(blocks)


def apply_fsdp(
    model: nn.Module, world: World, dtype: torch.dtype = torch.float32, reduce_dtype: torch.dtype = torch.float32
) -> nn.Module:
    """FSDP2: `fully_shard` each transformer block, then the root (embeddings, head, D heads).

    With `dtype` bf16 the all-gathered parameters and compute are bf16 while the sharded master
    weights, optimiser state and the gradient reduce-scatter stay fp32. Forward inputs are NOT cast
    (`cast_forward_inputs=False`): the model casts what its layers need, and the timestep and the
    RoPE tables must stay fp32 (bf16 would put t = 0.999 at 1.0). The time modulation `e0` stays an
    fp32 tensor too, though the time-embedding layers that make it compute in bf16.
    """
    mesh = init_device_mesh(world.device.type, (world.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    blocks = transformer_blocks(model)
    for i, block in enumerate(blocks):
        # the last block's parameters are needed right away in backward: do not reshard after forward
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def reshard(model: nn.Module) -> None:
    """Free FSDP2's unsharded parameters after a no-grad forward (no backward does it then).

    FSDP2 keeps the root (and blocks with reshard_after_forward=False) unsharded after forward until
    backward; after an inference-only forward the module would keep exposing the unsharded tensors,
    so in-place writes to the sharded parameters (EMA swap, optimiser steps) would not be seen by the
    next forward. No-op for non-FSDP models.
    """
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def apply_ddp(model: nn.Module, world: World) -> nn.Module:
    """Classic DDP (replicated weights, all-reduced gradients) around a materialised model."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [world.device.index] if world.device.type == "cuda" else None
    # find_unused_parameters: D never runs its backbone's head/deeper blocks, G's may be frozen
    return DDP(model, device_ids=ids, find_unused_parameters=True)


def materialize(
    model: nn.Module, full_state: Mapping[str, torch.Tensor] | None, world: World, strict: bool = True
) -> nn.Module:
    """Allocate a meta-device (possibly sharded) model on this rank's device and load rank 0's full weights.

    `full_state` is the unsharded state dict (module keys) on rank 0 and None elsewhere; every rank
    receives its shard by broadcast (`set_model_state_dict(full_state_dict, broadcast_from_rank0)`).
    """
    if any(p.is_meta for p in model.parameters()):
        model.to_empty(device=world.device)
    if world.is_main and full_state is None:
        raise ValueError("materialize: rank 0 needs the full state dict to broadcast")
    state = dict(full_state) if world.is_main else {}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=dist.get_world_size() > 1, strict=strict)
    if not options.broadcast_from_rank0 and not any(hasattr(p, "to_local") for p in model.parameters()):
        # one process, plain tensors: copy tensor by tensor from the CPU (each cast to its parameter's dtype),
        # so the device never holds a second full copy (a consumer GPU fits the bf16 model, not that)
        model.load_state_dict(state, strict=strict)
        return model
    if not options.broadcast_from_rank0:
        state = {k: v.to(world.device) for k, v in state.items()}
    set_model_state_dict(model, state, options=options)
    return model


def parallelize(
    model: nn.Module,
    full_state: Mapping[str, torch.Tensor] | None,
    cfg: ParallelSection,
    world: World,
    wrap_ddp: bool = True,
) -> nn.Module:
    """Attention backend, AC -> compile -> FSDP (sharded while on meta) -> materialise; or the same with
    materialise first and DDP last.

    `model` is built on the meta device; returns the module to train (a DDP wrapper for `ddp`, unless
    `wrap_ddp=False`: frozen models such as the CD teacher are then simply replicated).
    """
    if cfg.strategy == "none" and world.world_size > 1:
        raise ValueError(f"parallel.strategy='none' runs on 1 process only, got world size {world.world_size}; use fsdp or ddp")
    apply_attention_backend(model, cfg.attention)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.compile:
        apply_compile(model)
    if cfg.strategy == "fsdp":
        apply_fsdp(model, world, dtype=param_dtype(cfg, world.device), reduce_dtype=torch.float32)
        return materialize(model, full_state, world)
    materialize(model, full_state, world)
    return apply_ddp(model, world) if cfg.strategy == "ddp" and wrap_ddp else model


def autocast_dtype(cfg: ParallelSection, device: torch.device) -> str | None:
    """Autocast setting for the step functions: None under FSDP (its policy casts) or in fp32; else 'bf16'."""
    if cfg.strategy == "fsdp" or param_dtype(cfg, device) == torch.float32:
        return None
    return "bf16"
