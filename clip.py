"""CLIP: an image tower and a text tower trained so that matching image-text pairs have similar embeddings.

Paper: Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision".
Official code: openai/CLIP `clip/model.py` (`CLIP.encode_text`, `build_model`) and `clip/clip.py` (`load`).
The image tower is vit.py's VisionTransformer; this file adds the text tower, the whole model, and loaders for:
- OpenAI's `ViT-B-32.pt` (a TorchScript archive, read by weights/' restricted reader, never torch.jit.load) and
  open_clip's `open_clip_model.safetensors`, both with OpenAI's key names, which our modules carry;
- Hugging Face's layout (`openai/clip-vit-base-patch32`), through one rule-based mapping table;
- Stable Diffusion 1.x's text encoder: the text tower of CLIP ViT-L/14, stored in HF's layout under
  `cond_stage_model.transformer.text_model.` in the SD file, or standalone as a `CLIPTextModel` file;
- the image tower alone of any of these files (`load_visual`: the captioner's frozen ViT-B/32).
It closes with scoring text against images (zero-shot classification, `similarity`; drawings read back by a
captioner, `read_back`: train.py --judge) and captions against reference captions (BLEU-1..4 and CIDEr-D, equal
to the COCO caption evaluation code: train.py's metrics).

    python clip.py photo.jpg "a dog" "a cat"      # zero-shot label probabilities
"""
import argparse
import functools
import math
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import weights
from gpt2 import Captioner
from vit import (PRECISION_HELP, PRECISIONS, VISION_PRESETS, ImageReadError, Transformer, VisionConfig,
                 VisionTransformer, preprocess, resolve_precision)

__all__ = ["TextConfig", "CLIPConfig", "PRESETS", "CLIPTextTransformer", "CLIP", "PromptTokenizer", "hf_to_openai",
           "load_clip_state_dict", "load_visual", "frozen_tower", "classify", "similarity", "read_back", "bleu",
           "cider_d", "caption_scores"]

# -----------------------------------------------------------------------------------------------------------
# Config: OpenAI's build_model names


