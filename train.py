"""Training minimodal's models: the image captioner (--task caption), text-to-image ones (--task diffusion).

The captioner is ClipCap (Mokady et al. 2021, github.com/rmokady/CLIP_prefix_caption): an image tower (vit.py:
frozen CLIP, or a tiny one that trains) embeds each image, a mapper makes a prefix of GPT-2 input vectors of
it, and GPT-2 learns to continue the prefix with the caption (gpt2.py, GPT-2 Vision).

    python train.py --task caption --preset shapes        # tiny tower, tiny GPT-2: minutes on a CPU
    python train.py --task caption --preset coco --data-root data/coco  # ClipCap's COCO recipe (Karpathy)
    python train.py --eval runs/caption/ckpt.pt --split test            # BLEU-1..4, CIDEr-D of a checkpoint
    python train.py --preset coco --captioner coco --data folder ...    # fine-tune ClipCap's released one
    torchrun --nproc_per_node 2 train.py --task caption ...             # DistributedDataParallel

Text to image (Rombach et al. 2022, at any size): unet.py's UNet cross-attends to a text encoder (a tiny
CLIP-style one trained with it, SD's frozen CLIP tower, or frozen GPT-2) and learns ddpm.py's loss, in pixels
or in the frozen SD VAE's latents; captions are dropped 10 % of the time for classifier-free guidance (Ho &
Salimans 2022), and an EMA of the weights draws the samples.

    python train.py --task diffusion --preset shapes --judge runs/caption/ckpt.pt   # minutes on a CPU, judged
    python train.py --task diffusion --preset photos --data-root data/coco          # COCO, SD's latent space
    python train.py --task diffusion --preset sd15 --data-root my_images/           # fine-tune SD 1.5 itself

Top to bottom: the flags (a dataclass for the harness, one per task) and presets; the harness, which sees a
task only through the Task interface; the caption task; the text-to-image task; the command line. Datasets,
splits and caches are data.py's; a checkpoint's models are rebuilt by their own files from the configs stored
beside their weights, never through these flags; what reads flags and checkpoints and reports a run (flag,
flag_parser, stored_flags, eval_report, start_of_run, end_of_run) is weights/checkpoints.py's.
"""
import contextlib
import dataclasses
import math
import os
import re
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

import data
import ddpm
import weights
from clip import caption_scores, load_visual, read_back
from gpt2 import CLIPCAP, END_OF_TEXT, GPT, Captioner, CaptionerConfig, GPTConfig
from tokenizer import GPT2Tokenizer
from unet import TEXT_ENCODERS, TextConditionedUNet, UNetConfig
from vae import AutoencoderKL
from vit import PRECISION_HELP, PRECISIONS, VisionConfig, VisionTransformer, resolve_precision
from weights import flag

# -----------------------------------------------------------------------------------------------------------
# The flags: a field each, declared by weights.flag (its help, choices, and role: "local" = this run's own,
# never read from a checkpoint; "scoring" = may change with --eval; most = the largest value a checkpoint may
# ask for), which weights.stored_flags checks a checkpoint's flags against


