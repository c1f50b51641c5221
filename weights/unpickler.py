"""What a pickle may ask for when it is unpickled: one restricted unpickler for the whole project.

A `.bin`, `.ckpt` or `.pt` file is a pickle, and unpickling calls whatever functions the file
names: `torch.load(..., weights_only=False)` on a stranger's file runs a stranger's program.
`load_pickle` keeps every pickle the project reads (checkpoints, CIFAR's data files) to being data:

1. pickle_scan.py reads the opcode stream first, building nothing, and refuses deep nesting,
   reference cycles, huge memo indices and any call or BUILD that no checkpoint makes.
2. `RestrictedUnpickler.find_class` answers every global from `ALLOWED_GLOBALS`: our own
   bounds-checked stand-ins for torch's tensor rebuilders, markers for types that appear only as
   arguments, plain containers, and numpy numbers and arrays rebuilt from a dtype *string* (a
   dtype object out of a pickle can claim anything about itself). Classes that official files
   carry but nobody needs (the PyTorch Lightning callbacks inside Stable Diffusion's `.ckpt`; the
   `__torch__.*` modules of TorchScript archives) become inert `Placeholder`s. Anything else
   (`os.system`, `builtins.eval`, ...) raises `UnsafeCheckpointError` naming it, uncalled.

Every refusal is a ValueError naming the file (`UnsafeCheckpointError` is one too). The file
layouts around the pickle (zip, legacy, TorchScript) are in readers.py.
"""
import collections
import io
import math
import pickle

import numpy as np
import torch

from .pickle_scan import scan_pickle

PLACEHOLDER_PREFIXES = (
    "pytorch_lightning.",   # SD 1.x .ckpt: ModelCheckpoint callback used as a dict key, AttributeDict
    "lightning.",           # the same package under its newer name
    "lightning_fabric.",
    "omegaconf.",           # configs saved beside Lightning hyper-parameters
    "argparse.Namespace",   # old checkpoints store their command-line args
)


class UnsafeCheckpointError(pickle.UnpicklingError, ValueError):
    """A pickle asked for a function or class outside the allow-list, or to use one in a way no
    checkpoint does; nothing was called. A ValueError, like every other refusal of the readers."""


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


# ----------------------------------------------------------------------------- tensors

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


class TypeMarker:
    """What `torch.Tensor`, `torch.nn.Parameter` and `numpy.ndarray` unpickle to: they appear in
    checkpoints only as arguments, and calling the real ones (`torch.Tensor(10**12)`) would
    allocate any amount of uninitialised memory from a few bytes."""

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"TypeMarker({self.name})"


TENSOR, PARAMETER, NDARRAY = TypeMarker("torch.Tensor"), TypeMarker("torch.nn.Parameter"), TypeMarker("numpy.ndarray")


class Storage:
    """One storage of a checkpoint: a flat uint8 buffer plus the element dtype of its tensors."""

    def __init__(self, data, dtype):
        self.data, self.dtype = data, dtype


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    """torch._utils._rebuild_tensor(_v2): a strided view into a storage, bounds-checked first."""
    if not isinstance(storage, Storage):
        raise ValueError(f"tensor rebuilt from {type(storage).__name__}, not from a storage")
    if not isinstance(size, (tuple, list, torch.Size)) or not isinstance(stride, (tuple, list)):
        raise ValueError(f"bad tensor geometry: size {size!r:.80}, stride {stride!r:.80}")
    size, stride = tuple(size), tuple(stride)
    numbers = (storage_offset,) + size + stride
    if not all(type(n) is int and 0 <= n < 2 ** 62 for n in numbers) or len(size) != len(stride):
        raise ValueError(f"bad tensor geometry: offset {storage_offset!r}, size {size!r:.80}, stride {stride!r:.80}")
    elements = storage.data.numel() // storage.dtype.itemsize
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride)) if math.prod(size) else storage_offset - 1
    if last >= elements:
        raise ValueError(f"tensor of size {size} stride {stride} at offset {storage_offset} "
                         f"overruns its storage of {elements} elements")
    return storage.data.view(storage.dtype).as_strided(size, stride, storage_offset)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    """torch._utils._rebuild_parameter(_with_state): a Parameter is just its tensor here."""
    if not isinstance(data, torch.Tensor):
        raise ValueError(f"parameter rebuilt from {type(data).__name__}, not from a tensor")
    return data


def _rebuild_from_type_v2(function, new_type, args, state):
    """torch._tensor._rebuild_from_type_v2: only plain tensors and parameters, from our rebuilders;
    the state (attributes of tensor subclasses) is dropped."""
    if function not in (_rebuild_tensor, _rebuild_parameter) or new_type not in (TENSOR, PARAMETER):
        raise UnsafeCheckpointError(f"refusing to rebuild a tensor with {function!r:.60} as {new_type!r:.60}")
    if not isinstance(args, tuple):
        raise ValueError("tensor rebuild arguments are not a tuple")
    return function(*args)


# ----------------------------------------------------------------------------- containers and bytes

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


