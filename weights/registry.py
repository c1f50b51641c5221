"""The official files this project can fetch: where each lives, its size, its sha256, its format.

A name is "<model>/<file>" and is also the file's place under the weights directory
(`weights/gpt2/model.safetensors`). Every size and hash comes from ../shared/WEIGHTS.md (research
notes with sources: Hugging Face LFS pages, hash pins in independent projects, tiktoken's pins,
the sha256 that OpenAI puts in its CLIP URLs). None means "not published where we could check",
never a guess: the download then relies on what the server announces for that field (Hugging Face's
X-Linked-Size and LFS sha256, else the Content-Length). The official hosts were not
reachable from where this table was written, so no hash here was computed from a download.

`hf_repos` lists the Hugging Face repositories that carry the same bytes under `hf_file`, so that
a copy already in a local Hugging Face hub cache is found instead of downloaded again. `bundled`
names a copy committed in this repository (weights/vocab/), used before any download.
"""
from dataclasses import dataclass, field


@dataclass(frozen=True)
class WeightsFile:
    url: str
    size: int | None          # bytes
    sha256: str | None
    format: str               # safetensors | torch-pickle | torchscript | json | text | gzip
    hf_repos: tuple = ()      # repositories whose hub-cache snapshots may hold this file
    hf_file: str | None = None
    bundled: str | None = None  # path relative to the weights/ package, committed to git
    note: str = field(default="", compare=False)


HF = "https://huggingface.co"
GPT2_OPENAI = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main"
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
TIMM_CLIP = "timm/vit_base_patch32_clip_224.openai"
TIMM_CLIP_REVISION = "a6f597a30f7b82c51704746581f9a4e41421e878"
DRIVE = "https://drive.google.com/uc"


def _hf(repo, file, size, sha256, format, legacy_ids=(), revision="main", **extra):
    return WeightsFile(f"{HF}/{repo}/resolve/{revision}/{file}", size, sha256, format,
                       hf_repos=(repo,) + tuple(legacy_ids), hf_file=file, **extra)


