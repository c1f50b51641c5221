"""The denoising UNet of Stable Diffusion 1.x: predicts the noise eps in a noisy latent, given the timestep and
the text (the "context" from CLIP's text tower).

Papers: Ho et al. 2020 (DDPM, the eps-prediction UNet), Dhariwal & Nichol 2021 (the "ADM" UNet this code
descends from), Rombach et al. 2022 (latent diffusion, section 3.3: cross-attention to a text encoding inside
SpatialTransformers). Official code matched here: CompVis/stable-diffusion
`ldm/modules/diffusionmodules/openaimodel.py` (UNetModel, ResBlock, Downsample, Upsample),
`ldm/modules/attention.py` (SpatialTransformer, BasicTransformerBlock, CrossAttention, GEGLU) and
`ldm/modules/diffusionmodules/util.py` (timestep_embedding), with the unet_config of
`configs/stable-diffusion/v1-inference.yaml`. Module names are the keys under `model.diffusion_model.`.
This file knows nothing about noise schedules: that is ddpm.py.

Its closing section, "Text conditioning (this project's models)", makes the text-to-image model train.py trains
of a UNet, a text encoder (clip.py's CLIP text tower, or GPT-2's hidden states) and its prompt tokenizer (clip.py's
PromptTokenizer), new (for train.py's flags) or rebuilt from a training checkpoint.
"""
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import weights
from clip import CLIPTextTransformer, PromptTokenizer, TextConfig
from gpt2 import GPT, GPTConfig
from vae import AutoencoderConfig, AutoencoderKL

# ----------------------------------------------------------------------------------------------------------
# Building blocks


def timestep_embedding(timesteps, dim, max_period=10000):
    """Sinusoidal embedding of the timesteps (B,) -> (B, dim): [cos(t f_i), sin(t f_i)] with
    f_i = max_period^(-i / (dim/2)). Cosines first, as in CompVis util.py (diffusers: flip_sin_to_cos=True).
    Always float32: t up to 999 times f_i loses the phase in fp16."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]  # (B, dim/2)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32, C), statistics in float32 (openaimodel's `normalization()`, eps 1e-5, upcasts x; the transformers'
    `Normalize`, eps 1e-6, gets it from autocast): torch's kernels accumulate bf16/fp16 x in float32 themselves."""

    def __init__(self, channels, eps=1e-5):
        super().__init__(32, channels, eps=eps)

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


def attention(q, k, v, use_sdpa=True, slice_size=None):
    """softmax(q k^T / sqrt(D)) v for q (B, H, T, D) and k, v (B, H, S, D).
    `use_sdpa` picks F.scaled_dot_product_attention (fused, memory-efficient) over the plain math; a test
    proves them equal. `slice_size` computes the queries in chunks, so the (T, S) score matrix of 64x64
    latents (4096 x 4096 per head) never exists at once: less memory, same result."""
    if slice_size is not None and q.shape[2] > slice_size:
        return torch.cat([attention(q[:, :, i:i + slice_size], k, v, use_sdpa)
                          for i in range(0, q.shape[2], slice_size)], dim=2)
    if use_sdpa and q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):  # CPU flash attention in bf16:
        with torch.autocast("cpu", enabled=False):  # its backward takes ~15x fp32's time (torch 2.13, measured)
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
    if use_sdpa:
        return F.scaled_dot_product_attention(q, k, v)
    att = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, T, S)
    return att.float().softmax(dim=-1).to(v.dtype) @ v  # softmax in fp32, as autocast runs it officially


