"""ComfyUI <-> apt_core adaptation: the two callables of the APT algorithm over a ComfyUI MODEL.

The APT algorithm sees `velocity(x_t, t, cond)` and `features(x, t, cond, layers)` (docs/DESIGN.md).
A ComfyUI MODEL (a `comfy.model_patcher.ModelPatcher`) provides them in two ways:

- `ComfyFlowModel`: calls `patcher.model.diffusion_model` itself (ComfyUI's Wan, with the patches
  ComfyUI applied when it loaded the model), `timestep = t * model_sampling.multiplier` (1000 for
  Wan), block outputs tapped through ComfyUI's `patches_replace["dit"][("double_block", i)]` hook,
  without touching the module. No gradients (ComfyUI makes its weights under inference mode), so it
  serves the frozen consistency-distillation teacher. Nothing is copied.
- `trainable_wan`: an independent `apt_core` `WanFlowModel` built from the MODEL's *effective*
  weights (base + every weight patch, e.g. a LoRA), for anything that needs gradients (generator,
  discriminator backbone in every mode: G's loss backpropagates through D). The input MODEL is never modified; results go back as a
  patched clone (`with_lora`, `with_weights`).

Latents: a LATENT holds raw VAE latents; the diffusion model sees `latent_format.process_in(x)`
("model space"). Training data (shards) and the callables above live in model space.
ComfyUI modules are imported lazily, inside functions: this module imports without ComfyUI.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn as nn

WAN_TEXT_DIM = 4096
WAN_LATENT_CHANNELS = 16
ATTACHMENT = "apt"  # ModelPatcher attachment key carrying what APT trained (see AptWeights)


# ----------------------------------------------------------------------------------------------
# Checks with actionable messages (pure functions, so they are testable without ComfyUI)
# ----------------------------------------------------------------------------------------------


def family_problem(base_model: str, unet_config: dict, use: str = "training") -> str | None:
    """Why a MODEL is not a registered model family (apt_core.models.registry) that `use` takes, or None if it is.

    use: "training" (the training nodes: Consistency Distill, Discriminator, Train, Save Generator) or
    "sampling" (the APT One-Step Sampler, which runs ComfyUI's own model and so takes more families)."""
    from apt_core.models.registry import USES, comfy_family, describe_supported, takes

    fam = comfy_family(base_model, unet_config)
    if fam is not None and takes(fam, use):
        return None
    kind = unet_config.get("model_type", "t2v")
    in_dim = unet_config.get("in_dim", WAN_LATENT_CHANNELS)
    out_dim = unet_config.get("out_dim", WAN_LATENT_CHANNELS)
    what = "APT training nodes do not take" if use == "training" else "APT nodes do not support"
    known = ""
    if fam is not None:
        names = {"training": "the APT training nodes", "sampling": "the APT One-Step Sampler",
                 "headless": "the headless trainer (python -m training)"}
        where = " and ".join(names[u] for u in USES if u != use and takes(fam, u))
        known = f" ({fam.title}: supported by {where}, not by {names[use]} yet)"
    return (
        f"{what} this MODEL: ComfyUI model class {base_model}, model_type={kind!r}, in_dim={in_dim}, "
        f"out_dim={out_dim}{known}. Supported here: {describe_supported(use)}. Load one with 'Load Diffusion Model' (UNETLoader)."
    )


def latent_problem(shape: Sequence[int], channels: int = WAN_LATENT_CHANNELS, patch: tuple[int, int, int] = (1, 2, 2)) -> str | None:
    """Why a LATENT of this shape cannot feed a model with `channels` latent channels, or None if it can."""
    shape = tuple(int(s) for s in shape)
    fix = ("Use an empty video latent (EmptyHunyuanLatentVideo; width/height multiples of 16; length 1 for an image) "
           "or encode with the model's own VAE.")
    if len(shape) != 5:
        return f"LATENT 'samples' has shape {list(shape)} (rank {len(shape)}); this model needs [B, {channels}, F, H, W] (rank 5). {fix}"
    if shape[1] != channels:
        return f"LATENT 'samples' has {shape[1]} channels (shape {list(shape)}); this model needs {channels}. {fix}"
    bad = [f"{ax}={n}" for ax, n, p in zip("FHW", shape[2:], patch) if n % p]
    if bad:
        return f"LATENT 'samples' shape {list(shape)}: {', '.join(bad)} not divisible by the patch size {list(patch)}. {fix}"
    return None


def context_problem(shape: Sequence[int], text_dim: int = WAN_TEXT_DIM) -> str | None:
    """Why a CONDITIONING tensor cannot feed a Wan model (umT5-XXL text), or None if it can."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or shape[2] != text_dim:
        return (
            f"CONDITIONING tensor has shape {list(shape)}; the model needs [B, L, {text_dim}] (umT5-XXL). "
            "Encode the prompt with CLIPLoader(type=wan) + CLIPTextEncode."
        )
    return None


def check_model(model: Any, use: str = "training") -> None:
    """Raise ValueError unless `model` is a ComfyUI MODEL of a registered model family that `use` takes
    ("training": the training nodes; "sampling": the APT One-Step Sampler; see family_problem)."""
    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "diffusion_model"):
        raise ValueError(f"expected a ComfyUI MODEL (ModelPatcher), got {type(model).__name__}")
    cfg = dict(getattr(getattr(base, "model_config", None), "unet_config", {}) or {})
    problem = family_problem(type(base).__name__, cfg, use)
    if problem:
        raise ValueError(problem)


def check_latent(model: Any, samples: torch.Tensor) -> torch.Tensor:
    """The LATENT samples made fit for the model (empty latents get its channels), or a ValueError."""
    import comfy.sample

    samples = comfy.sample.fix_empty_latent_channels(model, samples)
    problem = latent_problem(samples.shape, model.get_model_object("latent_format").latent_channels)
    if problem:
        raise ValueError(problem)
    return samples


def conditioning_context(conditioning: list, batch: int | None = None) -> torch.Tensor:
    """The text context [B, L, 4096] of a CONDITIONING (first entry), repeated to `batch` if given."""
    if not conditioning:
        raise ValueError("CONDITIONING is empty; connect a CLIPTextEncode output")
    ctx = conditioning[0][0]
    problem = context_problem(ctx.shape)
    if problem:
        raise ValueError(problem)
    if batch is not None and ctx.shape[0] != batch:
        ctx = ctx[:1].expand(batch, -1, -1) if ctx.shape[0] == 1 else ctx.repeat_interleave(-(-batch // ctx.shape[0]), 0)[:batch]
    return ctx


# ----------------------------------------------------------------------------------------------
# Latent space
# ----------------------------------------------------------------------------------------------


def to_model_space(model: Any, samples: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents (a LATENT's samples) -> what the diffusion model sees (`process_in`)."""
    return model.get_model_object("latent_format").process_in(samples)


def to_latent_space(model: Any, x: torch.Tensor) -> torch.Tensor:
    """Model-space latents -> raw VAE latents for a LATENT (`process_out`)."""
    return model.get_model_object("latent_format").process_out(x)


# ----------------------------------------------------------------------------------------------
# Frozen callables through ComfyUI's own diffusion model
# ----------------------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised after the deepest tapped block: the rest of the network is not run."""


class ComfyFlowModel(nn.Module):
    """The flow-model protocol over a ComfyUI MODEL's `diffusion_model` (no copy; frozen, no gradients).

    `forward(x_t, t, cond)` -> velocity (fp32), x_t in model space, t [B] in [0, 1];
    `features(x, t, cond, layers)` -> block outputs [B, tokens, dim] after 0-based blocks `layers`
    (taken through `patches_replace`; the blocks after the deepest tap are not run).
    `cond` is a context tensor [B, L, 4096] (or anything with `.context` / `["context"]`); it is
    zero-padded to the model's text length (512), as the public Wan code and umT5 encoding do.
    ComfyUI builds its weights under `torch.inference_mode`, so autograd cannot record through them:
    use it for no-grad passes (the CD teacher); anything needing gradients uses `trainable_wan`.
    """

    def __init__(self, patcher: Any):
        super().__init__()
        check_model(patcher)
        self.patcher = patcher
        self.diffusion_model = patcher.model.diffusion_model  # registered: parameters(), device, dtype
        dm = self.diffusion_model
        ms = patcher.get_model_object("model_sampling")
        self.timestep_scale = float(getattr(ms, "multiplier", 1000.0))
        self.text_len = int(getattr(dm, "text_len", 512))
        self.config = SimpleNamespace(dim=int(dm.dim), num_heads=int(dm.num_heads), num_layers=len(dm.blocks))

    num_layers = property(lambda self: self.config.num_layers)
    hidden_dim = property(lambda self: self.config.dim)

    def load(self) -> ComfyFlowModel:
        """Have ComfyUI load the weights (with their patches) onto its compute device."""
        import comfy.model_management

        comfy.model_management.load_models_gpu([self.patcher])
        return self

    def compute_dtype(self) -> torch.dtype:
        base = self.patcher.model
        return getattr(base, "manual_cast_dtype", None) or base.get_dtype()

    def _context(self, cond: Any, x: torch.Tensor) -> torch.Tensor:
        ctx = cond.context if hasattr(cond, "context") else cond["context"] if isinstance(cond, dict) else cond
        problem = context_problem(ctx.shape)
        if problem:
            raise ValueError(problem)
        if ctx.shape[1] < self.text_len:
            ctx = nn.functional.pad(ctx, (0, 0, 0, self.text_len - ctx.shape[1]))
        return ctx.to(device=x.device, dtype=self.compute_dtype())

    @torch.no_grad()
    def _call(self, x: torch.Tensor, t: torch.Tensor, cond: Any, replace: dict) -> torch.Tensor:
        opts = dict(self.patcher.model_options.get("transformer_options", {}))
        patches = dict(opts.get("patches_replace", {}))
        patches["dit"] = {**patches.get("dit", {}), **replace}
        opts["patches_replace"] = patches
        out = self.diffusion_model(x.to(self.compute_dtype()), (t * self.timestep_scale).float(), context=self._context(cond, x),
                                   transformer_options=opts)
        return out.float()

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        return self._call(x_t, t, cond, {})

    def token_grid(self, x_shape: Sequence[int]) -> tuple[int, int, int]:
        """(F, H, W) of the token grid for x [B, C, F, H, W] (ComfyUI's Wan patch size)."""
        from apt_core.backbone import token_grid

        return token_grid(x_shape, tuple(getattr(self.diffusion_model, "patch_size", (1, 2, 2))))

    def features(self, x: torch.Tensor, t: torch.Tensor, cond: Any, layers: Sequence[int]) -> list[torch.Tensor]:
        layers = [int(i) for i in layers]
        if not layers or any(not 0 <= i < self.num_layers for i in layers):
            raise ValueError(f"feature layers {layers} must be non-empty and within [0, {self.num_layers - 1}]")
        deepest, wanted, feats = max(layers), set(layers), {}

        def tap(i: int):
            def block(args, extra):
                out = extra["original_block"](args)
                if i in wanted:
                    feats[i] = out["img"]
                if i == deepest:
                    raise _StopForward
                return out

            return block

        try:
            self._call(x, t, cond, {("double_block", i): tap(i) for i in range(deepest + 1)})
        except _StopForward:
            pass
        return [feats[i] for i in layers]


# ----------------------------------------------------------------------------------------------
# Trainable copies and results as patched clones
# ----------------------------------------------------------------------------------------------


def effective_state_dict(model: Any, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The diffusion model's weights with every ComfyUI weight patch applied, in Wan keys (CPU)."""
    import comfy.lora

    prefix = "diffusion_model."
    out = {}
    for key, patches in model.get_key_patches(prefix).items():
        weight, convert = patches[0]
        w = convert(weight.to(device="cpu", dtype=torch.float32, copy=True), inplace=True)
        if len(patches) > 1:
            w = comfy.lora.calculate_weight(patches[1:], w, key)
        out[key[len(prefix):]] = w.to(dtype or weight.dtype) if w.is_floating_point() else w
    return out


def weights_fingerprint(model: Any, names: tuple[str, ...] = ("blocks.0.self_attn.q.weight", "head.head.weight")) -> str:
    """A short hash of a few of the MODEL's effective weights (every patch applied, e.g. a LoRA): changes when
    another model is loaded or the patches change (a retrained LoRA). Computes only those tensors."""
    import hashlib

    import comfy.lora

    prefix, h = "diffusion_model.", hashlib.sha256()
    patched = model.get_key_patches(prefix)
    for name in names:
        if prefix + name not in patched:
            continue
        weight, convert = patched[prefix + name][0]
        w = convert(weight.to(device="cpu", dtype=torch.float32, copy=True), inplace=True)
        if len(patched[prefix + name]) > 1:
            w = comfy.lora.calculate_weight(patched[prefix + name][1:], w, prefix + name)
        h.update(name.encode())
        h.update(w.float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def model_signature(model: Any) -> dict[str, tuple[int, ...]]:
    """Parameter names -> shapes of a MODEL's diffusion model (what 'the same architecture' means)."""
    return {k: tuple(v.shape) for k, v in model.model.diffusion_model.state_dict().items()}


def trainable_wan(model: Any, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    """An independent apt_core WanFlowModel holding the MODEL's effective weights (never shared)."""
    from apt_core.backbone import WanFlowModel
    from apt_core.models.io import infer_wan_config, load_into

    check_model(model)
    sd = effective_state_dict(model, dtype)
    cfg = infer_wan_config(sd)
    with torch.device("meta"):
        flow = WanFlowModel(cfg)
    load_into(flow, sd, strict=True, source="ComfyUI MODEL")
    return flow.to(device)


@dataclasses.dataclass
class AptWeights:
    """What APT put into a MODEL (its attachment): LoRAs in ComfyUI keys, or full Wan weights."""

    loras: list[dict[str, torch.Tensor]] = dataclasses.field(default_factory=list)
    full: bool = False
    patch_count: int = 0  # ModelPatcher patch entries these weights account for
    info: dict = dataclasses.field(default_factory=dict)


def apt_weights(model: Any) -> AptWeights | None:
    """The AptWeights attached to a MODEL by an APT node, if any."""
    get = getattr(model, "get_attachment", None)
    return get(ATTACHMENT) if get is not None else None


def _attach(model: Any, prev: AptWeights | None, **changes) -> None:
    base = prev or AptWeights()
    model.set_attachments(ATTACHMENT, dataclasses.replace(base, **changes))


def with_lora(model: Any, lora_sd: dict[str, torch.Tensor], info: dict | None = None) -> Any:
    """A clone of `model` with a ComfyUI-native LoRA applied (as LoraLoaderModelOnly would)."""
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches = comfy.lora.load_lora(lora_sd, key_map)
    out = model.clone()
    added = out.add_patches(patches, 1.0)
    if len(added) != len(patches) or not patches:
        missing = sorted(set(map(str, patches)) - set(map(str, added)))[:5]
        raise ValueError(f"LoRA does not fit this MODEL: {len(patches) - len(added)} of {len(patches)} modules not found (e.g. {missing})")
    prev = apt_weights(model)
    _attach(out, prev, loras=[*(prev.loras if prev else []), lora_sd], patch_count=(prev.patch_count if prev else 0) + len(added),
            info={**(prev.info if prev else {}), **(info or {})})
    return out


def with_weights(model: Any, sd: dict[str, torch.Tensor], info: dict | None = None) -> Any:
    """A clone of `model` whose diffusion weights are replaced by `sd` (Wan keys) via 'set' patches."""
    out = model.clone()
    patches = {f"diffusion_model.{k}": ("set", (v,)) for k, v in sd.items()}
    added = out.add_patches(patches, 1.0)
    if len(added) != len(patches):
        raise ValueError(f"weights do not fit this MODEL: {len(patches) - len(added)} of {len(patches)} keys unknown")
    prev = apt_weights(model)
    _attach(out, prev, loras=[], full=True, patch_count=sum(len(v) for v in out.patches.values()),
            info={**(prev.info if prev else {}), **(info or {})})
    return out


def combine_loras(loras: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One ComfyUI-native LoRA equal to the sum of several: ranks concatenated, scales folded in.

    For each module `sum_i s_i up_i down_i` (s_i = alpha_i / rank_i) = `[s_1 up_1 | s_2 up_2] @
    [down_1; down_2]`, written with alpha = total rank (scale 1). One LoRA is returned unchanged.
    """
    if len(loras) == 1:
        return dict(loras[0])
    groups: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for sd in loras:
        for k, down in sd.items():
            if not k.endswith(".lora_down.weight"):
                continue
            base = k[: -len(".lora_down.weight")]
            up = sd[f"{base}.lora_up.weight"]
            alpha = float(sd[f"{base}.alpha"]) if f"{base}.alpha" in sd else float(down.shape[0])
            groups.setdefault(base, []).append((up.float() * (alpha / down.shape[0]), down.float()))
    out = {}
    for base, parts in groups.items():
        up = torch.cat([u for u, _ in parts], dim=1)
        down = torch.cat([d for _, d in parts], dim=0)
        out[f"{base}.lora_up.weight"], out[f"{base}.lora_down.weight"] = up, down
        out[f"{base}.alpha"] = torch.tensor(float(down.shape[0]))
    return out