@dataclass
class TrainConfig:  # the harness's, and what both tasks read
    task: str = flag("caption", "caption: image -> caption; diffusion: caption -> image", weights.TASKS)
    preset: str = flag("shapes", "starting values of the flags, listed below")
    data: str = flag("shapes", "coco: 2017; karpathy: COCO, Karpathy's splits",
                     ("shapes", "coco", "karpathy", "folder", "cifar100"), "scoring")
    data_root: str = flag("", "dataset folder (karpathy: with dataset_coco.json)", None, "local")
    download: bool = flag(False, "fetch the official archives (COCO, Karpathy's, CIFAR-100)", None, "local")
    split: str = flag("val", "--eval's split (test: shapes, karpathy, cifar100)", ("val", "test"), "scoring")
    max_train_samples: int = flag(0, "at most this many training pairs (0 = all; shapes: drawn)", most=10**7)
    two_objects: float = flag(0.5, "shapes: two-object share of training scenes (held out: half)", most=1)
    max_val_samples: int = flag(500, "evaluate on at most this many images", None, "scoring", 10**7)
    image_size: int = flag(32, "image side: shapes drawn, a tiny tower's input, drawings", least=1, most=4096)
    max_caption_tokens: int = flag(30, "captions cut to this many tokens; captioning stops there", None,
                                   "scoring", 1000, least=1)
    gpt2_weights: str = flag("gpt2", "GPT-2 weights: gpt2, gpt2-medium, -large, -xl (fetched) or a file")
    out_dir: str = flag("runs/caption", "log, ckpt.pt, cache (--resume/--eval: ckpt's folder)", None, "local")
    overwrite: bool = flag(False, "start afresh in an --out-dir holding a run (its files go)", None, "local")
    resume: str = flag("", "continue this checkpoint: model, optimizer, step, random state", None, "local")
    eval: str = flag("", "score this checkpoint (or ClipCap's coco, conceptual) on --split", None, "local")
    stop_after: int = flag(0, "end after this many steps, checkpointed (--resume continues)", None, "local")
    weights_dir: str = flag("", "official weights (none: $MINIMODAL_WEIGHTS, else weights/)", None, "local")
    offline: bool = flag(False, "never download (weights, data): say which file to put where", None, "local")
    batch_size: int = flag(64, "pairs per optimizer step (all processes, micro-batches)", least=1, most=10**5)
    grad_accum: int = flag(1, "micro-batches per step: the same step in less memory", least=1)
    epochs: float = flag(1.0, "passes over the training pairs")
    minutes: float = flag(0.0, "fit the run into this many training minutes (evaluations left out): the "
                          "cosine schedule ends where they run out, at most --epochs (0: off)")
    lr: float = flag(2e-3, "peak learning rate of AdamW")
    warmup_steps: int = flag(100, "steps of linear warm-up from 0 to --lr")
    weight_decay: float = flag(0.01, "AdamW weight decay, matrices only")
    grad_clip: float = flag(1.0, "clip the gradient's global norm to this (0 = off)")
    precision: str = flag("fp32", PRECISION_HELP + "; bf16 and fp16 by autocast, fp16 with a gradient scaler",
                          ("auto", *PRECISIONS))
    eval_every: int = flag(500, "evaluate and checkpoint every this many steps, and at the end", least=1)
    log_every: int = flag(50, "log the training loss every this many steps", least=1)
    seed: int = flag(0, "the one seed: initialisation, data order, shapes drawn", most=2**32 - 1)
    device: str = flag("cuda" if torch.cuda.is_available() else "cpu", "cpu, cuda, cuda:1", None, "local")
    threads: int = flag(0, "CPU threads for torch (0 = torch's default)", None, "local")
    threads_after: str = flag("", "take every CPU when the run beside it (this folder) ends", None, "local")
    compile: bool = flag(False, "torch.compile the model")
    smoke_test: bool = flag(False, "a quick run: tiny models, 256 pairs, 32 validation images", None, "local")
    traceback: bool = flag(False, "on an error, the whole traceback instead of one line", None, "local")

    def error(self):
        """The first thing wrong with these flags, or None."""
        if self.lr <= 0 or self.epochs <= 0:  # the other numbers' bounds are their flags' (weights.flag)
            return "--lr and --epochs must be > 0"
        if self.split == "test" and self.data in data.NO_TEST_SPLIT:
            return f"--split test: {data.NO_TEST_SPLIT[self.data]}"
        if self.data == "folder" and not self.data_root:
            return "--data folder needs --data-root DIR (images, captions file)"
        if self.offline and self.download:
            return "--offline never downloads: leave out --download"


@dataclass
class CaptionConfig:
    image_tower: str = flag("tiny", "tiny: trained with the captioner; clip: --clip-weights, frozen",
                            ("tiny", "clip"))
    clip_weights: str = flag("ViT-B/32", "CLIP weights: ViT-B/32 (fetched) or a CLIP file", None, "scoring")
    language_model: str = flag("tiny", "tiny: from scratch; gpt2: --gpt2-weights", ("tiny", "gpt2"))
    freeze_gpt: bool = flag(False, "train the mapper only (ClipCap's --only_prefix)")
    closed_vocab: bool = flag(False, "tiny GPT-2: unused tokens keep a 0 embedding (exact, fewer rows)")
    mapping_type: str = flag("mlp", "mlp, transformer: ClipCap's; tokens: one per tower token (LLaVA-1.5)",
                             ("mlp", "transformer", "tokens"))
    prefix_length: int = flag(4, "image vectors GPT-2 reads before the caption (tokens: the tower's tokens)",
                              least=1, most=1000)
    mapper_layers: int = flag(8, "transformer mapper: blocks", most=100)
    patch_size: int = flag(8, "tiny tower: patch size", least=1)
    vision_width: int = flag(128, "tiny tower: width (a head per 64 channels: CLIP's)", least=1, most=4096)
    vision_layers: int = flag(3, "tiny tower: blocks", most=100)
    embed_dim: int = flag(128, "tiny tower: width of the image embedding", least=1, most=4096)
    n_embd: int = flag(64, "tiny GPT-2: width", least=1, most=4096)
    n_layer: int = flag(2, "tiny GPT-2: blocks", least=1, most=100)
    n_head: int = flag(2, "tiny GPT-2: heads", least=1, most=4096)
    num_beams: int = flag(1, "eval decoding: 1 = greedy, more = beams", None, "scoring", least=1, most=100)
    captioner: str = flag("", "start from ClipCap's captioner: coco, conceptual (fetched) or its file")

    def error(self, cfg):
        """The first thing wrong with these flags (and the harness's `cfg`), or None."""
        if self.language_model == "tiny" and self.n_embd % self.n_head:
            return "--n-embd must be a multiple of --n-head"
        if self.closed_vocab and self.language_model != "tiny":
            return "--closed-vocab needs --language-model tiny"
        if self.captioner and self.image_tower != "clip":
            return "--captioner: ClipCap's captioners read CLIP ViT-B/32 embeddings: give --image-tower clip"
        if self.image_tower == "tiny" and cfg.image_size % self.patch_size:
            return "--patch-size must divide --image-size"


