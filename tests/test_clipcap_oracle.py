"""tests/clipcap_oracle.py checked on its own: the file it writes has the released captioners' layout (key set,
shapes, dtypes, key order, pickle imports, size), the project's restricted reader opens it, and its reference
decoders follow ClipCap's generate2 / generate_beam (stop at ".", beams best first)."""
import pytest
import torch
import transformers
from transformers import GPT2Config

import clipcap_oracle as oracle
import weights
from weights.downloader import PACKAGE_DIR

GPT2_PARAMETERS = 124_439_808  # GPT-2 small, wte counted once (../shared/WEIGHTS.md §1.2)


def gpt2_2021_layout(n_layer=12):
    """transformers 4.x GPT2LMHeadModel.state_dict() under `gpt.`, in its order: key -> (shape, dtype). Written from
    the official key table (WEIGHTS.md §1.2) and 4.x's GPT2Attention buffers, not from the oracle's model."""
    f32, layout = torch.float32, {"gpt.transformer.wte.weight": ((50257, 768), torch.float32),
                                  "gpt.transformer.wpe.weight": ((1024, 768), torch.float32)}
    for i in range(n_layer):
        block = f"gpt.transformer.h.{i}."
        layout.update({block + "ln_1.weight": ((768,), f32), block + "ln_1.bias": ((768,), f32),
                       block + "attn.bias": ((1, 1, 1024, 1024), torch.uint8), block + "attn.masked_bias": ((), f32),
                       block + "attn.c_attn.weight": ((768, 2304), f32), block + "attn.c_attn.bias": ((2304,), f32),
                       block + "attn.c_proj.weight": ((768, 768), f32), block + "attn.c_proj.bias": ((768,), f32),
                       block + "ln_2.weight": ((768,), f32), block + "ln_2.bias": ((768,), f32),
                       block + "mlp.c_fc.weight": ((768, 3072), f32), block + "mlp.c_fc.bias": ((3072,), f32),
                       block + "mlp.c_proj.weight": ((3072, 768), f32), block + "mlp.c_proj.bias": ((768,), f32)})
    layout.update({"gpt.transformer.ln_f.weight": ((768,), f32), "gpt.transformer.ln_f.bias": ((768,), f32),
                   "gpt.lm_head.weight": ((50257, 768), f32)})
    return layout


MLP_LAYOUT = {"clip_project.model.0.weight": (3840, 512), "clip_project.model.0.bias": (3840,),
              "clip_project.model.2.weight": (7680, 3840), "clip_project.model.2.bias": (7680,)}


def transformer_layout(prefix_size, prefix_length=40, clip_length=40, layers=8):
    layout = {"clip_project.prefix_const": (prefix_length, 768)}
    for i in range(layers):
        layer = f"clip_project.transformer.layers.{i}."
        layout.update({layer + "norm1.weight": (768,), layer + "norm1.bias": (768,),
                       layer + "attn.to_queries.weight": (768, 768), layer + "attn.to_keys_values.weight": (1536, 768),
                       layer + "attn.project.weight": (768, 768), layer + "attn.project.bias": (768,),
                       layer + "norm2.weight": (768,), layer + "norm2.bias": (768,),
                       layer + "mlp.fc1.weight": (1536, 768), layer + "mlp.fc1.bias": (1536,),
                       layer + "mlp.fc2.weight": (768, 1536), layer + "mlp.fc2.bias": (768,)})
    layout.update({"clip_project.linear.weight": (clip_length * 768, prefix_size),
                   "clip_project.linear.bias": (clip_length * 768,)})
    return layout


def layout_of(sd):
    return {key: (tuple(value.shape), value.dtype) for key, value in sd.items()}


@pytest.fixture(scope="module")
def coco_like(tmp_path_factory):
    """The MLP captioner at the released configuration, "." planted as its 4th token, saved as coco_weights.pt."""
    model = oracle.plant_token(oracle.build_clipcap("mlp", seed=0), step=3)
    return model, oracle.save_released(model, tmp_path_factory.mktemp("clipcap") / "coco_weights.pt")


def test_stop_token_is_gpt2s_full_stop():
    vocab = PACKAGE_DIR / "vocab"
    tokenizer = transformers.GPT2Tokenizer(str(vocab / "encoder.json"), str(vocab / "vocab.bpe"))
    assert tokenizer.encode(".")[0] == oracle.STOP_TOKEN == 13


