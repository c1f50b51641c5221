"""generate.py's Stable Diffusion path against diffusers' pipelines, and its command line.

A tiny SD-shaped checkpoint (our UNet and VAE at small sizes, a small Hugging Face CLIPTextModel) is written in
the official single-file layout. Our pipeline reads that file; diffusers' StableDiffusionPipeline and
StableDiffusionImg2ImgPipeline get the same weights through diffusers' own single-file converter
(tests/sd_oracle.py), a Hugging Face CLIPTokenizer built from the same vocabulary, and the same per-image seeds.
Images must agree within 1e-3. The command-line tests run generate.main on that file end to end.
"""
import gzip
import hashlib
import http.server
import json
import re
import threading

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel
from transformers import CLIPTokenizer as HFCLIPTokenizer

import ddpm
import generate
import weights
from sd_oracle import (SD15_SCHEDULER_CONFIG, build, diffusers_unet, diffusers_vae, random_init_,
                       reference_scheduler, single_file_state)
from tokenizer import VOCAB_DIR, bytes_to_unicode
from unet import UNetConfig, UNetModel
from vae import PRESETS as VAE_PRESETS
from vae import AutoencoderKL, load_image

# 8 heads as SD 1.x, since the UNet loader reads every size but the head count off the tensors; text width 64
# gives one 64-wide head, as the text loader assumes
TINY_UNET = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2, 1),
                       num_heads=8, context_dim=64)
TINY_VAE = VAE_PRESETS["tiny"]  # 2x downscale: 16x16 images, 8x8 latents
TINY_TEXT = CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=1, max_position_embeddings=77, hidden_act="quick_gelu")
PROMPTS = ["a red circle above a blue square", "an astronaut riding a horse, oil painting"]
NEGATIVES = ["blurry", ""]
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.py)


def hf_clip_tokenizer(folder):
    """Hugging Face's CLIPTokenizer from vocab.json + merges.txt derived from the committed
    bpe_simple_vocab_16e6.txt.gz as openai/CLIP's SimpleTokenizer builds its vocabulary (the official HF files
    are this derivation); 77 tokens, padded with EOT, as SD 1.x's tokenizer/ folder."""
    merges = gzip.decompress((VOCAB_DIR / "bpe_simple_vocab_16e6.txt.gz").read_bytes()).decode().split("\n")
    merges = merges[1:49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), "utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")
    return HFCLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny checkpoint on disk, our pipeline loaded from it, and diffusers' models from the same state."""
    root = tmp_path_factory.mktemp("tiny_sd")
    unet, vae = build(UNetModel, TINY_UNET, seed=0), build(AutoencoderKL, TINY_VAE, seed=1)
    text = random_init_(CLIPTextModel(TINY_TEXT), seed=2).eval()
    # the SD file keeps HF's CLIPTextModel keys under text_model. (transformers 5 leaves that level out)
    text_state = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in text.state_dict().items()}
    state = single_file_state(unet, vae, text=text_state)
    path = root / "tiny-sd.safetensors"
    weights.write_safetensors({k: v.contiguous() for k, v in state.items()}, path)

    components = dict(unet=diffusers_unet(state, TINY_UNET, TINY_VAE), vae=diffusers_vae(state, TINY_VAE),
                      text_encoder=text, tokenizer=hf_clip_tokenizer(root), safety_checker=None, feature_extractor=None,
                      requires_safety_checker=False)
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    init.save(root / "init.png")
    return {"path": path, "pipe": generate.stable_diffusion(path), "components": components,
            "init": root / "init.png", "root": root}


def reference(tiny, sampler, img2img=False):
    pipeline = StableDiffusionImg2ImgPipeline if img2img else StableDiffusionPipeline
    pipe = pipeline(**tiny["components"], scheduler=reference_scheduler(sampler))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpm++2m", "ddpm"])
def test_text_to_image_equals_diffusers_pipeline(tiny, sampler):
    seeds, steps = [11, 12], 8
    pipe = reference(tiny, sampler)
    ref = pipe(PROMPTS, negative_prompt=NEGATIVES, height=16, width=16, num_inference_steps=steps,
               guidance_scale=7.5, generator=[torch.Generator().manual_seed(s) for s in seeds],
               output_type="pt").images
    ours = tiny["pipe"](PROMPTS, seeds, NEGATIVES, sampler, steps, 7.5, height=16, width=16)
    diff = (ours - ref).abs().max().item()
    print(f"text-to-image {sampler}: max |ours - diffusers| = {diff:.2e} (image std {ref.std():.2f})")
    assert ref.std() > 0.05  # a real picture, not a flat one
    assert diff < 1e-3


