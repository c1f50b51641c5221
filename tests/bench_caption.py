"""Benchmark: one training step of the COCO captioner at full size (GPT-2 124M, ClipCap MLP mapper, prefix 10,
batch 40, cached ViT-B/32 embeddings), random weights. Run as a script: python tests/bench_caption.py

Prints training pairs per second and memory, ours against the ClipCap way on the same weights in the same run
(transformers' GPT2LMHeadModel fed the prefix through inputs_embeds, logits at every position, cross-entropy with
the padding ignored), and the ViT-B/32 embedding rate the feature cache is built at. On a GPU the process is capped at
6 GB (torch.cuda.set_per_process_memory_fraction) and runs bf16 autocast; on a CPU it runs fp32 and reports the
process's peak resident memory.

python tests/bench_caption.py --memory times nothing: it counts the peak tensor memory of one training step of the
coco preset as train.py takes it (bf16 autocast, fused AdamW, gradient clipping), by kind, on fake tensors (shapes and
dtypes, no data, no arithmetic), for this batch and for a batch of the longest captions train.py keeps, prints it
against 6 GB, and checks the count against the same step run for real on the CPU; on a machine with CUDA it also runs
the step on the GPU and prints torch.cuda.max_memory_allocated() beside the estimate.

python tests/bench_caption.py --captioning times captioning instead (issue 17's goal: ours <= 0.7 of the reference's
time on a CPU): images/s of image -> CLIP ViT-B/32 -> ClipCap's MLP mapper -> greedy decoding with the KV cache, a
batch of 16, ours (a Captioner configured as ClipCap's released files load) against the same pipeline built from
transformers (CLIPModel.get_image_features, the same mapper, GPT2LMHeadModel.generate with inputs_embeds), on the
same random weights; a random GPT-2 never says ".", so both decode all 67 tokens, and they must agree on every one.
It prints the machine's load average beside the figures (a shared machine slows both)."""
import argparse
import contextlib
import dataclasses
import resource
import sys
import time
import types
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
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


# -----------------------------------------------------------------------------------------------------------------
# --memory: the peak memory of one training step, counted without a GPU
#
# Fake tensors (torch._subclasses.fake_tensor) carry shapes, dtypes and storage sizes but no data, so a step on them
# allocates nothing and computes nothing, and a dispatch mode above them sees every tensor a real step would make.
# They are CPU tensors here, under CPU autocast: torch 2.13 runs no backward on fake CUDA tensors without a GPU. In a
# CPU-only build autograd finds no CUDA device guard (FakeTensorMode's no-op one, c10's ensureCUDADeviceGuardSet,
# only replaces a guard a CUDA build registered), and a CUDA build without a device stops in the autograd engine
# (hasPrimaryContext: no valid device index). CPU autocast casts the same ops of this step as CUDA autocast does: under
# torch 2.13.0+cu130 the forward on fake CUDA and on fake CPU tensors makes the same tensors, op for op, in the same
# dtypes and shapes, except attention (fake CUDA without a device falls back to the plain math kernel; a GPU, like
# the CPU, runs a fused kernel that keeps the output and an fp32 log-sum-exp per row for backward, the GPU's padded
# to 32 rows: a few MiB apart at most over GPT-2's 12 layers).

GiB, MiB = 2**30, 2**20
BUDGET = 6 * GiB  # the GPU the README promises training on
CUDA_BLOCK = 512  # the CUDA caching allocator hands out whole 512-byte blocks (kMinBlockSize in
# c10/cuda/CUDACachingAllocator.cpp) and torch.cuda.memory_allocated counts the blocks: each storage is rounded up
CUDA_CONTEXT = 512 * MiB  # assumed, not counted: what a process holds on the GPU besides its tensors. The CUDA
# context (loaded kernels, runtime state) takes a few hundred MiB with lazy loading, the default on Linux since CUDA
# 12.2 (NVIDIA, CUDA programming guide, "Lazy Loading"), ~700 MiB or more without it (PyTorch forum,
# discuss.pytorch.org/t/high-gpu-memory-overhead/81330); cuBLAS(Lt) adds a 1-32 MiB workspace per handle and
# stream (aten/src/ATen/cuda/CUDABlas.cpp, pytorch/pytorch#120925)
MADE_IN = {"before the step": "batch and buffers", "forward": "activations", "backward": "backward temporaries",
           "optimizer step": "optimizer temporaries"}  # what a storage is, by the phase that made it
