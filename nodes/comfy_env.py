"""ComfyUI environment helpers for the APT nodes: folders, device/precision, progress + Stop.

ComfyUI is imported lazily inside each function, so this module imports without ComfyUI.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


def resolve_path(path: str, base: str | os.PathLike | Callable[[], str], what: str) -> Path:
    """`path` if absolute, else `base/path`; '..' may not leave `base`. Names the input on error.

    `base` may be a function returning the folder (e.g. `output_dir`): it is called only for a relative path.
    """
    if not path or not path.strip():
        where = "its folder" if callable(base) else base
        raise ValueError(f"{what} is empty; give a folder name (relative to {where}) or an absolute path")
    p = Path(os.path.expanduser(path.strip()))
    if p.is_absolute():
        return p
    root = Path(base() if callable(base) else base).resolve()
    out = (root / p).resolve()
    if root != out and root not in out.parents:
        raise ValueError(f"{what} {path!r} leaves {root}; use a path inside it or an absolute path")
    return out


def output_dir() -> str:
    """ComfyUI's output folder."""
    import folder_paths

    return folder_paths.get_output_directory()


def input_dir() -> str:
    """ComfyUI's input folder."""
    import folder_paths

    return folder_paths.get_input_directory()


def model_folder(kind: str) -> Path:
    """The folder ComfyUI lists for a model kind ('loras', 'diffusion_models'): prefer the one named so."""
    import folder_paths

    paths = folder_paths.get_folder_paths(kind)
    named = [p for p in paths if Path(p).name == kind]
    return Path((named or paths)[0])


def compute_setup(precision: str) -> tuple[torch.device, torch.dtype, str | None]:
    """(device, dtype of frozen base weights, autocast dtype name) for 'bf16' or 'fp32' training.

    bf16 means bf16 frozen weights + bf16 autocast with fp32 trainable tensors; on a CPU it falls
    back to fp32 (CPU autocast is slow and warns).
    """
    import comfy.model_management

    device = comfy.model_management.get_torch_device()
    if precision == "bf16" and device.type != "cpu":
        return device, torch.bfloat16, "bf16"
    return device, torch.float32, None


def free_vram() -> None:
    """Offload every model ComfyUI holds on the GPU (they stay in RAM) before training copies load."""
    import comfy.model_management

    comfy.model_management.unload_all_models()
    comfy.model_management.soft_empty_cache()


def step_reporter(total: int) -> Callable[[int, dict], None]:
    """`on_step(step, metrics)`: ComfyUI progress bar update + Stop check (raises when interrupted)."""
    import comfy.model_management
    import comfy.utils

    pbar = comfy.utils.ProgressBar(total)

    def on_step(step: int, metrics: dict) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        pbar.update_absolute(min(step, total), total)

    return on_step


@contextmanager
def training_mode() -> Iterator[None]:
    """Autograd on inside a ComfyUI node (ComfyUI runs nodes under torch.inference_mode)."""
    with torch.inference_mode(False), torch.enable_grad():
        yield
