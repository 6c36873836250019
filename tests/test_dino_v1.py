"""DINO v1 beside DINOv2: the dino_vit_* architectures, and v1's torch-hub and transformers ViT readers.

The reference is a random transformers ViTModel (the layout of facebook/dino-vits16 and the other v1
conversions). At the stored size its tokens are the official v1 model's; at other sizes v1 resamples the
position table by its own rule, written below from its description, which transformers' ViT does not
follow (it resamples to the output size), so the comparison there runs transformers with v1's rule patched in.
"""

import math

import keras
import numpy as np
import pytest
from conftest import to_numpy

from keras_dinov2 import ARCHITECTURES, DINOv2Backbone
from keras_dinov2.interop import (
    CheckpointError,
    load_backbone,
    load_torch_hub_checkpoint,
    load_transformers_checkpoint,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
F = torch.nn.functional

PATCH, SIZE, WIDTH, DEPTH = 8, 32, 128, 2   # 2 heads of 64, as every v1 release (heads = width / 64)
TINY = dict(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=2, intermediate_size=4 * WIDTH,
            image_size=SIZE, patch_size=PATCH, layer_norm_eps=1e-6, qkv_bias=True)
OTHER_SIZES = [(48, 48), (40, 56)]   # the position grid resampled from 4 x 4 to 6 x 6 and to 5 x 7


def _random_vit(seed=0):
    torch.manual_seed(seed)
    model = transformers.ViTModel(transformers.ViTConfig(**TINY))   # with its pooler, which we ignore
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    """(model, folder): a random ViTModel and its save_pretrained folder."""
    model = _random_vit()
    folder = tmp_path_factory.mktemp("vit")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def from_folder(vit):
    """The ViT folder read by our transformers reader."""
    return load_transformers_checkpoint(str(vit[1]))


def _v1_state_dict(model):
    """The ViTModel's tensors under the official v1 VisionTransformer's names, mapped here independently."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    layer = "encoder.layer.{}." if "encoder.layer.0.layernorm_before.weight" in sd else "layers.{}."
    out = {
        "cls_token": sd["embeddings.cls_token"],
        "pos_embed": sd["embeddings.position_embeddings"],
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["layernorm.weight"],
        "norm.bias": sd["layernorm.bias"],
    }
    for i in range(DEPTH):
        src, dst = layer.format(i), f"blocks.{i}."
        legacy = src.startswith("encoder")
        names = {
            "norm1": "layernorm_before", "norm2": "layernorm_after",
            "attn.proj": "attention.output.dense" if legacy else "attention.o_proj",
            "mlp.fc1": "intermediate.dense" if legacy else "mlp.fc1",
            "mlp.fc2": "output.dense" if legacy else "mlp.fc2",
        }
        qkv = (["attention.attention.query", "attention.attention.key", "attention.attention.value"]
               if legacy else ["attention.q_proj", "attention.k_proj", "attention.v_proj"])
        for kind in ("weight", "bias"):
            for ours, theirs in names.items():
                out[f"{dst}{ours}.{kind}"] = sd[f"{src}{theirs}.{kind}"]
            out[f"{dst}attn.qkv.{kind}"] = torch.cat([sd[f"{src}{q}.{kind}"] for q in qkv], 0)
    return out


def _v1_position_table(table, height, width):
    """DINO v1's resampling: bicubic by scale factor (g + 0.1) / M on the M x M grid, no antialias."""
    positions = table.shape[1] - 1
    grid_h, grid_w = height // PATCH, width // PATCH
    if grid_h * grid_w == positions and height == width:
        return table
    side, dim = math.isqrt(positions), table.shape[-1]
    grid = table[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((grid_h + 0.1) / side, (grid_w + 0.1) / side), mode="bicubic")
    assert grid.shape[-2:] == (grid_h, grid_w)
    return torch.cat([table[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


def _images(height, width, seed=0):
    return np.random.default_rng(seed).random((2, height, width, 3)).astype("float32")


def _hf_tokens(model, images, rule=None):
    """transformers' last_hidden_state; at other sizes by its own rule, or by `rule` ("v1") patched in."""
    embeddings = model.embeddings
    if rule == "v1":
        embeddings.interpolate_pos_encoding = (
            lambda _, height, width: _v1_position_table(embeddings.position_embeddings, height, width))
    try:
        pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
        with torch.no_grad():
            out = model(pixel_values=pixels, interpolate_pos_encoding=images.shape[1:3] != (SIZE, SIZE))
        return out.last_hidden_state.numpy()
    finally:
        embeddings.__dict__.pop("interpolate_pos_encoding", None)


def _our_tokens(backbone, images):
    out = backbone({"images": images})
    return np.concatenate([to_numpy(out["cls_token"])[:, None], to_numpy(out["patch_tokens"])], axis=1)


def _assert_v1_backbone(backbone):
    assert (backbone.patch_size, backbone.hidden_dim, backbone.num_layers, backbone.num_heads) == (
        PATCH, WIDTH, DEPTH, 2)
    assert backbone.image_size == SIZE and backbone.mlp_ratio == 4.0
    assert backbone.layer_scale_init is None and backbone.num_register_tokens == 0
    assert backbone.interpolation == "original" and backbone.cls_token_init_std == 0.02
    assert backbone.layer_norm_epsilon == 1e-6
    # v1 has no mask token: ours is zero, so no output depends on it.
    np.testing.assert_array_equal(to_numpy(backbone.embeddings.mask_token), 0.0)


def _assert_matches(backbone, model, height, width, rule="v1"):
    images = _images(height, width, seed=height + width)
    diff = np.abs(_our_tokens(backbone, images) - _hf_tokens(model, images, rule=rule)).max()
    assert diff < 1e-5, (height, width, diff)


def test_vit_folder_matches_transformers_and_v1_rule(vit, from_folder):
    from keras_dinov2.layers.interpolation import resample_grid

    model, _ = vit
    _assert_v1_backbone(from_folder)
    _assert_matches(from_folder, model, SIZE, SIZE)
    _assert_matches(from_folder, model, *OTHER_SIZES[1])   # a non-square grid, by v1's rule
    # The position table by itself, against v1's rule and against transformers' own rule, which
    # differs from it and is what `interpolation="transformers"` reproduces.
    table = model.embeddings.position_embeddings.detach()
    grid = to_numpy(from_folder.embeddings.position_embedding)[0, 1:].reshape(4, 4, WIDTH)
    for height, width in OTHER_SIZES:
        v1 = _v1_position_table(table, height, width).numpy()
        ours = to_numpy(from_folder.embeddings.interpolated_position_embedding(height, width))
        np.testing.assert_allclose(ours, v1, rtol=1e-5, atol=1e-5)
        tokens = torch.zeros(1, 1 + (height // PATCH) * (width // PATCH), WIDTH)
        with torch.no_grad():
            theirs = model.embeddings.interpolate_pos_encoding(tokens, height, width).numpy()[0, 1:]
        resampled = to_numpy(resample_grid(grid, height // PATCH, width // PATCH, "transformers"))
        np.testing.assert_allclose(resampled.reshape(-1, WIDTH), theirs, rtol=1e-5, atol=1e-5)
        assert np.abs(theirs - v1[0, 1:]).max() > 1e-3


def test_v1_torch_hub_state_dict_loads_and_matches(vit, from_folder, tmp_path):
    model, _ = vit
    path = tmp_path / "dino_tiny8_pretrain.pth"
    torch.save(_v1_state_dict(model), path)
    backbone = load_torch_hub_checkpoint(str(path))
    _assert_v1_backbone(backbone)
    _assert_matches(backbone, model, SIZE, SIZE)
    # The same configuration and weights as the folder's, so the same outputs at every size.
    assert backbone.get_config() | {"name": None} == from_folder.get_config() | {"name": None}
    for ours, theirs in zip(backbone.weights, from_folder.weights, strict=True):
        np.testing.assert_array_equal(to_numpy(ours), to_numpy(theirs))


def _v2_state_dict(model):
    """The v1 tensors plus what DINOv2's layout adds: a mask token and LayerScale gammas."""
    sd = _v1_state_dict(model)
    sd["mask_token"] = torch.zeros(1, WIDTH)
    for i in range(DEPTH):
        sd[f"blocks.{i}.ls1.gamma"] = torch.full((WIDTH,), 0.5)
        sd[f"blocks.{i}.ls2.gamma"] = torch.full((WIDTH,), 0.5)
    return sd


@pytest.mark.once
def test_a_file_of_the_other_family_is_refused_naming_every_difference(vit, tmp_path, monkeypatch):
    model, _ = vit
    v1, v2 = tmp_path / "v1.pth", tmp_path / "v2.pth"
    torch.save(_v1_state_dict(model), v1)
    torch.save(_v2_state_dict(model), v2)
    assert load_torch_hub_checkpoint(str(v2)).layer_scale_init == 1.0   # a DINOv2 layout loads as such
    # A v1 file forced into a DINOv2-style configuration of the same width.
    with pytest.raises(ValueError, match=r"patch_size=4 does not match the tensors, which hold a 8 x 8 "
                       r"patch projection; image_size=32 .* 4 x 4 position grid .*layer_scale_init=1\.0 "
                       r".* no LayerScale gammas.* The tensors are a DINO v1 backbone"):
        load_torch_hub_checkpoint(str(v1), patch_size=4, layer_scale_init=1.0)
    # The architecture presets download their file; each refuses the other family's, before building.
    urls = []

    def fake_download(name, url, **_):
        urls.append(url)
        return str(v1 if "dinov2" in url else v2)

    monkeypatch.setattr(keras.utils, "get_file", fake_download)
    with pytest.raises(ValueError, match=r"patch_size=14 .* 8 x 8 patch projection.*image_size=518 .* "
                       r"4 x 4 position grid.*layer_scale_init=1\.0 .* no LayerScale.*DINO v1 backbone"):
        DINOv2Backbone.from_preset("dinov2_vit_small14")
    with pytest.raises(ValueError, match=r"patch_size=16 .* 8 x 8 patch projection.*image_size=224 .* "
                       r"4 x 4 position grid.*layer_scale_init=None .* have LayerScale gammas.*"
                       r"DINOv2 backbone"):
        DINOv2Backbone.from_preset("dino_vit_small16")
    assert urls == ["https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth",
                    "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/"
                    "dino_deitsmall16_pretrain.pth"]


@pytest.mark.once
def test_a_transformers_folder_of_the_other_layout_is_refused(vit, tmp_path):
    import json
    import shutil

    _, folder = vit
    with pytest.raises(ValueError, match=r"patch_size=4 .* 8 x 8 patch projection.*layer_scale_init=1\.0 "
                       r".* no LayerScale gammas"):
        load_transformers_checkpoint(str(folder), patch_size=4, image_size=16, layer_scale_init=1.0)
    relabelled = tmp_path / "relabelled"
    shutil.copytree(folder, relabelled)
    config = json.loads((relabelled / "config.json").read_text())
    (relabelled / "config.json").write_text(json.dumps({**config, "model_type": "dinov2"}))
    with pytest.raises(CheckpointError, match=r"model_type 'dinov2' does not match the tensors, which are "
                       r"a ViTModel's .*layernorm_before.*expected model_type 'vit'"):
        load_backbone(str(relabelled))
    (relabelled / "config.json").write_text(json.dumps({**config, "qkv_bias": False}))
    with pytest.raises(CheckpointError, match=r"qkv_bias=False is not supported"):
        load_transformers_checkpoint(str(relabelled))


@pytest.mark.once
def test_convert_recognizes_v1_sources_and_the_preset_keeps_them(vit, tmp_path, capsys):
    from keras_dinov2.cli import main

    model, folder = vit
    path = tmp_path / "dino.pth"
    torch.save(_v1_state_dict(model), path)
    for kind, source in (("torch-hub", path), ("transformers", folder)):
        out = tmp_path / kind
        assert main(["convert", "--from", kind, str(source), "--out", str(out)]) == 0
        assert "patch 8, 0 registers" in capsys.readouterr().out
        backbone = load_backbone(str(out))
        _assert_v1_backbone(backbone)
        images = _images(*OTHER_SIZES[1], seed=5)
        assert np.abs(_our_tokens(backbone, images) - _hf_tokens(model, images, rule="v1")).max() < 1e-5


V1_RELEASES = {
    # name: (width, heads, patch, official file)
    "dino_vit_small16": (384, 6, 16, "dino_deitsmall16_pretrain"),
    "dino_vit_small8": (384, 6, 8, "dino_deitsmall8_pretrain"),
    "dino_vit_base16": (768, 12, 16, "dino_vitbase16_pretrain"),
    "dino_vit_base8": (768, 12, 8, "dino_vitbase8_pretrain"),
}


def v1_parameter_count(width, patch, depth=12, image_size=224):
    """Parameters of the official v1 VisionTransformer: embeddings, blocks, final norm (no mask token)."""
    hidden, grid = 4 * width, image_size // patch
    embeddings = patch * patch * 3 * width + width + width + (grid * grid + 1) * width
    block = 4 * width + (3 * width * width + 3 * width) + (width * width + width)
    block += (width * hidden + hidden) + (hidden * width + width)
    return embeddings + depth * block + 2 * width


@pytest.mark.once
@pytest.mark.parametrize("name", sorted(V1_RELEASES))
def test_v1_architectures(name):
    from keras_dinov2.interop import backbone_variable_shapes

    width, heads, patch, stem = V1_RELEASES[name]
    entry = ARCHITECTURES[name]
    config = entry["config"]
    assert (config["hidden_dim"], config["num_heads"], config["patch_size"], config["num_layers"]) == (
        width, heads, patch, 12)
    assert config["image_size"] == 224 and config["mlp_ratio"] == 4.0 and config["ffn_type"] == "mlp"
    assert config["layer_scale_init"] is None and config["num_register_tokens"] == 0
    assert config["interpolation"] == "original" and config["cls_token_init_std"] == 0.02
    assert entry["url"] == f"https://dl.fbaipublicfiles.com/dino/{stem}/{stem}.pth"
    # Our backbone also carries a zero mask token (D parameters) that v1 lacks.
    shapes = backbone_variable_shapes(config)
    assert sum(math.prod(s) * n for s, n in shapes.items()) == v1_parameter_count(width, patch) + width


@pytest.mark.once
def test_v1_preset_builds_without_weights():
    assert v1_parameter_count(384, 16) == 21_665_664   # the official ViT-S/16
    backbone = DINOv2Backbone.from_preset("dino_vit_small16", load_weights=False)
    assert backbone.count_params() == 21_665_664 + 384
    assert backbone.layer_scale_init is None and backbone.transformer_blocks[0].ls1 is None
    # v1's CLS token starts at the position table's scale, DINOv2's at 1e-6.
    assert 0.015 < np.std(to_numpy(backbone.embeddings.cls_token)) < 0.025
    out = backbone({"images": np.zeros((1, 64, 48, 3), "float32")})
    assert tuple(out["patch_tokens"].shape) == (1, 12, 384)
