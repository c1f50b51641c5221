"""Datasets of (image, caption) pairs, and the metrics captions are scored with.

Every dataset here speaks one small interface, so train.py and generate.py never care where pairs come from:
`ds[i] -> (image, caption, image_id)` with `image` an RGB PIL image, `ds.image_ids()` lists the distinct
images (the CLIP feature cache is built over these), `ds.load_image(image_id)` opens one, and
`ds.references()` maps each image to all of its captions (for BLEU and CIDEr).

1. shapes: a synthetic, deterministic, offline set drawn on the fly ("a small red circle left of a large
   blue square"), the measuring stick of the offline tour.
2. Files on disk: COCO captions 2017 (Chen et al. 2015, https://cocodataset.org), Karpathy's splits
   (`dataset_coco.json`), the `descriptions.txt` layout of the Flickr8k tutorials, and any folder of
   images with a captions file. CIFAR-100 (Krizhevsky 2009) with "a photo of a {class}" captions.
3. Scoring captions: BLEU-1..4 (Papineni et al. 2002) and CIDEr-D (Vedantam et al. 2015), equal to the
   scorers of the COCO caption evaluation code (github.com/tylin/coco-caption, pip `pycocoevalcap`).
"""
import math
import random

import numpy as np
import torch
from PIL import Image

# -----------------------------------------------------------------------------
# 1. shapes
# A scene is a dict: {"objects": [{"size", "colour", "shape", "x", "y"}, ...], "relation": None or one of
# RELATIONS}. x and y are the object's centre as fractions of the image side (y grows downwards), so one
# scene draws at any image size. The caption names the objects in the order of "objects".

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {  # saturated and far apart in RGB so that 8 pixels are enough to tell them apart
    "red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 235), "yellow": (235, 215, 40),
    "purple": (150, 60, 210), "orange": (245, 140, 20), "white": (240, 240, 240),
}
SIZES = {"small": 0.12, "large": 0.2}  # the object's radius as a fraction of the image side
RELATIONS = ("left of", "right of", "above", "below")
BACKGROUND = (16, 16, 20)
MARGIN, GAP = 0.03, 0.06  # free border around the image and least free space between two objects


def shapes_vocabulary():
    """Every word a shapes caption can use, sorted."""
    words = {"a", "of"} | set(SIZES) | set(COLOURS) | set(SHAPES)
    words |= {word for relation in RELATIONS for word in relation.split()}
    return sorted(words)


def shapes_caption(scene):
    """The caption of a scene: "a large red circle" or "a small blue square left of a large green triangle"."""
    names = [f"a {o['size']} {o['colour']} {o['shape']}" for o in scene["objects"]]
    return names[0] if len(names) == 1 else f"{names[0]} {scene['relation']} {names[1]}"


def parse_shapes_caption(caption):
    """A caption of the shapes grammar -> {"objects": [{"size", "colour", "shape"}, ...], "relation"}.

    Returns None for text outside the grammar, so a generated caption that is not a caption simply scores
    as wrong. Accepts every relation, whether or not the dataset's canonical order would have used it."""
    words = caption.strip().lower().rstrip(".").split()
    relation = None
    for candidate in RELATIONS:  # the relation sits in the middle: 4 words, relation, 4 words
        if " ".join(words[4:4 + len(candidate.split())]) == candidate:
            relation = candidate
    parts = [words] if relation is None else [words[:4], words[4 + len(relation.split()):]]
    objects = []
    for part in parts:
        if len(part) != 4 or part[0] != "a" or part[1] not in SIZES or part[2] not in COLOURS \
                or part[3] not in SHAPES:
            return None
        objects.append({"size": part[1], "colour": part[2], "shape": part[3]})
    return {"objects": objects, "relation": relation}


INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def canonical_shapes_caption(caption):
    """Rewrite any caption of the grammar in the dataset's canonical order (None outside the grammar).

    One picture must have one caption, or exact match means nothing: "A left of B" and "B right of A" are
    the same picture. The rule: the larger object is named first; for two of one size, the left (or upper)
    one, so ties use only "left of" and "above". Two captions describe the same picture if and only if
    their canonical forms are equal."""
    scene = parse_shapes_caption(caption)
    if scene is None:
        return None
    if scene["relation"] is not None:
        first, second = scene["objects"]
        swap = (first["size"], second["size"]) == ("small", "large") or \
            (first["size"] == second["size"] and scene["relation"] in ("right of", "below"))
        if swap:
            scene = {"objects": [second, first], "relation": INVERSE[scene["relation"]]}
    return shapes_caption(scene)


def place_shapes(scene, rng):
    """Give every object of a scene a centre (x, y) that makes its relation visibly true; returns the scene.

    Two objects never overlap (GAP between their bounding boxes) and lie on one axis: for "left of" the
    first object's box ends left of the second's, and their centres differ vertically by at most a quarter
    of the smaller radius, so neither "above" nor "below" could also be said."""
    objects = scene["objects"]
    radii = [SIZES[o["size"]] for o in objects]
    if len(objects) == 1:
        objects[0]["x"], objects[0]["y"] = (rng.uniform(MARGIN + radii[0], 1 - MARGIN - radii[0])
                                           for _ in range(2))
        return scene
    # place along the axis as "first left of second", then mirror / transpose for the other relations
    r1, r2 = radii
    along1 = rng.uniform(MARGIN + r1, 1 - MARGIN - r2 - (r1 + r2 + GAP))
    along2 = rng.uniform(along1 + r1 + r2 + GAP, 1 - MARGIN - r2)
    r_max, jitter = max(r1, r2), min(r1, r2) / 8
    across = rng.uniform(MARGIN + r_max + jitter, 1 - MARGIN - r_max - jitter)
    across1, across2 = across + rng.uniform(-jitter, jitter), across + rng.uniform(-jitter, jitter)
    if scene["relation"] in ("right of", "below"):
        along1, along2 = 1 - along1, 1 - along2
    if scene["relation"] in ("left of", "right of"):
        (objects[0]["x"], objects[0]["y"]), (objects[1]["x"], objects[1]["y"]) = (along1, across1), (along2, across2)
    else:
        (objects[0]["x"], objects[0]["y"]), (objects[1]["x"], objects[1]["y"]) = (across1, along1), (across2, along2)
    return scene


def sample_shapes_scene(rng, max_objects=2):
    """A random scene with positions, its objects already in the canonical caption order."""
    def sample_object():
        return {"size": rng.choice(list(SIZES)), "colour": rng.choice(list(COLOURS)), "shape": rng.choice(SHAPES)}
    if max_objects == 1 or rng.random() < 0.5:
        return place_shapes({"objects": [sample_object()], "relation": None}, rng)
    scene = place_shapes({"objects": [sample_object(), sample_object()],
                          "relation": rng.choice(("left of", "above"))}, rng)
    canonical = parse_shapes_caption(canonical_shapes_caption(shapes_caption(scene)))
    if canonical["relation"] != scene["relation"]:  # the rule names the other object first
        scene = {"objects": scene["objects"][::-1], "relation": canonical["relation"]}
    return scene


def _shape_mask(shape, dx, dy, radius):
    """Which sample points (offsets dx, dy from the centre, in pixels) lie inside the shape."""
    if shape == "circle":
        return dx * dx + dy * dy <= radius * radius
    if shape == "square":  # half-side 0.85 r: about the area of the circle
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * radius
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= radius
    if shape == "triangle":  # apex up at -0.9 r, flat base at +0.9 r, base half-width r: centred in its box
        return (dy <= 0.9 * radius) & (np.abs(dx) <= (dy + 0.9 * radius) / 1.8)
    if shape == "cross":  # a plus sign with arms a third of the radius thick
        arm = 0.36 * radius
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= radius)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= radius))
    raise ValueError(f"unknown shape {shape!r}, expected one of {SHAPES}")


