"""gpt2.py against transformers' GPT2LMHeadModel (the oracle), at the full 124M configuration.

The reference gets random weights (seeded; biases and LayerNorm gains random too, so that outputs depend on the
context and greedy decoding does not collapse onto one token) and is written in the two official file layouts:
`model.safetensors` as on the hub (no "transformer." prefix, 160 tensors including the 12 h.N.attn.bias mask
buffers, no lm_head) and a legacy pre-zip `pytorch_model.bin` (prefixed keys, lm_head.weight and the old
attn.masked_bias buffers). Our code loads both files through weights/ and must agree in float32.
"""
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

import weights
from gpt2 import GPT, PRESETS, GPTConfig, sample_next_token
from tokenizer import pad_left

REPO = Path(__file__).resolve().parents[1]
EOT = 50256
TOLERANCE = 1e-4


def max_diff(a, b):
    return (a - b).abs().max().item()


def until(rows, eos):
    """Each row cut after its first eos (we fill finished rows with eos, transformers with pad_token_id)."""
    return [row[:row.index(eos) + 1] if eos in row else row for row in rows.tolist()]


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    with torch.device("meta"):  # skip HF's own random init: every tensor is set below
        model = GPT2LMHeadModel(GPT2Config(attn_implementation="eager"))
    model = model.to_empty(device="cpu").eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.transformer.named_parameters():
            if ".ln_" in name and name.endswith("weight") or name == "ln_f.weight":
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_((0.02 if p.dim() == 1 else 0.05) * torch.randn(p.shape, generator=generator))
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    return model


