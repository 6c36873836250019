"""Labelled data for evaluation: a data spec ("digits", "tfds:NAME", a folder) resolved into train and test."""

import functools
import os

from keras_dinov2.data.image_headers import DEFAULT_MAX_IMAGE_PIXELS


def labelled_splits(data="digits", train_split=None, test_split=None, test_fraction=0.25, seed=0,
                    max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS):
    """Resolve a labelled data spec into (train, test) `ImageSource`s for evaluation.

    - "digits": the bundled train split and its held-out 25% (1,347 / 450 images).
    - "tfds:NAME": its "train" split and its "test" split (else "validation"), unless splits are given.
    - a folder: `train/` with `val/` or `test/` subfolders (class subfolders inside each) when present;
      otherwise one folder of class subfolders, split stratified by class (`test_fraction` held out).
    `train_split` / `test_split` name the splits (TFDS splits, digits splits or subfolders) explicitly.
    `max_image_pixels` (default 89,478,485, PIL's limit; None for none) is the largest image of a folder or TFDS
    dataset that is decoded; larger ones are left out and named (see `keras_dinov2.data.get_source`).

    Example:
        >>> train, test = labelled_splits("digits")
        >>> train.num_examples, test.num_examples
        (1347, 450)
    """
    from keras_dinov2.data import get_source, split_source

    get_source = functools.partial(get_source, max_image_pixels=max_image_pixels)
    text = os.fspath(data) if isinstance(data, (str, os.PathLike)) else None
    if text is None:
        raise ValueError(f"`data` must be 'digits', 'tfds:NAME' or a folder path; received {type(data).__name__}.")
    if text == "digits" or text.startswith("digits:"):
        return (get_source("digits", split=train_split or "train"),
                get_source("digits", split=test_split or "test"))
    if text.startswith("tfds:"):
        # The train source first: building it checks that the dataset exists and is prepared, with the data
        # module's messages, before its split names are read here.
        train = get_source(text, split=train_split or "train")
        if test_split is None:
            test_split = _tfds_test_split(text)
        return train, get_source(text, split=test_split)
    if not os.path.isdir(text):
        raise ValueError(f"data folder {text!r} does not exist; expected 'digits', 'tfds:NAME' or a folder.")
    if train_split is None and test_split is None:
        held_out = [name for name in ("val", "test") if os.path.isdir(os.path.join(text, name))]
        if os.path.isdir(os.path.join(text, "train")) and held_out:
            train_split, test_split = "train", held_out[0]
    if train_split is not None or test_split is not None:
        if train_split is None or test_split is None:
            raise ValueError("pass both a train split and a test split for a folder, or neither.")
        train = get_source(text, split=train_split)
        test = get_source(text, split=test_split)
    else:
        train, test = split_source(get_source(text), test_fraction=test_fraction, seed=seed)
    for what, source in (("train", train), ("test", test)):
        if source.labels is None:
            raise ValueError(
                f"the {what} data {source.name!r} has no labels: evaluation needs one subfolder per class."
            )
    return train, test


def _tfds_test_split(text):
    """The held-out split of a prepared TFDS dataset "tfds:NAME[...]": "test", else "validation"."""
    import tensorflow_datasets as tfds

    splits = tfds.builder(text[len("tfds:"):].split(":")[0]).info.splits
    if "test" in splits:
        return "test"
    if "validation" in splits:
        return "validation"
    raise ValueError(f"{text} has no 'test' or 'validation' split; pass --test-split.")


def digits_datasets(image_size, batch_size):
    """(train, test) evaluation datasets of the bundled digits: 1,347 references and 450 held-out queries.

    Both go through the reference's evaluation transform (`keras_dinov2.data.eval_dataset`) at `image_size`, in
    batches of `batch_size`.

    Example:
    >>> train, test = digits_datasets(32, 256)
    """
    from keras_dinov2.data import eval_dataset

    return (eval_dataset("digits", image_size, batch_size, split="train"),
            eval_dataset("digits", image_size, batch_size, split="test"))
