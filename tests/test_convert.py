"""Parity with transformers' Dinov2 models, and the torch-hub and Hugging Face loaders."""

import json
import math
import re

import numpy as np
import pytest
from conftest import to_numpy

from keras_dinov2.interop import (
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


# --- Hostile and broken files: every one ends in CheckpointError, never a crash or a hang ---

from keras_dinov2.interop import CheckpointError  # noqa: E402

FOUR = np.arange(4, dtype="float32")
# (what the record claims, the words the error must contain)
BAD_RECORDS = {
    "offset past the end": (dict(offset=1 << 40, size=(4,), stride=(1,)), "reaches element"),
    "size past the end": (dict(offset=0, size=(1 << 20,), stride=(1,)), "reaches element"),
    "stride past the end": (dict(offset=0, size=(2, 2), stride=(1, 100)), "reaches element"),
    "offset plus size": (dict(offset=3, size=(2,), stride=(1,)), "reaches element 5 of"),
    "negative offset": (dict(offset=-8, size=(2,), stride=(1,)), "storage offset -8"),
    "negative stride": (dict(offset=3, size=(4,), stride=(-1,)), "not a non-negative"),
    "absurd rank": (dict(offset=0, size=(1,) * 100, stride=(1,) * 100), "rank 100"),
    "shape is a string": (dict(offset=0, size="4", stride=(1,)), "rank"),
    "strides and shape disagree": (dict(offset=0, size=(2, 2), stride=(1,)), "2 dimensions"),
    "broadcast beyond the storage": (dict(offset=0, size=(1000,), stride=(0,)), "broadcast"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_pth_tensor_records_are_checked_against_their_storage(tmp_path, case):
    from crafted import Storage, Tensor, write_state

    record, words = BAD_RECORDS[case]
    path = write_state(tmp_path / "crafted.pth",
                       {"ok": Tensor(Storage("0", 4), 0, (2, 2), (2, 1)),
                        "pos_embed": Tensor(Storage("0", 4), **record)}, {"0": FOUR})
    with pytest.raises(CheckpointError, match=rf"tensor 'pos_embed' .*{re.escape(words)}"):
        read_torch_state_dict(str(path))


def test_pth_storage_claims_are_checked(tmp_path):
    from crafted import Storage, Tensor, write_state

    # A storage record claiming more elements than its entry holds.
    path = write_state(tmp_path / "a.pth", {"w": Tensor(Storage("0", 1000), 0, (4,), (1,))},
                       {"0": FOUR})
    with pytest.raises(CheckpointError, match=r"tensor 'w' claims 1000 elements"):
        read_torch_state_dict(str(path))
    # A record naming a storage the archive does not hold.
    path = write_state(tmp_path / "b.pth", {"w": Tensor(Storage("7", 4), 0, (4,), (1,))},
                       {"0": FOUR})
    with pytest.raises(CheckpointError, match=r"lacks the archive entry archive/data/7"):
        read_torch_state_dict(str(path))
    # A value that is not a tensor.
    path = write_state(tmp_path / "c.pth", {"w": 3}, {})
    with pytest.raises(CheckpointError, match=r"'w' holds a int, not a tensor"):
        read_torch_state_dict(str(path))
    # Well-formed records still read: a transposed view, an offset slice, a 0-d tensor.
    path = write_state(tmp_path / "d.pth",
                       {"t": Tensor(Storage("0", 4), 0, (2, 2), (1, 2)),
                        "s": Tensor(Storage("0", 4), 1, (3,), (1,)),
                        "z": Tensor(Storage("0", 4), 3, (), ())}, {"0": FOUR})
    tensors = read_torch_state_dict(str(path))
    np.testing.assert_array_equal(tensors["t"], FOUR.reshape(2, 2).T)
    np.testing.assert_array_equal(tensors["s"], FOUR[1:])
    assert tensors["z"].shape == () and tensors["z"] == 3


def test_pickle_memo_bomb_is_refused_before_unpickling(tmp_path):
    from crafted import write_archive

    # PROTO 2, EMPTY_DICT, LONG_BINPUT 0xfffffff0, STOP: the C unpickler would size its memo
    # for four billion entries (64 GB) before noticing anything.
    pickled = b"\x80\x02}r\xf0\xff\xff\xff."
    path = write_archive(tmp_path / "bomb.pth", pickled, {})
    with pytest.raises(CheckpointError, match="memo slot"):
        read_torch_state_dict(str(path))


def _tiny_torch_hub_file(path, registers=0, extra=None):
    model = _random_hf_model(registers=registers, seed=3)
    state = _to_torch_hub_state_dict(model)
    state.update(extra or {})
    torch.save(state, path)
    return state


def test_truncated_and_corrupt_pth_files(tmp_path):
    good = str(tmp_path / "good.pth")
    _tiny_torch_hub_file(good)
    raw = open(good, "rb").read()
    cases = {"empty": b"", "not a zip": b"PK\x03\x04 not really a zip at all"}
    for cut in (30, len(raw) // 3, len(raw) // 2, len(raw) - 30, len(raw) - 1):
        cases[f"cut at {cut}"] = raw[:cut]
    # Header fields of the first entry (data.pkl), off by a few: the local header's name
    # length; the central directory's CRC, sizes, name length and header offset.
    central = raw.index(b"PK\x01\x02")
    for where, field in ((0, 26), (central, 16), (central, 20), (central, 24), (central, 28),
                         (central, 42)):
        wrong = bytearray(raw)
        wrong[where + field] ^= 0x07
        cases[f"header field {where}+{field}"] = bytes(wrong)
    for name, data in cases.items():
        path = tmp_path / "bad.pth"
        path.write_bytes(data)
        try:
            load_torch_hub_checkpoint(str(path))
        except CheckpointError:
            continue
        pytest.fail(f"{name}: read without an error")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_torch_hub_checkpoint(str(tmp_path / "absent.pth"))


def test_pth_block_indices_must_be_contiguous(tmp_path):
    # One stray `blocks.999999` key made the reader build a million blocks.
    path = str(tmp_path / "far.pth")
    _tiny_torch_hub_file(path, extra={"blocks.999999.norm1.weight": torch.zeros(32)})
    with pytest.raises(CheckpointError, match=r"blocks\.2 is absent"):
        load_torch_hub_checkpoint(path)
    _tiny_torch_hub_file(path)
    with pytest.raises(CheckpointError, match=r"num_heads=5 does not divide hidden_dim=32"):
        load_torch_hub_checkpoint(path, num_heads=5)
    with pytest.raises(CheckpointError, match=r"num_layers=3 does not match the tensors, which "
                                              r"hold 2 blocks"):
        load_torch_hub_checkpoint(path, num_layers=3, num_heads=2)


def _save_hf(model, folder, **kwargs):
    model.save_pretrained(folder, **kwargs)
    return json.loads((folder / "config.json").read_text())


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


HOSTILE_CONFIGS = [
    (dict(num_hidden_layers=1000000), r"num_hidden_layers=1000000 is out of bounds"),
    (dict(num_hidden_layers=3), r"num_hidden_layers=3 does not match the tensors, which hold 2"),
    (dict(hidden_size=64, num_attention_heads=2), r"hidden_size=64 does not match .* 32 wide"),
    (dict(num_attention_heads=3), r"num_attention_heads=3 does not divide hidden_size=32"),
    (dict(patch_size=8), r"image_size=56 must be a multiple|patch_size=8 does not match"),
    (dict(image_size=112), r"image_size=112 does not match .* 8 x 8 position grid"),
    (dict(image_size=10 ** 9), r"image_size=1000000000 is out of bounds"),
    (dict(mlp_ratio=2.0), r"mlp_ratio=2.0 does not match .* feed-forward 128 wide"),
    (dict(num_hidden_layers="2"), r"num_hidden_layers='2' is out of bounds"),
    (dict(num_hidden_layers=None), r"num_hidden_layers=None is out of bounds"),
    (dict(hidden_size=[32]), r"hidden_size=<list> is out of bounds"),
    (dict(num_hidden_layers=True), r"num_hidden_layers=True is out of bounds"),
    (dict(layer_norm_eps=-1.0), r"layer_norm_eps=-1.0 is out of bounds"),
    (dict(use_swiglu_ffn=True), r"use_swiglu_ffn=True does not match .* mlp feed-forward"),
    (dict(model_type="vit"), r"model_type 'dinov2' or 'dinov2_with_registers'"),
]


@pytest.mark.parametrize("changes,words", HOSTILE_CONFIGS,
                         ids=[next(iter(c)) + "=" + str(v)[:12] for c, v in
                              ((c, next(iter(c.values()))) for c, _ in HOSTILE_CONFIGS)])
def test_hostile_transformers_config_is_refused_before_building(tmp_path, changes, words):
    import time

    _save_hf(_random_hf_model(seed=4), tmp_path)
    _edit_config(tmp_path, **changes)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=words):
        load_transformers_checkpoint(str(tmp_path))
    # num_hidden_layers=1000000 ran for minutes with growing memory before it failed.
    assert time.perf_counter() - start < 5


def test_registers_in_config_must_match_the_tensors(tmp_path):
    _save_hf(_random_hf_model(registers=2, seed=5), tmp_path)
    _edit_config(tmp_path, num_register_tokens=4)
    with pytest.raises(CheckpointError, match=r"num_register_tokens=4 .* hold 2 register"):
        load_transformers_checkpoint(str(tmp_path))


def test_transformers_bin_records_are_checked(tmp_path):
    from crafted import Storage, Tensor, write_state

    model = _random_hf_model(seed=6)
    _save_hf(model, tmp_path)
    # transformers 5 writes safetensors only; a .bin is the torch.save of the state dict.
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    reference = load_transformers_checkpoint(str(tmp_path))   # the real .bin reads
    images = _images(1, 56, 56)
    np.testing.assert_allclose(_our_tokens(reference, images), _hf_tokens(model, images),
                               atol=1e-4)
    write_state(tmp_path / "pytorch_model.bin",
                {"embeddings.cls_token": Tensor(Storage("0", 4), 2, (1, 1, 32), (32, 32, 1))},
                {"0": FOUR})
    with pytest.raises(CheckpointError, match=r"tensor 'embeddings\.cls_token' .*reaches"):
        load_transformers_checkpoint(str(tmp_path))


def test_safetensors_index_cannot_leave_the_folder(tmp_path):
    import os

    model = _random_hf_model(seed=7)
    folder = tmp_path / "sharded"
    _save_hf(model, folder, max_shard_size="20KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (folder / "model.safetensors").exists()
    backbone = load_transformers_checkpoint(str(folder))   # a proper sharded folder reads
    images = _images(1, 56, 56)
    np.testing.assert_allclose(_our_tokens(backbone, images), _hf_tokens(model, images),
                               atol=1e-4)
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((folder / shards[0]).read_bytes())

    def point_first_shard_at(name):
        stored = json.loads(json.dumps(index))
        stored["weight_map"] = {k: (name if v == shards[0] else v)
                                for k, v in index["weight_map"].items()}
        (folder / "model.safetensors.index.json").write_text(json.dumps(stored))

    for name in ("../outside.safetensors", str(outside), "sub/../../outside.safetensors"):
        point_first_shard_at(name)
        with pytest.raises(CheckpointError, match="not a file name inside the folder"):
            load_transformers_checkpoint(str(folder))
    os.symlink(outside, folder / "link.safetensors")
    point_first_shard_at("link.safetensors")
    with pytest.raises(CheckpointError, match=r"link\.safetensors leads outside"):
        load_transformers_checkpoint(str(folder))
    point_first_shard_at(7)
    with pytest.raises(CheckpointError, match="<int> is not a file name"):
        load_transformers_checkpoint(str(folder))


def test_hub_cache_snapshot_links_are_followed(tmp_path):
    # huggingface_hub's cache: snapshots/<revision>/* are links into the repository's blobs/.
    import os

    _save_hf(_random_hf_model(seed=8), tmp_path / "saved")
    repo = tmp_path / "models--me--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    for i, name in enumerate(("config.json", "model.safetensors")):
        (repo / "blobs" / f"blob{i}").write_bytes((tmp_path / "saved" / name).read_bytes())
        os.symlink(f"../../blobs/blob{i}", snapshot / name)
    assert load_transformers_checkpoint(str(snapshot)).num_layers == 2


def test_corrupt_safetensors_and_configs(tmp_path):
    _save_hf(_random_hf_model(seed=9), tmp_path)
    weights = tmp_path / "model.safetensors"
    raw = weights.read_bytes()
    header = int.from_bytes(raw[:8], "little")
    cases = {
        "truncated": raw[: len(raw) // 2],
        "header length too big": (len(raw) * 4).to_bytes(8, "little") + raw[8:],
        "header length too small": (header - 3).to_bytes(8, "little") + raw[8:],
        "empty": b"",
    }
    for name, data in cases.items():
        weights.write_bytes(data)
        with pytest.raises(CheckpointError) as refused:
            load_transformers_checkpoint(str(tmp_path))
        assert "model.safetensors is not a readable" in str(refused.value), name
    weights.write_bytes(raw)
    for text, words in (('{"model_type": ', "not valid JSON"), ("[1, 2]", "holds a list"),
                        ("[" * 100000 + "]" * 100000, "not valid JSON")):
        (tmp_path / "config.json").write_text(text)
        with pytest.raises(CheckpointError, match=words):
            load_transformers_checkpoint(str(tmp_path))
