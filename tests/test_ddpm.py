"""ddpm.py against diffusers' schedulers: schedules, timesteps, whole sampling runs, noising and the loss.

Every sampler runs a whole trajectory next to the diffusers scheduler configured as Stable Diffusion 1.5
(`Scheduler.from_config(SD15_SCHEDULER_CONFIG)`, what users do to swap samplers), fed the same fake ε-model and
the same initial noise; the final samples must agree within 1e-5.
"""
import dataclasses
import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.training_utils import compute_snr

import ddpm
from sd_oracle import SD15_SCHEDULER_CONFIG, reference_scheduler

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.py)
ALPHAS_CUMPROD = DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG).alphas_cumprod.double()


def fake_model(x, t):
    """A smooth, timestep-dependent stand-in for the UNet: √(1-ᾱ_t)·x_t is the exact ε for N(0, I) data, plus a
    nonlinear wiggle, so that trajectories stay O(1) like real latents."""
    t = t.view(-1, 1, 1, 1).float()
    lo = t.floor().long().clamp(max=998)
    a = torch.lerp(ALPHAS_CUMPROD[lo], ALPHAS_CUMPROD[lo + 1], (t - lo).double()).float()
    return (1 - a).sqrt() * x + 0.1 * torch.sin(2 * x + t / 200)


def reference_run(scheduler, steps, noise, init=None, strength=1.0, eta=0.0, seed=None):
    """The denoising loop of diffusers' StableDiffusion(Img2Img)Pipeline, without the networks."""
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    B = noise.shape[0]
    if init is None:
        x = noise * scheduler.init_noise_sigma
    else:  # StableDiffusionImg2ImgPipeline.get_timesteps + prepare_latents
        t_start = max(steps - min(int(steps * strength), steps), 0)
        timesteps = timesteps[t_start * scheduler.order:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start * scheduler.order)
        x = scheduler.add_noise(init, noise, timesteps[:1].repeat(B))
    for t in timesteps:
        model_input = scheduler.scale_model_input(x, t)
        out = fake_model(model_input, t.expand(B))
        # DDIM with clip_sample re-derives ε from the clamped x̂_0, as ddpm.py does
        kwargs = {"eta": eta, "use_clipped_model_output": scheduler.config.clip_sample} \
            if isinstance(scheduler, DDIMScheduler) else {}
        x = scheduler.step(out, t, x, generator=generator, **kwargs).prev_sample
    return x, timesteps


def our_run(diffusion, sampler, steps, noise, init=None, strength=1.0, eta=0.0, seed=None):
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return diffusion.sample(fake_model, noise, sampler, steps, eta=eta, generator=generator, init=init,
                            strength=strength)


def draws(shape=(2, 4, 8, 8)):
    g = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g).clamp(-2, 2)  # noise, clean latents


def test_schedules_equal_diffusers_and_compvis():
    for name, kind in [("scaled_linear", "scaled_linear"), ("linear", "linear"), ("cosine", "squaredcos_cap_v2")]:
        config = ddpm.DiffusionConfig(beta_schedule=name)
        ours = ddpm.GaussianDiffusion(config)
        ref = DDPMScheduler(beta_start=config.linear_start, beta_end=config.linear_end, beta_schedule=kind)
        torch.testing.assert_close(ours.betas, ref.betas, rtol=0, atol=0)
        torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, rtol=0, atol=0)
    # CompVis make_beta_schedule("linear") computes the same SD schedule in float64
    betas64 = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    sd = ddpm.GaussianDiffusion(ddpm.PRESETS["sd15"])
    assert (sd.alphas_cumprod.double() - torch.cumprod(1 - betas64, 0)).abs().max() < 1e-6
    assert sd.betas[0].item() == pytest.approx(0.00085) and sd.betas[-1].item() == pytest.approx(0.012)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("sampler", ddpm.SAMPLERS)
