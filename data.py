"""Datasets of (image, caption) pairs, and how train.py reads and caches them.

Every dataset speaks one interface: `ds[i] -> (RGB PIL image, caption, image_id)`, `ds.image_ids()` (distinct
images), `ds.load_image(image_id)` (None if unreadable), `ds.references()` (image_id -> its captions).
1. shapes: a synthetic, deterministic, offline set drawn on the fly (the offline tour's measuring stick), and how
   captions and drawings of it are scored (exact match, drawn right).
2. On disk: COCO captions 2017 (Chen et al. 2015), Karpathy's splits, any folder of images with a captions file
   (the Flickr8k tutorials' descriptions.txt too), CIFAR-100 (Krizhevsky 2009); --download fetches their official
   archives through weights/downloader.py (fetch_coco, fetch_karpathy, fetch_cifar100).
3. Splits and caches: `open_split` (splits never share an image), `cached_features` (each image once through
   a frozen tower, or its pixels, kept on disk), and `open_pairs` (a split as training reads it: both together).
Captions are scored (BLEU, CIDEr-D, CLIP similarity) in clip.py's last section.
"""
import copy
import csv
import hashlib
import json
import os
import random
import re
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import weights
from vit import ImageReadError, normalize, open_image, resize_crop, to_rgb

try:
    import fcntl  # a cache being written is locked where the OS can (POSIX)
except ImportError:
    fcntl = None

# -----------------------------------------------------------------------------
# 1. shapes
# A scene: {"objects": [{"size", "colour", "shape", "x", "y"}, ...] in caption order, "relation": None or one of
# RELATIONS}; x, y: an object's centre as a fraction of the image side (y down), so it draws at any size.

SHAPE_MASKS = {  # which sub-pixel samples (offsets dx, dy from the centre; radius r) lie inside each shape
    "circle": lambda dx, dy, r: dx * dx + dy * dy <= r * r,
    "square": lambda dx, dy, r: np.maximum(abs(dx), abs(dy)) <= 0.85 * r,  # about the circle's area
    "triangle": lambda dx, dy, r: (dy <= 0.9 * r) & (abs(dx) <= (dy + 0.9 * r) / 1.8),  # apex up, centred in its box
    "diamond": lambda dx, dy, r: abs(dx) + abs(dy) <= r,
    "cross": lambda dx, dy, r: ((abs(dx) <= 0.36 * r) & (abs(dy) <= r)) | ((abs(dy) <= 0.36 * r) & (abs(dx) <= r)),
}
SHAPES = tuple(SHAPE_MASKS)
COLOURS = {  # saturated and far apart in RGB so that 8 pixels are enough to tell them apart
    "red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 235), "yellow": (235, 215, 40),
    "purple": (150, 60, 210), "orange": (245, 140, 20), "white": (240, 240, 240)}
SIZES = {"small": 0.12, "large": 0.2}  # the object's radius as a fraction of the image side
RELATIONS = ("left of", "right of", "above", "below")
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
BACKGROUND = (16, 16, 20)
MARGIN, GAP = 0.03, 0.06  # free border around the image and least free space between two objects


def shapes_vocabulary():  # every word a shapes caption can use
    return sorted({"a", *SIZES, *COLOURS, *SHAPES, *" ".join(RELATIONS).split()})


def shapes_caption(scene):
    """The caption of a scene: "a large red circle" or "a small blue square left of a large green triangle"."""
    names = [f"a {o['size']} {o['colour']} {o['shape']}" for o in scene["objects"]]
    return names[0] if len(names) == 1 else f"{names[0]} {scene['relation']} {names[1]}"


def parse_shapes_caption(caption):
    """A caption of the grammar (any of the four relations) -> {"objects": [{"size", "colour", "shape"}, ...],
    "relation"}, or None for text outside it (a generated non-caption then simply scores as wrong)."""
    words = caption.strip().lower().rstrip(".").split()
    relation = next((r for r in RELATIONS if " ".join(words[4:4 + len(r.split())]) == r), None)  # after 4 words
    parts = [words] if relation is None else [words[:4], words[4 + len(relation.split()):]]
    if not all(len(p) == 4 and p[0] == "a" and p[1] in SIZES and p[2] in COLOURS and p[3] in SHAPES for p in parts):
        return None
    return {"objects": [{"size": p[1], "colour": p[2], "shape": p[3]} for p in parts], "relation": relation}


