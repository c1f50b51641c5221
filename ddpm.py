"""The diffusion process: noise schedule, noising, the training loss, classifier-free guidance and samplers;
then a text-to-image model's training module (the loss with caption dropout, the EMA of the weights), the
prompt -> image pipeline that drives the samplers, and its images as files (PNGs that carry their settings as
AUTOMATIC1111 writes them; grids that carry their prompts).

Papers: DDPM (Ho et al. 2020, arXiv:2006.11239), DDIM (Song et al. 2020, arXiv:2010.02502), the Euler method on
the probability-flow ODE (Karras et al. 2022, arXiv:2206.00364, Algorithm 1 without churn; their S_noise scales
the fresh noise of DDPM and DDIM here), DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, Algorithm 2),
classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598), v-prediction (Salimans & Ho 2022,
arXiv:2202.00512) and Min-SNR loss weighting (Hang et al. 2023, arXiv:2303.09556).

Official code matched: the schedule of CompVis/stable-diffusion (`configs/stable-diffusion/v1-inference.yaml`,
`ldm/modules/diffusionmodules/util.py make_beta_schedule`) and, step for step within 1e-5 over whole runs, the
diffusers schedulers configured as Stable Diffusion 1.5's `scheduler_config.json` (scaled-linear betas,
`timestep_spacing="leading"`, `steps_offset=1`, `set_alpha_to_one=False`, `clip_sample=False`):
DDPMScheduler, DDIMScheduler, EulerDiscreteScheduler and DPMSolverMultistepScheduler(algorithm_type="dpmsolver++",
solver_order=2). Image-to-image starts where diffusers' `StableDiffusionImg2ImgPipeline.get_timesteps` starts.

This file knows nothing about networks: every function takes the denoiser as a callable `model(x, t) -> output`,
where `x` is the network input (B, C, h, w) and `t` a (B,) float tensor of training timesteps in [0, timesteps).
The output is ε (parameterization "eps", Stable Diffusion) or v (parameterization "v"). The training module and
the pipeline, too, take their networks as arguments: Stable Diffusion's (generate.py) and this project's trained
ones (unet.py) alike.
Notation: ᾱ_t = alphas_cumprod[t]; a noised sample is x_t = √ᾱ_t·x_0 + √(1-ᾱ_t)·ε  (DDPM eq. 4).
"""
import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin
from tqdm import tqdm

SAMPLERS = ("ddpm", "ddim", "euler", "dpm++2m")


def randn(shape, generator=None, device="cpu", dtype=torch.float32):
    """Standard normal noise drawn on the generator's device, then moved: a CPU generator gives the same numbers
    on every device. A list of generators draws one batch item from each (one seed per image, like diffusers)."""
    if isinstance(generator, (list, tuple)):
        assert len(generator) == shape[0], f"{len(generator)} generators for a batch of {shape[0]}"
        return torch.cat([randn((1, *shape[1:]), g, device, dtype) for g in generator])
    draw_device = generator.device if generator is not None else "cpu"
    return torch.randn(shape, generator=generator, device=draw_device, dtype=torch.float32).to(device, dtype)


# ----------------------------------------------------------------------------------------------------------------
# The noise schedule

