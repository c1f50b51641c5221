"""The safetensors file format, read and written by hand.

A safetensors file is three things in a row (huggingface/safetensors, README "Format" and
`safetensors/src/tensor.rs`):

    bytes 0..8        N, the header length, an unsigned 64-bit little-endian integer
    bytes 8..8+N      a UTF-8 JSON object: {"name": {"dtype": "F32", "shape": [768, 2304],
                      "data_offsets": [begin, end]}, ..., "__metadata__": {"str": "str"}}
    bytes 8+N..       the data section: every tensor's bytes, row-major, little-endian; the
                      offsets in the header are relative to the start of this section

There is no code in the file, which is why it is the preferred format. It can still lie, so the
reader checks the WHOLE header before it allocates anything: a size limit, a JSON object, known
dtypes, shapes of non-negative integers, offsets inside the data section that tile it exactly (no
gaps, no overlaps), and byte counts equal to prod(shape) * itemsize. Every violation is one
`ValueError` naming the file and the problem, the same checks as the official Rust `validate`.

The official writer pads the header with spaces to a multiple of 8 bytes so that the data are
aligned; older files are not padded (GPT-2's `model.safetensors` has a 14,283-byte header), so
the reader never assumes alignment.
"""
import contextlib
import json
import math
import os
import struct
import tempfile
from pathlib import Path

import torch