REGISTRY = {
    # GPT-2 small, openai-community/gpt2 (main = 607a30d7, WEIGHTS.md §1.1). The legacy id "gpt2"
    # redirects there, and older transformers cached it as models--gpt2.
    "gpt2/model.safetensors": _hf(
        "openai-community/gpt2", "model.safetensors", 548_105_171,
        "248dfc3911869ec493c76e65bf2fcf7f615828b0254c12b473182f0f81d3a707", "safetensors", ["gpt2"],
        note="160 F32 tensors, no 'transformer.' prefix, no lm_head; header not padded to 8 bytes"),
    "gpt2/pytorch_model.bin": _hf(
        "openai-community/gpt2", "pytorch_model.bin", 548_118_077,
        "7c5d3f4b8b76583b422fcb9189ad6c89d5d97a094541ce8932dce3ecabde1421", "torch-pickle", ["gpt2"],
        note="from 2019: most likely torch's legacy (pre-zip) format"),
    "gpt2/config.json": _hf(
        "openai-community/gpt2", "config.json", 665,
        "0daed7749b4f02b8f76240d5444551d7b08712dab4d0adb8239c56ba823bb7b4", "json", ["gpt2"]),
    "gpt2/vocab.json": _hf(
        "openai-community/gpt2", "vocab.json", 1_042_301,
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783", "json", ["gpt2"],
        bundled="vocab/encoder.json", note="byte-identical to OpenAI's encoder.json"),
    "gpt2/merges.txt": _hf(
        "openai-community/gpt2", "merges.txt", 456_318,
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5", "text", ["gpt2"],
        bundled="vocab/vocab.bpe", note="byte-identical to OpenAI's vocab.bpe"),
    "gpt2/tokenizer.json": _hf(
        "openai-community/gpt2", "tokenizer.json", 1_355_256,
        "8414cab924d8b9b33013f0d221c5862f365ee9be39c5c2bfae8a5a9e970478a6", "json", ["gpt2"]),
    # OpenAI's own tokenizer pair for GPT-2, hashes pinned by tiktoken (openai_public.py gpt2()).
    "gpt2/encoder.json": WeightsFile(
        f"{GPT2_OPENAI}/encoder.json", 1_042_301,
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783", "json",
        bundled="vocab/encoder.json"),
    "gpt2/vocab.bpe": WeightsFile(
        f"{GPT2_OPENAI}/vocab.bpe", 456_318,
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5", "text",
        bundled="vocab/vocab.bpe"),

    # CLIP ViT-B/32. OpenAI's TorchScript archive: the sha256 is the URL's second-to-last segment
    # (openai/CLIP clip.py checks it the same way); fp16 matmul weights, fp32 the rest.
    "clip-vit-b-32/ViT-B-32.pt": WeightsFile(
        "https://openaipublic.azureedge.net/clip/models/"
        "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt", 353_976_522,
        "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", "torchscript",
        note="TorchScript-only buffers input_resolution, context_length, vocab_size appear in its state dict"),
    # The same weights without TorchScript, with OpenAI's key names, fp32; open_clip's source for
    # the 'openai' tag since it dropped torch.jit.load. Preferred by the CLIP loader. Size and hash
    # are third-party pins for this revision (two independent projects agree).
    "clip-vit-b-32/open_clip_model.safetensors": _hf(
        TIMM_CLIP, "open_clip_model.safetensors", 605_143_284,
        "e6d1bd7789aa45192b3bf90570a789b478bae1b74ebcce7eddd908e83a2b7c31", "safetensors",
        revision=TIMM_CLIP_REVISION),
    # Hugging Face's conversion (vision_model.* / text_model.* names). main has no safetensors; a
    # third party fetches model.safetensors from the refs/pr/15 branch (single source).
    "clip-vit-b-32/hf/pytorch_model.bin": _hf(
        "openai/clip-vit-base-patch32", "pytorch_model.bin", None,
        "a63082132ba4f97a80bea76823f544493bffa8082296d62d71581a4feff1576f", "torch-pickle",
        note="size published only as '605 MB'"),
    "clip-vit-b-32/hf/model.safetensors": _hf(
        "openai/clip-vit-base-patch32", "model.safetensors", 605_157_884,
        "99d28a652e6ec46629ab7047a0ac82c69b1fe11e0ce672c43af65d3a9a3fc05d", "safetensors",
        revision="refs%2Fpr%2F15"),
    "clip-vit-b-32/hf/vocab.json": _hf(
        "openai/clip-vit-base-patch32", "vocab.json", 862_328,
        "5047b556ce86ccaf6aa22b3ffccfc52d391ea4accdab9c2f2407da5b742d4363", "json"),
    "clip-vit-b-32/hf/merges.txt": _hf(
        "openai/clip-vit-base-patch32", "merges.txt", 524_657,
        "f526393189112391ce6f9795d4695f704121ce452c3aad1f5335cc41337eba85", "text"),
    "clip/bpe_simple_vocab_16e6.txt.gz": WeightsFile(
        "https://raw.githubusercontent.com/openai/CLIP/main/clip/bpe_simple_vocab_16e6.txt.gz", 1_356_917,
        "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a", "gzip",
        bundled="vocab/bpe_simple_vocab_16e6.txt.gz"),
    # CLIP ViT-L/14 tokenizer files, the ones Stable Diffusion 1.x uses (same vocabulary as above).
    "clip-vit-l-14/vocab.json": _hf(
        "openai/clip-vit-large-patch14", "vocab.json", 961_143,
        "3f0c4f7d2086b61b38487075278ea9ed04edb53a03cbb045b86c27190fa8fb69", "json"),
    "clip-vit-l-14/merges.txt": _hf(
        "openai/clip-vit-large-patch14", "merges.txt", 524_619,
        "9fd691f7c8039210e0fced15865466c65820d09b63988b0174bfe25de299051a", "text"),

    # Stable Diffusion 1.5. runwayml/stable-diffusion-v1-5 was deleted in 2024; this mirror is the
    # one diffusers maps "v1" to. Whether it needs a login was not checked (set HF_TOKEN if so).
    "sd15/v1-5-pruned-emaonly.safetensors": _hf(
        SD15, "v1-5-pruned-emaonly.safetensors", 4_265_146_304,
        "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa", "safetensors",
        ["runwayml/stable-diffusion-v1-5", "Comfy-Org/stable-diffusion-v1-5-archive"]),
    "sd15/v1-5-pruned-emaonly.ckpt": _hf(
        SD15, "v1-5-pruned-emaonly.ckpt", 4_265_380_512,
        "cc6cb27103417325ff94f52b7a5d2dde45a7515b25c255d8e396c90014281516", "torch-pickle",
        ["runwayml/stable-diffusion-v1-5"],
        note="torch zip; weights under 'state_dict'; holds PyTorch Lightning callback objects"),

    # ClipCap's released captioners (rmokady/CLIP_prefix_caption: README "Pre-trained Weights for the official
    # paper", predict.py, the inference notebooks; WEIGHTS.md §6): CLIP ViT-B/32 embedding -> MLP mapper -> 10
    # prefix vectors -> GPT-2 small fine-tuned with it. Google Drive ids from the README and the notebook; the
    # `confirm=t` form skips the page Drive serves instead of a large file ("can't scan this file for viruses").
    # No sha256 is published anywhere, so none is registered (the download prints the one it got). No exact size
    # either: the Hugging Face mirrors (akhaliq/CLIP-prefix-captioning-COCO-weights and -conceptual-weights,
    # OpenShape/clipcap-cc, Manbehindthemadness/conceptual_coco) show "636 MB" each, which is the tensors'
    # 636,217,392 bytes plus torch's zip records; the download is then bounded by Drive's Content-Length.
    # ClipCap's third file, the COCO transformer mapper (1GYPToCqFREwi285wPLhuVExlz7DDUDfJ), is not here: it maps
    # CLIP RN50x4's 640-d features (transformer_inference.ipynb loads "RN50x4", prefix_size=640), a tower this
    # project does not have.
    "clipcap/coco_weights.pt": WeightsFile(
        f"{DRIVE}?id=1IdaBtMSvtyzF0ByVaBHtvM0JYSXRExRX&export=download&confirm=t", None, None, "torch-pickle",
        note="COCO, MLP mapper + fine-tuned GPT-2; torch zip of ClipCaptionModel.state_dict(): gpt.* (transformers "
             "2021 layout, attn.bias/attn.masked_bias buffers, lm_head tied) and clip_project.model.{0,2}"),
    "clipcap/conceptual_weights.pt": WeightsFile(
        f"{DRIVE}?id=14pXWwB4Zm82rsDdvbGguLfx9F8aM7ovT&export=download&confirm=t", None, None, "torch-pickle",
        note="Conceptual Captions, MLP mapper + fine-tuned GPT-2; same layout as clipcap/coco_weights.pt"),
}

