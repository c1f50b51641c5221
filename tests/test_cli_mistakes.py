"""Every user mistake gets one clear line, and nothing a user made is lost: train.py and generate.py run as a user
runs them (subprocesses, in a scratch folder, with no weights anywhere and the network never reached), each mistake
checked for its one-line message (no traceback) and its exit code: 2 for a usage problem, 1 for a failure.

Commands that do not depend on each other run two at a time (the suite has two cores); the checkpoints they need are
trained once, in this process, with --smoke-test."""
import json
import os
import pickle
import queue
import resource
import struct
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train
import weights

REPO = Path(__file__).resolve().parents[1]


def png_header(w, h):
    """A valid PNG header claiming w x h pixels, and no pixel data: what a decompression bomb looks like unopened."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


# Each command runs in a process of its own, forked from a runner that has imported the entry points once (as the
# script would, minus the two seconds of `import torch` a fresh interpreter pays for each of ~50 commands); the
# runner itself never runs a torch op, so forking it is safe. A few commands run as `python train.py` for real.
RUNNER = r"""
import json, os, sys, traceback
import clip, generate, gpt2, train
for line in sys.stdin:
    script, cwd, args = json.loads(line)
    read_out, write_out = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.chdir(cwd)
        log = os.open(os.path.join(cwd, f".stderr-{os.getpid()}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(write_out, 1), os.dup2(log, 2)
        sys.argv = [script, *args]
        try:
            {"train.py": train, "generate.py": generate, "gpt2.py": gpt2, "clip.py": clip}[script].main()
            code = 0
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else (print(exit.code, file=sys.stderr) or 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code or 0)
    os.close(write_out)
    with os.fdopen(read_out) as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    with open(os.path.join(cwd, f".stderr-{pid}")) as f:
        err = f.read()
    os.unlink(os.path.join(cwd, f".stderr-{pid}"))
    print(json.dumps([os.waitstatus_to_exitcode(status), out, err]), flush=True)
"""


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A scratch folder to run in: no weights anywhere (weights dir, hub caches), datasets under data/, a shapes
    captioner and a shapes text-to-image checkpoint, a few images; and two runners (two commands at a time)."""
    root = tmp_path_factory.mktemp("user")
    env = {**os.environ, "MINIMODAL_WEIGHTS": str(root / "no-weights"), "MINIMODAL_DATA": str(root / "data"),
           "HF_HUB_CACHE": str(root / "no-hub"), "HF_HOME": str(root / "no-hub"), "XDG_CACHE_HOME": str(root / "no-hub"),
           "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(REPO)}
    for task in ("caption", "diffusion"):
        train.main(["--task", task, "--preset", "shapes", "--smoke-test", "--threads", "1", "--out-dir",
                    str(root / task), "--max-train-samples", "64", "--max-val-samples", "16", "--precision", "fp32"])
    (root / "photos").mkdir()
    for k in range(3):
        Image.new("RGB", (40, 30), (80 * k, 100, 50)).save(root / "photos" / f"{k}.jpg")
    runners = queue.Queue()
    for k in range(2):
        runners.put((k, subprocess.Popen([sys.executable, "-c", RUNNER], cwd=REPO, env=env, text=True,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)))
    yield root, env, runners
    while not runners.empty():
        _, runner = runners.get()
        runner.stdin.close()
        runner.wait(timeout=60)


def run(home, script, *args):
    """One command, run as a user runs it in the scratch folder: (exit code, stdout, stderr)."""
    root, env, runners = home
    k, runner = runners.get()
    try:
        runner.stdin.write(json.dumps([script, str(root), list(map(str, args))]) + "\n")
        runner.stdin.flush()
        code, out, err = json.loads(runner.stdout.readline())
    finally:
        runners.put((k, runner))
    return subprocess.CompletedProcess([script, *args], code, out, err)


def run_script(home, script, *args, timeout=180):
    """`python script args`, a fresh interpreter."""
    root, env, _ = home
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_all(home, commands, fresh=False):
    """(script, *args) each -> CompletedProcess each, two at a time (fresh: each `python script args`)."""
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda command: (run_script if fresh else run)(home, *command), commands))


def one_line(result, code, *parts):
    """The command failed with `code` and said so in one line holding `parts`: the last of stderr, or the one
    before indented details (a missing file's URL, path, size and sha256). Warnings may come before it."""
    assert result.returncode == code and "Traceback" not in result.stderr, (result.returncode, result.stderr[-3000:])
    lines = result.stderr.rstrip().splitlines()
    while len(lines) > 1 and lines[-1].startswith("  "):
        lines.pop()
    message = lines[-1] if lines else ""
    assert ": error: " in message, result.stderr[-3000:]
    for part in parts:
        assert part in message, (part, message)
    return message


# ---------------------------------------------------------------------------------------------------------------
# generate.py


def test_generate_prompts_are_never_file_names(home):
    """A 295-character SD prompt, 86 CJK characters (258 bytes), "" in a folder holding an image: prompts, decided
    without asking the file system anything that can fail; they get as far as the (missing) weights."""
    root = home[0]
    (root / "cat.png").write_bytes((root / "photos" / "0.jpg").read_bytes())
    long_prompt = ("a highly detailed matte painting of a lighthouse on a cliff at dawn, dramatic clouds, volumetric "
                   "light, crashing waves, seagulls, by a famous landscape painter, trending on artstation, 8k, "
                   "ultra wide angle, golden hour, cinematic composition, intricate details, sharp focus, moody, calm sea dusk")
    assert len(long_prompt) == 295
    results = run_all(home, [("generate.py", prompt, "--offline") for prompt in (long_prompt, "漢" * 86, "")],
                      fresh=True)
    for result in results:
        one_line(result, 1, "generate.py: error: offline: sd15/v1-5-pruned-emaonly.safetensors is not in")
        assert "File name too long" not in result.stderr and "caption" not in result.stderr


def test_generate_image_inputs(home):
    """An image without --ckpt (ClipCap's COCO captioner, not here: offline says which file from where), images and
    prompts mixed, a folder with no images, a mistyped image name; an
    argument that is a bare folder name captions, and says which mode it chose."""
    root = home[0]
    (root / "empty").mkdir(exist_ok=True)
    caption = root / "caption" / "ckpt.pt"
    without, mixed, empty, typo, folder = run_all(home, [
        ("generate.py", "photos/0.jpg", "--offline"), ("generate.py", "photos/0.jpg", "a red circle", "--ckpt", caption),
        ("generate.py", "empty", "--ckpt", caption), ("generate.py", "holiday.jpg"),
        ("generate.py", "photos", "--ckpt", caption)])
    one_line(without, 1, "generate.py: error: offline: clipcap/coco_weights.pt is not in ")
    assert "url:    https://drive.google.com/uc?id=1IdaBtMSvtyzF0ByVaBHtvM0JYSXRExRX&export=download&confirm=t" in \
        without.stderr and "put the file here by hand: " in without.stderr and "coco_weights.pt" in without.stderr
    one_line(mixed, 2, "give images to caption or prompts to draw, not both: 'photos/0.jpg' is an image input, "
             "'a red circle' a prompt")
    one_line(empty, 2, "no image files in the folder empty")
    one_line(typo, 2, "no such image file: holiday.jpg (--prompt 'holiday.jpg' draws it as a prompt)")
    assert folder.returncode == 0 and len(folder.stdout.splitlines()) == 3, folder.stderr
    assert "note: 'photos' names a folder here: captioning 3 image(s) (--prompt 'photos' draws it instead)" in \
        folder.stderr


def test_generate_checkpoints_and_unreadable_images(home):
    """--ckpt missing, corrupt, or of the other task; captioning where images cannot be read: it captions the
    others and exits 1 (every image unreadable: nothing captioned, still 1)."""
    root = home[0]
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "corrupt.pt").write_bytes(b"PK\x03\x04 not a zip")
    caption, diffusion = root / "caption" / "ckpt.pt", root / "diffusion" / "ckpt.pt"
    missing, corrupt, wrong_for_images, wrong_for_prompts, some, none = run_all(home, [
        ("generate.py", "photos", "--ckpt", "nowhere.pt"), ("generate.py", "photos", "--ckpt", "corrupt.pt"),
        ("generate.py", "photos", "--ckpt", diffusion), ("generate.py", "a red circle", "--ckpt", caption),
        ("generate.py", "broken.jpg", "photos/1.jpg", "--ckpt", caption), ("generate.py", "broken.jpg", "--ckpt", caption)])
    one_line(missing, 2, "generate.py: error: --ckpt nowhere.pt: no such file")
    one_line(corrupt, 1, "generate.py: error: corrupt.pt is not a readable checkpoint: ")
    one_line(wrong_for_images, 2, f"--ckpt {diffusion} is a train.py --task diffusion checkpoint: it draws prompts, "
             "and captioning images needs a --task caption one")
    one_line(wrong_for_prompts, 2, f"--ckpt {caption} is a train.py --task caption checkpoint: it captions images")
    one_line(some, 1, "generate.py: error: 1 of 2 images could not be read (each is named above)")
    assert some.stdout.startswith("photos/1.jpg\t") and "cannot read image broken.jpg" in some.stderr
    one_line(none, 1, "1 of 1 images could not be read")
    assert not none.stdout


