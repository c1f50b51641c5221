"""Helpers and fixtures shared by the test files (pytest loads this file first; tests import helpers from it).

- `one_thread`: a module fixture for files whose tensors are tiny (`pytestmark = pytest.mark.usefixtures(...)`).
- `clip_vitb32_config()`: transformers' CLIPConfig of CLIP ViT-B/32 (the oracle's configuration).
- `logged_losses(out_dir)`: the training losses train.py wrote to out_dir/log.jsonl.
Stable Diffusion's oracles (diffusers' models and schedulers) are in sd_oracle.py: only the files that need them
import diffusers.
"""
import json

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """These tensors are tiny: one thread beats two, whose OpenMP barriers stall whenever the (shared) machine
    is busy (measured: 0.15 s against 3-11 s for one tiny pipeline run)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def clip_vitb32_config():
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig
    return CLIPConfig(
        text_config=CLIPTextConfig(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                                   num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu"),
        vision_config=CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                       num_attention_heads=12, image_size=224, patch_size=32, hidden_act="quick_gelu"),
        projection_dim=512)


def logged_losses(out_dir):
    return [r["loss"] for r in map(json.loads, (out_dir / "log.jsonl").read_text().splitlines()) if "loss" in r]
