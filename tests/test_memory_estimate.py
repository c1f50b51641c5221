"""The peak-memory counter behind `python tests/bench_caption.py --memory` (LiveBytes), on a tiny captioner: one
training step as train.py takes it, counted on fake tensors and on real ones. The accounting is checked exactly where
it is known (parameters, gradients, AdamW's state, autocast's bf16 weight copies, 512-byte rounding), against torch's
own MemTracker on the same real step, and fake against real (the bench's check on the full coco preset)."""
import math
import types

import pytest
import torch
from torch.distributed._tools.mem_tracker import MemTracker

import bench_caption
from gpt2 import GPT, Captioner, CaptionerConfig, GPTConfig

CFG = types.SimpleNamespace(**{**vars(bench_caption.coco_config()), "prefix_length": 2})
BATCH = 4
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def tiny_captioner(cfg):
    """The coco preset's model in small: the MLP mapper from 512-wide embeddings, GPT-2's vocabulary, 2 blocks of
    width 32."""
    gpt = GPT(GPTConfig(n_ctx=64, n_embd=32, n_head=2, n_layer=2))
    return Captioner(CaptionerConfig(512, cfg.prefix_length), gpt)


@pytest.fixture(scope="module")
def counted():
    """{(fake or real, dtype name): LiveBytes after one counted step}, storages counted to the byte."""
    torch.manual_seed(0)
    tensors = bench_caption.batch(BATCH, torch.device("cpu"), torch.Generator().manual_seed(0))
    return {(kind, name): bench_caption.count_step(tiny_captioner, CFG, tensors, dtype, fake=kind == "fake", block=1)[0]
            for kind in ("fake", "real") for name, dtype in DTYPES.items()}


def parameter_bytes():
    with torch.device("meta"):
        model = tiny_captioner(CFG)
    return sum(p.numel() * p.element_size() for p in model.parameters()), len(list(model.parameters()))


@pytest.mark.parametrize("kind", ["fake", "real"])
@pytest.mark.parametrize("name", DTYPES)
def test_parameters_gradients_and_adamw_state_are_counted_exactly(counted, kind, name):
    nbytes, n_tensors = parameter_bytes()
    peaks = counted[kind, name].peaks
    assert list(peaks) == ["forward", "backward", "optimizer step"]
    for phase, (_, kinds) in peaks.items():
        assert kinds["parameters"] == nbytes, phase
        # AdamW: exp_avg and exp_avg_sq like each parameter, and the fused kernel's step count, one fp32 scalar each
        assert kinds["optimizer state"] == 2 * nbytes + 4 * n_tensors, phase
    assert peaks["forward"][1]["gradients"] == 0  # set to None by the step before
    assert peaks["optimizer step"][1]["gradients"] == nbytes  # every parameter trains


@pytest.mark.parametrize("kind", ["fake", "real"])
def test_autocast_keeps_one_bf16_copy_of_each_weight_it_casts(counted, kind):
    """Autocast casts every matmul's weight and bias to bf16 once (its cache) and keeps the copies for backward;
    LayerNorm and the position embedding stay fp32, and the token embedding is cast only for the output layer."""
    with torch.device("meta"):
        model = tiny_captioner(CFG)
    cast = sum(p.numel() for name, p in model.named_parameters() if ".ln_" not in name and "wpe" not in name)
    assert counted[kind, "bf16"].peaks["forward"][1]["autocast copies of weights"] == 2 * cast
    assert counted[kind, "fp32"].peaks["forward"][1]["autocast copies of weights"] == 0


@pytest.mark.parametrize("name", DTYPES)
def test_fake_tensors_count_what_a_real_cpu_step_holds(counted, name):
    fake, real = counted["fake", name], counted["real", name]
    print(f"{name}: peak real {real.peak:,} B, fake {fake.peak:,} B, real / fake {real.peak / fake.peak:.4f}")
    assert 0.9 <= real.peak / fake.peak <= 1.1
    for phase in fake.peaks:
        assert fake.peaks[phase][1]["parameters"] == real.peaks[phase][1]["parameters"]


def test_the_counter_agrees_with_torchs_memtracker(counted):
    """torch.distributed._tools.mem_tracker.MemTracker counts the same live storages on the same real step."""
    torch.manual_seed(0)
    model = tiny_captioner(CFG).train()
    optimizer = bench_caption.adamw(model, CFG)
    embeds, tokens, mask = bench_caption.batch(BATCH, torch.device("cpu"), torch.Generator().manual_seed(0))
    num_targets = int(mask.sum()) + BATCH
    phases = bench_caption.LiveBytes(lambda: {})  # only its `phase` is set; it is not entered
    bench_caption.training_step(model, optimizer, [embeds, tokens, mask], num_targets, CFG, torch.bfloat16, phases)
    tracker = MemTracker()
    tracker.track_external(model, optimizer, embeds, tokens, mask)
    with tracker:
        bench_caption.training_step(model, optimizer, [embeds, tokens, mask], num_targets, CFG, torch.bfloat16, phases)
    (peak,) = tracker.get_tracker_snapshot("peak").values()
    assert peak["Total"] == counted["real", "bf16"].peak


def test_storages_are_rounded_up_to_the_cuda_allocators_blocks():
    tensors = bench_caption.longest_batch(BATCH, CFG.max_caption_tokens, torch.Generator().manual_seed(0))
    counter, _ = bench_caption.count_step(tiny_captioner, CFG, tensors, torch.bfloat16, fake=True, block=512)
    with torch.device("meta"):
        model = tiny_captioner(CFG)
    rounded = sum(math.ceil(p.numel() * p.element_size() / 512) * 512 for p in model.parameters())
    assert counter.peaks["backward"][1]["parameters"] == rounded
    assert all(nbytes % 512 == 0 for nbytes, _ in counter.live.values())


def test_a_boolean_mask_on_fake_tensors_needs_its_count():
    """Fake tensors cannot count a mask's True elements: indexing with a mask the caller did not count fails."""
    counter = bench_caption.LiveBytes(lambda: {}, true_counts={})
    with torch._subclasses.fake_tensor.FakeTensorMode(), counter, pytest.raises(KeyError):
        torch.zeros(3, 4)[torch.zeros(3, dtype=torch.bool)]