@dataclass
class TextToImageConfig:
    text_encoder: str = flag("tiny", "tiny: CLIP-style, trained; clip: SD's (--sd-weights); gpt2: "
                             "--gpt2-weights; the last two frozen", TEXT_ENCODERS)
    sd_weights: str = flag("", "SD 1.x weights, a file or registered name: the VAE, text tower, UNet")
    latent: bool = flag(False, "diffuse in the frozen SD VAE's latent space (8x smaller) instead of pixels")
    unet: str = flag("tiny", "tiny: sized below, new; sd15: --sd-weights', fine-tuned", ("tiny", "sd15"))
    model_channels: int = flag(32, "tiny UNet: channels of the first level", least=1, most=4096)
    channel_mult: str = flag("1,2", "tiny UNet: channel multiplier of each level")
    attention_resolutions: str = flag("2", "tiny UNet: downsamplings with attention (\"\": the middle only)")
    num_res_blocks: int = flag(1, "tiny UNet: ResBlocks per level", most=100)
    context_dim: int = flag(64, "tiny UNet, tiny text encoder: width of the text context", least=1, most=4096)
    pooled_text: bool = flag(False, "tiny UNet: the text at the first end-of-text joins the timestep (SDXL)")
    scale_shift_norm: bool = flag(False, "tiny UNet: the embedding scales and shifts each ResBlock (ADM)")
    text_layers: int = flag(2, "tiny text encoder: blocks", most=100)
    patch: int = flag(2, "pixel space: denoise patch x patch pixels as channels (2: 32x32 costs 16x16)",
                      least=1, most=64)
    schedule: str = flag("cosine", "noise schedule, a ddpm.py preset", tuple(ddpm.PRESETS))
    parameterization: str = flag("eps", "the UNet predicts eps (the noise) or v", ("eps", "v"))
    min_snr_gamma: float = flag(5.0, "Min-SNR loss weighting gamma (0 = the plain mean squared error)")
    caption_dropout: float = flag(0.1, "empty prompts' share of training (classifier-free guidance)", most=1)
    ema_decay: float = flag(0.999, "EMA of the weights, which draws the samples (0 = none)", most=1)
    gradient_checkpointing: bool = flag(False, "recompute the UNet's activations in backward: less memory")
    sampler: str = flag("ddim", "evaluation samples: the sampler", ddpm.SAMPLERS, "scoring")
    sampling_steps: int = flag(20, "evaluation samples: sampler steps", None, "scoring", least=1,
                               most=1000)
    guidance_scale: float = flag(3.0, "evaluation samples: classifier-free guidance scale", None, "scoring",
                                 most=1000)
    s_noise: float = flag(1.0, "evaluation samples: DDPM's fresh noise times this", None, "scoring",
                          most=1000)
    judge: str = flag("", "a shapes captioner checkpoint: it reads held-out prompts drawn", None, "local")
    num_judged: int = flag(200, "--judge: held-out prompts drawn", None, "scoring", 10**5)

    def error(self, cfg):
        if not self.sd_weights and (self.latent or self.text_encoder == "clip" or self.unet == "sd15"):
            return "--latent, --text-encoder clip and --unet sd15 need --sd-weights (an SD 1.x file)"
        side, levels = 8 if self.latent else self.patch, len(self.channel_mult.split(","))
        if self.unet == "tiny" and cfg.image_size % (n := side * 2 ** (levels - 1)):  # the UNet halves it
            return f"--image-size must be a multiple of {n}: / {side} (--patch, VAE), halved {levels - 1}x"


PRESETS = {"caption": {  # what each preset measured, and why it is set so: README.md, "What to expect"
    # tiny tower (sine-cosine positions) and tiny GPT-2 from scratch; every tower token a prefix vector
    "shapes": dict(closed_vocab=True, vision_width=64, vision_layers=2, embed_dim=64, lr=2e-3,
                   max_train_samples=64_000, mapping_type="tokens", epochs=9.0, eval_every=1000),
    # ClipCap's COCO recipe (paper sec. 4, official train.py): ViT-B/32, GPT-2 124M fine-tuned, MLP mapper
    "coco": dict(data="karpathy", image_tower="clip", language_model="gpt2", prefix_length=10, batch_size=40,
                 lr=2e-5, warmup_steps=5000, epochs=10.0, eval_every=5000, log_every=100, closed_vocab=False),
}, "diffusion": {
    # the tour: 24x24 pixels as 8x8x27 patches, 1.1M UNet attending at 4x4, FiLM, no EMA, 80 % two objects
    "shapes": dict(out_dir="runs/diffusion", batch_size=32, lr=2e-3, warmup_steps=50, image_size=24, patch=3,
                   max_train_samples=384_000, minutes=13.0, precision="auto", pooled_text=True,
                   scale_shift_norm=True, parameterization="v", min_snr_gamma=1.0, ema_decay=0.0,
                   eval_every=1000, max_val_samples=200, max_caption_tokens=14, sampler="ddpm",
                   sampling_steps=75, guidance_scale=2.0, s_noise=0.7, two_objects=0.8),
    # COCO (or --data folder) at 256x256 in SD's latent space (32x32x4), SD's frozen text tower, a 100M UNet
    "photos": dict(data="coco", out_dir="runs/diffusion-photos",
                   sd_weights="sd15/v1-5-pruned-emaonly.safetensors", latent=True, text_encoder="clip",
                   image_size=256, model_channels=128, channel_mult="1,2,4", attention_resolutions="4,2",
                   num_res_blocks=2, context_dim=768, schedule="sd15", batch_size=64, lr=1e-4,
                   warmup_steps=1000, epochs=10.0, eval_every=2000, max_val_samples=500,
                   max_caption_tokens=75, sampler="dpm++2m", sampling_steps=25, guidance_scale=5.0,
                   ema_decay=0.9999),
    # fine-tune SD 1.5 itself on a folder of your images and captions at 512x512
    "sd15": dict(data="folder", out_dir="runs/sd15", sd_weights="sd15/v1-5-pruned-emaonly.safetensors",
                 latent=True, text_encoder="clip", unet="sd15", image_size=512, schedule="sd15",
                 min_snr_gamma=0.0, ema_decay=0.0, batch_size=8, lr=1e-5, warmup_steps=100, epochs=10.0,
                 eval_every=500, max_val_samples=16, max_caption_tokens=75, precision="bf16",
                 gradient_checkpointing=True, sampling_steps=50, guidance_scale=7.5)}}
