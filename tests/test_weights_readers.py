"""weights/ readers: safetensors by hand (against the `safetensors` library, both directions),
the restricted unpickler (zip, legacy, TorchScript), and what they refuse.

The oracles are the `safetensors` library, torch.save / torch.load(weights_only=True) on files
we wrote ourselves, and torch.jit.script(...).state_dict() for TorchScript archives."""
import collections
import json
import math
import os
import pickle
import re
import struct
import sys
import types
import zipfile

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn as nn
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import weights
from weights.readers import LEGACY_MAGIC, LEGACY_PROTOCOL
from weights.safetensors_format import DTYPES

# ----------------------------------------------------------------------------- safetensors


def every_dtype_tensors():
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, dtype in DTYPES.items():
        # random bit patterns (NaNs and infinities included) for 6 elements of this dtype
        raw = torch.randint(0, 256, (6 * dtype.itemsize,), generator=generator, dtype=torch.uint8)
        tensors[f"t_{name}"] = raw.view(dtype).reshape(2, 3)
    tensors["t_BOOL"] = torch.tensor([[True, False, True], [False, False, True]])
    tensors["scalar"] = torch.tensor(3.25)
    tensors["empty"] = torch.zeros(0, 7, dtype=torch.float16)
    tensors["wide"] = torch.randn(5, 11, generator=generator, dtype=torch.float64)
    return tensors


