"""ClipCap as its authors' code defines it: the test oracle for loading the released captioners.

Source: rmokady/CLIP_prefix_caption, train.py (commit 88b3701: MLP, MlpTransformer, MultiHeadAttention,
TransformerLayer, Transformer, TransformerMapper, ClipCaptionModel) and predict.py / the two inference notebooks
(generate2, generate_beam, how the CLIP embedding is fed). /work/lead/clipcap-notes.md has every fact with its
source. The classes below copy the structure of ClipCap's (module names, bias flags, activation, reshape order), so
`state_dict()` has the released key layout, and their forward is ClipCap's math (ClipCap is MIT-licensed,
Copyright (c) 2021 rmokady; reproduced here as a test oracle only); GPT-2 is transformers'
`GPT2LMHeadModel` at GPT-2 small's configuration with random weights, where ClipCap loads `from_pretrained('gpt2')`.

- `build_clipcap(mapping="mlp", prefix_size=512, prefix_length=10, clip_length=None, num_layers=8, seed=0)`:
  a ClipCaptionModel (eval, fp32). The released files: "mlp", 512, 10 (COCO and Conceptual Captions, CLIP
  ViT-B/32); "transformer", 640, 40, 40 (COCO, CLIP RN50x4 features: the refusal case); "transformer", 512, 40, 40
  is the same layout for ViT-B/32 features.
- `released_state_dict(model, include_gpt=True)`: its state dict as a 2021 `torch.save(model.state_dict())` held
  it: transformers 4.x registered two persistent buffers in every GPT-2 attention block, which 5.x no longer has, so
  they are put back where 4.x's state_dict placed them (after `ln_1`, before `attn.c_attn`):
  `gpt.transformer.h.N.attn.bias` (uint8 lower-triangular ones, (1, 1, 1024, 1024)) and
  `gpt.transformer.h.N.attn.masked_bias` (float32 scalar -1e4). `include_gpt=False` keeps `clip_project.*` only.
- `save_released(model, path, include_gpt=True)`: writes that dict with `torch.save` (zip format, as torch 1.9
  wrote the released files). Its pickle imports are PICKLE_GLOBALS, the four that the Hugging Face hub lists for the
  mirrors of coco_weights.pt and conceptual_weights.pt; `pickle_globals(path)` reads them back.
- `prefix_embeddings(model, clip_embedding, normalize=False)`: (B, prefix_length, 768), the mapper applied to the
  fp32 CLIP embedding; normalize=True divides it by its L2 norm first (transformer_inference.ipynb; the MLP
  notebook and predict.py do not).
- `greedy_decode(model, prefix_embed, ...)` -> token ids: ClipCap's generate2 (top-p 0.8 filtering, then argmax,
  so plain argmax; stops after emitting STOP_TOKEN; at most 67 tokens; no KV cache).
- `beam_decode(model, prefix_embed, beam_size=5, ...)` -> [(token ids, score)], best first: ClipCap's
  generate_beam (log-softmax sums divided by the beam's length, finished beams extended by token 0 at no cost).
- `plant_token(model, step, token=STOP_TOKEN, strength=100.0)`: adds `strength * wte[token]` to GPT-2's position
  embedding where the `step`-th generated token is predicted, so that a random model emits `token` there (a random
  GPT-2 never says "." on its own); it changes weights only, so a file saved afterwards carries it.
Both decoders take one image (prefix_embed of batch 1), as ClipCap's do.
"""
import collections
import pickletools
import zipfile
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as nnf
from transformers import GPT2Config, GPT2LMHeadModel

STOP_TOKEN = 13  # GPT2Tokenizer.encode(".")[0], ClipCap's stop_token_index (test_clipcap_oracle checks it)
ENTRY_LENGTH = 67  # generate2 / generate_beam: "maximum number of words"
GPT2_POSITIONS = 1024  # n_positions: the side of the attn.bias mask
PICKLE_GLOBALS = {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch.FloatStorage",
                  "torch.ByteStorage"}


class MLP(nn.Module):  # train.py / predict.py MLP: Linear, Tanh, Linear -> keys model.0, model.2
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def __init__(self, sizes: Tuple[int, ...], bias=True, act=nn.Tanh):
        super().__init__()
        layers = []
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=bias))
            if i < len(sizes) - 2:
                layers.append(act())
        self.model = nn.Sequential(*layers)


