"""Images for prompts with Stable Diffusion 1.x (text-to-image and image-to-image), and captions for images.

    python generate.py "a cat wearing a space suit on Mars"
    python generate.py "a watercolor fox" --init-image photo.jpg --strength 0.6 --seed 7
    python generate.py --prompt-file prompts.txt --num-images 4 --sampler dpm++2m --sampling-steps 25

Stable Diffusion's three networks (the CLIP ViT-L/14 text tower, clip.py; the UNet, unet.py; the VAE, vae.py)
come from ONE official single file (`v1-5-pruned-emaonly.safetensors` or `.ckpt`, or an SD 1.x fine-tune in
that layout), fetched on first use, and ddpm.py's pipeline drives them as diffusers'
StableDiffusion(Img2Img)Pipeline does (Rombach et al. 2022): with the same seed, sampler and steps the images
equal diffusers'. Every PNG carries its settings as AUTOMATIC1111's web UI writes them, so the usual tools
read them back.

Image files, folders and globs get captions from ClipCap's COCO captioner (gpt2.py; fetched on first use, with
CLIP ViT-B/32), --captioner conceptual|FILE, or --ckpt: a captioner of train.py --task caption:
    python generate.py photo.jpg holiday/ "shots/*.png" [--num-beams 5] [--json]
Prompts get images from a text-to-image model of train.py --task diffusion, with the same flags as SD:
    python generate.py "a large red circle" --ckpt runs/diffusion/ckpt.pt --num-images 4 --rerank 8
An input is an image input when it is an existing image file, an existing folder (its images), or a glob with
magic characters (* ? [) that matches image files; anything else is a prompt (--prompt TEXT: always one).
"""
import argparse
import json
import os
import pickle
import re
import sys
from pathlib import Path

import torch

import ddpm
import weights
from clip import CLIPTextTransformer, PromptTokenizer, frozen_tower, load_visual, prompt_scorer
from ddpm import image_grid, parameters_text, save_png, to_pil
from gpt2 import CLIPCAP, Captioner
from tokenizer import GPT2Tokenizer
from unet import TextConditionedUNet, UNetModel
from vae import AutoencoderKL, load_image
from vit import (IMAGE_SUFFIXES, PRECISION_HELP, PRECISIONS, ImageReadError, image_files, preprocess,
                 pick_device, resolve_precision)

DEFAULT_WEIGHTS = "sd15/v1-5-pruned-emaonly.safetensors"
MAX_INIT_PIXELS = 1024 * 1024  # an --init-image drawn at its own size (SD draws 512x512; 12000x12000: 4 GB)

# -----------------------------------------------------------------------------------------------------------
# Stable Diffusion: three networks from one file, driven by ddpm.py's pipeline


def stable_diffusion(path, device="cpu", dtype=torch.float32):
    """SD 1.x's text encoder, UNet and VAE from ONE file read once (weights/: no pickle code runs), each by
    its loader (key set and shapes checked), as a ddpm.TextToImage with SD's noise schedule and tokenizer."""
    state = weights.load_state_dict(path)
    layout = torch.channels_last if dtype != torch.float32 else torch.preserve_format  # NHWC: vit.py
    unet = UNetModel.from_state_dict(state, dtype=dtype).to(device, memory_format=layout).eval()
    vae = AutoencoderKL.from_state_dict(state, dtype=dtype).to(device, memory_format=layout).eval()
    text_encoder = CLIPTextTransformer.from_state_dict(state, preset=None)  # any size: a fine-tune's too
    text_encoder = text_encoder.to(device, dtype).eval()
    return ddpm.TextToImage(ddpm.GaussianDiffusion(ddpm.PRESETS["sd15"]), unet, text_encoder,
                            PromptTokenizer("clip", 77), vae)


# -----------------------------------------------------------------------------------------------------------
# Command line


def networks_dtype(args, device, path):
    """The networks' dtype by --precision's one rule (vit.resolve_precision), said on stderr with what loads;
    the samplers and the images stay in fp32 (ddpm.py)."""
    precision = resolve_precision(args.precision, device)
    print(f"loading {path} on {device} in {precision} (--precision {args.precision})", file=sys.stderr)
    return PRECISIONS[precision]


