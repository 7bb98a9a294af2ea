"""ComfyUI-APT nodes (classic V1 API). Each module holds its own mappings; this collects them.

ComfyUI modules (comfy, folder_paths, comfy_api, server, latent_preview) are imported lazily inside
node functions, so every module here imports on a machine without ComfyUI.
"""

from . import dataset, io, sampling, train

_MODULES = (sampling, dataset, train, io)

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
for _m in _MODULES:
    NODE_CLASS_MAPPINGS.update(_m.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_m.NODE_DISPLAY_NAME_MAPPINGS)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
