"""Benchmark gpt2.py against transformers' GPT2LMHeadModel on the same weights, in the same run.

    python tests/bench_gpt2.py [--threads N] [--repeats 10]

Two measurements at the full 124M configuration (random weights, seeded; the speed does not depend on them):
a forward pass B=1 T=256 (full logits) and a 32-token greedy generation with the KV cache from a 16-token prompt.
Both libraries run in float32 under torch.inference_mode, after warm-up, alternating run by run, and we print
the median of several runs as ours / transformers. Goals: forward <= 0.8, generation <= 0.6.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gpt2 import GPT  # noqa: E402


def median_seconds(functions, runs, warmup=2):
    """Median time of each function; the runs alternate between them, so a busy machine slows all alike."""
    times = [[] for _ in functions]
    for i in range(warmup + runs):
        for fn, fn_times in zip(functions, times):
            start = time.perf_counter()
            fn()
            if i >= warmup:
                fn_times.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per measurement (median reported)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    reference = GPT2LMHeadModel(GPT2Config()).eval().to(args.device)  # n_layer 12, n_embd 768: gpt2 (124M)
    ours = GPT.from_state_dict(reference.state_dict()).eval().to(args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    generator = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 50257, (1, 256), generator=generator).to(args.device)
    prompt = idx[:, :16]
    print(f"torch {torch.__version__}, {args.threads} threads, device {args.device}, median of {args.repeats} runs")

    with torch.inference_mode():
        difference = (ours(idx) - reference(idx).logits).abs().max().item()
        ours_tokens = ours.generate(prompt, 32, eos_token_id=None)
        reference_tokens = reference.generate(prompt, max_new_tokens=32, do_sample=False, pad_token_id=50256)[:, 16:]
        assert torch.equal(ours_tokens, reference_tokens), "the two generations differ: timing would be unfair"
        print(f"same weights: logits max abs diff {difference:.2e}, 32 greedy tokens identical")

        rows = [("forward B=1 T=256", 0.8, lambda: ours(idx), lambda: reference(idx).logits),
                ("greedy 32 tokens, cache", 0.6, lambda: ours.generate(prompt, 32, eos_token_id=None),
                 lambda: reference.generate(prompt, max_new_tokens=32, do_sample=False, pad_token_id=50256))]
        for name, goal, ours_fn, reference_fn in rows:
            ours_s, reference_s = median_seconds([lambda: (ours_fn(), sync()), lambda: (reference_fn(), sync())],
                                                 args.repeats)
            ratio = ours_s / reference_s
            verdict = "meets" if ratio <= goal else "MISSES"
            print(f"{name:26s} ours {ours_s * 1e3:8.1f} ms  transformers {reference_s * 1e3:8.1f} ms  "
                  f"ratio {ratio:.2f} ({verdict} goal <= {goal})")


if __name__ == "__main__":
    main()
