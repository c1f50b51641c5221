"""data.py: the shapes set, and the datasets read from files (fixtures made by the tests, real layouts)."""
import random

import numpy as np
import pytest

import data
from data import ShapesDataset, canonical_shapes_caption, draw_shapes, parse_shapes_caption, shapes_caption


# ----------------------------------------------------------------------------- shapes

def test_shapes_deterministic_and_seeded():
    a, b = ShapesDataset(50, image_size=24, seed=3), ShapesDataset(50, image_size=24, seed=3)
    for i in (0, 7, 49):
        (image_a, caption_a, id_a), (image_b, caption_b, id_b) = a[i], b[i]
        assert caption_a == caption_b and id_a == id_b == i
        assert image_a.tobytes() == image_b.tobytes()
    other_seed = ShapesDataset(50, image_size=24, seed=4)
    assert [a.caption(i) for i in range(50)] != [other_seed.caption(i) for i in range(50)]
    # the global random state neither matters nor changes
    state = random.getstate()
    random.seed(123)
    assert a.caption(7) == b.caption(7)
    random.seed(123)
    a.caption(7)
    assert random.random() == random.Random(123).random()
    random.setstate(state)


def test_shapes_any_image_size_same_scene():
    ds = ShapesDataset(5, seed=1)
    for size in (16, 33, 64, 100):
        image, caption, _ = ShapesDataset(5, image_size=size, seed=1)[2]
        assert image.size == (size, size) and image.mode == "RGB" and caption == ds.caption(2)


def test_shapes_captions_parse_round_trip_and_cover_the_grammar():
    ds = ShapesDataset(2000, seed=0)
    vocabulary = set(data.shapes_vocabulary())
    seen = {"relation": set(), "shape": set(), "colour": set(), "size": set(), "count": set()}
    for i in range(len(ds)):
        caption = ds.caption(i)
        scene = parse_shapes_caption(caption)
        assert scene is not None, caption
        assert shapes_caption(scene) == caption
        assert canonical_shapes_caption(caption) == caption  # the data is in canonical order
        assert set(caption.split()) <= vocabulary
        seen["relation"].add(scene["relation"])
        seen["count"].add(len(scene["objects"]))
        for obj in scene["objects"]:
            for key in ("shape", "colour", "size"):
                seen[key].add(obj[key])
    assert seen["relation"] == {None, *data.RELATIONS}
    assert seen["shape"] == set(data.SHAPES) and seen["colour"] == set(data.COLOURS)
    assert seen["size"] == set(data.SIZES) and seen["count"] == {1, 2}
    assert {len(parse_shapes_caption(ShapesDataset(100, max_objects=1).caption(i))["objects"])
            for i in range(100)} == {1}


def test_parse_rejects_text_outside_the_grammar_and_canonicalises():
    for text in ("", "a red circle", "a large red circle left of", "a huge red circle", "two large red circles",
                 "a large red circle near a small blue square", "a large red circle left of a large red"):
        assert parse_shapes_caption(text) is None, text
        assert canonical_shapes_caption(text) is None
    assert parse_shapes_caption("A large red circle.") == {
        "objects": [{"size": "large", "colour": "red", "shape": "circle"}], "relation": None}
    scene = parse_shapes_caption("a small red circle left of a large blue square")
    assert scene["relation"] == "left of" and [o["shape"] for o in scene["objects"]] == ["circle", "square"]
    # the larger object first; equal sizes: the left or upper one first
    assert canonical_shapes_caption("a small red circle left of a large blue square") == \
        "a large blue square right of a small red circle"
    assert canonical_shapes_caption("a small red circle below a small blue square") == \
        "a small blue square above a small red circle"
    assert canonical_shapes_caption("a large red circle below a small blue square") == \
        "a large red circle below a small blue square"


def _object_pixels(obj, size):
    """Where one object alone is drawn: boolean (h, w) of pixels differing from the background."""
    image = np.asarray(draw_shapes({"objects": [obj], "relation": None}, size), dtype=np.int16)
    return np.abs(image - np.array(data.BACKGROUND)).sum(-1) > 0


def test_two_object_relations_are_visibly_true():
    size = 64
    ds = ShapesDataset(300, image_size=size, seed=5, split="val")
    checked = 0
    for i in range(len(ds)):
        scene = ds.scene(i)
        if scene["relation"] is None:
            continue
        first, second = (_object_pixels(obj, size) for obj in scene["objects"])
        assert not (first & second).any(), f"objects overlap in {ds.caption(i)!r}"
        rows1, cols1 = np.nonzero(first)
        rows2, cols2 = np.nonzero(second)
        mid_rows = abs((rows1.min() + rows1.max()) - (rows2.min() + rows2.max())) / 2
        mid_cols = abs((cols1.min() + cols1.max()) - (cols2.min() + cols2.max())) / 2
        along, across = {"left of": (cols1.max() < cols2.min(), mid_rows), "right of": (cols1.min() > cols2.max(), mid_rows),
                         "above": (rows1.max() < rows2.min(), mid_cols), "below": (rows1.min() > rows2.max(), mid_cols)
                         }[scene["relation"]]
        assert along, f"relation not true in pixels: {ds.caption(i)!r}"
        # the other axis is nearly aligned: box centres within a quarter of the smaller radius (plus rounding)
        smaller_radius = min(data.SIZES[o["size"]] for o in scene["objects"]) * size
        assert across <= smaller_radius / 4 + 1.0, ds.caption(i)
        # the full drawing holds both objects (nothing drawn off the canvas)
        image = np.asarray(ds.load_image(i), dtype=np.int16)
        drawn = np.abs(image - np.array(data.BACKGROUND)).sum(-1) > 0
        assert (drawn == (first | second)).all()
        checked += 1
    assert checked > 100


def test_shapes_splits_disjoint():
    train, val = ShapesDataset(1500, image_size=64), ShapesDataset(1500, image_size=64, split="val")
    train_scenes = {repr(train.scene(i)) for i in range(len(train))}
    assert not any(repr(val.scene(i)) in train_scenes for i in range(len(val)))
    train_images = {train.load_image(i).tobytes() for i in range(300)}
    assert not any(val.load_image(i).tobytes() in train_images for i in range(300))
    with pytest.raises(ValueError, match="split"):
        ShapesDataset(10, split="test")
    with pytest.raises(IndexError):
        train.scene(1500)


def test_shapes_common_interface_and_tensor():
    ds = ShapesDataset(6, image_size=20)
    assert ds.image_ids() == list(range(6)) and len(ds) == 6
    references = ds.references()
    assert references[3] == [ds.caption(3)]
    batch = data.images_to_tensor([ds[i][0] for i in range(6)])
    assert batch.shape == (6, 3, 20, 20) and batch.dtype.is_floating_point
    assert 0.0 <= batch.min() and batch.max() <= 1.0