def canonical_shapes_caption(caption):
    """A caption in the dataset's canonical order (None outside the grammar): one picture must have one caption
    ("A left of B" is "B right of A"), or exact match means nothing. The larger object comes first; of two of
    one size, the left (or upper) one. Two captions describe one picture iff their canonical forms are equal."""
    scene = parse_shapes_caption(caption)
    if scene is not None and scene["relation"] is not None:
        (first, second), relation = scene["objects"], scene["relation"]
        if (first["size"], second["size"]) == ("small", "large") or \
                (first["size"] == second["size"] and relation in ("right of", "below")):
            scene = {"objects": [second, first], "relation": INVERSE[relation]}
    return None if scene is None else shapes_caption(scene)


def shapes_exact_match(dataset, captions, references):
    """On shapes, {"exact_match": the share of captions {image row: caption} that describe their first reference's
    picture (canonical forms equal, not the words)}; on other data, {}."""
    if not isinstance(dataset, ShapesDataset):
        return {}
    return {"exact_match": round(float(np.mean([canonical_shapes_caption(captions[r]) == canonical_shapes_caption(
        texts[0]) for r, texts in references.items()])), 4)}


def drawn_right(prompts, read):
    """Drawings of shapes prompts read back as captions (train.py --judge) -> {drawn_right_N, drawn_exact_N} for N
    objects, and each drawing's verdict: drawn right when each object's colour and shape are; exact, the caption."""
    scores, right = {1: [], 2: []}, []
    for prompt, text in zip(prompts, read):
        want, got = parse_shapes_caption(prompt), parse_shapes_caption(text)
        objects = [sorted((o["colour"], o["shape"]) for o in scene["objects"]) for scene in (want, got or want)]
        exact = canonical_shapes_caption(prompt) == canonical_shapes_caption(text)
        right.append(got is not None and objects[0] == objects[1])
        scores[len(want["objects"])].append((right[-1], exact))
    return {f"{name}_{n}": round(float(np.mean([s[k] for s in scores[n]])), 4) for n in (1, 2) if scores[n]
            for k, name in enumerate(("drawn_right", "drawn_exact"))}, right


def place_shapes(scene, rng):
    """Give each object a centre (x, y) that makes the relation visibly true: GAP between the boxes along its
    axis, centres at most a quarter of the smaller radius apart across it (no second relation holds)."""
    objects, radii = scene["objects"], [SIZES[o["size"]] for o in scene["objects"]]
    if len(objects) == 1:
        objects[0]["x"], objects[0]["y"] = (rng.uniform(MARGIN + radii[0], 1 - MARGIN - radii[0]) for _ in "xy")
        return scene
    r1, r2 = radii  # place as "first left of second", then mirror and / or transpose for the other relations
    along1 = rng.uniform(MARGIN + r1, 1 - MARGIN - r2 - (r1 + r2 + GAP))
    along2 = rng.uniform(along1 + r1 + r2 + GAP, 1 - MARGIN - r2)
    r_max, jitter = max(r1, r2), min(r1, r2) / 8
    across = rng.uniform(MARGIN + r_max + jitter, 1 - MARGIN - r_max - jitter)
    across1, across2 = across + rng.uniform(-jitter, jitter), across + rng.uniform(-jitter, jitter)
    if scene["relation"] in ("right of", "below"):
        along1, along2 = 1 - along1, 1 - along2
    for obj, along, across in ((objects[0], along1, across1), (objects[1], along2, across2)):
        obj["x"], obj["y"] = (along, across) if scene["relation"] in ("left of", "right of") else (across, along)
    return scene


