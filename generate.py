"""Images for prompts with Stable Diffusion 1.x (text-to-image and image-to-image), and captions for images.

    python generate.py "a cat wearing a space suit on Mars"
    python generate.py "a watercolor fox" --init-image photo.jpg --strength 0.6 --seed 7
    python generate.py --prompt-file prompts.txt --num-images 4 --sampler dpm++2m --steps 25

The pipeline is the one of Rombach et al. 2022 (arXiv:2112.10752) as diffusers' StableDiffusionPipeline and
StableDiffusionImg2ImgPipeline run it: CLIP ViT-L/14 text features of prompt and negative prompt (clip.py),
classifier-free guidance and a sampler from ddpm.py over the UNet (unet.py) in latent space, the VAE decoder
(vae.py) back to pixels. All three networks come from ONE official single file (`v1-5-pruned-emaonly.safetensors`
or `.ckpt`, or any SD 1.x fine-tune in that layout), fetched on first use. With the same seed, sampler and steps
the images equal diffusers' (tests/test_generate_sd.py). Every PNG carries its settings in a "parameters" text
chunk written as AUTOMATIC1111's web UI writes it, so the usual tools read them back.

Image files, folders and globs get captions from a captioner of train.py --task caption (ClipCap, gpt2.py):
    python generate.py photo.jpg holiday/ "shots/*.png" --ckpt runs/caption/ckpt.pt [--json]
Prompts get images from a text-to-image model of train.py --task diffusion, with the same flags as SD:
    python generate.py "a large red circle" --ckpt runs/diffusion/ckpt.pt --num-images 4 --rerank 8
"""
import argparse
import glob
import json
import math
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

import ddpm
import weights
from clip import CLIPTextTransformer
from tokenizer import CLIPTokenizer
from unet import UNetModel
from vae import AutoencoderKL

DEFAULT_WEIGHTS = "sd15/v1-5-pruned-emaonly.safetensors"
SAMPLER_NAMES = {"ddpm": "DDPM", "ddim": "DDIM", "euler": "Euler", "dpm++2m": "DPM++ 2M"}  # as AUTOMATIC1111
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# ---------------------------------------------------------------------------------------------------------------
# Prompt -> image: the Stable Diffusion pipeline


