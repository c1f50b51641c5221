"""Test-side helpers for Stable Diffusion 1.x: diffusers' models as oracles, fed through diffusers' own
single-file converter (`diffusers.loaders.single_file_utils`), the path `from_single_file` takes for an
official `v1-5-pruned-emaonly.safetensors`.

- `original_config(unet_cfg, vae_cfg)`: CompVis' configs/stable-diffusion/v1-inference.yaml as a dict (the
  file diffusers would download), with the network sizes of our configs; diffusers derives its configs from it.
- `single_file_state(unet=, vae=, text=)`: our modules' state in the official single-file layout: prefixes
  `model.diffusion_model.`, `first_stage_model.`, `cond_stage_model.transformer.`, plus the 12 noise-schedule
  buffers and `model_ema.*` scalars the official file carries (and our loaders must ignore).
- `diffusers_unet(checkpoint, unet_cfg)`, `diffusers_vae(checkpoint, vae_cfg)`: diffusers models built on the
  meta device and loaded strictly from diffusers' conversion of that state (tensors shared, no copy).
- `random_init_(module, seed)`: fast seeded init that keeps activations O(1) through deep stacks.
- `max_rel_diff(ours, ref)`: max |ours - ref| / max |ref|, the tolerance measure of the SD parity tests.
- `SD15_SCHEDULER_CONFIG`, `reference_scheduler(sampler, **overrides)`: diffusers' scheduler for one of ddpm.py's
  samplers, configured as SD 1.5's scheduler_config.json, as users swap samplers (`Scheduler.from_config`).
"""
import math

import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       UNet2DConditionModel)
from diffusers.loaders import single_file_utils as sfu

import unet as unet_lib
import vae as vae_lib

# small UNets of SD's layout for the tests: pixels (3 channels, context 512) and SD latents (4, context 32)
TINY_UNETS = {"tiny-pixel": unet_lib.UNetConfig(in_channels=3, out_channels=3, model_channels=64,
                                                channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(4, 2),
                                                num_heads=4, context_dim=512),  # 7,402,563 parameters
              "tiny-latent": unet_lib.UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                                                 attention_resolutions=(2, 1), num_heads=2, context_dim=32)}  # 1,055,044
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2")
# SD 1.5's scheduler/scheduler_config.json, with the defaults its PNDMScheduler registers (timestep_spacing
# "leading"), so that from_config gives every scheduler the spacing SD pipelines use.
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None, "clip_sample": False, "timestep_spacing": "leading", "prediction_type": "epsilon",
}
SCHEDULERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "euler": EulerDiscreteScheduler,
              "dpm++2m": DPMSolverMultistepScheduler}
SCHEDULER_OPTIONS = {"dpm++2m": {"algorithm_type": "dpmsolver++", "solver_order": 2}}  # DPM-Solver++(2M)


def original_config(unet_cfg=None, vae_cfg=None):
    u, v = unet_cfg or unet_lib.PRESETS["sd15"], vae_cfg or vae_lib.PRESETS["sd15"]
    return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "linear_start": 0.00085, "linear_end": 0.0120, "num_timesteps_cond": 1, "log_every_t": 200,
        "timesteps": 1000, "first_stage_key": "jpg", "cond_stage_key": "txt", "image_size": 64, "channels": 4,
        "cond_stage_trainable": False, "conditioning_key": "crossattn", "monitor": "val/loss_simple_ema",
        "scale_factor": v.scale_factor, "use_ema": False,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
            "image_size": 32, "in_channels": u.in_channels, "out_channels": u.out_channels,
            "model_channels": u.model_channels, "attention_resolutions": list(u.attention_resolutions),
            "num_res_blocks": u.num_res_blocks, "channel_mult": list(u.channel_mult), "num_heads": u.num_heads,
            "use_spatial_transformer": True, "transformer_depth": u.transformer_depth,
            "context_dim": u.context_dim, "use_checkpoint": True, "legacy": False}},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
            "embed_dim": v.embed_dim, "monitor": "val/rec_loss", "ddconfig": {
                "double_z": True, "z_channels": v.z_channels, "resolution": 256, "in_channels": v.in_channels,
                "out_ch": v.out_ch, "ch": v.ch, "ch_mult": list(v.ch_mult), "num_res_blocks": v.num_res_blocks,
                "attn_resolutions": [], "dropout": 0.0},
            "lossconfig": {"target": "torch.nn.Identity"}}},
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}}}}


def schedule_buffers(linear_start=0.00085, linear_end=0.0120, timesteps=1000):
    """The 12 buffers ldm.models.diffusion.ddpm.DDPM.register_schedule stores (v-posterior 0, float32)."""
    betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    post_var = betas * (1 - ac_prev) / (1 - ac)
    values = [betas, ac, ac_prev, ac.sqrt(), (1 - ac).sqrt(), (1 - ac).log(), (1 / ac).sqrt(), (1 / ac - 1).sqrt(),
              post_var, post_var.clamp(min=1e-20).log(), betas * ac_prev.sqrt() / (1 - ac),
              (1 - ac_prev) * (1 - betas).sqrt() / (1 - ac)]
    return {name: value.float() for name, value in zip(SCHEDULE_BUFFERS, values)}


