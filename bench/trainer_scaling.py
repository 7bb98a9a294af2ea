"""Trainer scaling: step time and peak memory of the headless trainer, 1 vs 2 processes.

CPU (here): the tiny and small configs, APT stage (one D + one G step per iteration), FSDP2 over
gloo, with 1 and 2 processes at the same per-rank micro batch. Every (config, world size) runs as
its own `torchrun` job in a fresh process group; each rank reports the median step time after
warm-up and its peak RSS (`ru_maxrss`), the table shows rank 0's time and the max RSS over ranks.
CUDA (not run here): one APT iteration (D step + G step) of Wan 2.1 1.3B at 480p (81 frames ->
latent [16, 21, 60, 104]) with FSDP2 + bf16 + per-block activation checkpointing on every local
GPU: seconds per sample, MFU (3 x forward FLOPs per trained forward, bench.common's FLOP count)
and peak memory (`torch.cuda.max_memory_allocated`).

    python -m bench.trainer_scaling [--quick] [--cases tiny,small] [--steps N]
    python -m bench.trainer_scaling --make-data DIR [--preset tiny] [--num 16]   # synthetic shards
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from apt_core.models.attention import CHOICES as ATTENTION_CHOICES
from bench.common import (
    default_device,
    peak_tflops,
    print_table,
    tokens_of,
    wan_attention_flops,
    wan_forward_flops,
    write_results,
)

ROOT = Path(__file__).resolve().parents[1]
GPU_JOB_TIMEOUT_S = 120  # inside bench/device_run.sh's 140 s for this part

# name: (preset, latent [C, F, H, W], text length, per-rank micro batch)
CASES = {
    "tiny": ("tiny", (16, 1, 4, 4), 8, 2),
    "small": ("small", (16, 2, 8, 8), 16, 2),
    # Wan 2.1 1.3B at 480p: 81 frames of 480 x 832 -> latent [16, 21, 60, 104] (CUDA only)
    "wan1.3b-480p": ("wan2.1-t2v-1.3b", (16, 21, 60, 104), 512, 1),
    # The CUDA settings (bf16 FSDP params + activation checkpointing) at a stand-in size: `--rehearse`
    "tiny-comfy-rehearsal": ("tiny-comfy", (16, 3, 8, 8), 16, 2),
}


def write_synthetic_shards(
    out_dir: str | os.PathLike,
    num: int = 16,
    latent_shape: tuple[int, ...] = (16, 1, 4, 4),
    text_len: int = 8,
    text_dim: int = 32,
    seed: int = 0,
    image_emb_shape: tuple[int, int] | None = None,
    image_latent: bool = False,
) -> Path:
    """Random latents + text embeddings (+ image embeddings of `image_emb_shape` and, with `image_latent`, random
    image latents shaped like the latents, for I2V models) as apt_core shards (for tests, CI and this benchmark)."""
    from apt_core.shards import ShardWriter

    g = torch.Generator().manual_seed(seed)
    with ShardWriter(out_dir, {"kind": "synthetic", "latent_shape": list(latent_shape)}, samples_per_shard=8) as w:
        for i in range(num):
            n = 1 + int(torch.randint(0, text_len, (1,), generator=g))
            w.add(
                torch.randn(latent_shape, generator=g),
                torch.randn(text_len, text_dim, generator=g),
                f"synthetic sample {i}",
                text_len=n,
                source=f"synthetic/{i}",
                image_emb=None if image_emb_shape is None else torch.randn(image_emb_shape, generator=g),
                image_latent=torch.randn(latent_shape, generator=g) if image_latent else None,
            )
    return Path(out_dir)


# ----------------------------------------------------------------------------------------------
# Worker: one rank of one (case, world size) measurement
# ----------------------------------------------------------------------------------------------


def _apt_flops_per_sample(preset: str, latent: tuple[int, ...], head_layers: list[int]) -> float:
    """Model FLOPs of one APT iteration per sample (recompute not counted, as MFU is defined).

    D step: G forward (no grad) + D forward/backward on [real, fake, real + sigma n] (3x batch);
    G step: G forward/backward + D forward/backward on the fakes. forward + backward = 3 x forward,
    except for D in the G step: its parameters are frozen there, so its matmuls skip the weight
    gradient (2 x forward) while its attention scores still cost 3 x. D runs its backbone only up
    to the deepest tap.
    Text is counted at the config's text_len, the length the model pads every context to.
    """
    from apt_core.models.wan import get_config

    cfg = get_config(preset)
    tokens = tokens_of(cfg, latent)
    fwd_g = wan_forward_flops(cfg, tokens)
    depth_d = max(head_layers) + 1
    fwd_d = wan_forward_flops(cfg, tokens, num_layers=depth_d, head=False)
    attn_d = wan_attention_flops(cfg, tokens, num_layers=depth_d)
    d_in_g_step = 3 * attn_d + 2 * (fwd_d - attn_d)
    return fwd_g + 3 * 3 * fwd_d + 3 * fwd_g + d_in_g_step


def run_worker(
    case: str, steps: int, out_dir: Path, device: str = "cpu", compile_blocks: bool = False, attention: str = "default"
) -> None:
    """Build the APT stage for `case` (FSDP2; bf16 + activation checkpointing on CUDA and in the
    rehearsal case), time `steps` iterations after one warm-up, write this rank's numbers to
    out_dir/rank<r>.json."""
    from training.config import load_config
    from training.data import Batch
    from training.distributed import barrier, destroy, init_distributed
    from training.loop import APTStage, plan_phases, resolve_wan_config

    preset, latent, text_len, micro = CASES[case]
    cuda = device == "cuda"
    gpu_settings = cuda or case.endswith("-rehearsal")
    overrides = [
        "--run.stage=apt", f"--run.device={device}", f"--model.preset={preset}", "--data.path=unused",
        f"--data.micro_batch={micro}", f"--parallel.mixed_precision={'bf16' if gpu_settings else 'fp32'}",
        f"--parallel.activation_checkpointing={'true' if gpu_settings else 'false'}", "--apt.image.steps=1000000",
        f"--parallel.compile={'true' if compile_blocks else 'false'}", f"--parallel.attention={attention}",
    ]
    cfg = load_config(ROOT / "configs/tiny_cpu.toml", overrides)
    world = init_distributed(cfg.run.device, cfg.parallel.backend)
    config = resolve_wan_config(cfg)
    stage = APTStage(cfg, world, config)
    phase = plan_phases(cfg)[0]
    stage.begin_phase(phase, first=True)
    g = torch.Generator().manual_seed(world.rank)
    batch = Batch(torch.randn(micro, *latent, generator=g), torch.randn(micro, text_len, config.text_dim, generator=g),
                  torch.full((micro,), text_len), [""] * micro, [""] * micro, torch.arange(micro)).to(world.device)
    rss_before = _rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(steps + 1):
        barrier()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        metrics = stage.step(step, batch)
        float(metrics["g_loss"])  # host sync: the step is done (this benchmark's, not the loop's)
        if cuda:
            torch.cuda.synchronize()
        if step:  # the first iteration is warm-up
            times.append(time.perf_counter() - t0)
    out = {
        "rank": world.rank,
        "metrics_finite": all(bool(torch.isfinite(v).all()) for v in metrics.values()),
        "last_losses": {k: float(metrics[k]) for k in ("d_loss", "g_loss") if k in metrics},
        "world_size": world.world_size,
        "step_s": statistics.median(times),
        "step_s_all": times,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_before_steps_bytes": rss_before,
        "params_g": sum(p.numel() for p in stage.generator.parameters()),
        "head_layers": list(stage.discriminator.head_layers),
        "mixed_precision": cfg.parallel.mixed_precision,
        "attention": cfg.parallel.attention,
        "activation_checkpointing": cfg.parallel.activation_checkpointing,
    }
    if cuda:
        out["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{world.rank}.json").write_text(json.dumps(out))
    destroy()


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def _run_job(cmd: list[str], env: dict, tmp: Path, timeout: float | None) -> tuple[int, str]:
    """Run a torchrun job in its own process group; on timeout stop the whole group (torchrun's
    workers sit in sessions of their own, so killing torchrun alone could leave one holding the
    GPU). Returns the exit code (-9 after a timeout) and the tail of its stderr."""
    log = tmp / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop_group(proc)
            return -9, f"stopped after {timeout} s:\n" + log.read_text()[-3000:]
    return returncode, log.read_text()[-4000:]


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the job's process group (torchrun passes it on to its workers), then SIGKILL what is left."""
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue
    # workers in sessions of their own: kill them by the marker on their command line
    subprocess.run(["pkill", "-KILL", "-f", "bench.trainer_scaling --worker"], check=False)


