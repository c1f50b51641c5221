"""train.py --task caption on a tiny COCO-format set made here (the real annotations JSON layout, real JPEG files,
data.py's COCO reader) with a frozen tiny CLIP tower saved in OpenAI's layout: the loss falls, one batch can be
overfitted, a run stopped and resumed equals an uninterrupted one, two DDP processes (gloo) equal one process, the
feature cache notices changed images and weights, and --eval scores a checkpoint."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import generate
import train
import weights
import vit
from conftest import logged_losses
from vit import VisionConfig, VisionTransformer

REPO = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 235), "white": (240, 240, 240)}


def write_coco(root, split, n, seed):
    """root/annotations/captions_{split}2017.json and root/{split}2017/*.jpg: n images, two captions each."""
    rng = np.random.default_rng(seed)
    (root / f"{split}2017").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    images, annotations = [], []
    for i in range(n):
        colour = list(COLOURS)[i % len(COLOURS)]
        pixels = np.clip(np.array(COLOURS[colour]) + rng.normal(0, 10, (48, 64, 3)), 0, 255).astype(np.uint8)
        name = f"{100 + i:012d}.jpg"
        Image.fromarray(pixels).save(root / f"{split}2017" / name, quality=90)
        images.append({"id": 100 + i, "file_name": name, "height": 48, "width": 64})
        annotations += [{"id": 2 * i, "image_id": 100 + i, "caption": f"a {colour} picture."},
                        {"id": 2 * i + 1, "image_id": 100 + i, "caption": f"A photo that is all {colour}"}]
    index = {"info": {}, "licenses": [], "images": images, "annotations": annotations}
    (root / "annotations" / f"captions_{split}2017.json").write_text(json.dumps(index))


def write_tower(path, seed=0):
    torch.manual_seed(seed)
    tower = VisionTransformer(VisionConfig(image_resolution=32, vision_layers=1, vision_width=64,
                                           vision_patch_size=8, embed_dim=32))
    torch.save({f"visual.{k}": v for k, v in tower.state_dict().items()}, path)
    return tower


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    root = tmp_path_factory.mktemp("caption")
    write_coco(root / "coco", "train", 8, seed=0)
    write_coco(root / "coco", "val", 4, seed=1)
    write_tower(root / "tower.pt")
    return root


def args(fixture, out, *extra):
    return ["--data", "coco", "--data-root", str(fixture / "coco"), "--image-tower", "clip", "--clip-weights",
            str(fixture / "tower.pt"), "--language-model", "tiny", "--n-embd", "32", "--n-layer", "1", "--n-head", "2", "--prefix-length", "2",
            "--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "2", "--epochs", "3", "--eval-every", "1000",
            "--log-every", "1", "--max-caption-tokens", "12", "--device", "cpu", "--out-dir", str(out), *extra]


def test_loss_falls_resume_equals_uninterrupted_and_eval(fixture, tmp_path, capsys):
    whole, loss = train.main(args(fixture, tmp_path / "whole"))  # 16 pairs, batch 8: 6 steps
    assert logged_losses(tmp_path / "whole")[-1] < logged_losses(tmp_path / "whole")[0]
    train.main(args(fixture, tmp_path / "split", "--stop-after", "2"))
    assert weights.load_checkpoint(tmp_path / "split" / "ckpt.pt")["step"] == 2
    resumed, _ = train.main(args(fixture, tmp_path / "split", "--resume", str(tmp_path / "split" / "ckpt.pt")))
    for key, value in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, atol=1e-6, rtol=0)
    checkpoint = weights.load_checkpoint(tmp_path / "whole" / "ckpt.pt")
    assert checkpoint["step"] == 6 and checkpoint["config"]["n_embd"] == 32
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in checkpoint["model"])
    capsys.readouterr()
    metrics = train.main(["--eval", str(tmp_path / "whole" / "ckpt.pt"), "--split", "val", "--num-beams", "2",
                          "--clip-weights", str(fixture / "tower.pt"), "--data-root", str(fixture / "coco")])
    printed = capsys.readouterr().out
    assert "split: coco val, 4 images | decoding: beam search, 2 beams" in printed and "CIDEr-D" in printed
    assert set(metrics) >= {"val_loss", "BLEU-1", "BLEU-4", "CIDEr-D"}
    # generate.py captions image files, folders and globs with the checkpoint: one caption per image (its frozen
    # tower is a file the checkpoint names but does not hold: given again)
    folder, tower = fixture / "coco" / "val2017", ["--clip-weights", str(fixture / "tower.pt")]
    generate.main([str(folder), str(folder / "*101.jpg"), "--ckpt", str(tmp_path / "whole" / "ckpt.pt"), "--json",
                   "--batch-size", "3", "--device", "cpu", *tower])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["file"] for line in lines] == sorted(map(str, folder.glob("*.jpg"))) + [str(folder / f"{101:012d}.jpg")]
    assert all(isinstance(line["caption"], str) and "<|endoftext|>" not in line["caption"] for line in lines)
    assert lines[1]["caption"] == lines[-1]["caption"]  # batched or alone, the same greedy caption
    # one image file: `file<TAB>caption`; a corrupt image (0 bytes) is one clear message on stderr and is skipped,
    # the others are captioned, and the exit code says that one failed
    (tmp_path / "bad.jpg").write_bytes(b"")
    with pytest.raises(SystemExit) as exit_info:
        generate.main([str(tmp_path / "bad.jpg"), str(folder / f"{101:012d}.jpg"), "--ckpt",
                       str(tmp_path / "whole" / "ckpt.pt"), "--device", "cpu", *tower])
    out, err = capsys.readouterr()
    assert out == f"{folder / f'{101:012d}.jpg'}\t{lines[1]['caption']}\n" and exit_info.value.code == 1
    assert err.count("cannot read image") == 1 and "bad.jpg" in err and "1 of 2 images could not be read" in err
    with pytest.raises(SystemExit) as exit_info:  # images without --ckpt: an error, never a prompt for SD
        generate.main([str(folder / f"{101:012d}.jpg")])
    assert exit_info.value.code == 2 and "captions need --ckpt" in capsys.readouterr().err


def test_overfits_one_batch(fixture, tmp_path):
    train.main(args(fixture, tmp_path, "--max-train-samples", "8", "--epochs", "30", "--n-embd", "64", "--lr", "1e-2",
                    "--no-closed-vocab"))  # 8 pairs, batch 8: the same batch 30 times
    curve = logged_losses(tmp_path)
    assert curve[-1] < 0.1 * curve[0], curve


def test_feature_cache_notices_changed_images_and_weights(fixture, tmp_path, capsys):
    cache = tmp_path / "cache"
    dataset = data.coco_captions(fixture / "coco", "val")
    tower = write_tower(tmp_path / "unused.pt")
    first, skipped = data.cached_features(dataset, cache, tower)
    assert first.shape == (4, 32) and first.dtype == np.float16 and not skipped
    assert np.abs(first).min() > 0
    again, _ = data.cached_features(dataset, cache, tower)
    assert again.filename == first.filename  # the same images and weights: read back, not recomputed
    with torch.no_grad():
        tower.proj[0, 0] += 1.0
    other_weights, _ = data.cached_features(dataset, cache, tower)
    assert other_weights.filename != first.filename
    assert not np.array_equal(other_weights, first)
    image = fixture / "coco" / "val2017" / f"{101:012d}.jpg"
    saved = image.read_bytes()
    try:
        Image.new("RGB", (64, 48), (0, 0, 0)).save(image)
        other_images, _ = data.cached_features(dataset, cache, tower)
        assert other_images.filename != other_weights.filename
        assert not np.array_equal(other_images[1], other_weights[1]) and np.array_equal(other_images[0], other_weights[0])
        image.write_bytes(b"")  # a 0-byte image is reported and skipped; the rest is computed
        bad, skipped = data.cached_features(dataset, cache, tower)
        assert skipped == {"101"} and not bad[1].any() and np.array_equal(bad[0], other_weights[0])
        assert f"{101:012d}.jpg" in capsys.readouterr().err
    finally:
        image.write_bytes(saved)
        os.utime(image, ns=(os.stat(image).st_atime_ns, os.stat(image).st_mtime_ns + 10**9))


def test_cached_pixels_are_clips_crop_as_bytes(fixture):
    """The pixels cache holds vit.resize_crop's bytes: those of CLIP's preprocessing round trip (normalised, then
    back to bytes), for images already at size (only cropped), other sizes, modes and an EXIF turn."""
    mean, std = torch.tensor(vit.CLIP_MEAN).view(3, 1, 1), torch.tensor(vit.CLIP_STD).view(3, 1, 1)

    def round_trip(image, size):
        return (vit.preprocess(image, size) * std + mean).mul(255).round().byte().numpy()
    shapes = data.ShapesDataset(64, image_size=32)
    turned = shapes.load_image(1).copy()
    exif = turned.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    turned.save(fixture / "turned.jpg", exif=exif.tobytes())
    photo = Image.open(fixture / "coco" / "val2017" / f"{100:012d}.jpg")  # 64 x 48: resized, then cropped
    for image, size in [*((shapes.load_image(i), 32) for i in range(64)), (Image.open(fixture / "turned.jpg"), 32),
                        (photo, 32), (photo.convert("RGBA"), 48), (shapes.load_image(0).convert("L"), 32)]:
        got = vit.resize_crop(image, size).numpy()
        assert got.shape == (3, size, size) and got.dtype == np.uint8
        assert np.array_equal(got, round_trip(image, size))
    assert not np.array_equal(vit.resize_crop(Image.open(fixture / "turned.jpg"), 32).numpy(),
                              np.asarray(Image.open(fixture / "turned.jpg").convert("RGB")).transpose(2, 0, 1))


def test_tokens_mapper_caches_every_token_and_captions(fixture, tmp_path, capsys):
    """--mapping-type tokens with a frozen tower: the cache holds every token (N, 1 + h*w, D), row 0 the pooled
    embedding; the prefix is the tower's token count, whatever --prefix-length says; generate.py captions with it."""
    model, _ = train.main(args(fixture, tmp_path, "--mapping-type", "tokens"))
    assert logged_losses(tmp_path)[-1] < logged_losses(tmp_path)[0]
    assert model.config.prefix_length == 17 and model.clip_project.model[0].in_features == 32
    caches = {np.load(path, mmap_mode="r").shape for path in (tmp_path / "cache").glob("tokens-*.npy")}
    assert caches == {(8, 17, 32), (4, 17, 32)}  # train and val: the class token and a 4 x 4 grid, 32 wide each
    tower, pixels = write_tower(tmp_path / "again.pt"), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tower.embed_tokens(pixels)[:, 0], tower(pixels))
    capsys.readouterr()
    image = fixture / "coco" / "val2017" / f"{101:012d}.jpg"
    generate.main([str(image), "--ckpt", str(tmp_path / "ckpt.pt"), "--device", "cpu", "--clip-weights",
                   str(fixture / "tower.pt")])
    file, text = capsys.readouterr().out.rstrip("\n").split("\t")
    assert file == str(image) and "<|endoftext|>" not in text
    # a checkpoint from before the -weights flags (--image-tower FILE, --debug) reads the same
    checkpoint = weights.load_checkpoint(tmp_path / "ckpt.pt")
    config = {k: v for k, v in checkpoint["config"].items() if k not in (
        "clip_weights", "gpt2_weights", "smoke_test", "overwrite", "weights_dir", "offline", "traceback")}
    checkpoint["config"] = {**config, "image_tower": str(fixture / "tower.pt"), "debug": False}
    torch.save(checkpoint, tmp_path / "old.pt")
    generate.main([str(image), "--ckpt", str(tmp_path / "old.pt"), "--device", "cpu", "--clip-weights",
                   str(fixture / "tower.pt")])
    assert capsys.readouterr().out.rstrip("\n").split("\t") == [file, text]


def test_checkpoint_written_before_set_attention_still_captions(fixture, tmp_path, capsys):
    """Checkpoints written while GPTConfig had an `sdpa` field hold it in their gpt_config: they still load, and
    caption as the same checkpoint without it."""
    train.main(args(fixture, tmp_path, "--epochs", "1"))
    checkpoint = weights.load_checkpoint(tmp_path / "ckpt.pt")
    assert "sdpa" not in checkpoint["gpt_config"]
    checkpoint["gpt_config"]["sdpa"] = True  # what GPTConfig held before GPT.set_attention
    weights.save_checkpoint(checkpoint, tmp_path / "old.pt")
    image = fixture / "coco" / "val2017" / f"{101:012d}.jpg"
    capsys.readouterr()
    captions = []
    for ckpt in ("ckpt.pt", "old.pt"):
        generate.main([str(image), "--ckpt", str(tmp_path / ckpt), "--device", "cpu", "--clip-weights",
                       str(fixture / "tower.pt")])
        captions.append(capsys.readouterr().out.rstrip("\n").split("\t")[1])
    assert captions[0] == captions[1]


def test_ddp_two_cpu_processes_equal_one(fixture, tmp_path):
    """torchrun, 2 processes, gloo: each takes half of every batch; the result equals one process (same batches,
    gradients summed over ranks, each micro-batch divided by the whole batch's target count)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, launcher in (("two", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]),
                           ("one", [])):
        command = [sys.executable, *launcher, str(REPO / "train.py"),
                   *args(fixture, tmp_path / name, "--epochs", "1", "--grad-accum", "2", "--threads", "1")]
        run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    two, one = (weights.load_checkpoint(tmp_path / name / "ckpt.pt") for name in ("two", "one"))
    assert two["step"] == one["step"] == 2
    for key, value in one["model"].items():
        torch.testing.assert_close(two["model"][key], value, atol=1e-5, rtol=1e-4)
