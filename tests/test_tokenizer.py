"""tokenizer.py against the reference tokenizers, id for id, on a corpus of more than 1 MB.

- GPT-2: tiktoken built offline from the committed encoder.json + vocab.bpe (hash-checked: the files
  tiktoken pins for its `gpt2` encoding) with GPT-2's original split pattern; `decode(encode(s)) == s`.
- CLIP: transformers' CLIPTokenizer on the Hugging Face files derived from bpe_simple_vocab_16e6.txt.gz
  (byte-identical to openai/clip-vit-large-patch14's, hash-checked). OpenAI's cleaner runs ftfy.fix_text,
  which tokenizer.py leaves out, so our cleaner gets `ftfy.fix_text(text)` and must equal OpenAI's; the ids
  are compared on OpenAI's cleaned text (transformers skips ftfy and HTML unescaping).
- The split patterns, built with the standard library `re`, equal the `regex` package's on the corpus and
  on every assigned code point.
- Golden ids from published examples need no library at all.
"""
import gzip
import hashlib
import html
import json
import re
import unicodedata

import ftfy
import pytest
import regex
import tiktoken
import torch
import transformers
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from tokenizer import VOCAB_DIR, CLIPTokenizer, GPT2Tokenizer, clean_clip_text
from weights.tokenizer_tables import char_class, read_merges, unicode_classes
from tokenizer_corpus import build_corpus

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""  # openai/gpt-2
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
SHA256 = {  # tiktoken_ext/openai_public.py pins; openai/CLIP's blob (../shared/WEIGHTS.md §4.1)
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "bpe_simple_vocab_16e6.txt.gz": "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a",
}


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def openai_clip_clean_after_ftfy(text: str) -> str:
    """openai/CLIP simple_tokenizer.py basic_clean + whitespace_clean + lower, after its ftfy.fix_text."""
    text = html.unescape(html.unescape(text)).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


def first_difference(ours: list, reference: list) -> str:
    i = next((k for k, (a, b) in enumerate(zip(ours, reference)) if a != b), min(len(ours), len(reference)))
    return f"first difference at {i}: ours {ours[i - 3 : i + 4]} reference {reference[i - 3 : i + 4]}"


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    chunks = build_corpus()
    assert len("".join(chunks).encode("utf-8")) >= 1_000_000
    return chunks


@pytest.fixture(scope="module")
def clip_corpus(corpus) -> list[tuple[str, str]]:
    """(ftfy.fix_text(chunk), OpenAI's cleaning of chunk) per chunk: ftfy runs once, here, for all CLIP tests."""
    fixed = [ftfy.fix_text(chunk) for chunk in corpus]
    return [(text, openai_clip_clean_after_ftfy(text)) for text in fixed]


@pytest.fixture(scope="module")
def gpt2() -> GPT2Tokenizer:
    return GPT2Tokenizer.default()


@pytest.fixture(scope="module")
def clip() -> CLIPTokenizer:
    return CLIPTokenizer.default()


@pytest.fixture(scope="module")
def tiktoken_gpt2() -> tiktoken.Encoding:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIKTOKEN_CACHE_DIR", "")  # read the local files directly, cache nothing, download nothing
        ranks = data_gym_to_mergeable_bpe_ranks(str(VOCAB_DIR / "vocab.bpe"), str(VOCAB_DIR / "encoder.json"),
                                                SHA256["vocab.bpe"], SHA256["encoder.json"])
    return tiktoken.Encoding("gpt2-offline", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)


