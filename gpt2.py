"""GPT-2, by hand: the language model of Radford et al. 2019, "Language Models are Unsupervised Multitask
Learners", in all four released sizes (124M to 1.5B parameters); then GPT-2 Vision: GPT-2 writing a caption after
a prefix made from an image (ClipCap, Mokady et al. 2021).

It computes what OpenAI's TensorFlow code computes (openai/gpt-2 `src/model.py`) and what Hugging Face's port
computes (transformers `GPT2LMHeadModel`), and it loads the official Hugging Face files (openai-community/gpt2*:
`model.safetensors`, `pytorch_model.bin`) without renaming anything: every module is named after its key there.
Read top to bottom, two chapters and the command line:

1. GPT-2: building blocks, config and presets, the model, loading the official weights, decoding (greedy,
   temperature, top-k, top-p, beam search);
2. GPT-2 Vision: the captioner, GPT-2 after a mapping network (vit.py) that turns what an image tower makes of
   an image into GPT-2 input vectors: how it learns and decodes, and loading ClipCap's released captioners;
3. the command line:

    python gpt2.py "The meaning of life is" --max-new-tokens 40

One storage choice runs through the file. OpenAI's "conv1d" layers are linear layers whose weight is stored
(in, out) and applied as x @ W + b. We keep that layout (class Conv1D), so the official tensors load as they are
and no weight is ever transposed (decoding_layout reorders memory only). Logits = h @ wte^T (tied output layer).
"""
import argparse
import math
import re
import sys
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import vit
import weights
from vit import VisionConfig, VisionTransformer, mapper_sizes, mapping_network, normalize

# ===============================================================================================================
# 1. GPT-2
# ===============================================================================================================


# ---------------------------------------------------------------------------------------------------------------
# Building blocks


class Conv1D(nn.Module):
    """A linear layer stored the official way, weight (in, out): y = x @ W + b (openai/gpt-2 `conv1d`), computed
    as one addmm so the bias is added inside the matrix multiply rather than in a second pass over y."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        if x.numel() == x.size(-1):  # one row (decoding): W^T x + b, whose bf16 kernel reads W^T stored row-major
            return torch.addmv(self.bias, self.weight.t(), x.reshape(-1)).view(*x.shape[:-1], -1)  # decoding_layout
        return torch.addmm(self.bias, x.flatten(0, -2), self.weight).view(*x.shape[:-1], -1)  # x @ W + b


def causal_mask(past_length, T, key_is_real=None, device=None):
    """Which keys each query may attend to, (B or 1, 1, T, S) bool with S = past_length + T. Query t sits at
    position past_length + t and sees every key up to and including itself, except padding keys (key_is_real
    False). A padding query sees itself only, so no softmax row is ever empty (an empty row gives NaN, which would
    reach real tokens through 0 * NaN); what a padding query computes is never used."""
    query_pos = torch.arange(past_length, past_length + T, device=device)[:, None]
    key_pos = torch.arange(past_length + T, device=device)[None, :]
    mask = key_pos <= query_pos  # (T, S)
    if key_is_real is not None:
        mask = (mask & key_is_real[:, None, :]) | (key_pos == query_pos)  # (B, T, S)
    return mask.view(-1, 1, T, past_length + T)


class Attention(nn.Module):
    """Causal multi-head self-attention (Vaswani et al. 2017), queries, keys and values from one fused c_attn."""

    def __init__(self, config):
        super().__init__()
        self.n_head, self.dropout = config.n_head, config.dropout
        self.use_sdpa = True  # the switch (set_attention): F.scaled_dot_product_attention or the plain math
        self.c_attn = Conv1D(config.n_embd, 3 * config.n_embd)
        self.c_proj = Conv1D(config.n_embd, config.n_embd)

    def forward(self, x, mask, past=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if past is not None:  # KV cache: keys and values of all earlier positions
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, H, S, D)
        if self.use_sdpa:  # the fast path: the same math in one fused kernel
            y = F.scaled_dot_product_attention(q, k, v, mask, self.dropout if self.training else 0.0)
        else:
            att = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, H, T, S)
            att = (att if mask is None else att.masked_fill(~mask, float("-inf"))).softmax(dim=-1)
            y = F.dropout(att, self.dropout, self.training) @ v  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)
        return F.dropout(self.c_proj(y), self.dropout, self.training), (k, v)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dropout = config.dropout
        self.c_fc = Conv1D(config.n_embd, 4 * config.n_embd)
        self.c_proj = Conv1D(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        x = self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # openai/gpt-2's `gelu` (HF: "gelu_new")
        return F.dropout(x, self.dropout, self.training)


class Block(nn.Module):
    """A pre-norm transformer block: GPT-2 moved LayerNorm to the input of each sub-block (paper, sec. 2.3)."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = Attention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, mask, past=None):
        attended, present = self.attn(self.ln_1(x), mask, past)
        x = x + attended
        x = x + self.mlp(self.ln_2(x))
        return x, present


