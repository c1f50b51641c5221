"""clip.py against transformers at the official configurations, through the official file layouts.

- CLIP ViT-B/32: transformers' CLIPModel with random weights, written (1) as OpenAI's TorchScript archive
  ViT-B-32.pt (fp16 matmul weights, as openai/CLIP's convert_weights stores them), (2) as
  open_clip_model.safetensors (OpenAI key names, fp32), (3) by save_pretrained (HF layout). Our model loaded
  from each must give the same image embeddings, text embeddings and logits within 1e-4.
- SD 1.5's text encoder: transformers' CLIPTextModel at the ViT-L/14 text configuration, written under
  `cond_stage_model.transformer.` in an SD-style single file and as a standalone file: same last hidden state
  within 1e-4 for prompts from our tokenizer (pad="eot", as SD), one of them longer than 77 tokens.
"""
import dataclasses
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file
from transformers import CLIPModel, CLIPTextConfig, CLIPTextModel

import clip
import weights
from conftest import clip_vitb32_config, sd_text_encoder_shapes
from tokenizer import CLIPTokenizer
from vit import VisionTransformer

TOL = 1e-4
PROMPTS = ["a photo of a dog", "A diagram of the Transformer, drawn in red ink!", "x"]
LONG_PROMPT = " ".join(["a very long prompt about a red circle above a blue square"] * 9)  # > 77 tokens


