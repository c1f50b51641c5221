"""Benchmark gpt2.py in fp32 and in low precision against transformers' GPT2LMHeadModel in fp32, same weights,
same run, with this machine's roofline and the low-precision quality.

    python tests/bench_gpt2.py [--precision bf16] [--threads N] [--repeats 10]

At the full 124M configuration (random weights, seeded; the speed does not depend on them):
- a forward pass B=1 T=256 (full logits): compute-bound, given as a fraction of the fp32 GEMM peak;
- a 32-token greedy generation with the KV cache from a 16-token prompt, B=1: it reads every weight once per token,
  so its roof is the memory read rate (tests/roofline.py): time per token against weight bytes / read rate.
Ours runs as gpt2.py's command line runs it (GPT.decoding_layout, the weights' dtype from --precision); every
model under torch.inference_mode, after warm-up, the models alternating run by run; the best of --repeats runs.
Goals: ours fp32 forward <= 0.8x transformers, generation <= 0.6x; ours in bf16 generation <= 0.60x ours in fp32.
Quality: 100 random 16-token prompts, 32 greedy tokens in fp32 and in --precision (batch 100): the first token
equal (goal >= 95 % of prompts), all 32 equal, and each position's argmax on fp32's own continuation equal.
Takes about 2 minutes on 2 idle cores.
"""
import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
import roofline  # noqa: E402
from gpt2 import GPT  # noqa: E402
from vit import PRECISIONS  # noqa: E402


def best_seconds(functions, runs, warmup=2):
    """Best time of each function; the runs alternate between them, so a busy machine slows all alike."""
    best = [float("inf")] * len(functions)
    for i in range(warmup + runs):
        for k, fn in enumerate(functions):
            start = time.perf_counter()
            fn()
            if i >= warmup:
                best[k] = min(best[k], time.perf_counter() - start)
    return best


@torch.inference_mode()
def greedy_agreement(ours, half, prompts, new_tokens=32):
    """(first token equal, all tokens equal, positions equal) of half's greedy decoding against ours (fp32)."""
    expected = ours.generate(prompts, new_tokens, eos_token_id=None)
    got = half.generate(prompts, new_tokens, eos_token_id=None)
    logits = half(torch.cat([prompts, expected], dim=1))[:, prompts.size(1) - 1:-1]  # on fp32's continuation
    return ((got[:, 0] == expected[:, 0]).float().mean().item(), (got == expected).all(dim=1).float().mean().item(),
            (logits.argmax(dim=-1) == expected).float().mean().item())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16"], help="the low precision, compared "
                        "with fp32")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per measurement (best reported)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    if args.threads < 1 or args.repeats < 1:
        parser.error("--threads and --repeats must be positive")
    torch.set_num_threads(args.threads)
    from transformers import GPT2Config, GPT2LMHeadModel

    print(roofline.describe())
    gemm32, gemm16, read = roofline.measure()
    torch.manual_seed(0)
    reference = GPT2LMHeadModel(GPT2Config()).eval().to(args.device)  # n_layer 12, n_embd 768: gpt2 (124M)
    ours = GPT.from_state_dict(reference.state_dict()).eval().to(args.device).decoding_layout()
    half = copy.deepcopy(ours).to(PRECISIONS[args.precision])
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    generator = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 50257, (1, 256), generator=generator).to(args.device)
    prompt = idx[:, :16]
    models = [("transformers fp32", reference), ("ours fp32", ours), (f"ours {args.precision}", half)]
    print(f"device {args.device}, best of {args.repeats} runs")

    with torch.inference_mode():
        difference = (ours(idx) - reference(idx).logits).abs().max().item()
        ours_tokens = ours.generate(prompt, 32, eos_token_id=None)
        reference_tokens = reference.generate(prompt, max_new_tokens=32, do_sample=False, pad_token_id=50256)[:, 16:]
        assert torch.equal(ours_tokens, reference_tokens), "the two generations differ: timing would be unfair"
        print(f"same weights: logits max abs diff {difference:.2e}, 32 greedy tokens identical")
        forward_flops = roofline.flops(lambda: ours(idx))

        def forward(model):
            return lambda: (model(idx), sync())

        def greedy(model):
            if model is reference:
                return lambda: (reference.generate(prompt, max_new_tokens=32, do_sample=False, pad_token_id=50256),
                                sync())
            return lambda: (model.generate(prompt, 32, eos_token_id=None), sync())

        for row, make in (("forward B=1 T=256", forward), ("greedy 32 tokens, cache", greedy)):
            times = best_seconds([make(model) for _, model in models], args.repeats)
            print(row)
            for (name, model), seconds in zip(models, times):
                if make is forward:
                    peak = gemm16 if args.precision in name else gemm32
                    roof = f"{forward_flops / seconds / 1e9:5.0f} GFLOPS = {forward_flops / seconds / 1e9 / peak:4.0%} " \
                           f"of the {'low-precision' if args.precision in name else 'fp32'} GEMM peak"
                    print(f"  {name:20s} {seconds * 1e3:8.1f} ms  {roof}")
                else:
                    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
                    per_token = seconds / 32
                    print(f"  {name:20s} {per_token * 1e3:8.1f} ms a token  reads {weight_bytes / 1e6:4.0f} MB of "
                          f"weights at {weight_bytes / per_token / 1e9:5.1f} GB/s = {weight_bytes / per_token / 1e9 / read:4.0%}"
                          f" of the memory read rate (floor {weight_bytes / read / 1e6:.1f} ms)")
            (ref_s, ours_s, half_s), goal = times, (0.8 if make is forward else 0.6)
            print(f"  ours fp32 / transformers fp32 {ours_s / ref_s:.2f} ({'meets' if ours_s / ref_s <= goal else 'MISSES'}"
                  f" goal <= {goal});  ours {args.precision} / transformers fp32 {half_s / ref_s:.2f};  "
                  f"ours {args.precision} / ours fp32 {half_s / ours_s:.2f}"
                  + (f" ({'meets' if half_s / ours_s <= 0.6 else 'MISSES'} goal <= 0.60)" if make is greedy else ""))

    prompts = torch.randint(0, 50257, (100, 16), generator=torch.Generator().manual_seed(1)).to(args.device)
    first, whole, positions = greedy_agreement(ours, half, prompts)
    print(f"quality, 100 prompts, 32 greedy tokens, {args.precision} vs fp32: first token equal on {first:.0%} of "
          f"prompts ({'meets' if first >= 0.95 else 'MISSES'} goal >= 95 %), all 32 equal on {whole:.0%}, each "
          f"position's argmax on fp32's continuation equal {positions:.1%} (random weights: near-ties everywhere)")


if __name__ == "__main__":
    main()