def sample_shapes_scene(rng, two_objects=0.5):
    """A random scene with positions, its objects in the canonical caption order; two with p = `two_objects`."""
    def sample_object():
        return {"size": rng.choice(list(SIZES)), "colour": rng.choice(list(COLOURS)), "shape": rng.choice(SHAPES)}
    if two_objects == 0 or rng.random() < 1 - two_objects:
        return place_shapes({"objects": [sample_object()], "relation": None}, rng)
    scene = place_shapes({"objects": [sample_object(), sample_object()],
                          "relation": rng.choice(("left of", "above"))}, rng)
    if [o["size"] for o in scene["objects"]] == ["small", "large"]:  # canonical: the larger object first
        scene = {"objects": scene["objects"][::-1], "relation": INVERSE[scene["relation"]]}
    return scene


def draw_shapes(scenes, image_size=32, supersample=4):
    """Placed scenes -> their pixels (N, size, size, 3) uint8, anti-aliased: a pixel's colour is blended by the
    fraction of its supersample x supersample sub-pixel samples inside the shape, computed in a box of whole pixels
    around it. The k-th objects of all scenes that share a shape and size (G of them) are drawn at once."""
    groups, pad = {}, int(max(SIZES.values()) * image_size) + 4  # the padded canvas holds the box of any centre
    for n, scene in enumerate(scenes):
        for k, obj in enumerate(scene["objects"]):
            groups.setdefault((k, obj["shape"], obj["size"]), []).append((n, obj))
    canvas = np.full((len(scenes), image_size + 2 * pad, image_size + 2 * pad, 3), BACKGROUND, dtype=np.float32)
    offsets = (np.arange(supersample, dtype=np.float32) + 0.5) / supersample  # sub-pixel sample centres
    for (_, shape, size), group in sorted(groups.items(), key=lambda item: item[0][0]):  # first objects first
        radius, box = SIZES[size] * image_size, int(2 * SIZES[size] * image_size) + 4
        centres = np.array([(obj["x"], obj["y"]) for _, obj in group]) * image_size  # (G, 2) x, y
        px, py = ((centres[:, i, None] - radius).astype(int) - 1 + np.arange(box) for i in (0, 1))  # (G, box)
        dx, dy = ((p.astype(np.float32)[..., None] + offsets).reshape(len(group), -1)  # (G, box * ss) each
                  - centres[:, i, None].astype(np.float32) for i, p in enumerate((px, py)))
        inside = SHAPE_MASKS[shape](dx[:, None, :], dy[:, :, None], radius).view(np.uint8)  # (G, box*ss, box*ss)
        inside = inside.reshape(len(group), box, supersample, box, supersample)
        coverage = sum(inside[:, :, i, :, j] for i in range(supersample) for j in range(supersample)) / supersample ** 2
        at = (np.array([n for n, _ in group])[:, None, None], pad + py[:, :, None], pad + px[:, None, :])
        colours = np.array([COLOURS[obj["colour"]] for _, obj in group], dtype=np.float32)[:, None, None]
        below = canvas[at]  # (G, box, box, 3)
        canvas[at] = below + coverage[..., None] * (colours - below)
    return np.rint(canvas[:, pad:-pad, pad:-pad]).astype(np.uint8)


class ShapesDataset:
    """n scenes drawn on the fly; item i is the same on every call and machine: its own random stream, seeded by
    the string "shapes/{split}/{seed}/{i}" (hashed with SHA-512). The splits (train, val, test) are disjoint as
    scenes and share captions (all 70 single-object ones); rarely two scenes draw the same pixels (1 in 1,500 at 32).
    `two_objects`: their share of two-object scenes (a larger share turns some single-object scenes into two)."""

    def __init__(self, n, image_size=32, seed=0, two_objects=0.5, split="train"):
        if split not in ("train", "val", "test") or not 0 <= two_objects <= 1:
            raise ValueError(f"shapes: split train, val or test and --two-objects 0 to 1, not {split!r}, {two_objects}")
        self.n, self.image_size, self.seed, self.two_objects, self.split = n, image_size, seed, two_objects, split
        self.skipped = set()  # drawn images are never bad; kept for the common interface

    def scene(self, index):
        if not 0 <= index < self.n:
            raise IndexError(f"shapes index {index} out of range for {self.n} images")
        return sample_shapes_scene(random.Random(f"shapes/{self.split}/{self.seed}/{index}"), self.two_objects)

    def caption(self, index):
        return shapes_caption(self.scene(index))

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        return self.load_image(index), self.caption(index), index

    def image_ids(self):
        return list(range(self.n))

    def load_image(self, image_id):
        return Image.fromarray(draw_shapes([self.scene(image_id)], self.image_size)[0], "RGB")

    def references(self):
        return {index: [self.caption(index)] for index in range(self.n)}


