r"""Byte-level BPE tokenizers of GPT-2 and CLIP, written out by hand.

Byte pair encoding (Sennrich et al. 2016, "Neural Machine Translation of Rare Words with Subword Units")
starts from single symbols and repeatedly joins the adjacent pair that came first in a learned list of
merges. GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners", §2.2) runs it on
the UTF-8 *bytes* of the text, so every string can be encoded and nothing is ever unknown. CLIP (Radford
et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision") reuses the idea with
lower-cased text, an end-of-word mark `</w>` and its own merges.

Both tokenizers first cut the text into pre-tokens with a regular expression (a merge never crosses a
pre-token), then run BPE on each pre-token. Official code this matches, id for id (tests/test_tokenizer.py):
- GPT-2: openai/gpt-2 `src/encoder.py` and openai/tiktoken's `gpt2` encoding.
- CLIP: openai/CLIP `clip/simple_tokenizer.py` and `clip.tokenize`; Stable Diffusion's tokenizer (Hugging Face
  `CLIPTokenizer` on openai/clip-vit-large-patch14) is the same BPE, padded with end-of-text instead of 0.

`encode_and_show_work` returns every step (karpathy/minGPT mingpt/bpe.py's teaching device); `python
tokenizer.py [text] [--tokenizer clip]` prints them:

    text: "Hello!! I'm Andrej Karpathy 🤗"
    pre-tokens: ['Hello', '!!', ' I', "'m", ' Andrej', ' Karpathy', ' 🤗']
    'Hello': bytes b'Hello' -> chars 'Hello'
        merge l + l -> ll
        merge e + ll -> ell
        merge ell + o -> ello
        merge H + ello -> Hello
        tokens ['Hello'] ids [15496]
    '!!': bytes b'!!' -> chars '!!'
        merge ! + ! -> !!
        tokens ['!!'] ids [3228]
    ' I': bytes b' I' -> chars 'ĠI'
        merge Ġ + I -> ĠI
        tokens ['ĠI'] ids [314]
    "'m": bytes b"'m" -> chars "'m"
        merge ' + m -> 'm
        tokens ["'m"] ids [1101]
    ' Andrej': bytes b' Andrej' -> chars 'ĠAndrej'
        merge r + e -> re
        merge Ġ + A -> ĠA
        merge n + d -> nd
        merge ĠA + nd -> ĠAnd
        merge ĠAnd + re -> ĠAndre
        tokens ['ĠAndre', 'j'] ids [10948, 73]
    ' Karpathy': bytes b' Karpathy' -> chars 'ĠKarpathy'
        merge a + t -> at
        merge a + r -> ar
        merge Ġ + K -> ĠK
        merge at + h -> ath
        merge ar + p -> arp
        merge ath + y -> athy
        tokens ['ĠK', 'arp', 'athy'] ids [509, 5117, 10036]
    ' 🤗': bytes b' \xf0\x9f\xa4\x97' -> chars 'ĠðŁ¤Ĺ'
        merge ð + Ł -> ðŁ
        merge Ġ + ðŁ -> ĠðŁ
        tokens ['ĠðŁ', '¤', 'Ĺ'] ids [12520, 97, 245]
    ids: [15496, 3228, 314, 1101, 10948, 73, 509, 5117, 10036, 12520, 97, 245]
"""
import functools
import gzip
import heapq
import html
import itertools
import json
import re
import unicodedata
from pathlib import Path

import torch

VOCAB_DIR = Path(__file__).resolve().parent / "weights" / "vocab"  # committed copies of the official files
FAST_MERGE_LENGTH = 64  # pieces with more bytes merge through the heap (words are shorter; hostile input is not)


# ----------------------------------------------------------------------------------------------------------
# Building blocks


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (openai/gpt-2 encoder.py):
    printable Latin-1 bytes stand for themselves, the others (control codes, space, ...) move to U+0100 and up,
    so a merges file is plain text with a space between the halves of a merge. CLIP's first ids follow it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    shifted = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(shifted)}}


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


