"""The opcode pre-scan: read a pickle once, building nothing, before it is unpickled.

A pickle is a little program for a stack machine (pickletools documents every opcode). Even with
an allow-list of globals, the program itself can hurt before any check on the values it builds
could run: a million nested 1-tuples used as a dict key overflow the C stack when hashed; a
`LONG_BINPUT 4294967295` makes the C unpickler allocate a memo table of 32 GB; BUILD on an
allowed function sets its attributes process-wide; a container filled after it was placed in
another grows deeper than anything its depth when placed said. `scan_pickle` walks the opcodes
with a model of the stack (kind and nesting depth of each value, never the value) and refuses:

- nesting deeper than MAX_DEPTH; memo indices beyond the number of opcodes read;
- filling or BUILD-ing a container already placed inside another (Python's pickler completes
  every container before placing it; only reference cycles do otherwise);
- REDUCE/NEWOBJ of anything but an allowed function or a placeholder class, BUILD on anything
  but the few objects whose state is data, SETITEM/APPEND on anything but dicts and lists;
- opcodes no checkpoint writer emits (INST, OBJ, the extension registry, out-of-band buffers).

The questions "what is this global, may it be called, built, filled" are answered by the
unpickler that will run next (`rules`: weights/unpickler.py `RestrictedUnpickler`), so the
allow-list lives in one place. Payloads longer than 1 KB (tensor bytes, CIFAR's images) are
skipped with a seek, never copied.
"""
import io
import pickletools
import struct

MAX_DEPTH = 200  # legitimate checkpoints nest < 30 deep (a TorchScript module tree ~20)
MAX_LINE = 1 << 20  # a protocol-0 argument line (a number, a global's name) longer than this is no checkpoint


class _Node:
    """What the scan knows of one value on the unpickler's stack: its kind, nesting depth, whether
    it was placed inside another value yet, and for strings and globals their value."""
    __slots__ = ("kind", "depth", "value", "placed")

    def __init__(self, kind, depth=0, value=None):
        self.kind, self.depth, self.value, self.placed = kind, depth, value, False


_LENGTH_PREFIX = {pickletools.TAKEN_FROM_ARGUMENT1: ("<B", 1), pickletools.TAKEN_FROM_ARGUMENT4: ("<i", 4),
                  pickletools.TAKEN_FROM_ARGUMENT4U: ("<I", 4), pickletools.TAKEN_FROM_ARGUMENT8U: ("<Q", 8)}
_ATOMS = {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "BINBYTES", "SHORT_BINBYTES",
          "BINBYTES8", "BYTEARRAY8", "NONE", "NEWTRUE", "NEWFALSE", "FLOAT", "BINFLOAT"}
_STRINGS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"}
_REFUSED = {"INST": "protocol-0 instances", "OBJ": "protocol-1 instances", "EXT1": "the extension registry",
            "EXT2": "the extension registry", "EXT4": "the extension registry",
            "NEXT_BUFFER": "out-of-band buffers", "READONLY_BUFFER": "out-of-band buffers"}


def _read_argument(f, op, end, fail):
    """The opcode's argument: bytes, a list of lines, or None for a payload skipped unread."""
    n = op.arg.n
    if n >= 0:
        data = f.read(n)
        if len(data) != n:
            fail(f"truncated inside {op.name}")
        return data
    if n == pickletools.UP_TO_NEWLINE:
        lines = []
        for _ in range(2 if op.arg.name == "stringnl_noescape_pair" else 1):
            line = f.readline(MAX_LINE)
            if not line.endswith(b"\n"):
                fail(f"{op.name} argument is truncated or longer than {MAX_LINE} bytes")
            lines.append(line[:-1])
        return lines
    form, width = _LENGTH_PREFIX[n]
    prefix = f.read(width)
    if len(prefix) != width:
        fail(f"truncated inside {op.name}")
    (length,) = struct.unpack(form, prefix)
    if length < 0 or f.tell() + length > end:
        fail(f"{op.name} claims {length} bytes, more than the {end - f.tell()} left in the file")
    if length <= 1024:
        return f.read(length)
    f.seek(length, io.SEEK_CUR)  # a tensor-sized payload: the unpickler reads it, we need not
    return None


def _index(name, argument):
    """The memo index of a PUT/GET-family opcode."""
    return int(argument[0]) if name in ("PUT", "GET") else int.from_bytes(argument, "little")


