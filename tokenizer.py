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
import bisect
import heapq
import html
import itertools
import re
from pathlib import Path

import numpy as np
import torch

from weights.tokenizer_tables import (WHITESPACE, char_class, check_merges, read_gzip_merges, read_json_vocab,
                                     read_merges, unicode_classes)

VOCAB_DIR = Path(__file__).resolve().parent / "weights" / "vocab"  # committed copies of the official files
FAST_MERGE_LENGTH = 64  # pieces with more bytes merge through the heap (words are shorter; hostile input is not)
MANY_PIECES = 1000  # from this many new pre-tokens in one call, the short ones merge together (`merge_many`)


# ----------------------------------------------------------------------------------------------------------
# Building blocks


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (openai/gpt-2 encoder.py):
    printable Latin-1 bytes stand for themselves, the others (control codes, space, ...) move to U+0100 and up,
    so a merges file is plain text with a space between the halves of a merge. CLIP's first ids follow it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    shifted = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(shifted)}}


# ----------------------------------------------------------------------------------------------------------
# The shared BPE machinery


class BytePairEncoder:
    """Vocabulary, merges and the BPE loop shared by both tokenizers. `encoder`: token (in `bytes_to_unicode`
    characters) -> id; `merges`: pairs in the order they were learned; `special_tokens`: text -> id, never made
    by BPE. Finished pre-tokens go to a cache (a dict emptied before it would pass `cache_size` entries):
    words repeat, so most pre-tokens cost one dict lookup.
    """

    end_of_word = ""  # CLIP: "</w>" on the last symbol of each pre-token

    def __init__(self, encoder: dict[str, int], merges: list[tuple[str, str]], special_tokens: dict[str, int],
                 cache_size: int = 100_000):
        check_merges(encoder, merges)
        # (left id, right id) -> id of the joined token. Ids grow with the merge rank, so the lowest id wins.
        self.merges = {(encoder[a], encoder[b]): encoder[a + b] for a, b in merges}
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
        self._cache: dict[str, list[int] | tuple[int, ...]] = {}
        self.cache_size = cache_size
        # `self.merges` for numpy (`merged_ids`): the keys left * n_vocab + right, sorted, and their merged ids
        pairs = sorted(self.merges.items())
        self.merge_keys = np.array([a * self.n_vocab + b for (a, b), _ in pairs], dtype=np.int64)
        self.merge_ids = np.array([merged for _, merged in pairs], dtype=np.int64)
        byte_ids = np.array(self.byte_ids)
        self.byte_pair_ids = self.merged_ids(byte_ids[:, None], byte_ids[None, :])  # (256, 256) for the first pairs

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

    def merged_ids(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        """`self.merges.get((l, r), n_vocab)` for every pair of two id arrays at once (a binary search)."""
        keys = left * self.n_vocab + right
        at = np.searchsorted(self.merge_keys, keys).clip(max=len(self.merge_keys) - 1)
        return np.where(self.merge_keys[at] == keys, self.merge_ids[at], self.n_vocab)

    def merge_many(self, pieces: list[bytes]) -> list[tuple[int, ...]]:
        """`merge` of many pieces (UTF-8) at once, for text where most words are new. They lie end to end in
        flat arrays; each round takes one step of `merge` in every piece, in numpy: its lowest pair id, of equals
        the leftmost (`reduceat`), the merge, the new pairs beside it. A piece with no pair left leaves the
        arrays, so each merges exactly as in the plain loop, about twice as fast (the work per merge runs in C)."""
        never, lengths = self.n_vocab, np.array(list(map(len, pieces)), dtype=np.int64)
        data = np.frombuffer(b"".join(pieces), dtype=np.uint8)
        ends = np.cumsum(lengths) - 1
        ids = np.array(self.byte_ids)[data]  # (N,) all pieces' tokens, end to end
        pair_ids = np.append(self.byte_pair_ids[data[:-1], data[1:]], never)  # (N,) what ids[k], ids[k + 1] make
        pair_ids[ends] = never  # no pair across two pieces
        if self.end_of_word:  # CLIP: the last byte of a piece is another token
            ids[ends] = np.array(self.last_byte_ids)[data[ends]]
            last = ends[lengths > 1] - 1  # the last pair of each piece of two bytes or more
            pair_ids[last] = self.merged_ids(ids[last], ids[last + 1])
        out, piece = [None] * len(pieces), np.arange(len(pieces))  # piece: the index of each piece in the arrays
        while len(piece):
            starts = np.cumsum(lengths) - lengths
            if len(piece) < MANY_PIECES // 10:  # a few long ones left: the plain loop goes on from where they are
                for i, start, n in zip(piece.tolist(), starts.tolist(), lengths.tolist()):
                    out[i] = tuple(self.merge(ids[start : start + n].tolist()))
                break
            # (P,) each piece's next merge, as in `merge`: its lowest pair id, and of equals the leftmost
            best, at = np.divmod(np.minimum.reduceat(pair_ids * len(ids) + np.arange(len(ids)), starts), len(ids))
            if (done := best == never).any():  # these pieces are merged: out of the arrays
                leaving = np.repeat(done, lengths)
                flat, k = tuple(ids[leaving].tolist()), 0  # tuples: the garbage collector soon stops tracking them
                for i, n in zip(piece[done].tolist(), lengths[done].tolist()):
                    out[i], k = flat[k : k + n], k + n
                ids, pair_ids, piece, lengths, best = (ids[~leaving], pair_ids[~leaving], piece[~done], lengths[~done],
                                                       best[~done])
                at, starts = at[~done] - starts[~done], np.cumsum(lengths) - lengths
                at += starts  # where the best pairs are now
            ids[at] = best
            ids, pair_ids, lengths = np.delete(ids, at + 1), np.delete(pair_ids, at + 1), lengths - 1
            at, starts = at - np.arange(len(at)), starts - np.arange(len(at))  # where they are after the cut
            pair_ids[at] = never
            right, left = at[at < starts + lengths - 1], at[at > starts] - 1
            pair_ids[right] = self.merged_ids(ids[right], ids[right + 1])
            pair_ids[left] = self.merged_ids(ids[left], ids[left + 1])
        return out

    def encode_many(self, pieces: set[str]) -> dict[str, tuple[int, ...]]:
        """`encode_piece` of many distinct pieces: the short ones merged together (`merge_many`)."""
        found = {special: (self.special_tokens[special],) for special in pieces & self.special_tokens.keys()}
        piece_of = {piece.encode("utf-8"): piece for piece in pieces - found.keys()}
        words = piece_of.keys() & self.word_ids.keys()  # whole-token pre-tokens, as in `encode_piece`
        found.update((piece_of[word], (self.word_ids[word],)) for word in words)
        data = sorted(piece_of.keys() - words, key=len)
        cut = bisect.bisect_right(data, FAST_MERGE_LENGTH, key=len)
        found.update(zip(map(piece_of.get, data[:cut]), self.merge_many(data[:cut])))
        found.update((piece_of[d], tuple(self.encode_piece(piece_of[d]))) for d in data[cut:])  # the long ones: the heap
        return found

    def encode_pieces(self, pieces: list[str]) -> list[int]:
        """Ids of the pre-tokens, from the cache; new ones go there first, each distinct one encoded once
        (together if there are many)."""
        cache = self._cache
        while True:  # at most twice
            ids = []
            try:
                for piece_ids in map(cache.__getitem__, pieces):
                    ids += piece_ids
                break
            except KeyError:
                new = set(pieces).difference(cache)
                if len(cache) + len(new) > self.cache_size:
                    cache.clear()  # bounded memory; refilling is cheap
                    new = set(pieces)
                cache.update(self.encode_many(new) if len(new) >= MANY_PIECES else zip(new, map(self.encode_piece, new)))
        if len(cache) > self.cache_size:  # a call with more distinct pieces than that
            cache.clear()
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
        merges = read_gzip_merges(bpe_gz, 49152 - 256 - 2)
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
