"""Shared test setup: quiet logs, reproducible seeds, and helpers for parity tests."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _reset_keras():
    keras.utils.set_random_seed(0)
    keras.config.set_dtype_policy("float32")
    yield
    keras.config.set_dtype_policy("float32")


def to_numpy(x):
    if isinstance(x, keras.Variable):
        x = x.value
    if hasattr(x, "detach") and str(getattr(x, "dtype", "")) != "torch.bfloat16":
        # From the torch tensor itself: Keras' conversion goes through `np.array(tensor)`, whose `__array__`
        # lacks the `copy` keyword NumPy 2 passes, and warns on every call (~3,000 warnings in the torch job).
        return x.detach().cpu().numpy().copy()  # a copy, as Keras gives: in-place updates must not reach it
    return np.asarray(keras.ops.convert_to_numpy(x))


# Tests whose behaviour does not depend on the Keras backend of the process (they start their own
# processes per backend, or test a recipe whose per-backend parity other tests cover) are marked
# `@pytest.mark.once` and run in one backend's job only: the torch job, the shortest of the three
# (its steps run eagerly, nothing is compiled), so the CI's longest job (jax) does not carry them.
ONCE_BACKEND = "torch"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", f"once: backend-independent; runs only in the KERAS_BACKEND={ONCE_BACKEND} job")
    config.addinivalue_line(
        "markers", "every_backend: runs in every backend's job, also in a module marked `once`")


def pytest_collection_modifyitems(config, items):
    if keras.backend.backend() == ONCE_BACKEND:
        return
    skip = pytest.mark.skip(reason=f"backend-independent: runs in the KERAS_BACKEND={ONCE_BACKEND} job")
    for item in items:
        if item.get_closest_marker("once") and not item.get_closest_marker("every_backend"):
            item.add_marker(skip)
