"""Fuzz the weight readers: mutated checkpoints of every format load, or raise CheckpointError.

Seeds, built here: a torch-hub state dict written with `torch.save`; a transformers
Dinov2Model from a tiny random config saved with `save_pretrained` (single and sharded
safetensors) and as `pytorch_model.bin` (the `torch.save` of its state dict, what
`save_pretrained` wrote before transformers 5); our preset (`save_to_preset`, with DINO head
files from `save_heads`) and a keras-hub preset. Each of the five formats (.pth, .bin,
safetensors, preset folders, config.json) gets seeded mutations: byte flips, truncations and
splices; zip header fields and the safetensors header length set to edge values; integers
inside data.pkl (offsets, shapes, strides, element counts) and its strings (storage classes,
keys) replaced; zip entries dropped, renamed, resized, swapped or compressed; safetensors
header JSON edited (dtypes, shapes, offsets); index shard names pointed out of the folder;
JSON fields set to huge, negative, fractional or wrong-typed values, deleted or added.

The inputs run in a child process, so a segmentation fault cannot take the test session
down. The child reports every input as it starts and ends; a watchdog ends it when one input
runs past 30 s or its memory grows by more than 1 GB. The test asserts that the child exited
normally, that every input ended in success or CheckpointError (nothing else), that each took
under 5 s, that peak memory grew by less than 1 GB over the child's start, and that the
mutations reached deep (some inputs load, and the refusals have many different reasons).

The heavy run, 1,000 inputs per format (5,000 in all; its time is in docs/performance.md),
happens once per CI pass: when the tests run under KERAS_BACKEND=jax, its child
runs under Keras' numpy backend. The readers are zip, pickle, NumPy and h5py code that no
backend changes, and the numpy backend builds the same models without compiling their
initializers. Under TensorFlow and torch
the child runs in that backend with 100 inputs per format, so the loads that reach a model
build are checked there too. An input that passes every check finishes as `load_*_checkpoint` does
(the model built from the checked config, the tensors copied in with their shapes checked),
but one backbone is kept per distinct config, and a copy is skipped when the same names,
shapes and dtypes were copied before, so that thousands of loads stay fast. Preset
folders go through `check_preset_folder`, the checks that run before keras-hub builds
anything; the first 15 that pass are also loaded completely through `load_backbone`, and
those with mutated head files through `load_heads`.
"""

import io
import json
import os
import pickletools
import random
import shutil
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

FORMATS = ("pth", "bin", "safetensors", "preset", "config")
WATCHDOG_SECONDS = 30
MEMORY_LIMIT = 1 << 30
FULL_PRESET_LOADS = 15

SPECIAL_INTS = [0, 1, 2, 3, 4, 7, 15, 16, 17, 255, 256, 4095, 65535, 2**31 - 1, 2**31,
                2**32 - 1, 2**40, 2**62, 2**63 - 1, -1, -2, -16, -(2**31), -(2**63)]
HOSTILE_VALUES = [0, -1, 1, 2, 3, 5, 13, 1000, 10**6, 10**9, 2**63, -(2**63), 10**40, 1e308,
                  -1e308, float("inf"), float("nan"), 0.5, -0.0, 1e-300, "", "abc", "12",
                  "gelu", "swiglu", None, True, False, [], [1, 2], [16, 16, 3], [10**9, 10**9],
                  {}, {"a": 1}, "x" * 3000, [[[[[[[[]]]]]]]]]


# --------------------------------------------------------------------------- mutations


def flip(rng, data, count=None):
    out = bytearray(data)
    for _ in range(count or rng.randint(1, 8)):
        if out:
            out[rng.randrange(len(out))] = rng.randrange(256)
    return bytes(out)


def truncate(rng, data):
    return data[: rng.randrange(len(data) + 1)]


def splice(rng, data):
    at = rng.randrange(len(data) + 1)
    if rng.random() < 0.5:
        return data[:at] + data[at + rng.randint(1, 64):]
    return data[:at] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))) + data[at:]


def put_int(rng, data, pos, width):
    value = rng.choice(SPECIAL_INTS + [len(data), len(data) - 1, rng.randrange(1 << 16)])
    raw = (value % (1 << (8 * width))).to_bytes(width, "little")
    return data[:pos] + raw + data[pos + width:]


