"""ComfyUI entry point of ComfyUI-APT: collects the node mappings from `nodes/`.

ComfyUI imports this folder with `spec_from_file_location` (not by its folder name), so the node
package is imported relatively. `apt_core` and `training` use absolute imports, so this folder is
appended to `sys.path` (appended, not prepended: it must never shadow ComfyUI's own modules, e.g.
ComfyUI's top-level `nodes.py`).
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)

if __package__:  # imported as a package, as ComfyUI does
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402
else:  # imported as a lone file: pytest collecting this folder when its name is no Python name (ComfyUI-APT)
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

WEB_DIRECTORY = None
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
