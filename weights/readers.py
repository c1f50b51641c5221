"""Opening PyTorch checkpoints without running their code: the three file layouts.

Every pickle below goes through unpickler.py (an opcode pre-scan, then an allow-list). Three
layouts are read:

- the zip format (`torch.save`, PyTorch >= 1.6): `<name>/data.pkl` holds the object graph, each
  storage's bytes are a separate, uncompressed member `<name>/data/<key>` (torch/serialization.py
  `_load`);
- the legacy format (`torch.save(..., _use_new_zipfile_serialization=False)`, e.g. GPT-2's 2019
  `pytorch_model.bin`): five pickles in a row (magic number, protocol version, sys info, the
  object graph, the list of storage keys), then each storage as an int64 element count followed
  by its raw bytes (`_legacy_load`);
- TorchScript archives (`torch.jit.save`, e.g. OpenAI's `ViT-B-32.pt`): the zip format again, but
  `data.pkl` pickles the module objects themselves as `__torch__.*` classes. They load as
  Placeholders; `code/**.py` (read as text, never run) says which tensor attributes are
  parameters or buffers, which gives the same keys as `torch.jit.load(f).state_dict()`.

A zip is read only as torch writes it: no member twice (torch would read the first copy, a
naive reader the last), no encryption, storages and `data.pkl` stored uncompressed (only
TorchScript's `code/` is deflated), every member inside the file, every byte read counted
against the file's own size (no zip bomb), and each storage's CRC-32 checked (a flipped bit is
refused, not loaded). Everything that is wrong with a file is one `ValueError` naming it
(`UnsafeCheckpointError`, a `ValueError` too, for what it asked to run).
"""
import collections
import contextlib
import dataclasses
import fnmatch
import re
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from .safetensors_format import atomic_write, read_into, read_safetensors
from .unpickler import Placeholder, Storage, load_pickle

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch/serialization.py MAGIC_NUMBER
LEGACY_PROTOCOL = 1001


@contextlib.contextmanager
def _refusals(path, what):
    """Turn whatever a malformed file makes the standard library raise (BadZipFile, struct.error,
    NotImplementedError, RuntimeError for encryption, OverflowError, RecursionError, ...) into one
    ValueError naming the file. MemoryError passes: it says something about the machine."""
    try:
        yield
    except MemoryError:
        raise
    except Exception as error:
        if isinstance(error, ValueError) and str(path) in str(error):
            raise
        raise ValueError(f"{path}: corrupt {what} ({type(error).__name__}: {error})") from error

# ----------------------------------------------------------------------------- zip archives

