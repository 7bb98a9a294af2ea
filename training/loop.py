"""The training stages (teacher, cd, apt) and the loop that runs them with checkpoints and monitoring.

A stage owns its models, optimisers and EMA and has one `step(step, batch) -> metrics` method. All
random draws of a step come from per-sample seeds (training.distributed), so the same config gives
the same losses at any world size with the same global batch. APT runs two phases, as in the paper:
images, then video with G initialised from the image phase's EMA and D re-initialised from the
ORIGINAL diffusion weights.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from apt_core.backbone import WanCond, WanFlowModel, index_cond
from apt_core.discriminator import APTDiscriminator
from apt_core.ema import EMA
from apt_core.flow import add_noise, generate_one_step, sample_timesteps
from apt_core.lora import inject_lora
from apt_core.models.io import config_from_metadata, infer_wan_config, load_state_dict_file, read_metadata
from apt_core.models.registry import family_of_config, family_of_preset
from apt_core.models.wan import WanConfig, get_config
from apt_core.sfv import SFVDiscriminator
from apt_core.trainer import APTConfig, APTTrainer, CDConfig, CDTrainer, make_rmsprop
from training import distributed as D
from training.checkpoint import CheckpointManager, ModelOptimState, ObjectState, read_info, verify
from training.config import ConfigError, RunConfig, dumps, load_config, save_config, to_dict
from training.data import Batch, BucketedLoader, ShardDataset
from training.export import export_files, export_generator, read_export_info
from training.monitor import (
    CollapseDetector,
    MetricsLogger,
    Validator,
    count_flops,
    nonfinite_metrics,
    peak_tflops,
)
from training.parallelize import autocast_dtype, parallelize, reshard
from training.preflight import preflight
from training.runlock import run_lock
from training.stop import StopRequest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

log = logging.getLogger(__name__)


@dataclass
class Phase:
    """A stretch of steps with one dataset and one set of hyper-parameters (apt: image / video)."""

    name: str
    start: int  # global step before the phase's first step
    steps: int
    data: str
    micro_batch: int
    grad_accum: int
    index: int
    apt: Any = None  # config.APTPhase for the apt phases

    @property
    def end(self) -> int:
        return self.start + self.steps


def plan_phases(cfg: RunConfig) -> list[Phase]:
    """The phases of the configured stage, with global step ranges."""
    d = cfg.data
    if cfg.run.stage != "apt":
        return [Phase(cfg.run.stage, 0, cfg.run.steps, d.path, d.micro_batch, d.grad_accum, 0)]
    phases, start = [], 0
    for i, name in enumerate(("image", "video")):
        p = getattr(cfg.apt, name)
        if p.steps:
            phases.append(Phase(name, start, p.steps, p.data or d.path, p.micro_batch or d.micro_batch,
                                p.grad_accum or d.grad_accum, i, p))
            start += p.steps
    return phases


# ----------------------------------------------------------------------------------------------
# Models: meta build -> parallelize -> weights broadcast from rank 0
# ----------------------------------------------------------------------------------------------


def original_weights(cfg: RunConfig) -> tuple[str, str]:
    """(G's, D's) ORIGINAL diffusion weights: model.init_from for both, or for a mixture-of-experts
    preset the files of model.generator_expert / model.discriminator_expert (the family's choice by default)."""
    m = cfg.model
    if not m.expert_files:
        if m.generator_expert or m.discriminator_expert:
            raise ConfigError("model.generator_expert / model.discriminator_expert need model.expert_files (one file per expert)")
        return m.init_from, m.init_from
    if m.init_from:
        raise ConfigError(f"give model.init_from ({m.init_from!r}) or model.expert_files, not both")
    if cfg.run.stage != "apt":
        raise ConfigError(f"model.expert_files is for run.stage = 'apt' (G and D from their experts); stage {cfg.run.stage!r} "
                          "would need the experts switched by time, which is not supported")
    files = {}
    for entry in m.expert_files:
        name, sep, path = entry.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"model.expert_files entry {entry!r} must look like 'expert=path.safetensors'")
        files[name.strip()] = path.strip()
    try:
        return family_of_preset(m.preset).expert_inits(files, m.generator_expert, m.discriminator_expert)
    except (KeyError, ValueError) as e:
        raise ConfigError(f"model.expert_files (preset {m.preset!r}): {e}") from e


def resolve_wan_config(cfg: RunConfig) -> WanConfig:
    """The architecture: from G's original weights (model.init_from or its expert's file: its
    metadata, else its shapes) or the preset."""
    overrides = {"in_dim": cfg.model.in_dim, "out_dim": cfg.model.in_dim} if cfg.model.in_dim else {}
    path = original_weights(cfg)[0]
    if not path:
        return get_config(cfg.model.preset, **overrides)
    found = config_from_metadata(read_metadata(path), path)
    if found is None:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            shapes = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
        try:
            found = infer_wan_config(shapes)
        except ValueError:  # head_dim != 128: take the head count from the preset
            found = infer_wan_config(shapes, num_heads=get_config(cfg.model.preset).num_heads)
    return found


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block under a fixed CPU seed without touching the caller's RNG stream (seeded inits)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def base_weights(config: WanConfig, path: str, seed: int) -> dict[str, torch.Tensor]:
    """Full Wan weights on CPU (rank 0): from a safetensors file, else a seeded fresh init."""
    if path:
        return load_state_dict_file(path)
    with seeded(seed):
        return WanFlowModel(config).state_dict()


