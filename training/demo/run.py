"""The demo run: train every stage through `training.loop`, pick EMA checkpoints on validation,
evaluate every row on the test split over several noise seeds, write the report, check thresholds."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from training.demo import digits
from training.demo.metrics import Evaluator, time_per_sample
from training.demo.pipeline import (
    DataPlan,
    Sampler,
    Snapshot,
    StagePool,
    checkpoint_emas,
    load_flow,
    run_stage,
    with_weights,
    write_datasets,
)
from training.demo.report import differs, plot_curves, save_gif, save_mp4, save_png, stat, tile, write_report
from training.demo.text import CaptionEmbedder

VAL_SEED = 100
SFV_ROW = "APT with SF-V discriminator"
# SF-V's recipe on the image phase: its frozen half-teacher D with spatial/temporal heads on noised
# inputs, hinge loss, exact R1 at the noised input (weight r1_lambda * r1_sigma^2, as configured)
SFV_OVERRIDES = {"apt.disc_kind": "sfv", "apt.loss": "hinge", "apt.r1_mode": "exact"}


def log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _subset(data: digits.DigitSet, n: int) -> digits.DigitSet:
    """A class-stratified, deterministic subset of n samples (all of them when n is 0 or too large)."""
    if not n or n >= len(data):
        return data
    order = torch.argsort(data.labels * 10_000 + torch.arange(len(data)) % 10_000)
    pick = order[torch.linspace(0, len(data) - 1, n).round().long()]
    return data[pick.sort().values]


# ------------------------------------------------------------------------------------- selection


def select_best(snapshots: list[Snapshot], start: Any, template, sampler: Sampler, ev: Evaluator,
                phase: str | None = None) -> tuple[list[dict], Any, int]:
    """Evaluate each EMA snapshot (and the starting model, step 0) 1-step on validation; best by FD."""
    frames = ev.frames
    ref = ev.reference
    curve, best, best_step, best_fd = [], None, -1, float("inf")
    candidates = [(0, start)] + [(s.step, s) for s in snapshots if phase is None or s.phase == phase]
    for step, snap in candidates:
        model = snap if not isinstance(snap, Snapshot) else with_weights(template, snap.state)
        x = sampler.run(model, ref.captions, frames, VAL_SEED)
        m = ev.evaluate(x, ref.labels, ref.directions if frames > 1 else None)
        curve.append({"step": step, "val_fd": m["fd"], "val_caption_accuracy": m["caption_accuracy"],
                      "val_diversity": m["diversity"]})
        if step > 0 and m["fd"] < best_fd:
            best, best_step, best_fd = model, step, m["fd"]
    return curve, best, best_step


def _rebase(curve: list[dict], offset: int) -> list[dict]:
    return [{**p, "step": p["step"] - offset if p["step"] else 0} for p in curve]


def _save_model(model, path: Path) -> Path:
    from apt_core.models.io import save_wan

    return save_wan(model, path, overwrite=True)


# ------------------------------------------------------------------------------------ evaluation


def evaluate_row(gen, ev: Evaluator, seeds: tuple[int, ...]) -> tuple[dict, torch.Tensor]:
    """Metrics (stat over seeds) of `gen(captions, seed) -> samples` on the evaluator's reference."""
    ref, per_seed, first = ev.reference, [], None
    for seed in seeds:
        x = gen(ref.captions, seed)
        first = x if first is None else first
        per_seed.append(ev.evaluate(x, ref.labels, ref.directions if ev.frames > 1 else None))
    return {k: stat([m[k] for m in per_seed]) for k in per_seed[0]}, first


def _floor(ev: Evaluator, seeds: tuple[int, ...]) -> dict:
    per_seed = [ev.real_floor(seed=1000 + s) for s in seeds]
    return {k: stat([m[k] for m in per_seed]) for k in per_seed[0]}


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [r for r in (json.loads(line) for line in path.read_text().splitlines() if line.strip()) if "event" not in r]