# ---------------------------------------------------------------------------------------------------------------
# Config and presets


@dataclass(frozen=True)
class GPTConfig:
    n_vocab: int = 50257  # 256 bytes + 50,000 BPE merges + <|endoftext|>
    n_ctx: int = 1024
    n_embd: int = 768
    n_head: int = 12
    n_layer: int = 12
    layer_norm_epsilon: float = 1e-5
    dropout: float = 0.0  # OpenAI trained with 0.1 (attn, resid and embd pdrop alike); 0 for inference

    @classmethod
    def from_state_dict(cls, sd):
        """Sizes read off the tensors (width from wte, depth from the block indices, context from wpe); the head
        count is in no shape, so it comes from the preset of that depth and width, which must then agree on all."""
        if "wte.weight" not in sd or "wpe.weight" not in sd:
            raise ValueError(f"not a GPT-2 state dict: no wte.weight / wpe.weight among {sorted(sd)[:8]}")
        layers = [int(m.group(1)) for k in sd if (m := re.match(r"h\.(\d+)\.", k))]
        n_vocab, n_embd = sd["wte.weight"].shape
        found = cls(n_vocab, sd["wpe.weight"].shape[0], n_embd, n_layer=1 + max(layers, default=-1))
        for name, preset in PRESETS.items():
            if (preset.n_layer, preset.n_embd) == (found.n_layer, found.n_embd):
                weights.check_config(replace(found, n_head=preset.n_head), preset, f"{name} (else pass config=)")
                return preset
        raise ValueError(f"no GPT-2 preset has n_layer={found.n_layer}, n_embd={found.n_embd}; pass config=")


# Sizes from openai/gpt-2 `hparams.json` and the openai-community/gpt2* `config.json` files on the Hugging Face
# hub. Parameter counts are exact and count wte once (it is also the output layer).
PRESETS = {
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),  # 124,439,808 parameters
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),  # 354,823,168
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),  # 774,030,080
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),  # 1,557,611,200
}
# The official files hold causal-mask buffers (attn.bias; older saves' masked_bias): forward builds its own; dropped.
IGNORED = ("h.*.attn.bias", "h.*.attn.masked_bias")


