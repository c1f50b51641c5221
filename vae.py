"""The autoencoder of Stable Diffusion 1.x: images <-> latents 8x smaller on each side.

Paper: Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models", section 3.1:
a convolutional encoder maps an RGB image (B, 3, 8h, 8w) in [-1, 1] to a diagonal Gaussian over latents
(B, 4, h, w) (a "KL-regularised" autoencoder); the decoder maps latents back to images. The diffusion
model works on latents multiplied by `scale_factor` so that they have roughly unit variance.

Official code matched here: CompVis/stable-diffusion `ldm/models/autoencoder.py` (AutoencoderKL),
`ldm/modules/diffusionmodules/model.py` (Encoder, Decoder, ResnetBlock, AttnBlock, Downsample, Upsample) and
`ldm/modules/distributions/distributions.py` (DiagonalGaussianDistribution), with the first_stage_config of
`configs/stable-diffusion/v1-inference.yaml`. Module names are the checkpoint keys under `first_stage_model.`.
It ends with `load_image`, an image file as the VAE's input (an image-to-image start).
"""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import weights
from vit import open_image, to_rgb

# ----------------------------------------------------------------------------------------------------------
# Building blocks


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with 32 groups and eps 1e-6 (model.py `Normalize`), its statistics in float32 for fp16/bf16 inputs,
    as torch.autocast gets them for the official fp16 runs. torch's CPU and CUDA kernels accumulate them in float32
    for such x themselves, so x is not copied to float32 first: the same output, and that copy took 14x the norm's
    own time on a bf16 512x512 decode."""

    def __init__(self, channels):
        super().__init__(32, channels, eps=1e-6)

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class ResnetBlock(nn.Module):
    """norm -> swish -> conv3x3, twice, plus a 1x1 `nin_shortcut` when the width changes."""

    def __init__(self, in_channels, out_channels, dropout=0.0):
        super().__init__()
        self.norm1 = GroupNorm32(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = GroupNorm32(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions; q, k, v and proj_out are 1x1 convolutions."""

    def __init__(self, channels):
        super().__init__()
        self.use_sdpa = True  # the switch (set_attention): F.scaled_dot_product_attention or the plain math
        self.norm = GroupNorm32(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x):
        B, C, h, w = x.shape
        y = self.norm(x)
        q, k, v = (proj(y).flatten(2).transpose(1, 2) for proj in (self.q, self.k, self.v))  # (B, h*w, C)
        if self.use_sdpa:  # as one head (B, 1, h*w, C): torch's CPU flash kernel takes 4-D only (3-D: the math path,
            y = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # 8x slower in bf16)
        else:
            att = (q @ k.transpose(-2, -1)) * C ** -0.5  # (B, h*w, h*w)
            y = att.float().softmax(dim=-1).to(v.dtype) @ v
        y = y.transpose(1, 2).reshape(B, C, h, w)
        return x + self.proj_out(y)


class Downsample(nn.Module):
    """Stride-2 conv without padding after padding only right and bottom by one (model.py Downsample)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, h/2, w/2)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2h, 2w)


class MidBlock(nn.Module):
    """The bottleneck at the lowest resolution: a ResnetBlock, self-attention over every position (the only
    attention in SD's autoencoder: `attn_resolutions` is empty), another ResnetBlock."""

    def __init__(self, channels, dropout):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> the moments of q(z|x), (B, 2 * z_channels, H/f, W/f) with f = 2^(levels - 1): per level
    num_res_blocks ResnetBlocks at width ch * ch_mult[level], then a Downsample (not after the last level); the
    MidBlock; norm, swish and a 3x3 conv to a mean and a log-variance per latent channel."""

    def __init__(self, cfg):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = cfg.ch
        for level, mult in enumerate(cfg.ch_mult):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                stage.block.append(ResnetBlock(block_in, cfg.ch * mult, cfg.dropout))
                block_in = cfg.ch * mult
            if level != len(cfg.ch_mult) - 1:
                stage.downsample = Downsample(block_in)
            self.down.append(stage)
        self.mid = MidBlock(block_in, cfg.dropout)
        self.norm_out = GroupNorm32(block_in)
        # mean and log-variance of every latent channel, hence 2 * z_channels ("double_z")
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latents (B, z_channels, h, w) -> image (B, 3, f*h, f*w), the encoder's path run backwards: a 3x3 conv to the
    widest width, the MidBlock, then per level from the lowest resolution up num_res_blocks + 1 ResnetBlocks and an
    Upsample (not after the full-resolution level); norm, swish and a 3x3 conv to RGB."""

    def __init__(self, cfg):
        super().__init__()
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in, cfg.dropout)
        # up[0] works at full resolution, as in the official code which builds the list in reverse with insert(0)
        up = []
        for level in reversed(range(len(cfg.ch_mult))):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, cfg.ch * cfg.ch_mult[level], cfg.dropout))
                block_in = cfg.ch * cfg.ch_mult[level]
            if level != 0:
                stage.upsample = Upsample(block_in)
            up.insert(0, stage)
        self.up = nn.ModuleList(up)
        self.norm_out = GroupNorm32(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """The posterior q(z|x): per-element mean and log-variance (distributions.py DiagonalGaussianDistribution)."""

    def __init__(self, moments):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)  # the official clamp keeps exp() finite
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator=None):
        """mean + std * noise, the noise drawn on the generator's device so one seed gives one latent everywhere."""
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self):
        return self.mean


