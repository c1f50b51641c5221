"""The Vision Transformer exactly as CLIP builds it, and CLIP's image preprocessing.

Paper: Dosovitskiy et al. 2020, "An Image is Worth 16x16 Words" (the ViT), as used by Radford et al. 2021,
"Learning Transferable Visual Models From Natural Language Supervision" (CLIP).
Official code: openai/CLIP `clip/model.py` (`VisionTransformer`, `Transformer`, `ResidualAttentionBlock`,
`QuickGELU`, `build_model`) and `clip/clip.py` (`_transform`). Module names equal the keys under `visual.` in
OpenAI's checkpoint, so `visual.transformer.resblocks.0.attn.in_proj_weight` loads with no renaming. Unlike the
official code, everything is batch-first: no sequence-first (LND) permutes around `nn.MultiheadAttention`.

The text tower, the whole CLIP model, the Hugging Face key mapping and `load_visual` (this tower out of any CLIP
file) live in clip.py. The last section maps what the tower makes of an image to a language model's input vectors
(ClipCap's and LLaVA-1.5's mapping networks), for gpt2.py's captioner.
"""
import glob
import os
import re
import stat
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageOps

import weights

# -----------------------------------------------------------------------------------------------------------
# Building blocks (shared with clip.py's text tower)


class QuickGELU(nn.Module):
    """CLIP's GELU approximation x * sigmoid(1.702 x); the weights were trained with it, so it is not optional."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter layout (q; k; v packed as rows of
    `in_proj_weight`, then `out_proj`), written out batch-first. `causal`: token t attends to tokens <= t only
    (CLIP's text tower); the image tower attends everywhere."""

    def __init__(self, width, heads, causal=False):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.use_sdpa = True  # the switch (set_attention): F.scaled_dot_product_attention or the plain math
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)  # nn.MultiheadAttention's own initialisation

    def forward(self, x):
        B, T, C = x.shape
        H, D = self.heads, C // self.heads
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).split(C, dim=-1)
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if self.use_sdpa:  # fast path: fused kernel, same math
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            att = q @ k.transpose(-2, -1) * D**-0.5  # (B, H, T, T)
            if self.causal:  # -inf above the diagonal: no looking ahead
                att = att.masked_fill(torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
            y = att.softmax(dim=-1) @ v  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.out_proj(y)


class ResidualAttentionBlock(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width, heads, causal=False):
        super().__init__()
        self.attn = Attention(width, heads, causal)
        self.ln_1 = nn.LayerNorm(width)  # eps 1e-5, PyTorch's default, as in the official code
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, 4 * width)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(4 * width, width)),
        ]))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of blocks."""

    def __init__(self, width, layers, heads, causal=False):
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, causal) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)

    def set_attention(self, use_sdpa=True):
        for block in self.resblocks:
            block.attn.use_sdpa = use_sdpa


def sincos_positions(grid, width):
    """2-D sine-cosine position embeddings, (grid * grid, width): x in the first half, y in the second (MAE, He et
    al. 2021; Beyer et al. 2022, "Better plain ViT baselines"). A tiny tower trained from scratch starts from them
    instead of random vectors, so it knows where each patch is from the first step (shapes captioner: 45% -> 55%
    exact match after 4,000 steps)."""
    y, x = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    omega = 1 / 10000 ** (torch.arange(width // 4) / (width // 4))  # (C/4,)
    angles = [position.reshape(-1, 1) * omega for position in (x, y)]  # each (grid * grid, C/4)
    return torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1)

# -----------------------------------------------------------------------------------------------------------
# Config: OpenAI's build_model names


@dataclass
class VisionConfig:
    image_resolution: int = 224
    vision_layers: int = 12
    vision_width: int = 768
    vision_patch_size: int = 32
    embed_dim: int = 512  # width of the joint image-text space (columns of `proj`)

    @property
    def vision_heads(self):
        return self.vision_width // 64  # openai/CLIP build_model: one head per 64 channels

    @property
    def num_tokens(self):
        return (self.image_resolution // self.vision_patch_size) ** 2 + 1  # the class token and the patch grid

    @classmethod
    def from_state_dict(cls, sd, prefix="visual."):
        """Read the config off the tensor shapes, as openai/CLIP `build_model` does."""
        width, _, patch, _ = sd[prefix + "conv1.weight"].shape
        layers = len({k.split(".")[3] for k in sd if k.startswith(prefix + "transformer.resblocks.")})
        grid = round((sd[prefix + "positional_embedding"].shape[0] - 1) ** 0.5)
        return cls(patch * grid, layers, width, patch, sd[prefix + "proj"].shape[1])


# Parameter counts are of the image tower alone (conv1 ... proj); sources: openai/CLIP `_MODELS`.
VISION_PRESETS = {
    "ViT-B/32": VisionConfig(224, 12, 768, 32, 512),   # 87,849,216 params
    "ViT-B/16": VisionConfig(224, 12, 768, 16, 512),   # 86,192,640 params
    "ViT-L/14": VisionConfig(224, 24, 1024, 14, 768),  # 303,966,208 params
}

# -----------------------------------------------------------------------------------------------------------
# The model


class VisionTransformer(nn.Module):
    def __init__(self, config: VisionConfig, sincos=False):
        """sincos=True starts the patch positions from sincos_positions (a tower trained from scratch); the
        class token's position, and every position with sincos=False, starts random as in openai/CLIP."""
        super().__init__()
        self.config = config
        C, P = config.vision_width, config.vision_patch_size
        scale = C**-0.5
        self.conv1 = nn.Conv2d(3, C, kernel_size=P, stride=P, bias=False)  # patchify: one token per P x P patch
        self.class_embedding = nn.Parameter(scale * torch.randn(C))
        positions = scale * torch.randn(config.num_tokens, C)
        if sincos:
            positions[1:] = sincos_positions(config.image_resolution // P, C)  # row 0: the class token
        self.positional_embedding = nn.Parameter(positions)
        self.ln_pre = nn.LayerNorm(C)
        self.transformer = Transformer(C, config.vision_layers, config.vision_heads)
        self.ln_post = nn.LayerNorm(C)
        self.proj = nn.Parameter(scale * torch.randn(C, config.embed_dim))  # used as x @ proj

    def forward(self, image, return_tokens=False):
        """image: (B, 3, 224, 224) normalised pixels. Returns the pooled, projected embedding (B, embed_dim);
        with return_tokens=True also every token's hidden state after the last block (B, 1 + h*w, C), before
        ln_post (Hugging Face's `last_hidden_state`)."""
        x = self.conv1(image.to(self.conv1.weight.dtype))  # (B, C, h, w)
        x = x.flatten(2).transpose(1, 2)  # (B, T, C) with T = h*w
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, 1 + T, C)
        x = self.transformer(self.ln_pre(x))
        pooled = self.ln_post(x[:, 0]) @ self.proj  # (B, embed_dim): the class token is the image summary
        return (pooled, x) if return_tokens else pooled

    def embed_tokens(self, image):
        """Every token in the joint space, (B, 1 + h*w, embed_dim): ln_post and proj applied to each token as to
        the class token. Row 0 is forward()'s pooled embedding; the rest keep where each patch is."""
        _, x = self.forward(image, return_tokens=True)  # (B, 1 + h*w, C)
        return self.ln_post(x) @ self.proj

    def set_attention(self, use_sdpa=True):
        """The one switch for every attention layer: fused SDPA (True) or the plain math (tested equal)."""
        self.transformer.set_attention(use_sdpa)
        return self

    @classmethod
    def from_state_dict(cls, sd, prefix="visual.", preset="ViT-B/32"):
        """Build from a state dict with OpenAI's names (keys under `prefix`; others are not the tower's); the
        config is read off the shapes and checked against VISION_PRESETS[preset] (preset=None skips the check).
        Tensors are cast to float32 (OpenAI stores many weights in fp16). clip.load_visual reads any CLIP file."""
        config = VisionConfig.from_state_dict(sd, prefix)
        if preset is not None:
            weights.check_config(config, VISION_PRESETS[preset], preset)
        with torch.device("meta"):  # no memory and no random init for weights that are about to be replaced
            model = cls(config)
        own = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        own = weights.check_state_dict(model, own, f"image tower (prefix {prefix!r})")
        own = {k: v.to(torch.float32, memory_format=torch.contiguous_format, copy=True) for k, v in own.items()}
        model.load_state_dict(own, strict=True, assign=True)
        return model

