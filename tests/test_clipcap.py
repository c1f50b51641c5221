"""ClipCap's released captioners loaded by gpt2.py (Captioner.from_pretrained / from_clipcap), against ClipCap's own
code (tests/clipcap_oracle.py: its modules around transformers' GPT2LMHeadModel, its generate2 and generate_beam):
files written with random weights at the full 124M configuration in the released layout (`gpt.` with the 2021 mask
buffers, `clip_project.`), prefix embeddings and logits within 1e-4, greedy and beam-5 captions token for token;
both mapper kinds at 512-d, the 640-d (CLIP RN50x4) file refused, a file that would run code refused, and
generate.py captioning an image with a local file (--captioner PATH)."""
import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import GPT2Config

import clipcap_oracle as oracle
import weights
from bounded import run_bounded
from gpt2 import GPT, Captioner, GPTConfig, clipcap_beams
from tokenizer import GPT2Tokenizer
from vit import VISION_PRESETS, VisionTransformer, preprocess

REPO = Path(__file__).resolve().parent.parent


def largest_difference(a, b):
    return (a - b).abs().max().item()


def check_parity(ours, reference, normalize, prefix_length):
    """Prefix embeddings and logits of a caption after them, ours against ClipCap's, within 1e-4."""
    embeddings = torch.randn(2, 512, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected_prefix = oracle.prefix_embeddings(reference, embeddings, normalize=normalize)
        prefix = ours.prefix(embeddings)
        assert prefix.shape == (2, prefix_length, 768)
        assert largest_difference(prefix, expected_prefix) <= 1e-4, largest_difference(prefix, expected_prefix)
        tokens = torch.randint(0, 50257, (2, 7), generator=torch.Generator().manual_seed(1))
        expected = reference(tokens, embeddings).logits if not normalize else reference.gpt(
            inputs_embeds=torch.cat([expected_prefix, reference.gpt.transformer.wte(tokens)], dim=1)).logits
        logits = ours.gpt(tokens, prefix_embeds=prefix)
        print(f"prefix {largest_difference(prefix, expected_prefix):.2e}, "
              f"logits {largest_difference(logits, expected):.2e}")
        assert largest_difference(logits, expected) <= 1e-4


def check_decoding(ours, reference, normalize):
    """Greedy (generate2) and beam-5 (generate_beam) captions, token for token, for a batch of two images."""
    embeddings = torch.randn(2, 512, generator=torch.Generator().manual_seed(2))
    greedy, beams = ours.generate(embeddings).tolist(), ours.generate(embeddings, num_beams=5).tolist()
    for i in range(2):
        prefix = oracle.prefix_embeddings(reference, embeddings[i:i + 1], normalize=normalize)
        expected, (expected_beam, _) = oracle.greedy_decode(reference, prefix), oracle.beam_decode(reference, prefix)[0]
        assert expected[-1] == oracle.STOP_TOKEN and greedy[i][:len(expected)] == expected, (greedy[i], expected)
        assert beams[i][:len(expected_beam)] == expected_beam, (beams[i], expected_beam)
        assert set(greedy[i][len(expected):] + beams[i][len(expected_beam):]) <= {oracle.STOP_TOKEN}


def test_released_mlp_file_equals_clipcap(clipcap_coco):
    """coco_weights.pt's layout: GPT-2 fine-tuned in the file, MLP mapper, the raw CLIP embedding, "." ends."""
    reference, path = clipcap_coco
    ours = Captioner.from_pretrained(str(path)).eval()
    config = ours.config
    assert (config.mapping_type, config.prefix_size, config.prefix_length, config.normalize_prefix) == \
        ("mlp", 512, 10, False)
    assert (config.eos_token_id, config.max_caption_tokens, config.beam_rule) == (oracle.STOP_TOKEN, 67, "clipcap")
    check_parity(ours, reference, normalize=False, prefix_length=10)
    check_decoding(ours, reference, normalize=False)
    text = ours.caption(torch.randn(1, 512), GPT2Tokenizer.default())[0]
    assert text.endswith("."), text  # the full stop is part of ClipCap's caption


def test_transformer_mapper_file_without_gpt2(tmp_path, monkeypatch):
    """The transformer mapper (8 blocks, 40 + 40 vectors) at 512-d, saved without GPT-2 (a frozen GPT-2 is not
    saved by everyone): GPT-2 then comes from the official file (here the reference's GPT-2 in its place); the
    embedding is L2-normalised first."""
    reference = oracle.plant_token(oracle.build_clipcap("transformer", prefix_size=512, prefix_length=40, seed=3), 2)
    path = oracle.save_released(reference, tmp_path / "transformer_mapper.pt", include_gpt=False)
    official = {k: v for k, v in reference.gpt.state_dict().items()}  # the GPT-2 file, HF's names
    asked = []
    monkeypatch.setattr(GPT, "from_pretrained", classmethod(
        lambda cls, name, root=None, offline=False: asked.append((name, offline)) or cls.from_state_dict(official)))
    ours = Captioner.from_pretrained(str(path), offline=True).eval()
    assert asked == [("gpt2", True)]
    config = ours.config
    assert (config.mapping_type, config.prefix_length, config.clip_length, config.num_layers, config.normalize_prefix) \
        == ("transformer", 40, 40, 8, True)
    check_parity(ours, reference, normalize=True, prefix_length=40)
    check_decoding(ours, reference, normalize=True)


def test_beam_search_with_beams_that_stop_early():
    """generate_beam's rules where they matter: beams end at different steps, a finished beam stays (extended by
    token 0 at no cost) and is ranked by its mean log-probability; here a small GPT-2 with 40 tokens, whose stop
    token 20 comes on its own (a random 124M model never says "."), over a batch of four, against the oracle."""
    small = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=40, n_positions=128, attn_implementation="eager")
    reference = oracle.build_clipcap("mlp", seed=1, gpt2_config=small)
    gpt = GPT.from_state_dict(oracle.released_state_dict(reference), "gpt.", GPTConfig(40, 128, 64, 4, 2))
    prefix = oracle.prefix_embeddings(reference, torch.randn(4, 512, generator=torch.Generator().manual_seed(20)))
    ours, lengths = clipcap_beams(gpt, prefix, 67, 5, 20).tolist(), []
    for i in range(4):
        beams = oracle.beam_decode(reference, prefix[i:i + 1], stop_token=20)
        assert ours[i][:len(beams[0][0])] == beams[0][0] and set(ours[i][len(beams[0][0]):]) <= {20}
        lengths.append(sorted(len(tokens) for tokens, _ in beams))
    assert lengths[1] == [32, 44, 45, 51, 67], lengths  # the case looked for: the best beam stopped, after others