def bytes_op(rng, data):
    return rng.choice([flip, flip, truncate, splice])(rng, data)


# Numeric fields of the zip records: (signature, [(offset, width), ...]).
ZIP_FIELDS = [
    (b"PK\x03\x04", [(6, 2), (8, 2), (14, 4), (18, 4), (22, 4), (26, 2), (28, 2)]),
    (b"PK\x01\x02", [(10, 2), (16, 4), (20, 4), (24, 4), (28, 2), (30, 2), (32, 2), (42, 4)]),
    (b"PK\x05\x06", [(8, 2), (10, 2), (12, 4), (16, 4), (20, 2)]),
]


def zip_header_op(rng, data):
    signature, fields = rng.choice(ZIP_FIELDS)
    places = []
    start = data.find(signature)
    while start >= 0:
        places.append(start)
        start = data.find(signature, start + 1)
    if not places:
        return flip(rng, data)
    offset, width = rng.choice(fields)
    pos = rng.choice(places) + offset
    return put_int(rng, data, pos, width) if pos + width <= len(data) else data


def encode_int(value):
    if 0 <= value < 256:
        return b"K" + bytes([value])
    if 0 <= value < 65536:
        return b"M" + value.to_bytes(2, "little")
    if -(2**31) <= value < 2**31:
        return b"J" + value.to_bytes(4, "little", signed=True)
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def encode_str(text):
    raw = text.encode("utf-8", "surrogatepass")
    return b"X" + len(raw).to_bytes(4, "little") + raw


STRINGS = ["FloatStorage", "HalfStorage", "DoubleStorage", "BFloat16Storage", "LongStorage",
           "BoolStorage", "ByteStorage", "Tensor", "os", "system", "0", "1", "99", "../0", "",
           "cls_token", "pos_embed", "blocks.0.attn.qkv.weight", "blocks.7.norm1.weight",
           "blocks.999999.norm1.weight", "register_tokens", "model", "cpu", "storage"]


def pickle_op(rng, data):
    """Replaces one integer or string argument inside a pickle, keeping the rest intact."""
    try:
        ops = list(pickletools.genops(data))
    except Exception:
        return flip(rng, data)
    ints = [(op, arg, pos) for op, arg, pos in ops
            if op.name in ("BININT", "BININT1", "BININT2", "LONG1")]
    texts = [(op, arg, pos) for op, arg, pos in ops
             if op.name in ("BINUNICODE", "SHORT_BINUNICODE", "GLOBAL")]
    ends = {pos: (ops[i + 1][2] if i + 1 < len(ops) else len(data))
            for i, (_, _, pos) in enumerate(ops)}
    if ints and (not texts or rng.random() < 0.8):
        _, arg, pos = rng.choice(ints)
        value = rng.choice(SPECIAL_INTS + [arg + 1, arg - 1, arg * 2, -arg, arg + 2**32,
                                           arg * 1000])
        return data[:pos] + encode_int(value) + data[ends[pos]:]
    op, arg, pos = rng.choice(texts)
    if op.name == "GLOBAL":
        module, name = rng.choice([("torch", rng.choice(STRINGS)), ("os", "system"),
                                   ("torch._utils", "_rebuild_tensor_v2"),
                                   ("collections", "OrderedDict"), ("builtins", "eval")])
        new = f"c{module}\n{name}\n".encode()
    else:
        new = encode_str(rng.choice(STRINGS + [arg + arg, arg[:-1]]))
    return data[:pos] + new + data[ends[pos]:]


def read_zip(data):
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return [(info.filename, archive.read(info)) for info in archive.infolist()]


def write_zip(entries, compression=zipfile.ZIP_STORED):
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression) as archive:
        for name, raw in entries:
            archive.writestr(name, raw)
    return out.getvalue()