def measure(
    case: str, nproc: int, steps: int, threads: int, device: str = "cpu", compile_blocks: bool = False,
    attention: str = "default",
) -> dict:
    """One torchrun job of `nproc` workers for `case`; returns the aggregated row."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "bench.trainer_scaling", "--worker", case, "--steps", str(steps), "--out", tmp, "--device", device]
        cmd += ["--compile"] * compile_blocks + ["--attention", attention]
        returncode, stderr = _run_job(cmd, env, Path(tmp), GPU_JOB_TIMEOUT_S if device == "cuda" else None)
        if returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed (exit {returncode}):\n{stderr}")
        ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(nproc)]
    preset, latent, text_len, micro = CASES[case]
    step_s = ranks[0]["step_s"]
    row = {
        "case": case, "preset": preset, "latent_shape_per_rank": [micro, *latent], "text_len": text_len,
        "device": device, "compiled": compile_blocks, "attention": ranks[0]["attention"],
        "mixed_precision": ranks[0]["mixed_precision"],
        "activation_checkpointing": ranks[0]["activation_checkpointing"],
        "processes": nproc, "threads_per_process": threads, "micro_batch_per_rank": micro,
        "global_batch": micro * nproc, "step_s": step_s, "samples_per_s": micro * nproc / step_s,
        "s_per_sample": step_s / (micro * nproc),
        "peak_rss_mib_max_rank": max(r["peak_rss_bytes"] for r in ranks) / 2**20,
        "params_g": ranks[0]["params_g"],
        "metrics_finite": all(r["metrics_finite"] for r in ranks),
        "last_losses_rank0": ranks[0]["last_losses"],
    }
    flops = _apt_flops_per_sample(preset, latent, ranks[0]["head_layers"])
    row["tflop_per_sample"] = flops / 1e12
    row["tflops_per_device"] = flops * micro / step_s / 1e12
    if "peak_cuda_bytes" in ranks[0]:
        peak = peak_tflops()
        row["peak_cuda_gib"] = max(r["peak_cuda_bytes"] for r in ranks) / 2**30
        row["mfu"] = row["tflops_per_device"] / peak if peak else None
        row["ideal_s_per_sample"] = flops / 1e12 / peak if peak else None
    return row


def main(argv: list[str] | None = None) -> dict:
    """Run each (case, world size) as its own torchrun job; print the table, write results/trainer_scaling.json."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default=None, help="comma-separated cases (default: tiny,small on CPU; wan1.3b-480p on CUDA)")
    p.add_argument("--steps", type=int, default=None, help="timed iterations after one warm-up")
    p.add_argument("--quick", action="store_true", help="tiny only, 2 timed steps (CPU)")
    p.add_argument("--device", default=default_device(), help="cpu or cuda (default: cuda if visible)")
    p.add_argument("--rehearse", action="store_true", help="the CUDA settings at a stand-in size, 1 process (CPU check)")
    p.add_argument("--compile", action="store_true", help="torch.compile each block (parallel.compile)")
    p.add_argument("--attention", default=None, choices=ATTENTION_CHOICES,
                   help="parallel.attention: SDPA kernel choice (default: default; auto in --rehearse)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (CPU)")
    p.add_argument("--make-data", metavar="DIR", help="write synthetic shards for configs/tiny_cpu.toml and exit")
    p.add_argument("--num", type=int, default=16, help="samples for --make-data")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.make_data:
        print(f"wrote {args.num} samples to {write_synthetic_shards(args.make_data, num=args.num)}")
        return {}
    if args.worker:
        run_worker(args.worker, args.steps or 3, Path(args.out), args.device, args.compile, args.attention or "default")
        return {}
    cuda = args.device == "cuda"
    cases = ["wan1.3b-480p"] if cuda else ["tiny", "small"]
    worlds = [torch.cuda.device_count()] if cuda else [1, 2]
    attention = args.attention or ("auto" if args.rehearse else "default")
    if args.rehearse:
        cases, worlds = ["tiny-comfy-rehearsal"], [1]
    elif args.quick and not cuda:
        cases, args.steps = ["tiny"], 2
    if args.cases:
        unknown = set(args.cases.split(",")) - set(CASES)
        if unknown:
            p.error(f"unknown --cases {sorted(unknown)}; choose from {sorted(CASES)}")
        cases = args.cases.split(",")
    rows = []
    for case in cases:
        steps = args.steps or (3 if case == "small" or cuda else 5)
        for n in worlds:
            t0 = time.perf_counter()
            try:
                rows.append(measure(case, n, steps, args.threads, args.device, args.compile, attention))
            except RuntimeError as err:
                if not cuda:  # the CPU cases must run: a failure there is a bug
                    raise
                print(str(err)[-3000:], flush=True)  # the job's stderr tail, into the device log
                lines = str(err).strip().splitlines()
                rows.append({"case": case, "processes": n, "error": " | ".join(lines[-3:])[-400:]})
            took = f"{time.perf_counter() - t0:.0f} s incl. start-up"
            print(f"{case} x{n}: {rows[-1].get('step_s', rows[-1].get('error'))} s/iteration ({took})", flush=True)
            write_results("trainer_scaling", {"name": "trainer_scaling", "device": args.device, "rows": rows,
                                              "partial": True})
    columns = ["case", "processes", "global_batch", "step_s", "samples_per_s", "s_per_sample", "peak_rss_mib_max_rank",
               "tflops_per_device"]
    if cuda:
        columns += ["peak_cuda_gib", "mfu", "ideal_s_per_sample", "metrics_finite", "error"]
    settings = "bf16 + AC" if cuda or args.rehearse else "fp32, gloo"
    print_table(f"APT iteration (D step + G step), FSDP2, {settings} ({args.device})", rows, columns)
    results = {
        "name": "trainer_scaling",
        "what": "one APT iteration (D step + G step) through training.loop.APTStage; median after 1 warm-up",
        "memory": "peak RSS per process (ru_maxrss), max over ranks; CUDA: torch.cuda.max_memory_allocated",
        "flops": "model FLOPs per sample: G fwd (no grad) + 3 x D fwd/bwd on [real, fake, real + sigma n] + "
                 "G fwd/bwd + D fwd/bwd on the fakes, fwd/bwd = 3 x fwd, recompute not counted",
        "device": args.device,
        "rehearsal": args.rehearse,
        "rows": rows,
        "checks": _checks(rows),
    }
    path = write_results("trainer_scaling", results)
    print(f"\nwrote {path}")
    return results


def _checks(rows: list[dict]) -> dict:
    """Regression checks: 2- vs 1-process throughput per case (CPU); MFU per case (CUDA)."""
    out = {}
    for case in dict.fromkeys(r["case"] for r in rows):
        by = {r["processes"]: r for r in rows if r["case"] == case and "error" not in r}
        if 1 in by and 2 in by:
            out[f"{case}.throughput_2proc_vs_1proc"] = {
                "value": by[2]["samples_per_s"] / by[1]["samples_per_s"], "higher_is_better": True}
        for n, r in by.items():
            if r.get("mfu"):
                out[f"{case}.x{n}{'.compiled' if r['compiled'] else ''}.mfu"] = {
                    "value": r["mfu"], "higher_is_better": True, "rel_tol": 0.15}
    return out


if __name__ == "__main__":
    main()