def test_generate_init_images_bounded(home):
    """--init-image: a decompression bomb and a 12000 x 12000 image are refused from their header, before a pixel
    is decoded or any weights are read (4 GiB before); a FIFO is refused unread."""
    root = home[0]
    (root / "bomb.png").write_bytes(png_header(20000, 20000))
    (root / "large.png").write_bytes(png_header(12000, 12000))
    if not (root / "fifo.png").exists():
        os.mkfifo(root / "fifo.png")
    bomb, large, fifo = run_all(home, [("generate.py", "a cat", "--init-image", name, "--offline")
                                       for name in ("bomb.png", "large.png", "fifo.png")])
    one_line(bomb, 1, "generate.py: error: --init-image: cannot read image bomb.png: DecompressionBombError: Image "
             "size (400000000 pixels) exceeds limit")
    one_line(large, 1, "--init-image: cannot use image large.png: 12000x12000 pixels, more than 1,048,576 (--width "
             "and --height resize it; SD 1.5: 512x512)")
    one_line(fifo, 1, "--init-image: cannot read image fifo.png: not a regular file")


def test_generate_warns_of_prompts_the_model_cannot_read(home):
    """A trained text-to-image model draws, and warns of a prompt longer than its context and of words its training
    captions never used; --traceback shows the whole traceback instead of one line."""
    root = home[0]
    diffusion = root / "diffusion" / "ckpt.pt"
    drawn, debug = run_all(home, [
        ("generate.py", "a large red circle " * 4, "a purple dog", "--ckpt", diffusion, "--sampling-steps", "1",
         "--out-dir", "drawn", "--seed", "0"), ("generate.py", "photos", "--ckpt", "corrupt.pt", "--traceback")])
    assert drawn.returncode == 0, drawn.stderr
    assert "warning: the model reads 16 tokens, the rest is cut off: 'a large red circle a large red circle" in \
        drawn.stderr
    assert "warning: words its training captions never used, so it has not learned them: dog (in 'a purple dog')" \
        in drawn.stderr and len(list((root / "drawn").glob("0*.png"))) == 2
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr


# ---------------------------------------------------------------------------------------------------------------
# train.py: usage


TINY_CAPTION = ["--task", "caption", "--preset", "shapes", "--smoke-test", "--threads", "1", "--precision", "fp32",
                "--max-train-samples", "32", "--max-val-samples", "8", "--eval-every", "2", "--log-every", "1"]


def test_train_usage_mistakes_and_missing_data(home):
    root = home[0]
    (root / "empty").mkdir(exist_ok=True)
    results = run_all(home, [(*command, "--out-dir", f"runs/usage{k}") for k, command in enumerate([
        ("train.py", "--data", "folder"),
        ("train.py", "--data", "coco", "--data-root", "nowhere"),
        ("train.py", "--data", "coco", "--download", "--offline"),
        ("train.py", "--data", "karpathy", "--data-root", "empty"),
        ("train.py", "--data", "folder", "--data-root", "empty"),
        ("train.py", "--epochs", "x"),
        ("train.py", "--image-tower", "ViT-B/32"),
        ("train.py", "--task", "diffusion", "--two-objects", "1.5"),
        ("train.py", "--task", "diffusion", "--image-size", "16"),  # the preset's 3x3 patches, halved once
        # every number within its flag's bounds, refused before anything is built or trained (weights.flag): each
        # of these trained and then wrote a checkpoint --eval refused, or ended in a traceback, or climbed the loss
        ("train.py", "--task", "diffusion", "--s-noise", "-0.5"),
        ("train.py", "--task", "diffusion", "--image-size", "5000"),
        ("train.py", "--task", "diffusion", "--patch", "0"),
        ("train.py", "--task", "diffusion", "--sampling-steps", "0"),
        ("train.py", "--grad-clip", "-1"),
        ("train.py", "--lr", "0"),
        ("train.py", "--n-embd", "65", "--n-head", "2")])])
    one_line(results[0], 2, "train.py: error: --data folder needs --data-root DIR (images, captions file)")
    one_line(results[1], 2, "train.py: error: --data-root nowhere: no such folder")
    one_line(results[2], 2, "--offline never downloads: leave out --download")
    one_line(results[3], 2, "empty/dataset_coco.json not found: Karpathy's split file is dataset_coco.json in "
             "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip (unzip it there), or pass "
             "--download")
    one_line(results[4], 2, "train.py: error: no captions file in empty: expected one of")
    one_line(results[5], 2, "train.py: error: argument --epochs: invalid float value: 'x'")
    one_line(results[6], 2, "train.py: error: argument --image-tower: invalid choice: 'ViT-B/32' (choose from "
             "'tiny', 'clip')")
    one_line(results[7], 2, "train.py: error: argument --two-objects: 1.5 is out of range (0 to 1)")
    one_line(results[8], 2, "train.py: error: --image-size must be a multiple of 6: / 3 (--patch, VAE), halved 1x")
    one_line(results[9], 2, "train.py: error: argument --s-noise: -0.5 is out of range (0 to 1000)")
    one_line(results[10], 2, "train.py: error: argument --image-size: 5000 is out of range (1 to 4096)")
    one_line(results[11], 2, "train.py: error: argument --patch: 0 is out of range (1 to 64)")
    one_line(results[12], 2, "train.py: error: argument --sampling-steps: 0 is out of range (1 to 1000)")
    one_line(results[13], 2, "train.py: error: argument --grad-clip: -1 is out of range (at least 0)")
    one_line(results[14], 2, "train.py: error: --lr and --epochs must be > 0")
    one_line(results[15], 2, "train.py: error: --n-embd must be a multiple of --n-head")
    help_text = run_script(home, "train.py", "--help").stdout
    assert "(default: 0.01)" in help_text and "--task diffusion --preset sd15: --data folder" in help_text
    assert "--precision {auto,fp32,bf16,fp16}" in help_text and "--sampling-steps" in help_text
    assert "(default: 32; 1 to 4096)" in " ".join(help_text.split())  # --image-size's bounds, as --help says