def zip_entry_op(rng, data):
    """Edits the archive's entries: data.pkl content, a storage's length, names, compression."""
    entries = read_zip(data)
    names = [n for n, _ in entries]
    pkl = next(i for i, n in enumerate(names) if n.endswith("data.pkl"))
    storages = [i for i, n in enumerate(names) if "/data/" in n]
    kind = rng.choice(["pickle", "pickle", "pickle", "pickle-bytes", "resize", "drop", "rename",
                       "swap", "deflate", "duplicate"])
    if kind == "pickle":
        entries[pkl] = (names[pkl], pickle_op(rng, entries[pkl][1]))
    elif kind == "pickle-bytes":
        entries[pkl] = (names[pkl], bytes_op(rng, entries[pkl][1]))
    elif kind == "resize" and storages:
        i = rng.choice(storages)
        raw = entries[i][1]
        cut = rng.choice([0, 1, 2, len(raw) // 2, max(len(raw) - 1, 0), len(raw) + 1,
                          len(raw) * 2])
        entries[i] = (names[i], (raw * 3)[:cut])
    elif kind == "drop":
        del entries[rng.randrange(len(entries))]
    elif kind == "rename":
        i = rng.randrange(len(entries))
        entries[i] = (rng.choice(["archive/data/99", "other/data.pkl", "archive/data.pkl",
                                  "archive/../data.pkl", names[i] + "x"]), entries[i][1])
    elif kind == "swap" and len(storages) > 1:
        a, b = rng.sample(storages, 2)
        entries[a], entries[b] = (names[a], entries[b][1]), (names[b], entries[a][1])
    elif kind == "duplicate":
        entries.append(rng.choice(entries))
    return write_zip(entries, zipfile.ZIP_DEFLATED if kind == "deflate" else zipfile.ZIP_STORED)


def torch_archive_op(rng, data):
    roll = rng.random()
    if roll < 0.55:
        return zip_entry_op(rng, data), "entry"
    if roll < 0.75:
        return zip_header_op(rng, data), "header"
    return bytes_op(rng, data), "bytes"


def json_paths(value, path=(), depth=0):
    """Every (container path, key) in a JSON value, to pick a field to edit."""
    out = []
    if depth > 4:
        return out
    if isinstance(value, dict):
        for key, item in value.items():
            out.append((path, key))
            out.extend(json_paths(item, path + (key,), depth + 1))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            out.append((path, index))
            out.extend(json_paths(item, path + (index,), depth + 1))
    return out


def edit_json(rng, value, prefer=None):
    """One field edit: a hostile or nearby value, a deletion, or a new key."""
    paths = json_paths(value)
    if prefer is not None:
        preferred = [p for p in paths if p[0][:len(prefer)] == prefer]
        paths = preferred if preferred and rng.random() < 0.85 else paths
    if not paths:
        return rng.choice(HOSTILE_VALUES)
    path, key = rng.choice(paths)
    parent = value
    for part in path:
        parent = parent[part]
    old = parent[key]
    roll = rng.random()
    if roll < 0.1 and isinstance(parent, dict):
        del parent[key]
    elif roll < 0.15 and isinstance(parent, dict):
        parent[rng.choice(["extra", "num_layers", "image_shape", "model_type"])] = rng.choice(
            HOSTILE_VALUES)
    elif roll < 0.45 and isinstance(old, (int, float)) and not isinstance(old, bool):
        parent[key] = rng.choice([old + 1, old - 1, old * 2, old // 2 if isinstance(old, int)
                                  else old / 2, -old, 0, old * 10**6])
    elif roll < 0.55 and isinstance(old, bool):
        parent[key] = not old
    else:
        parent[key] = rng.choice(HOSTILE_VALUES)
    return value


def json_op(rng, text, prefer=None):
    if rng.random() < 0.15:
        return rng.choice([truncate, flip, splice])(rng, text), "json-bytes"
    value = edit_json(rng, json.loads(text), prefer)
    return json.dumps(value).encode(), "json-field"


SAFETENSORS_DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "C64",
                      "F8_E4M3", "XX", "", 3, None]