def test_saved_mlp_file_has_the_released_layout(coco_like):
    model, path = coco_like
    saved = torch.load(path, map_location="cpu", weights_only=True)  # as ClipCap's predict.py opens it
    expected = gpt2_2021_layout()
    expected.update({key: (shape, torch.float32) for key, shape in MLP_LAYOUT.items()})
    assert list(saved) == list(expected)  # set, order, and nothing else
    assert layout_of(saved) == expected
    mask = saved["gpt.transformer.h.5.attn.bias"]
    assert torch.equal(mask[0, 0], torch.tril(torch.ones(1024, 1024, dtype=torch.uint8)))
    assert saved["gpt.transformer.h.5.attn.masked_bias"].item() == -1e4
    assert torch.equal(saved["gpt.lm_head.weight"], saved["gpt.transformer.wte.weight"])  # tied: one storage
    assert oracle.pickle_globals(path) == oracle.PICKLE_GLOBALS  # what the hub lists for the mirrors
    data_bytes = (GPT2_PARAMETERS + sum(torch.Size(s).numel() for s in MLP_LAYOUT.values())) * 4 + 12 * (1024 ** 2 + 4)
    size = path.stat().st_size
    print(f"oracle coco_weights.pt: {size:,} bytes, tensors {data_bytes:,} bytes")
    assert data_bytes < size < data_bytes + 200_000  # the tied head is stored once (else +154 MB)
    del saved
    ours = weights.load_state_dict(path)  # the restricted reader (no code runs) opens it, dtypes kept
    assert layout_of(ours) == expected


def test_transformer_mapper_layouts():
    """The transformer mapper's keys at 512-d (ViT-B/32) and 640-d (RN50x4, the released file), with and without the
    frozen GPT-2 (a one-layer GPT-2 here: only the mapper's keys are looked at)."""
    small_gpt = GPT2Config(n_layer=1, attn_implementation="eager")
    for prefix_size in (512, 640):
        model = oracle.build_clipcap("transformer", prefix_size=prefix_size, prefix_length=40, gpt2_config=small_gpt)
        mapper_only = oracle.released_state_dict(model, include_gpt=False)
        assert {k: s for k, (s, _) in layout_of(mapper_only).items()} == transformer_layout(prefix_size)
        assert {dtype for _, dtype in layout_of(mapper_only).values()} == {torch.float32}
        full = oracle.released_state_dict(model)
        assert set(full) == set(mapper_only) | set(gpt2_2021_layout(n_layer=1))
        prefix = oracle.prefix_embeddings(model, torch.randn(2, prefix_size), normalize=True)
        assert prefix.shape == (2, 40, 768)


def test_reference_decoders_stop_at_the_full_stop(coco_like):
    model, _ = coco_like
    torch.manual_seed(1)
    prefix = oracle.prefix_embeddings(model, torch.randn(1, 512))
    greedy = oracle.greedy_decode(model, prefix)
    assert len(greedy) == 4 and greedy[-1] == oracle.STOP_TOKEN and oracle.STOP_TOKEN not in greedy[:-1]
    with torch.no_grad():  # plain argmax, step by step on the whole sequence: what top-p 0.8 + argmax reduces to
        sequence = prefix
        for token in greedy:
            assert model.gpt(inputs_embeds=sequence).logits[0, -1].argmax().item() == token
            sequence = torch.cat((sequence, model.gpt.transformer.wte(torch.tensor([[token]]))), dim=1)
    beams = oracle.beam_decode(model, prefix)
    assert len(beams) == 5 and all(tokens[-1] == oracle.STOP_TOKEN and len(tokens) == 4 for tokens, _ in beams)
    scores = [score for _, score in beams]
    assert scores == sorted(scores, reverse=True) and len({tuple(tokens) for tokens, _ in beams}) == 5
    tokens, score = beams[0]  # the score is the mean log-probability of the beam's tokens, the stop token included
    with torch.no_grad():
        sequence = torch.cat((prefix, model.gpt.transformer.wte(torch.tensor([tokens]))), dim=1)
        log_probs = model.gpt(inputs_embeds=sequence).logits[0, prefix.shape[1] - 1:-1].log_softmax(-1)
    assert abs(log_probs[range(len(tokens)), tokens].sum().item() / len(tokens) - score) < 1e-4
    unplanted = oracle.greedy_decode(model, prefix, entry_length=2)
    assert len(unplanted) == 2 and oracle.STOP_TOKEN not in unplanted  # the cap holds before any stop
