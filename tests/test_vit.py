"""vit.py: CLIP image preprocessing against transformers' CLIPImageProcessor on photo-like images of odd modes
and sizes generated here, bad image files, and the plain attention path against the SDPA path."""
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil
from transformers.image_utils import load_image

import vit

# Pillow decodes, converts and resizes (on uint8) identically on both sides; only the float rounding of the
# rescale/normalise steps could differ (transformers goes through float64, we stay in float32). Measured: 0.
PREPROCESS_TOL = 1e-5


def photo(w, h, seed=0):
    """A smooth colour gradient with sensor-like noise: resizing and JPEG behave as on a real photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    rgb = np.stack([np.sin(3 * x + 1) * 0.5 + 0.5, y, (x * y) ** 0.5], axis=-1) * 230 + 10
    rgb += rng.normal(0, 8, rgb.shape)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


def reference(image):
    return CLIPImageProcessorPil()(images=image, return_tensors="pt")["pixel_values"][0]


def check(ours, ref, what):
    diff = (ours - ref).abs().max().item()
    print(f"preprocess {what}: max |ours - CLIPImageProcessor| = {diff:.2e}")
    assert ours.shape == (3, 224, 224) and diff <= PREPROCESS_TOL, (what, diff)


def saved(image, path, **kw):
    image.save(path, **kw)
    return path


def test_preprocess_matches_clip_image_processor(tmp_path):
    """Sizes chosen so that the resized long side minus 224 is even: there Hugging Face's floor-division crop and
    openai/CLIP's rounded one (test_crop_offset_* below) start at the same pixel."""
    base = photo(517, 301)
    alpha = Image.fromarray(np.tile(np.linspace(0, 255, 517), (301, 1)).astype(np.uint8), "L")
    rgba = base.copy()
    rgba.putalpha(alpha)
    la = base.convert("L")
    la.putalpha(alpha)
    palette = base.quantize(64)
    palette.info["transparency"] = 3  # one palette entry transparent, as in GIFs and PNGs
    cases = {
        "RGB JPEG 517x301": saved(base, tmp_path / "rgb.jpg", quality=90),
        "RGB PNG portrait 223x401": saved(photo(223, 401, 1), tmp_path / "tall.png"),
        "RGB tiny 90x61 (upscaled)": saved(photo(90, 61, 2), tmp_path / "tiny.png"),
        "L JPEG": saved(base.convert("L"), tmp_path / "l.jpg"),
        "LA PNG": saved(la, tmp_path / "la.png"),
        "RGBA PNG": saved(rgba, tmp_path / "rgba.png"),
        "P PNG with transparency": saved(palette, tmp_path / "p.png"),
        "CMYK JPEG": saved(base.convert("CMYK"), tmp_path / "cmyk.jpg"),
    }
    for what, path in cases.items():
        with Image.open(path) as image:
            image.load()
            ref = reference(image)
        check(vit.preprocess(path), ref, what)
    assert Image.open(cases["P PNG with transparency"]).info.get("transparency") is not None


def test_preprocess_exif_orientation(tmp_path):
    image = photo(400, 250)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was rotated, show the picture turned 90 degrees clockwise
    path = saved(image, tmp_path / "rotated.jpg", exif=exif, quality=95)
    ours = vit.preprocess(path)
    check(ours, reference(load_image(str(path))), "EXIF-rotated JPEG (transformers load_image transposes)")
    with Image.open(path) as unrotated:
        assert (ours - reference(unrotated)).abs().max() > 0.1  # the tag really changed the picture


def test_preprocess_16_bit_equals_8_bit(tmp_path):
    """A 16-bit greyscale file of a picture gives the same input as its 8-bit version. (Pillow's own
    convert("RGB"), used by transformers and openai/CLIP, clips 16-bit values at 255 and would turn this
    photo almost white, so the 16-bit file is compared with the reference on the 8-bit picture.)"""
    grey8 = np.asarray(photo(333, 257).convert("L"))
    path16 = saved(Image.fromarray(grey8.astype(np.uint16) * 257), tmp_path / "grey16.png")
    with Image.open(path16) as image:
        assert image.mode in ("I;16", "I")
    check(vit.preprocess(path16), reference(Image.fromarray(grey8, "L")), "16-bit greyscale PNG")
    i32 = Image.fromarray(grey8.astype(np.int32) * 257, "I")
    check(vit.preprocess(i32), reference(Image.fromarray(grey8, "L")), "32-bit integer (mode I)")
    f32 = Image.fromarray(grey8.astype(np.float32), "F")
    check(vit.preprocess(f32), reference(Image.fromarray(grey8, "L")), "float (mode F, 0..255)")