class StableDiffusion:
    """Text encoder, UNet and VAE of one SD 1.x checkpoint, and the diffusion process that drives them."""

    def __init__(self, unet, vae, text_encoder, tokenizer=None, diffusion=None):
        self.unet, self.vae, self.text_encoder = unet.eval(), vae.eval(), text_encoder.eval()
        self.tokenizer = tokenizer or CLIPTokenizer.default()
        self.diffusion = diffusion or ddpm.GaussianDiffusion(ddpm.PRESETS["sd15"])

    @classmethod
    def from_single_file(cls, path, device="cpu", dtype=torch.float32):
        """Read the file once (weights/' restricted readers: no pickle code runs) and build the three networks
        from their prefixes; each loader checks its key set and shapes and names what it ignores."""
        state = weights.load_state_dict(path)
        unet = UNetModel.from_state_dict(state, dtype=dtype)
        vae = AutoencoderKL.from_state_dict(state, dtype=dtype)
        text_encoder = CLIPTextTransformer.from_state_dict(state, preset=None)  # shapes say which size it is
        return cls(unet.to(device), vae.to(device), text_encoder.to(device, dtype))

    @property
    def device(self):
        return next(self.unet.parameters()).device

    def set_attention(self, use_sdpa=True, slice_size=None):
        """One switch for the attention of all three networks: SDPA or the plain math (tested equal)."""
        self.unet.set_attention(use_sdpa, slice_size)
        self.vae.set_attention(use_sdpa)
        self.text_encoder.set_attention(use_sdpa)

    @torch.no_grad()
    def encode_text(self, prompts):
        tokens = self.tokenizer.tokenize(prompts, pad="eot")  # (B, 77); SD 1.x pads with EOT, as HF's tokenizer
        return self.text_encoder(tokens.to(self.device))  # (B, 77, C) last hidden state: the UNet's context

    @torch.no_grad()
    def __call__(self, prompts, seeds, negative_prompts=None, sampler="ddim", steps=50, guidance_scale=7.5,
                 eta=0.0, height=512, width=512, init_image=None, strength=0.8, vae_tile_size=None,
                 progress=False):
        """One image per (prompt, seed) -> (B, 3, H, W) in [0, 1], float32 on the CPU. `init_image` (3, H, W) in
        [-1, 1] switches to image-to-image. Each image draws all its randomness (initial noise, the VAE sample
        of the input image, DDPM's step noise) from its own CPU generator, so a seed gives the same image in any
        batch and on any device; that is also how diffusers consumes a list of generators."""
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        context = self.encode_text(prompts)
        uncond = self.encode_text(negative_prompts or [""] * len(prompts)) if guidance_scale > 1 else None
        vae_dtype = next(self.vae.parameters()).dtype
        init = None
        if init_image is not None:  # one encoding, one posterior sample per image, scaled for the UNet
            posterior = self.vae.encode(init_image[None].to(self.device, vae_dtype))  # over (1, 4, h, w)
            init = torch.cat([posterior.sample(g) for g in generators]).float() * self.vae.config.scale_factor
        f = self.vae.downscale
        shape = (len(prompts), self.unet.config.in_channels, height // f, width // f)
        noise = ddpm.randn(shape, generators, self.device)
        denoise = ddpm.classifier_free_guidance(self.unet, context, uncond, guidance_scale)
        latents = self.diffusion.sample(denoise, noise, sampler, steps, eta=eta, generator=generators, init=init,
                                        strength=strength if init is not None else 1.0, progress=progress)
        images = self.vae.decode_latents(latents.to(vae_dtype), tile_size=vae_tile_size)  # (B, 3, H, W) in [-1, 1]
        return ((images.float() + 1) / 2).cpu()


def load_image(path, width=None, height=None):
    """An image file -> (3, H, W) in [-1, 1], resized with Lanczos to width x height (default: its own size
    rounded down to multiples of 8), as diffusers' VaeImageProcessor prepares it."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except (OSError, ValueError) as error:  # missing, truncated, not an image
        raise ValueError(f"cannot read image {path}: {error}") from None
    width, height = width or image.width // 8 * 8, height or image.height // 8 * 8
    if width < 8 or height < 8:
        raise ValueError(f"image {path} is {image.width}x{image.height}: too small (at least 8x8)")
    pixels = np.asarray(image.resize((width, height), Image.LANCZOS), dtype=np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy(pixels).permute(2, 0, 1) * 2 - 1  # (3, H, W)


def to_pil(images):
    """(B, 3, H, W) in [0, 1] -> PIL images, rounding as diffusers' numpy_to_pil does."""
    array = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)  # (B, H, W, 3)
    return [Image.fromarray(a) for a in array]


def parameters_text(prompt, negative_prompt, steps, sampler, guidance_scale, seed, width, height, model,
                    strength=None, eta=0.0):
    """AUTOMATIC1111's infotext: the prompt, a "Negative prompt:" line when there is one, then key: value pairs."""
    lines = [prompt] + ([f"Negative prompt: {negative_prompt}"] if negative_prompt else [])
    fields = [f"Steps: {steps}", f"Sampler: {SAMPLER_NAMES[sampler]}", f"CFG scale: {guidance_scale:g}",
              f"Seed: {seed}", f"Size: {width}x{height}", f"Model: {model}"]
    fields += [f"Denoising strength: {strength:g}"] if strength is not None else []
    fields += [f"Eta: {eta:g}"] if eta else []  # DDIM's η
    return "\n".join(lines + [", ".join(fields)])


def save_png(image, path, parameters):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    image.save(path, pnginfo=info)


