"""Latent diffusion maths for NUWA-XL: the LDM schedule, the eps training loss, DDPM and DDIM samplers.

Samplers are plain functions with one signature (k-diffusion style):

    sampler(model_fn, x_T, steps, *, alphas_cumprod=None, generator=None, callback=None) -> x_0

`model_fn(x, t)` predicts the noise eps of `x` at float timesteps `t` [B] in [0, 999] (what
ComfyUI passes too); conditions are bound into `model_fn` by the caller. Classifier-free guidance
is such a binding too (`guided`): the samplers do not know about it. `generator` is a CPU
generator: every random draw here is made on the CPU and then moved to the latents' device (as
ComfyUI makes its noise), so a seed gives the same noise on every device. `callback(info)` runs once
per step with {"i", "total", "t", "x", "denoised"}; returning True cancels (SamplingCancelled).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

NUM_TIMESTEPS = 1000

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class SamplingCancelled(RuntimeError):
    """A sampler's callback asked to stop."""


def ldm_alphas_cumprod(num_timesteps: int = NUM_TIMESTEPS, beta_start: float = 0.00085,
                       beta_end: float = 0.012) -> torch.Tensor:
    """The LDM "linear" schedule (diffusers' "scaled_linear"): betas linear in sqrt space. -> [T] float64"""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def _schedule(alphas_cumprod: torch.Tensor | None) -> torch.Tensor:
    return ldm_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod.double()


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
             alphas_cumprod: torch.Tensor | None = None) -> torch.Tensor:
    """x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps, with t [B] integer timesteps and x0 [B, ...]."""
    a = _schedule(alphas_cumprod).to(x0.device)[t.long()].to(x0.dtype)
    a = a.view(-1, *([1] * (x0.ndim - 1)))
    return a.sqrt() * x0 + (1.0 - a).sqrt() * noise


def cpu_randn(shape, generator: torch.Generator | None = None, device=None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise drawn on the CPU from `generator` (a CPU generator; None: torch's
    default) and then moved to `device`: the same seed gives the same noise on every device."""
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


def cpu_randint(high: int, shape, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Integers in [0, high) drawn on the CPU from `generator`, then moved to `device`."""
    return torch.randint(0, high, tuple(shape), generator=generator).to(device)


def training_loss(model_fn: ModelFn, x0: torch.Tensor, generator: torch.Generator | None = None,
                  alphas_cumprod: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 5: MSE between eps and model_fn(x_t, t) at a uniformly drawn t per sample. -> scalar"""
    ac = _schedule(alphas_cumprod)
    t = cpu_randint(ac.shape[0], (x0.shape[0],), generator, x0.device)
    noise = cpu_randn(x0.shape, generator, x0.device, x0.dtype)
    x_t = q_sample(x0, t, noise, ac)
    return F.mse_loss(model_fn(x_t, t.to(x0.dtype)), noise)


def guided(model, conditions: tuple, null_conditions: tuple, guidance: float) -> ModelFn:
    """Classifier-free guidance as a plain model_fn: eps = eps_null + guidance * (eps_cond - eps_null).

    `model(x, t, *conditions)`; `conditions` and `null_conditions` are per-sample tensors of the
    same shapes (the null prompt is what the training's text drop feeds: zeros). Both passes run as
    one batch of 2B. guidance 1 is the conditional model alone (one pass); 0 the unconditional one.
    """
    if guidance == 1.0:
        return lambda x, t: model(x, t, *conditions)
    for c, n in zip(conditions, null_conditions):
        if c is not None and tuple(c.shape) != tuple(n.shape):
            raise ValueError(f"guidance: a null condition must have its condition's shape, got {tuple(n.shape)} "
                             f"for {tuple(c.shape)}")
    both = tuple(None if c is None else torch.cat([c, n]) for c, n in zip(conditions, null_conditions))

    def fn(x, t):
        eps_cond, eps_null = model(torch.cat([x, x]), torch.cat([t, t]), *both).chunk(2)
        return eps_null + guidance * (eps_cond - eps_null)
    return fn


def timesteps_for(steps: int, num_timesteps: int = NUM_TIMESTEPS) -> list[int]:
    """`steps` timesteps from num_timesteps-1 down, evenly spaced ("trailing": always starts at T-1)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be between 1 and {num_timesteps}, got {steps}")
    ratio = num_timesteps / steps
    return [round(num_timesteps - i * ratio) - 1 for i in range(steps)]


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return cpu_randn(x.shape, generator, x.device, x.dtype)


@torch.no_grad()
def _sample(model_fn: ModelFn, x: torch.Tensor, steps: int, eta: float, alphas_cumprod, generator, callback):
    ac = _schedule(alphas_cumprod)
    ts = timesteps_for(steps, ac.shape[0])
    for i, t in enumerate(ts):
        a = ac[t].item()
        a_prev = ac[ts[i + 1]].item() if i + 1 < len(ts) else 1.0
        eps = model_fn(x, torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype))
        x0 = (x - (1.0 - a) ** 0.5 * eps) / a ** 0.5
        sigma = eta * ((1.0 - a_prev) / (1.0 - a) * (1.0 - a / a_prev)) ** 0.5
        x = a_prev ** 0.5 * x0 + max(1.0 - a_prev - sigma ** 2, 0.0) ** 0.5 * eps
        if sigma > 0:
            x = x + sigma * _noise_like(x, generator)
        if callback is not None and callback({"i": i, "total": len(ts), "t": t, "x": x, "denoised": x0}):
            raise SamplingCancelled(f"sampling cancelled by the callback at step {i + 1} of {len(ts)}")
    return x


def sample_ddim(model_fn: ModelFn, x_T: torch.Tensor, steps: int, *, eta: float = 0.0,
                alphas_cumprod: torch.Tensor | None = None, generator: torch.Generator | None = None,
                callback=None) -> torch.Tensor:
    """DDIM (Song et al.); eta=0 is deterministic given x_T, eta=1 is DDPM on the strided schedule."""
    return _sample(model_fn, x_T, steps, eta, alphas_cumprod, generator, callback)


def sample_ddpm(model_fn: ModelFn, x_T: torch.Tensor, steps: int = NUM_TIMESTEPS, *,
                alphas_cumprod: torch.Tensor | None = None, generator: torch.Generator | None = None,
                callback=None) -> torch.Tensor:
    """Ancestral DDPM (eq. 16) with the posterior variance; steps < 1000 respaces the schedule."""
    return _sample(model_fn, x_T, steps, 1.0, alphas_cumprod, generator, callback)