def safetensors_op(rng, data):
    roll = rng.random()
    if roll < 0.2:
        return bytes_op(rng, data), "bytes"
    if roll < 0.35:
        return put_int(rng, data, 0, 8), "header-length"
    length = int.from_bytes(data[:8], "little")
    header, body = json.loads(data[8:8 + length]), data[8 + length:]
    keys = [k for k in header if k != "__metadata__"]
    key = rng.choice(keys)
    entry = header[key]
    kind = rng.choice(["dtype", "shape", "shape", "offsets", "offsets", "drop-field", "drop",
                       "rename", "metadata", "field"])
    if kind == "dtype":
        entry["dtype"] = rng.choice(SAFETENSORS_DTYPES)
    elif kind == "shape":
        shape = list(entry["shape"])
        choice = rng.random()
        if choice < 0.3 or not shape:
            shape.append(rng.choice(SPECIAL_INTS))
        elif choice < 0.8:
            shape[rng.randrange(len(shape))] = rng.choice(SPECIAL_INTS + ["4", None, 1.5])
        else:
            shape = shape[:-1]
        entry["shape"] = shape
    elif kind == "offsets":
        begin, end = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[end, begin], [begin, end + 4], [begin - 4, end],
                                            [0, 2**63], [begin, 2**40], [-1, end],
                                            [begin], [str(begin), end], None])
    elif kind == "drop-field":
        del entry[rng.choice(list(entry))]
    elif kind == "drop":
        del header[key]
    elif kind == "rename":
        header[rng.choice(["cls_token", "embeddings.cls_token", "x" * 300, ""])] = header.pop(key)
    elif kind == "metadata":
        header["__metadata__"] = rng.choice([{"format": 3}, [], "pt", {"a": {"b": 1}}])
    else:
        header[key] = rng.choice(HOSTILE_VALUES)
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + body, f"header-{kind}"


HOSTILE_SHARDS = ["../outside.safetensors", "/etc/passwd", "/dev/zero", "sub/../../x",
                  "missing.safetensors", "", ".", "..", 7, None, ["a"], "model.safetensors"]


# --------------------------------------------------------------------------- the child


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _start_watchdog(limit, report):
    import threading

    baseline = _rss()

    def watch():
        while True:
            used = _rss() - baseline
            if used > limit:
                report(f"memory grew by {used >> 20} MiB")
                os._exit(3)
            time.sleep(0.02)

    threading.Thread(target=watch, daemon=True).start()