def draw_shapes(scene, image_size=32, supersample=4):
    """Rasterise a placed scene into an RGB PIL image of image_size x image_size.

    Anti-aliased: each pixel's coverage is the fraction of its supersample x supersample sub-pixel samples
    inside the shape, and the colour is blended by it. Only the box around each object is computed, so a
    32 x 32 image takes a fraction of a millisecond."""
    canvas = np.empty((image_size, image_size, 3), dtype=np.float32)
    canvas[:] = BACKGROUND
    for obj in scene["objects"]:
        radius, cx, cy = SIZES[obj["size"]] * image_size, obj["x"] * image_size, obj["y"] * image_size
        x0, x1 = max(int(cx - radius) - 1, 0), min(int(cx + radius) + 2, image_size)  # box in whole pixels
        y0, y1 = max(int(cy - radius) - 1, 0), min(int(cy + radius) + 2, image_size)
        offsets = (np.arange(supersample, dtype=np.float32) + 0.5) / supersample  # sub-pixel sample centres
        xs = (np.arange(x0, x1, dtype=np.float32)[:, None] + offsets).reshape(1, -1) - cx
        ys = (np.arange(y0, y1, dtype=np.float32)[:, None] + offsets).reshape(-1, 1) - cy
        inside = _shape_mask(obj["shape"], xs, ys, radius)
        coverage = inside.reshape(y1 - y0, supersample, x1 - x0, supersample).mean(axis=(1, 3))[..., None]
        box = canvas[y0:y1, x0:x1]
        box += coverage * (np.asarray(COLOURS[obj["colour"]], dtype=np.float32) - box)
    return Image.fromarray(np.rint(canvas).astype(np.uint8), "RGB")


class ShapesDataset:
    """n shapes scenes, drawn on the fly; scene i of a split and seed is the same on every call and machine.

    Each item has its own random stream, seeded by the string "shapes/{split}/{seed}/{i}" (Python hashes a
    str seed with SHA-512, so streams of different splits are unrelated). The splits are disjoint as scenes
    (positions are continuous floats); they share captions, as the 70 single-object captions must occur in
    both. Rarely, two scenes a fraction of a pixel apart draw the same pixels (a lone small square: about
    one image in 1,500 at 32 x 32); that is the task, not a leak."""

    def __init__(self, n, image_size=32, seed=0, max_objects=2, split="train"):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if max_objects not in (1, 2):
            raise ValueError(f"max_objects must be 1 or 2, got {max_objects}")
        self.n, self.image_size, self.seed, self.max_objects, self.split = n, image_size, seed, max_objects, split
        self.skipped = set()  # drawn images are never bad; kept for the common interface

    def scene(self, index):
        if not 0 <= index < self.n:
            raise IndexError(f"shapes index {index} out of range for {self.n} images")
        return sample_shapes_scene(random.Random(f"shapes/{self.split}/{self.seed}/{index}"), self.max_objects)

    def caption(self, index):
        return shapes_caption(self.scene(index))

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        scene = self.scene(index)
        return draw_shapes(scene, self.image_size), shapes_caption(scene), index

    def image_ids(self):
        return list(range(self.n))

    def load_image(self, image_id):
        return draw_shapes(self.scene(image_id), self.image_size)

    def references(self):
        return {index: [self.caption(index)] for index in range(self.n)}


def images_to_tensor(images):
    """A list of RGB PIL images of one size -> float tensor (B, 3, h, w) in [0, 1]."""
    array = np.stack([np.asarray(image.convert("RGB"), dtype=np.uint8) for image in images])  # (B, h, w, 3)
    return torch.from_numpy(array).permute(0, 3, 1, 2).float().div_(255)  # (B, 3, h, w)
