"""Pieces of a facebookresearch/dinov2 checkout, loaded at run time (never copied)."""

import contextlib
import functools
import importlib.util
import subprocess


def reference_commit(folder):
    """The checked-out commit of the reference folder, when it is a git work tree."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["git", "-C", folder, "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if out.returncode == 0:
            return out.stdout.strip()
    return None


def load_file_module(name, path):
    """Imports one file of the reference as a module, without its package's __init__."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_collate(collate, masking_generator, grid, mask_ratio_min_max, mask_probability):
    """The reference's collate_data_and_cast with its MaskingGenerator, as dinov2/train/train.py
    builds them: at most half of a grid x grid crop's patches masked, float32 crops.

    `collate` and `masking_generator` are the reference's own (dinov2/data/collate.py and
    masking.py); the result takes the list of samples a DataLoader collates.
    """
    import torch

    generator = masking_generator(input_size=(grid, grid), max_num_patches=0.5 * grid * grid)
    return functools.partial(
        collate,
        mask_ratio_tuple=tuple(mask_ratio_min_max),
        mask_probability=mask_probability,
        dtype=torch.float32,
        n_tokens=grid * grid,
        mask_generator=generator,
    )