def test_every_number_flag_is_bounded(capsys):
    """Each number flag of train.py refuses a value past its bounds at the command line, before anything is built
    (a negative --grad-clip climbed the loss; --patch 0 divided by zero; --image-size 5000 trained, then wrote a
    checkpoint --eval refused): one line, exit 2. A checkpoint holding one is refused the same way (above)."""
    numbers = [f for f in train.FLAGS if type(f.default) in (int, float)]
    assert len(numbers) == 40 and all(weights.checkpoints.within(f.default, f.metadata) for f in numbers)
    bounds = {f.name: f.metadata for f in numbers}  # and every preset's values (the smoke test's too)
    for name, value in [item for task in train.PRESETS.values() for preset in [*task.values(), train.SMOKE_TEST]
                        for item in preset.items() if item[0] in bounds]:
        assert weights.checkpoints.within(value, bounds[name]), (name, value)
    for f in numbers:
        least, most = f.metadata["least"], f.metadata["most"]
        nan = ["nan"] if type(f.default) is float else []
        for value in [least - 1] + ([most + 1] if most is not None else []) + nan:
            with pytest.raises(SystemExit) as exit:
                train.parse_config([f"--{f.name.replace('_', '-')}", str(value)])
            assert exit.value.code == 2 and f"{value} is out of range" in capsys.readouterr().err, f.name