def _typed_list(value, *unused):
    """torch.jit._pickle.build_*list / restore_type_tag: TorchScript wraps typed lists and dicts;
    the value itself is all we need, and it must be one."""
    if type(value) not in (list, dict):
        raise UnsafeCheckpointError(f"refusing a TorchScript type tag on a {type(value).__name__}")
    return value


# ----------------------------------------------------------------------------- numpy

class DtypeName(str):
    """What `numpy.dtype` unpickles to: its name ('f4', 'u1') and byte order, as a plain string.

    A dtype object that came out of a pickle is never used: BUILD can set its flags so that an
    object dtype claims to hold no objects, and reading file bytes as PyObject* crashes the
    interpreter. `numeric_dtype` rebuilds a fresh dtype from the string and accepts numbers only."""

    def __new__(cls, name, align=False, copy=False):
        if isinstance(name, bytes):  # Python 2 pickles read with encoding="bytes" (CIFAR)
            name = name.decode("latin1")
        if not isinstance(name, str) or len(name) > 8:
            raise UnsafeCheckpointError(f"refusing numpy dtype {name!r:.40}")
        self = super().__new__(cls, name)
        self.byteorder = "="
        return self

    def __setstate__(self, state):  # BUILD: (version, byteorder, subarray, names, fields, ...)
        if not isinstance(state, tuple) or len(state) < 5 or any(part is not None for part in state[2:5]):
            raise UnsafeCheckpointError("refusing a numpy dtype with fields or subarrays")
        order = state[1].decode("latin1") if isinstance(state[1], bytes) else state[1]
        if order not in ("<", ">", "|", "="):
            raise UnsafeCheckpointError(f"refusing numpy byte order {order!r:.10}")
        self.byteorder = order


def numeric_dtype(name):
    """A fresh numpy dtype from a DtypeName: bool, integers, floats or complex, nothing else."""
    if not isinstance(name, DtypeName):
        raise UnsafeCheckpointError(f"refusing numpy data typed {type(name).__name__}")
    try:
        dtype = np.dtype(str(name))
    except TypeError as error:
        raise ValueError(f"unknown numpy dtype {str(name)!r}") from error
    if dtype.kind not in "biufc" or dtype.fields is not None or dtype.subdtype is not None:
        raise UnsafeCheckpointError(f"refusing numpy dtype {str(name)!r}: only numbers are data")
    return dtype.newbyteorder(name.byteorder) if name.byteorder in "<>" else dtype


def _numpy_scalar(dtype_name, data=None):
    """numpy.core.multiarray.scalar: one number (a loss saved as np.float32) from its bytes."""
    dtype = numeric_dtype(dtype_name)
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise ValueError(f"numpy scalar of {dtype} with {len(data) if isinstance(data, bytes) else '?'} bytes")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


class PickledArray(np.ndarray):
    """A numpy array read from a pickle (CIFAR's batches). A subclass only so that pickle's BUILD
    runs the checks below instead of numpy's own `__setstate__` on a pickled dtype."""

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 4:  # version 0: no version number
            state = (0,) + state
        if not isinstance(state, tuple) or len(state) != 5:
            raise ValueError("numpy array state is not (version, shape, dtype, fortran, data)")
        _, shape, dtype_name, fortran, data = state
        dtype = numeric_dtype(dtype_name)
        data = data.encode("latin1") if isinstance(data, str) else data
        if (not isinstance(shape, tuple) or not all(type(n) is int and 0 <= n < 2 ** 40 for n in shape)
                or not isinstance(data, bytes) or len(data) != math.prod(shape) * dtype.itemsize):
            raise ValueError(f"numpy array of shape {shape!r:.60} and {dtype} does not match its "
                             f"{len(data) if isinstance(data, bytes) else '?'} data bytes")
        np.ndarray.__setstate__(self, (1, shape, dtype, bool(fortran), data))


def _reconstruct(array_type, shape, typecode):
    """numpy.core.multiarray._reconstruct: an empty array that BUILD then fills (and checks)."""
    if array_type is not NDARRAY:
        raise UnsafeCheckpointError(f"refusing to reconstruct a numpy array as {array_type!r:.60}")
    return np.ndarray.__new__(PickledArray, (0,), np.uint8)


# ----------------------------------------------------------------------------- the allow-list

