"""Checkpoints written by earlier versions of train.py still work: tiny shapes checkpoints of each task, written by
commit 53c34ff (before the -weights flags; flat config only, the captioner under `captioner.`) and by commit a8e8afc
(before the models' configs were stored whole), are in tests/fixtures (gzip; the text-to-image ones without their
optimizer state). generate.py captions and draws with them, train.py --eval scores them and --resume continues the
caption one, each giving what the code that wrote them gave (recorded with that code; the tolerances cover other
CPUs' float rounding, not other results)."""
import contextlib
import gzip
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data
import generate
import train

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CAPTIONED = ["aaaaaaaaaaaaaaaaaaaaaa above above above above above above above above"] * 4  # 4 steps of training
GOLDEN = {  # recorded with the writing commit's train.py and generate.py (see the module docstring)
    "caption-53c34ff": dict(val_loss=10.75543, resumed_loss=10.731842),
    "caption-a8e8afc": dict(val_loss=10.75543, resumed_loss=10.731842),
    "diffusion-53c34ff-noopt": dict(val_loss=0.06192, means=[[76.248, 88.237, 85.657], [77.509, 86.671, 87.112]]),
    "diffusion-a8e8afc-noopt": dict(val_loss=0.06175, means=[[93.67, 82.603, 80.127], [96.274, 81.66, 81.54]]),
}


def unpack(name, folder):
    folder.mkdir()
    (folder / "ckpt.pt").write_bytes(gzip.decompress((FIXTURES / f"{name}.pt.gz").read_bytes()))
    return folder / "ckpt.pt"


def quiet(function, *args):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        result = function(*args)
    return result, out.getvalue()


@pytest.mark.parametrize("name", ["caption-53c34ff", "caption-a8e8afc"])
def test_old_captioner_captions_scores_and_resumes(name, tmp_path):
    ckpt, shapes = unpack(name, tmp_path / "run"), data.ShapesDataset(4, 32, split="test")
    images = [str(tmp_path / f"{i}.png") for i in range(4)]
    for i, path in enumerate(images):
        shapes.load_image(i).save(path)
    _, printed = quiet(generate.main, [*images, "--ckpt", str(ckpt), "--device", "cpu"])
    assert [line.split("\t") for line in printed.splitlines()] == [[p, c] for p, c in zip(images, CAPTIONED)]
    metrics, _ = quiet(train.main, ["--eval", str(ckpt), "--max-val-samples", "8"])
    assert metrics["val_loss"] == pytest.approx(GOLDEN[name]["val_loss"], rel=1e-4)
    (_, loss), printed = quiet(train.main, ["--resume", str(ckpt), "--epochs", "2", "--threads", "1"])
    assert f"resumed from {ckpt} at step 4" in printed and "trained 8 steps" in printed
    assert loss == pytest.approx(GOLDEN[name]["resumed_loss"], rel=1e-4)


@pytest.mark.parametrize("name", ["diffusion-53c34ff-noopt", "diffusion-a8e8afc-noopt"])
def test_old_text_to_image_model_draws_and_scores(name, tmp_path):
    ckpt = unpack(name, tmp_path / "run")
    files, _ = quiet(generate.main, ["a large red circle", "a small blue square left of a large green triangle",
                                     "--ckpt", str(ckpt), "--seed", "0", "--sampling-steps", "2", "--out-dir",
                                     str(tmp_path / "out"), "--precision", "fp32"])  # the golden means: fp32
    for file, means in zip(files, GOLDEN[name]["means"]):
        with Image.open(file) as image:
            assert image.size == (32, 32) and "Sampler: DDPM, CFG scale: 1.5" in image.info["parameters"]
            assert "S noise" not in image.info["parameters"]  # drawn as it was judged: the fresh noise whole
            np.testing.assert_allclose(np.asarray(image, dtype=float).mean(axis=(0, 1)), means, atol=0.05)
    metrics, _ = quiet(train.main, ["--eval", str(ckpt), "--max-val-samples", "8"])
    assert metrics["val_loss"] == pytest.approx(GOLDEN[name]["val_loss"], rel=1e-3)
    cfg, config, _ = train.parse_config(["--resume", str(ckpt)])  # trained on even odds, it resumes on them
    assert cfg.two_objects == 0.5 and train.PRESETS["diffusion"]["shapes"]["two_objects"] == 0.8
    assert config.s_noise == 1.0 and train.PRESETS["diffusion"]["shapes"]["s_noise"] == 0.7  # and is judged so
