"""The captioner's masks and targets (gpt2.py `Captioner`): causal, prefix and padding, the loss's targets, the
closed-vocabulary softmax, and a clean stop at end-of-text. Padding never uses a real token without a mask: here it
is filled with id 0 ("!") and with end-of-text, and nothing a real token sees may change."""
import torch
import torch.nn.functional as F

from gpt2 import GPT, Captioner, CaptionerConfig, GPTConfig

EOT = 50256


def make_captioner(mapping_type="mlp", seed=0, vocab=None):
    torch.manual_seed(seed)
    gpt = GPT(GPTConfig(n_ctx=32, n_embd=32, n_head=2, n_layer=2))
    return Captioner(CaptionerConfig(prefix_size=16, prefix_length=3, mapping_type=mapping_type, clip_length=2,
                                     num_layers=1, num_heads=2), gpt, vocab=vocab).eval()


def padded(captions, pad_id):
    T = max(map(len, captions))
    tokens = torch.tensor([c + [pad_id] * (T - len(c)) for c in captions])
    return tokens, torch.tensor([[1] * len(c) + [0] * (T - len(c)) for c in captions])


CAPTIONS = [[64, 1402, 2266, 9197], [64, 1263], [64, 1402, 4171, 6616, 1364, 286, 64]]


def test_loss_targets_are_caption_tokens_then_end_of_text():
    model = make_captioner()
    embeds = torch.randn(3, 16)
    tokens, mask = padded(CAPTIONS, EOT)
    got = model(embeds, tokens, mask)
    expected = 0.0
    for b, caption in enumerate(CAPTIONS):  # one caption alone, no padding, logits from the full output layer
        logits = model.gpt(torch.tensor([caption]), model.clip_project(embeds[b:b + 1]))[0]  # (P+T, V)
        P = 3
        expected += F.cross_entropy(logits[P - 1:], torch.tensor(caption + [EOT]), reduction="sum")
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)


def test_padding_is_masked_whatever_id_it_holds():
    model = make_captioner()
    embeds = torch.randn(3, 16)
    losses = [model(embeds, *padded(CAPTIONS, pad_id)) for pad_id in (EOT, 0, 1402)]
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(losses[2], losses[0], atol=1e-5, rtol=0)
    # the hidden states of real positions do not depend on what the padding holds
    P = 3
    hidden = []
    for pad_id in (EOT, 0):
        tokens, mask = padded(CAPTIONS, pad_id)
        attention = torch.cat([torch.ones(3, P, dtype=torch.long), mask], dim=1)
        hidden.append(model.gpt(tokens, model.clip_project(embeds), attention, return_hidden=True))
    real = torch.cat([torch.ones(3, P, dtype=torch.bool), padded(CAPTIONS, 0)[1].bool()], dim=1)
    torch.testing.assert_close(hidden[0][real], hidden[1][real], atol=1e-5, rtol=0)


def test_causal_and_prefix_masks():
    model = make_captioner()
    embeds = torch.randn(1, 16)
    prefix = model.clip_project(embeds)
    tokens = torch.tensor([CAPTIONS[2]])
    changed = tokens.clone()
    changed[0, 4] = 999
    a = model.gpt(tokens, prefix, return_hidden=True)[0]
    b = model.gpt(changed, prefix, return_hidden=True)[0]
    P = 3
    assert torch.equal(a[:P + 4], b[:P + 4]), "a position saw a later token"
    assert (a[P + 4:] - b[P + 4:]).abs().max() > 1e-3, "later positions must see the changed token"
    c = model.gpt(tokens, model.clip_project(torch.randn(1, 16)), return_hidden=True)[0]
    assert ((a - c).abs().amax(dim=-1) > 1e-4).all(), "every position must see the image prefix"


def test_closed_vocabulary_softmax_equals_the_full_one():
    for mapping_type in ("mlp", "transformer"):
        vocab = torch.tensor(sorted({t for c in CAPTIONS for t in c} | {EOT}))
        closed_model = make_captioner(mapping_type, vocab=vocab).train()  # the other rows of wte are 0
        model = make_captioner(mapping_type).train()  # the same weights, the full output layer
        model.load_state_dict({k: v for k, v in closed_model.state_dict().items() if k != "vocab"})
        embeds, (tokens, mask) = torch.randn(3, 16), padded(CAPTIONS, EOT)
        full = model(embeds, tokens, mask)
        full_grads = torch.autograd.grad(full, list(model.parameters()))
        closed = closed_model(embeds, tokens, mask)
        closed_grads = torch.autograd.grad(closed, list(closed_model.parameters()))
        torch.testing.assert_close(closed, full, atol=1e-4, rtol=1e-6)
        unused = torch.ones(GPTConfig.n_vocab, dtype=torch.bool)
        unused[vocab] = False
        for (name, _), g_closed, g_full in zip(model.named_parameters(), closed_grads, full_grads):
            if name == "gpt.wte.weight":  # the unused rows are held at 0: no gradient, where the full layer has one
                assert not g_closed[unused].any()
                g_closed, g_full = g_closed[~unused], g_full[~unused]
            torch.testing.assert_close(g_closed, g_full, atol=1e-6, rtol=1e-4)


def test_tokens_mapper_gives_one_prefix_vector_per_image_token():
    model = make_captioner("tokens")  # prefix_length 3: the tower's token count
    grid = torch.randn(3, 3, 16)  # (B, N, D)
    changed = grid.clone()
    changed[:, 1] += 1.0
    prefix, moved = model.clip_project(grid), model.clip_project(changed)  # (B, N, C)
    assert prefix.shape == (3, 3, 32)
    assert torch.equal(prefix[:, [0, 2]], moved[:, [0, 2]]), "a token's vector may depend on that token only"
    assert (prefix[:, 1] - moved[:, 1]).abs().max() > 1e-3
    tokens, mask = padded(CAPTIONS, EOT)
    expected = sum(F.cross_entropy(model.gpt(torch.tensor([c]), prefix[b:b + 1])[0][2:], torch.tensor(c + [EOT]),
                                   reduction="sum") for b, c in enumerate(CAPTIONS))
    torch.testing.assert_close(model(grid, tokens, mask), expected, atol=1e-4, rtol=1e-5)
    out = model.generate(grid, max_new_tokens=5)
    assert out.shape[0] == 3 and 1 <= out.shape[1] <= 5


def test_generation_stops_cleanly_at_end_of_text():
    model = make_captioner()
    embeds = torch.randn(4, 16)
    out = model.generate(embeds, max_new_tokens=12)
    for b, row in enumerate(out.tolist()):  # batched equals one at a time, and nothing follows end-of-text
        alone = model.generate(embeds[b:b + 1], max_new_tokens=12)[0].tolist()
        assert row[:len(alone)] == alone and all(t == EOT for t in row[len(alone):])
        if EOT in row:
            assert all(t == EOT for t in row[row.index(EOT):])
    with torch.no_grad():  # rig the model so that end-of-text is always the most likely token
        model.gpt.wte.weight[EOT] *= 50
        model.gpt.ln_f.weight.zero_()
        model.gpt.ln_f.bias.copy_(model.gpt.wte.weight[EOT])
    for sampling in ({}, {"num_beams": 3}, {"temperature": 1.0, "top_p": 0.9,
                                            "generator": torch.Generator().manual_seed(0)}):
        out = model.generate(embeds, max_new_tokens=12, **sampling)
        assert out.tolist() == [[EOT]] * 4, (sampling, out.tolist())