class _ZipReader:
    """The members of a torch zip archive, read with the checks of the module docstring."""

    def __init__(self, path, f, archive):
        self.path, self.f, self.archive = path, f, archive
        self.budget = f.seek(0, 2)  # bytes that may still be read: the file's own size
        infos = archive.infolist()
        counts = collections.Counter(info.filename for info in infos)
        twice = sorted(name for name, count in counts.items() if count > 1)
        if twice:
            raise ValueError(f"{path}: zip members appear more than once: {twice[:5]} (refused: readers disagree "
                             f"on which copy counts)")
        for info in infos:
            if info.flag_bits & 0x1:
                raise ValueError(f"{path}: zip member {info.filename!r} is encrypted")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise ValueError(f"{path}: zip member {info.filename!r} uses compression method {info.compress_type}")
            if (info.header_offset + 30 + info.compress_size > self.budget
                    or (info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size)):
                raise ValueError(f"{path}: zip member {info.filename!r} claims bytes beyond the end of the file")
        self.infos = {info.filename: info for info in infos}
        pickles = [n for n in self.infos if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise ValueError(f"{path}: zip file without exactly one <name>/data.pkl, not a PyTorch checkpoint")
        self.prefix = pickles[0][: -len("data.pkl")]
        if self.prefix + "byteorder" in self.infos and self.read(self.prefix + "byteorder").strip() != b"little":
            raise ValueError(f"{path}: big-endian checkpoints are not supported")

    def _take(self, name, nbytes):
        self.budget -= nbytes
        if self.budget < 0:  # overlapping members, or deflated ones that inflate past the file
            raise ValueError(f"{self.path}: zip members add up to more bytes than the file holds (at {name!r})")

    def read(self, name, compressed_ok=False):
        """A small member (data.pkl, byteorder, code/): zipfile reads at most its declared size and
        checks its CRC-32."""
        info = self.infos[name]
        if info.compress_type != zipfile.ZIP_STORED and not compressed_ok:
            raise ValueError(f"{self.path}: zip member {name!r} is compressed; torch never compresses it")
        self._take(name, info.file_size)
        return self.archive.read(info)

    def storage(self, name, nbytes):
        """One storage, read straight into a fresh uint8 tensor (one read, no copy), CRC-checked."""
        info = self.infos[name]
        if info.file_size != nbytes:
            raise ValueError(f"{self.path}: {name} holds {info.file_size} bytes, the pickle expects {nbytes}")
        if info.compress_type != zipfile.ZIP_STORED:
            raise ValueError(f"{self.path}: zip member {name!r} is compressed; torch never compresses storages")
        self._take(name, nbytes)
        self.f.seek(info.header_offset)
        local = self.f.read(30)
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            raise ValueError(f"{self.path}: corrupt zip local header for {name}")
        name_length, extra_length = struct.unpack("<HH", local[26:30])
        self.f.seek(info.header_offset + 30 + name_length + extra_length)
        data = torch.empty(nbytes, dtype=torch.uint8)
        if read_into(self.f, data) != nbytes:
            raise ValueError(f"{self.path}: {name} is truncated")
        if zlib.crc32(memoryview(data.numpy())) != info.CRC:
            raise ValueError(f"{self.path}: {name} fails its CRC-32 check (the file is damaged)")
        return data


def _load_zip(path, torchscript=None):
    """Unpickle a torch zip archive. Returns (object, {code file: text}) for TorchScript use."""
    with open(path, "rb") as f, _refusals(path, "zip archive"), zipfile.ZipFile(f) as archive:
        members = _ZipReader(path, f, archive)
        prefix = members.prefix
        if torchscript is None:
            torchscript = any(name.startswith(prefix + "code/") for name in members.infos)
        storages = {}

        def load_storage(key, dtype, numel):
            if key not in storages:
                member = f"{prefix}data/{key}"
                if member not in members.infos:
                    raise ValueError(f"{path}: the pickle refers to storage {key!r}, missing from the archive")
                storages[key] = Storage(members.storage(member, numel * dtype.itemsize), dtype)
            return storages[key]

        obj = load_pickle(members.read(prefix + "data.pkl"), path, load_storage, torchscript)
        code = {}
        if torchscript:
            for name in members.infos:
                if name.startswith(prefix + "code/") and name.endswith(".py"):
                    text = members.read(name, compressed_ok=True).decode("utf-8", "replace")
                    code[name[len(prefix + "code/"):]] = text
        return obj, code


# ----------------------------------------------------------------------------- legacy format

def _load_legacy(path):
    """Unpickle a pre-zip `torch.save` file (torch/serialization.py `_legacy_load`)."""
    with open(path, "rb") as f, _refusals(path, "legacy checkpoint"):
        file_size = Path(path).stat().st_size
        if load_pickle(f, path) != LEGACY_MAGIC:
            raise ValueError(f"{path}: not a PyTorch checkpoint (wrong magic number)")
        if load_pickle(f, path) != LEGACY_PROTOCOL:
            raise ValueError(f"{path}: unsupported legacy checkpoint protocol version")
        sys_info = load_pickle(f, path)
        if not isinstance(sys_info, dict) or not sys_info.get("little_endian", True):
            raise ValueError(f"{path}: big-endian checkpoints are not supported")

        # The storages come AFTER the object graph: allocate each one (bounded by the file size),
        # let the tensors view it, then fill it from the file below.
        storages, total = {}, 0

        def load_storage(key, dtype, numel):
            nonlocal total
            if key not in storages:
                nbytes = numel * dtype.itemsize
                total += nbytes
                if total > file_size:
                    raise ValueError(f"{path}: storages claim {total} bytes, more than the file's {file_size}")
                storages[key] = Storage(torch.empty(nbytes, dtype=torch.uint8), dtype)
            return storages[key]

        obj = load_pickle(f, path, load_storage)
        keys = load_pickle(f, path)
        if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(storages):
            raise ValueError(f"{path}: storage key list does not match the storages the pickle uses")
        for key in map(str, keys):
            storage = storages[key]
            count = f.read(8)
            if len(count) != 8:
                raise ValueError(f"{path}: truncated before storage {key!r}")
            (numel,) = struct.unpack("<q", count)
            if numel * storage.dtype.itemsize != storage.data.numel():
                raise ValueError(f"{path}: storage {key!r} holds {numel} elements, the pickle expects "
                                 f"{storage.data.numel() // storage.dtype.itemsize}")
            if read_into(f, storage.data) != storage.data.numel():
                raise ValueError(f"{path}: truncated inside storage {key!r}")
    return obj


# ----------------------------------------------------------------------------- TorchScript

def _torchscript_tensor_names(code):
    """{(module, class name): (parameter names, buffer names)} from the archive's code/ files.

    The files are TorchScript source; we only read two literal lines per class, e.g.
    `__parameters__ = ["weight", "bias", ]`. File `__torch__/torch/nn/modules/linear.py` defines
    module `__torch__.torch.nn.modules.linear`."""
    classes = {}
    for file_name, text in code.items():
        module = file_name[: -len(".py")].replace("/", ".")
        current = None
        for line in text.splitlines():
            match = re.match(r"class ([\w.]+)\(Module\):", line)
            if match:
                # mangled classes are written as `class ___torch_mangle_3.Linear(Module)`
                inner_module, _, class_name = match.group(1).rpartition(".")
                current = (f"{module}.{inner_module}" if inner_module else module, class_name)
                classes[current] = ([], [])
                continue
            if current is not None and line.startswith(("  __parameters__ = ", "  __buffers__ = ")):
                match = re.fullmatch(r'  __(parameters|buffers)__ = \[((?:"\w+", )*)\]', line)
                if match is None:
                    raise ValueError(f"unreadable TorchScript declaration in code/{file_name}: {line[:80]!r}")
                names = re.findall(r'"(\w+)"', match.group(2))
                classes[current][0 if match.group(1) == "parameters" else 1].extend(names)
    return classes


def torchscript_state_dict(module_object, code):
    """Flatten unpickled TorchScript module placeholders into {'a.b.weight': tensor}.

    Order and content equal `torch.jit.load(f).state_dict()`: a module's parameters, then its
    buffers, then each submodule's, in attribute order; None-valued parameters are skipped.
    Tensor attributes that are neither (plain attributes) are left out, as state_dict does. The
    walk keeps a visited set: a module reached twice (shared) counts once, under its first name,
    as named_parameters() does, so neither a shared diamond nor a cycle can make it loop."""
    classes = _torchscript_tensor_names(code)
    if not isinstance(module_object, Placeholder):
        raise ValueError("TorchScript archive whose data.pkl is not a module")
    state, visited, pending = {}, set(), [(module_object, "")]
    while pending:  # depth-first, in attribute order: the order of state_dict()
        obj, prefix = pending.pop()
        if id(obj) in visited:
            continue
        visited.add(id(obj))
        attributes = obj.state if isinstance(obj.state, dict) else {}
        module, _, name = obj.qualname.rpartition(".")
        parameters, buffers = classes.get((module, name), (None, None))
        if parameters is None:  # no code for this class: keep every tensor attribute
            parameters, buffers = [k for k, v in attributes.items() if isinstance(v, torch.Tensor)], []
        for key in list(parameters) + list(buffers):
            if isinstance(attributes.get(key), torch.Tensor):
                state[prefix + key] = attributes[key]
        children = [(value, f"{prefix}{key}.") for key, value in attributes.items()
                    if isinstance(value, Placeholder) and value.qualname.startswith("__torch__")]
        pending.extend(reversed(children))
    return state


# ----------------------------------------------------------------------------- public API

def _sniff(path):
    """The format of a checkpoint, from its first bytes (a .safetensors name decides on its own,
    so that a damaged safetensors file gets the safetensors reader's precise error)."""
    if path.suffix == ".safetensors":
        return "safetensors"
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] > 1:
        return "safetensors"
    if head[:1] == b"\x80":  # a pickle protocol opcode: the legacy format starts with the magic number
        return "legacy"
    raise ValueError(f"{path}: unrecognised checkpoint format (not safetensors, not a PyTorch zip or "
                     f"legacy pickle, not TorchScript); first bytes {head[:8]!r}")