@pytest.fixture(scope="module")
def files(reference, tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    tensors = {k: v.contiguous() for k, v in reference.transformer.state_dict().items()}
    mask = torch.tril(torch.ones(1024, 1024)).view(1, 1, 1024, 1024)
    official = {**tensors, **{f"h.{i}.attn.bias": mask.clone() for i in range(12)}}
    assert len(official) == 160 and "lm_head.weight" not in official
    save_file(official, root / "model.safetensors", metadata={"format": "pt"})
    legacy = {f"transformer.{k}": v for k, v in tensors.items()}
    legacy.update({f"transformer.h.{i}.attn.masked_bias": torch.tensor(-1e4) for i in range(12)})
    legacy["lm_head.weight"] = tensors["wte.weight"]  # tied: torch.save stores the shared storage once
    (root / "legacy").mkdir()
    torch.save(legacy, root / "legacy" / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    return root


@pytest.fixture(scope="module")
def ours(files):
    return GPT.from_pretrained(str(files / "model.safetensors")).eval()


def tokens(*shape, seed=1):
    return torch.randint(0, EOT, shape, generator=torch.Generator().manual_seed(seed))


def test_logits_match_reference_from_both_official_files(reference, files, ours):
    legacy = GPT.from_pretrained(files / "legacy").eval()  # a directory: finds pytorch_model.bin
    for name, model in [("model.safetensors", ours), ("pytorch_model.bin", legacy)]:
        for key, value in reference.transformer.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), key
    idx = tokens(2, 48)
    with torch.no_grad():
        expected = reference(idx).logits
        for name, model in [("model.safetensors", ours), ("pytorch_model.bin", legacy)]:
            difference = max_diff(model(idx), expected)
            print(f"{name}: logits max abs diff {difference:.2e}")
            assert difference <= TOLERANCE


def test_greedy_tokens_match_reference(reference, ours):
    idx = tokens(1, 8)
    expected = reference.generate(idx, max_new_tokens=20, do_sample=False, pad_token_id=EOT)[:, 8:]
    assert ours.generate(idx, 20).tolist() == expected.tolist()
    assert len(set(expected[0].tolist())) > 5  # the random model does not just repeat one token


def test_cached_logits_equal_uncached(ours):
    idx = tokens(2, 24)
    with torch.no_grad():
        full = ours(idx)
        logits, past = ours(idx[:, :10], use_cache=True)
        steps = [logits]
        for t in range(10, 24, 7):  # several tokens per cached step, then checks a causal mask with an offset
            logits, past = ours(idx[:, t:t + 7], past_key_values=past, use_cache=True)
            steps.append(logits)
    difference = max_diff(torch.cat(steps, dim=1), full)
    print(f"cached vs uncached: max abs diff {difference:.2e}")
    assert difference <= TOLERANCE


def test_sdpa_equals_plain_attention(ours):
    plain = GPT(ours.config).set_attention(use_sdpa=False).eval()
    plain.load_state_dict(ours.state_dict())
    idx, attention_mask = pad_left([tokens(13).tolist(), tokens(5, seed=2).tolist()], EOT)
    with torch.no_grad():
        for kwargs in [{}, {"attention_mask": attention_mask}]:
            difference = max_diff(plain(idx, **kwargs)[attention_mask.bool()], ours(idx, **kwargs)[attention_mask.bool()])
            print(f"sdpa vs plain {list(kwargs)}: max abs diff {difference:.2e}")
            assert difference <= TOLERANCE
    assert plain.generate(idx, 4, attention_mask).tolist() == ours.generate(idx, 4, attention_mask).tolist()


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_unpadded_rows(ours, side):
    rows = [tokens(n, seed=n).tolist() for n in (5, 12, 9)]
    idx, attention_mask = pad_left(rows, EOT)
    if side == "right":  # the training layout: real tokens first, padding after
        idx = torch.tensor([r + [EOT] * (12 - len(r)) for r in rows])
        attention_mask = torch.tensor([[1] * len(r) + [0] * (12 - len(r)) for r in rows])
    with torch.no_grad():
        batched = ours(idx, attention_mask=attention_mask)
        for row, logits, mask in zip(rows, batched, attention_mask.bool()):
            difference = max_diff(logits[mask], ours(torch.tensor([row]))[0])
            print(f"{side} padding, row of {len(row)}: max abs diff {difference:.2e}")
            assert difference <= TOLERANCE


def test_batched_generation_with_left_padding_matches_reference_and_single_rows(reference, ours):
    rows = [tokens(n, seed=n).tolist() for n in (4, 10)]
    idx, attention_mask = pad_left(rows, EOT)
    batched = ours.generate(idx, 6, attention_mask)
    expected = reference.generate(idx, attention_mask=attention_mask, max_new_tokens=6, do_sample=False,
                                  pad_token_id=EOT)[:, idx.size(1):]
    assert batched.tolist() == expected.tolist()
    for row, generated in zip(rows, batched):
        assert ours.generate(torch.tensor([row]), 6).tolist() == [generated.tolist()]


def test_prefix_embeds_and_hidden_states_match_inputs_embeds(reference, ours):
    prefix = 0.1 * torch.randn(2, 5, 768, generator=torch.Generator().manual_seed(3))  # e.g. an image prefix
    idx = tokens(2, 7)
    with torch.no_grad():
        inputs_embeds = torch.cat([prefix, reference.transformer.wte(idx)], dim=1)
        difference = max_diff(ours(idx, prefix_embeds=prefix), reference(inputs_embeds=inputs_embeds).logits)
        hidden = ours(idx, prefix_embeds=prefix, return_hidden=True)
        hidden_difference = max_diff(hidden, reference.transformer(inputs_embeds=inputs_embeds).last_hidden_state)
    print(f"prefix_embeds: logits max abs diff {difference:.2e}, hidden {hidden_difference:.2e}")
    assert difference <= TOLERANCE and hidden_difference <= TOLERANCE
    # generation from the prefix alone (no token ids), as a captioner starts
    expected = reference.generate(inputs_embeds=prefix, max_new_tokens=5, do_sample=False, pad_token_id=EOT)
    assert ours.generate(None, 5, prefix_embeds=prefix).tolist() == expected.tolist()


def test_beam_search_matches_reference(reference, ours):
    idx, attention_mask = pad_left([tokens(6, seed=4).tolist(), tokens(9, seed=5).tolist()], EOT)
    hf = dict(attention_mask=attention_mask, num_beams=4, do_sample=False, pad_token_id=EOT)
    expected = reference.generate(idx, max_new_tokens=5, **hf)[:, idx.size(1):]
    assert ours.generate(idx, 5, attention_mask, num_beams=4).tolist() == expected.tolist()
    # make a token the beams actually meet the end token, so that hypotheses finish early and get length-penalised
    eos = expected[0, 2].item()
    expected = reference.generate(idx, max_new_tokens=5, eos_token_id=eos, length_penalty=0.5, **hf)[:, idx.size(1):]
    got = ours.generate(idx, 5, attention_mask, num_beams=4, length_penalty=0.5, eos_token_id=eos)
    assert until(got, eos) == until(expected, eos) and eos in got[0].tolist()


def test_end_of_text_stops_each_row(ours):
    rows = [tokens(n, seed=n).tolist() for n in (4, 10)]
    idx, attention_mask = pad_left(rows, EOT)
    free = ours.generate(idx, 6, attention_mask, eos_token_id=None)
    eos = free[0, 2].item()  # row 0 says this at step 2: it must stop there, the other row runs on
    assert eos not in free[1].tolist()
    out = ours.generate(idx, 6, attention_mask, eos_token_id=eos)
    assert out[0].tolist() == free[0, :3].tolist() + [eos] * 3
    assert out[1].tolist() == free[1].tolist()
    single = ours.generate(torch.tensor(rows[:1]), 6, eos_token_id=eos)
    assert single.tolist() == [free[0, :3].tolist()]  # a batch with every row finished stops early


def test_sampling_is_reproducible_and_respects_top_k_top_p(ours):
    idx = tokens(2, 6)
    greedy = ours.generate(idx, 4)
    assert torch.equal(ours.generate(idx, 4, temperature=0.7, top_k=1, generator=torch.Generator().manual_seed(0)),
                       greedy)
    assert torch.equal(ours.generate(idx, 4, temperature=1.0, top_p=1e-6, generator=torch.Generator().manual_seed(0)),
                       greedy)
    first = ours.generate(idx, 4, temperature=1.0, generator=torch.Generator().manual_seed(7))
    again = ours.generate(idx, 4, temperature=1.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, again)
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    k3 = sample_next_token(logits, 1.0, top_k=3, generator=torch.Generator().manual_seed(0))
    assert set(k3.tolist()) == {0, 1, 2}
    probs = logits[0].softmax(-1)  # 0.64, 0.24, 0.09, ...: top_p=0.8 keeps the first two (0.64 < 0.8 <= 0.87)
    p8 = sample_next_token(logits, 1.0, top_p=0.8, generator=torch.Generator().manual_seed(0))
    assert set(p8.tolist()) == {0, 1} and probs[:1].sum() < 0.8 <= probs[:2].sum()
    share = (p8 == 0).float().mean().item()  # renormalised: 0.64 / 0.87 = 0.73
    assert abs(share - probs[0] / probs[:2].sum()) < 0.03


def test_key_set_and_shape_errors_are_named(files):
    good = weights.load_state_dict(files / "model.safetensors")
    broken = dict(good)
    broken.pop("h.3.mlp.c_fc.bias")
    broken["h.3.mlp.c_fc.extra"] = torch.zeros(3)
    broken["h.5.attn.c_proj.weight"] = torch.zeros(768, 769)
    with pytest.raises(ValueError) as error:
        GPT.from_state_dict(broken)
    message = str(error.value)
    assert "missing 1: ['h.3.mlp.c_fc.bias']" in message
    assert "unexpected 1: ['h.3.mlp.c_fc.extra']" in message
    assert "h.5.attn.c_proj.weight: file (768, 769) != model (768, 768)" in message
    untied = {**good, "lm_head.weight": good["wte.weight"] + 1}
    with pytest.raises(ValueError, match="lm_head.weight differs from wte.weight"):
        GPT.from_state_dict(untied)
    with pytest.raises(ValueError, match="n_ctx"):
        GPT.from_state_dict({**good, "wpe.weight": good["wpe.weight"][:512]})
    with pytest.raises(ValueError, match="no GPT-2 preset has n_layer=11"):
        GPT.from_state_dict({k: v for k, v in good.items() if not k.startswith("h.11.")})
    with pytest.raises(ValueError, match="not a GPT-2 state dict"):
        GPT.from_state_dict({"weight": torch.zeros(2)})
    broken_file = files / "broken" / "model.safetensors"  # and the same report through a file on disk
    broken_file.parent.mkdir(exist_ok=True)
    save_file({k: v for k, v in good.items() if k != "ln_f.bias"}, broken_file)
    with pytest.raises(ValueError, match=r"missing 1: \['ln_f.bias'\]"):
        GPT.from_pretrained(broken_file.parent)


def test_state_dict_under_a_prefix(files, ours):
    """from_state_dict(sd, prefix=...) picks one model's tensors out of a larger checkpoint."""
    sd = {"captioner.gpt." + k: v for k, v in weights.load_state_dict(files / "model.safetensors").items()}
    sd["captioner.clip_project.model.0.weight"] = torch.zeros(3)  # another model's tensor beside it
    model = GPT.from_state_dict(sd, prefix="captioner.gpt.")
    for key, value in ours.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_config_stored_before_set_attention_still_loads():
    """Checkpoints store GPTConfig as a dict; those written while it had an `sdpa` field rebuild the same config
    (weights.upgrade maps the old settings of a checkpoint, this one included)."""
    def stored(config):
        checkpoint = {"task": "caption", "config": {}, "model": {}, "captioner_config": {}, "gpt_config": config}
        return GPTConfig(**weights.upgrade(checkpoint)["gpt_config"])
    assert stored({**asdict(PRESETS["gpt2-medium"]), "sdpa": False}) == PRESETS["gpt2-medium"]
    assert stored(asdict(PRESETS["gpt2"])) == PRESETS["gpt2"]


def test_config_and_errors_for_long_inputs(ours):
    with pytest.raises(ValueError, match="exceed"):
        ours(torch.zeros(1, 1025, dtype=torch.long))
    with pytest.raises(ValueError, match="context of 1024"):
        ours.generate(torch.zeros(1, 1020, dtype=torch.long), 10)
    with pytest.raises(ValueError, match="attention_mask"):
        ours(torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 3))


