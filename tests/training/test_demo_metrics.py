"""The digits demo's data, text encoder, classifiers and metrics (real sklearn digits, committed assets)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.demo import digits, text
from training.demo.classifier import accuracy, load_classifier
from training.demo.metrics import (
    Evaluator,
    class_matched_real,
    diversity,
    frechet_distance,
    identity_agreement,
    motion_stats,
    precision_recall,
    time_per_sample,
)


@pytest.fixture(scope="module")
def image_eval():
    return Evaluator(digits.load_split("test", frames=1))


@pytest.fixture(scope="module")
def video_eval():
    return Evaluator(digits.load_split("test", frames=digits.FRAMES))


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    k = torch.exp(-torch.arange(-2, 3).float() ** 2 / (2 * sigma**2))
    k = k / k.sum()
    n, c, f, h, w = x.shape
    y = F.pad(x.transpose(1, 2).reshape(n * f, 1, h, w), (2, 2, 2, 2), value=-1)
    y = F.conv2d(F.conv2d(y, k.view(1, 1, 1, 5)), k.view(1, 1, 5, 1))
    return y.view(n, f, 1, h, w).transpose(1, 2)


# -------------------------------------------------------------------------------------------- data


def test_splits_are_disjoint_stratified_and_deterministic():
    _, labels = digits.load_raw()
    s = digits.split_indices(labels)
    assert len(labels) == 1797
    assert sum(len(v) for v in s.values()) == 1797
    assert len(set(s["train"]) | set(s["val"]) | set(s["test"])) == 1797
    for c in range(10):
        frac = (labels[s["test"]] == c).sum() / (labels == c).sum()
        assert 0.18 < frac < 0.22
    assert all((a == b).all() for a, b in zip(s.values(), digits.split_indices(labels).values()))


def test_videos_bounce_inside_the_canvas_and_match_their_captions():
    v = digits.load_split("val", frames=5)
    assert v.pixels.shape == (len(v), 1, 5, 16, 16)
    assert v.pixels.min() >= -1 and v.pixels.max() <= 1
    assert (v.offsets >= 0).all() and (v.offsets <= digits.MAX_OFFSET).all()
    steps = (v.offsets[:, 1:] - v.offsets[:, :-1]).abs().sum(-1)
    assert (steps == 1).all()  # one pixel per frame along one axis
    assert (digits.direction_of(v.offsets) == v.directions).all()
    for cap, lab, d in zip(v.captions, v.labels, v.directions):
        assert cap == f"a {text.DIGIT_WORDS[lab]} moving {text.DIRECTIONS[d]}"
    assert len(set(v.directions.tolist())) == 4
    bounced = ((v.offsets[:, 2:] - v.offsets[:, 1:-1]) != (v.offsets[:, 1:-1] - v.offsets[:, :-2])).any(-1).any(-1)
    assert 0.2 < bounced.float().mean() < 0.9
    # same seed, same clips
    assert torch.equal(v.pixels, digits.load_split("val", frames=5).pixels)


def test_bounce_track_reflects():
    assert digits.bounce_track(2, 1, 5) == [2, 3, 4, 3, 2]
    assert digits.bounce_track(1, -1, 5) == [1, 0, 1, 2, 3]


# -------------------------------------------------------------------------------------------- text


def test_committed_tokenizer_and_encoder_are_reproducible():
    assert text.TOKENIZER_PATH.read_bytes() == text.train_tokenizer()
    from safetensors.torch import load_file

    committed = load_file(str(text.ENCODER_PATH))
    rebuilt = text.TextEncoder(len(committed["embed.weight"])).state_dict()
    assert committed.keys() == rebuilt.keys()
    assert all(torch.equal(committed[k], rebuilt[k]) for k in committed)


def test_caption_embeddings_are_distinct_and_empty_is_null():
    emb = text.CaptionEmbedder()
    caps = text.all_captions()
    ctx, lengths = emb(caps + [""])
    assert ctx.shape == (len(caps) + 1, text.TEXT_LEN, text.TEXT_DIM)
    assert lengths[-1] == 0 and torch.count_nonzero(ctx[-1]) == 0
    assert lengths[0] == 2 and lengths[10] == 6  # "a zero", "a zero moving to the left"
    assert torch.count_nonzero(ctx[0, 2:]) == 0  # zero past the length
    flat = ctx[:-1].flatten(1)
    d = torch.cdist(flat, flat) + torch.eye(len(caps)) * 1e9
    assert d.min() > 1.0
    with pytest.raises(ValueError, match="text_len"):
        emb(["a seven moving to the left a seven moving"])


# ------------------------------------------------------------------------------------- classifier


def test_committed_classifiers_are_accurate_on_the_test_split():
    assert accuracy(load_classifier(1), digits.load_split("test"))["digit"] >= 0.97
    acc = accuracy(load_classifier(5), digits.load_split("test", frames=5))
    assert acc["digit"] >= 0.95 and acc["direction"] >= 0.99


# ----------------------------------------------------------------------------------------- metrics


def test_frechet_distance_matches_scipy_and_closed_form():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 6, generator=g).double()
    b = (torch.randn(400, 6, generator=g) * 1.5 + 0.3).double() @ torch.randn(6, 6, generator=g).double()
    sa, sb = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum().item() + np.trace(sa + sb - 2 * scipy_linalg.sqrtm(sa @ sb).real)
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    # diagonal Gaussians: |mu1 - mu2|^2 + sum (s1 - s2)^2 (features whitened so sample stats are exact)
    z = torch.randn(1000, 3, generator=g).double()
    z = (z - z.mean(0)) @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T))).T
    s1, s2, mu = torch.tensor([1.0, 2.0, 3.0]).double(), torch.tensor([2.0, 2.0, 1.0]).double(), torch.tensor([1.0, 0, 0]).double()
    assert frechet_distance(z * s1, z * s2 + mu) == pytest.approx(1.0 + 1.0 + 0.0 + 4.0, rel=1e-6)
    with pytest.raises(ValueError, match="feature arrays"):
        frechet_distance(a, b[:, :3])


def _ranking(ev: Evaluator, seed: int) -> dict[str, float]:
    real = class_matched_real(ev.reference, ev.frames, seed=seed)
    g = torch.Generator().manual_seed(seed)
    x, lab = real.pixels, real.labels
    missing = x.clone()  # every "zero" replaced by a random other digit: one class missing
    keep, drop = (lab != 0).nonzero()[:, 0], (lab == 0).nonzero()[:, 0]
    missing[drop] = x[keep[torch.randint(len(keep), (len(drop),), generator=g)]]
    cases = {
        "real": x,
        "slightly noised": (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(-1, 1),
        "blurred": _blur(x, 0.45),
        "one class missing": missing,
        "noise": torch.randn(x.shape, generator=g).clamp(-1, 1),
    }
    return {k: frechet_distance(ev.features(v), ev.ref_feats) for k, v in cases.items()}


@pytest.mark.parametrize("kind", ["image", "video"])
def test_frechet_distance_ranks_degradations(kind, image_eval, video_eval):
    ev = image_eval if kind == "image" else video_eval
    runs = [_ranking(ev, s) for s in (1, 2)]
    fd = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
    order = list(fd)
    for lo, hi in zip(order, order[1:]):
        assert fd[lo] < fd[hi], f"{kind}: FD({lo})={fd[lo]:.1f} should be below FD({hi})={fd[hi]:.1f} ({fd})"
    assert fd["noise"] > 10 * fd["real"]


def test_precision_recall_sanity():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(300, 4, generator=g)
    p, r = precision_recall(real, real.clone())
    assert p == 1.0 and r == 1.0
    p, r = precision_recall(real, real[real[:, 0] > 1.0] + 0.0)  # one corner of the data: precise, low recall
    assert p == 1.0 and r < 0.4
    p, r = precision_recall(real, torch.randn(300, 4, generator=g) + 20)
    assert p == 0.0 and r == 0.0
    p, r = precision_recall(real, torch.randn(300, 4, generator=g) * 3)  # spread too wide: recall ok, precision low
    assert r > 0.8 and p < 0.6


def test_caption_accuracy_diversity_and_collapse(image_eval):
    real = class_matched_real(image_eval.reference, 1, seed=3)
    m = image_eval.evaluate(real.pixels, real.labels)
    assert m["caption_accuracy"] >= 0.97 and 0.85 < m["diversity"] < 1.15
    assert m["precision"] > 0.85 and m["recall"] > 0.85
    wrong = image_eval.evaluate(real.pixels, (real.labels + 1) % 10)
    assert wrong["caption_accuracy"] < 0.1
    assert wrong["fd"] == pytest.approx(m["fd"])  # FD does not look at captions
    # one sample per digit repeated: accurate captions, no diversity, poor recall
    first = torch.stack([(real.labels == c).nonzero()[0, 0] for c in range(10)])
    collapsed = real.pixels[first[real.labels]]
    c = image_eval.evaluate(collapsed, real.labels)
    assert c["caption_accuracy"] >= 0.9 and c["diversity"] < 0.05 and c["recall"] < 0.2
    assert c["fd"] > 2 * m["fd"]
    assert diversity(torch.ones(4, 2), torch.tensor([0, 0, 1, 1]), torch.randn(4, 2), torch.tensor([0, 0, 1, 1])) == 0.0


def test_identity_agreement_and_motion(video_eval):
    assert identity_agreement(torch.tensor([[1, 1, 1, 2, 1], [3, 3, 3, 3, 3]])) == pytest.approx(0.9)
    real = class_matched_real(video_eval.reference, 5, seed=3)
    m = video_eval.evaluate(real.pixels, real.labels, real.directions)
    assert m["identity_agreement"] > 0.97 and m["direction_accuracy"] > 0.99
    assert m["speed"] == pytest.approx(1.0, abs=1e-3)  # the digit moves exactly one pixel per frame
    assert 0.2 < m["jerk"] < 1.0  # bounces
    # frames taken from different clips: identity breaks, motion becomes erratic
    g = torch.Generator().manual_seed(0)
    perms = [torch.randperm(len(real), generator=g) for _ in range(5)]
    mixed = torch.stack([real.pixels[perms[j], :, j] for j in range(5)], dim=2)  # [N, 1, 5, 16, 16]
    bad = video_eval.evaluate(mixed, real.labels, real.directions)
    assert bad["identity_agreement"] < 0.6 and bad["jerk"] > 2 * m["jerk"] and bad["direction_accuracy"] < 0.5
    static = real.pixels[:, :, :1].expand(-1, -1, 5, -1, -1)
    assert motion_stats(static) == {"jerk": pytest.approx(0.0, abs=1e-9), "speed": pytest.approx(0.0, abs=1e-9)}
    with pytest.raises(ValueError, match="does not match reference"):
        video_eval.evaluate(real.pixels[:, :, :1], real.labels)


def test_real_floor_is_below_every_degradation(image_eval):
    floor = image_eval.real_floor(seed=5)
    assert floor["fd"] < _ranking(image_eval, 5)["slightly noised"] + 10
    assert floor["caption_accuracy"] > 0.97


def test_time_per_sample_counts_per_sample():
    import time

    assert time_per_sample(lambda: time.sleep(0.02), batch=4, repeats=2) == pytest.approx(0.005, rel=0.5)