def build_flow(cfg: RunConfig, world: D.World, config: WanConfig, path: str, lora: bool, trainable: bool) -> nn.Module:
    """A (possibly LoRA) Wan flow model, parallelised, with rank 0's weights (path or seeded init)."""
    rank, alpha = cfg.model.lora_rank, cfg.model.lora_alpha or None
    with torch.device("meta"):
        model = WanFlowModel(config)
    if lora:
        inject_lora(model, rank, alpha)
    full = None
    if world.is_main:
        with torch.device("meta"):
            ref = WanFlowModel(config)
        ref.load_state_dict(base_weights(config, path, cfg.run.seed), assign=True)
        if lora:
            with seeded(cfg.run.seed + 1):
                inject_lora(ref, rank, alpha)
        full = ref.state_dict()
    if not trainable:
        model.requires_grad_(False)
    return parallelize(model, full, cfg.parallel, world, wrap_ddp=trainable)


def build_discriminator(cfg: RunConfig, world: D.World, config: WanConfig, phase: Phase) -> nn.Module:
    """APT D: a copy of the ORIGINAL diffusion weights (model.init_from, or the discriminator expert's
    file) + fresh seeded heads; SF-V D (apt.disc_kind = "sfv"): the first blocks of those weights,
    frozen, + fresh seeded heads."""
    a = cfg.apt
    if a.disc_kind == "sfv":
        s = a.sfv
        cls: type[nn.Module] = SFVDiscriminator
        kwargs = dict(backbone_blocks=s.backbone_blocks or None, head_layers=s.head_layers or None, p_mean=s.p_mean,
                      p_std=s.p_std, head_channels=s.head_channels or None, copy_backbone=False)
    else:
        cls = APTDiscriminator
        kwargs = dict(head_layers=a.head_layers or None, mode=a.disc_mode, timestep_shift=phase.apt.d_timestep_shift,
                      lora_rank=a.disc_lora_rank, copy_backbone=False)
    with torch.device("meta"):
        backbone = WanFlowModel(config)
    disc = cls(backbone, **kwargs)
    full = None
    if world.is_main:
        with torch.device("meta"):
            ref_backbone = WanFlowModel(config)
        ref_backbone.load_state_dict(base_weights(config, original_weights(cfg)[1], cfg.run.seed), assign=True)
        with seeded(cfg.run.seed + 2):
            full = cls(ref_backbone, **kwargs).state_dict()
    return parallelize(disc, full, cfg.parallel, world)


def _cond(batch: Batch, config: WanConfig | None = None) -> WanCond:
    """Text context with rows past each sample's text_len zeroed (Wan pads with zeros); for a family with
    an image condition (I2V) also the first frame: each clip's first latent frame + its image embedding."""
    ctx = batch.text_emb.float()
    mask = torch.arange(ctx.shape[1], device=ctx.device)[None, :] < batch.text_len.to(ctx.device)[:, None]
    cond = WanCond(ctx * mask[..., None])
    fam = family_of_config(config) if config is not None else None
    if fam is not None and fam.image_condition is not None:
        if batch.image_emb is None:
            raise ValueError(f"{fam.title} conditions on the first frame's image embedding, and these shards hold none "
                             "(write them with ShardWriter.add(..., image_emb=[tokens, dim]))")
        cond.clip_fea, cond.y = fam.image_condition(batch.latent[:, :, :1].float(), batch.latent.shape[2], batch.image_emb.float())
    return cond


def _per_sample_t(seed: int, step: int, idx: list[int], stream: str, dev: torch.device, **kw) -> torch.Tensor:
    """Timesteps [B], one per global sample index, through apt_core.flow.sample_timesteps."""
    ts = [sample_timesteps(1, generator=torch.Generator().manual_seed(D.sample_seed(seed, step, i, stream)), **kw) for i in idx]
    return torch.cat(ts).to(dev)


# ----------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------