def randomize(model, seed):
    """HF initialises LayerNorms to 1/0 and biases to 0: give them random values so that a swapped ln_1/ln_2
    or a dropped bias shows. Then round what OpenAI stores in fp16 to fp16, so all file layouts hold the
    same numbers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            if p.dim() >= 2 and not name.endswith(("token_embedding.weight", "position_embedding.weight")):
                # Linear / Conv weights and the projections: fp16 in ViT-B-32.pt
                p.copy_(p.half().float())
            if name.endswith("bias") and "norm" not in name:
                p.copy_(p.half().float())
    return model.eval()


def report(what, ours, ref):
    diff = (ours - ref).abs().max().item()
    print(f"{what}: max |ours - transformers| = {diff:.2e}")
    assert ours.shape == ref.shape and diff <= TOL, (what, diff)


def hf_to_openai_reference(hf):
    """OpenAI's ViT-B-32.pt key layout from an HF CLIPModel state dict, written from WEIGHTS.md §2.4
    (transformers' convert_clip_original_pytorch_to_hf.py), independently of clip.py's table."""
    out = {
        "visual.conv1.weight": hf["vision_model.embeddings.patch_embedding.weight"],
        "visual.class_embedding": hf["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": hf["vision_model.embeddings.position_embedding.weight"],
        "visual.proj": hf["visual_projection.weight"].t().contiguous(),
        "token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
        "text_projection": hf["text_projection.weight"].t().contiguous(),
        "logit_scale": hf["logit_scale"],
    }
    for ours, theirs in [("visual.ln_pre", "vision_model.pre_layrnorm"),
                         ("visual.ln_post", "vision_model.post_layernorm"), ("ln_final", "text_model.final_layer_norm")]:
        for kind in ("weight", "bias"):
            out[f"{ours}.{kind}"] = hf[f"{theirs}.{kind}"]
    for ours, theirs in [("visual.transformer.resblocks", "vision_model.encoder.layers"),
                         ("transformer.resblocks", "text_model.encoder.layers")]:
        for i in range(12):
            o, t = f"{ours}.{i}.", f"{theirs}.{i}."
            for kind in ("weight", "bias"):
                out[o + f"attn.in_proj_{kind}"] = torch.cat([hf[t + f"self_attn.{n}_proj.{kind}"] for n in "qkv"])
                for a, b in [("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                             ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")]:
                    out[o + f"{a}.{kind}"] = hf[t + f"{b}.{kind}"]
    return out

# --------------------------------------------------------------------- OpenAI's TorchScript archive, offline


class OpenAIBlock(nn.Module):  # openai/CLIP ResidualAttentionBlock's modules (nn.MultiheadAttention inside)
    def __init__(self, width):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, width // 64)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)), ("gelu", nn.GELU()),
                                              ("c_proj", nn.Linear(4 * width, width))]))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x):  # (T, B, C), sequence-first as openai/CLIP; the causal mask is left out here
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class OpenAITransformer(nn.Module):
    def __init__(self, width, layers):
        super().__init__()
        self.resblocks = nn.Sequential(*[OpenAIBlock(width) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class OpenAIVisual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 768, 32, 32, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(768))
        self.positional_embedding = nn.Parameter(torch.zeros(50, 768))
        self.ln_pre = nn.LayerNorm(768)
        self.transformer = OpenAITransformer(768, 12)
        self.ln_post = nn.LayerNorm(768)
        self.proj = nn.Parameter(torch.zeros(768, 512))

    def forward(self, image):
        x = self.conv1(image).flatten(2).permute(0, 2, 1)
        cls = self.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln_post(x[:, 0]) @ self.proj


class OpenAICLIP(nn.Module):
    """The module tree of openai/CLIP's model.py at ViT-B/32, plus the three TorchScript-only tensors."""

    def __init__(self):
        super().__init__()
        self.visual = OpenAIVisual()
        self.transformer = OpenAITransformer(512, 12)
        self.token_embedding = nn.Embedding(49408, 512)
        self.positional_embedding = nn.Parameter(torch.zeros(77, 512))
        self.ln_final = nn.LayerNorm(512)
        self.text_projection = nn.Parameter(torch.zeros(512, 512))
        self.logit_scale = nn.Parameter(torch.zeros([]))
        for name, value in [("input_resolution", 224), ("context_length", 77), ("vocab_size", 49408)]:
            self.register_buffer(name, torch.tensor(value))

    def forward(self, image, text):  # only so that torch.jit.script compiles the tree; the tensors matter here
        x = self.transformer((self.token_embedding(text) + self.positional_embedding).permute(1, 0, 2))
        x = self.ln_final(x.permute(1, 0, 2))
        text_features = x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection
        return self.logit_scale.exp() * self.visual(image) @ text_features.t()


def write_torchscript_archive(openai_sd, path):
    model = OpenAICLIP()
    model.load_state_dict(openai_sd, strict=False)
    for module in model.modules():  # openai/CLIP convert_weights: matmul weights to fp16
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.weight.data = module.weight.data.half()
            if module.bias is not None:
                module.bias.data = module.bias.data.half()
        if isinstance(module, nn.MultiheadAttention):
            module.in_proj_weight.data, module.in_proj_bias.data = (module.in_proj_weight.data.half(),
                                                                    module.in_proj_bias.data.half())
    model.visual.proj.data, model.text_projection.data = model.visual.proj.data.half(), model.text_projection.data.half()
    torch.jit.save(torch.jit.script(model), str(path))  # tests only: our code never runs torch.jit.load

# --------------------------------------------------------------------- CLIP ViT-B/32


@pytest.fixture(scope="module")
def vitb32(tmp_path_factory):
    torch.manual_seed(0)
    hf = randomize(CLIPModel(clip_vitb32_config()), seed=1)
    with torch.no_grad():
        hf.logit_scale.fill_(math.log(100.0))  # the trained value: logits up to +-100 make the 1e-4 bound strict
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    tokens = CLIPTokenizer.default().tokenize(PROMPTS + [LONG_PROMPT])  # OpenAI style: zero padding
    with torch.no_grad():
        out = hf(input_ids=tokens, pixel_values=images)  # get_*_features put the projections in pooler_output
    reference = {"image": out.vision_model_output.pooler_output, "text": out.text_model_output.pooler_output,
                 "logits": out.logits_per_image}
    folder = tmp_path_factory.mktemp("clip")
    hf_sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    hf.save_pretrained(folder / "hf")  # the HF layout, written by transformers itself
    del hf
    return hf_sd, images, tokens, reference, folder


def check_clip(model, vitb32, layout):
    _, images, tokens, reference, _ = vitb32
    model.eval()
    with torch.no_grad():
        report(f"{layout}: image embeddings", model.encode_image(images), reference["image"])
        report(f"{layout}: text embeddings", model.encode_text(tokens), reference["text"])
        report(f"{layout}: logits", model(images, tokens)[0], reference["logits"])


def test_vitb32_torchscript_archive(vitb32):
    hf_sd, *_, folder = vitb32
    path = folder / "ViT-B-32.pt"
    write_torchscript_archive(hf_to_openai_reference(hf_sd), path)
    raw = weights.load_state_dict(path)
    assert raw["visual.conv1.weight"].dtype == torch.float16 and raw["visual.class_embedding"].dtype == torch.float32
    assert {"input_resolution", "context_length", "vocab_size"} <= raw.keys()
    model = clip.CLIP.from_pretrained(str(path))
    assert sum(p.numel() for p in model.parameters()) == 151_277_313
    check_clip(model, vitb32, "ViT-B-32.pt (TorchScript, fp16)")


def test_vitb32_open_clip_safetensors_and_hf_layout(vitb32):
    hf_sd, *_, folder = vitb32
    path = folder / "open_clip_model.safetensors"
    save_file(hf_to_openai_reference(hf_sd), str(path))
    check_clip(clip.CLIP.from_pretrained(str(path)), vitb32, "open_clip_model.safetensors")
    model = clip.CLIP.from_pretrained(str(folder / "hf" / "model.safetensors"))
    check_clip(model, vitb32, "HF model.safetensors")
    check_clip(model.set_attention(use_sdpa=False), vitb32, "HF model.safetensors, plain attention")


def test_load_visual_reads_the_image_tower_of_every_layout(vitb32, tmp_path, monkeypatch):
    """clip.load_visual: the image tower alone, out of a file with OpenAI's key names or Hugging Face's, or by the
    preset name through REGISTRY_NAMES (its first file made to be on disk here); and CLIP under a key prefix."""
    hf_sd, images, _, reference, folder = vitb32
    name = "clip-vit-b-32/open_clip_model.safetensors"
    (tmp_path / name).parent.mkdir()
    save_file(hf_to_openai_reference(hf_sd), str(tmp_path / name))
    monkeypatch.setitem(weights.REGISTRY, name, dataclasses.replace(weights.REGISTRY[name], size=None))
    for layout, source in [("OpenAI names", tmp_path / name), ("HF layout", folder / "hf" / "model.safetensors"),
                           ("preset name", "ViT-B/32")]:
        tower = clip.load_visual(str(source), root=tmp_path, offline=True).eval()
        assert isinstance(tower, VisionTransformer) and tower.config == clip.PRESETS["ViT-B/32"].vision
        with torch.no_grad():
            report(f"load_visual, {layout}: image embeddings", tower(images), reference["image"])
    prefixed = {"clip." + k: v for k, v in hf_to_openai_reference(hf_sd).items()}
    check_clip(clip.CLIP.from_state_dict(prefixed, prefix="clip."), vitb32, "OpenAI names under prefix 'clip.'")


def test_text_pooling_at_end_of_text(vitb32):
    tokens = vitb32[2]
    eot = tokens.argmax(-1)
    assert (tokens[torch.arange(len(tokens)), eot] == 49407).all() and eot[-1] == 76  # long prompt truncated


def test_loader_names_missing_unexpected_and_misshapen_keys(vitb32):
    openai_sd = hf_to_openai_reference(vitb32[0])
    openai_sd.pop("ln_final.bias")
    openai_sd["transformer.resblocks.3.mlp.c_fc.bias"] = torch.zeros(7)
    openai_sd["visual.extra"] = torch.zeros(1)
    with pytest.raises(ValueError) as error:
        clip.CLIP.from_state_dict(openai_sd)
    message = str(error.value)
    assert "missing 1: ['ln_final.bias']" in message and "unexpected 1: ['visual.extra']" in message
    assert "transformer.resblocks.3.mlp.c_fc.bias: file (7,) != model (2048,)" in message

# --------------------------------------------------------------------- Stable Diffusion's text encoder


@pytest.fixture(scope="module")
def sd_text(tmp_path_factory):
    torch.manual_seed(3)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                            projection_dim=768)
    return randomize(CLIPTextModel(config), seed=4), tmp_path_factory.mktemp("sd")