# Format name -> torch dtype. Ordered as the official writer orders its data section: largest
# alignment first (Rust `Dtype` enum, compared in reverse), then by tensor name.
DTYPES = {
    "U64": torch.uint64, "I64": torch.int64, "F64": torch.float64, "C64": torch.complex64,
    "F32": torch.float32, "U32": torch.uint32, "I32": torch.int32,
    "BF16": torch.bfloat16, "F16": torch.float16, "U16": torch.uint16, "I16": torch.int16,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz, "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
WRITE_ORDER = {name: rank for rank, name in enumerate(DTYPES)}
MAX_HEADER_BYTES = 100_000_000  # the official limit (safetensors `MAX_HEADER_SIZE`)


def _fail(path, message):
    raise ValueError(f"{path}: not a valid safetensors file: {message}")


def parse_header(header_bytes, data_length, path="<bytes>"):
    """Validate a header and return (tensor infos in header order, metadata).

    Every check happens here, before any tensor is allocated. Each info is
    (name, dtype_name, shape tuple, begin, end) with offsets relative to the data section."""
    try:
        text = header_bytes.decode("utf-8")
    except UnicodeDecodeError as error:
        _fail(path, f"header is not UTF-8 ({error})")

    if not text.startswith("{"):  # as the official reader: no leading whitespace
        _fail(path, f"header must start with '{{', got {text[:10]!r}")

    def no_duplicates(pairs):  # linear (200,000 keys must not take minutes): a repeated key makes the dict shorter
        result = dict(pairs)
        if len(result) != len(pairs):
            seen = set()
            repeated = next(key for key, _ in pairs if key in seen or seen.add(key))
            _fail(path, f"duplicate key in header: {repeated!r:.200}")
        return result

    try:
        header = json.loads(text, object_pairs_hook=no_duplicates)
    except RecursionError:
        _fail(path, "header JSON is nested too deeply")
    except ValueError as error:  # JSONDecodeError, and int() limits on huge numbers
        if str(error).startswith(str(path)):
            raise
        _fail(path, f"header is not valid JSON ({error})")
    if not isinstance(header, dict):
        _fail(path, f"header must be a JSON object, got {type(header).__name__}")

    metadata = header.pop("__metadata__", None)
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            _fail(path, "__metadata__ must map strings to strings")

    infos = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            _fail(path, f"tensor {name!r}: entry must have exactly dtype, shape, data_offsets, got {entry!r:.200}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            _fail(path, f"tensor {name!r}: unknown dtype {dtype!r:.50} (known: {', '.join(DTYPES)})")
        # bool is an int subclass in Python; JSON true/false are not sizes
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            _fail(path, f"tensor {name!r}: shape must be a list of non-negative integers, got {shape!r:.200}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
            _fail(path, f"tensor {name!r}: data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r:.200}")
        # the element count and every stride must fit in int64 (torch's limit; also no overflow
        # in readers that multiply as they go, like the official one)
        if math.prod(max(d, 1) for d in shape) >= 2 ** 63:
            _fail(path, f"tensor {name!r}: shape {shape} is too large")
        begin, end = offsets
        expected = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != expected:
            _fail(path, f"tensor {name!r}: {dtype} {shape} needs {expected} bytes, data_offsets span {end - begin}")
        infos.append((name, dtype, tuple(shape), begin, end))

    # The tensors must tile the data section exactly: sorted by offset, each begins where the last ended.
    position = 0
    for name, _, _, begin, end in sorted(infos, key=lambda info: (info[3], info[4])):
        if begin != position:
            kind = "overlaps the previous tensor" if begin < position else f"leaves a gap of {begin - position} bytes"
            _fail(path, f"tensor {name!r} at data_offsets [{begin}, {end}] {kind}")
        position = end
    if position != data_length:
        _fail(path, f"tensors cover {position} bytes but the data section holds {data_length} "
                    f"(truncated or padded file)")
    return infos, metadata


def read_into(f, tensor):
    """Fill a contiguous uint8 CPU tensor from a binary file; returns the byte count read.

    Loops because one read(2) returns at most ~2 GB on Linux (SD 1.5 is 4.3 GB in one section)."""
    view, done = memoryview(tensor.numpy()), 0
    while done < len(view):
        count = f.readinto(view[done:])
        if not count:
            break
        done += count
    return done


def _read_prefix(path, file_size):
    """Return (header_bytes, data_start) after the size checks that need no JSON."""
    if file_size < 8:
        _fail(path, f"file has {file_size} bytes, fewer than the 8-byte header length")
    with open(path, "rb") as f:
        (header_length,) = struct.unpack("<Q", f.read(8))
        if header_length > MAX_HEADER_BYTES:
            _fail(path, f"header length {header_length} exceeds the limit of {MAX_HEADER_BYTES} bytes")
        if 8 + header_length > file_size:
            _fail(path, f"header length {header_length} runs past the end of the {file_size}-byte file")
        return f.read(header_length), 8 + header_length


def read_safetensors_metadata(path):
    """The `__metadata__` dict of a file (or None), after validating its header."""
    path = Path(path)
    size = path.stat().st_size
    header_bytes, data_start = _read_prefix(path, size)
    return parse_header(header_bytes, size - data_start, path)[1]


def read_safetensors(path):
    """Read every tensor of a safetensors file into a dict (file order), keeping stored dtypes.

    The data section is read with ONE read into one aligned buffer; each tensor is a view into it
    (no per-tensor copies). A tensor whose offset is not a multiple of its item size (possible in
    unofficial writers) is copied into place, since torch cannot view misaligned memory."""
    path = Path(path)
    size = path.stat().st_size
    header_bytes, data_start = _read_prefix(path, size)
    infos, _ = parse_header(header_bytes, size - data_start, path)

    data = torch.empty(size - data_start, dtype=torch.uint8)
    with open(path, "rb") as f:
        f.seek(data_start)
        if read_into(f, data) != data.numel():
            _fail(path, "file shrank while it was being read")

    tensors = {}
    for name, dtype_name, shape, begin, end in infos:
        dtype = DTYPES[dtype_name]
        raw = data[begin:end]
        if begin % dtype.itemsize:
            raw = raw.clone()  # misaligned: copy to a fresh (aligned) allocation
        tensors[name] = raw.view(dtype).reshape(shape)
    return tensors


@contextlib.contextmanager
def atomic_write(path):
    """Yield a binary file that replaces `path` only once it is completely written and synced.

    The temporary file sits in the same directory (os.replace is atomic only within one file
    system); on any error it is removed and `path` is left as it was."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes 0600; give the file normal permissions
        with os.fdopen(handle, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def write_safetensors(tensors, path, metadata=None):
    """Write a dict of tensors as safetensors, byte-compatible with the official writer.

    Same layout as `safetensors.torch.save_file`: data sorted by dtype (widest first) then name,
    compact JSON header padded with spaces to a multiple of 8 bytes. Written to a temporary file
    in the same directory and renamed into place, so a crash never leaves half a file."""
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("safetensors metadata must map strings to strings")
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise TypeError(f"write_safetensors needs str -> Tensor, got {name!r}: {type(tensor).__name__}")
        if tensor.dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} has no safetensors name")
        if tensor.is_sparse or tensor.layout != torch.strided:
            raise ValueError(f"tensor {name!r}: only dense tensors can be written")

    order = sorted(tensors, key=lambda name: (WRITE_ORDER[DTYPE_NAMES[tensors[name].dtype]], name))
    header = {} if metadata is None else {"__metadata__": metadata}
    position = 0
    for name in order:
        tensor = tensors[name]
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [position, position + nbytes]}
        position += nbytes
    header_bytes = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)

    with atomic_write(path) as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for name in order:
            # the bytes of a contiguous CPU copy, viewed (not converted) as uint8
            flat = tensors[name].detach().to("cpu").contiguous().reshape(-1)
            if flat.numel():
                f.write(memoryview(flat.view(torch.uint8).numpy()))
    return Path(path)
