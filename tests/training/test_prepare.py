"""apt-prepare: real H.264 clips (written with PyAV here) -> shards, bad files reported, resume, refusal to
overwrite, worker-process decoding, and the encoder path (Wan 2.1 VAE encoder + umT5, pure PyTorch) on
tiny random weights saved as real safetensors files, with a sentencepiece tokenizer trained here."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from apt_core.models.io import save_state_dict_file
from apt_core.models.t5 import (
    T5Config,
    T5Encoder,
    T5RelativeEmbedding,
    T5Tokenizer,
    TextEncoder,
    infer_t5_config,
    load_t5_encoder,
)
from apt_core.models.wan_vae import (
    WAN21_LATENT_MEAN,
    WAN21_LATENT_STD,
    WanVAEConfig,
    WanVAEEncoder,
    infer_vae_config,
    load_wan_vae,
)
from apt_core.shards import ShardReader
from training.data import BucketedLoader, ShardDataset, collate
from training.prepare import main, prepare

ROOT = Path(__file__).resolve().parents[2]
TINY_VAE = WanVAEConfig(dim=4, num_res_blocks=1)  # z_dim 16, mults 1,2,4,4, time downsampling False,True,True
CAPTIONS = ["a red ball rolls to the right", "a green ball bounces", "a blue ball drifts across a dark sky"]


# ----------------------------------------------------------------------------------------------
# Media and weights made here
# ----------------------------------------------------------------------------------------------


def moving_ball(n: int, h: int, w: int, seed: int) -> np.ndarray:
    """uint8 [n, h, w, 3]: a coloured disc moving over a gradient (compresses like real footage)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    colour = rng.integers(60, 255, 3)
    out = np.zeros((n, h, w, 3), np.uint8)
    for t in range(n):
        cy, cx = h / 2 + h / 4 * np.sin(t / 5 + seed), w / 4 + t * w / (2 * n)
        out[t, ..., 2] = xx * 127 // w
        out[t][(yy - cy) ** 2 + (xx - cx) ** 2 < (min(h, w) / 5) ** 2] = colour
    return out


def write_h264(path: Path, frames: np.ndarray, fps: int) -> None:
    """Encode frames with PyAV's libx264 into an .mp4."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.height, s.width, s.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def make_media(root: Path) -> Path:
    """3 captioned H.264 clips (2 s at 24 fps, 72x96), a captioned image, an uncaptioned image, a corrupt .mp4."""
    root.mkdir(parents=True)
    for i, caption in enumerate(CAPTIONS):
        write_h264(root / f"clip{i}.mp4", moving_ball(48, 72, 96, i), 24)
        (root / f"clip{i}.txt").write_text(caption)
    Image.fromarray(moving_ball(1, 64, 80, 7)[0]).save(root / "still.png")
    (root / "still.txt").write_text("a still ball")
    Image.fromarray(moving_ball(1, 64, 64, 8)[0]).save(root / "uncaptioned.png")
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x07garbage" * 200)
    (root / "broken.txt").write_text("a broken file")
    return root


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    return make_media(tmp_path_factory.mktemp("prepare") / "media")


def train_tokenizer(path: Path) -> Path:
    """A tiny sentencepiece model with umT5's special ids (pad 0, </s> 1, unk 2)."""
    import sentencepiece as spm

    text = CAPTIONS + ["a still ball", "a broken file", "the quick brown fox jumps over the lazy dog"]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text * 4), model_writer=buf, vocab_size=48,
                                   hard_vocab_limit=False, model_type="unigram", pad_id=0, eos_id=1, unk_id=2,
                                   bos_id=-1, num_threads=1, minloglevel=2)
    path.write_bytes(buf.getvalue())
    return path


