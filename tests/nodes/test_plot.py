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
