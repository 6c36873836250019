"""Export: our preset with heads, keras-hub presets, transformers folders, the Hub upload, import."""

import base64
import contextlib
import http.server
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import warnings
from urllib.parse import urlparse

import keras
import numpy as np
import pytest
from conftest import to_numpy

from keras_dinov2.backbone import DINOv2Backbone
from keras_dinov2.cli import main
from keras_dinov2.export import (
    ExportWarning,
    UploadError,
    export,
    load_run,
    push_to_hub,
)
from keras_dinov2.export.verify import forward
from keras_dinov2.interop import (
    check_preset_folder,
    import_keras_hub_preset,
    load_backbone,
    load_heads,
    restore_heads,
)
from keras_dinov2.pretrainer import DINOv2Pretrainer
from keras_dinov2.run import save_checkpoint

PATCH, SIZE, OTHER = 4, 16, 24


def tokens(model, x):
    """[CLS, registers, patches] after the final norm, from our backbone or a keras-hub one."""
    out = forward(model, {"images": x})   # one jitted call under JAX, eager elsewhere
    if isinstance(out, dict):
        return np.concatenate([out["cls_token"][:, None], out["register_tokens"],
                               out["patch_tokens"]], axis=1)
    return out


def images(size, seed=0, width=None):
    shape = (2, size, width or size, 3)
    return np.random.default_rng(seed).standard_normal(shape).astype("float32")


def randomize(model, scale=0.3, seed=0):
    rng = np.random.default_rng(seed)
    for v in model.weights:
        v.assign(rng.normal(0.0, scale, v.shape).astype("float32"))


KERAS_HUB_ALONE = r"""
import sys
import keras
import keras_hub
import numpy as np
hub = keras_hub.models.Backbone.from_preset(sys.argv[1])
converter = keras_hub.layers.ImageConverter.from_preset(sys.argv[1])
hf = keras_hub.models.Backbone.from_preset(sys.argv[2])
x = {"images": np.load(sys.argv[3])}
assert "keras_dinov2" not in sys.modules, "keras_dinov2 was imported"
jax = keras.backend.backend() == "jax"   # one compilation instead of one per operation
hub_out = hub.predict_on_batch(x) if jax else hub(x)
hf_out = hf.predict_on_batch(x) if jax else hf(x)
np.savez(sys.argv[4], hub=keras.ops.convert_to_numpy(hub_out),
         hf=keras.ops.convert_to_numpy(hf_out),
         table=keras.ops.convert_to_numpy(hub.embeddings.position_embeddings),
         kind=np.array([type(hub).__name__, type(hf).__name__, type(converter).__name__]))
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A short real run (two optimizer steps of the tiny pretrainer), exported three ways."""
    from test_pretrainer import dataset, make_batch, tiny_config

    root = tmp_path_factory.mktemp("export")
    keras.utils.set_random_seed(0)
    init = DINOv2Backbone(patch_size=PATCH, hidden_dim=16, num_layers=2, num_heads=2,
                          image_size=SIZE, interpolation="transformers", layer_scale_init=0.1)
    init.save_to_preset(str(root / "init"))
    config = tiny_config(warmup_epochs=0)
    model = DINOv2Pretrainer(DINOv2Backbone.from_preset(str(root / "init")), config,
                             steps_per_epoch=config.optim.steps_per_epoch)
    model.compile()
    model.fit(dataset([make_batch(0), make_batch(1)]), epochs=1, verbose=0)
    run_dir = root / "run"
    run_dir.mkdir()
    with open(run_dir / "config.json", "w") as f:
        json.dump({"ssl": config.to_dict(), "model": str(root / "init"), "data": "digits",
                   "backend": keras.backend.backend()}, f)
    save_checkpoint(model, str(run_dir / "checkpoint-00001.npz"), {"epoch": 1})
    (run_dir / "epochs.csv").write_text("epoch,step,loss,knn_top1,knn_top1_random_init\n"
                                        "1,2,9.5,61.5,40.25\n")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), warnings.catch_warnings():
        warnings.simplefilter("ignore", ExportWarning)
        source = load_run(str(run_dir))
        results = {
            "keras_dinov2": export(source, str(root / "ours"), "keras_dinov2", heads=True),
            "transformers": export(source, str(root / "hf"), "transformers"),
        }
        assert main(["export", "--run", str(run_dir), "--format", "keras_hub",
                     "--out", str(root / "hub")]) == 0
    # keras-hub alone, in a fresh process, runs while the other tests do.
    x = images(SIZE, seed=3)
    np.save(root / "x.npy", x)
    env = {**os.environ, "KERAS_BACKEND": keras.backend.backend(), "TF_CPP_MIN_LOG_LEVEL": "3"}
    alone = subprocess.Popen(
        [sys.executable, "-c", KERAS_HUB_ALONE, str(root / "hub"), str(root / "hf"),
         str(root / "x.npy"), str(root / "alone.npz")],
        cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=open(root / "alone.log", "w"))
    yield {"root": root, "run": run_dir, "model": model, "source": source, "log": out.getvalue(),
           "results": results, "ours": str(root / "ours"), "hf": str(root / "hf"),
           "hub": str(root / "hub"), "alone": alone, "x": x}
    if alone.poll() is None:
        alone.kill()
    alone.wait()