# -----------------------------------------------------------------------------------------------------------
# Device and precision: every entry point's --device auto and --precision, resolved here, on the ground floor that
# all the models stand on. Every network runs in the dtype it is cast to (model.to(dtype)) and keeps float32 where
# bf16/fp16 would lose the answer: logits and softmax, norm statistics, the sampler's state. Layouts that make low
# precision fast change no result: GPT.decoding_layout; channels-last convolutions in bf16/fp16 (oneDNN's AMX and
# cuDNN's tensor-core kernels read NHWC: a bf16 UNet step 1.4x, a bf16 VAE decode 3x faster, tests/bench_sd.py).

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION_HELP = ("the networks' precision; auto: the fastest one this device computes well: bf16 on a CPU with "
                  "AMX or AVX512-BF16, fp16 on a GPU, fp32 otherwise")


def resolve_precision(precision, device):
    """--precision auto|fp32|bf16|fp16 -> the name of the precision to run in on `device`: a name passes
    through; auto is bf16 on a CPU with bf16 arithmetic (AMX or AVX512-BF16, with torch's AVX-512 kernels on:
    elsewhere bf16 is emulated and slower than fp32), fp16 on a CUDA or MPS GPU, fp32 otherwise. A Xeon with
    AMX multiplies bf16 matrices 5-6x faster than fp32 ones on 2 cores (tests/roofline.py: every bench prints both)."""
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type in ("cuda", "mps"):
        return "fp16"
    # torch.cpu's private queries are the only ones torch has (torch.backends.cpu says "AVX512", not whether bf16);
    # ATEN_CPU_CAPABILITY=avx2 (an fp32-only laptop, simulated) turns the AVX-512 kernels off
    native = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    avx512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    return "bf16" if device.type == "cpu" and native and avx512 else "fp32"