# -----------------------------------------------------------------------------
# 2. Images and captions on disk

NO_TEST_SPLIT = {  # the datasets that have no test captions, and what to do instead
    "coco": "COCO 2017 publishes no test captions: score --split val, or use --data karpathy (its 5,000 test images)",
    "folder": "an image folder is split into train and val only (5% of its images held out): score --split val"}


def data_dir(root=None):
    """Where datasets are downloaded: `root`, else env MINIMODAL_DATA, else data_cache/ beside this file."""
    return Path(root or os.environ.get("MINIMODAL_DATA") or Path(__file__).resolve().parent / "data_cache")


class CaptionPairs:
    """(image_id, caption) pairs with image files (files: image_id -> Path). A bad image (0-byte, truncated, not
    an image, missing) is reported once with its file name, kept in `skipped` and passed over."""

    def __init__(self, pairs, files):
        self.pairs, self.files, self.skipped = pairs, files, set()

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        for step in range(len(self.pairs)):  # a bad image: go on with the next pair
            image_id, caption = self.pairs[(index + step) % len(self.pairs)]
            if (image := self.load_image(image_id)) is not None:
                return image, caption, image_id
        raise RuntimeError(f"no readable image among the {len(self.pairs)} pairs")

    def image_ids(self):
        return list(dict.fromkeys(image_id for image_id, _ in self.pairs))

    def references(self):
        references = {}
        for image_id, caption in self.pairs:
            references.setdefault(image_id, []).append(caption)
        return references

    def open_image(self, image_id):
        return to_rgb(open_image(self.files[image_id]))  # vit.py's opener: one error, ImageReadError

    def load_image(self, image_id):
        try:
            return None if image_id in self.skipped else self.open_image(image_id)
        except ImageReadError as error:
            self.skipped.add(image_id)
            print(f"skipping bad image: {error}", file=sys.stderr)

    def report_skipped(self):
        print(f"skipped {len(self.skipped)} bad image(s) of {len(self.image_ids())}", file=sys.stderr)
        return len(self.skipped)

    def subset(self, image_ids):
        keep, subset = set(image_ids), copy.copy(self)
        subset.pairs = [pair for pair in self.pairs if pair[0] in keep]
        return subset

    def split_by_image(self, val_fraction=0.05, seed=0):
        """(train, val) with every caption of one image on the same side, so no image is scored after training."""
        image_ids = self.image_ids()
        random.Random(seed).shuffle(image_ids)
        n_val = max(1, round(val_fraction * len(image_ids)))  # at least one image to validate on
        return self.subset(image_ids[n_val:]), self.subset(image_ids[:n_val])


def coco_captions(root=None, split="train", download=False):
    """COCO captions 2017: root/annotations/captions_{split}2017.json and the images in root/{split}2017/."""
    if split not in ("train", "val"):
        raise ValueError(f"COCO split must be 'train' or 'val', got {split!r}")
    root = data_dir(root) / "coco" if root is None else Path(root)
    for name in ("annotations", f"{split}2017") if download else ():
        weights.fetch_coco(name, root)
    if not (annotations := root / "annotations" / f"captions_{split}2017.json").exists():
        raise FileNotFoundError(f"{annotations} not found: pass download=True (--download) to fetch "
                                f"{weights.downloader.COCO_URL}{weights.downloader.COCO_ARCHIVES['annotations'][0]}, or unpack it "
                                f"into {root}")
    index = json.loads(annotations.read_text())
    files = {image["id"]: root / f"{split}2017" / image["file_name"] for image in index["images"]}
    return CaptionPairs([(a["image_id"], a["caption"].strip()) for a in index["annotations"]], files)


