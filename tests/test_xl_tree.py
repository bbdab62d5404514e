"""Diffusion over diffusion: frame counts, shapes, kept keyframes, batching, seeds, input errors."""
import functools

import pytest
import torch

from nuwa_core.xl.diffusion import SamplingCancelled, sample_ddim, sample_ddpm
from nuwa_core.xl.diffusion_over_diffusion import depth_for, fill_between, frames_for, generate_long_video
from nuwa_core.xl.mask_temporal_diffusion import MaskTemporalDiffusion, MTDConfig

SHAPE = (4, 4, 4)
D = 8


def perturbed(seed):
    torch.manual_seed(seed)
    model = MaskTemporalDiffusion(MTDConfig.tiny(model_channels=8, context_dim=D, attention_levels=(1,))).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)  # make the condition matter
    return model


@pytest.fixture(scope="module")
def models():
    return perturbed(0), perturbed(1)


def test_frames_for():
    assert [frames_for(3, m) for m in (1, 2, 3)] == [3, 5, 9]
    assert frames_for(16, 3) == 15 ** 3 + 1
    assert depth_for(8, 344) == 3
    with pytest.raises(ValueError, match="nearest are 50 \\(depth 2\\) or 344 \\(depth 3\\)"):
        depth_for(8, 300)
    with pytest.raises(ValueError, match="at least 3"):
        frames_for(2, 2)
    with pytest.raises(ValueError, match="depth must be at least 1"):
        frames_for(4, 0)


@pytest.mark.parametrize("L,depth", [(3, 1), (3, 3), (4, 2), (5, 2)])
def test_shapes_through_the_tree(models, L, depth):
    prompts = torch.randn(1, 3, D)
    seen = set()
    video = generate_long_video(*models, prompts, L, depth, SHAPE, steps=2,
                                generator=torch.Generator().manual_seed(0),
                                callback=lambda info: seen.add(info["level"]))
    assert video.shape == (frames_for(L, depth), *SHAPE)
    assert torch.isfinite(video).all()
    assert seen == set(range(depth))


def test_upper_levels_are_kept_exactly(models):
    L, depth = 4, 3
    calls = []

    def recording_sampler(model_fn, x_T, steps, **kw):
        out = sample_ddim(model_fn, x_T, steps, **kw)
        calls.append(out.clone())
        return out
    video = generate_long_video(*models, torch.randn(3, D), L, depth, SHAPE, sampler=recording_sampler,
                                steps=2, generator=torch.Generator().manual_seed(0))
    keyframes = calls[0][0]  # [L, c, h, w] from the global model
    assert torch.equal(video[::(L - 1) ** 2], keyframes)
    level1 = fill_between(models[1], keyframes, torch.randn(3, D), L, steps=2)  # any fill keeps its inputs
    assert torch.equal(level1[::L - 1], keyframes)
    # level 2 keeps the frames of level 1
    assert len(calls) == 3 and calls[1].shape[0] == L - 1 and calls[2].shape[0] == (L - 1) ** 2
    level1 = torch.cat([calls[1][:, :-1].flatten(0, 1), keyframes[-1:]])
    level1[::L - 1] = keyframes
    assert torch.equal(video[::L - 1], level1)


def test_batch_equals_single(models):
    L = 4
    g = torch.Generator().manual_seed(3)
    keyframes = torch.randn(5, *SHAPE, generator=g)
    prompts = torch.randn(4 * (L - 1) + 1, 2, D, generator=g)
    noise = torch.randn(4, L, *SHAPE, generator=g)
    batch = fill_between(models[1], keyframes, prompts, L, steps=3, noise=noise)
    chunked = fill_between(models[1], keyframes, prompts, L, steps=3, noise=noise, max_batch=1)
    single = [fill_between(models[1], keyframes[s:s + 2], prompts[s * (L - 1):(s + 1) * (L - 1) + 1], L,
                           steps=3, noise=noise[s:s + 1]) for s in range(4)]
    single = torch.cat([s[:-1] for s in single] + [keyframes[-1:]])
    # float reordering in batched kernels, amplified by DDIM's 1/sqrt(alpha_bar) at high noise
    assert (batch - single).abs().max() < 1e-4
    assert (batch - chunked).abs().max() < 1e-4


def test_per_level_prompts_and_seed(models):
    L, depth = 3, 2
    prompts = [torch.randn(3, 2, D), torch.randn(5, 2, D)]

    def run(seed, sampler=sample_ddim):
        return generate_long_video(*models, prompts, L, depth, SHAPE, steps=2, sampler=sampler,
                                   generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))
    ddpm = functools.partial(sample_ddpm)
    assert torch.equal(run(7, ddpm), run(7, ddpm))


def test_bad_prompts_are_explained(models):
    with pytest.raises(ValueError, match="prompts for 2 levels"):
        generate_long_video(*models, [torch.randn(3, 2, D)], 3, 2, SHAPE, steps=1)
    with pytest.raises(ValueError, match="prompts of level 1: need 5 prompt embeddings"):
        generate_long_video(*models, [torch.randn(3, 2, D), torch.randn(4, 2, D)], 3, 2, SHAPE, steps=1)


def test_cancel(models):
    with pytest.raises(SamplingCancelled):
        generate_long_video(*models, torch.randn(2, D), 3, 2, SHAPE, steps=3,
                            callback=lambda info: info["level"] == 1)
