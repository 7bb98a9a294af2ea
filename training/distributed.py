"""Process-group setup (env:// from torchrun or SLURM, or a 1-process group) and world-size-free randomness.

Every random draw of a training step comes from a per-sample seed `(run seed, step, global sample
index, stream)`, so a sample gets the same noise whether it lands on rank 0 of 1 or rank 1 of 2:
runs with the same global batch give the same losses at any world size.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

STREAMS = ("z_d", "z_g", "t_d", "t_g", "r1", "r2", "eps", "t", "cd_index",
           "d_eps_real", "d_eps_fake", "g_eps_fake", "g_eps_real")  # append only: the index seeds the stream


@dataclass(frozen=True)
class World:
    """Where this process sits: global rank, world size, local rank, its device and the backend."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env_from_slurm() -> None:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK from SLURM (srun without torchrun), if SLURM set them."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or "SLURM_NTASKS" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")


def init_distributed(device: str = "auto", backend: str = "auto", timeout_s: float = 600.0) -> World:
    """Join (or create) the default process group with env:// and pick this rank's device.

    `timeout_s` (config distributed.timeout_s) bounds every collective wait: a stalled or dead rank
    makes the others raise after that long instead of hanging.
    Under torchrun / SLURM the env vars are set; a plain `python -m training` gets a 1-process group
    on a free local port, so FSDP2, DCP and collectives run the same code path everywhere.
    device: auto | cpu | cuda; backend: auto (nccl on CUDA, gloo on CPU) | nccl | gloo.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"run.device={device!r}; choose auto, cpu or cuda")
    if backend not in ("auto", "nccl", "gloo"):
        raise ValueError(f"parallel.backend={backend!r}; choose auto, nccl or gloo")
    _env_from_slurm()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("run.device='cuda' but torch.cuda.is_available() is False; use run.device='cpu'")
        # srun with one GPU bound per task shows each rank a single device: cuda:0
        index = 0 if torch.cuda.device_count() == 1 else local_rank
        torch.cuda.set_device(index)
        dev = torch.device("cuda", index)
    else:
        dev = torch.device("cpu")
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend, "init_method": "env://", "timeout": datetime.timedelta(seconds=timeout_s)}
        if use_cuda:
            kwargs["device_id"] = dev
        dist.init_process_group(rank=rank, world_size=world_size, **kwargs)
    return World(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, backend=backend)


def destroy(barrier: bool = True) -> None:
    """Leave the process group (after a final barrier unless `barrier=False`, e.g. on an error) if one is up."""
    if dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s Python object on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of `t` over ranks (in place on a copy); identity on 1 process."""
    t = t.clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


# ----------------------------------------------------------------------------------------------
# Per-sample randomness (independent of the world size)
# ----------------------------------------------------------------------------------------------


def sample_seed(seed: int, step: int, index: int, stream: str) -> int:
    """A 63-bit seed mixed from (run seed, step, global sample index, stream) by numpy's SeedSequence."""
    if stream not in STREAMS:
        raise ValueError(f"unknown noise stream {stream!r}; known: {STREAMS}")
    entropy = [int(seed) & 0xFFFFFFFF, int(step), int(index), STREAMS.index(stream)]
    hi, lo = (int(v) for v in np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32))
    return ((hi & 0x7FFFFFFF) << 32) | lo


def global_indices(world: World, per_rank: int) -> list[int]:
    """Positions in the global batch of this rank's samples (the loader hands out contiguous slices)."""
    return list(range(world.rank * per_rank, (world.rank + 1) * per_rank))


def _generator(seed: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def per_sample_randn(
    shape: tuple[int, ...], seed: int, step: int, indices: list[int], stream: str, device: torch.device
) -> torch.Tensor:
    """Gaussian noise [len(indices), *shape]: row i drawn from the seed of global sample indices[i]."""
    rows = [
        torch.randn(shape, generator=_generator(sample_seed(seed, step, i, stream), device), device=device)
        for i in indices
    ]
    return torch.stack(rows)


def per_sample_uniform(seed: int, step: int, indices: list[int], stream: str, device: torch.device) -> torch.Tensor:
    """U(0, 1) values [len(indices)], one per global sample index."""
    return torch.cat(
        [torch.rand(1, generator=_generator(sample_seed(seed, step, i, stream), device), device=device) for i in indices]
    )


def per_sample_normal(seed: int, step: int, indices: list[int], stream: str, device: torch.device) -> torch.Tensor:
    """N(0, 1) values [len(indices)], one per global sample index."""
    return torch.cat(
        [torch.randn(1, generator=_generator(sample_seed(seed, step, i, stream), device), device=device) for i in indices]
    )


def rng_state() -> dict[str, torch.Tensor]:
    """This rank's torch (and CUDA) RNG state, for checkpoints."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Restore `rng_state()` output (the CUDA part only if this process uses CUDA)."""
    torch.set_rng_state(state["cpu"].to("cpu", torch.uint8))
    if "cuda" in state and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(state["cuda"].to("cpu", torch.uint8))