@pytest.mark.parametrize("sampler,strength", [("ddim", 0.6), ("euler", 0.75), ("dpm++2m", 0.5), ("ddpm", 0.9)])
def test_image_to_image_equals_diffusers_pipeline(tiny, sampler, strength):
    seeds, steps = [3, 4], 10
    pipe = reference(tiny, sampler, img2img=True)
    ref = pipe(PROMPTS, image=Image.open(tiny["init"]), negative_prompt=NEGATIVES, strength=strength,
               num_inference_steps=steps, guidance_scale=5.0,
               generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="pt").images
    ours = tiny["pipe"](PROMPTS, seeds, NEGATIVES, sampler, steps, 5.0, height=16, width=16,
                        init_image=load_image(tiny["init"]), strength=strength)
    diff = (ours - ref).abs().max().item()
    print(f"image-to-image {sampler} strength {strength}: max |ours - diffusers| = {diff:.2e}")
    assert diff < 1e-3


def test_a_seed_gives_the_same_image_in_any_batch(tiny):
    pipe = tiny["pipe"]
    together = pipe(PROMPTS, [21, 22], sampler="euler", steps=4, height=16, width=16)
    alone = pipe(PROMPTS[1:], [22], sampler="euler", steps=4, height=16, width=16)
    assert (together[1:] - alone).abs().max() < 1e-5
    assert (together[0] - together[1]).abs().max() > 1e-2


def set_attention(pipe, use_sdpa):
    """The switch of each of SD's three networks (generate.py --no-sdpa)."""
    for network in (pipe.denoiser, pipe.vae, pipe.text_encoder):
        network.set_attention(use_sdpa)


def test_plain_attention_equals_sdpa(tiny):
    pipe = tiny["pipe"]
    fast = pipe(PROMPTS[:1], [5], steps=3, height=16, width=16)
    set_attention(pipe, use_sdpa=False)
    plain = pipe(PROMPTS[:1], [5], steps=3, height=16, width=16)
    set_attention(pipe, use_sdpa=True)
    assert (fast - plain).abs().max() < 1e-4


@pytest.mark.parametrize("dtype,tolerance", [(torch.float16, 0.03), (torch.bfloat16, 0.1)])
def test_half_precision_stays_close_to_fp32(tiny, dtype, tolerance):
    """--precision fp16 / bf16: the networks run in half precision, the sampler stays in fp32."""
    half = generate.stable_diffusion(tiny["path"], dtype=dtype)
    assert next(half.denoiser.parameters()).dtype == dtype
    args = dict(prompts=PROMPTS, seeds=[5, 6], negative_prompts=NEGATIVES, sampler="dpm++2m", steps=4, height=16,
                width=16)
    diff = (half(**args) - tiny["pipe"](**args)).abs().max().item()
    print(f"{dtype}: max |half - fp32| = {diff:.3f}")
    assert diff < tolerance


# ---------------------------------------------------------------------------------------------------------------
# The command line


def read_parameters(path):
    """Parse AUTOMATIC1111's infotext back: prompt, negative prompt, and the key: value fields."""
    with Image.open(path) as image:
        text = image.text["parameters"]
    *head, last = text.split("\n")
    negative = head[1][len("Negative prompt: "):] if len(head) > 1 else ""
    fields = dict(re.findall(r"\s*([^:,]+): ([^,]+)", last))
    return head[0], negative, fields


def run(tiny, *args):
    return generate.main([*args, "--sd-weights", str(tiny["path"]), "--height", "16", "--width", "16",
                          "--sampling-steps", "2", "--device", "cpu", "--precision", "fp32"])  # vs the fp32 pipe


