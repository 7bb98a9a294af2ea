"""bench.optimizer_state: the optimiser-state bytes it reports are real states after a real step."""

from bench.optimizer_state import measure


def test_rmsprop_keeps_half_the_state_of_the_adam_it_replaced():
    out = measure("tiny")
    for name in ("generator", "discriminator"):
        row = out[name]
        assert row["trainable_params"] > 0
        assert row["rmsprop_state_bytes"] == row["param_bytes_fp32"]  # square_avg only
        assert row["adam_beta1_0_state_bytes"] == 2 * row["param_bytes_fp32"]  # + the unused exp_avg
    assert out["saved_bytes"] == out["generator"]["param_bytes_fp32"] + out["discriminator"]["param_bytes_fp32"]
