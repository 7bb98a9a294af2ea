"""`apt-prepare INPUT OUTPUT [options]` (also `python -m training.prepare`): a folder of videos/images with
captions -> a shard directory for the trainer (docs/SHARDS.md), headless.

Two encodings: pixel space (frames stored as [3, F, H, W] in [-1, 1], for tiny pixel models) unless
`--vae` is given, then Wan 2.1 VAE latents (normalised with Wan's latent mean/std); `--image-latent` adds
Wan 2.1 I2V's image latent (the VAE latent of [first frame, mid-grey frames]) per clip. Captions go through
umT5 (`--text-encoder` + `--tokenizer`) or, for tiny models, a fixed word-hash embedding of
`--text-dim` columns. Bad files are skipped and named in the report (printed and saved as JSON);
a re-run continues where an interrupted one stopped (files already in the shards are skipped); an
existing output made with other settings is never replaced unless `--overwrite` is given.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("apt-prepare")
PRODUCER = "apt-prepare"
STORE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class PrepareError(Exception):
    """Bad arguments or an output that must not be touched; the message says what to change."""


@dataclass
class PrepareResult:
    """What one run did: samples written now / found from earlier runs, and the report's path and content."""

    written: int
    already: int
    report_path: Path
    report: dict[str, Any]


class HashTextEncoder:
    """Caption -> [words + 1, dim]: each lower-cased word (and a final end row) a fixed N(0, 1) vector seeded
    by its SHA-256, for tiny models that have no pretrained text encoder of their width."""

    def __init__(self, dim: int, text_len: int) -> None:
        if dim < 1 or text_len < 1:
            raise PrepareError(f"--text-dim and --text-len must be >= 1, got {dim} and {text_len}")
        self.dim, self.text_len = dim, text_len
        self.name = f"word-hash (sha256, N(0,1), dim {dim})"

    def row(self, word: str) -> torch.Tensor:
        seed = int.from_bytes(hashlib.sha256(word.encode("utf-8")).digest()[:8], "little") & (2**63 - 1)
        return torch.randn(self.dim, generator=torch.Generator().manual_seed(seed))

    def __call__(self, caption: str) -> torch.Tensor:
        from apt_core.models.t5 import clean_caption

        words = clean_caption(caption).lower().split()[: self.text_len - 1] + ["</s>"]
        return torch.stack([self.row(w) for w in words])


