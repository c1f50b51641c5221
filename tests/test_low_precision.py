"""Low precision (bf16 on a CPU), on tiny configurations, against the same networks in fp32, with the tolerances of
issue 19: GPT-2's greedy tokens equal fp32's on >= 95 % of 100 prompts, CLIP embeddings at cosine >= 0.999, a
Stable Diffusion image from the same seed at PSNR >= 25 dB, a VAE decode at >= 35 dB. No timing here:
tests/bench_gpt2.py, bench_clip.py, bench_sd.py and bench_caption.py print the full-size speeds and figures.

Also: `--precision auto|fp32|bf16|fp16` resolves by one rule (vit.resolve_precision) and reads the same in every
entry point's --help; the layouts that make bf16 fast (GPT.decoding_layout, channels-last convolutions) change no
result.
"""
import copy
import importlib
import re

import pytest
import torch
import torch.nn.functional as F

import clip
import ddpm
import gpt2
import sd_oracle as so
import unet as unet_lib
import vae as vae_lib
import vit

pytestmark = pytest.mark.usefixtures("one_thread")


def psnr(image, reference):
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = ((image.float().clamp(-1, 1) - reference.float().clamp(-1, 1)) ** 2).mean()
    return (10 * torch.log10(4 / mse)).item()


# -----------------------------------------------------------------------------------------------------------
# --precision: one rule, one vocabulary


@pytest.mark.parametrize("amx, avx512_bf16, capability, expected", [
    (True, True, "AVX512", "bf16"), (False, True, "AVX512", "bf16"), (False, False, "AVX512", "fp32"),
    (True, True, "AVX2", "fp32")])  # AVX2: ATEN_CPU_CAPABILITY=avx2, an fp32-only laptop simulated
