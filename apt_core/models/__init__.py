"""Backbones: the Wan 2.1 DiT and its weights I/O."""

from apt_core.models.wan import WAN_CONFIGS, WanConfig, WanModel, build_wan, get_config

__all__ = ["WAN_CONFIGS", "WanConfig", "WanModel", "build_wan", "get_config"]