# Every global a checkpoint or data file may name, with what it is needed for. The value is what
# the pickle gets: our own functions and markers, never the real torch/numpy callables except
# plain containers and value types.
ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,        # state dicts
    ("_codecs", "encode"): _codecs_encode,                          # bytes in protocol-2 pickles
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,           # tensors, old torch.save
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,        # tensors
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,     # nn.Parameter
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,  # tensors with attributes
    ("torch", "Tensor"): TENSOR, ("torch.nn.parameter", "Parameter"): PARAMETER,  # its argument
    ("torch", "Size"): torch.Size,                                  # shapes stored in configs
    ("torch", "device"): torch.device,                              # devices stored in configs
    # TorchScript archives wrap typed lists and dicts
    ("torch.jit._pickle", "build_intlist"): _typed_list, ("torch.jit._pickle", "build_doublelist"): _typed_list,
    ("torch.jit._pickle", "build_boollist"): _typed_list, ("torch.jit._pickle", "build_tensorlist"): _typed_list,
    ("torch.jit._pickle", "build_strlist"): _typed_list, ("torch.jit._pickle", "restore_type_tag"): _typed_list,
    ("numpy", "dtype"): DtypeName,                                  # the dtype of numpy scalars, arrays
    ("numpy", "ndarray"): NDARRAY,                                  # argument of _reconstruct
}
for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1.x / 2.x names
    ALLOWED_GLOBALS[(_module, "scalar")] = _numpy_scalar            # losses saved as np.float32
    ALLOWED_GLOBALS[(_module, "_reconstruct")] = _reconstruct       # arrays (CIFAR's data files)
# Protocol-2 pickles (torch.save's default) spell the builtins module "__builtin__".
for _module in ("builtins", "__builtin__"):
    ALLOWED_GLOBALS.update({(_module, "set"): set, (_module, "frozenset"): frozenset, (_module, "slice"): slice,
                            (_module, "complex"): complex, (_module, "bytearray"): _bytearray})

# Functions whose results BUILD may give a state: OrderedDict (`_metadata` of state dicts), numpy
# dtypes and arrays (checked by DtypeName and PickledArray), and placeholders.
BUILDABLE = (collections.OrderedDict, DtypeName, _reconstruct)


class RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler whose globals come from the allow-list above, and whose persistent ids
    ('storage', type, key, location, numel[, view]) resolve through `load_storage(key, dtype, numel)`.
    Its may_* methods are the rules pickle_scan.py checks; use it through `load_pickle`."""

    def __init__(self, file, load_storage, path, torchscript=False, encoding="utf-8"):
        super().__init__(file, encoding=encoding)
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
        if qualname.startswith(PLACEHOLDER_PREFIXES) or (self.torchscript and (module + ".").startswith("__torch__.")):
            if qualname not in self.placeholders:
                self.placeholders[qualname] = _placeholder_class(qualname)
            return self.placeholders[qualname]
        raise UnsafeCheckpointError(
            f"{self.path}: refusing to load global '{qualname:.200}': this file asks to call code that is not "
            f"on the allow-list of weights/unpickler.py (tensors, containers, dtypes). It may be malicious; "
            f"nothing was executed.")

    @staticmethod
    def may_construct(cls):  # NEWOBJ: only placeholders (Lightning objects, TorchScript modules)
        return isinstance(cls, type) and issubclass(cls, Placeholder)

    def may_build(self, maker):  # BUILD on what `maker` returned
        return maker in BUILDABLE or self.may_construct(maker)

    def may_fill(self, maker):  # SETITEM(S)/APPEND(S) on what `maker` returned, besides dicts and lists
        return maker is collections.OrderedDict or self.may_construct(maker)

    def persistent_load(self, pid):
        if (self.load_storage is None or not isinstance(pid, tuple) or len(pid) < 5
                or pid[0] not in ("storage", b"storage")):
            raise ValueError(f"unsupported persistent id {pid!r:.100} (only storages of a checkpoint are)")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, StorageType) or type(numel) is not int or numel < 0:
            raise ValueError(f"malformed storage reference {pid!r:.100}")
        key = key.decode("ascii") if isinstance(key, bytes) else str(key)
        storage = self.load_storage(key, storage_type.dtype, numel)
        view = pid[5] if len(pid) > 5 else None
        if view is not None:  # legacy format: a storage that is a slice of another
            if not (isinstance(view, tuple) and len(view) == 3 and all(type(n) is int for n in view[1:])):
                raise ValueError(f"malformed storage view {view!r:.100}")
            _view_key, offset, view_numel = view
            itemsize = storage_type.dtype.itemsize
            if not (0 <= offset and 0 <= view_numel and offset + view_numel <= numel):
                raise ValueError(f"storage view {view!r} outside its storage of {numel} elements")
            storage = Storage(storage.data[offset * itemsize:(offset + view_numel) * itemsize], storage.dtype)
        return storage


def load_pickle(f, path, load_storage=None, torchscript=False, encoding="utf-8"):
    """Scan, then unpickle, the pickle at the position of binary file `f` (bytes are wrapped).

    Every failure is UnsafeCheckpointError or ValueError, with `path` in the message."""
    if isinstance(f, (bytes, bytearray)):
        f = io.BytesIO(f)
    start = f.tell()
    unpickler = RestrictedUnpickler(f, load_storage, path, torchscript, encoding)
    try:
        scan_pickle(f, path, unpickler)
        f.seek(start)
        return unpickler.load()
    except MemoryError:
        raise
    except Exception as error:
        if str(error).startswith(str(path)):
            raise
        kind = UnsafeCheckpointError if isinstance(error, UnsafeCheckpointError) else ValueError
        raise kind(f"{path}: corrupt or refused pickle ({type(error).__name__}: {error})") from error
