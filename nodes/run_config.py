"""The training nodes' widget values as a headless run config (training.config.RunConfig).

One mapping serves both uses: APT Consistency Distill / APT Train run the headless runner with it
(`node_run_config`: the node's run folder, single process, exports into the run folder), and APT
Export Train Config writes it for a cluster (`widget_config`: the cluster's paths). A bad widget
value is reported by its widget name and the config key it sets. Imports without ComfyUI.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

CD_NODE, APT_NODE, DISC_NODE = "APT Consistency Distill", "APT Train", "APT Discriminator"

# config key -> (node, widget) that sets it: how a ConfigError about the key is reported
WIDGET_OF_KEY = {
    "run.seed": (None, "seed"),
    "run.steps": (CD_NODE, "iterations"),
    "model.lora_rank": (None, "lora_rank"),
    "data.micro_batch": (None, "batch_size"),
    "data.grad_accum": (None, "grad_accum"),
    "cd.lr": (CD_NODE, "lr"),
    "cd.grid_steps": (CD_NODE, "cd_steps"),
    "cd.grid_shift": (CD_NODE, "grid_shift"),
    "cd.cfg_scale": (CD_NODE, "cfg"),
    "apt.lr": (APT_NODE, "lr"),
    "apt.r1_lambda": (APT_NODE, "r1_lambda"),
    "apt.ema_decay": (APT_NODE, "ema_decay"),
    "apt.image.steps": (APT_NODE, "steps"),
    "apt.image.r1_sigma": (APT_NODE, "r1_sigma"),
    "apt.image.d_timestep_shift": (APT_NODE, "d_timestep_shift"),
    "apt.disc_mode": (DISC_NODE, "mode"),
    "apt.disc_lora_rank": (DISC_NODE, "lora_rank"),
    "apt.head_layers": (DISC_NODE, "head_layers"),
    "apt.sfv.head_layers": (DISC_NODE, "head_layers"),
    "monitor.val_every": (APT_NODE, "val_every"),
    "monitor.val_seeds": (APT_NODE, "val_seed"),
}


def val_seeds(val_seed: int, count: int = 2) -> list[int]:
    """The validation noise seeds of APT Train: val_seed, val_seed + 1, ... (at least 2, for the diversity metric)."""
    return [int(val_seed) + i for i in range(max(2, int(count)))]


def _batch(w: Mapping[str, Any], node: str) -> tuple[int, int]:
    """(micro_batch, grad_accum) from the batch_size / grad_accum widgets (the same global batch on one process)."""
    batch, accum = int(w["batch_size"]), int(w["grad_accum"])
    if accum < 1 or batch % accum:
        from training.config import ConfigError

        raise ConfigError(f"{node}: batch_size={batch} must be a multiple of grad_accum={accum} "
                          "(each step runs grad_accum micro-batches of batch_size / grad_accum samples)")
    return batch // accum, accum


def widget_config(stage: str, cd: Mapping[str, Any], apt: Mapping[str, Any], disc: Mapping[str, Any],
                  data_path: str, run_dir: str, model: Mapping[str, Any] | None = None,
                  apt_section: Mapping[str, Any] | None = None) -> dict:
    """The run config (a TOML-shaped dict) of `stage` ("cd" / "apt") from the widget values of the CD,
    APT Train and APT Discriminator nodes (by input name): both stages' keys are set, the run's stage picks.

    `disc`: mode, head_layers (a list of block indices, [] = auto) and lora_rank. `model`: the [model]
    keys besides lora_rank (where the weights come from); `apt_section`: more [apt] keys (generator_init).
    """
    from training.config import STAGES, ConfigError

    if stage not in ("cd", "apt"):
        raise ConfigError(f"run.stage {stage!r}: the nodes run 'cd' or 'apt' (one of {list(STAGES)})")
    node_name, node = (APT_NODE, apt) if stage == "apt" else (CD_NODE, cd)
    micro, accum = _batch(node, node_name)
    precision = str(node["precision"])
    if precision not in ("bf16", "fp32"):
        raise ConfigError(f"{node_name}: precision {precision!r}; choose bf16 or fp32")
    layers = [int(i) for i in disc["head_layers"] or []]
    val_every = int(apt["val_every"])
    data: dict[str, Any] = {
        "run": {"stage": stage, "dir": str(run_dir), "seed": int(node["seed"]), "steps": int(cd["iterations"])},
        "model": {**(model or {}), "lora_rank": int(node["lora_rank"])},
        "data": {"path": str(data_path), "micro_batch": micro, "grad_accum": accum},
        "parallel": {"mixed_precision": precision, "activation_checkpointing": bool(node["gradient_checkpointing"])},
        "cd": {"lr": float(cd["lr"]), "weight_decay": 0.01, "grid_steps": int(cd["cd_steps"]),
               "grid_shift": float(cd["grid_shift"]), "cfg_scale": float(cd["cfg"]), "ema_decay": 0.0},
        "apt": {"lr": float(apt["lr"]), "r1_lambda": float(apt["r1_lambda"]), "ema_decay": float(apt["ema_decay"]),
                "disc_lora_rank": int(disc["lora_rank"]), **(apt_section or {}),
                "image": {"steps": int(apt["steps"]), "lr": 0.0, "lr_d": 0.0, "r1_sigma": float(apt["r1_sigma"]),
                          "d_timestep_shift": float(apt["d_timestep_shift"])},
                "video": {"steps": 0}},
        # APT Train's val_every = 0 means "only at the end" (the runner's 0 means never): every `steps`
        "monitor": {"val_every": val_every or int(apt["steps"]), "val_seeds": val_seeds(apt["val_seed"])},
    }
    if disc["mode"] == "sfv":  # the SF-V discriminator with its hinge loss (R1 stays approximated)
        data["apt"] |= {"disc_kind": "sfv", "loss": "hinge", "sfv": {"head_layers": layers}}
    else:
        data["apt"] |= {"disc_kind": "apt", "disc_mode": str(disc["mode"]), "head_layers": layers}
    return data


def node_settings(data: dict, precision: str, device: str = "cuda") -> dict:
    """What a run inside ComfyUI sets besides the widgets: one process on ComfyUI's device (`device`:
    its type), exports into the run folder (replacing the run's own; a LoRA run: the LoRA file only), the last 2 checkpoints, metrics
    written every step (the plot), no console bar and no TensorBoard. precision bf16 on a CPU trains in
    fp32 (mixed_precision auto: bf16 again when the run continues on a GPU). run.device stays auto (a
    resumed run takes the GPU where there is one) unless ComfyUI runs on the CPU beside a GPU (--cpu)."""
    import torch

    data["run"] |= {"device": "cpu" if device == "cpu" and torch.cuda.is_available() else "auto"}
    data["parallel"] |= {"strategy": "none", "mixed_precision": precision if precision == "fp32" or device != "cpu" else "auto"}
    data["checkpoint"] = {"keep": 2}
    # a LoRA run exports the LoRA only: the node outputs it, and a merged copy would be a full model per run
    data["export"] = {"final": True, "overwrite": True, "merged": False, "dtype": "fp32" if precision == "fp32" else "bf16"}
    data["monitor"] |= {"progress": False, "tensorboard": False, "log_every": 1}
    return data


def checked(data: dict, where: str = "") -> Any:
    """RunConfig from a config dict through training.config's checks; a ConfigError names the widget."""
    from training.config import ConfigError, RunConfig, from_dict, validate

    try:
        return validate(from_dict(RunConfig, data))
    except ConfigError as e:
        raise ConfigError(name_widget(str(e), where)) from None


def name_widget(message: str, where: str = "") -> str:
    """A config error message with the widget that set the key it names (e.g. "APT Train widget 'lr' (apt.lr): ...")."""
    m = re.match(r"[a-z0-9_]+(?:\.[a-z0-9_]+)+", message)
    if m and m.group(0) in WIDGET_OF_KEY:
        node, widget = WIDGET_OF_KEY[m.group(0)]
        return f"{node or where or 'node'} widget {widget!r} ({message})"
    return f"{where}: {message}" if where else message


def widget_defaults(node_cls: type) -> dict:
    """Widget defaults of a node class, by input name."""
    out = {}
    for section in ("required", "optional"):
        for name, spec in node_cls.INPUT_TYPES().get(section, {}).items():
            if len(spec) > 1 and isinstance(spec[1], dict) and "default" in spec[1]:
                out[name] = spec[1]["default"]
    return out


def node_run_config(stage: str, widgets: Mapping[str, Any], data_path: str, run_dir: str,
                    disc: Mapping[str, Any] | None = None, model: Mapping[str, Any] | None = None,
                    cd_extra: Mapping[str, Any] | None = None, monitor_extra: Mapping[str, Any] | None = None,
                    device: str = "cuda") -> Any:
    """The checked RunConfig a training node runs: `widgets` of APT Consistency Distill (stage "cd") or
    APT Train (stage "apt", with the APT Discriminator's `disc`), its run folder and dataset path.

    `model`: [model] keys recording where the weights come from; `cd_extra` / `monitor_extra`: run
    files the node wrote (cd.negative_embedding, monitor.val_prompts, ...); `device`: ComfyUI's device type."""
    from .train import APTConsistencyDistill, APTTrain

    if stage == "cd":
        cd, apt, where = dict(widgets), widget_defaults(APTTrain), CD_NODE
    else:
        cd, apt, where = widget_defaults(APTConsistencyDistill), dict(widgets), APT_NODE
    disc = disc or {"mode": "lora", "head_layers": [], "lora_rank": 16}
    data = widget_config(stage, cd, apt, disc, data_path, run_dir, model)
    node_settings(data, str(widgets["precision"]), device)
    data["cd"] |= dict(cd_extra or {})
    data["monitor"] |= dict(monitor_extra or {})
    return checked(data, where)