def same_bits(a, b):
    """Bitwise equality (NaN-safe, works for float8 and unsigned types)."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)))


def test_safetensors_roundtrip_every_dtype_both_directions(tmp_path):
    tensors = every_dtype_tensors()
    assert {str(t.dtype) for t in tensors.values()} >= {str(d) for d in DTYPES.values()}
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    weights.write_safetensors(tensors, ours, metadata={"format": "pt"})
    safetensors.torch.save_file(tensors, theirs, metadata={"format": "pt"})
    # the library reads our file, we read the library's file
    from_library = safetensors.torch.load_file(ours)
    from_us = weights.read_safetensors(theirs)
    for name, tensor in tensors.items():
        assert same_bits(from_library[name], tensor), name
        assert same_bits(from_us[name], tensor), name
    assert ours.read_bytes() == theirs.read_bytes()  # same layout, same header, same padding
    assert weights.read_safetensors_metadata(theirs) == {"format": "pt"}
    with safetensors.safe_open(ours, "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_safetensors_writer_pads_header_to_eight_bytes(tmp_path):
    for length in range(1, 9):
        path = tmp_path / f"{length}.safetensors"
        weights.write_safetensors({"x" * length: torch.ones(1)}, path)
        (header_length,) = struct.unpack("<Q", path.read_bytes()[:8])
        assert header_length % 8 == 0
        assert weights.read_safetensors(path)["x" * length].item() == 1.0


def raw_safetensors(path, header, data, pad=False):
    header_bytes = json.dumps(header, separators=(",", ":")).encode() if not isinstance(header, bytes) else header
    if pad:
        header_bytes += b" " * (-len(header_bytes) % 8)
    path.write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + data)
    return path


def test_unpadded_gpt2_style_header_reads_correctly(tmp_path):
    # GPT-2's model.safetensors predates header padding: 14,283-byte header, 160 F32 tensors.
    generator = torch.Generator().manual_seed(1)
    tensors = {"wte.weight": torch.randn(50, 8, generator=generator),
               "h.0.attn.c_attn.weight": torch.randn(8, 24, generator=generator),
               "h.0.attn.bias": torch.tril(torch.ones(1, 1, 4, 4)), "ln_f.bias": torch.randn(8, generator=generator)}
    header, data, position = {"__metadata__": {"format": "pt"}}, b"", 0
    for name, tensor in tensors.items():
        blob = tensor.numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [position, position + len(blob)]}
        data, position = data + blob, position + len(blob)
    path = raw_safetensors(tmp_path / "model.safetensors", header, data)
    (header_length,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert (8 + header_length) % 4 != 0, "the test file must have unaligned data"
    ours, reference = weights.read_safetensors(path), safetensors.torch.load_file(path)
    assert list(ours) == list(tensors)
    for name in tensors:
        assert torch.equal(ours[name], tensors[name]) and torch.equal(reference[name], tensors[name])
    assert weights.load_state_dict(path).keys() == tensors.keys()


def test_tensor_at_misaligned_offset_is_copied_correctly(tmp_path):
    values = torch.tensor([1.5, -2.25, 3.0])
    header = {"tag": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
              "values": {"dtype": "F32", "shape": [3], "data_offsets": [3, 15]}}
    path = raw_safetensors(tmp_path / "odd.safetensors", header, bytes([7, 8, 9]) + values.numpy().tobytes(), pad=True)
    tensors = weights.read_safetensors(path)
    assert torch.equal(tensors["values"], values) and tensors["tag"].tolist() == [7, 8, 9]


F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
BAD_HEADERS = [
    (b"[1, 2]", b"", "must start with"),
    (b"{not json", b"", "not valid JSON"),
    (b"\xff\xfe{}", b"", "not UTF-8"),
    (b'{"a": ' * 50_000 + b"1" + b"}" * 50_000, b"", "nested too deeply"),
    (b'{"a": 1, "a": 2}', b"", "duplicate key"),
    ({"a": {**F32x2, "dtype": "F31"}}, bytes(8), "unknown dtype"),
    ({"a": {**F32x2, "shape": [-2]}}, bytes(8), "non-negative integers"),
    ({"a": {**F32x2, "shape": [True, 2]}}, bytes(8), "non-negative integers"),
    ({"a": {**F32x2, "shape": [2.0]}}, bytes(8), "non-negative integers"),
    ({"a": {**F32x2, "data_offsets": [8, 0]}}, bytes(8), "0 <= begin <= end"),
    ({"a": {**F32x2, "data_offsets": [0, 8, 9]}}, bytes(8), "0 <= begin <= end"),
    ({"a": {**F32x2, "data_offsets": [0, 12]}}, bytes(12), "needs 8 bytes"),
    ({"a": {**F32x2, "shape": [3]}}, bytes(8), "needs 12 bytes"),
    ({"a": {"dtype": "F32", "shape": [2]}}, bytes(8), "exactly dtype, shape, data_offsets"),
    ({"a": {**F32x2, "extra": 1}}, bytes(8), "exactly dtype, shape, data_offsets"),
    ({"a": [1]}, bytes(8), "exactly dtype, shape, data_offsets"),
    ({"a": F32x2}, bytes(12), "data section holds 12"),  # trailing bytes
    ({"a": F32x2}, bytes(4), "data section holds 4"),  # truncated
    ({"a": F32x2, "b": {**F32x2, "data_offsets": [4, 12]}}, bytes(12), "overlaps"),
    ({"a": F32x2, "b": F32x2}, bytes(8), "overlaps"),
    ({"a": F32x2, "b": {**F32x2, "data_offsets": [12, 20]}}, bytes(20), "gap of 4 bytes"),
    ({"a": {**F32x2, "data_offsets": [4, 12]}}, bytes(12), "gap of 4 bytes"),
    ({"__metadata__": {"k": 1}, "a": F32x2}, bytes(8), "__metadata__ must map strings"),
    ({"a": {**F32x2, "shape": [2 ** 62, 2 ** 62]}}, bytes(8), "too large"),
    ({"a": {**F32x2, "shape": [0, 2 ** 62, 2 ** 62]}}, bytes(0), "too large"),
    (b' {"a": 1}', b"", "must start with"),
]


@pytest.mark.parametrize("header, data, message", BAD_HEADERS, ids=[m for _, _, m in BAD_HEADERS])
def test_bad_safetensors_header_is_one_clear_value_error(tmp_path, header, data, message):
    path = raw_safetensors(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(ValueError, match=message) as error:
        weights.read_safetensors(path)
    assert str(path) in str(error.value)
    with pytest.raises(ValueError):
        weights.load_state_dict(path)


def test_bad_safetensors_lengths_fail_before_reading(tmp_path):
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match="fewer than the 8-byte"):
        weights.read_safetensors(short)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 2 ** 63) + b"{}")
    with pytest.raises(ValueError, match="exceeds the limit"):
        weights.read_safetensors(huge)
    past_end = tmp_path / "past_end.safetensors"
    past_end.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(ValueError, match="runs past the end"):
        weights.read_safetensors(past_end)


ODD_VALUES = [-1, 0, 1, 2, 3, 8, 2 ** 31, 2 ** 63, 2 ** 64, 10 ** 30, 1.5, float("nan"), True, None, "2", [], {}]
ENTRY = st.fixed_dictionaries(
    {"dtype": st.one_of(st.sampled_from(list(DTYPES)), st.sampled_from(["F31", "", "f32", 7, None])),
     "shape": st.one_of(st.lists(st.integers(0, 6), max_size=3), st.lists(st.sampled_from(ODD_VALUES), max_size=3),
                        st.sampled_from(ODD_VALUES)),
     "data_offsets": st.one_of(st.lists(st.integers(0, 72), min_size=2, max_size=2),
                               st.lists(st.sampled_from(ODD_VALUES), max_size=3), st.sampled_from(ODD_VALUES))},
    optional={"extra": st.sampled_from(ODD_VALUES)})


@st.composite
def nearly_valid(draw):
    """A consistent header and data section, then at most one small corruption."""
    tensors = draw(st.lists(st.tuples(st.sampled_from(list(DTYPES)), st.lists(st.integers(0, 3), max_size=3)),
                            max_size=4))
    header, position = {}, 0
    for index, (dtype, shape) in enumerate(tensors):
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        header[f"t{index}"] = {"dtype": dtype, "shape": shape, "data_offsets": [position, position + nbytes]}
        position += nbytes
    if draw(st.booleans()):
        header["__metadata__"] = {"format": "pt"}
    data_length = position
    corruption = draw(st.sampled_from(["none", "offset", "offset", "shape", "length", "swap"]))
    names = [name for name in header if name != "__metadata__"]
    if names and corruption == "offset":
        entry, shift = header[draw(st.sampled_from(names))], draw(st.integers(-3, 3))
        entry["data_offsets"] = [entry["data_offsets"][0] + shift, entry["data_offsets"][1] + shift]  # gap/overlap
    elif names and corruption == "shape":
        header[draw(st.sampled_from(names))]["shape"].append(draw(st.integers(0, 2)))
    elif corruption == "length":
        data_length = max(0, data_length + draw(st.integers(-3, 3)))
    elif len(names) > 1 and corruption == "swap":
        first, second = header[names[0]], header[names[1]]
        first["data_offsets"], second["data_offsets"] = second["data_offsets"], first["data_offsets"]
    pad = draw(st.integers(0, 7))
    return json.dumps(header).encode() + b" " * pad, bytes(range(256))[:data_length % 256] * (data_length // 256 + 1)


HEADERS = st.one_of(
    st.tuples(st.binary(max_size=64), st.binary(max_size=32)),  # arbitrary bytes
    st.tuples(st.dictionaries(st.sampled_from(["a", "b", "c", "", "__metadata__"]),
                              st.one_of(ENTRY, ENTRY, ENTRY, st.sampled_from(ODD_VALUES),
                                        st.dictionaries(st.sampled_from(["k", "dtype"]), st.sampled_from(ODD_VALUES + ["v"]))),
                              max_size=3).map(lambda header: json.dumps(header).encode()),
              st.binary(max_size=72)),
    st.tuples(st.sampled_from(ODD_VALUES).map(lambda value: json.dumps(value).encode()), st.just(b"")),
    nearly_valid(), nearly_valid(),
)


@settings(max_examples=2000, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(header_and_data=HEADERS, length=st.sampled_from([None] * 12 + [0, 5, 2 ** 27, 2 ** 63, 2 ** 64 - 1]))
def test_fuzzed_safetensors_header_only_raises_value_error(tmp_path, header_and_data, length):
    """Random and half-valid headers: the reader either raises ValueError or agrees with the library."""
    header, data = header_and_data
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
    try:
        tensors = weights.read_safetensors(path)
    except ValueError as error:
        reason = re.sub(r"'[^']*'|\[[^\]]*\]|\(.*|\d+|\w+ \[", "", str(error).partition("file: ")[2])
        event(reason[:40])  # seen with --hypothesis-show-statistics
        return
    event("accepted")
    reference = safetensors.torch.load_file(path)
    assert tensors.keys() == reference.keys()
    for name in tensors:
        assert same_bits(tensors[name], reference[name])


# ----------------------------------------------------------------------------- torch pickles


def small_state_dict():
    generator = torch.Generator().manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    model[1].half()
    state = model.state_dict()
    state["mask"] = torch.tril(torch.ones(3, 3, dtype=torch.bool))
    state["steps"] = torch.tensor(7, dtype=torch.int64)
    state["bf16"] = torch.randn(3, generator=generator).bfloat16()
    state["view_of_weight"] = state["0.weight"][1:3, ::2]  # shares a storage, with an offset
    return state


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_torch_checkpoint_state_dict_matches_torch_load(tmp_path, zip_format):
    state = small_state_dict()
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    ours = weights.load_state_dict(path)
    reference = torch.load(path, weights_only=True)
    assert list(ours) == list(reference) == list(state)
    for name in state:
        assert same_bits(ours[name], reference[name]), name
        assert ours[name].stride() == reference[name].stride()
    # storage sharing is preserved, as torch.load does it
    assert ours["view_of_weight"].untyped_storage().data_ptr() == ours["0.weight"].untyped_storage().data_ptr()


def test_lightning_style_checkpoint_is_unwrapped(tmp_path):
    state = small_state_dict()
    path = tmp_path / "model.ckpt"
    torch.save({"epoch": 3, "global_step": 1000, "state_dict": state}, path)
    assert list(weights.load_state_dict(path)) == list(state)


def fake_module(name, **attributes):
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    return module


def test_sd_style_ckpt_with_lightning_classes_loads_placeholders(tmp_path):
    marker = tmp_path / "lightning-code-ran"

    class ModelCheckpoint:  # stand-in for pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint
        def __setstate__(self, state):
            marker.write_text("setstate ran")

    class AttributeDict(dict):
        pass

    # importable only while torch.save runs: the loader must neither need nor import them
    module_name = "pytorch_lightning.callbacks.model_checkpoint"
    ModelCheckpoint.__module__ = AttributeDict.__module__ = module_name
    ModelCheckpoint.__qualname__, AttributeDict.__qualname__ = "ModelCheckpoint", "AttributeDict"
    modules = {"pytorch_lightning": fake_module("pytorch_lightning"),
               "pytorch_lightning.callbacks": fake_module("pytorch_lightning.callbacks"),
               module_name: fake_module(module_name, ModelCheckpoint=ModelCheckpoint, AttributeDict=AttributeDict)}
    state = small_state_dict()
    callback = ModelCheckpoint()
    callback.best_model_path = "logs/last.ckpt"
    checkpoint = {"epoch": 6, "global_step": 840000, "pytorch-lightning_version": "1.4.2", "state_dict": state,
                  "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.5), "object": callback}},
                  "hyper_parameters": AttributeDict(lr=1e-4, scale=0.18215)}
    path = tmp_path / "v1-5-pruned-emaonly.ckpt"
    assert not set(modules) & set(sys.modules)
    sys.modules.update(modules)
    try:
        torch.save(checkpoint, path)
    finally:
        for name in modules:
            del sys.modules[name]
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # why the official .ckpt needs a restricted unpickler

    loaded_state = weights.load_state_dict(path)
    assert list(loaded_state) == list(state)
    assert all(same_bits(loaded_state[k], state[k]) for k in state)
    whole = weights.load_checkpoint(path)
    assert whole["epoch"] == 6 and whole["pytorch-lightning_version"] == "1.4.2"
    (key, value), = whole["callbacks"].items()
    assert issubclass(key, weights.Placeholder) and key.qualname == f"{module_name}.ModelCheckpoint"
    assert value["best_model_score"].item() == 0.5
    assert isinstance(value["object"], weights.Placeholder)
    assert value["object"].state == {"best_model_path": "logs/last.ckpt"}
    assert whole["hyper_parameters"].items == {"lr": 1e-4, "scale": 0.18215}
    assert not marker.exists()


class Exploit:
    """Pickles as a call to `function(*args)`: what a malicious checkpoint does."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def evil_payloads(marker):
    import subprocess
    command = f"echo pwned > {marker}"
    return {
        "os.system": Exploit(os.system, command),
        "builtins.eval": Exploit(eval, f"open({str(marker)!r}, 'w').write('pwned')"),
        "builtins.exec": Exploit(exec, f"open({str(marker)!r}, 'w').write('pwned')"),
        "subprocess.Popen": Exploit(subprocess.Popen, ["sh", "-c", command]),
        "builtins.getattr": Exploit(getattr, Exploit(__import__, "os"), "system"),
    }


