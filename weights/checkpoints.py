"""This project's training checkpoints (train.py writes them): read as data, earlier layouts upgraded, models rebuilt.

A checkpoint of train.py is one torch-saved dict (save_run writes it, resume_run reads a run's state back):
"task" ("caption" or "diffusion"), "config" (the flags of the run, for --resume and for reporting), "model" (a
plain state_dict), the optimizer, scaler, step and random state, and beside the weights every config its models
are rebuilt from (nanoGPT's `model_args`):

    caption    captioner_config, gpt_config, vision_config; frozen_tower (None: the tower trained inside the
               model; else the name or file of a frozen CLIP tower, which the checkpoint does not hold)
    diffusion  unet_config, text_config (with the encoder's "kind" and the prompt's "context_length"), patch,
               vae_config (None: pixel space), diffusion_config (ddpm.DiffusionConfig); and the plain values
               generate.py starts from: sampler, sampling_steps, guidance_scale, s_noise, image_size, caption_words

Each model file rebuilds its own (gpt2.Captioner.from_checkpoint, unet.TextConditionedUNet.from_checkpoint)
through `rebuild`, never through the training flags (clipcap_row: what a captioner's flags compare with in
ClipCap's paper). A run directory (ckpt.pt, log.jsonl, cache/) is held by one run at a time (hold_run_dir;
run_ended: another run waits for its end); the pictures a run leaves there, its log drawn (loss_curve.png,
draw_log) and the judged drawings beside what the judge read (contact_sheet.png, contact_sheet, judged_sheet),
end this file, after the log they are drawn from (log_record: log.jsonl).
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import pickle
import re
import sys
import textwrap
from pathlib import Path

import torch
from PIL import Image, ImageDraw

import ddpm

from .downloader import WeightsUnavailable
from .readers import check_optimizer_state, check_state_dict, load_checkpoint, save_checkpoint

try:
    import fcntl  # run directories are locked where the OS can (POSIX)
except ImportError:  # Windows: no lock, so nothing a killed run left half-written is removed
    fcntl = None

TASKS = ("caption", "diffusion")
# the plain values a reader takes as they are, each with its test (a crafted file cannot ask for a 10^6-pixel side)
PLAIN = {"sampler": lambda v: v in ddpm.SAMPLERS, "sampling_steps": lambda v: type(v) is int and 1 <= v <= 10_000,
         "guidance_scale": lambda v: type(v) in (int, float) and 0 <= v <= 1000,
         "s_noise": lambda v: type(v) in (int, float) and 0 <= v <= 1000,
         "image_size": lambda v: type(v) is int and 1 <= v <= 4096, "patch": lambda v: type(v) is int and 1 <= v <= 64,
         "frozen_tower": lambda v: v is None or type(v) is str,
         "caption_words": lambda v: type(v) is list and all(type(word) is str for word in v)}


def read_checkpoint(path, task=None):
    """A checkpoint of train.py, read as data (load_checkpoint: no code runs), of `task` if given, in today's
    layout (upgrade); anything else is one ValueError naming the file."""
    try:
        checkpoint = load_checkpoint(path)
    except Exception as error:  # truncated, not a checkpoint, unsafe: whatever the reader found
        reason = str(error).removeprefix(f"{path}: ")
        raise ValueError(f"{path} is not a readable checkpoint: {reason}") from None
    kind = checkpoint.get("task") if isinstance(checkpoint, dict) else None
    if kind not in TASKS or not isinstance(checkpoint.get("config"), dict) or not isinstance(
            checkpoint.get("model"), dict):
        raise ValueError(f"{path} is not a checkpoint of train.py")
    if task and kind != task:
        raise ValueError(f"{path} is a checkpoint of train.py --task {kind}, not --task {task}")
    try:
        checkpoint = upgrade(checkpoint)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: its config is not one train.py wrote ({type(error).__name__}: {error})") from None
    if wrong := sorted(k for k, test in PLAIN.items() if k in checkpoint and not test(checkpoint[k])):
        raise ValueError(f"{path}: it holds values of the wrong type or size: {wrong}")
    return checkpoint



def save_run(path, model, optimizer, scaler, step, **more):
    """A training run's checkpoint, atomically at `path` (save_checkpoint): a plain state_dict of the unwrapped
    `model`, the optimizer's and the gradient scaler's states, `step` and the random state (resume_run restores
    them), and `more`: "task", "config" (the flags), "metrics", "total_steps", "train_seconds", the models' configs."""
    save_checkpoint({"model": model.state_dict(), "step": step, "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict(), "rng": torch.get_rng_state(), **more}, path)


def resume_run(checkpoint, optimizer, scaler, path):
    """What save_run kept, restored for --resume `path` (the optimizer's state checked before torch reads it; the
    model's weights are the task's to load) -> (step, the training seconds of the runs it continues)."""
    optimizer.load_state_dict(check_optimizer_state(checkpoint["optimizer"], optimizer, path))  # deep-copies it
    scaler.load_state_dict(checkpoint["scaler"])
    torch.set_rng_state(checkpoint["rng"])
    print(f"resumed from {path} at step {checkpoint['step']}")
    return checkpoint["step"], checkpoint.get("train_seconds", 0.0)


def flag(default, help, choices=None, role="", most=None, least=0):
    """A flag of train.py: a dataclass field whose metadata flag_parser and stored_flags read (help, choices, role;
    a number's bounds: least to most, most None for none above)."""
    return dataclasses.field(default=default, metadata=dict(help=help, choices=choices, role=role, most=most,
                                                            least=least))


def within(value, metadata):
    """Whether a number flag's `value` lies within its declared bounds (NaN never does)."""
    return metadata["least"] <= value <= (math.inf if metadata["most"] is None else metadata["most"])


def bounds(metadata):
    """A number flag's bounds in words, as --help and its error say them: "1 to 4096", "at least 0"."""
    least, most = metadata["least"], metadata["most"]
    return f"{least} to {most}" if most is not None else f"at least {least}"


def bounded(kind, metadata):
    """argparse's type for a number flag: `kind` read, then refused in one line outside its bounds, before anything
    is built (a 10^8-wide model asks for terabytes; a negative gradient clip climbs the loss)."""
    def read(text):
        value = kind(text)  # not a number: argparse says "invalid int value: 'x'"
        if not within(value, metadata):
            raise argparse.ArgumentTypeError(f"{text} is out of range ({bounds(metadata)})")
        return value
    read.__name__ = kind.__name__
    return read


class Parser(argparse.ArgumentParser):
    """argparse with its errors in one line (train.py's and generate.py's): the usage of 80 flags would bury them."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def one_line_errors(prog, run, argv, usage=(FileNotFoundError,)):
    """run(argv), as the entry points' main() runs it: the project's own errors (a file missing or unreadable, a
    value refused, an unsafe pickle, weights not to be had, memory: torch's out-of-memory too) print one line,
    "prog: error: ...", and exit with 2 for a usage problem (`usage`: a flag, a missing file) or 1 for a failure;
    --traceback: raised whole."""
    ours = (OSError, ValueError, pickle.UnpicklingError, WeightsUnavailable, MemoryError)
    try:
        return run(argv)
    except (*ours, RuntimeError) as error:
        memory = isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)  # CUDA's, CPU's
        if "--traceback" in argv or not (isinstance(error, ours) or memory):  # another RuntimeError: a bug
            raise
        message = re.sub(r"^\[enforce fail at .*?\] err == 0\. ", "", str(error).strip().splitlines()[0]) if memory \
            else error or type(error).__name__  # the CPU allocator's message, without its C++ assertion
        print(f"{prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2 if isinstance(error, usage) else 1) from None


def flag_parser(prog, description, groups, presets):
    """train.py's command line, read off its flag dataclasses (`groups`: (title, dataclass) pairs, a group each):
    every flag with its help and "(default: X)", a bool as --x/--no-x, and no default set, so that parse_args
    returns only the flags given (the caller lays them over its defaults); `presets` ({task: {preset: {flag:
    value}}}) are listed in the epilog, the flags each one sets. Errors print in one line (Parser)."""
    listed = "\n".join(textwrap.fill(f"--task {task} --preset {name}: " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in values.items()), 110, initial_indent="  ",
        subsequent_indent="    ") for task in presets for name, values in presets[task].items())
    parser = Parser(prog, description=description, epilog=f"presets (the flags each one sets):\n{listed}",
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    for title, config in groups:
        group = parser.add_argument_group(title)
        for f in dataclasses.fields(config):
            kind = dict(action=argparse.BooleanOptionalAction) if type(f.default) is bool else \
                dict(type=type(f.default), choices=f.metadata["choices"]) if type(f.default) is str else \
                dict(type=bounded(type(f.default), f.metadata))
            said = f"; {bounds(f.metadata)}" if f.metadata["least"] or f.metadata["most"] is not None else ""
            default = f.default if f.default != "" else "-"
            group.add_argument("--" + f.name.replace("_", "-"), default=argparse.SUPPRESS, **kind,
                               help=f"{f.metadata['help']} (default: {default}{said})")
    return parser


class FlagsRefused(ValueError):
    """Flags that do not go with a checkpoint or a run directory: a usage error, said in one line."""


def stored_flags(checkpoint, path, flags, given=None):
    """A checkpoint's flags ("config") read as data against their declarations (`flags`: dataclass fields whose
    metadata give "role", "choices", "least", "most"): known names only, none of a run's own (role "local": where to
    read and write, the device), each of its default's type, one of its choices, within its bounds (as the command
    line's are: flag_parser). Checked against the flags `given` on the command line too: a frozen image tower the
    checkpoint names by file, which it does not hold, must be given again (a checkpoint never chooses a file to
    read), and --eval scores a checkpoint as it was trained: no other --task, and of the rest only "local" and
    "scoring" flags (FlagsRefused)."""
    flags, given = {f.name: f for f in flags}, given or {}
    config = {k: v for k, v in checkpoint["config"].items() if k in flags and flags[k].metadata["role"] != "local"}
    kinds = {k: type(flags[k].default) for k in config}
    wrong = {k for k, v in config.items() if type(v) is not kinds[k] and (kinds[k], type(v)) != (float, int)}
    for k, v in config.items():
        number, choices = kinds[k] in (int, float), flags[k].metadata["choices"]
        if k not in wrong and (number and not within(v, flags[k].metadata) or choices and v not in choices):
            wrong.add(k)
    if wrong:
        raise ValueError(f"{path}: its config holds values of the wrong type or size: {sorted(wrong)}")
    if config.get("image_tower") == "clip" and config["clip_weights"] != flags["clip_weights"].default and \
            "clip_weights" not in given:
        raise FileNotFoundError(f"{path}'s frozen image tower is the file {config['clip_weights']}, which it does "
                                "not hold: give it as --clip-weights")
    training = sorted(k for k in given if not flags[k].metadata["role"]) if given.get("eval") else []
    if training or given.get("task", checkpoint["task"]) != checkpoint["task"]:
        names = ", ".join("--" + k.replace("_", "-") for k in training or ["task"])
        raise FlagsRefused(f"{path} is a --task {checkpoint['task']} checkpoint, scored as it was trained: {names} "
                           "do not apply")
    return config


def refuse_held_run(out_dir, resume=""):
    """A new run never replaces a run's checkpoint and log unless told to (--overwrite): FlagsRefused when out_dir
    holds them (ckpt.pt, log.jsonl) and is not the folder of the checkpoint `resume` continues."""
    out = Path(out_dir)
    held = [name for name in ("ckpt.pt", "log.jsonl") if (out / name).exists()]
    if held and out.resolve() != Path(resume or ".").resolve().parent:
        resume = f"--resume {out / 'ckpt.pt'} continues it, " if "ckpt.pt" in held else ""
        raise FlagsRefused(f"{out} holds a run ({', '.join(held)}): {resume}another --out-dir starts a new one, "
                           "--overwrite replaces it")


def upgrade(checkpoint):
    """A checkpoint in today's layout. Checkpoints written before the models' configs were stored whole (up to
    a8e8afc) kept these settings only among the flags; before the -weights flags (53c34ff) a frozen model's file
    was the choice itself (--image-tower ViT-B/32, --language-model gpt2-medium, --text-encoder gpt2). Each old setting
    maps once, here:

        flags      image_tower/language_model/text_encoder FILE -> clip/gpt2 + clip_weights/gpt2_weights FILE;
                   two_objects <- 0.5 (before 129df1a every shapes scene had one or two objects at even odds);
                   diffusion: s_noise <- 1 (its samplers' fresh noise as published, before the flag)
        configs    GPTConfig's `sdpa` (which attention runs is no part of the model; set_attention) dropped
        caption    captioner_config <- mapping_type, prefix_length (tokens: the tower's token count),
                   mapper_layers, max_caption_tokens; frozen_tower <- image_tower, clip_weights;
                   model: "captioner." stripped, "vocab" <- the rows of wte that are not 0 (closed_vocab)
        diffusion  text_config kind <- text_encoder, its context_length <- max_caption_tokens + 1 (GPT-2);
                   patch <- 1 if latent else patch; diffusion_config <- ddpm.PRESETS[schedule], parameterization;
                   sampler, sampling_steps, guidance_scale, image_size <- the flags of the same names"""
    config, new = dict(checkpoint["config"]), dict(checkpoint)
    for name in ("gpt_config", "text_config"):  # GPTConfig had an `sdpa` field before set_attention(use_sdpa)
        if isinstance(checkpoint.get(name), dict) and "sdpa" in checkpoint[name]:
            new[name] = {k: v for k, v in checkpoint[name].items() if k != "sdpa"}
    for choice, name, family in (("image_tower", "clip_weights", "clip"), ("text_encoder", "gpt2_weights", "gpt2"),
                                 ("language_model", "gpt2_weights", "gpt2")):
        if name not in config and config.get(choice, "tiny") not in ("tiny", "clip"):
            config[choice], config[name] = family, config[choice]
    config.setdefault("two_objects", 0.5)  # a resumed run goes on with the scenes it began with, not the preset's
    if checkpoint["task"] == "diffusion":  # and is judged as it was: the samplers' noise as published
        config.setdefault("s_noise", 1.0)
        new.setdefault("s_noise", 1.0)
    new["config"] = config
    if checkpoint["task"] == "caption" and "captioner_config" not in checkpoint:
        vision = checkpoint["vision_config"]
        tokens = (vision["image_resolution"] // vision["vision_patch_size"]) ** 2 + 1
        length = tokens if config["mapping_type"] == "tokens" else config["prefix_length"]
        new["captioner_config"] = dict(prefix_size=vision["embed_dim"], prefix_length=length, clip_length=length,
                                       mapping_type=config["mapping_type"], num_layers=config["mapper_layers"],
                                       max_caption_tokens=config["max_caption_tokens"])
        new["frozen_tower"] = None if config["image_tower"] == "tiny" else config.get("clip_weights", "ViT-B/32")
        new["model"] = {k.removeprefix("captioner."): v for k, v in checkpoint["model"].items()}
        if config.get("closed_vocab"):
            new["model"]["vocab"] = new["model"]["gpt.wte.weight"].ne(0).any(dim=1).nonzero()[:, 0]
    if checkpoint["task"] == "diffusion" and "diffusion_config" not in checkpoint:
        kind = config["text_encoder"]
        new["text_config"] = {"kind": kind, **checkpoint["text_config"], **(
            {"context_length": config["max_caption_tokens"] + 1} if kind == "gpt2" else {})}
        new["patch"] = 1 if config["latent"] else config["patch"]
        new["diffusion_config"] = dataclasses.asdict(dataclasses.replace(
            ddpm.PRESETS[config["schedule"]], parameterization=config["parameterization"]))
        new.update({k: config[k] for k in ("sampler", "sampling_steps", "guidance_scale", "image_size")})
    return new


def rebuild(build, state_dict):
    """build() on the meta device (no memory, no initialisation), the state dict checked against it (key set, every
    shape: check_state_dict), then loaded into it (assign=True: the tensors become the model's, no copy). So a
    checkpoint's configs size nothing before its tensors agree with them, and whatever does not fit (a config of the
    wrong type or size) is one ValueError."""
    try:
        with torch.device("meta"):
            model = build()
        state_dict = check_state_dict(model, state_dict, "its weights")
    except (RuntimeError, TypeError, KeyError, ValueError) as error:  # torch lists each tensor: the last tells
        lines = str(error).strip().splitlines()
        raise ValueError(f"the checkpoint's model does not match its config: {lines[-1].strip()}" + (
            f" (and {len(lines) - 2} more)" if len(lines) > 2 else "")) from None
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model


@contextlib.contextmanager
def hold_run_dir(out_dir, checkpoint=None, overwrite=False, resume=""):
    """Hold train.py's run directory while it writes there: a lock (flock, gone however the process ends) tells a
    live run from a killed one, so what a killed run left half-written (save_checkpoint's .ckpt.pt.*.tmp,
    save_picture's .NAME.png.*.tmp; cache .part files, locked while written) is removed. Resuming `checkpoint` cuts
    the log back to its step; `overwrite` starts afresh (unless this is the folder `resume` continues)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "a") as lock:
        if fcntl and not locked(lock):
            raise OSError(f"{out} is in use: another train.py writes there (give this run another --out-dir)")
        parts = (path for path in out.glob("cache/*.part") if locked(open(path, "rb")))
        for path in [*out.glob(".ckpt.pt.*.tmp"), *out.glob(".*.png.*.tmp"), *parts] if fcntl else []:
            path.unlink()
            print(f"removed {path}, left half-written by a killed run", file=sys.stderr)
        if overwrite and not (checkpoint and out.resolve() == Path(resume).resolve().parent):
            for name in ("ckpt.pt", "log.jsonl", "loss_curve.png", "contact_sheet.png"):
                (out / name).unlink(missing_ok=True)
        if checkpoint and (path := out / "log.jsonl").exists():  # whole records up to the checkpoint's step
            path.write_text("".join(line + "\n" for line in path.read_text().splitlines() if (
                step := re.match(r'{"step": (\d+),.*}$', line)) and int(step[1]) <= checkpoint["step"]))
        yield


def run_ended(out_dir, since):
    """Whether the train.py run in out_dir has ended (train.py --threads-after): it wrote ckpt.pt after `since`
    (time.time(): an older run's files do not count) and no live process holds the folder (hold_run_dir's lock).
    Without flock (Windows) never: a run that waits keeps its threads."""
    out = Path(out_dir)
    try:
        if not fcntl or (out / "ckpt.pt").stat().st_mtime < since:
            return False
        with open(out / ".lock", "rb") as lock:
            return locked(lock)  # taken: nobody held it; closing the file lets it go
    except FileNotFoundError:
        return False


def locked(handle):
    """Take the file's lock, unless a live process holds it."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def clipcap_row(flags):
    """The row of ClipCap's Table 1 (COCO Karpathy test, CIDEr) that a captioner of train.py with these `flags` (by
    name) corresponds to: what --eval prints beside its own figures."""
    if tuple(flags[k] for k in ("data", "split", "image_tower", "clip_weights", "language_model", "gpt2_weights")) \
            != ("karpathy", "test", "clip", "ViT-B/32", "gpt2", "gpt2"):
        return "none: ClipCap's rows are COCO Karpathy test, ViT-B/32, GPT-2 (--preset coco --split test)"
    if flags["mapping_type"] == "tokens":
        return "none: ClipCap maps the pooled embedding; the tokens mapper reads every token (LLaVA-1.5)"
    if flags["mapping_type"] == "transformer":
        return "ClipCap transformer mapper + frozen GPT-2, CIDEr 113.1 (ClipCap: prefix 40, --freeze-gpt)"
    gpt = "frozen GPT-2, CIDEr 92.4" if flags["freeze_gpt"] else "fine-tuned GPT-2, CIDEr 108.4"
    return f"ClipCap MLP + {gpt}"


def eval_report(flags, metrics, images, step=None, mapper=""):
    """What train.py --eval prints of a checkpoint scored: what it is (`flags` by name, trained `step` steps, None:
    ClipCap's as released; a captioner's `mapper`), how it was scored (split, `images`, decoding or sampling), its
    `metrics` (a captioner's scores x100), and beside a captioner's the row of ClipCap's paper (clipcap_row)."""
    diffusion = flags["task"] == "diffusion"
    beams = "greedy" if diffusion or flags["num_beams"] == 1 else f"beam search, {flags['num_beams']} beams"
    how = f"sampler {flags['sampler']}, {flags['sampling_steps']} steps, guidance {flags['guidance_scale']:g}" + \
        (f", s_noise {flags['s_noise']:g}" if diffusion and flags["s_noise"] != 1 else "") \
        if diffusion else f"decoding: {beams}, at most {flags['max_caption_tokens']} tokens"
    model = "" if diffusion else f", {mapper} mapper, GPT-2 " + ("frozen" if flags["freeze_gpt"] else "trained")
    scores = "  ".join(f"{k} {v}" if diffusion or k == "val_loss" else f"{k} {v * 100:.1f}" for k, v in metrics.items())
    trained = f"step {step} of {flags['epochs']:g} epochs" if step is not None else "as released"
    return (f"checkpoint {flags['eval']}: {trained} on {flags['data']} (preset {flags['preset']}{model})\nsplit: "
            f"{flags['data']} {flags['split']}, {images} images | {how}\n{scores}" +
            ("" if diffusion else f"\ncompare with: {clipcap_row(flags)}"))


def start_of_run(cfg, config, model, num_pairs):
    """What a training run says first (train.py prints it), in two lines: its flags (`cfg`, the task's `config`) as
    JSON, then its `num_pairs` training pairs and the parameters of `model` that train and that stay frozen."""
    trained, frozen = (sum(p.numel() for p in model.parameters() if p.requires_grad == t) for t in (True, False))
    return f"{json.dumps({**dataclasses.asdict(cfg), **dataclasses.asdict(config)})}\n{num_pairs:,} training pairs; " \
           f"parameters: {trained:,} trained, {frozen:,} frozen"


def end_of_run(cfg, step, total_steps, max_steps, steps_per_epoch, used, eval_seconds):
    """What happened to a training run, in a line (train.py prints it last): --stop-after stopped it at `step` of
    `total_steps`, or the time budget (--minutes) or --epochs (`max_steps`) ended it, after `used` training seconds
    and `eval_seconds` of evaluations. `cfg`: the run's flags (out_dir, stop_after, minutes)."""
    ckpt = Path(cfg.out_dir) / "ckpt.pt"
    if cfg.stop_after and step < total_steps:
        return f"--stop-after {cfg.stop_after}: stopped at step {step:,} of {total_steps:,}; --resume {ckpt} continues"
    done = f"{step:,} steps in {used / 60:.2f} training minutes (evaluations {eval_seconds / 60:.2f} more)"
    if not cfg.minutes:
        return f"trained {done}; {ckpt}"
    why = "--epochs ended it first" if step == max_steps else "the budget ended it"
    return f"--minutes {cfg.minutes:g}: {done}; {why}; --epochs {step / steps_per_epoch:.6g} --minutes 0 " \
           "trains as many steps"


# ----------------------------------------------------------------------------------------------------------------
# The pictures a run leaves beside its log, drawn with Pillow alone (no plotting package at run time): the loss
# curve (loss_curve.png, draw_log) and, where a captioner judged the drawings, the contact sheet (contact_sheet.png)

GREEN, RED = (0, 140, 60), (210, 30, 30)


def contact_sheet(images, prompts, read, right, title="", cols=3, scale=3, font_size=13):
    """The tour's last picture: each drawing (square PIL images of one size) beside its prompt and what a
    captioner read back from it, framed green with a tick when `right`, red with a cross when not; `title` (the
    figures) on top. `prompts`, `read` and `right` may go on: the first len(images) are shown."""
    font, line, side = ddpm.text_font(font_size), font_size + 5, images[0].size[0] * scale
    text_width = 28 * font_size
    texts = [ddpm.wrap(f"prompt: {p}", font, text_width) + ddpm.wrap(f"read back: {r}", font, text_width)
             for p, r in zip(prompts[:len(images)], read)]
    cell_w, cell_h = side + 24 + text_width, max(side + 8, max(map(len, texts)) * line + line + 8) + 8
    head = ddpm.wrap(title, font, cols * cell_w - 16)
    top = len(head) * line + (12 if head else 4)
    sheet = Image.new("RGB", (cols * cell_w, top + math.ceil(len(images) / cols) * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    draw.multiline_text((8, 6), "\n".join(head), "black", font, spacing=5)
    for i, (image, text, ok) in enumerate(zip(images, texts, right)):
        x, y, colour = (i % cols) * cell_w + 4, top + (i // cols) * cell_h, GREEN if ok else RED
        draw.rectangle((x, y, x + side + 7, y + side + 7), fill=colour)  # the frame: 4 pixels of the verdict
        sheet.paste(image.resize((side, side), Image.Resampling.NEAREST), (x + 4, y + 4))
        tx, ty = x + side + 16, y + 4
        draw.multiline_text((tx, ty), "\n".join(text), "black", font, spacing=5)
        ty += len(text) * line + 2
        mark = [(tx, ty + 6), (tx + 4, ty + 11), (tx + 12, ty)] if ok else [(tx, ty), (tx + 10, ty + 10)]
        draw.line(mark, colour, 2)
        if not ok:
            draw.line([(tx, ty + 10), (tx + 10, ty)], colour, 2)
        draw.text((tx + 18, ty - 2), "drawn right" if ok else "drawn wrong", colour, font)
    return sheet


def judged_sheet(out_dir, drawings, prompts, read, right, judged, judge):
    """(the judged figures in a line, the path of contact_sheet.png written into out_dir): the drawings (PIL) beside
    what the captioner of `judge` read back (right: drawn right), the figures on top."""
    figures = (f"drawn right, as {judge} reads {len(prompts)} held-out prompts back: single objects "
               f"{judged.get('drawn_right_1', math.nan):.1%} (colour and shape), two objects "
               f"{judged.get('drawn_right_2', math.nan):.1%} (both); the judge's exact match "
               f"{judged['judge_exact_match']:.1%}")
    save_picture(contact_sheet(drawings, prompts, read, right, figures), path := Path(out_dir) / "contact_sheet.png")
    return figures, path


def save_picture(image, path):
    """Write a PNG whole or not at all (a temporary file beside it, then os.replace), so a viewer reloading it
    while a run redraws it never reads half a picture; its folder is made if missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    image.save(temporary, format="PNG")
    os.replace(temporary, path)



# the judged figures a log may hold (fractions, drawn x100): drawn right (text-to-image, --judge), a captioner's
# exact match on shapes, else its CIDEr-D
SCORES = {"drawn_right_1": "drawn right, 1 object", "drawn_right_2": "drawn right, 2 objects",
          "exact_match": "exact match", "CIDEr-D": "CIDEr-D"}
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]  # matplotlib's first four


def ticks(low, high, log):
    """Round values that span [low, high], the axis's ends among them: on a log scale the powers of ten around
    it when it covers a decade or more, else 1, 2, 5 x 10^k; on a linear one about five steps of 1, 2, 5 x 10^k."""
    if log and high / low >= 10:
        return [10.0 ** k for k in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)]
    if log:
        values = [m * 10.0 ** k for k in range(math.floor(math.log10(low)) - 1, math.ceil(math.log10(high)) + 1)
                  for m in (1, 2, 5)]
        first, last = max(v for v in values if v <= low), min(v for v in values if v > low and v >= high)
        return [v for v in values if first <= v <= last]
    span = (high - low) or abs(high) or 1.0
    base = 10 ** math.floor(math.log10(span / 5))
    step = next(m * base for m in (1, 2, 5, 10) if span / (m * base) <= 6)
    return [step * k for k in range(math.floor(low / step), math.ceil(high / step) + 1)]


def panel(draw, box, curves, x_max, log, title, font, y_span=()):
    """Curves [(points [(step, y)], name)] in box (left, top, right, bottom) pixels: axes, ticks with numbers, a
    legend; y on a log scale when `log`, spanning at least the values `y_span`."""
    left, top, right, bottom = box
    ys = [y for points, _ in curves for _, y in points] + list(y_span)
    y_ticks, f = ticks(min(ys), max(ys), log), math.log10 if log else float
    low, high = f(y_ticks[0]), f(y_ticks[-1])

    def at(x, y):  # a point in pixels
        return left + (right - left) * x / x_max, bottom - (bottom - top) * (f(y) - low) / ((high - low) or 1)
    for y in y_ticks:
        draw.line([at(0, y), at(x_max, y)], (225, 225, 225))
        draw.text((left - 6, at(0, y)[1]), f"{y:g}", "black", font, anchor="rm")
    for x in (x for x in ticks(0, x_max, False) if x <= x_max and x == int(x)):  # whole steps
        x_pixel = at(x, y_ticks[0])[0]
        draw.line([(x_pixel, bottom), (x_pixel, bottom + 4)], "black")
        draw.text((x_pixel, bottom + 6), f"{x:,.0f}", "black", font, anchor="mt")
    draw.rectangle(box, outline="black")
    draw.text((left, top - 6), title, "black", font, anchor="lb")
    for k, (points, name) in enumerate(curves):
        xy = [at(x, y) for x, y in points]
        draw.line(xy, COLOURS[k], 2)
        for x, y in xy if len(xy) <= 40 else []:  # a few points (evaluations): each one shown
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), COLOURS[k])
    draw.rectangle((right - 200, top + 6, right - 8, top + 12 + 18 * len(curves)), "white", "black")  # legend
    for k, (_, name) in enumerate(curves):
        y = top + 10 + 18 * k
        draw.line([(right - 192, y + 7), (right - 168, y + 7)], COLOURS[k], 3)
        draw.text((right - 162, y), name, "black", font)


def loss_curve(records, size=(800, 600), font_size=13):
    """A run's log records (log.jsonl) -> one picture: training and validation loss against steps on a log scale
    and, below them where the log has one, the judged figures (SCORES) x100 against the same steps."""
    def points(key, times=1.0, low=-math.inf):  # (step, value) where both are numbers and the value > low
        return sorted((r["step"], r[key] * times) for r in records if all(
            type(v) in (int, float) and math.isfinite(v) for v in (r["step"], r.get(key))) and r[key] > low)
    losses = [(points(k, low=0.0), name) for k, name in (("loss", "training loss"), ("val_loss", "validation loss"))]
    losses = [(p, name) for p, name in losses if p]
    scores = [(points(k, 100.0), name) for k, name in SCORES.items()
              if points(k) and not (k == "CIDEr-D" and points("exact_match"))]
    image, (width, height) = Image.new("RGB", size, "white"), size
    draw, font = ImageDraw.Draw(image), ddpm.text_font(font_size)
    x_max = max([x for p, _ in losses + scores for x, _ in p], default=1) or 1
    split = height * 3 // 5 if scores else height
    if losses:
        panel(draw, (70, 30, width - 20, split - 40), losses, x_max, True, "loss (log scale) against steps", font)
    if scores:
        panel(draw, (70, split + 10, width - 20, height - 40), scores, x_max, False, "judged (x100)", font, (0, 100))
    return image


def log_record(out_dir, record):
    """One record of a run: printed, and appended to out_dir/log.jsonl (what draw_log draws)."""
    print(json.dumps(record), flush=True)
    with open(Path(out_dir) / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def draw_log(out_dir):
    """Redraw out_dir/loss_curve.png from the whole out_dir/log.jsonl (a resumed run's too), atomically. A line
    that is not a whole record (a run killed while writing it) is left out: a picture never stops a run."""
    records, path = [], Path(out_dir) / "log.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(ValueError):
            records += [record] if isinstance(record := json.loads(line), dict) and "step" in record else []
    save_picture(loss_curve(records), Path(out_dir) / "loss_curve.png")