# ----------------------------------------------------------------------------------------------------------
# Config and presets


@dataclass
class AutoencoderConfig:
    """Names as in v1-inference.yaml `first_stage_config.params.ddconfig` (plus embed_dim, scale_factor)."""
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    dropout: float = 0.0
    # The ONE place of SD 1.x's latent scale: v1-inference.yaml `model.params.scale_factor`.
    scale_factor: float = 0.18215

    @classmethod
    def from_state_dict(cls, sd):
        """Read the architecture off the tensors (widths, levels, blocks per level) on top of the sd15 preset."""
        levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.down."))
        blocks = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith("encoder.down.0.block."))
        ch = sd["encoder.conv_in.weight"].shape[0]
        return cls(
            in_channels=sd["encoder.conv_in.weight"].shape[1], out_ch=sd["decoder.conv_out.weight"].shape[0], ch=ch,
            ch_mult=tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels)),
            num_res_blocks=blocks, z_channels=sd["decoder.conv_in.weight"].shape[1],
            embed_dim=sd["post_quant_conv.weight"].shape[1])


PRESETS = {
    "sd15": AutoencoderConfig(),  # 83,653,863 parameters; SD 1.x first_stage_model (kl-f8)
    "tiny": AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1),  # 658,375 parameters; fast tests (downscale 2)
}
PREFIX = "first_stage_model."  # where an SD 1.x single-file checkpoint keeps the VAE
IGNORED = ("loss.*",)  # inside the prefix: the training loss of full checkpoints (discriminator, `logvar`)

# ----------------------------------------------------------------------------------------------------------
# The model