def write_zip_checkpoint(path, payload):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"step": 1, "x": payload}, protocol=2))
        archive.writestr("archive/version", "3\n")
    return path


def write_legacy_checkpoint(path, payload):
    with open(path, "wb") as f:
        for part in (LEGACY_MAGIC, LEGACY_PROTOCOL, {"protocol_version": LEGACY_PROTOCOL, "little_endian": True},
                     {"x": payload}, []):
            pickle.dump(part, f, protocol=2)
    return path


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "builtins.exec", "subprocess.Popen", "builtins.getattr"])
@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_checkpoint_that_runs_code_is_refused(tmp_path, kind, layout):
    marker = tmp_path / "marker"
    payload = evil_payloads(marker)[kind]
    path = tmp_path / f"evil-{layout}.pt"
    (write_zip_checkpoint if layout == "zip" else write_legacy_checkpoint)(path, payload)
    for load in (weights.load_state_dict, weights.load_checkpoint):
        with pytest.raises(weights.UnsafeCheckpointError, match="refusing to load global") as error:
            load(path)
        # the message names the global (protocol 2 spells builtins as __builtin__, os as posix)
        assert f".{payload.function.__name__}'" in str(error.value)
    assert not marker.exists()


def test_allowed_constructor_cannot_be_used_to_allocate_memory(tmp_path):
    path = write_zip_checkpoint(tmp_path / "bomb.pt", Exploit(bytearray, 10 ** 12))
    with pytest.raises(weights.UnsafeCheckpointError, match="refusing bytearray"):
        weights.load_checkpoint(path)