def draw(args, prompts, checkpoint):
    """Prompt -> image files: one image per (prompt, seed), seeds counting up from --seed over all images."""
    device = pick_device(args.device)
    init_image = None
    if args.init_image:
        try:
            init_image = load_image(args.init_image, args.width, args.height, MAX_INIT_PIXELS)
        except ValueError as error:  # too large to draw at its own size: say how to resize it
            large = "pixels, more than" in str(error)
            hint = " (--width and --height resize it; SD 1.5: 512x512)" if large else ""
            raise ValueError(f"--init-image: {error}{hint}") from None
    if checkpoint:  # a text-to-image model of train.py (unet.py rebuilds it) at its size; EMA weights draw
        path, width = Path(args.ckpt), checkpoint["image_size"]
        net, vae, dtype = *TextConditionedUNet.from_checkpoint(checkpoint), networks_dtype(args, device, path)
        net, vae = net.to(device, dtype).eval(), vae and vae.to(device, dtype)
        diffusion = ddpm.GaussianDiffusion(ddpm.DiffusionConfig(**checkpoint["diffusion_config"]))
        pipe = ddpm.TextToImage(diffusion, net, net.encode_text, net.tokenize, vae)
    else:
        path = weights.file_or_fetch(args.sd_weights, args.weights_dir, args.offline, "--sd-weights")
        width = init_image.shape[2] if init_image is not None else args.width or 512
        dtype = networks_dtype(args, device, path)
        try:
            pipe = stable_diffusion(path, device, dtype)
        except (ValueError, KeyError, OSError, pickle.UnpicklingError) as error:  # not SD, truncated, unsafe
            raise ValueError(f"{path} is not a usable Stable Diffusion 1.x checkpoint: {error}") from None
        pipe.denoiser.set_attention(args.sdpa, slice_size=1024 if args.low_memory else None)
        pipe.vae.set_attention(args.sdpa)
        pipe.text_encoder.set_attention(args.sdpa)
    height = width if checkpoint else init_image.shape[1] if init_image is not None else args.height or 512
    warn_unread(prompts + [args.negative_prompt], pipe.tokenize, (checkpoint or {}).get("caption_words"))
    score = clip_scorer(args, device) if args.rerank > 1 else None

    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    jobs = [(prompt, seed + i) for i, prompt in  # --rerank: each kept image has its candidates' jobs in a row
            enumerate(p for p in prompts for _ in range(args.num_images * args.rerank))]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    first = 1 + max([int(p.name[:5]) for p in out_dir.glob("[0-9][0-9][0-9][0-9][0-9]-*.png")], default=-1)
    made, candidates = [], []  # (file, image, parameters); (CLIP similarity, seed, image) of one kept image
    strength = args.strength if init_image is not None else None
    for start in range(0, len(jobs), args.batch_size):
        batch = jobs[start:start + args.batch_size]
        images = pipe([p for p, _ in batch], [s for _, s in batch], [args.negative_prompt] * len(batch),
                      args.sampler, args.sampling_steps, args.guidance_scale, args.eta, height, width,
                      init_image, args.strength, vae_tile_size=64 if args.low_memory else None, progress=True,
                      s_noise=args.s_noise)
        for (prompt, image_seed), image in zip(batch, to_pil(images)):
            candidates.append((score(image, prompt) if score else 0.0, image_seed, image))
            if len(candidates) < args.rerank:
                continue
            _, image_seed, image = max(candidates, key=lambda c: c[0])  # the best by CLIP, else the only one
            candidates = []
            text = parameters_text(prompt, args.negative_prompt, args.sampling_steps, args.sampler,
                                   args.guidance_scale, image_seed, width, height, path.stem, strength,
                                   args.eta if args.sampler == "ddim" else 0.0, args.s_noise)
            made.append((out_dir / f"{first + len(made):05d}-{image_seed}.png", image, text))
            save_png(image, made[-1][0], text)
            print(made[-1][0])
    saved = [file for file, _, _ in made]
    if len(made) > 1:
        saved.append(out_dir / f"grid-{first:05d}-{seed}.png")
        save_png(image_grid([image for _, image, _ in made]), saved[-1], made[0][2])
        print(saved[-1])
    return saved