def image_grid(images):
    """Paste images into a near-square grid, row by row."""
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * w, (i // cols) * h))
    return grid


# ---------------------------------------------------------------------------------------------------------------
# Command line


def pick_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device = torch.device(name)
    if (device.type == "cuda" and not torch.cuda.is_available()) or \
            (device.type == "mps" and not torch.backends.mps.is_available()):
        sys.exit(f"error: --device {name}: this machine has no such device")
    return device


def resolve_weights(args):
    """--weights as a file path, else as a registry name fetched into --weights-dir (downloaded on first use)."""
    if Path(args.weights).is_file():
        return Path(args.weights)
    if args.weights not in weights.REGISTRY:
        sys.exit(f"error: --weights {args.weights}: no such file, and not a registered name "
                 f"(e.g. {DEFAULT_WEIGHTS})")
    try:
        return weights.fetch(args.weights, root=args.weights_dir, offline=args.offline)
    except weights.WeightsUnavailable as error:
        sys.exit(f"error: Stable Diffusion weights unavailable: {error}")


def draw(args, prompts):
    """Prompt -> image files: one image per (prompt, seed), seeds counting up from --seed over all images."""
    device, dtype = pick_device(args.device), args.dtype
    dtype = DTYPES[dtype] if dtype != "auto" else (torch.float32 if device.type == "cpu" else torch.float16)
    init_image = None
    if args.init_image:
        try:
            init_image = load_image(args.init_image, args.width, args.height)
        except ValueError as error:
            sys.exit(f"error: --init-image: {error}")
    width = init_image.shape[2] if init_image is not None else args.width or 512
    height = init_image.shape[1] if init_image is not None else args.height or 512
    if args.ckpt:  # a text-to-image model of train.py
        pipe, path, width = trained_pipeline(args, device, dtype)
        height = width
    else:
        path = resolve_weights(args)
        print(f"loading {path} on {device} ({str(dtype).replace('torch.', '')})", file=sys.stderr)
        try:
            pipe = StableDiffusion.from_single_file(path, device, dtype)
        except (ValueError, KeyError, OSError, pickle.UnpicklingError) as error:  # not SD 1.x, truncated, unsafe
            sys.exit(f"error: {path} is not a usable Stable Diffusion 1.x checkpoint: {error}")
        pipe.set_attention(args.sdpa, slice_size=1024 if args.low_memory else None)
        for prompt in prompts + [args.negative_prompt]:
            if len(pipe.tokenizer.encode(prompt)) + 2 > 77:  # what diffusers warns about, too
                print(f"warning: the text encoder reads 77 tokens, the rest is cut off: {prompt[:60]!r}...",
                      file=sys.stderr)
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
                      args.sampler, args.steps, args.guidance_scale, args.eta, height, width, init_image,
                      args.strength, vae_tile_size=64 if args.low_memory else None, progress=True)
        for (prompt, image_seed), image in zip(batch, to_pil(images)):
            candidates.append((score(image, prompt) if score else 0.0, image_seed, image))
            if len(candidates) < args.rerank:
                continue
            _, image_seed, image = max(candidates, key=lambda c: c[0])  # the best by CLIP, else the only one
            candidates = []
            text = parameters_text(prompt, args.negative_prompt, args.steps, args.sampler, args.guidance_scale,
                                   image_seed, width, height, path.stem, strength,
                                   args.eta if args.sampler == "ddim" else 0.0)
            made.append((out_dir / f"{first + len(made):05d}-{image_seed}.png", image, text))
            save_png(image, made[-1][0], text)
            print(made[-1][0])
    saved = [file for file, _, _ in made]
    if len(made) > 1:
        saved.append(out_dir / f"grid-{first:05d}-{seed}.png")
        save_png(image_grid([image for _, image, _ in made]), saved[-1], made[0][2])
        print(saved[-1])
    return saved


def trained_pipeline(args, device, dtype):
    """A text-to-image checkpoint of train.py as a pipeline called like StableDiffusion: (pipe, path, image size)."""
    from train import load_text_to_image
    try:
        model, cfg, tokenize = load_text_to_image(args.ckpt, device)
    except (ValueError, KeyError, OSError, pickle.UnpicklingError) as error:
        sys.exit(f"error: --ckpt {args.ckpt}: {error}")
    if args.init_image or {args.width, args.height} - {None, cfg.image_size}:
        sys.exit(f"error: {args.ckpt} draws {cfg.image_size}x{cfg.image_size} images from noise only (no "
                 "--init-image, and --width/--height only at that size)")
    model.to(device, dtype)
    # what the model was judged with at training (its config's sampler, steps, guidance) unless given here:
    # the SD defaults (guidance 7.5) overdrive a small model trained from scratch
    args.sampler, args.steps = args.sampler or cfg.sampler, args.steps or cfg.sampling_steps
    args.guidance_scale = cfg.guidance_scale if args.guidance_scale is None else args.guidance_scale

    def pipe(prompts, seeds, negative_prompts, sampler, steps, guidance_scale, eta, *_, progress=False, **__):
        return model.generate(tokenize(prompts).to(device), seeds, sampler, steps, guidance_scale, cfg.image_size,
                              eta, tokenize(negative_prompts).to(device), progress)
    return pipe, Path(args.ckpt), cfg.image_size