@pytest.mark.parametrize("name,count", [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168),
                                        ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)])
def test_preset_parameter_counts(name, count):
    with torch.device("meta"):
        model = GPT(PRESETS[name])
    assert sum(p.numel() for p in model.parameters()) == count
    assert len(model.state_dict()) == 12 * PRESETS[name].n_layer + 4  # the official keys, nothing else


def test_small_config_trains(ours):
    """Gradients flow through prefix embeddings and every weight (what the captioner relies on)."""
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, n_ctx=64, dropout=0.1)).train()
    prefix = torch.randn(2, 3, 32, requires_grad=True)
    idx = tokens(2, 6)
    hidden = model(idx[:, :-1], prefix_embeds=prefix, return_hidden=True)
    loss = torch.nn.functional.cross_entropy(model.lm_head(hidden[:, 3:]).flatten(0, 1), idx[:, 1:].flatten())
    loss.backward()
    assert prefix.grad is not None and all(p.grad is not None for p in model.parameters())


def test_offline_without_weights_names_url_and_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no-hub-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "no-hub-cache"))
    with pytest.raises(weights.WeightsUnavailable) as error:
        GPT.from_pretrained("gpt2", root=tmp_path, offline=True)
    assert "huggingface.co" in str(error.value) and str(tmp_path / "gpt2" / "model.safetensors") in str(error.value)


def test_command_line(files, tmp_path):
    run = lambda *args: subprocess.run([sys.executable, str(REPO / "gpt2.py"), *args], capture_output=True,  # noqa
                                       text=True, cwd=tmp_path, timeout=300,
                                       env={"PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hub")})
    result = run("Hello, my name is", "A", "--gpt2-weights", str(files / "model.safetensors"), "--max-new-tokens", "5",
                 "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("-" * 80 + "\nHello, my name is") == 1 and "\nA" in result.stdout
    result = run("Hello", "--weights-dir", str(tmp_path / "empty"), "--offline")
    assert result.returncode == 1 and "huggingface.co" in result.stderr and str(tmp_path / "empty") in result.stderr
    assert run("Hello", "--top-p", "0").returncode == 2  # argparse's error for an invalid value