# ------------------------------------------------------------------------------------------ main


def run_demo(out: Path, s, teacher_path: Path, t0: float) -> dict:
    """Everything `python -m training.demo` does; returns the results dict (also written to out/)."""
    out = Path(out)
    runs = out / "runs"
    shutil.rmtree(runs, ignore_errors=True)  # fresh runs (the trainer would resume old checkpoints)
    out.mkdir(parents=True, exist_ok=True)
    emb = CaptionEmbedder()
    sampler = Sampler(emb)
    log("writing training shards from the digits train split")
    data = write_datasets(out / "data", DataPlan(), emb)
    teacher = load_flow(teacher_path)
    tpath = str(teacher_path)
    train_time: dict[str, float] = {}

    # -- stage 1: consistency distillation -----------------------------------------------------
    log(f"stage 1: consistency distillation ({s.cd_steps} updates, images + clips)")
    cd = run_stage("demo_cd", {"run.dir": str(runs / "cd"), "model.init_from": tpath, "data.path": str(data["mixed"]),
                               "run.steps": s.cd_steps})
    train_time["cd"] = cd["time_s"]
    cd_path = Path(cd["export"]["model"])
    cd_model = load_flow(cd_path)

    # -- stage 2: APT on images, its no-aR1 ablation, the EMA-only control, then APT on clips ------
    # Side by side in worker processes: APT (images) and the ablation first; when APT's image phase
    # ends, its best EMA is picked on validation and the clip phase starts from it while the ablation
    # and then the control go on in the other worker.
    def image_job(name: str) -> tuple[str, dict]:
        ov = {"run.dir": str(runs / name), "model.init_from": tpath, "data.path": str(data["images"]),
              "checkpoint.every": s.every}
        if name == "ema_control":
            return "demo_ema_control", ov | {"model.init_from": str(cd_path), "cd.teacher_from": tpath,
                                             "run.steps": s.apt_image_steps}
        ov |= {"apt.generator_init": str(cd_path), "apt.video.steps": 0, "apt.image.data": str(data["images"])}
        if name == "apt_no_r1":
            return "demo_apt", ov | {"apt.image.steps": s.no_r1_steps, "apt.r1_lambda": 0.0}
        if name == "apt_sfv":
            return "demo_apt", ov | SFV_OVERRIDES | {"apt.image.steps": s.apt_image_steps}
        return "demo_apt", ov | {"apt.image.steps": s.apt_image_steps}

    val_img = Evaluator(_subset(digits.load_split("val", frames=1, copies=2), s.n_val))
    val_vid = Evaluator(_subset(digits.load_split("val", frames=digits.FRAMES, copies=2), s.n_val))
    val_floor = {"images": val_img.real_floor(seed=VAL_SEED)["fd"], "videos": val_vid.real_floor(seed=VAL_SEED)["fd"]}
    curves, selected, picked = {}, {}, {}

    def pick(name: str, res: dict, ev: Evaluator, start, at_end: bool = False) -> None:
        """Best EMA snapshot of run `name` by validation FD (the ablation: its last one)."""
        cfg = res["config"]
        snaps = checkpoint_emas(runs / name, cd_model, cfg.cd.ema_decay if cfg.run.stage == "cd" else cfg.apt.ema_decay)
        curves[name], picked[name], selected[name] = select_best(snaps, start, cd_model, sampler, ev)
        if at_end:  # the ablation is reported at the END of its training
            picked[name], selected[name] = with_weights(cd_model, snaps[-1].state), snaps[-1].step

    log(f"stage 2: APT on images, the no-aR1 ablation, APT with SF-V's discriminator and the EMA-only control, "
        f"then APT on clips ({s.workers} runs at a time)")
    with StagePool(s.workers, threads=max(1, torch.get_num_threads() // s.workers)) as pool:
        futures = {name: pool.submit(*image_job(name)) for name in ("apt_image", "apt_no_r1", "apt_sfv")}
        runs_done = {"apt_image": futures["apt_image"].result()}
        log("picking the best APT image EMA on the validation split")
        pick("apt_image", runs_done["apt_image"], val_img, cd_model)
        best_image_path = _save_model(picked["apt_image"], runs / "apt_image" / "best_ema.safetensors")
        log(f"stage 2 (clips): APT on clips from the best image EMA (update {selected['apt_image']})")
        futures["apt_video"] = pool.submit("demo_apt", {
            "run.dir": str(runs / "apt_video"), "model.init_from": tpath, "apt.generator_init": str(best_image_path),
            "apt.image.steps": 0, "apt.video.steps": s.apt_video_steps, "apt.video.data": str(data["videos"]),
            "data.path": str(data["videos"]), "checkpoint.every": s.every})
        futures["ema_control"] = pool.submit(*image_job("ema_control"))
        runs_done |= {name: f.result() for name, f in futures.items()}
    train_time |= {name: res["time_s"] for name, res in runs_done.items()}

    log("picking EMA checkpoints on the validation split")
    pick("apt_no_r1", runs_done["apt_no_r1"], val_img, cd_model, at_end=True)
    pick("ema_control", runs_done["ema_control"], val_img, cd_model)
    pick("apt_sfv", runs_done["apt_sfv"], val_img, cd_model)
    pick("apt_video", runs_done["apt_video"], val_vid, picked["apt_image"])
    best_vid = picked["apt_video"]
    _save_model(best_vid, runs / "apt_video" / "best_ema.safetensors")

    # -- evaluation on the test split -------------------------------------------------------------
    results: dict[str, Any] = {"quick": s.quick, "settings": {k: list(v) if isinstance(v, tuple) else v
                                                              for k, v in vars(s).items()}}
    samples: dict[str, dict[str, torch.Tensor]] = {"images": {}, "videos": {}}
    for key, frames, n, apt_model in (("images", 1, s.n_image, picked["apt_image"]),
                                      ("videos", digits.FRAMES, s.n_video, best_vid)):
        ev = Evaluator(_subset(digits.load_split("test", frames=frames), n))
        log(f"evaluating {key} on the test split ({len(ev.reference)} samples x seeds {list(s.seeds)})")
        rows: dict[str, dict] = {}

        def add(name: str, steps: int, nfe: int, gen, what: str, key=key, rows=rows, ev=ev) -> None:
            t = time.perf_counter()
            metrics, first = evaluate_row(gen, ev, s.seeds)
            rows[name] = {"steps": steps, "nfe": nfe, "what": what, "metrics": metrics}
            samples[key][name] = first
            log(f"  {name}: FD {metrics['fd']['mean']:.2f} ± {metrics['fd']['std']:.2f} ({time.perf_counter() - t:.0f}s)")

        for cfg in s.cfg_scales:
            add(f"teacher 25 steps, CFG {cfg:g}", s.teacher_steps, s.teacher_steps * (1 if cfg == 1 else 2),
                lambda c, sd, cfg=cfg, f=frames: sampler.run(teacher, c, f, sd, "euler", s.teacher_steps, cfg), "teacher")
        add("teacher 1 step", 1, 1, lambda c, sd, f=frames: sampler.run(teacher, c, f, sd), "teacher")
        add("CD 1 step", 1, 1, lambda c, sd, f=frames: sampler.run(cd_model, c, f, sd), "cd")
        add("APT 1 step", 1, 1, lambda c, sd, f=frames, m=apt_model: sampler.run(m, c, f, sd), "apt")
        add("APT 2 steps", 2, 2, lambda c, sd, f=frames, m=apt_model: sampler.run(m, c, f, sd, "two", t_mid=s.two_step_t), "apt")
        if key == "images":
            add("APT without aR1 (end)", 1, 1, lambda c, sd: sampler.run(picked["apt_no_r1"], c, 1, sd), "ablation")
            add("EMA-only control (CD + EMA, no D)", 1, 1, lambda c, sd: sampler.run(picked["ema_control"], c, 1, sd), "control")
            add(SFV_ROW, 1, 1, lambda c, sd: sampler.run(picked["apt_sfv"], c, 1, sd), "sfv")
        results[key] = {"n": len(ev.reference), "seeds": list(s.seeds), "floor": _floor(ev, s.seeds), "rows": rows}

    # -- generation time, side by side -----------------------------------------------------------
    results["timing"] = measure_speed(teacher, picked["apt_image"], best_vid, sampler, s)

    # -- files, curves, report ---------------------------------------------------------------------
    files = write_samples(out, samples)
    logs = {n: _read_jsonl(runs / n / "metrics.jsonl") for n in ("cd", "apt_image", "apt_no_r1", "ema_control", "apt_video", "apt_sfv")}
    files += write_plots(out, curves, logs, val_floor)
    results.update(curves=curves, selected=selected, train_time_s=train_time, val_floor_fd=val_floor,
                   comparisons=[("APT 1 step", "CD 1 step"), ("APT 1 step", "EMA-only control (CD + EMA, no D)"),
                                ("APT 1 step", "APT without aR1 (end)"), ("APT 1 step", "APT 2 steps"),
                                (SFV_ROW, "APT 1 step"), (SFV_ROW, "CD 1 step")],
                   d_logits=_logit_summary(logs), sfv_losses_finite=_losses_finite(logs["apt_sfv"]))
    results["paper_ours"] = paper_counterparts(results)
    results["time_s"] = time.perf_counter() - t0
    results["checks"] = check_thresholds(results, s.quick)
    results["files"] = sorted(set(files + ["report.md", "report.json"]))
    results["recipe"] = recipe(runs_done["apt_image"]["config"], runs_done["apt_video"]["config"], s)
    results["intro"] = intro(results)
    write_report(out, results)
    return results


def measure_speed(teacher, apt_image, apt_video, sampler: Sampler, s) -> dict:
    """Per-sample time of teacher 25 steps + CFG vs APT 1 step on the same captions, alternating."""
    caps_i = [f"a {w}" for w in ("zero", "one", "two", "three", "four", "five", "six", "seven")] * (s.timing_batch // 8)
    caps_v = [c + " moving up" for c in caps_i]
    cfg = 2.0
    runs = {
        "teacher 25 steps + CFG (images)": lambda: sampler.run(teacher, caps_i, 1, 0, "euler", s.teacher_steps, cfg),
        "APT 1 step (images)": lambda: sampler.run(apt_image, caps_i, 1, 0),
        "teacher 25 steps + CFG (videos)": lambda: sampler.run(teacher, caps_v, digits.FRAMES, 0, "euler", s.teacher_steps, cfg),
        "APT 1 step (videos)": lambda: sampler.run(apt_video, caps_v, digits.FRAMES, 0),
    }
    ms = {k: 1000 * time_per_sample(fn, len(caps_i), repeats=3) for k, fn in runs.items()}
    speed_i = ms["teacher 25 steps + CFG (images)"] / ms["APT 1 step (images)"]
    speed_v = ms["teacher 25 steps + CFG (videos)"] / ms["APT 1 step (videos)"]
    return {"ms_per_sample": ms, "speedup": min(speed_i, speed_v), "speedup_images": speed_i, "speedup_videos": speed_v,
            "batch": len(caps_i), "threads": torch.get_num_threads(), "cfg_scale": cfg}


def write_samples(out: Path, samples: dict[str, dict[str, torch.Tensor]]) -> list[str]:
    """PNG grid per row (images: 40 samples; videos: 8 clips x frames) + GIF/MP4 per video row."""
    files = []
    for key, rows in samples.items():
        for name, x in rows.items():
            slug = "".join(ch if ch.isalnum() else "_" for ch in name.lower()).strip("_")
            slug = "_".join(filter(None, slug.split("_")))
            if key == "images":
                p = save_png(out / "samples" / f"images_{slug}.png", tile(x[:40], cols=10))
                files.append(str(p.relative_to(out)))
            else:
                p = save_png(out / "samples" / f"videos_{slug}.png", tile(x[:8], frame=None))
                g = save_gif(out / "samples" / f"videos_{slug}.gif", x[:16], cols=8)
                files += [str(p.relative_to(out)), str(g.relative_to(out))]
                mp4 = save_mp4(out / "samples" / f"videos_{slug}.mp4", x[:16], cols=8)
                if mp4 is not None:
                    files.append(str(mp4.relative_to(out)))
    return files


def write_plots(out: Path, curves: dict, logs: dict, val_floor: dict) -> list[str]:
    """Validation FD over training (all runs, with the validation floor) and D's logit gap with/without aR1."""
    p1 = plot_curves(out / "curves_val_fd.png", {k: v for k, v in curves.items() if k != "apt_video"},
                     title="1-step validation FD of the EMA generator (images)", floor=val_floor["images"])
    p2 = plot_curves(out / "curves_val_fd_video.png", {"apt_video": curves["apt_video"]},
                     title="1-step validation FD of the EMA generator (videos)", floor=val_floor["videos"])
    gap = {name: [{"step": r["step"], "logit_gap": abs(r["logits_real"] - r["logits_fake"]) + 1e-3}
                  for r in logs[name] if "logits_real" in r] for name in ("apt_image", "apt_no_r1")}
    p3 = plot_curves(out / "curves_d_logits.png", gap, key="logit_gap", title="|D(real) - D(fake)| per update")
    return [str(p.relative_to(out)) for p in (p1, p2, p3)]


def _losses_finite(rows: list[dict]) -> bool:
    """True when a run logged its D and G losses and every one is finite."""
    losses = [r[k] for r in rows for k in ("d_loss", "g_loss") if k in r]
    return bool(losses) and all(math.isfinite(v) for v in losses)


def _logit_summary(logs: dict) -> dict:
    out = {}
    for name in ("apt_image", "apt_no_r1", "apt_video", "apt_sfv"):
        rows = [r for r in logs.get(name, []) if "logits_real" in r]
        if rows:
            tail = rows[-max(1, len(rows) // 10):]
            out[name] = {k: sum(r[k] for r in tail) / len(tail) for k in ("logits_real", "logits_fake", "d_loss") if k in tail[0]}
    return out


def _fd(results: dict, key: str, row: str) -> dict:
    return results[key]["rows"][row]["metrics"]["fd"]


def best_teacher(results: dict, key: str) -> tuple[str, dict]:
    rows = {k: v for k, v in results[key]["rows"].items() if k.startswith("teacher 25")}
    name = min(rows, key=lambda k: rows[k]["metrics"]["fd"]["mean"])
    return name, rows[name]["metrics"]


def check_thresholds(results: dict, quick: bool) -> list[dict]:
    """The issue's acceptance checks (quick mode: only 'APT beats CD' on images and videos)."""
    checks = []

    def add(name: str, row: str, value: float, threshold: str, passed: bool) -> None:
        checks.append({"name": name, "row": row, "value": float(value), "threshold": threshold, "passed": bool(passed)})

    # SF-V's discriminator (images): no threshold beyond finishing with finite losses and beating CD
    sfv, cd_img = _fd(results, "images", SFV_ROW), _fd(results, "images", "CD 1 step")
    finite = results.get("sfv_losses_finite", False)
    add("images: APT with SF-V D ends with finite losses", SFV_ROW, float(finite), "= 1", finite)
    add("images: APT with SF-V D FD below CD's", SFV_ROW, sfv["mean"], f"< {cd_img['mean']:.2f}", sfv["mean"] < cd_img["mean"])
    for key in ("images", "videos"):
        apt, cd = _fd(results, key, "APT 1 step"), _fd(results, key, "CD 1 step")
        if quick:
            add(f"{key}: APT 1-step FD below CD's", "APT 1 step", apt["mean"], f"< {cd['mean']:.2f}", apt["mean"] < cd["mean"])
            continue
        tname, tm = best_teacher(results, key)
        am = results[key]["rows"]["APT 1 step"]["metrics"]
        add(f"{key}: FD <= 0.85 x CD 1 step", "APT 1 step", apt["mean"] / cd["mean"], "<= 0.85", apt["mean"] <= 0.85 * cd["mean"])
        add(f"{key}: FD <= 1.3 x best teacher ({tname})", "APT 1 step", apt["mean"] / tm["fd"]["mean"], "<= 1.3",
            apt["mean"] <= 1.3 * tm["fd"]["mean"])
        add(f"{key}: caption accuracy >= 0.95 x teacher's", "APT 1 step",
            am["caption_accuracy"]["mean"] / tm["caption_accuracy"]["mean"], ">= 0.95",
            am["caption_accuracy"]["mean"] >= 0.95 * tm["caption_accuracy"]["mean"])
        add(f"{key}: diversity >= 0.8", "APT 1 step", am["diversity"]["mean"], ">= 0.8", am["diversity"]["mean"] >= 0.8)
        if key == "videos":
            add("videos: identity agreement >= 0.9 x teacher's", "APT 1 step",
                am["identity_agreement"]["mean"] / tm["identity_agreement"]["mean"], ">= 0.9",
                am["identity_agreement"]["mean"] >= 0.9 * tm["identity_agreement"]["mean"])
    if not quick:
        apt = _fd(results, "images", "APT 1 step")
        no_r1 = _fd(results, "images", "APT without aR1 (end)")
        ctrl = _fd(results, "images", "EMA-only control (CD + EMA, no D)")
        add("no-aR1 ends >= 2x worse than APT", "APT without aR1 (end)", no_r1["mean"] / apt["mean"], ">= 2",
            no_r1["mean"] >= 2 * apt["mean"])
        add("APT beats the EMA-only control by more than the spread", "EMA-only control (CD + EMA, no D)",
            ctrl["mean"] - apt["mean"], f"> {apt['std'] + ctrl['std']:.2f}", ctrl["mean"] - apt["mean"] > apt["std"] + ctrl["std"]
            and differs(apt, ctrl))
        sp = results["timing"]["speedup"]
        add("APT 1 step >= 20x faster than teacher 25 steps + CFG", "APT 1 step", sp, ">= 20", sp >= 20)
        minutes = results["time_s"] / 60
        add("whole demo <= 20 minutes (2 CPU cores)", "all", minutes, "<= 20", minutes <= 20)
    return checks


def paper_counterparts(results: dict) -> dict:
    out = {}
    for key, suffix in (("images", ""), ("videos", " (video FD)")):
        tname, tm = best_teacher(results, key)
        out[f"teacher 25 steps, best CFG{suffix}"] = f"FD {tm['fd']['mean']:.1f} ({tname})"
        out[f"CD 1 step{suffix}"] = f"FD {_fd(results, key, 'CD 1 step')['mean']:.1f}"
        out[f"APT 1 step{suffix}"] = f"FD {_fd(results, key, 'APT 1 step')['mean']:.1f}"
    out["APT without aR1 (end of training)"] = f"FD {_fd(results, 'images', 'APT without aR1 (end)')['mean']:.1f}"
    out[f"{SFV_ROW} (images)"] = (f"FD {_fd(results, 'images', SFV_ROW)['mean']:.1f} vs CD "
                                  f"{_fd(results, 'images', 'CD 1 step')['mean']:.1f}")
    t = results["timing"]
    out["measured side by side"] = f"{t['speedup_images']:.0f}x faster (images), {t['speedup_videos']:.0f}x (videos)"
    return out


def recipe(image_cfg, video_cfg, s) -> dict:
    """The APT settings the rows were trained with (the runs' resolved phases), for the report."""
    from training.loop import plan_phases

    a = image_cfg.apt

    def phase(cfg) -> dict:
        (p,) = plan_phases(cfg)  # each demo APT run has one phase (images, or clips)
        lr_g, lr_d = p.apt.learning_rates(cfg.apt.lr)
        return {"steps": p.steps, "batch": p.micro_batch * p.grad_accum, "lr_g": lr_g, "lr_d": lr_d, "r1_sigma": p.apt.r1_sigma,
                "mismatch_weight": p.apt.mismatch_weight}

    return {"loss": a.loss, "r1_lambda": a.r1_lambda, "ema_decay": a.ema_decay, "head_layers": list(a.head_layers),
            "image": phase(image_cfg), "video": phase(video_cfg), "no_r1_steps": s.no_r1_steps}


def intro(results: dict) -> str:
    f = results["images"]["floor"]["fd"]
    return (
        "Real data: the 1,797 UCI handwritten digits (8x8, via scikit-learn), upscaled to 12x12 on a 16x16 canvas; "
        "videos are 5-frame clips of a digit moving 1 px/frame and bouncing. Model: a 4-block, 64-wide Wan 2.1 DiT "
        "in pixel space (4x4 patches). FD = Frechet distance in the penultimate features of a digit classifier "
        f"trained on the train split (images) or of a 5-frame clip classifier (videos); real-vs-real floor {f['mean']:.1f}. "
        "Differences smaller than the seeds' spread (sum of the two std's) are called noise."
        + _recipe_text(results.get("recipe"))
    )


def _recipe_text(r: dict | None) -> str:
    if not r:
        return ""
    loss = ("the relativistic pairing with approximated R1 and R2 (the AAPT / SeedVR2 variant apt_core offers; "
            "the paper's non-saturating loss is `apt.loss = \"nonsaturating\"`)" if r["loss"] == "relativistic"
            else "the paper's non-saturating loss with approximated R1")
    im, vd = r["image"], r["video"]
    return (
        f"\n\nAPT recipe here (`configs/demo_apt.toml`): {loss}, lambda {r['r1_lambda']:g}, "
        f"D heads after blocks {[i + 1 for i in r['head_layers']]} of the teacher copy, RMSProp (alpha 0.9), "
        f"EMA {r['ema_decay']:g}; images {im['steps']} updates at batch {im['batch']}, lr {im['lr_g']:g} (G) / "
        f"{im['lr_d']:g} (D), sigma {im['r1_sigma']:g}; clips {vd['steps']} updates at batch {vd['batch']}, "
        f"lr {vd['lr_g']:g} / {vd['lr_d']:g}, sigma {vd['r1_sigma']:g}, G from the best image EMA, D fresh from the teacher"
        + _mismatch_text(im, vd) + ". "
        f"The no-aR1 ablation (lambda 0: neither aR1 nor aR2) runs {r['no_r1_steps']} updates and is reported at its end; "
        "the EMA-only control continues CD for as many updates as APT's image phase with the same EMA. "
        f"'{SFV_ROW}' repeats APT's image phase with SF-V's discriminator instead (`apt.disc_kind = \"sfv\"`): the "
        "teacher's first 2 of 4 blocks, frozen, with a spatial and a temporal conv head after each, scoring real and fake "
        "noised to a log-normal level (mean -1, std 1), the hinge loss and exact R1 at that noised input."
    )


def _mismatch_text(im: dict, vd: dict) -> str:
    on = [f"{name} (weight {p['mismatch_weight']:g})" for name, p in (("images", im), ("clips", vd)) if p["mismatch_weight"] > 0]
    if not on:
        return ""
    return ("; a matching-aware D term (GigaGAN's; not in APT: real samples under another sample's caption count "
            f"as fake) on {' and '.join(on)}, for text alignment")