def test_rn50x4_transformer_file_is_refused(tmp_path):
    """ClipCap's released transformer-mapper file maps CLIP RN50x4's 640-d embeddings: refused, by name, before
    anything is fetched (offline, no weights here)."""
    model = oracle.build_clipcap("transformer", prefix_size=640, prefix_length=40,
                                 gpt2_config=GPT2Config(n_layer=1, attn_implementation="eager"))
    path = oracle.save_released(model, tmp_path / "coco_prefix_transformer.pt", include_gpt=False)
    with pytest.raises(ValueError, match="RN50x4's 640-d"):
        Captioner.from_pretrained(str(path), root=tmp_path / "none", offline=True)
    with pytest.raises(ValueError, match="not a ClipCap captioner"):
        Captioner.from_clipcap({"gpt.transformer.wte.weight": torch.zeros(3, 4)})


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def open_clipcap(path, root):
    return type(Captioner.from_pretrained(path, root=root, offline=True)).__name__


def test_a_file_that_runs_code_is_refused(tmp_path):
    """A captioner file in the released layout whose pickle calls os.system (a REDUCE): refused, nothing runs."""
    model = oracle.build_clipcap("transformer", prefix_size=512, prefix_length=4, num_layers=1,
                                 gpt2_config=GPT2Config(n_layer=1, attn_implementation="eager"))
    state = collections.OrderedDict(oracle.released_state_dict(model, include_gpt=False))
    state["clip_project.evil"] = Payload(tmp_path / "pwned")
    torch.save(state, tmp_path / "coco_weights.pt")
    outcome = run_bounded("test_clipcap:open_clipcap", str(tmp_path / "coco_weights.pt"), str(tmp_path / "none"),
                          memory_mb=1024, seconds=60)
    assert outcome.raised("UnsafeCheckpointError", "UnpicklingError"), str(outcome)
    assert "system" in outcome.message and not (tmp_path / "pwned").exists()


