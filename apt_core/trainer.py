"""Training steps of APT (adversarial, stage 2) and consistency distillation (stage 1).

The steps know nothing about how the models are distributed: they call the modules, backward and
step the optimisers they were given. Every step returns detached 0-d metric tensors (no `.item()`,
so no host sync per step). Micro-batching by `grad_accum` happens inside a step. All random draws
(z, D timesteps, R1 noise, CD eps / grid index) can be passed in, so a distributed loop can make a
run reproducible across world sizes; otherwise they come from the global RNG.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from apt_core import losses
from apt_core.backbone import cat_cond, index_cond, repeat_cond, unwrap
from apt_core.distill import cd_grid, consistency_loss, sample_step_index
from apt_core.flow import add_noise, generate_one_step, sample_timesteps

AMP_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}
LOSSES = ("nonsaturating", "relativistic", "hinge")


def make_rmsprop(params: Iterable[nn.Parameter], lr: float, alpha: float = 0.9, eps: float = 1e-8) -> torch.optim.RMSprop:
    """APT's optimiser: RMSProp (alpha 0.9), no momentum, no weight decay.

    One state tensor per parameter (`square_avg`), where Adam(betas=(0, alpha)) keeps an unused
    first moment too; no bias correction, so the first updates are up to 1/sqrt(1 - alpha) larger.
    """
    return torch.optim.RMSprop(params, lr=lr, alpha=alpha, eps=eps, weight_decay=0.0, momentum=0.0, centered=False)


def _is_fsdp(module: nn.Module) -> bool:
    """True for a module FSDP2's `fully_shard` has wrapped (or one holding such modules)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch build without distributed
        return False
    return any(isinstance(m, FSDPModule) for m in module.modules())


@dataclass
class APTConfig:
    """Stage-2 settings. Defaults = APT images; video: r1_sigma 0.1, d_timestep_shift 12.

    AAPT variant: loss "relativistic", r2 True, r1_lambda = r2_lambda = 1000, r1_sigma 0.1.
    SF-V (with apt_core.sfv.SFVDiscriminator): loss "hinge", r1_mode "exact".
    r1_sigma is the STD of the R1 perturbation; the penalty is not divided by sigma^2 (paper).
    r1_mode "exact" (double backward, the reference) weighs `||grad_x D||^2` by
    `r1_lambda * r1_sigma**2`, the scale the approximation has, so the two are interchangeable.
    """

    loss: str = "nonsaturating"  # "nonsaturating" (APT) | "relativistic" (AAPT) | "hinge" (SF-V)
    r1_lambda: float = 100.0
    r1_sigma: float = 0.01
    r1_mode: str = "approx"  # "approx" (APT eq. 5, one batched forward) | "exact"
    r2: bool = False  # the same approximated penalty on fakes (AAPT)
    r2_lambda: float = 100.0
    d_timestep_shift: float = 1.0  # D's timestep ensemble t ~ shift(U(0, 1), s): 1 images, 12 video
    # Matching-aware D (GigaGAN; not in APT): real samples under another sample's caption count as
    # fake, weighted by this; 0 = off (the paper). Teaches D to check the caption, not just realism.
    mismatch_weight: float = 0.0
    grad_accum: int = 1
    max_grad_norm: float | None = None  # None: no clipping (paper); the norm is still reported
    autocast_dtype: str | None = None  # None | "bf16" | "fp16"

    def __post_init__(self) -> None:
        _check_choice("loss", self.loss, LOSSES)
        _check_choice("r1_mode", self.r1_mode, ("approx", "exact"))
        _check_choice("autocast_dtype", self.autocast_dtype, tuple(AMP_DTYPES))
        if self.r1_lambda < 0 or self.r2_lambda < 0 or self.r1_sigma <= 0 or self.mismatch_weight < 0:
            raise ValueError(
                "need r1_lambda >= 0, r2_lambda >= 0, r1_sigma > 0, mismatch_weight >= 0; got "
                f"{self.r1_lambda}, {self.r2_lambda}, {self.r1_sigma}, {self.mismatch_weight}"
            )
        if self.r2 and self.r1_mode == "exact":
            raise ValueError("r2=True is implemented for r1_mode='approx' only")
        _check_common(self.grad_accum, self.max_grad_norm, self.d_timestep_shift)