def test_train_presets_without_weights_say_what_to_fetch(home):
    """coco, photos and sd15 need official weights: --offline says in one message which file goes where."""
    root = home[0]
    coco, photos, sd15 = run_all(home, [
        ("train.py", "--preset", "coco", "--data-root", "photos", "--offline", "--out-dir", "runs/coco"),
        ("train.py", "--task", "diffusion", "--preset", "photos", "--offline"),
        ("train.py", "--task", "diffusion", "--preset", "sd15", "--data-root", "photos", "--offline")])
    message = one_line(coco, 1)
    assert "offline: clip-vit-b-32/open_clip_model.safetensors is not in" in coco.stderr
    assert "put the file here by hand:" in coco.stderr and "Traceback" not in coco.stderr
    for result in (photos, sd15):
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert "train.py: error: offline: sd15/v1-5-pruned-emaonly.safetensors is not in" in result.stderr
        assert "https://huggingface.co/" in result.stderr and "sha256" in result.stderr
    assert message


def test_train_folder_data_errors(home):
    """Captions naming only missing images, a FIFO among the images (skipped, never read: it would block forever),
    a broken captions file."""
    root = home[0]
    for name, lines in (("ghosts", "a.jpg\ta ghost\nb.jpg\tanother ghost\nc.jpg\ta third\n"),
                        ("pipes", "fifo.jpg\ta pipe\n0.jpg\ta photo\n1.jpg\ta photo\n2.jpg\ta photo\n"),
                        ("broken", '{"file": "0.jpg"}\n')):
        (root / name).mkdir(exist_ok=True)
        (root / name / ("captions.jsonl" if name == "broken" else "captions.txt")).write_text(lines)
    for k in range(3):
        (root / "pipes" / f"{k}.jpg").write_bytes((root / "photos" / f"{k}.jpg").read_bytes())
    if not (root / "pipes" / "fifo.jpg").exists():
        os.mkfifo(root / "pipes" / "fifo.jpg")
    folder = [*TINY_CAPTION, "--data", "folder", "--batch-size", "2", "--epochs", "1"]
    ghosts, pipes, broken = run_all(home, [
        ("train.py", *folder, "--data-root", "ghosts", "--out-dir", "runs/ghosts"),
        ("train.py", *folder, "--data-root", "pipes", "--out-dir", "runs/pipes"),
        ("train.py", *folder, "--data-root", "broken", "--out-dir", "runs/broken")])
    one_line(ghosts, 1, "train.py: error: none of the 2 images of the train split of --data folder can be read "
             "(each is missing or unreadable)")
    assert pipes.returncode == 0, pipes.stderr[-2000:]
    assert "skipping bad image: cannot read image pipes/fifo.jpg: not a regular file" in pipes.stderr
    one_line(broken, 1, "broken/captions.jsonl:1: cannot read an image and a caption from")


# ---------------------------------------------------------------------------------------------------------------
# train.py: nothing a user made is lost


def log_steps(path):
    return [json.loads(line)["step"] for line in Path(path).read_text().splitlines() if "loss" in json.loads(line)]


