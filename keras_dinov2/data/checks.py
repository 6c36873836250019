"""Argument checks shared by the data sources and the pipelines, with errors that name the argument and the value."""

from __future__ import annotations

import numpy as np

__all__ = ["check_max_image_pixels", "check_positive_int", "check_shards"]


def check_positive_int(name, value):
    """`value` as an int once it is an integer >= 1 (NumPy integers too, bools not); else a ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1; received {value!r}.")
    return int(value)


def check_shards(num_shards, shard_index):
    """Raise a ValueError unless num_shards is an int >= 1 and shard_index an int in [0, num_shards)."""
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"num_shards must be an integer >= 1; received {num_shards!r}.")
    if (
        isinstance(shard_index, bool)
        or not isinstance(shard_index, int)
        or not 0 <= shard_index < num_shards
    ):
        raise ValueError(
            f"shard_index must be an integer in [0, {num_shards}); received {shard_index!r}."
        )


def check_max_image_pixels(value):
    """`value` as an int when it is a positive integer, None for no limit; else a ValueError."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(
            f"max_image_pixels must be a positive integer or None (no limit); received {value!r}."
        )
    return int(value)