def karpathy_coco(karpathy_json, image_root, split="train"):
    """Karpathy's splits (dataset_coco.json), "train" with "restval" as ClipCap and most papers use it. An image is
    filepath/filename (2014 names), else train2017/ or val2017/{cocoid:012d}.jpg (its 2017 name)."""
    splits = {"train": ("train", "restval"), "val": ("val",), "test": ("test",), "restval": ("restval",)}[split]
    if not Path(karpathy_json).is_file():
        raise FileNotFoundError(f"{karpathy_json} not found: Karpathy's split file is dataset_coco.json in "
                                f"{weights.downloader.KARPATHY_URL} (unzip it there), or pass --download")
    image_root, pairs, files = Path(image_root), [], {}
    for image in [i for i in json.loads(Path(karpathy_json).read_text())["images"] if i["split"] in splits]:
        image_id = image.get("cocoid", image["filename"])
        candidates = [image_root / image.get("filepath", "") / image["filename"]]
        if "cocoid" in image:
            candidates += [image_root / f"{folder}/{image['cocoid']:012d}.jpg" for folder in ("train2017", "val2017")]
        files[image_id] = next((path for path in candidates if path.exists()), candidates[0])
        pairs += [(image_id, sentence["raw"].strip()) for sentence in image["sentences"]]
    return CaptionPairs(pairs, files)


def read_captions_file(path):
    """[(file name, caption)] from JSON lines {"file", "caption"}, CSV with a header (file or image, caption), text
    lines `file<TAB>caption`, or without a tab `image_id caption` (the Flickr8k tutorials' descriptions.txt).
    Flickr8k.token.txt's caption numbers (`1000268201_693b08cb0e.jpg#0`) are dropped."""
    path, pairs = Path(path), []
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            column = next((c for c in ("file", "image", "file_name", "filename") if c in columns), None)
            if column is None or "caption" not in columns:
                raise ValueError(f"{path}: the CSV header must name a file (or image) and a caption column: {columns}")
            return [(row[column].strip(), row["caption"].strip()) for row in reader]
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line) if path.suffix in (".jsonl", ".json") else None
            name, caption = (record["file"], record["caption"]) if record is not None else \
                line.split("\t", 1) if "\t" in line else line.split(None, 1)
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}:{number}: cannot read an image and a caption from {line[:80]!r} ({error})")
        pairs.append((re.sub(r"#\d+$", "", name.strip()), caption.strip()))
    return pairs


def image_folder(root, captions_file=None):
    """A folder of images and a captions file (default: its captions.jsonl, .csv, .txt or descriptions.txt); image
    names without a suffix get the one found on disk."""
    root, found = Path(root), ("captions.jsonl", "captions.csv", "captions.txt", "descriptions.txt")
    captions_file = captions_file or next((root / name for name in found if (root / name).is_file()), None)
    if captions_file is None:
        raise FileNotFoundError(f"no captions file in {root}: expected one of {found}")
    pairs, files = read_captions_file(captions_file), {}
    for name in dict.fromkeys(name for name, _ in pairs):  # each image once
        candidates = [root / (name + suffix) for suffix in ("", ".jpg", ".jpeg", ".png", ".webp", ".bmp")]
        files[name] = next((path for path in candidates if path.exists()), root / name)
    return CaptionPairs(pairs, files)


class CIFAR100Captions(CaptionPairs):
    """CIFAR-100 (32 x 32 photos, 100 classes) read from the official python tarball without unpacking it;
    captions "a photo of a {class}" (CLIP's prompt template; "maple_tree" -> "maple tree")."""

    def __init__(self, root=None, split="train", download=False):
        archive = data_dir(root) / "cifar-100-python.tar.gz"
        if download and not archive.exists():
            weights.fetch_cifar100(archive)
        if not archive.exists():
            raise FileNotFoundError(f"{archive} not found: pass download=True or fetch "
                                    f"{weights.downloader.CIFAR100_URL} there")
        with tarfile.open(archive, "r:gz") as tar:  # Python 2 pickles (bytes keys), through weights' unpickler
            batch, meta = (weights.load_pickle(tar.extractfile(f"cifar-100-python/{name}").read(), f"{archive}:{name}",
                                               encoding="bytes") for name in (split, "meta"))
        self.classes = [name.decode().replace("_", " ") for name in meta[b"fine_label_names"]]
        self.images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        super().__init__([(i, f"a photo of a {self.classes[label]}") for i, label in enumerate(batch[b"fine_labels"])],
                         dict.fromkeys(range(len(self.images)), archive))  # the archive stands for each image

    def open_image(self, image_id):
        return Image.fromarray(self.images[image_id], "RGB")