class CrossAttention(nn.Module):
    """Multi-head attention of x (B, T, C) to context (B, S, Cc); self-attention when context is None."""

    def __init__(self, query_dim, n_heads, d_head, context_dim=None, dropout=0.0):
        super().__init__()
        inner = n_heads * d_head
        self.n_heads, self.use_sdpa, self.slice_size = n_heads, True, None  # set by UNetModel.set_attention
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x, context=None):
        context = x if context is None else context
        B, T, _ = x.shape
        q, k, v = (t.unflatten(-1, (self.n_heads, -1)).transpose(1, 2)  # (B, H, T or S, D)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        y = attention(q, k, v, self.use_sdpa, self.slice_size).transpose(1, 2).reshape(B, T, -1)  # (B, T, C)
        return self.to_out(y)


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): one projection to twice the width, half of it gates the other half."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, dropout=0.0, mult=4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm: self-attention, cross-attention to the text, GEGLU feed-forward; LayerNorm eps 1e-5."""

    def __init__(self, dim, n_heads, d_head, context_dim, dropout=0.0):
        super().__init__()
        self.attn1 = CrossAttention(dim, n_heads, d_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout)
        self.attn2 = CrossAttention(dim, n_heads, d_head, context_dim, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Image (B, C, h, w) -> h*w tokens -> transformer blocks -> image, plus the input (a residual)."""

    def __init__(self, channels, n_heads, d_head, depth, context_dim, use_linear, dropout=0.0):
        super().__init__()
        inner, self.use_linear = n_heads * d_head, use_linear
        self.norm = GroupNorm32(channels, eps=1e-6)
        # SD 1.x projects with 1x1 convolutions, SD 2.x with linear layers: the same map, another weight shape
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, n_heads, d_head, context_dim, dropout) for _ in range(depth))
        self.proj_out = nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x, context):
        B, C, h, w = x.shape
        y = self.norm(x)
        y = y if self.use_linear else self.proj_in(y)
        y = y.flatten(2).transpose(1, 2)  # (B, h*w, C)
        y = self.proj_in(y) if self.use_linear else y
        for block in self.transformer_blocks:
            y = block(y, context)
        y = self.proj_out(y) if self.use_linear else y
        y = y.transpose(1, 2).reshape(B, -1, h, w)  # (B, C, h, w)
        return x + (y if self.use_linear else self.proj_out(y))


class ResBlock(nn.Module):
    """Two norm -> SiLU -> conv3x3 stages; the timestep embedding is added per channel between them (SD), or with
    `use_scale_shift_norm` scales and shifts the second stage's normalised activations (ADM's FiLM: the embedding
    can switch channels on and off, not only move them)."""

    def __init__(self, channels, emb_channels, out_channels, dropout=0.0, use_scale_shift_norm=False):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        emb_out = 2 * out_channels if use_scale_shift_norm else out_channels  # (scale, shift) or the added bias
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        h, emb_out = self.in_layers(x), self.emb_layers(emb)[:, :, None, None]  # (B, C, h, w), (B, C or 2C, 1, 1)
        if not self.use_scale_shift_norm:
            return self.skip_connection(x) + self.out_layers(h + emb_out)
        scale, shift = emb_out.chunk(2, dim=1)
        h = self.out_layers[0](h) * (1 + scale) + shift
        return self.skip_connection(x) + self.out_layers[1:](h)


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)  # (B, C, h/2, w/2)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2h, 2w)


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential that hands the timestep embedding to ResBlocks and the context to SpatialTransformers."""

    def forward(self, x, emb, context):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


# ----------------------------------------------------------------------------------------------------------
# Config and presets