def warn_unread(prompts, tokenize, seen=None):
    """Warn of a prompt the text encoder cannot read whole, and of words a model's training captions lack."""
    for prompt in dict.fromkeys(prompts):
        cut = tokenize([prompt])[0]
        if not torch.equal(tokenize([prompt], 1024)[0, :len(cut)], cut):
            print(f"warning: the model reads {len(cut)} tokens, the rest is cut off: {prompt[:60]!r}...",
                  file=sys.stderr)
        if seen and (unseen := sorted(set(re.findall(r"[a-z0-9]+", prompt.lower())) - set(seen))):
            print(f"warning: words its training captions never used, so it has not learned them: "
                  f"{', '.join(unseen)} (in {prompt[:60]!r})", file=sys.stderr)


def clip_scorer(args, device):
    """--rerank: (PIL image, prompt) -> CLIP's similarity of the two (clip.prompt_scorer)."""
    try:
        return prompt_scorer(args.clip_weights or "ViT-B/32", args.weights_dir, args.offline, device)
    except (weights.WeightsUnavailable, ValueError, KeyError, OSError) as error:
        raise ValueError(f"--rerank needs CLIP weights (--clip-weights): {error}") from None


@torch.no_grad()
def caption_images(args, files, checkpoint):
    """Image files -> one `file<TAB>caption` line each (JSON lines with --json), --batch-size at once, by
    ClipCap's captioner (--captioner, loaded by gpt2.py) or a train.py one (--ckpt: gpt2.py rebuilds it,
    clip.py reads a frozen tower it names). Returns how many could not be read (each named on stderr)."""
    device, root, offline, tower = pick_device(args.device), args.weights_dir, args.offline, args.clip_weights
    if checkpoint:
        path = args.ckpt
        model = Captioner.from_checkpoint(checkpoint, frozen_tower(checkpoint, tower, root, offline))
    else:  # ClipCap's file first (offline: its name and URL are said first), then CLIP ViT-B/32's
        name = CLIPCAP.get(args.captioner, args.captioner)  # a released file's registered name, or a path
        path = weights.file_or_fetch(name, root, offline, "--captioner")
        visual = load_visual(tower or "ViT-B/32", root, offline)
        model = Captioner.from_pretrained(str(path), visual, root, offline)
    model = model.to(device, networks_dtype(args, device, path)).eval()
    model.gpt.decoding_layout()  # captions are decoded one token at a time (gpt2.py)
    tokenizer, unreadable = GPT2Tokenizer.default(), 0
    generator = torch.Generator(device).manual_seed(args.seed) if args.seed is not None else None
    for start in range(0, len(files), args.batch_size):
        batch = []
        for file in files[start:start + args.batch_size]:
            try:
                batch.append((file, preprocess(file, model.visual.config.image_resolution)))
            except ImageReadError as error:  # reported and skipped; the others are captioned
                print(error, file=sys.stderr)
                unreadable += 1
        if batch:
            texts = model.caption(torch.stack([pixels for _, pixels in batch]).to(device), tokenizer,
                                  num_beams=args.num_beams, temperature=args.temperature, top_p=args.top_p,
                                  generator=generator)
            for (file, _), text in zip(batch, texts):
                line = json.dumps({"file": file, "caption": text}) if args.json else f"{file}\t{text}"
                print(line, flush=True)
    return unreadable


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with the defaults (a default that depends on others is said in the flag's help instead)."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def main(argv=None):
    """The command line. The project's own errors print one line (--traceback: the whole traceback) and exit
    with 2 for a usage problem (a flag, a missing file) or 1 for a failure (an image that could not be
    captioned included): weights.one_line_errors."""
    return weights.one_line_errors("generate.py", run, sys.argv[1:] if argv is None else list(argv))


def run(argv):
    parser = weights.Parser("generate.py", description="Images for prompts with Stable Diffusion 1.x or a "
                            "model of train.py; captions for images with ClipCap or a train.py model.",
                            formatter_class=HelpFormatter)
    parser.add_argument("inputs", nargs="*", help="prompts to draw, one image set per prompt; or image "
                        "files, folders and globs to caption")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt, never a file (repeatable)")
    parser.add_argument("--prompt-file", help="a text file with one prompt per line (blank lines skipped)")
    parser.add_argument("--negative-prompt", default="", help="what the image should not show")
    parser.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale (1 = no "
                        "guidance; default 7.5, or a --ckpt model's own from its training config)")
    parser.add_argument("--sampling-steps", type=int, help="sampler steps (default 50, or a --ckpt model's)")
    parser.add_argument("--sampler", choices=ddpm.SAMPLERS, help="ddim (default: CompVis' txt2img.py, and "
                        "diffusers' DDIMScheduler; or the --ckpt model's own), ddpm, euler or dpm++2m")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM's noise: 0 deterministic, 1 like DDPM")
    parser.add_argument("--s-noise", type=float, help="DDPM's (and DDIM's) fresh noise times this "
                        "(default 1, or a --ckpt model's)")
    parser.add_argument("--seed", type=int, help="seed of image 1, the others count up (default: random)")
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt")
    parser.add_argument("--batch-size", type=int, default=1, help="images denoised (or captioned) together")
    for name in ("height", "width"):
        parser.add_argument(f"--{name}", type=int, help=f"image {name}, a multiple of 8 (default 512, or the "
                            "init image's)")
    parser.add_argument("--init-image", help="image-to-image: start from this picture, not noise (at its "
                        f"own size, up to {MAX_INIT_PIXELS:,} pixels, unless --width and --height say)")
    parser.add_argument("--strength", type=float, default=0.8, help="image-to-image: how much to change the "
                        "init image, in (0, 1]; 1 ignores it")
    parser.add_argument("--out-dir", default="outputs", help="where the PNGs go")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda:1, mps")
    parser.add_argument("--precision", choices=["auto", *PRECISIONS], default="auto", help=PRECISION_HELP)
    parser.add_argument("--sd-weights", default=DEFAULT_WEIGHTS, help="SD 1.x weights: a single file "
                        "(.safetensors or .ckpt) or a registered name (fetched on first use)")
    parser.add_argument("--weights-dir", help="weights' folder (default: $MINIMODAL_WEIGHTS, else weights/)")
    parser.add_argument("--offline", action="store_true", help="never download; say which URL to fetch")
    parser.add_argument("--sdpa", action=argparse.BooleanOptionalAction, default=True,
                        help="fused scaled_dot_product_attention (--no-sdpa: the plain math)")
    parser.add_argument("--low-memory", action="store_true", help="small GPUs: sliced attention, VAE tiles")
    parser.add_argument("--ckpt", help="a checkpoint of train.py: --task caption captions the image inputs, "
                        "--task diffusion draws the prompts (instead of SD)")
    parser.add_argument("--captioner", default="coco", help="ClipCap's coco, conceptual (fetched), or a file")
    parser.add_argument("--rerank", type=int, default=1, help="draw N candidates per image, keep the one "
                        "CLIP finds most like the prompt")
    parser.add_argument("--clip-weights", help="CLIP weights (default ViT-B/32, fetched on first use) of "
                        "--rerank, of ClipCap's captioner, or of a --ckpt captioner's frozen image tower")
    parser.add_argument("--json", action="store_true", help="captions as JSON lines {file, caption}")
    parser.add_argument("--num-beams", type=int, default=1, help="captions: beam search when > 1")
    parser.add_argument("--temperature", type=float, default=0.0, help="captions: sample above 0 (0: greedy)")
    parser.add_argument("--top-p", type=float, default=1.0, help="captions: nucleus sampling mass")
    parser.add_argument("--traceback", action="store_true", help="on an error, the traceback, not one line")
    args = parser.parse_args(argv)
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value < 8 or value % 8):
            parser.error(f"--{name} must be a positive multiple of 8 (the VAE shrinks 8x), got {value}")
    if min(1 if args.sampling_steps is None else args.sampling_steps, args.num_images, args.batch_size,
           args.rerank, args.num_beams) < 1:
        parser.error("--sampling-steps, --num-images, --batch-size, --rerank and --num-beams must be >= 1")
    numbers = (args.eta, args.temperature, args.guidance_scale or 0, args.s_noise or 0)
    if not (0 < args.strength <= 1 and 0 <= args.top_p <= 1 and all(0 <= n < float("inf") for n in numbers)):
        parser.error("--strength must be in (0, 1], --top-p in [0, 1]; --eta, --temperature, "
                     "--guidance-scale, --s-noise >= 0")  # NaN fails every test
    if pick_device(args.device) is None:
        parser.error(f"--device {args.device}: this machine has no such device")
    # What the inputs are decides the task (image_files has the rule): images get captions, prompts images
    found = {arg: image_files(arg) for arg in args.inputs}
    images = [arg for arg, files in found.items() if files is not None]
    prompts = [arg for arg in args.inputs if arg not in images] + args.prompt
    if args.prompt_file:
        try:
            prompts += [line.strip() for line in Path(args.prompt_file).read_text("utf-8").splitlines()
                        if line.strip()]
        except (OSError, UnicodeDecodeError) as error:
            parser.error(f"--prompt-file: {error}")
    if images and prompts:
        parser.error(f"give images to caption or prompts to draw, not both: {images[0]!r} is an image input, "
                     f"{prompts[0]!r} a prompt (--prompt TEXT is always one)")
    if empty := [arg for arg in images if not found[arg]]:
        parser.error(f"no image files in the folder {empty[0]} ({', '.join(IMAGE_SUFFIXES)})")
    for arg in images:
        if "/" not in arg and os.sep not in arg and not arg.lower().endswith(IMAGE_SUFFIXES):
            print(f"note: {arg!r} names {'a folder' if os.path.isdir(arg) else 'files'} here: captioning "
                  f"{len(found[arg])} image(s) (--prompt {arg!r} draws it instead)", file=sys.stderr)
    if missing := [arg for arg in args.inputs if found[arg] is None and " " not in arg and
                   arg.lower().endswith(IMAGE_SUFFIXES)]:  # a typo must not start a 4 GB download
        parser.error(f"no such image file: {missing[0]} (--prompt {missing[0]!r} draws it as a prompt)")
    if not images and not prompts:
        parser.error("give at least one prompt (or --prompt-file), or image files to caption")
    checkpoint = None
    if args.ckpt:
        if not os.path.isfile(args.ckpt):
            parser.error(f"--ckpt {args.ckpt}: no such file")
        checkpoint = weights.read_checkpoint(args.ckpt)
        if checkpoint["task"] != ("caption" if images else "diffusion"):
            parser.error(f"--ckpt {args.ckpt} is a train.py --task {checkpoint['task']} checkpoint: it " + (
                "draws prompts, and captioning images needs a --task caption one" if images else "captions "
                "images, and drawing prompts needs a --task diffusion one (or no --ckpt: Stable Diffusion)"))
    if images:
        files = [file for arg in images for file in found[arg]]
        if unreadable := caption_images(args, files, checkpoint):
            raise ValueError(f"{unreadable} of {len(files)} images could not be read (each is named above)")
        return None
    size = checkpoint and checkpoint["image_size"]
    if checkpoint and (args.init_image or {args.width, args.height} - {None, size}):
        parser.error(f"{args.ckpt} draws {size}x{size} images from noise only (no --init-image, and "
                     "--width/--height only at that size)")
    for name, default in (("sampler", "ddim"), ("sampling_steps", 50), ("guidance_scale", 7.5),
                          ("s_noise", 1.0)):
        if getattr(args, name) is None:  # Stable Diffusion's defaults, or what a --ckpt model was judged with
            setattr(args, name, checkpoint[name] if checkpoint else default)
    schedule = checkpoint and ddpm.DiffusionConfig(**checkpoint["diffusion_config"])
    try:
        ddpm.GaussianDiffusion(schedule).sampling_timesteps(args.sampler, args.sampling_steps,
                                                            args.strength if args.init_image else 1.0)
    except ValueError as error:
        parser.error(str(error))
    return draw(args, prompts, checkpoint)


if __name__ == "__main__":
    main()
