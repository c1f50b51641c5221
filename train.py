"""Training minimodal's models: the image captioner (`--task caption`) and text-to-image models (`--task diffusion`).

The captioner is ClipCap (Mokady et al. 2021, "ClipCap: CLIP Prefix for Image Captioning", official code
github.com/rmokady/CLIP_prefix_caption): a frozen CLIP image tower (vit.py) embeds each image once, a mapper makes
a prefix of GPT-2 input vectors of it, and GPT-2 (gpt2.py `Captioner`) learns to continue the prefix with the caption.

    python train.py --task caption --preset shapes          # tiny tower + tiny GPT-2 from scratch: minutes on a CPU
    python train.py --task caption --preset coco --data-root data/coco     # ClipCap's COCO recipe (Karpathy split)
    python train.py --eval runs/caption/ckpt.pt --split test               # BLEU-1..4, CIDEr-D of a checkpoint
    torchrun --nproc_per_node 2 train.py --task caption ...                # DistributedDataParallel

Text to image (Rombach et al. 2022, arXiv:2112.10752, at any size): unet.py's UNet cross-attends to a text encoder's
hidden states (a tiny CLIP-style one trained with it, SD's frozen CLIP tower, or frozen GPT-2) and learns ddpm.py's
loss, in pixels or in the frozen SD VAE's latents; captions are dropped 10 % of the time for classifier-free guidance
(Ho & Salimans 2022), and an EMA of the weights draws the samples.

    python train.py --task diffusion --preset shapes --judge runs/caption/ckpt.pt   # minutes on a CPU, judged
    python train.py --task diffusion --preset photos --data-root data/coco          # COCO, SD's latent space
    python train.py --task diffusion --preset sd15 --data-root my_images/           # fine-tune SD 1.5 itself

Top to bottom: the config (a dataclass; each field is a flag) and presets; the harness every task shares (AdamW,
warm-up + cosine over the epochs or a time budget, mixed precision, accumulation, clipping, DDP, log, atomic
checkpoints, exact resume), which needs a task's `model`, `num_pairs`, `batch(ids, device)`, `count_targets(ids)`,
`evaluate(model)` and `extra`; the caption task (splits, the feature cache, the model, evaluation); the
text-to-image task; the command line.
"""
import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import pickle
import re
import sys
import textwrap
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

try:
    import fcntl  # run directories are locked where the OS can (POSIX)
except ImportError:  # Windows: no lock, so nothing a killed run left half-written is removed
    fcntl = None
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import data
import ddpm
import weights
from clip import CLIPTextTransformer, TextConfig, load_visual
from gpt2 import GPT, Captioner, CaptionerConfig, GPTConfig
from tokenizer import CLIPTokenizer, GPT2Tokenizer
from unet import TextConditionedUNet, UNetConfig, UNetModel
from vae import AutoencoderConfig, AutoencoderKL
from vit import VisionConfig, VisionTransformer, normalize, resize_crop


