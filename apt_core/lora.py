"""LoRA adapters on the Wan linears, exported and imported with ComfyUI-native keys.

`inject_lora` swaps matching `nn.Linear` modules for `LoRALinear` (still an `nn.Linear`: `weight`
and `bias` keep their names, so base keys stay the Wan checkpoint's) and freezes everything else.
`lora_state_dict` writes `diffusion_model.<module path>.lora_up.weight` / `.lora_down.weight` /
`.alpha`, the keys ComfyUI's LoraLoaderModelOnly reads; the effective weight is
`W + (alpha / rank) * up @ down`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

# Linears of every Wan block (self/cross attention projections and the FFN), as module-path suffixes.
DEFAULT_TARGETS: tuple[str, ...] = tuple(
    [f"self_attn.{n}" for n in "qkvo"] + [f"cross_attn.{n}" for n in "qkvo"] + ["ffn.0", "ffn.2"]
)
LORA_KEY_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
# path components added by wrappers (torch.compile, DDP, FSDP1, activation checkpointing)
_WRAPPER_PARTS = ("_orig_mod", "module", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")
_SUFFIXES = (".lora_up.weight", ".lora_down.weight", ".alpha")


def clean_path(name: str) -> str:
    """A module/parameter path without wrapper components (`_orig_mod.`, `module.`, ...)."""
    return ".".join(p for p in name.split(".") if p not in _WRAPPER_PARTS)


class LoRALinear(nn.Linear):
    """`nn.Linear` plus a low-rank update: `y = x W^T + b + (alpha / rank) * up(down(x))`.

    `lora_down.weight` is [rank, in] (kaiming-uniform, as PEFT), `lora_up.weight` is [out, rank]
    (zeros, so a fresh adapter changes nothing). `alpha` is a plain float (exported as a 0-d tensor).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float | None = None,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        lora_dtype: torch.dtype | None = None,
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._add_adapter(rank, alpha, lora_dtype)

    def _add_adapter(self, rank: int, alpha: float | None, lora_dtype: torch.dtype | None) -> None:
        """`lora_down` [rank, in] / `lora_up` [out, rank] beside the weight (its device; `lora_dtype` or its dtype)."""
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.rank, self.alpha = rank, float(rank if alpha is None else alpha)
        w = self.weight
        self.lora_down = nn.Linear(self.in_features, rank, bias=False, device=w.device, dtype=lora_dtype or w.dtype)
        self.lora_up = nn.Linear(rank, self.out_features, bias=False, device=w.device, dtype=lora_dtype or w.dtype)
        self.reset_lora_parameters()

    @property
    def scale(self) -> float:
        """The adapter's multiplier `alpha / rank` (ComfyUI's rule)."""
        return self.alpha / self.rank

    def reset_lora_parameters(self) -> None:
        """PEFT's init: down kaiming-uniform(a=sqrt(5)), up zero (no-op on the meta device)."""
        if self.lora_down.weight.is_meta:
            return
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, rank: int, alpha: float | None = None, lora_dtype: torch.dtype | None = None
    ) -> LoRALinear:
        """Wrap an existing Linear, reusing its weight/bias Parameters (nothing is copied)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.register_parameter("weight", linear.weight)
        new.register_parameter("bias", linear.bias)
        new._add_adapter(rank, alpha, lora_dtype)
        new.train(linear.training)
        return new

    def delta_weight(self) -> torch.Tensor:
        """`scale * up @ down` [out, in], in fp32."""
        return self.scale * (self.lora_up.weight.float() @ self.lora_down.weight.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        down = self.lora_down.weight
        return out + (self.lora_up(self.lora_down(x.to(down.dtype))) * self.scale).to(out.dtype)

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding this module's (merged or not) weight and bias Parameters."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.register_parameter("weight", self.weight)
        lin.register_parameter("bias", self.bias)
        lin.train(self.training)
        return lin

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def _matches(path: str, targets: Sequence[str]) -> bool:
    path = clean_path(path)
    return any(path == t or path.endswith("." + t) for t in targets)


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The LoRALinear modules of a model by clean module path."""
    return {clean_path(n): m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (what an optimiser trains after `inject_lora`)."""
    return [p for m in lora_modules(model).values() for p in (m.lora_down.weight, m.lora_up.weight)]


def inject_lora(
    model: nn.Module,
    rank: int,
    alpha: float | None = None,
    targets: Sequence[str] = DEFAULT_TARGETS,
    lora_dtype: torch.dtype | None = None,
) -> list[str]:
    """Replace the `nn.Linear` modules whose path ends with a target by `LoRALinear`; freeze the rest.

    Returns the (clean) module paths that got an adapter. `alpha=None` means alpha = rank (scale 1).
    """
    paths = [
        n for n, m in model.named_modules() if type(m) is nn.Linear and _matches(n, targets)
    ]
    if not paths:
        done = [n for n, m in model.named_modules() if isinstance(m, LoRALinear) and _matches(n, targets)]
        if done:
            raise ValueError(f"the target modules already have LoRA adapters (e.g. {clean_path(done[0])})")
        raise ValueError(f"no nn.Linear module path ends with one of the LoRA targets {list(targets)}")
    model.requires_grad_(False)
    for n in paths:
        _set_module(model, n, LoRALinear.from_linear(model.get_submodule(n), rank, alpha, lora_dtype))
    for p in lora_parameters(model):
        p.requires_grad_(True)
    return [clean_path(n) for n in paths]


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def lora_state_dict(model: nn.Module, prefix: str = "diffusion_model.") -> dict[str, torch.Tensor]:
    """Adapters in ComfyUI-native keys: `<prefix><path>.lora_up.weight`, `.lora_down.weight`, `.alpha` (0-d)."""
    out: dict[str, torch.Tensor] = {}
    for path, m in lora_modules(model).items():
        key = f"{prefix}{path}"
        out[f"{key}.lora_up.weight"] = _full(m.lora_up.weight).detach().clone()
        out[f"{key}.lora_down.weight"] = _full(m.lora_down.weight).detach().clone()
        out[f"{key}.alpha"] = torch.tensor(m.alpha, dtype=torch.float32)
    if not out:
        raise ValueError("the model has no LoRA adapters (call inject_lora first)")
    return out


def _strip_lora_prefix(key: str) -> str:
    for p in LORA_KEY_PREFIXES:
        if key.startswith(p):
            return key[len(p) :]
    return key


def load_lora_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> list[str]:
    """Load ComfyUI-style LoRA tensors (with or without the `diffusion_model.` prefix).

    Plain `nn.Linear` modules named by the keys get an adapter of the file's rank first, so a fresh
    model can load a LoRA file directly. Keys naming no module, non-Linear modules, unsupported
    kinds (`.diff`, LoHa, ...) or wrong shapes raise a ValueError naming them. Returns module paths.
    """
    groups: dict[str, dict[str, torch.Tensor]] = {}
    bad: list[str] = []
    for key, t in sd.items():
        k = _strip_lora_prefix(key)
        suffix = next((s for s in _SUFFIXES if k.endswith(s)), None)
        if suffix is None:
            bad.append(key)
            continue
        groups.setdefault(k[: -len(suffix)], {})[suffix] = t
    if bad:
        raise ValueError(
            f"{len(bad)} LoRA key(s) of an unsupported kind (e.g. {bad[:5]}); "
            f"only {list(_SUFFIXES)} (ComfyUI LoRA up/down/alpha) are understood"
        )
    modules = {clean_path(n): n for n, _ in model.named_modules()}
    unknown = [p for p in groups if p not in modules]
    if unknown:
        raise ValueError(
            f"{len(unknown)} LoRA module path(s) name no module of the model (e.g. {unknown[:5]}); "
            "is this LoRA for a different model (or prefixed with something other than diffusion_model.)?"
        )
    for path, g in groups.items():
        if ".lora_up.weight" not in g or ".lora_down.weight" not in g:
            raise ValueError(f"LoRA for {path!r} needs both lora_up.weight and lora_down.weight, got {sorted(g)}")
        up, down = g[".lora_up.weight"], g[".lora_down.weight"]
        rank = down.shape[0]
        alpha = float(g[".alpha"]) if ".alpha" in g else float(rank)  # ComfyUI: no alpha -> scale 1
        name = modules[path]
        m = model.get_submodule(name)
        if not isinstance(m, nn.Linear):
            raise ValueError(f"LoRA for {path!r}: that module is a {type(m).__name__}, not an nn.Linear")
        want_down, want_up = (rank, m.in_features), (m.out_features, rank)
        if tuple(down.shape) != want_down or tuple(up.shape) != want_up:
            raise ValueError(
                f"LoRA for {path!r}: lora_down {list(down.shape)} / lora_up {list(up.shape)}, "
                f"expected {list(want_down)} / {list(want_up)} for Linear({m.in_features}, {m.out_features})"
            )
        if not isinstance(m, LoRALinear) or m.rank != rank:
            base = m.to_linear() if isinstance(m, LoRALinear) else m
            m = LoRALinear.from_linear(base, rank, alpha, lora_dtype=down.dtype)
            m.weight.requires_grad_(False)
            if m.bias is not None:
                m.bias.requires_grad_(False)
            _set_module(model, name, m)
        m.alpha = alpha
        with torch.no_grad():
            m.lora_down.weight.copy_(down)
            m.lora_up.weight.copy_(up)
    return list(groups)


def merge_lora(model: nn.Module) -> list[str]:
    """Fold every adapter into its base weight (`W += scale * up @ down`) and turn the module back
    into a plain nn.Linear, so the model's state dict is the Wan checkpoint's again. Returns paths."""
    merged = []
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]:
        with torch.no_grad():
            m.weight.copy_((m.weight.float() + m.delta_weight().to(m.weight.device)).to(m.weight.dtype))
        _set_module(model, name, m.to_linear())
        merged.append(clean_path(name))
    return merged


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without adapter tensors, in clean Wan keys (unmerged base weights)."""
    return {
        clean_path(k): v
        for k, v in model.state_dict().items()
        if ".lora_down." not in k and ".lora_up." not in k
    }