def read_json_vocab(path) -> dict[str, int]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a JSON vocabulary ({error})") from None


# ----------------------------------------------------------------------------------------------------------
# The shared BPE machinery


class BytePairEncoder:
    """Vocabulary, merges and the BPE loop shared by both tokenizers. `encoder`: token (in `bytes_to_unicode`
    characters) -> id; `merges`: pairs in the order they were learned; `special_tokens`: text -> id, never made
    by BPE. Finished pre-tokens go to a cache (a dict emptied when it holds `cache_size` entries): words
    repeat, so most pre-tokens cost one dict lookup.
    """

    end_of_word = ""  # CLIP: "</w>" on the last symbol of each pre-token

    def __init__(self, encoder: dict[str, int], merges: list[tuple[str, str]], special_tokens: dict[str, int],
                 cache_size: int = 100_000):
        unknown = [a + b for a, b in merges if not (a in encoder and b in encoder and a + b in encoder)]
        if unknown:  # e.g. GPT-2's vocabulary with CLIP's merges
            raise ValueError(f"{len(unknown)} merges make tokens missing from the vocabulary, e.g. {unknown[:3]}: "
                             "are the vocabulary and the merges from the same tokenizer?")
        merged = [encoder[a + b] for a, b in merges]
        if any(later <= earlier for earlier, later in zip(merged, merged[1:])):
            raise ValueError("the ids of merged tokens must grow with the merge order, as in GPT-2's and CLIP's files")
        # (left id, right id) -> id of the joined token. Ids grow with the merge rank, so the lowest id wins.
        self.merges = {(encoder[a], encoder[b]): i for (a, b), i in zip(merges, merged)}
        self.encoder = {token: i for token, i in encoder.items() if token not in special_tokens}
        self.special_tokens = dict(special_tokens)
        self.n_vocab = len(encoder)
        symbols = bytes_to_unicode()
        self.byte_ids = [encoder[symbols[b]] for b in range(256)]
        self.last_byte_ids = [encoder[symbols[b] + self.end_of_word] for b in range(256)]
        byte_of = {symbol: byte for byte, symbol in symbols.items()}
        self.bytes_of_id = {i: token.encode("utf-8") for token, i in special_tokens.items()}
        self.word_ids = {}  # bytes -> id of the tokens that can end a pre-token (CLIP: those with "</w>")
        for token, i in self.encoder.items():
            word = token.removesuffix(self.end_of_word)
            data = bytes(byte_of[c] for c in word)
            self.bytes_of_id[i] = data + b" " if word != token else data  # "</w>" decodes as a space (OpenAI)
            if word != token or not self.end_of_word:  # a token that can end a pre-token
                self.word_ids[data] = i
        self._cache: dict[str, list[int]] = {}
        self.cache_size = cache_size

    def merge(self, ids: list[int], trace: list | None = None) -> list[int]:
        """The BPE loop: join the adjacent pair that was learned first, until no pair is a merge.

        `pair_ids[i]` is the id that (ids[i], ids[i + 1]) would merge into; a merge changes only its neighbours.
        Ties go to the leftmost pair, so all copies of a pair merge left to right, as in openai/gpt-2's sweep.
        `trace`, if given, receives each merge as (left id, right id, merged id).
        """
        never = self.n_vocab  # larger than every id
        merge_of = self.merges.get
        pair_ids = list(map(merge_of, zip(ids, ids[1:]), itertools.repeat(never)))
        while pair_ids:
            best = min(pair_ids)
            if best == never:
                break
            i = pair_ids.index(best)
            if trace is not None:
                trace.append((ids[i], ids[i + 1], best))
            ids[i : i + 2] = [best]
            del pair_ids[i]
            if i > 0:
                pair_ids[i - 1] = merge_of((ids[i - 1], best), never)
            if i < len(pair_ids):
                pair_ids[i] = merge_of((best, ids[i + 1]), never)
        return ids

    def merge_fast(self, ids: list[int]) -> list[int]:
        """The same merges as `merge`, in O(n log n) instead of O(n^2): for long pieces (a 200,000-letter
        "word" took minutes in the plain loop). A heap holds every adjacent pair that is a merge, keyed
        (merged id, position), so it pops the pair `merge` would pick: the earliest learned, the leftmost.
        Symbols form a linked list; a popped pair whose symbols changed since it was pushed is stale."""
        merge_of = self.merges.get
        after, before = list(range(1, len(ids) + 1)), list(range(-1, len(ids) - 1))  # neighbours; len(ids) = none
        heap = [(merged, i) for i, pair in enumerate(zip(ids, ids[1:])) if (merged := merge_of(pair)) is not None]
        heapq.heapify(heap)
        while heap:
            merged, i = heapq.heappop(heap)
            j = after[i]
            if ids[i] is None or j == len(ids) or merge_of((ids[i], ids[j])) != merged:
                continue  # stale: one of the two symbols was merged into something else meanwhile
            ids[i], ids[j], after[i] = merged, None, after[j]
            if after[i] < len(ids):
                before[after[i]] = i
                if (right := merge_of((merged, ids[after[i]]))) is not None:
                    heapq.heappush(heap, (right, i))
            if before[i] >= 0 and (left := merge_of((ids[before[i]], merged))) is not None:
                heapq.heappush(heap, (left, before[i]))
        return [token for token in ids if token is not None]

    def encode_piece(self, piece: str) -> list[int]:
        """Ids of one pre-token: its UTF-8 bytes as byte tokens, `end_of_word` on the last one, then BPE."""
        if piece in self.special_tokens:  # CLIP's pattern keeps "<|endoftext|>" in one piece
            return [self.special_tokens[piece]]
        data = piece.encode("utf-8")
        token = self.word_ids.get(data)
        if token is not None:  # the whole pre-token is one token: tiktoken's shortcut, exact here (a test proves it)
            return [token]
        ids = list(map(self.byte_ids.__getitem__, data))
        ids[-1] = self.last_byte_ids[data[-1]]  # CLIP's end of word; GPT-2's last byte is a byte like the others
        return self.merge(ids) if len(ids) <= FAST_MERGE_LENGTH else self.merge_fast(ids)

    def encode_pieces(self, pieces: list[str]) -> list[int]:
        ids, cache = [], self._cache
        for piece in pieces:
            piece_ids = cache.get(piece)
            if piece_ids is None:
                if len(cache) >= self.cache_size:
                    cache.clear()  # bounded memory; refilling is cheap
                piece_ids = cache[piece] = self.encode_piece(piece)
            ids += piece_ids
        return ids

    def encode_and_show_work(self, text: str) -> dict:
        """`encode`, with every intermediate step (karpathy/minGPT mingpt/bpe.py's teaching device): the
        pre-tokens, and for each its UTF-8 bytes, those bytes as `bytes_to_unicode` characters, the merges in
        the order BPE applies them (plain loop), the tokens and their ids. `python tokenizer.py` prints it."""
        token_of = {i: token for token, i in self.encoder.items()} | {i: t for t, i in self.special_tokens.items()}
        symbols, parts, ids = bytes_to_unicode(), [], []
        for piece in self.pieces(text):
            merges = []
            if piece in self.special_tokens:
                piece_ids = [self.special_tokens[piece]]
            else:
                data = piece.encode("utf-8")
                piece_ids = self.merge(list(map(self.byte_ids.__getitem__, data[:-1])) + [self.last_byte_ids[data[-1]]],
                                       trace=merges)
            parts.append({"piece": piece, "bytes": piece.encode("utf-8"),
                          "chars": "".join(symbols[b] for b in piece.encode("utf-8")) + self.end_of_word,
                          "merges": [f"{token_of[a]} + {token_of[b]} -> {token_of[m]}" for a, b, m in merges],
                          "tokens": [token_of[i] for i in piece_ids], "ids": piece_ids})
            ids += piece_ids
        return {"pieces": [part["piece"] for part in parts], "parts": parts, "ids": ids}

    def decode(self, ids) -> str:
        """Text of `ids`; a multi-byte character cut in the middle becomes U+FFFD, as in tiktoken."""
        try:
            data = b"".join([self.bytes_of_id[int(i)] for i in ids])
        except KeyError as error:
            raise ValueError(f"token id {error.args[0]} is not in the vocabulary of {len(self.bytes_of_id)}") from None
        return data.decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------------------------------------
