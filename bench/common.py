"""Shared benchmark plumbing: machine description, timing, FLOP counts, tables and JSON results."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from apt_core.fileio import atomic_write_text
from apt_core.models.wan import WanConfig

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULTS_ENV = "APT_BENCH_RESULTS"  # a folder to write results to instead (`python -m bench --out DIR`)

# bf16 dense peak used for MFU (H100 SXM, as in docs/wan21_reference.md).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def machine_info() -> dict:
    """CPU model and cores, or GPU name, plus torch version: recorded with every figure."""
    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def peak_tflops() -> float | None:
    """Dense bf16 peak of the current GPU, if known (for MFU)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def default_device() -> str:
    """Where the GPU figures run: "cuda" when one is visible, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def measured_matmul_tflops(device: torch.device | str, size: int = 8192, repeat: int = 10) -> float | None:
    """bf16 TFLOP/s of a size^3 matrix product on random data: the ceiling this GPU reaches in practice."""
    if torch.device(device).type != "cuda":
        return None
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    seconds = time_fn(lambda: a @ b, device, warmup=3, repeat=repeat)
    return 2 * size**3 / seconds / 1e12


def sync(device: torch.device | str) -> None:
    """Wait for queued CUDA work (a no-op on CPU), so a timer measures the work itself."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device: torch.device | str = "cpu", warmup: int = 1, repeat: int = 3) -> float:
    """Median wall time of `fn` in seconds after warm-up (synchronising CUDA around each call)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def first_line(err: BaseException, limit: int = 300) -> str:
    """An exception's first message line (its type when the message is empty), for a results row."""
    lines = str(err).strip().splitlines()
    return (lines[0] if lines else type(err).__name__)[:limit]


def error_text(err: BaseException) -> str:
    """A failed case's row entry: "out of memory: ..." or "error: ..." and the first message line."""
    kind = "out of memory" if isinstance(err, torch.OutOfMemoryError) else "error"
    return f"{kind}: {first_line(err)}"


def tokens_of(cfg: WanConfig, shape: Sequence[int]) -> int:
    """Transformer tokens of a latent [C, F, H, W] under the config's patch size."""
    _, f, h, w = shape
    pf, ph, pw = cfg.patch_size
    return (f // pf) * (h // ph) * (w // pw)


def wan_forward_flops(cfg: WanConfig, tokens: int, num_layers: int | None = None, head: bool = True) -> float:
    """Matmul FLOPs of one Wan DiT forward (docs/wan21_reference.md) for one sample of `tokens`.

    Per block: self-attention projections and scores, cross-attention (q/o on the tokens, k/v on
    the text), FFN; plus the patch, text and time embeddings and, with `head`, the output head.
    `num_layers` < the depth counts a truncated forward (the APT discriminator's feature tap).
    Equal to torch.utils.flop_counter's count of a real forward (tests/bench).
    """
    n, d, f, lt = tokens, cfg.dim, cfg.ffn_dim, cfg.text_len
    layers = cfg.num_layers if num_layers is None else num_layers
    patch = math.prod(cfg.patch_size)
    per_block = (
        2 * n * 4 * d * d  # self-attn q, k, v, o
        + 2 * n * 2 * d * d  # cross-attn q, o
        + 2 * lt * 2 * d * d  # cross-attn k, v on the text
        + 2 * n * 2 * d * f  # ffn
    )  # + the attention scores and weighted sums, self and cross: wan_attention_flops
    embed = (
        2 * n * cfg.in_dim * patch * d  # patch embedding (a strided conv = one matmul per token)
        + 2 * lt * (cfg.text_dim * d + d * d)  # text embedding MLP
        + 2 * (cfg.freq_dim * d + d * d + d * 6 * d)  # time embedding MLP + 6-way projection
    )
    out = 2 * n * d * patch * cfg.out_dim if head else 0
    return layers * per_block + wan_attention_flops(cfg, tokens, layers) + embed + out


def wan_attention_flops(cfg: WanConfig, tokens: int, num_layers: int | None = None) -> float:
    """The attention-score part of `wan_forward_flops` (self and cross): the FLOPs with no weights,
    whose backward costs 2x forward even where no parameter gradient is wanted."""
    layers = cfg.num_layers if num_layers is None else num_layers
    return layers * (4 * tokens * tokens * cfg.dim + 4 * tokens * cfg.text_len * cfg.dim)


def print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    """A plain fixed-width table on stdout."""
    print(f"\n## {title}")
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_results(name: str, payload: dict, out_dir: Path | None = None) -> Path:
    """Write results JSON (with machine info and command line) atomically; return the path."""
    out_dir = Path(out_dir or os.environ.get(RESULTS_ENV) or RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine_info(), "command": " ".join(sys.argv), "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **payload}
    return atomic_write_text(out_dir / f"{name}.json", json.dumps(payload, indent=2))


def rss_bytes() -> int:
    """Current resident set size (Linux /proc/self/status VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found in /proc/self/status (Linux only)")


def spawn_worker(module: str, case: str, variant: str, args: argparse.Namespace, steps: int, must_run: bool,
                 timeout: float | None) -> dict:
    """Run `python -m MODULE --worker CASE VARIANT` in a FRESH process (peaks do not leak between variants)
    and return its `RESULT {json}` line. A failure raises where the case `must_run` (the CPU cases: a
    bug), else it becomes the row's "error" (a GPU case that ran out of memory or past `timeout`)."""
    cmd = [sys.executable, "-m", module, "--worker", case, variant,
           "--device", args.device, "--steps", str(steps), "--threads", str(args.threads)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=timeout)
    except subprocess.TimeoutExpired as err:  # run() has killed the worker: its GPU memory is free
        tail = (err.stderr or b"")[-500:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        print(f"worker {case}/{variant} stopped after {timeout} s; its last stderr:\n{tail}", flush=True)
        return {"case": case, "variant": variant, "error": f"did not finish within {timeout} s (stopped)"}
    if out.returncode != 0:
        message = f"worker {case}/{variant} failed (exit {out.returncode}):\n{out.stderr[-2000:]}"
        if must_run:
            raise RuntimeError(message)
        return {"case": case, "variant": variant, "error": message.splitlines()[-1][:300]}
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def add_ratios(rows: list[dict], reference: str, fields: dict[str, str]) -> None:
    """Add `<key>_vs_<reference>` = field / the reference variant's field, per case, where both ran."""
    for case in dict.fromkeys(r["case"] for r in rows):
        by = {r["variant"]: r for r in rows if r["case"] == case and "error" not in r}
        ref = by.get(reference, {})
        for r in by.values():
            for key, field in fields.items():
                if r.get(field) is not None and ref.get(field):
                    r[f"{key}_vs_{reference}"] = r[field] / max(ref[field], 1e-9)