SMOKE_TEST = dict(image_tower="tiny", language_model="tiny", max_train_samples=256, max_val_samples=32,
                  batch_size=16, epochs=1.0, minutes=0.0, warmup_steps=2, log_every=4, sampling_steps=2,
                  num_judged=16)

# -----------------------------------------------------------------------------------------------------------
# The harness: what both tasks share


class Task:
    """All the harness knows of a task (CaptionTask, TextToImageTask): config, its flags; model, the module
    that trains, model(*batch) the loss summed over the batch; num_pairs, the training pairs (an epoch);
    extra, what a checkpoint keeps beside the weights (the models' configs); batch(pair_ids, device), those
    pairs as the model's inputs; count_targets(pair_ids), what the whole batch's summed loss is divided by;
    evaluate(model, split), metrics (called in eval mode, without gradients); after_step(), what follows
    each optimizer step. What both tasks share is here: their flags, device and splits."""
    model: nn.Module
    extra: dict

    def __init__(self, cfg, config, device):
        self.cfg, self.config, self.device = cfg, config, torch.device(device)

    def open_splits(self, splits, encode=str, tower=None, rank=0, world=1, tokens=False):
        """self.splits[split] = (dataset, inputs, pairs, references) of each split (data.open_pairs): inputs
        are cached in out_dir/cache (rank 0 writes, then every rank maps them)."""
        if rank > 0:
            dist.barrier()  # rank 0 writes the caches first
        self.splits = {s: data.open_pairs(self.cfg, s, tower, tokens, self.device, encode) for s in splits}
        if rank == 0 and world > 1:
            dist.barrier()
        self.num_pairs = len(self.splits["train"][2]) if "train" in self.splits else 0

    def batch(self, pair_ids, device): ...
    def evaluate(self, model, split): ...

    def count_targets(self, pair_ids):
        return len(pair_ids)  # one target a pair (text to image: the loss is a mean over images)

    def after_step(self):
        pass


def lr_at(step, total_steps, cfg):
    """Linear warm-up to cfg.lr, then half a cosine down to 0 at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


def setup_distributed(cfg):
    """(rank, world size, device). Under torchrun (RANK set): a process per GPU with NCCL, or gloo on CPUs."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device(cfg.device)
    dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
    device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if cfg.device.startswith("cuda") else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


@torch.no_grad()
def evaluate(task, model, split="val"):
    model.eval()
    metrics = task.evaluate(model, split)
    model.train()
    return metrics


UNTIMED_STEPS = 5  # --minutes: a process's first steps (compilation, allocation, kernel choice) are not timed


