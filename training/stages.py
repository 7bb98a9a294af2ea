"""The training stages (teacher, cd, apt): each owns its models, optimisers and EMA and has one
`step(step, batch) -> metrics` method.

All random draws of a step come from per-sample seeds (training.distributed), so the same config gives
the same losses at any world size with the same global batch. APT runs two phases, as in the paper:
images, then video with G initialised from the image phase's EMA and D re-initialised from the
ORIGINAL diffusion weights. The models come from a `training.models.ModelSource` (files by default).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from apt_core.backbone import WanCond, index_cond
from apt_core.ema import EMA
from apt_core.flow import add_noise, sample_timesteps
from apt_core.models.io import load_state_dict_file
from apt_core.models.registry import family_of_config
from apt_core.models.wan import WanConfig
from apt_core.trainer import APTConfig, APTTrainer, CDConfig, CDTrainer, make_rmsprop
from training import distributed as D
from training.checkpoint import ModelOptimState, ObjectState
from training.config import RunConfig
from training.data import Batch
from training.models import FileSource, ModelSource, build_discriminator, build_flow, build_teacher
from training.parallelize import autocast_dtype, reshard


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



IMAGE_LATENT_FALLBACK = (
    "the shards hold no image_latent, so the I2V image latent is each clip's first latent frame with zeros after it; "
    "Wan 2.1 uses the VAE latent of [first frame, mid-grey frames], which is not zero there. Write the shards with "
    "apt-prepare --vae ... --image-latent (or ShardWriter.add(..., image_latent=...)) to train on Wan's condition")


def _cond(batch: Batch, config: WanConfig | None = None) -> WanCond:
    """Text context with rows past each sample's text_len zeroed (Wan pads with zeros); for a family with
    an image condition (I2V) also the first frame: the shards' image latent (Wan's: the VAE latent of
    [first frame, grey frames]) or, without one, each clip's first latent frame (IMAGE_LATENT_FALLBACK), and
    the image embedding."""
    ctx = batch.text_emb.float()
    mask = torch.arange(ctx.shape[1], device=ctx.device)[None, :] < batch.text_len.to(ctx.device)[:, None]
    cond = WanCond(ctx * mask[..., None])
    fam = family_of_config(config) if config is not None else None
    if fam is not None and fam.image_condition is not None:
        if batch.image_emb is None:
            raise ValueError(f"{fam.title} conditions on the first frame's image embedding, and these shards hold none "
                             "(write them with ShardWriter.add(..., image_emb=[tokens, dim]))")
        image_latent = batch.image_latent if batch.image_latent is not None else batch.latent[:, :, :1]
        cond.clip_fea, cond.y = fam.image_condition(image_latent.float(), batch.latent.shape[2], batch.image_emb.float())
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

    def __init__(self, cfg: RunConfig, world: D.World, config: WanConfig, models: ModelSource | None = None):
        self.cfg, self.world, self.config = cfg, world, config
        self.models = models if models is not None else FileSource()
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


class GeneratorOnlyStage(Stage):
    """A stage that trains the generator alone with one optimiser `opt` (teacher, cd)."""

    opt: torch.optim.Optimizer

    def state(self) -> dict[str, Any]:
        s = {"generator": ModelOptimState(self.generator, self.opt)}
        return s | ({"ema": ObjectState(self.ema)} if self.ema else {})

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"lr": self.opt}


class TeacherStage(GeneratorOnlyStage):
    """Flow matching: `MSE(v(x_t, t, c), eps - x0)` with logit-normal / shifted / uniform t."""

    export_name = "teacher"

    def begin_phase(self, phase: Phase, first: bool) -> None:
        super().begin_phase(phase, first)
        c, t = self.cfg, self.cfg.teacher
        self.generator = build_flow(c, self.world, self.config, self.models, "generator", bool(c.model.lora_rank), True)
        self.opt = torch.optim.AdamW(self._trainable(self.generator), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
        self.ema = self._ema(t.ema_decay)

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


class CDStage(GeneratorOnlyStage):
    """Consistency distillation of the frozen diffusion model into a one-step student (CDTrainer)."""

    export_name = "cd_student"

    def begin_phase(self, phase: Phase, first: bool) -> None:
        super().begin_phase(phase, first)
        c, cd = self.cfg, self.cfg.cd
        self.generator = build_flow(c, self.world, self.config, self.models, "generator", bool(c.model.lora_rank), True)
        self.teacher = build_teacher(c, self.world, self.config, self.models)
        self.opt = torch.optim.AdamW(self._trainable(self.generator), lr=cd.lr, weight_decay=cd.weight_decay)
        self.ema = self._ema(cd.ema_decay)
        cdc = CDConfig(steps=cd.grid_steps, shift=cd.grid_shift, cfg_scale=cd.cfg_scale, grad_accum=phase.grad_accum,
                       autocast_dtype=self.amp)
        self.trainer = CDTrainer(self.generator, self.teacher, self.opt, cdc, ema=self.ema)
        self.neg = None
        if cd.cfg_scale != 1.0:
            self.neg = load_state_dict_file(cd.negative_embedding)["context"].float() if cd.negative_embedding else None

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
            self.generator = build_flow(c, self.world, self.config, self.models, "generator", bool(c.model.lora_rank), True)
        else:  # paper: G starts the video phase from the image phase's EMA
            self.ema.copy_to(self.generator)
        self.discriminator = None  # free the previous phase's D before building the fresh one
        self.discriminator = build_discriminator(c, self.world, self.config, self.models, phase.apt.d_timestep_shift)
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

