"""The position-grid resampling matches PyTorch's F.interpolate in each release's mode."""

import numpy as np
import pytest
from conftest import to_numpy

from keras_dinov2.layers.interpolation import bicubic_matrix, resample_grid

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _torch_reference(grid, height, width, mode):
    t = torch.from_numpy(grid).permute(2, 0, 1)[None]
    m = grid.shape[0]
    if mode == "original":
        out = F.interpolate(
            t, scale_factor=((height + 0.1) / m, (width + 0.1) / m), mode="bicubic",
            antialias=False,
        )
    elif mode == "registers":
        out = F.interpolate(t, size=(height, width), mode="bicubic", antialias=True)
    else:
        out = F.interpolate(t, size=(height, width), mode="bicubic", align_corners=False)
    return out[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize("mode", ["original", "registers", "transformers"])
@pytest.mark.parametrize(
    "side,height,width",
    [(16, 7, 7), (16, 16, 16), (37, 16, 16), (37, 7, 11), (5, 9, 13), (8, 4, 12), (37, 40, 33)],
)
def test_resample_matches_torch(mode, side, height, width):
    grid = np.random.default_rng(side * height + width).normal(size=(side, side, 6))
    grid = grid.astype("float32")
    ours = to_numpy(resample_grid(grid, height, width, mode))
    # float32 source coordinates may round differently from PyTorch's by one ulp, which the
    # cubic weights amplify to ~1e-5 on unit-variance grids.
    np.testing.assert_allclose(ours, _torch_reference(grid, height, width, mode), atol=3e-5)


def test_modes_differ_when_downsampling():
    grid = np.random.default_rng(0).normal(size=(16, 16, 4)).astype("float32")
    outs = {m: to_numpy(resample_grid(grid, 7, 7, m)) for m in ("original", "registers",
                                                                 "transformers")}
    assert np.abs(outs["original"] - outs["transformers"]).max() > 1e-2
    assert np.abs(outs["registers"] - outs["transformers"]).max() > 1e-2


def test_antialiased_rows_sum_to_one():
    weights = to_numpy(bicubic_matrix(37, 7, antialias=True))
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-6)
    # Downsampling by 37/7 widens the support: each output reads more than four inputs.
    assert (np.count_nonzero(weights, axis=1) > 4).all()


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="interpolation"):
        resample_grid(np.zeros((4, 4, 2), "float32"), 2, 2, "bilinear")


@pytest.mark.parametrize("mode", ["original", "registers", "transformers"])
@pytest.mark.parametrize("side,out", [(16, 7), (37, 16), (5, 13), (8, 8)])
def test_known_sizes_use_cached_numpy_matrices_equal_to_the_traced_formulas(mode, side, out):
    # Python-int sizes take the NumPy constants; tensor sizes run the keras.ops formulas (the traced path).
    from keras import ops

    grid = np.random.default_rng(side).normal(size=(side, side, 3)).astype("float32")
    size = ops.convert_to_tensor(out, "int32")
    traced = to_numpy(resample_grid(grid, size, size, mode))
    constant = to_numpy(resample_grid(grid, out, out, mode))
    # "transformers": the same float32 formulas, equal. "registers": up to the antialiased rows' normalizing sums
    # (NumPy's and the backends' summation orders), an ulp. "original": a traced size's step is computed in float32,
    # a known size's in float64 as PyTorch does, which the cubic weights amplify to ~1e-5.
    np.testing.assert_allclose(constant, traced, rtol=1e-6, atol=3e-5 if mode == "original" else 1e-6)
    if mode == "transformers":
        np.testing.assert_array_equal(constant, traced)
    np.testing.assert_allclose(constant, _torch_reference(grid, out, out, mode), atol=3e-5)