# GPT-2


class GPT2Tokenizer(BytePairEncoder):
    """GPT-2's tokenizer: 50,000 merges over bytes plus `<|endoftext|>` = 50256 (50,257 ids).

    `encode(text)` equals tiktoken's `encode_ordinary`; `<|endoftext|>` becomes the special id only where
    `allowed_special` allows it ("all" or a set of names), as in tiktoken. Special text that is not allowed is
    encoded as plain text (`[27, 91, 437, 1659, 5239, 91, 29]`), as tiktoken's `encode(text, allowed_special=...,
    disallowed_special=())` does; tiktoken's default would raise instead."""

    def __init__(self, encoder: dict[str, int], merges: list[tuple[str, str]]):
        if encoder.get("<|endoftext|>") != 50256 or len(encoder) != 50257:
            raise ValueError(f"not GPT-2's vocabulary: {len(encoder)} entries (want 50257 with <|endoftext|> = 50256)")
        super().__init__(encoder, merges, {"<|endoftext|>": 50256})
        # openai/gpt-2 encoder.py: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
        # Contractions (lower case only: "DON'T" gives "DON", "'", "T"), words with at most one leading space,
        # numbers of any length, runs of other symbols; `\s+(?!\S)` leaves a run's last space to the next word.
        c = unicode_classes()
        others = char_class(sorted(c["other"] + c["case"]), "+")
        self.pattern = re.compile(rf"'s|'t|'re|'ve|'m|'ll|'d| ?{char_class(c['L'], '+')}| ?{char_class(c['N'], '+')}"
                                  rf"| ?{others}|[{WHITESPACE}]+(?![^{WHITESPACE}])|[{WHITESPACE}]+")
        self.eot_token = 50256

    @classmethod
    def from_files(cls, encoder_json, vocab_bpe) -> "GPT2Tokenizer":
        """OpenAI's pair, as openai/gpt-2 download_model.py fetches it."""
        return cls(read_json_vocab(encoder_json), read_merges(vocab_bpe))

    @classmethod
    def from_hf(cls, vocab_json, merges_txt) -> "GPT2Tokenizer":
        """Hugging Face's pair (openai-community/gpt2): the same content under other names."""
        return cls.from_files(vocab_json, merges_txt)

    @classmethod
    def default(cls) -> "GPT2Tokenizer":
        return cls.from_files(VOCAB_DIR / "encoder.json", VOCAB_DIR / "vocab.bpe")

    def pieces(self, text: str) -> list[str]:
        """The pre-tokens of `text` (no special tokens): a merge never crosses from one to the next."""
        return self.pattern.findall(text)

    def encode_ordinary(self, text: str) -> list[int]:
        return self.encode_pieces(self.pieces(text))

    def encode(self, text: str, allowed_special=()) -> list[int]:
        """Token ids of `text`; `allowed_special` is "all" or a set of special-token names."""
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        if allowed - set(self.special_tokens):
            raise ValueError(f"unknown special tokens {sorted(allowed - set(self.special_tokens))}")
        if not allowed or not any(name in text for name in allowed):
            return self.encode_ordinary(text)
        # Cut at every allowed special token; the pattern then runs on each stretch between them separately.
        splitter = re.compile("(" + "|".join(re.escape(name) for name in sorted(allowed)) + ")")
        ids = []
        for k, part in enumerate(splitter.split(text)):
            ids += [self.special_tokens[part]] if k % 2 else self.encode_ordinary(part)
        return ids