class MlpTransformer(nn.Module):
    def __init__(self, in_dim, h_dim, out_d: Optional[int] = None, act=nnf.relu, dropout=0.):
        super().__init__()
        out_d = out_d if out_d is not None else in_dim
        self.fc1 = nn.Linear(in_dim, h_dim)
        self.act = act
        self.fc2 = nn.Linear(h_dim, out_d)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.fc2(self.dropout(self.act(self.fc1(x)))))


class MultiHeadAttention(nn.Module):
    def __init__(self, dim_self, dim_ref, num_heads, bias=True, dropout=0.):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim_self // num_heads
        self.scale = head_dim ** -0.5
        self.to_queries = nn.Linear(dim_self, dim_self, bias=bias)
        self.to_keys_values = nn.Linear(dim_ref, dim_self * 2, bias=bias)
        self.project = nn.Linear(dim_self, dim_self)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, y=None, mask=None):
        y = y if y is not None else x
        b, n, c = x.shape
        _, m, d = y.shape
        queries = self.to_queries(x).reshape(b, n, self.num_heads, c // self.num_heads)  # b n h dh
        keys_values = self.to_keys_values(y).reshape(b, m, 2, self.num_heads, c // self.num_heads)  # b m 2 h dh
        keys, values = keys_values[:, :, 0], keys_values[:, :, 1]
        attention = torch.einsum('bnhd,bmhd->bnmh', queries, keys) * self.scale
        if mask is not None:
            if mask.dim() == 2:
                mask = mask.unsqueeze(1)
            attention = attention.masked_fill(mask.unsqueeze(3), float("-inf"))
        attention = attention.softmax(dim=2)
        out = torch.einsum('bnmh,bmhd->bnhd', attention, values).reshape(b, n, c)
        return self.project(out), attention


class TransformerLayer(nn.Module):
    def forward(self, x, y=None, mask=None):
        x = x + self.attn(self.norm1(x), y, mask)[0]
        return x + self.mlp(self.norm2(x))

    def __init__(self, dim_self, dim_ref, num_heads, mlp_ratio=4., bias=False, dropout=0., act=nnf.relu,
                 norm_layer: nn.Module = nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim_self)
        self.attn = MultiHeadAttention(dim_self, dim_ref, num_heads, bias=bias, dropout=dropout)
        self.norm2 = norm_layer(dim_self)
        self.mlp = MlpTransformer(dim_self, int(dim_self * mlp_ratio), act=act, dropout=dropout)


class Transformer(nn.Module):  # enc_dec is False in TransformerMapper: every layer is self-attention, no mask
    def forward(self, x, y=None, mask=None):
        for layer in self.layers:
            x = layer(x, y, mask)
        return x

    def __init__(self, dim_self: int, num_heads: int, num_layers: int, dim_ref: Optional[int] = None,
                 mlp_ratio: float = 2., act=nnf.relu, norm_layer: nn.Module = nn.LayerNorm):
        super().__init__()
        dim_ref = dim_ref if dim_ref is not None else dim_self
        self.layers = nn.ModuleList([TransformerLayer(dim_self, dim_ref, num_heads, mlp_ratio, act=act,
                                                      norm_layer=norm_layer) for _ in range(num_layers)])


class TransformerMapper(nn.Module):
    def forward(self, x):
        x = self.linear(x).view(x.shape[0], self.clip_length, -1)
        prefix = self.prefix_const.unsqueeze(0).expand(x.shape[0], *self.prefix_const.shape)
        prefix = torch.cat((x, prefix), dim=1)
        return self.transformer(prefix)[:, self.clip_length:]

    def __init__(self, dim_clip: int, dim_embedding: int, prefix_length: int, clip_length: int, num_layers: int = 8):
        super().__init__()
        self.clip_length = clip_length
        self.transformer = Transformer(dim_embedding, 8, num_layers)
        self.linear = nn.Linear(dim_clip, clip_length * dim_embedding)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, dim_embedding), requires_grad=True)