@dataclass
class TextConfig:
    context_length: int = 77
    vocab_size: int = 49408
    transformer_width: int = 512
    transformer_heads: int = 8
    transformer_layers: int = 12

    @classmethod
    def from_state_dict(cls, sd):
        """Read the config off the tensor shapes (OpenAI names), as openai/CLIP `build_model` does."""
        vocab_size, width = sd["token_embedding.weight"].shape
        layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
        return cls(sd["positional_embedding"].shape[0], vocab_size, width, width // 64, layers)


@dataclass
class CLIPConfig:
    vision: VisionConfig
    text: TextConfig


PRESETS = {
    # 151,277,313 params (openai/CLIP notebooks/Interacting_with_CLIP.ipynb); ViT-B-32.pt
    "ViT-B/32": CLIPConfig(VISION_PRESETS["ViT-B/32"], TextConfig(77, 49408, 512, 8, 12)),
    # 427,616,513 params; its text tower alone (123,060,480 params, no text_projection) conditions SD 1.x
    "ViT-L/14": CLIPConfig(VISION_PRESETS["ViT-L/14"], TextConfig(77, 49408, 768, 12, 12)),
}
# preset -> weights.fetch names, preferred first: open_clip's safetensors holds the same weights as OpenAI's
# TorchScript archive in fp32 and with the same key names, and needs no pickle at all. The one place that says
# which files are ViT-B/32 (CLIP.from_pretrained and load_visual read it through find_weights).
REGISTRY_NAMES = {"ViT-B/32": ("clip-vit-b-32/open_clip_model.safetensors", "clip-vit-b-32/ViT-B-32.pt")}

# -----------------------------------------------------------------------------------------------------------
# The text tower and the whole model


class CLIPTextTransformer(nn.Module):
    """Token + position embeddings, a causal transformer, a final LayerNorm. Stable Diffusion takes this last
    hidden state (B, 77, C) as its cross-attention context; CLIP pools it at the end-of-text token."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config, C, T = config, config.transformer_width, config.context_length
        self.token_embedding = nn.Embedding(config.vocab_size, C)
        self.positional_embedding = nn.Parameter(torch.empty(T, C))
        self.transformer = Transformer(C, config.transformer_layers, config.transformer_heads, causal=True)
        self.ln_final = nn.LayerNorm(C)
        nn.init.normal_(self.token_embedding.weight, std=0.02)  # openai/CLIP initialize_parameters
        nn.init.normal_(self.positional_embedding, std=0.01)

    def forward(self, tokens):
        """tokens: (B, T) ids with T <= context_length. Returns the last hidden state (B, T, C) after ln_final."""
        T = tokens.shape[1]
        if T > self.positional_embedding.shape[0]:
            raise ValueError(f"{T} tokens exceed the context length {self.positional_embedding.shape[0]}; "
                             "tokenize with truncate=True")
        x = self.token_embedding(tokens) + self.positional_embedding[:T]  # (B, T, C)
        x = self.transformer(x)  # causal: token t attends to tokens <= t
        return self.ln_final(x)

    def set_attention(self, use_sdpa=True):
        """The one switch for every attention layer: fused SDPA (True) or the plain math (tested equal)."""
        self.transformer.set_attention(use_sdpa)
        return self

    @classmethod
    def from_state_dict(cls, sd, prefix="cond_stage_model.transformer.", preset="ViT-L/14"):
        """Pick the text tower out of a whole checkpoint: the keys under `prefix`, in HF's `CLIPTextModel`
        layout (`text_model.…`). The SD 1.x single file needs the default prefix; a standalone
        `CLIPTextModel` file needs prefix="". The config is read off the shapes and checked against
        PRESETS[preset].text (preset=None skips the check); `position_ids` is ignored."""
        picked = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if not picked:
            raise ValueError(f"no key of the checkpoint starts with {prefix!r}; is it a Stable Diffusion file?")
        if not any(k.startswith("text_model.") for k in picked):  # transformers >= 5 saves CLIPTextModel
            picked = {"text_model." + k: v for k, v in picked.items()}  # without its text_model. level
        picked = hf_to_openai(picked)
        config = TextConfig.from_state_dict(picked)
        if preset is not None:
            weights.check_config(config, PRESETS[preset].text, preset + " text tower")
        with torch.device("meta"):  # no memory and no random init for weights that are about to be replaced
            model = cls(config)
        picked = weights.check_state_dict(model, picked, f"CLIP text tower (prefix {prefix!r})")
        picked = {k: v.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
                  for k, v in picked.items()}
        model.load_state_dict(picked, strict=True, assign=True)
        return model


class CLIP(CLIPTextTransformer):
    """The whole CLIP model. OpenAI keeps the text tower's modules at the top level of the state dict
    (`token_embedding`, `transformer`, `ln_final`) beside `visual`, so CLIP extends the text tower rather
    than holding one, and its state_dict() is OpenAI's key set exactly."""

    def __init__(self, config: CLIPConfig):
        super().__init__(config.text)
        self.config = config
        self.visual = VisionTransformer(config.vision)
        width = config.text.transformer_width
        self.text_projection = nn.Parameter(torch.randn(width, config.vision.embed_dim) * width**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # learned temperature, paper §2.5

    def set_attention(self, use_sdpa=True):
        """The text tower's switch and the image tower's."""
        self.visual.set_attention(use_sdpa)
        return super().set_attention(use_sdpa)

    def encode_image(self, image):
        """(B, 3, 224, 224) preprocessed images -> (B, embed_dim) image embeddings."""
        return self.visual(image)

    def encode_text(self, tokens):
        """(B, T) token ids (tokenizer.CLIPTokenizer.tokenize) -> (B, embed_dim) text embeddings."""
        x = super().forward(tokens)  # (B, T, C)
        # pool at the end-of-text token: it has the largest id (49407), and argmax returns the first one
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]  # (B, C)
        return x @ self.text_projection  # (B, embed_dim)

    def forward(self, image, tokens):
        """Returns (logits_per_image (B_img, B_txt), logits_per_text): scaled cosine similarities."""
        image_features = self.encode_image(image).float()  # similarities in float32 in any precision
        text_features = self.encode_text(tokens).float()
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        text_features = text_features / text_features.norm(dim=-1, keepdim=True)
        logits_per_image = self.logit_scale.float().exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()

    @classmethod
    def from_state_dict(cls, sd, prefix="", preset="ViT-B/32"):
        """Build from the keys under `prefix` of a state dict in OpenAI's, open_clip's or Hugging Face's layout;
        the config is read off the shapes and checked against PRESETS[preset] (preset=None skips the check)."""
        sd = to_openai_layout({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
        config = CLIPConfig(VisionConfig.from_state_dict(sd), TextConfig.from_state_dict(sd))
        if preset is not None:
            weights.check_config(config.vision, PRESETS[preset].vision, preset + " image tower")
            weights.check_config(config.text, PRESETS[preset].text, preset + " text tower")
        with torch.device("meta"):
            model = cls(config)
        sd = weights.check_state_dict(model, sd, f"CLIP (prefix {prefix!r})")
        # float32 (OpenAI stores many weights in fp16) and contiguous (HF's projections arrive transposed)
        sd = {k: v.to(torch.float32, memory_format=torch.contiguous_format, copy=True) for k, v in sd.items()}
        model.load_state_dict(sd, strict=True, assign=True)
        return model

    @classmethod
    def from_pretrained(cls, name_or_path="ViT-B/32", root=None, offline=False):
        """A preset name (fetched through weights/ into `root`) or a checkpoint path (see find_weights)."""
        path, preset = find_weights(name_or_path, root, offline)
        return cls.from_state_dict(load_clip_state_dict(path), preset=preset)


class PromptTokenizer:
    """Prompts -> (B, context_length) ids for a text encoder (SD's, unet.py's), padded with end-of-text as SD pads
    them (its UNet attends to every position) and cut to the context: CLIP's BPE, or GPT-2's for kind "gpt2" (read
    on first use; copies of a model share it). `length` asks for another context (generate.py: was a prompt cut?)."""

    def __init__(self, kind, context_length):
        self.kind, self.context_length = kind, context_length

    @functools.cached_property
    def bpe(self):
        from tokenizer import CLIPTokenizer, GPT2Tokenizer  # as in main(): BPE tables read where text is made
        return GPT2Tokenizer.default() if self.kind == "gpt2" else CLIPTokenizer.default()

    def __deepcopy__(self, memo):
        return self

    def __call__(self, texts, length=None):
        length = length or self.context_length
        if self.kind != "gpt2":
            return self.bpe.tokenize(texts, length, pad="eot")
        rows = [self.bpe.encode(text)[:length - 1] for text in texts]
        return torch.tensor([row + [self.bpe.eot_token] * (length - len(row)) for row in rows])


# -----------------------------------------------------------------------------------------------------------
# Loading official weights: OpenAI's names are ours; Hugging Face's go through one table

# Hugging Face name -> OpenAI name (transformers' convert_clip_original_pytorch_to_hf.py, read backwards).
# A rule starting with "." renames a part anywhere in the key (inside every block); any other rule renames
# the start of the key. The same table read right-to-left gives tests/conftest.py's openai_to_hf.
HF_TO_OPENAI = [
    ("text_model.embeddings.token_embedding.", "token_embedding."),
    ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
    ("text_model.encoder.layers.", "transformer.resblocks."),
    ("text_model.final_layer_norm.", "ln_final."),
    ("vision_model.embeddings.patch_embedding.", "visual.conv1."),
    ("vision_model.embeddings.class_embedding", "visual.class_embedding"),
    ("vision_model.embeddings.position_embedding.weight", "visual.positional_embedding"),
    ("vision_model.pre_layrnorm.", "visual.ln_pre."),  # sic: HF's spelling
    ("vision_model.encoder.layers.", "visual.transformer.resblocks."),
    ("vision_model.post_layernorm.", "visual.ln_post."),
    ("visual_projection.weight", "visual.proj"),
    ("text_projection.weight", "text_projection"),
    (".self_attn.out_proj.", ".attn.out_proj."),
    (".layer_norm1.", ".ln_1."),
    (".layer_norm2.", ".ln_2."),
    (".mlp.fc1.", ".mlp.c_fc."),
    (".mlp.fc2.", ".mlp.c_proj."),
]
# Special cases, each named once:
# - q/k/v packing: HF keeps self_attn.{q,k,v}_proj; nn.MultiheadAttention packs them as the rows q; k; v
#   of attn.in_proj_weight / in_proj_bias.
TRANSPOSED = {"visual.proj", "text_projection"}  # HF stores nn.Linear [out, in]; OpenAI computes x @ proj
HF_IGNORED = ("position_ids",)  # HF's arange(T) buffer, found in SD files and older HF files
TORCHSCRIPT_ONLY = ("input_resolution", "context_length", "vocab_size")  # ViT-B-32.pt extras, as build_model


def rename_key(key, rules):
    for old, new in rules:
        if old.startswith("."):
            key = key.replace(old, new)
        elif key.startswith(old):
            key = new + key[len(old):]
    return key


def hf_to_openai(sd):
    """A state dict in Hugging Face's CLIP layout -> OpenAI's names. Keys that match no rule pass through."""
    out = {}
    for key, value in sd.items():
        if key.rsplit(".", 1)[-1] in HF_IGNORED:
            continue
        key = rename_key(key, HF_TO_OPENAI)
        out[key] = value.t() if key in TRANSPOSED else value
    for key in [k for k in out if ".self_attn.q_proj." in k]:
        stem, kind = key.split(".self_attn.q_proj.")  # kind: weight or bias
        parts = [f"{stem}.self_attn.{n}_proj.{kind}" for n in "qkv"]
        if all(p in out for p in parts):
            out[f"{stem}.attn.in_proj_{kind}"] = torch.cat([out.pop(p) for p in parts])
    return out


def to_openai_layout(sd):
    """Any supported CLIP state dict -> OpenAI's key names, without the TorchScript-only entries."""
    if any(k.startswith(("vision_model.", "text_model.")) for k in sd):
        sd = hf_to_openai(sd)
    return {k: v for k, v in sd.items() if k not in TORCHSCRIPT_ONLY}


def load_clip_state_dict(path):
    """Read ViT-B-32.pt (TorchScript zip), open_clip_model.safetensors or an HF CLIPModel file -> OpenAI names."""
    return to_openai_layout(weights.load_state_dict(path))


def find_weights(name_or_path, root=None, offline=False):
    """(path, preset): a preset name's file, fetched through weights/ when missing (REGISTRY_NAMES' order), or a
    checkpoint path with preset None (its config is whatever its shapes say)."""
    if name_or_path in REGISTRY_NAMES:
        return weights.fetch_first(REGISTRY_NAMES[name_or_path], root, offline), name_or_path
    return Path(name_or_path), None


def load_visual(name_or_path="ViT-B/32", root=None, offline=False):
    """The image tower alone (vit.py's VisionTransformer) of a preset name or of any CLIP file, in any layout:
    OpenAI's ViT-B-32.pt, open_clip_model.safetensors, a Hugging Face CLIPModel file, or `visual.*` keys alone.
    The text tower's tensors, if any, are read and dropped."""
    path, preset = find_weights(name_or_path, root, offline)
    return VisionTransformer.from_state_dict(load_clip_state_dict(path), preset=preset)


def frozen_tower(checkpoint, given=None, root=None, offline=False):
    """The frozen image tower that a captioner checkpoint of train.py names (frozen_tower) but does not hold, or
    None when its tower trained inside it: the file `given` again, else the registered name it names (a checkpoint
    never chooses which file to read)."""
    name = checkpoint["frozen_tower"]
    if name is not None and not given and name not in REGISTRY_NAMES:
        raise FileNotFoundError(f"the captioner's frozen image tower is the file {name}, which its checkpoint does "
                                "not hold: give it as --clip-weights")
    return None if name is None else load_visual(given or name, root, offline)

# -----------------------------------------------------------------------------------------------------------
# Zero-shot classification and image-text similarity (how well a caption fits its image, a drawing its prompt)


@torch.no_grad()
def classify(model, tokenizer, images, labels):
    """Zero-shot: (B, 3, 224, 224) images and L label strings -> (B, L) probabilities (softmax of the logits)."""
    tokens = tokenizer.tokenize(labels).to(images.device)
    logits_per_image, _ = model(images, tokens)
    return logits_per_image.softmax(dim=-1)


@torch.no_grad()
def similarity(model, tokenizer, images, texts):
    """The cosine similarity of each image (B, 3, 224, 224) with its text (B strings) in CLIP's joint space, (B,):
    how well a picture matches its prompt (generate.py --rerank keeps the best of several)."""
    tokens = tokenizer.tokenize(texts).to(images.device)
    return torch.cosine_similarity(model.encode_image(images), model.encode_text(tokens))


def prompt_scorer(name_or_path="ViT-B/32", root=None, offline=False, device="cpu"):
    """A function (PIL image, prompt) -> their similarity (a float), by the CLIP model of a preset name or file."""
    from tokenizer import CLIPTokenizer  # as in main(): the BPE tables are read only where text is scored
    model, tokenizer = CLIP.from_pretrained(name_or_path, root, offline).to(device).eval(), CLIPTokenizer.default()
    size = model.config.vision.image_resolution
    return lambda image, prompt: similarity(model, tokenizer, preprocess(image, size)[None].to(device), [prompt]).item()


@torch.no_grad()
def read_back(judge, drawings, root=None, offline=False, device="cpu", batch_size=100):
    """Drawings (B, 3, h, w) in [0, 1] read back by the captioner of checkpoint file `judge` (train.py --judge: a
    shapes captioner, rebuilt by gpt2.py with its frozen tower if it has one), as bytes at its tower's size:
    (the captions, the judge's own exact match as its checkpoint recorded it)."""
    from tokenizer import GPT2Tokenizer  # as in main(): the BPE tables are read only where text is made
    checkpoint = weights.read_checkpoint(judge, "caption")
    captioner = Captioner.from_checkpoint(checkpoint, frozen_tower(checkpoint, None, root, offline)).to(device).eval()
    size = captioner.visual.config.image_resolution
    pixels = (F.interpolate(drawings, size=(size, size), mode="bilinear", antialias=True)
              if drawings.shape[-1] != size else drawings).mul(255).round().clamp(0, 255).byte()
    read = [text for s in range(0, len(pixels), batch_size) for text in captioner.caption(
        pixels[s:s + batch_size].to(device), GPT2Tokenizer.default())]
    return read, checkpoint.get("metrics", {}).get("exact_match", math.nan)


# -----------------------------------------------------------------------------------------------------------
# Scoring captions against references: BLEU-1..4 (Papineni et al. 2002) and CIDEr-D (Vedantam et al. 2015), as the
# COCO caption evaluation (github.com/tylin/coco-caption, pip pycocoevalcap) scores them, line for line, quirks
# included: references {image_id: [caption, ...]} and hypotheses {image_id: caption}, tokenised (words joined by
# spaces). Where CLIP similarity asks how well a caption fits its image, these ask how well it matches people's.


def tokenize_caption(text):
    """COCO evaluation's PTBTokenizer (Java) approximated: lowercase, split off clitics as PTB does ("man's" ->
    "man 's", "don't" -> "do n't"), drop punctuation, keep hyphenated words and decimals whole."""
    text = re.sub(r"(?<=\w)('s|'re|'ve|'ll|'d|'m|n't)\b", r" \1", text.lower())
    return " ".join(re.findall(r"n't|'(?:s|re|ve|ll|d|m)\b|[a-z0-9]+(?:[-.'][a-z0-9]+)*", text))


def _ngram_counts(words, n=4):
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def bleu(references, hypotheses, n=4):
    """Corpus BLEU-1..n as pycocoevalcap's Bleu: clipped n-gram matches summed over the corpus, each reference
    length the one closest to its hypothesis (the shorter on a tie), brevity penalty exp(1 - r/c) on the
    corpus lengths, and 1e-15 / 1e-9 added so that no count divides by zero."""
    test_length, reference_length, guess, correct = 0, 0, [0] * n, [0] * n
    for image_id, hypothesis in hypotheses.items():
        words, lengths = hypothesis.split(), [len(reference.split()) for reference in references[image_id]]
        max_counts = Counter()
        for reference in references[image_id]:
            max_counts |= _ngram_counts(reference.split(), n)  # | keeps the larger count of each n-gram
        test_length += len(words)
        reference_length += min((abs(length - len(words)), length) for length in lengths)[1]
        for ngram, count in _ngram_counts(words, n).items():
            correct[len(ngram) - 1] += min(max_counts[ngram], count)
        for k in range(n):
            guess[k] += max(0, len(words) - k)
    scores, product = [], 1.0
    for k in range(n):  # BLEU-k is the geometric mean of the first k precisions
        product *= (correct[k] + 1e-15) / (guess[k] + 1e-9)
        scores.append(product ** (1 / (k + 1)))
    ratio = (test_length + 1e-15) / (reference_length + 1e-9)
    return [score * math.exp(1 - 1 / ratio) for score in scores] if ratio < 1 else scores


def cider_d(references, hypotheses, n=4, sigma=6.0):
    """CIDEr-D as pycocoevalcap's Cider -> (corpus score, per-image scores). tf-idf vectors of 1..n-grams (document
    frequency over the evaluated images' references); hypothesis weights clipped at the reference's; a Gaussian
    penalty on the length difference; cosines averaged over n and references, times 10. As in the reference
    code, "length" counts a caption's bigrams."""
    reference_counts = {i: [_ngram_counts(r.split(), n) for r in references[i]] for i in hypotheses}
    document_frequency = Counter(g for counts in reference_counts.values() for g in set().union(*counts))
    log_images = math.log(len(reference_counts))

    def vectors(counts):
        vec, norm = [{} for _ in range(n)], [0.0] * n
        for ngram, term_frequency in counts.items():
            weight = term_frequency * (log_images - math.log(max(1.0, document_frequency[ngram])))
            vec[len(ngram) - 1][ngram] = weight
            norm[len(ngram) - 1] += weight * weight
        return vec, [math.sqrt(x) for x in norm], sum(c for g, c in counts.items() if len(g) == 2)

    scores = []
    for image_id, hypothesis in hypotheses.items():
        vec, norm, length = vectors(_ngram_counts(hypothesis.split(), n))
        total = np.zeros(n)
        for counts in reference_counts[image_id]:
            vec_ref, norm_ref, length_ref = vectors(counts)
            for k in range(n):
                value = sum(min(w, vec_ref[k].get(g, 0.0)) * vec_ref[k].get(g, 0.0) for g, w in vec[k].items())
                value = value / (norm[k] * norm_ref[k]) if norm[k] != 0 and norm_ref[k] != 0 else value
                total[k] += value * math.exp(-((length - length_ref) ** 2) / (2 * sigma ** 2))
        scores.append(float(np.mean(total)) / len(reference_counts[image_id]) * 10.0)
    return float(np.mean(scores)), scores


def caption_scores(references, hypotheses):
    """Raw captions in, {"BLEU-1".."BLEU-4", "CIDEr-D"} out: tokenise as COCO does, then score."""
    references = {i: [tokenize_caption(r) for r in references[i]] for i in hypotheses}
    hypotheses = {i: tokenize_caption(h) for i, h in hypotheses.items()}
    scores = {f"BLEU-{k + 1}": value for k, value in enumerate(bleu(references, hypotheses))}
    scores["CIDEr-D"] = cider_d(references, hypotheses)[0]
    return scores


def main():
    parser = argparse.ArgumentParser(description="Zero-shot image classification with CLIP ViT-B/32.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("image", help="an image file (any format and mode Pillow reads)")
    parser.add_argument("labels", nargs="+", help='candidate labels, e.g. "a dog" "a cat"')
    parser.add_argument("--clip-weights", dest="weights", default="ViT-B/32",
                        help="CLIP weights: ViT-B/32 (fetched: open_clip_model.safetensors, else ViT-B-32.pt) or a "
                             "file: ViT-B-32.pt, open_clip_model.safetensors or a Hugging Face CLIPModel file")
    parser.add_argument("--weights-dir", help="where official weights live (none: $MINIMODAL_WEIGHTS, else "
                        "weights/)")
    parser.add_argument("--offline", action="store_true", help="never download; fail if the file is missing")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    parser.add_argument("--precision", choices=["auto", *PRECISIONS], default="auto", help=PRECISION_HELP)
    args = parser.parse_args()
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        parser.error(f"--device: {e}")
    precision = resolve_precision(args.precision, device)
    if args.weights not in REGISTRY_NAMES and not Path(args.weights).is_file():
        parser.error(f"--clip-weights: {args.weights} is neither a preset ({', '.join(REGISTRY_NAMES)}) nor a file")

    from tokenizer import CLIPTokenizer
    try:
        image = preprocess(args.image).unsqueeze(0).to(device)  # (1, 3, 224, 224)
        model = CLIP.from_pretrained(args.weights, root=args.weights_dir, offline=args.offline)
    except (ImageReadError, weights.WeightsUnavailable) as e:
        sys.exit(f"error: {e}")
    model.to(device, PRECISIONS[precision]).eval()
    print(f"CLIP {args.weights} on {device}, {precision}" + (" (--precision auto)" if args.precision == "auto" else ""),
          file=sys.stderr)
    probs = classify(model, CLIPTokenizer.default(), image, args.labels)[0]
    for p, label in sorted(zip(probs.tolist(), args.labels), reverse=True):
        print(f"{p:7.2%}  {label}")


if __name__ == "__main__":
    main()
