"""Scaled dot-product attention with a chosen SDPA backend (flash / cuDNN / efficient / math).

PyTorch's dispatcher picks a fused kernel by a fixed priority, which is not always the fastest on a
given GPU and shape (on Hopper, cuDNN and flash attention trade places). A model can instead name
a backend, used whenever it takes the inputs (else the dispatcher decides), or ask for "auto":
the fused backends that take the inputs are timed once per (shapes, dtype, device, grad mode)
and the fastest is kept (math only where no fused one runs). The timing is of the forward, under
no_grad: timing a backward inside a checkpointed block would save tensors its recompute does not.
A choice applies only among the backends enabled at the call, so an enclosing
`sdpa_kernel` restriction wins (exact R1 forces the math kernel, the one with a double backward);
under torch.compile the dispatcher decides. "auto" picks can differ between runs and ranks
(timing noise): results are then not bit-reproducible, and `auto_choices()` says what was picked.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
FUSED = ("flash", "cudnn", "efficient")
CHOICES = ("default", "auto", *BACKENDS)  # "default": PyTorch's dispatcher decides

_FASTEST: dict[tuple, str] = {}  # "auto" winners: (q shape, k shape, dtype, device, grad) -> name
_REFUSED: set[tuple] = set()  # (name, q shape, k shape, dtype, device) a backend does not take


def check_choice(name: str) -> str:
    """`name` if it is a known attention backend choice, else a ValueError listing the choices."""
    if name not in CHOICES:
        raise ValueError(f"attention backend {name!r} unknown; choose one of {CHOICES}")
    return name


def enabled_backends() -> list[str]:
    """The SDPA backends enabled right now (all four, unless an `sdpa_kernel` restriction or a
    global switch such as `torch.backends.cuda.enable_flash_sdp(False)` turned some off)."""
    b = torch.backends.cuda
    flags = {"flash": b.flash_sdp_enabled(), "cudnn": b.cudnn_sdp_enabled(),
             "efficient": b.mem_efficient_sdp_enabled(), "math": b.math_sdp_enabled()}
    return [name for name, on in flags.items() if on]


class KeptBackends:
    """A context enabling a fixed set of SDPA backends; re-enterable, since a checkpointed block can
    be recomputed more than once (exact R1: once for the R1 gradient, once for the loss backward)."""

    def __init__(self, names: list[str]):
        self.names = names
        self._entered: list[AbstractContextManager] = []

    def __enter__(self) -> KeptBackends:
        context = sdpa_kernel([BACKENDS[name] for name in self.names])
        context.__enter__()
        self._entered.append(context)
        return self

    def __exit__(self, *exc) -> bool | None:
        return self._entered.pop().__exit__(*exc)


def keep_backends() -> KeptBackends:
    """A context restoring the backends enabled now: activation checkpointing recomputes a block in
    backward with it, so the recompute takes the kernels its forward took (exact R1's math kernel)."""
    return KeptBackends(enabled_backends())


def _key(q: torch.Tensor, k: torch.Tensor) -> tuple:
    return tuple(q.shape), tuple(k.shape), q.dtype, q.device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_backend(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, repeat: int) -> float | None:
    """Seconds for `repeat` forward calls with only `name` enabled (after one warm-up); None if it
    does not take these inputs here or runs out of memory."""
    try:
        with torch.no_grad(), sdpa_kernel([BACKENDS[name]]):
            F.scaled_dot_product_attention(q, k, v)
            _sync(q.device)
            start = time.perf_counter()
            for _ in range(repeat):
                F.scaled_dot_product_attention(q, k, v)
            _sync(q.device)
            return time.perf_counter() - start
    except RuntimeError:  # refused, or out of memory (a RuntimeError too)
        if q.device.type == "cuda":
            torch.cuda.empty_cache()
        return None


def fastest_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, repeat: int = 3) -> str:
    """The enabled backend that runs SDPA on these [B, heads, N, head_dim] inputs fastest (cached).

    Times the fused backends enabled now; the math kernel only where none of them runs (at real
    sizes it is slow and memory-hungry). Cached per grad mode too, so a checkpointed block's
    recompute meets the pick its forward made.
    """
    key = (*_key(q, k), torch.is_grad_enabled())
    if key not in _FASTEST:
        enabled = enabled_backends()
        times = {}
        for name in (n for n in FUSED if n in enabled):
            seconds = _time_backend(name, q, k, v, repeat)
            if seconds is not None:
                times[name] = seconds
        if not times and "math" not in enabled:
            raise RuntimeError(f"no enabled SDPA backend runs q {tuple(q.shape)} k {tuple(k.shape)} "
                               f"{q.dtype} on {q.device} (enabled: {enabled})")
        _FASTEST[key] = min(times, key=times.get) if times else "math"
    return _FASTEST[key]


def auto_choices() -> dict[str, str]:
    """What "auto" picked so far: "q [B,H,N,D] k [B,H,M,D] dtype device grad" -> backend name."""
    return {f"q {list(k[0])} k {list(k[1])} {str(k[2]).removeprefix('torch.')} {k[3]} grad={k[4]}": v
            for k, v in _FASTEST.items()}


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "default") -> torch.Tensor:
    """`F.scaled_dot_product_attention` on [B, heads, N, D] with `backend` where it applies: the
    named (or "auto"-picked) backend runs alone if it is enabled now and takes these inputs; else
    the dispatcher decides among the enabled ones."""
    if backend == "default" or torch.compiler.is_compiling():
        return F.scaled_dot_product_attention(q, k, v)
    name = fastest_backend(q, k, v) if backend == "auto" else backend
    refused_key = (name, *_key(q, k))
    if name in enabled_backends() and refused_key not in _REFUSED:
        try:
            with sdpa_kernel([BACKENDS[name]]):
                return F.scaled_dot_product_attention(q, k, v)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:  # this backend does not take these inputs here: remember, fall back
            _REFUSED.add(refused_key)
    return F.scaled_dot_product_attention(q, k, v)


def single_query_backends() -> list[str]:
    """The enabled backends, minus cuDNN, for one-query attention (empty: leave the choice alone)."""
    enabled = enabled_backends()
    safe = [name for name in enabled if name != "cudnn"]
    return safe if "cudnn" in enabled and safe else []


def sdpa_single_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA of [B, heads, 1, D] queries over [B, heads, N, D] keys/values, kept off cuDNN.

    cuDNN's SDPA backward has returned NaN dK/dV for a single query row on H200 (cudnn-frontend
    issue 1072, cuDNN 9.25/9.26), and cuDNN is PyTorch's default backend on Hopper since 2.11. Flash,
    efficient and math attention take one query just as fast. Only cuDNN is dropped from what is
    enabled, so an enclosing restriction otherwise stands (one that allows cuDNN alone is kept).
    """
    safe = [] if torch.compiler.is_compiling() else single_query_backends()
    with sdpa_kernel([BACKENDS[name] for name in safe]) if safe else nullcontext():
        return F.scaled_dot_product_attention(q, k, v)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "default") -> torch.Tensor:
    """q [B, Nq, H, D], k/v [B, Nk, H, D] -> [B, Nq, H*D] through SDPA with the chosen backend."""
    out = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), backend)
    return out.transpose(1, 2).flatten(2)