def train(task: Task, cfg: TrainConfig, rank=0, world=1, device=torch.device("cpu"), checkpoint=None,
          clock=time.perf_counter):
    """The loop. The batch of step s is fixed by (seed, epoch, s) alone and every micro-batch divides its
    summed loss by the batch's target count, so 1 process equals N processes equals N micro-batches, and a
    resumed run (`checkpoint`: optimizer, scaler, step, random state; the task's model) equals an
    uninterrupted one. `clock` keeps the training time (evaluations left out) for the log and --minutes.
    Sanity check, one batch overfitted: --max-train-samples 64 --batch-size 64 --epochs 300 (loss -> 0)."""
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
    if checkpoint:  # the optimizer, the scaler and the random state where they were
        step, earlier_seconds = weights.resume_run(checkpoint, optimizer, scaler, cfg.resume)
    budget = cfg.minutes * 60 - earlier_seconds
    if cfg.minutes and budget <= 0:
        total_steps = step  # its time budget is spent
    runner = DistributedDataParallel(model) if world > 1 else model
    runner = torch.compile(runner) if cfg.compile else runner
    autocast = dict(device_type=device.type, dtype=PRECISIONS[precision], enabled=precision != "fp32")
    micro = cfg.batch_size // (world * cfg.grad_accum)
    first_step, started, eval_seconds, timed, metrics, loss_sum = step, clock(), 0.0, None, {}, math.nan
    waiting, anchor, began, rate = cfg.threads_after, step, time.time(), math.inf  # --threads-after; the pace
    while step < total_steps:
        # this step's batch: one permutation per epoch, fixed by the seed; each rank takes every world-th pair
        epoch, position = divmod(step, steps_per_epoch)
        order = torch.randperm(task.num_pairs, generator=torch.Generator().manual_seed(cfg.seed + epoch))
        batch = order[position * cfg.batch_size:(position + 1) * cfg.batch_size].tolist()
        num_targets, mine = task.count_targets(batch), batch[rank::world]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total_steps, cfg)
        # forward and backward per micro-batch; DDP synchronises the gradients on the last one only
        loss_sum = 0.0
        for k in range(cfg.grad_accum):
            inputs = task.batch(mine[k * micro:(k + 1) * micro], device)
            last = k == cfg.grad_accum - 1
            with runner.no_sync() if world > 1 and not last else contextlib.nullcontext():
                with torch.autocast(**autocast):
                    loss = runner(*inputs) / num_targets
                scaler.scale(loss * world).backward()  # DDP averages over ranks; the loss is a sum over them
            loss_sum += loss.item()
        # clip the gradient, step the optimizer (and fp16's scaler), flush the gradients; then the task's turn
        scaler.unscale_(optimizer)
        grad_norm = float(nn.utils.clip_grad_norm_(trainable, cfg.grad_clip or float("inf")))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        task.after_step()
        step += 1
        if world > 1:  # each rank saw part of the batch: add the parts
            dist.all_reduce(loss_sum := torch.tensor(loss_sum, device=device))
            loss_sum = loss_sum.item()
        # --minutes: the steps that fit in the time left at the timed steps' pace (rank 0's clock decides)
        seconds = clock() - started - eval_seconds  # this process's training time, evaluations left out
        if cfg.minutes:
            timed = (seconds, step) if step - anchor == UNTIMED_STEPS else timed  # (re)timed from here on
            rate = (step - timed[1]) / (seconds - timed[0]) if timed and seconds > timed[0] else rate
            more = 0 if seconds >= budget else int(min((budget - seconds) * rate, max_steps))
            fits = min(max_steps, step + more)
            if world > 1:
                dist.broadcast(fits := torch.tensor(fits, device=device), 0)
            total_steps = max(step, int(fits))
        # log the training loss
        if rank == 0 and (step % cfg.log_every == 0 or step in (1, total_steps)):
            weights.log_record(cfg.out_dir, {
                "step": step, "epoch": round(step / steps_per_epoch, 3), "loss": round(loss_sum, 5),
                "lr": round(optimizer.param_groups[0]["lr"], 8), "grad_norm": round(grad_norm, 4),
                "pairs_per_s": round((step - first_step) * cfg.batch_size / max(seconds, 1e-9), 1),
                "minutes": round((earlier_seconds + seconds) / 60, 2),
                "cpu_minutes": round(time.process_time() / 60, 2)})
        if waiting and step % cfg.log_every == 0 and weights.run_ended(waiting, began):
            torch.set_num_threads(os.cpu_count() or 1)  # that run's CPUs are free: the pace is timed again
            waiting, anchor = "", step
        # evaluate when due; checkpoint then and at --stop-after (atomic; the clock stops meanwhile)
        stopping = cfg.stop_after and step - first_step >= cfg.stop_after
        due = step % cfg.eval_every == 0 or step == total_steps
        if (due or stopping) and rank == 0:
            evaluated = clock()
            if due:
                metrics = evaluate(task, model)
                minutes = round((earlier_seconds + seconds) / 60, 2)
                weights.log_record(cfg.out_dir, {"step": step, "minutes": minutes, **metrics})
            weights.save_run(Path(cfg.out_dir) / "ckpt.pt", model, optimizer, scaler, step, task=cfg.task,
                             config={**dataclasses.asdict(cfg), **dataclasses.asdict(task.config)},
                             metrics=metrics, total_steps=total_steps,
                             train_seconds=earlier_seconds + seconds, **task.extra)  # and the models' configs
            weights.draw_log(cfg.out_dir)  # loss_curve.png beside the log, redrawn from all of it
            eval_seconds += clock() - evaluated
        if (due or stopping) and world > 1:
            dist.barrier()
        if stopping:
            break
    if rank == 0 and step > first_step:
        print(weights.end_of_run(cfg, step, total_steps, max_steps, steps_per_epoch,
                                 earlier_seconds + seconds, eval_seconds))
    return model, loss_sum


# -----------------------------------------------------------------------------------------------------------
# The caption task


