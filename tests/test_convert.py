"""Parity with transformers' Dinov2 models, and the torch-hub and Hugging Face loaders."""

import math

import numpy as np
import pytest
from conftest import to_numpy

from keras_dinov2.convert import (
    load_torch_hub_checkpoint,
    load_transformers_checkpoint,
    read_torch_state_dict,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
F = torch.nn.functional

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=56,
             patch_size=7)


def _random_hf_model(registers=0, swiglu=False, seed=0):
    torch.manual_seed(seed)
    if registers:
        config = transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **SMALL)
        model = transformers.Dinov2WithRegistersModel(config)
    else:
        config = transformers.Dinov2Config(use_swiglu_ffn=swiglu, **SMALL)
        model = transformers.Dinov2Model(config)
    # Re-randomize everything, LayerScale and the mask token included, so every part matters.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    return model.eval()


def _hf_tokens(model, images, masks=None):
    pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    kwargs = {} if masks is None else {"bool_masked_pos": torch.from_numpy(masks)}
    with torch.no_grad():
        return model(pixel_values=pixels, **kwargs).last_hidden_state.numpy()


def _our_tokens(backbone, images, masks=None):
    inputs = {"images": images} if masks is None else {"images": images, "masks": masks}
    out = backbone(inputs)
    return np.concatenate(
        [to_numpy(out["cls_token"])[:, None], to_numpy(out["register_tokens"]),
         to_numpy(out["patch_tokens"])], axis=1)


def _images(batch, height, width, seed=0):
    return np.random.default_rng(seed).random((batch, height, width, 3)).astype("float32")


@pytest.mark.parametrize(
    "registers,swiglu", [(0, False), (0, True), (2, False)], ids=["dinov2", "swiglu", "reg"]
)
def test_transformers_parity(tmp_path, registers, swiglu):
    model = _random_hf_model(registers, swiglu)
    model.save_pretrained(tmp_path)
    backbone = load_transformers_checkpoint(str(tmp_path))
    assert backbone.interpolation == ("registers" if registers else "transformers")
    for height, width in [(56, 56), (28, 28), (42, 70)]:
        images = _images(2, height, width, seed=height + width)
        diff = np.abs(_our_tokens(backbone, images) - _hf_tokens(model, images)).max()
        assert diff < 1e-4, (height, width, diff)
    masks = np.random.default_rng(5).random((2, 64)) < 0.4
    images = _images(2, 56, 56, seed=9)
    diff = np.abs(_our_tokens(backbone, images, masks) - _hf_tokens(model, images, masks)).max()
    assert diff < 1e-4


def _to_torch_hub_state_dict(model, chunked=False):
    """Renames a transformers state dict to the official torch-hub layout, independently."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = {
        "cls_token": sd.pop("embeddings.cls_token"),
        "mask_token": sd.pop("embeddings.mask_token"),
        "pos_embed": sd.pop("embeddings.position_embeddings"),
        "patch_embed.proj.weight": sd.pop("embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": sd.pop("embeddings.patch_embeddings.projection.bias"),
        "norm.weight": sd.pop("layernorm.weight"),
        "norm.bias": sd.pop("layernorm.bias"),
    }
    if "embeddings.register_tokens" in sd:
        out["register_tokens"] = sd.pop("embeddings.register_tokens")
    for i in range(model.config.num_hidden_layers):
        h = f"encoder.layer.{i}."
        t = f"blocks.0.{i}." if chunked else f"blocks.{i}."
        # transformers 5 names q_proj / k_proj / v_proj / o_proj in memory.
        for kind in ("weight", "bias"):
            out[t + f"attn.qkv.{kind}"] = torch.cat(
                [sd.pop(h + f"attention.{part}_proj.{kind}") for part in ("q", "k", "v")])
            out[t + f"attn.proj.{kind}"] = sd.pop(h + f"attention.o_proj.{kind}")
            for name in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[t + f"{name}.{kind}"] = sd.pop(h + f"{name}.{kind}")
        out[t + "ls1.gamma"] = sd.pop(h + "layer_scale1.lambda1")
        out[t + "ls2.gamma"] = sd.pop(h + "layer_scale2.lambda1")
    assert not sd, sorted(sd)
    return out


def _original_release_interpolation(self, embeddings, height, width):
    """The first DINOv2 release's rule: scale_factor (g + 0.1) / M, no antialias."""
    num_patches = embeddings.shape[1] - 1
    num_positions = self.position_embeddings.shape[1] - 1
    if num_patches == num_positions and height == width:
        return self.position_embeddings
    side = int(math.sqrt(num_positions))
    grid = self.position_embeddings[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    gh, gw = height // self.patch_size, width // self.patch_size
    grid = F.interpolate(grid, scale_factor=((gh + 0.1) / side, (gw + 0.1) / side),
                         mode="bicubic", antialias=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, grid.shape[1])
    return torch.cat([self.position_embeddings[:, :1], grid], dim=1)


@pytest.mark.parametrize("chunked", [False, True])
def test_torch_hub_checkpoint_original_release(tmp_path, chunked, monkeypatch):
    model = _random_hf_model(seed=1)
    path = str(tmp_path / "dinov2_test_pretrain.pth")
    torch.save(_to_torch_hub_state_dict(model, chunked), path)
    backbone = load_torch_hub_checkpoint(path)
    config = backbone.get_config()
    assert (config["hidden_dim"], config["num_layers"], config["patch_size"]) == (32, 2, 7)
    assert config["image_size"] == 56 and config["interpolation"] == "original"
    assert config["num_heads"] == 1  # width / 64, floored at one head, as the hub models
    backbone = load_torch_hub_checkpoint(path, num_heads=2)
    # The official rule differs from transformers' at interpolated sizes: patch the torch
    # model with the official rule to get an independent reference.
    embeddings = model.embeddings
    monkeypatch.setattr(embeddings, "patch_size", 7, raising=False)
    monkeypatch.setattr(
        embeddings, "interpolate_pos_encoding",
        _original_release_interpolation.__get__(embeddings), raising=False)
    for height, width in [(56, 56), (28, 28), (42, 70)]:
        images = _images(2, height, width, seed=height)
        diff = np.abs(_our_tokens(backbone, images) - _hf_tokens(model, images)).max()
        assert diff < 1e-4, (height, width, diff)


def test_torch_hub_loader_reports_the_first_mismatching_key(tmp_path):
    model = _random_hf_model(seed=2)
    state = _to_torch_hub_state_dict(model)
    state["blocks.1.attn.proj.weight"] = torch.zeros(3, 3)
    path = str(tmp_path / "bad.pth")
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.proj\.weight.*\(3, 3\)"):
        load_torch_hub_checkpoint(path, num_heads=2)
    del state["blocks.1.attn.proj.weight"]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"no tensor 'blocks\.1\.attn\.proj\.weight'"):
        load_torch_hub_checkpoint(path, num_heads=2)


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_state_dict_reader_refuses_arbitrary_objects_and_reads_bfloat16(tmp_path):
    path = str(tmp_path / "evil.pth")
    torch.save({"x": _Payload()}, path)
    with pytest.raises(Exception, match="Refusing"):
        read_torch_state_dict(path)
    values = torch.randn(4, 3)
    torch.save({"w": values.to(torch.bfloat16), "t": values.t(), "s": values[1:, 1]}, path)
    tensors = read_torch_state_dict(path)
    np.testing.assert_array_equal(tensors["w"], values.to(torch.bfloat16).float().numpy())
    np.testing.assert_array_equal(tensors["t"], values.t().numpy())
    np.testing.assert_array_equal(tensors["s"], values[1:, 1].numpy())