def test_sd_text_encoder_from_single_file_and_standalone(sd_text):
    hf, folder = sd_text
    prefix = "cond_stage_model.transformer."
    # the official layout (SD files, openai/clip-vit-large-patch14) has a text_model. level that
    # transformers >= 5 dropped from CLIPTextModel: write it back
    official = {"text_model." + k: v for k, v in hf.state_dict().items()}
    sd = {prefix + k: v for k, v in official.items()}
    sd[prefix + "text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)  # int64, as in the SD file
    sd["model.diffusion_model.out.2.bias"] = torch.zeros(4)  # other networks' keys sit beside it
    sd["alphas_cumprod"] = torch.linspace(1, 0, 1000)
    save_file(sd, str(folder / "v1-5-pruned-emaonly.safetensors"))
    save_file(official, str(folder / "text_encoder.safetensors"))  # SD's text_encoder/model.safetensors

    tokens = CLIPTokenizer.default().tokenize(PROMPTS + [LONG_PROMPT], pad="eot")  # SD 1.x pads with 49407
    assert tokens.shape == (4, 77) and tokens[-1, -1] == 49407
    with torch.no_grad():
        reference = hf(input_ids=tokens).last_hidden_state
    single = weights.load_state_dict(folder / "v1-5-pruned-emaonly.safetensors")
    for what, checkpoint, kwargs in [
            ("SD single file", single, {}),
            ("standalone CLIPTextModel", weights.load_state_dict(folder / "text_encoder.safetensors"), {"prefix": ""}),
            ("transformers 5 state dict (no text_model. level)", hf.state_dict(), {"prefix": ""})]:
        model = clip.CLIPTextTransformer.from_state_dict(checkpoint, **kwargs).eval()
        with torch.no_grad():
            report(f"SD text encoder, {what}: last hidden state", model(tokens), reference)
    with torch.no_grad():
        report("SD text encoder, plain attention", model.set_attention(use_sdpa=False)(tokens), reference)
    with pytest.raises(ValueError, match="no key of the checkpoint starts with 'cond_stage_model.transformer.'"):
        clip.CLIPTextTransformer.from_state_dict({"model.diffusion_model.out.2.bias": torch.zeros(4)})


def test_sd_text_encoder_official_key_table(sd_text):
    hf, _ = sd_text
    official = {"cond_stage_model.transformer.text_model." + k: tuple(v.shape) for k, v in hf.state_dict().items()
                if not k.endswith("position_ids")}
    table = sd_text_encoder_shapes()
    assert table == official and len(table) == 196
    assert sum(math.prod(s) for s in table.values()) == 123_060_480


def test_cli_prints_label_probabilities(vitb32, tmp_path, capsys, monkeypatch):
    from PIL import Image
    image = tmp_path / "photo.png"
    Image.new("RGB", (300, 200), (200, 40, 40)).save(image)
    checkpoint = vitb32[-1] / "hf" / "model.safetensors"
    monkeypatch.setattr("sys.argv", ["clip.py", str(image), "a dog", "a cat", "--clip-weights", str(checkpoint)])
    clip.main()
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and {line.split(maxsplit=1)[1] for line in lines} == {"a dog", "a cat"}
    assert abs(sum(float(line.split("%")[0]) for line in lines) - 100) < 0.02
    monkeypatch.setattr("sys.argv", ["clip.py", str(image), "a dog", "--offline", "--weights-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="error: .*open_clip_model.safetensors"):
        clip.main()