def test_timesteps_equal_diffusers(sampler, spacing):
    offset = 1 if spacing == "leading" else 0
    diffusion = ddpm.GaussianDiffusion(ddpm.DiffusionConfig(timestep_spacing=spacing, steps_offset=offset))
    for steps in (1, 7, 20, 25, 50, 999):
        ref = reference_scheduler(sampler, timestep_spacing=spacing, steps_offset=offset)
        ref.set_timesteps(steps)
        ours, start = diffusion.sampling_timesteps(sampler, steps)
        assert start == 0
        torch.testing.assert_close(torch.tensor(ours, dtype=torch.float64), ref.timesteps.double(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("sampler", ddpm.SAMPLERS)
def test_img2img_timesteps_follow_strength(sampler):
    diffusion = ddpm.GaussianDiffusion()
    for steps, strength in [(50, 0.75), (50, 0.3), (20, 1.0), (10, 0.55), (30, 0.04)]:
        noise, init = draws()
        _, ref_ts = reference_run(reference_scheduler(sampler), steps, noise, init, strength)
        ts, start = diffusion.sampling_timesteps(sampler, steps, strength)
        assert ts[start:] == ref_ts.double().tolist()
        assert len(ts) - start == int(steps * strength)
    with pytest.raises(ValueError, match="no step"):
        diffusion.sampling_timesteps(sampler, 10, strength=0.05)
    with pytest.raises(ValueError, match="strength"):
        diffusion.sampling_timesteps(sampler, 10, strength=1.5)


@pytest.mark.parametrize("sampler", ddpm.SAMPLERS)
def test_sampler_matches_diffusers_over_a_whole_run(sampler):
    diffusion = ddpm.GaussianDiffusion(ddpm.PRESETS["sd15"])
    worst = 0.0
    for steps in (50, 10):
        for strength in (1.0, 0.6):
            noise, init = draws()
            init = init if strength < 1.0 else None
            ref, _ = reference_run(reference_scheduler(sampler), steps, noise, init, strength, seed=7)
            ours = our_run(diffusion, sampler, steps, noise, init, strength, seed=7)
            diff = (ours - ref).abs().max().item()
            worst = max(worst, diff)
            assert diff < 1e-5, f"{sampler} steps={steps} strength={strength}: max |diff| {diff:.2e}"
    print(f"{sampler}: max |ours - diffusers| over whole runs = {worst:.2e}")


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_eta_draws_noise_like_diffusers(eta):
    diffusion = ddpm.GaussianDiffusion()
    noise, init = draws()
    for init_, strength in [(None, 1.0), (init, 0.7)]:
        ref, _ = reference_run(reference_scheduler("ddim"), 25, noise, init_, strength, eta=eta, seed=3)
        ours = our_run(diffusion, "ddim", 25, noise, init_, strength, eta=eta, seed=3)
        diff = (ours - ref).abs().max().item()
        assert diff < 1e-5, f"DDIM eta={eta}: max |diff| {diff:.2e}"
    # the stochastic part really is stochastic: another seed gives another sample
    assert (our_run(diffusion, "ddim", 25, noise, eta=eta, seed=4) - ours).abs().max() > 1e-2


@pytest.mark.parametrize("sampler, eta", [("ddpm", 0.0), ("ddim", 1.0)])
def test_s_noise_scales_only_the_fresh_noise(sampler, eta):
    """s_noise multiplies the noise DDPM (and DDIM with eta > 0) adds at each step, nothing else: with a denoiser
    that ignores its input (and no clamping) a run is affine in that noise, so in s_noise; 0 leaves none of it."""
    diffusion = ddpm.GaussianDiffusion()  # SD's schedule: clip_sample off
    noise, _ = draws()
    def run(seed, **s_noise):
        return diffusion.sample(lambda x, t: torch.ones_like(x), noise, sampler, 10, eta,
                                torch.Generator().manual_seed(seed), **s_noise)
    full, none, some = run(3), run(3, s_noise=0.0), run(3, s_noise=0.3)  # the default: 1, the samplers as published
    torch.testing.assert_close(run(3, s_noise=1.0), full, rtol=0, atol=0)
    torch.testing.assert_close(run(4, s_noise=0.0), none)  # no fresh noise: the seed no longer matters
    torch.testing.assert_close(some - none, 0.3 * (full - none), rtol=1e-4, atol=1e-5)
    assert (full - none).abs().max() > 1e-2


@pytest.mark.parametrize("sampler", ddpm.SAMPLERS)
@pytest.mark.parametrize("preset", ["linear", "cosine"])
def test_other_presets_and_v_prediction_match_diffusers(sampler, preset):
    """The training presets (linear / cosine betas, trailing spacing) and v-prediction, against diffusers."""
    config = ddpm.PRESETS[preset]
    kind = {"linear": "linear", "cosine": "squaredcos_cap_v2"}[config.beta_schedule]
    for parameterization, prediction_type in [("eps", "epsilon"), ("v", "v_prediction")]:
        diffusion = ddpm.GaussianDiffusion(ddpm.DiffusionConfig(**{**vars(config), "parameterization":
                                                                   parameterization}))
        options = dict(beta_schedule=kind, beta_start=config.linear_start, beta_end=config.linear_end,
                       timestep_spacing=config.timestep_spacing, steps_offset=config.steps_offset,
                       prediction_type=prediction_type)
        if sampler in ("ddpm", "ddim"):
            options.update(clip_sample=config.clip_sample, set_alpha_to_one=config.set_alpha_to_one)
        noise, init = draws()
        for init_, strength in [(None, 1.0), (init, 0.5)]:
            ref, _ = reference_run(reference_scheduler(sampler, **options), 20, noise, init_, strength, seed=1)
            ours = our_run(diffusion, sampler, 20, noise, init_, strength, seed=1)
            # relative to the largest value of the run: cosine + trailing makes Euler start at σ_max ≈ 2e4, where
            # float32 rounding alone is ~1e-3 in absolute terms
            start = init_ if init_ is not None else noise * reference_scheduler(sampler, **options).init_noise_sigma
            diff = ((ours - ref).abs().max() / max(ref.abs().max(), start.abs().max(), 1)).item()
            assert diff < 1e-5, f"{preset} {parameterization} {sampler}: max |diff| {diff:.2e}"


def test_add_noise_and_velocity_equal_diffusers():
    diffusion, ref = ddpm.GaussianDiffusion(), reference_scheduler("ddpm")
    noise, x0 = draws((4, 4, 8, 8))
    t = torch.tensor([0, 1, 500, 999])
    torch.testing.assert_close(diffusion.add_noise(x0, noise, t), ref.add_noise(x0, noise, t))
    torch.testing.assert_close(diffusion.velocity(x0, noise, t), ref.get_velocity(x0, noise, t))


def test_loss_is_zero_for_a_perfect_denoiser_and_weights_follow_min_snr():
    noise_seen = {}

    def record(x_t, t):  # a cheating model: recovers ε exactly because it knows x_0
        a = diffusion.alphas_cumprod[t.long()].view(-1, 1, 1, 1)
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        noise_seen["t"] = t.long()
        return eps if diffusion.config.parameterization == "eps" else a.sqrt() * eps - (1 - a).sqrt() * x0

    _, x0 = draws((8, 3, 4, 4))
    for parameterization in ("eps", "v"):
        diffusion = ddpm.GaussianDiffusion(ddpm.DiffusionConfig(parameterization=parameterization))
        assert diffusion.loss(record, x0, torch.Generator().manual_seed(0)).item() < 1e-9
    # a model that always predicts 0 has per-sample MSE = E[target²]; Min-SNR scales it by diffusers' weights
    diffusion = ddpm.GaussianDiffusion()
    zero = lambda x_t, t: (noise_seen.__setitem__("t", t.long()), torch.zeros_like(x_t))[1]
    plain = diffusion.loss(zero, x0, torch.Generator().manual_seed(5))
    weighted = diffusion.loss(zero, x0, torch.Generator().manual_seed(5), min_snr_gamma=5.0)
    g = torch.Generator().manual_seed(5)
    t = torch.randint(0, 1000, (8,), generator=g)
    assert torch.equal(t, noise_seen["t"])
    noise = torch.randn(x0.shape, generator=g)
    snr = compute_snr(reference_scheduler("ddpm"), t)
    weights = torch.stack([snr, 5.0 * torch.ones_like(snr)], 1).min(1)[0] / snr  # diffusers train_text_to_image.py
    per_sample = (noise**2).flatten(1).mean(1)
    torch.testing.assert_close(plain, per_sample.mean())
    torch.testing.assert_close(weighted, (weights * per_sample).mean())


def test_classifier_free_guidance():
    calls = []

    def model(x, t, context):
        calls.append(x.shape[0])
        return x * context.view(-1, 1, 1, 1)

    x, t = torch.ones(2, 4, 8, 8), torch.full((2,), 10.0)
    cond, uncond = torch.tensor([2.0, 3.0]), torch.tensor([0.5, 0.5])
    guided = ddpm.classifier_free_guidance(model, cond, uncond, 7.5)(x, t)
    torch.testing.assert_close(guided[:, 0, 0, 0], 0.5 + 7.5 * (cond - 0.5))
    assert calls == [4]  # one batch of [uncond; cond]
    plain = ddpm.classifier_free_guidance(model, cond, uncond, 1.0)(x, t)
    torch.testing.assert_close(plain[:, 0, 0, 0], cond)
    assert calls == [4, 2]


def test_randn_one_seed_one_image():
    """A list of generators draws each image from its own seed, whatever the batch it sits in."""
    together = ddpm.randn((3, 4, 8, 8), [torch.Generator().manual_seed(s) for s in (10, 11, 12)])
    alone = ddpm.randn((1, 4, 8, 8), torch.Generator().manual_seed(11))
    assert torch.equal(together[1:2], alone)
    assert torch.equal(alone, torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(11)))


def test_bad_arguments_give_clear_errors():
    diffusion = ddpm.GaussianDiffusion()
    with pytest.raises(ValueError, match="unknown sampler"):
        diffusion.sampling_timesteps("plms", 50)
    with pytest.raises(ValueError, match="steps must be between"):
        diffusion.sampling_timesteps("ddim", 0)
    with pytest.raises(ValueError, match="beta_schedule"):
        ddpm.GaussianDiffusion(ddpm.DiffusionConfig(beta_schedule="sigmoid"))
    with pytest.raises(ValueError, match="parameterization"):
        ddpm.GaussianDiffusion(ddpm.DiffusionConfig(parameterization="x0"))


def test_sampling_recovers_a_point_mass():
    """With the exact ε of a data set holding one point x*, every sampler lands on x* (DDIM on SD's schedule
    stops at ᾱ_0 < 1, as CompVis does, so it is checked on a preset that ends at ᾱ = 1)."""
    target = torch.full((1, 4, 8, 8), 0.7)
    for preset, samplers in [("sd15", ("euler", "dpm++2m")), ("linear", ddpm.SAMPLERS), ("cosine", ddpm.SAMPLERS)]:
        diffusion = ddpm.GaussianDiffusion(ddpm.PRESETS[preset])

        def exact(x_t, t):  # x_t = √ᾱ·x* + √(1-ᾱ)·ε  =>  ε = (x_t − √ᾱ·x*)/√(1-ᾱ)
            a = diffusion.alphas_cumprod[t.round().long()].view(-1, 1, 1, 1)
            return (x_t - a.sqrt() * target) / (1 - a).sqrt()

        for sampler in samplers:
            noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
            x = diffusion.sample(exact, noise, sampler, 20, generator=torch.Generator().manual_seed(1))
            assert (x - target).abs().max() < 1e-3, f"{preset} {sampler}"
    assert math.isclose(ddpm.GaussianDiffusion().final_alpha_cumprod.item(), 0.99915, rel_tol=1e-6)


@pytest.mark.parametrize("preset,parameterization,min_snr_gamma", [("sd15", "eps", None), ("cosine", "v", 5.0)])
def test_a_denoiser_trained_with_the_loss_samples_the_data(preset, parameterization, min_snr_gamma):
    """Train a small MLP with `loss` on two points, (0.8, 0.8) and (-0.8, -0.8): every sampler must then draw
    points near them, both equally often. Loss, noising and samplers working together, not only each alone."""
    torch.manual_seed(0)  # the MLP's initial weights
    diffusion = ddpm.GaussianDiffusion(dataclasses.replace(ddpm.PRESETS[preset], parameterization=parameterization))
    net = torch.nn.Sequential(torch.nn.Linear(2 + 16, 128), torch.nn.SiLU(), torch.nn.Linear(128, 128),
                              torch.nn.SiLU(), torch.nn.Linear(128, 2))

    def model(x, t):  # x (B, 2, 1, 1), t (B,) -> (B, 2, 1, 1), with a sinusoidal timestep embedding
        angles = t[:, None] / 1000 * math.pi * 2.0 ** torch.arange(8)[None]
        return net(torch.cat([x.flatten(1), angles.sin(), angles.cos()], 1)).view_as(x)

    modes = torch.tensor([[0.8, 0.8], [-0.8, -0.8]])
    g = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(500):
        x0 = modes[torch.randint(0, 2, (256,), generator=g)].view(256, 2, 1, 1)
        loss = diffusion.loss(model, x0, g, min_snr_gamma=min_snr_gamma)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for sampler in ddpm.SAMPLERS:
        x = diffusion.sample(model, torch.randn(400, 2, 1, 1, generator=g), sampler, 25, generator=g).view(400, 2)
        near = (torch.cdist(x, modes).min(1).values < 0.2).float().mean().item()
        upper = (x[:, 0] > 0).float().mean().item()
        assert near > 0.8 and 0.3 < upper < 0.7, f"{sampler}: {near:.0%} near a mode, {upper:.0%} in the upper one"
