"""Helpers and fixtures shared by the test files (pytest loads this file first; tests import helpers from it).

- `one_thread`: a module fixture for files whose tensors are tiny (`pytestmark = pytest.mark.usefixtures(...)`).
- `expected_shapes(cls, config, prefix)`, `count_parameters(cls, config)`: a model's official key -> shape table and
  its parameter count, built on the meta device (no memory, no init), for the key-set and preset-size tests.
- `openai_to_hf(sd)`, `sd_text_encoder_shapes(prefix)`: clip.py's Hugging Face table read right-to-left, and the
  official key table of Stable Diffusion 1.x's text encoder that it gives.
- `clip_vitb32_config()`: transformers' CLIPConfig of CLIP ViT-B/32 (the oracle's configuration).
- `logged_losses(out_dir)`: the training losses train.py wrote to out_dir/log.jsonl.
- `local_server(handler, **state)`: an HTTP server on 127.0.0.1 in a thread (the download tests' fake hosts),
  `state` set on it for the handler to read, `.url` its address; shut down on leaving.
- `clipcap_coco`: a module fixture, ClipCap's MLP captioner at the released configuration (tests/clipcap_oracle.py,
  random weights, "." planted as its 4th token) and the file it was saved to in the released layout
  (coco_weights.pt, 636 MB): one build and one file per test module that asks for it.
Stable Diffusion's oracles (diffusers' models and schedulers) are in sd_oracle.py: only the files that need them
import diffusers.
"""
import contextlib
import http.server
import json
import math
import threading

import pytest
import torch

import clip


@contextlib.contextmanager
def local_server(handler, **state):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads, httpd.log = True, []
    for name, value in state.items():
        setattr(httpd, name, value)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture(scope="module")
def one_thread():
    """These tensors are tiny: one thread beats two, whose OpenMP barriers stall whenever the (shared) machine
    is busy (measured: 0.15 s against 3-11 s for one tiny pipeline run)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def expected_shapes(cls, config, prefix=""):
    """The parameter keys (with prefix) and shapes of cls(config), without allocating memory."""
    with torch.device("meta"):
        model = cls(config)
    return {prefix + k: tuple(v.shape) for k, v in model.state_dict().items()}


def count_parameters(cls, config):
    return sum(math.prod(shape) for shape in expected_shapes(cls, config).values())


def openai_to_hf(sd):
    """The inverse of clip.hf_to_openai (lists the official SD key set; works on meta tensors)."""
    rules = [(new, old) for old, new in clip.HF_TO_OPENAI]
    out = {}
    for key, value in sd.items():
        value = value.t() if key in clip.TRANSPOSED else value
        if ".attn.in_proj_" in key:
            stem, kind = key.split(".attn.in_proj_")
            for n, part in zip("qkv", value.chunk(3)):
                out[clip.rename_key(f"{stem}.self_attn.{n}_proj.{kind}", rules)] = part
        else:
            out[clip.rename_key(key, rules)] = value
    return out


def sd_text_encoder_shapes(prefix="cond_stage_model.transformer."):
    """The official key -> shape table of SD 1.x's text encoder (196 tensors, 123,060,480 params), with HF's
    names under `prefix` as in v1-5-pruned-emaonly.safetensors; `…embeddings.position_ids` is not listed."""
    with torch.device("meta"):
        model = clip.CLIPTextTransformer(clip.PRESETS["ViT-L/14"].text)
    return {prefix + k: tuple(v.shape) for k, v in openai_to_hf(model.state_dict()).items()}


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


@pytest.fixture(scope="module")
def clipcap_coco(tmp_path_factory):
    import clipcap_oracle as oracle
    model = oracle.plant_token(oracle.build_clipcap("mlp", seed=0), step=3)
    return model, oracle.save_released(model, tmp_path_factory.mktemp("clipcap") / "coco_weights.pt")