def test_generate_captions_with_a_clipcap_file(clipcap_coco, tmp_path):
    """python generate.py photo.jpg --captioner PATH: the caption of ClipCap's file through CLIP ViT-B/32 (a random
    tower given as --clip-weights), as the loaded captioner writes it in this process."""
    _, path = clipcap_coco
    torch.manual_seed(0)
    tower = VisionTransformer(VISION_PRESETS["ViT-B/32"])
    weights.write_safetensors({f"visual.{k}": v for k, v in tower.state_dict().items()}, tmp_path / "clip.safetensors")
    Image.new("RGB", (64, 48), (200, 30, 90)).save(tmp_path / "photo.jpg")
    env = {**os.environ, "MINIMODAL_WEIGHTS": str(tmp_path / "no-weights"), "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, str(REPO / "generate.py"), "photo.jpg", "--captioner", str(path),
                             "--clip-weights", "clip.safetensors", "--offline", "--json", "--num-beams", "5"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    model = Captioner.from_pretrained(str(path), tower).eval()
    expected = model.caption(preprocess(str(tmp_path / "photo.jpg"))[None], GPT2Tokenizer.default(), num_beams=5)[0]
    assert json.loads(result.stdout) == {"file": "photo.jpg", "caption": expected} and expected.endswith(".")


def test_train_starts_from_clipcap_and_eval_scores_it(clipcap_coco, tmp_path, monkeypatch, capsys):
    """train.py --task caption --captioner FILE fine-tunes ClipCap's captioner (its config, stop rule and GPT-2 from
    the file; here its mapper only, which keeps AdamW's state small) and its checkpoint is rebuilt and scored by
    --eval; --eval coco scores the released file as it is."""
    import train
    _, path = clipcap_coco
    torch.manual_seed(0)
    weights.write_safetensors({f"visual.{k}": v for k, v in VisionTransformer(VISION_PRESETS["ViT-B/32"])
                               .state_dict().items()}, tmp_path / "clip.safetensors")
    common = ["--image-tower", "clip", "--clip-weights", str(tmp_path / "clip.safetensors"), "--max-val-samples", "2",
              "--threads", "1", "--offline", "--weights-dir", str(tmp_path / "weights")]
    train.main(["--task", "caption", "--preset", "shapes", "--language-model", "gpt2", "--mapping-type", "mlp",
                "--no-closed-vocab", "--captioner", str(path), "--freeze-gpt", "--max-train-samples", "4",
                "--batch-size", "2", "--stop-after", "1", "--lr", "1e-5", "--out-dir", str(tmp_path / "run"), *common])
    checkpoint = weights.read_checkpoint(tmp_path / "run" / "ckpt.pt")
    assert checkpoint["captioner_config"]["eos_token_id"] == oracle.STOP_TOKEN
    assert checkpoint["captioner_config"]["beam_rule"] == "clipcap" and checkpoint["frozen_tower"]
    capsys.readouterr()
    train.main(["--eval", str(tmp_path / "run" / "ckpt.pt"), "--clip-weights", str(tmp_path / "clip.safetensors")])
    out = capsys.readouterr().out
    assert "checkpoint " in out and ": step 1 of " in out and "BLEU-4" in out and "CIDEr-D" in out, out
    (tmp_path / "weights" / "clipcap").mkdir(parents=True)
    (tmp_path / "weights" / "clipcap" / "coco_weights.pt").symlink_to(path)  # as if fetched
    train.main(["--eval", "coco", "--task", "caption", "--preset", "shapes", "--language-model", "gpt2",
                "--mapping-type", "mlp", "--no-closed-vocab", *common])
    out = capsys.readouterr().out
    assert "checkpoint coco: as released on shapes" in out and "mlp mapper" in out and "CIDEr-D" in out, out