@pytest.fixture(scope="module")
def clip_hf_files(tmp_path_factory) -> dict:
    """The Hugging Face CLIP files, rebuilt from the .gz as ../shared/WEIGHTS.md §2.6 describes."""
    folder = tmp_path_factory.mktemp("clip_hf")
    lines = gzip.decompress((VOCAB_DIR / "bpe_simple_vocab_16e6.txt.gz").read_bytes()).decode().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    symbols = [chr(c) for c in range(0x21, 0x7F)] + [chr(c) for c in range(0xA1, 0xAD)] + [chr(c) for c in range(0xAE, 0x100)]
    symbols += [chr(256 + n) for n in range(256 - len(symbols))]  # GPT-2's bytes_to_unicode, written out again
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    encoder = {token: i for i, token in enumerate(vocab)}
    files = {}
    for name, dump, header in [("large", dict(), "#version: 0.2\n"),
                               ("base", dict(separators=(",", ":")), "#version: 0.2 - Trained by `huggingface/tokenizers`\n")]:
        (folder / name).mkdir()
        (folder / name / "vocab.json").write_text(json.dumps(encoder, ensure_ascii=False, **dump), encoding="utf-8")
        (folder / name / "merges.txt").write_text(header + "\n".join(merges) + "\n", encoding="utf-8")
        files[name] = folder / name
    return files


@pytest.fixture(scope="module")
def clip_hf(clip_hf_files):
    return transformers.CLIPTokenizer.from_pretrained(clip_hf_files["large"])


# ---------------------------------------------------------------------------------------- files and golden ids


def test_committed_vocabulary_files_are_the_official_ones():
    for name, digest in SHA256.items():
        assert sha256(VOCAB_DIR / name) == digest, name


def test_gpt2_golden_ids(gpt2):
    # transformers GPT2Tokenizer docstring, tiktoken tests/test_encoding.py, WEIGHTS.md §5
    assert gpt2.encode("Hello, I'm a language model,") == [15496, 11, 314, 1101, 257, 3303, 2746, 11]
    assert gpt2.encode("Hello world") == [15496, 995] and gpt2.encode(" Hello world") == [18435, 995]
    assert gpt2.encode("hello world") == [31373, 995]
    zeros = {1: [15], 2: [405], 3: [830], 4: [2388], 8: [8269], 16: [25645], 17: [8269, 10535, 830]}
    for n, ids in zeros.items():
        assert gpt2.encode("0" * n) == ids, n
    assert gpt2.encode("") == [] and gpt2.decode([]) == ""
    assert (gpt2.eot_token, gpt2.n_vocab) == (50256, 50257)


def test_gpt2_special_tokens_only_where_allowed(gpt2, tiktoken_gpt2):
    text = "hello <|endoftext|>"
    assert gpt2.encode(text, allowed_special="all") == [31373, 220, 50256]
    assert gpt2.encode(text, allowed_special={"<|endoftext|>"}) == [31373, 220, 50256]
    assert gpt2.encode(text) == [31373, 1279, 91, 437, 1659, 5239, 91, 29]  # plain text when not allowed
    assert gpt2.encode(text) == tiktoken_gpt2.encode(text, disallowed_special=())
    for text in ["<|endoftext|>", "a<|endoftext|><|endoftext|>b", " <|endoftext|> x\n<|endoftext|>", "<|endoftext"]:
        assert gpt2.encode(text, allowed_special="all") == tiktoken_gpt2.encode(text, allowed_special="all"), text
        assert gpt2.decode(gpt2.encode(text, allowed_special="all")) == text
    with pytest.raises(ValueError, match="unknown special"):
        gpt2.encode(text, allowed_special={"<|startoftext|>"})


def test_clip_golden_ids(clip):
    # openai/CLIP notebooks/Interacting_with_CLIP.ipynb; README ("a dog")
    row = clip.tokenize("Hello World!")
    assert row.shape == (1, 77) and row.dtype == torch.long
    assert row[0, :5].tolist() == [49406, 3306, 1002, 256, 49407] and row[0, 5:].eq(0).all()
    assert clip.tokenize("a dog", pad="eot")[0].tolist() == [49406, 320, 1929] + [49407] * 74
    assert clip.tokenize("")[0, :3].tolist() == [49406, 49407, 0]
    assert clip.encode("  Hello\n\tWORLD!  ") == clip.encode("hello world!") == [3306, 1002, 256]
    assert clip.encode("&amp;lt;3") == clip.encode("<3")  # html.unescape twice, as OpenAI's cleaner
    assert (clip.sot_token, clip.eot_token, clip.n_vocab) == (49406, 49407, 49408)


