"""Encode throughput of tokenizer.py's GPT-2 tokenizer against tiktoken and a pure-Python reference.

    python tests/bench_tokenizer.py [--repeats 5]

Text: the test corpus (tests/tokenizer_corpus.py, 1.1 MB: standard-library code, English docstrings and
generated multilingual text), whole and in its two parts. Throughput is MB of UTF-8 per second, best of
`--repeats` runs taken in turns, one thread:
- ours, cold: the pre-token cache emptied first, so every distinct pre-token goes through BPE once;
- ours, warm: the same tokenizer again, its pre-token cache filled;
- tiktoken: `encode_ordinary` of an Encoding built offline from the same files (Rust, one thread);
- pure Python: transformers 5 has no pure-Python GPT2Tokenizer any more (GPT2Tokenizer is now backed by the
  Rust `tokenizers`). ClvpTokenizer (a `PythonBackend` tokenizer) keeps the algorithm of the old slow
  GPT2Tokenizer (`bpe` loop, `_tokenize`, the same `regex` split) and runs here on GPT-2's files with its
  English normalizer switched off; its ids are checked equal to tiktoken's before timing.
The text "<|endoftext|>" is written "<|end of text|>" here: the slow tokenizer always treats it as special.
"""
import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tiktoken  # noqa: E402
import transformers  # noqa: E402
from tiktoken.load import data_gym_to_mergeable_bpe_ranks  # noqa: E402

from tokenizer import VOCAB_DIR, GPT2Tokenizer  # noqa: E402
from tokenizer_corpus import build_corpus, stdlib_chunks  # noqa: E402

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class SlowGPT2Tokenizer(transformers.ClvpTokenizer):
    """The pre-2025 pure-Python GPT2Tokenizer: ClvpTokenizer without its English text normalizer."""

    @property
    def normalizer(self):
        return lambda text: text


def seconds(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement; the best counts")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    os.environ["TIKTOKEN_CACHE_DIR"] = ""  # local files only, no cache, no download
    ranks = data_gym_to_mergeable_bpe_ranks(str(VOCAB_DIR / "vocab.bpe"), str(VOCAB_DIR / "encoder.json"))
    fast = tiktoken.Encoding("gpt2-offline", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})
    slow = SlowGPT2Tokenizer(str(VOCAB_DIR / "encoder.json"), str(VOCAB_DIR / "vocab.bpe"))
    ours = GPT2Tokenizer.default()  # builds the character classes once, outside the timings

    corpus = [chunk.replace("<|endoftext|>", "<|end of text|>") for chunk in build_corpus()]
    n_stdlib = len(stdlib_chunks())
    texts = {"whole corpus": "".join(corpus), "code + English prose": "".join(corpus[:n_stdlib]),
             "generated multilingual": "".join(corpus[n_stdlib:])}
    print(f"{'text':24s} {'MB':>5s} {'ours cold':>10s} {'ours warm':>10s} {'tiktoken':>9s} {'pure Py':>8s}"
          f"   cold/tiktoken warm/tiktoken cold/pure-Py")
    for name, text in texts.items():
        expected = fast.encode_ordinary(text)
        assert ours.encode(text) == expected and slow.encode(text, add_special_tokens=False) == expected
        megabytes = len(text.encode("utf-8")) / 1e6
        # interleaved, so that a busy machine slows all three alike; the best of each counts
        times = {"cold": [], "warm": [], "tiktoken": []}
        for _ in range(args.repeats):
            ours._cache.clear()
            times["cold"].append(seconds(lambda: ours.encode(text)))
            times["warm"].append(seconds(lambda: ours.encode(text)))
            times["tiktoken"].append(seconds(lambda: fast.encode_ordinary(text)))
        slow.cache.clear()
        pure = seconds(lambda: slow.encode(text, add_special_tokens=False))
        cold, warm, reference = (min(times[k]) for k in ("cold", "warm", "tiktoken"))
        speeds = [megabytes / s for s in (cold, warm, reference, pure)]
        print(f"{name:24s} {megabytes:5.2f} {speeds[0]:10.2f} {speeds[1]:10.2f} {speeds[2]:9.2f} {speeds[3]:8.2f}"
              f"   {speeds[0] / speeds[2]:13.2f} {speeds[1] / speeds[2]:13.2f} {speeds[0] / speeds[3]:12.1f}")
    print("MB/s of UTF-8, best of", args.repeats, "(pure Python: one run, cold cache). Goals: ours/tiktoken >= 0.25,"
          " ours >= 2x pure Python.")


if __name__ == "__main__":
    main()