class Stage:
    """Common parts: the generator being trained, its EMA, checkpoint state and export naming."""

    export_name = "model"
    generator: nn.Module
    ema: EMA | None = None

    def __init__(self, cfg: RunConfig, world: D.World, config: WanConfig):
        self.cfg, self.world, self.config = cfg, world, config
        self.seed = cfg.run.seed
        self.amp = autocast_dtype(cfg.parallel, world.device)

    def begin_phase(self, phase: Phase, first: bool) -> None:
        self.phase = phase

    def state(self) -> dict[str, Any]:
        raise NotImplementedError

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The phase's optimisers by the metric name of their learning rate (lr: G, lr_d: D)."""
        raise NotImplementedError

    def remember_lr(self) -> None:
        """Record the configured learning rates (before a checkpoint load restores warmed-up ones)."""
        self._base_lr = {k: [g["lr"] for g in o.param_groups] for k, o in self.optimizers().items()}

    def set_lr(self, step: int) -> dict[str, torch.Tensor]:
        """Apply run.warmup_steps (linear ramp from the phase's start) to every optimiser; the lrs as metrics."""
        warm = self.cfg.run.warmup_steps
        scale = min(1.0, (step - self.phase.start + 1) / warm) if warm else 1.0
        opts = self.optimizers()
        for k, o in opts.items():
            for g, base in zip(o.param_groups, self._base_lr[k]):
                g["lr"] = base * scale
        return {k: torch.tensor(o.param_groups[0]["lr"]) for k, o in opts.items()}

    def step(self, step: int, batch: Batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def noise(self, batch: Batch, step: int, stream: str) -> torch.Tensor:
        """Per-sample Gaussian noise shaped like the batch's latents."""
        return D.per_sample_randn(tuple(batch.latent.shape[1:]), self.seed, step, self._idx(batch), stream, self.world.device)

    def _idx(self, batch: Batch) -> list[int]:
        return D.global_indices(self.world, len(batch))

    def _trainable(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def _ema(self, decay: float) -> EMA | None:
        return EMA(self.generator, decay) if decay > 0 else None


class TeacherStage(Stage):
    """Flow matching: `MSE(v(x_t, t, c), eps - x0)` with logit-normal / shifted / uniform t."""

    export_name = "teacher"

    def begin_phase(self, phase: Phase, first: bool) -> None:
        super().begin_phase(phase, first)
        c, t = self.cfg, self.cfg.teacher
        self.generator = build_flow(c, self.world, self.config, c.model.init_from, bool(c.model.lora_rank), True)
        self.opt = torch.optim.AdamW(self._trainable(self.generator), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
        self.ema = self._ema(t.ema_decay)

    def state(self) -> dict[str, Any]:
        s = {"generator": ModelOptimState(self.generator, self.opt)}
        return s | ({"ema": ObjectState(self.ema)} if self.ema else {})

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"lr": self.opt}

    def step(self, step: int, batch: Batch) -> dict[str, torch.Tensor]:
        t_cfg, dev = self.cfg.teacher, self.world.device
        x0, cond = batch.latent.float(), _cond(batch, self.config)
        eps = self.noise(batch, step, "eps")
        t = _per_sample_t(self.seed, step, self._idx(batch), "t", dev, kind=t_cfg.timesteps, shift=t_cfg.shift,
                          logit_mean=t_cfg.logit_mean, logit_std=t_cfg.logit_std)
        accum = self.phase.grad_accum
        m = x0.shape[0] // accum
        self.opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=dev)
        amp = torch.autocast(dev.type, dtype=torch.bfloat16) if self.amp else nullcontext()
        for k in range(accum):
            sl = slice(k * m, (k + 1) * m)
            sync = k == accum - 1 or not hasattr(self.generator, "no_sync")  # DDP: all-reduce once per step
            with (nullcontext() if sync else self.generator.no_sync()), amp:
                v = self.generator(add_noise(x0[sl], eps[sl], t[sl]), t[sl], index_cond(cond, sl))
                loss = (v.float() - (eps[sl] - x0[sl])).pow(2).mean()
            (loss / accum).backward()
            total += loss.detach()
        params = self._trainable(self.generator)
        if t_cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, t_cfg.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        self.opt.step()
        if self.ema is not None:
            self.ema.update(self.generator)
        return {"loss": total / accum, "grad_norm": norm.detach()}


class CDStage(Stage):
    """Consistency distillation of the frozen diffusion model into a one-step student (CDTrainer)."""

    export_name = "cd_student"

    def begin_phase(self, phase: Phase, first: bool) -> None:
        super().begin_phase(phase, first)
        c, cd = self.cfg, self.cfg.cd
        teacher_path = cd.teacher_from or c.model.init_from
        self.generator = build_flow(c, self.world, self.config, c.model.init_from, bool(c.model.lora_rank), True)
        self.teacher = build_flow(c, self.world, self.config, teacher_path, False, False)
        self.opt = torch.optim.AdamW(self._trainable(self.generator), lr=cd.lr, weight_decay=cd.weight_decay)
        self.ema = self._ema(cd.ema_decay)
        cdc = CDConfig(steps=cd.grid_steps, shift=cd.grid_shift, cfg_scale=cd.cfg_scale, grad_accum=phase.grad_accum,
                       autocast_dtype=self.amp)
        self.trainer = CDTrainer(self.generator, self.teacher, self.opt, cdc, ema=self.ema)
        self.neg = None
        if cd.cfg_scale != 1.0:
            self.neg = load_state_dict_file(cd.negative_embedding)["context"].float() if cd.negative_embedding else None

    def state(self) -> dict[str, Any]:
        s = {"generator": ModelOptimState(self.generator, self.opt)}
        return s | ({"ema": ObjectState(self.ema)} if self.ema else {})

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"lr": self.opt}

    def step(self, step: int, batch: Batch) -> dict[str, torch.Tensor]:
        dev, idx, n = self.world.device, self._idx(batch), self.cfg.cd.grid_steps
        cond = _cond(batch, self.config)
        step_index = torch.cat([
            torch.randint(1, n + 1, (1,), generator=torch.Generator().manual_seed(D.sample_seed(self.seed, step, i, "cd_index")))
            for i in idx
        ]).to(dev)
        neg = None
        if self.cfg.cd.cfg_scale != 1.0:
            ctx = cond.context
            neg_ctx = torch.zeros_like(ctx) if self.neg is None else self.neg.to(dev)[None].expand(ctx.shape[0], -1, -1)
            neg = WanCond(neg_ctx)
        metrics = self.trainer.cd_step(batch.latent.float(), cond, neg_cond=neg, eps=self.noise(batch, step, "eps"),
                                       step_index=step_index)
        reshard(self.teacher)  # inference-only: free its gathered weights
        return metrics