# -----------------------------------------------------------------------------
# 3. Splits and caches: one split of any dataset; what train.py computes once per image and keeps on disk


def open_split(name, split, root=None, download=False, image_size=32, seed=0, max_images=0, two_objects=0.5):
    """One split (train, val or test) of dataset `name`: shapes, coco, karpathy, folder or cifar100; splits never
    share an image. Shapes draws max_images images (0: 96,000 for train, 500 else; a share `two_objects` with two
    objects) from the split's own stream; a val or test split of the others keeps its first max_images images (0:
    all) with all their captions. CIFAR-100 holds 5,000 images of its training set out as val; a folder 5%."""
    if split == "test" and name in NO_TEST_SPLIT:
        raise ValueError(NO_TEST_SPLIT[name])
    if (root is None and name == "folder") or (root is not None and not download and not Path(root).is_dir()):
        raise FileNotFoundError(f"--data-root {root}: no such folder" if root else
                                "--data folder needs --data-root DIR: a folder of images with a captions file")
    if name == "shapes":
        return ShapesDataset(max_images or (96_000 if split == "train" else 500), image_size, seed, two_objects, split)
    if name == "coco":
        dataset = coco_captions(root, split, download)
    elif name == "karpathy":
        root = Path(root or data_dir() / "coco")
        if download:
            weights.fetch_karpathy(root)
        dataset = karpathy_coco(root / "dataset_coco.json", root, split)
    elif name == "cifar100":
        dataset = CIFAR100Captions(root, "test" if split == "test" else "train", download)
        dataset = dataset if split == "test" else dataset.split_by_image(0.1, seed=0)[split == "val"]
    elif name == "folder":
        dataset = image_folder(root).split_by_image(0.05, seed=0)[split == "val"]
    else:
        raise ValueError(f"unknown dataset {name!r}: shapes, coco, karpathy, folder or cifar100")
    return dataset.subset(dataset.image_ids()[:max_images]) if split != "train" and max_images else dataset


def open_pairs(cfg, split, tower=None, tokens=False, device="cpu", encode=str):
    """One split as train.py reads it, by its flags `cfg` (--data, --data-root, --download, --image-size, --seed, and
    --max-train-samples or --max-val-samples: `most`): (dataset, inputs, pairs [(image row, encode(caption))],
    references {image row: captions}) of its readable images (open_split's; a train split keeps its first `most`
    pairs). Inputs are cached in out_dir/cache (cached_features): a frozen tower's embeddings, or pixels (tower None);
    tower "photos": none, they are read per batch (read_pairs)."""
    name, most = cfg.data, cfg.max_train_samples if split == "train" else cfg.max_val_samples
    dataset = open_split(name, split, cfg.data_root or None, cfg.download, cfg.image_size, cfg.seed, most,
                         cfg.two_objects if split == "train" else 0.5)  # held out: always half and half
    images, skipped = (None, set()) if tower == "photos" else cached_features(
        dataset, Path(cfg.out_dir) / "cache", tower, cfg.image_size, tokens, device)
    ids = dataset.image_ids()
    row = {image_id: k for k, image_id in enumerate(ids) if str(image_id) not in skipped}
    references = {row[i]: captions for i, captions in dataset.references().items() if i in row}
    pairs = [(r, encode(caption)) for r, captions in references.items() for caption in captions]
    if not pairs:
        raise ValueError(f"none of the {len(ids)} images of the {split} split of --data {name} can be read (each is "
                         "missing or unreadable)")
    return dataset, images, pairs[:most or None] if split == "train" else pairs, references


