"""Hand-computed tiny cases for the continuation scores (region_scores.py) and the controls (controls.py)."""
from __future__ import annotations

import math

import pytest
import torch
from _eval_data import one_thread  # noqa: F401 (fixture)

from nuwa_core.evaluation import controls as C, metrics as E, region_scores as R
from nuwa_core.infinity.vqgan import VQModel, get_config

pytestmark = pytest.mark.usefixtures("one_thread")


def gray(values: torch.Tensor) -> torch.Tensor:
    """[H, W] -> IMAGE [1, H, W, 3] with the same value in every channel."""
    return values.float()[None, :, :, None].expand(1, *values.shape, 3).contiguous()


def coords(h: int, w: int) -> torch.Tensor:
    """IMAGE [1, h, w, 3] whose pixels say where they are: (y / h, x / w, 0)."""
    yy, xx = torch.meshgrid(torch.arange(h) / h, torch.arange(w) / w, indexing="ij")
    return torch.stack([yy, xx, torch.zeros_like(xx)], -1)[None].float()


def where(pixel: torch.Tensor, h: int, w: int) -> tuple[int, int]:
    """(y, x) encoded by coords()."""
    return round(pixel[0].item() * h), round(pixel[1].item() * w)


# ------------------------------------------------------------------------------------ geometry

def test_canonical_frames_and_boxes():
    img = coords(6, 10)
    box = (3, 1, 4, 2)
    for d in R.DIRECTIONS:
        c = R.canonical(img, d)
        assert torch.equal(R.from_canonical(c, d), img)
        cb = R.canonical_box(box, 6, 10, d)
        assert torch.equal(R.canonical(R.crop(img, box), d), R.crop(c, cb))
    # in the canonical frame the continuation runs to the right: the pixel after the given part is
    # the one to the right (right), to the left (left), below (down), above (up)
    assert R.canonical(img, "left")[0, 0, 0, 1].item() == pytest.approx(0.9)  # column 9 first
    assert R.canonical(img, "down").shape == (1, 10, 6, 3)
    up = R.canonical(img, "up")
    assert where(up[0, 0, 0], 6, 10) == (5, 0) and where(up[0, 0, 1], 6, 10) == (4, 0)
    with pytest.raises(ValueError, match="direction must be one of"):
        R.canonical(img, "sideways")
    with pytest.raises(ValueError, match="lie inside the 10x6 px image"):
        R.check_box((8, 0, 4, 2), 6, 10)


