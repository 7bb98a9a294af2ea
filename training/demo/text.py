"""Captions -> text embeddings for the digits demo: a sentencepiece tokenizer + a small frozen encoder.

Tokenizer: a sentencepiece `word` model trained on the demo's whole caption set (`all_captions()`),
deterministically (one thread, identity normalisation); the 379-byte model is committed as
`assets/captions.model` and `train_tokenizer()` re-creates it byte for byte.

Encoder (`TextEncoder`, frozen, never trained): a fixed random token embedding (N(0, 1), seed 0)
plus fixed sinusoidal positions, one pre-norm transformer layer with seeded random weights, and a
final LayerNorm; rows past the caption's length are zero. It plays the role of umT5 in Wan: every
caption gets a distinct, deterministic `[text_len, text_dim]` context. The empty caption "" has
length 0 and an all-zero context: the null condition for classifier-free guidance.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import torch
import torch.nn as nn

ASSETS = Path(__file__).resolve().parent / "assets"
TOKENIZER_PATH = ASSETS / "captions.model"
ENCODER_PATH = ASSETS / "text_encoder.safetensors"

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIRECTIONS = ("to the left", "to the right", "up", "down")
TEXT_LEN = 8
TEXT_DIM = 32
ENCODER_SEED = 0


def image_caption(label: int) -> str:
    """'a seven' for label 7."""
    return f"a {DIGIT_WORDS[label]}"


def video_caption(label: int, direction: int) -> str:
    """'a seven moving to the left' for label 7, direction 0 (see DIRECTIONS)."""
    return f"a {DIGIT_WORDS[label]} moving {DIRECTIONS[direction]}"


def all_captions() -> list[str]:
    """Every caption the demo can produce: 10 image captions, then 40 video captions."""
    return [image_caption(i) for i in range(10)] + [video_caption(i, d) for i in range(10) for d in range(4)]


def train_tokenizer() -> bytes:
    """Train the sentencepiece word model on `all_captions()`; deterministic bytes."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(all_captions()),
        model_writer=buf,
        vocab_size=40,
        hard_vocab_limit=False,
        model_type="word",
        num_threads=1,
        character_coverage=1.0,
        normalization_rule_name="identity",
        pad_id=0,
        unk_id=1,
        bos_id=-1,
        eos_id=-1,
        minloglevel=2,
    )
    return buf.getvalue()


def load_tokenizer(path: Path | None = None):
    """The committed tokenizer (or a freshly trained one when `path` does not exist)."""
    import sentencepiece as spm

    path = Path(path or TOKENIZER_PATH)
    proto = path.read_bytes() if path.exists() else train_tokenizer()
    return spm.SentencePieceProcessor(model_proto=proto)


def _sinusoid(length: int, dim: int) -> torch.Tensor:
    pos = torch.arange(length, dtype=torch.float64)[:, None]
    freq = torch.pow(10000.0, -torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return torch.cat([torch.sin(pos * freq), torch.cos(pos * freq)], dim=1).float()


class TextEncoder(nn.Module):
    """Frozen seeded encoder: token ids [B, L] + lengths [B] -> context [B, L, dim] (zero past length)."""

    def __init__(self, vocab_size: int, dim: int = TEXT_DIM, text_len: int = TEXT_LEN, seed: int = ENCODER_SEED):
        super().__init__()
        self.text_len = text_len
        gen = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(vocab_size, dim)
        self.layer = nn.TransformerEncoderLayer(dim, nhead=2, dim_feedforward=2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(dim)
        with torch.no_grad():
            for name, p in sorted(self.named_parameters()):
                if p.ndim >= 2:
                    p.copy_(torch.randn(p.shape, generator=gen) / (1.0 if name == "embed.weight" else math.sqrt(p.shape[1])))
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.fill_(1.0)
        self.register_buffer("pos", _sinusoid(text_len, dim), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = torch.arange(ids.shape[1])[None] < lengths[:, None]  # [B, L] True on real tokens
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        # a fully padded row (the null caption) would make attention NaN; its output is zeroed below
        pad = ~mask
        pad[lengths == 0, 0] = False
        x = self.norm(self.layer(x, src_key_padding_mask=pad))
        return x * mask[..., None]


class CaptionEmbedder:
    """Tokenizer + frozen encoder with a cache: `__call__(captions) -> (context [B, L, D], lengths [B])`."""

    def __init__(self, tokenizer_path: Path | None = None, encoder_path: Path | None = None):
        self.sp = load_tokenizer(tokenizer_path)
        self.encoder = TextEncoder(self.sp.get_piece_size())
        path = Path(encoder_path or ENCODER_PATH)
        if path.exists():
            from safetensors.torch import load_file

            self.encoder.load_state_dict(load_file(str(path)))
        self._cache: dict[str, tuple[torch.Tensor, int]] = {}

    @property
    def text_len(self) -> int:
        return self.encoder.text_len

    @property
    def text_dim(self) -> int:
        return self.encoder.embed.embedding_dim

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [B, text_len] (0-padded) and lengths [B]; raises when a caption is too long."""
        ids = torch.zeros(len(captions), self.text_len, dtype=torch.long)
        lengths = torch.zeros(len(captions), dtype=torch.long)
        for i, cap in enumerate(captions):
            toks = self.sp.encode(cap) if cap else []
            if len(toks) > self.text_len:
                raise ValueError(f"caption {cap!r} has {len(toks)} tokens, more than text_len={self.text_len}")
            ids[i, : len(toks)] = torch.tensor(toks, dtype=torch.long)
            lengths[i] = len(toks)
        return ids, lengths

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = sorted({c for c in captions if c not in self._cache})
        if missing:
            ids, lengths = self.tokenize(missing)
            ctx = self.encoder(ids, lengths)
            for c, e, n in zip(missing, ctx, lengths.tolist()):
                self._cache[c] = (e, n)
        ctx = torch.stack([self._cache[c][0] for c in captions])
        lengths = torch.tensor([self._cache[c][1] for c in captions], dtype=torch.long)
        return ctx, lengths


def write_assets(out_dir: Path = ASSETS) -> None:
    """Re-create `captions.model` and `text_encoder.safetensors` (deterministic)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    proto = train_tokenizer()
    (out_dir / TOKENIZER_PATH.name).write_bytes(proto)
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_proto=proto).get_piece_size()
    sd = {k: v.contiguous() for k, v in TextEncoder(vocab).state_dict().items()}
    save_file(sd, str(out_dir / ENCODER_PATH.name), metadata={"seed": str(ENCODER_SEED), "what": "frozen demo text encoder"})