def test_cli_writes_pngs_with_parameters_and_a_grid(tiny, tmp_path):
    saved = run(tiny, PROMPTS[0], "--num-images", "3", "--batch-size", "2", "--seed", "40", "--sampler",
                "dpm++2m", "--negative-prompt", "low quality, text", "--guidance-scale", "6",
                "--out-dir", str(tmp_path))
    assert [p.name for p in saved] == ["00000-40.png", "00001-41.png", "00002-42.png", "grid-00000-40.png"]
    prompt, negative, fields = read_parameters(saved[1])
    assert (prompt, negative) == (PROMPTS[0], "low quality, text")
    assert fields == {"Steps": "2", "Sampler": "DPM++ 2M", "CFG scale": "6", "Seed": "41", "Size": "16x16",
                      "Model": "tiny-sd"}
    with Image.open(saved[3]) as grid:
        assert grid.size == (32, 32)
    # the file is the pipeline's image for that seed alone, whatever batch it was made in
    alone = tiny["pipe"]([PROMPTS[0]], [41], ["low quality, text"], "dpm++2m", 2, 6.0, height=16, width=16)
    pixels = np.asarray(Image.open(saved[1]), dtype=np.int16)
    assert np.abs(pixels - np.asarray(ddpm.to_pil(alone)[0], dtype=np.int16)).max() <= 1
    # a second run numbers on instead of overwriting; prompts also come from a file
    (tmp_path / "prompts.txt").write_text("a green triangle\n\n  a yellow star  \n", "utf-8")
    again = run(tiny, "--prompt-file", str(tmp_path / "prompts.txt"), "--seed", "7", "--out-dir", str(tmp_path),
                "--guidance-scale", "1")
    assert [p.name for p in again] == ["00003-7.png", "00004-8.png", "grid-00003-7.png"]
    assert read_parameters(again[1])[0] == "a yellow star"


def test_cli_image_to_image(tiny, tmp_path):
    saved = run(tiny, "a mosaic", "--init-image", str(tiny["init"]), "--strength", "0.5", "--sampler", "euler",
                "--seed", "1", "--out-dir", str(tmp_path))
    assert [p.name for p in saved] == ["00000-1.png"]
    _, negative, fields = read_parameters(saved[0])
    assert negative == "" and fields["Denoising strength"] == "0.5" and fields["Sampler"] == "Euler"


def test_cli_reads_the_ckpt_format(tiny, tmp_path):
    """The same weights as a PyTorch-Lightning style .ckpt (torch zip, tensors under 'state_dict', training
    metadata beside them), read by weights/' restricted unpickler, give the same image as the .safetensors."""
    ckpt = tmp_path / "tiny-sd.ckpt"
    state = {k: v.clone() for k, v in weights.load_state_dict(tiny["path"]).items()}
    torch.save({"state_dict": state, "global_step": 840000, "epoch": 6}, ckpt)
    args = ["a cat", "--height", "16", "--width", "16", "--sampling-steps", "2", "--seed", "3", "--device", "cpu"]
    from_ckpt = generate.main(args + ["--sd-weights", str(ckpt), "--out-dir", str(tmp_path / "a")])
    from_safetensors = generate.main(args + ["--sd-weights", str(tiny["path"]), "--out-dir", str(tmp_path / "b")])
    assert np.array_equal(np.asarray(Image.open(from_ckpt[0])), np.asarray(Image.open(from_safetensors[0])))