class Child:
    """Builds the mutated inputs of one format after another and feeds them to the readers."""

    def __init__(self, seeds, work, out):
        from keras_dinov2 import interop

        self.interop = interop
        self.seeds, self.work, self.out = seeds, work, out
        self.backbones, self.assigned = {}, set()
        self.full_loads = 0

    def log(self, **record):
        self.out.write(json.dumps(record) + "\n")
        self.out.flush()

    def fresh(self, name, seed_name):
        folder = os.path.join(self.work, name)
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(os.path.join(self.seeds, seed_name), folder)
        return folder

    def finish(self, parts):
        """What load_*_checkpoint does after its checks, with one backbone per config."""
        from keras_dinov2.backbone import DINOv2Backbone

        config, tensors, where = parts
        key = json.dumps(config, sort_keys=True, default=str)
        # Whether the copy succeeds depends on the names, shapes and dtypes alone.
        layout = (key, tuple(sorted((k, v.shape, v.dtype.str) for k, v in tensors.items())))
        if layout in self.assigned:
            return
        if key not in self.backbones:
            self.backbones[key] = DINOv2Backbone(**config)
        self.interop.assign_torch_hub_weights(self.backbones[key], tensors, where)
        self.assigned.add(layout)

    # Each maker writes one mutated input and returns (runner, description).

    def make_pth(self, rng):
        data = open(os.path.join(self.seeds, "pth", "model.pth"), "rb").read()
        data, op = torch_archive_op(rng, data)
        path = os.path.join(self.work, "model.pth")
        with open(path, "wb") as f:
            f.write(data)
        return lambda: self.finish(self.interop.torch_hub_parts(path)), op

    def make_bin(self, rng):
        folder = self.fresh("bin", "bin")
        path = os.path.join(folder, "pytorch_model.bin")
        data, op = torch_archive_op(rng, open(path, "rb").read())
        with open(path, "wb") as f:
            f.write(data)
        return lambda: self.finish(self.interop.transformers_parts(folder)), op

    def make_safetensors(self, rng):
        if rng.random() < 0.2:
            folder = self.fresh("sharded", "sharded")
            index = os.path.join(folder, "model.safetensors.index.json")
            stored = json.load(open(index))
            if rng.random() < 0.6:
                tensor = rng.choice(sorted(stored["weight_map"]))
                stored["weight_map"][tensor] = rng.choice(HOSTILE_SHARDS)
                op = "index-shard"
            else:
                stored = edit_json(rng, stored)
                op = "index-field"
            with open(index, "w") as f:
                json.dump(stored, f)
        else:
            folder = self.fresh("safetensors", "hf")
            path = os.path.join(folder, "model.safetensors")
            data, op = safetensors_op(rng, open(path, "rb").read())
            with open(path, "wb") as f:
                f.write(data)
        return lambda: self.finish(self.interop.transformers_parts(folder)), op

    def make_config(self, rng):
        folder = self.fresh("config", "hf")
        path = os.path.join(folder, "config.json")
        data, op = json_op(rng, open(path, "rb").read())
        with open(path, "wb") as f:
            f.write(data)
        return lambda: self.finish(self.interop.transformers_parts(folder)), op

    def make_preset(self, rng):
        from keras_dinov2.interop import check_preset_folder, load_backbone, load_heads

        kind = rng.choice(["ours", "hub"])
        folder = self.fresh("preset", kind)
        roll = rng.random()
        if roll < 0.5:
            name, prefer = "config.json", ("config",)
        elif roll < 0.56:
            name, prefer = "metadata.json", None
        elif roll < 0.7 and kind == "ours":
            name, prefer = rng.choice([("heads.json", ("heads",)), ("heads.weights.npz", None)])
        else:
            name, prefer = "model.weights.h5", None
        path = os.path.join(folder, name)
        data = open(path, "rb").read()
        if name.endswith(".json"):
            data, op = json_op(rng, data, prefer)
        elif rng.random() < 0.15:
            os.remove(path)
            data, op = None, "deleted"
        elif name.endswith(".npz"):
            data, op = rng.choice([bytes_op, zip_header_op])(rng, data), "npz"
        else:
            head = rng.random() < 0.5   # object headers and the superblock live up front
            op = "h5-head" if head else "h5-bytes"
            data = (flip(rng, data[:4096]) + data[4096:]) if head else bytes_op(rng, data)
        if data is not None:
            with open(path, "wb") as f:
                f.write(data)

        def run():
            check_preset_folder(folder)
            if name.startswith("heads"):
                load_heads(folder)
            elif self.full_loads < FULL_PRESET_LOADS:
                self.full_loads += 1
                load_backbone(folder)

        return run, f"{kind}-{name}-{op}"

    def warm_up(self):
        """Loads every seed once, untimed: the first builds and compilations happen here."""
        from keras_dinov2.interop import load_backbone, load_heads

        self.finish(self.interop.torch_hub_parts(os.path.join(self.seeds, "pth", "model.pth")))
        for name in ("bin", "hf", "sharded"):
            self.finish(self.interop.transformers_parts(os.path.join(self.seeds, name)))
        for name in ("ours", "hub"):
            load_backbone(os.path.join(self.seeds, name))
        load_heads(os.path.join(self.seeds, "ours"))

    def run(self, count, seed):
        import faulthandler
        import resource

        from keras_dinov2.interop import CheckpointError

        self.warm_up()
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        _start_watchdog(MEMORY_LIMIT, lambda why: self.log(event="watchdog", why=why))
        for fmt in FORMATS:
            rng = random.Random(f"{seed}-{fmt}")
            maker = getattr(self, f"make_{fmt}")
            for i in range(count):
                runner, op = maker(rng)
                self.log(event="start", format=fmt, index=i, op=op)
                faulthandler.dump_traceback_later(WATCHDOG_SECONDS, exit=True)
                start = time.perf_counter()
                try:
                    runner()
                    outcome, message = "loaded", ""
                except CheckpointError as error:
                    outcome, message = "refused", str(error)
                except BaseException as error:   # noqa: BLE001 -- reported, then judged
                    outcome = f"{type(error).__module__}.{type(error).__name__}"
                    message = str(error)
                faulthandler.cancel_dump_traceback_later()
                self.log(event="end", format=fmt, index=i, op=op, outcome=outcome,
                         message=message[:300], seconds=time.perf_counter() - start)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.log(event="done", baseline=baseline, peak=peak)


def child_main(seeds, work, out_path, count, seed):
    import warnings

    warnings.simplefilter("ignore")   # zipfile's duplicate-name warnings, by design
    with open(out_path, "w") as out:
        Child(seeds, work, out).run(count, seed)