def pad_left(rows, pad_id):
    """Token id lists of different lengths -> ids (B, T) padded on the left with pad_id, and attention_mask (B, T)
    (Hugging Face's padding_side="left"): a batch of prompts that GPT-2 continues together."""
    T = max(map(len, rows))
    idx = torch.tensor([[pad_id] * (T - len(r)) + list(r) for r in rows])
    attention_mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return idx, attention_mask


# ----------------------------------------------------------------------------------------------------------
# CLIP


def clean_clip_text(text: str) -> str:
    """openai/CLIP `basic_clean` + `whitespace_clean` + `.lower()`, without `ftfy.fix_text`.

    Skipped: ftfy repairs mojibake ("cafÃ©" -> "café"), applies NFC, straightens curly quotes, turns
    full-width forms (common in CJK text: "！", "ＡＢ") and ligatures ("ﬁ") into plain ones, maps C1 control
    codes to Windows-1252 characters and removes other control and terminal-escape characters. On such input
    our ids differ from OpenAI's; pass `ftfy.fix_text(text)` to get OpenAI's exactly. Hugging Face's
    CLIPTokenizer (the one Stable Diffusion calls) skips ftfy and the HTML unescaping, applies NFC, and splits
    case-sensitively, which differs from OpenAI's pattern only on "'ſ" and U+0345."""
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(f"[{WHITESPACE}]+", " ", text).strip().lower()


