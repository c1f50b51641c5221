"""The pictures a run leaves, drawn with Pillow alone: the loss curve beside log.jsonl (weights.draw_log), the
tour's contact sheet (weights.contact_sheet) and sample grids that carry their prompts (ddpm.image_grid)."""
import json

import numpy as np
from PIL import Image

import ddpm
import weights
from weights.checkpoints import COLOURS, GREEN, RED

WHITE = (255, 255, 255)


def near(pixels, x, y, colour, radius=3, tolerance=40):
    """Whether a pixel within `radius` of (x, y) has about this colour (lines are antialiased by nothing, but
    rounding moves them a pixel)."""
    patch = pixels[y - radius:y + radius + 1, x - radius:x + radius + 1].astype(int)
    return bool((np.abs(patch - colour).max(-1) <= tolerance).any())


def test_loss_curve_from_a_small_log(tmp_path):
    """A log whose axes are known in advance: the training loss falls from 1 to 0.01 over steps 0-100, a straight
    line on the log scale (ticks 0.01, 0.1, 1), and drawn right climbs from 0 to 100 % (ticks 0-100). The picture is
    a whole PNG of the expected size and the curves lie where the axes put them; what is not a number, a loss of 0
    (no place on a log scale) and a half-written last line (a killed run) are left out; redrawing replaces the
    picture atomically."""
    records = [{"step": s, "loss": 10 ** (-2 * s / 100), "lr": 1e-3} for s in range(0, 101, 2)]
    records += [{"step": s, "val_loss": 10 ** (-2 * s / 100), "drawn_right_1": s / 100, "drawn_right_2": 0.2}
                for s in (20, 50, 100)]
    junk = '{"step": 7, "loss": null}\n["not a record"]\n{"step": 9, "loss": 0}\n{"step": 102, "lo'  # drawn around
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + junk)
    weights.draw_log(tmp_path)
    path = tmp_path / "loss_curve.png"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (800, 600) and image.mode == "RGB"
        pixels = np.asarray(image)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl", "loss_curve.png"]  # no temporary left
    # the loss panel spans x 70..780 and y 30..320 (3/5 of the height less 40); the scores' y 370..560
    loss_at = lambda step, decades: (round(70 + 710 * step / 100), round(30 + 290 * decades / 2))
    score_at = lambda step, value: (round(70 + 710 * step / 100), round(560 - 190 * value))
    for step in (10, 30, 70, 90):  # the training loss: one decade down every 50 steps
        assert near(pixels, *loss_at(step, 2 * step / 100), COLOURS[0]), step
    assert near(pixels, *loss_at(50, 1.0), COLOURS[1])  # the validation loss, a dot at each evaluation
    assert near(pixels, *score_at(50, 0.5), COLOURS[0]) and near(pixels, *score_at(80, 0.2), COLOURS[1])
    assert not near(pixels, *loss_at(75, 0.3), COLOURS[0], tolerance=100)  # far from every curve: background
    assert (pixels[330:350, 60:780] < 128).all(-1).any()  # the x ticks' numbers under the loss panel
    # a log with losses alone fills the picture with one panel; one without a judged figure draws no second panel
    (tmp_path / "log.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    weights.draw_log(tmp_path)
    with Image.open(path) as image:
        assert image.size == (800, 600) and (np.asarray(image)[400:550, 100:700] == WHITE).all(-1).mean() > 0.95


def drawings(n, size=32):
    """n flat-coloured drawings, each a different colour."""
    return [Image.new("RGB", (size, size), (40 * k % 256, 255 - 30 * k % 256, 100)) for k in range(n)]


def test_contact_sheet():
    """The tour's contact sheet: each drawing enlarged beside its prompt and what was read back, framed green when
    drawn right and red when not, the figures on top."""
    images, right = drawings(5), [True, False, True, True, False]
    prompts = ["a large red circle", "a small blue square left of a large green triangle"] * 2 + ["a small red cross"]
    read = ["a large red circle", "a small blue square left of a large green circle"] * 2 + ["a small red cross"]
    sheet = weights.contact_sheet(images, prompts, read, right, "drawn right: single objects 75.0 %", cols=3, scale=3)
    pixels = np.asarray(sheet)
    top = 13 + 5 + 12  # one title line
    cell_w = 96 + 24 + 28 * 13
    assert sheet.size[0] == 3 * cell_w and sheet.size[1] > top + 2 * 96
    for k, ok in enumerate(right):
        x, y = (k % 3) * cell_w + 4, top + (k // 3) * (sheet.size[1] - top) // 2
        assert tuple(pixels[y + 1, x + 1]) == (GREEN if ok else RED), k  # the frame
        assert tuple(pixels[y + 50, x + 50]) == images[k].getpixel((0, 0)), k  # the drawing, enlarged
        text = pixels[y:y + 96, x + 110:x + cell_w - 10]
        assert (text < 100).all(-1).any() and (np.abs(text.astype(int) - (GREEN if ok else RED)).max(-1)
                                                 < 30).any(), k  # words, and the verdict in its colour
    assert (pixels[:top - 6] < 100).all(-1).any()  # the title


def test_sample_grid_carries_its_prompts():
    """A sample grid with captions: each drawing enlarged (nearest neighbour) above a strip with its prompt, the
    drawings 4 white pixels apart."""
    images, prompts = drawings(6), [f"a small red circle number {k}" for k in range(6)]
    grid = ddpm.image_grid(images, 3, prompts, scale=4)
    pixels = np.asarray(grid)
    cell_h = grid.size[1] // 2
    assert grid.size[0] == 3 * 132 - 4 and cell_h > 128 + 11
    for k, image in enumerate(images):
        x, y = (k % 3) * 132, (k // 3) * cell_h
        assert (pixels[y:y + 128, x:x + 128] == image.getpixel((0, 0))).all()  # the drawing, enlarged
        assert (pixels[y + 128:y + cell_h, x:x + 128] < 100).all(-1).any()  # its caption, black on white
        assert k % 3 == 2 or (pixels[y:y + 128, x + 128:x + 132] == WHITE).all()  # the gap
    plain = ddpm.image_grid(images, 3)  # no captions: the images alone, as generate.py writes its grid
    assert plain.size == (96, 64) and plain.getpixel((40, 40)) == images[4].getpixel((0, 0))
