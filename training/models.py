"""Where a run's models come from, and how they are built: meta build -> parallelize -> rank 0's weights.

A `ModelSource` answers three questions for the runner: the architecture (WanConfig), the BASE weights
of each role as a CPU state dict in Wan keys (generator, discriminator = the ORIGINAL diffusion weights
D copies, CD teacher), and optionally a ready frozen CD teacher module. `FileSource` (the default)
reads the files the config names (model.init_from, model.expert_files, apt.generator_init,
cd.teacher_from) or makes a seeded init; a front end (the ComfyUI nodes) passes weights it holds in
memory (`MemorySource`). Everything after that is shared code: the LoRA adapters are injected under
seeded(run.seed + 1) and D's fresh heads under seeded(run.seed + 2), so the same base weights give
the same losses whichever front end started the run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

from apt_core.backbone import WanFlowModel
from apt_core.discriminator import APTDiscriminator
from apt_core.lora import inject_lora
from apt_core.models.io import config_from_metadata, infer_wan_config, load_state_dict_file, read_metadata
from apt_core.models.registry import family_of_preset
from apt_core.models.wan import WanConfig, get_config
from apt_core.sfv import SFVDiscriminator
from training import distributed as D
from training.config import ConfigError, RunConfig, arch_config
from training.parallelize import parallelize

ROLES = ("generator", "discriminator", "teacher")


def original_weights(cfg: RunConfig) -> tuple[str, str]:
    """(G's, D's) ORIGINAL diffusion weights: model.init_from for both, or for a mixture-of-experts
    preset the files of model.generator_expert / model.discriminator_expert (the family's choice by default)."""
    m = cfg.model
    if not m.expert_files:
        if m.generator_expert or m.discriminator_expert:
            raise ConfigError("model.generator_expert / model.discriminator_expert need model.expert_files (one file per expert)")
        return m.init_from, m.init_from
    if m.init_from:
        raise ConfigError(f"give model.init_from ({m.init_from!r}) or model.expert_files, not both")
    if cfg.run.stage != "apt":
        raise ConfigError(f"model.expert_files is for run.stage = 'apt' (G and D from their experts); stage {cfg.run.stage!r} "
                          "would need the experts switched by time, which is not supported")
    files = {}
    for entry in m.expert_files:
        name, sep, path = entry.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"model.expert_files entry {entry!r} must look like 'expert=path.safetensors'")
        files[name.strip()] = path.strip()
    try:
        return family_of_preset(m.preset).expert_inits(files, m.generator_expert, m.discriminator_expert)
    except (KeyError, ValueError) as e:
        raise ConfigError(f"model.expert_files (preset {m.preset!r}): {e}") from e


def resolve_wan_config(cfg: RunConfig) -> WanConfig:
    """The architecture: the [model.arch] table if set, else from G's original weights (model.init_from or
    its expert's file: its metadata, else its shapes), else the preset."""
    arch = arch_config(cfg)
    if arch is not None:
        return arch
    overrides = {"in_dim": cfg.model.in_dim, "out_dim": cfg.model.in_dim} if cfg.model.in_dim else {}
    path = original_weights(cfg)[0]
    if not path:
        return get_config(cfg.model.preset, **overrides)
    found = config_from_metadata(read_metadata(path), path)
    if found is None:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            shapes = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
        try:
            found = infer_wan_config(shapes)
        except ValueError:  # head_dim != 128: take the head count from the preset
            found = infer_wan_config(shapes, num_heads=get_config(cfg.model.preset).num_heads)
    return found


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block under a fixed CPU seed without touching the caller's RNG stream (seeded inits)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def base_weights(config: WanConfig, path: str, seed: int) -> dict[str, torch.Tensor]:
    """Full Wan weights on CPU (rank 0): from a safetensors file, else a seeded fresh init."""
    if path:
        return load_state_dict_file(path)
    with seeded(seed):
        return WanFlowModel(config).state_dict()


class ModelSource:
    """Where a run's models come from. Subclass and override the hooks; rank 0 alone asks for weights."""

    def wan_config(self, cfg: RunConfig) -> WanConfig:
        """The architecture of every model of the run."""
        raise NotImplementedError

    def weights(self, cfg: RunConfig, config: WanConfig, role: str) -> Mapping[str, torch.Tensor]:
        """Full base weights of `role` (generator | discriminator | teacher) as a CPU state dict in Wan keys."""
        raise NotImplementedError

    def teacher(self, cfg: RunConfig, world: D.World, config: WanConfig) -> nn.Module | None:
        """A ready frozen CD teacher (`teacher(x_t, t, cond) -> v` on world.device), or None: build one
        from `weights(..., "teacher")` like the generator."""
        return None


class FileSource(ModelSource):
    """Today's behaviour: the files the config names, or a seeded init (run.seed) where it names none."""

    def wan_config(self, cfg: RunConfig) -> WanConfig:
        return resolve_wan_config(cfg)

    def path(self, cfg: RunConfig, role: str) -> str:
        """The weights file of `role` ('' = seeded init)."""
        if role == "generator":
            return (cfg.apt.generator_init or original_weights(cfg)[0]) if cfg.run.stage == "apt" else cfg.model.init_from
        if role == "discriminator":
            return original_weights(cfg)[1]
        if role == "teacher":
            return cfg.cd.teacher_from or cfg.model.init_from
        raise ValueError(f"unknown model role {role!r}; one of {ROLES}")

    def weights(self, cfg: RunConfig, config: WanConfig, role: str) -> Mapping[str, torch.Tensor]:
        return base_weights(config, self.path(cfg, role), cfg.run.seed)