def clip_scorer(args, device):
    """--rerank: (PIL image, prompt) -> the cosine similarity of CLIP's image and text embeddings."""
    from clip import CLIP, preprocess
    try:
        model = CLIP.from_pretrained(args.clip_weights, args.weights_dir, args.offline).to(device).eval()
    except (weights.WeightsUnavailable, ValueError, KeyError, OSError) as error:
        sys.exit(f"error: --rerank needs CLIP weights (--clip-weights): {error}")
    tokenizer = CLIPTokenizer.default()

    @torch.no_grad()
    def score(image, prompt):
        image_embed = model.encode_image(preprocess(image, model.config.vision.image_resolution)[None].to(device))
        return torch.cosine_similarity(image_embed, model.encode_text(tokenizer.tokenize([prompt]).to(device))).item()
    return score


def is_image_file(arg):
    return arg.lower().endswith(IMAGE_SUFFIXES) and Path(arg).is_file()


def image_files(arg):
    """The image files an input names: itself, a folder's images (sorted), or a glob's matches; [] for a prompt."""
    if Path(arg).is_dir():
        return sorted(str(p) for p in Path(arg).iterdir() if is_image_file(str(p)))
    return [arg] if is_image_file(arg) else sorted(f for f in glob.glob(arg) if is_image_file(f))


