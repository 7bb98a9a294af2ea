"""The run config's schema: every section of the TOML file as a dataclass whose fields carry a type, a
default, a one-line help and the allowed values or range (`opt`, `Bounds`), and the whole `RunConfig`.

Parsing, overrides, checks and TOML I/O are in training.config, which re-exports every name here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from apt_core.models.attention import CHOICES as ATTENTION_CHOICES
from apt_core.trainer import CDConfig

STAGES = ("teacher", "cd", "apt")


@dataclass(frozen=True)
class Bounds:
    """Allowed range of a numeric key (each item of a list key); NaN never passes, inf only if `finite` is off."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo itself not allowed
    hi_open: bool = False
    finite: bool = True

    def __str__(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return "finite"

    def allows(self, v: float) -> bool:
        """True if `v` lies in the range."""
        if v != v or (self.finite and math.isinf(v)):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)


POSITIVE = Bounds(0, lo_open=True)  # > 0
NONNEG = Bounds(0)  # >= 0 (0 often means "off" or "the default")
AT_LEAST_1 = Bounds(1)
FINITE = Bounds()
DECAY = Bounds(0, 1, hi_open=True)  # EMA decay / Adam beta: 1 would never move


def opt(default: Any, help: str, choices: tuple | None = None, bounds: Bounds | None = None) -> Any:
    """A config field: default, help text (docs), optional allowed values and numeric range."""
    meta = {"help": help, "choices": choices, "bounds": bounds}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: list(d) if isinstance(d, list) else dict(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunSection:
    """What to run and where its files go."""

    stage: str = opt("teacher", "training stage", STAGES)
    dir: str = opt("runs/default", "run directory: config.toml, checkpoints/, metrics.jsonl, samples/, export/")
    seed: int = opt(0, "base seed: model init, data order and per-sample noise (seed, step, global sample index)", bounds=NONNEG)
    steps: int = opt(100, "optimiser steps for the teacher / cd stages (apt uses apt.image.steps + apt.video.steps)", bounds=NONNEG)
    device: str = opt("auto", "auto = cuda if available (one GPU per local rank), else cpu", ("auto", "cpu", "cuda"))
    warmup_steps: int = opt(0, "linear learning-rate warmup over the first N steps of each phase, for every optimiser (G and D); 0 = off", bounds=NONNEG)


@dataclass
class ArchSection:
    """The architecture as WanConfig fields, for a model that matches no preset (e.g. one a ComfyUI node
    trained); dim = 0 leaves the whole table unset (model.init_from's metadata/shapes, else model.preset)."""

    dim: int = opt(0, "model width; 0 = the table is unset", bounds=NONNEG)
    ffn_dim: int = opt(0, "feed-forward width", bounds=NONNEG)
    num_heads: int = opt(0, "attention heads (dim / num_heads = head width)", bounds=NONNEG)
    num_layers: int = opt(0, "transformer blocks", bounds=NONNEG)
    in_dim: int = opt(0, "input channels (latent channels, + image-condition channels for i2v)", bounds=NONNEG)
    out_dim: int = opt(0, "output (latent) channels", bounds=NONNEG)
    text_dim: int = opt(0, "text-encoder embedding width", bounds=NONNEG)
    text_len: int = opt(0, "text tokens", bounds=NONNEG)
    freq_dim: int = opt(0, "timestep sinusoid width", bounds=NONNEG)
    patch_size: list[int] = opt([], "patch size [F, H, W] (Wan: [1, 2, 2])", bounds=AT_LEAST_1)
    eps: float = opt(1e-6, "norm epsilon", bounds=POSITIVE)
    qk_norm: bool = opt(True, "RMS-normalise queries and keys")
    cross_attn_norm: bool = opt(True, "LayerNorm before cross-attention")
    model_type: str = opt("t2v", "t2v, or i2v (image latent + mask channels in x, CLIP image tokens in cross-attention)",
                          ("t2v", "i2v"))


ARCH_REQUIRED = ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim", "text_len", "freq_dim")


@dataclass
class ModelSection:
    """The Wan DiT being trained."""

    preset: str = opt("tiny", "a preset of a registered model family (apt_core.models.registry: tiny, tiny-ti2v, wan2.1-t2v-1.3b, wan2.2-ti2v-5b, ...) for models built from scratch")
    init_from: str = opt("", "safetensors in Wan keys (ComfyUI prefixes ok): the ORIGINAL diffusion weights; '' = seeded init")
    in_dim: int = opt(0, "override the preset's latent channels (3 for pixel models); 0 = preset's", bounds=NONNEG)
    expert_files: list[str] = opt([], "mixture-of-experts presets (e.g. wan2.2-t2v-a14b): the ORIGINAL weights as one "
                                  "safetensors per expert, 'expert=path' (e.g. ['high_noise=/m/high.safetensors', "
                                  "'low_noise=/m/low.safetensors']); replaces init_from; apt stage only")
    generator_expert: str = opt("", "expert whose file initialises the one-step generator; '' = the family's choice "
                                "(wan2.2-t2v-a14b: high_noise, as t = 1 lies in its range)")
    discriminator_expert: str = opt("", "expert whose file initialises the discriminator backbone; '' = the family's choice "
                                    "(wan2.2-t2v-a14b: high_noise)")
    lora_rank: int = opt(0, "train LoRA adapters of this rank on the generator instead of all weights; 0 = full fine-tune", bounds=NONNEG)
    lora_alpha: float = opt(0.0, "LoRA alpha; 0 = rank", bounds=NONNEG)
    source: str = opt("files", "where the base weights come from: files = init_from / expert_files / seeded init; "
                      "caller = given in-process by a front end (the ComfyUI nodes: train(models=...)); such a run "
                      "resumes from its checkpoints alone (they hold G, D and the EMA), e.g. apt-train --resume RUN_DIR",
                      ("files", "caller"))
    arch: ArchSection = field(default_factory=ArchSection)


@dataclass
class DataSection:
    """Shards written by apt_core.shards.ShardWriter."""

    path: str = opt("", "shard directory (teacher / cd, and apt phases without their own `data`)")
    micro_batch: int = opt(1, "samples per rank per forward/backward", bounds=AT_LEAST_1)
    grad_accum: int = opt(1, "micro batches per optimiser step; global batch = micro_batch * grad_accum * world size", bounds=AT_LEAST_1)


@dataclass
class ParallelSection:
    """How the model is spread over processes (training/parallelize.py)."""

    strategy: str = opt("fsdp", "fsdp = FSDP2 fully_shard per block then root; ddp; none (single process only)", ("fsdp", "ddp", "none"))
    mixed_precision: str = opt("auto", "auto = bf16 params + fp32 reduce on CUDA, fp32 on CPU", ("auto", "bf16", "fp32"))
    activation_checkpointing: bool = opt(False, "recompute each transformer block in backward (saves activation memory)")
    compile: bool = opt(False, "torch.compile each transformer block")
    attention: str = opt("default", "SDPA kernel: default = PyTorch's dispatcher; auto = the fastest, timed once per shape; "
                         "or flash / cudnn / efficient / math wherever it takes the inputs", ATTENTION_CHOICES)
    backend: str = opt("auto", "process-group backend: auto = nccl on CUDA, gloo on CPU", ("auto", "nccl", "gloo"))


@dataclass
class DistributedSection:
    """Process-group behaviour (training/distributed.py, training/stop.py)."""

    timeout_s: float = opt(600.0, "collective timeout (s): a rank that stalls or dies ends the job after this long instead of "
                           "hanging; must cover the slowest collective wait: rank 0 loading init_from, the first step, a checkpoint save", bounds=POSITIVE)


@dataclass
class TeacherSection:
    """Plain flow-matching training: loss MSE(v(x_t, t), eps - x0)."""

    lr: float = opt(1e-4, "AdamW learning rate", bounds=POSITIVE)
    weight_decay: float = opt(0.0, "AdamW weight decay", bounds=NONNEG)
    betas: list[float] = opt([0.9, 0.999], "AdamW betas", bounds=DECAY)
    grad_clip: float = opt(1.0, "max global gradient norm; 0 = off", bounds=NONNEG)
    timesteps: str = opt("logit_normal", "training-time sampler", ("logit_normal", "shifted", "uniform"))
    shift: float = opt(1.0, "timestep shift s applied to the sampled t (shift(t, s) = s t / (1 + (s - 1) t))", bounds=POSITIVE)
    logit_mean: float = opt(0.0, "logit-normal mean", bounds=FINITE)
    logit_std: float = opt(1.0, "logit-normal std", bounds=POSITIVE)
    ema_decay: float = opt(0.0, "EMA decay of the trained weights; 0 = no EMA (export the raw weights)", bounds=DECAY)


@dataclass
class CDSection:
    """Consistency distillation of the (frozen) diffusion model into a one-step student (apt_core.trainer.CDTrainer)."""

    lr: float = opt(1e-5, "student learning rate (AAPT: AdamW 1e-5, wd 0.01)", bounds=POSITIVE)
    weight_decay: float = opt(0.01, "AdamW weight decay", bounds=NONNEG)
    grid_steps: int = opt(32, "consistency grid size N", bounds=AT_LEAST_1)
    grid_shift: float = opt(CDConfig.shift, "grid shift s of t_n = shift(n / N, s) (AAPT: 24; 1 = uniform grid)", bounds=POSITIVE)
    cfg_scale: float = opt(1.0, "teacher CFG scale (APT: 7.5 with a negative prompt; 1 = off)", bounds=NONNEG)
    negative_embedding: str = opt("", "safetensors with `context` [L, D]: the negative-prompt embedding for CFG; '' = zeros")
    teacher_from: str = opt("", "teacher weights (safetensors); '' = model.init_from")
    ema_decay: float = opt(0.0, "EMA of the student; 0 = none (AAPT uses none)", bounds=DECAY)


@dataclass
class APTPhase:
    """One APT phase (images, then video): G from the previous phase's EMA, D fresh from the diffusion weights."""

    steps: int = opt(0, "G updates in this phase (D and G alternate 1:1); 0 = skip the phase", bounds=NONNEG)
    lr: float = opt(0.0, "G and D learning rate; 0 = apt.lr", bounds=NONNEG)
    lr_d: float = opt(0.0, "D learning rate if different from G's; 0 = same as lr", bounds=NONNEG)
    r1_sigma: float = opt(0.01, "approximated-R1 perturbation std (paper: 0.01 images, 0.1 video)", bounds=POSITIVE)
    d_timestep_shift: float = opt(1.0, "D timestep ensemble t ~ shift(U(0,1), s) (paper: 1 images, 12 video)", bounds=POSITIVE)
    mismatch_weight: float = opt(0.0, "matching-aware D (GigaGAN, not in APT): weight of real-with-another-caption as fake; 0 = off", bounds=NONNEG)
    data: str = opt("", "shard directory for this phase; '' = data.path")
    micro_batch: int = opt(0, "samples per rank per micro step; 0 = data.micro_batch", bounds=NONNEG)
    grad_accum: int = opt(0, "micro batches per step; 0 = data.grad_accum", bounds=NONNEG)

    def learning_rates(self, base_lr: float) -> tuple[float, float]:
        """(G lr, D lr) of this phase: lr falls back to apt.lr (`base_lr`), lr_d to the phase's G lr."""
        lr = self.lr or base_lr
        return lr, self.lr_d or lr


@dataclass
class SFVSection:
    """The SF-V discriminator (apt.disc_kind = "sfv"): frozen first blocks + spatial/temporal heads, noised inputs."""

    backbone_blocks: int = opt(0, "frozen backbone depth: the first N blocks of the ORIGINAL model; 0 = half of them (SF-V: the encoder)", bounds=NONNEG)
    head_layers: list[int] = opt([], "0-based blocks (< backbone_blocks) with a spatial + temporal head each; [] = 4 evenly spaced, the last included", bounds=NONNEG)
    head_channels: int = opt(0, "width of the heads' convolutions; 0 = min(model width, 128)", bounds=NONNEG)
    p_mean: float = opt(-1.0, "D input noise: sigma ~ LogNormal(p_mean, p_std), t = sigma / (1 + sigma) (SF-V: -1; -2 lets D win too fast)", bounds=FINITE)
    p_std: float = opt(1.0, "std of log sigma (SF-V: 1)", bounds=POSITIVE)


@dataclass
class APTSection:
    """Adversarial post-training (apt_core.trainer.APTTrainer)."""

    lr: float = opt(5e-6, "G and D learning rate for phases that set lr = 0 (paper: 5e-6 images)", bounds=POSITIVE)
    generator_init: str = opt("", "G init: the CD stage's export (safetensors, Wan keys); '' = model.init_from")
    loss: str = opt("nonsaturating", "GAN loss (relativistic = AAPT/SeedVR2 pairing with R1 and R2; hinge = SF-V's)",
                    ("nonsaturating", "relativistic", "hinge"))
    r1_lambda: float = opt(100.0, "approximated-R1 weight (paper 100; AAPT relativistic 1000)", bounds=NONNEG)
    r1_mode: str = opt("approx", "approx = APT's approximated R1 (one batched forward); exact = the gradient penalty by double "
                       "backward, weighted r1_lambda * r1_sigma^2 (SF-V's; math attention, not with parallel.strategy = fsdp)",
                       ("approx", "exact"))
    ema_decay: float = opt(0.995, "EMA decay of G (the EMA is what gets exported)", bounds=DECAY)
    disc_kind: str = opt("apt", "discriminator: apt = copy of the ORIGINAL model + cross-attention heads (paper); sfv = SF-V's "
                         "frozen first blocks + spatial/temporal heads on noised inputs (apt.sfv; far less memory)", ("apt", "sfv"))
    disc_mode: str = opt("full", "APT D backbone: full (paper), lora adapters, or frozen (heads only)", ("full", "lora", "frozen"))
    disc_lora_rank: int = opt(16, "LoRA rank of the D backbone when disc_mode = lora", bounds=AT_LEAST_1)
    head_layers: list[int] = opt([], "0-based APT D tap blocks; [] = paper's 16/26/36 of 36 scaled to the depth", bounds=NONNEG)
    sfv: SFVSection = field(default_factory=SFVSection)
    image: APTPhase = field(default_factory=lambda: APTPhase(steps=350, r1_sigma=0.01, d_timestep_shift=1.0))
    video: APTPhase = field(default_factory=lambda: APTPhase(steps=300, lr=3e-6, r1_sigma=0.1, d_timestep_shift=12.0))


@dataclass
class CheckpointSection:
    """DCP checkpoints in <run.dir>/checkpoints/step-N/."""

    every: int = opt(100, "save every N optimiser steps (and at the end); 0 = only at the end", bounds=NONNEG)
    keep: int = opt(3, "keep the last K complete checkpoints (older ones are deleted); 0 = keep all", bounds=NONNEG)


@dataclass
class ExportSection:
    """Model-only safetensors at the end of a run (and of the APT image phase)."""

    final: bool = opt(True, "export the (EMA) generator when the run ends")
    merged: bool = opt(True, "with model.lora_rank > 0 also write <name>.safetensors, the generator with its LoRA merged "
                       "(the full model's size) beside <name>_lora.safetensors; off: the LoRA file only")
    dtype: str = opt("bf16", "dtype of exported tensors", ("bf16", "fp16", "fp32"))
    overwrite: bool = opt(False, "replace existing export files (also --overwrite); off: a run refuses at start")


@dataclass
class MonitorSection:
    """Progress bar, metrics.jsonl, TensorBoard, validation samples and GAN health checks."""

    log_every: int = opt(10, "host-sync + write the buffered per-step metrics every N steps", bounds=AT_LEAST_1)
    progress: bool = opt(True, "tqdm bar on rank 0")
    tensorboard: bool = opt(False, "also write TensorBoard events to <run.dir>/tb (needs the tensorboard package)")
    peak_tflops: float = opt(0.0, "dense bf16 peak TFLOP/s of one device, for the mfu metric; 0 = known GPUs "
                             "(H100/H200 989, A100 312, B200 2250), no mfu on other devices", bounds=NONNEG)
    val_every: int = opt(0, "validation samples every N steps (and at the end); 0 = off", bounds=NONNEG)
    val_seeds: list[int] = opt([0, 1, 2, 3], "noise seeds per validation prompt (fixed across the run)", bounds=NONNEG)
    val_prompts: str = opt("", "safetensors with `context` [P, L, D] prompt embeddings; '' = the first val_num_prompts samples")
    val_shape: list[int] = opt([], "latent shape [C, F, H, W] of the validation samples; [] = the dataset's first shape", bounds=AT_LEAST_1)
    val_num_prompts: int = opt(2, "prompts taken from the dataset when val_prompts is empty", bounds=AT_LEAST_1)
    val_fps: int = opt(16, "fps of the validation mp4s", bounds=AT_LEAST_1)
    collapse_window: int = opt(50, "steps over which the D loss must stay below d_loss_floor to warn about D winning", bounds=AT_LEAST_1)
    d_loss_floor: float = opt(0.01, "D loss considered 'near zero' (collapse warning)", bounds=Bounds(0, finite=False))
    diversity_threshold: float = opt(0.05, "warn when the mean pairwise distance of seeds' samples / the real one falls below this", bounds=NONNEG)


@dataclass
class RunConfig:
    """The whole run. Sections map to TOML tables of the same name."""

    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    cd: CDSection = field(default_factory=CDSection)
    apt: APTSection = field(default_factory=APTSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    export: ExportSection = field(default_factory=ExportSection)
    monitor: MonitorSection = field(default_factory=MonitorSection)


class ConfigError(ValueError):
    """A config value or key that is not allowed (the message names it and what is allowed)."""
