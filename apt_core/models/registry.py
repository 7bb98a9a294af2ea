"""Model families: one file each under apt_core/models/, found here by name.

A family file defines `FAMILY = ModelFamily(...)`: its presets, how a state dict of the family is
recognised and read back into a config, how ComfyUI names it (model class + `unet_config`), its
latent channels and VAE compression, and (mixture-of-experts families) its experts. Everything
outside apt_core/models asks this registry; nothing else names a family. Adding one: docs/DESIGN.md.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from apt_core.models.wan import WanConfig, build_wan

# The family files, in detection order (the first family whose `matches_state_dict` holds wins).
FAMILY_MODULES = (
    "apt_core.models.wan21_t2v",
    "apt_core.models.wan22_ti2v",
    "apt_core.models.wan22_a14b",
    "apt_core.models.wan21_i2v",
)


def _strip(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from apt_core.models.io import strip_prefix

    return strip_prefix(sd)


@dataclass(frozen=True)
class Expert:
    """One expert of a mixture-of-experts family: it denoises t in [t_min, t_max] (t in [0, 1])."""

    name: str
    t_min: float
    t_max: float

    def covers(self, t: float) -> bool:
        """Whether time t lies in this expert's range (both ends included)."""
        return self.t_min <= t <= self.t_max


@dataclass(frozen=True)
class ModelFamily:
    """What the rest of the code may know about a family of diffusion transformers."""

    name: str  # e.g. "wan2.1-t2v"
    title: str  # for messages and the README table
    presets: Mapping[str, WanConfig]
    comfy_class: str  # ComfyUI model_base class name (type(patcher.model).__name__)
    comfy_unet: Mapping[str, Any]  # unet_config entries ComfyUI's detection sets for this family
    latent_channels: int  # channels of the latents the network denoises (its out_dim)
    vae: str  # the VAE the latents come from (for messages)
    vae_stride: tuple[int, int, int]  # (time, height, width) compression of that VAE
    sample_shift: float  # the public config's sampling shift
    experts: tuple[Expert, ...] = ()
    generator_expert: str = ""  # expert that initialises the one-step generator (MoE families)
    discriminator_expert: str = ""  # expert that initialises the discriminator backbone (MoE families)
    marker_keys: tuple[str, ...] = ()  # state-dict keys that only this family's checkpoints have
    example_file: str = ""  # a public file name of the family (for messages)
    comfy_latent_format: str = ""  # class name in comfy.latent_formats (its process_in/out, preview)
    latent_rgb: tuple[tuple[float, float, float], ...] = ()  # latent -> RGB preview projection (ComfyUI's)
    latent_rgb_bias: tuple[float, float, float] = (0.0, 0.0, 0.0)
    in_dim: int = 0  # channels into patch_embedding when more than the latents (I2V: + mask + image latent); 0 = latent_channels
    model_type: str = "t2v"  # WanConfig.model_type of the family's networks
    image_condition: Callable[..., Any] | None = field(default=None, repr=False)  # I2V: builds the image part of WanCond
    in_sampler_node: bool = True  # APT One-Step Sampler takes this family's MODELs (it samples through ComfyUI's own model)
    in_training_nodes: bool = True  # the training nodes (CD, Discriminator, Train, Save) take them (False: headless only)
    detectable: bool = True  # False when a file cannot be told apart from another family's (e.g. an MoE expert)
    build_fn: Callable[..., nn.Module] = field(default=build_wan, repr=False)

    # -- configs -----------------------------------------------------------------------------
    def build(self, config: WanConfig | str, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> nn.Module:
        """The family's network from a config or one of its preset names."""
        cfg = self.presets[config] if isinstance(config, str) else config
        return self.build_fn(cfg, device=device, dtype=dtype)

    @property
    def input_channels(self) -> int:
        """Channels into the patch embedding (latents, plus mask + image latent for I2V)."""
        return self.in_dim or self.latent_channels

    def matches_config(self, cfg: WanConfig) -> bool:
        """Whether a config is one of this family's networks (channels in and out, model type)."""
        return (cfg.in_dim, cfg.out_dim, cfg.model_type) == (self.input_channels, self.latent_channels, self.model_type)

    def convert_keys(self, sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """File keys -> the module tree's keys (ComfyUI's `model.diffusion_model.` prefixes removed)."""
        return _strip(sd)

    def matches_state_dict(self, sd: Mapping[str, torch.Tensor]) -> bool:
        """Whether a (converted) state dict holds this family's network, judged by its shapes."""
        pe = sd.get("patch_embedding.weight")
        head = sd.get("head.head.weight")
        if not self.detectable or pe is None or head is None or any(k not in sd for k in self.marker_keys):
            return False
        out_dim = head.shape[0] // max(1, int(torch.tensor(pe.shape[2:]).prod()))
        return pe.shape[1] == self.input_channels and out_dim == self.latent_channels

    def infer_config(self, sd: Mapping[str, torch.Tensor], **overrides) -> WanConfig:
        """The config of a state dict of this family, from its shapes (io.infer_wan_config)."""
        from apt_core.models.io import infer_wan_config

        return infer_wan_config(sd, **overrides)

    # -- ComfyUI -----------------------------------------------------------------------------
    def matches_comfy(self, base_model: str, unet_config: Mapping[str, Any]) -> bool:
        """Whether a ComfyUI MODEL (its model class and detected unet_config) is this family."""
        if base_model != self.comfy_class:
            return False
        return all(unet_config.get(k, default) == v for k, (v, default) in _with_defaults(self.comfy_unet).items())

    # -- experts -----------------------------------------------------------------------------
    def expert(self, name: str) -> Expert:
        """The expert called `name`; a KeyError lists the family's experts."""
        for e in self.experts:
            if e.name == name:
                return e
        raise KeyError(f"family {self.name!r} has no expert {name!r}; experts: {[e.name for e in self.experts] or 'none'}")

    def expert_inits(
        self, files: Mapping[str, str], generator: str = "", discriminator: str = ""
    ) -> tuple[str, str]:
        """(generator file, discriminator file) from one file per expert; '' picks the family's choice.

        Every expert must have its file (and only the family's experts may be named), so a swapped or
        missing file is an error naming the experts rather than a silent wrong init."""
        if not self.experts:
            raise ValueError(f"family {self.name!r} has no experts; give one weights file (model.init_from), not per-expert files")
        names = [e.name for e in self.experts]
        unknown, missing = sorted(set(files) - set(names)), [n for n in names if n not in files]
        if unknown or missing:
            raise ValueError(f"family {self.name!r} needs one file per expert {names}; "
                             f"unknown: {unknown or 'none'}, missing: {missing or 'none'} (given: {sorted(files)})")
        g = self.expert(generator or self.generator_expert).name
        d = self.expert(discriminator or self.discriminator_expert).name
        return files[g], files[d]

    def expert_for(self, t: float) -> Expert:
        """The expert whose range holds time t (the higher-noise one at a shared boundary)."""
        found = [e for e in self.experts if e.covers(t)]
        if not found:
            raise ValueError(f"family {self.name!r}: no expert covers t={t}")
        return max(found, key=lambda e: e.t_max)


# ComfyUI's model detection leaves these unet_config entries out when they have their default value.
_COMFY_DEFAULTS = {"model_type": "t2v", "in_dim": 16, "out_dim": 16}


def _with_defaults(wanted: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {k: (v, _COMFY_DEFAULTS.get(k)) for k, v in wanted.items()}


_FAMILIES: dict[str, ModelFamily] = {}


def families() -> dict[str, ModelFamily]:
    """All registered families by name (family files are imported on first use)."""
    if not _FAMILIES:
        for module in FAMILY_MODULES:
            fam = importlib.import_module(module).FAMILY
            if fam.name in _FAMILIES:
                raise ValueError(f"{module}: family name {fam.name!r} is already registered")
            _FAMILIES[fam.name] = fam
    return dict(_FAMILIES)


def get_family(name: str) -> ModelFamily:
    """A family by name; a KeyError lists the registered ones."""
    fams = families()
    if name not in fams:
        raise KeyError(f"unknown model family {name!r}; registered: {sorted(fams)}")
    return fams[name]


def all_presets() -> dict[str, WanConfig]:
    """Every family's presets by name (preset names are unique across families)."""
    out: dict[str, WanConfig] = {}
    for fam in families().values():
        for name, cfg in fam.presets.items():
            if name in out:
                raise ValueError(f"preset {name!r} is defined by two families")
            out[name] = cfg
    return out


def family_of_preset(preset: str) -> ModelFamily:
    """The family that defines a preset name."""
    for fam in families().values():
        if preset in fam.presets:
            return fam
    raise KeyError(f"unknown preset {preset!r}; choose one of {sorted(all_presets())}")


def family_of_config(cfg: WanConfig) -> ModelFamily | None:
    """The family whose networks have this config's channels and model type (first match); None if none."""
    for fam in families().values():
        if fam.matches_config(cfg):
            return fam
    return None


def detect_family(sd: Mapping[str, torch.Tensor]) -> ModelFamily | None:
    """The family of a state dict (file keys), judged by its keys and shapes; None if none fits."""
    sd = _strip(sd)
    for fam in families().values():
        if fam.matches_state_dict(sd):
            return fam
    return None


def comfy_family(base_model: str, unet_config: Mapping[str, Any]) -> ModelFamily | None:
    """The family of a ComfyUI MODEL (model class name + unet_config); None if unsupported."""
    for fam in families().values():
        if fam.matches_comfy(base_model, unet_config):
            return fam
    return None


def family_for_latent_channels(channels: int) -> ModelFamily | None:
    """The first family whose latents have `channels` channels (previews, VAE checks); None if none."""
    for fam in families().values():
        if fam.latent_channels == channels:
            return fam
    return None


USES = ("training", "sampling", "headless")  # the node groups of `ModelFamily.in_*`, and the headless trainer (all)


def takes(fam: ModelFamily, use: str) -> bool:
    """Whether `use` (one of USES: the training nodes, the sampler node, headless) takes this family's models."""
    if use not in USES:
        raise ValueError(f"use must be one of {USES}, got {use!r}")
    return {"training": fam.in_training_nodes, "sampling": fam.in_sampler_node, "headless": True}[use]


def describe_supported(use: str = "training") -> str:
    """'Wan 2.1 T2V (ComfyUI WAN21, model_type t2v, in_dim 16), ...' for error messages: the families `use` takes."""
    parts = []
    for fam in families().values():
        if not takes(fam, use):
            continue
        unet = ", ".join(f"{k} {v}" for k, v in fam.comfy_unet.items())
        parts.append(f"{fam.title} (ComfyUI {fam.comfy_class}, {unet}; e.g. {fam.example_file})")
    return "; ".join(parts)