@dataclass
class UNetConfig:
    """Names as in v1-inference.yaml `unet_config.params` (openaimodel.UNetModel arguments)."""
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple = (4, 2, 1)  # downsampling factors ("ds") whose levels get transformers
    num_heads: int = 8
    num_head_channels: int = -1  # -1: the head size is width // num_heads (SD 1.x); else fixed (SD 2.x: 64)
    transformer_depth: int = 1
    context_dim: int = 768
    use_linear_in_transformer: bool = False
    dropout: float = 0.0
    adm_in_channels: int = 0  # > 0: a vector y (B, adm_in_channels) joins the timestep embedding (SDXL's name)
    use_scale_shift_norm: bool = False  # ResBlocks scale and shift by the embedding (ADM) instead of adding it (SD)

    @classmethod
    def tiny(cls, channels, model_channels, channel_mult="1,2", attention_resolutions="2", num_res_blocks=1,
             context_dim=64, pooled_text=False, scale_shift_norm=False):
        """A UNet to train from scratch, of train.py's size flags (levels, attention downsamplings: "1,2"; 4 heads)."""
        return cls(channels, channels, model_channels, tuple(map(int, channel_mult.split(","))), num_res_blocks,
                   tuple(int(d) for d in attention_resolutions.split(",") if d), num_heads=4, context_dim=context_dim,
                   adm_in_channels=context_dim if pooled_text else 0, use_scale_shift_norm=scale_shift_norm)

    @classmethod
    def from_state_dict(cls, sd):
        """Read the architecture off the tensors; the number of heads is not in them and stays SD 1.x's 8."""
        mc = sd["time_embed.0.weight"].shape[1]  # model_channels (the input conv has channel_mult[0] times it)
        n_input = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("input_blocks."))
        downsamples = sorted(int(k.split(".")[1]) for k in sd if k.startswith("input_blocks.") and ".op.weight" in k)
        per_level = downsamples[0] if downsamples else n_input - 1  # ResBlocks + Downsample of one level
        first_block = [1 + level * per_level for level in range(len(downsamples) + 1)]
        attention_at = [2 ** level for level, n in enumerate(first_block) if f"input_blocks.{n}.1.norm.weight" in sd]
        depth = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("middle_block.1.transformer_blocks."))
        return cls(
            in_channels=sd["input_blocks.0.0.weight"].shape[1], out_channels=sd["out.2.weight"].shape[0],
            model_channels=mc, num_res_blocks=per_level - 1 if downsamples else per_level,
            channel_mult=tuple(sd[f"input_blocks.{n}.0.out_layers.3.weight"].shape[0] // mc for n in first_block),
            attention_resolutions=tuple(sorted(attention_at, reverse=True)), transformer_depth=depth,
            context_dim=sd["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1],
            adm_in_channels=sd["label_emb.0.0.weight"].shape[1] if "label_emb.0.0.weight" in sd else 0,
            use_linear_in_transformer=sd["middle_block.1.proj_in.weight"].ndim == 2,
            use_scale_shift_norm=sd["input_blocks.1.0.emb_layers.1.weight"].shape[0]
            == 2 * sd["input_blocks.1.0.out_layers.3.weight"].shape[0])


PRESETS = {"sd15": UNetConfig()}  # 859,520,964 parameters; SD 1.x model.diffusion_model (v1-inference.yaml)
PREFIX = "model.diffusion_model."  # where an SD 1.x single-file checkpoint keeps the UNet

# ----------------------------------------------------------------------------------------------------------
# The model


class UNetModel(nn.Module):
    def __init__(self, config=None):
        super().__init__()
        self.config = cfg = config or UNetConfig()
        mc, emb_dim = cfg.model_channels, 4 * cfg.model_channels
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.adm_in_channels:  # openaimodel's label_emb for "sequential" conditioning (SDXL: pooled text + sizes)
            self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(cfg.adm_in_channels, emb_dim), nn.SiLU(),
                                                         nn.Linear(emb_dim, emb_dim)))

        def transformer(ch):
            heads = cfg.num_heads if cfg.num_head_channels == -1 else ch // cfg.num_head_channels
            return SpatialTransformer(ch, heads, ch // heads, cfg.transformer_depth, cfg.context_dim,
                                      cfg.use_linear_in_transformer, cfg.dropout)

        # Encoder half: every block's output is kept for the skip connection to the decoder half.
        ch = first = cfg.channel_mult[0] * mc  # openaimodel's input_ch: the input conv's and the output conv's width
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
        skip_channels, ds = [ch], 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, emb_dim, mult * mc, cfg.dropout, cfg.use_scale_shift_norm)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(transformer(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, ch, cfg.dropout, cfg.use_scale_shift_norm), transformer(ch),
            ResBlock(ch, emb_dim, ch, cfg.dropout, cfg.use_scale_shift_norm))
        # Decoder half: one more block per level than the encoder, each eating one skip connection.
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mc * mult, cfg.dropout,
                                   cfg.use_scale_shift_norm)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(transformer(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(first, cfg.out_channels, 3, padding=1))
        self.gradient_checkpointing = False  # the switch: recompute each block's activations in backward

    def forward(self, x, timesteps, context=None, y=None):
        """x (B, C, h, w) noisy latents, timesteps (B,) or a number, context (B, S, context_dim) -> eps (B, C, h, w);
        y (B, adm_in_channels) when the config has them. Runs in the parameters' dtype and returns x's dtype."""
        dtype = self.time_embed[0].weight.dtype
        timesteps = torch.as_tensor(timesteps, device=x.device).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(dtype))  # (B, 4*mc)
        emb = emb + self.label_emb(y.to(dtype)) if self.config.adm_in_channels else emb
        context = None if context is None else context.to(dtype)
        h, skips = x.to(dtype), []
        for block in self.input_blocks:
            h = self._run(block, h, emb, context)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb, context)  # (B, C + C_skip, h, w)
        return self.out(h).to(x.dtype)

    def _run(self, block, h, emb, context):
        """One block; with gradient checkpointing while gradients are on, its activations are not kept but
        recomputed in the backward pass: much less memory (fine-tuning SD 1.5 on a small GPU) for ~30 % more time."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, h, emb, context, use_reentrant=False)
        return block(h, emb, context)

    def set_attention(self, use_sdpa=True, slice_size=None):
        """The one switch for every attention layer: fused SDPA or plain math, and optional query slicing."""
        for m in self.modules():
            if isinstance(m, CrossAttention):
                m.use_sdpa, m.slice_size = use_sdpa, slice_size
        return self

    # ------------------------------------------------------------------------------------------------------
    # Loading the official weights

    @classmethod
    def from_state_dict(cls, state_dict, prefix=PREFIX, config=None, dtype=torch.float32):
        """Build the UNet from a whole SD 1.x single-file state dict (weights.load_state_dict of a .safetensors or
        .ckpt), picking the keys under `prefix`; use prefix="" for a bare UNet state dict. Ignored: every key outside
        the prefix: `first_stage_model.*` (vae.py), `cond_stage_model.*` (clip.py), `model_ema.*` (the EMA copy of
        v1-5-pruned.ckpt, whose UNet keys are already the EMA weights in the -emaonly files) and the 12 noise-schedule
        buffers (`betas`, ...: ddpm.py recomputes them). The config is read off the tensors unless given."""
        own = {k[len(prefix):]: v.to(dtype) for k, v in state_dict.items() if k.startswith(prefix)}
        if not own:
            raise KeyError(f"no UNet keys: none start with {prefix!r} (first keys: {sorted(state_dict)[:3]})")
        config = config or UNetConfig.from_state_dict(own)
        with torch.device("meta"):  # no memory and no random init for weights that are about to be replaced
            model = cls(config)
        own = weights.check_state_dict(model, own, f"UNet (prefix {prefix!r})")
        model.load_state_dict(own, strict=True, assign=True)
        return model


# ==========================================================================================================
# Text conditioning (this project's models): the UNet train.py --task diffusion trains, its text encoder, tokenizer
# ==========================================================================================================
TEXT_ENCODERS = ("tiny", "clip", "gpt2")  # a CLIP-style tower trained with the UNet; SD's CLIP ViT-L/14; GPT-2


class GPTHidden(nn.Module):
    """GPT-2 read as a text encoder: its last hidden states (after ln_f), not its logits."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt

    def forward(self, tokens):
        return self.gpt(tokens, return_hidden=True)