# ---------------------------------------------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.n_vocab, config.n_embd)
        self.wpe = nn.Embedding(config.n_ctx, config.n_embd)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        for name, p in self.named_parameters():  # for training from scratch; loading overwrites all of it
            if name.endswith("c_proj.weight"):  # residual projections scaled by 1/sqrt(#residual layers), sec. 2.3
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layer))
            elif p.dim() == 2:  # N(0, 0.02) as in openai/gpt-2 `model.py`
                nn.init.normal_(p, std=0.02)

    def lm_head(self, hidden):
        """Logits from hidden states: the output layer is the token embedding itself (tied weights)."""
        if hidden.numel() == hidden.size(-1):  # one row: torch.mv, whose bf16 kernel reads 1.5x faster than addmm's
            return torch.mv(self.wte.weight, hidden.reshape(-1)).view(*hidden.shape[:-1], -1)
        return F.linear(hidden, self.wte.weight)  # (B, T, V)

    def hidden_states(self, idx, prefix_embeds=None, attention_mask=None, past_key_values=None):
        """The transformer. idx (B, T) token ids, or None; prefix_embeds (B, P, C) vectors placed before them (a
        captioner's image prefix). attention_mask (B, S), 1 = real and 0 = padding, covers every position so far,
        cached ones included (the Hugging Face convention), so left padding (generation) and right padding
        (training) both work. past_key_values: what an earlier call returned for the positions before these.
        Returns the hidden states after ln_f (B, P+T, C) and the past_key_values including these positions."""
        x = self.wte(idx) if idx is not None else None  # (B, T, C)
        if prefix_embeds is not None:
            x = prefix_embeds if x is None else torch.cat([prefix_embeds.to(x.dtype), x], dim=1)  # (B, P+T, C)
        B, T, _ = x.shape
        past_length = 0 if past_key_values is None else past_key_values[0][0].size(2)
        if past_length + T > self.config.n_ctx:
            raise ValueError(f"{past_length + T} positions exceed GPT-2's context of {self.config.n_ctx}")
        if attention_mask is None:
            pos = torch.arange(past_length, past_length + T, device=x.device)[None]  # (1, T)
            mask = causal_mask(past_length, T, device=x.device) if T > 1 else None  # one query sees every key
        else:
            if attention_mask.shape != (B, past_length + T):
                raise ValueError(f"attention_mask is {tuple(attention_mask.shape)}, expected {(B, past_length + T)}")
            # positions count real tokens only: a left-padded row starts at 0 like an unpadded one (as in HF generate)
            pos = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)[:, past_length:]  # (B, T)
            mask = causal_mask(past_length, T, attention_mask.bool(), x.device)
        x = F.dropout(x + self.wpe(pos), self.config.dropout, self.training)
        presents = []
        for i, block in enumerate(self.h):
            x, present = block(x, mask, None if past_key_values is None else past_key_values[i])
            presents.append(present)
        return self.ln_f(x), presents

    def forward(self, idx, prefix_embeds=None, attention_mask=None, past_key_values=None, use_cache=False,
                return_hidden=False):
        """Logits (B, P+T, V) for hidden_states' arguments, called as Hugging Face's GPT2LMHeadModel is:
        return_hidden=True gives the hidden states instead (a trainer applies lm_head where it needs it), and
        use_cache=True returns (logits or hidden states, the new past_key_values)."""
        hidden, presents = self.hidden_states(idx, prefix_embeds, attention_mask, past_key_values)
        out = hidden if return_hidden else self.lm_head(hidden)
        return (out, presents) if use_cache else out

    def set_attention(self, use_sdpa=True):
        """The one switch for every attention layer: fused SDPA or the plain math (tested equal)."""
        for attention in (m for m in self.modules() if isinstance(m, Attention)):
            attention.use_sdpa = use_sdpa
        return self

    def decoding_layout(self):
        """For decoding: Conv1D weights column-major (same values): one row's W^T x reads W 1.6x faster in bf16."""
        for conv in (m for m in self.modules() if isinstance(m, Conv1D)):
            conv.weight = nn.Parameter(conv.weight.detach().t().contiguous().t(), conv.weight.requires_grad)
        return self

    # -----------------------------------------------------------------------------------------------------------
    # Loading the official weights

    @classmethod
    def from_pretrained(cls, name_or_path, root=None, offline=False, **overrides):
        """A preset (gpt2, gpt2-medium, gpt2-large, gpt2-xl), fetched when missing, or a file or a directory holding
        model.safetensors / pytorch_model.bin (the Hugging Face layout)."""
        name = f"{name_or_path}/model.safetensors" if name_or_path in PRESETS else name_or_path
        path = weights.file_or_fetch(name, root, offline, "GPT-2 weights", ("model.safetensors", "pytorch_model.bin"))
        return cls.from_state_dict(weights.load_state_dict(path), **overrides)

    @classmethod
    def from_state_dict(cls, state_dict, prefix="", config=None, **overrides):
        """A GPT from the tensors under `prefix`, named as in the official files, with or without HF's "transformer."
        level; the config read off the tensors and checked against the presets, unless given (overrides: fields no
        tensor fixes, dropout). Mapping rule: strip "transformer."; drop the causal-mask buffers (IGNORED);
        lm_head.weight, which only HF's own save carries, must equal wte.weight (tied) and is dropped."""
        sd = {k[len(prefix):].removeprefix("transformer."): v for k, v in state_dict.items() if k.startswith(prefix)}
        head = sd.pop("lm_head.weight", None)
        if head is not None and "wte.weight" in sd and not torch.equal(head, sd["wte.weight"]):
            raise ValueError("lm_head.weight differs from wte.weight: GPT-2 ties them, so this is not a GPT-2 file")
        config = replace(config or GPTConfig.from_state_dict(sd), **overrides)
        with torch.device("meta"):  # no memory and no random init for weights that are about to be replaced
            model = cls(config)
        sd = weights.check_state_dict(model, sd, f"GPT-2 {config} (prefix {prefix!r})", IGNORED)
        model.load_state_dict({k: v.to(torch.float32, copy=True) for k, v in sd.items()}, strict=True, assign=True)
        return model

    # -----------------------------------------------------------------------------------------------------------
    # Generation

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, attention_mask=None, prefix_embeds=None, temperature=0.0, top_k=None,
                 top_p=None, num_beams=1, length_penalty=1.0, eos_token_id=50256, generator=None):
        """Continue every row of idx (B, T) (prompts of different lengths left-padded, with their attention_mask:
        tokenizer.pad_left). temperature 0 takes the most likely token (greedy); above 0 it samples from the top_k
        most likely and/or the smallest set whose probability reaches top_p, randomness from `generator`; num_beams
        > 1 runs beam search. A row stops at eos_token_id (None: never). Returns the new tokens (B, N), N <=
        max_new_tokens, rows that stopped early filled with eos_token_id."""
        prompt_length = (0 if idx is None else idx.size(1)) + (0 if prefix_embeds is None else prefix_embeds.size(1))
        if prompt_length + max_new_tokens > self.config.n_ctx:
            raise ValueError(f"a prompt of {prompt_length} positions plus {max_new_tokens} new tokens exceeds "
                             f"GPT-2's context of {self.config.n_ctx}")
        if num_beams > 1:
            return beam_search(self, idx, max_new_tokens, num_beams, length_penalty, attention_mask, prefix_embeds,
                               eos_token_id)
        hidden, past = self.hidden_states(idx, prefix_embeds, attention_mask)
        finished = torch.zeros(hidden.size(0), dtype=torch.bool, device=hidden.device)
        new_tokens = []
        for _ in range(max_new_tokens):
            token = sample_next_token(self.lm_head(hidden[:, -1]), temperature, top_k, top_p, generator)  # (B,)
            if eos_token_id is not None:
                token = token.masked_fill(finished, eos_token_id)
                finished |= token == eos_token_id
            new_tokens.append(token)
            if finished.all() or len(new_tokens) == max_new_tokens:
                break
            if attention_mask is not None:
                attention_mask = F.pad(attention_mask, (0, 1), value=1)
            hidden, past = self.hidden_states(token[:, None], None, attention_mask, past)
        return torch.stack(new_tokens, dim=1)


