"""The "random init" baseline: a freshly initialized backbone of a trained one's architecture, seeded."""


def random_init_backbone(backbone, seed=0):
    """A randomly initialized backbone of `backbone`'s architecture: the same weights for the same seed.

    The "random init" baseline of a k-NN: built from `backbone.get_config()` with Keras' initializer seeds drawn
    from a Python generator seeded with `seed`, so the baseline printed at the start of a run, at its end, after a
    resume and by `keras-dinov2 evaluate` is one network and one number. Python's global random state is left
    as it was, so building the baseline changes nothing else in a run.

    Args:
        backbone: a Keras model with `get_config()` / `from_config()` (a `DINOv2Backbone`).
        seed: int, default 0.

    Example:
    >>> fresh = random_init_backbone(trained_backbone)
    >>> evaluate_digits(fresh, ks=(20,))
    """
    import random

    # Keras draws the seed of every initializer without one from Python's `random` module.
    state = random.getstate()
    try:
        random.seed(seed)
        return type(backbone).from_config(backbone.get_config())
    finally:
        random.setstate(state)
