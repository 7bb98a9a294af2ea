"""Scaled dot-product attention with a chosen SDPA backend (flash / cuDNN / efficient / math).

PyTorch's dispatcher picks a fused kernel by a fixed priority, which is not always the fastest on a
given GPU and shape (on Hopper, cuDNN attention can beat flash). A model can instead name a backend
to try first, the others staying as fallbacks, or ask for "auto": every backend that runs these
inputs is timed once per (shapes, dtype, device, grad mode) and the fastest is kept. An enclosing
`sdpa_kernel` restriction (exact R1 forces the math kernel, the one with a double backward) always
wins over the model's choice, and under torch.compile the dispatcher decides.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
CHOICES = ("default", "auto", *BACKENDS)  # "default": PyTorch's dispatcher decides

# "auto" winners: (q shape, k shape, dtype, device, grad enabled) -> backend name
_FASTEST: dict[tuple, str] = {}


def check_choice(name: str) -> str:
    """`name` if it is a known attention backend choice, else a ValueError listing the choices."""
    if name not in CHOICES:
        raise ValueError(f"attention backend {name!r} unknown; choose one of {CHOICES}")
    return name


def _all_backends_enabled() -> bool:
    """False inside an `sdpa_kernel` restriction (whose choice must then stand)."""
    b = torch.backends.cuda
    return b.flash_sdp_enabled() and b.mem_efficient_sdp_enabled() and b.math_sdp_enabled() and b.cudnn_sdp_enabled()


def _first(name: str) -> list[SDPBackend]:
    """`name`'s backend first, then the rest in the dispatcher's order, as fallbacks."""
    return [BACKENDS[name], *(b for n, b in BACKENDS.items() if n != name)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fastest_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, repeat: int = 3) -> str:
    """The backend that runs SDPA on these [B, heads, N, head_dim] inputs fastest here (cached)."""
    key = (tuple(q.shape), tuple(k.shape), q.dtype, q.device, torch.is_grad_enabled())
    if key not in _FASTEST:
        times = {}
        with torch.no_grad():
            for name, backend in BACKENDS.items():
                try:
                    with sdpa_kernel([backend]):
                        F.scaled_dot_product_attention(q, k, v)  # warm-up (and: does it run here?)
                        _sync(q.device)
                        start = time.perf_counter()
                        for _ in range(repeat):
                            F.scaled_dot_product_attention(q, k, v)
                        _sync(q.device)
                        times[name] = time.perf_counter() - start
                except RuntimeError:  # this backend does not take these inputs on this device
                    continue
        if not times:  # cannot happen with the math kernel enabled; say so rather than fail on min()
            raise RuntimeError(f"no SDPA backend runs q {tuple(q.shape)} k {tuple(k.shape)} {q.dtype} on {q.device}")
        _FASTEST[key] = min(times, key=times.get)
    return _FASTEST[key]


def auto_choices() -> dict[str, str]:
    """What "auto" picked so far: "q [B,H,N,D] k [B,H,M,D] dtype device grad" -> backend name."""
    return {f"q {list(k[0])} k {list(k[1])} {str(k[2]).removeprefix('torch.')} {k[3]} grad={k[4]}": v
            for k, v in _FASTEST.items()}


def sdpa_single_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA of [B, heads, 1, D] queries over [B, heads, N, D] keys/values, never through cuDNN.

    cuDNN's SDPA backward has returned NaN dK/dV for a single query row on H200 (cudnn-frontend
    issue 1072, cuDNN 9.25/9.26), and cuDNN is PyTorch's default backend on Hopper since 2.11. Flash,
    efficient and math attention take one query just as fast. An enclosing restriction still wins.
    """
    context = nullcontext()
    if not torch.compiler.is_compiling() and _all_backends_enabled():
        context = sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
    with context:
        return F.scaled_dot_product_attention(q, k, v)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "default") -> torch.Tensor:
    """q [B, Nq, H, D], k/v [B, Nk, H, D] -> [B, Nq, H*D] through SDPA with the chosen backend."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    context = nullcontext()
    if backend != "default" and not torch.compiler.is_compiling() and _all_backends_enabled():
        name = fastest_backend(q, k, v) if backend == "auto" else backend
        context = sdpa_kernel(_first(name), set_priority=True)
    with context:
        out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)