def load_checkpoint(path):
    """Restricted unpickle of a whole torch-saved object (zip or legacy format).

    Dicts, lists, tuples, numbers, strings, tensors come back as they were saved; allowed
    foreign classes come back as `Placeholder`s; anything else raises UnsafeCheckpointError.
    A safetensors file is returned as its dict of tensors."""
    path = Path(path)
    kind = _sniff(path)
    if kind == "safetensors":
        return read_safetensors(path)
    if kind == "legacy":
        return _load_legacy(path)
    return _load_zip(path, torchscript=False)[0]


def load_state_dict(path):
    """Every tensor of a checkpoint in any supported format, as {name: tensor}, stored dtypes kept.

    safetensors, torch zip (.bin/.ckpt/.pt), legacy pickle, or a TorchScript archive. A top-level
    {'state_dict': {...}} (PyTorch Lightning, e.g. SD 1.5 .ckpt) is unwrapped; the other
    top-level entries (epoch, callbacks, ...) are dropped."""
    path = Path(path)
    kind = _sniff(path)
    if kind == "safetensors":
        return read_safetensors(path)
    if kind == "legacy":
        obj = _load_legacy(path)
    else:
        obj, code = _load_zip(path)
        if isinstance(obj, Placeholder):
            with _refusals(path, "TorchScript archive"):
                return torchscript_state_dict(obj, code)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    wrong = sorted(str(k) for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor)))
    if wrong:
        raise ValueError(f"{path}: not a state dict, entries that are not tensors: {wrong[:10]}")
    return dict(obj)