# --------------------------------------------------------------------------- the seeds


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from keras_dinov2.backbone import DINOv2Backbone
    from keras_dinov2.config import IMAGENET_MEAN, IMAGENET_STD
    from keras_dinov2.export.keras_hub_format import save_keras_hub_preset
    from keras_dinov2.export.layout import torch_hub_tensors
    from keras_dinov2.interop import save_heads
    from keras_dinov2.layers.dino_head import DINOHead

    root = tmp_path_factory.mktemp("fuzz_seeds")
    backbone = DINOv2Backbone(patch_size=4, hidden_dim=16, num_layers=2, num_heads=2,
                              image_size=16, num_register_tokens=1, ffn_type="swiglu",
                              interpolation="registers", layer_scale_init=0.5)
    (root / "pth").mkdir()
    torch.save({k: torch.from_numpy(v) for k, v in torch_hub_tensors(backbone).items()},
               root / "pth" / "model.pth")
    backbone.save_to_preset(str(root / "ours"))
    head = DINOHead(num_prototypes=8, hidden_dim=12, bottleneck_dim=6, num_layers=2,
                    name="teacher_dino_head")
    head.build((None, 16))
    save_heads(str(root / "ours"), head, dino_center=np.ones((1, 8), "float32"))
    save_keras_hub_preset(backbone, str(root / "hub"), IMAGENET_MEAN, IMAGENET_STD)

    torch.manual_seed(0)
    config = transformers.Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=16, patch_size=4)
    model = transformers.Dinov2Model(config).eval()
    model.save_pretrained(root / "hf")
    model.save_pretrained(root / "sharded", max_shard_size="4KB")
    assert (root / "sharded" / "model.safetensors.index.json").exists()
    (root / "bin").mkdir()
    shutil.copy(root / "hf" / "config.json", root / "bin" / "config.json")
    torch.save(model.state_dict(), root / "bin" / "pytorch_model.bin")
    return root


def test_readers_survive_mutated_checkpoints(seeds, tmp_path):
    import keras

    import keras_dinov2

    # The heavy run once per CI pass (under jax), in Keras' numpy backend: same reader and
    # model code, no compilation. Under TensorFlow and torch, a short run in their own.
    backend = keras.backend.backend()
    child_backend, count = ("numpy", 1000) if backend == "jax" else (backend, 100)
    work, out = tmp_path / "work", tmp_path / "results.jsonl"
    work.mkdir()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(keras_dinov2.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [repo] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
        "TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_BACKEND": child_backend}
    child = subprocess.run(
        [sys.executable, os.path.abspath(__file__), str(seeds), str(work), str(out),
         str(count), "19"],
        env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=900)
    records = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    starts = [r for r in records if r["event"] == "start"]
    ends = [r for r in records if r["event"] == "end"]
    last = starts[-1] if starts else None
    assert child.returncode == 0, (
        f"the child ended with status {child.returncode} during {last} "
        f"({[r for r in records if r['event'] == 'watchdog']}):\n{child.stderr[-3000:]}")
    done = records[-1]
    assert done["event"] == "done"
    assert done["peak"] - done["baseline"] < MEMORY_LIMIT, done

    for fmt in FORMATS:
        mine = [r for r in ends if r["format"] == fmt]
        assert len(mine) == count, (fmt, len(mine))
        foreign = [r for r in mine if r["outcome"] not in ("loaded", "refused")]
        assert not foreign, f"{fmt}: {len(foreign)} inputs raised other errors, first {foreign[:3]}"
        slow = max(mine, key=lambda r: r["seconds"])
        assert slow["seconds"] < 5, f"{fmt}: {slow}"
        # The mutations reach past the first check: some inputs still load, and the refusals
        # come from many different checks.
        loaded = sum(r["outcome"] == "loaded" for r in mine)
        reasons = {_reason(r["message"]) for r in mine if r["outcome"] == "refused"}
        assert loaded >= count // 100, (fmt, loaded)
        assert len(reasons) >= (12 if count >= 1000 else 4), (fmt, sorted(reasons))


def _reason(message):
    """A refusal's message without paths and numbers, to count distinct checks."""
    import re

    words = re.sub(r"/\S+|\d+|'[^']*'|\([^)]*\)", "", message).split()
    return " ".join(words[:6])


if __name__ == "__main__":
    child_main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