KINDS = ("parameters", "gradients", "optimizer state", "autocast copies of weights", "activations",
         "backward temporaries", "optimizer temporaries", "batch and buffers")
aten = torch.ops.aten


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every tensor storage from the op that makes it until it is freed (a weakref finalizer),
    and keeps, for each phase of the step, the most that was alive at once and what it was. This is how
    torch.distributed._tools.mem_tracker.MemTracker counts, in a form small enough to read, each storage rounded up
    to whole `block`s as an allocator rounds it. It sees what ops return, not the scratch a kernel allocates and
    frees inside itself.

    What a storage is: named(), a function, says which storages are parameters, gradients and optimizer state at
    that moment (a gradient is a temporary of backward until AccumulateGrad makes it p.grad); the autocast casts of
    parameters are named apart; any other storage is what the phase that made it makes (MADE_IN).

    A fake tensor has no values, so a boolean mask cannot say how many elements it selects: true_counts maps a mask's
    shape to its number of True elements (known from the real batch), and indexing with the mask becomes indexing
    with that many positions, which makes tensors of the real op's shapes."""

    def __init__(self, named, block=1, true_counts=None):
        super().__init__()
        self.named, self.block, self.true_counts = named, block, true_counts
        self.live, self.total, self.phase = {}, 0, "before the step"  # live: storage -> (bytes, kind)
        self.peaks = {}  # phase -> (most bytes alive at once, {kind: bytes} then)

    def track(self, tensor, kind=None):
        storage = tensor.untyped_storage()
        key = storage._cdata  # the C++ storage, which views and in-place results share
        if key not in self.live:
            nbytes = -(-storage.nbytes() // self.block) * self.block
            self.live[key] = (nbytes, kind or MADE_IN[self.phase])
            self.total += nbytes
            weakref.finalize(storage, self.free, key)

    def free(self, key):
        self.total -= self.live.pop(key)[0]

    @property
    def peak(self):
        return max(total for total, _ in self.peaks.values())

    def by_kind(self):
        named, kinds = self.named(), dict.fromkeys(KINDS, 0)
        for key, (nbytes, kind) in self.live.items():
            kinds[named.get(key, kind)] += nbytes
        return kinds

    def positions(self, indices):
        """The boolean masks in `indices` -> for each, one index tensor per mask dimension, true_counts[shape] long."""
        out = []
        for index in indices:
            if index is not None and index.dtype == torch.bool:
                count = self.true_counts[tuple(index.shape)]  # a KeyError here: a mask the caller did not count
                out += [torch.zeros(count, dtype=torch.long, device=index.device)] * index.dim()
            else:
                out.append(index)
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.true_counts is not None and func is aten.index.Tensor:
            args = (args[0], self.positions(args[1]), *args[2:])
        out = func(*args, **(kwargs or {}))
        casts_parameter = (func is aten._to_copy.default
                           and self.named().get(args[0].untyped_storage()._cdata) == "parameters")
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.track(tensor, "autocast copies of weights" if casts_parameter else None)
        if self.total > self.peaks.get(self.phase, (0,))[0]:
            self.peaks[self.phase] = (self.total, self.by_kind())
        return out


def named_storages(model, optimizer):
    """A function: {storage: kind} of the parameters, their gradients and AdamW's state as they are when called."""
    def named():
        names = {}
        for p in model.parameters():
            names[p.untyped_storage()._cdata] = "parameters"
            if p.grad is not None:
                names[p.grad.untyped_storage()._cdata] = "gradients"
        for state in optimizer.state.values():
            names.update({t.untyped_storage()._cdata: "optimizer state" for t in state.values() if torch.is_tensor(t)})
        return names
    return named


def coco_captioner(cfg):
    """train.py's captioner for the coco preset (CaptionTask.build), random weights: the tower's features are cached,
    so the model that trains is Captioner(MLP mapper 512 -> 10 x 768, GPT-2 124M) without a tower."""
    return Captioner(CaptionerConfig(VISION_PRESETS["ViT-B/32"].embed_dim, cfg.prefix_length, cfg.mapping_type,
                                     cfg.prefix_length, cfg.mapper_layers), GPT(PRESETS[cfg.language_model]))


def coco_config():
    """The coco preset's flags as train.py resolves them (the harness's and the caption task's), one namespace."""
    harness, caption = train.configs("caption", train.PRESETS["caption"]["coco"])
    return types.SimpleNamespace(**dataclasses.asdict(harness), **dataclasses.asdict(caption))


def adamw(model, cfg):
    """The optimizer as train.py's train() makes it: AdamW, fused, weight decay on matrices only."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for p in trainable if p.dim() >= 2]},
                              {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}],
                             lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


def training_step(model, optimizer, inputs, num_targets, cfg, dtype, counter):
    """One step of train.py's loop for one process without accumulation: the loss over the batch's targets under
    autocast, backward (train.py's GradScaler scales in fp16 only), clipping, AdamW, gradients set to None."""
    counter.phase = "forward"
    with torch.autocast(inputs[0].device.type, dtype, enabled=dtype != torch.float32):
        loss = model(*inputs) / num_targets
    counter.phase = "backward"
    loss.backward()
    counter.phase = "optimizer step"
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def longest_batch(B, T, generator):
    """A batch of the longest captions train.py keeps (--max-caption-tokens each): the most a step can hold."""
    tokens = torch.randint(0, 50256, (B, T), generator=generator)
    return torch.randn(B, 512, generator=generator).half(), tokens, torch.ones(B, T, dtype=torch.bool)


def count_step(build_model, cfg, tensors, dtype, fake, device=torch.device("cpu"), block=CUDA_BLOCK):
    """One training step of build_model(cfg) on the batch `tensors` (image embeddings, tokens, token mask, on the
    CPU), counted on `device`: (LiveBytes after the step, and on a GPU torch.cuda.max_memory_allocated over the step,
    else None). The step counted is the second: AdamW makes its state in the first, and every later step has it.
    fake: fake tensors, built on the meta device and given fake storage by to_empty (an initialiser cannot run on a
    fake tensor, and none needs to: nothing is computed); else real tensors."""
    embeds, tokens, mask = tensors
    num_targets = int(mask.sum()) + tokens.size(0)  # every caption token and the end-of-text after it
    true_counts = {(tokens.size(0), tokens.size(1) + 1): num_targets} if fake else None  # Captioner's is_target
    with torch.device("meta") if fake else contextlib.nullcontext():
        model = build_model(cfg).train()
    with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext():
        model = model.to_empty(device=device) if fake else model.to(device)
        inputs = [torch.empty(t.shape, dtype=t.dtype, device=device) if fake else t.to(device)
                  for t in tensors]
        optimizer = adamw(model, cfg)
        named = named_storages(model, optimizer)
        with LiveBytes(named, block, true_counts) as first:
            training_step(model, optimizer, inputs, num_targets, cfg, dtype, first)
        counter = LiveBytes(named, block, true_counts)
        for tensor in [*model.parameters(), *model.buffers(), *inputs, *tree_leaves(optimizer.state)]:
            if isinstance(tensor, torch.Tensor):
                counter.track(tensor)
        on_gpu = device.type == "cuda" and not fake
        if on_gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with counter:
            training_step(model, optimizer, inputs, num_targets, cfg, dtype, counter)
    return counter, torch.cuda.max_memory_allocated() if on_gpu else None


def memory_report(args):
    """--memory: the coco preset's step counted on fake tensors, printed against 6 GB, checked on a real CPU step."""
    cfg = coco_config()
    typical = batch(args.batch_size, torch.device("cpu"), torch.Generator().manual_seed(0))
    longest = longest_batch(args.batch_size, cfg.max_caption_tokens, torch.Generator().manual_seed(0))
    counter, _ = count_step(coco_captioner, cfg, typical, torch.bfloat16, fake=True)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in coco_captioner(cfg).parameters())
    (B, T), num_targets = typical[1].shape, int(typical[2].sum()) + args.batch_size
    print(f"coco preset, one training step: GPT-2 124M fine-tuned + MLP mapper ({n_params:,} fp32 parameters), "
          f"batch {B} (captions of 8 to 20 tokens: T = {T}, {num_targets} targets), bf16 autocast, fused AdamW, "
          f"clipping. Fake tensors, each storage rounded up to {CUDA_BLOCK}-byte blocks as the CUDA caching allocator "
          f"does. MiB alive at each phase's peak:")
    phases = list(counter.peaks)
    print(f"  {'':28}" + "".join(f"{phase:>16}" for phase in phases))
    for kind in KINDS:
        print(f"  {kind:28}" + "".join(f"{counter.peaks[phase][1][kind] / MiB:16.1f}" for phase in phases))
    print(f"  {'total':28}" + "".join(f"{counter.peaks[phase][0] / MiB:16.1f}" for phase in phases))

    def verdict(peak):
        total = peak + CUDA_CONTEXT
        return (f"peak {peak / MiB:.1f} MiB + {CUDA_CONTEXT / MiB:.0f} MiB = {total / GiB:.2f} GiB: "
                f"{'fits in' if total <= BUDGET else 'does NOT fit in'} 6 GiB, {(BUDGET - total) / GiB:.2f} GiB left")
    print(f"against 6 GiB, with {CUDA_CONTEXT / MiB:.0f} MiB assumed for the CUDA context and cuBLAS workspace; what "
          f"is left must hold the caching allocator's free cached blocks (memory_reserved - memory_allocated: it cuts "
          f"2 MiB and 20 MiB segments into blocks and keeps freed blocks for the next request)")
    print(f"  this batch, bf16 autocast: {verdict(counter.peak)}")
    for name, dtype in (("bf16 autocast", torch.bfloat16), ("fp32 (train.py's default --precision)", torch.float32)):
        longest_counter, _ = count_step(coco_captioner, cfg, longest, dtype, fake=True)
        print(f"  every caption {cfg.max_caption_tokens} tokens (the longest kept), {name}: "
              f"{verdict(longest_counter.peak)}")
    real, _ = count_step(coco_captioner, cfg, typical, torch.bfloat16, fake=False)
    print(f"check: the same count on a real CPU step of this batch (bf16 autocast): peak {real.peak / MiB:.1f} MiB, "
          f"fake {counter.peak / MiB:.1f} MiB, real / fake = {real.peak / counter.peak:.4f}")
    if torch.cuda.is_available():  # a real GPU: the allocator's own figure beside the estimate
        on_gpu, allocated = count_step(coco_captioner, cfg, typical, torch.bfloat16, fake=False,
                                       device=torch.device("cuda"))
        print(f"on {torch.cuda.get_device_name()}, this batch: torch.cuda.max_memory_allocated {allocated / MiB:.1f} "
              f"MiB, counted on the GPU {on_gpu.peak / MiB:.1f} MiB, estimated {counter.peak / MiB:.1f} MiB "
              f"(allocated / estimated = {allocated / counter.peak:.4f}); max_memory_reserved "
              f"{torch.cuda.max_memory_reserved() / MiB:.1f} MiB")


def captioning(args):
    """--captioning: images/s of CLIP + mapper + greedy decoding (KV cache), ours against transformers'."""
    import copy
    import os
    import platform

    from transformers import CLIPModel, GPT2Config, GPT2LMHeadModel

    import clip
    from conftest import clip_vitb32_config
    from gpt2 import FULL_STOP
    from vit import normalize
    torch.manual_seed(0)
    reference_clip = CLIPModel(clip_vitb32_config()).eval()
    tower = VisionTransformer.from_state_dict(clip.to_openai_layout(reference_clip.state_dict()))
    config = CaptionerConfig(512, 10, "mlp", max_caption_tokens=67, eos_token_id=FULL_STOP, beam_rule="clipcap")
    ours = Captioner(config, GPT(PRESETS["gpt2"]), tower).eval()  # what Captioner.from_pretrained("coco") builds
    reference_gpt = GPT2LMHeadModel(GPT2Config()).eval()
    missing, unexpected = reference_gpt.transformer.load_state_dict(ours.gpt.state_dict(), strict=False)
    assert not unexpected and all(k.endswith(("attn.bias", "masked_bias")) for k in missing), missing
    pixels = torch.randint(0, 256, (args.captioning_batch, 3, 224, 224), dtype=torch.uint8)
    outputs = {}

    def run_ours():
        outputs["ours"] = ours.generate(pixels)

    def run_reference():
        with torch.no_grad():
            embedding = reference_clip.get_image_features(pixel_values=normalize(pixels))
            embedding = getattr(embedding, "pooler_output", embedding)  # transformers 5 returns an output object
            prefix = ours.clip_project(embedding)
            outputs["reference"] = reference_gpt.generate(
                inputs_embeds=prefix, attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long),
                max_new_tokens=67, do_sample=False, num_beams=1, eos_token_id=FULL_STOP, pad_token_id=FULL_STOP,
                use_cache=True)
    low = copy.deepcopy(ours).to(torch.bfloat16)  # --precision auto on a CPU with AMX or AVX512-BF16 (vit.py)
    low.gpt.decoding_layout()

    def run_low():
        outputs["bf16"] = low.generate(pixels)
    seconds = timed_steps(run_ours, args.repeats, torch.device("cpu"))
    reference_seconds = timed_steps(run_reference, args.repeats, torch.device("cpu"))
    low_seconds = timed_steps(run_low, args.repeats, torch.device("cpu"))
    got, expected = outputs["ours"], outputs["reference"][:, -outputs["ours"].size(1):]
    agree = torch.equal(got, expected)

    def captions(ids):  # each row up to its first ".", as a caption ends
        return [row[:row.index(FULL_STOP) + 1] if FULL_STOP in row else row for row in ids.tolist()]
    same = sum(a == b for a, b in zip(captions(got), captions(outputs["bf16"])))
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    B = args.captioning_batch
    print(f"captioning, batch {B}, {got.size(1)} tokens each, fp32, {args.threads} threads, {cpu}; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"  ours:         {B / seconds:.2f} images/s ({seconds:.2f} s a batch)")
    print(f"  transformers: {B / reference_seconds:.2f} images/s ({reference_seconds:.2f} s a batch)")
    print(f"  ours in bf16: {B / low_seconds:.2f} images/s ({low_seconds:.2f} s a batch)")
    print(f"  ours / transformers time: {seconds / reference_seconds:.2f} (goal <= 0.7); same tokens: {agree}")
    print(f"  ours in bf16 / transformers in fp32: {low_seconds / reference_seconds:.2f}; ours in bf16 / ours in "
          f"fp32: {low_seconds / seconds:.2f}; captions equal to fp32's: {same} of {B}")
    assert agree, "ours and transformers decoded different tokens"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=40, help="pairs per step (ClipCap: 40)")
    parser.add_argument("--repeats", type=int, default=1, help="timed steps after one warm-up step")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--skip-reference", action="store_true", help="time ours only")
    parser.add_argument("--memory", action="store_true", help="time nothing: count the peak tensor memory of one "
                        "coco training step on fake tensors, against 6 GB, checked on a real CPU step")
    parser.add_argument("--captioning", action="store_true", help="time captioning instead: CLIP + mapper + greedy "
                        "decoding with the KV cache, ours against transformers' (CPU)")
    parser.add_argument("--captioning-batch", type=int, default=16, help="images captioned together (--captioning)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory:
        return memory_report(args)
    if args.captioning:
        return captioning(args)
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