# What torch.optim.AdamW saves per parameter (amsgrad adds max_exp_avg_sq); "step" is a 0-d tensor.
ADAMW_STATE = {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}


def check_optimizer_state(saved, optimizer, path):
    """`saved` (a checkpoint's "optimizer") if it is what AdamW saves for `optimizer`'s parameters,
    else ValueError: {"state": {index: {ADAMW_STATE key: tensor}}, "param_groups": [{name: number,
    tuple of numbers or 0-d tensor, "params": [index, ...]}]}, one group per live group, every
    tensor the shape of its parameter. torch's load_state_dict deep-copies what it is given without
    a memo (a file of shared references hangs it), so nothing else gets through, and nothing here
    walks deeper than those two levels."""
    def fail(message):
        raise ValueError(f"{path}: optimizer state refused: {message}")

    def is_number(value):
        return type(value) in (bool, int, float, type(None)) or (type(value) is torch.Tensor and value.dim() == 0)

    if type(saved) is not dict or set(saved) != {"state", "param_groups"}:
        fail(f"expected a dict with 'state' and 'param_groups', got {type(saved).__name__}")
    groups, state, live = saved["param_groups"], saved["state"], optimizer.param_groups
    if type(groups) is not list or len(groups) != len(live):
        fail(f"{len(groups) if type(groups) is list else type(groups).__name__} parameter groups, "
             f"the model has {len(live)}")
    parameters = {}
    for number, (group, live_group) in enumerate(zip(groups, live)):
        if type(group) is not dict or not all(type(key) is str for key in group):
            fail(f"parameter group {number} is not a dict of names")
        for key, value in group.items():
            if key == "params":
                if (type(value) is not list or len(value) != len(live_group["params"])
                        or not all(type(index) is int for index in value)):
                    fail(f"group {number} lists {len(value) if type(value) is list else '?'} parameters, "
                         f"the model has {len(live_group['params'])}")
                parameters.update(zip(value, live_group["params"]))
            elif not (is_number(value) or (type(value) in (tuple, list) and len(value) <= 4
                                           and all(is_number(item) for item in value))):
                fail(f"group {number} entry {key!r} is a {type(value).__name__}, not a number")
    if len(parameters) != sum(len(group["params"]) for group in live):
        fail("parameter indices repeat")
    if type(state) is not dict:
        fail(f"'state' is a {type(state).__name__}")
    for index, entry in state.items():
        if index not in parameters or type(entry) is not dict or not set(entry) <= ADAMW_STATE:
            fail(f"state entry {index!r:.40} is not AdamW's state of a parameter of this model")
        for key, value in entry.items():
            shape = () if key == "step" else tuple(parameters[index].shape)
            tensor_ok = type(value) is torch.Tensor and tuple(value.shape) == shape
            if not tensor_ok and not (key == "step" and is_number(value)):
                fail(f"state {index} {key}: expected a tensor of shape {shape}")
    return saved


