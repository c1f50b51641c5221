"""Benchmark: our CLIP ViT-B/32 in fp32 and in low precision against transformers' CLIPModel in fp32, on the same
(random) weights, in the same run; with this machine's roofline and the low-precision quality.

    python tests/bench_clip.py [--batch-size 8] [--repeats 10] [--device cpu] [--precision bf16]

Image encode (B, 3, 224, 224) and text encode (B, 77): transformers fp32, ours fp32, ours in --precision (the
weights cast, as clip.py --precision casts them), timed in turns (one call of each, again and again) so that load
from other processes hits all alike; the best of --repeats calls counts. Printed: ours in --precision over
transformers' fp32 and over ours in fp32 (goal for the image encode on a CPU with AMX: <= 0.50x ours in fp32),
each fp32 time as a fraction of this machine's fp32 GEMM peak (tests/roofline.py: FLOPs counted by torch's
FlopCounterMode / time / peak), and the cosine between the embeddings in --precision and in fp32 (goal >= 0.999).
Then ClipCap-style captioning throughput, images/s: this tower, an MLP mapper and GPT-2 124M (gpt2.Captioner, random
weights) write 20 greedy tokens for each of --batch-size images, in fp32 and in --precision, as generate.py runs it.
"""
import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPModel

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
import clip  # noqa: E402
import gpt2  # noqa: E402
import roofline  # noqa: E402
from conftest import clip_vitb32_config  # noqa: E402
from vit import PRECISIONS  # noqa: E402


def best_seconds(functions, repeats, device, warmup=2):
    """Best time of each function; the calls alternate between them, so a busy machine slows all alike."""
    best = [float("inf")] * len(functions)
    for i in range(warmup + repeats):
        for k, fn in enumerate(functions):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                best[k] = min(best[k], time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8, help="images / texts per call")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per model (the best counts)")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16"], help="the low precision, "
                        "compared with fp32")
    args = parser.parse_args()
    if args.batch_size < 1 or args.repeats < 1:
        parser.error("--batch-size and --repeats must be positive")
    device, dtype = torch.device(args.device), PRECISIONS[args.precision]
    print(roofline.describe())
    gemm32, gemm16, _ = roofline.measure()

    torch.manual_seed(0)
    theirs = CLIPModel(clip_vitb32_config()).eval()
    ours = clip.CLIP.from_state_dict(theirs.state_dict()).eval()
    half = copy.deepcopy(ours).to(device, dtype)
    theirs, ours = theirs.to(device), ours.to(device)
    print(f"device {device}, batch {args.batch_size}, best of {args.repeats} calls, transformers attention: "
          f"{theirs.config._attn_implementation}")

    images = torch.randn(args.batch_size, 3, 224, 224, device=device)
    tokens = torch.randint(1, 49406, (args.batch_size, 77), device=device)
    tokens[:, 0], tokens[:, -1] = 49406, 49407
    names = ["transformers fp32", "ours fp32", f"ours {args.precision}"]
    with torch.inference_mode():
        diff = (ours.encode_image(images) - theirs.get_image_features(pixel_values=images).pooler_output).abs().max()
        print(f"same weights: image embedding max abs diff {diff.item():.2e}")
        for row, calls, goal in (
                (f"image encode B={args.batch_size}", [lambda: theirs.get_image_features(pixel_values=images),
                                                       lambda: ours.encode_image(images),
                                                       lambda: half.encode_image(images)], 0.50),
                (f"text encode B={args.batch_size}", [lambda: theirs.get_text_features(input_ids=tokens),
                                                      lambda: ours.encode_text(tokens),
                                                      lambda: half.encode_text(tokens)], None)):
            flops = roofline.flops(calls[1])
            times = best_seconds(calls, args.repeats, device)
            print(f"{row}: {flops / 1e9:.1f} GFLOP")
            for name, seconds in zip(names, times):
                peak, kind = (gemm16, args.precision) if args.precision in name else (gemm32, "fp32")
                print(f"  {name:18s} {seconds * 1e3:8.1f} ms  {flops / seconds / 1e9:5.0f} GFLOPS = "
                      f"{flops / seconds / 1e9 / peak:4.0%} of the {kind} GEMM peak")
            ref, ours_s, half_s = times
            verdict = "" if goal is None else f" ({'meets' if half_s / ours_s <= goal else 'MISSES'} goal <= {goal:.2f})"
            print(f"  ours {args.precision} / transformers fp32 {half_s / ref:.2f};  ours {args.precision} / ours fp32 "
                  f"{half_s / ours_s:.2f}{verdict};  ours fp32 / transformers fp32 {ours_s / ref:.2f}")
            expected, got = calls[1]().float(), calls[2]().float()
            cosine = F.cosine_similarity(got, expected, dim=-1).min().item()
            print(f"  quality: embeddings in {args.precision} vs fp32, lowest cosine of {args.batch_size}: {cosine:.5f} "
                  f"({'meets' if cosine >= 0.999 else 'MISSES'} goal >= 0.999)")

        captioner = gpt2.Captioner(gpt2.CaptionerConfig(), gpt2.GPT(gpt2.GPTConfig()), ours.visual).eval()
        captioners = [captioner.to(device), copy.deepcopy(captioner).to(device, dtype)]
        for model in captioners:
            model.gpt.decoding_layout()  # as generate.py decodes captions

        def caption(model):  # Captioner.generate without the end token: every caption 20 tokens long
            return lambda: model.gpt.generate(None, 20, prefix_embeds=model.prefix(images), eos_token_id=None)

        times = best_seconds([caption(model) for model in captioners], max(1, args.repeats // 3), device)
        print(f"captioning {args.batch_size} images, 20 greedy tokens each (ViT-B/32, MLP mapper, GPT-2 124M): "
              f"fp32 {args.batch_size / times[0]:.2f} images/s, {args.precision} {args.batch_size / times[1]:.2f} "
              f"images/s ({times[1] / times[0]:.2f}x the fp32 time)")


if __name__ == "__main__":
    main()
