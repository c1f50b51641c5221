"""data.py: the shapes set, and the datasets read from files (fixtures made by the tests, real layouts)."""
import random
import struct

import numpy as np
import pytest

import data
import weights
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


def test_shapes_golden_captions():
    # fixed forever: the tour's figures and every feature cache depend on item i being the same scene
    assert [ShapesDataset(4).caption(i) for i in range(4)] == [
        "a large green cross", "a large purple cross right of a small purple diamond", "a small purple cross",
        "a large red diamond above a small white diamond"]
    assert ShapesDataset(4, split="val").caption(0) == "a large blue circle above a small yellow triangle"


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
    assert {len(parse_shapes_caption(ShapesDataset(100, two_objects=0).caption(i))["objects"])
            for i in range(100)} == {1}


def test_two_objects_share_of_training_scenes_and_held_out_splits_stay_half(tmp_path):
    counts = {share: [len(parse_shapes_caption(ShapesDataset(2000, two_objects=share).caption(i))["objects"])
                      for i in range(2000)] for share in (0.0, 0.5, 0.7, 1.0)}
    assert set(counts[0.0]) == {1} and set(counts[1.0]) == {2}
    assert abs(counts[0.5].count(2) / 2000 - 0.5) < 0.04 and abs(counts[0.7].count(2) / 2000 - 0.7) < 0.04
    half, more = ShapesDataset(300), ShapesDataset(300, two_objects=0.7)  # each scene keeps its coin: a larger
    for i in range(300):  # share only turns some single-object scenes into two-object ones, the rest stay
        if counts[0.5][i] == 2 or counts[0.7][i] == 1:
            assert more.caption(i) == half.caption(i)
    with pytest.raises(ValueError, match="--two-objects 0 to 1"):
        ShapesDataset(10, two_objects=1.5)
    cfg = type("Flags", (), dict(data="shapes", data_root="", download=False, image_size=8, seed=0, two_objects=1.0,
                                 max_train_samples=40, max_val_samples=200, out_dir=str(tmp_path)))
    train_split, val_split = (data.open_pairs(cfg, split)[0] for split in ("train", "val"))
    assert {len(parse_shapes_caption(train_split.caption(i))["objects"]) for i in range(40)} == {2}
    assert [val_split.caption(i) for i in range(200)] == [ShapesDataset(200, split="val").caption(i)
                                                          for i in range(200)]  # judged prompts: half and half


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
    image = draw_shapes([{"objects": [obj], "relation": None}], size)[0].astype(np.int16)
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
    """train, val and test: three random streams, no scene in two of them (test's golden first caption pinned)."""
    train, val, test = (ShapesDataset(1500, image_size=64, split=split) for split in ("train", "val", "test"))
    train_scenes = {repr(train.scene(i)) for i in range(len(train))}
    val_scenes = {repr(val.scene(i)) for i in range(len(val))}
    assert not val_scenes & train_scenes and not {repr(test.scene(i)) for i in range(1500)} & (train_scenes | val_scenes)
    train_images = {train.load_image(i).tobytes() for i in range(300)}
    assert not any(val.load_image(i).tobytes() in train_images for i in range(300))
    assert not any(test.load_image(i).tobytes() in train_images for i in range(300))
    assert test.caption(0) == "a large orange square"  # fixed forever, as the other splits' first captions
    with pytest.raises(ValueError, match="split"):
        ShapesDataset(10, split="holdout")
    with pytest.raises(IndexError):
        train.scene(1500)


def test_shapes_common_interface():
    ds = ShapesDataset(6, image_size=20)
    assert ds.image_ids() == list(range(6)) and len(ds) == 6
    assert ds.references()[3] == [ds.caption(3)]
    assert ds.load_image(3).tobytes() == ds[3][0].tobytes() and ds.load_image(3).size == (20, 20)


