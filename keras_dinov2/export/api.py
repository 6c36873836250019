"""`export()`: write one format, verify it, write the model card, optionally push it."""

import dataclasses
import os
import shutil
import warnings

import keras

from keras_dinov2.export import model_card as cards
from keras_dinov2.export.source import ExportSource, load_preset_source, load_run
from keras_dinov2.export.verify import (
    ExportWarning,
    Verifier,
    forward,
    keras_hub_resize_is_exact,
    probe_batch,
    probe_sizes,
)
from keras_dinov2.interop import check_preset_folder, load_heads, read_json, save_heads

FORMATS = ("keras_dinov2", "keras_hub", "transformers")

# Files an export writes; an existing folder holding only these may be overwritten.
_EXPORT_FILES = {"config.json", "model.weights.h5", "metadata.json", "image_converter.json",
                 "heads.json", "heads.weights.npz", "model.safetensors",
                 "preprocessor_config.json", "README.md"}


@dataclasses.dataclass
class ExportResult:
    """What `export` did: the folder, the checks, the warnings and the upload."""

    out_dir: str
    format: str
    checks: list
    warnings: list
    commit_url: str | None = None


def is_run_dir(path):
    """Whether `path` is a run directory of `keras-dinov2 pretrain` (config.json with "ssl")."""
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return False
    stored = read_json(config)
    return isinstance(stored, dict) and "ssl" in stored


def load_source(source):
    """An ExportSource from an ExportSource, a DINOv2Backbone, a run directory or a preset."""
    from keras_dinov2.backbone import DINOv2Backbone
    from keras_dinov2.export.source import clean_backbone

    if isinstance(source, ExportSource):
        return source
    if isinstance(source, DINOv2Backbone):
        return ExportSource(clean_backbone(source), info={"kind": "backbone"})
    if os.path.isdir(source) and is_run_dir(source):
        return load_run(source)
    return load_preset_source(source)


def _prepare(out_dir, overwrite):
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise ValueError(f"`out` {out_dir!r} exists and is not a folder.")
        entries = os.listdir(out_dir)
        if entries:
            foreign = sorted(set(entries) - _EXPORT_FILES)
            if not overwrite:
                raise ValueError(f"`out` folder {out_dir!r} is not empty; pass overwrite=True "
                                 "(--overwrite) to replace an earlier export.")
            if foreign:
                raise ValueError(f"`out` folder {out_dir!r} holds files an export does not "
                                 f"write (first {foreign[0]!r}); refusing to overwrite it.")
            shutil.rmtree(out_dir)
    os.makedirs(out_dir, exist_ok=True)


def exactness_rows(backbone):
    """(format, exact at other sizes, reason) for every way this model can be loaded."""
    from keras_dinov2.export.transformers_format import transformers_model_type

    mode = backbone.interpolation
    rows = [("keras-dinov2 preset", True, "")]

    def keras_hub_row(words, antialias):
        exact_torch, _ = keras_hub_resize_is_exact(mode, antialias, backend="torch")
        exact_all, reason = keras_hub_resize_is_exact(mode, antialias, backend="jax")
        if exact_all:
            return (words, True, "")
        if exact_torch:
            return (words, False, "exact under the torch backend only; JAX and TensorFlow "
                                  "resample with another bicubic kernel")
        return (words, False, reason)

    rows.append(keras_hub_row("keras-hub preset", mode == "registers"))
    model_type, exact, reason = transformers_model_type(backbone)
    rows.append((f"transformers ({model_type})", exact, reason))
    rows.append(keras_hub_row("keras-hub reading the transformers folder",
                              model_type != "dinov2"))
    return rows


def _verify_keras_dinov2(out_dir, source, verifier):
    from keras_dinov2.backbone import DINOv2Backbone

    backbone = source.backbone
    loaded = DINOv2Backbone.from_preset(out_dir)
    native, other = probe_sizes(backbone)
    for size, is_native in ((native, True), (other, False)):
        images = {"images": probe_batch(size)}
        want, got = forward(backbone, images), forward(loaded, images)
        for key in ("cls_token", "register_tokens", "patch_tokens", "prenorm"):
            if want[key].size == 0:
                continue  # no register tokens
            verifier.compare(f"keras-dinov2 preset {key}", size, is_native, got[key], want[key])
    if source.heads is not None and os.path.exists(os.path.join(out_dir, "heads.json")):
        heads = load_heads(out_dir)
        cls = forward(backbone, {"images": probe_batch(native)})["cls_token"]
        pairs = [("dino_head", source.heads["dino_head"])]
        if source.heads.get("ibot_head") is not None:
            pairs.append(("ibot_head", source.heads["ibot_head"]))
        for name, head in pairs:
            verifier.compare(f"keras-dinov2 {name}", native, True,
                             keras.ops.convert_to_numpy(heads[name](cls)),
                             keras.ops.convert_to_numpy(head(cls)))