# ---------------------------------------------------------------------------------------------------------------
# Decoding helpers: sampling, beam search


def sample_next_token(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """One token id per row of logits (B, V): argmax when temperature is 0, otherwise a sample."""
    if temperature == 0:  # max's indices: the first maximum, as argmax's, in less time (4x in bf16)
        return logits.max(dim=-1).indices
    logits = logits.float() / temperature
    if top_k:  # keep the k most likely tokens (Fan et al. 2018; OpenAI's GPT-2 samples used k = 40)
        kth_best = logits.topk(min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:  # nucleus: fewest tokens whose mass reaches top_p (Holtzman et al. 2019)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # mass before this token already reaches top_p; never the first
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)


@torch.no_grad()
def beam_search(model, idx, max_new_tokens, num_beams, length_penalty=1.0, attention_mask=None, prefix_embeds=None,
                eos_token_id=50256):
    """GPT.generate with num_beams > 1 (same arguments and result layout): keep the num_beams continuations with
    the highest summed log-probability; a beam that emits eos or reaches max_new_tokens becomes a hypothesis scored
    sum / length**length_penalty, each row keeping its num_beams best. As Hugging Face's beam search step for step:
    the top 2 * num_beams candidates are scored, only the first num_beams may finish, and a row stops once no
    running beam can beat its worst hypothesis (HF's default early_stopping=False heuristic)."""
    B, K = (idx if idx is not None else prefix_embeds).size(0), num_beams
    idx, attention_mask, prefix_embeds = (None if t is None else t.repeat_interleave(K, dim=0)  # (B*K, ...)
                                          for t in (idx, attention_mask, prefix_embeds))
    hidden, past = model.hidden_states(idx, prefix_embeds, attention_mask)
    scores = torch.zeros(B, K, device=hidden.device)
    scores[:, 1:] = -1e9  # the K copies of a prompt are equal: take the first step's candidates from one only
    beams = [[[] for _ in range(K)] for _ in range(B)]  # tokens of each running beam
    hypotheses = [[] for _ in range(B)]  # per row: (score, tokens) of finished beams, best first
    done = [False] * B
    for step in range(max_new_tokens):
        logprobs = model.lm_head(hidden[:, -1]).float().log_softmax(dim=-1)  # (B*K, V)
        V = logprobs.size(-1)
        candidates = (scores[:, :, None] + logprobs.view(B, K, V)).view(B, K * V)
        top_scores, top = candidates.topk(2 * K, dim=1)  # (B, 2K): at least K do not end in eos
        last = step == max_new_tokens - 1
        running = []  # per row: K (score, source beam, token), best first
        for b in range(B):
            keep = []
            for rank, (score, i) in enumerate(zip(top_scores[b].tolist(), top[b].tolist())):
                beam, token = divmod(i, V)
                if token == eos_token_id or last:
                    if rank < K and not done[b]:
                        hypothesis = beams[b][beam] + [token]
                        hypotheses[b].append((score / len(hypothesis) ** length_penalty, hypothesis))
                elif len(keep) < K:
                    keep.append((score, beam, token))
            hypotheses[b] = sorted(hypotheses[b], key=lambda h: h[0], reverse=True)[:K]
            if keep and len(hypotheses[b]) == K:  # can the best running beam still beat the worst hypothesis?
                done[b] = done[b] or keep[0][0] / (step + 1) ** length_penalty <= hypotheses[b][-1][0]
            running.append(keep)
        if last or all(done):
            break
        source = torch.tensor([b * K + beam for b in range(B) for _, beam, _ in running[b]], device=hidden.device)
        tokens = torch.tensor([[t for _, _, t in row] for row in running], device=hidden.device)  # (B, K)
        scores = torch.tensor([[s for s, _, _ in row] for row in running], device=hidden.device)
        beams = [[beams[b][beam] + [t] for _, beam, t in running[b]] for b in range(B)]
        past = [(k[source], v[source]) for k, v in past]  # each beam continues its source's cache
        if attention_mask is not None:  # rows of one prompt share their mask, so it needs no reordering
            attention_mask = F.pad(attention_mask, (0, 1), value=1)
        hidden, past = model.hidden_states(tokens.view(B * K, 1), None, attention_mask, past)
    best, pad = [h[0][1] for h in hypotheses], eos_token_id if eos_token_id is not None else 0
    return torch.tensor([row + [pad] * (max(map(len, best)) - len(row)) for row in best], device=hidden.device)


# ===============================================================================================================
# 2. GPT-2 Vision: GPT-2 continues a prefix made from an image
# ===============================================================================================================
# ClipCap (Mokady et al. 2021, github.com/rmokady/CLIP_prefix_caption): a mapping network (vit.py's last section:
# ClipCap's MLP or transformer mapper, or LLaVA-1.5's per-token projector) turns what the image tower makes of an
# image into prefix_length vectors of GPT-2's width, which GPT-2 reads as a prompt's embeddings before it writes the
# caption. Module names follow ClipCap's ClipCaptionModel (clip_project, gpt), so its released files (CLIPCAP, in
# weights/registry.py) load as they are; its third file, a transformer mapper, reads CLIP RN50x4's 640-d embeddings.
END_OF_TEXT, FULL_STOP = 50256, 13  # GPT-2's token ids of <|endoftext|> and "."
CLIPCAP = {"coco": "clipcap/coco_weights.pt", "conceptual": "clipcap/conceptual_weights.pt"}


@dataclass(frozen=True)
class CaptionerConfig:
    prefix_size: int = 512  # width of the image embedding: CLIP ViT-B/32 512, RN50x4 640, ViT-L/14 768
    prefix_length: int = 10  # vectors GPT-2 reads before the caption (ClipCap: 10 for COCO)
    mapping_type: str = "mlp"  # "mlp" (ClipCap's MLP), "transformer" (ClipCap's TransformerMapper) or "tokens"
    clip_length: int = 10  # transformer mapper: vectors made from the image embedding (ClipCap: 10)
    num_layers: int = 8  # transformer mapper: blocks (ClipCap: 8)
    num_heads: int = 8  # transformer mapper: attention heads (ClipCap: 8)
    max_caption_tokens: int = 30  # decoding stops after this many tokens (train.py cuts captions there)
    eos_token_id: int = 50256  # a caption ends with this token: GPT-2's <|endoftext|>, or ClipCap's "." (text)
    normalize_prefix: bool = False  # divide the image embedding by its L2 norm first (ClipCap's --normalize_prefix)
    beam_rule: str = "hf"  # num_beams > 1: "hf" (beam_search) or "clipcap" (ClipCap's generate_beam: clipcap_beams)


class Captioner(nn.Module):
    """ClipCap's ClipCaptionModel: image -> tower -> clip_project -> prefix (B, P, C) -> GPT-2 -> caption. `visual`
    (vit.py) is a tower that trains with it (in its state dict) or a frozen one attached to caption new images;
    without it, it reads a frozen tower's embeddings (train.py caches them). `vocab`: a closed vocabulary, the ids
    of every token the captions use; the other rows of wte are set to 0 here and stay 0 (see forward)."""

    def __init__(self, config, gpt, visual=None, vocab=None):
        super().__init__()
        self.config, self.gpt = config, gpt
        self.clip_project = mapping_network(config.mapping_type, config.prefix_size, gpt.config.n_embd,
                                            config.prefix_length, config.clip_length, config.num_layers,
                                            config.num_heads)
        self.visual = visual  # last: the parameters' order (an optimizer's state) is GPT-2, mapper, tower
        self.register_buffer("vocab", None)  # (|vocab|,) sorted ids, saved with the weights
        if vocab is not None:
            self.vocab = torch.tensor(sorted({int(t) for t in vocab} | {config.eos_token_id}))
            unused = torch.ones(gpt.config.n_vocab, dtype=torch.bool).index_fill_(0, self.vocab, False)
            with torch.no_grad():
                gpt.wte.weight.masked_fill_(unused[:, None], 0)

    def prefix(self, images):
        """Images -> the prefix GPT-2 reads (B, P, C). Pixels (B, 3, h, w), uint8 (CLIP-normalised here) or already
        normalised, go through the tower (pooled, or every token for the tokens mapper); without one, embeddings."""
        if self.visual is not None:
            pixels = normalize(images) if images.dtype == torch.uint8 else images
            images = self.visual.embed_tokens(pixels) if self.config.mapping_type == "tokens" else self.visual(pixels)
        if self.config.normalize_prefix:  # in fp32, as ClipCap's notebook: prefix / prefix.norm(2, -1)
            images = images.float() / images.float().norm(dim=-1, keepdim=True)
        return self.clip_project(images.to(self.gpt.wte.weight.dtype))  # (B, P, C)

    def forward(self, images, tokens, token_mask):
        """Teacher forcing: images (see prefix), right-padded captions (B, T), token_mask (B, T) 0 for padding (any id)
        -> the cross-entropy summed over every caption token and the end token after it (the trainer divides). With a
        closed vocabulary the other rows of wte are exactly 0, so the softmax's normaliser is the used tokens' exp(logit)
        plus (V - |vocab|) * exp(0): the full layer's loss and gradients (none for the unused rows) at |vocab| rows'
        cost; another dataset's token embeds and scores as 0."""
        prefix = self.prefix(images)  # (B, P, C)
        (B, T), P, vocab = tokens.shape, prefix.size(1), self.vocab
        token_mask = token_mask.bool()
        attention_mask = torch.cat([token_mask.new_ones(B, P), token_mask], dim=1)  # (B, P+T)
        if vocab is None:
            hidden, _ = self.gpt.hidden_states(tokens, prefix, attention_mask)  # (B, P+T, C)
        else:  # the used rows, gathered once, embed the tokens and make the logits: one gradient scatter into wte
            table = self.gpt.wte.weight[vocab]  # (|vocab|, C)
            rows = torch.searchsorted(vocab, tokens).clamp(max=len(vocab) - 1)  # (B, T)
            embedded = table[rows] * (vocab[rows] == tokens)[..., None]  # (B, T, C): 0 outside the vocabulary
            hidden, _ = self.gpt.hidden_states(None, torch.cat([prefix, embedded], dim=1), attention_mask)
        # position P-1+t predicts caption token t (the last prefix vector predicts the first word), and the position
        # of a caption's last token predicts the end token, unless it is text that ends the caption already (ClipCap's
        # "."; ClipCap learned no end after it); padding positions predict nothing
        lengths = token_mask.sum(dim=1, keepdim=True)  # (B, 1)
        positions = torch.arange(T + 1, device=tokens.device)[None]  # (1, T+1)
        targets = F.pad(tokens, (0, 1)).masked_fill(positions >= lengths, self.config.eos_token_id)  # (B, T+1)
        is_target = positions < lengths + int(self.config.eos_token_id == END_OF_TEXT)  # (B, T+1)
        hidden, targets = hidden[:, P - 1:][is_target], targets[is_target]  # (N, C), (N,): no work on padding
        if vocab is None:  # the 50,257-wide output layer is most of the cost: applied only where there is a target
            return F.cross_entropy(self.gpt.lm_head(hidden).float(), targets, reduction="sum")
        logits = F.linear(hidden, table).float()  # (N, |vocab|)
        rest = torch.full_like(logits[:, :1], math.log(self.gpt.config.n_vocab - len(vocab)))  # log sum of exp(0)
        log_normaliser = torch.cat([logits, rest], dim=1).logsumexp(dim=1)  # (N,)
        rows = torch.searchsorted(vocab, targets).clamp(max=len(vocab) - 1)
        return (log_normaliser - logits.gather(1, rows[:, None])[:, 0] * (vocab[rows] == targets)).sum()

    @torch.no_grad()
    def generate(self, images, max_new_tokens=None, **sampling):
        """Captions as ids (B, N), N <= max_new_tokens (default: the config's), rows that ended filled with the end
        token; sampling: GPT.generate's keywords (temperature, top_k, top_p, num_beams, ...), greedy by default. With
        num_beams > 1, the config's beam_rule says whose beam search (the one its captioner was published with)."""
        prefix, length = self.prefix(images), max_new_tokens or self.config.max_caption_tokens
        if self.config.beam_rule == "clipcap" and sampling.get("num_beams", 1) > 1:
            return clipcap_beams(self.gpt, prefix, length, sampling["num_beams"], self.config.eos_token_id)
        return self.gpt.generate(None, length, prefix_embeds=prefix, eos_token_id=self.config.eos_token_id, **sampling)

    def caption(self, images, tokenizer, max_new_tokens=None, **sampling):
        """Captions (str) of images (see prefix), decoded by `tokenizer` (GPT-2's) up to the end token, which is
        kept when it is text (ClipCap's ".", as its generate2 returns it)."""
        end, keep = self.config.eos_token_id, int(self.config.eos_token_id != END_OF_TEXT)
        return [tokenizer.decode(row[:row.index(end) + keep] if end in row else row).strip()
                for row in self.generate(images, max_new_tokens, **sampling).tolist()]

    def set_attention(self, use_sdpa=True):
        """GPT-2's switch and the tower's (ClipCap's mapper keeps its plain attention: a few vectors, no mask)."""
        for model in (self.gpt, self.visual) if self.visual is not None else (self.gpt,):
            model.set_attention(use_sdpa)
        return self

    @classmethod
    def from_checkpoint(cls, checkpoint, visual=None):
        """A captioner of train.py --task caption (weights.read_checkpoint) rebuilt from the configs beside its weights
        (captioner_config, gpt_config, vision_config) by weights.rebuild (meta device, checked, loaded). A tower that
        trained with it is among the weights; a frozen one (frozen_tower) is not: `visual` attaches it (clip.py)."""
        vision, trained = VisionConfig(**checkpoint["vision_config"]), checkpoint["frozen_tower"] is None
        model = weights.rebuild(lambda: cls(CaptionerConfig(**checkpoint["captioner_config"]),
                                            GPT(GPTConfig(**checkpoint["gpt_config"])),
                                            VisionTransformer(vision, sincos=True) if trained else None,
                                            checkpoint["model"].get("vocab")), checkpoint["model"])
        if visual is not None and not trained:
            if visual.config != vision:
                raise ValueError(f"the image tower given is not the one this captioner was trained on ({vision})")
            model.visual = visual.requires_grad_(False).eval()
        return model

    @classmethod
    def from_pretrained(cls, name_or_path="coco", visual=None, root=None, offline=False):
        """ClipCap's released captioner (CLIPCAP: coco, conceptual; fetched when missing) or a file in its layout,
        read by the restricted unpickler (no code in it runs), built by from_clipcap, `visual` attached (clip.py)."""
        path = weights.fetch(CLIPCAP[name_or_path], root, offline) if name_or_path in CLIPCAP else name_or_path
        return cls.from_clipcap(weights.load_state_dict(path), visual, root=root, offline=offline)

    @classmethod
    def from_clipcap(cls, state_dict, visual=None, gpt=None, root=None, offline=False):
        """A captioner from the state dict of ClipCap's ClipCaptionModel. Mapping rule: `gpt.` is GPT-2 in transformers'
        names (GPT.from_state_dict, prefix "gpt.": mask buffers ignored, lm_head checked tied); `clip_project.`, the
        mapper, is named as ours. No `gpt.` keys (GPT-2 frozen, not saved): `gpt`, else the official file. Sizes come
        off the tensors, the rest from ClipCap's code: 8 heads; stop after "." (no end of text was learned) or 67 tokens
        (generate2); beams as generate_beam; L2-normalised embeddings for the transformer mapper only (its notebook)."""
        project = {k.removeprefix("clip_project."): v for k, v in state_dict.items() if k.startswith("clip_project.")}
        if "model.0.weight" not in project and not {"linear.weight", "prefix_const"} <= project.keys():
            raise ValueError("not a ClipCap captioner: no clip_project.model.0.weight (MLP mapper) nor "
                             "clip_project.linear.weight and prefix_const (transformer mapper)")
        in_file, wte = any(k.startswith("gpt.") for k in state_dict), state_dict.get("gpt.transformer.wte.weight")
        C = wte.shape[1] if wte is not None else (gpt.config if gpt else PRESETS["gpt2"]).n_embd
        kind, prefix_size, prefix_length, clip_length, num_layers = mapper_sizes(project, C)
        if prefix_size == 640:
            raise ValueError("this ClipCap captioner maps CLIP RN50x4's 640-d image embeddings (ClipCap's released "
                             "transformer-mapper file: RN50x4 in its notebook); this project has CLIP ViT-B/32 (512-d)")
        gpt = GPT.from_state_dict(state_dict, "gpt.") if in_file else gpt or GPT.from_pretrained("gpt2", root, offline)
        config = CaptionerConfig(prefix_size, prefix_length, kind, clip_length, num_layers, 8, 67, FULL_STOP,
                                 normalize_prefix=kind == "transformer", beam_rule="clipcap")
        if visual is not None and visual.config.embed_dim != prefix_size:
            raise ValueError(f"the image tower makes {visual.config.embed_dim}-d embeddings, the mapper reads "
                             f"{prefix_size}-d ones")
        sd = {k: v.float() for k, v in state_dict.items() if not k.startswith("gpt.")}  # the mapper, and any stray key
        sd.update((f"gpt.{k}", v) for k, v in gpt.state_dict().items())
        model = weights.rebuild(lambda: cls(config, GPT(gpt.config)), sd)  # the key set and every shape checked
        if visual is not None:
            model.visual = visual.requires_grad_(False).eval()
        return model


@torch.no_grad()
def clipcap_beams(gpt, prefix_embeds, max_new_tokens, num_beams, eos_token_id):
    """ClipCap's generate_beam (predict.py), for a batch and with the KV cache; ids (B, N) as GPT.generate returns
    them. Unlike beam_search, beams are ranked by their mean log-probability at every step, and a beam that emitted
    the end token stays among the beams, extended by token 0 at no cost (its length stays). The best mean wins."""
    B, K = prefix_embeds.size(0), num_beams
    hidden, past = gpt.hidden_states(None, prefix_embeds)  # (B, P, C)
    scores, tokens = gpt.lm_head(hidden[:, -1]).float().log_softmax(dim=-1).topk(K, dim=-1)  # (B, K): sums
    past = [(k.repeat_interleave(K, dim=0), v.repeat_interleave(K, dim=0)) for k, v in past]  # (B*K, H, S, D)
    lengths, stopped, out = torch.ones_like(scores), tokens == eos_token_id, tokens[..., None]  # out (B, K, N)
    while not stopped.all() and out.size(2) < max_new_tokens:
        hidden, past = gpt.hidden_states(tokens.view(B * K, 1), None, None, past)
        logprobs = gpt.lm_head(hidden[:, -1]).float().log_softmax(dim=-1).view(B, K, -1)  # (B, K, V)
        logprobs[stopped] = torch.where(torch.arange(logprobs.size(-1), device=logprobs.device) == 0, 0.0, -math.inf)
        lengths = lengths + ~stopped
        means, index = ((scores[..., None] + logprobs) / lengths[..., None]).flatten(1).topk(K, dim=-1)  # (B, K)
        source, tokens = index.div(logprobs.size(-1), rounding_mode="floor"), index % logprobs.size(-1)
        lengths, stopped = lengths.gather(1, source), stopped.gather(1, source) | (tokens == eos_token_id)
        scores = means * lengths
        out = torch.cat([out.gather(1, source[..., None].expand_as(out)), tokens[..., None]], dim=2)
        rows = (source + torch.arange(B, device=source.device)[:, None] * K).flatten()  # (B*K,) flat source beams
        past = [(k[rows], v[rows]) for k, v in past]
    best = torch.arange(B), (scores / lengths).argmax(dim=1)  # each row's best beam by its mean
    return out[best].masked_fill(torch.arange(out.size(2), device=out.device) >= lengths[best][:, None], eos_token_id)


# ---------------------------------------------------------------------------------------------------------------
# Command line


def main():
    parser = argparse.ArgumentParser(description="Continue prompts with GPT-2 and OpenAI's released weights.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("prompt", nargs="+", help="one or more prompts, continued together as one batch")
    parser.add_argument("--gpt2-weights", dest="model", default="gpt2", help=f"GPT-2 weights: a preset "
                        f"({', '.join(PRESETS)}, fetched) or a model.safetensors / pytorch_model.bin file")
    parser.add_argument("--max-new-tokens", type=int, default=50, help="how many tokens to add at most")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy; higher = more random")
    parser.add_argument("--top-k", type=int, default=40, help="sample among the k most likely tokens (0 = all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="sample within this probability mass (1 = all)")
    parser.add_argument("--num-beams", type=int, default=1, help="beam search when > 1 (no sampling then)")
    parser.add_argument("--length-penalty", type=float, default=1.0, help="beam score = sum log p / length**this")
    parser.add_argument("--seed", type=int, default=1337, help="seed of the sampling generator")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, ...")
    parser.add_argument("--precision", choices=["auto", *vit.PRECISIONS], default="auto", help=vit.PRECISION_HELP)
    parser.add_argument("--weights-dir", help="where weights live (none: $MINIMODAL_WEIGHTS, else weights/)")
    parser.add_argument("--offline", action="store_true", help="never download; say which URL to fetch by hand")
    args = parser.parse_args()
    if args.max_new_tokens < 1 or args.num_beams < 1 or args.top_k < 0 or args.temperature < 0 or \
            not 0 < args.top_p <= 1:
        parser.error("--max-new-tokens and --num-beams must be at least 1, --top-k and --temperature at least 0, "
                     "--top-p in (0, 1]")
    from tokenizer import GPT2Tokenizer, pad_left  # only the command line needs text; the model works on ids
    tokenizer = GPT2Tokenizer.default()
    # an empty prompt starts from <|endoftext|>, the way OpenAI's unconditional samples begin
    idx, attention_mask = pad_left([tokenizer.encode(p) or [tokenizer.eot_token] for p in args.prompt],
                                   tokenizer.eot_token)
    generator = torch.Generator(args.device).manual_seed(args.seed)
    try:
        model = GPT.from_pretrained(args.model, root=args.weights_dir, offline=args.offline)
        precision = vit.resolve_precision(args.precision, args.device)
        model.to(args.device, vit.PRECISIONS[precision]).decoding_layout().eval()  # the KV cache follows; sampling: fp32
        print(f"{args.model}: {model.config}, {sum(p.numel() for p in model.parameters()):,} parameters, {precision}")
        out = model.generate(idx.to(args.device), args.max_new_tokens, attention_mask.to(args.device),
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                             num_beams=args.num_beams, length_penalty=args.length_penalty,
                             eos_token_id=tokenizer.eot_token, generator=generator)
    except (weights.WeightsUnavailable, FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
    for prompt, new in zip(args.prompt, out.tolist()):
        new = new[:new.index(tokenizer.eot_token)] if tokenizer.eot_token in new else new
        print("-" * 80 + "\n" + prompt + tokenizer.decode(new))


if __name__ == "__main__":
    main()