class AutoencoderKL(nn.Module):
    def __init__(self, config=None):
        super().__init__()
        self.config = config = config or AutoencoderConfig()
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    @property
    def downscale(self):
        return 2 ** (len(self.config.ch_mult) - 1)

    def encode(self, x):
        """x: (B, 3, H, W) in [-1, 1] -> DiagonalGaussian over (B, 4, H/8, W/8) (unscaled latents). Like decode, it
        runs in the parameters' dtype and answers in x's."""
        moments = self.quant_conv(self.encoder(x.to(self.quant_conv.weight.dtype)))
        return DiagonalGaussian(moments.to(x.dtype))

    def decode(self, z):
        """z: (B, 4, h, w) unscaled latents -> (B, 3, 8h, 8w) image, roughly in [-1, 1], in z's dtype."""
        return self.decoder(self.post_quant_conv(z.to(self.post_quant_conv.weight.dtype))).to(z.dtype)

    def decode_tiled(self, z, tile_size=64, overlap=16):
        """decode() in overlapping latent tiles, for GPUs too small for a whole image.

        Seams: each tile is decoded on its own, so its convolutions see zero padding at the tile's edges and
        its GroupNorms see the tile's statistics, not the image's. Neighbouring tiles therefore overlap by
        `overlap` latent pixels, and in the overlap every output pixel is a weighted mean of the tiles that
        cover it, each weight ramping linearly from ~0 at that tile's inner edge to 1, so no hard edge
        remains. The result is close to, not equal to, decode(z) (diffusers' `enable_vae_tiling` does the
        same); with tile_size >= the latent's size it is exactly decode(z).
        """
        B, _, h, w = z.shape
        if overlap >= tile_size:
            raise ValueError(f"overlap ({overlap}) must be smaller than tile_size ({tile_size})")
        if h <= tile_size and w <= tile_size:
            return self.decode(z)
        f = self.downscale

        def starts(n):  # tile origins along one axis; the last tile ends exactly at the border
            s = list(range(0, max(n - tile_size, 0) + 1, tile_size - overlap))
            return s + [n - tile_size] if s[-1] + tile_size < n else s

        def ramp(start, size, n):  # per-pixel weight along one axis of one tile
            r = torch.ones(size * f, device=z.device)
            fade = (torch.arange(overlap * f, device=z.device) + 0.5) / (overlap * f)
            if start > 0:
                r[: overlap * f] = fade
            if start + size < n:
                r[-overlap * f:] = torch.minimum(r[-overlap * f:], fade.flip(0))
            return r

        out = torch.zeros(B, self.config.out_ch, h * f, w * f, device=z.device, dtype=torch.float32)
        total = torch.zeros(h * f, w * f, device=z.device)
        for y0 in starts(h):
            for x0 in starts(w):
                tile = self.decode(z[:, :, y0:y0 + tile_size, x0:x0 + tile_size]).float()
                th, tw = tile.shape[-2] // f, tile.shape[-1] // f
                weight = ramp(y0, th, h)[:, None] * ramp(x0, tw, w)[None, :]
                out[:, :, y0 * f:(y0 + th) * f, x0 * f:(x0 + tw) * f] += tile * weight
                total[y0 * f:(y0 + th) * f, x0 * f:(x0 + tw) * f] += weight
        return (out / total).to(z.dtype)

    # The two steps a text-to-image / image-to-image pipeline needs, with the scale applied in one place.
    def encode_to_latents(self, images, generator=None):
        """Images (B, 3, H, W) in [-1, 1] -> scaled latents for the UNet, sampled with `generator`."""
        return self.encode(images).sample(generator) * self.config.scale_factor

    def decode_latents(self, latents, tile_size=None):
        """Scaled latents -> images (B, 3, H, W) in [-1, 1] (clamped); tiled when tile_size is given."""
        z = latents / self.config.scale_factor
        images = self.decode(z) if tile_size is None else self.decode_tiled(z, tile_size, max(tile_size // 4, 1))
        return images.clamp(-1.0, 1.0)

    def set_attention(self, use_sdpa=True):
        """The one switch for every attention layer: fused SDPA or the plain math (tested equal)."""
        for m in self.modules():
            if isinstance(m, AttnBlock):
                m.use_sdpa = use_sdpa
        return self

    # ------------------------------------------------------------------------------------------------------
    # Loading the official weights

    @classmethod
    def from_state_dict(cls, state_dict, prefix=PREFIX, config=None, dtype=torch.float32):
        """Build the VAE from a whole SD 1.x single-file state dict (weights.load_state_dict of a .safetensors
        or .ckpt), picking the keys under `prefix`; use prefix="" for a bare VAE state dict.

        Ignored: every key outside the prefix (`model.diffusion_model.*`, `cond_stage_model.*`, `model_ema.*`,
        the 12 noise-schedule buffers) and, inside it, the training loss (`loss.*`: the discriminator and
        `logvar` that full training checkpoints carry)."""
        own = {k[len(prefix):]: v.to(dtype) for k, v in state_dict.items() if k.startswith(prefix)}
        if not own:
            raise KeyError(f"no VAE keys: none start with {prefix!r} (first keys: {sorted(state_dict)[:3]})")
        config = config or AutoencoderConfig.from_state_dict(own)
        with torch.device("meta"):  # no memory and no random init for weights that are about to be replaced
            model = cls(config)
        own = weights.check_state_dict(model, own, f"VAE (prefix {prefix!r})", IGNORED)
        model.load_state_dict(own, strict=True, assign=True)
        return model


def load_image(path, width=None, height=None, max_pixels=None):
    """An image file -> the VAE's input (3, H, W) in [-1, 1], resized with Lanczos to width x height (default: its
    own size rounded down to multiples of 8, at most max_pixels), as diffusers' VaeImageProcessor prepares an
    image-to-image start. vit.py opens it (one error, ImageReadError) and composites transparency on white."""
    image = to_rgb(open_image(path, None if width and height else max_pixels))
    width, height = width or image.width // 8 * 8, height or image.height // 8 * 8
    if width < 8 or height < 8:
        raise ValueError(f"image {path} is {image.width}x{image.height}: too small (at least 8x8)")
    pixels = np.asarray(image.resize((width, height), Image.LANCZOS), dtype=np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy(pixels).permute(2, 0, 1) * 2 - 1  # (3, H, W)