# ---------------------------------------------------------------------------------------- the split patterns


def test_unicode_classes_equal_regex_on_every_assigned_code_point():
    """Our \\p{L} / \\p{N} / \\s and CLIP's IGNORECASE classes against `regex`, one code point at a time.
    Only code points assigned in this Python's Unicode are compared: `regex` may know a newer version."""
    text = "".join(chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) not in ("Cn", "Cs"))
    classes = unicode_classes()
    ours = {name: set(re.findall(char_class(classes[name]), text)) for name in ("L", "N", "space")}
    ours["other"] = set(re.findall(char_class(sorted(classes["other"] + classes["case"])), text))
    ours["clip_other"] = set(re.findall(char_class(classes["other"]), text))
    reference = {"L": r"\p{L}", "N": r"\p{N}", "other": r"[^\s\p{L}\p{N}]", "space": r"\s"}
    for name, pattern in reference.items():
        assert ours[name] == set(regex.findall(pattern, text)), (name, unicodedata.unidata_version)
    # CLIP's pattern is compiled with IGNORECASE, under which U+0345 is neither letter nor "other"
    assert ours["L"] == set(regex.findall(r"[\p{L}]", text, flags=regex.IGNORECASE))
    assert ours["clip_other"] == set(regex.findall(r"[^\s\p{L}\p{N}]", text, flags=regex.IGNORECASE))
    assert ours["L"] | ours["N"] | ours["other"] | ours["space"] == set(text)


def test_gpt2_split_equals_regex(gpt2, corpus):
    text = "".join(corpus)
    ours, reference = gpt2.pattern.findall(text), regex.findall(GPT2_PATTERN, text)
    assert ours == reference, first_difference(ours, reference)


def test_clip_split_and_cleaning_equal_openai(clip, clip_corpus):
    """Our cleaner equals OpenAI's after ftfy; the split equals OpenAI's IGNORECASE `regex` pattern,
    including its quirks ("'ſ" is a contraction, U+0345 vanishes), which the corpus contains."""
    for fixed, cleaned in clip_corpus:
        assert clean_clip_text(fixed) == cleaned
        ours, reference = clip.pattern.findall(cleaned), regex.findall(CLIP_PATTERN, cleaned, flags=regex.IGNORECASE)
        assert ours == reference, first_difference(ours, reference)


# ---------------------------------------------------------------------------------------- parity on the corpus


def test_gpt2_ids_equal_tiktoken_on_corpus(gpt2, tiktoken_gpt2, corpus):
    text = "".join(corpus)
    ours, reference = gpt2.encode(text), tiktoken_gpt2.encode_ordinary(text)
    assert ours == reference, first_difference(ours, reference)
    assert gpt2.decode(ours) == text
    for chunk in corpus:  # the corpus holds "<|endoftext|>" here and there
        assert gpt2.encode(chunk, allowed_special="all") == tiktoken_gpt2.encode(chunk, allowed_special="all")


def test_clip_ids_equal_transformers_on_corpus(clip, clip_hf, clip_corpus):
    """Both get OpenAI's cleaned text (the cleaning is checked above). Where transformers' pipeline differs
    from OpenAI's (ours follows OpenAI, checked against `regex` above), the text is adapted: transformers
    splits case-sensitively, which treats "ſ" and U+0345 otherwise, so they are taken out; it applies NFC
    after ftfy and lower-casing, so the text is NFC already; and it cuts "<|startoftext|>" out of any text,
    where OpenAI's pattern sees it only at the start of a piece (not in "(<|"), so it gets spaces around it."""
    def adapt(text):
        text = unicodedata.normalize("NFC", text.replace("ſ", "").replace("\u0345", ""))
        return text.replace("<|startoftext|>", " <|startoftext|> ").replace("<|endoftext|>", " <|endoftext|> ")

    texts = [adapt(cleaned) for _, cleaned in clip_corpus]
    reference = clip_hf(texts, add_special_tokens=False)["input_ids"]
    for text, expected in zip(texts, reference):
        ours = clip.encode(text)
        assert ours == expected, first_difference(ours, expected)