SAVEABLE = (str, int, float, bool, complex, bytes, bytearray, slice, type(None), torch.dtype, torch.device, torch.Size)


def save_checkpoint(obj, path):
    """torch.save `obj` atomically (temporary file, fsync, os.replace).

    Only what load_checkpoint can read back is accepted (dicts, lists, tuples, sets, numbers,
    strings, tensors, dtypes): anything else raises TypeError naming its place in `obj`, before
    anything is written. Store configs as dicts (dataclasses.asdict), not as objects."""
    seen = set()  # containers already checked: a shared value is checked once (a DAG is not walked per path)

    def check(value, where):
        if type(value) in (dict, collections.OrderedDict, list, tuple, set, frozenset):
            if id(value) in seen:
                return
            seen.add(id(value))
        if isinstance(value, torch.Tensor):
            if type(value) not in (torch.Tensor, torch.nn.Parameter):
                raise TypeError(f"save_checkpoint: {where} is a {type(value).__name__}, a tensor subclass")
        elif isinstance(value, (dict, collections.OrderedDict)):
            if type(value) not in (dict, collections.OrderedDict):
                raise TypeError(f"save_checkpoint: {where} is a {type(value).__name__}; use a plain dict")
            for key, item in value.items():
                check(key, f"{where} key {key!r}")
                check(item, f"{where}[{key!r}]")
        elif type(value) in (list, tuple, set, frozenset):
            for index, item in enumerate(value):
                check(item, f"{where}[{index}]")
        elif isinstance(value, np.generic) and value.dtype.kind in "biufc":
            pass  # numpy numbers (np.float32(loss), ...): the loader rebuilds them from their dtype's name
        elif type(value) not in SAVEABLE and not isinstance(value, torch.dtype):
            raise TypeError(f"save_checkpoint: {where} is a {type(value).__name__}, which load_checkpoint "
                            f"would refuse; convert it to plain data (dict, list, str, number, tensor)")

    check(obj, "checkpoint")
    path = Path(path)
    with atomic_write(path) as f:
        torch.save(obj, f)
    return path


def check_state_dict(model, sd, what, ignored=()):
    """A loader's last check before `model.load_state_dict(sd, strict=True, assign=True)`: sets, not counts.

    Keys matching one of the `ignored` patterns (fnmatch: "h.*.attn.bias", "loss.*"), which a file may carry and
    the model does not hold, are dropped; then the key sets and every shape are compared with the model's (built
    on the meta device: no memory), and any difference fails with the sorted lists. Returns `sd` without the
    ignored keys. `what` names the checkpoint part in the message ("UNet (prefix 'model.diffusion_model.')")."""
    sd = {k: v for k, v in sd.items() if not any(fnmatch.fnmatchcase(k, pattern) for pattern in ignored)}
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    differences = {
        "missing": sorted(expected.keys() - sd.keys()),
        "unexpected": sorted(sd.keys() - expected.keys()),
        "wrong shapes": sorted(f"{k}: file {tuple(sd[k].shape)} != model {s}" for k, s in expected.items()
                               if k in sd and tuple(sd[k].shape) != s)}
    if any(differences.values()):
        raise ValueError(f"{what} does not match {type(model).__name__}:\n" + "\n".join(
            f"  {kind} {len(keys)}: {keys[:20]}" for kind, keys in differences.items() if keys))
    return sd


def check_config(found, preset, name):
    """A config read off a checkpoint's tensors against the preset it claims to be: fail naming every field
    where they disagree (both are dataclasses of one type)."""
    differences = [f"{f.name}: checkpoint {getattr(found, f.name)} != preset {getattr(preset, f.name)}"
                   for f in dataclasses.fields(found) if getattr(found, f.name) != getattr(preset, f.name)]
    if differences:
        raise ValueError(f"checkpoint does not match preset {name}: " + "; ".join(differences))
