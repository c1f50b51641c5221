"""A deterministic, offline text corpus of more than 1 MB for the tokenizer parity tests and the benchmark.

Three parts, each cut into chunks (list of str; "".join(chunks) is the whole corpus):
- code: the source of standard-library modules of the running Python (real code, real comments);
- prose: the docstrings of the same modules (English);
- generated: seeded random text in many scripts (CJK, kana, Hangul, Cyrillic, Greek, Arabic with harakat,
  Hebrew, Devanagari with matras, Thai, accented and decomposed Latin), emoji with skin-tone modifiers, ZWJ
  sequences, flags and keycaps, digits and numerals outside ASCII (Arabic-Indic, Devanagari, full-width,
  Roman numerals, superscripts, fractions, circled numbers), contractions in every case, runs of spaces,
  tabs and newlines, Unicode spaces, control characters and zero-width characters.
Only characters assigned in Unicode 14 (this Python's unicodedata) are generated: later versions would make
`\\p{L}` differ between Python and the Rust/`regex` tables for reasons that are not ours.
"""
import ast
import importlib.util
import random

MODULES = ["argparse", "textwrap", "difflib", "inspect", "pathlib", "typing", "dataclasses", "enum",
           "functools", "collections", "json.decoder", "json.encoder", "http.client", "email.message",
           "email.utils", "urllib.parse", "tarfile", "zipfile", "logging", "subprocess", "unittest.case", "pickle", "calendar", "decimal", "fractions", "statistics", "string", "shutil",
           "csv", "datetime", "gettext", "locale", "configparser", "optparse", "pydoc"]


def chars(first: int, last: int) -> list[str]:
    return [chr(c) for c in range(first, last + 1)]


SCRIPTS = {
    "cjk": chars(0x4E00, 0x9FA5), "hiragana": chars(0x3041, 0x3096), "katakana": chars(0x30A1, 0x30FA),
    "hangul": chars(0xAC00, 0xD7A3), "cyrillic": chars(0x0410, 0x044F) + ["ё", "Ё", "і", "ї", "є"],
    "greek": chars(0x0391, 0x03A1) + chars(0x03A3, 0x03A9) + chars(0x03B1, 0x03C9) + ["ά", "ή", "ώ"],
    "arabic": chars(0x0621, 0x063A) + chars(0x0641, 0x064A), "hebrew": chars(0x05D0, 0x05EA),
    "devanagari": chars(0x0905, 0x0939), "thai": chars(0x0E01, 0x0E2E),
    "latin": chars(0x61, 0x7A) + chars(0x41, 0x5A) + chars(0x00C0, 0x00FF) + chars(0x0100, 0x017F),
}
MARKS = {"arabic": chars(0x064B, 0x0652), "devanagari": chars(0x093E, 0x094D) + ["\u0902", "\u0901"],
         "hebrew": chars(0x05B0, 0x05BC), "thai": chars(0x0E31, 0x0E3A), "latin": chars(0x0300, 0x0308)}
PUNCTUATION = {"cjk": "。、！？「」（）：", "arabic": "،؛؟.", "devanagari": "।॥,", "default": ".,;:!?-()\"'/"}
EMOJI = chars(0x1F600, 0x1F64F) + chars(0x1F300, 0x1F320) + ["❤️", "☕", "✨", "🤖", "🧠", "🦀"]
SKIN_TONES = chars(0x1F3FB, 0x1F3FF)
PEOPLE = ["👍", "👋", "🙌", "👩", "👨", "🧑", "🤝", "✍️"]
ZWJ = ["👨\u200d👩\u200d👧\u200d👦", "👩\u200d💻", "🧑🏽\u200d🚀", "🏳️\u200d🌈", "👁️\u200d🗨️", "❤️\u200d🔥"]
FLAGS = ["🇯🇵", "🇺🇦", "🇮🇳", "🇧🇷", "🇪🇺"]
NUMERALS = (chars(0x0660, 0x0669) + chars(0x06F0, 0x06F9) + chars(0x0966, 0x096F) + chars(0xFF10, 0xFF19)
            + chars(0x2160, 0x2188) + ["²", "³", "¹", "¼", "½", "¾"] + chars(0x2070, 0x2079) + chars(0x2080, 0x2089)
            + chars(0x2150, 0x215F) + chars(0x2460, 0x2473) + chars(0x0E50, 0x0E59) + ["〇", "一", "二", "三"])
CONTRACTIONS = ["don't", "DON'T", "Don'T", "I'm", "I'M", "it's", "IT'S", "we're", "WE'RE", "they've", "THEY'VE",
                "she'll", "SHE'LL", "he'd", "HE'D", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "o'clock",
                "rock'n'roll", "’s", "it’S", "''", "'''s", "'ſ", "<|ſtartoftext|>"]
