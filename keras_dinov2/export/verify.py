"""Export-time verification: the exported model, loaded back, against the source backbone.

Every format is checked on one probe batch at two square sizes: the size the position table is
stored for (no resampling anywhere) and an interpolated size (every loader resamples the table).
A check is *exact* when the loader resamples with the same rule as the source backbone; exact
checks must agree to the tolerance or the export fails with `ExportVerificationError`. Checks
that cannot be exact (for example the first release's 0.1-offset rule in transformers) are
measured and printed, with the reason, but do not fail.
"""

import dataclasses
import json

import keras
import numpy as np


class ExportVerificationError(RuntimeError):
    """An exported model, loaded back through its own loader, does not reproduce the source."""


class ExportWarning(UserWarning):
    """The export is correct but some format cannot reproduce the source at every input size."""


# What each interpolation rule is called in words, for messages and model cards.
MODE_WORDS = {
    "original": "first-release rule (bicubic with a 0.1 scale offset, no antialias)",
    "registers": "registers-release rule (antialiased bicubic, no offset)",
    "transformers": "transformers Dinov2Model rule (bicubic, no offset, no antialias)",
}


def probe_sizes(backbone):
    """The two square probe sizes: the stored (native) size and an interpolated one.

    The interpolated size is two patches smaller than the native one when the native grid has
    at least six patches a side (cheap for 518 px models), else two patches larger.

    Example:
    >>> probe_sizes(DINOv2Backbone.from_preset("dinov2_vit_tiny4", load_weights=False))
    (32, 24)
    """
    native = int(backbone.image_size)
    patch = int(backbone.patch_size)
    grid = native // patch
    other = native - 2 * patch if grid >= 6 else native + 2 * patch
    return native, other


def probe_batch(size, batch=2, seed=0):
    """A deterministic batch of normalized-looking images (B, size, size, 3), float32."""
    rng = np.random.default_rng(seed + size)
    return rng.standard_normal((batch, size, size, 3)).astype("float32")


# Under JAX, eager calls compile every operation separately at each new input size (over a
# hundred small XLA compilations). One jitted stateless call per architecture serves every model
# of that architecture (the source and each reloaded copy), with the weights as arguments.
_JAX_FUNCTIONS = {}


def _jax_forward(model, inputs):
    import jax

    config = {k: v for k, v in model.get_config().items() if k != "name"}
    key = (type(model).__module__, type(model).__name__,
           json.dumps(config, sort_keys=True, default=str))
    if key not in _JAX_FUNCTIONS:
        if len(_JAX_FUNCTIONS) > 8:
            _JAX_FUNCTIONS.clear()
        template = model
        _JAX_FUNCTIONS[key] = jax.jit(
            lambda trainable, fixed, x: template.stateless_call(trainable, fixed, x,
                                                                training=False)[0])
    return _JAX_FUNCTIONS[key]([v.value for v in model.trainable_variables],
                               [v.value for v in model.non_trainable_variables], inputs)


def forward(model, inputs):
    """Runs a model in inference mode; outputs as NumPy arrays (same structure).

    Example:
    >>> forward(backbone, {"images": probe_batch(224)})["cls_token"].shape   # (2, D)
    """
    if keras.backend.backend() == "jax":
        out = _jax_forward(model, inputs)
    else:
        out = model(inputs, training=False)
    return keras.tree.map_structure(lambda x: np.asarray(keras.ops.convert_to_numpy(x)), out)


def backbone_tokens(backbone, images):
    """Our backbone's normalized token sequence [CLS, registers, patches] as (B, 1 + R + N, D)."""
    out = forward(backbone, {"images": images})
    parts = [out["cls_token"][:, None], out["register_tokens"], out["patch_tokens"]]
    return np.concatenate(parts, axis=1)


@dataclasses.dataclass
class Check:
    """One comparison of an exported model with its source."""

    target: str
    size: int
    native: bool
    max_abs_diff: float
    bound: float
    exact: bool
    note: str = ""

    @property
    def ok(self):
        return (not self.exact) or self.max_abs_diff <= self.bound

    def line(self):
        kind = "native" if self.native else "interpolated"
        status = "ok" if self.exact and self.ok else ("FAILED" if self.exact else "not exact")
        text = (f"  {self.target:<38s} {self.size:>4d} x {self.size:<4d} ({kind:<12s}) "
                f"max |diff| {self.max_abs_diff:.3g}  {status}")
        if self.note:
            text += f" ({self.note})"
        return text


class Verifier:
    """Collects checks for one export, prints each, and raises if an exact one failed.

    Args:
        tolerance: float, default 1e-4. An exact check passes when the max absolute difference
            is at most `tolerance * max(1, max |source|)` (absolute for unit-scale features).
        verbose: bool, default True. Print every check.
    """

    def __init__(self, tolerance=1e-4, verbose=True):
        self.tolerance = float(tolerance)
        self.verbose = verbose
        self.checks = []

    def compare(self, target, size, native, got, want, exact=True, note=""):
        got = np.asarray(got, dtype="float32")
        want = np.asarray(want, dtype="float32")
        if got.shape != want.shape:
            raise ExportVerificationError(
                f"{target}: at {size} x {size} the exported model returns shape {got.shape}, "
                f"the source {want.shape}."
            )
        diff = float(np.abs(got - want).max()) if got.size else 0.0
        if not np.isfinite(diff):
            diff = float("inf")
        bound = self.tolerance * max(1.0, float(np.abs(want).max()) if want.size else 1.0)
        check = Check(target, int(size), bool(native), diff, bound, bool(exact), note)
        self.checks.append(check)
        if self.verbose:
            print(check.line())
        return check

    def raise_on_failure(self, out_dir):
        failed = [c for c in self.checks if not c.ok]
        if failed:
            lines = "\n".join(c.line() + f" > bound {c.bound:.3g}" for c in failed)
            raise ExportVerificationError(
                f"The export in {out_dir} does not reproduce the source backbone:\n{lines}\n"
                "The files were written but must not be used or uploaded."
            )

    def summary(self):
        return [dataclasses.asdict(c) for c in self.checks]


def keras_hub_resize_is_exact(mode, antialias, backend=None):
    """Whether keras-hub's own position resampling reproduces `mode` under `backend`.

    keras-hub resamples with `keras.ops.image.resize(..., "bicubic")`. With antialias it
    matches PyTorch's antialiased bicubic (the "registers" rule) on every backend; without
    antialias it matches PyTorch's plain bicubic (the "transformers" rule) only on the torch
    backend (JAX and TensorFlow use a = -0.5 and other edge rules); the first release's 0.1
    offset is never reproduced.

    Returns:
        (bool, str): exactness and, when not exact, the reason in words.
    """
    backend = backend or keras.backend.backend()
    if mode == "registers" and antialias:
        return True, ""
    if mode == "transformers" and not antialias:
        if backend == "torch":
            return True, ""
        return False, (f"keras-hub's non-antialiased bicubic under {backend} differs from "
                       "PyTorch's; exact under the torch backend only")
    return False, (f"keras-hub resamples with{'' if antialias else 'out'} antialias and no "
                   f"offset, the source uses the {MODE_WORDS[mode]}")