@pytest.mark.parametrize("size, digest", [
    (24, "8e3d1162e5b254d91b78d4c10c0ab634566d0ea5e87793a00f7e78cbf7bb8e32"),
    (32, "a7d21c384336994cb237a1808380484492758eba101832d4197f669c49008c6a")])
def test_shapes_pixels_pinned_and_cached_as_read(size, digest, tmp_path):
    """The first 256 training images at the tours' sizes are the pixels every published figure was measured on
    (sha256 of the one-scene-at-a-time renderer they were drawn with); drawn many at once they are the same, and
    the cache, which draws them in batches, holds what resize_crop makes of each image read alone."""
    import hashlib
    from data import cached_features
    from vit import resize_crop
    ds = ShapesDataset(256, image_size=size)
    alone = np.stack([np.asarray(ds.load_image(i)) for i in range(256)])
    assert hashlib.sha256(alone.tobytes()).hexdigest() == digest
    assert np.array_equal(draw_shapes([ds.scene(i) for i in range(256)], size), alone)
    cached, skipped = cached_features(ds, tmp_path, size=size)
    assert not skipped and np.array_equal(cached, np.stack([resize_crop(ds.load_image(i), size).numpy()
                                                            for i in range(256)]))


# ----------------------------------------------------------------------------- files on disk

