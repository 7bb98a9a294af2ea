"""umT5 text encoder (the Wan 2.1 text encoder) in pure PyTorch, with a sentencepiece tokenizer.

Module tree and state-dict keys follow the public Wan 2.1 code (`wan/modules/t5.py`, `T5Encoder`):
`token_embedding`, `blocks.<i>.{norm1, attn.{q,k,v,o}, norm2, ffn.{gate.0, fc1, fc2}, pos_embedding.embedding}`,
`norm` (umT5: a relative position embedding per block, `shared_pos=False`). Hugging Face / ComfyUI
key names (`encoder.block.<i>.layer.0.SelfAttention.q.weight`, `shared.weight`, ...) are mapped onto
these. As in Wan, a caption becomes `ids = pieces + [</s>]` (truncated to text_len), and the output
keeps only the rows of real tokens (Wan pads the rest with zeros).
"""

from __future__ import annotations

import html
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class T5Config:
    """umT5-XXL encoder: vocab 256384, dim 4096, attention 4096 (64 heads), FFN 10240, 24 layers, 32 buckets."""

    vocab: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    shared_pos: bool = False

    def __post_init__(self) -> None:
        if self.dim_attn % self.num_heads:
            raise ValueError(f"T5Config: dim_attn {self.dim_attn} is not a multiple of num_heads {self.num_heads}")


class GELU(nn.Module):
    """tanh-approximated GELU (as in T5 v1.1 / umT5)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class T5LayerNorm(nn.Module):
    """RMS norm without mean subtraction or bias, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.type_as(self.weight)
        return self.weight * x


def _fp16_clamp(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.float16 and torch.isinf(x).any():
        limit = torch.finfo(x.dtype).max - 1000
        x = x.clamp(-limit, limit)
    return x


class T5Attention(nn.Module):
    """Multi-head attention without the 1/sqrt(d) scaling (T5), plus a position bias and a key mask."""

    def __init__(self, dim: int, dim_attn: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim_attn // num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape[0], self.num_heads, self.head_dim
        q, k, v = (f(x).view(b, -1, n, c) for f in (self.q, self.k, self.v))
        bias = x.new_zeros(b, n, q.shape[1], k.shape[1])
        if pos_bias is not None:
            bias = bias + pos_bias
        if mask is not None:
            bias = bias.masked_fill(mask.view(b, 1, 1, -1) == 0, torch.finfo(x.dtype).min)
        attn = torch.einsum("binc,bjnc->bnij", q, k) + bias
        attn = F.softmax(attn.float(), dim=-1).type_as(attn)
        return self.o(torch.einsum("bnij,bjnc->binc", attn, v).reshape(b, -1, n * c))


class T5FeedForward(nn.Module):
    """Gated-GELU FFN: fc2(fc1(x) * gelu(gate(x)))."""

    def __init__(self, dim: int, dim_ffn: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), GELU())
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


class T5RelativeEmbedding(nn.Module):
    """Bucketed relative-position bias [1, heads, Lq, Lk] (bidirectional in the encoder)."""

    def __init__(self, num_buckets: int, num_heads: int, bidirectional: bool = True, max_dist: int = 128) -> None:
        super().__init__()
        self.num_buckets, self.bidirectional, self.max_dist = num_buckets, bidirectional, max_dist
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, lq: int, lk: int) -> torch.Tensor:
        device = self.embedding.weight.device
        rel = torch.arange(lk, device=device)[None, :] - torch.arange(lq, device=device)[:, None]
        return self.embedding(self._bucket(rel)).permute(2, 0, 1)[None].contiguous()

    def _bucket(self, rel: torch.Tensor) -> torch.Tensor:
        if self.bidirectional:
            n = self.num_buckets // 2
            buckets = (rel > 0).long() * n
            rel = rel.abs()
        else:
            n = self.num_buckets
            buckets = torch.zeros_like(rel)
            rel = -torch.clamp(rel, max=0)
        exact = n // 2
        large = exact + (torch.log(rel.clamp(min=1).float() / exact) / math.log(self.max_dist / exact) * (n - exact)).long()
        large = large.clamp(max=n - 1)
        return buckets + torch.where(rel < exact, rel, large)