def tiny_t5_config(vocab: int) -> T5Config:
    return T5Config(vocab=vocab, dim=32, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=2, num_buckets=32)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    """Tiny random Wan VAE (with decoder keys, like a full file) + umT5 safetensors and a tokenizer."""
    d = tmp_path_factory.mktemp("weights")
    tok = train_tokenizer(d / "spiece.model")
    torch.manual_seed(0)
    vae = WanVAEEncoder(TINY_VAE)
    sd = dict(vae.state_dict())
    sd["decoder.conv1.weight"] = torch.zeros(16, 16, 3, 3, 3)  # a full VAE file also has the decoder
    sd["conv2.weight"] = torch.zeros(16, 16, 1, 1, 1)
    save_state_dict_file(sd, d / "vae.safetensors")
    t5 = T5Encoder(tiny_t5_config(T5Tokenizer(tok).vocab_size))
    save_state_dict_file(t5.state_dict(), d / "t5.safetensors")
    return {"vae": d / "vae.safetensors", "t5": d / "t5.safetensors", "tokenizer": tok}


# ----------------------------------------------------------------------------------------------
# Wan VAE encoder
# ----------------------------------------------------------------------------------------------


def test_vae_module_tree_follows_wan_keys():
    """Key names and shapes of the public WanVAE_ encoder side (dim 96 -> here 8, 2 res blocks as Wan 2.1)."""
    sd = WanVAEEncoder(WanVAEConfig(dim=8, num_res_blocks=2)).state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    expected = {
        "encoder.conv1.weight": (8, 3, 3, 3, 3),
        "encoder.downsamples.0.residual.0.gamma": (8, 1, 1, 1),
        "encoder.downsamples.0.residual.2.weight": (8, 8, 3, 3, 3),
        "encoder.downsamples.0.residual.6.weight": (8, 8, 3, 3, 3),
        "encoder.downsamples.2.resample.1.weight": (8, 8, 3, 3),  # 2d downsample: no time_conv
        "encoder.downsamples.3.shortcut.weight": (16, 8, 1, 1, 1),
        "encoder.downsamples.5.time_conv.weight": (16, 16, 3, 1, 1),
        "encoder.downsamples.8.time_conv.weight": (32, 32, 3, 1, 1),
        "encoder.downsamples.10.residual.6.bias": (32,),
        "encoder.middle.0.residual.0.gamma": (32, 1, 1, 1),
        "encoder.middle.1.norm.gamma": (32, 1, 1),
        "encoder.middle.1.to_qkv.weight": (96, 32, 1, 1),
        "encoder.middle.1.proj.weight": (32, 32, 1, 1),
        "encoder.head.0.gamma": (32, 1, 1, 1),
        "encoder.head.2.weight": (32, 32, 3, 3, 3),
        "conv1.weight": (32, 32, 1, 1, 1),
    }
    assert {k: shapes.get(k) for k in expected} == expected
    assert "encoder.downsamples.2.time_conv.weight" not in shapes and "encoder.downsamples.11.residual.0.gamma" not in shapes
    assert not any(k.startswith(("decoder.", "conv2.")) for k in shapes)
    cfg = infer_vae_config(sd)
    assert (cfg.dim, cfg.z_dim, tuple(cfg.dim_mult), cfg.num_res_blocks, tuple(cfg.temporal_downsample)) == \
        (8, 16, (1, 2, 4, 4), 2, (False, True, True))


