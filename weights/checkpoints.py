"""This project's training checkpoints (train.py writes them): read as data, earlier layouts upgraded, models rebuilt.

A checkpoint of train.py is one torch-saved dict (save_checkpoint, atomic): "task" ("caption" or "diffusion"),
"config" (the flags of the run, for --resume and for reporting), "model" (a plain state_dict), the optimizer,
scaler, step and random state, and beside the weights every config its models are rebuilt from (nanoGPT's
`model_args`):

    caption    captioner_config, gpt_config, vision_config; frozen_tower (None: the tower trained inside the
               model; else the name or file of a frozen CLIP tower, which the checkpoint does not hold)
    diffusion  unet_config, text_config (with the encoder's "kind" and the prompt's "context_length"), patch,
               vae_config (None: pixel space), diffusion_config (ddpm.DiffusionConfig); and the plain values
               generate.py starts from: sampler, sampling_steps, guidance_scale, image_size, caption_words

Each model file rebuilds its own (gpt2.Captioner.from_checkpoint, unet.TextConditionedUNet.from_checkpoint)
through `rebuild`, never through the training flags. A run directory (ckpt.pt, log.jsonl, cache/) is held by one
run at a time (hold_run_dir).
"""
import contextlib
import dataclasses
import re
import sys
from pathlib import Path

import torch

import ddpm

from .readers import check_state_dict, load_checkpoint

try:
    import fcntl  # run directories are locked where the OS can (POSIX)
except ImportError:  # Windows: no lock, so nothing a killed run left half-written is removed
    fcntl = None

TASKS = ("caption", "diffusion")
# the plain values a reader takes as they are, each with its test (a crafted file cannot ask for a 10^6-pixel side)
PLAIN = {"sampler": lambda v: v in ddpm.SAMPLERS, "sampling_steps": lambda v: type(v) is int and 1 <= v <= 10_000,
         "guidance_scale": lambda v: type(v) in (int, float) and 0 <= v <= 1000,
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


class FlagsRefused(ValueError):
    """Flags that do not go with a checkpoint or a run directory: a usage error, said in one line."""


def stored_flags(checkpoint, path, flags, given=None):
    """A checkpoint's flags ("config") read as data against their declarations (`flags`: dataclass fields whose
    metadata give "role", "choices", "most"): known names only, none of a run's own (role "local": where to read
    and write, the device), each of its default's type, one of its choices, within its bound. Checked against the
    flags `given` on the command line too: a frozen image tower the checkpoint names by file, which it does not
    hold, must be given again (a checkpoint never chooses a file to read), and --eval scores a checkpoint as it
    was trained: no other --task, and of the rest only "local" and "scoring" flags (FlagsRefused)."""
    flags, given = {f.name: f for f in flags}, given or {}
    config = {k: v for k, v in checkpoint["config"].items() if k in flags and flags[k].metadata["role"] != "local"}
    kinds = {k: type(flags[k].default) for k in config}
    wrong = {k for k, v in config.items() if type(v) is not kinds[k] and (kinds[k], type(v)) != (float, int)}
    for k, v in config.items():
        most, choices = flags[k].metadata["most"], flags[k].metadata["choices"]
        if k not in wrong and (most and not 0 <= v <= most or choices and v not in choices):
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

        flags      image_tower/language_model/text_encoder FILE -> clip/gpt2 + clip_weights/gpt2_weights FILE
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
    live run from a killed one, so what a killed run left half-written (save_checkpoint's .ckpt.pt.*.tmp; cache .part
    files, locked while written) is removed. Resuming `checkpoint` cuts the log back to its step; `overwrite`
    starts afresh (unless this is the folder `resume` continues)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "a") as lock:
        if fcntl and not locked(lock):
            raise OSError(f"{out} is in use: another train.py writes there (give this run another --out-dir)")
        parts = (path for path in out.glob("cache/*.part") if locked(open(path, "rb")))
        for path in [*out.glob(".ckpt.pt.*.tmp"), *parts] if fcntl else []:
            path.unlink()
            print(f"removed {path}, left half-written by a killed run", file=sys.stderr)
        if overwrite and not (checkpoint and out.resolve() == Path(resume).resolve().parent):
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