@dataclass
class CDConfig:
    """Stage-1 settings. AAPT: 32 steps, shifted grid, no EMA target, no CFG; APT: CFG 7.5 + negative."""

    steps: int = 32
    shift: float = 24.0  # grid t_n = shift(n / steps, shift); AAPT's documented s = 24
    cfg_scale: float = 1.0  # teacher guidance; != 1 needs neg_cond in cd_step
    grad_accum: int = 1
    max_grad_norm: float | None = None
    autocast_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"CD steps must be >= 1, got {self.steps}")
        _check_choice("autocast_dtype", self.autocast_dtype, tuple(AMP_DTYPES))
        _check_common(self.grad_accum, self.max_grad_norm, self.shift)


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {allowed}")


def _check_common(grad_accum: int, max_grad_norm: float | None, shift: float) -> None:
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
    if max_grad_norm is not None and max_grad_norm <= 0:
        raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
    if shift <= 0:
        raise ValueError(f"timestep shift must be > 0, got {shift}")


# ----------------------------------------------------------------------------------------------
# Step plumbing shared by both trainers
# ----------------------------------------------------------------------------------------------


def _micro_batches(batch: int, accum: int) -> list[slice]:
    if batch % accum:
        raise ValueError(f"batch size {batch} is not divisible by grad_accum={accum}; pick a divisor")
    m = batch // accum
    return [slice(i * m, (i + 1) * m) for i in range(accum)]


def autocast_context(device: torch.device, name: str | None) -> AbstractContextManager:
    """torch.autocast to `name` ("bf16" | "fp16") on the device's type, or a no-op for None."""
    dtype = AMP_DTYPES[name]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def _grad_norm_and_step(opt: torch.optim.Optimizer, max_norm: float | None) -> torch.Tensor:
    """Total grad norm of the optimiser's params (clipped to max_norm if set), then opt.step()."""
    params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
    if max_norm is None:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    else:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    opt.step()
    return norm.detach().float()


@contextmanager
def frozen(params: Iterable[nn.Parameter]) -> Iterator[None]:
    """Temporarily set requires_grad=False on trainable params (restored on exit)."""
    toggled = [p for p in params if p.requires_grad]
    for p in toggled:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in toggled:
            p.requires_grad_(True)


class _Mean:
    """Running mean of detached metric tensors over micro-batches."""

    def __init__(self, n: int):
        self.n, self.sums = n, {}

    def add(self, **metrics: torch.Tensor) -> None:
        for k, v in metrics.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v

    def result(self) -> dict[str, torch.Tensor]:
        return {k: v / self.n for k, v in self.sums.items()}


# ----------------------------------------------------------------------------------------------
# APT
# ----------------------------------------------------------------------------------------------