def test_bad_image_files_give_one_clear_error(tmp_path):
    good = saved(photo(200, 200), tmp_path / "good.jpg")
    data = good.read_bytes()
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.jpg").write_text("not an image at all\n")
    for name in ("empty.jpg", "truncated.jpg", "text.jpg", "missing.jpg"):
        with pytest.raises(vit.ImageReadError, match=name):
            vit.preprocess(tmp_path / name)
    assert (tmp_path / "truncated.jpg").read_bytes() == data[: len(data) // 2]  # input left untouched


def test_sdpa_equals_plain_attention_and_tokens():
    torch.manual_seed(0)
    model = vit.VisionTransformer(vit.VISION_PRESETS["ViT-B/32"]).eval()
    image = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        fast, tokens = model(image, return_tokens=True)
        plain = model.set_attention(use_sdpa=False)(image)
    assert tokens.shape == (2, 50, 768) and fast.shape == (2, 512)
    diff = (fast - plain).abs().max().item()
    print(f"ViT-B/32 SDPA vs plain attention: max diff {diff:.2e}")
    assert diff < 1e-5


def test_bf16_fast_path_close_to_fp32():
    torch.manual_seed(0)
    config = vit.VisionConfig(image_resolution=64, vision_layers=2, vision_width=128, vision_patch_size=16,
                              embed_dim=32)
    model = vit.VisionTransformer(config).eval()
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        full = model(image)
        half = model.to(torch.bfloat16)(image).float()
    assert half.dtype == torch.float32 and torch.nn.functional.cosine_similarity(full, half).min() > 0.99


def test_config_read_off_shapes_and_checked_against_preset():
    with torch.device("meta"):
        model = vit.VisionTransformer(vit.VISION_PRESETS["ViT-B/16"])
    sd = {"visual." + k: v for k, v in model.state_dict().items()}
    assert vit.VisionConfig.from_state_dict(sd) == vit.VISION_PRESETS["ViT-B/16"]
    with pytest.raises(ValueError, match="vision_patch_size: checkpoint 16 != preset 32"):
        vit.VisionTransformer.from_state_dict(sd, preset="ViT-B/32")


def test_sincos_positions_are_maes_table_and_change_nothing_else():
    """sincos=True (a tower trained from scratch): rows 1.. of the positional embedding are MAE's 2-D sine-cosine
    table (facebookresearch/mae util/pos_embed.py get_2d_sincos_pos_embed, written out here in numpy); every other
    tensor, the class token's position included, is the random init the tower gets without it, and the key set (what
    checkpoints hold) is the same."""
    config = vit.VisionConfig(image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=8, embed_dim=32)
    torch.manual_seed(0)
    plain = vit.VisionTransformer(config)
    torch.manual_seed(0)
    sincos = vit.VisionTransformer(config, sincos=True)

    def one_axis(dim, positions):  # get_1d_sincos_pos_embed_from_grid
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", positions.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    grid = np.meshgrid(np.arange(4, dtype=np.float32), np.arange(4, dtype=np.float32))  # MAE: w goes first
    expected = torch.from_numpy(np.concatenate([one_axis(32, grid[0]), one_axis(32, grid[1])], axis=1)).float()
    torch.testing.assert_close(sincos.positional_embedding[1:].detach(), expected, atol=1e-6, rtol=0)
    assert plain.state_dict().keys() == sincos.state_dict().keys()
    for key, value in plain.state_dict().items():
        if key != "positional_embedding":
            assert torch.equal(sincos.state_dict()[key], value), key
    assert torch.equal(sincos.positional_embedding[0], plain.positional_embedding[0])


def test_resize_crop_and_normalize_are_preprocess(tmp_path):
    """preprocess = normalize(resize_crop(...)); an image whose short side already is the resolution is only cropped
    (no resize), and its pixels are those of the bicubic path (Pillow's resize to the same size is a copy)."""
    for image in (photo(517, 301), photo(224, 301, 1), photo(300, 224, 2), photo(224, 224, 3).convert("L")):
        pixels = vit.resize_crop(image)
        assert pixels.shape == (3, 224, 224) and pixels.dtype == torch.uint8
        assert torch.equal(vit.normalize(pixels), vit.preprocess(image))
        if 224 in image.size:
            top, left = torchvision_crop_offset(image.height), torchvision_crop_offset(image.width)
            rgb = np.asarray(image.convert("RGB"))[top:top + 224, left:left + 224]
            assert np.array_equal(pixels.permute(1, 2, 0).numpy(), rgb)
            resized = image.convert("RGB").resize(image.size, Image.BICUBIC).crop((left, top, left + 224, top + 224))
            assert np.array_equal(np.asarray(resized), rgb)


# openai/CLIP's `_transform` for a PIL image, written out from torchvision's source (torchvision is not a dependency
# here): transforms/functional.py `_compute_resized_output_size` (short side to `size`, long side
# int(size * long / short)), `resize` (returns the image untouched when it already has that size, else PIL resize
# with the filter asked), `center_crop` (int(round((side - crop) / 2.0)), Python's round: halves to even); then
# clip.py `_convert_image_to_rgb` after the crop.
def torchvision_resized_size(w, h, size=224):
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if w <= h else (new_long, new_short)


def torchvision_crop_offset(side, crop=224):
    return int(round((side - crop) / 2.0))


def openai_clip_pixels(image, size=224):
    resized = torchvision_resized_size(*image.size, size)
    if resized != image.size:
        image = image.resize(resized, Image.BICUBIC)  # Pillow: NEAREST for "P" and "1", whatever is asked
    top, left = torchvision_crop_offset(image.height, size), torchvision_crop_offset(image.width, size)
    return np.asarray(image.crop((left, top, left + size, top + size)).convert("RGB"))


def pixels(image):
    return vit.resize_crop(image).permute(1, 2, 0).numpy()


def test_crop_offset_is_torchvisions_rounding_on_every_size():
    """Images whose short side already is 224 are only cropped, so the crop offset shows directly: each column (and
    row) holds its own index. Every slack from 0 to 400 pixels, both orientations, against torchvision's rule; a
    slack of 4k + 3 (75: round(37.5) = 38) is where it differs from floor division (37)."""
    assert [torchvision_crop_offset(224 + d) for d in (73, 74, 75, 76, 77)] == [36, 37, 38, 38, 38]
    differs = 0
    for slack in range(401):
        index = np.arange(224 + slack)
        coded = np.stack([index % 256, index // 256, np.zeros_like(index)], -1).astype(np.uint8)  # (L, 3)
        wide = Image.fromarray(np.broadcast_to(coded[None], (224, 224 + slack, 3)).copy(), "RGB")
        tall = Image.fromarray(np.broadcast_to(coded[:, None], (224 + slack, 224, 3)).copy(), "RGB")
        expected = torchvision_crop_offset(224 + slack)
        for image, first in ((wide, pixels(wide)[0, 0]), (tall, pixels(tall)[0, 0])):
            assert int(first[0]) + 256 * int(first[1]) == expected, (image.size, expected)
        differs += expected != slack // 2
    assert differs == 100  # slacks 3, 7, ..., 399


def test_resized_size_is_torchvisions_on_many_sizes(monkeypatch):
    """The long side after resizing is torchvision's int(224 * long / short), float expression and all, on sizes up
    to the 50:1 aspect-ratio limit; a short side of 224 is not resized at all (torchvision returns the image)."""
    asked = []

    def spy(image, size, *args, **kwargs):
        asked.append((image.size, size))
        return Image.new("RGB", size)

    monkeypatch.setattr(Image.Image, "resize", spy)
    rng = np.random.default_rng(0)
    sizes = [(401, 300), (300, 401), (224, 1000), (1000, 224), (225, 224), (223, 224), (7, 3), (3, 7), (1, 50),
             (50, 1), (641, 427), (4032, 3024), (3024, 4032), (1920, 1080), (333, 257)]
    sizes += [tuple(int(v) for v in rng.integers(1, 2000, 2)) for _ in range(300)]
    sizes = [(w, h) for w, h in sizes if max(w, h) <= 50 * min(w, h)]
    for w, h in sizes:
        asked.clear()
        vit.resize_crop(Image.new("RGB", (w, h)))
        expected = torchvision_resized_size(w, h)
        assert asked == ([] if expected == (w, h) else [((w, h), expected)]), (w, h)


def test_rgb_and_grey_images_are_openai_clips_pixels_exactly():
    """Photo-like RGB and greyscale images, resized down and up, pixel for pixel what openai/CLIP's transform makes,
    including a 401x300 photo (crop from column 38; floor division would start at 37 and differ)."""
    for w, h, seed in ((401, 300, 0), (300, 401, 1), (517, 301, 2), (90, 61, 3), (1023, 769, 4), (224, 301, 5)):
        for image in (photo(w, h, seed), photo(w, h, seed).convert("L")):
            ours, reference = pixels(image), openai_clip_pixels(image)
            assert np.array_equal(ours, reference), (image.mode, w, h)
    wide = photo(401, 300).resize((299, 224), Image.BICUBIC)
    floor_crop = np.asarray(wide.crop((37, 0, 261, 224)))
    assert np.array_equal(pixels(photo(401, 300)), np.asarray(wide.crop((38, 0, 262, 224))))
    assert not np.array_equal(pixels(photo(401, 300)), floor_crop)


def test_palette_and_bilevel_images_are_converted_before_resizing():
    """The documented difference from openai/CLIP (vit.resize_crop's docstring): a "P" or "1" image is turned into
    RGB first and resized with the bicubic filter; openai/CLIP's order would resize the palette indices with NEAREST
    (Pillow ignores the filter for these modes), which is also checked here so the difference stays real."""
    base = photo(401, 300)
    for image in (base.quantize(64), base.convert("1")):
        converted_first = openai_clip_pixels(image.convert("RGB"))
        assert np.array_equal(pixels(image), converted_first), image.mode
        nearest = image.resize((299, 224), Image.BICUBIC)
        assert np.array_equal(np.asarray(nearest), np.asarray(image.resize((299, 224), Image.NEAREST)))
        assert not np.array_equal(openai_clip_pixels(image), converted_first), image.mode


HOSTILE = r"""
import os, struct, sys, zlib
import numpy as np
from PIL import Image
import vit

def png_header(w, h):  # a valid PNG header claiming w x h pixels, and no pixel data
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")

folder = sys.argv[1]
Image.new("L", (1, 30000)).save(f"{folder}/strip.png")  # 141 bytes; resized before cropping: 224 x 6,720,000
open(f"{folder}/bomb.png", "wb").write(png_header(20000, 20000))
open(f"{folder}/large.png", "wb").write(png_header(12000, 12000))
os.mkfifo(f"{folder}/fifo.png")
for name in ("strip.png", "bomb.png", "fifo.png", "large.png"):
    try:
        vit.preprocess(f"{folder}/{name}") if name != "large.png" else vit.open_image(f"{folder}/{name}", 1 << 20)
    except vit.ImageReadError as error:
        print(error)
def peak_mb():  # this process's peak RSS (ru_maxrss would start at the forking parent's, pytest's, on Linux)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) // 1024
base = peak_mb()
vit.preprocess(f"{folder}/grey16.png")  # written by the test: its own memory is not counted here
print("peak MB", peak_mb() - base)
"""


def test_hostile_images_one_error_and_bounded_memory(tmp_path):
    """In a child process (a hang or a 4 GB allocation cannot take the test run with it): a 1 x 30000 strip, a
    decompression bomb, a FIFO and a too-large image each give one ImageReadError before any pixel is decoded, and a
    16-bit 4000 x 4000 PNG (32 MB) is converted in bands, not through float64 copies of the whole (428 MB before)."""
    import subprocess
    import sys
    from pathlib import Path
    Image.fromarray(np.full((4000, 4000), 1000, np.uint16)).save(tmp_path / "grey16.png")
    run = subprocess.run([sys.executable, "-c", HOSTILE, str(tmp_path)], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert lines[0] == f"cannot use image {tmp_path}/strip.png: 1x30000 pixels, an aspect ratio beyond 50:1 (crop it first)"
    assert lines[1].startswith(f"cannot read image {tmp_path}/bomb.png: DecompressionBombError: Image size (400000000")
    assert lines[2] == f"cannot read image {tmp_path}/fifo.png: not a regular file"
    assert lines[3] == f"cannot use image {tmp_path}/large.png: 12000x12000 pixels, more than 1,048,576"
    peak = int(lines[4].split()[2])
    print(f"16-bit 4000 x 4000 PNG: peak {peak} MB above the imports")
    assert peak < 200 and "DecompressionBombWarning" not in run.stderr