def test_full_size_configs_match_public_wan_layout():
    """Default configs = Wan 2.1's VAE (dim 96) and umT5-XXL encoders: tensor counts and parameter totals as
    built by wan/modules/vae.py (WanVAE_ minus decoder/conv2) and t5.py (umt5_xxl encoder) at Wan2.1@9737cba."""
    with torch.device("meta"):
        vae, t5 = WanVAEEncoder(), T5Encoder()
    assert len(vae.state_dict()) == 86 and sum(p.numel() for p in vae.parameters()) == 53_596_928
    assert len(t5.state_dict()) == 242 and sum(p.numel() for p in t5.parameters()) == 5_680_910_336
    assert tuple(vae.state_dict()["encoder.downsamples.8.time_conv.weight"].shape) == (384, 384, 3, 1, 1)
    assert tuple(t5.state_dict()["blocks.23.pos_embedding.embedding.weight"].shape) == (32, 64)


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_vae_encode_shape_chunked_and_causal(frames):
    """F frames -> 1 + (F-1)/4 latent frames, H/8, W/8, 16 channels; the chunked (memory-bounded) encode equals
    the whole-clip one; later frames never change earlier latents; output normalised by Wan's mean/std."""
    torch.manual_seed(1)
    vae = WanVAEEncoder(TINY_VAE).eval()
    x = torch.rand(1, 3, frames, 32, 48) * 2 - 1
    z = vae.encode(x)
    assert z.shape == (1, 16, 1 + (frames - 1) // 4, 4, 6)
    torch.testing.assert_close(z, vae.encode(x, chunked=False), atol=1e-5, rtol=1e-5)
    mean, std = torch.tensor(WAN21_LATENT_MEAN).view(1, 16, 1, 1, 1), torch.tensor(WAN21_LATENT_STD).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(z, (vae.encode_mean(x) - mean) / std)
    if frames > 1:
        y = x.clone()
        y[:, :, -1] = -y[:, :, -1]
        zy = vae.encode(y)
        torch.testing.assert_close(zy[:, :, :-1], z[:, :, :-1])
        assert not torch.allclose(zy[:, :, -1], z[:, :, -1])


def test_vae_rejects_bad_input_and_bad_weights(tmp_path, weights):
    vae = load_wan_vae(weights["vae"])
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        vae.encode(torch.zeros(1, 3, 4, 32, 32))
    with pytest.raises(ValueError, match="multiple of 8"):
        vae.encode(torch.zeros(1, 3, 1, 36, 32))
    sd = dict(WanVAEEncoder(TINY_VAE).state_dict())
    sd["encoder.middle.1.proj.weight"] = torch.zeros(5, 32, 1, 1)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="encoder.middle.1.proj.weight"):
        load_wan_vae(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="only .safetensors"):
        load_wan_vae(tmp_path / "vae.pth")


# ----------------------------------------------------------------------------------------------
# umT5 encoder and tokenizer
# ----------------------------------------------------------------------------------------------


def test_t5_module_tree_follows_wan_keys():
    sd = T5Encoder(tiny_t5_config(48)).state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    per_block = {"norm1.weight": (32,), "attn.q.weight": (32, 32), "attn.k.weight": (32, 32), "attn.v.weight": (32, 32),
                 "attn.o.weight": (32, 32), "norm2.weight": (32,), "ffn.gate.0.weight": (64, 32),
                 "ffn.fc1.weight": (64, 32), "ffn.fc2.weight": (32, 64), "pos_embedding.embedding.weight": (32, 4)}
    expected = {"token_embedding.weight": (48, 32), "norm.weight": (32,)}
    expected.update({f"blocks.{i}.{k}": v for i in range(2) for k, v in per_block.items()})
    assert shapes == expected
    assert infer_t5_config(sd) == tiny_t5_config(48)
    assert T5Config() == T5Config(vocab=256384, dim=4096, dim_attn=4096, dim_ffn=10240, num_heads=64, num_layers=24,
                                  num_buckets=32, shared_pos=False)  # umt5_xxl in wan/modules/t5.py


def test_t5_relative_position_buckets():
    """T5's bidirectional bucketing: 0 -> 0, -k -> k (exact below 8), +k -> 16 + k, far -> the last log bucket."""
    emb = T5RelativeEmbedding(32, 1)
    rel = torch.tensor([0, 1, -1, 7, -7, 8, 200, -200, 127, 128])
    assert emb._bucket(rel).tolist() == [0, 17, 1, 23, 7, 24, 31, 15, 31, 31]


def test_t5_tokenizer_and_encoder(tmp_path, weights):
    tok = T5Tokenizer(weights["tokenizer"], text_len=6)
    ids, mask = tok(["a  green\tball bounces over the lazy dog", "a"])
    assert ids.shape == (2, 6) and ids[0, -1] == tok.eos_id == 1 and mask[0].all()
    assert mask[1].tolist() == [1, 1, 0, 0, 0, 0] and ids[1, 1] == 1 and ids[1, 2:].eq(0).all()
    enc = TextEncoder(load_t5_encoder(weights["t5"]), T5Tokenizer(weights["tokenizer"]))
    a, b = enc.encode(["a green ball bounces", "a still ball"])
    assert a.shape[1] == 32 and a.shape[0] == len(enc.tokenizer.sp.encode("a green ball bounces")) + 1
    torch.testing.assert_close(enc("a still ball"), b, atol=1e-5, rtol=1e-5)  # padding in a batch changes nothing
    assert torch.isfinite(a).all() and not torch.allclose(a[0], b[0])


