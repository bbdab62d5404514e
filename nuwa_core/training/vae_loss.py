"""The KL autoencoder objective of Latent Diffusion (Rombach et al. 2022; the loss Stable Diffusion's
VAE was trained with), for the T-KLVAE stage, written from its published description. `n` is the
number of images in the batch (for video: frames, each frame one image, as the image VAE sees them):

    rec  = |x - x_rec| + perceptual_weight * LPIPS(x, x_rec)        per pixel (LPIPS broadcast over pixels)
    nll  = sum(rec / exp(logvar) + logvar) / n                      logvar a scalar, 0 (see below)
    kl   = sum(0.5 * (mu^2 + var - 1 - log var)) / n                summed over every latent element
    g    = -mean(D(x_rec))                                          after disc_start
    w_d  = disc_weight * clamp(|grad_last nll| / (|grad_last g| + 1e-4), 0, 1e4)   (adaptive, no gradient)
    loss = nll + kl_weight * kl + w_d * g
    d    = 0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_rec))))  (hinge; the discriminator's step)

`last` is the decoder's output convolution (`decoder.conv_out.weight`, LDM's get_last_layer). SD's
kl-f8 settings: kl_weight 1e-6, disc_weight 0.5, disc_start 50001, perceptual_weight 1. LDM keeps
logvar as a parameter (init 0) but leaves it out of the autoencoder's optimizer, so it stays 0 and
nll is the summed reconstruction loss; the functions take it for completeness.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def nll_loss(x: torch.Tensor, rec: torch.Tensor, p_loss: torch.Tensor | None = None, perceptual_weight: float = 1.0,
             logvar: float | torch.Tensor = 0.0) -> torch.Tensor:
    """x, rec [n, C, H, W]; p_loss [n] (LPIPS per image) or None -> sum over every pixel / n."""
    r = (x - rec).abs()
    if p_loss is not None and perceptual_weight:
        r = r + perceptual_weight * p_loss.view(-1, *([1] * (r.dim() - 1)))
    logvar = torch.as_tensor(logvar, dtype=r.dtype, device=r.device)
    return (r / logvar.exp() + logvar).sum() / r.shape[0]


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) summed over every latent element of [n, ...], / n."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum() / mean.shape[0]


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last: torch.Tensor, disc_weight: float) -> torch.Tensor:
    """disc_weight x the ratio of the two losses' gradient norms at `last` (clamped to 0..1e4, detached):
    the adversarial term is brought to the reconstruction term's size at the decoder's output."""
    g_nll = torch.autograd.grad(nll, last, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
    w = g_nll.norm() / (g_adv.norm() + 1e-4)
    return w.clamp(0.0, 1e4).detach() * disc_weight


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def disc_active(step: int, disc_start: int) -> bool:
    """LDM's adopt_weight: the adversarial terms count from optimizer step `disc_start` on (0-based)."""
    return step >= disc_start