@torch.no_grad()
def caption_images(args, files):
    """Image files -> one `file<TAB>caption` line each (JSON lines with --json), --batch-size images at a time."""
    from tokenizer import GPT2Tokenizer
    from train import caption, load_captioner  # the captioner's code; Stable Diffusion never needs it
    from vit import ImageReadError, preprocess

    device = pick_device(args.device)
    model, cfg = load_captioner(args.ckpt, device)
    tokenizer = GPT2Tokenizer.default()
    generator = torch.Generator(device).manual_seed(args.seed) if args.seed is not None else None
    for start in range(0, len(files), args.batch_size):
        batch = []
        for file in files[start:start + args.batch_size]:
            try:
                batch.append((file, preprocess(file, model.visual.config.image_resolution)))
            except ImageReadError as error:  # reported and skipped; the others are captioned
                print(error, file=sys.stderr)
        if batch:
            embeds = model.embed(torch.stack([pixels for _, pixels in batch]).to(device))
            texts = caption(model, embeds, tokenizer, cfg.max_caption_tokens, num_beams=args.num_beams,
                            temperature=args.temperature, top_p=args.top_p, generator=generator)
            for (file, _), text in zip(batch, texts):
                print(json.dumps({"file": file, "caption": text}) if args.json else f"{file}	{text}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Images for prompts with Stable Diffusion 1.x.")
    parser.add_argument("inputs", nargs="*", help="prompts to draw, one image set per prompt; or image files, "
                        "folders and globs to caption (with --ckpt)")
    parser.add_argument("--prompt-file", help="a text file with one prompt per line (blank lines skipped)")
    parser.add_argument("--negative-prompt", default="", help="what the image should not show")
    parser.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale (1 = no guidance; "
                        "default 7.5, or a --ckpt model's own from its training config)")
    parser.add_argument("--steps", type=int, help="sampling steps (default 50, or the --ckpt model's own)")
    parser.add_argument("--sampler", choices=ddpm.SAMPLERS, help="ddim (default: CompVis' txt2img.py, and "
                        "diffusers' DDIMScheduler; or the --ckpt model's own), ddpm, euler or dpm++2m")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM's noise: 0 deterministic, 1 like DDPM")
    parser.add_argument("--seed", type=int, help="seed of the first image, the next images count up "
                        "(default: random)")
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt")
    parser.add_argument("--batch-size", type=int, default=1, help="images denoised (or captioned) together")
    parser.add_argument("--height", type=int, help="image height, a multiple of 8 (default 512, or the "
                        "init image's)")
    parser.add_argument("--width", type=int, help="image width, a multiple of 8 (default 512, or the "
                        "init image's)")
    parser.add_argument("--init-image", help="image-to-image: start from this picture instead of noise")
    parser.add_argument("--strength", type=float, default=0.8, help="image-to-image: how much to change the "
                        "init image, in (0, 1]; 1 ignores it")
    parser.add_argument("--out-dir", default="outputs", help="where the PNGs go")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="weights' precision "
                        "(auto: fp16 on a GPU, fp32 on the CPU); the sampler always works in fp32")
    parser.add_argument("--weights", default=DEFAULT_WEIGHTS, help="an SD 1.x single file (.safetensors or "
                        f".ckpt) or a registered name (default {DEFAULT_WEIGHTS}, fetched on first use)")
    parser.add_argument("--weights-dir", help="where registered weights live (default: $MINIMODAL_WEIGHTS, "
                        "else weights/)")
    parser.add_argument("--offline", action="store_true", help="never download; say which URL to fetch by hand")
    parser.add_argument("--sdpa", action=argparse.BooleanOptionalAction, default=True,
                        help="fused scaled_dot_product_attention (--no-sdpa: the plain math)")
    parser.add_argument("--low-memory", action="store_true", help="slice attention and decode the VAE in "
                        "tiles, for small GPUs (tiles change the image very slightly)")
    parser.add_argument("--ckpt", help="a checkpoint of train.py: --task caption captions the image inputs, "
                        "--task diffusion draws the prompts (instead of SD)")
    parser.add_argument("--rerank", type=int, default=1, help="draw N candidates per image, keep the one CLIP "
                        "finds most like the prompt")
    parser.add_argument("--clip-weights", default="ViT-B/32", help="--rerank: CLIP ViT-B/32 (fetched on first "
                        "use) or a CLIP file")
    parser.add_argument("--json", action="store_true", help="captions as JSON lines {file, caption}")
    parser.add_argument("--num-beams", type=int, default=1, help="captions: beam search when > 1 (default greedy)")
    parser.add_argument("--temperature", type=float, default=0.0, help="captions: sample above 0 (default greedy)")
    parser.add_argument("--top-p", type=float, default=1.0, help="captions: nucleus sampling mass")
    args = parser.parse_args(argv)

    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value < 8 or value % 8):
            parser.error(f"--{name} must be a positive multiple of 8 (the VAE shrinks images 8x), got {value}")
    if min(1 if args.steps is None else args.steps, args.num_images, args.batch_size, args.rerank) < 1:
        parser.error("--steps, --num-images and --batch-size must be at least 1, and --rerank too")
    if not 0 < args.strength <= 1 or args.eta < 0 or (args.guidance_scale or 0) < 0:
        parser.error("--strength must be in (0, 1]; --eta and --guidance-scale must be >= 0")

    # What the inputs are decides the task: image files get captions, anything else is a prompt.
    images = {arg: image_files(arg) for arg in args.inputs}
    if any(images.values()):
        if not all(images.values()) or not args.ckpt or args.num_beams < 1:
            parser.error("captioning takes image files, folders or globs only, and --ckpt (a train.py --task "
                         f"caption checkpoint); no images in: {[a for a, f in images.items() if not f]}")
        return caption_images(args, [file for files in images.values() for file in files])
    missing = [arg for arg in args.inputs if arg.lower().endswith(IMAGE_SUFFIXES) and " " not in arg]
    if missing:  # a mistyped file name should not start a 4 GB download to draw it as a prompt
        parser.error(f"no such image file: {missing[0]}")
    prompts = list(args.inputs)
    if args.prompt_file:
        try:
            prompts += [line.strip() for line in Path(args.prompt_file).read_text("utf-8").splitlines()
                        if line.strip()]
        except (OSError, UnicodeDecodeError) as error:
            parser.error(f"--prompt-file: {error}")
    if not prompts:
        parser.error("give at least one prompt (or --prompt-file)")
    if not args.ckpt:  # Stable Diffusion's defaults; a trained model's come with it (trained_pipeline)
        args.sampler, args.steps = args.sampler or "ddim", args.steps or 50
        args.guidance_scale = 7.5 if args.guidance_scale is None else args.guidance_scale
        try:
            ddpm.GaussianDiffusion().sampling_timesteps(args.sampler, args.steps,
                                                        args.strength if args.init_image else 1.0)
        except ValueError as error:
            parser.error(str(error))
    return draw(args, prompts)


if __name__ == "__main__":
    main()