def test_tensor_overrunning_its_storage_is_refused(tmp_path):
    class FakeStorage:
        pass

    class FakeTensor:
        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, (FakeStorage(), 2, (100,), (1,), False, collections.OrderedDict())

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", 4) if isinstance(obj, FakeStorage) else None

    buffer = __import__("io").BytesIO()
    Pickler(buffer, protocol=2).dump({"w": FakeTensor()})
    path = tmp_path / "overrun.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        archive.writestr("archive/data/0", bytes(16))
    with pytest.raises(ValueError, match="overruns its storage"):
        weights.load_state_dict(path)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_truncated_or_corrupt_checkpoint_is_a_value_error(tmp_path, zip_format):
    path = tmp_path / "model.bin"
    torch.save(small_state_dict(), path, _use_new_zipfile_serialization=zip_format)
    data = path.read_bytes()
    for cut in (len(data) // 3, len(data) - 5):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError):
            weights.load_state_dict(path)
    path.write_bytes(b"\x00garbage that is no checkpoint")
    with pytest.raises(ValueError, match="unrecognised checkpoint format"):
        weights.load_state_dict(path)


def test_storage_member_of_wrong_size_is_refused(tmp_path):
    path = tmp_path / "model.bin"
    torch.save({"w": torch.ones(4)}, path)
    short = tmp_path / "short.bin"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(short, "w") as target:
        for name in source.namelist():
            data = source.read(name)
            target.writestr(name, data[:8] if name.endswith("/data/0") else data)
    with pytest.raises(ValueError, match="holds 8 bytes, the pickle expects 16"):
        weights.load_state_dict(short)


# ----------------------------------------------------------------------------- TorchScript


class ResidualAttentionBlock(nn.Module):
    """openai/CLIP's block: nn.MultiheadAttention, LayerNorms, an MLP, and a plain mask attribute."""

    def __init__(self, width, heads, attn_mask=None):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(collections.OrderedDict([("c_fc", nn.Linear(width, width * 4)),
                                                          ("c_proj", nn.Linear(width * 4, width))]))
        self.ln_2 = nn.LayerNorm(width)
        self.attn_mask = attn_mask  # a tensor attribute that is NOT in the state dict

    def forward(self, x):
        mask = self.attn_mask
        x = x + self.attn(self.ln_1(x), self.ln_1(x), self.ln_1(x), need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class TinyCLIP(nn.Module):
    def __init__(self, width=16, layers=2):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.randn(width))
        self.conv1 = nn.Conv2d(3, width, kernel_size=4, stride=4, bias=False)
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, 2, torch.full((4, 4), float("-inf")).triu(1))
                                        for _ in range(layers)])
        self.proj = nn.Parameter(torch.randn(width, 8))
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))
        # OpenAI's ViT-B-32.pt carries these three as buffers; clip.build_model deletes them
        self.register_buffer("input_resolution", torch.tensor(224))
        self.register_buffer("context_length", torch.tensor(77))
        self.register_buffer("vocab_size", torch.tensor(49408))

    def forward(self, x):
        x = self.conv1(x).flatten(2).permute(2, 0, 1)  # (h*w, B, C): sequence-first like openai/CLIP
        for block in self.resblocks:
            x = block(x)
        return x[0] @ self.proj * self.logit_scale.exp()


