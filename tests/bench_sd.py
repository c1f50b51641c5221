"""Benchmark: our SD 1.5 UNet, VAE and whole text-to-image run in low precision and in fp32, against diffusers' in
fp32, on the same weights, in the same run; with this machine's roofline and the low-precision quality.

    python tests/bench_sd.py                      # bf16 on the CPU: UNet step, VAE decode, a whole 512x512 image
    python tests/bench_sd.py --only unet          # one part: unet, vae or image
    python tests/bench_sd.py --device cuda --precision fp16

- UNet: one guided step, B=2 (the prompt and the empty prompt) at --size x --size latents (64: a 512x512 image):
  diffusers fp32, ours fp32, ours in --precision (channels-last, as for speed). Goal on a CPU with AMX: ours in
  bf16 <= 0.40x diffusers' fp32 time.
- VAE: one decode of --size latents to an image 8x larger.
- image: a whole --steps image (CLIP ViT-L/14's text tower, guided DDIM over the UNet, the VAE decode) at --size in
  --precision, timed from prompt to pixels; beside it diffusers' and our fp32 time for the same image, extrapolated
  from the step and decode times above (a full fp32 run takes half an hour). Quality: the same seed in fp32 and in
  --precision at --quality-size latents, PSNR in dB (goal >= 25; at --quality-size 64 the fp32 run is ~10 minutes).

Every network holds random weights (tests/sd_oracle.py's random_init_, activations O(1) through the stack),
written in the official single-file layout and read into diffusers by its own converter. Times are the best of
--repeats rounds after a warm-up round, the models alternating, wall clock and process CPU time (the steadier
measure on a shared machine). Each fp32 time is also given as a fraction of this machine's fp32 GEMM peak
(tests/roofline.py): FLOPs counted by torch's FlopCounterMode / time / peak.
Takes about 9 minutes on 2 idle cores of a Xeon with AMX (UNet 3, VAE 1.5, image 1.5 + quality 3).
"""
import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
import clip  # noqa: E402
import ddpm  # noqa: E402
import roofline  # noqa: E402
import sd_oracle as so  # noqa: E402
import unet as unet_lib  # noqa: E402
import vae as vae_lib  # noqa: E402
from tokenizer import CLIPTokenizer  # noqa: E402
from vit import PRECISIONS  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_times(fns, repeats, device):
    """Alternate the functions, `repeats` timed rounds after one warm-up round; the best wall-clock time and the
    best process CPU time of each."""
    best_wall, best_cpu = [float("inf")] * len(fns), [float("inf")] * len(fns)
    for round_ in range(repeats + 1):
        for i, fn in enumerate(fns):
            sync(device)
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            if round_:
                best_wall[i] = min(best_wall[i], time.perf_counter() - wall)
                best_cpu[i] = min(best_cpu[i], time.process_time() - cpu)
    return best_wall, best_cpu


def low_precision(model, device, dtype):
    """The copy the pipeline runs: weights in dtype, convolutions channels-last (oneDNN's AMX kernels and cuDNN's
    tensor-core kernels read NHWC; measured here: a bf16 UNet step 1.4x, a bf16 VAE decode 3x faster than NCHW)."""
    return model.to(device, dtype, memory_format=torch.channels_last)


def counted_flops(build, *shapes):
    """FLOPs of one call, counted on the meta device (no memory, no time)."""
    with torch.device("meta"):
        model, inputs = build(), [torch.empty(s) for s in shapes]
    return roofline.flops(lambda: model(*inputs))


def report(name, flops, wall, cpu, names, peaks, precision):
    """One line per model, then the ratios the issue asks for: ours in low precision over the reference in fp32
    and over ours in fp32, and every fp32 time as a fraction of the fp32 GEMM peak."""
    print(f"{name}: {flops / 1e9:,.0f} GFLOP")
    for label, w, c in zip(names, wall, cpu):
        peak = peaks[1] if precision in label else peaks[0]
        print(f"  {label:20s} {w:8.2f} s  (CPU {c:7.2f} s)  {flops / w / 1e9:6.0f} GFLOPS = {flops / w / 1e9 / peak:4.0%} "
              f"of the {'bf16' if precision in label else 'fp32'} GEMM peak")
    (ref, ours, half), (ref_cpu, ours_cpu, half_cpu) = wall, cpu
    print(f"  ours {precision} / diffusers fp32 {half / ref:.2f} (CPU time {half_cpu / ref_cpu:.2f});  "
          f"ours {precision} / ours fp32 {half / ours:.2f};  ours fp32 / diffusers fp32 {ours / ref:.2f}")