def test_t5_loads_hugging_face_key_names(tmp_path, weights):
    """The same weights under Hugging Face / ComfyUI umT5 names give the same embeddings."""
    sd = load_t5_encoder(weights["t5"]).state_dict()
    hf = {"shared.weight": sd["token_embedding.weight"], "encoder.final_layer_norm.weight": sd["norm.weight"]}
    names = {"norm1.weight": "0.layer_norm.weight", "attn.q.weight": "0.SelfAttention.q.weight",
             "attn.k.weight": "0.SelfAttention.k.weight", "attn.v.weight": "0.SelfAttention.v.weight",
             "attn.o.weight": "0.SelfAttention.o.weight",
             "pos_embedding.embedding.weight": "0.SelfAttention.relative_attention_bias.weight",
             "norm2.weight": "1.layer_norm.weight", "ffn.gate.0.weight": "1.DenseReluDense.wi_0.weight",
             "ffn.fc1.weight": "1.DenseReluDense.wi_1.weight", "ffn.fc2.weight": "1.DenseReluDense.wo.weight"}
    for i in range(2):
        hf.update({f"encoder.block.{i}.layer.{v}": sd[f"blocks.{i}.{k}"] for k, v in names.items()})
    save_file({k: v.contiguous() for k, v in hf.items()}, str(tmp_path / "hf.safetensors"))
    tok = T5Tokenizer(weights["tokenizer"])
    a = TextEncoder(load_t5_encoder(tmp_path / "hf.safetensors"), tok)("a red ball rolls")
    torch.testing.assert_close(a, TextEncoder(load_t5_encoder(weights["t5"]), tok)("a red ball rolls"))


# ----------------------------------------------------------------------------------------------
# The tool on real clips
# ----------------------------------------------------------------------------------------------

PIXEL_ARGS = ["--size", "32x32", "--num-frames", "9", "--fps", "8", "--text-dim", "32", "--text-len", "16",
              "--samples-per-shard", "2", "--no-progress"]


def read_report(out: Path) -> dict:
    return json.loads((out / "prepare-report-00000.json").read_text())


def test_pixels_report_workers_resume_and_refusal(media, tmp_path, capsys):
    out = tmp_path / "pixels"
    assert main([str(media), str(out), *PIXEL_ARGS, "--num-workers", "2"]) == 0
    printed = capsys.readouterr().out
    report = read_report(out)
    skipped = {(e["reason"], Path(e["path"]).name) for e in report["skipped"]}
    assert skipped == {("corrupt", "broken.mp4"), ("missing_caption", "uncaptioned.png")}
    assert "broken.mp4" in printed and "uncaptioned.png" in printed
    assert report["complete"] and report["written"] == 4 and report["already_there"] == 0
    reader = ShardReader(out, require_complete=True)
    assert reader.metadata["space"] == "pixels" and reader.metadata["value_range"] == [-1, 1]
    by_source = {Path(reader[i].source).name: reader[i] for i in range(len(reader))}
    assert sorted(by_source) == ["clip0.mp4", "clip1.mp4", "clip2.mp4", "still.png"]
    clip = by_source["clip1.mp4"]
    assert clip.latent.shape == (3, 9, 32, 32) and by_source["still.png"].latent.shape == (3, 1, 32, 32)
    assert clip.latent.dtype == torch.float16 and -1 <= clip.latent.min() < clip.latent.max() <= 1
    assert clip.frame_indices == [0, 3, 6, 9, 12, 15, 18, 21, 24] and clip.fps == 8.0  # 24 fps source at 8 fps
    assert clip.caption == CAPTIONS[1] and clip.text_emb.shape == (len(CAPTIONS[1].split()) + 1, 32)
    # same as decoding in this process (workers change nothing)
    assert main([str(media), str(tmp_path / "serial"), *PIXEL_ARGS]) == 0
    serial = ShardReader(tmp_path / "serial")
    assert [serial[i].source for i in range(4)] == [reader[i].source for i in range(4)]
    assert all(torch.equal(serial[i].latent, reader[i].latent) for i in range(4))

    # a re-run skips what is there
    assert main([str(media), str(out), *PIXEL_ARGS]) == 0
    again = read_report(out)
    assert again["written"] == 0 and again["already_there"] == 4 and len(ShardReader(out)) == 4

    # other settings on the same output: refused, files untouched; --overwrite replaces
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.glob("shard-*"))
    assert main([str(media), str(out), *PIXEL_ARGS, "--size", "16x16"]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "size: [32, 32] there, [16, 16] now" in err
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.glob("shard-*")) == before
    assert main([str(media), str(out), *PIXEL_ARGS, "--size", "16x16", "--overwrite"]) == 0
    assert ShardReader(out)[0].latent.shape[-2:] == (16, 16)

    # a folder of someone else's files is never written into
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"x")
    assert main([str(media), str(other), *PIXEL_ARGS]) == 2
    assert sorted(p.name for p in other.iterdir()) == ["holiday.jpg"]


