"""The tables tokenizer.py builds GPT-2's and CLIP's byte-level BPE from: the official vocabulary and merges
files (committed copies in weights/vocab/), read and checked to belong together, and the Unicode character
classes that the pre-token patterns need (`re` has no `\\p{L}`; they come from this Python's `unicodedata`).

- GPT-2 (openai/gpt-2 download_model.py): `encoder.json` (token -> id) and `vocab.bpe` (the merges);
  Hugging Face names the same pair `vocab.json` and `merges.txt`.
- CLIP (openai/CLIP): `bpe_simple_vocab_16e6.txt.gz`, merges only; the vocabulary is built from them.
"""
import functools
import gzip
import json
import re
import unicodedata
from pathlib import Path


def read_merges(path, lines: list[str] | None = None) -> list[tuple[str, str]]:
    """vocab.bpe / merges.txt (or `lines` read elsewhere): an optional `#version` line, then `left right`."""
    lines = Path(path).read_text(encoding="utf-8").split("\n") if lines is None else lines
    merges = []
    for number, line in enumerate(lines, start=1):
        if not line or (number == 1 and line.startswith("#version")):
            continue
        pair = line.split()
        if len(pair) != 2:
            raise ValueError(f"{path}: line {number} is not a merge of two symbols: {line[:80]!r}")
        merges.append((pair[0], pair[1]))
    return merges


def read_gzip_merges(path, count: int) -> list[tuple[str, str]]:
    """The first `count` merges of a gzip-compressed merges file whose first line is a header (CLIP's)."""
    try:
        lines = gzip.decompress(Path(path).read_bytes()).decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a gzip-compressed merges file ({error})") from None
    return read_merges(path, ["#version"] + lines[1 : count + 1])


def read_json_vocab(path) -> dict[str, int]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a JSON vocabulary ({error})") from None


def check_merges(encoder: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """Every merge joins two tokens of `encoder` into a third, and the merged ids grow with the merge order (BPE
    then picks the lowest id), as in GPT-2's and CLIP's files; ValueError otherwise."""
    unknown = [a + b for a, b in merges if not (a in encoder and b in encoder and a + b in encoder)]
    if unknown:  # e.g. GPT-2's vocabulary with CLIP's merges
        raise ValueError(f"{len(unknown)} merges make tokens missing from the vocabulary, e.g. {unknown[:3]}: "
                         "are the vocabulary and the merges from the same tokenizer?")
    merged = [encoder[a + b] for a, b in merges]
    if any(later <= earlier for earlier, later in zip(merged, merged[1:])):
        raise ValueError("the ids of merged tokens must grow with the merge order, as in GPT-2's and CLIP's files")


# White_Space property: what `\s` means in the `regex` package, in Rust's regex (tiktoken) and in Unicode.
# Python's `re` also counts U+001C..U+001F as space (str.isspace), so we spell the class out.
WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


@functools.lru_cache(maxsize=None)
def unicode_classes() -> dict[str, list[tuple[int, int]]]:
    """Every code point sorted into "L" (letters), "N" (numbers), "space" or "other", as ranges (first, last).

    `re` has no `\\p{L}`/`\\p{N}`, so we read the general category of all 1,114,112 code points from this
    Python's `unicodedata` (Unicode `unicodedata.unidata_version`); characters assigned by a later Unicode
    version count as "other" here. "case" holds non-letters with a letter as case variant (U+0345 in Unicode
    14): under IGNORECASE, CLIP's `regex` pattern matches them with no alternative, so they vanish from its
    text. About 0.5 s, once per process (`lru_cache`; the result is never modified)."""
    spaces = set(re.findall(f"[{WHITESPACE}]", "".join(map(chr, range(0x3001)))))  # all below U+3001
    classes = {"L": [], "N": [], "space": [], "case": [], "other": []}
    previous = None
    for code in range(0x110000):
        char = chr(code)
        category = unicodedata.category(char)
        kind = "space" if char in spaces else category[0]
        if kind not in ("L", "N", "space"):  # upper() only for assigned, non-private characters (speed)
            upper = char.upper() if category not in ("Cn", "Co") else char
            kind = "case" if upper != char and unicodedata.category(upper[0])[0] in "LN" else "other"
        if kind == previous:
            classes[kind][-1] = (classes[kind][-1][0], code)
        else:
            classes[kind].append((code, code))
        previous = kind
    return classes


def char_class(ranges: list[tuple[int, int]], repeat: str = "") -> str:
    """A pattern for one character (or with `repeat="+"` a run of characters) in `ranges`.

    sre looks up a class's characters below U+10000 in a bitmap but compares those above it one range at a
    time, so a plain `[...]` with the 268 astral letter ranges made the split 3 times slower (every character
    that is *not* a letter walked them all). The astral ranges therefore sit behind a one-range lookahead.
    """
    bmp = "".join(f"\\U{a:08x}-\\U{min(b, 0xFFFF):08x}" for a, b in ranges if a <= 0xFFFF)
    astral = "".join(f"\\U{max(a, 0x10000):08x}-\\U{b:08x}" for a, b in ranges if b > 0xFFFF)
    if not astral:
        return f"[{bmp}]{repeat}"
    return f"(?:[{bmp}]{repeat}|(?=[\\U00010000-\\U0010ffff])[{astral}]){repeat}"
