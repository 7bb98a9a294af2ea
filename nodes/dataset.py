"""Dataset nodes: a folder of videos/images + captions -> shards in the headless trainer's format.

Frames are decoded by `apt_core.media` (the same decoder as the headless trainer), encoded with the
user's VAE (`vae.encode` of [F, H, W, 3] in 0..1, then the Wan 2.1 `latent_format.process_in`, so
shards hold what the DiT sees) and CLIP (the CLIPTextEncode path; trailing zero rows of umT5's
512-token padding are trimmed and restored by the trainer's zero padding). Files that cannot be
read are skipped and listed in the report; `shard_index` / `num_shards` let several ComfyUI
instances fill one directory (writer k takes every num_shards-th file).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .comfy_backbone import WAN_LATENT_CHANNELS, WAN_TEXT_DIM, context_problem

if TYPE_CHECKING:
    from apt_core.media import DecodeConfig
    from apt_core.media_scan import DecodeReport, MediaItem
    from apt_core.shards import ShardWriter

CATEGORY = "APT/dataset"
DATASET_TYPE = "APT_DATASET"
PRODUCER = "ComfyUI-APT APTDatasetFromFolder"


@dataclasses.dataclass(frozen=True)
class APTDataset:
    """An APT_DATASET: a shard directory and what is in it."""

    path: str
    num_samples: int
    metadata: dict
    buckets: dict  # latent shape -> sample count

    def describe(self) -> str:
        shapes = ", ".join(f"{list(k)} x{v}" for k, v in self.buckets.items())
        return f"{self.path}: {self.num_samples} samples; latent shapes {shapes}"


def open_dataset(path: str | Path) -> APTDataset:
    """Open a shard directory (ShardReader checks the index parts); errors say what is missing."""
    from apt_core.shards import ShardReader

    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"dataset directory {p} does not exist; build one with 'APT Dataset From Folder' or give the shard directory's path")
    reader = ShardReader(p)
    if len(reader) == 0:
        raise ValueError(f"dataset directory {p} has no samples (empty index); rebuild it with 'APT Dataset From Folder'")
    buckets = {k: len(v) for k, v in reader.buckets().items()}
    return APTDataset(str(p), len(reader), dict(reader.metadata), buckets)


def folder_fingerprint(path: str | Path) -> str:
    """Names, sizes and mtimes of the files under `path` (changes when the folder does), for IS_CHANGED."""
    import hashlib

    p, h = Path(path), hashlib.sha256()
    if p.is_dir():
        for f in sorted(p.rglob("*")):
            if f.is_file():
                st = f.stat()
                h.update(f"{f.relative_to(p)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def source_fingerprint(folder: str | Path, widgets: dict) -> str:
    """A dataset build's inputs: the folder's path and files (names, sizes, mtimes) and the widget values."""
    import json

    plain = {k: v for k, v in widgets.items() if isinstance(v, (str, int, float, bool))}  # links come as None
    return f"{Path(folder)}|{folder_fingerprint(folder)}|{json.dumps(plain, sort_keys=True)}"


def trim_text(emb: torch.Tensor) -> torch.Tensor:
    """[L, D] without trailing all-zero rows (umT5 padding), at least one row (apt_core.prepare.trim_text)."""
    from apt_core.prepare import trim_text as _trim

    return _trim(emb)


def encode_folder(
    items: Sequence[MediaItem],
    writer: ShardWriter,
    decode_config: DecodeConfig,
    encode_frames: Callable[[torch.Tensor], torch.Tensor],
    encode_text: Callable[[str], torch.Tensor],
    on_item: Callable[[int], None] | None = None,
) -> tuple[int, DecodeReport]:
    """Decode, encode and write each item; bad files go into the report (apt_core.prepare.encode_folder,
    shared with the headless `apt-prepare`). Returns (samples written, DecodeReport)."""
    from apt_core.prepare import encode_folder as _encode_folder

    return _encode_folder(items, writer, decode_config, encode_frames, encode_text, on_item)


def vae_family(vae: Any) -> Any:
    """The registered model family whose latents this ComfyUI VAE makes (by channel count), or a ValueError."""
    from apt_core.models.registry import describe_supported, family_for_latent_channels

    channels = int(getattr(vae, "latent_channels", WAN_LATENT_CHANNELS))
    fam = family_for_latent_channels(channels)
    if fam is None or not fam.comfy_latent_format:
        raise ValueError(f"this VAE makes {channels}-channel latents, which no supported model family uses. Supported: {describe_supported()}")
    return fam


def comfy_encoders(vae: Any, clip: Any) -> tuple[Callable, Callable]:
    """(encode_frames, encode_text) over a ComfyUI VAE and CLIP."""
    import comfy.latent_formats

    fmt = getattr(comfy.latent_formats, vae_family(vae).comfy_latent_format)()

    def encode_frames(frames: torch.Tensor) -> torch.Tensor:
        latent = vae.encode(frames.float().div(255.0))  # [1, C, F', h, w] raw VAE space
        return fmt.process_in(latent.float().cpu())[0]

    def encode_text(caption: str) -> torch.Tensor:
        cond = clip.encode_from_tokens_scheduled(clip.tokenize(caption))
        ctx = cond[0][0]
        problem = context_problem(ctx.shape)
        if problem:
            raise ValueError(problem)
        return ctx[0].to(torch.bfloat16).cpu()

    return encode_frames, encode_text


class APTDatasetFromFolder:
    DESCRIPTION = ("Encode a folder of videos/images with captions (manifest.jsonl/csv or <file>.txt) into APT shards "
                   "with your Wan VAE and text encoder. Bad files are skipped and listed in the report.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (DATASET_TYPE, "STRING")
    RETURN_NAMES = ("dataset", "report")
    OUTPUT_TOOLTIPS = ("The shard directory, for APT Consistency Distill / APT Train.", "Counts and every skipped file with its reason.")
    FUNCTION = "build"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        from apt_core.media_scan import CAPTION_POLICIES

        return {"required": {
            "folder": ("STRING", {"default": "apt_media", "tooltip": "Media folder: relative to ComfyUI's input/ folder, or an absolute path."}),
            "vae": ("VAE", {"tooltip": "The model family's VAE (VAELoader: wan_2.1_vae.safetensors, or wan2.2_vae.safetensors for Wan 2.2 TI2V-5B)."}),
            "clip": ("CLIP", {"tooltip": "The Wan text encoder (CLIPLoader type=wan, umT5-XXL)."}),
            "output_dir": ("STRING", {"default": "apt/datasets/my_dataset", "tooltip": "Shard directory: relative to ComfyUI's output/ folder, or absolute."}),
            "width": ("INT", {"default": 832, "min": 16, "max": 4096, "step": 16, "tooltip": "Frames are resized and centre-cropped to this width."}),
            "height": ("INT", {"default": 480, "min": 16, "max": 4096, "step": 16, "tooltip": "Frames are resized and centre-cropped to this height."}),
            "num_frames": ("INT", {"default": 33, "min": 1, "max": 1025, "step": 4, "tooltip": "Frames per video clip, 4k+1 (1 = first frame only). Images are 1-frame clips."}),
            "fps": ("FLOAT", {"default": 16.0, "min": 0.0, "max": 120.0, "step": 1.0, "tooltip": "Resample videos to this frame rate (Wan 2.1: 16); 0 keeps the source rate."}),
            "caption_policy": (list(CAPTION_POLICIES), {"default": "error", "tooltip": "File without caption: error = skip and report it, empty = train with '', filename = use the file name."}),
            "shard_index": ("INT", {"default": 0, "min": 0, "max": 99998, "tooltip": "This instance's number when several ComfyUI instances split one folder (0-based)."}),
            "num_shards": ("INT", {"default": 1, "min": 1, "max": 99999, "tooltip": "How many instances split the folder; instance k encodes every num_shards-th file."}),
            "mode": (["append", "new", "overwrite"], {"default": "append", "tooltip": "append: continue an interrupted run (skips files already encoded); new: refuse if this instance's shards exist; overwrite: replace them."}),
        }}

    @classmethod
    def IS_CHANGED(cls, folder, **widgets):
        """What the shards are built from: the source folder's files and the widget values. Not the shard
        folder, which every run rewrites: fingerprinting it made every queue rerun the whole graph."""
        from .comfy_env import input_dir

        return source_fingerprint(resolve(folder, input_dir, "folder"), widgets)

    def build(self, folder, vae, clip, output_dir, width, height, num_frames, fps, caption_policy, shard_index, num_shards, mode):
        from apt_core.media import DecodeConfig
        from apt_core.media_scan import scan_media_folder
        from apt_core.shards import ShardWriter, writer_slice

        from .comfy_env import input_dir, step_reporter
        from .comfy_env import output_dir as out_root

        src = resolve(folder, input_dir, "folder")
        items, scan = scan_media_folder(src, caption_policy)
        if not items:
            raise ValueError(f"no usable media in {src}.\n{scan.summary()}\nAdd videos/images with captions (manifest.jsonl "
                             "or a .txt per file), or set caption_policy to 'filename'.")
        fam = vae_family(vae)
        meta = {"producer": PRODUCER, "latent_space": f"{fam.name} model space (latent_format.process_in)",
                "latent_channels": fam.latent_channels, "text_dim": WAN_TEXT_DIM, "size": [height, width],
                "num_frames": num_frames, "fps": fps}
        dest = resolve(output_dir, out_root, "output_dir")
        writer = ShardWriter(dest, meta, shard_index=shard_index, num_shards=num_shards, mode=mode)
        done = set(writer.written_sources)
        todo = [it for it in writer_slice(items, shard_index, num_shards) if str(it.path) not in done]
        cfg = DecodeConfig(fps=fps or None, num_frames=num_frames, size=(height, width))
        on_step = step_reporter(max(1, len(todo)))
        try:
            n, decode = encode_folder(todo, writer, cfg, *comfy_encoders(vae, clip), on_item=lambda i: on_step(i, {}))
        finally:
            writer.close()
        report = "\n".join([f"wrote {n} new samples to {dest} (writer {shard_index}/{num_shards}; {len(done)} already there)",
                            scan.summary(), decode.summary()])
        dataset = open_dataset(dest)
        return {"ui": {"text": [report]}, "result": (dataset, report)}


def resolve(path: str, base: str | Callable[[], str], what: str) -> Path:
    """comfy_env.resolve_path, imported lazily (a widget path under a ComfyUI folder, or absolute)."""
    from .comfy_env import resolve_path

    return resolve_path(path, base, what)


class APTLoadDataset:
    DESCRIPTION = "Open an existing APT shard directory (made by APT Dataset From Folder or the headless preprocessing)."
    CATEGORY = CATEGORY
    RETURN_TYPES = (DATASET_TYPE, "STRING")
    RETURN_NAMES = ("dataset", "info")
    OUTPUT_TOOLTIPS = ("The dataset, for APT Consistency Distill / APT Train.", "Sample count and latent shapes.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "path": ("STRING", {"default": "apt/datasets/my_dataset", "tooltip": "Shard directory: relative to ComfyUI's output/ folder, or absolute."}),
        }}

    @classmethod
    def IS_CHANGED(cls, path):
        from .comfy_env import output_dir

        return folder_fingerprint(resolve(path, output_dir, "path"))

    def load(self, path):
        from .comfy_env import output_dir

        dataset = open_dataset(resolve(path, output_dir, "path"))
        return (dataset, dataset.describe())


NODE_CLASS_MAPPINGS = {"APTDatasetFromFolder": APTDatasetFromFolder, "APTLoadDataset": APTLoadDataset}
NODE_DISPLAY_NAME_MAPPINGS = {"APTDatasetFromFolder": "APT Dataset From Folder", "APTLoadDataset": "APT Load Dataset"}
