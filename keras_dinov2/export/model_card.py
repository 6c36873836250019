"""The model card (README.md with Hub metadata) written into every export folder."""

FORMAT_TITLES = {
    "keras_dinov2": "keras-dinov2 preset",
    "keras_hub": "keras-hub DINOV2Backbone preset",
    "transformers": "Hugging Face transformers",
}
LIBRARY_NAMES = {"keras_dinov2": "keras-hub", "keras_hub": "keras-hub",
                 "transformers": "transformers"}


def _front_matter(fmt, license, interpolation, registers):
    tags = ["dinov2", "vision-transformer", "self-supervised-learning", "image-feature-extraction",
            "keras", "keras-dinov2"]
    if fmt != "transformers":
        tags.append("keras-hub")
    if registers:
        tags.append("registers")
    lines = ["---", f"library_name: {LIBRARY_NAMES[fmt]}", f"license: {license}", "tags:"]
    lines += [f"- {tag}" for tag in tags]
    lines += ["pipeline_tag: image-feature-extraction", "---"]
    return "\n".join(lines)


def _architecture(backbone):
    rows = [
        ("patch size", backbone.patch_size),
        ("width", backbone.hidden_dim),
        ("blocks", backbone.num_layers),
        ("heads", backbone.num_heads),
        ("MLP ratio", backbone.mlp_ratio),
        ("feed-forward", "SwiGLU (fused)" if backbone.ffn_type == "swiglu" else "MLP (GELU)"),
        ("register tokens", backbone.num_register_tokens),
        ("stored position grid", f"{backbone.image_size // backbone.patch_size} x "
                                 f"{backbone.image_size // backbone.patch_size} "
                                 f"({backbone.image_size} px)"),
        ("position interpolation", f"`{backbone.interpolation}`"),
        ("LayerScale", "yes" if backbone.layer_scale_init is not None else "no"),
        ("parameters", f"{backbone.count_params():,}"),
    ]
    return "\n".join(["| | |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows])


def _distillation(info):
    ssl = info.get("ssl") or {}
    optim = ssl.get("optim", {})
    lines = [
        f"- distilled from the teacher `{info.get('teacher')}` ({info.get('mode')} distillation, "
        "`keras-dinov2 distill`); this is the EMA of the student",
        f"- student: `{info.get('model')}`; data: `{info.get('data')}`; backend: {info.get('backend')}",
        f"- checkpoint: `{info.get('checkpoint')}` (epoch {info.get('epoch')}, {info.get('steps')} optimizer steps)"
        if info.get("checkpoint") else "- checkpoint: none (the run's final student preset)",
        f"- batch {ssl.get('batch_size')}; {optim.get('epochs')} epochs of {optim.get('steps_per_epoch')} steps "
        f"planned; AdamW, base lr {optim.get('base_lr')}",
    ]
    knn = info.get("knn") or {}
    lines.append(_knn_line(info, knn.get("student"), "this backbone's", knn.get("teacher"), "the teacher"))
    return "\n".join(lines)


def _knn_line(info, accuracy, whose, other, other_name):
    """The model card's k-NN line: `accuracy` ({k: top-1 %}) at k=20 where present, beside `other`'s."""
    if not accuracy:
        return "- k-NN accuracy: not recorded in the run directory"
    k = "20" if "20" in accuracy else sorted(accuracy, key=int)[0]
    text = f"- k-NN top-1 (k={k}) of {whose} CLS token: {float(accuracy[k]):.1f}%"
    compared = (other or {}).get(k)
    if compared is not None:
        text += f" ({other_name}: {float(compared):.1f}%)"
    text += f", from `{(info.get('knn') or {}).get('source')}`"
    if info.get("data") == "digits":
        text += " on the 450 held-out images of the bundled digits"
    return text


def _training(info):
    if info.get("kind") == "distillation":
        return _distillation(info)
    if info.get("kind") != "run":
        origin = (f"the preset `{info.get('path')}`" if info.get("kind") == "preset"
                  else "a DINOv2Backbone object")
        return (f"Exported from {origin}; no training run is attached, so the recipe and the "
                "accuracy are not known here.")
    ssl = info.get("ssl") or {}
    optim, heads, data_cfg = ssl.get("optim", {}), ssl.get("heads", {}), ssl.get("data", {})
    model = ssl.get("model", {})
    crops = data_cfg.get("crops", {})
    loss = ssl.get("loss", {})
    lines = [
        f"- data: `{info.get('data')}`",
        f"- initial model: `{info.get('model')}`",
        f"- checkpoint: `{info.get('checkpoint')}` (epoch {info.get('epoch')}, "
        f"{info.get('steps')} optimizer steps)" if info.get("checkpoint")
        else "- checkpoint: none (the run's final `teacher_preset/`)",
        f"- backend: {info.get('backend')}",
        f"- batch {ssl.get('batch_size')} per step x {optim.get('gradient_accumulation_steps', 1)} "
        f"accumulated; {optim.get('epochs')} epochs of {optim.get('steps_per_epoch')} steps planned",
        f"- AdamW, base lr {optim.get('base_lr')}, weight decay {optim.get('weight_decay')} -> "
        f"{optim.get('weight_decay_end')}, teacher momentum {optim.get('momentum_teacher')} -> "
        f"{optim.get('final_momentum_teacher')}, drop path {model.get('drop_path_rate')}, "
        f"layer decay {optim.get('layer_decay')}",
        f"- crops: 2 x {crops.get('global_crops_size')} px + {crops.get('local_crops_number')} x "
        f"{crops.get('local_crops_size')} px",
        f"- heads: {heads.get('num_prototypes')} prototypes, "
        f"{'untied' if heads.get('ibot_separate_head') else 'shared'} iBOT head; "
        f"targets by {loss.get('centering')}",
    ]
    knn = info.get("knn") or {}
    lines.append(_knn_line(info, knn.get("teacher"), "the teacher's", knn.get("random_init"),
                           "randomly initialized backbone"))
    return "\n".join(lines)


def _usage(fmt, repo, size):
    where = repo or "path/to/this/folder"
    hf = f"hf://{repo}" if repo else where
    blocks = {
        "keras_dinov2": (
            "keras-dinov2 (masks, any input size, continued pretraining)",
            f"""```python
import numpy as np
import keras_dinov2 as kd

backbone = kd.DINOv2Backbone.from_preset("{hf}")
out = backbone({{"images": np.zeros((1, {size}, {size}, 3), "float32")}})
out["cls_token"], out["patch_tokens"]
```
With the heads exported (`heads.json`), continue pretraining:
```python
import json
from keras_dinov2.export import restore_heads
# The recipe of the run that wrote this export (its config.json): the same head sizes.
config = kd.SSLConfig.from_dict(json.load(open("RUN_DIR/config.json"))["ssl"])
model = kd.DINOv2Pretrainer(kd.DINOv2Backbone.from_preset("{hf}", drop_path_rate=0.1), config)
restore_heads(model, "path/to/this/folder")
```"""),
        "keras_hub": (
            "keras-hub alone (no keras-dinov2 needed)",
            f"""```python
import keras_hub

backbone = keras_hub.models.Backbone.from_preset("{hf}")   # DINOV2Backbone, {size} x {size}
converter = keras_hub.layers.ImageConverter.from_preset("{hf}")
tokens = backbone({{"images": converter(images)}})   # (B, 1 + registers + patches, width)
```"""),
        "transformers": (
            "Hugging Face transformers (PyTorch)",
            f"""```python
from transformers import AutoImageProcessor, AutoModel

processor = AutoImageProcessor.from_pretrained("{where}")
model = AutoModel.from_pretrained("{where}")
outputs = model(**processor(images, return_tensors="pt"))
outputs.pooler_output   # CLS token after the final norm
```
keras-hub reads this folder too: `keras_hub.models.Backbone.from_preset("{hf}")`."""),
    }
    parts = []
    for name in ("keras_dinov2", "keras_hub", "transformers"):
        title, code = blocks[name]
        if name == fmt:
            parts.append(f"### {title}: this folder\n\n{code}")
        else:
            parts.append(f"### {title}\n\nExport the same run with `keras-dinov2 export --format "
                         f"{name}` to get this format, then:\n\n{code}")
    return "\n\n".join(parts)


def model_card(backbone, fmt, info, exactness, license="apache-2.0", repo=None, checks=None):
    """Builds the README.md text of an export.

    Args:
        backbone: the exported DINOv2Backbone.
        fmt: str. "keras_dinov2", "keras_hub" or "transformers".
        info: dict. `ExportSource.info`.
        exactness: list of (format words, exact at other sizes, reason) rows.
        license: str, default "apache-2.0". The license the weights are published under.
        repo: optional "user/name" the folder is pushed to (used in the loading snippets).
        checks: optional list of verification records (`Verifier.summary()`).

    Example:
    >>> print(model_card(backbone, "keras_hub", source.info, exactness))
    """
    size = backbone.image_size
    text = [_front_matter(fmt, license, backbone.interpolation, backbone.num_register_tokens)]
    name = repo.split("/")[-1] if repo else "DINOv2 backbone"
    text.append(f"# {name}\n\nA DINOv2 Vision Transformer pretrained with "
                "keras-dinov2 (the DINOv2 recipe of Oquab et al., 2023, on "
                f"Keras 3), exported as a **{FORMAT_TITLES[fmt]}**. The weights are the EMA "
                "**teacher** backbone, the network the DINOv2 reference releases. Inputs are RGB "
                "images scaled to [0, 1] and normalized with the training mean and standard "
                "deviation; outputs are the CLS, register and patch tokens after the final "
                "LayerNorm.")
    text.append("## Architecture\n\n" + _architecture(backbone))
    text.append("## Training\n\n" + _training(info))
    rows = ["| format | exact at other input sizes | note |", "| --- | --- | --- |"]
    for words, exact, reason in exactness:
        rows.append(f"| {words} | {'yes' if exact else 'no'} | {reason or ''} |")
    text.append(
        "## Input sizes\n\nAt the stored size every format gives the same features. At other "
        "sizes the position table is resampled; the table says where a format resamples "
        f"exactly as this model was trained (the `{backbone.interpolation}` rule).\n\n"
        + "\n".join(rows))
    if checks:
        lines = [f"- {c['target']} at {c['size']} px: max |diff| {c['max_abs_diff']:.2g}"
                 + ("" if c["exact"] else " (not exact, see above)") for c in checks]
        text.append("## Export check\n\nThe export was loaded back and compared with the source "
                    "backbone on a probe batch:\n\n" + "\n".join(lines))
    text.append("## How to load\n\n" + _usage(fmt, repo, size))
    return "\n\n".join(text) + "\n"