def test_a_finished_run_is_never_replaced(home):
    """A new run in an --out-dir that holds a run is refused (the message names --resume and another --out-dir)
    unless --overwrite, which starts it afresh."""
    root = home[0]
    done = run(home, "train.py", *TINY_CAPTION, "--out-dir", "runs/done", "--epochs", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    before = (root / "runs/done/ckpt.pt").read_bytes()
    again = run(home, "train.py", *TINY_CAPTION, "--out-dir", "runs/done")
    one_line(again, 2, "train.py: error: runs/done holds a run (ckpt.pt, log.jsonl): --resume runs/done/ckpt.pt "
             "continues it, another --out-dir starts a new one, --overwrite replaces it")
    assert (root / "runs/done/ckpt.pt").read_bytes() == before
    fresh = run(home, "train.py", *TINY_CAPTION, "--out-dir", "runs/done", "--overwrite", "--epochs", "1")
    assert fresh.returncode == 0 and log_steps(root / "runs/done/log.jsonl") == [1, 2]


def test_resume_writes_only_where_the_user_says_and_cleans_up(home):
    """--stop-after says where it stopped and still evaluates when due; a resumed copy writes beside itself, never
    into the folder its config names; what a killed run left half-written is removed (a .part a live process holds
    is kept), and the log has no step twice after a resume."""
    root = home[0]
    stopped = run(home, "train.py", *TINY_CAPTION, "--out-dir", "runs/first", "--epochs", "3", "--stop-after", "2")
    assert stopped.returncode == 0 and "--stop-after 2: stopped at step 2 of 6; --resume runs/first/ckpt.pt " \
        "continues" in stopped.stdout, stopped.stderr[-2000:]
    records = [json.loads(line) for line in (root / "runs/first/log.jsonl").read_text().splitlines()]
    assert any(r["step"] == 2 and "exact_match" in r for r in records)  # the evaluation due at step 2 ran
    (root / "copy").mkdir(exist_ok=True)
    (root / "copy/ckpt.pt").write_bytes((root / "runs/first/ckpt.pt").read_bytes())
    untouched = {p: p.stat().st_mtime_ns for p in (root / "runs/first").rglob("*")}
    # a killed run: steps logged after its checkpoint, a half-written line, a checkpoint's temporary file, a cache
    with open(root / "copy/log.jsonl", "w") as f:
        f.write("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    (root / "copy/.ckpt.pt.x1y2z3.tmp").write_bytes(b"\0" * 1000)
    (root / "copy/cache").mkdir()
    (root / "copy/cache/pixels-abc.npy.part").write_bytes(b"\0" * 1000)
    held = root / "copy/cache/pixels-live.npy.part"
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'wb'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print(flush=True); time.sleep(120)", str(held)],
                              stdout=subprocess.PIPE, text=True)
    try:
        holder.stdout.readline()  # the lock is taken
        resumed = run_script(home, "train.py", "--resume", "copy/ckpt.pt", "--threads", "1")
    finally:
        holder.kill()
        holder.wait()
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.stderr.count("left half-written by a killed run") == 2
    assert "removed copy/cache/pixels-abc.npy.part, left half-written by a killed run" in resumed.stderr
    assert held.exists() and not (root / "copy/.ckpt.pt.x1y2z3.tmp").exists()
    assert log_steps(root / "copy/log.jsonl") == [1, 2, 3, 4, 5, 6]  # 3 and 4 once: their first logging dropped
    assert weights.load_checkpoint(root / "copy/ckpt.pt")["step"] == 6
    assert {p: p.stat().st_mtime_ns for p in (root / "runs/first").rglob("*")} == untouched


def test_a_checkpoint_is_data_not_instructions(home):
    """A crafted checkpoint names an --out-dir, a --data-root to download COCO into, a model far bigger than its
    tensors; another runs code when unpickled. None of it happens: one line each, nothing written, fetched or
    allocated."""
    root = home[0]
    checkpoint = weights.load_checkpoint(root / "caption" / "ckpt.pt")
    victim = root / "victim"
    checkpoint["config"].update(out_dir=str(victim), data_root=str(victim), download=True, data="coco")
    torch.save(checkpoint, root / "crafted.pt")
    checkpoint["config"].update(data="shapes")
    checkpoint["gpt_config"]["n_embd"] = 2 ** 20  # 50257 x 2^20 floats: 200 GB, if it were allocated
    torch.save(checkpoint, root / "huge.pt")
    checkpoint["config"].update(image_size=0, grad_clip=-1.0, n_head=10**5)  # flags past their bounds: --resume
    torch.save(checkpoint, root / "bounds.pt")  # would train on them

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {root / 'pwned'}",)
    (root / "evil.pt").write_bytes(pickle.dumps({"task": "caption", "config": {}, "model": Payload()}))
    crafted, huge, evil, typed, bounds = run_all(home, [
        ("train.py", "--eval", "crafted.pt"), ("train.py", "--eval", "huge.pt"), ("train.py", "--resume", "evil.pt"),
        ("train.py", "--eval", "caption/ckpt.pt", "--epochs", "3"), ("train.py", "--resume", "bounds.pt")])
    one_line(crafted, 2, "train.py: error: ", "captions_val2017.json not found: pass download=True (--download)")
    one_line(huge, 1, "train.py: error: the checkpoint's model does not match its config: ")
    one_line(evil, 1, "train.py: error: evil.pt is not a readable checkpoint: ")
    one_line(typed, 2, "caption/ckpt.pt is a --task caption checkpoint, scored as it was trained: --epochs do not apply")
    one_line(bounds, 1, "bounds.pt: its config holds values of the wrong type or size: ['grad_clip', 'image_size', "
             "'n_head']")
    assert not victim.exists() and not (root / "pwned").exists() and not (root / "data").exists()


def test_out_of_memory_is_one_line(home):
    """A model bigger than the machine's memory (here the address space capped at 4 GB) ends in one line and exit 1,
    not torch's allocator traceback: a GPT-2 of 100 blocks 4096 wide asks for 80 GB."""
    root, env, _ = home
    cap = lambda: resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # noqa: E731
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "--smoke-test", "--n-embd", "4096", "--n-layer",
                             "100", "--n-head", "64", "--out-dir", "runs/oom"], cwd=root, env=env, capture_output=True,
                            text=True, timeout=180, preexec_fn=cap)
    one_line(result, 1, "train.py: error: DefaultCPUAllocator: can't allocate memory: you tried to allocate ")


