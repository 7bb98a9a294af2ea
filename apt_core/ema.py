"""Exponential moving average of a model's trainable parameters (the APT generator you ship).

`ema = decay * ema + (1 - decay) * p`, kept in fp32 by default. Each shadow tensor is a clone of
`p.detach()`, so under FSDP2 it is a DTensor with the parameter's sharding: every rank updates
only its own shard and no communication happens.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn

from apt_core.lora import clean_path


class EMA:
    """EMA of the parameters of `model` that require grad (all of them with `only_trainable=False`)."""

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.995,
        only_trainable: bool = True,
        dtype: torch.dtype | None = torch.float32,
    ):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.num_updates = 0
        self.names: list[str] = []
        self.shadow: list[torch.Tensor] = []
        for name, p in self._named(model, only_trainable):
            self.names.append(name)
            s = p.detach().clone()
            self.shadow.append(s if dtype is None else s.to(dtype))
        if not self.names:
            raise ValueError("EMA found no parameters to track (no parameter requires grad?)")

    @staticmethod
    def _named(model: nn.Module, only_trainable: bool) -> list[tuple[str, torch.Tensor]]:
        return [(clean_path(n), p) for n, p in model.named_parameters() if p.requires_grad or not only_trainable]

    def _params(self, model: nn.Module) -> list[torch.Tensor]:
        params = {clean_path(n): p for n, p in model.named_parameters()}
        missing = [n for n in self.names if n not in params]
        if missing:
            raise KeyError(
                f"model lacks {len(missing)} parameter(s) the EMA tracks (e.g. {missing[:5]}); "
                "was it built differently (LoRA injected, other config) from the model given to EMA()?"
            )
        return [params[n] for n in self.names]

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None) -> None:
        """`ema = decay * ema + (1 - decay) * p` for every tracked parameter, with foreach kernels."""
        d = self.decay if decay is None else float(decay)
        params = [p.detach() for p in self._params(model)]
        same = [i for i, (s, p) in enumerate(zip(self.shadow, params)) if s.dtype == p.dtype]
        other = sorted(set(range(len(params))) - set(same))
        if same:  # lerp: s + (1 - d) (p - s)
            torch._foreach_lerp_([self.shadow[i] for i in same], [params[i] for i in same], 1.0 - d)
        if other:  # mixed precision (e.g. bf16 params, fp32 shadow): mul_ + add_ promote in place
            shadows = [self.shadow[i] for i in other]
            torch._foreach_mul_(shadows, d)
            torch._foreach_add_(shadows, [params[i] for i in other], alpha=1.0 - d)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into the model's parameters (in their own dtype)."""
        for p, s in zip(self._params(model), self.shadow):
            p.copy_(s)

    @contextmanager
    def swap_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily run `model` with the EMA weights (e.g. for validation samples), then restore."""
        params = self._params(model)
        with torch.no_grad():
            backup = [p.detach().clone() for p in params]
            for p, s in zip(params, self.shadow):
                p.copy_(s)
        try:
            yield model
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup):
                    p.copy_(b)

    def state_dict(self) -> dict:
        """`{"decay", "num_updates", "shadow": {name: tensor}}` (DCP-friendly: tensors stay sharded)."""
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": dict(zip(self.names, self.shadow))}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore from `state_dict()`; names and shapes must match the tracked parameters."""
        shadow = state["shadow"]
        missing = [n for n in self.names if n not in shadow]
        unexpected = [n for n in shadow if n not in set(self.names)]
        if missing or unexpected:
            raise KeyError(
                f"EMA state does not match: {len(missing)} missing (e.g. {missing[:5]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:5]})"
            )
        for n, s in zip(self.names, self.shadow):
            t = shadow[n]
            if tuple(t.shape) != tuple(s.shape):
                raise ValueError(f"EMA state {n!r}: shape {list(t.shape)}, expected {list(s.shape)}")
            s.copy_(t)
        self.decay = float(state.get("decay", self.decay))
        self.num_updates = int(state.get("num_updates", 0))

    def to(self, device: torch.device | str) -> EMA:
        """Move the shadow tensors (e.g. to CPU to save accelerator memory)."""
        self.shadow = [s.to(device) for s in self.shadow]
        return self
