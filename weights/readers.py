"""Opening PyTorch checkpoints without running their code: the three file layouts.

Every pickle below goes through unpickler.py's allow-list. Three layouts are read:

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

Everything that is wrong with a file, other than an unsafe global, is one `ValueError`.
"""
import ast
import collections
import dataclasses
import fnmatch
import re
import struct
import zipfile
from pathlib import Path

import numpy as np
import torch

from .safetensors_format import atomic_write, read_into, read_safetensors
from .unpickler import Placeholder, RestrictedUnpickler, Storage, UnsafeCheckpointError, unpickle

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch/serialization.py MAGIC_NUMBER
LEGACY_PROTOCOL = 1001

# ----------------------------------------------------------------------------- zip archives

def _zip_records(path, archive):
    """The archive's common prefix ('archive/', 'a/', ...) and its member names."""
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise ValueError(f"{path}: zip file without exactly one <name>/data.pkl, not a PyTorch checkpoint")
    prefix = pickles[0][: -len("data.pkl")]
    byteorder = prefix + "byteorder"
    if byteorder in names and archive.read(byteorder).strip() != b"little":
        raise ValueError(f"{path}: big-endian checkpoints are not supported")
    return prefix, set(names)


def _read_zip_member(path, archive, f, name, nbytes):
    """Read one stored member straight into a fresh uint8 tensor: one read, no extra copy."""
    info = archive.getinfo(name)
    if info.file_size != nbytes:
        raise ValueError(f"{path}: {name} holds {info.file_size} bytes, the pickle expects {nbytes}")
    data = torch.empty(nbytes, dtype=torch.uint8)
    if info.compress_type != zipfile.ZIP_STORED:  # torch never compresses, but zip tools might
        data.numpy()[:] = np.frombuffer(archive.read(name), dtype=np.uint8)
        return data
    f.seek(info.header_offset)
    local = f.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise ValueError(f"{path}: corrupt zip local header for {name}")
    name_length, extra_length = struct.unpack("<HH", local[26:30])
    f.seek(info.header_offset + 30 + name_length + extra_length)
    if read_into(f, data) != nbytes:
        raise ValueError(f"{path}: {name} is truncated")
    return data


def _load_zip(path, torchscript=None):
    """Unpickle a torch zip archive. Returns (object, archive names, prefix, zip) for TorchScript use."""
    with open(path, "rb") as f, zipfile.ZipFile(f) as archive:
        prefix, names = _zip_records(path, archive)
        if torchscript is None:
            torchscript = f"{prefix}code/" in {n[: len(prefix) + 5] for n in names}
        storages = {}

        def load_storage(key, dtype, numel):
            if key not in storages:
                member = f"{prefix}data/{key}"
                if member not in names:
                    raise ValueError(f"{path}: the pickle refers to storage {key!r}, missing from the archive")
                storages[key] = Storage(_read_zip_member(path, archive, f, member, numel * dtype.itemsize), dtype)
            return storages[key]

        obj = unpickle(archive.read(prefix + "data.pkl"), load_storage, path, torchscript)
        code = {}
        if torchscript:
            for name in names:
                if name.startswith(prefix + "code/") and name.endswith(".py"):
                    code[name[len(prefix + "code/"):]] = archive.read(name).decode("utf-8", "replace")
        return obj, code


# ----------------------------------------------------------------------------- legacy format

def _load_legacy(path):
    """Unpickle a pre-zip `torch.save` file (torch/serialization.py `_legacy_load`)."""
    with open(path, "rb") as f:
        file_size = Path(path).stat().st_size

        def next_pickle():
            try:
                return RestrictedUnpickler(f, None, path).load()
            except UnsafeCheckpointError:
                raise
            except Exception as error:
                raise ValueError(f"{path}: corrupt legacy checkpoint ({type(error).__name__}: {error})") from error

        if next_pickle() != LEGACY_MAGIC:
            raise ValueError(f"{path}: not a PyTorch checkpoint (wrong magic number)")
        if next_pickle() != LEGACY_PROTOCOL:
            raise ValueError(f"{path}: unsupported legacy checkpoint protocol version")
        sys_info = next_pickle()
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

        unpickler = RestrictedUnpickler(f, load_storage, path)
        try:
            obj = unpickler.load()
        except (UnsafeCheckpointError, ValueError):
            raise
        except Exception as error:
            raise ValueError(f"{path}: corrupt legacy checkpoint ({type(error).__name__}: {error})") from error

        keys = next_pickle()
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
            match = re.match(r"  __(parameters|buffers)__ = (\[.*\])$", line)
            if match and current is not None:
                classes[current][0 if match.group(1) == "parameters" else 1].extend(ast.literal_eval(match.group(2)))
    return classes


def torchscript_state_dict(module_object, code):
    """Flatten unpickled TorchScript module placeholders into {'a.b.weight': tensor}.

    Order and content equal `torch.jit.load(f).state_dict()`: a module's parameters, then its
    buffers, then each submodule's, in attribute order; None-valued parameters are skipped.
    Tensor attributes that are neither (plain attributes) are left out, as state_dict does."""
    classes = _torchscript_tensor_names(code)
    state = {}

    def walk(obj, prefix):
        attributes = obj.state if isinstance(obj.state, dict) else {}
        module, _, name = obj.qualname.rpartition(".")
        parameters, buffers = classes.get((module, name), (None, None))
        if parameters is None:  # no code for this class: keep every tensor attribute
            parameters, buffers = [k for k, v in attributes.items() if isinstance(v, torch.Tensor)], []
        for key in list(parameters) + list(buffers):
            if isinstance(attributes.get(key), torch.Tensor):
                state[prefix + key] = attributes[key]
        for key, value in attributes.items():
            if isinstance(value, Placeholder) and value.qualname.startswith("__torch__"):
                walk(value, f"{prefix}{key}.")

    if not isinstance(module_object, Placeholder):
        raise ValueError("TorchScript archive whose data.pkl is not a module")
    walk(module_object, "")
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
    try:
        return _load_zip(path, torchscript=False)[0]
    except zipfile.BadZipFile as error:
        raise ValueError(f"{path}: corrupt zip archive ({error})") from error


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
        try:
            obj, code = _load_zip(path)
        except zipfile.BadZipFile as error:
            raise ValueError(f"{path}: corrupt zip archive ({error})") from error
        if isinstance(obj, Placeholder):
            return torchscript_state_dict(obj, code)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    wrong = sorted(str(k) for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor)))
    if wrong:
        raise ValueError(f"{path}: not a state dict, entries that are not tensors: {wrong[:10]}")
    return dict(obj)


SAVEABLE = (str, int, float, bool, complex, bytes, bytearray, slice, type(None), torch.dtype, torch.device, torch.Size)


def save_checkpoint(obj, path):
    """torch.save `obj` atomically (temporary file, fsync, os.replace).

    Only what load_checkpoint can read back is accepted (dicts, lists, tuples, sets, numbers,
    strings, tensors, dtypes): anything else raises TypeError naming its place in `obj`, before
    anything is written. Store configs as dicts (dataclasses.asdict), not as objects."""

    def check(value, where):
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
        elif isinstance(value, np.generic) and not value.dtype.hasobject:
            pass  # numpy scalars (np.float32(loss), ...) load through numpy's scalar constructor
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