def test_valid_positions_and_allowed_rect():
    ok = R.valid_positions(4, 6, 2, 2, (2, 1, 2, 2))  # a 2x2 crop must not touch columns 2-3 of rows 1-2
    expected = torch.tensor([[1, 0, 0, 0, 1],
                             [1, 0, 0, 0, 1],
                             [1, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(ok, expected)
    assert R.valid_positions(4, 6, 2, 2, None).all()
    assert R.allowed_rect(128, 1024, (768, 0, 256, 128)) == (0, 0, 768, 128)
    assert R.allowed_rect(100, 100, (10, 0, 90, 100)) == (0, 0, 10, 100)
    assert R.allowed_rect(100, 100, (0, 0, 100, 30)) == (0, 30, 100, 70)
    with pytest.raises(ValueError, match="covers the whole"):
        R.allowed_rect(10, 10, (0, 0, 10, 10))
    with pytest.raises(ValueError, match="does not fit"):
        R.valid_positions(4, 6, 5, 2, None)


# ----------------------------------------------------------------------------- token resolution

def test_block_means_and_lowres_psnr():
    checker = gray((torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2)  # 0/1 checkerboard
    assert torch.allclose(R.block_means(checker, 2), torch.full((1, 3, 4, 4), 0.5, dtype=torch.float64))
    half = torch.full_like(checker, 0.5)
    assert R.lowres_psnr(half, checker, block=2) == 100.0  # identical at token resolution (capped)
    assert E.psnr(half, checker) == pytest.approx(10 * math.log10(4))  # 6.02 dB at full resolution
    assert R.lowres_psnr(torch.full_like(checker, 0.4), checker, block=2) == pytest.approx(20.0)
    # 3 x 3 blocks (the partial third dropped) hold 4 or 5 ones of 9: every block mean is 1/18 off 0.5
    assert R.lowres_psnr(half, checker, block=3) == pytest.approx(10 * math.log10(18 ** 2))
    with pytest.raises(ValueError, match="same size"):
        R.lowres_psnr(half[:, :4], checker)
    with pytest.raises(ValueError, match="block must be"):
        R.block_means(checker, 9)


def test_energy_score_hand_computed():
    truth = torch.full((1, 16, 16, 3), 0.5)  # 2 x 2 blocks of 8 px, 12 values
    point = [torch.full_like(truth, 0.4)] * 3
    assert R.energy_score_db(point, truth) == pytest.approx(R.lowres_psnr(point[0], truth)) == pytest.approx(20.0)
    # draws 0.2 and 0.3: mean distance (0.3 + 0.2) / 2 = 0.25, half the mean distance between them 0.05
    two = [torch.full_like(truth, 0.2), torch.full_like(truth, 0.3)]
    assert R.energy_score_db(two, truth) == pytest.approx(-20 * math.log10(0.2))
    # draws on both sides of the truth: ES = 0.1 - 0.1 = 0, capped
    assert R.energy_score_db([torch.full_like(truth, 0.4), torch.full_like(truth, 0.6)], truth) == 100.0
    with pytest.raises(ValueError, match="at least 2 draws"):
        R.energy_score_db(point[:1], truth)
    with pytest.raises(ValueError, match="same size"):
        R.energy_score_db([truth[:, :8], truth[:, :8]], truth)


def test_energy_score_prefers_the_truths_own_distribution_where_lowres_psnr_prefers_blur():
    """Truths and draws from one distribution (a ramp plus an independent +-0.2 on every 8 px block):
    their mean (a blur) has the better low-res PSNR (MSE a^2 against 2 a^2: +3 dB), draws from the
    truth's distribution the better energy score (about a against sqrt(2) a / 2: +3 dB)."""
    ramp = torch.linspace(0.3, 0.7, 16).repeat_interleave(8)[None, :, None].expand(128, 128, 3)[None]

    def draw(gen):
        signs = torch.randint(0, 2, (1, 16, 16, 3), generator=gen).float() * 0.4 - 0.2
        return ramp + signs.repeat_interleave(8, 1).repeat_interleave(8, 2)
    gen = torch.Generator().manual_seed(0)
    psnr_gap, energy_gap = [], []
    for _ in range(8):
        truth, draws = draw(gen), [draw(gen) for _ in range(4)]
        psnr_gap.append(R.lowres_psnr(ramp, truth) - sum(R.lowres_psnr(d, truth) for d in draws) / len(draws))
        energy_gap.append(R.energy_score_db(draws, truth) - R.energy_score_db([ramp, ramp], truth))
    assert min(psnr_gap) > 2.0 and min(energy_gap) > 1.5, (psnr_gap, energy_gap)


def test_layout_correlation():
    rows = lambda v: gray(torch.tensor(v, dtype=torch.float32)[:, None].expand(len(v), 5))  # noqa: E731
    a = rows([0, 1, 0, 1])
    assert R.layout_correlation(a, rows([0, 1, 0, 1])) == pytest.approx(1.0)
    assert R.layout_correlation(rows([0.2, 0.4, 0.2, 0.4]), a) == pytest.approx(1.0)  # scale and offset free
    assert R.layout_correlation(rows([1, 0, 1, 0]), a) == pytest.approx(-1.0)
    assert R.layout_correlation(rows([0, 1, 1, 0]), a) == pytest.approx(0.0)
    # centred a = (-.5, .5, -.5, .5), b = (0, 1, 1, 1) - .75: dot .5, |a| 1, |b| sqrt(.75)
    assert R.layout_correlation(rows([0, 1, 1, 1]), a) == pytest.approx(0.5 / math.sqrt(0.75))
    assert R.layout_correlation(torch.full_like(a, 0.3), a) == 0.0  # a flat fill has no layout
    assert R.line_profile(a, "cols").shape == (1, 5, 3)
    assert R.layout_correlation(a.transpose(1, 2), rows([0, 1, 1, 0]).transpose(1, 2), "cols") == pytest.approx(0.0)


# --------------------------------------------------------------------------------- boundary

def test_boundary_seam_stats_hand_computed():
    # gray rows: given 0, .1, .2, .3 | generated .9, 1.0, 1.1 -> jump .6 at the boundary, .1 elsewhere
    row = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.9, 0.95, 1.0])
    win = gray(row[None].expand(3, 7))
    st = R.boundary_seam_stats(win, split=4, band=2)
    s3 = math.sqrt(3)  # a gray step d is an RGB jump of d * sqrt(3)
    assert st["boundary"] == pytest.approx(0.6 * s3)
    assert st["band_given"] == pytest.approx(0.1 * s3) and st["band_generated"] == pytest.approx(0.05 * s3)
    assert st["band"] == pytest.approx(0.075 * s3) and st["band_pairs"] == 4
    assert st["ratio"] == pytest.approx(8.0)
    assert R.boundary_seam_ratio(win, 4, band=2, stat="median") == pytest.approx(0.6 / 0.075)
    # the same window mirrored is a continuation to the left, transposed one downwards
    assert R.boundary_seam_ratio(win.flip(2), 4, "left", band=2) == pytest.approx(8.0)
    assert R.boundary_seam_ratio(win.transpose(1, 2), 4, "down", band=2) == pytest.approx(8.0)
    assert R.boundary_seam_ratio(win.transpose(1, 2).flip(1), 4, "up", band=2) == pytest.approx(8.0)
    smooth = gray(torch.linspace(0, 1, 9)[None].expand(3, 9))
    assert R.boundary_seam_ratio(smooth, 4) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least one given and one generated"):
        R.boundary_seam_ratio(win, 7)


def test_texture_ratio_is_the_swd_ratio():
    g = torch.Generator().manual_seed(0)
    region, allowed = torch.rand(1, 24, 24, 3, generator=g), torch.rand(1, 32, 64, 3, generator=g) ** 2
    kw = dict(n_descriptors=128, n_directions=16)
    h1, h2 = E.split_halves(allowed)
    levels = E.swd_levels_for(region, h1, h2)
    expect = E.swd(region, allowed, 3, levels=levels, **kw) / E.swd(h1, h2, 3, levels=levels, **kw)
    det = R.texture_ratio(region, allowed, 3, details=True, **kw)
    assert det["ratio"] == pytest.approx(expect, rel=1e-9)
    other = torch.rand(1, 24, 24, 3, generator=g)
    reused = R.texture_ratio(other, allowed, 3, halves=det, **kw)
    assert reused == pytest.approx(R.texture_ratio(other, allowed, 3, **kw))


# ---------------------------------------------------------------------------------- hard cuts

def test_gap_seam_stats_hand_computed_and_gap_zero_is_seam_stats():
    # 1 x 8 gray, patches of 4: 0 .1 .2 .3 | .8 .9 1.0 1.1 -> gap 1: boundary pair (2, 5) = .7,
    # interior pairs 3 apart inside a patch: (0, 3), (4, 7) = .3 each
    row = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.8, 0.9, 1.0, 1.1]) / 1.1
    img = gray(row[None])
    st = R.gap_seam_stats(img, 4, gap=1)
    assert st["ratio_x"] == pytest.approx(7 / 3) and st["boundary_pairs"] == 1 and st["interior_pairs"] == 2
    assert st["ratio_y"] is None  # one pixel row
    x = torch.rand(1, 37, 50, 3, generator=torch.Generator().manual_seed(0))
    for patch in (8, (6, 10)):
        a, b = R.gap_seam_stats(x, patch, 0), E.seam_stats(x, patch)
        assert a["ratio"] == pytest.approx(b["ratio"]) and a["ratio_x"] == pytest.approx(b["ratio_x"])
        assert a["boundary_pairs"] == b["boundary_pairs"] and a["interior_pairs"] == b["interior_pairs"]
    with pytest.raises(ValueError, match="largest gap: 2"):
        R.gap_seam_stats(x, 6, gap=3)


