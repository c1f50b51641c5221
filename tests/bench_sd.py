"""Benchmark: our SD 1.5 UNet and VAE against diffusers' on the same weights, in the same run.

    python tests/bench_sd.py                  # one UNet step (fp32, B=2, 32x32 latent), one 256x256 VAE decode
    python tests/bench_sd.py --device cuda --precision fp16 --size 64   # 512x512 on a GPU

Both models hold the same random weights: ours, written in the official single-file layout and read into
diffusers by its own converter (tests/sd_oracle.py). Runs alternate ours / diffusers and the best of
`--repeats` is reported, which keeps the ratio fair on a machine shared with other work.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
import sd_oracle as so  # noqa: E402
import unet as unet_lib  # noqa: E402
import vae as vae_lib  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_times(fns, repeats, device):
    """Alternate the functions, `repeats` timed rounds after one warm-up round; the best wall-clock time and
    the best process CPU time of each (on a CPU shared with other jobs, CPU time is the steadier measure)."""
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


def move(model, device, dtype):
    """On CPU in float32 both models keep sharing one copy of the weights."""
    return model if (device.type, dtype) == ("cpu", torch.float32) else model.to(device, dtype)


def report(name, times, device):
    (ours, ref), (ours_cpu, ref_cpu) = times
    print(f"{name:<26} wall: ours {ours * 1000:8.1f} ms, diffusers {ref * 1000:8.1f} ms, ours/diffusers "
          f"{ours / ref:.2f}" + (f"   CPU time: ours/diffusers {ours_cpu / ref_cpu:.2f}" if device.type == "cpu" else ""))


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or mps")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                        help="weights and activations")
    parser.add_argument("--batch-size", type=int, default=2, help="batch size of the UNet step")
    parser.add_argument("--size", type=int, default=32, help="latent side (image side / 8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per model (best is kept)")
    parser.add_argument("--only", choices=["unet", "vae"], default=None, help="benchmark one network only")
    args = parser.parse_args()
    if args.size % 8 or args.batch_size < 1 or args.repeats < 1:
        parser.error("--size must be a multiple of 8, --batch-size and --repeats positive")
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {device}, {args.precision}, {torch.get_num_threads()} threads")

    if args.only in (None, "unet"):
        ours = so.build(unet_lib.UNetModel, unet_lib.PRESETS["sd15"])
        ref = so.diffusers_unet(so.single_file_state(unet=ours))
        ours, ref = move(ours, device, dtype), move(ref, device, dtype)
        x = torch.randn(args.batch_size, 4, args.size, args.size, generator=gen).to(device, dtype)
        t = torch.full((args.batch_size,), 500, device=device)
        context = torch.randn(args.batch_size, 77, 768, generator=gen).to(device, dtype)
        times = best_times([lambda: ours(x, t, context), lambda: ref(x, t, encoder_hidden_states=context)],
                           args.repeats, device)
        report(f"UNet step B={args.batch_size} {args.size}x{args.size}", times, device)
        del ours, ref

    if args.only in (None, "vae"):
        ours = so.build(vae_lib.AutoencoderKL, vae_lib.PRESETS["sd15"])
        ref = so.diffusers_vae(so.single_file_state(vae=ours))
        ours, ref = move(ours, device, dtype), move(ref, device, dtype)
        z = torch.randn(1, 4, args.size, args.size, generator=gen).to(device, dtype)
        times = best_times([lambda: ours.decode(z), lambda: ref.decode(z)], args.repeats, device)
        report(f"VAE decode {args.size * 8}x{args.size * 8}", times, device)


if __name__ == "__main__":
    main()