def test_auto_is_bf16_only_on_cpus_that_compute_it(monkeypatch, amx, avx512_bf16, capability, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert vit.resolve_precision("auto", "cpu") == vit.resolve_precision("auto", torch.device("cpu")) == expected
    assert vit.resolve_precision("auto", "cuda:1") == vit.resolve_precision("auto", "mps") == "fp16"
    for name in vit.PRECISIONS:
        assert vit.resolve_precision(name, "cpu") == vit.resolve_precision(name, "cuda") == name


@pytest.mark.parametrize("name, default", [("gpt2", "auto"), ("clip", "auto"), ("generate", "auto"),
                                           ("train", "fp32")])  # train.py: its presets choose auto
def test_precision_flag_reads_the_same_in_every_entry_point(name, default, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", [f"{name}.py", "--help"])
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(name).main()
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    flag = r"--precision \{auto,fp32,bf16,fp16\} " + re.escape(vit.PRECISION_HELP)
    found = re.search(flag + r"[^(]*\(default: (\w+)", text)
    assert found and found.group(1) == default


# -----------------------------------------------------------------------------------------------------------
# GPT-2: greedy decoding with the KV cache in bf16


@pytest.fixture(scope="module")
def tiny_gpt():
    torch.manual_seed(0)
    model = gpt2.GPT(gpt2.GPTConfig(n_vocab=1000, n_ctx=64, n_embd=64, n_head=4, n_layer=2)).eval()
    prompts = torch.randint(0, 1000, (100, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model, prompts, model.generate(prompts, 16, eos_token_id=None)  # (100, 16) fp32 greedy tokens


@torch.no_grad()
def test_decoding_layout_changes_no_result(tiny_gpt):
    model, prompts, expected = tiny_gpt
    fast = copy.deepcopy(model).decoding_layout()
    state, fast_state = model.state_dict(), fast.state_dict()
    assert all(torch.equal(state[k], fast_state[k]) for k in state) and state.keys() == fast_state.keys()
    assert not fast.h[0].attn.c_attn.weight.is_contiguous() and fast.h[0].attn.c_attn.weight.t().is_contiguous()
    for row in range(4):  # batch 1: every projection is a matrix-vector product (Conv1D's one-row path, lm_head's mv)
        assert torch.equal(fast.generate(prompts[row:row + 1], 16, eos_token_id=None), expected[row:row + 1])
    assert torch.equal(fast.generate(prompts, 16, eos_token_id=None), expected)


@torch.no_grad()
def test_gpt2_bf16_greedy_tokens_match_fp32(tiny_gpt):
    model, prompts, expected = tiny_gpt
    half = copy.deepcopy(model).to(torch.bfloat16).decoding_layout()
    batched = half.generate(prompts, 16, eos_token_id=None)  # the KV cache in bf16
    one_by_one = torch.cat([half.generate(p[None], 16, eos_token_id=None) for p in prompts[:20]])
    first = (batched[:, 0] == expected[:, 0]).float().mean().item()
    whole = (batched == expected).all(dim=1).float().mean().item()
    # position by position, on fp32's own continuation: the same argmax (each position judged on its own)
    logits = half(torch.cat([prompts, expected], dim=1))[:, 7:-1].float()
    teacher_forced = (logits.argmax(dim=-1) == expected).float().mean().item()
    print(f"bf16 vs fp32 greedy, 100 prompts: first token equal {first:.0%}, all 16 tokens equal {whole:.0%}, "
          f"teacher-forced tokens equal {teacher_forced:.1%}; batch 1: all 16 equal "
          f"{(one_by_one == expected[:20]).all(dim=1).float().mean():.0%} of 20")
    assert first >= 0.95 and teacher_forced >= 0.95 and whole >= 0.8
    assert (one_by_one[:, 0] == expected[:20, 0]).float().mean() >= 0.95


# -----------------------------------------------------------------------------------------------------------
# CLIP: image and text embeddings in bf16


@torch.no_grad()
def test_clip_bf16_embeddings_match_fp32():
    torch.manual_seed(0)
    config = clip.CLIPConfig(vit.VisionConfig(64, 2, 128, 16, 64), clip.TextConfig(16, 1000, 64, 2, 2))
    model = clip.CLIP(config).eval()
    images = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    tokens = torch.randint(1, 998, (8, 16), generator=torch.Generator().manual_seed(2))
    tokens[:, -1] = 999  # the end-of-text token has the largest id: the text embedding is read there
    image, text, (logits, _) = model.encode_image(images), model.encode_text(tokens), model(images, tokens)
    half = copy.deepcopy(model).to(torch.bfloat16)
    image_half, text_half, (logits_half, _) = half.encode_image(images), half.encode_text(tokens), half(images, tokens)
    assert image_half.dtype == torch.bfloat16 and logits_half.dtype == torch.float32  # similarities in fp32
    cosines = [F.cosine_similarity(a, b.float()).min().item() for a, b in ((image, image_half), (text, text_half))]
    print(f"bf16 vs fp32 CLIP embeddings: cosine >= {cosines[0]:.5f} (image), {cosines[1]:.5f} (text)")
    assert min(cosines) >= 0.999
    assert (logits_half.softmax(-1) - logits.softmax(-1)).abs().max() < 0.01


# -----------------------------------------------------------------------------------------------------------
# Stable Diffusion's UNet and VAE in bf16, channels-last as for speed


@torch.no_grad()
def test_sd_image_and_vae_decode_in_bf16_match_fp32():
    """The tiny text-to-latent UNet and VAE (random weights at O(1) activations), DDIM with guidance from the same
    seed: the sampler's state stays fp32 while the networks run in bf16 (UNetModel returns its input's dtype)."""
    unet = so.build(unet_lib.UNetModel, so.TINY_UNETS["tiny-latent"], seed=0)
    vae = so.build(vae_lib.AutoencoderKL, vae_lib.PRESETS["tiny"], seed=1)
    context, uncond = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(2)).chunk(2)
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    diffusion = ddpm.GaussianDiffusion(ddpm.PRESETS["sd15"])

    def draw(unet, vae):
        denoise = ddpm.classifier_free_guidance(unet, context, uncond, guidance_scale=7.5)
        latents = diffusion.sample(denoise, noise, "ddim", steps=10)
        assert latents.dtype == torch.float32
        return vae.decode_latents(latents)

    expected_image = draw(unet, vae)
    half = [copy.deepcopy(m).to(torch.bfloat16, memory_format=torch.channels_last) for m in (unet, vae)]
    image = draw(*half)
    assert image.dtype == torch.float32 and half[0].out[2].weight.is_contiguous(memory_format=torch.channels_last)
    sd_psnr = psnr(image, expected_image)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))  # the VAE alone, on fixed latents
    vae_psnr = psnr(half[1].decode(z), vae.decode(z))
    print(f"bf16 vs fp32: 10-step guided DDIM image PSNR {sd_psnr:.1f} dB, VAE decode PSNR {vae_psnr:.1f} dB")
    assert sd_psnr >= 25 and vae_psnr >= 35