SPACES = [" ", "  ", "   ", "        ", "\t", "\t\t", "\n", "\n\n", "\n\n\n", "\r\n", " \n", "  \n ", "\t \t",
          "\u00a0", "\u3000", "\u2003", "\u2009", "\u202f", "\u2028", "\u0085", " \u00a0 ", "\x0b", "\x0c"]
CONTROL = chars(0x00, 0x08) + chars(0x0E, 0x1F) + ["\x7f"] + chars(0x80, 0x9F)
INVISIBLE = ["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad", "\u180e", "\u034f", "\u0345"]
ODD = ["<|endoftext|>", "<|startoftext|>", "&amp;", "&lt;b&gt;", "&amp;quot;", "&#39;", "café", "cafe\u0301",
       "ﬁne", "Ａｂｃ", "ΟΔΟΣ", "İstanbul", "ß", "ﬀ", "Ⅻ", "ǅ", "x²", "1️⃣", "#️⃣", "3.14159", "1,000,000",
       "2026-11-23", "0x1F600", "123456789012345678901234567890", "000000000000", "https://example.com/a?b=c&d=e"]


def random_word(rng: random.Random, script: str) -> str:
    letters, marks = SCRIPTS[script], MARKS.get(script, [])
    word = []
    for _ in range(rng.randint(1, 12 if script != "cjk" else 6)):
        word.append(rng.choice(letters))
        if marks and rng.random() < 0.3:
            word.append(rng.choice(marks))
    return "".join(word)


def random_piece(rng: random.Random, script: str) -> str:
    roll = rng.random()
    if roll < 0.70:
        return random_word(rng, script)
    if roll < 0.76:
        return rng.choice(PEOPLE) + rng.choice(SKIN_TONES) * rng.randint(1, 2) if rng.random() < 0.6 else rng.choice(EMOJI)
    if roll < 0.79:
        return rng.choice(ZWJ + FLAGS)
    if roll < 0.85:
        return "".join(rng.choice(NUMERALS) for _ in range(rng.randint(1, 5))) + rng.choice(["", "", "%", ".", " "])
    if roll < 0.88:
        return str(rng.randint(0, 10 ** rng.randint(1, 14)))
    if roll < 0.92:
        return rng.choice(CONTRACTIONS)
    if roll < 0.95:
        return rng.choice(ODD)
    if roll < 0.97:
        return rng.choice(CONTROL) * rng.randint(1, 3)
    return rng.choice(INVISIBLE)


def generated_chunks(rng: random.Random, n_chunks: int) -> list[str]:
    chunks = []
    for _ in range(n_chunks):
        script = rng.choice(list(SCRIPTS))
        punctuation = PUNCTUATION.get(script, PUNCTUATION["default"])
        parts = []
        for _ in range(rng.randint(5, 60)):
            parts.append(random_piece(rng, script))
            gap = rng.random()
            parts.append(rng.choice(SPACES) if gap < 0.25 else rng.choice(punctuation) + " " if gap < 0.35
                         else "" if script in ("cjk", "hiragana", "katakana", "thai") and gap < 0.8 else " ")
        chunks.append("".join(parts) + rng.choice(["\n", "\n\n", " ", "", "\t\n"]))
    return chunks


def stdlib_chunks() -> list[str]:
    """Code (source of the MODULES, in 4,000-character pieces) and prose (their docstrings)."""
    code, prose = [], []
    for name in MODULES:
        with open(importlib.util.find_spec(name).origin, encoding="utf-8") as f:
            source = f.read()
        code += [source[i : i + 4000] for i in range(0, min(len(source), 12_000), 4000)]
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                docstring = ast.get_docstring(node)
                if docstring and len(docstring) > 40:
                    prose.append(docstring + "\n\n")
    return code + prose


def build_corpus(min_bytes: int = 1_100_000, seed: int = 1234) -> list[str]:
    """Chunks of code, prose and generated text, together at least `min_bytes` of UTF-8."""
    chunks = stdlib_chunks()
    rng = random.Random(seed)
    while sum(len(c.encode("utf-8")) for c in chunks) < min_bytes:
        chunks += generated_chunks(rng, 200)
    return chunks


if __name__ == "__main__":
    corpus, stdlib = build_corpus(), stdlib_chunks()
    for name, chunks in [("corpus", corpus), ("code and prose", stdlib), ("generated", corpus[len(stdlib) :])]:
        text = "".join(chunks)
        print(f"{name}: {len(chunks)} chunks, {len(text):,} characters, {len(text.encode('utf-8')):,} bytes")