def test_eval_split_test_is_never_val(home):
    """--split test scores shapes' own test stream (not val: other captions, other scores); COCO 2017 refuses."""
    root = home[0]
    val, test, coco = run_all(home, [
        ("train.py", "--eval", "caption/ckpt.pt", "--split", "val", "--max-val-samples", "8"),
        ("train.py", "--eval", "caption/ckpt.pt", "--split", "test", "--max-val-samples", "8"),
        ("train.py", "--eval", "caption/ckpt.pt", "--split", "test", "--data", "coco")])
    assert val.returncode == test.returncode == 0, test.stderr[-2000:]
    assert "split: shapes val, 8 images" in val.stdout and "split: shapes test, 8 images" in test.stdout
    references = [[line for line in r.stdout.splitlines() if "reference:" in line] for r in (val, test)]
    assert references[0] and references[0] != references[1]
    one_line(coco, 2, "train.py: error: --split test: COCO 2017 publishes no test captions: score --split val, or "
             "use --data karpathy (its 5,000 test images)")


def test_minutes_says_what_happened(home):
    """--minutes on the real clock, timing-free: a budget spent at once stops after one step and says so (the budget
    logic on a slow and loaded machine is tested on a fake clock in test_train_diffusion.py)."""
    result = run(home, "train.py", *TINY_CAPTION, "--out-dir", "runs/minutes", "--minutes", "1e-6", "--epochs", "5")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--minutes 1e-06: 1 steps in 0.00 training minutes" in result.stdout
    assert "the budget ended it; --epochs 0.5 --minutes 0 trains as many steps" in result.stdout


def test_entry_points_help_shows_defaults_and_one_vocabulary(home):
    """--help of every entry point: the shared flags (--precision, --sampling-steps, --<family>-weights,
    --weights-dir, --offline) and the defaults."""
    generate_help, gpt2_help, clip_help = run_all(home, [("generate.py", "--help"), ("gpt2.py", "--help"),
                                                         ("clip.py", "--help")], fresh=True)
    for flag in ("--precision {auto,fp32,bf16,fp16}", "--sampling-steps", "--sd-weights", "--clip-weights",
                 "--weights-dir", "--offline", "--traceback", "(default: 0.8)"):
        assert flag in generate_help.stdout, flag
    assert "--gpt2-weights" in gpt2_help.stdout and "(default: gpt2)" in gpt2_help.stdout
    assert "--clip-weights" in clip_help.stdout and "(default: ViT-B/32)" in clip_help.stdout
