"""What a checkpoint may ask for when it is unpickled: the allow-list, and nothing else.

A `.bin`, `.ckpt` or `.pt` file is a pickle, and unpickling calls whatever functions the file
names: `torch.load(..., weights_only=False)` on a stranger's file runs a stranger's program.
`RestrictedUnpickler.find_class` answers every global the pickle names from `ALLOWED_GLOBALS`:
the functions that rebuild tensors (replaced by our own, which bounds-check against the storage),
storage types, dtypes, OrderedDict and a few builtin containers. Classes that official files carry
but nobody needs for inference (the PyTorch Lightning callbacks inside Stable Diffusion's `.ckpt`;
the `__torch__.*` module classes of TorchScript archives) become inert `Placeholder`s that only
record what the pickle hands them. Anything else (`os.system`, `builtins.eval`,
`subprocess.Popen`, ...) raises `UnsafeCheckpointError` naming it, before it is called.

The file layouts around the pickle (zip, legacy, TorchScript) are in readers.py.
"""
import collections
import io
import math
import pickle

import numpy as np
import torch

PLACEHOLDER_PREFIXES = (
    "pytorch_lightning.",   # SD 1.x .ckpt: ModelCheckpoint callback used as a dict key, AttributeDict
    "lightning.",           # the same package under its newer name
    "lightning_fabric.",
    "omegaconf.",           # configs saved beside Lightning hyper-parameters
    "argparse.Namespace",   # old checkpoints store their command-line args
)


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint asked for a function or class outside the allow-list; nothing was called."""


class Placeholder:
    """An inert stand-in for a class we do not import: it records what the pickle gave it."""
    qualname = "?"

    def __new__(cls, *args, **kwargs):  # pickle NEWOBJ calls __new__ without __init__
        self = super().__new__(cls)
        self.args, self.kwargs, self.state, self.items, self.list_items = args, kwargs, None, {}, []
        return self

    def __init__(self, *args, **kwargs):  # pickle REDUCE calls the class: __new__ did the work
        pass

    def __setstate__(self, state):  # pickle BUILD
        self.state = state

    def __setitem__(self, key, value):  # pickle SETITEM(S) on dict subclasses
        self.items[key] = value

    def append(self, value):  # pickle APPEND(S) on list subclasses
        self.list_items.append(value)

    def extend(self, values):
        self.list_items.extend(values)

    def __repr__(self):
        return f"Placeholder({self.qualname})"


def _placeholder_class(qualname):
    # A fresh class per global, so that identity (e.g. a class used as a dict key) survives.
    return type(qualname.rsplit(".", 1)[-1], (Placeholder,), {"qualname": qualname,
                                                              "__module__": "weights.unpickler"})


# Storage classes as they appear in pickles (torch.FloatStorage, ...) -> element dtype.
STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128, "UntypedStorage": torch.uint8,
}


class StorageType:
    """What `torch.FloatStorage` unpickles to here: a marker holding the dtype, not callable."""

    def __init__(self, dtype):
        self.dtype = dtype


class Storage:
    """One storage of a checkpoint: a flat uint8 buffer plus the element dtype of its tensors."""

    def __init__(self, data, dtype):
        self.data, self.dtype = data, dtype


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    """torch._utils._rebuild_tensor(_v2): a strided view into a storage, bounds-checked first."""
    if not isinstance(storage, Storage):
        raise ValueError(f"tensor rebuilt from {type(storage).__name__}, not from a storage")
    size, stride = tuple(size), tuple(stride)
    numbers = (storage_offset,) + size + stride
    if not all(type(n) is int and n >= 0 for n in numbers) or len(size) != len(stride):
        raise ValueError(f"bad tensor geometry: offset {storage_offset!r}, size {size!r}, stride {stride!r}")
    elements = storage.data.numel() // storage.dtype.itemsize
    if math.prod(size) and storage_offset + sum((n - 1) * s for n, s in zip(size, stride)) >= elements:
        raise ValueError(f"tensor of size {size} stride {stride} at offset {storage_offset} "
                         f"overruns its storage of {elements} elements")
    return storage.data.view(storage.dtype).as_strided(size, stride, storage_offset)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    """torch._utils._rebuild_parameter(_with_state): a Parameter is just its tensor here."""
    return data


def _rebuild_from_type_v2(function, new_type, args, state):
    """torch._tensor._rebuild_from_type_v2: only for plain tensors and parameters."""
    if new_type not in (torch.Tensor, torch.nn.Parameter):
        raise UnsafeCheckpointError(f"refusing to rebuild a tensor as {new_type!r}")
    return function(*args)


def _codecs_encode(text, encoding="utf-8"):
    """_codecs.encode, which protocol-2 pickles use to build bytes objects."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafeCheckpointError("refusing _codecs.encode with anything but (str, 'latin1')")
    return text.encode("latin1")