def test_clip_tokenize_pads_and_truncates_like_transformers_and_openai(clip, clip_hf):
    long_prompt = "a photograph of an astronaut riding a horse on mars, " * 12
    texts = ["a dog", "", long_prompt, "Hello World!", "x " * 75, "x " * 76]
    ours = clip.tokenize(texts, pad="eot")
    reference = clip_hf(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
    assert torch.equal(ours, reference)  # Stable Diffusion's tokenizer call
    zero = clip.tokenize(texts)  # OpenAI's clip.tokenize(texts, truncate=True): same tokens, padded with 0
    for row_ours, row_zero in zip(ours, zero):
        n = int((row_ours == 49407).nonzero()[0]) + 1
        assert torch.equal(row_ours[:n], row_zero[:n]) and row_zero[n:].eq(0).all()
    full = [49406] + clip.encode(long_prompt) + [49407]
    assert len(full) > 77 and ours[2].tolist() == full[:76] + [49407]
    assert clip.tokenize("x " * 75, truncate=False)[0, 76] == 49407  # exactly 77 fits
    with pytest.raises(ValueError, match="78 tokens long"):
        clip.tokenize(["ok", "x " * 76], truncate=False)
    with pytest.raises(ValueError, match="pad must be"):
        clip.tokenize("a dog", pad="left")


# ---------------------------------------------------------------------------------------- files, shortcut, cache


def test_openai_and_hugging_face_files_give_the_same_tokenizer(gpt2, clip, clip_hf_files, tmp_path):
    (tmp_path / "vocab.json").write_bytes((VOCAB_DIR / "encoder.json").read_bytes())
    (tmp_path / "merges.txt").write_bytes((VOCAB_DIR / "vocab.bpe").read_bytes())
    gpt2_hf = GPT2Tokenizer.from_hf(tmp_path / "vocab.json", tmp_path / "merges.txt")
    assert (gpt2_hf.encoder, gpt2_hf.merges) == (gpt2.encoder, gpt2.merges)
    # the rebuilt HF CLIP files are byte-identical to the published ones (hashes in WEIGHTS.md §2.6)
    pins = {("large", "vocab.json"): "3f0c4f7d2086b61b38487075278ea9ed04edb53a03cbb045b86c27190fa8fb69",
            ("large", "merges.txt"): "9fd691f7c8039210e0fced15865466c65820d09b63988b0174bfe25de299051a",
            ("base", "vocab.json"): "5047b556ce86ccaf6aa22b3ffccfc52d391ea4accdab9c2f2407da5b742d4363",
            ("base", "merges.txt"): "f526393189112391ce6f9795d4695f704121ce452c3aad1f5335cc41337eba85"}
    for (name, file), digest in pins.items():
        assert sha256(clip_hf_files[name] / file) == digest, (name, file)
    for folder in clip_hf_files.values():
        clip_hf = CLIPTokenizer.from_hf(folder / "vocab.json", folder / "merges.txt")
        assert (clip_hf.encoder, clip_hf.merges, clip_hf.special_tokens) == (clip.encoder, clip.merges, clip.special_tokens)


def test_whole_token_shortcut_is_exact(gpt2, clip):
    """encode_piece returns a pre-token that is itself a token without running BPE (tiktoken does the same).
    That is exact only if BPE rebuilds every token from its bytes; it does, for both vocabularies."""
    for tokenizer in (gpt2, clip):
        for token, i in tokenizer.encoder.items():
            data = tokenizer.bytes_of_id[i]
            if tokenizer.end_of_word and token.endswith(tokenizer.end_of_word):  # decodes with a trailing " "
                ids = [tokenizer.byte_ids[b] for b in data[:-2]] + [tokenizer.last_byte_ids[data[-2]]]
            else:
                ids = [tokenizer.byte_ids[b] for b in data]
            assert tokenizer.merge(ids) == [i], token


def test_cache_is_bounded_and_changes_nothing(corpus):
    tokenizer = GPT2Tokenizer.default()
    text = "".join(corpus[:60])
    expected = tokenizer.encode(text)
    tokenizer.cache_size = 100
    tokenizer._cache.clear()
    assert tokenizer.encode(text) == expected and len(tokenizer._cache) <= 100


def test_default_files_are_found_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert GPT2Tokenizer.default().encode("hello world") == [31373, 995]


def test_bad_files_and_ids_give_one_clear_error(tmp_path, gpt2):
    bad_gz = tmp_path / "bpe.txt.gz"
    bad_gz.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="not a gzip"):
        CLIPTokenizer.from_file(bad_gz)
    bad_merges = tmp_path / "merges.txt"
    bad_merges.write_text("#version: 0.2\nĠ t\nĠt he extra\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 3 is not a merge"):
        GPT2Tokenizer.from_files(VOCAB_DIR / "encoder.json", bad_merges)
    bad_json = tmp_path / "vocab.json"
    bad_json.write_text('{"a": 0,', encoding="utf-8")
    with pytest.raises(ValueError, match="not a JSON vocabulary"):
        GPT2Tokenizer.from_hf(bad_json, VOCAB_DIR / "vocab.bpe")
    clip_merges = tmp_path / "clip_merges.txt"
    clip_merges.write_text("#version: 0.2\nh e</w>\n", encoding="utf-8")
    with pytest.raises(ValueError, match="same tokenizer"):
        GPT2Tokenizer.from_files(VOCAB_DIR / "encoder.json", clip_merges)
    with pytest.raises(ValueError, match="not GPT-2's vocabulary"):
        GPT2Tokenizer({"a": 0}, [])
    merges = read_merges(VOCAB_DIR / "vocab.bpe")
    with pytest.raises(ValueError, match="grow with the merge order"):
        GPT2Tokenizer({**gpt2.encoder, **gpt2.special_tokens}, [merges[1], merges[0]] + merges[2:])
    with pytest.raises(ValueError, match="token id 50257"):
        gpt2.decode([15496, 50257])


