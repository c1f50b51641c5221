"""Benchmark: one training step of the COCO captioner at full size (GPT-2 124M, ClipCap MLP mapper, prefix 10,
batch 40, cached ViT-B/32 embeddings), random weights. Run as a script: python tests/bench_caption.py

Prints training pairs per second and memory, ours against the ClipCap way on the same weights in the same run
(transformers' GPT2LMHeadModel fed the prefix through inputs_embeds, logits at every position, cross-entropy with
the padding ignored), and the ViT-B/32 embedding rate the feature cache is built at. On a GPU the process is capped at
6 GB (torch.cuda.set_per_process_memory_fraction) and runs bf16 autocast; on a CPU it runs fp32 and reports the
process's peak resident memory."""
import argparse
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gpt2 import GPT, PRESETS, Captioner, CaptionerConfig  # noqa: E402
from vit import VISION_PRESETS, VisionTransformer  # noqa: E402


def batch(B, device, generator):
    lengths = torch.randint(8, 21, (B,), generator=generator)  # COCO captions: about 10 to 20 GPT-2 tokens
    T = int(lengths.max())
    tokens = torch.randint(0, 50256, (B, T), generator=generator)
    mask = torch.arange(T)[None] < lengths[:, None]
    return torch.randn(B, 512, generator=generator).half().to(device), tokens.to(device), mask.to(device)


def timed_steps(step, steps, device):
    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=40, help="pairs per step (ClipCap: 40)")
    parser.add_argument("--repeats", type=int, default=1, help="timed steps after one warm-up step")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--skip-reference", action="store_true", help="time ours only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, 6 * 2**30 / total), device)
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    torch.manual_seed(0)
    gpt = GPT(PRESETS["gpt2"])
    model = Captioner(CaptionerConfig(prefix_size=512, prefix_length=10), gpt).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)
    generator = torch.Generator().manual_seed(0)
    embeds, tokens, mask = batch(args.batch_size, device, generator)
    n_targets = int(mask.sum()) + args.batch_size

    def ours():
        with torch.autocast(**autocast):
            loss = model(embeds, tokens, mask) / n_targets
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = timed_steps(ours, args.repeats, device)
    memory = (f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (capped at 6 GB)"
              if device.type == "cuda" else
              f"peak process memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    print(f"ours: {args.batch_size / seconds:.1f} pairs/s ({seconds:.2f} s/step, {device}), {memory}; "
          f"one COCO epoch (591,753 pairs) would take {591753 / (args.batch_size / seconds) / 60:.0f} min")
    if not args.skip_reference:
        from transformers import GPT2Config, GPT2LMHeadModel
        reference = GPT2LMHeadModel(GPT2Config()).to(device).train()
        reference.config.use_cache = False
        missing, unexpected = reference.transformer.load_state_dict(gpt.state_dict(), strict=False)
        assert not unexpected and all(k.endswith("attn.bias") or k.endswith("masked_bias") for k in missing), missing
        reference_optimizer = torch.optim.AdamW(list(reference.parameters()) + list(model.clip_project.parameters()),
                                                lr=2e-5)
        P = 10

        def clipcap():  # CLIP_prefix_caption train.py: logits for every position, padding ignored by the mask
            with torch.autocast(**autocast):
                prefix = model.clip_project(embeds.float())
                inputs = torch.cat([prefix, reference.transformer.wte(tokens)], dim=1)
                attention = torch.cat([torch.ones_like(mask[:, :1]).expand(-1, P), mask], dim=1).long()
                logits = reference(inputs_embeds=inputs, attention_mask=attention).logits[:, P - 1:-1]
                targets = tokens.masked_fill(~mask, -100)
                loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))
            loss.backward()
            reference_optimizer.step()
            reference_optimizer.zero_grad(set_to_none=True)

        reference_seconds = timed_steps(clipcap, args.repeats, device)
        print(f"ClipCap way (transformers, every position's logits): {args.batch_size / reference_seconds:.1f} pairs/s"
              f" ({reference_seconds:.2f} s/step); ours / reference time: {seconds / reference_seconds:.2f}")
    tower = VisionTransformer(VISION_PRESETS["ViT-B/32"]).to(device).eval()
    images = torch.randn(args.batch_size, 3, 224, 224, device=device)
    with torch.no_grad(), torch.autocast(**autocast):
        seconds = timed_steps(lambda: tower(images), args.repeats, device)
    print(f"feature cache: ViT-B/32 embeds {args.batch_size / seconds:.1f} images/s; COCO train2017 (118,287 images) "
          f"in {118287 / (args.batch_size / seconds) / 60:.0f} min")


if __name__ == "__main__":
    main()