def test_run_exports_the_teacher_with_its_heads(run):
    model, source = run["model"], run["source"]
    assert source.info["steps"] == 2 and source.info["epoch"] == 1
    student = to_numpy(model.student.embeddings.position_embedding)
    teacher = to_numpy(model.teacher.embeddings.position_embedding)
    assert np.abs(student - teacher).max() > 0  # training moved them apart: the teacher is exported
    loaded = DINOv2Backbone.from_preset(run["ours"])
    np.testing.assert_array_equal(to_numpy(loaded.embeddings.position_embedding), teacher)
    for size in (SIZE, OTHER):
        x = images(size, seed=size)
        np.testing.assert_allclose(tokens(loaded, x), tokens(model.teacher, x), atol=1e-4)

    heads = load_heads(run["ours"])
    assert heads["ibot_separate_head"]
    cls = forward(model.teacher, {"images": images(SIZE)})["cls_token"]
    for name, head in (("dino_head", model.teacher_dino_head),
                       ("ibot_head", model.teacher_ibot_head)):
        np.testing.assert_allclose(to_numpy(heads[name](cls)), to_numpy(head(cls)), atol=1e-5)
    np.testing.assert_array_equal(heads["dino_center"], to_numpy(model.dino_center))

    # A later run continues from the export: both students and teachers get the heads.
    from test_pretrainer import tiny_config

    fresh = DINOv2Pretrainer(DINOv2Backbone.from_preset(run["ours"]), tiny_config())
    restore_heads(fresh, run["ours"])
    for layer in (fresh.student_ibot_head, fresh.teacher_ibot_head):
        np.testing.assert_allclose(to_numpy(layer(cls)), to_numpy(model.teacher_ibot_head(cls)),
                                   atol=1e-5)
    for result in run["results"].values():
        assert all(c["max_abs_diff"] <= 1e-4 for c in result.checks if c["exact"])
    assert "max |diff|" in run["log"] and "FAILED" not in run["log"]


def test_pretrain_continues_from_an_export_with_heads(run, tmp_path, capsys):
    # `keras-dinov2 pretrain --model EXPORT` takes the exported heads (sizes and weights), not the
    # recipe's fresh ones. In the first step the last layer is frozen in the student, so the
    # teacher's EMA leaves it where the export put it.
    out = str(tmp_path / "continued")
    assert main(["pretrain", "--model", run["ours"], "--out", out, "--epochs", "1",
                 "--steps-per-epoch", "1", "--batch-size", "8", "--verbose", "0"]) == 0
    assert "Continuing from the heads" in capsys.readouterr().out
    with open(os.path.join(out, "config.json")) as f:
        heads = json.load(f)["ssl"]["heads"]
    assert (heads["num_prototypes"], heads["ibot_num_prototypes"]) == (32, 16)
    exported = load_heads(run["ours"])
    saved = np.load(os.path.join(out, "checkpoint-00001.npz"))
    paths = list(saved["__paths__"])
    for name in ("dino_head", "ibot_head"):
        last = exported[name].last_layer.weight_v
        index = paths.index(f"teacher_{name}/last_layer/weight_v")
        np.testing.assert_allclose(saved[f"v{index:05d}"], to_numpy(last), atol=1e-6)