@pytest.fixture(scope="module")
def tiny_vq():
    torch.manual_seed(0)
    return VQModel(get_config("tiny")).eval()  # f4, 64 codes


def test_decode_hard_cut_is_patch_by_patch(tiny_vq):
    tokens = torch.randint(0, 64, (1, 4, 6), generator=torch.Generator().manual_seed(0))
    img = R.decode_hard_cut(tiny_vq, tokens, (1, 2, 3), chunk=5)
    assert img.shape == (1, 16, 24, 3)
    for i in range(2):
        for j in range(2):
            one = tiny_vq.decode_tokens(tokens[:, 2 * i:2 * i + 2, 3 * j:3 * j + 3])
            one = ((one.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)
            assert torch.allclose(img[:, 8 * i:8 * i + 8, 12 * j:12 * j + 12], one, atol=1e-5)
    assert R.hard_cut_seam_ratio(img, (8, 12)) == pytest.approx(E.seam_ratio(img, (8, 12)))
    with pytest.raises(ValueError, match="whole 2x4-token patches"):
        R.decode_hard_cut(tiny_vq, tokens, (2, 4))
    with pytest.raises(ValueError, match="must be whole 16x16 px patches"):
        R.hard_cut_seam_ratio(img, 16)
    ctl = C.hard_cut_seam_controls(tiny_vq, tokens, (2, 3), seed=0, gap=1)
    assert set(ctl) == {"real_tokens", "patchwork_tokens"} and all(v is not None for v in ctl.values())


# ----------------------------------------------------------------------------------- controls

def test_random_real_and_patchwork_stay_outside_the_box():
    ref = coords(20, 40)
    box = (10, 0, 20, 20)  # columns 10..29 held out
    fills = [C.random_real_fill(ref, box, (8, 6), s) for s in range(5)]
    for f in fills:
        y, x = where(f[0, 0, 0], 20, 40)
        assert f.shape == (1, 8, 6, 3) and (x + 6 <= 10 or x >= 30)
        assert torch.equal(f, ref[:, y:y + 8, x:x + 6])  # one real crop
    assert torch.equal(fills[0], C.random_real_fill(ref, box, (8, 6), 0))  # seeded
    assert len({where(f[0, 0, 0], 20, 40) for f in fills}) > 1
    pw = C.patchwork_fill(ref, box, (12, 10), (4, 4), seed=1)
    starts = []
    for i in range(0, 12, 4):
        for j in range(0, 10, 4):
            y, x = where(pw[0, i, j], 20, 40)
            h, w = min(4, 12 - i), min(4, 10 - j)  # the last column of tiles is cut to 2 px
            assert torch.equal(pw[:, i:i + h, j:j + w], ref[:, y:y + h, x:x + w])
            assert x + 4 <= 10 or x >= 30
            starts.append(y)
    assert len(set(starts)) > 3  # rows mixed
    with pytest.raises(ValueError, match="no place in the reference"):
        C.random_real_fill(ref, (5, 0, 30, 20), (8, 6), 0)


def test_flat_fill_and_random_tokens():
    given = gray(torch.tensor([[0.0, 1.0], [0.5, 0.5]]))
    assert torch.allclose(C.flat_fill(given, (3, 4)), torch.full((1, 3, 4, 3), 0.5))
    t = C.random_tokens(7, (2, 3, 4), seed=3)
    assert t.shape == (2, 3, 4) and t.dtype == torch.long and 0 <= t.min() and t.max() < 7
    assert torch.equal(t, C.random_tokens(7, (2, 3, 4), seed=3))


def test_line_mean_fill_carries_each_rows_mean_on():
    given = gray(torch.tensor([[0.0, 1.0], [0.2, 0.4]]))
    fill = C.line_mean_fill(given, 3)
    assert fill.shape == (1, 2, 3, 3)
    assert torch.allclose(fill[0, :, :, 0], torch.tensor([[0.5] * 3, [0.3] * 3]))
    with pytest.raises(ValueError, match="length must be"):
        C.line_mean_fill(given, 0)


def test_iid_token_fill_and_token_patchwork(tiny_vq):
    f = C.iid_token_fill(tiny_vq, (8, 12), seed=0)
    assert f.shape == (1, 8, 12, 3) and torch.equal(f, C.iid_token_fill(tiny_vq, (8, 12), seed=0))
    with pytest.raises(ValueError, match="whole 4 px tokens"):
        C.iid_token_fill(tiny_vq, (8, 10))
    grid = torch.arange(6 * 8).view(1, 6, 8)
    mixed = C.token_patchwork(grid, (2, 2), seed=0, out_hw=(4, 6))
    assert mixed.shape == (1, 4, 6)
    for i in (0, 2):
        for j in (0, 2, 4):
            block = mixed[0, i:i + 2, j:j + 2]
            y, x = divmod(block[0, 0].item(), 8)
            assert torch.equal(block, grid[0, y:y + 2, x:x + 2])


def test_patch_nn_continues_a_periodic_pattern_exactly():
    # columns repeat every 8 px; the box hides columns 16..31; given: columns 16..19 (phase 0..3).
    # The first match is at x = 0 (x = 8 matches as well; ties go to the first), it lends columns
    # 4..7; the query is then phase 4..7, first matched at x = 4, which lends columns 8..11.
    ref = gray(((torch.arange(32) % 8) / 8)[None].expand(4, 32))
    box = (16, 0, 16, 4)
    given = ref[:, :, 16:20]
    out = C.patch_nn_fill(ref, box, given, 8, band=4, block=2, details=True)
    assert out["sources"] == [(4, 0), (8, 0)] and out["distances"] == [0.0, 0.0]
    assert torch.equal(out["fill"], ref[:, :, 20:28])  # the held-out truth
    # a shorter step continues from what was copied in more, smaller pieces
    again = C.patch_nn_fill(ref, box, given, 8, band=4, block=2, step=2)
    assert torch.equal(again, ref[:, :, 20:28])
    # drawn among the 2 best matches (x = 0 and x = 8, both exact): each seed copies from one of them
    sources = {C.patch_nn_fill(ref, box, given, 4, band=4, block=2, choices=2, seed=s, details=True)["sources"][0]
               for s in range(8)}
    assert sources == {(4, 0), (12, 0)}
    drawn = C.patch_nn_fill(ref, box, given, 8, band=4, block=2, choices=2, seed=3)
    assert torch.equal(drawn, ref[:, :, 20:28])
    assert torch.equal(drawn, C.patch_nn_fill(ref, box, given, 8, band=4, block=2, choices=2, seed=3))
    with pytest.raises(ValueError, match="choices must be >= 1"):
        C.patch_nn_fill(ref, box, given, 8, band=4, block=2, choices=0)
    with pytest.raises(ValueError, match="no place in the reference fits"):
        C.patch_nn_fill(ref, (4, 0, 28, 4), given, 8, band=4, block=2)
    with pytest.raises(ValueError, match="at least one 8 px block"):
        C.patch_nn_fill(ref, box, given, 8, band=4, block=8)
