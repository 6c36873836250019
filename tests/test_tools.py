"""tools/compute_ceiling.py: its bounds are the FLOPs of the compiled program over measured rates."""

import os
import sys

import keras
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools"))

import compute_ceiling  # noqa: E402


def test_weighted_rate_is_total_flops_over_total_time():
    rates = {(2, 3, 4): {"xla": 10.0, "torch": None}, (4, 5, 6): {"xla": 40.0, "torch": 1.0}}
    flops = [2 * 2 * 3 * 4, 2 * 4 * 5 * 6]  # 48 and 240
    seconds = flops[0] / 10e9 + flops[1] / 40e9
    assert compute_ceiling.weighted_rate(rates, "xla") == pytest.approx(sum(flops) / seconds / 1e9)
    assert compute_ceiling.weighted_rate(rates, "torch") is None


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="the tool compiles with JAX")
def test_inference_bound_counts_the_models_matrix_products(capsys):
    batch, size, patch, dim, depth, hidden = 2, 32, 4, 96, 4, 384
    results = compute_ceiling.main(["--model", "tiny", "--batch-size", str(batch), "--image-size",
                                    str(size), "--inference-only", "--repeats", "2"])
    # The products of the tiny ViT, counted by hand: patch embedding, then per block qkv,
    # the attention's two products, the projection and the MLP.
    tokens = 1 + (size // patch) ** 2
    per_block = 2 * tokens * (dim * 3 * dim + dim * dim + 2 * dim * hidden)
    per_block += 2 * 2 * tokens * tokens * dim
    products = batch * (2 * (tokens - 1) * patch * patch * 3 * dim + depth * per_block)
    flops = results["inference"]["flops"]
    # XLA also counts the elementwise work (LayerNorm, GELU, softmax): a little more.
    assert products <= flops <= 1.25 * products
    bound = results["inference"]["bounds"]["XLA"]
    assert bound["s_per_batch"] == pytest.approx(flops / (bound["gflops"] * 1e9))
    assert "images/s" in capsys.readouterr().out