def clip_like_module():
    torch.manual_seed(3)
    model = TinyCLIP().eval()
    # openai/CLIP convert_weights: fp16 for matmul weights, fp32 for LayerNorm and embeddings
    for block in model.resblocks:
        block.attn.half()
        block.mlp.c_fc.half()
    model.proj.data = model.proj.data.half()
    return model


@pytest.mark.parametrize("compile_with", ["script", "trace"])
def test_torchscript_archive_state_dict_matches_jit(tmp_path, compile_with):
    model = clip_like_module()
    if compile_with == "script":
        compiled = torch.jit.script(model)
    else:
        model.float()  # tracing runs the model, which mixed dtypes would not survive on CPU
        compiled = torch.jit.trace(model, torch.randn(1, 3, 8, 8))
    path = tmp_path / "ViT-B-32.pt"
    torch.jit.save(compiled, path)
    reference = compiled.state_dict()
    ours = weights.load_state_dict(path)
    assert list(ours) == list(reference), sorted(set(ours) ^ set(reference))
    for name in reference:
        assert same_bits(ours[name], reference[name]), name
    dtypes = {str(t.dtype) for t in ours.values()}
    assert compile_with == "trace" or {"torch.float16", "torch.float32"} <= dtypes
    assert {"input_resolution", "context_length", "vocab_size"} <= set(ours)  # the TorchScript-only keys
    assert not any("attn_mask" in name for name in ours)
    assert "resblocks.1.attn.in_proj_weight" in ours and "resblocks.0.mlp.c_fc.weight" in ours
    # a TorchScript archive is not a checkpoint: load_checkpoint refuses its __torch__ classes
    with pytest.raises(weights.UnsafeCheckpointError, match="__torch__"):
        weights.load_checkpoint(path)