# GPT-2 medium / large / xl: the same file layout as gpt2, each at a pinned revision so that its
# hashes stay true whatever main becomes. Sources (looked up 2026; the hub itself was not reachable):
# - LFS sha256 from the hub's own file pages ("Git LFS Details"): medium model.safetensors (refs/pr/5 and
#   refs/pr/8, commit 425b0cc), large model.safetensors (main, commit 212095d) and pytorch_model.bin (main,
#   7c42711), xl model.safetensors (refs/pr/5, refs/pr/9) and pytorch_model.bin (blob at e5f9794c);
# - independent pins agreeing with them: a manifest of medium at 6dcaa7a9 (size and sha256 of every file),
#   a Nix fetch of large at 212095d5 (pytorch_model.bin, config.json, vocab.json, merges.txt), several
#   experiment pins of xl at 15ea56de (model.safetensors);
# - medium pytorch_model.bin: only copies outside openai-community carry 98c7b055 (d-matrix/gpt2-medium,
#   whose gpt2 and gpt2-large copies equal the official hashes; a duplicate of arif-butt/gpt2-medium; one
#   experiment pin) [3rd-party];
# - vocab.json and merges.txt of all three are byte-identical to gpt2's (same sha256 in the manifest, the
#   Nix pin and an xl fingerprint), hence gpt2's sizes and the bundled copies.
# The hub pages give other sizes only rounded ("3.25 GB"), so those stay None: the download is then bounded
# by the hub's X-Linked-Size and checked against the sha256 here (and the hub's X-Linked-Etag).
GPT2_SIZES = {  # size -> (revision, {file: (bytes, sha256)})
    "gpt2-medium": ("6dcaa7a952f72f9298047fd5137cd6e4f05f41da", {
        "model.safetensors": (1_519_984_962, "fc5a354a19255ad494f3d71549390baca1ccf61d1d822b9408971705c687c9cd"),
        "pytorch_model.bin": (None, "98c7b0558df2c732799e509a8157d392251b3a6b06e2c72eefb3a00eb10f8318"),
        "config.json": (718, "ef1a44d889ad1a0acc7731c78134f1b87d2d222f110e97dd10fd4117331caf22")}),
    "gpt2-large": ("212095d5832abbf9926672e1c1e8d14312a3be20", {
        "model.safetensors": (None, "5f47f3e12f91cd33b662ce7e433b6150ad5512b5884a2cee961b50e9c3bbebce"),
        "pytorch_model.bin": (None, "8d3ade6b55ac440e926112267b9ec784097437c7300544b8beec562a411428ec"),
        "config.json": (None, "7fccdcfd6622055342a734c663ee0b61ff4fd697f42467595df0bf4448c8c170")}),
    "gpt2-xl": ("15ea56dee5df4983c59b2538573817e1667135e2", {
        "model.safetensors": (None, "0f8b28eb05a8075f48b61b6f35332978c74fc7763fa9fb4051a1c30511736a6a"),
        "pytorch_model.bin": (None, "cd2a29e31040ef64d9362cb96801969c9f67b9e0bdbd6e00b9dda57cdbe17435"),
        "config.json": (None, None)}),  # an xl config.json sha256 was found only for an unknown revision
}
for _size, (_revision, _files) in GPT2_SIZES.items():
    for _file, _format in (("model.safetensors", "safetensors"), ("pytorch_model.bin", "torch-pickle"),
                           ("config.json", "json")):
        REGISTRY[f"{_size}/{_file}"] = _hf(f"openai-community/{_size}", _file, *_files[_file], _format, [_size],
                                           revision=_revision)
    for _file, _same in (("vocab.json", "gpt2/vocab.json"), ("merges.txt", "gpt2/merges.txt")):
        _gpt2 = REGISTRY[_same]
        REGISTRY[f"{_size}/{_file}"] = _hf(f"openai-community/{_size}", _file, _gpt2.size, _gpt2.sha256,
                                           _gpt2.format, [_size], revision=_revision, bundled=_gpt2.bundled)