class ClipCaptionModel(nn.Module):
    def forward(self, tokens, prefix, mask=None, labels=None):
        """GPT-2's output (logits over prefix_length + T positions) for a caption after the image's prefix."""
        embedding_text = self.gpt.transformer.wte(tokens)
        prefix_projections = self.clip_project(prefix).view(-1, self.prefix_length, self.gpt_embedding_size)
        embedding_cat = torch.cat((prefix_projections, embedding_text), dim=1)
        if labels is not None:
            dummy_token = torch.zeros(tokens.shape[0], self.prefix_length, dtype=torch.int64, device=tokens.device)
            labels = torch.cat((dummy_token, tokens), dim=1)
        return self.gpt(inputs_embeds=embedding_cat, labels=labels, attention_mask=mask)

    def __init__(self, prefix_length, clip_length=None, prefix_size=512, num_layers=8, mapping="mlp",
                 gpt2_config=None):
        super().__init__()
        self.prefix_length = prefix_length
        self.gpt = GPT2LMHeadModel(gpt2_config or GPT2Config(attn_implementation="eager"))  # ClipCap: from_pretrained
        self.gpt_embedding_size = self.gpt.transformer.wte.weight.shape[1]
        if mapping == "mlp":
            self.clip_project = MLP((prefix_size, (self.gpt_embedding_size * prefix_length) // 2,
                                     self.gpt_embedding_size * prefix_length))
        else:
            self.clip_project = TransformerMapper(prefix_size, self.gpt_embedding_size, prefix_length, clip_length,
                                                  num_layers)


def build_clipcap(mapping="mlp", prefix_size=512, prefix_length=10, clip_length=None, num_layers=8, seed=0,
                  gpt2_config=None):
    if mapping not in ("mlp", "transformer"):
        raise ValueError(f"mapping is 'mlp' or 'transformer', not {mapping!r}")
    if mapping == "transformer" and clip_length is None:
        clip_length = prefix_length  # the released recipe: prefix_length = prefix_length_clip = 40
    torch.manual_seed(seed)
    return ClipCaptionModel(prefix_length, clip_length, prefix_size, num_layers, mapping, gpt2_config).eval()


def released_state_dict(model, include_gpt=True):
    """model.state_dict() in the layout of the released files (see the module docstring)."""
    current = model.state_dict()
    released = collections.OrderedDict()
    released._metadata = current._metadata
    for key, value in current.items():
        if not include_gpt and key.startswith("gpt."):
            continue
        released[key] = value
        if key.startswith("gpt.transformer.h.") and key.endswith(".ln_1.bias"):
            block = key.removesuffix("ln_1.bias")
            n = model.gpt.config.n_positions
            released[block + "attn.bias"] = torch.tril(torch.ones((n, n), dtype=torch.uint8)).view(1, 1, n, n)
            released[block + "attn.masked_bias"] = torch.tensor(-1e4)
    return released


def save_released(model, path, include_gpt=True):
    path = Path(path)
    torch.save(released_state_dict(model, include_gpt), path)
    return path


def pickle_globals(path):
    """The module.name globals that a torch.save zip's data.pkl imports (what the hub's pickle scan lists)."""
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(name for name in archive.namelist() if name.endswith("/data.pkl")))
    found, strings = set(), []
    for opcode, arg, _ in pickletools.genops(data):
        if opcode.name == "GLOBAL":
            found.add(arg.replace(" ", "."))
        elif opcode.name == "STACK_GLOBAL":
            found.add(".".join(strings[-2:]))
        if isinstance(arg, str):
            strings.append(arg)
    return found


@torch.no_grad()
def prefix_embeddings(model, clip_embedding, normalize=False):
    """(B, prefix_length, 768) from the CLIP embedding (B, prefix_size), cast to fp32 as ClipCap does."""
    prefix = clip_embedding.to(torch.float32)
    if normalize:  # transformer_inference.ipynb: prefix / prefix.norm(2, -1).item() (one image, one norm)
        prefix = prefix / prefix.norm(2, -1, keepdim=True)
    return model.clip_project(prefix).reshape(prefix.shape[0], model.prefix_length, -1)


def plant_token(model, step, token=STOP_TOKEN, strength=100.0):
    """Make the random model emit `token` as its `step`-th (0-based) generated token: that token is predicted from
    position prefix_length - 1 + step, whose residual stream the planted position embedding then dominates."""
    with torch.no_grad():
        wte, wpe = model.gpt.transformer.wte.weight, model.gpt.transformer.wpe.weight
        wpe[model.prefix_length - 1 + step] += strength * wte[token]
    return model