class APTStage(Stage):
    """Adversarial post-training: alternating 1:1 D and G steps (APTTrainer), EMA of G exported."""

    export_name = "apt_generator"

    def begin_phase(self, phase: Phase, first: bool) -> None:
        super().begin_phase(phase, first)
        c, a = self.cfg, self.cfg.apt
        lr, lr_d = phase.apt.learning_rates(a.lr)
        if first:
            g_init = a.generator_init or original_weights(c)[0]
            self.generator = build_flow(c, self.world, self.config, g_init, bool(c.model.lora_rank), True)
        else:  # paper: G starts the video phase from the image phase's EMA
            self.ema.copy_to(self.generator)
        self.discriminator = None  # free the previous phase's D before building the fresh one
        self.discriminator = build_discriminator(c, self.world, self.config, phase)
        self.opt_g = make_rmsprop(self._trainable(self.generator), lr)
        self.opt_d = make_rmsprop(self._trainable(self.discriminator), lr_d)
        self.ema = EMA(self.generator, a.ema_decay)
        relativistic = a.loss == "relativistic"
        acfg = APTConfig(loss=a.loss, r1_lambda=a.r1_lambda, r1_sigma=phase.apt.r1_sigma, r1_mode=a.r1_mode, r2=relativistic,
                         r2_lambda=a.r1_lambda, d_timestep_shift=phase.apt.d_timestep_shift,
                         mismatch_weight=phase.apt.mismatch_weight,
                         grad_accum=phase.grad_accum, autocast_dtype=self.amp)
        self.trainer = APTTrainer(self.generator, self.discriminator, self.opt_g, self.opt_d, acfg, ema=self.ema)

    def state(self) -> dict[str, Any]:
        return {
            "generator": ModelOptimState(self.generator, self.opt_g),
            "discriminator": ModelOptimState(self.discriminator, self.opt_d),
            "ema": ObjectState(self.ema),
        }

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"lr": self.opt_g, "lr_d": self.opt_d}

    def step(self, step: int, batch: Batch) -> dict[str, torch.Tensor]:
        dev, idx, shift = self.world.device, self._idx(batch), self.phase.apt.d_timestep_shift
        x0, cond = batch.latent.float(), _cond(batch, self.config)
        relativistic = self.cfg.apt.loss == "relativistic"
        sfv = self.cfg.apt.disc_kind == "sfv"  # SF-V: D's t is a log-normal sigma and its inputs are noised
        t_kw = (dict(kind="logit_normal", logit_mean=self.cfg.apt.sfv.p_mean, logit_std=self.cfg.apt.sfv.p_std) if sfv
                else dict(kind="shifted", shift=shift))
        d_noise = {"noise_real": self.noise(batch, step, "d_eps_real"), "noise_fake": self.noise(batch, step, "d_eps_fake")} if sfv else {}
        t_d = _per_sample_t(self.seed, step, idx, "t_d", dev, **t_kw)
        metrics = self.trainer.d_step(x0, cond, z=self.noise(batch, step, "z_d"), t_d=t_d,
                                      r1_noise=self.noise(batch, step, "r1"),
                                      r2_noise=self.noise(batch, step, "r2") if relativistic else None, **d_noise)
        t_g = _per_sample_t(self.seed, step, idx, "t_g", dev, **t_kw)
        g_noise = {"noise_fake": self.noise(batch, step, "g_eps_fake")} if sfv else {}
        if sfv and relativistic:
            g_noise["noise_real"] = self.noise(batch, step, "g_eps_real")
        metrics |= self.trainer.g_step(cond, z=self.noise(batch, step, "z_g"), t_d=t_g, x_real=x0 if relativistic else None,
                                       **g_noise)
        return metrics