def read_pairs(dataset, pairs, size, split="train", cached=None):
    """Pairs [(image row, text)] -> (their images, their texts): the rows of `cached` (open_pairs' inputs) if given,
    else read from disk: uint8 centre crops (B, 3, size, size), an unreadable image reported (load_image), left out."""
    if cached is not None:
        return torch.from_numpy(np.asarray(cached[[row for row, _ in pairs]])), [text for _, text in pairs]
    ids = dataset.image_ids()
    loaded = [(dataset.load_image(ids[row]), text) for row, text in pairs]
    if not (kept := [(image, text) for image, text in loaded if image is not None]):
        raise ValueError(f"none of a batch's images of the {split} split can be read (see above)")
    return torch.stack([resize_crop(image, size) for image, _ in kept]), [text for _, text in kept]


def fingerprint(dataset, tower=None):
    """What a cache depends on: the images (shapes by their parameters, files by path, size and modification time)
    and every byte of the image tower's weights (None: the cache holds the pixels themselves)."""
    h = hashlib.sha256(b"preprocessing 2")  # vit.resize_crop's version: bumped, old caches are rebuilt
    if isinstance(dataset, ShapesDataset):
        h.update(repr((dataset.n, dataset.image_size, dataset.seed, dataset.two_objects, dataset.split)).encode())
    else:
        for image_id in dataset.image_ids():
            path = Path(dataset.files[image_id])
            stat = path.stat() if path.exists() else None
            h.update(f"{path}\0{stat and stat.st_size}\0{stat and stat.st_mtime_ns}\n".encode())
    for name, tensor in sorted(tower.state_dict().items()) if tower is not None else ():
        h.update(name.encode() + tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:24]


@torch.no_grad()
def cached_features(dataset, folder, tower=None, size=32, tokens=False, device="cpu", batch_size=64):
    """Every image of `dataset` once through a frozen `tower` (the caller's: data.py builds no network): embeddings
    (N, D) fp16, or with `tokens` every token's (N, 1 + h*w, D); with no tower, CLIP's crop of its pixels (N, 3,
    size, size) uint8. Computed on first use into folder/{kind}-{fingerprint}.npy (atomic; locked while written),
    memory-mapped. Returns (array, skipped image ids): an unreadable image is reported and its row stays 0."""
    kind = "pixels" if tower is None else "tokens" if tokens else "features"
    path = Path(folder) / f"{kind}-{fingerprint(dataset, tower)}.npy"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        ids, part, skipped = dataset.image_ids(), path.with_name(path.name + ".part"), []
        size, c = (size, None) if tower is None else (tower.config.image_resolution, tower.config)
        shape = (3, size, size) if c is None else (c.num_tokens, c.embed_dim) if tokens else (c.embed_dim,)
        with open(part, "wb") as holder:  # locked while written: a run starting meanwhile leaves it be
            if fcntl:
                fcntl.flock(holder, fcntl.LOCK_EX)
            out = np.lib.format.open_memmap(part, "w+", np.uint8 if c is None else np.float16, (len(ids), *shape))
            drawn = c is None and isinstance(dataset, ShapesDataset) and size == dataset.image_size
            step = 256 if drawn else batch_size  # shapes are drawn 256 scenes at a time
            for start in tqdm(range(0, len(ids), step), desc=f"caching {kind}", unit="batch", disable=None):
                rows = range(start, min(start + step, len(ids)))
                if drawn:  # shapes at their own size: drawn straight as pixels (what resize_crop makes of them)
                    out[start:rows.stop] = draw_shapes([dataset.scene(r) for r in rows], size).transpose(0, 3, 1, 2)
                    continue
                images = {row: dataset.load_image(ids[row]) for row in rows}
                skipped += [str(ids[row]) for row, image in images.items() if image is None]
                if rows := [row for row, image in images.items() if image is not None]:
                    pixels = torch.stack([resize_crop(images[r], size) for r in rows])  # (B, 3, h, w) uint8
                    embed = None if c is None else tower.embed_tokens if tokens else tower
                    out[rows] = pixels.numpy() if c is None else embed(normalize(pixels.to(device))).float().cpu().numpy()
            out.flush()
            path.with_suffix(".skipped.json").write_text(json.dumps(skipped))
            os.replace(part, path)  # atomic: a killed run never leaves half a cache under the final name
    return np.load(path, mmap_mode="r"), set(json.loads(path.with_suffix(".skipped.json").read_text()))