def test_interrupted_run_continues(media, tmp_path):
    """An interruption after 2 files keeps them (index part incomplete); the re-run adds only the rest."""
    out = tmp_path / "interrupted"
    args = __import__("training.prepare", fromlist=["build_parser"]).build_parser().parse_args(
        [str(media), str(out), *PIXEL_ARGS, "--samples-per-shard", "3"])

    def stop_after_two(n: int) -> None:
        if n == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare(args, on_item=stop_after_two)
    part = json.loads((out / "dataset-00000.json").read_text())
    assert part["complete"] is False and part["num_samples"] == 2  # flushed on the way out, not lost
    assert read_report(out)["complete"] is False
    result = prepare(args)
    assert result.written == 2 and result.already == 2
    reader = ShardReader(out, require_complete=True)
    sources = sorted(Path(reader[i].source).name for i in range(len(reader)))
    assert sources == ["clip0.mp4", "clip1.mp4", "clip2.mp4", "still.png"]


def test_sigterm_keeps_encoded_samples_and_rerun_finishes(media, tmp_path):
    """SIGTERM (a cluster's kill) mid-run: exit code 1, shards flushed; the same command again completes."""
    many = tmp_path / "many"
    many.mkdir()
    count = 40  # enough that the run is still encoding when the signal comes, even on a loaded machine
    for i in range(count):
        shutil.copy(media / "clip0.mp4", many / f"c{i:02d}.mp4")
        (many / f"c{i:02d}.txt").write_text(f"clip {i}")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "training.prepare", str(many), str(out), *PIXEL_ARGS, "--samples-per-shard", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "shard-00000-000001.safetensors").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "apt-prepare ended before the signal could be sent: use more clips"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-2000:]
    assert "Run the same command again" in err
    part = json.loads((out / "dataset-00000.json").read_text())
    assert part["complete"] is False and 1 <= part["num_samples"] < count  # the signal may fall between a shard and its index update
    assert subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=300).returncode == 0
    reader = ShardReader(out, require_complete=True)
    assert sorted(Path(reader[i].source).name for i in range(len(reader))) == [f"c{i:02d}.mp4" for i in range(count)]


