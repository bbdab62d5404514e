"""LDM schedule, loss and samplers."""
import pytest
import torch

from nuwa_core.xl.diffusion import (SamplingCancelled, ldm_alphas_cumprod, q_sample, sample_ddim, sample_ddpm,
                                 timesteps_for, training_loss)


def test_ldm_schedule():
    ac = ldm_alphas_cumprod()
    betas = 1 - ac / torch.cat([torch.ones(1, dtype=ac.dtype), ac[:-1]])
    assert ac.shape == (1000,)
    assert betas[0].item() == pytest.approx(0.00085, rel=1e-6)
    assert betas[-1].item() == pytest.approx(0.012, rel=1e-6)
    assert ac[-1].item() == pytest.approx(0.0046636, rel=1e-3)  # SD's final alphas_cumprod


def test_timesteps():
    assert timesteps_for(1000) == list(range(999, -1, -1))
    assert timesteps_for(4) == [999, 749, 499, 249]
    with pytest.raises(ValueError, match="between 1 and 1000"):
        timesteps_for(0)


def test_q_sample_and_loss():
    x0 = torch.randn(3, 2, 4, 4)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 500, 999])
    x_t = q_sample(x0, t, noise)
    a = ldm_alphas_cumprod()[t].float().view(-1, 1, 1, 1)
    assert torch.allclose(x_t, a.sqrt() * x0 + (1 - a).sqrt() * noise)
    # an oracle that knows the noise has zero loss
    g = torch.Generator().manual_seed(0)
    torch.randint(0, 1000, (3,), generator=g)  # training_loss draws t first, then the noise: replay both
    eps = torch.randn(x0.shape, generator=g)
    oracle = lambda x, t: eps
    assert training_loss(oracle, x0, generator=torch.Generator().manual_seed(0)).item() == 0.0
    assert training_loss(lambda x, t: torch.zeros_like(x), x0, generator=g).item() > 0.5


def gaussian_eps(x, t):
    """The exact eps-predictor when the data is N(0, 0.25): x_t ~ N(0, 0.25 a + 1 - a)."""
    a = ldm_alphas_cumprod()[t.long()].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
    return (1 - a).sqrt() * x / (0.25 * a + 1 - a)


@pytest.mark.parametrize("sampler,steps", [(sample_ddim, 250), (sample_ddpm, 250)])
def test_samplers_reach_the_data_distribution(sampler, steps):
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(4000, 4, generator=g)
    x0 = sampler(gaussian_eps, x_T, steps, generator=g)
    assert x0.std().item() == pytest.approx(0.5, rel=0.04)  # few steps bias the std low


@pytest.mark.parametrize("sampler", [sample_ddim, sample_ddpm])
def test_seeded_and_cancellable(sampler):
    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return sampler(gaussian_eps, torch.randn(2, 3, generator=g), 10, generator=g)
    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))
    seen = []

    def callback(info):
        seen.append(info["i"])
        return info["i"] == 2
    with pytest.raises(SamplingCancelled, match="step 3 of 10"):
        sampler(gaussian_eps, torch.randn(2, 3), 10, callback=callback)
    assert seen == [0, 1, 2]