def _bytearray(source=b"", encoding="latin-1"):
    """builtins.bytearray from data (protocol 2 passes a str and 'latin-1'); never from a size,
    which would let a file allocate as much memory as it likes."""
    if isinstance(source, str):
        return bytearray(source, encoding)
    if not isinstance(source, (bytes, bytearray)):
        raise UnsafeCheckpointError(f"refusing bytearray({type(source).__name__})")
    return bytearray(source)


def _numpy_scalar(dtype, data=None):
    """numpy.core.multiarray.scalar for plain (non-object) dtypes."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise UnsafeCheckpointError("refusing a numpy scalar of object dtype")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _identity(value, *unused):
    return value


ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): _codecs_encode,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): torch.Tensor, ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
    ("torch", "Size"): torch.Size, ("torch", "device"): torch.device,
    # TorchScript archives wrap typed lists: the value itself is all we need
    ("torch.jit._pickle", "build_intlist"): _identity, ("torch.jit._pickle", "build_doublelist"): _identity,
    ("torch.jit._pickle", "build_boollist"): _identity, ("torch.jit._pickle", "build_tensorlist"): _identity,
    ("torch.jit._pickle", "build_strlist"): _identity, ("torch.jit._pickle", "restore_type_tag"): _identity,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar, ("numpy._core.multiarray", "scalar"): _numpy_scalar,
}


# Protocol-2 pickles (torch.save's default) spell the builtins module "__builtin__".
for _module in ("builtins", "__builtin__"):
    ALLOWED_GLOBALS.update({(_module, "set"): set, (_module, "frozenset"): frozenset, (_module, "slice"): slice,
                            (_module, "complex"): complex, (_module, "bytearray"): _bytearray})


class RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler whose globals come from the allow-list above, and whose persistent ids
    ('storage', type, key, location, numel[, view]) resolve through `load_storage(key, dtype, numel)`."""

    def __init__(self, file, load_storage, path, torchscript=False):
        super().__init__(file, encoding="utf-8")
        self.load_storage, self.path, self.torchscript = load_storage, path, torchscript
        self.placeholders = {}

    def find_class(self, module, name):
        if (module, name) in ALLOWED_GLOBALS:
            return ALLOWED_GLOBALS[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return StorageType(STORAGE_DTYPES[name])
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        qualname = f"{module}.{name}"
        if (qualname.startswith(PLACEHOLDER_PREFIXES)
                or (self.torchscript and (module == "__torch__" or module.startswith("__torch__.")))):
            if qualname not in self.placeholders:
                self.placeholders[qualname] = _placeholder_class(qualname)
            return self.placeholders[qualname]
        raise UnsafeCheckpointError(
            f"{self.path}: refusing to load global '{qualname}': this checkpoint asks to call code "
            f"that is not on the allow-list of weights/unpickler.py (tensors, containers, dtypes). "
            f"It may be malicious; nothing was executed.")

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] not in ("storage", b"storage"):
            raise ValueError(f"{self.path}: unsupported persistent id {pid!r:.100} (only storages are)")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, StorageType) or type(numel) is not int or numel < 0:
            raise ValueError(f"{self.path}: malformed storage reference {pid!r:.100}")
        key = key.decode("ascii") if isinstance(key, bytes) else str(key)
        storage = self.load_storage(key, storage_type.dtype, numel)
        view = pid[5] if len(pid) > 5 else None
        if view is not None:  # legacy format: a storage that is a slice of another
            _view_key, offset, view_numel = view
            itemsize = storage_type.dtype.itemsize
            if not (0 <= offset and 0 <= view_numel and offset + view_numel <= numel):
                raise ValueError(f"{self.path}: storage view {view!r} outside its storage of {numel} elements")
            storage = Storage(storage.data[offset * itemsize:(offset + view_numel) * itemsize], storage.dtype)
        return storage


def unpickle(data, load_storage, path, torchscript=False):
    try:
        return RestrictedUnpickler(io.BytesIO(data), load_storage, path, torchscript).load()
    except (UnsafeCheckpointError, ValueError):
        raise
    except Exception as error:  # truncated or corrupt pickle: EOFError, UnpicklingError, TypeError, ...
        raise ValueError(f"{path}: corrupt checkpoint pickle ({type(error).__name__}: {error})") from error