@pytest.mark.parametrize("flags,message", [
    (["--height", "500"], "--height must be a positive multiple of 8"),
    (["--width", "0"], "--width must be a positive multiple of 8"),
    (["--strength", "1.5"], "--strength must be in (0, 1]"),
    (["--temperature", "-1"], "--eta, --temperature, --guidance-scale, --s-noise >= 0"),  # -1: the least likely
    (["--s-noise", "nan"], "--eta, --temperature, --guidance-scale, --s-noise >= 0"),  # words first
    (["--top-p", "2"], "--top-p in [0, 1]"),
    (["--sampling-steps", "0"], "--sampling-steps, --num-images, --batch-size, --rerank and --num-beams must be"),
    (["holiday.jpg"], "no such image file: holiday.jpg"),
    (["--sampler", "ddim", "--sampling-steps", "2000"], "steps must be between 1 and 1000"),
])
def test_cli_rejects_bad_values(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["a cat", *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_cli_bad_init_image_is_one_clear_error(tiny, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(SystemExit) as exit_info:
        run(tiny, "a cat", "--init-image", str(bad), "--out-dir", str(tmp_path / "out"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.count("\n") == 1
    assert err.startswith(f"generate.py: error: --init-image: cannot read image {bad}: ")
    assert not (tmp_path / "out").exists()


def test_cli_bad_checkpoints_are_one_clear_error(tiny, tmp_path, capsys):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(tiny["path"].read_bytes()[:5000])
    not_sd = tmp_path / "gpt2-like.safetensors"
    weights.write_safetensors({"wte.weight": torch.zeros(4, 2)}, not_sd)
    for path in (truncated, not_sd):
        with pytest.raises(SystemExit) as exit_info:
            generate.main(["a cat", "--sd-weights", str(path), "--device", "cpu", "--out-dir", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert exit_info.value.code == 1 and f"{path} is not a usable Stable Diffusion 1.x checkpoint" in err
    assert not (tmp_path / "o").exists()


def test_cli_offline_without_weights_names_url_and_path(tmp_path, monkeypatch, capsys):
    for var in ("HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):  # no hub cache holds a copy either
        monkeypatch.setenv(var, str(tmp_path / "empty-cache"))
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["a cat", "--offline", "--weights-dir", str(tmp_path), "--out-dir", str(tmp_path / "o")])
    message = capsys.readouterr().err
    assert exit_info.value.code == 1 and message.startswith("generate.py: error: offline: sd15/")
    entry = weights.REGISTRY[generate.DEFAULT_WEIGHTS]
    assert entry.url in message and str(tmp_path / generate.DEFAULT_WEIGHTS) in message
    assert not (tmp_path / "sd15").exists() and not (tmp_path / "o").exists()


def test_cli_fetches_missing_weights_on_first_use(tiny, tmp_path, monkeypatch):
    """The default registry name, pointed at a local HTTP server: the first run downloads (verified), the
    second finds the file."""
    data = tiny["path"].read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1-5-pruned-emaonly.safetensors"
        monkeypatch.setitem(weights.REGISTRY, generate.DEFAULT_WEIGHTS, weights.WeightsFile(
            url, len(data), hashlib.sha256(data).hexdigest(), "safetensors"))
        for var in ("HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
            monkeypatch.setenv(var, str(tmp_path / "empty-cache"))
        args = ["a cat", "--weights-dir", str(tmp_path / "w"), "--height", "16", "--width", "16", "--sampling-steps", "2",
                "--out-dir", str(tmp_path / "out"), "--seed", "0", "--device", "cpu"]
        first = generate.main(args)
        target = tmp_path / "w" / generate.DEFAULT_WEIGHTS
        assert target.read_bytes() == data
        server.shutdown()  # the second run must not need the network
        second = generate.main(args + ["--offline"])
        assert np.array_equal(np.asarray(Image.open(first[0])), np.asarray(Image.open(second[0])))
        assert read_parameters(second[0])[2]["Model"] == "v1-5-pruned-emaonly"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_full_size_sd15_file_through_the_cli_equals_diffusers(tmp_path):
    """SD 1.5 at its real size (random weights, 1.07 B parameters, a 4.3 GB file in the official layout) through
    the command line, against diffusers' StableDiffusionPipeline on the same file. Needs ~10 GB of RAM."""
    text = random_init_(CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu")), seed=2).eval()
    text_state = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in text.state_dict().items()}
    state = single_file_state(build(UNetModel, UNetConfig(), seed=0), build(AutoencoderKL, VAE_PRESETS["sd15"], 1),
                              text=text_state)
    path = tmp_path / "v1-5-pruned-emaonly.safetensors"
    weights.write_safetensors({k: v.contiguous() for k, v in state.items()}, path)
    args = ["an astronaut riding a horse", "--negative-prompt", "blurry", "--sd-weights", str(path), "--height", "64",
            "--width", "64", "--sampling-steps", "3", "--seed", "0", "--device", "cpu", "--precision", "fp32"]
    ours = np.asarray(Image.open(generate.main(args + ["--out-dir", str(tmp_path / "out")])[0]), dtype=np.int16)
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer_dir.mkdir()
    pipe = StableDiffusionPipeline(
        unet=diffusers_unet(state), vae=diffusers_vae(state), text_encoder=text,
        tokenizer=hf_clip_tokenizer(tokenizer_dir), scheduler=DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref = pipe(args[0], negative_prompt="blurry", height=64, width=64, num_inference_steps=3,
               generator=[torch.Generator().manual_seed(0)], output_type="np").images[0]
    ref = (ref * 255).round().astype(np.int16)
    print(f"full-size SD 1.5 CLI vs diffusers: max |diff| {np.abs(ours - ref).max()} of 255")
    assert np.abs(ours - ref).max() <= 1
