"""The runner: one training loop for every front end (apt-train, the ComfyUI nodes).

`train(cfg)` runs the configured stage (training.stages) to the end with DCP checkpoints, metrics,
validation samples and exports; it resumes from the newest intact checkpoint of run.dir. A front end
that holds the weights in memory passes a `training.models.ModelSource`, follows the steps with
`on_step` and stops the run with its own `StopRequest`; the run dir it leaves is the same as
apt-train's, so either front end resumes it.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from apt_core.backbone import WanCond
from apt_core.flow import generate_one_step
from apt_core.models.io import load_state_dict_file
from apt_core.models.registry import family_of_config
from apt_core.models.wan import WanConfig
from training import distributed as D
from training.checkpoint import CheckpointManager, ObjectState, read_info, verify
from training.config import ConfigError, RunConfig, dumps, save_config, set_arch
from training.data import Batch, BucketedLoader, ShardDataset
from training.export import export_files, export_generator
from training.models import (  # noqa: F401  (public names, importable from training.loop as before)
    FileSource,
    MemorySource,
    ModelSource,
    base_weights,
    build_discriminator,
    build_flow,
    original_weights,
    resolve_wan_config,
    seeded,
)
from training.monitor import CollapseDetector, MetricsLogger, Validator, count_flops, peak_tflops, to_floats
from training.parallelize import reshard
from training.preflight import preflight
from training.runchecks import (  # noqa: F401
    ResumeMismatch,
    RunComplete,
    check_export_targets,
    check_resume_config,
    check_weights,
    export_name,
    first_nonfinite,
    load_checkpoint,
    planned_exports,
    stop_if_diverged,
)
from training.runlock import run_lock
from training.stages import (  # noqa: F401
    IMAGE_LATENT_FALLBACK,
    STAGES,
    APTStage,
    CDStage,
    Phase,
    Stage,
    TeacherStage,
    _cond,
    _per_sample_t,
    plan_phases,
)
from training.stop import StopRequest

log = logging.getLogger(__name__)

OnStep = Callable[[int, int, dict[str, float]], None]


def _uses_image_latent_fallback(config: WanConfig, dataset: ShardDataset) -> bool:
    """True for an image-conditioned family (Wan 2.1 I2V) trained on shards without `image_latent`."""
    fam = family_of_config(config)
    return fam is not None and fam.image_condition is not None and not dataset.has_image_latent()


def _batches(loader: BucketedLoader, device: torch.device) -> Iterator[Batch]:
    for batch in loader:
        yield batch.to(device)


def make_validator(cfg: RunConfig, world: D.World, dataset: ShardDataset, run_dir: Path) -> Validator | None:
    """Fixed prompts (file or the dataset's first samples) x fixed seeds, at the phase's latent shape."""
    m = cfg.monitor
    if not m.val_every:
        return None
    shape = tuple(m.val_shape) if m.val_shape else tuple(dataset.shapes[0])
    if m.val_prompts:
        contexts = load_state_dict_file(m.val_prompts)["context"].float()
        contexts = contexts[None] if contexts.ndim == 2 else contexts  # one prompt [L, D]
    else:
        samples = [dataset[i] for i in range(min(m.val_num_prompts, len(dataset)))]
        L = max(s.text_emb.shape[0] for s in samples)
        contexts = torch.zeros(len(samples), L, samples[0].text_emb.shape[1])
        for i, s in enumerate(samples):
            contexts[i, : s.text_len] = s.text_emb[: s.text_len].float()
    same = [i for i, s in enumerate(dataset.shapes) if tuple(s) == shape][:8]
    reference = torch.stack([dataset[i].latent.float() for i in same]) if same else None  # None: the noise's spread
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


def train(cfg: RunConfig, resume: bool | str = False, export_only: bool = False, *, models: ModelSource | None = None,
          on_step: OnStep | None = None, stop: StopRequest | None = None) -> dict[str, Any]:
    """Run the configured stage to the end (resuming from the newest intact checkpoint if any), holding
    the run directory's lock (training.runlock) throughout.

    `models`: where the architecture and base weights come from (None: the config's files). With any other
    source the run is recorded as model.source = 'caller' with its [model.arch], so that its checkpoints
    resume without the caller. `on_step(step, total, metrics)`: called on every rank after each optimiser
    step with this rank's metrics as floats. `stop`: a StopRequest the caller owns; after `stop.request(reason)`
    the run saves a checkpoint after the current step and returns with result["stopped"] = reason; a stop asked
    for during setup (building the models, loading the checkpoint) returns before the first step, with no new checkpoint.
    Works from any thread (signal handlers are installed only in the main thread) and more than once per process.

    Raises ConfigError (before any model is built) for a path that does not open, and RunComplete
    when run.dir already holds the final step and its export (unless export_only)."""
    if models is not None and not isinstance(models, FileSource):
        cfg = copy.deepcopy(cfg)
        cfg.model.source = "caller"
        set_arch(cfg, models.wan_config(cfg))
    preflight(cfg)
    world = D.init_distributed(cfg.run.device, cfg.parallel.backend, cfg.distributed.timeout_s)
    stop = (stop if stop is not None else StopRequest()).install(grace_s=cfg.distributed.timeout_s)
    try:
        with run_lock(cfg.run.dir, world):
            return _train(cfg, world, stop, resume, export_only, models or FileSource(), on_step)
    finally:
        stop.uninstall()


def check_caller_resume(cfg: RunConfig, start_path: Path | None, phases: list[Phase], k: int) -> None:
    """A model.source = 'caller' run without its caller (apt-train --resume RUN_DIR): ConfigError unless the
    checkpoint holds every model the rest of the run needs (G, D and the EMA are in it; the CD teacher
    and the D of a later APT phase, built from the ORIGINAL weights, are not)."""
    fix = "set model.source = 'files' and model.init_from to the ORIGINAL weights, or resume it from its front end"
    if start_path is None:
        raise ConfigError(f"{cfg.run.dir}: model.source = 'caller' (its base weights were given in-process by a front "
                          f"end) and there is no checkpoint to take them from; {fix}")
    if cfg.run.stage == "cd" and not (cfg.cd.teacher_from or cfg.model.init_from):
        raise ConfigError("stage cd with model.source = 'caller': the frozen teacher is not in the checkpoints; set "
                          "cd.teacher_from to its weights (safetensors)")
    if cfg.run.stage == "apt" and k + 1 < len(phases) and not original_weights(cfg)[1]:
        raise ConfigError(f"model.source = 'caller': the apt {phases[k + 1].name} phase builds a fresh D from the ORIGINAL "
                          f"weights, which are not in the checkpoints; set model.init_from to them, or "
                          f"apt.{phases[k + 1].name}.steps = 0")


def start_banner(cfg: RunConfig, world: D.World, phases: list[Phase], step: int, start_path: Path | None) -> str:
    """What a run is about to do, in one line: run dir, world, phases with step ranges, resume point."""
    plan = ", ".join(f"{p.name} steps {p.start + 1}-{p.end} (global batch {p.micro_batch * p.grad_accum * world.world_size})"
                     for p in phases)
    where = f"resuming from {start_path} at step {step}" if start_path else "fresh start at step 0"
    return (f"apt-train {cfg.run.stage}: run dir {cfg.run.dir}, world size {world.world_size} ({world.backend}, "
            f"{world.device.type}), {plan}; {where} of {phases[-1].end}")


def _train(cfg: RunConfig, world: D.World, stop: StopRequest, resume: bool | str, export_only: bool,
           models: ModelSource, on_step: OnStep | None) -> dict[str, Any]:
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
    config = models.wan_config(cfg)
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
    if cfg.model.source == "caller" and isinstance(models, FileSource):
        check_caller_resume(cfg, start_path, phases, k)
    final_name = export_name(STAGES[cfg.run.stage].export_name, phases[-1].end, phases[-1].end)
    exported = not cfg.export.final or all(p.is_file() for p in export_files(run_dir / "export", final_name, cfg.model.lora_rank,
                                                                    cfg.export.merged))
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
                                 resumed=start_path is not None and not export_only, merged=cfg.export.merged)
        except FileExistsError as e:
            error = str(e)
    error = D.broadcast_object(error)
    if error is not None:
        raise FileExistsError(error)
    stage: Stage = STAGES[cfg.run.stage](cfg, world, config, models)
    logger = MetricsLogger(run_dir, world, phases[-1].end, cfg.monitor.log_every, cfg.monitor.progress and not export_only,
                           cfg.monitor.tensorboard, start_step=step)
    logger.peak_tflops = peak_tflops(world.device, cfg.monitor.peak_tflops)
    detector = CollapseDetector(cfg.monitor.collapse_window, cfg.monitor.d_loss_floor, cfg.monitor.diversity_threshold)
    result: dict[str, Any] = {"world_size": world.world_size, "resumed_from": str(start_path) if start_path else None,
                              "run_dir": str(run_dir), "metrics_file": str(logger.path), "stopped": None}
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

    said_fallback = False
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
        if not said_fallback and _uses_image_latent_fallback(config, dataset):
            logger.event(step, "warning", IMAGE_LATENT_FALLBACK, phase=phase.name, data=str(phase.data))
            said_fallback = True
        validator = make_validator(cfg, world, dataset, run_dir)
        if step < phase.end:  # a stop asked for during setup (models, checkpoint): no step is trained
            reason = stop.agreed(world)  # collective: every rank reaches it at the same point
            if reason:
                where = ckpt.latest()
                logger.event(step, "stopped", f"{reason}: stopped before step {step + 1}, nothing trained"
                             + (f"; the run resumes from {where}" if where else "; the run starts afresh when run again"),
                             reason=reason, checkpoint=str(where) if where else None)
                result["stopped"] = reason
                break
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
            if on_step is not None:
                on_step(step, phases[-1].end, to_floats(metrics))
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
                             overwrite=True, merged=cfg.export.merged)  # checked at start (check_export_targets)
    logger.close()
    result["step"] = step
    result["metrics"] = logger.rows
    latest = ckpt.latest()
    result["checkpoint"] = str(latest) if latest else None
    if result.get("stopped"):
        D.barrier()
        return result
    if cfg.export.final or export_only:
        check_weights(stage, step, ckpt)
        name = export_name(stage.export_name, step, phases[-1].end)
        paths = export_generator(stage.generator, run_dir / "export", name, world, config, stage.ema, lora,
                                 cfg.model.lora_alpha or None, cfg.export.dtype,
                                 {"stage": cfg.run.stage, "step": step}, overwrite=True,  # checked at start
                                 merged=cfg.export.merged)
        result["export"] = {k: str(v) for k, v in paths.items()}
    D.barrier()
    return result