def scan_pickle(f, path, rules):
    """Walk one pickle from the position of binary file `f` to its STOP and raise ValueError (or
    the rules' UnsafeCheckpointError) at the first thing no checkpoint does; leave `f` after STOP.

    `rules` answers find_class(module, name), may_construct(obj) (NEWOBJ), may_build(obj) (BUILD
    on what obj returned) and may_fill(obj) (SETITEM/APPEND on it). Linear time, bounded memory."""
    start = f.tell()
    end = f.seek(0, io.SEEK_END)
    f.seek(start)
    stack, marks, memo = [], [], {}

    def fail(message):
        raise ValueError(f"{path}: refusing this pickle at byte {f.tell()}: {message}")

    def pop():
        if len(stack) <= (marks[-1] if marks else 0):
            fail("stack underflow (a corrupt pickle)")
        return stack.pop()

    def top():
        stack.append(pop())
        return stack[-1]

    def pop_mark():
        if not marks:
            fail("MARK missing (a corrupt pickle)")
        i = marks.pop()
        items = stack[i:]
        del stack[i:]
        return items

    def nest(node, children):
        for child in children:
            child.placed = True
            node.depth = max(node.depth, child.depth + 1)
        if node.depth > MAX_DEPTH:
            fail(f"values nested deeper than {MAX_DEPTH} levels")
        return node

    def fill(target, children, allowed, what):
        if not allowed:
            fail(f"{what} on a {target.kind}{' ' + getattr(target.value, '__name__', '') if target.value else ''}")
        if target.placed:
            fail(f"{what} changes a value already placed inside another (a reference cycle?)")
        nest(target, children)

    for count in range(end - start + 1):
        code = f.read(1)
        if not code:
            fail("truncated: the file ends before the pickle's STOP")
        op = pickletools.code2op.get(code.decode("latin1"))
        if op is None:
            fail(f"unknown opcode {code!r}")
        argument = _read_argument(f, op, end, fail) if op.arg is not None else None
        name = op.name
        if name in _REFUSED:
            fail(f"{name} ({_REFUSED[name]}), which no checkpoint writer uses")
        elif name in _ATOMS:
            stack.append(_Node("atom"))
        elif name in _STRINGS:
            raw = argument[0] if isinstance(argument, list) else argument
            try:
                codec = "raw_unicode_escape" if name == "UNICODE" else "utf-8" if "UNICODE" in name else "latin1"
                value = None if raw is None else raw.decode(codec, "surrogatepass" if codec == "utf-8" else "strict")
            except UnicodeDecodeError:
                fail(f"{name} holds bytes that are not UTF-8")
            stack.append(_Node("str", value=value))
        elif name in ("EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET", "EMPTY_TUPLE"):
            stack.append(_Node(name[6:].lower(), depth=1))
        elif name in ("LIST", "TUPLE", "DICT", "FROZENSET", "TUPLE1", "TUPLE2", "TUPLE3"):
            items = [pop() for _ in range(int(name[-1]))][::-1] if name[-1].isdigit() else pop_mark()
            stack.append(nest(_Node(name.rstrip("123").lower(), depth=1), items))
        elif name in ("APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS"):
            items = {"APPEND": 1, "SETITEM": 2}.get(name)
            items = [pop() for _ in range(items)] if items else pop_mark()
            target = top()
            kind = {"A": "list", "S": "dict"}[name[0]] if name != "ADDITEMS" else "set"
            fill(target, items, target.kind == kind or (target.kind == "object" and kind != "set"
                                                        and rules.may_fill(target.value)), name)
        elif name == "POP":
            pop()
        elif name == "POP_MARK":
            pop_mark()
        elif name == "DUP":
            stack.append(top())
        elif name == "MARK":
            marks.append(len(stack))
        elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            index = len(memo) if name == "MEMOIZE" else _index(name, argument)
            if not 0 <= index <= count:  # the C unpickler sizes its memo table by the largest index
                fail(f"memo index {index} at opcode {count}")
            memo[index] = top()
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            if _index(name, argument) not in memo:
                fail(f"memo index {_index(name, argument)} was never stored")
            stack.append(memo[_index(name, argument)])
        elif name in ("GLOBAL", "STACK_GLOBAL"):
            if name == "GLOBAL":
                module, qualname = (part.decode("utf-8", "replace") for part in argument)
            else:
                qualname, module = pop(), pop()
                if module.kind != "str" or qualname.kind != "str" or None in (module.value, qualname.value):
                    fail("STACK_GLOBAL without two strings")
                module, qualname = module.value, qualname.value
            stack.append(_Node("global", value=rules.find_class(module, qualname)))
        elif name in ("REDUCE", "NEWOBJ", "NEWOBJ_EX"):
            args = [pop() for _ in range(2 if name == "NEWOBJ_EX" else 1)]
            maker = pop()
            if (maker.kind != "global" or not callable(maker.value)
                    or (name != "REDUCE" and not rules.may_construct(maker.value))):
                fail(f"{name} of {getattr(maker.value, '__name__', maker.kind)!s:.60}, not an allowed function")
            stack.append(nest(_Node("object", depth=1, value=maker.value), args))
        elif name == "BUILD":
            state, target = pop(), top()
            fill(target, [state], target.kind == "object" and rules.may_build(target.value), name)
        elif name in ("PERSID", "BINPERSID"):
            stack.append(nest(_Node("pid", depth=1), [pop()] if name == "BINPERSID" else []))
        elif name == "STOP":
            if len(stack) != 1 or marks:
                fail(f"STOP with {len(stack)} values and {len(marks)} marks left (a corrupt pickle)")
            return
        elif name not in ("PROTO", "FRAME"):
            fail(f"opcode {name} is not handled")
    fail("more opcodes than bytes")
