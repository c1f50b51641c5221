"""Benchmark: our CLIP ViT-B/32 against transformers' CLIPModel on the same (random) weights, same run.

    python tests/bench_clip.py [--batch-size 8] [--repeats 10] [--device cpu] [--precision fp32]

Image encode (B, 3, 224, 224) and text encode (B, 77), timed interleaved (ours, theirs, ours, ...) so that
load from other processes hits both alike; the median of each is reported with ours / transformers.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import CLIPModel

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
import clip  # noqa: E402
from conftest import clip_vitb32_config  # noqa: E402


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def compare(name, ours, theirs, repeats, device):
    for _ in range(2):  # warm-up: kernel selection, allocator
        ours(), theirs()
    times_ours, times_theirs = [], []
    for _ in range(repeats):
        times_ours.append(timed(ours, device))
        times_theirs.append(timed(theirs, device))
    a, b = statistics.median(times_ours), statistics.median(times_theirs)
    print(f"{name:28s} ours {a * 1000:8.1f} ms   transformers {b * 1000:8.1f} ms   ratio {a / b:.3f}")
    return a / b


def main():
    parser = argparse.ArgumentParser(description="CLIP ViT-B/32 encode speed: ours over transformers.")
    parser.add_argument("--batch-size", type=int, default=8, help="images / texts per call")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per model (median reported)")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                        help="weights and activations of both models")
    args = parser.parse_args()
    if args.batch_size < 1 or args.repeats < 1:
        parser.error("--batch-size and --repeats must be positive")
    device, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16,
                                                "fp16": torch.float16}[args.precision]

    torch.manual_seed(0)
    theirs = CLIPModel(clip_vitb32_config()).eval()
    ours = clip.CLIP.from_state_dict(theirs.state_dict()).eval()
    theirs, ours = theirs.to(device, dtype), ours.to(device, dtype)
    print(f"device {device}, precision {args.precision}, batch {args.batch_size}, threads {torch.get_num_threads()}, "
          f"transformers attention: {theirs.config._attn_implementation}")

    images = torch.randn(args.batch_size, 3, 224, 224, device=device, dtype=dtype)
    tokens = torch.randint(1, 49406, (args.batch_size, 77), device=device)
    tokens[:, 0], tokens[:, -1] = 49406, 49407
    with torch.inference_mode():
        diff = (ours.encode_image(images) - theirs.get_image_features(pixel_values=images).pooler_output).abs().max()
        print(f"same weights check: image embedding max diff {diff.item():.2e}")
        compare(f"image encode B={args.batch_size}", lambda: ours.encode_image(images),
                lambda: theirs.get_image_features(pixel_values=images), args.repeats, device)
        compare(f"text encode B={args.batch_size}", lambda: ours.encode_text(tokens),
                lambda: theirs.get_text_features(input_ids=tokens), args.repeats, device)


if __name__ == "__main__":
    main()
