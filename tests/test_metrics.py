"""BLEU-1..4 and CIDEr-D of clip.py against pycocoevalcap's scorers (the COCO caption evaluation code) on the
same pre-tokenised captions, and the Java-free tokenisation against PTBTokenizer outputs."""
import random

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from clip import bleu, caption_scores, cider_d, tokenize_caption

WORDS = "a an the man woman dog cat red blue sitting on top of table with two people riding horse".split()


def random_corpus(seed, n_images=60):
    rng = random.Random(seed)

    def sentence(low, high):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))
    references = {i: [sentence(3, 14) for _ in range(rng.randint(1, 5))] for i in range(n_images)}
    hypotheses = {}
    for i in range(n_images):  # half of them copy words of a reference, so that long n-grams match
        reference = rng.choice(references[i]).split()
        start = rng.randrange(len(reference))
        hypotheses[i] = " ".join(reference[start:] + sentence(0, 4).split()) if i % 2 else sentence(1, 12)
    return references, hypotheses


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bleu_and_cider_equal_pycocoevalcap(seed):
    references, hypotheses = random_corpus(seed)
    hypotheses[0] = ""  # an empty caption scores zero in both
    expected_bleu, _ = Bleu(4).compute_score(references, {i: [h] for i, h in hypotheses.items()}, verbose=0)
    ours = bleu(references, hypotheses)
    assert ours == pytest.approx(expected_bleu, rel=1e-12, abs=1e-15), (ours, expected_bleu)
    expected_cider, expected_per_image = Cider().compute_score(references, {i: [h] for i, h in hypotheses.items()})
    ours_cider, ours_per_image = cider_d(references, hypotheses)
    assert ours_cider == pytest.approx(expected_cider, rel=1e-12)
    assert ours_per_image == pytest.approx(list(expected_per_image), rel=1e-12, abs=1e-15)


def test_bleu_brevity_penalty_and_closest_length():
    # short hypotheses: corpus brevity penalty; equal distances to two lengths: the shorter one is chosen
    references = {0: ["a man riding a horse on the beach", "a man on a horse"], 1: ["two dogs", "two dogs play"]}
    hypotheses = {0: "a man on a horse near", 1: "two dogs play"}
    expected, _ = Bleu(4).compute_score(references, {i: [h] for i, h in hypotheses.items()}, verbose=0)
    assert bleu(references, hypotheses) == pytest.approx(expected, rel=1e-12)
    perfect = {0: ["a red circle left of a blue square"]}
    assert bleu(perfect, {0: perfect[0][0]}) == pytest.approx([1.0] * 4)
    assert cider_d(perfect, {0: perfect[0][0]})[0] == 0.0  # one image: every idf is log(1) - log(1) = 0


def test_tokenize_caption_matches_ptb_outputs():
    # what pycocoevalcap's PTBTokenizer (Stanford CoreNLP 3.4.1, -lowerCase, its punctuation list removed) gives;
    # it differs on rarer input: brackets (-lrb-), numbers with commas, non-ASCII text
    assert tokenize_caption("A man's dog, running on the beach.") == "a man 's dog running on the beach"
    assert tokenize_caption("Don't stop!") == "do n't stop"
    assert tokenize_caption("A T-shirt costs 3.50 dollars; cheap") == "a t-shirt costs 3.50 dollars cheap"
    assert tokenize_caption("  Two   dogs ... playing?  ") == "two dogs playing"
    assert tokenize_caption("A sign saying 'STOP' -- we'll see") == "a sign saying stop we 'll see"


def test_caption_scores_tokenises_raw_captions():
    references = {1: ["A man riding a horse.", "A person on a horse!"], 2: ["Two dogs playing.", "Dogs at play."]}
    hypotheses = {1: "A man riding a horse", 2: "two DOGS playing"}
    scores = caption_scores(references, hypotheses)
    assert set(scores) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr-D"}
    tokenised = {i: [tokenize_caption(r) for r in refs] for i, refs in references.items()}
    expected, _ = Bleu(4).compute_score(tokenised, {i: [tokenize_caption(h)] for i, h in hypotheses.items()},
                                        verbose=0)
    assert [scores[f"BLEU-{k}"] for k in range(1, 5)] == pytest.approx(expected, rel=1e-12)
    assert scores["BLEU-1"] == pytest.approx(1.0)