def make_betas(beta_schedule, timesteps, linear_start, linear_end, cosine_s=8e-3):
    """β_1..β_T in float32, computed the way diffusers computes them (CompVis computes in float64 and stores
    float32; SD's ᾱ_t differ by at most 9.3e-7 relative)."""
    if beta_schedule == "scaled_linear":  # Stable Diffusion; CompVis calls this schedule "linear"
        return torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float32) ** 2
    if beta_schedule == "linear":  # DDPM paper: β from 1e-4 to 0.02
        return torch.linspace(linear_start, linear_end, timesteps, dtype=torch.float32)
    if beta_schedule == "cosine":  # Nichol & Dhariwal 2021 eq. 17, β capped at 0.999 (diffusers squaredcos_cap_v2)
        alpha_bar = lambda s: math.cos((s + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        return torch.tensor([min(1 - alpha_bar((i + 1) / timesteps) / alpha_bar(i / timesteps), 0.999)
                             for i in range(timesteps)], dtype=torch.float32)
    raise ValueError(f"unknown beta_schedule {beta_schedule!r}: choose scaled_linear, linear or cosine")


@dataclass
class DiffusionConfig:
    timesteps: int = 1000  # T; diffusers calls it num_train_timesteps
    linear_start: float = 0.00085  # first β (diffusers beta_start)
    linear_end: float = 0.012  # last β (diffusers beta_end)
    beta_schedule: str = "scaled_linear"  # scaled_linear | linear | cosine
    parameterization: str = "eps"  # what the network predicts: "eps" or "v" (diffusers prediction_type)
    timestep_spacing: str = "leading"  # how sampling steps sit on 0..T-1: leading | trailing | linspace
    steps_offset: int = 1  # added to "leading" timesteps (SD 1.x samples t = 981, 961, ..., 1 for 50 steps)
    set_alpha_to_one: bool = False  # DDIM's last step lands on ᾱ=1 (True) or on ᾱ_0 (False, as CompVis)
    clip_sample: bool = False  # clamp predicted x_0 to [-1, 1] in DDPM/DDIM (pixel-space models)


PRESETS = {
    # CompVis v1-inference.yaml (timesteps 1000, linear_start 0.00085, linear_end 0.0120) + SD 1.5's
    # scheduler_config.json (steps_offset 1, set_alpha_to_one false, clip_sample false)
    "sd15": DiffusionConfig(),
    # Ho et al. 2020 for small pixel-space models; "trailing" starts sampling at t = T-1, the pure-noise end
    "linear": DiffusionConfig(linear_start=1e-4, linear_end=0.02, beta_schedule="linear",
                              timestep_spacing="trailing", steps_offset=0, set_alpha_to_one=True, clip_sample=True),
    "cosine": DiffusionConfig(beta_schedule="cosine", timestep_spacing="trailing", steps_offset=0,
                              set_alpha_to_one=True, clip_sample=True),
}


def spaced_timesteps(timesteps, steps, spacing, steps_offset=0):
    """The `steps` training timesteps a sampler visits, descending (diffusers `set_timesteps`).
    leading: 0, T//n, 2T//n, ... plus the offset; trailing: from T-1 down in steps of T/n; linspace: 0..T-1 evenly.
    Returned as floats: "linspace" gives fractional timesteps, which only Euler uses."""
    if steps < 1 or steps > timesteps:
        raise ValueError(f"steps must be between 1 and {timesteps}, got {steps}")
    if spacing == "leading":
        t = (torch.arange(steps, dtype=torch.float64) * (timesteps // steps) + steps_offset).flip(0)
    elif spacing == "trailing":
        t = torch.arange(timesteps, 0, -timesteps / steps, dtype=torch.float64).round() - 1
    elif spacing == "linspace":
        t = torch.linspace(0, timesteps - 1, steps, dtype=torch.float64).flip(0)
    else:
        raise ValueError(f"unknown timestep_spacing {spacing!r}: choose leading, trailing or linspace")
    return t.tolist()


def classifier_free_guidance(model, context, uncond_context, guidance_scale):
    """Wrap model(x, t, context) into the sampler's model(x, t): ε = ε(x, ∅) + s·(ε(x, c) − ε(x, ∅))
    (Ho & Salimans eq. 6). Both halves run as one batch [uncond; cond], as the SD pipelines do; s <= 1 skips ∅."""
    if guidance_scale <= 1.0:
        return lambda x, t: model(x, t, context)

    def guided(x, t):
        out_uncond, out_cond = model(torch.cat([x, x]), torch.cat([t, t]),
                                     torch.cat([uncond_context, context])).chunk(2)
        return out_uncond + guidance_scale * (out_cond - out_uncond)
    return guided


# ----------------------------------------------------------------------------------------------------------------
# The process: noising, loss, sampling

class GaussianDiffusion:
    """One noise schedule (a DiffusionConfig) and everything done with it: noising x_0 to x_t, the training
    loss, and sampling by name. It holds no network and no random state."""

    def __init__(self, config=None):
        self.config = config or DiffusionConfig()
        c = self.config
        if c.parameterization not in ("eps", "v"):
            raise ValueError(f"parameterization must be 'eps' or 'v', got {c.parameterization!r}")
        self.betas = make_betas(c.beta_schedule, c.timesteps, c.linear_start, c.linear_end)  # (T,)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)  # (T,) ᾱ_t, float32 like diffusers
        self.final_alpha_cumprod = torch.tensor(1.0) if c.set_alpha_to_one else self.alphas_cumprod[0]
        # σ_t = √((1-ᾱ_t)/ᾱ_t): the noise level of the same chain written as x_0 + σ·ε (Karras et al. "VE" form)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5

    # -- training -----------------------------------------------------------------------------------------------
    def _gather(self, table, t, ndim):
        return table.to(t.device)[t].float().view(-1, *([1] * (ndim - 1)))  # (B, 1, 1, 1)

    def add_noise(self, x0, noise, t):
        """q(x_t | x_0) (DDPM eq. 4): √ᾱ_t·x_0 + √(1-ᾱ_t)·ε for a (B,) long tensor of timesteps."""
        a = self._gather(self.alphas_cumprod, t, x0.ndim)
        return (a.sqrt() * x0 + (1 - a).sqrt() * noise).to(x0.dtype)

    def velocity(self, x0, noise, t):
        """v = √ᾱ_t·ε − √(1-ᾱ_t)·x_0, the v-prediction target (Salimans & Ho, section 4)."""
        a = self._gather(self.alphas_cumprod, t, x0.ndim)
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    def loss(self, model, x0, generator=None, min_snr_gamma=None, reduction="mean"):
        """The simple loss (DDPM eq. 14): draw t ~ U{0..T-1} and ε ~ N(0, I), predict ε (or v) from x_t, mean
        squared error. `min_snr_gamma` (5 in the paper) weights each sample by min(SNR, γ)/SNR for ε
        (min(SNR, γ)/(SNR+1) for v), SNR = ᾱ_t/(1-ᾱ_t). `reduction` "sum" adds the per-sample losses (a trainer
        that divides by the batch size itself, across micro-batches and processes)."""
        B = x0.shape[0]
        draw_device = generator.device if generator is not None else "cpu"
        t = torch.randint(0, self.config.timesteps, (B,), generator=generator, device=draw_device).to(x0.device)
        noise = randn(x0.shape, generator, x0.device, x0.dtype)
        x_t = self.add_noise(x0, noise, t)
        target = noise if self.config.parameterization == "eps" else self.velocity(x0, noise, t)
        out = model(x_t, t.float())
        mse = ((out.float() - target.float()) ** 2).flatten(1).mean(1)  # (B,)
        if min_snr_gamma is not None:
            snr = self._gather(self.alphas_cumprod, t, 1).view(B)
            snr = snr / (1 - snr)
            weight = snr.clamp(max=min_snr_gamma) / (snr if self.config.parameterization == "eps" else snr + 1)
            mse = mse * weight
        return mse.sum() if reduction == "sum" else mse.mean()

    # -- sampling -----------------------------------------------------------------------------------------------
    def sampling_timesteps(self, sampler, steps, strength=1.0):
        """(timesteps, start): the `steps` timesteps of a run, descending, and the index the run starts at.
        Image-to-image with `strength` s in (0, 1] skips the first steps − int(steps·s) of them (diffusers
        `get_timesteps`): s = 1 starts from pure noise, smaller s keeps more of the input image."""
        c = self.config
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        if sampler == "dpm++2m" and c.timestep_spacing != "trailing":
            # diffusers' DPM-Solver spaces steps+1 points and drops the last (t near 0) for these two spacings
            ts = spaced_timesteps(c.timesteps, steps + 1, c.timestep_spacing, c.steps_offset)[:-1]
            ts = [float(round(t)) for t in ts]
        else:
            ts = spaced_timesteps(c.timesteps, steps, c.timestep_spacing, c.steps_offset)
            if sampler != "euler":  # only Euler interpolates the schedule at fractional timesteps
                ts = [float(round(t)) for t in ts]
        start = len(ts) - min(int(len(ts) * strength), len(ts))
        if start >= len(ts):
            raise ValueError(f"strength {strength} with {steps} steps leaves no step to run")
        return ts, start

    def _sigma_at(self, t):
        """σ at a possibly fractional timestep, linear interpolation in t (diffusers uses np.interp)."""
        lo = min(int(math.floor(t)), self.config.timesteps - 2)
        w = t - lo
        return ((1 - w) * self.sigmas[lo].double() + w * self.sigmas[lo + 1].double()).float()

    def _predict(self, model, x_in, t, alpha, sigma):
        """Run the network on x_t = α·x_0 + σ·ε at timestep t; return its (ε, x̂_0). For v = α·ε − σ·x_0 both
        come without dividing by α, which is tiny at the noisy end of a cosine schedule."""
        out = model(x_in, torch.full((x_in.shape[0],), float(t), device=x_in.device)).float()
        if self.config.parameterization == "v":
            return alpha * out + sigma * x_in, alpha * x_in - sigma * out
        return out, (x_in - sigma * out) / alpha

    @torch.no_grad()
    def sample(self, model, noise, sampler="ddim", steps=50, eta=0.0, generator=None, init=None, strength=1.0,
               progress=False, s_noise=1.0):
        """Denoise `noise` (B, C, h, w), a standard normal draw (see `randn`), into x_0 with `steps` steps.
        Image-to-image: `init` holds the clean x_0 of the input image; it is noised to the first timestep of the
        run chosen by `strength`. `generator` feeds the fresh noise of DDPM and of DDIM with eta > 0, and that
        noise is scaled by `s_noise` (1: the samplers as published; below 1 a cooler draw, closer to the mean)."""
        ts, start = self.sampling_timesteps(sampler, steps, strength)
        ts = ts[start:]  # the run: image-to-image skips the first steps, and each sampler starts at ts[0]
        indices = tqdm(range(len(ts)), desc=sampler, disable=not progress, leave=False)
        noise = noise.float()
        if sampler == "ddpm":
            return self._ddpm(model, noise, init, ts, indices, generator, s_noise)
        if sampler == "ddim":
            return self._ddim(model, noise, init, ts, indices, eta, generator, s_noise)
        if sampler == "euler":
            return self._euler(model, noise, init, ts, indices)
        return self._dpm_solver_pp_2m(model, noise, init, ts, indices)

    def _vp_start(self, noise, init, alpha_bar):
        """x at the first step for the samplers that work on x_t itself: the noise, or the noised input image."""
        if init is None:
            return noise
        return alpha_bar.sqrt() * init.float() + (1 - alpha_bar).sqrt() * noise

    def _ddpm(self, model, noise, init, ts, indices, generator, s_noise=1.0):
        """Ancestral sampling (DDPM eq. 6-7), with the step's β recomputed from ᾱ so it works on a strided chain,
        and the "fixed small" variance β̃ (eq. 7) clamped at 1e-20 as diffusers does."""
        alphas_cumprod = self.alphas_cumprod
        x = self._vp_start(noise, init, alphas_cumprod[int(ts[0])])
        for i in indices:
            t = int(ts[i])
            a_t = alphas_cumprod[t]
            a_prev = alphas_cumprod[int(ts[i + 1])] if i + 1 < len(ts) else torch.tensor(1.0)
            _, x0 = self._predict(model, x, t, a_t**0.5, (1 - a_t) ** 0.5)
            if self.config.clip_sample:
                x0 = x0.clamp(-1, 1)
            beta = 1 - a_t / a_prev
            x = (a_prev**0.5 * beta / (1 - a_t)) * x0 + ((1 - beta) ** 0.5 * (1 - a_prev) / (1 - a_t)) * x
            if t > 0:
                variance = ((1 - a_prev) / (1 - a_t) * beta).clamp(min=1e-20)
                x = x + s_noise * variance**0.5 * randn(x.shape, generator, x.device)
        return x

    def _ddim(self, model, noise, init, ts, indices, eta, generator, s_noise=1.0):
        """DDIM (Song et al. eq. 12): x_prev = √ᾱ_prev·x̂_0 + √(1-ᾱ_prev-σ²)·ε + σ·z, σ = η·√β̃. η = 0 is
        deterministic; η = 1 is DDPM's variance. The last step lands on `final_alpha_cumprod`. With clip_sample
        ε is re-derived from the clamped x̂_0 (improved-diffusion's ddim_sample; diffusers' step with
        use_clipped_model_output=True): a clamped x̂_0 beside the network's own ε would no longer sum to x_t, and
        the deterministic chain keeps the difference as noise (the tour's model: 10 % single objects drawn right,
        64 % re-derived)."""
        alphas_cumprod = self.alphas_cumprod
        x = self._vp_start(noise, init, alphas_cumprod[int(ts[0])])
        for i in indices:
            t = int(ts[i])
            a_t = alphas_cumprod[t]
            a_prev = alphas_cumprod[int(ts[i + 1])] if i + 1 < len(ts) else self.final_alpha_cumprod
            eps, x0 = self._predict(model, x, t, a_t**0.5, (1 - a_t) ** 0.5)
            if self.config.clip_sample:  # ε re-derived, so that x_t = √ᾱ_t·x̂_0 + √(1-ᾱ_t)·ε still holds
                x0 = x0.clamp(-1, 1)
                eps = (x - a_t**0.5 * x0) / (1 - a_t) ** 0.5
            std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
            x = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
            if eta > 0:
                x = x + s_noise * std * randn(x.shape, generator, x.device)
        return x

    def _euler(self, model, noise, init, ts, indices):
        """Euler steps on the probability-flow ODE dx/dσ = ε(x/√(σ²+1), t) in the variable x = x_t/√ᾱ_t
        (= x_0 + σ·ε, Karras et al. eq. 1 with Algorithm 1's first-order step). The network sees x/√(σ²+1)."""
        sigmas = [self._sigma_at(t) for t in ts] + [torch.tensor(0.0)]
        if init is not None:
            x = init.float() + sigmas[0] * noise
        elif self.config.timestep_spacing == "leading":  # diffusers' init_noise_sigma: √(σ_max²+1), i.e. x_T = ε
            x = noise * (sigmas[0] ** 2 + 1) ** 0.5
        else:
            x = noise * sigmas[0]
        for i in indices:
            sigma = sigmas[i]
            scale = (sigma**2 + 1) ** 0.5
            eps, _ = self._predict(model, x / scale, ts[i], 1 / scale, sigma / scale)
            x = x + eps * (sigmas[i + 1] - sigma)  # dx/dσ = (x − x̂_0)/σ = ε, times dσ
        return x

    def _dpm_solver_pp_2m(self, model, noise, init, ts, indices):
        """DPM-Solver++(2M) (Lu et al. Algorithm 2) in log-SNR time λ = log(α/σ): each step is exact for a
        data prediction x̂_0 that is linear in λ, estimated from this step's and the previous step's x̂_0.
        First order on the first and on the last step (to σ = 0), as diffusers does."""
        sig = [self._sigma_at(t) for t in ts] + [torch.tensor(0.0)]
        alphas = [1 / (s**2 + 1) ** 0.5 for s in sig]  # α_t = √ᾱ_t
        sigmas = [s * a for s, a in zip(sig, alphas)]  # σ_t = √(1-ᾱ_t)
        lambdas = [torch.log(a) - torch.log(s) for a, s in zip(alphas, sigmas)]  # λ = +inf at the end
        x = noise if init is None else alphas[0] * init.float() + sigmas[0] * noise
        x0_prev = None
        for i in indices:
            _, x0 = self._predict(model, x, ts[i], alphas[i], sigmas[i])
            h = lambdas[i + 1] - lambdas[i]
            d = x0
            if x0_prev is not None and i < len(ts) - 1:  # second order: x̂_0's slope in λ from the last step
                r = (lambdas[i] - lambdas[i - 1]) / h  # Lu et al. Algorithm 2: r = h_prev / h
                d = x0 + (0.5 / r) * (x0 - x0_prev)
            x = (sigmas[i + 1] / sigmas[i]) * x - (alphas[i + 1] * (torch.exp(-h) - 1.0)) * d
            x0_prev = x0
        return x


# ----------------------------------------------------------------------------------------------------------------
# Training a text-to-image model: the loss over networks passed in, and the EMA copy that draws

@torch.no_grad()
def ema_update(ema_model, model, num_updates, decay=0.9999):
    """Exponential moving average of the weights, what a trained diffusion model samples with (DDPM sec. 4,
    CompVis `ldm/modules/ema.py` LitEma): ema <- ema + (1 - d)(theta - ema), with the warm-up d = min(decay,
    (1 + n)/(10 + n)) after n updates, so a short run's average is not dominated by its random start."""
    d = min(decay, (1 + num_updates) / (10 + num_updates))
    for ema_param, param in zip(ema_model.parameters(), model.parameters()):
        ema_param.lerp_(param.detach(), 1 - d)


class DiffusionModel(nn.Module):
    """What train.py trains for text to image: a text-conditioned denoiser `net` (unet.py's
    TextConditionedUNet: net.tokenize, net.encode_text, net(x, t, context)) under this file's loss, its EMA copy
    that draws (ema_decay 0: none), and a frozen VAE for latent space (None: pixels). forward() is the training
    loss summed over the batch; captions are dropped `caption_dropout` of the time for classifier-free guidance."""

    def __init__(self, net, vae, diffusion, ema_decay=0.9999, caption_dropout=0.1, min_snr_gamma=0.0):
        super().__init__()
        self.net, self.vae, self.diffusion = net, vae and vae.requires_grad_(False), diffusion
        self.ema = copy.deepcopy(net).requires_grad_(False) if ema_decay else None
        self.ema_decay, self.caption_dropout, self.min_snr_gamma = ema_decay, caption_dropout, min_snr_gamma
        self.register_buffer("empty_tokens", net.tokenize([""]), persistent=False)  # (1, T) the empty prompt
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))  # optimizer steps (EMA warm-up)

    def update_ema(self):
        """After each optimizer step: the EMA follows the trained weights."""
        if self.ema is not None:
            ema_update(self.ema, self.net, int(self.updates), self.ema_decay)
        self.updates += 1

    def forward(self, images, tokens, generator=None):
        """uint8 images (B, 3, H, W) and their captions' tokens (B, T) -> the loss summed over the batch."""
        x0 = images.float() / 127.5 - 1  # pixels in [-1, 1]
        if self.vae is not None:
            with torch.no_grad():
                x0 = self.vae.encode_to_latents(x0, generator)  # (B, 4, H/8, W/8)
        if self.training:  # classifier-free guidance: the same network learns the empty prompt too
            drop = torch.rand(len(tokens)) < self.caption_dropout
            tokens = torch.where(drop[:, None].to(tokens.device), self.empty_tokens, tokens)
        context = self.net.encode_text(tokens)  # (B, T, context_dim)
        return self.diffusion.loss(lambda x, t: self.net(x, t, context), x0, generator,
                                   self.min_snr_gamma or None, reduction="sum")

    def pipeline(self):
        """The prompt -> image pipeline (below) with the weights that draw: the EMA's, else the trained ones."""
        net = self.ema or self.net
        return TextToImage(self.diffusion, net, net.encode_text, net.tokenize, self.vae)


# ----------------------------------------------------------------------------------------------------------------
# Prompt -> image: the pipeline, and its images as files

class TextToImage:
    """Prompts -> images, as diffusers' StableDiffusionPipeline and StableDiffusionImg2ImgPipeline run Rombach et
    al. 2022: the text encoder's context of each prompt and negative prompt, classifier-free guidance over
    `denoiser(x, t, context)`, a sampler of `diffusion`, and the VAE's decoder back to pixels (vae None: the
    denoiser works on pixels in [-1, 1]). Networks in, images out: `text_encoder(tokens) -> context`,
    `tokenize(prompts) -> (B, T) ids`; the denoiser's parameters say which device it runs on."""

    def __init__(self, diffusion, denoiser, text_encoder, tokenize, vae=None):
        self.diffusion, self.denoiser, self.text_encoder, self.tokenize, self.vae = (diffusion, denoiser,
                                                                                      text_encoder, tokenize, vae)

    @torch.no_grad()
    def __call__(self, prompts, seeds, negative_prompts=None, sampler="ddim", steps=50, guidance_scale=7.5,
                 eta=0.0, height=512, width=512, init_image=None, strength=0.8, vae_tile_size=None, progress=False,
                 batch_size=None, s_noise=1.0):
        """One image per (prompt, seed) -> (B, 3, height, width) in [0, 1], float32 on the CPU. `init_image`
        (3, H, W) in [-1, 1] switches to image-to-image (with a VAE). Each image draws all its randomness (initial
        noise, the VAE sample of the input image, DDPM's step noise) from its own CPU generator, so a seed gives
        the same image in any batch and on any device; that is also how diffusers consumes a list of generators.
        `batch_size`: at most this many images at once (the same images, in less memory)."""
        if batch_size and len(prompts) > batch_size:
            return torch.cat([self(prompts[s:s + batch_size], seeds[s:s + batch_size], negative_prompts and
                                   negative_prompts[s:s + batch_size], sampler, steps, guidance_scale, eta, height,
                                   width, init_image, strength, vae_tile_size, progress, s_noise=s_noise)
                              for s in range(0, len(prompts), batch_size)])
        device = next(self.denoiser.parameters()).device
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        context = self.text_encoder(self.tokenize(prompts).to(device))
        uncond = self.text_encoder(self.tokenize(negative_prompts or [""] * len(prompts)).to(device)) \
            if guidance_scale > 1 else None
        vae_dtype = next(self.vae.parameters()).dtype if self.vae else None
        init = None
        if init_image is not None:  # one encoding, one posterior sample per image, scaled for the denoiser
            posterior = self.vae.encode(init_image[None].to(device, vae_dtype))  # over (1, 4, h, w)
            init = torch.cat([posterior.sample(g) for g in generators]).float() * self.vae.config.scale_factor
        f, channels = (self.vae.downscale, self.vae.config.embed_dim) if self.vae else (1, 3)
        noise = randn((len(prompts), channels, height // f, width // f), generators, device)
        x = self.diffusion.sample(classifier_free_guidance(self.denoiser, context, uncond, guidance_scale), noise,
                                  sampler, steps, eta, generators, init, strength if init is not None else 1.0,
                                  progress, s_noise)
        images = self.vae.decode_latents(x.to(vae_dtype), tile_size=vae_tile_size) if self.vae else x.clamp(-1, 1)
        return ((images.float() + 1) / 2).cpu()  # (B, 3, H, W) in [0, 1]


def to_pil(images):
    """(B, 3, H, W) in [0, 1], what the pipeline returns -> PIL images, rounding as diffusers' numpy_to_pil does."""
    array = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)  # (B, H, W, 3)
    return [Image.fromarray(a) for a in array]


SAMPLER_NAMES = {"ddpm": "DDPM", "ddim": "DDIM", "euler": "Euler", "dpm++2m": "DPM++ 2M"}  # as AUTOMATIC1111


def parameters_text(prompt, negative_prompt, steps, sampler, guidance_scale, seed, width, height, model,
                    strength=None, eta=0.0, s_noise=1.0):
    """AUTOMATIC1111's infotext: the prompt, a "Negative prompt:" line when there is one, then key: value pairs."""
    lines = [prompt] + ([f"Negative prompt: {negative_prompt}"] if negative_prompt else [])
    fields = [f"Steps: {steps}", f"Sampler: {SAMPLER_NAMES[sampler]}", f"CFG scale: {guidance_scale:g}",
              f"Seed: {seed}", f"Size: {width}x{height}", f"Model: {model}"]
    fields += [f"Denoising strength: {strength:g}"] if strength is not None else []
    fields += [f"Eta: {eta:g}"] if eta else []  # DDIM's η
    fields += [f"S noise: {s_noise:g}"] if s_noise != 1 and (sampler == "ddpm" or eta) else []  # fresh noise drawn
    return "\n".join(lines + [", ".join(fields)])


def save_png(image, path, parameters):
    """A PNG that carries its settings in a "parameters" text chunk, as AUTOMATIC1111's web UI writes it."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    image.save(path, pnginfo=info)


# ----------------------------------------------------------------------------------------------------------------
# Pictures, drawn with Pillow alone: text that fits, grids that carry their prompts

def text_font(size):
    """Pillow's bundled TrueType face (Pillow >= 10.1, built with FreeType as its wheels are): no font file to find."""
    return ImageFont.load_default(size)


def wrap(text, font, width):
    """Words -> lines at most `width` pixels wide (a longer word keeps a line of its own)."""
    lines = []
    for word in text.split():
        if lines and font.getlength(lines[-1] + " " + word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def image_grid(images, cols=None, captions=None, scale=1, font_size=11):
    """PIL images of one size pasted into one, row by row, `cols` a row (default: a near-square grid). With
    `captions`, a strip under each image holds its caption, so the grid explains itself, and a white gap parts
    the images; `scale` enlarges each image (nearest neighbour: a 32-pixel drawing stays sharp) to fit its caption."""
    cols, font = cols or math.ceil(math.sqrt(len(images))), text_font(font_size)
    w, h, gap = images[0].size[0] * scale, images[0].size[1] * scale, 4 if captions else 0
    lines = [wrap(caption, font, w - 4) for caption in captions or []]
    strip = max(map(len, lines), default=0) * (font_size + 2) + gap
    grid = Image.new("RGB", (cols * (w + gap) - gap, math.ceil(len(images) / cols) * (h + strip)),
                     "white" if captions else "black")
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        x, y = (i % cols) * (w + gap), (i // cols) * (h + strip)
        grid.paste(image.resize((w, h), Image.Resampling.NEAREST), (x, y))
        if captions:
            draw.multiline_text((x + 2, y + h + 2), "\n".join(lines[i]), "black", font, spacing=2)
    return grid