class APTTrainer:
    """Alternating D and G steps of APT: G(z, c) = z - v(z, 1, c) against the APT discriminator."""

    def __init__(
        self,
        generator: nn.Module,
        discriminator: nn.Module,
        opt_g: torch.optim.Optimizer,
        opt_d: torch.optim.Optimizer,
        config: APTConfig | None = None,
        ema: Any = None,
    ):
        self.generator, self.discriminator = generator, discriminator
        self.opt_g, self.opt_d = opt_g, opt_d
        self.config = config or APTConfig()
        self.ema = ema
        d_shift = getattr(unwrap(discriminator), "timestep_shift", self.config.d_timestep_shift)
        if d_shift != self.config.d_timestep_shift:  # both name D's timestep ensemble: one must not silently win
            raise ValueError(
                f"APTConfig.d_timestep_shift={self.config.d_timestep_shift} differs from the discriminator's "
                f"timestep_shift={d_shift}; build both with the same shift (1 images, 12 video)"
            )
        if self.config.r1_mode == "exact" and _is_fsdp(discriminator):
            raise ValueError(
                "r1_mode='exact' does not run with an FSDP2-sharded discriminator: its double backward reaches "
                "parameters FSDP has already resharded; use r1_mode='approx' (APT's) or an unsharded D"
            )
        self._latent_shape: tuple[int, ...] | None = None
        # SF-V's D (frozen backbone) sees noised inputs: x_t at its own t, for real and fake alike
        self._noised = bool(getattr(unwrap(discriminator), "noised_inputs", False))

    def generate(self, z: torch.Tensor, cond: Any) -> torch.Tensor:
        """One-step generator output `z - v(z, 1, c)`."""
        return generate_one_step(self.generator, z, cond)

    def sample_t(self, n: int, device: torch.device) -> torch.Tensor:
        """D's timestep ensemble: t ~ shift(U(0, 1), d_timestep_shift), [n] (SF-V's D: its own noise levels)."""
        if self._noised:
            return unwrap(self.discriminator).sample_t(n, device=device)
        return sample_timesteps(n, "shifted", shift=self.config.d_timestep_shift, device=device)

    def d_step(
        self,
        x_real: torch.Tensor,
        cond: Any,
        z: torch.Tensor | None = None,
        t_d: torch.Tensor | None = None,
        r1_noise: torch.Tensor | None = None,
        r2_noise: torch.Tensor | None = None,
        noise_real: torch.Tensor | None = None,
        noise_fake: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """One D update: adversarial loss + R1 (+ R2); G runs under no_grad and is not touched.

        Approximated R1/R2 use ONE D forward over `cat([real, fake, real + sigma n, fake + sigma n'])`
        with the same t and c for each pair; with `mismatch_weight` the same forward also scores `real`
        under another sample's caption (a mismatched pair, counted as fake): real i gets caption
        i + 1 mod B of the WHOLE batch, rolled before micro-batching, so a micro batch of one still
        sees a foreign caption and every grad_accum gives the same pairs.
        A noised-input D (SF-V) scores `x_t = (1 - t) x + t eps` (eps: noise_real / noise_fake) instead of
        x, so R1 / R2 are taken at that input.
        """
        cfg, D = self.config, self.discriminator
        b, dev = x_real.shape[0], x_real.device
        self._latent_shape = tuple(x_real.shape)
        z = torch.randn_like(x_real) if z is None else z
        t_d = self.sample_t(b, dev) if t_d is None else t_d
        use_r1 = cfg.r1_lambda > 0
        mismatch = cfg.mismatch_weight > 0 and b > 1  # one sample has no other caption to borrow
        if use_r1 and cfg.r1_mode == "approx" and r1_noise is None:
            r1_noise = torch.randn_like(x_real)
        if cfg.r2 and r2_noise is None:
            r2_noise = torch.randn_like(x_real)
        if self._noised:
            noise_real = torch.randn_like(x_real) if noise_real is None else noise_real
            noise_fake = torch.randn_like(x_real) if noise_fake is None else noise_fake
        _check_shapes(x_real, z=z, r1_noise=r1_noise, r2_noise=r2_noise, noise_real=noise_real, noise_fake=noise_fake)
        if t_d.shape != (b,):
            raise ValueError(f"t_d must be [B={b}], got shape {tuple(t_d.shape)}")
        mis_cond = index_cond(cond, (torch.arange(b, device=dev) + 1) % b) if mismatch else None  # caption i+1

        self.opt_d.zero_grad(set_to_none=True)
        mean = _Mean(cfg.grad_accum)
        for sl in _micro_batches(b, cfg.grad_accum):
            real, c, t = x_real[sl], index_cond(cond, sl), t_d[sl]
            with torch.no_grad(), autocast_context(dev, cfg.autocast_dtype):
                fake = self.generate(z[sl], c).to(real.dtype)
            if self._noised:  # SF-V: D sees x_t at its t, real and fake alike
                real, fake = _noised_input(real, t, noise_real[sl]), _noised_input(fake, t, noise_fake[sl])
            xs = [real, fake]
            if use_r1 and cfg.r1_mode == "approx":
                xs.append(losses.perturb(real, cfg.r1_sigma, r1_noise[sl]))
            if cfg.r2:
                xs.append(losses.perturb(fake, cfg.r1_sigma, r2_noise[sl]))
            if use_r1 and cfg.r1_mode == "exact":
                real = real.detach().requires_grad_(True)
                xs[0] = real
            k = len(xs)
            conds = repeat_cond(c, k)
            if mismatch:
                xs.append(xs[0].detach())
                conds = cat_cond(conds, index_cond(mis_cond, sl))
            exact = use_r1 and cfg.r1_mode == "exact"
            with losses.math_attention(dev) if exact else nullcontext(), autocast_context(dev, cfg.autocast_dtype):
                logits = D(torch.cat(xs), conds, t.repeat(len(xs))).chunk(len(xs))
            l_real, l_fake = logits[0], logits[1]
            if cfg.loss == "relativistic":
                adv = losses.d_loss_relativistic(l_real, l_fake)
            elif cfg.loss == "hinge":
                adv = losses.d_loss_hinge(l_real, l_fake)
            else:
                adv = losses.d_loss_nonsaturating(l_real, l_fake)
            loss, extra = adv, {}
            if mismatch:
                l_mis = logits[k]
                extra["d_mismatch"] = (losses.d_loss_relativistic(l_real, l_mis) if cfg.loss == "relativistic"
                                       else losses.d_loss_hinge_fake(l_mis) if cfg.loss == "hinge"
                                       else losses.d_loss_fake(l_mis))
                loss = loss + cfg.mismatch_weight * extra["d_mismatch"]
            if use_r1 and cfg.r1_mode == "approx":
                extra["ar1"] = losses.approx_r1(l_real, logits[2])
                loss = loss + cfg.r1_lambda * extra["ar1"]
            elif exact:
                with losses.math_attention(dev):
                    extra["r1"] = losses.r1_penalty(l_real, real)
                loss = loss + cfg.r1_lambda * cfg.r1_sigma**2 * extra["r1"]
            if cfg.r2:
                extra["ar2"] = losses.approx_r1(l_fake, logits[k - 1])
                loss = loss + cfg.r2_lambda * extra["ar2"]
            (loss / cfg.grad_accum).backward()  # checkpointed blocks recompute with the forward's kernels
            mean.add(
                d_loss=loss,
                d_adv=adv,
                d_loss_real=losses.d_loss_real(l_real),
                d_loss_fake=losses.d_loss_fake(l_fake),
                logits_real=l_real.mean(),
                logits_fake=l_fake.mean(),
                d_acc=losses.d_accuracy(l_real, l_fake, cfg.loss == "relativistic"),
                **extra,
            )
        metrics = mean.result()
        metrics["grad_norm_d"] = _grad_norm_and_step(self.opt_d, cfg.max_grad_norm)
        return metrics

    def g_step(
        self,
        cond: Any,
        z: torch.Tensor | None = None,
        t_d: torch.Tensor | None = None,
        x_real: torch.Tensor | None = None,
        noise_fake: torch.Tensor | None = None,
        noise_real: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """One G update against a fixed D (D's params are frozen for the step); then EMA update.

        `x_real` is needed by the relativistic loss only (D(x) is paired with D(G(z))). z's shape
        defaults to x_real's, else to the last d_step's real batch. A noised-input D (SF-V) scores
        `(1 - t) G(z) + t noise_fake` (and the real sample noised with noise_real).
        """
        cfg, D = self.config, self.discriminator
        relativistic = cfg.loss == "relativistic"
        if relativistic and x_real is None:
            raise ValueError("loss='relativistic' pairs D(G(z)) with D(x): pass x_real to g_step")
        if z is None:
            shape = tuple(x_real.shape) if x_real is not None else self._latent_shape
            if shape is None:
                raise ValueError("g_step needs z (or x_real, or a previous d_step) to know the latent shape")
            p = next(self.generator.parameters())
            z = torch.randn(shape, device=p.device)
        b, dev = z.shape[0], z.device
        t_d = self.sample_t(b, dev) if t_d is None else t_d
        if t_d.shape != (b,):
            raise ValueError(f"t_d must be [B={b}], got shape {tuple(t_d.shape)}")
        if x_real is not None:
            _check_shapes(z, x_real=x_real)
        if self._noised:
            noise_fake = torch.randn_like(z) if noise_fake is None else noise_fake
            noise_real = torch.randn_like(z) if noise_real is None and x_real is not None else noise_real
            _check_shapes(z, noise_fake=noise_fake, noise_real=noise_real)

        self.opt_g.zero_grad(set_to_none=True)
        mean = _Mean(cfg.grad_accum)
        with frozen(D.parameters()):
            for sl in _micro_batches(b, cfg.grad_accum):
                c, t = index_cond(cond, sl), t_d[sl]
                with autocast_context(dev, cfg.autocast_dtype):
                    fake = self.generate(z[sl], c)
                    d_in = _noised_input(fake, t, noise_fake[sl]) if self._noised else fake
                    l_fake = D(d_in, c, t)
                    if relativistic:
                        real = x_real[sl].to(fake.dtype)
                        with torch.no_grad():
                            l_real = D(_noised_input(real, t, noise_real[sl]) if self._noised else real, c, t)
                        loss = losses.g_loss_relativistic(l_real, l_fake)
                    elif cfg.loss == "hinge":
                        loss = losses.g_loss_hinge(l_fake)
                    else:
                        loss = losses.g_loss_nonsaturating(l_fake)
                (loss / cfg.grad_accum).backward()
                extra = {"logits_real_g": l_real.mean()} if relativistic else {}
                mean.add(g_loss=loss, logits_fake_g=l_fake.mean(), fake_std=fake.detach().float().std(), **extra)
        metrics = mean.result()
        metrics["grad_norm_g"] = _grad_norm_and_step(self.opt_g, cfg.max_grad_norm)
        if self.ema is not None:
            self.ema.update(self.generator)
        return metrics


def _noised_input(x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """`(1 - t) x + t eps` (the input of a noised-input discriminator; t stays fp32)."""
    return add_noise(x, eps.to(x.dtype), t)


def _check_shapes(ref: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.shape != ref.shape:
            raise ValueError(f"{name} must have shape {tuple(ref.shape)}, got {tuple(t.shape)}")


# ----------------------------------------------------------------------------------------------
# Consistency distillation
# ----------------------------------------------------------------------------------------------


class CDTrainer:
    """Stage 1: discrete consistency distillation of `teacher` into `student` (see apt_core.distill)."""

    def __init__(
        self, student: nn.Module, teacher: nn.Module, opt: torch.optim.Optimizer, config: CDConfig | None = None, ema: Any = None
    ):
        self.student, self.teacher, self.opt = student, teacher, opt
        self.config = config or CDConfig()
        self.ema = ema
        self.grid = cd_grid(self.config.steps, self.config.shift)

    def cd_step(
        self,
        x0: torch.Tensor,
        cond: Any,
        neg_cond: Any = None,
        eps: torch.Tensor | None = None,
        step_index: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """One CD update; returns {loss, grad_norm, t_mean}. step_index [B] in 1..steps (drawn if None)."""
        cfg, b, dev = self.config, x0.shape[0], x0.device
        if cfg.cfg_scale != 1.0 and neg_cond is None:
            raise ValueError(f"CDConfig.cfg_scale={cfg.cfg_scale} needs neg_cond (e.g. the empty prompt's embedding)")
        eps = torch.randn_like(x0) if eps is None else eps
        step_index = sample_step_index(b, cfg.steps, dev) if step_index is None else step_index.to(dev)
        _check_shapes(x0, eps=eps)
        if step_index.shape != (b,):  # checked on the whole batch, before micro-batching slices it
            raise ValueError(f"step_index must be [B={b}] (one grid index per sample), got shape {tuple(step_index.shape)}")
        grid = self.grid.to(dev)
        self.opt.zero_grad(set_to_none=True)
        mean = _Mean(cfg.grad_accum)
        for sl in _micro_batches(b, cfg.grad_accum):
            neg = index_cond(neg_cond, sl) if neg_cond is not None else None
            with autocast_context(dev, cfg.autocast_dtype):
                loss = consistency_loss(
                    self.student, self.teacher, x0[sl], index_cond(cond, sl), eps[sl], step_index[sl], grid, cfg.cfg_scale, neg
                )
            (loss / cfg.grad_accum).backward()
            mean.add(loss=loss, t_mean=grid[step_index[sl]].mean())
        metrics = mean.result()
        metrics["grad_norm"] = _grad_norm_and_step(self.opt, cfg.max_grad_norm)
        if self.ema is not None:
            self.ema.update(self.student)
        return metrics


def is_finite_metrics(metrics: Mapping[str, torch.Tensor | float]) -> bool:
    """True if every metric is finite (host sync: call every N steps, not every step)."""
    return all(math.isfinite(float(v)) for v in metrics.values())