def psnr(image, reference):
    mse = ((image.float().clamp(-1, 1) - reference.float().clamp(-1, 1)) ** 2).mean()
    return (10 * torch.log10(4 / mse)).item()


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or mps")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16"], help="the low precision, "
                        "compared with fp32")
    parser.add_argument("--batch-size", type=int, default=2, help="batch of the UNet step (2: one guided image)")
    parser.add_argument("--size", type=int, default=64, help="latent side (image side / 8)")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds per model (best is kept)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps of the whole image")
    parser.add_argument("--quality-size", type=int, default=32, help="latent side of the fp32-vs-low-precision "
                        "image (0: skip it)")
    parser.add_argument("--only", choices=["unet", "vae", "image"], default=None, help="benchmark one part only")
    args = parser.parse_args()
    if args.size % 8 or args.quality_size % 8 or min(args.batch_size, args.repeats, args.steps, args.threads) < 1:
        parser.error("--size and --quality-size must be multiples of 8; --batch-size, --repeats, --steps and "
                     "--threads positive")
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), PRECISIONS[args.precision]
    gen = torch.Generator().manual_seed(0)
    print(roofline.describe())
    peaks = roofline.measure()
    names = ["diffusers fp32", "ours fp32", f"ours {args.precision}"]
    B, h = args.batch_size, args.size

    unet = so.build(unet_lib.UNetModel, unet_lib.PRESETS["sd15"]).to(device)  # fp32, shared with diffusers'
    text = clip.CLIPTextTransformer(clip.PRESETS["ViT-L/14"].text).eval().to(device)  # SD 1.x's text tower
    step_times = {}
    if args.only in (None, "unet"):
        ref = so.diffusers_unet(so.single_file_state(unet=unet))
        half = low_precision(unet_lib.UNetModel.from_state_dict(unet.state_dict(), prefix="", dtype=dtype), device,
                             dtype)
        x = torch.randn(B, 4, h, h, generator=gen).to(device)
        t = torch.full((B,), 500, device=device)
        context = torch.randn(B, 77, 768, generator=gen).to(device)
        wall, cpu = best_times([lambda: ref(x, t, encoder_hidden_states=context), lambda: unet(x, t, context),
                                lambda: half(x, t, context)], args.repeats, device)
        flops = counted_flops(lambda: unet_lib.UNetModel(unet_lib.PRESETS["sd15"]), (B, 4, h, h), (B,), (B, 77, 768))
        report(f"UNet step, B={B}, {h}x{h} latents", flops, wall, cpu, names, peaks, args.precision)
        print(f"  goal: ours {args.precision} <= 0.40x diffusers fp32: {'meets' if wall[2] / wall[0] <= 0.4 else 'MISSES'}"
              f"; eps in {args.precision} vs fp32: max relative difference "
              f"{so.max_rel_diff(half(x, t, context), unet(x, t, context)):.3f}")
        step_times = dict(zip(names, wall))
        del ref, half

    vae = so.build(vae_lib.AutoencoderKL, vae_lib.PRESETS["sd15"]).to(device)
    decode_times = {}
    if args.only in (None, "vae"):
        ref = so.diffusers_vae(so.single_file_state(vae=vae))
        half = low_precision(vae_lib.AutoencoderKL.from_state_dict(vae.state_dict(), prefix="", dtype=dtype), device,
                             dtype)
        z = torch.randn(1, 4, h, h, generator=gen).to(device)
        wall, cpu = best_times([lambda: ref.decode(z), lambda: vae.decode(z), lambda: half.decode(z)], args.repeats,
                               device)
        flops = counted_flops(lambda: vae_lib.AutoencoderKL(vae_lib.PRESETS["sd15"]).decode, (1, 4, h, h))
        report(f"VAE decode, {8 * h}x{8 * h}", flops, wall, cpu, names, peaks, args.precision)
        quality = psnr(half.decode(z), vae.decode(z))
        print(f"  {args.precision} vs fp32 image: PSNR {quality:.1f} dB (goal >= 35: {'meets' if quality >= 35 else 'MISSES'})")
        decode_times = dict(zip(names, wall))
        del ref, half

    if args.only in (None, "image"):
        tokenizer, diffusion = CLIPTokenizer.default(), ddpm.GaussianDiffusion(ddpm.PRESETS["sd15"])
        tokens = tokenizer.tokenize([PROMPT, ""], pad="eot").to(device)  # SD 1.x pads with end-of-text
        models = {"fp32": (unet, vae, text)}

        def draw(precision, size):
            """Prompt -> (1, 3, 8 size, 8 size) in [-1, 1]: what generate.py does, in `precision`."""
            unet, vae, text = models[precision]
            context, uncond = text(tokens).chunk(2)  # (1, 77, 768) each
            noise = ddpm.randn((1, 4, size, size), torch.Generator().manual_seed(1), device)
            denoise = ddpm.classifier_free_guidance(unet, context, uncond, guidance_scale=7.5)
            latents = diffusion.sample(denoise, noise, "ddim", args.steps)  # the sampler's state stays fp32
            return vae.decode_latents(latents)

        models[args.precision] = (
            low_precision(unet_lib.UNetModel.from_state_dict(unet.state_dict(), prefix="", dtype=dtype), device, dtype),
            low_precision(vae_lib.AutoencoderKL.from_state_dict(vae.state_dict(), prefix="", dtype=dtype), device,
                          dtype),
            copy.deepcopy(text).to(dtype))
        draw(args.precision, 8)  # warm-up: oneDNN builds its kernels
        start = time.perf_counter()
        draw(args.precision, h)
        minutes = (time.perf_counter() - start) / 60
        text_seconds = roofline.best_seconds(lambda: text(tokens), 1)
        print(f"whole image, {8 * h}x{8 * h}, {args.steps} guided DDIM steps: ours {args.precision} {minutes:.1f} min "
              "(measured)", end="")
        for name in names[:2]:
            if name in step_times and name in decode_times:
                estimate = (text_seconds + args.steps * step_times[name] + decode_times[name]) / 60
                print(f", {name} {estimate:.1f} min (extrapolated: text + {args.steps} steps + decode)", end="")
        print()
        if args.quality_size:
            image, expected = draw(args.precision, args.quality_size), draw("fp32", args.quality_size)
            quality, clipped = psnr(image, expected), (expected.abs() >= 1).float().mean().item()
            print(f"  {args.precision} vs fp32, same seed, {8 * args.quality_size}x{8 * args.quality_size}: PSNR "
                  f"{quality:.1f} dB (goal >= 25: {'meets' if quality >= 25 else 'MISSES'}); {clipped:.0%} of the fp32 "
                  "image's pixels at the clamp (random weights)")


if __name__ == "__main__":
    main()
