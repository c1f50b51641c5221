"""Files built to crash, bomb or hang the loaders (issue 14), each opened in a bounded child process.

Every case below was reproduced on the old code as a crash (SIGSEGV, C stack overflow), a memory or time
bomb, or silently wrong data; each must now be one clean refusal (a ValueError naming the file), in well
under a second and with little memory, or, where the file is legitimate but shaped to hurt (a TorchScript
module graph sharing children), a correct load in bounded time. The child (tests/bounded.py) runs under
an address-space limit and a time limit, so a regression fails the test instead of the test runner.

`python tests/test_hostile_files.py` prints every case with its outcome, time and peak memory.
"""
import functools
import io
import pickle
import struct
import sys
import tarfile
import zipfile
import zlib
from pathlib import Path

import pytest
import torch

from bounded import run_bounded

# ----------------------------------------------------------------------------- pickle and zip by hand


def op_global(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def op_str(text):
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def op_int(n):
    return b"J" + struct.pack("<i", n)


def pickle_of(body):
    """A protocol-2 pickle around `body` (opcodes that leave one value on the stack)."""
    return b"\x80\x02" + body + b"."


def raw_zip(members, comment=b""):
    """A zip written field by field, so that every header can lie. Each member: dict with name, data and
    optional method, flags, crc, size (uncompressed), offset (central directory), extra (central)."""
    out, central = bytearray(), bytearray()
    for member in members:
        name, data = member["name"].encode(), member["data"]
        method, flags = member.get("method", 0), member.get("flags", 0)
        crc = member.get("crc", zlib.crc32(data) if method == 0 else 0)
        size = member.get("size", len(data))
        offset = len(out)
        fields = struct.pack("<HHHHHIII", 20, flags, method, 0, 0x21, crc, len(data), min(size, 0xFFFFFFFF))
        out += b"PK\x03\x04" + fields + struct.pack("<HH", len(name), 0) + name + data
        extra = member.get("extra", b"")
        central += (b"PK\x01\x02" + struct.pack("<H", 20) + fields
                    + struct.pack("<HHHHHII", len(name), len(extra), 0, 0, 0, 0, member.get("offset", offset))
                    + name + extra)
    end = struct.pack("<HHHHIIH", 0, 0, len(members), len(members), len(central), len(out), len(comment))
    return bytes(out + central + b"PK\x05\x06" + end + comment)


def checkpoint_zip(data_pkl, storages=(), extra_members=()):
    members = [{"name": "archive/data.pkl", "data": data_pkl}, {"name": "archive/byteorder", "data": b"little"}]
    members += [{"name": f"archive/data/{key}", "data": data} for key, data in storages]
    return raw_zip(members + list(extra_members))


def write(path, data):
    Path(path).write_bytes(data)
    return str(path)


@functools.lru_cache(maxsize=1)
def zero_bomb(nbytes=1 << 30, chunk=1 << 24):
    """(raw DEFLATE stream of `nbytes` zero bytes, its CRC-32): ~1 MB that inflates to 1 GiB. Blocks ended by a
    full flush are self-contained, so one compressed chunk repeated is a valid stream."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(bytes(chunk)) + compressor.flush(zlib.Z_FULL_FLUSH)
    crc, zeros = 0, bytes(chunk)
    for _ in range(nbytes // chunk):
        crc = zlib.crc32(zeros, crc)
    return block * (nbytes // chunk) + compressor.flush(), crc


def tensor_ops(numel, size_ops=None):
    """Opcodes that push torch._utils._rebuild_tensor_v2(<storage "0" of `numel` floats>, 0, size, (1,), False,
    OrderedDict()), size (numel,) unless `size_ops` pushes another tuple."""
    pid = (b"(" + op_str("storage") + op_global("torch", "FloatStorage") + op_str("0") + op_str("cpu") + op_int(numel)
           + b"tQ")
    size = size_ops or op_int(numel) + b"\x85"
    return (op_global("torch._utils", "_rebuild_tensor_v2") + b"(" + pid + op_int(0) + size + op_int(1) + b"\x85\x89"
            + op_global("collections", "OrderedDict") + b")R" + b"tR")


def tensor_pickle(numel, size_ops=None):
    """{"w": that tensor}"""
    return pickle_of(b"}" + op_str("w") + tensor_ops(numel, size_ops) + b"s")


# ----------------------------------------------------------------------------- the hostile files


def object_dtype_scalar():
    """numpy scalar whose dtype is object ('O8'), BUILD-patched to claim it holds no objects: the old
    scalar check passed and np.frombuffer read b"AAAAAAAA" as a PyObject* (SIGSEGV)."""
    dtype = (op_global("numpy", "dtype") + op_str("O8") + b"\x89\x88\x87R" + b"(" + b"K\x03" + op_str("|")
             + b"NNN" + op_int(-1) + op_int(-1) + b"K\x00tb")
    return pickle_of(b"}" + op_str("loss") + op_global("numpy.core.multiarray", "scalar") + dtype
                     + b"C\x08AAAAAAAA\x86Rs")


def object_dtype_array():
    """The same trick inside a numpy array (CIFAR's data files): ndarray.__setstate__ with raw bytes."""
    dtype = (op_global("numpy", "dtype") + op_str("O8") + b"\x89\x88\x87R" + b"(" + b"K\x03" + op_str("|")
             + b"NNN" + op_int(-1) + op_int(-1) + b"K\x00tb")
    array = (op_global("numpy.core.multiarray", "_reconstruct") + op_global("numpy", "ndarray") + b"K\x00\x85"
             + b"C\x01b\x87R" + b"(" + b"K\x01" + b"K\x01\x85" + dtype + b"\x89" + b"C\x08AAAAAAAA" + b"tb")
    return pickle_of(b"}" + b"C\x04data" + array + b"s" + b"C\x0bfine_labels" + b"]K\x00as")


def build_dtype_zip(tmp):
    return (write(tmp / "dtype.pt", checkpoint_zip(object_dtype_scalar())),)


def build_dtype_legacy(tmp):
    parts = [pickle.dumps(0x1950A86A20F9469CFC6C, 2), pickle.dumps(1001, 2),
             pickle.dumps({"protocol_version": 1001, "little_endian": True}, 2), object_dtype_scalar(),
             pickle.dumps([], 2)]
    return (write(tmp / "dtype-legacy.bin", b"".join(parts)),)


def build_dtype_cifar(tmp):
    root = tmp / "cifar"
    root.mkdir()
    meta = pickle.dumps({b"fine_label_names": [b"apple"] * 100}, 3)
    with tarfile.open(root / "cifar-100-python.tar.gz", "w:gz") as tar:
        for name, payload in (("train", object_dtype_array()), ("meta", meta)):
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return (str(root),)


def build_deep_nesting(tmp):
    """A dict key of 1-tuples nested a million deep (1 MB, no global at all): hashing it overflowed the C stack."""
    return (write(tmp / "deep.pt", checkpoint_zip(pickle_of(b"}K\x01" + b"\x85" * 1_000_000 + b"K\x02s"))),)


def _bomb_members(target):
    stream, crc = zero_bomb()
    bomb = {"data": stream, "method": 8, "crc": crc, "size": 1 << 30}
    members = {"data.pkl": {"name": "archive/data.pkl", "data": tensor_pickle(1 << 28)},
               "byteorder": {"name": "archive/byteorder", "data": b"little"},
               "data/0": {"name": "archive/data/0", "data": b""}}
    members[target].update(bomb)
    return list(members.values())


def build_bomb_storage(tmp):
    return (write(tmp / "bomb-storage.pt", raw_zip(_bomb_members("data/0"))),)


def build_bomb_pickle(tmp):
    return (write(tmp / "bomb-pickle.pt", raw_zip(_bomb_members("data.pkl"))),)


def build_bomb_byteorder(tmp):
    return (write(tmp / "bomb-byteorder.pt", raw_zip(_bomb_members("byteorder"))),)


def torchscript_zip(data_pkl, code="class M(Module):\n  __parameters__ = [\"w\", ]\n  __buffers__ = []\n", **bomb):
    members = [{"name": "archive/data.pkl", "data": data_pkl},
               {"name": "archive/code/__torch__.py", "data": code.encode(), **bomb}]
    return raw_zip(members)


def build_bomb_torchscript_code(tmp):
    stream, crc = zero_bomb()
    module = op_global("__torch__", "M") + b")\x81}b"
    return (write(tmp / "bomb-code.pt", torchscript_zip(pickle_of(module), data=stream, method=8, crc=crc,
                                                         size=1 << 30)),)


def module_chain(depth, links=2, leaf=b"}"):
    """TorchScript modules m0 .. m{depth}, each with `links` attributes pointing at the next one; m{depth} gets
    the state `leaf`. Module k is memo entry depth - k (the pickler numbers entries in order)."""
    body = [op_global("__torch__", "M") + b")\x81" + leaf + b"b" + b"r" + struct.pack("<I", 0) + b"0"]
    for k in range(depth - 1, -1, -1):
        attributes = b"".join(op_str(f"a{i}") + b"j" + struct.pack("<I", depth - k - 1) for i in range(links))
        body.append(op_global("__torch__", "M") + b")\x81" + b"}(" + attributes + b"ub" + b"r"
                    + struct.pack("<I", depth - k) + b"0")
    return pickle_of(b"".join(body) + b"j" + struct.pack("<I", depth))


def build_torchscript_dag(tmp):
    """40 modules, each pointing twice at the next (2 KB): 2**40 paths, which the old walk followed."""
    leaf = b"}" + op_str("w") + tensor_ops(3) + b"s"
    zip_bytes = raw_zip([{"name": "archive/data.pkl", "data": module_chain(40, leaf=leaf)},
                         {"name": "archive/data/0", "data": torch.arange(3.0).numpy().tobytes()},
                         {"name": "archive/code/__torch__.py",
                          "data": b"class M(Module):\n  __parameters__ = [\"w\", ]\n  __buffers__ = []\n"}])
    return (write(tmp / "dag.pt", zip_bytes),)


def build_torchscript_cycle(tmp):
    """A module whose attribute is itself: the old walk ended in RecursionError."""
    data = pickle_of(op_global("__torch__", "M") + b")\x81q\x00}" + op_str("self") + b"h\x00sb")
    return (write(tmp / "cycle.pt", torchscript_zip(data)),)


def build_torchscript_deep_chain(tmp):
    """A chain of 100,000 modules (also a RecursionError in the old walk)."""
    return (write(tmp / "chain.pt", torchscript_zip(module_chain(100_000, links=1))),)


def build_torchscript_bad_code(tmp):
    """A parameter declaration that is no list literal: the old reader's ast.literal_eval raised SyntaxError."""
    module = op_global("__torch__", "M") + b")\x81}b"
    return (write(tmp / "syntax.pt", torchscript_zip(pickle_of(module), code="class M(Module):\n"
                                                     "  __parameters__ = [)]\n")),)


def build_safetensors_duplicates(tmp):
    """200,000 tensor names, the first repeated at the end: the old error path was quadratic (minutes)."""
    entry = '{"dtype":"U8","shape":[0],"data_offsets":[0,0]}'
    header = ("{" + ",".join(f'"t{i}":{entry}' for i in range(200_000)) + f',"t0":{entry}' + "}").encode()
    return (write(tmp / "dup.safetensors", struct.pack("<Q", len(header)) + header),)


def build_crc_flip(tmp):
    path = tmp / "flip.pt"
    torch.save({"w": torch.arange(64.0)}, path)
    data = bytearray(path.read_bytes())
    data[data.index(torch.arange(64.0).numpy().tobytes()) + 100] ^= 0x10  # one bit of one weight
    return (write(path, bytes(data)),)


def build_duplicate_storage(tmp):
    """Two archive/data/0 members: this project read the last, torch the first."""
    zeros, ones = torch.zeros(4).numpy().tobytes(), torch.ones(4).numpy().tobytes()
    return (write(tmp / "twice.pt", checkpoint_zip(tensor_pickle(4), [("0", zeros), ("0", ones)])),)


def build_tensor_constructor(tmp):
    """torch.Tensor(10**9) through REDUCE: 4 GB of uninitialised memory from 40 bytes."""
    return (write(tmp / "tensor-new.pt", checkpoint_zip(pickle_of(op_global("torch", "Tensor") + op_int(10**9)
                                                                  + b"\x85R"))),)


def build_tensor_setstate(tmp):
    """A real tensor, then BUILD with (storage, offset, size, stride): Tensor.__setstate__ calls set_()."""
    state = b"(" + b"N" + op_int(0) + op_int(10**9) + b"\x85" + op_int(1) + b"\x85tb"
    data = pickle_of(b"}" + op_str("w") + tensor_ops(4) + state + b"s")
    return (write(tmp / "tensor-state.pt", checkpoint_zip(data, [("0", bytes(16))])),)


def build_function_build(tmp):
    """BUILD on an allowed function: (None, {"__name__": ...}) would set its attributes process-wide."""
    body = op_global("torch._utils", "_rebuild_tensor_v2") + b"N}" + op_str("__defaults__") + b"N" + b"s\x86b"
    return (write(tmp / "function-state.pt", checkpoint_zip(pickle_of(body))),)


def build_typed_list_type(tmp):
    """A TorchScript type tag around a class (torch.Tensor), then BUILD on what it returned."""
    body = op_global("torch.jit._pickle", "build_intlist") + op_global("torch", "Tensor") + b"\x85R}b"
    return (write(tmp / "typed.pt", checkpoint_zip(pickle_of(body))),)


def build_huge_memo_index(tmp):
    """LONG_BINPUT 4294967295 (5 bytes) made the C unpickler allocate a 32 GB memo table."""
    return (write(tmp / "memo.pt", checkpoint_zip(pickle_of(b"}r\xff\xff\xff\xff"))),)


def _zip_with(tmp, name, **member):
    members = [{"name": "archive/data.pkl", "data": pickle_of(b"}"), **member},
               {"name": "archive/byteorder", "data": b"little"}]
    return (write(tmp / name, raw_zip(members)),)


def build_encrypted(tmp):
    return _zip_with(tmp, "encrypted.pt", flags=0x1)  # zipfile raised RuntimeError (password required)


def build_method_99(tmp):
    return _zip_with(tmp, "aes.pt", method=99)  # zipfile raised NotImplementedError


def build_offset_overflow(tmp):
    """A zip64 extra field moving data.pkl to offset 2**63 + 5 (OverflowError when seeking)."""
    return _zip_with(tmp, "overflow.pt", offset=0xFFFFFFFF, extra=struct.pack("<HHQ", 1, 8, 2**63 + 5))


def build_tensor_too_large(tmp):
    size = b"\x8a\x09" + (2**70).to_bytes(9, "little") + b"\x85"  # LONG1: (2**70,)
    return (write(tmp / "huge-size.pt", checkpoint_zip(tensor_pickle(4, size), [("0", bytes(16))])),)


def build_optimizer_dag(tmp):
    """AdamW state whose param group holds nested lists sharing references, 40 deep: torch's load_state_dict
    deep-copies it without a memo, 2**40 lists (it hung, memory growing)."""
    shared = []
    for _ in range(40):
        shared = [shared, shared]
    path = tmp / "optimizer.pt"
    torch.save({"optimizer": {"state": {}, "param_groups": [{"params": [0, 1], "lr": shared}]}}, path)
    return (str(path),)


# ----------------------------------------------------------------------------- what the child does


def open_checkpoint(path):
    import weights
    loaded = weights.load_checkpoint(path)
    return sorted(map(str, loaded)) if isinstance(loaded, dict) else type(loaded).__name__


def open_state_dict(path):
    import weights
    return {name: tuple(tensor.shape) for name, tensor in weights.load_state_dict(path).items()}


def open_cifar(root):
    import data
    return len(data.CIFAR100Captions(root, split="train"))


def resume_training(path):
    import train
    return train.main(["--resume", path, "--task", "caption", "--preset", "shapes", "--traceback"])


def generate_from(path):
    import generate
    return generate.main(["a red circle", "--ckpt", path, "--traceback"])


def make_optimizer():  # untimed: AdamW's first construction spends seconds importing
    return torch.optim.AdamW(torch.nn.Linear(2, 3).parameters())


def check_optimizer(optimizer, path):
    import weights
    checked = weights.check_optimizer_state(weights.load_checkpoint(path)["optimizer"], optimizer, path)
    optimizer.load_state_dict(checked)
    return "loaded"


REFUSED, LOADS = "a ValueError naming the file", "loads, in bounded time"
CASES = {  # issue item -> (builder, what the child does with the file, expected[, seconds allowed, default 2])
    "dtype BUILD: load_checkpoint (zip)": (build_dtype_zip, "open_checkpoint", REFUSED),
    "dtype BUILD: load_checkpoint (legacy)": (build_dtype_legacy, "open_checkpoint", REFUSED),
    "dtype BUILD: train.py --resume": (build_dtype_zip, "resume_training", REFUSED, 60),
    "dtype BUILD: generate.py --ckpt": (build_dtype_zip, "generate_from", REFUSED, 60),
    "dtype BUILD: data.py CIFAR reader": (build_dtype_cifar, "open_cifar", REFUSED),
    "deep nesting: 1M nested 1-tuples": (build_deep_nesting, "open_checkpoint", REFUSED),
    "zip bomb: DEFLATE storage (1 GiB)": (build_bomb_storage, "open_state_dict", REFUSED),
    "zip bomb: DEFLATE data.pkl (1 GiB)": (build_bomb_pickle, "open_state_dict", REFUSED),
    "zip bomb: DEFLATE byteorder (1 GiB)": (build_bomb_byteorder, "open_state_dict", REFUSED),
    "zip bomb: TorchScript code/ (1 GiB)": (build_bomb_torchscript_code, "open_state_dict", REFUSED),
    "TorchScript: 40 modules sharing children": (build_torchscript_dag, "open_state_dict", LOADS),
    "TorchScript: module graph cycle": (build_torchscript_cycle, "open_state_dict", REFUSED),
    "TorchScript: 100,000-module chain": (build_torchscript_deep_chain, "open_state_dict", REFUSED),
    "optimizer state: shared-reference DAG": (build_optimizer_dag, "check_optimizer", REFUSED),
    "safetensors: 200,000 keys, one duplicate": (build_safetensors_duplicates, "open_state_dict", REFUSED, 60),
    "flipped bit in a stored tensor (CRC-32)": (build_crc_flip, "open_state_dict", REFUSED),
    "two archive/data/0 members": (build_duplicate_storage, "open_state_dict", REFUSED),
    "torch.Tensor(10**9) through REDUCE": (build_tensor_constructor, "open_checkpoint", REFUSED),
    "Tensor.__setstate__ through BUILD": (build_tensor_setstate, "open_checkpoint", REFUSED),
    "BUILD on an allowed function": (build_function_build, "open_checkpoint", REFUSED),
    "BUILD through a TorchScript type tag": (build_typed_list_type, "open_checkpoint", REFUSED),
    "LONG_BINPUT 2**32-1 (memo table bomb)": (build_huge_memo_index, "open_checkpoint", REFUSED),
    "promise: encrypted member (RuntimeError)": (build_encrypted, "open_checkpoint", REFUSED),
    "promise: compression method 99 (NotImplementedError)": (build_method_99, "open_checkpoint", REFUSED),
    "promise: TorchScript code (SyntaxError)": (build_torchscript_bad_code, "open_state_dict", REFUSED),
    "promise: zip64 offset 2**63 (OverflowError)": (build_offset_overflow, "open_checkpoint", REFUSED),
    "promise: tensor of 2**70 elements": (build_tensor_too_large, "open_state_dict", REFUSED),
}


def run_case(name, tmp):
    builder, action, expected = CASES[name][:3]
    args = builder(tmp)
    slow = action in ("resume_training", "generate_from")  # these import train.py: seconds, not milliseconds
    setup = "test_hostile_files:make_optimizer" if action == "check_optimizer" else None
    return run_bounded(f"test_hostile_files:{action}", *args, memory_mb=1024 if slow else 512,
                       seconds=120 if slow else 30, setup=setup), expected, args


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_file_is_refused_cleanly(name, tmp_path):
    outcome, expected, args = run_case(name, tmp_path)
    if expected == LOADS:
        assert outcome.status == "returned", str(outcome)
    else:  # the entry points run with --traceback: the error itself, not its one-line report
        assert outcome.raised("ValueError"), str(outcome)
        assert args[0] in outcome.message, f"the message must name the file: {outcome}"
    budget = CASES[name][3] if len(CASES[name]) > 3 else 2.0
    assert outcome.seconds < budget and outcome.peak_mb < 300, str(outcome)


def duplicate_keys_against_plain_json(path):
    """(seconds of the reader's refusal, seconds of json.loads on the same header): the time budget of
    this case, independent of how loaded the machine is."""
    import json
    import time
    import weights
    header = Path(path).read_bytes()[8:]
    start = time.perf_counter()
    json.loads(header)
    plain = time.perf_counter() - start
    start = time.perf_counter()
    try:
        weights.read_safetensors(path)
    except ValueError:
        return time.perf_counter() - start, plain
    raise AssertionError("the duplicate key was not refused")


def test_duplicate_safetensors_keys_cost_what_parsing_the_json_costs(tmp_path):
    """The old error path was quadratic (40,000 keys: 49 s; 200,000: minutes)."""
    outcome = run_bounded("test_hostile_files:duplicate_keys_against_plain_json",
                          *build_safetensors_duplicates(tmp_path), memory_mb=1024, seconds=120)
    reader, plain = eval(outcome.result)
    assert reader < 3 * plain + 1.0, (reader, plain)


def test_torchscript_dag_loads_each_shared_module_once(tmp_path):
    outcome, _, _ = run_case("TorchScript: 40 modules sharing children", tmp_path)
    names = eval(outcome.result)  # {name: shape}: under its first path only, as named_parameters() counts it
    assert names == {"a0." * 40 + "w": (3,)}, str(outcome)


def test_legitimate_adamw_state_passes_the_check(tmp_path):
    import weights
    model = torch.nn.Linear(2, 3)
    optimizer = torch.optim.AdamW(model.parameters(), amsgrad=True)
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    path = tmp_path / "ckpt.pt"
    weights.save_checkpoint({"optimizer": optimizer.state_dict()}, path)
    saved = weights.load_checkpoint(path)["optimizer"]
    fresh = torch.optim.AdamW(torch.nn.Linear(2, 3).parameters(), amsgrad=True)
    fresh.load_state_dict(weights.check_optimizer_state(saved, fresh, path))
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    wrong_shape = torch.optim.AdamW(torch.nn.Linear(2, 4).parameters())
    with pytest.raises(ValueError, match="shape"):
        weights.check_optimizer_state(saved, wrong_shape, path)
    saved["state"][0]["exp_avg"] = [saved["state"][0]["exp_avg"]]
    with pytest.raises(ValueError, match=str(path)):
        weights.check_optimizer_state(saved, fresh, path)


def resume(argv):
    import train
    return train.main(argv + ["--traceback"])


def test_resume_refuses_a_hostile_optimizer_state_before_torch_copies_it(tmp_path):
    """A real train.py checkpoint whose optimizer state was swapped for a shared-reference DAG: --resume
    must stop at weights.check_optimizer_state, not hang in torch's deepcopy."""
    import train
    import weights
    from test_train_caption import args, write_coco, write_tower
    write_coco(tmp_path / "coco", "train", 8, seed=0)
    write_coco(tmp_path / "coco", "val", 4, seed=1)
    write_tower(tmp_path / "tower.pt")
    train.main(args(tmp_path, tmp_path / "run", "--stop-after", "1"))
    checkpoint = weights.load_checkpoint(tmp_path / "run" / "ckpt.pt")
    shared = []
    for _ in range(40):
        shared = [shared, shared]
    checkpoint["optimizer"]["param_groups"][0]["weight_decay"] = shared
    torch.save(checkpoint, tmp_path / "hostile.pt")
    outcome = run_bounded("test_hostile_files:resume", args(tmp_path, tmp_path / "resumed", "--resume",
                                                             str(tmp_path / "hostile.pt")), memory_mb=2048, seconds=300)
    assert outcome.raised("ValueError") and "optimizer state refused" in outcome.message, str(outcome)
    assert str(tmp_path / "hostile.pt") in outcome.message


def import_entry_points():
    """Untimed set-up: the entry points' imports and torch's own first use of the meta device (a lazy import of
    its reference kernels, 2 s) cost seconds once per process; they are not the refusal's cost."""
    import generate  # noqa: F401
    import train  # noqa: F401
    torch.nn.Embedding(2, 2, device="meta")


def eval_checkpoint(_, path):
    import train
    return train.main(["--eval", path, "--traceback"])


def generate_from_checkpoint(_, path, *inputs):
    import generate
    return generate.main([*inputs, "--ckpt", path, "--traceback"])


def huge_checkpoint(tmp, task):
    """A real checkpoint of each task (tests/fixtures, a8e8afc's layout: upgraded on reading) whose config claims
    a model 2^17 times wider than its tensors (200 GB and more, if it were allocated), and an image to caption."""
    import gzip
    import weights
    from PIL import Image
    name = "caption-a8e8afc" if task == "caption" else "diffusion-a8e8afc-noopt"
    (tmp / "ckpt.pt").write_bytes(gzip.decompress((Path(__file__).parent / "fixtures" / f"{name}.pt.gz").read_bytes()))
    checkpoint = weights.load_checkpoint(tmp / "ckpt.pt")
    checkpoint["gpt_config" if task == "caption" else "text_config"]["n_embd" if task == "caption" else
                                                                      "transformer_width"] = 2 ** 20
    torch.save(checkpoint, tmp / "huge.pt")
    Image.new("RGB", (32, 32)).save(tmp / "image.png")
    return str(tmp / "huge.pt"), str(tmp / "image.png")


@pytest.mark.parametrize("task,action", [("caption", "eval"), ("caption", "generate"), ("diffusion", "eval"),
                                         ("diffusion", "generate")])
def test_a_config_claiming_a_huge_model_fails_before_allocating(task, action, tmp_path):
    """Model sizes from a checkpoint's config size nothing before its tensors agree: train.py --eval and
    generate.py --ckpt rebuild the models on the meta device and compare shapes first (weights.rebuild), so
    a checkpoint claiming a model 2^17 times its tensors fails at once, in little memory."""
    path, image = huge_checkpoint(tmp_path, task)
    inputs = () if action == "eval" else (image,) if task == "caption" else ("a red circle",)
    outcome = run_bounded(f"test_hostile_files:{'eval_checkpoint' if action == 'eval' else 'generate_from_checkpoint'}",
                          path, *inputs, memory_mb=1024, seconds=60, setup="test_hostile_files:import_entry_points")
    assert outcome.raised("ValueError") and "does not match its config" in outcome.message, str(outcome)
    assert outcome.seconds < 1 and outcome.peak_mb < 300, str(outcome)


if __name__ == "__main__":  # the table of the closing note: item, outcome, time and peak memory of its child
    import tempfile
    sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
    with tempfile.TemporaryDirectory() as folder:
        for number, case in enumerate(CASES):
            (Path(folder) / str(number)).mkdir()
            outcome, expected, _ = run_case(case, Path(folder) / str(number))
            print(f"| {case} | {outcome.status} {outcome.error}: {outcome.message.partition(': ')[2][:70]} "
                  f"| {outcome.seconds * 1000:.0f} ms | {outcome.peak_mb:.1f} MB |")