# ----------------------------------------------------------------------------- save/load_checkpoint


def test_save_and_load_checkpoint_roundtrip(tmp_path):
    state = small_state_dict()
    checkpoint = {"model": state, "config": {"n_layer": 2, "lr": 3e-4, "betas": (0.9, 0.95), "name": "tiny"},
                  "step": 12, "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-3}]},
                  "rng": torch.get_rng_state(), "dtype": torch.float16, "none": None, "tags": {"a", "b"},
                  "blob": bytearray(b"\x00\x01"), "shape": torch.Size([2, 3])}
    path = tmp_path / "ckpt.pt"
    weights.save_checkpoint(checkpoint, path)
    loaded = weights.load_checkpoint(path)
    assert loaded["config"] == checkpoint["config"] and loaded["step"] == 12 and loaded["none"] is None
    assert loaded["dtype"] is torch.float16 and loaded["tags"] == {"a", "b"}
    assert torch.equal(loaded["rng"], checkpoint["rng"])
    assert loaded["blob"] == bytearray(b"\x00\x01")
    assert loaded["shape"] == torch.Size([2, 3])
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], torch.zeros(3))
    assert all(same_bits(loaded["model"][k], state[k]) for k in state)
    assert torch.load(path, weights_only=True)["step"] == 12  # an ordinary torch.save file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no temporary file left
    # numpy scalars (a loss from np.mean) load too, where torch.load(weights_only=True) refuses them
    weights.save_checkpoint({"loss": np.float32(2.5), "count": np.int64(3)}, path)
    assert weights.load_checkpoint(path) == {"loss": np.float32(2.5), "count": 3}


