"""`python -m training --config FILE.toml [--resume] [--section.key=value ...]` (also `apt-train`);
`python -m training --resume RUN_DIR [--section.key=value ...]` continues a run from its own config.toml.

The same command runs as one process or under `torchrun --nproc-per-node N` (and multi-node
rendezvous, or SLURM's srun): the process group is joined with env://, gloo on CPU and nccl on
CUDA. See docs/TRAINING.md for the config schema, checkpoint layout, export and monitoring files.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from training.config import ConfigError, dumps, load_config, split_override_args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="apt-train",
        description="Headless APT training: teacher (flow matching), cd (consistency distillation) or apt stages.",
        epilog="Any other --section.key=value overrides that config key, e.g. --apt.lr=1e-5 --run.dir=runs/x. "
        "Exit codes: 0 done, 2 config error, 75 stopped by SIGTERM/SIGUSR1 with a checkpoint saved (rerun to resume).",
    )
    p.add_argument("--config", help="TOML run config (see configs/ and docs/TRAINING.md); may be left out with "
                   "--resume RUN_DIR or --resume RUN_DIR/checkpoints/step-N (their config.toml is used)")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="RUN_DIR_OR_CHECKPOINT",
        help="resume from the newest complete checkpoint of run.dir, of the given run directory, or the given "
        "step-N folder; a run dir that already has one resumes automatically",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    p.add_argument("--export-only", action="store_true",
                   help="load the newest checkpoint (or --resume step-N), export the generator, exit; an earlier step "
                        "than the run's last goes to <name>_step-N.safetensors")
    p.add_argument("--overwrite", action="store_true", help="replace existing export files (export.overwrite = true)")
    return p


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """Known flags plus the `--section.key=value` overrides (validated later by load_config)."""
    args, rest = build_parser().parse_known_args(argv)
    return args, split_override_args(rest)


def is_checkpoint(path: Path) -> bool:
    """A step-N checkpoint folder (COMPLETE marker or DCP .metadata), not a run directory."""
    from training.checkpoint import COMPLETE

    return (path / COMPLETE).is_file() or (path / ".metadata").is_file()


def resume_target(config: str | None, resume: bool | str) -> tuple[str | None, bool | str, list[str]]:
    """(config file, train()'s `resume`, leading overrides) for --config / --resume: `--resume RUN_DIR` resumes
    that run dir's newest checkpoint (config: RUN_DIR/config.toml unless --config), `--resume step-N` that
    checkpoint (config: its config.toml unless --config); the run dir is set before the user's overrides."""
    if not isinstance(resume, str):
        if config is None:
            raise ConfigError("--config FILE is required (or --resume RUN_DIR to continue a run from its config.toml)")
        return config, resume, []
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume {resume}: no such run directory or step-N checkpoint folder")
    if is_checkpoint(path):  # with --config: that config's run.dir (a checkpoint may seed another run)
        run_dir, target = (path.parent.parent if config is None else None), resume
    else:
        if not (path / "config.toml").is_file() and not (path / "checkpoints").is_dir():
            raise FileNotFoundError(f"--resume {resume}: not a run directory (no config.toml, no checkpoints/) and not a "
                                    "step-N checkpoint folder")
        run_dir, target = path, True
    if config is None:
        config = str(path / "config.toml")
        if not Path(config).is_file():
            raise FileNotFoundError(f"--resume {resume}: {config} is missing; pass --config FILE")
    return config, target, [f"--run.dir={run_dir}"] if run_dir is not None else []


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the process exit code."""
    try:
        args, overrides = parse_args(argv)
        config, args.resume, lead = resume_target(args.config, args.resume)
        cfg = load_config(config, lead + overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"apt-train: config error: {e}", file=sys.stderr)
        return 2
    if args.overwrite:
        cfg.export.overwrite = True
    if args.print_config:
        print(dumps(cfg), end="")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from apt_core.shards import BadSample
    from training.distributed import destroy
    from training.loop import ResumeMismatch, RunComplete, train
    from training.runlock import RunDirBusy
    from training.stop import EXIT_STOPPED

    STOPS = (RunComplete, RunDirBusy, ResumeMismatch, BadSample, FileExistsError, FileNotFoundError, FloatingPointError)

    log = logging.getLogger("apt-train")
    ok = False
    try:
        result = train(cfg, resume=args.resume, export_only=args.export_only)
        ok = True
    except ConfigError as e:  # a path or file the config names, found before any model is built (every rank)
        if os.environ.get("RANK", "0") == "0":
            print(f"apt-train: config error: {e}", file=sys.stderr)
        return 2
    except STOPS as e:  # a refusal or a stop with its reason: the message, not a traceback
        print(f"apt-train: error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        if "timed out" in str(e).lower() or "timeout" in str(e).lower():
            log.error("a collective waited longer than distributed.timeout_s = %g s: another rank stalled or died "
                      "(see its log); the job stops instead of hanging. Rerunning resumes from the newest checkpoint.",
                      cfg.distributed.timeout_s)
        raise
    finally:
        destroy(barrier=ok)  # no barrier after an error: the other ranks may never reach it
    if result.get("stopped"):
        saved = f"checkpoint {result['checkpoint']}" if result.get("checkpoint") else "no checkpoint yet"
        log.info("stopped (%s) at step %d, %s; rerun the same command to resume (exit code %d)",
                 result["stopped"], result["step"], saved, EXIT_STOPPED)
        return EXIT_STOPPED
    if result.get("export"):
        log.info("exported %s", result["export"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