class TextConditionedUNet(nn.Module):
    """A UNet that draws what a text encoder read: `text_encoder(tokens (B, T))` gives hidden states (B, T, C_text),
    a linear layer projects them to `context_dim` where the widths differ (a frozen GPT-2 into a small UNet), and
    they are the context of every cross-attention, as CLIP's are in SD. With `adm_in_channels` (= context_dim) the
    state at the first end-of-text, which has read the whole prompt (a causal encoder: CLIP's own pooling), also
    joins the timestep embedding, as SDXL adds its pooled text: every ResBlock hears the prompt. `patch` > 1 folds p x p
    pixels into channels (pixel_unshuffle), so a 32x32 RGB image is denoised as a 16x16 12-channel one: the
    compute of a 16x16 UNet with every pixel kept (the "patchify" of Hoogeboom et al. 2023, simple diffusion).
    `kind` is one of TEXT_ENCODERS (GPT-2 comes wrapped in GPTHidden); `tokenize` is the encoder's PromptTokenizer."""

    def __init__(self, unet, text_encoder, kind, context_length, patch=1, vocab=None):
        super().__init__()
        self.unet, self.text_encoder, self.kind, self.patch = unet, text_encoder, kind, patch
        self.tokenize = PromptTokenizer(kind, context_length)
        self.register_buffer("vocab", vocab)  # a closed vocabulary's sorted ids (close_vocabulary), or None
        if vocab is not None and (vocab.dtype != torch.long or vocab.shape != (self.text_config()["vocab_size"] - 1,)):
            raise ValueError("its closed vocabulary is not one int64 id for each row of its token table but row 0")
        width, dim = self.text_config()["n_embd" if kind == "gpt2" else "transformer_width"], unet.config.context_dim
        self.text_proj = nn.Identity() if width == dim else nn.Linear(width, dim)
        assert unet.config.adm_in_channels in (0, dim), "the pooled text is a context vector: adm_in_channels"

    def text_config(self):
        """What a checkpoint keeps of the text side: the encoder's kind, its config, the prompt's context_length."""
        config = self.text_encoder.gpt.config if self.kind == "gpt2" else self.text_encoder.config
        return {"kind": self.kind, **dataclasses.asdict(config), "context_length": self.tokenize.context_length}

    def close_vocabulary(self, ids):
        """The tiny text encoder keeps its rows of `ids` (its training captions' tokens) and the empty prompt's, over
        a row 0 of zeros for any other token (encode_text): 49,408 rows' training (only these have gradients), faster."""
        self.vocab = torch.tensor(sorted({*ids, *self.tokenize([""])[0].tolist()}))
        rows = F.pad(self.text_encoder.token_embedding.weight.detach()[self.vocab], (0, 0, 1, 0))  # (|vocab| + 1, C)
        self.text_encoder.token_embedding = nn.Embedding.from_pretrained(rows, freeze=False)
        self.text_encoder.config = dataclasses.replace(self.text_encoder.config, vocab_size=len(rows))

    def encode_text(self, tokens):
        """tokens (B, T) -> context (B, T, context_dim); with the pooled text, its vector rides along as one more
        row (B, T + 1, context_dim), so guidance can batch contexts as one tensor. End-of-text is the largest id of
        CLIP's and GPT-2's vocabularies, so argmax finds the first one (as openai/CLIP's encode_text does)."""
        if self.vocab is not None:  # closed: the r-th id of the vocabulary is row r + 1 of the table, any other row 0
            found = torch.searchsorted(self.vocab, tokens).clamp(max=len(self.vocab) - 1)  # (B, T)
            tokens = torch.where(self.vocab[found] == tokens, found + 1, 0)  # rows in order: end-of-text the last
        context = self.text_proj(self.text_encoder(tokens))  # (B, T, context_dim)
        if not self.unet.config.adm_in_channels:
            return context
        pooled = context[torch.arange(len(tokens)), tokens.argmax(dim=-1)]  # (B, context_dim)
        return torch.cat([context, pooled[:, None]], dim=1)  # (B, T + 1, context_dim)

    def forward(self, x, timesteps, context):
        """x (B, C, H, W), timesteps (B,), context from encode_text -> the UNet's prediction (B, C, H, W)."""
        context, pooled = (context[:, :-1], context[:, -1]) if self.unet.config.adm_in_channels else (context, None)
        if self.patch == 1:  # no folding: pixel_unshuffle by 1 would still copy x
            return self.unet(x, timesteps, context, pooled)
        x = F.pixel_unshuffle(x, self.patch)  # (B, C*p*p, H/p, W/p)
        return F.pixel_shuffle(self.unet(x, timesteps, context, pooled), self.patch)  # (B, C, H, W)

    @classmethod
    def new(cls, kind, sd=None, gpt=None, unet_config=None, width=64, layers=2, max_caption_tokens=30, patch=1):
        """A model to train (from_checkpoint rebuilds a trained one). Its text encoder, by `kind`: SD's CLIP ViT-L/14
        text tower out of the SD file's state dict `sd`; a tiny CLIP-style one to train (`width`, one head per 64
        channels as in CLIP, `layers` blocks; start and end tokens around the caption); or the GPT-2 `gpt` (its end
        token after the caption). Its UNet: new of `unet_config`, else SD's out of `sd` (fine-tuned)."""
        if kind == "clip":
            text, length = CLIPTextTransformer.from_state_dict(sd), 77
        elif kind == "tiny":
            length = max_caption_tokens + 2
            text = CLIPTextTransformer(TextConfig(length, 49408, width, max(1, width // 64), layers))
        else:
            text, length = GPTHidden(gpt), max_caption_tokens + 1
        unet = UNetModel(unet_config) if unet_config else UNetModel.from_state_dict(sd)
        return cls(unet, text, kind, length, patch)

    @classmethod
    def from_checkpoint(cls, checkpoint, ema=True):
        """(model, frozen VAE or None) of a train.py --task diffusion checkpoint (weights.read_checkpoint), rebuilt from
        the configs stored beside its weights (unet_config, text_config with the encoder's kind, patch, vae_config;
        weights.rebuild: built on meta, checked, loaded), with the EMA weights when it has them and `ema`."""
        text, sd = dict(checkpoint["text_config"]), checkpoint["model"]
        kind, length = text.pop("kind"), text.pop("context_length")
        prefix = "ema." if ema and any(k.startswith("ema.") for k in sd) else "net."

        def build():
            encoder = GPTHidden(GPT(GPTConfig(**text))) if kind == "gpt2" else \
                CLIPTextTransformer(TextConfig(**text, context_length=length))
            return cls(UNetModel(UNetConfig(**checkpoint["unet_config"])), encoder, kind, length, checkpoint["patch"],
                       sd.get(prefix + "vocab"))  # a closed vocabulary: its ids
        net = weights.rebuild(build, {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
        vae = weights.rebuild(lambda: AutoencoderKL(AutoencoderConfig(**checkpoint["vae_config"])), {
            k[4:]: v for k, v in sd.items() if k.startswith("vae.")}) if checkpoint["vae_config"] else None
        return net, vae