@torch.no_grad()
def greedy_decode(model, prefix_embed, stop_token=STOP_TOKEN, entry_length=ENTRY_LENGTH, top_p=0.8,
                  temperature=1.0):
    """ClipCap's generate2 for embed=prefix_embed (1, prefix_length, 768): the token ids it decodes, the stop token
    included when it came."""
    model.eval()
    generated, tokens = prefix_embed, None
    for _ in range(entry_length):
        logits = model.gpt(inputs_embeds=generated).logits  # the whole sequence again: no past_key_values
        logits = logits[:, -1, :] / (temperature if temperature > 0 else 1.0)
        sorted_logits, sorted_indices = torch.sort(logits, descending=True)
        cumulative_probs = torch.cumsum(nnf.softmax(sorted_logits, dim=-1), dim=-1)
        sorted_indices_to_remove = cumulative_probs > top_p
        sorted_indices_to_remove[..., 1:] = sorted_indices_to_remove[..., :-1].clone()
        sorted_indices_to_remove[..., 0] = 0  # the most likely token is never removed: argmax stays argmax
        logits[:, sorted_indices[sorted_indices_to_remove]] = -float("Inf")
        next_token = torch.argmax(logits, -1).unsqueeze(0)  # (1, 1)
        tokens = next_token if tokens is None else torch.cat((tokens, next_token), dim=1)
        generated = torch.cat((generated, model.gpt.transformer.wte(next_token)), dim=1)
        if stop_token == next_token.item():
            break
    return tokens.view(-1).tolist()


@torch.no_grad()
def beam_decode(model, prefix_embed, beam_size=5, stop_token=STOP_TOKEN, entry_length=ENTRY_LENGTH, temperature=1.0):
    """ClipCap's generate_beam for embed=prefix_embed (1, prefix_length, 768): every beam's token ids (cut at its
    length, the stop token included) with its score, sum of log-probabilities / length, best first (ClipCap's
    caption is the first)."""
    model.eval()
    device = prefix_embed.device
    tokens = scores = None
    seq_lengths = torch.ones(beam_size, device=device)
    is_stopped = torch.zeros(beam_size, device=device, dtype=torch.bool)
    generated = prefix_embed
    for _ in range(entry_length):
        logits = model.gpt(inputs_embeds=generated).logits
        logits = logits[:, -1, :] / (temperature if temperature > 0 else 1.0)
        logits = logits.softmax(-1).log()
        if scores is None:
            scores, next_tokens = logits.topk(beam_size, -1)
            generated = generated.expand(beam_size, *generated.shape[1:])
            next_tokens, scores = next_tokens.permute(1, 0), scores.squeeze(0)
            tokens = next_tokens
        else:
            logits[is_stopped] = -float("inf")
            logits[is_stopped, 0] = 0  # a finished beam may only go on with token 0, at no cost
            scores_sum = scores[:, None] + logits
            seq_lengths[~is_stopped] += 1
            scores_sum_average = scores_sum / seq_lengths[:, None]
            scores_sum_average, next_tokens = scores_sum_average.view(-1).topk(beam_size, -1)
            next_tokens_source = torch.div(next_tokens, scores_sum.shape[1], rounding_mode="floor")
            seq_lengths = seq_lengths[next_tokens_source]
            next_tokens = (next_tokens % scores_sum.shape[1]).unsqueeze(1)
            tokens = torch.cat((tokens[next_tokens_source], next_tokens), dim=1)
            generated = generated[next_tokens_source]
            scores = scores_sum_average * seq_lengths
            is_stopped = is_stopped[next_tokens_source]
        next_token_embed = model.gpt.transformer.wte(next_tokens.squeeze()).view(generated.shape[0], 1, -1)
        generated = torch.cat((generated, next_token_embed), dim=1)
        is_stopped = is_stopped | next_tokens.eq(stop_token).squeeze()
        if is_stopped.all():
            break
    scores = scores / seq_lengths
    order = scores.argsort(descending=True)
    return [(tokens[i, :int(seq_lengths[i])].tolist(), scores[i].item()) for i in order.tolist()]