def pick_device(name):
    """A torch device, or None when this machine has no such device."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        return None
    present = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}.get(device.type)
    return device if present is None or present() else None


# -----------------------------------------------------------------------------------------------------------
# Image preprocessing (openai/CLIP `_transform`, Hugging Face `CLIPImageProcessor`): one opener (and which files
# are images), resize_crop (uint8 pixels) and normalize (CLIP's input); preprocess = both

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 50  # a centre crop of a 1 x 30000 strip keeps nothing, and resized first it is 224 x 6,720,000


class ImageReadError(ValueError):
    """An image that cannot be used: missing, not a regular file, empty, truncated, not an image, over Pillow's
    decompression-bomb limit or the caller's pixel limit, or of an aspect ratio beyond MAX_ASPECT_RATIO."""


def check_size(size, where, max_pixels=None):
    w, h = size
    if min(w, h) < 1 or max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        raise ImageReadError(f"cannot use image {where}: {w}x{h} pixels, an aspect ratio beyond "
                             f"{MAX_ASPECT_RATIO}:1 (crop it first)")
    if max_pixels and w * h > max_pixels:
        raise ImageReadError(f"cannot use image {where}: {w}x{h} pixels, more than {max_pixels:,}")


def open_image(path, max_pixels=None):
    """The one way an image file is read: its size checked from the header before a pixel is decoded, then decoded
    in full (a truncated file fails here, not later) and turned by its EXIF orientation tag, in its own mode.
    Anything that goes wrong is one ImageReadError naming the file; a FIFO or device is refused unread (reading
    it would block forever)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ImageReadError(f"cannot read image {path}: not a regular file")
        with warnings.catch_warnings():  # Pillow warns from 89 megapixels and refuses from 179 (an error, below)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
        with image:
            check_size(image.size, path, max_pixels)
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # no second copy of a large image
            return image
    except ImageReadError:
        raise
    except (OSError, SyntaxError, ValueError, MemoryError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"cannot read image {path}: {type(e).__name__}: {e}") from None


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def is_image_file(path):
    return path.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(path)  # os.path: False, never an error


def image_files(arg):
    """The image files a command-line argument names, or None: an existing folder (its image files, sorted; ""
    is not the current folder), an existing image file, or a glob with magic characters that matches image
    files. Nothing here raises on a long or odd string: os.path answers False where Path raises (too long)."""
    if arg and os.path.isdir(arg):
        return sorted(p for p in (os.path.join(arg, name) for name in os.listdir(arg)) if is_image_file(p))
    if is_image_file(arg):
        return [arg]
    try:
        matches = sorted(f for f in glob.glob(arg) if is_image_file(f)) if re.search(r"[*?[]", arg) else []
    except (OSError, ValueError):
        matches = []
    return matches or None


def to_rgb(image):
    """Any Pillow mode to 8-bit RGB. Transparency is composited on white, as Hugging Face's
    CLIPImageProcessor does (openai/CLIP's `convert("RGB")` drops alpha instead, which turns transparent
    pixels into whatever colour they happen to store). 16/32-bit integer greyscale (I;16*, I) is scaled by
    1/257 so 65535 maps to 255 (Pillow's own conversion clips at 255 and turns most of a 16-bit photo
    white); float images (F) follow Pillow's convention of 0..255. CMYK uses Pillow's conversion."""
    if image.mode.startswith("I") or image.mode == "F":
        grey = np.empty((image.height, image.width), np.uint8)
        for top in range(0, image.height, 256):  # in bands: never a float64 copy of the whole image
            band = np.asarray(image.crop((0, top, image.width, min(top + 256, image.height))), dtype=np.float64)
            grey[top:top + 256] = np.clip(np.round(band / 257 if image.mode != "F" else band), 0, 255)
        image = Image.fromarray(grey, "L")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def resize_crop(image, resolution=224):
    """A PIL image to CLIP's pixels, (3, resolution, resolution) uint8, as openai/CLIP's `_transform` makes them
    (torchvision `Resize(resolution, BICUBIC)`, `CenterCrop(resolution)`): EXIF orientation, RGB, the short side
    to `resolution` and the long side to int(resolution * long / short) (torchvision `_compute_resized_output_size`),
    bicubic, then the centre crop at int(round((size - resolution) / 2.0)) (torchvision `center_crop`; Python's
    round sends halves to the even neighbour, so a 401x300 photo, resized to 299x224, is cropped from column 38,
    where Hugging Face's floor division starts at 37). An image whose short side already is `resolution` is only
    cropped (torchvision returns it unresized too); any other is resized whole, since Pillow's filter positions
    depend on the whole size, so MAX_ASPECT_RATIO bounds its memory.

    8-bit RGB and greyscale images give exactly openai/CLIP's pixels. Other modes are turned into RGB first
    (to_rgb), unlike openai/CLIP given the same PIL image: it converts after the crop, so Pillow resizes
    a palette ("P") or bilevel ("1") image with NEAREST whatever filter is asked, and it drops alpha instead of
    compositing it. Converting first resamples the real colours with the bicubic filter, and it is also what ClipCap
    fed CLIP: its predict.py and parse_coco.py read images with skimage.io.imread, which turns a palette image into
    RGB(A) or L before CLIP's transform sees it."""
    if image.getexif().get(0x0112, 1) != 1:  # the EXIF orientation tag
        image = ImageOps.exif_transpose(image)
    image = to_rgb(image)
    check_size(image.size, getattr(image, "filename", "") or "(in memory)")
    w, h = image.size
    long = int(resolution * max(w, h) / min(w, h))
    size = (resolution, long) if w <= h else (long, resolution)
    if size != image.size:
        image = image.resize(size, Image.BICUBIC)
    top, left = (int(round((side - resolution) / 2.0)) for side in (size[1], size[0]))
    image = image.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)  # (3, h, w)