def export(source, out_dir, format="keras_dinov2", heads=False, tolerance=1e-4,
           license="apache-2.0", push=None, private=False, revision=None, commit_message=None,
           token=None, endpoint=None, overwrite=False, verbose=True):
    """Exports a backbone in one format, verifies it, writes its model card, optionally pushes it.

    From a run directory the exported network is the run's EMA teacher at its newest
    checkpoint (the reference releases the teacher, not the student). The export is loaded
    back through its own loader (DINOv2Backbone.from_preset; keras-hub's
    Backbone.from_preset; transformers' AutoModel and keras-hub's transformers converter) and
    compared with the source on a probe batch at the stored size and at an interpolated size;
    every max absolute difference is printed, and an exact comparison above `tolerance` raises
    `ExportVerificationError`. Where a format cannot reproduce the model's position
    interpolation rule at other sizes (the first release's 0.1 offset in transformers, for
    one), that comparison is printed as "not exact", an `ExportWarning` says so, and the model
    card states it.

    Args:
        source: a run directory, a preset (architecture name, folder or handle), a
            DINOv2Backbone or an ExportSource.
        out_dir: str. Folder to write; must be empty or absent unless `overwrite`.
        format: str, default "keras_dinov2". "keras_dinov2" (our preset), "keras_hub"
            (a stock DINOV2Backbone preset with its image converter) or "transformers".
        heads: bool, default False. With "keras_dinov2" from a run, also write the teacher's
            DINO / iBOT heads and centers (`load_heads`, `restore_heads`).
        tolerance: float, default 1e-4. Bound on the max absolute difference, scaled by the
            features' magnitude when it exceeds one.
        license: str, default "apache-2.0". For the model card metadata.
        push: optional "hf://user/repo". Upload the folder after a successful export.
        private, revision, commit_message, token, endpoint: see `push_to_hub`.
        overwrite: bool, default False. Replace an earlier export in `out_dir`.
        verbose: bool, default True. Print every check.

    Returns:
        ExportResult.

    Example:
    >>> export("runs/latest", "export/hub", format="keras_hub", push="hf://me/dinov2-digits")
    """
    if format not in FORMATS:
        raise ValueError(f"`format` must be one of {FORMATS}, received {format!r}.")
    if heads and format != "keras_dinov2":
        raise ValueError("`heads` can only be exported in the keras_dinov2 format; keras-hub and "
                         "transformers have no place for them.")
    if push is not None:
        from keras_dinov2.export.hub import parse_repo

        repo = parse_repo(push)
    else:
        repo = None
    src = load_source(source)
    if heads and src.heads is None:
        raise ValueError("`heads=True` needs a run directory with a checkpoint: the source "
                         f"{src.info.get('path')!r} has no heads.")
    backbone = src.backbone
    _prepare(out_dir, overwrite)
    verifier = Verifier(tolerance=tolerance, verbose=verbose)
    if verbose:
        if src.info.get("kind") == "run":
            what = f"the teacher of {src.info.get('checkpoint') or 'teacher_preset'} in {src.info['path']}"
        elif src.info.get("kind") == "distillation":
            what = (f"the EMA student {src.info['model']} of {src.info.get('checkpoint') or 'its final preset'} in "
                    f"{src.info['path']}")
        else:
            what = src.info.get("path") or "the backbone"
        print(f"Exporting {what} as {format} to {out_dir}; checking against the source:")

    skipped = []
    if format == "keras_dinov2":
        backbone.save_to_preset(out_dir)
        if heads:
            save_heads(out_dir, src.heads["dino_head"], src.heads.get("ibot_head"),
                       src.heads.get("dino_center"), src.heads.get("ibot_center"))
        check_preset_folder(out_dir)
        _verify_keras_dinov2(out_dir, src, verifier)
        inexact = []
    elif format == "keras_hub":
        from keras_dinov2.export.keras_hub_format import (
            save_keras_hub_preset,
            verify_keras_hub_preset,
        )

        save_keras_hub_preset(backbone, out_dir, src.mean, src.std)
        check_preset_folder(out_dir)
        verify_keras_hub_preset(out_dir, backbone, verifier)
        inexact = [r for r in exactness_rows(backbone) if r[0] == "keras-hub preset" and not r[1]]
    else:
        from keras_dinov2.export.transformers_format import save_transformers, verify_transformers

        save_transformers(backbone, out_dir, src.mean, src.std)
        check_preset_folder(out_dir)
        skipped = verify_transformers(out_dir, backbone, verifier)
        inexact = [r for r in exactness_rows(backbone)
                   if r[0].startswith(("transformers", "keras-hub reading")) and not r[1]]
    verifier.raise_on_failure(out_dir)

    notes = []
    for words, _, reason in inexact:
        notes.append(f"{words}: not exact at input sizes other than {backbone.image_size} x "
                     f"{backbone.image_size} ({reason}).")
    for what in skipped:
        notes.append(f"Not checked: {what}.")
    for note in notes:
        warnings.warn(note, ExportWarning, stacklevel=2)
        if verbose:
            print("WARNING: " + note)

    card = cards.model_card(backbone, format, src.info, exactness_rows(backbone),
                            license=license, repo=repo, checks=verifier.summary())
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(card)
    result = ExportResult(out_dir, format, verifier.summary(), notes)
    if verbose:
        worst = max((c.max_abs_diff for c in verifier.checks if c.exact), default=0.0)
        print(f"Wrote {out_dir} ({', '.join(sorted(os.listdir(out_dir)))}); largest exact "
              f"difference {worst:.3g}.")
    if repo is not None:
        from keras_dinov2.export.hub import push_to_hub

        result.commit_url = push_to_hub(out_dir, repo, private=private, revision=revision,
                                        commit_message=commit_message, token=token,
                                        endpoint=endpoint)
        if verbose:
            print(f"Pushed to hf://{repo}: {result.commit_url}")
    return result