# ----------------------------------------------------------------------------- long words and the teaching path


def byte_ids(tokenizer, piece):
    data = piece.encode("utf-8")
    return list(map(tokenizer.byte_ids.__getitem__, data[:-1])) + [tokenizer.last_byte_ids[data[-1]]]


@pytest.mark.parametrize("alphabet", ["ab", "aaaaab", "abcdefghijklmnopqrstuvwxyz", "éàü€", "0123456789", "xy z"])
def test_fast_merge_equals_the_plain_loop(gpt2, clip, alphabet):
    """The heap (merge_fast) and the visible loop (merge) pick the same pair at every step: same ids."""
    import random
    rng = random.Random(alphabet)
    for tokenizer in (gpt2, clip):
        for length in (2, 5, 63, 64, 65, 300, 3000):
            piece = "".join(rng.choice(alphabet) for _ in range(length))
            ids = byte_ids(tokenizer, piece)
            assert tokenizer.merge_fast(list(ids)) == tokenizer.merge(list(ids)), (length, piece[:40])


def test_many_pieces_merge_together_as_one_by_one(gpt2, clip):
    """The batch path (encode_many / merge_many, taken from MANY_PIECES new pre-tokens in one call) gives each
    piece the ids of `encode_piece` (plain loop, heap for long ones): random words of many scripts and lengths,
    one byte up to past FAST_MERGE_LENGTH, whole-token words, the special texts, ties (repeated pairs)."""
    import random
    from tokenizer import MANY_PIECES
    rng = random.Random(19)
    alphabets = ["ab", "aaaaab", "abcdefghijklmnopqrstuvwxyz", "éàü€", "0123456789", "кошкаДОМ", "αβγδε",
                 "日本語の猫", "🤗🐍✓", "ﬁſ\u0345", " \t\n", "!?.,<|>"]
    pieces = {"<|endoftext|>", "<|startoftext|>", " the", "hello", "a", "é"}
    while len(pieces) < 3 * MANY_PIECES:
        alphabet = rng.choice(alphabets)
        pieces.add("".join(rng.choice(alphabet) for _ in range(rng.choice([1, 2, 3, 5, 8, 13, 30, 63, 64, 70]))))
    for tokenizer in (gpt2, clip):
        found = tokenizer.encode_many(set(pieces))
        assert found.keys() == pieces
        assert all(list(found[piece]) == tokenizer.encode_piece(piece) for piece in pieces)


