"""The real ComfyUI server shared by the real-ComfyUI suite (test_real_comfyui.py, test_browser.py).

One server per session: starting one takes ~20 s on 2 CPU cores. Without COMFYUI_DIR and
COMFYUI_VENV the tests that use it are skipped (docs/COMFYUI.md).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.comfyui.harness import ROOT, RUN, TINY_MODELS, TINY_VAE, TINY_WAN, Comfy, write_media

COMFYUI_DIR, COMFYUI_VENV = os.environ.get("COMFYUI_DIR"), os.environ.get("COMFYUI_VENV")

def ensure_models(c: Comfy) -> None:
    """Write the tiny random models into the checkout's models/ unless they are there."""
    models = c.dir / "models" / "diffusion_models"
    if not (models / TINY_WAN).is_file() or not (c.dir / "models" / "vae" / TINY_VAE).is_file():
        c.make_models("--vae")
    if not all((models / name).is_file() for name in TINY_MODELS):
        subprocess.run([str(c.venv / "bin" / "python"), str(ROOT / "tests" / "comfyui" / "make_tiny_variants.py")],
                       env={**os.environ, "COMFYUI_DIR": str(c.dir)}, check=True, capture_output=True, timeout=600)

@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    if not (COMFYUI_DIR and COMFYUI_VENV):
        pytest.skip("real ComfyUI suite: set COMFYUI_DIR and COMFYUI_VENV (docs/COMFYUI.md)")
    c = Comfy(Path(COMFYUI_DIR), Path(COMFYUI_VENV), tmp_path_factory.mktemp("comfy"))
    ensure_models(c)
    write_media(c.input / "apt_media")
    c.start()
    yield c
    c.stop()
    for kind in ("diffusion_models", "loras"):
        shutil.rmtree(c.dir / "models" / kind / "apt_test" / RUN, ignore_errors=True)