class CLIPTokenizer(BytePairEncoder):
    """CLIP's tokenizer: 256 bytes, the same 256 with `</w>`, 48,894 merges, SOT 49406, EOT 49407 (49,408 ids).

    `encode` cleans the text (see `clean_clip_text`) and returns ids without SOT/EOT. The text
    "<|startoftext|>" / "<|endoftext|>" inside a prompt becomes the special id, as in OpenAI's code.
    """

    end_of_word = "</w>"

    def __init__(self, encoder: dict[str, int], merges: list[tuple[str, str]]):
        if encoder.get("<|startoftext|>") != 49406 or encoder.get("<|endoftext|>") != 49407 or len(encoder) != 49408:
            raise ValueError(f"not CLIP's vocabulary: {len(encoder)} entries (want 49408 with SOT 49406, EOT 49407)")
        super().__init__(encoder, merges, {"<|startoftext|>": 49406, "<|endoftext|>": 49407})
        # openai/CLIP simple_tokenizer.py, IGNORECASE: <\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|
        # [\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+ . Digits are single tokens; whitespace is dropped. The text is lower
        # case already, so IGNORECASE only shows in "ſ" (U+017F), which matches `s` (hence `(?i:...)`), and in
        # U+0345, which matches no alternative and vanishes (`unicode_classes` keeps it out of "other").
        c, specials = unicode_classes(), r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
        self.pattern = re.compile(rf"(?i:{specials})|{char_class(c['L'], '+')}|{char_class(c['N'])}"
                                  rf"|{char_class(c['other'], '+')}")
        self.sot_token, self.eot_token = 49406, 49407

    @classmethod
    def from_file(cls, bpe_gz) -> "CLIPTokenizer":
        """openai/CLIP's `bpe_simple_vocab_16e6.txt.gz`: a header line, then merges, of which CLIP uses the
        first 49152 - 256 - 2 = 48,894. The vocabulary is built from them as `SimpleTokenizer.__init__` does."""
        try:
            lines = gzip.decompress(Path(bpe_gz).read_bytes()).decode("utf-8").split("\n")
        except (OSError, EOFError, UnicodeDecodeError) as error:
            raise ValueError(f"{bpe_gz}: not a gzip-compressed merges file ({error})") from None
        merges = read_merges(bpe_gz, ["#version"] + lines[1 : 49152 - 256 - 2 + 1])
        symbols = list(bytes_to_unicode().values())
        vocab = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges] + ["<|startoftext|>", "<|endoftext|>"]
        return cls({token: i for i, token in enumerate(vocab)}, merges)

    @classmethod
    def from_hf(cls, vocab_json, merges_txt) -> "CLIPTokenizer":
        """Hugging Face's pair (openai/clip-vit-large-patch14, Stable Diffusion's `tokenizer/`)."""
        return cls(read_json_vocab(vocab_json), read_merges(merges_txt))

    @classmethod
    def default(cls) -> "CLIPTokenizer":
        return cls.from_file(VOCAB_DIR / "bpe_simple_vocab_16e6.txt.gz")

    def pieces(self, text: str) -> list[str]:
        """The pre-tokens of the cleaned `text`; "<|startoftext|>"/"<|endoftext|>" come out whole."""
        return self.pattern.findall(clean_clip_text(text))

    def encode(self, text: str) -> list[int]:
        return self.encode_pieces(self.pieces(text))

    def tokenize(self, texts, context_length: int = 77, pad: str = "zero", truncate: bool = True) -> torch.Tensor:
        """`[SOT] + encode(text) + [EOT]`, padded to `context_length`, as a LongTensor (B, T), B = len(texts).

        Padding: `pad="zero"` is OpenAI's `clip.tokenize` (id 0, the token "!"); `pad="eot"` repeats 49407 as
        Hugging Face's CLIPTokenizer does for Stable Diffusion 1.x. The CLIP text tower reads its feature at
        the first EOT and masks causally, so it does not care; Stable Diffusion's UNet attends to all 77
        positions, so it needs `pad="eot"`. A text longer than the context is cut, keeping EOT last (what
        `clip.tokenize(truncate=True)` and SD do); with `truncate=False` it raises ValueError instead."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if pad not in ("zero", "eot"):
            raise ValueError(f"pad must be 'zero' (OpenAI) or 'eot' (Stable Diffusion), not {pad!r}")
        if context_length < 2:
            raise ValueError(f"context_length must leave room for SOT and EOT, got {context_length}")
        out = torch.full((len(texts), context_length), 0 if pad == "zero" else self.eot_token, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.sot_token] + self.encode(text) + [self.eot_token]
            if len(ids) > context_length:
                if not truncate:
                    raise ValueError(f"text {row} is {len(ids)} tokens long, more than the context of "
                                     f"{context_length}: shorten it or pass truncate=True: {text[:60]!r}...")
                ids = ids[: context_length - 1] + [self.eot_token]
            out[row, : len(ids)] = torch.tensor(ids)
        return out


def main(argv=None):
    """Show how a text becomes ids, step by step (the output in the module docstring)."""
    import argparse
    parser = argparse.ArgumentParser(description="Show the byte-level BPE of GPT-2 or CLIP at work on a text.")
    parser.add_argument("text", nargs="?", default="Hello!! I'm Andrej Karpathy 🤗",
                        help="the text to encode (default: part of minGPT's example)")
    parser.add_argument("--tokenizer", choices=("gpt2", "clip"), default="gpt2", help="which tokenizer")
    args = parser.parse_args(argv)
    work = (GPT2Tokenizer if args.tokenizer == "gpt2" else CLIPTokenizer).default().encode_and_show_work(args.text)
    print(f"text: {args.text!r}\npre-tokens: {work['pieces']}")
    for part in work["parts"]:
        print(f"{part['piece']!r}: bytes {part['bytes']!r} -> chars {part['chars']!r}")
        for merge in part["merges"]:
            print(f"    merge {merge}")
        print(f"    tokens {part['tokens']} ids {part['ids']}")
    print(f"ids: {work['ids']}")
    return work


if __name__ == "__main__":
    main()