def test_save_checkpoint_refuses_objects_it_could_not_load_and_keeps_old_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    weights.save_checkpoint({"step": 1}, path)
    before = path.read_bytes()

    class Config:
        pass

    with pytest.raises(TypeError, match=r"checkpoint\['config'\] is a Config"):
        weights.save_checkpoint({"step": 2, "config": Config()}, path)
    assert path.read_bytes() == before


def test_save_checkpoint_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    weights.save_checkpoint({"step": 1}, path)

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        weights.save_checkpoint({"step": 2}, path)
    assert weights.load_checkpoint(path) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


# ----------------------------------------------------------------------------- the one restricted unpickler


def test_every_pickle_protocol_of_plain_data_loads_as_pickle_does():
    """The opcode pre-scan models every opcode of protocols 0-5 that plain data uses (memo, frames,
    STACK_GLOBAL, sets, bytearrays, big ints) and lets all of them through."""
    value = {"a": [1, 2.5, "é€", b"x" * 300, (1, 2), {3}, frozenset([4]), None, True, 2**70, bytearray(b"z")],
             "nested": [[[["deep"]]]], "text": "x" * 2000, "shared": [[1]] * 3, "slice": slice(1, 5), "z": 1 + 2j}
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        assert weights.load_pickle(pickle.dumps(value, protocol=protocol), "in memory") == value, protocol