TASKS, DATASETS = ("caption", "diffusion"), ("shapes", "coco", "karpathy", "folder", "cifar100")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def flag(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    task: str = flag("caption", "caption: image -> caption (ClipCap); diffusion: caption -> image", TASKS)
    preset: str = flag("shapes", "starting values of the flags, listed below")
    data: str = flag("shapes", "coco: 2017; karpathy: COCO, Karpathy's splits", DATASETS)
    data_root: str = flag("", "dataset directory (karpathy: with dataset_coco.json; folder: 5%% of images held out)")
    download: bool = flag(False, "fetch the official archives (COCO, Karpathy's splits, CIFAR-100)")
    out_dir: str = flag("runs/caption", "log, checkpoint, cache (--resume, --eval: the checkpoint's folder)")
    overwrite: bool = flag(False, "start afresh in an --out-dir that holds a run (its checkpoint, log go)")
    weights_dir: str = flag("", "where official weights live (none: $MINIMODAL_WEIGHTS, else weights/)")
    offline: bool = flag(False, "never download (weights or data): say which file to put where")
    batch_size: int = flag(64, "pairs per optimizer step, over all processes and micro-batches")
    grad_accum: int = flag(1, "micro-batches per step: the same step in less memory")
    epochs: float = flag(1.0, "passes over the training pairs")
    minutes: float = flag(0.0, "fit the run into this many training minutes (evaluations left out): the "
                          "cosine schedule ends where they run out, at most --epochs (0: off)")
    lr: float = flag(2e-3, "peak learning rate of AdamW")
    warmup_steps: int = flag(100, "steps of linear warm-up from 0 to --lr")
    weight_decay: float = flag(0.01, "AdamW weight decay, matrices only")
    grad_clip: float = flag(1.0, "clip the gradient's global norm to this (0 = off)")
    precision: str = flag("fp32", "bf16: autocast; fp16: autocast + gradient scaler (CUDA); auto: bf16 where "
                          "the device computes it natively (a GPU with bf16, a CPU with AMX or AVX512-BF16)",
                          PRECISIONS)
    max_train_samples: int = flag(0, "use at most this many training pairs (0 = all; shapes: images drawn)")
    max_val_samples: int = flag(500, "evaluate on at most this many validation images")
    eval_every: int = flag(500, "evaluate and checkpoint every this many steps, and at the end")
    log_every: int = flag(50, "log the training loss every this many steps")
    seed: int = flag(0, "the one seed: initialisation, data order, shapes drawn")
    device: str = flag("cuda" if torch.cuda.is_available() else "cpu", "cpu, cuda, cuda:1, ...")
    threads: int = flag(0, "CPU threads for torch (0 = torch's default)")
    compile: bool = flag(False, "torch.compile the model")
    smoke_test: bool = flag(False, "a tiny quick run: tiny models, 256 pairs, 32 validation images")
    traceback: bool = flag(False, "on an error, the whole traceback instead of one line")
    resume: str = flag("", "continue from this checkpoint: model, optimizer, step and random state")
    stop_after: int = flag(0, "end this run after this many steps, checkpointed (--resume continues)")
    # the caption task
    image_tower: str = flag("tiny", "tiny: trained with the captioner; clip: --clip-weights, frozen",
                            ("tiny", "clip"))
    clip_weights: str = flag("ViT-B/32", "CLIP weights: ViT-B/32 (fetched) or a CLIP file")
    language_model: str = flag("tiny", "tiny: from scratch; gpt2: --gpt2-weights", ("tiny", "gpt2"))
    gpt2_weights: str = flag("gpt2", "GPT-2 weights: gpt2, gpt2-medium, -large, -xl (fetched) or a file")
    freeze_gpt: bool = flag(False, "train the mapper only (ClipCap's --only_prefix)")
    closed_vocab: bool = flag(False, "tiny GPT-2: unused tokens keep a 0 embedding; exact softmax, fewer rows")
    mapping_type: str = flag("mlp", "mlp, transformer: ClipCap's mappers; tokens: one vector per tower token "
                             "(LLaVA-1.5's projector)", ("mlp", "transformer", "tokens"))
    prefix_length: int = flag(4, "image vectors GPT-2 reads before the caption (tokens: the tower's token count)")
    mapper_layers: int = flag(8, "transformer mapper: blocks")
    image_size: int = flag(32, "tiny tower: input resolution (shapes are drawn at this size)")
    patch_size: int = flag(8, "tiny tower: patch size")
    vision_width: int = flag(128, "tiny tower: width (one head per 64 channels, as in CLIP)")
    vision_layers: int = flag(3, "tiny tower: blocks")
    embed_dim: int = flag(128, "tiny tower: width of the image embedding")
    n_embd: int = flag(64, "tiny GPT-2: width")
    n_layer: int = flag(2, "tiny GPT-2: blocks")
    n_head: int = flag(2, "tiny GPT-2: heads")
    max_caption_tokens: int = flag(30, "captions are cut to this many tokens; generation stops there")
    num_beams: int = flag(1, "evaluation decoding: 1 = greedy, more = beam search")
    eval: str = flag("", "score this checkpoint on --split and exit (text-to-image: on val, --judge to read back)")
    split: str = flag("val", "the split --eval scores (test: shapes, karpathy, cifar100)", ("val", "test"))
    # the diffusion task
    text_encoder: str = flag("tiny", "tiny: CLIP-style, trained; clip: SD's text tower (--sd-weights); gpt2: "
                             "--gpt2-weights, frozen, its hidden states projected", ("tiny", "clip", "gpt2"))
    sd_weights: str = flag("", "SD 1.x weights, a file or registered name: the VAE, text tower, UNet")
    latent: bool = flag(False, "diffuse in the frozen SD VAE's latent space (8x smaller) instead of pixels")
    unet: str = flag("tiny", "tiny: the sizes below, from scratch; sd15: --sd-weights', fine-tuned",
                     ("tiny", "sd15"))
    model_channels: int = flag(32, "tiny UNet: channels of the first level")
    channel_mult: str = flag("1,2", "tiny UNet: channel multiplier of each level")
    attention_resolutions: str = flag("2", "tiny UNet: downsampling factors with (cross-)attention (\"\": the "
                                      "middle block's only)")
    num_res_blocks: int = flag(1, "tiny UNet: ResBlocks per level")
    context_dim: int = flag(64, "tiny UNet: width of the text context (and of the tiny text encoder)")
    pooled_text: bool = flag(False, "tiny UNet: the text state at the first end-of-text joins the timestep "
                             "embedding (SDXL's pooled text)")
    scale_shift_norm: bool = flag(False, "tiny UNet: the embedding scales and shifts each ResBlock's channels (ADM)")
    text_layers: int = flag(2, "tiny text encoder: blocks")
    patch: int = flag(2, "pixel space: denoise patch x patch pixels as channels (2: a 32x32 image costs 16x16)")
    schedule: str = flag("cosine", "noise schedule, a ddpm.py preset", tuple(ddpm.PRESETS))
    parameterization: str = flag("eps", "the UNet predicts eps (the noise) or v", ("eps", "v"))
    min_snr_gamma: float = flag(5.0, "Min-SNR loss weighting gamma (0 = the plain mean squared error)")
    caption_dropout: float = flag(0.1, "train on the empty prompt this often (classifier-free guidance)")
    ema_decay: float = flag(0.999, "EMA of the weights, which draws the samples (0 = none)")
    sampler: str = flag("ddim", "evaluation samples: the sampler", tuple(ddpm.SAMPLERS))
    sampling_steps: int = flag(20, "evaluation samples: sampler steps")
    guidance_scale: float = flag(3.0, "evaluation samples: classifier-free guidance scale")
    gradient_checkpointing: bool = flag(False, "recompute the UNet's activations in backward: less memory")
    judge: str = flag("", "a shapes captioner checkpoint: each evaluation draws held-out prompts and it reads them")
    num_judged: int = flag(200, "--judge: held-out prompts drawn")


PRESETS = {"caption": {
    # tiny tower (32 x 32 images, 16 patches, sine-cosine positions) and tiny GPT-2 with GPT-2's whole vocabulary,
    # from scratch; every tower token is a prefix vector (the pooled embedding alone lost where objects are: 58%).
    # 64k drawn images, 9 epochs of batch 64 (9,000 steps): about 9 training minutes on 2 cores, 95-97% exact match
    "shapes": dict(closed_vocab=True, vision_width=64, vision_layers=2, embed_dim=64, lr=2e-3, max_train_samples=64_000,
                   mapping_type="tokens", epochs=9.0, eval_every=1000),
    # ClipCap's COCO recipe (paper sec. 4, official train.py): ViT-B/32 embeddings, GPT-2 124M fine-tuned, MLP
    # mapper, prefix length 10, batch 40, AdamW lr 2e-5 with 5,000 warm-up steps, 10 epochs: Table 1's 108.4 CIDEr
    "coco": dict(data="karpathy", image_tower="clip", language_model="gpt2", prefix_length=10, batch_size=40,
                 lr=2e-5, warmup_steps=5000, epochs=10.0, eval_every=5000, log_every=100, closed_vocab=False),
}, "diffusion": {
    # 32x32 pixels denoised as 16x16x12 patches by a 0.8M-parameter UNet, a 3.3M tiny text encoder, for 12
    # minutes (the tour; bf16 where the CPU has AMX) on up to 160k fresh images. FiLM with the pooled prompt,
    # cross-attention in the middle block only, Min-SNR 0.5, DDPM's 50 steps, guidance 1.5: README says why
    "shapes": dict(out_dir="runs/diffusion", batch_size=32, lr=2e-3, warmup_steps=50, max_train_samples=160_000,
                   minutes=12.0, precision="auto", pooled_text=True, scale_shift_norm=True, attention_resolutions="",
                   parameterization="v", min_snr_gamma=0.5, eval_every=500, max_val_samples=200,
                   max_caption_tokens=14, sampler="ddpm", sampling_steps=50, guidance_scale=1.5),
    # COCO (or --data folder) at 256x256 in SD's latent space (32x32x4), SD's frozen text tower, a 100M UNet
    "photos": dict(data="coco", out_dir="runs/diffusion-photos", sd_weights="sd15/v1-5-pruned-emaonly.safetensors",
                   latent=True, text_encoder="clip", image_size=256, model_channels=128, channel_mult="1,2,4",
                   attention_resolutions="4,2", num_res_blocks=2, context_dim=768, schedule="sd15", batch_size=64,
                   lr=1e-4, warmup_steps=1000, epochs=10.0, eval_every=2000, max_val_samples=500, max_caption_tokens=75,
                   sampler="dpm++2m", sampling_steps=25, guidance_scale=5.0, ema_decay=0.9999),
    # fine-tune SD 1.5 itself on a folder of your images and captions at 512x512 (bf16, checkpointed activations)
    "sd15": dict(data="folder", out_dir="runs/sd15", sd_weights="sd15/v1-5-pruned-emaonly.safetensors", latent=True,
                 text_encoder="clip", unet="sd15", image_size=512, schedule="sd15", min_snr_gamma=0.0, ema_decay=0.0,
                 batch_size=8, lr=1e-5, warmup_steps=100, epochs=10.0, eval_every=500, max_val_samples=16,
                 max_caption_tokens=75, precision="bf16", gradient_checkpointing=True, sampling_steps=50,
                 guidance_scale=7.5),
}}
SMOKE_TEST = dict(image_tower="tiny", language_model="tiny", max_train_samples=256, max_val_samples=32,
                  batch_size=16, epochs=1.0, minutes=0.0, warmup_steps=2, log_every=4, sampling_steps=2,
                  num_judged=16)
# what a checkpoint's config never sets: where to read and write, what to fetch, the device (this run's own)
LOCAL = {"out_dir", "data_root", "download", "weights_dir", "offline", "device", "threads", "resume", "eval",
         "stop_after", "overwrite", "judge", "traceback", "smoke_test"}
BOUNDS = {"max_caption_tokens": 1000, "image_size": 4096, "max_train_samples": 10**7,  # what a checkpoint
          "max_val_samples": 10**7, "num_judged": 10**5, "batch_size": 10**5}  # may ask for, at most

# -----------------------------------------------------------------------------------------------------------------
# The harness: what every task shares


UNTIMED_STEPS = 5  # --minutes: a process's first steps (compilation, allocation, kernel choice) are not timed


def lr_at(step, total_steps, cfg):
    """Linear warm-up to cfg.lr, then half a cosine down to 0 at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)))


def resolve_precision(precision, device):
    """--precision auto -> bf16 where the hardware has bf16 arithmetic, else fp32: emulated bf16 is slower than fp32
    (a Xeon with AMX runs the shapes UNet's step 1.3x faster in bf16; a CPU without it would lose time)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    # torch.cpu's private queries are the only ones torch has (torch.backends.cpu says "AVX512", not whether bf16)
    native = device.type == "cpu" and (torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    return "bf16" if native else "fp32"


def setup_distributed(cfg):
    """(rank, world size, device). Under torchrun (RANK is set): one process per GPU with NCCL, or gloo on CPUs."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device(cfg.device)
    dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
    device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if cfg.device.startswith("cuda") else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def log(cfg, record):
    print(json.dumps(record), flush=True)
    with open(Path(cfg.out_dir) / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


@contextlib.contextmanager
def own_out_dir(cfg, checkpoint):
    """Hold --out-dir while this run writes there: a lock (flock, gone however the process ends) tells a live
    run from a killed one, so what a killed run left half-written (.ckpt.pt.*.tmp; cache .part files, locked
    while written) is removed. A resumed run's log loses what was logged after its checkpoint; --overwrite
    starts afresh."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "a") as lock:
        if fcntl and not locked(lock):
            raise OSError(f"{out} is in use: another train.py writes there (give this run another --out-dir)")
        parts = (path for path in out.glob("cache/*.part") if locked(open(path, "rb")))
        stale = [*out.glob(".ckpt.pt.*.tmp"), *parts] if fcntl else []
        for path in stale:
            path.unlink()
            print(f"removed {path}, left half-written by a killed run", file=sys.stderr)
        if cfg.overwrite and not (checkpoint and out.resolve() == Path(cfg.resume).resolve().parent):
            for name in ("ckpt.pt", "log.jsonl"):
                (out / name).unlink(missing_ok=True)
        if checkpoint and (path := out / "log.jsonl").exists():  # whole records up to the checkpoint's step
            path.write_text("".join(line + "\n" for line in path.read_text().splitlines() if (
                step := re.match(r'{"step": (\d+),.*}$', line)) and int(step[1]) <= checkpoint["step"]))
        yield


def locked(handle):
    """Take the file's lock, unless a live process holds it."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def train(task, cfg, rank=0, world=1, device=torch.device("cpu"), checkpoint=None, clock=time.perf_counter):
    """The loop. The batch of step s is fixed by (seed, epoch, s) alone and every micro-batch divides its summed
    loss by the batch's target count, so 1 process equals N processes equals N micro-batches, and a resumed run
    (`checkpoint`: optimizer, scaler, step, random state; the task's model) equals an uninterrupted one.
    `clock` keeps the training time (evaluations left out) for the log and --minutes. Sanity check, one batch
    overfitted: --max-train-samples 64 --batch-size 64 --epochs 300 (the loss must fall towards 0)."""
    if task.num_pairs < cfg.batch_size:
        raise ValueError(f"{task.num_pairs} training pairs, fewer than --batch-size {cfg.batch_size}")
    model = task.model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in trainable if p.dim() >= 2]},  # decay matrices only
                                   {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)  # one kernel per step
    precision = resolve_precision(cfg.precision, device)
    if cfg.precision == "auto" and rank == 0:
        print(f"--precision auto: {precision} on {device.type}")
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    steps_per_epoch = max(1, task.num_pairs // cfg.batch_size)  # the last partial batch is dropped
    total_steps = max_steps = max(1, round(cfg.epochs * steps_per_epoch))
    step, earlier_seconds = 0, 0.0  # training seconds of the runs this one resumes
    if checkpoint:
        optimizer.load_state_dict(weights.check_optimizer_state(checkpoint["optimizer"], optimizer, cfg.resume))
        scaler.load_state_dict(checkpoint["scaler"])
        step, earlier_seconds = checkpoint["step"], checkpoint.get("train_seconds", 0.0)
        torch.set_rng_state(checkpoint["rng"])
        print(f"resumed from {cfg.resume} at step {step}")
    budget = cfg.minutes * 60 - earlier_seconds
    if cfg.minutes and budget <= 0:
        total_steps = step  # its time budget is spent
    runner = DistributedDataParallel(model) if world > 1 else model
    runner = torch.compile(runner) if cfg.compile else runner
    autocast = dict(device_type=device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16,
                    enabled=precision != "fp32")
    micro = cfg.batch_size // (world * cfg.grad_accum)
    first_step, started, eval_seconds, timed, metrics, loss_sum = step, clock(), 0.0, None, {}, math.nan
    while step < total_steps:
        epoch, position = divmod(step, steps_per_epoch)
        order = torch.randperm(task.num_pairs, generator=torch.Generator().manual_seed(cfg.seed + epoch))
        batch = order[position * cfg.batch_size:(position + 1) * cfg.batch_size].tolist()
        num_targets, mine = task.count_targets(batch), batch[rank::world]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total_steps, cfg)
        loss_sum = 0.0
        for k in range(cfg.grad_accum):
            inputs = task.batch(mine[k * micro:(k + 1) * micro], device)
            last = k == cfg.grad_accum - 1
            with runner.no_sync() if world > 1 and not last else contextlib.nullcontext():
                with torch.autocast(**autocast):
                    loss = runner(*inputs) / num_targets
                scaler.scale(loss * world).backward()  # DDP averages over ranks; the loss is a sum over them
            loss_sum += loss.item()
        scaler.unscale_(optimizer)
        grad_norm = float(nn.utils.clip_grad_norm_(trainable, cfg.grad_clip or float("inf")))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if hasattr(model, "after_step"):  # the diffusion model's EMA follows every update
            model.after_step()
        step += 1
        if world > 1:  # each rank saw part of the batch: add the parts
            dist.all_reduce(loss_sum := torch.tensor(loss_sum, device=device))
            loss_sum = loss_sum.item()
        seconds = clock() - started - eval_seconds  # this process's training time, evaluations left out
        if cfg.minutes:  # every step: the steps that fit in the time left, at the mean time of the timed ones
            timed = (seconds, step) if step - first_step == UNTIMED_STEPS else timed
            rate = (step - timed[1]) / (seconds - timed[0]) if timed and seconds > timed[0] else math.inf
            more = 0 if seconds >= budget else int(min((budget - seconds) * rate, max_steps))
            fits = min(max_steps, step + more)
            if world > 1:  # rank 0's clock decides for all
                dist.broadcast(fits := torch.tensor(fits, device=device), 0)
            total_steps = max(step, int(fits))
        if rank == 0 and (step % cfg.log_every == 0 or step in (1, total_steps)):
            log(cfg, {"step": step, "epoch": round(step / steps_per_epoch, 3), "loss": round(loss_sum, 5),
                      "lr": round(optimizer.param_groups[0]["lr"], 8), "grad_norm": round(grad_norm, 4),
                      "pairs_per_s": round((step - first_step) * cfg.batch_size / max(seconds, 1e-9), 1),
                      "minutes": round((earlier_seconds + seconds) / 60, 2),
                      "cpu_minutes": round(time.process_time() / 60, 2)})
        stopping = cfg.stop_after and step - first_step >= cfg.stop_after
        due = step % cfg.eval_every == 0 or step == total_steps
        if due or stopping:
            if rank == 0:
                evaluated = clock()
                if due:
                    metrics = task.evaluate(model)
                    log(cfg, {"step": step, "minutes": round((earlier_seconds + seconds) / 60, 2), **metrics})
                weights.save_checkpoint({  # atomic; a plain state_dict of the unwrapped model; the resolved config
                    "task": cfg.task, "config": dataclasses.asdict(cfg), "model": model.state_dict(), "step": step,
                    "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "metrics": metrics,
                    "total_steps": total_steps, "train_seconds": earlier_seconds + seconds,
                    "rng": torch.get_rng_state(), **task.extra}, Path(cfg.out_dir) / "ckpt.pt")
                eval_seconds += clock() - evaluated
            if world > 1:
                dist.barrier()
        if stopping:
            break
    if rank == 0 and step > first_step:
        print(end_of_run(cfg, step, total_steps, max_steps, steps_per_epoch, earlier_seconds + seconds,
                         eval_seconds))
    return model, loss_sum


def end_of_run(cfg, step, total_steps, max_steps, steps_per_epoch, used, eval_seconds):
    """What happened, in a line: --stop-after, the time budget, or the steps run."""
    ckpt = Path(cfg.out_dir) / "ckpt.pt"
    if cfg.stop_after and step < total_steps:
        return f"--stop-after {cfg.stop_after}: stopped at step {step:,} of {total_steps:,}; " \
               f"--resume {ckpt} continues"
    done = f"{step:,} steps in {used / 60:.2f} training minutes (evaluations {eval_seconds / 60:.2f} more)"
    why = "--epochs ended it first" if step == max_steps else "the budget ended it"
    return f"trained {done}; {ckpt}" if not cfg.minutes else (
        f"--minutes {cfg.minutes:g}: {done}; {why}; --epochs {step / steps_per_epoch:.6g} --minutes 0 trains "
        "as many steps")

# -----------------------------------------------------------------------------------------------------------------
# The caption task


def no_images(cfg, split, dataset):
    return (f"none of the {len(dataset.image_ids())} images of the {split} split of --data {cfg.data} can be "
            "read (each is missing or unreadable)")


def words(text):
    return re.findall(r"[a-z0-9]+", text.lower())


def open_split(cfg, split):
    """The (image, caption) pairs of one split (data.py); splits never share an image."""
    return data.open_split(cfg.data, split, cfg.data_root or None, cfg.download, cfg.image_size, cfg.seed,
                           cfg.max_train_samples if split == "train" else cfg.max_val_samples)


def fingerprint(dataset, tower):
    """What a cache depends on: the images (shapes by their parameters, files by path, size and modification time)
    and every byte of the image tower's weights (None: the cache holds the pixels themselves)."""
    h = hashlib.sha256()
    if isinstance(dataset, data.ShapesDataset):
        h.update(repr((dataset.n, dataset.image_size, dataset.seed, dataset.max_objects, dataset.split)).encode())
    else:
        for image_id in dataset.image_ids():
            path = Path(dataset.files[image_id])
            stat = path.stat() if path.exists() else None
            h.update(f"{path}\0{stat and stat.st_size}\0{stat and stat.st_mtime_ns}\n".encode())
    for name, tensor in sorted(tower.state_dict().items()) if tower is not None else ():
        h.update(name.encode() + tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:24]


@torch.no_grad()
def cached_features(dataset, tower, cfg, rank=0, world=1, device="cpu", batch_size=64):
    """The frozen tower's embedding of every image, (N, D) fp16 (the tokens mapper: every token's, (N, 1 + h*w, D)),
    computed once into out_dir/cache and memory-mapped by later runs; with tower None, the pixels (N, 3, h, w) uint8
    of a tower that trains. Returns (array, skipped image ids): an unreadable image is reported by data.py, skipped,
    and its row stays 0."""
    tokens = tower is not None and cfg.mapping_type == "tokens"
    kind = "pixels" if tower is None else "tokens" if tokens else "features"
    path = Path(cfg.out_dir) / "cache" / f"{kind}-{fingerprint(dataset, tower)}.npy"  # out_dir/cache/features-…
    if rank == 0 and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        ids, part, skipped = dataset.image_ids(), path.with_name(path.name + ".part"), []
        size = cfg.image_size if tower is None else tower.config.image_resolution
        shape = (3, size, size) if tower is None else (tower.config.embed_dim,) if not tokens else \
            (tower.config.num_tokens, tower.config.embed_dim)
        holder = open(part, "wb")  # locked while written: a run starting meanwhile leaves it be (own_out_dir)
        if fcntl:
            fcntl.flock(holder, fcntl.LOCK_EX)
        out = np.lib.format.open_memmap(part, "w+", np.uint8 if tower is None else np.float16, (len(ids), *shape))
        for start in tqdm(range(0, len(ids), batch_size), desc=f"caching {kind}", unit="batch", disable=None):
            images = {row: dataset.load_image(ids[row]) for row in range(start, min(start + batch_size, len(ids)))}
            skipped += [str(ids[row]) for row, image in images.items() if image is None]
            rows = [row for row, image in images.items() if image is not None]
            pixels = torch.stack([resize_crop(images[r], size) for r in rows]) if rows else None  # CLIP's
            if rows and tower is None:
                out[rows] = pixels.numpy()
            elif rows:
                embed = tower.embed_tokens if tokens else tower
                out[rows] = embed(normalize(pixels.to(device))).float().cpu().numpy()
        out.flush()
        path.with_suffix(".skipped.json").write_text(json.dumps(skipped))
        os.replace(part, path)  # atomic: a killed run never leaves half a cache under the final name
        holder.close()
    if world > 1:
        dist.barrier()
    return np.load(path, mmap_mode="r"), set(json.loads(path.with_suffix(".skipped.json").read_text()))


class CaptionModel(nn.Module):
    """The captioner, and the image tower when it trains from scratch (or is attached to caption new images)."""

    def __init__(self, captioner, visual=None):
        super().__init__()
        self.captioner, self.visual = captioner, visual
        self.register_buffer("vocab", None, persistent=False)  # closed vocabulary: the used token ids, sorted

    def embed(self, inputs):
        """uint8 pixels (B, 3, h, w) or CLIP-normalised ones -> embeddings (B, D), or every token's (B, 1 + h*w, D)
        for the tokens mapper; cached embeddings pass through."""
        if inputs.dtype == torch.uint8:  # cached pixels are bytes: 4x less memory than floats
            inputs = normalize(inputs)
        if self.visual is None:
            return inputs.float()
        return self.visual.embed_tokens(inputs) if self.captioner.config.mapping_type == "tokens" else \
            self.visual(inputs)

    def forward(self, inputs, tokens, token_mask):
        return self.captioner(self.embed(inputs), tokens, token_mask, self.vocab)


def image_tower(cfg, config=None):
    """The frozen CLIP image tower of --clip-weights: a CLIP file of any layout, or a registered name through
    clip.py's choice of file; given a captioner's `config` (its vision_config), it must be its tower."""
    tower = load_visual(cfg.clip_weights, cfg.weights_dir or None, cfg.offline)
    if config is not None and dataclasses.asdict(tower.config) != config:
        raise ValueError(f"--clip-weights {cfg.clip_weights} is not the tower this captioner was trained on")
    return tower.requires_grad_(False).eval()


def build_caption_model(cfg, checkpoint=None):
    """(CaptionModel, image tower). A tiny tower trains with the captioner (it is inside the model); a frozen
    one (image_tower) stays outside it. From a checkpoint every size is the checkpoint's and no file is read
    (the tower returned is then built from its config: a frozen one's weights come from image_tower)."""
    if cfg.image_tower == "tiny" or checkpoint:
        tower = VisionTransformer(VisionConfig(**checkpoint["vision_config"]) if checkpoint else VisionConfig(
            cfg.image_size, cfg.vision_layers, cfg.vision_width, cfg.patch_size, cfg.embed_dim), sincos=True)
    else:
        tower = image_tower(cfg)
    prefix_length = cfg.prefix_length if cfg.mapping_type != "tokens" else tower.config.num_tokens
    if checkpoint or cfg.language_model == "tiny":
        gpt = GPT(GPTConfig.from_dict(checkpoint["gpt_config"]) if checkpoint else GPTConfig(
            n_ctx=prefix_length + cfg.max_caption_tokens + 1, n_embd=cfg.n_embd, n_head=cfg.n_head,
            n_layer=cfg.n_layer))
    else:
        gpt = GPT.from_pretrained(cfg.gpt2_weights, root=cfg.weights_dir or None, offline=cfg.offline)
    captioner = Captioner(CaptionerConfig(tower.config.embed_dim, prefix_length, cfg.mapping_type,
                                          prefix_length, cfg.mapper_layers), gpt.requires_grad_(not cfg.freeze_gpt))
    model = CaptionModel(captioner, tower if cfg.image_tower == "tiny" else None)
    if checkpoint:
        model.load_state_dict(checkpoint["model"], strict=True)
    return model, tower.eval() if cfg.image_tower != "tiny" else tower


def rebuild(build, cfg, checkpoint):
    """build(cfg, checkpoint), after a dry run on the meta device: a checkpoint's configs size nothing until
    its tensors agree with them (a crafted config cannot make us allocate more than the file holds)."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # load_state_dict into meta tensors copies nothing, checks the shapes
        try:
            build(cfg, checkpoint)
        except (RuntimeError, TypeError, KeyError, ValueError) as error:  # torch lists each tensor: one tells
            lines = str(error).strip().splitlines()
            raise ValueError(f"the checkpoint's model does not match its config: {lines[-1].strip()}" + (
                f" (and {len(lines) - 2} more)" if len(lines) > 2 else "")) from None
    return build(cfg, checkpoint)


def load_captioner(checkpoint, device="cpu", **flags):
    """A checkpoint of the caption task -> (CaptionModel with its image tower attached, in eval mode; its
    config). `flags`: this run's own (weights_dir, offline; clip_weights: a frozen tower's file)."""
    cfg = TrainConfig(**{**checkpoint_config(checkpoint, "the captioner", flags), **flags})
    model, tower = rebuild(build_caption_model, cfg, checkpoint)
    model.visual = tower if cfg.image_tower == "tiny" else image_tower(cfg, checkpoint["vision_config"])
    return model.to(device).eval(), cfg


@torch.no_grad()
def caption(model, embeds, tokenizer, max_new_tokens=30, **sampling):
    """Captions (str) of image embeddings (B, D): greedy unless sampling (GPT.generate's keywords) says otherwise."""
    tokens = model.captioner.generate(embeds, max_new_tokens, eos_token_id=tokenizer.eot_token, **sampling).tolist()
    return [tokenizer.decode(row[:row.index(tokenizer.eot_token)] if tokenizer.eot_token in row else row).strip()
            for row in tokens]


def clipcap_row(cfg):
    """The row of ClipCap's Table 1 (COCO Karpathy test, CIDEr) that a configuration corresponds to."""
    if (cfg.data, cfg.split, cfg.image_tower, cfg.clip_weights, cfg.language_model, cfg.gpt2_weights) != (
            "karpathy", "test", "clip", "ViT-B/32", "gpt2", "gpt2"):
        return "none: ClipCap's rows are COCO Karpathy test with ViT-B/32 and GPT-2 124M (--preset coco --split test)"
    if cfg.mapping_type == "tokens":
        return "none: ClipCap maps the pooled embedding only; the tokens mapper reads every token (LLaVA-1.5's way)"
    if cfg.mapping_type == "transformer":
        return "ClipCap transformer mapper + frozen GPT-2, CIDEr 113.1 (ClipCap: prefix length 40, --freeze-gpt)"
    return "ClipCap MLP + " + ("frozen GPT-2, CIDEr 92.4" if cfg.freeze_gpt else "fine-tuned GPT-2, CIDEr 108.4")


class CaptionTask:
    """Image -> caption. A split is (dataset, image inputs, pairs [(image row, caption token ids)], references
    {image row: captions}); the inputs are cached embeddings (frozen tower) or cached pixels (a tower that trains)."""

    def __init__(self, cfg, rank=0, world=1, device="cpu", splits=("train", "val"), checkpoint=None):
        self.cfg, self.device, self.tokenizer = cfg, torch.device(device), GPT2Tokenizer.default()
        self.model, tower = rebuild(build_caption_model, cfg, checkpoint) if checkpoint else \
            build_caption_model(cfg)
        if cfg.image_tower != "tiny" and checkpoint:
            tower = image_tower(cfg, checkpoint["vision_config"])
        frozen = None if cfg.image_tower == "tiny" else tower.to(self.device)
        self.extra = {"gpt_config": dataclasses.asdict(self.model.captioner.gpt.config),
                      "vision_config": dataclasses.asdict(tower.config)}
        self.splits, encoded = {}, {}  # many captions repeat: encode each once
        for split in splits:
            dataset = open_split(cfg, split)
            images, skipped = cached_features(dataset, frozen, cfg, rank, world, self.device)
            row = {image_id: k for k, image_id in enumerate(dataset.image_ids()) if str(image_id) not in skipped}
            references = {row[i]: captions for i, captions in dataset.references().items() if i in row}
            pairs = [(r, encoded.setdefault(c, self.tokenizer.encode(c)[:cfg.max_caption_tokens]))
                     for r, captions in references.items() for c in captions]
            limit = cfg.max_train_samples if split == "train" else 0
            if not pairs:
                raise ValueError(no_images(cfg, split, dataset))
            self.splits[split] = (dataset, images, pairs[:limit or None], references)
        if cfg.closed_vocab:  # the rows of tokens no caption uses are 0 and stay 0 (gpt2.py Captioner.forward)
            wte, used = self.model.captioner.gpt.wte.weight.data, torch.zeros(GPTConfig.n_vocab, dtype=torch.bool)
            used[[t for ids in encoded.values() for t in ids] + [50256]] = True
            if checkpoint is None:
                wte[~used] = 0
            self.model.vocab = (used | wte.ne(0).any(dim=1)).nonzero()[:, 0]
        self.num_pairs = len(self.splits["train"][2]) if "train" in self.splits else 0

    def count_targets(self, pair_ids, split="train"):
        return sum(len(self.splits[split][2][i][1]) + 1 for i in pair_ids)  # caption tokens and end-of-text

    def batch(self, pair_ids, device, split="train"):
        """(inputs, tokens (B, T), token_mask (B, T)); the padding holds end-of-text and is masked out everywhere."""
        _, images, pairs, _ = self.splits[split]
        rows = [pairs[i] for i in pair_ids]
        tokens = torch.full((len(rows), max(len(ids) for _, ids in rows)), 50256)
        token_mask = torch.zeros(tokens.shape, dtype=torch.bool)
        for b, (_, ids) in enumerate(rows):
            tokens[b, :len(ids)], token_mask[b, :len(ids)] = torch.tensor(ids), True
        inputs = torch.from_numpy(np.asarray(images[[r for r, _ in rows]]))
        return inputs.to(device), tokens.to(device), token_mask.to(device)

    @torch.no_grad()
    def evaluate(self, model, split="val", batch_size=100):
        """Loss per target token, BLEU-1..4 and CIDEr-D of one caption per image (COCO's scorers, data.py), and on
        shapes the exact-match rate (canonical captions equal). Prints captions beside references."""
        was_training = model.training
        model.eval()
        dataset, images, pairs, references = self.splits[split]
        chunks = [list(range(s, min(s + batch_size, len(pairs)))) for s in range(0, len(pairs), batch_size)]
        loss = sum(model(*self.batch(ids, self.device, split)).item() for ids in chunks)
        rows, captions = sorted(references), {}
        for start in range(0, len(rows), batch_size):
            embeds = model.embed(torch.from_numpy(np.asarray(images[rows[start:start + batch_size]])).to(self.device))
            captions.update(zip(rows[start:start + batch_size], caption(
                model, embeds, self.tokenizer, self.cfg.max_caption_tokens, num_beams=self.cfg.num_beams)))
        metrics = {"val_loss": round(loss / self.count_targets(range(len(pairs)), split), 5),
                   **{k: round(v, 4) for k, v in data.caption_scores(references, captions).items()}}
        if isinstance(dataset, data.ShapesDataset):
            canonical = data.canonical_shapes_caption
            metrics["exact_match"] = round(float(np.mean([canonical(captions[r]) == canonical(references[r][0])
                                                          for r in rows])), 4)
        for r in rows[:4]:
            print(f"  {captions[r]!r:56} reference: {references[r][0]!r}", flush=True)
        model.train(was_training)
        return metrics

# -----------------------------------------------------------------------------------------------------------------
# The text-to-image task


class GPTHidden(nn.Module):
    """GPT-2 read as a text encoder: its last hidden states (after ln_f), not its logits."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt

    def forward(self, tokens):
        return self.gpt(tokens, return_hidden=True)


def text_tokenizer(cfg):
    """Captions -> (B, T) ids for the text encoder, padded with end-of-text as SD pads (its UNet attends to every
    position), cut to the context: CLIP's BPE (77 tokens for SD's tower, max_caption_tokens + 2 for the tiny
    one) or GPT-2's. `length` asks for another context (generate.py: was a prompt cut?)."""
    if cfg.text_encoder in ("tiny", "clip"):
        context = 77 if cfg.text_encoder == "clip" else cfg.max_caption_tokens + 2
        tokenizer = CLIPTokenizer.default()
        return lambda texts, length=context: tokenizer.tokenize(texts, length, pad="eot")
    tokenizer, context = GPT2Tokenizer.default(), cfg.max_caption_tokens + 1

    def tokenize(texts, length=context):
        rows = [tokenizer.encode(text)[:length - 1] for text in texts]
        return torch.tensor([row + [tokenizer.eot_token] * (length - len(row)) for row in rows])
    return tokenize


class DiffusionModel(nn.Module):
    """Text -> image: the text-conditioned UNet (unet.py) trained with ddpm.py's loss, its EMA copy that draws, and
    the frozen SD VAE when it works in latent space. forward() is the training loss summed over the batch."""

    def __init__(self, net, cfg, empty_tokens, vae=None):
        super().__init__()
        self.net, self.vae = net, vae
        self.ema = copy.deepcopy(net).requires_grad_(False) if cfg.ema_decay else None
        self.ema_decay, self.caption_dropout, self.min_snr_gamma = cfg.ema_decay, cfg.caption_dropout, cfg.min_snr_gamma
        self.diffusion = ddpm.GaussianDiffusion(dataclasses.replace(ddpm.PRESETS[cfg.schedule],
                                                                    parameterization=cfg.parameterization))
        self.register_buffer("empty_tokens", empty_tokens, persistent=False)  # (1, T) the empty prompt
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))  # optimizer steps taken (EMA warm-up)

    def forward(self, images, tokens, generator=None):
        """uint8 images (B, 3, H, W) and their captions' tokens (B, T) -> the loss summed over the batch."""
        x0 = images.float() / 127.5 - 1  # pixels in [-1, 1]
        if self.vae is not None:
            with torch.no_grad():
                x0 = self.vae.encode_to_latents(x0, generator)  # (B, 4, H/8, W/8)
        if self.training:  # classifier-free guidance: the same network learns the empty prompt too
            drop = torch.rand(len(tokens)) < self.caption_dropout
            tokens = torch.where(drop[:, None].to(tokens.device), self.empty_tokens, tokens)
        context = self.net.encode_text(tokens)  # (B, T, context_dim)
        return self.diffusion.loss(lambda x, t: self.net(x, t, context), x0, generator,
                                   self.min_snr_gamma or None, reduction="sum")

    def after_step(self):
        if self.ema is not None:
            ddpm.ema_update(self.ema, self.net, int(self.updates), self.ema_decay)
        self.updates += 1

    @torch.no_grad()
    def generate(self, tokens, seeds, sampler="ddim", steps=20, guidance_scale=3.0, size=32, eta=0.0,
                 negative_tokens=None, progress=False):
        """One image per row of tokens (B, T) and seed -> (B, 3, size, size) in [0, 1] on the CPU, drawn by the EMA
        weights; each image's randomness comes from its own generator (a seed draws the same image in any batch).
        Guidance pushes away from `negative_tokens` (B, T), by default the empty prompt it was trained on."""
        net, generators = self.ema or self.net, [torch.Generator().manual_seed(seed) for seed in seeds]
        context = net.encode_text(tokens)
        negative = self.empty_tokens.expand(len(tokens), -1) if negative_tokens is None else negative_tokens
        uncond = net.encode_text(negative) if guidance_scale > 1 else None
        channels, f = (self.vae.config.embed_dim, self.vae.downscale) if self.vae else (3, 1)
        noise = ddpm.randn((len(tokens), channels, size // f, size // f), generators, tokens.device)
        x = self.diffusion.sample(ddpm.classifier_free_guidance(net, context, uncond, guidance_scale), noise,
                                  sampler, steps, eta, generators, progress=progress)
        return ((self.vae.decode_latents(x) if self.vae else x.clamp(-1, 1)).float().cpu() + 1) / 2


def build_diffusion_model(cfg, checkpoint=None):
    """(DiffusionModel, what the checkpoint keeps to rebuild it). --sd-weights gives the VAE, SD's text tower and the
    sd15 UNet; GPT-2 comes by name or file. From a checkpoint every size is the checkpoint's and no file is read."""
    sd, root = {}, cfg.weights_dir or None
    if cfg.sd_weights and checkpoint is None:
        if not Path(cfg.sd_weights).is_file() and cfg.sd_weights not in weights.REGISTRY:
            raise FileNotFoundError(f"--sd-weights {cfg.sd_weights}: no such file, nor a registered name "
                                    f"(e.g. {PRESETS['diffusion']['sd15']['sd_weights']})")
        sd = weights.load_state_dict(cfg.sd_weights if Path(cfg.sd_weights).is_file() else
                                     weights.fetch(cfg.sd_weights, root, cfg.offline))
    saved = checkpoint["text_config"] if checkpoint else None
    if cfg.text_encoder == "clip" and not saved:
        text = CLIPTextTransformer.from_state_dict(sd)  # SD's ViT-L/14 text tower, frozen
        text_config = TextConfig.from_state_dict(text.state_dict())
    elif cfg.text_encoder in ("tiny", "clip"):  # one head per 64 channels, as in CLIP
        text_config = TextConfig(**saved) if saved else TextConfig(
            cfg.max_caption_tokens + 2, 49408, cfg.context_dim, max(1, cfg.context_dim // 64), cfg.text_layers)
        text = CLIPTextTransformer(text_config)
    else:  # GPT-2, frozen, by name or file
        text = GPTHidden(GPT(GPTConfig.from_dict(saved)) if saved else
                         GPT.from_pretrained(cfg.gpt2_weights, root=root, offline=cfg.offline))
        text_config = text.gpt.config
    if checkpoint or cfg.unet == "tiny":
        channels = 4 if cfg.latent else 3 * cfg.patch ** 2
        unet = UNetModel(UNetConfig(**checkpoint["unet_config"]) if checkpoint else UNetConfig(
            channels, channels, cfg.model_channels, tuple(map(int, cfg.channel_mult.split(","))), cfg.num_res_blocks,
            tuple(int(ds) for ds in cfg.attention_resolutions.split(",") if ds), num_heads=4,
            context_dim=cfg.context_dim, adm_in_channels=cfg.context_dim if cfg.pooled_text else 0,
            use_scale_shift_norm=cfg.scale_shift_norm))
    else:
        unet = UNetModel.from_state_dict(sd)  # the SD file's UNet, fine-tuned
    unet.gradient_checkpointing = cfg.gradient_checkpointing
    vae = (AutoencoderKL(AutoencoderConfig(**checkpoint["vae_config"])) if checkpoint else
           AutoencoderKL.from_state_dict(sd)).requires_grad_(False) if cfg.latent else None
    width = text_config.n_embd if isinstance(text, GPTHidden) else text_config.transformer_width
    net = TextConditionedUNet(unet, text.requires_grad_(cfg.text_encoder == "tiny"), width,
                              1 if cfg.latent else cfg.patch)
    model = DiffusionModel(net, cfg, text_tokenizer(cfg)([""]), vae)
    if checkpoint:
        model.load_state_dict(checkpoint["model"], strict=True)
    return model, {"unet_config": dataclasses.asdict(unet.config), "text_config": dataclasses.asdict(text_config),
                   "vae_config": vae and dataclasses.asdict(vae.config)}


def load_text_to_image(checkpoint, device="cpu"):
    """A checkpoint of the diffusion task -> (DiffusionModel in eval mode, its config, its tokenizer)."""
    cfg = TrainConfig(**checkpoint_config(checkpoint, "the text-to-image model"))
    return rebuild(build_diffusion_model, cfg, checkpoint)[0].to(device).eval(), cfg, text_tokenizer(cfg)


def image_grid(images, cols):
    """(B, 3, h, w) in [0, 1] -> one PIL image, `cols` images a row."""
    rows = math.ceil(len(images) / cols)
    images = torch.cat([images, images.new_zeros(rows * cols - len(images), *images.shape[1:])])
    grid = images.view(rows, cols, *images.shape[1:]).permute(0, 3, 1, 4, 2).flatten(2, 3).flatten(0, 1)  # (H, W, 3)
    return Image.fromarray((grid * 255).round().byte().numpy())


@torch.no_grad()
def judge_drawings(images, prompts, cfg, device):
    """Read drawings of shapes prompts back with a shapes captioner (--judge) and score them: a single object is
    drawn right when colour and shape are (the size is scored beside, in drawn_exact); two objects when both objects'
    colours and shapes are; drawn_exact asks for the whole caption (sizes, relation) in canonical form."""
    judge = read_checkpoint(cfg.judge, "caption")
    captioner, _ = load_captioner(judge, device, weights_dir=cfg.weights_dir, offline=cfg.offline)
    size = captioner.visual.config.image_resolution
    pixels = (F.interpolate(images, size=(size, size), mode="bilinear", antialias=True) if images.shape[-1] != size
              else images).mul(255).round().clamp(0, 255).byte()
    read = [c for start in range(0, len(prompts), 100) for c in caption(
        captioner, captioner.embed(pixels[start:start + 100].to(device)), GPT2Tokenizer.default(), 30)]
    scores = {1: [], 2: []}
    for prompt, text in zip(prompts, read):
        want, got = data.parse_shapes_caption(prompt), data.parse_shapes_caption(text)
        objects = [sorted((o["colour"], o["shape"]) for o in scene["objects"]) for scene in (want, got or want)]
        right = got is not None and objects[0] == objects[1]
        exact = data.canonical_shapes_caption(prompt) == data.canonical_shapes_caption(text)
        scores[len(want["objects"])].append((right, exact))
    metrics = {f"{name}_{n}": round(float(np.mean([s[k] for s in scores[n]])), 4) for n in (1, 2) if scores[n]
               for k, name in enumerate(("drawn_right", "drawn_exact"))}
    return {**metrics, "judge_exact_match": judge.get("metrics", {}).get("exact_match", math.nan)}, read


class DiffusionTask:
    """Caption -> image. A split is (dataset, image ids, images, pairs [(image row, caption)]): images are the
    cached uint8 pixels at --image-size (centre crops), or None in latent space: photos read per batch."""

    def __init__(self, cfg, rank=0, world=1, device="cpu", splits=("train", "val"), checkpoint=None):
        self.cfg, self.device, self.tokenize = cfg, torch.device(device), text_tokenizer(cfg)
        self.model, self.extra = rebuild(build_diffusion_model, cfg, checkpoint) if checkpoint else \
            build_diffusion_model(cfg)
        self.splits = {}
        for split in splits:
            dataset = open_split(cfg, split)
            ids, images, skipped = dataset.image_ids(), None, set()
            if not cfg.latent:  # pixels are small: cache them once; photos for the VAE are read per batch
                images, skipped = cached_features(dataset, None, cfg, rank, world, self.device)
            references = dataset.references()
            pairs = [(row, text) for row, image_id in enumerate(ids) if str(image_id) not in skipped
                     for text in references[image_id]]
            if not pairs:
                raise ValueError(no_images(cfg, split, dataset))
            self.splits[split] = (dataset, ids, images, pairs[:cfg.max_train_samples or None] if split == "train"
                                  else pairs)
        self.num_pairs = len(self.splits["train"][3]) if "train" in self.splits else 0
        if "train" in self.splits:  # the words its captions use (generate.py warns of a prompt's others)
            texts = {text for _, text in self.splits["train"][3]}
            self.extra["caption_words"] = sorted({word for text in texts for word in words(text)})

    def count_targets(self, pair_ids):
        return len(pair_ids)  # the loss is a mean over images

    def batch(self, pair_ids, device, split="train"):
        """(uint8 images (B, 3, S, S), tokens (B, T)); an unreadable photo is reported (data.py) and left out."""
        dataset, ids, images, pairs = self.splits[split]
        rows = [pairs[i] for i in pair_ids]
        if images is not None:
            pixels = torch.from_numpy(np.asarray(images[[row for row, _ in rows]]))
        else:
            loaded = [(dataset.load_image(ids[row]), text) for row, text in rows]
            rows = [(image, text) for image, text in loaded if image is not None]
            if not rows:
                raise ValueError(no_images(self.cfg, split, dataset))
            pixels = torch.stack([resize_crop(image, self.cfg.image_size) for image, _ in rows])
        return pixels.to(device), self.tokenize([text for _, text in rows]).to(device)

    @torch.no_grad()
    def evaluate(self, model, split="val", batch_size=100):
        """Validation loss (fixed noise and timesteps), a grid of samples saved under out_dir/samples, and with
        --judge the held-out prompts drawn and read back by a shapes captioner."""
        cfg, was_training = self.cfg, model.training
        model.eval()
        pairs, generator = self.splits[split][3], torch.Generator().manual_seed(cfg.seed)
        loss = sum(model(*self.batch(range(s, min(s + batch_size, len(pairs))), self.device, split), generator).item()
                   for s in range(0, len(pairs), batch_size))
        metrics = {"val_loss": round(loss / len(pairs), 5)}
        prompts = [text for _, text in pairs[:cfg.num_judged if cfg.judge else 16]]
        images = torch.cat([model.generate(self.tokenize(prompts[s:s + batch_size]).to(self.device),
                                           range(s, min(s + batch_size, len(prompts))), cfg.sampler,
                                           cfg.sampling_steps, cfg.guidance_scale, cfg.image_size)
                            for s in range(0, len(prompts), batch_size)])
        path = Path(cfg.out_dir) / "samples" / f"step-{int(model.updates):06d}.png"
        path.parent.mkdir(exist_ok=True)
        image_grid(images[:16], 4).save(path)
        if cfg.judge:
            judged, read = judge_drawings(images, prompts, cfg, self.device)
            metrics.update(judged)
            print(f"  drawn right, as {cfg.judge} reads {len(prompts)} held-out prompts back: single objects "
                  f"{judged.get('drawn_right_1', math.nan):.1%} (colour and shape), two objects "
                  f"{judged.get('drawn_right_2', math.nan):.1%} (both); the judge's exact match "
                  f"{judged['judge_exact_match']:.1%}", flush=True)
        for k, prompt in enumerate(prompts[:4]):
            print(f"  {prompt!r:56}" + (f" read back: {read[k]!r}" if cfg.judge else ""), flush=True)
        print(f"  samples of the first 16 prompts: {path}", flush=True)
        model.train(was_training)
        return metrics

# -----------------------------------------------------------------------------------------------------------------
# Command line


class Parser(argparse.ArgumentParser):
    """argparse with its errors in one line: the usage of 80 flags would bury them."""

    def error(self, message):
        self.exit(2, f"train.py: error: {message}\n")


def read_checkpoint(path, task=None):
    """A checkpoint of train.py, read as data (weights/' restricted reader: no code runs), of `task` if given;
    anything else is one ValueError naming the file."""
    try:
        checkpoint = weights.load_checkpoint(path)
    except Exception as error:  # truncated, not a checkpoint, unsafe: whatever the reader found
        reason = str(error).removeprefix(f"{path}: ")
        raise ValueError(f"{path} is not a readable checkpoint: {reason}") from None
    kind = checkpoint.get("task") if isinstance(checkpoint, dict) else None
    if kind not in PRESETS or not isinstance(checkpoint.get("config"), dict) or "model" not in checkpoint:
        raise ValueError(f"{path} is not a checkpoint of train.py")
    if task and kind != task:
        raise ValueError(f"{path} is a checkpoint of train.py --task {kind}, not --task {task}")
    return checkpoint


def checkpoint_config(checkpoint, path, given=()):
    """A checkpoint's flags, read as data: TrainConfig's names, types and choices, none of LOCAL, sizes within
    BOUNDS; a frozen tower's file it names (not holds) must be `given` again. Checkpoints from before the
    -weights flags read too (--image-tower ViT-B/32, --language-model gpt2-medium)."""
    config, types = dict(checkpoint["config"]), {f.name: type(f.default) for f in fields(TrainConfig)}
    for choice, name, family in (("image_tower", "clip_weights", "clip"),
                                 ("text_encoder", "gpt2_weights", "gpt2"),
                                 ("language_model", "gpt2_weights", "gpt2")):
        if name not in config and config.get(choice, "tiny") not in ("tiny", "clip"):
            config[choice], config[name] = family, config[choice]
    config = {k: v for k, v in config.items() if k in types and k not in LOCAL}
    wrong = [k for k, v in config.items() if type(v) is not types[k] and (types[k], type(v)) != (float, int)]
    wrong += [k for k, bound in BOUNDS.items() if k in config and not 0 <= config[k] <= bound]
    wrong += [f.name for f in fields(TrainConfig) if f.metadata["choices"] and config.get(f.name, f.default)
              not in f.metadata["choices"]]
    if wrong:
        raise ValueError(f"{path}: its config holds values of the wrong type or size: {sorted(wrong)}")
    if config.get("image_tower") == "clip" and config["clip_weights"] != TrainConfig.clip_weights and \
            "clip_weights" not in given:
        raise FileNotFoundError(f"{path}'s frozen image tower is the file {config['clip_weights']}, which it "
                                "does not hold: give it as --clip-weights")
    return config


def config_error(cfg):
    """The first thing wrong with a configuration, or None."""
    for bad, message in [
            (min(cfg.batch_size, cfg.grad_accum, cfg.prefix_length, cfg.eval_every, cfg.log_every,
                 cfg.num_beams) < 1,
             "--batch-size, --grad-accum, --prefix-length, --eval-every, --log-every, --num-beams must be "
             ">= 1"),
            (cfg.lr <= 0 or cfg.epochs <= 0 or min(cfg.warmup_steps, cfg.minutes, cfg.stop_after) < 0,
             "--lr, --epochs must be > 0, --warmup-steps, --minutes, --stop-after >= 0"),
            (cfg.closed_vocab and cfg.language_model != "tiny", "--closed-vocab needs --language-model tiny"),
            (cfg.image_tower == "tiny" and cfg.image_size % cfg.patch_size,
             "--patch-size must divide --image-size"),
            (not cfg.sd_weights and (cfg.latent or cfg.text_encoder == "clip" or cfg.unet == "sd15"),
             "--latent, --text-encoder clip and --unet sd15 need --sd-weights (an SD 1.x file)"),
            (cfg.split == "test" and cfg.data in data.NO_TEST_SPLIT,
             f"--split test: {data.NO_TEST_SPLIT.get(cfg.data)}"),
            (cfg.data == "folder" and not cfg.data_root,
             "--data folder needs --data-root DIR (images, captions file)"),
            (cfg.offline and cfg.download, "--offline never downloads: leave out --download")]:
        if bad:
            return message


EVAL_FLAGS = LOCAL | {"data", "split", "num_beams", "max_val_samples", "max_caption_tokens", "num_judged",
                      "sampler", "sampling_steps", "guidance_scale", "clip_weights"}


def parse_config(argv=None):
    """Flags from TrainConfig's fields -> (config, the flags given, the checkpoint of --resume or --eval).
    Precedence: defaults < preset < --smoke-test < the checkpoint's config (never its LOCAL flags) < the flags
    given; --help shows each default and what every preset sets."""
    presets = "\n".join(textwrap.fill(f"--task {t} --preset {p}: " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in values.items()), 110, initial_indent="  ",
        subsequent_indent="    ") for t in PRESETS for p, values in PRESETS[t].items())
    parser = Parser(description="Train minimodal's models: --task caption (ClipCap) or diffusion.",
                    epilog=f"presets (the flags each one sets):\n{presets}",
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(TrainConfig):
        kind = dict(action=argparse.BooleanOptionalAction) if type(f.default) is bool else \
            dict(type=type(f.default), choices=f.metadata["choices"])
        parser.add_argument("--" + f.name.replace("_", "-"), default=argparse.SUPPRESS, **kind,
                            help=f"{f.metadata['help']} (default: {f.default if f.default != '' else '-'})")
    given = vars(parser.parse_args(argv))
    path, checkpoint, stored = given.get("resume") or given.get("eval"), None, {}
    if given.get("resume") and given.get("eval"):
        parser.error("--resume continues a run, --eval scores one: give one of them")
    if path:
        if not Path(path).is_file():
            parser.error(f"no such checkpoint: {path}")
        checkpoint = read_checkpoint(path)
        stored = checkpoint_config(checkpoint, path, given)
        not_for_eval = sorted(set(given) - EVAL_FLAGS) if given.get("eval") else []
        if not_for_eval or given.get("task", stored["task"]) != stored["task"]:
            flags = ", ".join("--" + k.replace("_", "-") for k in not_for_eval or ["task"])
            parser.error(f"{path} is a --task {stored['task']} checkpoint, scored as it was trained: {flags} "
                         "do not apply")
        given.setdefault("out_dir", str(Path(path).parent))  # the checkpoint's own folder, never one it names
    task = stored.get("task", given.get("task", TrainConfig.task))
    preset = stored.get("preset", given.get("preset", TrainConfig.preset))
    if preset not in PRESETS.get(task, {}):
        parser.error(f"--task/--preset must be one of {[(t, p) for t in PRESETS for p in PRESETS[t]]}")
    smoke_test = SMOKE_TEST if given.get("smoke_test") else {}
    cfg = TrainConfig(**{**PRESETS[task][preset], **smoke_test, **stored, **given})
    if message := config_error(cfg):
        parser.error(message)
    out = Path(cfg.out_dir)  # a new run never replaces a run's checkpoint and log, unless told to
    held = [name for name in ("ckpt.pt", "log.jsonl") if (out / name).exists()]
    if held and not (cfg.eval or cfg.overwrite or out.resolve() == Path(path or ".").resolve().parent):
        resume = f"--resume {out / 'ckpt.pt'} continues it, " if "ckpt.pt" in held else ""
        parser.error(f"{out} holds a run ({', '.join(held)}): {resume}another --out-dir starts a new one, "
                     "--overwrite replaces it")
    return cfg, given, checkpoint


def evaluate_checkpoint(cfg, checkpoint):
    """Score a checkpoint on one split: a captioner's BLEU-1..4 and CIDEr-D, with the split, decoding and
    training behind them; a text-to-image model's validation loss and samples, and with --judge its prompts
    read back."""
    diffusion = checkpoint["task"] == "diffusion"
    task = (DiffusionTask if diffusion else CaptionTask)(cfg, device=cfg.device, splits=(cfg.split,),
                                                          checkpoint=checkpoint)
    metrics = task.evaluate(task.model.to(cfg.device), cfg.split)
    beams = "greedy" if cfg.num_beams == 1 else f"beam search, {cfg.num_beams} beams"
    print(f"checkpoint {cfg.eval}: step {checkpoint['step']} of {cfg.epochs:g} epochs on {cfg.data} (preset "
          f"{cfg.preset}" + ("" if diffusion else f", {cfg.mapping_type} mapper, GPT-2 "
                             f"{'frozen' if cfg.freeze_gpt else 'trained'}") + ")\n"
          f"split: {cfg.data} {cfg.split}, {len(task.splits[cfg.split][0].image_ids())} images | " + (
              f"sampler {cfg.sampler}, {cfg.sampling_steps} steps, guidance {cfg.guidance_scale:g}"
              if diffusion else f"decoding: {beams}, at most {cfg.max_caption_tokens} tokens") + "\n" +
          "  ".join(f"{k} {v}" if diffusion or k == "val_loss" else f"{k} {v * 100:.1f}"
                    for k, v in metrics.items()))
    if not diffusion:
        print(f"compare with: {clipcap_row(cfg)}")
    return metrics


def main(argv=None):
    """The command line. The project's own errors print one line (--traceback: the whole traceback) and exit
    with 2 for a usage problem (a flag, a missing file or folder) or 1 for a failure."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return run(argv)
    except (OSError, ValueError, pickle.UnpicklingError, weights.WeightsUnavailable, MemoryError) as error:
        if "--traceback" in argv:
            raise
        print(f"train.py: error: {error or type(error).__name__}", file=sys.stderr)
        raise SystemExit(2 if isinstance(error, FileNotFoundError) else 1) from None


def run(argv):
    cfg, given, checkpoint = parse_config(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)  # the one seed: initialisation (equal on every rank); data order follows
    if cfg.eval:
        return evaluate_checkpoint(cfg, checkpoint)
    rank, world, device = setup_distributed(cfg)
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ValueError(f"--batch-size {cfg.batch_size} must divide by processes ({world}) x --grad-accum")
    with own_out_dir(cfg, checkpoint) if rank == 0 else contextlib.nullcontext():
        Task = DiffusionTask if cfg.task == "diffusion" else CaptionTask
        task = Task(cfg, rank, world, device, checkpoint=checkpoint)
        if rank == 0:
            trained, frozen = (sum(p.numel() for p in task.model.parameters() if p.requires_grad == t)
                               for t in (True, False))
            print(json.dumps(dataclasses.asdict(cfg)))
            print(f"{task.num_pairs:,} training pairs; parameters: {trained:,} trained, {frozen:,} frozen")
        result = train(task, cfg, rank, world, device, checkpoint)
    if world > 1:
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
