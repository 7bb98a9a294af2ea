"""Media items -> decoded clips -> encoded samples in a ShardWriter; shared by the ComfyUI dataset node
and the headless `apt-prepare` tool.

Decoding can run in worker processes (`iter_decoded_parallel`); bad files are skipped and recorded in
a `DecodeReport` by reason (never fatal), encoder failures raise. Encoders are plain callables:
``encode_frames(uint8 [F, H, W, 3]) -> [C, F', h, w]`` and ``encode_text(caption) -> [L, D]``.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

from apt_core.media import ClipInfo, DecodeConfig
from apt_core.media_scan import DecodedClip, DecodeReport, MediaItem, iter_decoded

if TYPE_CHECKING:
    from apt_core.shards import ShardWriter


def trim_text(emb: torch.Tensor) -> torch.Tensor:
    """[L, D] without trailing all-zero rows (umT5 padding), at least one row."""
    nonzero = (emb != 0).any(dim=-1).nonzero()
    n = int(nonzero[-1]) + 1 if len(nonzero) else 1
    return emb[:n]


def _quiet_worker() -> None:
    """Worker initializer: skipped files are logged once, by the main process, not again by the worker."""
    logging.getLogger("apt_core.media_scan").disabled = True


def _decode_in_worker(item: MediaItem, config: DecodeConfig) -> tuple[Any, ClipInfo | None, list[tuple[str, str, str]]]:
    """Decode one item in a worker process: (frames as numpy or None, info, skipped entries)."""
    report = DecodeReport(title="decode")
    for clip in iter_decoded([item], config, report):
        return clip.frames.numpy(), clip.info, []
    return None, None, report.skipped


def iter_decoded_parallel(items: Sequence[MediaItem], config: DecodeConfig, report: DecodeReport,
                          num_workers: int = 0, prefetch: int = 2) -> Iterator[tuple[int, DecodedClip | None]]:
    """Yield (item number, clip or None if skipped) in item order; decodes in `num_workers` processes.

    num_workers = 0 decodes in this process. At most ``prefetch * num_workers`` items are in flight, so
    a slow encoder never makes decoded clips pile up in memory. Skipped files go into ``report``.
    """
    if num_workers <= 0:
        for i, item in enumerate(items):
            clip = next(iter_decoded([item], config, report), None)
            yield i, clip
        return
    ctx = multiprocessing.get_context("spawn")  # no fork after torch/OpenMP threads started
    with ProcessPoolExecutor(max_workers=num_workers, mp_context=ctx, initializer=_quiet_worker) as pool:
        pending: deque[tuple[int, Future]] = deque()
        todo = iter(enumerate(items))
        try:
            while True:
                while len(pending) < max(1, prefetch * num_workers):
                    nxt = next(todo, None)
                    if nxt is None:
                        break
                    pending.append((nxt[0], pool.submit(_decode_in_worker, nxt[1], config)))
                if not pending:
                    return
                i, fut = pending.popleft()
                frames, info, skipped = fut.result()
                for reason, path, detail in skipped:
                    report.add(reason, path, detail)
                if frames is None:
                    yield i, None
                    continue
                report.ok += 1
                yield i, DecodedClip(items[i], torch.from_numpy(frames), info)
        finally:
            for _, fut in pending:
                fut.cancel()


def encode_clips(clips: Iterable[tuple[int, DecodedClip | None]], writer: ShardWriter,
                 encode_frames: Callable[[torch.Tensor], torch.Tensor],
                 encode_text: Callable[[str], torch.Tensor],
                 on_item: Callable[[int], None] | None = None,
                 encode_image_latent: Callable[[torch.Tensor], torch.Tensor] | None = None) -> int:
    """Encode and write each decoded clip (None = a skipped file); returns the samples written.

    Text embeddings are cached per caption and trimmed of trailing zero rows (the trainer zero-pads).
    on_item(n) is called after each item with the number of items handled so far. encode_image_latent
    (uint8 [F, H, W, 3] -> [C, F', h, w], e.g. WanVAEEncoder.encode_image_condition) fills each sample's image_latent.
    """
    cache: dict[str, torch.Tensor] = {}
    written = 0
    for n, (_, clip) in enumerate(clips, 1):
        if clip is not None:
            caption = clip.item.caption
            if caption not in cache:
                cache[caption] = trim_text(encode_text(caption))
            latent = encode_frames(clip.frames)
            image_latent = None if encode_image_latent is None else encode_image_latent(clip.frames)
            writer.add(latent, cache[caption], caption, source=str(clip.item.path), fps=clip.info.fps,
                       frame_indices=clip.info.frame_indices, image_latent=image_latent)
            written += 1
        if on_item is not None:
            on_item(n)
    return written


def encode_folder(
    items: Sequence[MediaItem],
    writer: ShardWriter,
    decode_config: DecodeConfig,
    encode_frames: Callable[[torch.Tensor], torch.Tensor],
    encode_text: Callable[[str], torch.Tensor],
    on_item: Callable[[int], None] | None = None,
    num_workers: int = 0,
    encode_image_latent: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[int, DecodeReport]:
    """Decode, encode and write each item (apt_core.media_scan.MediaItem); bad files go into the report.

    encode_frames: uint8 [F, H, W, 3] -> latent [C, F', h, w]; encode_text: caption -> [L, D]; optional
    encode_image_latent: like encode_frames, for each sample's image_latent (Wan 2.1 I2V).
    Returns (samples written, DecodeReport). Encoder failures are not skipped: they raise.
    """
    report = DecodeReport(title="decode")
    clips = iter_decoded_parallel(items, decode_config, report, num_workers)
    return encode_clips(clips, writer, encode_frames, encode_text, on_item, encode_image_latent), report