class CaptionTask(Task):
    """Image -> caption (ClipCap). Its inputs are a frozen tower's cached embeddings, or cached pixels for
    a tower that trains; a checkpoint's captioner is rebuilt by gpt2.py (Captioner.from_checkpoint)."""

    def __init__(self, cfg, config, rank=0, world=1, device="cpu", splits=("train", "val"), checkpoint=None):
        super().__init__(cfg, config, device)
        self.model = checkpoint and Captioner.from_checkpoint(checkpoint)  # first: a bad one fails fast
        frozen = None if config.image_tower == "tiny" else load_visual(
            config.clip_weights, cfg.weights_dir or None, cfg.offline).requires_grad_(False).eval()
        if checkpoint and frozen and dataclasses.asdict(frozen.config) != checkpoint["vision_config"]:
            raise ValueError(f"--clip-weights {config.clip_weights}: not the tower the captioner had")
        self.tokenizer, encoded = GPT2Tokenizer.default(), {}  # many captions repeat: encode each once

        def encode(caption):  # ClipCap's captioners stop at "." (no end token): a caption without one gets it
            ends = not config.captioner or caption.rstrip().endswith(".")
            text = caption if ends else caption.rstrip() + "."
            return encoded.setdefault(caption, self.tokenizer.encode(text)[:cfg.max_caption_tokens])
        self.open_splits(splits, encode, frozen and frozen.to(self.device), rank, world,
                         config.mapping_type == "tokens")
        self.model = self.model or self.build(frozen, {t for ids in encoded.values() for t in ids})
        self.model.gpt.requires_grad_(not config.freeze_gpt)
        self.extra = {"captioner_config": dataclasses.asdict(self.model.config),
                      "gpt_config": dataclasses.asdict(self.model.gpt.config),
                      "vision_config": dataclasses.asdict((frozen or self.model.visual).config),
                      "frozen_tower": frozen and config.clip_weights}

    def build(self, frozen, vocab):
        """A new captioner: a tiny tower (sine-cosine positions) trains inside it; GPT-2 tiny, from
        scratch, or --gpt2-weights; with --closed-vocab, the captions' tokens as its vocabulary."""
        cfg, c = self.cfg, self.config
        if c.captioner:  # ClipCap's: mapper, GPT-2 and stop rule read off its file (gpt2.py)
            model = Captioner.from_pretrained(c.captioner, None, cfg.weights_dir or None, cfg.offline)
            if model.config.prefix_size != frozen.config.embed_dim:
                raise ValueError(f"--captioner {c.captioner} reads {model.config.prefix_size}-d embeddings, "
                                 f"--clip-weights {c.clip_weights} makes {frozen.config.embed_dim}-d ones")
            return model
        tower = frozen or VisionTransformer(VisionConfig(cfg.image_size, c.vision_layers, c.vision_width,
                                                         c.patch_size, c.embed_dim), sincos=True)
        prefix_length = tower.config.num_tokens if c.mapping_type == "tokens" else c.prefix_length
        gpt = GPT(GPTConfig(n_ctx=prefix_length + cfg.max_caption_tokens + 1, n_embd=c.n_embd,
                            n_head=c.n_head, n_layer=c.n_layer)) if c.language_model == "tiny" else \
            GPT.from_pretrained(cfg.gpt2_weights, root=cfg.weights_dir or None, offline=cfg.offline)
        config = CaptionerConfig(tower.config.embed_dim, prefix_length, c.mapping_type, prefix_length,
                                 c.mapper_layers, max_caption_tokens=cfg.max_caption_tokens)
        return Captioner(config, gpt, None if frozen else tower, vocab if c.closed_vocab else None)

    def count_targets(self, pair_ids, split="train"):
        end = self.model.config.eos_token_id == END_OF_TEXT  # ClipCap's "." is a caption token: no end after
        return sum(len(self.splits[split][2][i][1]) + end for i in pair_ids)  # caption tokens and end-of-text

    def batch(self, pair_ids, device, split="train"):
        """(inputs, tokens (B, T), token_mask (B, T)); the padding holds the end token and is masked out."""
        _, images, pairs, _ = self.splits[split]
        rows = [pairs[i] for i in pair_ids]
        tokens = torch.full((len(rows), max(len(ids) for _, ids in rows)), self.model.config.eos_token_id)
        token_mask = torch.zeros(tokens.shape, dtype=torch.bool)
        for b, (_, ids) in enumerate(rows):
            tokens[b, :len(ids)], token_mask[b, :len(ids)] = torch.tensor(ids), True
        inputs = torch.from_numpy(np.asarray(images[[r for r, _ in rows]]))
        return inputs.to(device), tokens.to(device), token_mask.to(device)

    def evaluate(self, model, split="val", batch_size=100):
        """Loss per target token, BLEU-1..4 and CIDEr-D of one caption per image (COCO's scorers), and on
        shapes the exact-match rate (canonical captions equal). Prints captions beside references."""
        dataset, images, pairs, references = self.splits[split]
        chunks = [list(range(s, min(s + batch_size, len(pairs)))) for s in range(0, len(pairs), batch_size)]
        loss = sum(model(*self.batch(ids, self.device, split)).item() for ids in chunks)
        rows, captions = sorted(references), {}
        for s in range(0, len(rows), batch_size):
            inputs = torch.from_numpy(np.asarray(images[rows[s:s + batch_size]])).to(self.device)
            captions.update(zip(rows[s:s + batch_size], model.caption(
                inputs, self.tokenizer, self.cfg.max_caption_tokens, num_beams=self.config.num_beams)))
        metrics = {"val_loss": round(loss / self.count_targets(range(len(pairs)), split), 5),
                   **{k: round(v, 4) for k, v in caption_scores(references, captions).items()},
                   **data.shapes_exact_match(dataset, captions, references)}
        for r in rows[:4]:
            print(f"  {captions[r]!r:56} reference: {references[r][0]!r}", flush=True)
        return metrics

# -----------------------------------------------------------------------------------------------------------
# The text-to-image task