def test_model_card_has_hub_metadata_and_the_run(run):
    card = open(os.path.join(run["ours"], "README.md")).read()
    meta = card.split("---")[1]
    for key in ("library_name: keras-hub", "license: apache-2.0", "tags:",
                "pipeline_tag: image-feature-extraction"):
        assert key in meta, key
    assert "teacher" in card and "61.5%" in card and "40.2%" in card and "2 optimizer steps" in card
    for loader in ("DINOv2Backbone.from_preset", "keras_hub.models.Backbone.from_preset",
                   "AutoModel.from_pretrained"):
        assert loader in card
    assert "library_name: transformers" in open(os.path.join(run["hf"], "README.md")).read()




def test_keras_hub_loads_both_exports_without_keras_dinov2(run):
    assert run["alone"].wait(timeout=900) == 0, (run["root"] / "alone.log").read_text()[-3000:]
    x = run["x"]
    out = np.load(run["root"] / "alone.npz")
    assert list(out["kind"]) == ["DINOV2Backbone", "DINOV2Backbone", "DINOV2ImageConverter"]
    want = tokens(run["model"].teacher, x)
    np.testing.assert_allclose(out["hub"], want, atol=1e-4)
    np.testing.assert_allclose(out["hf"], want, atol=1e-4)
    np.testing.assert_array_equal(
        out["table"], to_numpy(run["model"].teacher.embeddings.position_embedding))