class T5SelfAttention(nn.Module):
    """One encoder block: pre-norm self-attention and pre-norm gated FFN, both residual."""

    def __init__(self, dim: int, dim_attn: int, dim_ffn: int, num_heads: int, num_buckets: int, shared_pos: bool) -> None:
        super().__init__()
        self.shared_pos = shared_pos
        self.norm1 = T5LayerNorm(dim)
        self.attn = T5Attention(dim, dim_attn, num_heads)
        self.norm2 = T5LayerNorm(dim)
        self.ffn = T5FeedForward(dim, dim_ffn)
        self.pos_embedding = None if shared_pos else T5RelativeEmbedding(num_buckets, num_heads)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        e = pos_bias if self.shared_pos else self.pos_embedding(x.shape[1], x.shape[1])
        x = _fp16_clamp(x + self.attn(self.norm1(x), mask=mask, pos_bias=e))
        return _fp16_clamp(x + self.ffn(self.norm2(x)))


class T5Encoder(nn.Module):
    """The umT5 encoder stack: ids [B, L] (+ mask [B, L]) -> hidden states [B, L, dim]."""

    def __init__(self, config: T5Config | None = None) -> None:
        super().__init__()
        self.config = c = config or T5Config()
        self.token_embedding = nn.Embedding(c.vocab, c.dim)
        self.pos_embedding = T5RelativeEmbedding(c.num_buckets, c.num_heads) if c.shared_pos else None
        self.blocks = nn.ModuleList(T5SelfAttention(c.dim, c.dim_attn, c.dim_ffn, c.num_heads, c.num_buckets, c.shared_pos)
                                    for _ in range(c.num_layers))
        self.norm = T5LayerNorm(c.dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.token_embedding(ids)
        e = self.pos_embedding(x.shape[1], x.shape[1]) if self.pos_embedding is not None else None
        for block in self.blocks:
            x = block(x, mask, pos_bias=e)
        return self.norm(x)


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------

_HF_BLOCK = re.compile(r"^encoder\.block\.(\d+)\.layer\.(\d)\.(.+)$")
_HF_NAMES = {
    (0, "layer_norm.weight"): "norm1.weight",
    (0, "SelfAttention.q.weight"): "attn.q.weight",
    (0, "SelfAttention.k.weight"): "attn.k.weight",
    (0, "SelfAttention.v.weight"): "attn.v.weight",
    (0, "SelfAttention.o.weight"): "attn.o.weight",
    (0, "SelfAttention.relative_attention_bias.weight"): "pos_embedding.embedding.weight",
    (1, "layer_norm.weight"): "norm2.weight",
    (1, "DenseReluDense.wi_0.weight"): "ffn.gate.0.weight",
    (1, "DenseReluDense.wi_1.weight"): "ffn.fc1.weight",
    (1, "DenseReluDense.wo.weight"): "ffn.fc2.weight",
}


def wan_t5_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map Hugging Face / ComfyUI umT5 encoder keys onto the Wan names; Wan-named dicts pass unchanged."""
    if "token_embedding.weight" in sd:
        return dict(sd)
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k in ("shared.weight", "encoder.embed_tokens.weight"):
            out["token_embedding.weight"] = v
        elif k == "encoder.final_layer_norm.weight":
            out["norm.weight"] = v
        elif (m := _HF_BLOCK.match(k)) and (int(m.group(2)), m.group(3)) in _HF_NAMES:
            out[f"blocks.{m.group(1)}.{_HF_NAMES[(int(m.group(2)), m.group(3))]}"] = v
        else:
            out[k] = v  # left as is: reported as unexpected by the loader
    return out


def infer_t5_config(sd: Mapping[str, torch.Tensor]) -> T5Config:
    """A T5Config from Wan-named encoder tensors (vocab, dims, heads from the position bias, layers)."""
    if "token_embedding.weight" not in sd or "blocks.0.attn.q.weight" not in sd:
        raise KeyError(f"not a umT5 encoder state dict: needs 'token_embedding.weight' and 'blocks.0.attn.q.weight' "
                       f"(first keys: {sorted(sd)[:5]})")
    shared = "pos_embedding.embedding.weight" in sd
    pos = sd["pos_embedding.embedding.weight" if shared else "blocks.0.pos_embedding.embedding.weight"]
    layers = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.")}
    vocab, dim = sd["token_embedding.weight"].shape
    return T5Config(vocab=vocab, dim=dim, dim_attn=sd["blocks.0.attn.q.weight"].shape[0],
                    dim_ffn=sd["blocks.0.ffn.fc1.weight"].shape[0], num_heads=pos.shape[1], num_layers=len(layers),
                    num_buckets=pos.shape[0], shared_pos=shared)


def load_t5_encoder(path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                    config: T5Config | None = None) -> T5Encoder:
    """The umT5 encoder from a safetensors file (Wan or Hugging Face keys); config inferred from shapes."""
    from apt_core.models.io import compare_shapes, describe_mismatch, load_state_dict_file

    sd = load_state_dict_file(path, dtype=dtype)
    scaled = [k for k in sd if k.endswith(("scale_weight", "scale_input"))]
    if scaled or any(t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) for t in sd.values()):
        raise ValueError(f"{path}: fp8 (scaled) text encoder weights are not supported here; use the bf16/fp16 umT5 "
                         f"(e.g. umt5_xxl_fp16.safetensors or the official models_t5_umt5-xxl-enc-bf16.pth converted)")
    sd = {k: v for k, v in wan_t5_keys(sd).items() if not k.startswith("decoder.")}
    config = config or infer_t5_config(sd)
    with torch.device("meta"):  # no random init of billions of weights that are replaced at once
        model = T5Encoder(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected, mismatched = compare_shapes(expected, {k: tuple(v.shape) for k, v in sd.items()})
    if missing or unexpected or mismatched:
        raise ValueError(f"text encoder weights in {path} do not fit a umT5 encoder {config}: "
                         f"{describe_mismatch(missing, unexpected, mismatched)}")
    model.load_state_dict(sd, assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# Tokenizer and the caption -> embedding call
# ----------------------------------------------------------------------------------------------


def clean_caption(text: str) -> str:
    """Wan's `clean='whitespace'`: ftfy.fix_text (if ftfy is installed), HTML entities unescaped, runs of
    whitespace collapsed, stripped."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:  # optional: it only repairs mojibake, which clean captions do not have
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class T5Tokenizer:
    """A sentencepiece model (umT5's `spiece.model`): caption -> ids + [eos], at most text_len."""

    def __init__(self, path: str | os.PathLike, text_len: int = 512) -> None:
        import sentencepiece as spm

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path} (umT5's sentencepiece model, spiece.model)")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{path}: not a sentencepiece model ({e}); give umT5's spiece.model") from e
        if text_len < 1:
            raise ValueError(f"text_len must be >= 1, got {text_len}")
        self.text_len = text_len
        self.eos_id, self.pad_id = self.sp.eos_id(), max(self.sp.pad_id(), 0)
        if self.eos_id < 0:
            raise ValueError(f"{path}: the sentencepiece model has no </s> (eos) piece; umT5's has id 1")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [B, L], mask [B, L]) padded to the longest caption in the batch."""
        seqs = [self.sp.encode(clean_caption(t))[: self.text_len - 1] + [self.eos_id] for t in texts]
        n = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        return ids, mask


class TextEncoder:
    """Captions -> umT5 contexts [L_i, dim] (real tokens only, as Wan's T5EncoderModel returns them)."""

    def __init__(self, model: T5Encoder, tokenizer: T5Tokenizer) -> None:
        if tokenizer.vocab_size > model.config.vocab:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} pieces but the text encoder's vocab is "
                             f"{model.config.vocab}; the tokenizer does not belong to these weights")
        self.model, self.tokenizer = model, tokenizer

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> list[torch.Tensor]:
        """One [L_i, dim] float tensor per caption (L_i = its tokens incl. </s>)."""
        device = self.model.token_embedding.weight.device
        ids, mask = self.tokenizer(texts)
        out = self.model(ids.to(device), mask.to(device))
        return [o[: int(n)].float().cpu() for o, n in zip(out, mask.sum(dim=1))]

    def __call__(self, caption: str) -> torch.Tensor:
        return self.encode([caption])[0]
