"""The video scores of bench/xl_quality.py (nuwa_core.evaluation.video_scores) and the Frechet distance it
uses, on tiny inputs: orderings that would fail if a score could not tell the cases apart."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nuwa_core.evaluation.metrics import EvalInputError, frechet_distance
from nuwa_core.evaluation.video_scores import (
    colour_distance,
    colour_stats,
    frechet_distance_pca,
    pca_basis,
    warp_error,
    warp_errors,
    window_starts,
)

cv2 = pytest.importorskip("cv2")


def _texture(h=48, w=160, seed=0) -> np.ndarray:
    """A smooth random colour texture [h, w, 3] in 0..1 (blurred noise: DIS can follow it)."""
    rng = np.random.default_rng(seed)
    x = rng.random((h, w, 3)).astype(np.float32)
    x = cv2.GaussianBlur(x, (0, 0), 2.0)
    return (x - x.min()) / (x.max() - x.min())


def _pan(frames=12, speed=1, seed=0) -> np.ndarray:
    t = _texture(seed=seed)
    return np.stack([t[:, k * speed:k * speed + 64] for k in range(frames)])


def test_warp_error_orders_smooth_motion_below_shuffled_and_independent_frames():
    pan = _pan()
    shuffled = pan[np.random.default_rng(1).permutation(len(pan))]
    independent = np.stack([_texture(seed=10 + k)[:, :64] for k in range(len(pan))])
    e_pan, e_shuf, e_ind = warp_error(pan), warp_error(shuffled), warp_error(independent)
    assert e_pan < 0.5 * e_shuf
    assert e_pan < 0.5 * e_ind
    assert warp_error(np.repeat(pan[:1], 5, axis=0)) == pytest.approx(0.0, abs=1e-6)  # frozen: the blind spot
    assert len(warp_errors(torch.from_numpy(pan))) == len(pan) - 1


def test_warp_error_rejects_bad_input():
    with pytest.raises(EvalInputError):
        warp_error(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(EvalInputError):
        warp_error(np.zeros((4, 8, 8), np.float32))


def test_frechet_distance_identical_zero_shifted_larger():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 8, generator=g)
    b = torch.randn(200, 8, generator=g)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    same, near, far = frechet_distance(a, b), frechet_distance(a, b + 0.5), frechet_distance(a, b + 2.0)
    assert same < near < far
    assert frechet_distance(a, b * 3) > same  # a wider spread, same mean


def test_colour_distance_finds_drift_at_the_end():
    real = _pan(frames=20)
    drifting = real.copy()
    drifting[10:] = np.clip(drifting[10:] + np.linspace(0, 0.4, 10)[:, None, None, None], 0, 1)
    starts = window_starts(20, 5, 2)
    start, end = (colour_distance(drifting[s:s + 5], real[s:s + 5]) for s in starts)
    assert start == pytest.approx(0.0, abs=1e-6)
    assert end > 0.1
    assert colour_distance(real[:5], real[10:]) < colour_distance(drifting[15:], real[10:])  # lengths may differ
    assert colour_stats(real).shape == (20, 6)
    assert window_starts(20, 5, 3) == [0, 8, 15]
    with pytest.raises(EvalInputError):
        window_starts(20, 25, 2)


def test_frechet_distance_pca_ranks_a_collapsed_set_below_a_fresh_sample():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(64, 64, generator=g) * torch.logspace(0, -1, 64)[:, None]

    def draw(n):
        return torch.randn(n, 64, generator=g) @ mix

    ref = draw(400)
    basis = pca_basis(draw(400), 8)
    fresh = draw(40)
    collapsed = fresh[:1].expand(40, -1)  # one sample repeated: no spread at all
    assert frechet_distance_pca(ref, ref, basis) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance_pca(fresh, ref, basis) < frechet_distance_pca(collapsed, ref, basis)
    top = basis[1][:, 0].float()  # a shift along the reference's main direction
    assert frechet_distance_pca(fresh, ref, basis) < frechet_distance_pca(fresh + 3 * top, ref, basis)
    with pytest.raises(EvalInputError):
        pca_basis(ref, 0)
    with pytest.raises(EvalInputError):
        pca_basis(ref[:4], 8)