def test_numpy_numbers_and_arrays_are_rebuilt_from_their_dtype_names(tmp_path):
    arrays = {"i16": np.arange(6, dtype=np.int16).reshape(2, 3), "big-endian": np.arange(4, dtype=">f4"),
              "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)), "bool": np.array([True, False]),
              "complex": np.array([1 + 2j], dtype=np.complex64), "scalar": np.float64(2.5), "u8": np.uint8(7)}
    path = tmp_path / "arrays.pt"
    torch.save(arrays, path)
    loaded = weights.load_checkpoint(path)
    for name, array in arrays.items():
        same_type = np.asarray(loaded[name]).dtype.newbyteorder("=") == array.dtype.newbyteorder("=")
        assert same_type and np.array_equal(loaded[name], array), name  # numpy stores big-endian data native
    assert isinstance(loaded["i16"], np.ndarray) and loaded["scalar"] == 2.5
    for refused in (np.array(["text"]), np.array([1, None], dtype=object), np.zeros(2, dtype=[("a", "f4")])):
        torch.save({"x": refused}, path)
        with pytest.raises(weights.UnsafeCheckpointError, match="refusing (a )?numpy"):
            weights.load_checkpoint(path)


def test_every_refusal_is_a_value_error_naming_the_file(tmp_path):
    assert issubclass(weights.UnsafeCheckpointError, ValueError)
    assert issubclass(weights.UnsafeCheckpointError, pickle.UnpicklingError)
    path = write_zip_checkpoint(tmp_path / "evil.pt", Exploit(os.system, "true"))
    with pytest.raises(ValueError, match=re.escape(str(path))):
        weights.load_checkpoint(path)


def test_legacy_file_with_a_hostile_object_graph_is_refused_before_storages_are_read(tmp_path):
    path = write_legacy_checkpoint(tmp_path / "deep.bin", None)
    data = path.read_bytes().replace(pickle.dumps({"x": None}, protocol=2),
                                     b"\x80\x02]" + b"\x85" * 500 + b".")  # a list in 500 nested 1-tuples
    path.write_bytes(data)
    with pytest.raises(ValueError, match="nested deeper than 200"):
        weights.load_state_dict(path)


def test_save_checkpoint_checks_a_shared_structure_once(tmp_path):
    shared = []
    for _ in range(60):  # 2**60 paths, 60 lists
        shared = [shared, shared]
    weights.save_checkpoint({"shared": shared}, tmp_path / "dag.pt")  # returns at once instead of walking
    assert weights.load_checkpoint(tmp_path / "dag.pt")["shared"][0] is not None
    with pytest.raises(TypeError, match="str_"):
        weights.save_checkpoint({"x": np.str_("text")}, tmp_path / "text.pt")


def test_loader_checks_name_sorted_differences_and_drop_only_ignored_keys():
    """check_state_dict: the one key-set-and-shape check every model loader makes; check_config: the one check of a
    config read off the tensors against its preset."""
    model = nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3))
    good = {k: torch.zeros(v.shape) for k, v in model.state_dict().items()}
    extra = {"0.attn.bias": torch.ones(1), "loss.logvar": torch.ones(1), "loss.disc.0.weight": torch.ones(1)}
    assert weights.check_state_dict(model, {**good, **extra}, "toy", ignored=("*.attn.bias", "loss.*")) == good
    bad = {**good, "0.weight": torch.zeros(3, 3), "2.extra": torch.zeros(1), "0.attn.bias": torch.ones(1)}
    del bad["1.bias"]
    with pytest.raises(ValueError) as error:
        weights.check_state_dict(model, bad, "toy (prefix 'x.')")
    assert str(error.value) == ("toy (prefix 'x.') does not match Sequential:\n  missing 1: ['1.bias']\n"
                                "  unexpected 2: ['0.attn.bias', '2.extra']\n"
                                "  wrong shapes 1: ['0.weight: file (3, 3) != model (3, 2)']")
    from vit import VISION_PRESETS
    weights.check_config(VISION_PRESETS["ViT-B/32"], VISION_PRESETS["ViT-B/32"], "ViT-B/32")
    with pytest.raises(ValueError, match=r"preset ViT-L/14: vision_layers: checkpoint 12 != preset 24; "
                                         r"vision_width: checkpoint 768 != preset 1024"):
        weights.check_config(VISION_PRESETS["ViT-B/32"], VISION_PRESETS["ViT-L/14"], "ViT-L/14")