def test_the_cache_stays_bounded_over_many_calls(corpus):
    tokenizer, plain = GPT2Tokenizer.default(), GPT2Tokenizer.default()
    tokenizer.cache_size = 1500  # the corpus's chunks bring more new pieces than that, in one call and in two
    for chunk in ("".join(corpus[:40]), "".join(corpus[40:45]), "".join(corpus[-30:])):
        assert tokenizer.encode(chunk) == plain.encode(chunk) and len(tokenizer._cache) <= 1500


def test_long_words_equal_tiktoken(gpt2, tiktoken_gpt2):
    import random
    rng = random.Random(0)
    for text in ["a" * 20_000, "".join(rng.choice("abcdefghij") for _ in range(20_000)), "ab" * 9_999 + " x",
                 "9" * 5_000, "€" * 3_000]:
        assert gpt2.encode_ordinary(text) == tiktoken_gpt2.encode_ordinary(text)


def long_prompt_tokenizers():  # untimed setup of the bounded child below: loading the tokenizers takes ~2 s
    return GPT2Tokenizer.default(), CLIPTokenizer.default()


def encode_long_prompt(tokenizers):
    """Seconds to encode a 20,000- and a 200,000-letter word (the second took over 2 minutes with the plain
    loop alone: quadratic), with both tokenizers."""
    import time
    seconds = []
    for length in (10_000, 100_000):
        start = time.perf_counter()
        for tokenizer in tokenizers:
            tokenizer.encode("x" + "ab" * length)
        seconds.append(time.perf_counter() - start)
    return seconds


def test_a_200_000_letter_word_encodes_in_bounded_time():
    from bounded import run_bounded
    outcome = run_bounded("test_tokenizer:encode_long_prompt", setup="test_tokenizer:long_prompt_tokenizers",
                          memory_mb=1024, seconds=120)
    assert outcome.status == "returned", str(outcome)
    short, long = eval(outcome.result)
    assert long < 50 * short + 1.0, (short, long)  # 10 times the letters: ~15 times the time (n log n), not 100


def test_encode_and_show_work(gpt2, clip):
    text = "Hello!! I'm Andrej Karpathy. It's 2022. w00t :D 🤗"
    work = gpt2.encode_and_show_work(text)
    # karpathy/minGPT mingpt/bpe.py prints these for the same text
    assert work["ids"] == [15496, 3228, 314, 1101, 10948, 73, 509, 5117, 10036, 13, 632, 338, 33160, 13, 266, 405, 83,
                           1058, 35, 12520, 97, 245] == gpt2.encode(text)
    assert work["pieces"] == ["Hello", "!!", " I", "'m", " Andrej", " Karpathy", ".", " It", "'s", " 2022", ".", " w",
                              "00", "t", " :", "D", " 🤗"]
    andrej = work["parts"][4]
    assert andrej["chars"] == "ĠAndrej" and andrej["tokens"] == ["ĠAndre", "j"] and andrej["ids"] == [10948, 73]
    assert andrej["merges"][-1] == "ĠAnd + re -> ĠAndre" and andrej["bytes"] == b" Andrej"
    clip_work = clip.encode_and_show_work("A photo of a CAT <|endoftext|>")
    assert clip_work["ids"] == clip.encode("A photo of a CAT <|endoftext|>") and clip_work["ids"][-1] == 49407
    cat = clip_work["parts"][4]
    assert cat["chars"] == "cat</w>" and cat["merges"][-1] == "c + at</w> -> cat</w>"


def test_the_demo_in_the_module_docstring_is_what_main_prints(capsys):
    import tokenizer
    tokenizer.main([])
    printed = capsys.readouterr().out.strip().splitlines()
    shown = [line[4:] for line in tokenizer.__doc__.splitlines() if line.startswith("    ")]
    assert printed == shown
