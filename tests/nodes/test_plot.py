"""The metrics plot renders with matplotlib Agg into a ComfyUI IMAGE tensor."""

import torch

from nodes.plot import render_metrics


def test_render_metrics_is_an_image_with_the_curves():
    hist = {"d_loss": [(i, 1.0 / i) for i in range(1, 20)], "g_loss": [(i, 0.1 * i) for i in range(1, 20)], "ar1": []}
    img = render_metrics(hist, "APT", groups=[["d_loss", "g_loss"], ["ar1"]])
    assert img.shape[0] == 1 and img.shape[-1] == 3 and img.dtype == torch.float32
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    # one panel (ar1 is empty and dropped): 260 px high at the default size; plotted lines are coloured pixels
    assert img.shape[1:3] == (260, 800)
    rgb = img[0]
    coloured = ((rgb.max(-1).values - rgb.min(-1).values) > 0.3).sum()
    assert coloured > 200
    blank = render_metrics({})
    assert ((blank[0].max(-1).values - blank[0].min(-1).values) > 0.3).sum() < coloured


def test_metrics_history_from_the_runners_metrics_file(tmp_path):
    """The plot reads what the runner writes (training.monitor.MetricsLogger): metric rows, validation
    events' numbers; a resumed run's rewritten steps replace the earlier ones; other events and nulls are skipped."""
    from nodes.plot import metrics_history, read_metrics
    from training.distributed import World
    from training.monitor import MetricsLogger

    world = World(0, 1, 0, torch.device("cpu"), "gloo")
    log = MetricsLogger(tmp_path, world, 4, log_every=2, progress=False)
    for step in (1, 2, 3):
        log.log(step, {"d_loss": torch.tensor(1.0 * step), "g_loss": torch.tensor(float("nan") if step == 2 else 0.5)}, "image")
    log.event(3, "validation", "samples", val_std=0.7, val_diversity=0.2, val_finite=True, val_dir="x")
    log.event(3, "checkpoint", "saved", checkpoint="c")
    log.close()
    resumed = MetricsLogger(tmp_path, world, 4, log_every=1, progress=False, start_step=2)  # resumed from step 2
    for step in (3, 4):
        resumed.log(step, {"d_loss": torch.tensor(10.0 * step), "g_loss": torch.tensor(0.25)}, "image")
    resumed.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "d_lo')  # a torn last line (the process was killed while writing)
    h = metrics_history(read_metrics(tmp_path / "metrics.jsonl"))
    assert h["d_loss"] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    assert h["g_loss"] == [(1, 0.5), (3, 0.25), (4, 0.25)]  # step 2's NaN was written as null
    assert h["val_std"] == [(3, 0.7)] and h["val_diversity"] == [(3, 0.2)]
    assert not {"it_s", "peak_mem_gib", "val_finite", "checkpoint", "step"} & set(h)
    assert metrics_history(read_metrics(tmp_path / "missing.jsonl")) == {}
    img = render_metrics(h, "APT", [["d_loss", "g_loss"], ["val_std", "val_diversity"]])
    assert img.shape == (1, 520, 800, 3)