STAGES = {"teacher": TeacherStage, "cd": CDStage, "apt": APTStage}


class RunComplete(RuntimeError):
    """run.dir already holds a checkpoint at the run's last step: re-running would train nothing."""


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


class ResumeMismatch(ConfigError):
    """The config differs from a resumed checkpoint's in a setting that fixes its tensors or entries."""


# settings whose change makes a checkpoint unloadable: (dotted key, stages it matters for)
RESUME_KEYS = (("run.stage", None), ("model.lora_rank", None), ("apt.disc_kind", ("apt",)), ("apt.disc_mode", ("apt",)),
               ("apt.disc_lora_rank", ("apt",)), ("apt.head_layers", ("apt",)), ("apt.sfv.backbone_blocks", ("apt",)),
               ("apt.sfv.head_layers", ("apt",)), ("apt.sfv.head_channels", ("apt",)))
ARCH_KEYS = ("model.preset", "model.in_dim", "model.init_from", "model.expert_files")


def _dotted(d: dict, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def check_resume_config(cfg: RunConfig, config: WanConfig, start_path: Path) -> None:
    """Refuse to resume `start_path` (by setting name) when its config.toml differs from `cfg` in the model
    architecture, LoRA, D layout, stage or EMA presence; other settings (lr, steps, ...) may change."""
    path = Path(start_path) / "config.toml"
    if not path.is_file():
        return
    try:
        old = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return
    new = to_dict(cfg)
    diffs = [f"{key} = {_dotted(old, key)!r} there, {_dotted(new, key)!r} now" for key, stages in RESUME_KEYS
             if (stages is None or cfg.run.stage in stages) and _dotted(old, key) is not None
             and _dotted(old, key) != _dotted(new, key)]
    if cfg.run.stage in ("teacher", "cd"):
        key = f"{cfg.run.stage}.ema_decay"
        was = _dotted(old, key)
        if was is not None and (was > 0) != (_dotted(new, key) > 0):
            diffs.append(f"{key} = {was!r} there, {_dotted(new, key)!r} now (an EMA is kept only when > 0)")
    try:
        old_config = resolve_wan_config(load_config(path))
    except (ConfigError, OSError, ValueError, RuntimeError):
        old_config = None  # an older schema or a moved init_from file: compare the keys only
    if old_config is not None and old_config != config:
        fields = [f for f in old_config.__dataclass_fields__ if getattr(old_config, f) != getattr(config, f)]
        arch = ", ".join(f"{f} {getattr(old_config, f)} -> {getattr(config, f)}" for f in fields)
        changed = [f"{k} = {_dotted(old, k)!r} there, {_dotted(new, k)!r} now" for k in ARCH_KEYS
                   if _dotted(old, k) != _dotted(new, k)] or ["the weights file model.init_from"]
        diffs.append(f"{'; '.join(changed)}: the model architecture changes ({arch})")
    if diffs:
        raise ResumeMismatch(f"cannot resume from {start_path}: {'; '.join(diffs)}. These settings fix what the checkpoint "
                             f"holds: set them back (its config.toml has the values), or start a new run with another "
                             f"--run.dir")


def load_checkpoint(ckpt: CheckpointManager, path: Path, state: dict[str, Any]) -> None:
    """ckpt.load, with a shape or key mismatch (a setting the checks above do not cover) named as such."""
    try:
        ckpt.load(path, state)
    except (RuntimeError, ValueError, KeyError) as e:
        if isinstance(e, ResumeMismatch) or not any(w in str(e).lower() for w in ("size", "shape", "missing", "unexpected")):
            raise
        first = str(e).strip().splitlines()[0][:300]
        raise ResumeMismatch(f"checkpoint {path} does not fit this config ({first}); compare the config with its "
                             f"config.toml (model.*, apt.disc_*, apt.head_layers), or start a new run with another "
                             f"--run.dir") from e


def stop_if_diverged(rows: list[dict[str, Any]] | None, ckpt: CheckpointManager) -> None:
    """FloatingPointError when a logged metric is NaN/Inf (same rows on every rank: all stop together)."""
    bad = nonfinite_metrics(rows or [])
    if bad is not None:
        step, keys = bad
        raise FloatingPointError(f"step {step}: non-finite {', '.join(keys)} (NaN/Inf): training diverged; stopped "
                                 f"without saving. Newest checkpoint: {ckpt.latest()}. Lower the learning rate (or "
                                 f"raise apt.r1_lambda) and resume from it with --resume path/to/step-N")


def first_nonfinite(stage: Stage) -> str | None:
    """Name of the first generator / discriminator / EMA tensor holding NaN/Inf on any rank, or None
    (collective: one all-reduce)."""
    named: list[tuple[str, torch.Tensor]] = []
    for prefix in ("generator", "discriminator"):
        model = getattr(stage, prefix, None)
        if model is not None:
            named += [(f"{prefix}.{n}", p.detach()) for n, p in model.named_parameters()]
    if stage.ema is not None:
        named += [(f"ema.{n}", t) for n, t in zip(stage.ema.names, stage.ema.shadow)]
    dev = stage.world.device
    ok = [torch.isfinite(t.to_local() if hasattr(t, "to_local") else t).all().to(dev) for _, t in named]
    bad = (~torch.stack(ok)).nonzero() if ok else torch.zeros(0, 1)
    first = torch.tensor([int(bad[0, 0]) if len(bad) else len(named)], device=dev)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(first, op=dist.ReduceOp.MIN)
    i = int(first)
    return named[i][0] if i < len(named) else None


def check_weights(stage: Stage, step: int, ckpt: CheckpointManager) -> None:
    """FloatingPointError naming the first non-finite weight, before anything is saved or exported."""
    name = first_nonfinite(stage)
    if name is not None:
        raise FloatingPointError(f"step {step}: {name} holds NaN/Inf: the weights diverged; nothing was saved or "
                                 f"exported. Newest checkpoint: {ckpt.latest()}. Lower the learning rate and resume "
                                 f"from it with --resume path/to/step-N")


def export_name(name: str, step: int, final_step: int) -> str:
    """`name` for the run's final step; `name_step-N` for an earlier step (never the final export's file)."""
    return name if step == final_step else f"{name}_step-{step}"


def planned_exports(cfg: RunConfig, phases: list[Phase], k: int, step: int, export_only: bool) -> dict[str, dict]:
    """File stem -> `apt.export` metadata of every export this call of train() will write (from phase k, at step)."""
    out: dict[str, dict] = {}
    if not export_only:
        for i in range(k, len(phases) - 1):
            if phases[i].name == "image":
                out["apt_image_ema"] = {"step": phases[i].end, "phase": "image"}
    if cfg.export.final or export_only:
        end = step if export_only else phases[-1].end
        out[export_name(STAGES[cfg.run.stage].export_name, end, phases[-1].end)] = {"stage": cfg.run.stage, "step": end}
    return out


def check_export_targets(out_dir: Path, planned: dict[str, dict], lora_rank: int, overwrite: bool, resumed: bool) -> None:
    """Before training: FileExistsError for an export file this run would replace, unless `overwrite`. A resumed
    run may rewrite its own export of the same step (left by the interrupted attempt: same weights)."""
    if overwrite:
        return
    for name, meta in planned.items():
        for path in export_files(out_dir, name, lora_rank):
            if not path.exists():
                continue
            old = read_export_info(path)
            if resumed and all(old.get(key) == v for key, v in meta.items()):
                continue
            raise FileExistsError(f"{path} already exists (exported at step {old.get('step', '?')}); this run would "
                                  f"replace it. Pass --overwrite (export.overwrite = true) to allow that, move the "
                                  f"file, or use another --run.dir")


def _batches(loader: BucketedLoader, device: torch.device) -> Iterator[Batch]:
    for batch in loader:
        yield batch.to(device)


def make_validator(cfg: RunConfig, world: D.World, dataset: ShardDataset, run_dir: Path) -> Validator | None:
    """Fixed prompts (file or the dataset's first samples) x fixed seeds, at the phase's latent shape."""
    m = cfg.monitor
    if not m.val_every:
        return None
    shape = tuple(dataset.shapes[0])
    if m.val_prompts:
        contexts = load_state_dict_file(m.val_prompts)["context"].float()
    else:
        samples = [dataset[i] for i in range(min(m.val_num_prompts, len(dataset)))]
        L = max(s.text_emb.shape[0] for s in samples)
        contexts = torch.zeros(len(samples), L, samples[0].text_emb.shape[1])
        for i, s in enumerate(samples):
            contexts[i, : s.text_len] = s.text_emb[: s.text_len].float()
    same = [i for i, s in enumerate(dataset.shapes) if tuple(s) == shape][:8]
    reference = torch.stack([dataset[i].latent.float() for i in same])
    return Validator(run_dir / "samples", world, contexts, shape, m.val_seeds, reference, m.val_fps)


def validate(stage: Stage, validator: Validator, step: int, logger: MetricsLogger, detector: CollapseDetector) -> dict:
    """One-step samples with the EMA weights (if any); logs an event and a diversity warning."""
    g = stage.generator
    swap = stage.ema.swap_into(g) if stage.ema is not None else nullcontext()
    amp = torch.autocast(stage.world.device.type, dtype=torch.bfloat16) if stage.amp else nullcontext()
    reshard(g)
    with swap, amp:
        result = validator.run(lambda z, ctx: generate_one_step(g, z, WanCond(ctx)), step)
        reshard(g)  # before the swap restores the training weights into the shards
    logger.event(step, "validation", f"samples in {result.get('val_dir', '')}", **result)
    if not result["val_finite"]:
        logger.event(step, "warning", "validation samples contain NaN/Inf: the generator (EMA) has diverged; "
                     "lower the learning rate and resume from an earlier checkpoint")
    if "val_dir" in result:
        logger.image("validation/grid", Path(result["val_dir"]) / "grid.png", step)
    warning = None if math.isnan(result["val_diversity"]) else detector.diversity_warning(result["val_diversity"])
    if warning:
        logger.event(step, "warning", warning)
    return result


def train(cfg: RunConfig, resume: bool | str = False, export_only: bool = False) -> dict[str, Any]:
    """Run the configured stage to the end (resuming from the newest intact checkpoint if any), holding
    the run directory's lock (training.runlock) throughout.

    Raises ConfigError (before any model is built) for a path that does not open, and RunComplete
    when run.dir already holds the final step and its export (unless export_only)."""
    preflight(cfg)
    world = D.init_distributed(cfg.run.device, cfg.parallel.backend, cfg.distributed.timeout_s)
    stop = StopRequest().install(grace_s=cfg.distributed.timeout_s)
    try:
        with run_lock(cfg.run.dir, world):
            return _train(cfg, world, stop, resume, export_only)
    finally:
        stop.uninstall()


def start_banner(cfg: RunConfig, world: D.World, phases: list[Phase], step: int, start_path: Path | None) -> str:
    """What a run is about to do, in one line: run dir, world, phases with step ranges, resume point."""
    plan = ", ".join(f"{p.name} steps {p.start + 1}-{p.end} (global batch {p.micro_batch * p.grad_accum * world.world_size})"
                     for p in phases)
    where = f"resuming from {start_path} at step {step}" if start_path else "fresh start at step 0"
    return (f"apt-train {cfg.run.stage}: run dir {cfg.run.dir}, world size {world.world_size} ({world.backend}, "
            f"{world.device.type}), {plan}; {where} of {phases[-1].end}")


def _train(cfg: RunConfig, world: D.World, stop: StopRequest, resume: bool | str, export_only: bool) -> dict[str, Any]:
    """train() once the process group and the stop handlers are up."""
    torch.manual_seed(cfg.run.seed + world.rank)
    run_dir = Path(cfg.run.dir)
    ckpt = CheckpointManager(run_dir, world, keep=cfg.checkpoint.keep)
    ckpt.clean_partial()
    damaged: list[str] = []
    if isinstance(resume, str):
        start_path = Path(resume)
        problems = verify(start_path)
        if problems:
            raise ValueError(f"--resume {start_path}: the checkpoint is damaged: {'; '.join(problems)}")
    else:
        start_path, damaged = ckpt.resume_point()
    for message in damaged:
        log.warning(message)
    if resume is True and start_path is None:
        raise FileNotFoundError(f"--resume: no complete checkpoint in {ckpt.dir}" + (f" ({damaged[-1]})" if damaged else ""))
    if export_only and start_path is None:
        raise FileNotFoundError(f"--export-only: no complete checkpoint in {ckpt.dir}, so nothing trained to export; "
                                f"train first, or pass --resume path/to/step-N")
    config = resolve_wan_config(cfg)
    if start_path is not None:
        check_resume_config(cfg, config, start_path)  # before config.toml is rewritten
    phases = plan_phases(cfg)
    info = read_info(start_path) if start_path else {"step": 0, "phase": phases[0].name}
    step = int(info["step"])
    names = [p.name for p in phases]
    if info.get("phase") not in names:
        raise ValueError(f"checkpoint {start_path} was taken in phase {info.get('phase')!r}, but run.stage="
                         f"{cfg.run.stage!r} has phases {names}; use another run.dir or the matching config")
    k = names.index(info["phase"])
    final_name = export_name(STAGES[cfg.run.stage].export_name, phases[-1].end, phases[-1].end)
    exported = not cfg.export.final or export_files(run_dir / "export", final_name, cfg.model.lora_rank)[0].is_file()
    if step >= phases[-1].end and not export_only and exported:  # (not exported: stopped at the last step; export now)
        steps_key = "run.steps" if cfg.run.stage != "apt" else f"apt.{phases[-1].name}.steps"
        raise RunComplete(f"{run_dir} is already complete at step {step} ({start_path}); use --run.dir=<new dir> for "
                          f"a new run, raise {steps_key} (with --overwrite to replace its export) to train on, or --export-only "
                          "to export it again")
    if world.is_main:
        save_config(cfg, run_dir / "config.toml")
    exports = planned_exports(cfg, phases, k, step, export_only)
    error = None
    if world.is_main:  # rank 0 writes the exports; every rank stops together
        try:
            check_export_targets(run_dir / "export", exports, cfg.model.lora_rank, cfg.export.overwrite,
                                 resumed=start_path is not None and not export_only)
        except FileExistsError as e:
            error = str(e)
    error = D.broadcast_object(error)
    if error is not None:
        raise FileExistsError(error)
    stage: Stage = STAGES[cfg.run.stage](cfg, world, config)
    logger = MetricsLogger(run_dir, world, phases[-1].end, cfg.monitor.log_every, cfg.monitor.progress and not export_only,
                           cfg.monitor.tensorboard, start_step=step)
    logger.peak_tflops = peak_tflops(world.device, cfg.monitor.peak_tflops)
    detector = CollapseDetector(cfg.monitor.collapse_window, cfg.monitor.d_loss_floor, cfg.monitor.diversity_threshold)
    result: dict[str, Any] = {"world_size": world.world_size, "resumed_from": str(start_path) if start_path else None}
    logger.event(step, "start", start_banner(cfg, world, phases, step, start_path), world_size=world.world_size,
                 phases={p.name: [p.start, p.end] for p in phases})
    for message in damaged:
        logger.event(step, "warning", message)
    if start_path:
        logger.event(step, "resume", f"resumed from {start_path}", checkpoint=str(start_path), world_size=world.world_size)
    lora = cfg.model.lora_rank

    def save(at: int, phase: Phase) -> Path:
        stop_if_diverged(logger.flush(), ckpt)
        check_weights(stage, at, ckpt)  # a non-finite state is never saved
        path = ckpt.save(at, state, files={"config.toml": dumps(cfg)}, info={"phase": phase.name, "finite": True})
        logger.event(at, "checkpoint", f"checkpoint saved: {path}", checkpoint=str(path))
        return path

    for i in range(k, len(phases)):
        phase = phases[i]
        stage.begin_phase(phase, first=i == k)
        stage.remember_lr()
        logger.global_batch = phase.micro_batch * phase.grad_accum * world.world_size
        dataset = ShardDataset(phase.data)
        loader = BucketedLoader(dataset, phase.micro_batch * phase.grad_accum, world.rank, world.world_size,
                                seed=cfg.run.seed + phase.index)
        state = {**stage.state(), "loader": ObjectState(loader)}
        if i == k and start_path is not None:
            load_checkpoint(ckpt, start_path, state)
        if export_only:
            break
        validator = make_validator(cfg, world, dataset, run_dir)
        batches = _batches(loader, world.device)
        logger.restart_clock(step)
        first_step = step
        while step < phase.end:
            lrs = stage.set_lr(step)
            batch = next(batches)
            if logger.peak_tflops and step == first_step:  # MFU: count the FLOPs of the phase's first step
                metrics, flops = count_flops(stage.step, step, batch)
                flops_t = torch.tensor(flops, dtype=torch.float64, device=world.device if world.backend == "nccl" else "cpu")
                logger.step_flops = float(D.all_reduce_mean(flops_t))
            else:
                metrics = stage.step(step, batch)
            metrics |= lrs
            step += 1
            rows = logger.log(step, metrics, phase.name)
            if rows:
                stop_if_diverged(rows, ckpt)
                warning = detector.observe(rows)
                if warning:
                    logger.event(step, "warning", warning)
            last = step == phase.end
            if validator is not None and (step % cfg.monitor.val_every == 0 or last):
                stop_if_diverged(logger.flush(), ckpt)
                result["validation"] = validate(stage, validator, step, logger, detector)
            saved = (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or last
            if saved:
                save(step, phase)
            reason = stop.agreed(world)  # collective: every rank stops after the same step
            if reason and step < phases[-1].end:  # (at the very end the run just finishes)
                path = None if saved else save(step, phase)
                logger.event(step, "stopped", f"{reason}: stopped at step {step} with a checkpoint saved; "
                             "run the same command again to resume", reason=reason,
                             checkpoint=str(path or ckpt.dir / f"step-{step}"))
                result["stopped"] = reason
                break
        if result.get("stopped"):
            break
        if phase.name == "image" and i + 1 < len(phases) and not export_only:
            check_weights(stage, step, ckpt)
            export_generator(stage.generator, run_dir / "export", "apt_image_ema", world, config, stage.ema, lora,
                             cfg.model.lora_alpha or None, cfg.export.dtype, {"step": step, "phase": "image"},
                             overwrite=True)  # checked at start (check_export_targets)
    logger.close()
    result["step"] = step
    result["metrics"] = logger.rows
    if result.get("stopped"):
        D.barrier()
        return result
    if cfg.export.final or export_only:
        check_weights(stage, step, ckpt)
        name = export_name(stage.export_name, step, phases[-1].end)
        paths = export_generator(stage.generator, run_dir / "export", name, world, config, stage.ema, lora,
                                 cfg.model.lora_alpha or None, cfg.export.dtype,
                                 {"stage": cfg.run.stage, "step": step}, overwrite=True)  # checked at start
        result["export"] = {k: str(v) for k, v in paths.items()}
    D.barrier()
    return result

