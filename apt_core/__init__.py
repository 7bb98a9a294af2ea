"""apt_core: pure-PyTorch Adversarial Post-Training (APT) and a Wan 2.1-compatible DiT.

Nothing here imports ComfyUI; the algorithm sees a velocity model and a feature tap only.
"""

__version__ = "0.1.0"