def parse_size(text: str) -> tuple[int, int]:
    """'480x832' (height x width) -> (480, 832)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"size must be HEIGHTxWIDTH, e.g. 480x832, got {text!r}") from e
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return h, w


def build_parser() -> argparse.ArgumentParser:
    from apt_core.media_scan import CAPTION_POLICIES

    p = argparse.ArgumentParser(
        prog="apt-prepare",
        description="Encode a folder of videos/images + captions (manifest.jsonl/csv or <file>.txt) into APT shards.",
        epilog="Pixel space unless --vae is given. Re-running with the same settings continues an interrupted run. "
        "See docs/TRAINING.md (Preparing data).",
    )
    p.add_argument("input", help="media folder (searched recursively; captions from a manifest or sidecar .txt files)")
    p.add_argument("output", help="shard directory to create (or to continue)")
    p.add_argument("--size", type=parse_size, default=(480, 832), metavar="HxW",
                   help="frames are resized and centre-cropped to HEIGHTxWIDTH (default 480x832)")
    p.add_argument("--num-frames", type=int, default=33, help="frames per video clip, 4k+1 (default 33; images are 1 frame)")
    p.add_argument("--fps", type=float, default=16.0, help="resample videos to this rate (default 16, Wan 2.1's); 0 = source rate")
    p.add_argument("--caption-policy", choices=CAPTION_POLICIES, default="error",
                   help="file without caption: error = skip and report (default), empty = '', filename = its name")
    p.add_argument("--manifest", help="caption manifest (.jsonl/.csv); default: manifest.jsonl etc. in the input folder")
    p.add_argument("--vae", help="Wan 2.1 VAE .safetensors: store normalised latents instead of pixels")
    p.add_argument("--image-latent", action="store_true",
                   help="with --vae, for Wan 2.1 I2V: also store each clip's image latent, the VAE latent of [its first "
                   "frame, mid-grey frames] as Wan encodes it (one more VAE pass per clip)")
    p.add_argument("--text-encoder", help="umT5 encoder .safetensors (Wan or Hugging Face key names)")
    p.add_argument("--tokenizer", help="umT5 sentencepiece model (spiece.model), needed with --text-encoder")
    p.add_argument("--text-dim", type=int, default=0,
                   help="without --text-encoder: width of the word-hash text embedding (the model's text_dim, e.g. 32)")
    p.add_argument("--text-len", type=int, default=512, help="max text tokens kept per caption (Wan: 512)")
    p.add_argument("--store-dtype", choices=[*STORE_DTYPES, "auto"], default="auto",
                   help="dtype of stored latents/text (auto: bfloat16 latents, float16 pixels)")
    p.add_argument("--device", default="auto", help="device for the VAE / text encoder (auto = cuda if available)")
    p.add_argument("--compute-dtype", choices=[*STORE_DTYPES, "auto"], default="auto",
                   help="dtype the encoders run in (auto, as Wan: VAE float32; umT5 bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--samples-per-shard", type=int, default=16,
                   help="samples per shard file (default 16; an interruption loses at most the unflushed ones)")
    p.add_argument("--num-workers", type=int, default=0, help="decode in this many worker processes (0 = in the main one)")
    p.add_argument("--shard-index", type=int, default=0, help="this process's number when several split one folder")
    p.add_argument("--num-shards", type=int, default=1, help="how many processes split the folder (each takes every n-th file)")
    p.add_argument("--overwrite", action="store_true", help="replace this writer's existing shards in OUTPUT")
    p.add_argument("--report", help="report JSON path (default OUTPUT/prepare-report-<shard index>.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _check_args(args: argparse.Namespace) -> None:
    if (args.num_frames - 1) % 4 or args.num_frames < 1:
        raise PrepareError(f"--num-frames must be 4k+1 (1, 5, 9, ..., 33, 81), got {args.num_frames}")
    if args.fps < 0:
        raise PrepareError(f"--fps must be >= 0 (0 = source rate), got {args.fps}")
    if args.vae and (args.size[0] % 16 or args.size[1] % 16):
        raise PrepareError(f"--size {args.size[0]}x{args.size[1]}: with --vae both sides must be multiples of 16 "
                           f"(8x VAE downsampling, then the DiT's 2x2 patches)")
    if not args.vae and (args.size[0] % 2 or args.size[1] % 2):
        raise PrepareError(f"--size {args.size[0]}x{args.size[1]}: both sides must be even (the DiT's 2x2 patches)")
    if args.image_latent and not args.vae:
        raise PrepareError("--image-latent needs --vae (the image latent is the Wan 2.1 VAE's latent of the first frame "
                           "followed by mid-grey frames)")
    if bool(args.text_encoder) != bool(args.tokenizer):
        raise PrepareError("--text-encoder and --tokenizer go together (umT5 weights and its spiece.model)")
    if not args.text_encoder and args.text_dim < 1:
        raise PrepareError("give --text-encoder FILE --tokenizer FILE (umT5), or --text-dim N for the word-hash "
                           "embedding of tiny models (N = the model's text_dim, e.g. 32 for the tiny preset)")
    if args.text_len < 1:
        raise PrepareError(f"--text-len must be >= 1, got {args.text_len}")
    if args.samples_per_shard < 1 or args.num_workers < 0:
        raise PrepareError("--samples-per-shard must be >= 1 and --num-workers >= 0")
    if not (0 <= args.shard_index < args.num_shards):
        raise PrepareError(f"need 0 <= --shard-index < --num-shards, got {args.shard_index} and {args.num_shards}")
    for flag in ("vae", "text_encoder", "tokenizer", "manifest"):
        path = getattr(args, flag)
        if path and not Path(path).is_file():
            raise PrepareError(f"--{flag.replace('_', '-')} {path}: file not found")
    if not Path(args.input).is_dir():
        raise PrepareError(f"input folder {args.input} does not exist or is not a directory")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_encoders(args: argparse.Namespace) -> tuple[Callable, Callable, Callable | None, dict[str, Any]]:
    """(encode_frames, encode_text, encode_image_latent or None, dataset metadata) for the chosen encodings."""
    device = _device(args.device)
    auto = args.compute_dtype == "auto"
    vae_dtype = torch.float32 if auto else STORE_DTYPES[args.compute_dtype]
    encode_image_latent = None
    text_dtype = (torch.bfloat16 if device.type == "cuda" else torch.float32) if auto else STORE_DTYPES[args.compute_dtype]
    meta: dict[str, Any] = {"producer": PRODUCER, "size": list(args.size), "num_frames": args.num_frames,
                            "fps": args.fps}
    if args.vae:
        from apt_core.models.wan_vae import load_wan_vae

        store = STORE_DTYPES["bfloat16" if args.store_dtype == "auto" else args.store_dtype]
        vae = load_wan_vae(args.vae, device=device, dtype=vae_dtype)
        c = vae.config
        meta.update(space="latent", vae=Path(args.vae).name, latent_channels=c.z_dim,
                    latent_norm=None if c.latent_mean is None else {"mean": list(c.latent_mean), "std": list(c.latent_std)})

        def encode_frames(frames: torch.Tensor) -> torch.Tensor:
            return vae.encode_frames(frames).to(store)

        if args.image_latent:
            meta.update(image_latent="wan2.1-i2v: VAE latent of [first frame, mid-grey frames]")

            def encode_image_latent(frames: torch.Tensor) -> torch.Tensor:
                return vae.encode_image_condition(frames).to(store)
    else:
        store = STORE_DTYPES["float16" if args.store_dtype == "auto" else args.store_dtype]
        meta.update(space="pixels", value_range=[-1, 1])

        def encode_frames(frames: torch.Tensor) -> torch.Tensor:
            return frames.permute(3, 0, 1, 2).float().div(127.5).sub(1.0).to(store)

    if args.text_encoder:
        from apt_core.models.t5 import T5Tokenizer, TextEncoder, load_t5_encoder

        text = TextEncoder(load_t5_encoder(args.text_encoder, device=device, dtype=text_dtype),
                           T5Tokenizer(args.tokenizer, args.text_len))
        meta.update(text_encoder=Path(args.text_encoder).name, tokenizer=Path(args.tokenizer).name,
                    text_dim=text.model.config.dim)
    else:
        text = HashTextEncoder(args.text_dim, args.text_len)
        meta.update(text_encoder=text.name, text_dim=args.text_dim)

    def encode_text(caption: str) -> torch.Tensor:
        return text(caption).to(store)

    return encode_frames, encode_text, encode_image_latent, meta


def open_writer(out: Path, meta: dict[str, Any], args: argparse.Namespace):
    """A ShardWriter on `out`: new, continued (same settings) or, with --overwrite, replaced; refuses otherwise."""
    from apt_core.shards import ShardWriter, index_name

    if out.exists() and not out.is_dir():
        raise PrepareError(f"output {out} exists and is not a directory")
    ours = out.is_dir() and any(p.name.startswith(("dataset-", "shard-", "prepare-report")) for p in out.iterdir())
    if out.is_dir() and not ours and any(not p.name.startswith(".") for p in out.iterdir()):
        raise PrepareError(f"output {out} is a non-empty folder that holds no shards; give a new or empty folder")
    mode = "overwrite" if args.overwrite else "append"
    index = out / index_name(args.shard_index)
    if mode == "append" and index.is_file():
        try:
            old = json.loads(index.read_text(encoding="utf-8")).get("metadata", {})
        except (json.JSONDecodeError, AttributeError):
            old = None  # damaged: ShardWriter names it below
        if isinstance(old, dict) and old != meta:
            diff = "; ".join(f"{k}: {old.get(k)!r} there, {meta.get(k)!r} now"
                             for k in sorted(set(old) | set(meta)) if old.get(k) != meta.get(k))
            raise PrepareError(f"output {out} was made with other settings ({diff}); pass --overwrite to replace "
                               f"its shards, or choose a new output folder")
    if mode == "append" and ours and not (out / index_name(args.shard_index)).exists():
        mode = "new"  # another writer's files only: ShardWriter refuses ours if shard files exist without an index
    try:
        return ShardWriter(out, meta, samples_per_shard=args.samples_per_shard, shard_index=args.shard_index,
                           num_shards=args.num_shards, mode=mode)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        raise PrepareError(f"{e}\nThe output {out} was made with other settings or is damaged; pass --overwrite to "
                           f"replace its shards, or choose a new output folder") from e


def _report_entries(report: Any, stage: str) -> list[dict[str, str]]:
    return [{"stage": stage, "reason": r, "path": p, "detail": d} for r, p, d in report.skipped]


def prepare(args: argparse.Namespace, on_item: Callable[[int], None] | None = None) -> PrepareResult:
    """Run the tool for parsed arguments; on_item(n) is called after each file (progress, tests)."""
    from apt_core.fileio import atomic_write_text
    from apt_core.media import DecodeConfig
    from apt_core.media_scan import DecodeReport, scan_media_folder
    from apt_core.prepare import encode_clips, iter_decoded_parallel
    from apt_core.shards import writer_slice

    _check_args(args)
    started = time.monotonic()
    src, out = Path(args.input).resolve(), Path(args.output)  # absolute sources: a re-run from elsewhere resumes
    try:
        items, scan = scan_media_folder(src, args.caption_policy, args.manifest)
    except ValueError as e:  # a damaged manifest
        raise PrepareError(str(e)) from e
    if not items:
        raise PrepareError(f"no usable media in {src}.\n{scan.summary()}\nAdd videos/images with captions "
                           "(manifest.jsonl or a .txt per file), or pass --caption-policy filename.")
    try:
        encode_frames, encode_text, encode_image_latent, meta = make_encoders(args)
    except (ValueError, KeyError, OSError) as e:  # weights / tokenizer that do not fit, named by the loaders
        raise PrepareError(str(e)) from e
    writer = open_writer(out, meta, args)
    done = set(writer.written_sources)
    todo = [it for it in writer_slice(items, args.shard_index, args.num_shards) if str(it.path) not in done]
    cfg = DecodeConfig(fps=args.fps or None, num_frames=args.num_frames, size=tuple(args.size))
    decode = DecodeReport(title="decode")
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="apt-prepare", unit="file", dynamic_ncols=True)

    def step(n: int) -> None:
        if bar is not None:
            bar.update(1)
        if on_item is not None:
            on_item(n)

    written, finished = 0, False
    try:
        with writer:
            clips = iter_decoded_parallel(todo, cfg, decode, args.num_workers)
            written = encode_clips(clips, writer, encode_frames, encode_text, on_item=step,
                                   encode_image_latent=encode_image_latent)
        finished = True
    finally:
        if bar is not None:
            bar.close()
        total = writer.num_samples
        written = total - len(done)  # also right after an interruption (the writer flushed what it had)
        report = {
            "input": str(src), "output": str(out), "writer": {"shard_index": args.shard_index, "num_shards": args.num_shards},
            "complete": finished,
            "written": written, "already_there": len(done), "total_samples": total,
            "files_found": len(items) + len(scan.skipped), "skipped_count": len(scan.skipped) + len(decode.skipped),
            "skipped": _report_entries(scan, "scan") + _report_entries(decode, "decode"),
            "metadata": meta, "seconds": round(time.monotonic() - started, 3),
        }
        report_path = Path(args.report) if args.report else out / f"prepare-report-{args.shard_index:05d}.json"
        report_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(report_path, json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    return PrepareResult(written, len(done), report_path, report)


def summary(result: PrepareResult) -> str:
    """Human-readable lines: counts, each skipped file with its reason, where the report is."""
    r = result.report
    lines = [f"wrote {r['written']} new samples to {r['output']} ({r['already_there']} already there, "
             f"{r['total_samples']} in this writer's shards), {r['skipped_count']} files skipped"]
    lines += [f"  skipped ({e['stage']}, {e['reason']}): {e['path']}" + (f": {e['detail']}" if e["detail"] else "")
              for e in r["skipped"]]
    lines.append(f"report: {result.report_path}")
    return "\n".join(lines)


class _StopFlag:
    """SIGTERM handler that only records the signal; the run checks it after each file and stops there.

    Raising from the handler instead would land at any bytecode, e.g. inside a finaliser that
    swallows it, and the run would go on to exit 0 (seen on a loaded CI machine).
    """

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def check(self, n: int) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"signal {self.signum}")


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point; 0 = done, 1 = interrupted (re-run to continue), 2 = bad arguments/output."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    stop = _StopFlag()
    previous = signal.signal(signal.SIGTERM, stop)  # flush what is encoded, then exit like Ctrl-C
    try:
        result = prepare(args, on_item=stop.check)
    except PrepareError as e:
        print(f"apt-prepare: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"apt-prepare: interrupted; what was encoded is saved in {args.output}. Run the same command again "
              f"to continue.", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
