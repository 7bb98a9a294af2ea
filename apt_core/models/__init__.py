"""Backbones: the Wan DiT, its weights I/O, and the model families (apt_core.models.registry)."""

from apt_core.models.io import (
    WeightsMismatchError,
    infer_wan_config,
    load_into,
    load_state_dict_file,
    load_wan,
    save_state_dict_file,
    save_wan,
)
from apt_core.models.registry import (
    ModelFamily,
    all_presets,
    comfy_family,
    detect_family,
    families,
    get_family,
)
from apt_core.models.wan import WanConfig, WanModel, build_wan, get_config

__all__ = [
    "ModelFamily",
    "WanConfig",
    "WanModel",
    "WeightsMismatchError",
    "all_presets",
    "build_wan",
    "comfy_family",
    "detect_family",
    "families",
    "get_family",
    "get_config",
    "infer_wan_config",
    "load_into",
    "load_state_dict_file",
    "load_wan",
    "save_state_dict_file",
    "save_wan",
]
