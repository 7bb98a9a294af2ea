"""Single-process training runs behind the ComfyUI training nodes (pure PyTorch, no ComfyUI).

`APTRun` (stage 2) and `CDRun` (stage 1) wrap `apt_core.trainer`'s steps with what a node needs:
a shape-bucketed loader over the shards, EMA, fixed-seed validation samples, a metrics history,
and a state directory that a later run resumes from. `run_loop` drives either one step at a time
and calls `on_step` after each (the node updates its ProgressBar and checks for Stop there); on any
exception, Stop included, the state is saved first, so nothing trained is lost.

State directory (each file written atomically, `state.json` last; each names its step, so a resume
refuses a directory where an interrupted save replaced only some files):
    state.json                       step, settings, loader position, metrics history
    generator.safetensors            trainable generator tensors by parameter name (LoRA adapters, or all weights)
    generator_ema.safetensors        their EMA (what the node outputs)
    discriminator.safetensors        trainable discriminator tensors (heads + LoRA / backbone)   [APT]
    optim.pt                         optimiser states (loaded with torch.load(weights_only=True))
    samples/step-NNNNNN.safetensors  validation latents (model space) with the seeds in the metadata
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from apt_core.trainer import CDConfig

STATE_FILE = "state.json"
STEP_KEY = "apt.step"  # the step a run-state file was saved at (safetensors metadata, optim.pt entry)
log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class APTSettings:
    """Stage-2 settings of the APTTrain node (defaults: the paper's image stage on one GPU)."""

    steps: int = 350
    lr: float = 5e-6
    lr_d: float = 0.0  # 0 = lr
    batch_size: int = 1
    grad_accum: int = 1
    r1_sigma: float = 0.01
    r1_lambda: float = 100.0
    d_timestep_shift: float = 1.0
    ema_decay: float = 0.995
    lora_rank: int = 16  # 0 = full fine-tune of the generator
    val_every: int = 50
    val_seed: int = 0
    seed: int = 0
    autocast: str | None = None  # None | "bf16"
    gradient_checkpointing: bool = True

    # keys that must match to resume a state directory
    STRUCTURAL = ("lora_rank", "batch_size", "grad_accum", "seed")


@dataclasses.dataclass
class CDSettings:
    """Stage-1 settings of the APTConsistencyDistill node."""

    steps: int = 500
    lr: float = 1e-5
    weight_decay: float = 0.01
    batch_size: int = 1
    grad_accum: int = 1
    grid_steps: int = 32
    grid_shift: float = CDConfig.shift  # the one default (apt_core.trainer.CDConfig)
    cfg_scale: float = 1.0
    lora_rank: int = 32  # 0 = full fine-tune of the student
    seed: int = 0
    autocast: str | None = None
    gradient_checkpointing: bool = True

    STRUCTURAL = ("lora_rank", "batch_size", "grad_accum", "seed", "grid_steps", "grid_shift")


def _settings_dict(s: Any) -> dict:
    return dataclasses.asdict(s)


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomic safetensors write (apt_core.models.io), replacing the run's previous file."""
    from apt_core.models.io import save_state_dict_file

    save_state_dict_file(tensors, path, metadata=metadata, overwrite=True)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a run-state safetensors file."""
    from safetensors.torch import load_file

    return load_file(str(path))


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (by name), detached."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    """Copy saved trainable tensors back; names and shapes must match exactly."""
    own = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(own) != set(sd):
        missing, extra = sorted(set(own) - set(sd))[:3], sorted(set(sd) - set(own))[:3]
        raise ValueError(f"saved {what} does not match this run (missing {missing}, unexpected {extra}); "
                         "start a new run (resume=false or another run name)")
    with torch.no_grad():
        for n, p in own.items():
            if p.shape != sd[n].shape:
                raise ValueError(f"saved {what} tensor {n} has shape {tuple(sd[n].shape)}, this run has {tuple(p.shape)}")
            p.copy_(sd[n])


# ----------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------


def make_trainable(model: nn.Module, lora_rank: int) -> nn.Module:
    """LoRA adapters of `lora_rank` (fp32) on frozen weights, or with rank 0 every weight trainable."""
    from apt_core.lora import inject_lora

    if lora_rank:
        inject_lora(model, lora_rank, lora_dtype=torch.float32)
    else:
        model.requires_grad_(True)
    return model


def make_loader(dataset_path: str | os.PathLike, batch_size: int, seed: int) -> Any:
    """Shape-bucketed, resumable loader over a shard directory (training.data)."""
    from training.data import BucketedLoader, ShardDataset

    ds = ShardDataset(str(dataset_path))
    return BucketedLoader(ds, batch_size, seed=seed, drop_last=False)


def to_cond(text_emb: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """A Wan condition from a batch of text embeddings [B, L, D]."""
    from apt_core.backbone import WanCond

    return WanCond(context=text_emb.to(device=device, dtype=dtype or text_emb.dtype))


class _Run:
    """Shared plumbing: loader, history, state files."""

    kind = "run"

    def __init__(self, settings: Any, loader: Any, device: torch.device, state_dir: str | os.PathLike | None):
        self.settings, self.loader, self.device = settings, loader, torch.device(device)
        self.state_dir = Path(state_dir) if state_dir else None
        self.step_count = 0
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.last_samples: torch.Tensor | None = None

    def record(self, metrics: dict[str, torch.Tensor]) -> dict[str, float]:
        """Append a step's metrics to the history (host sync: once per step, which a node can afford)."""
        out = {k: float(v) for k, v in metrics.items()}
        for k, v in out.items():
            self.history.setdefault(k, []).append((self.step_count, v))
        return out

    def next_batch(self) -> tuple[torch.Tensor, Any]:
        """(latents fp32 [B, C, F, H, W], Wan condition) of the loader's next batch, on the run's device."""
        b = next(self.loader)
        return b.latent.to(self.device, torch.float32), to_cond(b.text_emb, self.device)

    # -- state ------------------------------------------------------------------------------
    def _tensor_files(self) -> dict[str, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def _load_tensor_files(self, files: dict[str, dict[str, torch.Tensor]]) -> None:
        raise NotImplementedError

    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        raise NotImplementedError

    def save(self) -> Path | None:
        """Write the state directory (tensor files first, state.json last); None without a directory."""
        from apt_core.fileio import atomic_path, atomic_write_text

        if self.state_dir is None:
            return None
        self.state_dir.mkdir(parents=True, exist_ok=True)
        stamp = {STEP_KEY: str(self.step_count)}  # every file names its step: resume detects a torn save
        for name, sd in self._tensor_files().items():
            save_tensors(self.state_dir / f"{name}.safetensors", sd, stamp)
        optim = {STEP_KEY: self.step_count, **{k: o.state_dict() for k, o in self._optimizers().items()}}
        with atomic_path(self.state_dir / "optim.pt") as tmp:
            torch.save(optim, tmp)
        state = {"kind": self.kind, "step": self.step_count, "settings": _settings_dict(self.settings),
                 "loader": self.loader.state_dict(), "history": self.history}
        atomic_write_text(self.state_dir / STATE_FILE, json.dumps(state, indent=1))
        return self.state_dir

    def resume(self) -> bool:
        """Load the state directory if it holds a state of this kind; False if there is none."""
        from apt_core.models.io import read_metadata

        if self.state_dir is None or not (self.state_dir / STATE_FILE).is_file():
            return False
        state = json.loads((self.state_dir / STATE_FILE).read_text())
        if state.get("kind") != self.kind:
            raise ValueError(f"{self.state_dir} holds a {state.get('kind')!r} state, not {self.kind!r}; use another run name")
        mine = _settings_dict(self.settings)
        diff = {k: (state["settings"].get(k), mine[k]) for k in self.settings.STRUCTURAL if state["settings"].get(k) != mine[k]}
        if diff:
            raise ValueError(f"cannot resume {self.state_dir}: settings changed {diff} (saved, now); "
                             "restore them, or set resume=false / use another run name to start over")
        step = int(state["step"])
        files = {n: self.state_dir / f"{n}.safetensors" for n in self._tensor_files()}
        optim = torch.load(self.state_dir / "optim.pt", map_location=self.device, weights_only=True)
        stamps = {p.name: read_metadata(p).get(STEP_KEY) for p in files.values()} | {"optim.pt": optim.pop(STEP_KEY, None)}
        torn = {name: s for name, s in stamps.items() if s is not None and int(s) != step}
        if torn:  # a save was interrupted after some files were replaced: do not mix two steps
            raise ValueError(f"cannot resume {self.state_dir}: {STATE_FILE} is from step {step} but {torn} (file: step) "
                             "are from another step (an interrupted save); set resume=false / use another run name")
        self.step_count = step
        self._load_tensor_files({n: load_tensors(p) for n, p in files.items()})
        for k, o in self._optimizers().items():
            load_optimizer_state(o, optim[k], f"{self.state_dir / 'optim.pt'} [{k!r}]")
        self.loader.load_state_dict(state["loader"])
        self.history = {k: [tuple(x) for x in v] for k, v in state["history"].items()}
        return True


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict, where: str) -> None:
    """Load an optimiser state; one saved by another optimiser (e.g. Adam before make_rmsprop was RMSprop) is an error."""
    opt.load_state_dict(state)
    missing = sorted({k for g in opt.param_groups for k in opt.defaults if k not in g})
    if missing:
        raise ValueError(f"{where} is not a {type(opt).__name__} state (it lacks {missing}); it was saved by another "
                         "optimiser, e.g. an older version's Adam: set resume=false / use another run name to start over")


class APTRun(_Run):
    """Stage 2: alternating D / G steps (apt_core.trainer.APTTrainer), EMA of G, validation samples.

    `generator` and `discriminator` are independent trainable modules (LoRA already injected into
    the generator when lora_rank > 0, or all its parameters trainable). `val_cond` / `val_shape`:
    the fixed validation prompts and latent shape (their count = val_shape[0]).
    """

    kind = "apt"

    def __init__(self, generator: nn.Module, discriminator: nn.Module, loader: Any, settings: APTSettings,
                 device: torch.device, state_dir: str | os.PathLike | None = None,
                 val_cond: Any = None, val_shape: tuple[int, ...] | None = None):
        from apt_core.ema import EMA
        from apt_core.trainer import APTConfig, APTTrainer, make_rmsprop

        super().__init__(settings, loader, device, state_dir)
        s = settings
        self.generator, self.discriminator = generator, discriminator
        g_params = [p for p in generator.parameters() if p.requires_grad]
        d_params = [p for p in discriminator.parameters() if p.requires_grad]
        if not g_params or not d_params:
            raise ValueError(f"nothing to train: generator has {len(g_params)}, discriminator {len(d_params)} trainable tensors")
        self.opt_g, self.opt_d = make_rmsprop(g_params, s.lr), make_rmsprop(d_params, s.lr_d or s.lr)
        self.ema = EMA(generator, s.ema_decay)
        sfv = getattr(discriminator, "noised_inputs", False)  # SF-V's D: its hinge loss (R1 stays approximated: memory)
        cfg = APTConfig(loss="hinge" if sfv else "nonsaturating", r1_lambda=s.r1_lambda, r1_sigma=s.r1_sigma,
                        d_timestep_shift=s.d_timestep_shift, grad_accum=s.grad_accum, autocast_dtype=s.autocast)
        self.trainer = APTTrainer(generator, discriminator, self.opt_g, self.opt_d, cfg, self.ema)
        self.val_cond, self.val_shape = val_cond, val_shape

    def step(self) -> dict[str, float]:
        """One D step then one G step (and the EMA update) on the next batch."""
        x, cond = self.next_batch()
        metrics = self.trainer.d_step(x, cond)
        metrics.update(self.trainer.g_step(cond, x_real=x))
        self.step_count += 1
        return self.record(metrics)

    @torch.no_grad()
    def validate(self) -> torch.Tensor | None:
        """EMA generator samples from fixed seeds (model space); saved under samples/ with a state dir."""
        from apt_core.flow import generate_one_step
        from apt_core.trainer import autocast_context

        if self.val_cond is None or self.val_shape is None:
            return None
        n = self.val_shape[0]
        z = torch.stack([torch.randn(self.val_shape[1:], generator=torch.Generator().manual_seed(self.settings.val_seed + i))
                         for i in range(n)]).to(self.device)
        with self.ema.swap_into(self.generator), autocast_context(self.device, self.settings.autocast):
            x0 = generate_one_step(self.generator, z, self.val_cond).float()
        self.last_samples = x0.cpu()
        m = {"val_std": x0.std()}
        if n > 1:
            m["val_diversity"] = torch.pdist(x0.flatten(1)).mean() / x0.flatten(1).norm(dim=1).mean().clamp_min(1e-8)
        self.record(m)
        if self.state_dir is not None:
            (self.state_dir / "samples").mkdir(parents=True, exist_ok=True)
            save_tensors(self.state_dir / "samples" / f"step-{self.step_count:06d}.safetensors", {"latent": self.last_samples},
                         {"seeds": json.dumps([self.settings.val_seed + i for i in range(n)]), "space": "model"})
        return self.last_samples

    def _tensor_files(self):
        return {"generator": trainable_state(self.generator), "generator_ema": self.ema_state(),
                "discriminator": trainable_state(self.discriminator)}

    def _load_tensor_files(self, files):
        load_trainable(self.generator, files["generator"], "generator")
        load_trainable(self.discriminator, files["discriminator"], "discriminator")
        self.ema.load_state_dict({"decay": self.ema.decay, "num_updates": self.step_count, "shadow": files["generator_ema"]})

    def ema_state(self) -> dict[str, torch.Tensor]:
        """The EMA shadow tensors by parameter name (what the node outputs)."""
        return self.ema.state_dict()["shadow"]

    def _optimizers(self):
        return {"g": self.opt_g, "d": self.opt_d}


class CDRun(_Run):
    """Stage 1: consistency distillation of a frozen teacher into a trainable student."""

    kind = "cd"

    def __init__(self, student: nn.Module, teacher: nn.Module, loader: Any, settings: CDSettings,
                 device: torch.device, state_dir: str | os.PathLike | None = None, neg_context: torch.Tensor | None = None):
        from apt_core.trainer import CDConfig, CDTrainer

        super().__init__(settings, loader, device, state_dir)
        s = settings
        self.student, self.teacher = student, teacher
        params = [p for p in student.parameters() if p.requires_grad]
        if not params:
            raise ValueError("nothing to train: the student has no trainable tensors")
        self.opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
        cfg = CDConfig(steps=s.grid_steps, shift=s.grid_shift, cfg_scale=s.cfg_scale, grad_accum=s.grad_accum,
                       autocast_dtype=s.autocast)
        if s.cfg_scale != 1.0 and neg_context is None:
            raise ValueError(f"cfg={s.cfg_scale} needs a negative CONDITIONING (connect one, or set cfg to 1)")
        self.trainer = CDTrainer(student, teacher, self.opt, cfg)
        self.neg_context = neg_context

    def step(self) -> dict[str, float]:
        """One consistency-distillation step on the next batch."""
        x, cond = self.next_batch()
        neg = None
        if self.neg_context is not None:
            neg = to_cond(self.neg_context[:1].expand(x.shape[0], -1, -1), self.device, cond.context.dtype)
        metrics = self.trainer.cd_step(x, cond, neg)
        self.step_count += 1
        return self.record(metrics)

    def _tensor_files(self):
        return {"generator": trainable_state(self.student)}

    def _load_tensor_files(self, files):
        load_trainable(self.student, files["generator"], "student")

    def _optimizers(self):
        return {"student": self.opt}


def export_weights(model: nn.Module, ema: Any = None) -> tuple[str, dict[str, torch.Tensor]]:
    """("lora", ComfyUI-native LoRA tensors) for a LoRA model, else ("full", Wan-key weights); EMA weights if given."""
    from contextlib import nullcontext

    from apt_core.lora import base_state_dict, lora_modules, lora_state_dict

    with ema.swap_into(model) if ema is not None else nullcontext():
        if lora_modules(model):
            return "lora", {k: v.float().cpu() for k, v in lora_state_dict(model).items()}
        return "full", {k: v.detach().cpu().clone() for k, v in base_state_dict(model).items()}


def run_loop(run: _Run, steps: int, on_step: Callable[[int, dict[str, float]], None] | None = None,
             val_every: int = 0) -> _Run:
    """Train `run` until `steps`; `on_step(step, metrics)` after each step (raise there to stop).

    Validation (APT) every `val_every` steps and at the end. The state is saved at the end and, before
    re-raising, on any exception (Stop included) once at least one step has run.
    """
    from apt_core.trainer import is_finite_metrics

    start = run.step_count
    log.info("APT %s: training steps %d..%d (state: %s)", run.kind, start + 1, steps, run.state_dir)
    try:
        while run.step_count < steps:
            metrics = run.step()
            if not is_finite_metrics(metrics):
                raise FloatingPointError(f"step {run.step_count}: non-finite metrics {metrics}; lower the learning rate "
                                         "or raise r1_lambda")
            if val_every and run.step_count % val_every == 0 and hasattr(run, "validate"):
                run.validate()
            if on_step is not None:
                on_step(run.step_count, metrics)
    except BaseException:
        if run.step_count > start:
            run.save()
        raise
    if hasattr(run, "validate") and (run.last_samples is None or not val_every or run.step_count % val_every):
        run.validate()
    run.save()
    return run