def _jpeg_bytes(colour, size=(20, 16)):
    import io
    from PIL import Image
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def _coco_fixture(root, split="val"):
    """A COCO captions 2017 tree: 3 good JPEGs, a 0-byte one and a truncated one, 2 captions each."""
    import json
    images = root / f"{split}2017"
    images.mkdir(parents=True)
    (root / "annotations").mkdir()
    entries, annotations = [], []
    for n, image_id in enumerate([139, 285, 632, 724, 776]):
        name = f"{image_id:012d}.jpg"
        payload = _jpeg_bytes((40 * n, 200, 100))
        payload = {3: b"", 4: payload[: len(payload) // 2]}.get(n, payload)  # 0-byte, truncated
        (images / name).write_bytes(payload)
        entries.append({"license": 1, "file_name": name, "coco_url": f"http://images.cocodataset.org/{split}2017/{name}",
                        "height": 16, "width": 20, "date_captured": "2013-11-14 17:02:52", "id": image_id})
        annotations += [{"image_id": image_id, "id": 1000 + 2 * n + k, "caption": f"Picture {n} caption {k}. "}
                        for k in range(2)]
    index = {"info": {"description": "COCO 2017 Dataset"}, "licenses": [], "images": entries,
             "annotations": annotations}
    (root / "annotations" / f"captions_{split}2017.json").write_text(json.dumps(index))
    return root


def test_coco_captions_skips_bad_images_once_and_counts_them(tmp_path, capsys):
    ds = data.coco_captions(_coco_fixture(tmp_path / "coco"), split="val")
    assert len(ds) == 10 and ds.image_ids() == [139, 285, 632, 724, 776]
    assert ds.references()[285] == ["Picture 1 caption 0.", "Picture 1 caption 1."]
    seen = [ds[i] for i in range(len(ds))] + [ds[i] for i in range(len(ds))]  # every pair twice
    assert {image_id for _, _, image_id in seen} == {139, 285, 632}
    assert all(image.mode == "RGB" and image.size == (20, 16) for image, _, _ in seen)
    assert ds.report_skipped() == 2
    err = capsys.readouterr().err
    for name in ("000000000724.jpg", "000000000776.jpg"):  # reported once each
        assert len([line for line in err.splitlines() if name in line]) == 1, err
    assert "skipped 2 bad image(s) of 5" in err
    assert ds.load_image(724) is None
    with pytest.raises(FileNotFoundError, match="download"):
        data.coco_captions(tmp_path / "empty", split="train")


def test_split_by_image_keeps_all_captions_of_an_image_together(tmp_path):
    ds = data.coco_captions(_coco_fixture(tmp_path / "coco"), split="val")
    train, val = ds.split_by_image(val_fraction=0.4, seed=1)
    assert len(val.image_ids()) == 2 and len(train.image_ids()) == 3
    assert not set(train.image_ids()) & set(val.image_ids())
    assert sorted(train.pairs + val.pairs) == sorted(ds.pairs)
    assert (train.pairs, val.pairs) == tuple(s.pairs for s in ds.split_by_image(val_fraction=0.4, seed=1))


def test_karpathy_splits_find_2017_file_names(tmp_path):
    import json
    root = _coco_fixture(tmp_path / "coco")
    karpathy = {"dataset": "coco", "images": [
        {"filepath": "val2014", "filename": f"COCO_val2014_{cocoid:012d}.jpg", "cocoid": cocoid, "imgid": n,
         "split": split, "sentids": [n], "sentences": [{"tokens": ["a", "b"], "raw": f"Raw {cocoid}.", "imgid": n,
                                                          "sentid": n}]}
        for n, (cocoid, split) in enumerate([(139, "train"), (285, "restval"), (632, "test"), (724, "val")])]}
    (tmp_path / "dataset_coco.json").write_text(json.dumps(karpathy))
    train = data.karpathy_coco(tmp_path / "dataset_coco.json", root, split="train")
    assert train.pairs == [(139, "Raw 139."), (285, "Raw 285.")]
    test = data.karpathy_coco(tmp_path / "dataset_coco.json", root, split="test")
    assert test.files[632] == root / "val2017" / "000000000632.jpg" and test[0][0].size == (20, 16)


@pytest.mark.parametrize("layout", ["jsonl", "csv", "csv-image", "tsv", "descriptions", "flickr-token"])
def test_image_folder_with_captions_file(tmp_path, layout):
    import json
    names = ["cat.jpg", "dog one.png", "bird.jpeg"]
    for n, name in enumerate(names):
        from PIL import Image
        Image.new("RGB", (8, 8), (60 * n, 0, 0)).save(tmp_path / name)
    captions = [("cat.jpg", "a cat, sitting"), ("dog one.png", "a dog"), ("cat.jpg", "a cat again"),
                ("bird.jpeg", "a bird")]
    if layout == "jsonl":
        path = tmp_path / "captions.jsonl"
        path.write_text("".join(json.dumps({"file": f, "caption": c}) + "\n" for f, c in captions))
    elif layout.startswith("csv"):
        path = tmp_path / "captions.csv"
        column = "image" if layout == "csv-image" else "file"
        path.write_text(f"{column},caption\n" + "".join(f'"{f}","{c}"\n' for f, c in captions))
    elif layout == "tsv":
        path = tmp_path / "captions.txt"
        path.write_text("".join(f"{f}\t{c}\n" for f, c in captions) + "\n")
    else:  # ids without suffix separated by a space, or Flickr8k.token.txt's "file#n<TAB>caption"
        captions = [(f, c) for f, c in captions if " " not in f]
        path = tmp_path / ("descriptions.txt" if layout == "descriptions" else "Flickr8k.token.txt")
        lines = [f"{f.split('.')[0]} {c}" if layout == "descriptions" else f"{f}#{n}\t{c}" for n, (f, c) in enumerate(captions)]
        path.write_text("\n".join(lines) + "\n")
    ds = data.image_folder(tmp_path, None if layout != "flickr-token" else path)
    expected_ids = [f.split(".")[0] if layout == "descriptions" else f for f, _ in captions]
    assert [pair for pair in ds.pairs] == [(i, c) for i, (_, c) in zip(expected_ids, captions)]
    for index in range(len(ds)):
        image, caption, image_id = ds[index]
        assert image.size == (8, 8) and caption == ds.pairs[index][1] and image_id == ds.pairs[index][0]
    assert ds.report_skipped() == 0


def test_captions_file_errors_name_the_line(tmp_path):
    (tmp_path / "captions.jsonl").write_text('{"file": "a.jpg", "caption": "x"}\n{"file": "b.jpg"}\n')
    with pytest.raises(ValueError, match=r"captions.jsonl:2"):
        data.image_folder(tmp_path)
    (tmp_path / "bad.csv").write_text("name,text\na.jpg,x\n")
    with pytest.raises(ValueError, match="header"):
        data.read_captions_file(tmp_path / "bad.csv")
    with pytest.raises(FileNotFoundError, match="captions file"):
        data.image_folder(tmp_path / "nothing")


def test_open_split_has_real_test_splits_or_refuses(tmp_path):
    """--split test never scores val: shapes and Karpathy's splits have a test split, CIFAR-100 its official test set
    (val is 10% of its training images, held out); COCO 2017 and image folders refuse, saying what to do."""
    assert data.open_split("shapes", "test", max_images=5).split == "test"
    for name, message in (("coco", "COCO 2017 publishes no test captions"), ("folder", "train and val only")):
        with pytest.raises(ValueError, match=message):
            data.open_split(name, "test", root=str(tmp_path))
    root = _coco_fixture(tmp_path / "coco")
    assert data.open_split("coco", "val", str(root), max_images=2).image_ids() == [139, 285]  # first images, whole
    with pytest.raises(FileNotFoundError, match="--data-root .*nowhere: no such folder"):
        data.open_split("coco", "val", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="--data folder needs --data-root"):
        data.open_split("folder", "train")
    with pytest.raises(FileNotFoundError, match="caption_datasets.zip .*--download"):
        data.open_split("karpathy", "test", str(root))
    _cifar_fixture(tmp_path / "cifar", n_train=20, n_test=4)
    train, val, test = (data.open_split("cifar100", split, str(tmp_path / "cifar")) for split in ("train", "val", "test"))
    assert (len(train.image_ids()), len(val.image_ids()), len(test.image_ids())) == (18, 2, 4)
    assert not set(train.image_ids()) & set(val.image_ids())


def _python2_pickle(obj):
    """Protocol 2 as Python 2's cPickle wrote the official files: str as BINSTRING (bytes when read with
    encoding="bytes"), numpy arrays through numpy.core.multiarray._reconstruct and a dtype state of byte strings."""
    out = [b"\x80\x02"]

    def write(o):
        if o is None or isinstance(o, bool):
            out.append({None: b"N", True: b"\x88", False: b"\x89"}[o])
        elif isinstance(o, int):
            out.append(b"J" + struct.pack("<i", o))
        elif isinstance(o, bytes):
            out.append(b"U" + bytes([len(o)]) + o if len(o) < 256 else b"T" + struct.pack("<i", len(o)) + o)
        elif isinstance(o, (list, tuple, dict)):
            out.append({list: b"](", tuple: b"(", dict: b"}("}[type(o)])
            for item in (x for pair in o.items() for x in pair) if isinstance(o, dict) else o:
                write(item)
            out.append({list: b"e", tuple: b"t", dict: b"u"}[type(o)])
        else:  # _reconstruct(ndarray, (0,), 'b'), then BUILD with (1, shape, dtype, False, raw bytes)
            out.append(b"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\n")
            write((0,)), write(b"b"), out.append(b"tR(K\x01"), write(o.shape)
            out.append(b"cnumpy\ndtype\n"), write((o.dtype.str[1:].encode(), False, True)), out.append(b"R")
            write((3, b"|", None, None, None, -1, -1, 0)), out.append(b"b\x89"), write(o.tobytes()), out.append(b"tb")
    write(obj)
    return b"".join(out) + b"."


def _cifar_fixture(root, n_train=6, n_test=4, evil=False):
    """cifar-100-python.tar.gz in the official layout: Python 2 pickles with bytes keys."""
    import io
    import tarfile
    rng = np.random.default_rng(0)
    names = [f"class_{k}".encode() for k in range(98)] + [b"maple_tree", b"apple"]
    members = {"meta": {b"fine_label_names": names, b"coarse_label_names": [b"trees"] * 20}}
    for split, n in (("train", n_train), ("test", n_test)):
        members[split] = {b"filenames": [f"img_{i}.png".encode() for i in range(n)],
                          b"batch_label": f"{split} batch".encode(), b"fine_labels": [98 + i % 2 for i in range(n)],
                          b"coarse_labels": [0] * n, b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / "cifar-100-python.tar.gz", "w:gz") as tar:
        for name, content in members.items():
            payload = _python2_pickle(content)
            if evil and name == "test":
                payload = b"cos\nsystem\n(S'echo pwned'\ntR."  # os.system("echo pwned") if plainly unpickled
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return members


def test_python2_pickle_writer_reads_back_with_plain_pickle():
    import pickle
    content = {b"data": np.arange(12, dtype=np.uint8).reshape(2, 6), b"labels": [1, 2], b"name": b"x" * 300}
    loaded = pickle.loads(_python2_pickle(content), encoding="bytes")  # our own bytes: safe to unpickle plainly
    assert loaded[b"labels"] == [1, 2] and loaded[b"name"] == b"x" * 300
    assert loaded[b"data"].dtype == np.uint8 and (loaded[b"data"] == content[b"data"]).all()


def test_cifar100_from_official_tarball_layout(tmp_path):
    members = _cifar_fixture(tmp_path)
    ds = data.CIFAR100Captions(tmp_path, split="train")
    assert len(ds) == 6 and ds.classes[98] == "maple tree"
    image, caption, image_id = ds[1]
    assert caption == "a photo of a apple" and image_id == 1 and image.size == (32, 32)
    row = members["train"][b"data"][1]  # 1024 red, then 1024 green, then 1024 blue values, row-major
    assert np.asarray(image)[2, 5].tolist() == [row[2 * 32 + 5], row[1024 + 2 * 32 + 5], row[2048 + 2 * 32 + 5]]
    assert data.CIFAR100Captions(tmp_path, split="test").pairs[0] == (0, "a photo of a maple tree")
    with pytest.raises(FileNotFoundError, match="download"):
        data.CIFAR100Captions(tmp_path / "missing")


def test_cifar100_refuses_a_pickle_that_runs_code(tmp_path):
    _cifar_fixture(tmp_path, evil=True)
    assert len(data.CIFAR100Captions(tmp_path, split="train")) == 6
    with pytest.raises(ValueError, match="refusing to load global 'os.system'"):
        data.CIFAR100Captions(tmp_path, split="test")


# ----------------------------------------------------------------------------- downloads (127.0.0.1 only)

@pytest.fixture
def local_server(tmp_path):
    """Serves tmp_path/served over HTTP on 127.0.0.1 (Range requests ignored: full responses only)."""
    import functools
    import http.server
    import threading
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_coco_download_and_unpack_from_local_server(tmp_path, local_server, monkeypatch):
    import hashlib
    import zipfile
    served, url = local_server
    source = _coco_fixture(tmp_path / "source")
    (served / "annotations").mkdir()
    (served / "zips").mkdir()
    with zipfile.ZipFile(served / "annotations" / "annotations_trainval2017.zip", "w") as zf:
        zf.write(source / "annotations" / "captions_val2017.json", "annotations/captions_val2017.json")
    with zipfile.ZipFile(served / "zips" / "val2017.zip", "w") as zf:
        for path in sorted((source / "val2017").iterdir()):
            zf.write(path, f"val2017/{path.name}")
    sizes = {name: (path, (served / path).stat().st_size, hashlib.md5((served / path).read_bytes()).hexdigest())
             for name, (path, _, _) in weights.downloader.COCO_ARCHIVES.items() if name != "train2017"}
    monkeypatch.setattr(weights.downloader, "COCO_URL", url)
    monkeypatch.setattr(weights.downloader, "COCO_ARCHIVES", sizes)
    ds = data.coco_captions(tmp_path / "coco", split="val", download=True)
    assert len(ds) == 10 and ds[0][0].size == (20, 16)
    assert (tmp_path / "coco" / ".val2017.unpacked").exists()
    (served / "zips" / "val2017.zip").unlink()  # unpacked once: a second call needs no server file
    assert len(data.coco_captions(tmp_path / "coco", split="val", download=True)) == 10


def test_coco_unpack_refuses_paths_outside_the_root(tmp_path, local_server, monkeypatch):
    import zipfile
    served, url = local_server
    (served / "zips").mkdir()
    with zipfile.ZipFile(served / "zips" / "val2017.zip", "w") as zf:
        zf.writestr("../escaped.txt", "x")
    monkeypatch.setattr(weights.downloader, "COCO_URL", url)
    monkeypatch.setattr(weights.downloader, "COCO_ARCHIVES", {"val2017": ("zips/val2017.zip", None, None)})
    (tmp_path / "coco").mkdir()
    with pytest.raises(ValueError, match="outside"):
        weights.fetch_coco("val2017", tmp_path / "coco")
    assert not (tmp_path / "escaped.txt").exists()


def test_karpathy_download_fetches_the_split_file(tmp_path, local_server, monkeypatch):
    """--download with Karpathy's splits: the COCO 2017 images and dataset_coco.json out of caption_datasets.zip."""
    import json
    import zipfile
    served, url = local_server
    source = _coco_fixture(tmp_path / "source")
    (served / "zips").mkdir()
    for split in ("train2017", "val2017"):
        with zipfile.ZipFile(served / "zips" / f"{split}.zip", "w") as zf:
            for path in sorted((source / "val2017").iterdir()) if split == "val2017" else ():
                zf.write(path, f"val2017/{path.name}")
    karpathy = {"images": [{"filename": f"COCO_val2014_{i:012d}.jpg", "cocoid": i, "split": "test",
                            "sentences": [{"raw": f"Raw {i}."}]} for i in (139, 285)]}
    with zipfile.ZipFile(served / "caption_datasets.zip", "w") as zf:
        zf.writestr("dataset_coco.json", json.dumps(karpathy))
        zf.writestr("dataset_flickr8k.json", "{}")
    monkeypatch.setattr(weights.downloader, "COCO_URL", url)
    monkeypatch.setattr(weights.downloader, "KARPATHY_URL", url + "caption_datasets.zip")
    monkeypatch.setattr(weights.downloader, "COCO_ARCHIVES", {name: (f"zips/{name}.zip", (served / f"zips/{name}.zip").stat().st_size,
                                                       None) for name in ("train2017", "val2017")})
    test = data.open_split("karpathy", "test", str(tmp_path / "coco"), download=True)
    assert test.pairs == [(139, "Raw 139."), (285, "Raw 285.")] and test[0][0].size == (20, 16)
    assert sorted(p.name for p in (tmp_path / "coco").glob("*.json")) == ["dataset_coco.json"]


def test_cifar100_download_checks_the_md5(tmp_path, local_server, monkeypatch):
    import hashlib
    served, url = local_server
    _cifar_fixture(served)
    archive = served / "cifar-100-python.tar.gz"
    monkeypatch.setattr(weights.downloader, "CIFAR100_URL", url + archive.name)
    monkeypatch.setattr(weights.downloader, "CIFAR100_SIZE", archive.stat().st_size)
    monkeypatch.setattr(weights.downloader, "CIFAR100_MD5", "0" * 32)
    with pytest.raises(ValueError, match="md5"):
        data.CIFAR100Captions(tmp_path / "a", download=True)
    assert (tmp_path / "a" / "cifar-100-python.tar.gz.bad").exists()  # kept aside, not silently used
    monkeypatch.setattr(weights.downloader, "CIFAR100_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    assert len(data.CIFAR100Captions(tmp_path / "b", download=True)) == 6