def normalize(pixels):
    """uint8 pixels (..., 3, h, w) -> CLIP's input: scaled to [0, 1], then CLIP's per-channel mean and std."""
    mean = torch.tensor(CLIP_MEAN, device=pixels.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, device=pixels.device).view(3, 1, 1)
    return (pixels.float() / 255 - mean) / std


def preprocess(image_or_path, resolution=224):
    """A path or PIL image to CLIP's input, a (3, resolution, resolution) float tensor: open_image, resize_crop,
    normalize."""
    image = open_image(image_or_path) if isinstance(image_or_path, (str, Path)) else image_or_path
    return normalize(resize_crop(image, resolution))

# -----------------------------------------------------------------------------------------------------------
# From the tower to a language model: mapping networks. What the tower makes of an image (the pooled embedding,
# (B, prefix_size), or every token) becomes prefix vectors of the language model's width C, which it reads as a
# prompt (gpt2.py's Captioner). ClipCap's two (Mokady et al. 2021, rmokady/CLIP_prefix_caption train.py: MLP,
# TransformerMapper), named as its checkpoints' keys under `clip_project.` (model.0, model.2; linear, prefix_const,
# transformer.layers.N.{norm1, attn.to_queries, attn.to_keys_values, attn.project, norm2, mlp.fc1, mlp.fc2}); and
# LLaVA-1.5's projector (Liu et al. 2023), one prefix vector per tower token: where things are reaches it intact.


class PrefixMLP(nn.Module):
    """ClipCap's MLP: prefix_size -> (C * P) // 2 -> C * P with tanh between, reshaped to P vectors of width C."""

    def __init__(self, prefix_size, n_embd, prefix_length):
        super().__init__()
        self.prefix_length, hidden = prefix_length, n_embd * prefix_length // 2
        self.model = nn.Sequential(nn.Linear(prefix_size, hidden), nn.Tanh(), nn.Linear(hidden, n_embd * prefix_length))

    def forward(self, image_embeds):
        return self.model(image_embeds).view(image_embeds.size(0), self.prefix_length, -1)  # (B, P, C)