def test_encoders_path_and_one_training_step(media, weights, tmp_path):
    """--vae/--text-encoder on tiny random weights: [16, 1 + (F-1)/4, H/8, W/8] latents, umT5 contexts; the
    shards load with training.data and `python -m training` trains a step on configs/tiny_cpu.toml."""
    out = tmp_path / "latents"
    rc = main([str(media), str(out), "--size", "32x32", "--num-frames", "5", "--fps", "8", "--vae", str(weights["vae"]),
               "--text-encoder", str(weights["t5"]), "--tokenizer", str(weights["tokenizer"]), "--text-len", "16",
               "--no-progress"])
    assert rc == 0
    ds = ShardDataset(out, require_complete=True)
    assert ds.metadata["space"] == "latent" and ds.metadata["latent_norm"]["std"] == list(WAN21_LATENT_STD)
    assert sorted(map(tuple, ds.shapes)) == [(16, 1, 4, 4)] + [(16, 2, 4, 4)] * 3
    sample = next(ds[i] for i in range(len(ds)) if ds[i].source.endswith("clip2.mp4"))
    tok = T5Tokenizer(weights["tokenizer"])
    assert sample.text_emb.shape == (min(16, len(tok.sp.encode(CAPTIONS[2])) + 1), 32) and sample.text_emb.dtype == torch.bfloat16
    assert torch.isfinite(sample.latent.float()).all()
    batch = next(iter(BucketedLoader(ds, batch_size=2)))
    assert batch.latent.shape == (2, 16, 2, 4, 4) and batch.text_emb.shape[-1] == 32

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "training", "--config", str(ROOT / "configs/tiny_cpu.toml"), f"--data.path={out}",
           f"--run.dir={run}", "--apt.image.steps=1", "--apt.video.steps=0", "--monitor.val_every=0",
           "--checkpoint.every=1"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("step") == 1 for m in metrics)


def test_image_latent_is_the_vae_latent_of_the_first_frame_and_grey_frames(media, weights, tmp_path, capsys):
    """--image-latent: each sample's image_latent is the VAE's encoding of condition_video (first frame, then mid-grey)
    of that clip, as Wan 2.1 I2V encodes it; it needs --vae, and an output made without it is not continued with it."""
    from apt_core.media import DecodeConfig
    from apt_core.media_scan import DecodeReport, iter_decoded, scan_media_folder
    from apt_core.models.wan21_i2v import condition_video

    out = tmp_path / "i2v"
    args = [str(media), str(out), "--size", "32x32", "--num-frames", "5", "--fps", "8", "--vae", str(weights["vae"]),
            "--text-dim", "32", "--text-len", "16", "--no-progress"]
    assert main([*args, "--image-latent"]) == 0
    reader = ShardReader(out, require_complete=True)
    assert reader.metadata["image_latent"].startswith("wan2.1-i2v")
    vae = load_wan_vae(weights["vae"]).eval()
    items, _ = scan_media_folder(media.resolve(), "error")
    clips = {str(c.item.path): c for c in iter_decoded(items, DecodeConfig(fps=8, num_frames=5, size=(32, 32)),
                                                       DecodeReport(title="decode"))}
    assert len(reader) == 4
    for i in range(len(reader)):
        s = reader[i]
        frames = clips[s.source].frames
        first = frames[:1].permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0
        want = vae.encode(condition_video(first, frames.shape[0]))[0]
        assert s.image_latent.shape == s.latent.shape and s.image_latent.dtype == s.latent.dtype == torch.bfloat16
        torch.testing.assert_close(s.image_latent.float(), want.to(torch.bfloat16).float(), rtol=0, atol=0)
        torch.testing.assert_close(s.image_latent[:, :1], s.latent[:, :1], rtol=0, atol=0)  # causal: same first frame
        if frames.shape[0] > 1:  # the grey frames' latent, not the clip's later frames nor zeros
            assert (s.image_latent[:, 1:].float() - s.latent[:, 1:].float()).abs().max() > 1e-3
            assert s.image_latent[:, 1:].float().abs().mean() > 0.1
    batch = collate([ShardDataset(out)[i] for i in range(len(reader)) if reader.shapes[i][1] == 2])
    assert batch.image_latent.shape == batch.latent.shape == (3, 16, 2, 4, 4)
    # continuing that output without --image-latent is refused (other settings); --image-latent needs --vae
    assert main(args) == 2
    assert "image_latent: 'wan2.1-i2v" in capsys.readouterr().err
    assert main([str(media), str(tmp_path / "px"), *PIXEL_ARGS, "--image-latent"]) == 2
    assert "--image-latent needs --vae" in capsys.readouterr().err