def single_file_state(unet=None, vae=None, text=None):
    """One flat dict as in v1-5-pruned-emaonly.{safetensors,ckpt}['state_dict']; tensors are shared, not copied.
    `text` is a state dict already in the file's HF layout (keys after `cond_stage_model.transformer.`)."""
    state = dict(schedule_buffers())
    state["model_ema.decay"], state["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(0, dtype=torch.int32)
    for prefix, part in ((unet_lib.PREFIX, unet and unet.state_dict()), (vae_lib.PREFIX, vae and vae.state_dict()),
                         ("cond_stage_model.transformer.", text)):
        state.update({prefix + k: v for k, v in (part or {}).items()})
    if text is not None:
        state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return state


def reference_scheduler(sampler, **overrides):
    return SCHEDULERS[sampler].from_config({**SD15_SCHEDULER_CONFIG, **SCHEDULER_OPTIONS.get(sampler, {}),
                                            **overrides})


def _load_on_meta(cls, config, converted):
    with torch.device("meta"):
        model = cls(**config)
    model.load_state_dict(converted, strict=True, assign=True)  # strict: every diffusers weight came from the file
    return model.eval()


def diffusers_unet(checkpoint, unet_cfg=None, vae_cfg=None):
    """Our config's options that SD 1.x's yaml never sets become their diffusers names: openaimodel's
    `use_scale_shift_norm` is `resnet_time_scale_shift="scale_shift"`, its sequential `label_emb` (our
    adm_in_channels) a "projection" class embedding, which the converter fills from `label_emb.0.*`."""
    cfg = sfu.create_unet_diffusers_config_from_ldm(original_config(unet_cfg, vae_cfg), checkpoint)
    if unet_cfg is not None and unet_cfg.use_scale_shift_norm:
        cfg["resnet_time_scale_shift"] = "scale_shift"
    if unet_cfg is not None and unet_cfg.adm_in_channels:
        cfg["class_embed_type"], cfg["projection_class_embeddings_input_dim"] = "projection", unet_cfg.adm_in_channels
    return _load_on_meta(UNet2DConditionModel, cfg, sfu.convert_ldm_unet_checkpoint(checkpoint, cfg))


def diffusers_vae(checkpoint, vae_cfg=None):
    cfg = sfu.create_vae_diffusers_config_from_ldm(original_config(None, vae_cfg), checkpoint)
    return _load_on_meta(DiffusersAutoencoderKL, cfg, sfu.convert_ldm_vae_checkpoint(checkpoint, cfg))


@torch.no_grad()
def random_init_(module, seed=0):
    """Seeded init, fast for 860M parameters: weights ~ N(0, 1/fan_in) keep every layer's output O(1), so the
    comparison is not dominated by near-zero activations; norm scales 1 + N(0, 0.1^2), biases N(0, 0.02^2).
    (The official init zeroes the last conv of every block, which would hide bugs behind them.) Values are
    read at a random offset from one pool of a prime number of normal draws: drawing 860M numbers one by one
    takes half a minute, and with a prime period no two rows of a weight repeat each other."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(POOL_SIZE, generator=gen)

    def fill_normal_(p, mean, std):  # p = mean + std * (pool values from a random offset, wrapping around)
        flat, i, j = p.view(-1), int(torch.randint(POOL_SIZE, (1,), generator=gen)), 0
        while j < flat.numel():
            n = min(POOL_SIZE - i, flat.numel() - j)
            flat[j:j + n].copy_(pool[i:i + n])
            i, j = 0, j + n
        p.mul_(std).add_(mean)

    for name, p in module.named_parameters():
        if p.ndim == 1 and name.endswith("weight") and ("norm" in name or name.endswith(GROUPNORM_NAMES)):
            fill_normal_(p, 1.0, 0.1)
        elif p.ndim == 1:
            fill_normal_(p, 0.0, 0.02)
        else:
            fill_normal_(p, 0.0, 1 / math.sqrt(p[0].numel()))
    return module


POOL_SIZE = 1_000_003  # a prime
GROUPNORM_NAMES = ("in_layers.0.weight", "out_layers.0.weight", "out.0.weight")  # the UNet's unnamed norms


def build(cls, config, seed=0):
    """Our model, allocated without the default init (meta -> empty) and then random_init_-ed."""
    with torch.device("meta"):
        model = cls(config)
    return random_init_(model.to_empty(device="cpu"), seed).eval()


def max_rel_diff(ours, ref):
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