class TokenMLP(nn.Module):
    """LLaVA-1.5's projector: image tokens (B, N, prefix_size) -> Linear, GELU, Linear -> the prefix (B, N, C)."""

    def __init__(self, prefix_size, n_embd):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(prefix_size, n_embd), nn.GELU(), nn.Linear(n_embd, n_embd))

    def forward(self, image_tokens):
        return self.model(image_tokens)  # (B, N, C)


class MapperBlock(nn.Module):
    """ClipCap's TransformerLayer: pre-norm, bidirectional multi-head attention (no mask: every vector sees every
    other; queries and keys/values from separate bias-free projections), then a ReLU MLP of ratio 2."""

    def __init__(self, n_embd, num_heads):
        super().__init__()
        self.num_heads, self.norm1, self.norm2 = num_heads, nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attn = nn.ModuleDict(dict(to_queries=nn.Linear(n_embd, n_embd, bias=False),
                                       to_keys_values=nn.Linear(n_embd, 2 * n_embd, bias=False),
                                       project=nn.Linear(n_embd, n_embd)))
        self.mlp = nn.ModuleDict(dict(fc1=nn.Linear(n_embd, 2 * n_embd), fc2=nn.Linear(2 * n_embd, n_embd)))

    def forward(self, x):
        (B, T, C), H = x.shape, self.num_heads
        h = self.norm1(x)
        q = self.attn.to_queries(h).view(B, T, H, C // H).transpose(1, 2)  # (B, H, T, D)
        k, v = self.attn.to_keys_values(h).view(B, T, 2, H, C // H).permute(2, 0, 3, 1, 4)  # each (B, H, T, D)
        att = (q @ k.transpose(-2, -1) * (C // H) ** -0.5).softmax(dim=-1)  # (B, H, T, T)
        x = x + self.attn.project((att @ v).transpose(1, 2).reshape(B, T, C))
        return x + self.mlp.fc2(F.relu(self.mlp.fc1(self.norm2(x))))


class TransformerMapper(nn.Module):
    """ClipCap's TransformerMapper: the embedding becomes clip_length vectors, prefix_length learned constants
    are appended, the blocks mix them, and the constants' outputs are the prefix."""

    def __init__(self, prefix_size, n_embd, prefix_length, clip_length, num_layers, num_heads):
        super().__init__()
        self.clip_length = clip_length
        self.linear = nn.Linear(prefix_size, clip_length * n_embd)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, n_embd))
        self.transformer = nn.ModuleDict(dict(layers=nn.ModuleList(MapperBlock(n_embd, num_heads)
                                                                   for _ in range(num_layers))))

    def forward(self, image_embeds):
        B = image_embeds.size(0)
        x = self.linear(image_embeds).view(B, self.clip_length, -1)  # (B, clip_length, C)
        x = torch.cat([x, self.prefix_const.expand(B, -1, -1)], dim=1)  # (B, clip_length + P, C)
        for layer in self.transformer.layers:
            x = layer(x)
        return x[:, self.clip_length:]  # (B, P, C)


def mapping_network(kind, prefix_size, n_embd, prefix_length, clip_length=10, num_layers=8, num_heads=8):
    """A mapping network: "mlp" (ClipCap's MLP), "transformer" (ClipCap's TransformerMapper) or "tokens" (LLaVA-1.5's
    projector; prefix_length is then the tower's token count)."""
    if kind == "mlp":
        return PrefixMLP(prefix_size, n_embd, prefix_length)
    if kind == "tokens":
        return TokenMLP(prefix_size, n_embd)
    if kind == "transformer":
        return TransformerMapper(prefix_size, n_embd, prefix_length, clip_length, num_layers, num_heads)
    raise ValueError(f"mapping_type must be 'mlp', 'transformer' or 'tokens', got {kind!r}")


def mapper_sizes(sd, n_embd):
    """(kind, prefix_size, prefix_length, clip_length, num_layers) read off a ClipCap mapper's tensors (its keys
    without `clip_project.`), for a language model of width n_embd; the head count is in no shape."""
    if "model.0.weight" in sd:  # the MLP: prefix_size -> ... -> prefix_length * n_embd
        prefix_length = sd["model.2.weight"].shape[0] // n_embd
        return "mlp", sd["model.0.weight"].shape[1], prefix_length, prefix_length, 0
    layers = [int(m.group(1)) for k in sd if (m := re.match(r"transformer\.layers\.(\d+)\.", k))]
    width, prefix_size = sd["linear.weight"].shape  # clip_length * n_embd, prefix_size
    return "transformer", prefix_size, sd["prefix_const"].shape[0], width // n_embd, 1 + max(layers, default=-1)
