"""Tests of nuwa_core.eval: seams, Laplacian SWD, FD-EffLite0, drift, PSNR/SSIM and the CLI."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nuwa_core.evaluation import metrics as E
from nuwa_core.images import load_image, save_image

from _eval_data import DATA, REPO

LANDSCAPE = DATA / "landscapes" / "picosdeeuropa_by_Aitzol_Berasategi_CC-BY-4.0.jpg"
OCEAN = DATA / "panoramas" / "ocean.png"

needs_data = pytest.mark.skipif(not (LANDSCAPE.is_file() and OCEAN.is_file()), reason="shared real data absent")


def _downscale(img: torch.Tensor, factor: float) -> torch.Tensor:
    x = img.permute(0, 3, 1, 2)
    x = F.interpolate(x, scale_factor=factor, mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0, 1).permute(0, 2, 3, 1).contiguous()


@pytest.fixture(scope="module")
def natural():
    """A 256x384 crop of a real photo, downscaled by a non-integer factor (which also blurs
    away the JPEG 8x8 block grid that would otherwise line up with 64-px patch boundaries)."""
    img = _downscale(load_image(LANDSCAPE), 1 / 2.7)
    h, w = img.shape[1:3]
    y0, x0 = (h - 256) // 2, (w - 384) // 2
    return img[:, y0: y0 + 256, x0: x0 + 384].contiguous()


@pytest.fixture(scope="module")
def ocean_small():
    return _downscale(load_image(OCEAN), 0.5)  # [1, 128, 1024, 3]


# ------------------------------------------------------------------------------------- seams

def test_seam_ratio_hand_computed():
    # 4x6 gray image, two patches of 3 columns: a jump of 0.6 between columns 2 and 3, ramps of 0.1 inside
    row = torch.tensor([0.0, 0.1, 0.2, 0.8, 0.9, 1.0])
    img = row.view(1, 1, 6, 1).expand(1, 4, 6, 3).contiguous()
    st = E.seam_stats(img, 3)
    assert st["ratio_x"] == pytest.approx(6.0)
    assert st["ratio_y"] == pytest.approx(1.0)  # flat vertically: both means 0
    # boundary pairs: 4 (x, 0.6) + 6 (y, 0); interior: 16 (x, 0.1) + 12 (y, 0)
    assert st["boundary_pairs"] == 10 and st["interior_pairs"] == 28
    assert st["ratio"] == pytest.approx((4 * 0.6 / 10) / (16 * 0.1 / 28))
    # shifting the grid by one column misses the jump
    assert E.seam_stats(img, (3, 2))["ratio_x"] < 1.0


@needs_data
def test_seam_ratio_near_one_on_natural_image(natural):
    r = E.seam_ratio(natural, 64)
    assert 0.8 < r < 1.25, r
    assert 0.8 < E.seam_ratio(natural[0], 32) < 1.25  # [H, W, C] input too


@needs_data
def test_seam_ratio_detects_pasted_patches(natural):
    g = torch.Generator().manual_seed(0)
    p = 64
    h, w = natural.shape[1:3]
    pasted = torch.empty_like(natural)
    for i in range(0, h, p):
        for j in range(0, w, p):
            y = int(torch.randint(0, h - p + 1, (1,), generator=g))
            x = int(torch.randint(0, w - p + 1, (1,), generator=g))
            pasted[:, i: i + p, j: j + p] = natural[:, y: y + p, x: x + p]
    assert E.seam_ratio(pasted, p) > 1.5
    # per-patch brightness offsets: each patch shifted by +-0.08
    offsets = (torch.rand(h // p, w // p, generator=g) - 0.5) * 0.16
    shifted = (natural + offsets.repeat_interleave(p, 0).repeat_interleave(p, 1)[None, :, :, None]).clamp(0, 1)
    assert E.seam_ratio(shifted, p) > 1.5
    # measured on the wrong grid the seams are not found
    assert E.seam_ratio(shifted, p) > 1.5 * E.seam_ratio(shifted, 48)


@needs_data
def test_seam_ratio_odd_sizes_and_single_row_strip(natural):
    odd = natural[:, :250, :371]
    r = E.seam_ratio(odd, 64)
    assert r is not None and 0.7 < r < 1.4
    strip = natural[:, :64, :]  # one patch row: no horizontal boundary
    st = E.seam_stats(strip, 64)
    assert st["ratio_y"] is None and st["ratio_x"] is not None and math.isfinite(st["ratio"])
    assert E.seam_ratio(natural[:, :1, :], 64) is not None  # a single pixel row
    assert E.seam_ratio(natural[:, :40, :40], 64) is None  # smaller than one patch: nothing to measure


def test_wrap_seam_ratio():
    ramp = torch.linspace(0, 1, 64).view(1, 1, 64, 1).expand(1, 8, 64, 3)
    assert E.wrap_seam_ratio(ramp) > 30  # the ramp jumps from 1 back to 0
    tri = 1 - (torch.arange(64.0) - 32).abs() / 32  # a triangle wave that closes with its usual step
    loop = tri.view(1, 1, 64, 1).expand(1, 8, 64, 3)
    assert E.wrap_seam_ratio(loop) == pytest.approx(1.0, rel=1e-5)


# --------------------------------------------------------------------------------------- SWD

def test_laplacian_pyramid_reconstructs_exactly():
    x = torch.rand(1, 3, 45, 70, generator=torch.Generator().manual_seed(0))
    pyr = E.laplacian_pyramid(x, 3)
    assert [tuple(p.shape[-2:]) for p in pyr] == [(45, 70), (23, 35), (12, 18)]
    g = pyr[-1]
    for lvl in reversed(pyr[:-1]):
        g = lvl + E._pyr_up(g, lvl.shape[-2:])
    assert torch.allclose(g, x, atol=1e-5)
    # a band-pass level of a smooth image is small, the residual is not
    smooth = torch.linspace(0, 1, 64).view(1, 1, 1, 64).expand(1, 3, 64, 64)
    assert E.laplacian_pyramid(smooth, 3)[0][..., 4:-4, 4:-4].abs().max() < 1e-4


def test_swd_levels_for():
    assert E.swd_levels_for(torch.zeros(1, 256, 2048, 3)) == 5  # 256..16
    assert E.swd_levels_for(torch.zeros(1, 512, 4096, 3), torch.zeros(64, 64, 3)) == 3
    assert E.swd_levels_for(torch.zeros(1, 10, 100, 3)) == 1
    with pytest.raises(ValueError, match="at least 7"):
        E.swd_levels_for(torch.zeros(1, 5, 100, 3))


@needs_data
def test_swd_self_zero_symmetric_noise_large(ocean_small):
    kw = dict(n_descriptors=2048, n_directions=128)
    h1, h2 = E.split_halves(ocean_small)
    assert E.swd(ocean_small, ocean_small, **kw) < 1e-9
    d12 = E.swd(h1, h2, **kw)
    assert d12 == pytest.approx(E.swd(h2, h1, **kw), rel=1e-9)
    assert d12 == E.swd(h1, h2, **kw)  # seeded: deterministic
    noise = torch.rand(h2.shape, generator=torch.Generator().manual_seed(1))
    assert E.swd(h1, noise, **kw) > 3 * d12
    per = E.swd_per_level(h1, noise, **kw)
    assert len(per) == 4 and all(v > 0 for v in per)  # 128 px tall: 128, 64, 32, 16


@needs_data
def test_swd_ratio_real_halves_near_one(ocean_small):
    kw = dict(n_descriptors=2048, n_directions=128)
    h1, h2 = E.split_halves(ocean_small)
    assert h1.shape == h2.shape == (1, 128, 512, 3)
    r = E.swd_ratio(h2, h1, **kw)  # one real half judged against the other
    assert 0.5 < r < 1.5, r
    noise = torch.rand(h2.shape, generator=torch.Generator().manual_seed(1))
    assert E.swd_ratio(noise, h1, **kw) > 2.5
    det = E.swd_ratio(h2, h1, details=True, **kw)
    assert det["swd_ratio"] == pytest.approx(r)
    assert len(det["swd_levels"]) == len(det["swd_ref_halves_levels"]) == det["swd_pyramid_levels"]


def test_split_halves_long_axis():
    wide, tall = torch.zeros(1, 10, 31, 3), torch.zeros(20, 7, 3)
    assert [tuple(t.shape) for t in E.split_halves(wide)] == [(1, 10, 15, 3)] * 2
    assert [tuple(t.shape) for t in E.split_halves(tall)] == [(1, 10, 7, 3)] * 2


# --------------------------------------------------------------------------------- Frechet

def test_frechet_distance_matches_closed_form():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 6, generator=g, dtype=torch.float64)
    b = torch.randn(300, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64) + 0.7
    scipy_linalg = pytest.importorskip("scipy.linalg")
    import numpy as np
    sa, sb = np.cov(a.numpy().T), np.cov(b.numpy().T)
    covmean = scipy_linalg.sqrtm(sa @ sb).real
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum().item() + np.trace(sa + sb - 2 * covmean)
    assert E.frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)
    assert E.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert E.frechet_distance(a, b) == pytest.approx(E.frechet_distance(b, a), rel=1e-6)


def test_fd_efflite0_absent_package_says_so(monkeypatch, capsys):
    monkeypatch.setattr(E, "efflite0_available", lambda: False)
    x = torch.rand(1, 64, 64, 3)
    assert E.fd_efflite0(x, x) is None
    assert "efficientnet-lite-pytorch" in capsys.readouterr().err


@needs_data
def test_fd_efflite0_orders_real_before_noise(natural):
    if not E.efflite0_available():
        pytest.skip("efficientnet-lite packages not installed")
    a, b = natural[:, :, :192], natural[:, :, 192:]
    noise = torch.rand(b.shape, generator=torch.Generator().manual_seed(0))
    kw = dict(block=64, stride=64, input_px=128)
    feats = E.efflite0_block_features(a, **kw)
    assert feats.shape == (12, 1280)
    assert E.fd_efflite0(a, a, **kw) == pytest.approx(0.0, abs=1e-3)
    # with 12 blocks of 1280-d features the covariance terms dominate: only the order is asserted
    assert E.fd_efflite0(a, noise, **kw) > E.fd_efflite0(a, b, **kw) > 1.0


# ------------------------------------------------------------------------------------ drift

def test_drift_curve():
    flat = torch.full((1, 32, 320, 3), 0.4)
    d = E.drift_curve(flat)
    assert d["window"] == 32 and len(d["curve"]) == 9 and d["final"] == pytest.approx(0.0, abs=1e-6)
    ramp = torch.linspace(0, 1, 320).view(1, 1, 320, 1).expand(1, 32, 320, 3)
    c = E.drift_curve(ramp)["curve"]
    assert all(b > a for a, b in zip(c, c[1:]))  # drifts monotonically away from the start
    tall = ramp.transpose(1, 2)  # long axis vertical
    assert E.drift_curve(tall)["curve"] == pytest.approx(c, rel=1e-5)
    assert E.drift_curve(flat, window=64, stride=32)["window"] == 64


# ------------------------------------------------------------------------------- PSNR / SSIM

def test_psnr():
    x = torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(0)) * 0.8
    assert E.psnr(x, x) == math.inf
    assert E.psnr(x, x, cap=100.0) == 100.0
    assert E.psnr(x, x + 0.1) == pytest.approx(20.0, abs=1e-6)
    with pytest.raises(ValueError, match="same size"):
        E.psnr(x, x[:, :16])


def test_ssim_identity_noise_and_reference_implementation():
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 80), indexing="ij")
    img = torch.stack([0.5 + 0.4 * torch.sin(6 * xx), yy, 0.5 + 0.3 * torch.cos(5 * xx * yy)], -1)[None]
    assert E.ssim(img, img) == pytest.approx(1.0, abs=1e-9)
    vals = [E.ssim(img, (img + s * torch.randn(img.shape, generator=g)).clamp(0, 1)) for s in (0.02, 0.1, 0.3)]
    assert 1.0 > vals[0] > vals[1] > vals[2]
    assert vals[2] < 0.5
    metrics = pytest.importorskip("skimage.metrics")
    noisy = (img + 0.1 * torch.randn(img.shape, generator=g)).clamp(0, 1)
    ref = metrics.structural_similarity(img[0].double().numpy(), noisy[0].double().numpy(), data_range=1.0,
                                        channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                        use_sample_covariance=False)
    assert E.ssim(img, noisy) == pytest.approx(ref, abs=2e-3)


# --------------------------------------------------------------------------------------- CLI

def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "nuwa_core.eval", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@needs_data
def test_cli_prints_json_last_line(tmp_path, ocean_small):
    gen, ref = tmp_path / "gen.png", tmp_path / "real.png"
    save_image(ocean_small[:, :64, :256], gen)
    save_image(ocean_small[:, :64, 256:768], ref)
    out = tmp_path / "m" / "metrics.json"
    p = _run_cli(gen, "--reference", ref, "--patch", "32", "--json-out", out, "--no-fd", "--swd-descriptors", "1024")
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout.strip().splitlines()[-1])
    for key in ("seam_ratio", "swd_ratio", "swd", "swd_levels", "swd_ref_halves", "drift_final", "fd_efflite0"):
        assert key in result
    assert result["size"] == [64, 256] and 0.5 < result["seam_ratio"] < 1.6 and result["swd_ratio"] > 0
    assert result["psnr"] is None  # sizes differ and no --crop
    assert json.loads(out.read_text()) == result
    # no reference, no patch: the metrics that need them are null
    p = _run_cli(gen)
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["swd_ratio"] is None and result["seam_ratio"] is None and "drift_curve" in result
    # same image as reference, crop compared: PSNR capped, SSIM 1
    p = _run_cli(gen, "--reference", gen, "--patch", "32", "--no-fd", "--crop", "0", "0", "64", "32",
                 "--swd-descriptors", "512")
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["psnr"] == 100.0 and result["ssim"] == pytest.approx(1.0) and result["crop"] == [0, 0, 64, 32]


def test_cli_unreadable_file_is_named(tmp_path):
    bad = tmp_path / "broken_image.png"
    bad.write_bytes(b"not an image")
    p = _run_cli(bad, "--patch", "16")
    assert p.returncode != 0
    assert "broken_image.png" in p.stderr
    p = _run_cli(tmp_path / "missing.png")
    assert p.returncode != 0 and "missing.png" in p.stderr