Weights = Mapping[str, torch.Tensor] | Callable[[], Mapping[str, torch.Tensor]]


class MemorySource(ModelSource):
    """Weights a front end holds in memory: a state dict (or a function making one, called when needed)
    per role; the discriminator and teacher default to the generator's. `teacher`: a ready frozen module."""

    def __init__(self, config: WanConfig, generator: Weights, discriminator: Weights | None = None,
                 teacher_weights: Weights | None = None, teacher: nn.Module | None = None):
        self.config, self._teacher = config, teacher
        self._weights = {"generator": generator, "discriminator": discriminator or generator,
                         "teacher": teacher_weights or generator}

    def wan_config(self, cfg: RunConfig) -> WanConfig:
        return self.config

    def weights(self, cfg: RunConfig, config: WanConfig, role: str) -> Mapping[str, torch.Tensor]:
        if role not in self._weights:
            raise ValueError(f"unknown model role {role!r}; one of {ROLES}")
        w = self._weights[role]
        return w() if callable(w) else w

    def teacher(self, cfg: RunConfig, world: D.World, config: WanConfig) -> nn.Module | None:
        return self._teacher  # used as is (no copy, flags untouched): the CD step calls it under torch.no_grad


def frozen_dtype(cfg: RunConfig, device: torch.device) -> torch.dtype | None:
    """bf16 for frozen weights on one CUDA device asked for bf16 (parallel.mixed_precision = 'bf16' with
    parallel.strategy = 'none': consumer-GPU memory); None (fp32 masters, as FSDP/DDP keep them) otherwise."""
    p = cfg.parallel
    if p.strategy == "none" and p.mixed_precision == "bf16" and device.type == "cuda":
        return torch.bfloat16
    return None


def cast_frozen(model: nn.Module, dtype: torch.dtype | None) -> int:
    """Cast every parameter that does not train to `dtype` (trainable ones stay fp32); returns how many.
    On a meta-device model (before `parallelize` materialises it) this only sets the dtype to allocate."""
    if dtype is None:
        return 0
    n = 0
    for p in model.parameters():
        if not p.requires_grad and p.dtype != dtype:
            p.data = p.data.to(dtype)
            n += 1
    return n


def build_flow(cfg: RunConfig, world: D.World, config: WanConfig, models: ModelSource, role: str, lora: bool,
               trainable: bool) -> nn.Module:
    """A (possibly LoRA) Wan flow model, parallelised, with rank 0's base weights of `role` from `models`."""
    rank, alpha = cfg.model.lora_rank, cfg.model.lora_alpha or None
    with torch.device("meta"):
        model = WanFlowModel(config)
    if lora:
        inject_lora(model, rank, alpha)
    full = None
    if world.is_main:
        with torch.device("meta"):
            ref = WanFlowModel(config)
        ref.load_state_dict(dict(models.weights(cfg, config, role)), assign=True)
        if lora:
            with seeded(cfg.run.seed + 1):
                inject_lora(ref, rank, alpha)
        full = ref.state_dict()
    if not trainable:
        model.requires_grad_(False)
    cast_frozen(model, frozen_dtype(cfg, world.device))  # still on meta: the device holds them only in that dtype
    return parallelize(model, full, cfg.parallel, world, wrap_ddp=trainable)


def build_discriminator(cfg: RunConfig, world: D.World, config: WanConfig, models: ModelSource,
                        d_timestep_shift: float) -> nn.Module:
    """APT D: a copy of the ORIGINAL diffusion weights (models' "discriminator" role) + fresh seeded heads;
    SF-V D (apt.disc_kind = "sfv"): the first blocks of those weights, frozen, + fresh seeded heads."""
    a = cfg.apt
    if a.disc_kind == "sfv":
        s = a.sfv
        cls: type[nn.Module] = SFVDiscriminator
        kwargs: dict[str, Any] = dict(backbone_blocks=s.backbone_blocks or None, head_layers=s.head_layers or None,
                                      p_mean=s.p_mean, p_std=s.p_std, head_channels=s.head_channels or None,
                                      copy_backbone=False)
    else:
        cls = APTDiscriminator
        kwargs = dict(head_layers=a.head_layers or None, mode=a.disc_mode, timestep_shift=d_timestep_shift,
                      lora_rank=a.disc_lora_rank, copy_backbone=False)
    with torch.device("meta"):
        backbone = WanFlowModel(config)
    disc = cls(backbone, **kwargs)
    full = None
    if world.is_main:
        with torch.device("meta"):
            ref_backbone = WanFlowModel(config)
        ref_backbone.load_state_dict(dict(models.weights(cfg, config, "discriminator")), assign=True)
        with seeded(cfg.run.seed + 2):
            full = cls(ref_backbone, **kwargs).state_dict()
    cast_frozen(disc, frozen_dtype(cfg, world.device))
    return parallelize(disc, full, cfg.parallel, world)


def build_teacher(cfg: RunConfig, world: D.World, config: WanConfig, models: ModelSource) -> nn.Module:
    """The frozen CD teacher: the source's own module if it has one, else built from its teacher weights."""
    teacher = models.teacher(cfg, world, config)
    if teacher is not None:
        return teacher
    return build_flow(cfg, world, config, models, "teacher", False, False)