def test_transformers_export_loads_in_torch(run):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModel.from_pretrained(run["hf"]).eval()
    assert type(model).__name__ == "Dinov2Model"
    for height, width in ((SIZE, SIZE), (OTHER, OTHER), (SIZE, OTHER)):
        x = images(height, seed=height + width, width=width)
        with torch.no_grad():
            got = model(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
        want = tokens(run["model"].teacher, x)
        np.testing.assert_allclose(got.last_hidden_state.numpy(), want, atol=1e-4)
        np.testing.assert_allclose(got.pooler_output.numpy(), want[:, 0], atol=1e-4)
    processor = transformers.AutoImageProcessor.from_pretrained(run["hf"])
    assert processor.crop_size == {"height": SIZE, "width": SIZE}


def test_registers_swiglu_export_keeps_positive_position_updates(tmp_path):
    # keras-hub saves its position table only when a signed sum says it changed; a trained
    # table shifted upwards must still survive, and the registers rule is exact everywhere.
    keras.utils.set_random_seed(1)
    backbone = DINOv2Backbone(patch_size=PATCH, hidden_dim=16, num_layers=1, num_heads=2,
                              image_size=SIZE, num_register_tokens=2, ffn_type="swiglu",
                              interpolation="registers", layer_scale_init=0.5)
    randomize(backbone, seed=1)
    table = backbone.embeddings.position_embedding
    table.assign(to_numpy(table) + 0.5)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("error", ExportWarning)   # every format is exact: no warning
        hub = export(backbone, str(tmp_path / "hub"), "keras_hub")
        hf = export(backbone, str(tmp_path / "hf"), "transformers")
    for result in (hub, hf):
        interpolated = [c for c in result.checks if not c["native"]]
        assert interpolated and all(c["exact"] and c["max_abs_diff"] < 1e-4 for c in interpolated)
    import keras_hub

    reloaded = keras_hub.models.Backbone.from_preset(str(tmp_path / "hub"))
    np.testing.assert_array_equal(to_numpy(reloaded.embeddings.position_embeddings),
                                  to_numpy(table))
    assert json.load(open(tmp_path / "hf" / "config.json"))["model_type"] == "dinov2_with_registers"
    # Back into our backbone from the keras-hub preset and from the transformers folder.
    x = images(OTHER, seed=4)
    for folder in (tmp_path / "hub", tmp_path / "hf"):
        np.testing.assert_allclose(tokens(load_backbone(str(folder)), x), tokens(backbone, x),
                                   atol=1e-4)


def test_original_rule_cannot_be_exact_in_transformers_and_says_so(tmp_path):
    keras.utils.set_random_seed(2)
    backbone = DINOv2Backbone(patch_size=PATCH, hidden_dim=16, num_layers=1, num_heads=2,
                              image_size=SIZE, interpolation="original", layer_scale_init=None)
    randomize(backbone, seed=2)
    with contextlib.redirect_stdout(io.StringIO()), pytest.warns(ExportWarning, match="0.1"):
        result = export(backbone, str(tmp_path / "hf"), "transformers")
    native = [c for c in result.checks if c["native"]]
    assert native and all(c["exact"] and c["max_abs_diff"] < 1e-4 for c in native)
    assert not any(c["exact"] for c in result.checks if not c["native"])
    card = open(tmp_path / "hf" / "README.md").read()
    assert "| transformers (dinov2) | no | " in card and "0.1 scale offset" in card


def test_import_keras_hub_preset_parity(tmp_path):
    import keras_hub

    keras.utils.set_random_seed(3)
    hub = keras_hub.models.DINOV2Backbone(
        patch_size=PATCH, num_layers=1, hidden_dim=16, num_heads=2, intermediate_dim=48,
        layer_scale_init_value=0.7, num_register_tokens=1, image_shape=(SIZE, SIZE, 3),
        position_embedding_shape=(SIZE, SIZE, 3), antialias_in_interpolation=True)
    randomize(hub, seed=3)
    emb = hub.embeddings
    emb.interpolated_position_embeddings.assign(to_numpy(emb.position_embeddings))
    hub.save_to_preset(str(tmp_path / "hub"))
    ours = import_keras_hub_preset(str(tmp_path / "hub"))
    assert (ours.interpolation, ours.image_size, ours.mlp_ratio) == ("registers", SIZE, 3.0)
    x = images(SIZE, seed=5)
    np.testing.assert_allclose(tokens(ours, x), tokens(hub, x), atol=1e-4)
    other = keras_hub.models.Backbone.from_preset(str(tmp_path / "hub"),
                                                  image_shape=(OTHER, OTHER, 3))
    x = images(OTHER, seed=6)
    np.testing.assert_allclose(tokens(ours, x), tokens(other, x), atol=1e-4)


class FakeHub:
    """The Hub endpoints huggingface_hub calls to create a repo, a branch and a commit."""

    def __init__(self):
        self.requests, self.created, self.branches, self.commits, self.files = [], [], [], [], {}
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def reply(self, code, payload):
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                hub.requests.append(("GET", self.path, self.headers.get("Authorization")))
                self.reply(404, {"error": "not served"})

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = urlparse(self.path).path
                hub.requests.append(("POST", path, self.headers.get("Authorization")))
                if path == "/api/repos/create":
                    hub.created.append(json.loads(body))
                    payload = hub.created[-1]
                    return self.reply(200, {"url": f"{hub.url}/{payload['organization']}/{payload['name']}"})
                if path == "/api/validate-yaml":
                    return self.reply(200, {"errors": [], "warnings": []})
                match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit|branch)/(.+)",
                                     path)
                if not match:
                    return self.reply(404, {"error": "not served"})
                repo, kind, revision = match.groups()
                if kind == "branch":
                    hub.branches.append((repo, revision))
                    return self.reply(200, {})
                if kind == "preupload":
                    files = json.loads(body)["files"]
                    return self.reply(200, {"files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                        for f in files]})
                lines = [json.loads(line) for line in body.decode().splitlines() if line]
                hub.commits.append((repo, revision, lines[0]["value"]))
                for item in lines[1:]:
                    assert item["key"] == "file", item["key"]
                    hub.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                return self.reply(200, {"commitUrl": f"{hub.url}/{repo}/commit/{'a' * 40}",
                                        "commitOid": "a" * 40})

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_hub(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    hub = FakeHub()
    yield hub
    hub.close()


def _contents(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)}


def test_push_uploads_exactly_the_export(run, fake_hub):
    url = push_to_hub(run["hf"], "hf://tester/dinov2-tiny", private=True, revision="v1",
                      commit_message="First export", token="hf_test", endpoint=fake_hub.url)
    assert url.endswith("/commit/" + "a" * 40)
    assert fake_hub.files == _contents(run["hf"])
    assert set(fake_hub.files) == {"README.md", "config.json", "model.safetensors",
                                   "preprocessor_config.json"}
    assert fake_hub.created == [{"name": "dinov2-tiny", "organization": "tester",
                                 "visibility": "private", "type": "model"}]
    assert fake_hub.branches == [("tester/dinov2-tiny", "v1")]
    assert fake_hub.commits[0][:2] == ("tester/dinov2-tiny", "v1")
    assert fake_hub.commits[0][2]["summary"] == "First export"
    assert all(auth == "Bearer hf_test" for _, _, auth in fake_hub.requests)


def test_cli_export_from_a_preset_and_push(run, fake_hub, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", fake_hub.url)
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    out = str(tmp_path / "hub")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExportWarning)
        assert main(["export", "--preset", run["ours"], "--format", "keras_hub", "--out", out,
                     "--push", "hf://tester/dinov2-hub"]) == 0
    assert "Pushed to hf://tester/dinov2-hub" in capsys.readouterr().out
    assert fake_hub.files == _contents(out)
    assert {"config.json", "model.weights.h5", "image_converter.json"} <= set(fake_hub.files)
    assert fake_hub.commits[0][1] == "main"


def test_missing_token_or_network_keeps_the_export(run, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "none"))
    before = _contents(run["hf"])
    with pytest.raises(UploadError, match="No Hugging Face token.*HF_TOKEN.*intact"):
        push_to_hub(run["hf"], "hf://tester/dinov2-tiny")
    assert main(["export", "--preset", run["ours"], "--format", "keras_dinov2",
                 "--out", str(tmp_path / "local"), "--push", "hf://tester/x"]) == 3
    assert "No Hugging Face token" in capsys.readouterr().err
    check_preset_folder(str(tmp_path / "local"))   # the export itself is complete
    # A refused connection (nothing listens on the port) is reported the same way.
    with pytest.raises(UploadError, match="Could not create the repository.*intact"):
        push_to_hub(run["hf"], "tester/dinov2-tiny", token="hf_x", endpoint="http://127.0.0.1:9")
    assert _contents(run["hf"]) == before


def test_corrupted_folders_name_the_file(run, tmp_path):
    ours = tmp_path / "ours"
    shutil.copytree(run["ours"], ours)
    os.remove(ours / "model.weights.h5")
    with pytest.raises(ValueError, match=r"model\.weights\.h5 is missing"):
        load_backbone(str(ours))
    shutil.copytree(run["hub"], tmp_path / "hub")
    (tmp_path / "hub" / "config.json").write_text('{"registered_name": ')
    with pytest.raises(ValueError, match=r"hub/config\.json is not valid JSON"):
        import_keras_hub_preset(str(tmp_path / "hub"))
    shutil.copytree(run["ours"], tmp_path / "heads")
    os.remove(tmp_path / "heads" / "heads.weights.npz")
    with pytest.raises(ValueError, match=r"heads\.weights\.npz is missing"):
        check_preset_folder(str(tmp_path / "heads"))
    with pytest.raises(ValueError, match=r"heads\.weights\.npz is missing"):
        load_heads(str(tmp_path / "heads"))
    shutil.copytree(run["hf"], tmp_path / "hf")
    os.remove(tmp_path / "hf" / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors is missing"):
        load_backbone(str(tmp_path / "hf"))


def test_export_arguments_are_checked(run, tmp_path):
    with pytest.raises(ValueError, match="`format`"):
        export(run["source"], str(tmp_path / "a"), format="onnx")
    with pytest.raises(ValueError, match="`heads`"):
        export(run["source"], str(tmp_path / "a"), format="keras_hub", heads=True)
    with pytest.raises(ValueError, match="not empty"):
        export(run["source"], run["hf"], format="transformers")
    with pytest.raises(ValueError, match="hf://user/repo"):
        export(run["source"], str(tmp_path / "a"), push="s3://bucket/x")


# --- Round trips: export -> convert (read back) -> export, every variant and format ---

from keras_dinov2.config import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from keras_dinov2.export.keras_hub_format import save_keras_hub_preset  # noqa: E402
from keras_dinov2.export.transformers_format import save_transformers  # noqa: E402
from keras_dinov2.interop import CheckpointError  # noqa: E402

ROUND_TRIP_VARIANTS = [(registers, ffn, mode) for registers in (0, 2)
                       for ffn in ("mlp", "swiglu")
                       for mode in ("original", "registers", "transformers")]


def tiny_backbone(registers=0, ffn="mlp", mode="transformers", seed=0, **kwargs):
    keras.utils.set_random_seed(seed)
    config = dict(patch_size=PATCH, hidden_dim=16, num_layers=1, num_heads=2, image_size=SIZE,
                  num_register_tokens=registers, ffn_type=ffn, interpolation=mode,
                  layer_scale_init=0.5)
    backbone = DINOv2Backbone(**{**config, **kwargs})
    randomize(backbone, seed=seed)
    return backbone


def write_format(backbone, fmt, folder):
    """The writer `export(format=fmt)` runs, without its verification and model card."""
    if fmt == "keras_dinov2":
        backbone.save_to_preset(str(folder))
    elif fmt == "keras_hub":
        save_keras_hub_preset(backbone, str(folder), IMAGENET_MEAN, IMAGENET_STD)
    else:
        save_transformers(backbone, str(folder), IMAGENET_MEAN, IMAGENET_STD)


def stored_arrays(fmt, folder):
    """Every array a format wrote, as sorted (shape, bytes) pairs (layer names aside)."""
    if fmt == "transformers":
        from safetensors.numpy import load_file

        return sorted((k, v.shape, v.tobytes())
                      for k, v in load_file(str(folder / "model.safetensors")).items())
    import h5py

    arrays = []
    with h5py.File(folder / "model.weights.h5", "r") as f:
        f.visititems(lambda name, item: arrays.append((item.shape, item[()].tobytes()))
                     if isinstance(item, h5py.Dataset) else None)
    return sorted(arrays)


def expected_rule(fmt, registers, mode):
    """The interpolation rule a backbone has after a round trip through `fmt`."""
    if fmt == "keras_dinov2":
        return mode
    if fmt == "keras_hub":   # keras-hub has two rules: with antialias, or without
        return "registers" if mode == "registers" else "transformers"
    return "registers" if registers or mode == "registers" else "transformers"


@pytest.mark.parametrize("fmt", ["keras_dinov2", "keras_hub", "transformers"])
@pytest.mark.parametrize("registers,ffn,mode", ROUND_TRIP_VARIANTS,
                         ids=[f"reg{r}-{f}-{m}" for r, f, m in ROUND_TRIP_VARIANTS])
def test_export_convert_export_round_trip(tmp_path, fmt, registers, ffn, mode):
    backbone = tiny_backbone(registers, ffn, mode, seed=registers + len(ffn) + len(mode))
    write_format(backbone, fmt, tmp_path / "first")
    converted = load_backbone(str(tmp_path / "first"))
    assert converted.interpolation == expected_rule(fmt, registers, mode)
    assert (converted.num_register_tokens, converted.ffn_type) == (registers, ffn)
    write_format(converted, fmt, tmp_path / "second")
    again = load_backbone(str(tmp_path / "second"))
    x = images(SIZE, seed=7)
    want = tokens(backbone, x)
    np.testing.assert_allclose(tokens(converted, x), want, atol=1e-5)
    np.testing.assert_allclose(tokens(again, x), want, atol=1e-5)
    # The round trip is a fixed point: the second export holds exactly the first's arrays
    # and the same architecture.
    assert stored_arrays(fmt, tmp_path / "second") == stored_arrays(fmt, tmp_path / "first")
    first, second = (json.loads((tmp_path / d / "config.json").read_text())
                     for d in ("first", "second"))
    if fmt != "transformers":
        first, second = ({k: v for k, v in c["config"].items() if k != "name"}
                         for c in (first, second))
    assert first == second


def test_transformers_export_without_registers_converts_back(tmp_path, capsys):
    # The registers rule without registers exports as Dinov2WithRegistersModel with zero
    # registers. It used to write an empty (1, 0, D) `register_tokens` tensor that
    # `keras-dinov2 convert --from transformers` then refused as unused.
    from safetensors.numpy import load_file, save_file

    backbone = tiny_backbone(0, "mlp", "registers", seed=11)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("error", ExportWarning)   # exact in every format
        export(backbone, str(tmp_path / "hf"), "transformers")
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert not any("register" in k for k in tensors)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_register_tokens"] == 0
    assert main(["convert", "--from", "transformers", str(tmp_path / "hf"),
                 "--out", str(tmp_path / "ours")]) == 0
    assert "0 registers" in capsys.readouterr().out
    x = images(OTHER, seed=8)   # the registers rule holds at other sizes too
    converted = DINOv2Backbone.from_preset(str(tmp_path / "ours"))
    np.testing.assert_allclose(tokens(converted, x), tokens(backbone, x), atol=1e-5)
    # Folders written before the fix, with the empty tensor, read as well.
    tensors["embeddings.register_tokens"] = np.zeros((1, 0, 16), "float32")
    save_file(tensors, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    np.testing.assert_allclose(tokens(load_backbone(str(tmp_path / "hf")), x),
                               tokens(backbone, x), atol=1e-5)


# --- Preset configs are checked against bounds and their weights before a model is built ---


def _edit_preset_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["config"].update(changes)
    path.write_text(json.dumps(config))


OUR_PRESET_CONFIGS = [
    (dict(num_layers=1000000), r"num_layers=1000000 is out of bounds"),
    (dict(num_layers=3), r"num_layers=3 does not match the weights, which hold 1 blocks"),
    (dict(hidden_dim=32, num_heads=2), r"hidden_dim=32 does not match .* \(4, 4, 3, 16\)"),
    (dict(num_heads=3), r"num_heads=3 does not divide hidden_dim=16"),
    (dict(image_size=32), r"lacks arrays of shape \(1, 65, 16\)"),
    (dict(image_size=18), r"image_size=18 must be a multiple of patch_size=4"),
    (dict(num_register_tokens=3), r"lacks arrays of shape \(1, 3, 16\)"),
    (dict(ffn_type="swiglu"), r"weights do not match"),
    (dict(mlp_ratio=1e9), r"mlp_ratio=1000000000.0 is out of bounds"),
    (dict(layer_scale_init=None), r"holds arrays of shape 2 x \(16,\) the config does not use"),
    (dict(interpolation="nearest"), r"interpolation='nearest' is out of bounds"),
    (dict(patch_size="4"), r"patch_size='4' is out of bounds"),
]
HUB_PRESET_CONFIGS = [
    (dict(num_layers=1000000), r"num_layers=1000000 is out of bounds"),
    (dict(num_layers=2), r"num_layers=2 does not match the weights, which hold 1 blocks"),
    (dict(image_shape=[100000, 100000, 3]), r"image_shape=\[100000, 100000, 3\] must hold"),
    (dict(position_embedding_shape=[32, 32, 3]), r"lacks arrays of shape \(1, 65, 16\)"),
    (dict(intermediate_dim=10 ** 8), r"intermediate_dim=100000000 is out of bounds"),
    (dict(intermediate_dim=32), r"lacks arrays of shape .*\(16, 32\)"),
    (dict(num_heads=4), r"lacks arrays of shape .*\(16, 4, 4\)"),
    (dict(use_swiglu_ffn="yes"), r"use_swiglu_ffn must be true or false"),
]


def _change_id(changes):
    key, value = next(iter(changes.items()))
    return f"{key}={str(value).replace(' ', '')[:12]}"


@pytest.fixture(scope="module")
def tiny_presets(tmp_path_factory):
    root = tmp_path_factory.mktemp("presets")
    backbone = tiny_backbone(1, "mlp", "registers", seed=12)
    write_format(backbone, "keras_dinov2", root / "ours")
    write_format(backbone, "keras_hub", root / "hub")
    return root


@pytest.mark.parametrize("fmt,changes,words",
                         [("ours", c, w) for c, w in OUR_PRESET_CONFIGS]
                         + [("hub", c, w) for c, w in HUB_PRESET_CONFIGS],
                         ids=[f"ours-{_change_id(c)}" for c, _ in OUR_PRESET_CONFIGS]
                         + [f"hub-{_change_id(c)}" for c, _ in HUB_PRESET_CONFIGS])
def test_preset_config_is_checked_before_building(tiny_presets, tmp_path, fmt, changes, words):
    import time

    folder = tmp_path / fmt
    shutil.copytree(tiny_presets / fmt, folder)
    _edit_preset_config(folder, **changes)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=words):
        load_backbone(str(folder))
    if fmt == "ours":
        with pytest.raises(CheckpointError, match=words):
            DINOv2Backbone.from_preset(str(folder))
    else:
        with pytest.raises(CheckpointError, match=words):
            import_keras_hub_preset(str(folder))
    assert time.perf_counter() - start < 5   # a million blocks used to be built first


def test_variable_shape_formulas_match_the_built_models():
    # The preset checks compare config.json with the weights through these formulas: they
    # must describe exactly the variables the models create.
    import collections

    import keras_hub

    from keras_dinov2.export.keras_hub_format import keras_hub_config
    from keras_dinov2.interop import backbone_variable_shapes, keras_hub_variable_shapes

    for registers, ffn, scale in ((0, "mlp", 0.5), (3, "swiglu", None), (1, "mlp", None)):
        backbone = DINOv2Backbone(patch_size=PATCH, hidden_dim=24, num_layers=2, num_heads=3,
                                  image_size=SIZE, num_register_tokens=registers, ffn_type=ffn,
                                  mlp_ratio=2.5, layer_scale_init=scale)
        built = collections.Counter(tuple(v.shape) for v in backbone.weights)
        assert backbone_variable_shapes(backbone.get_config()) == built
        config = {**keras_hub_config(backbone), "image_shape": (OTHER, OTHER, 3)}
        hub = keras_hub.models.DINOV2Backbone(**config)
        grid = (SIZE // PATCH, SIZE // PATCH)
        expected = keras_hub_variable_shapes(
            PATCH, 2, 24, 3, config["intermediate_dim"], registers, True, ffn == "swiglu",
            (OTHER // PATCH, OTHER // PATCH), grid)
        assert expected == collections.Counter(tuple(v.shape) for v in hub.weights)


def test_hostile_heads_files_are_refused(tmp_path):
    import time

    from keras_dinov2.interop import save_heads
    from keras_dinov2.layers.dino_head import DINOHead

    head = DINOHead(num_prototypes=8, hidden_dim=12, bottleneck_dim=6, num_layers=2,
                    name="teacher_dino_head")
    head.build((None, 16))
    save_heads(str(tmp_path), head, dino_center=np.ones((1, 8), "float32"))
    cls = np.random.default_rng(0).standard_normal((2, 16)).astype("float32")
    np.testing.assert_allclose(to_numpy(load_heads(str(tmp_path))["dino_head"](cls)),
                               to_numpy(head(cls)), atol=1e-6)
    good = json.loads((tmp_path / "heads.json").read_text())
    npz = (tmp_path / "heads.weights.npz").read_bytes()

    def edited(**changes):
        config = json.loads(json.dumps(good))
        config["heads"]["dino_head"]["config"].update(changes)
        return config

    cases = [
        (edited(num_prototypes=10 ** 9), r"num_prototypes must be an integer in \[1, 1048576\]"),
        # In bounds, but 2^20 x 6 weights would be built from a file holding a few hundred.
        (edited(num_prototypes=1 << 20), r"dino_head needs 6291\d+ weights"),
        (edited(num_layers="2"), r"num_layers must be an integer"),
        (edited(extra=1), r"config must hold exactly"),
        ({**good, "input_dim": -1}, r"input_dim must be an integer"),
        ({**good, "heads": []}, r"`heads` must hold exactly \['dino_head'\]"),
        ([1, 2], r"holds a list, not a JSON object"),
    ]
    for config, words in cases:
        (tmp_path / "heads.json").write_text(json.dumps(config))
        start = time.perf_counter()
        with pytest.raises(CheckpointError, match=words):
            load_heads(str(tmp_path))
        assert time.perf_counter() - start < 5
    (tmp_path / "heads.json").write_text(json.dumps(good))
    for data in (npz[: len(npz) // 2], b"", npz[:-30]):
        (tmp_path / "heads.weights.npz").write_bytes(data)
        with pytest.raises(CheckpointError, match=r"heads\.weights\.npz is not a readable"):
            load_heads(str(tmp_path))


def test_from_preset_is_the_one_load_backbone(tiny_presets, tmp_path):
    # DINOv2Backbone.from_preset reaches interop.load_backbone through the backbone's registry:
    # a keras-hub preset is imported and a finished run directory gives its teacher_preset/, as
    # the command line and the exporter load them.
    import keras_dinov2 as kd
    from keras_dinov2 import export as export_package

    x = images(SIZE, seed=3)
    want = tokens(load_backbone(str(tiny_presets / "ours")), x)
    np.testing.assert_allclose(tokens(DINOv2Backbone.from_preset(str(tiny_presets / "hub")), x), want,
                               atol=1e-5)
    shutil.copytree(tiny_presets / "ours", tmp_path / "run" / "teacher_preset")
    np.testing.assert_allclose(tokens(DINOv2Backbone.from_preset(str(tmp_path / "run")), x), want, atol=1e-6)
    with pytest.raises(ValueError, match="did you mean dinov2_vit_tiny4"):
        DINOv2Backbone.from_preset("dinov2_vit_tiny")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a preset folder"):
        DINOv2Backbone.from_preset(str(tmp_path / "empty"))
    # The names the README uses: kd.convert.*, export.restore_heads, export.import_keras_hub_preset.
    assert kd.convert.load_torch_hub_checkpoint is kd.interop.load_torch_hub_checkpoint
    assert export_package.restore_heads is restore_heads
    assert export_package.import_keras_hub_preset is import_keras_hub_preset
