"""Backbones: the Wan 2.1 DiT and its weights I/O."""

from apt_core.models.io import (
    WeightsMismatchError,
    infer_wan_config,
    load_into,
    load_state_dict_file,
    load_wan,
    save_state_dict_file,
    save_wan,
)
from apt_core.models.wan import WAN_CONFIGS, WanConfig, WanModel, build_wan, get_config

__all__ = [
    "WAN_CONFIGS",
    "WanConfig",
    "WanModel",
    "WeightsMismatchError",
    "build_wan",
    "get_config",
    "infer_wan_config",
    "load_into",
    "load_state_dict_file",
    "load_wan",
    "save_state_dict_file",
    "save_wan",
]