class TextToImageTask(Task):
    """Caption -> image. Its inputs are cached uint8 pixels at --image-size (centre crops), or in latent
    space photos read per batch; a checkpoint's model is rebuilt by unet.py (from_checkpoint)."""

    def __init__(self, cfg, config, rank=0, world=1, device="cpu", splits=("train", "val"), checkpoint=None):
        super().__init__(cfg, config, device)
        net, vae = TextConditionedUNet.from_checkpoint(checkpoint, ema=False) if checkpoint else self.build()
        diffusion = ddpm.DiffusionConfig(**checkpoint["diffusion_config"]) if checkpoint else \
            dataclasses.replace(ddpm.PRESETS[config.schedule], parameterization=config.parameterization)
        self.open_splits(splits, str, "photos" if vae else None, rank, world)
        captions = sorted({text for _, text in self.splits["train"][2]}) if "train" in self.splits else []
        if captions and net.kind == "tiny" and not checkpoint:  # a table row per token its captions use
            net.close_vocabulary(net.tokenize(captions).unique().tolist())
        net.text_encoder.requires_grad_(net.kind == "tiny")  # the other text encoders stay frozen
        net.unet.gradient_checkpointing = config.gradient_checkpointing
        self.model = ddpm.DiffusionModel(net, vae, ddpm.GaussianDiffusion(diffusion), config.ema_decay,
                                         config.caption_dropout, config.min_snr_gamma)
        if checkpoint:  # the EMA copy and its step count too
            self.model.load_state_dict(checkpoint["model"], strict=True)
        self.extra = {"unet_config": dataclasses.asdict(net.unet.config), "text_config": net.text_config(),
                      "patch": net.patch, "vae_config": vae and dataclasses.asdict(vae.config),
                      "diffusion_config": dataclasses.asdict(diffusion), "image_size": cfg.image_size,
                      **{k: vars(config)[k] for k in "sampler sampling_steps guidance_scale s_noise".split()}}
        if captions:  # the words its captions use (generate.py warns of a prompt's others)
            self.extra["caption_words"] = sorted(set(re.findall("[a-z0-9]+", " ".join(captions).lower())))

    def build(self):
        """(text-conditioned UNet, frozen VAE or None) from the flags (unet.py builds it): --sd-weights gives
        SD's VAE, its text tower and the sd15 UNet; GPT-2 comes by name or file; the rest is tiny, new."""
        cfg, c, sd = self.cfg, self.config, {}
        if c.sd_weights:
            sd = weights.load_state_dict(weights.file_or_fetch(c.sd_weights, cfg.weights_dir or None,
                                                               cfg.offline, "--sd-weights"))
        gpt = GPT.from_pretrained(cfg.gpt2_weights, root=cfg.weights_dir or None, offline=cfg.offline) \
            if c.text_encoder == "gpt2" else None
        unet = UNetConfig.tiny(4 if c.latent else 3 * c.patch ** 2, c.model_channels, c.channel_mult,
                               c.attention_resolutions, c.num_res_blocks, c.context_dim, c.pooled_text,
                               c.scale_shift_norm) if c.unet == "tiny" else None
        net = TextConditionedUNet.new(c.text_encoder, sd, gpt, unet, c.context_dim, c.text_layers,
                                      cfg.max_caption_tokens, 1 if c.latent else c.patch)
        return net, AutoencoderKL.from_state_dict(sd) if c.latent else None

    def batch(self, pair_ids, device, split="train"):
        """(uint8 images (B, 3, S, S), tokens (B, T)); an unreadable photo is reported (data.py), left out."""
        dataset, images, pairs, _ = self.splits[split]
        rows = [pairs[i] for i in pair_ids]  # images None: photos, read now
        pixels, texts = data.read_pairs(dataset, rows, self.cfg.image_size, split, images)
        return pixels.to(device), self.model.net.tokenize(texts).to(device)

    def after_step(self):
        self.model.update_ema()

    def evaluate(self, model, split="val", batch_size=100):
        """Validation loss (fixed noise and timesteps), a grid of samples saved under out_dir/samples, and
        with --judge the held-out prompts drawn and read back by a shapes captioner."""
        cfg, c, pairs, draw = self.cfg, self.config, self.splits[split][2], model.pipeline()
        generator = torch.Generator().manual_seed(cfg.seed)
        loss = sum(model(*self.batch(range(s, min(s + batch_size, len(pairs))), self.device, split),
                         generator).item() for s in range(0, len(pairs), batch_size))
        prompts = [text for _, text in pairs[:c.num_judged if c.judge else 16]]
        images = draw(prompts, range(len(prompts)), None, c.sampler, c.sampling_steps, c.guidance_scale,
                      height=cfg.image_size, width=cfg.image_size, batch_size=batch_size, s_noise=c.s_noise)
        grid = ddpm.image_grid(ddpm.to_pil(images[:16]), 4, prompts[:16], max(1, 128 // cfg.image_size))
        weights.save_picture(grid, path := Path(cfg.out_dir, "samples", f"step-{int(model.updates):06d}.png"))
        judged, read = {}, None
        if c.judge:  # read back, scored (data.drawn_right); the first 24 drawings beside what was read
            read, exact = read_back(c.judge, images, cfg.weights_dir or None, cfg.offline, self.device)
            scores, right = data.drawn_right(prompts, read)
            judged = {**scores, "judge_exact_match": exact}
            figures, sheet = weights.judged_sheet(cfg.out_dir, ddpm.to_pil(images[:24]), prompts, read, right,
                                                  judged, c.judge)
            print(f"  {figures}\n  contact sheet: {sheet}", flush=True)
        for k, prompt in enumerate(prompts[:4]):
            print(f"  {prompt!r:56}" + (f" read back: {read[k]!r}" if c.judge else ""), flush=True)
        print(f"  samples of the first 16 prompts: {path}", flush=True)
        return {"val_loss": round(loss / len(pairs), 5), **judged}

# -----------------------------------------------------------------------------------------------------------
# The command line


TASKS = {"caption": (CaptionTask, CaptionConfig), "diffusion": (TextToImageTask, TextToImageConfig)}
FLAGS = [f for config in (TrainConfig, CaptionConfig, TextToImageConfig) for f in fields(config)]


def configs(task, values):
    """(TrainConfig, the task's config) of flag values by name (a preset's, a checkpoint's, the command's)."""
    def pick(config):
        return {f.name: values[f.name] for f in fields(config) if f.name in values}
    return TrainConfig(**{**pick(TrainConfig), "task": task}), TASKS[task][1](**pick(TASKS[task][1]))


def parse_config(argv=None):
    """The flags -> (TrainConfig, the task's config, the checkpoint of --resume or --eval). Precedence:
    defaults < preset < --smoke-test < the checkpoint's flags (never its "local" ones) < the flags given;
    --help shows each default, a group per dataclass, and what every preset sets."""
    groups = (("both tasks", TrainConfig), *((f"--task {t}", c) for t, (_, c) in TASKS.items()))
    parser = weights.flag_parser("train.py", "Train a captioner or a text-to-image model.", groups, PRESETS)
    given = vars(parser.parse_args(argv))
    path, checkpoint, stored = given.get("resume") or given.get("eval"), None, {}
    if given.get("eval") in CLIPCAP:  # ClipCap's released captioner, scored as published: no checkpoint
        path, given["captioner"] = None, given["eval"]
    if given.get("resume") and given.get("eval"):
        parser.error("--resume continues a run, --eval scores one: give one of them")
    if path:
        if not Path(path).is_file():
            parser.error(f"no such checkpoint: {path}")
        checkpoint = weights.read_checkpoint(path)
        stored = weights.stored_flags(checkpoint, path, FLAGS, given)  # checked against the flags given
        given.setdefault("out_dir", str(Path(path).parent))  # the checkpoint's own folder, never one it names
    task = checkpoint["task"] if checkpoint else given.get("task", TrainConfig.task)
    preset = stored.get("preset", given.get("preset", TrainConfig.preset))
    if preset not in PRESETS.get(task, {}):
        parser.error(f"--task/--preset must be one of {[(t, p) for t in PRESETS for p in PRESETS[t]]}")
    if other := sorted(set(given) - {f.name for f in fields(TrainConfig) + fields(TASKS[task][1])}):
        parser.error(f"{', '.join('--' + k.replace('_', '-') for k in other)}: not a flag of --task {task}")
    cfg, config = configs(task, {**PRESETS[task][preset], **(SMOKE_TEST if given.get("smoke_test") else {}),
                                 **stored, **given})
    if message := cfg.error() or config.error(cfg):
        parser.error(message)
    if not (cfg.eval or cfg.overwrite):
        weights.refuse_held_run(cfg.out_dir, cfg.resume)
    return cfg, config, checkpoint


def evaluate_checkpoint(cfg, config, checkpoint):
    """Score a checkpoint on one split, and say how (weights.eval_report): a captioner's BLEU-1..4 and
    CIDEr-D; a text-to-image model's validation loss and samples, with --judge its prompts read back."""
    task = TASKS[cfg.task][0](cfg, config, device=cfg.device, splits=(cfg.split,), checkpoint=checkpoint)
    metrics = evaluate(task, task.model.to(cfg.device), cfg.split)
    print(weights.eval_report({**dataclasses.asdict(cfg), **dataclasses.asdict(config)}, metrics,
                              len(task.splits[cfg.split][0].image_ids()), checkpoint and checkpoint["step"],
                              cfg.task == "caption" and task.model.config.mapping_type))
    return metrics


def main(argv=None):
    """The command line. The project's own errors print one line (--traceback: the whole traceback) and exit
    with 2 for a usage problem (a flag, a missing file or folder) or 1 for a failure (one_line_errors)."""
    return weights.one_line_errors("train.py", run, sys.argv[1:] if argv is None else list(argv),
                                   (FileNotFoundError, weights.FlagsRefused))


def run(argv):
    cfg, config, checkpoint = parse_config(argv)
    torch.set_num_threads(cfg.threads or torch.get_num_threads())  # 0: torch's default
    torch.manual_seed(cfg.seed)  # the one seed: initialisation (equal on every rank); data order follows
    if cfg.eval:
        return evaluate_checkpoint(cfg, config, checkpoint)
    rank, world, device = setup_distributed(cfg)
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ValueError(f"--batch-size {cfg.batch_size} must divide by processes ({world}) x --grad-accum")
    with weights.hold_run_dir(cfg.out_dir, checkpoint, cfg.overwrite, cfg.resume) if rank == 0 else \
            contextlib.nullcontext():
        task = TASKS[cfg.task][0](cfg, config, rank, world, device, checkpoint=checkpoint)
        if rank == 0:  # the flags, the training pairs and the parameters counted
            print(weights.start_of_run(cfg, config, task.model, task.num_pairs))
        result = train(task, cfg, rank, world, device, checkpoint)
    if world > 1:
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
