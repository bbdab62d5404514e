"""Scores of a *filled region* against held-out truth: does a continuation use its context?

The scores of metrics.py (seam ratio on a cross-faded decode, Laplacian SWD, drift) barely move
between a real image, a random patchwork of it and i.i.d. tokens. These do, because they compare
layout at token resolution with the truth, or look at the one line where given and generated pixels
meet. All take ComfyUI IMAGE tensors ``[B, H, W, C]`` (or ``[H, W, C]``) 0..1 and return floats or
dicts; they are deterministic (the SWD-based one given its seed).

Continuation geometry
---------------------
A *window* image is the given part followed by the filled (generated) part along a *direction*:
``right`` = given on the left, generated to its right; ``left``, ``up``, ``down`` likewise (``up``:
given at the bottom, generated above it). :func:`canonical` turns any direction into ``right``
(flips and a transpose), so every score here is written once, for ``right``; ``split`` is the
given part's thickness in pixels along the direction. Boxes are ``(x, y, w, h)`` in pixels.

Scores (what a good value is)
-----------------------------
- :func:`lowres_psnr`: PSNR in dB between the ``block`` x ``block`` px block means (token
  resolution, ``block`` = 8 by default) of the region and of the truth. Texture detail does not
  count, layout does. Higher is better; the truth itself scores ``inf`` (capped at 100 dB).
- :func:`energy_score_db`: the energy score of several draws (one per seed) against the truth
  at the same token resolution, ``mean ||x_i - y|| - mean_{i != j} ||x_i - x_j|| / 2`` over the
  block means (norms as RMS), in dB as PSNR is. A strictly proper scoring rule: in expectation the
  truth's own distribution scores best. One sample's low-res PSNR is not proper: it is maximised
  by the conditional mean, so a blur (controls.line_mean_fill) outscores every real continuation.
  For a point forecast (all draws equal) it equals the low-res PSNR.
- :func:`layout_correlation`: Pearson correlation (per-channel centred, pooled over R, G, B)
  between the per-row mean colour profiles of region and truth (``axis="rows"``, for left/right
  continuation: where the horizon, the sky and the field lie) or per-column profiles (``"cols"``,
  for up/down). 1 = same layout, 0 = unrelated (also returned when a profile is constant, e.g. a
  flat fill, which carries no layout), negative = inverted.
- :func:`boundary_seam_stats` / :func:`boundary_seam_ratio`: mean RGB jump across the line where
  given and generated pixels meet, divided by the mean (or median) jump between adjacent pixel
  lines within ``band`` px on both sides. About 1 = invisible boundary; a pasted unrelated crop
  scores well above (2-3 on natural images).
- :func:`texture_ratio`: ``SWD(region, allowed) / SWD(allowed half 1, allowed half 2)``, Laplacian
  SWD (metrics.swd) of the region against the reference's *allowed* region (the largest rectangle
  outside the held-out box), normalised by the distance between the two halves of that rectangle.
  It measures texture statistics only: a patchwork of real pixels scores like real pixels. Compare
  it with the truth's own ratio (same size, same reference), never with a fixed number.
- :func:`decode_hard_cut` + :func:`hard_cut_seam_ratio`: the seam ratio of metrics.seam_ratio,
  measured on an image decoded *patch by patch without cross-fading* (each patch's tokens through
  the VQGAN on its own, as ``decode(..., blend=False)`` does). A cross-faded decode fades exactly
  over every patch border, so a random patchwork scores ~1 there; a hard cut cannot hide it. Even
  real tokens get a seam from the missing decoder context and the zero padding at each patch's
  edges: compare with the controls (real tokens, a token patchwork, controls.py), not with 1.
  ``gap`` (:func:`gap_seam_stats`) compares pixels ``gap`` px away from the border on each side
  (with interior pairs the same distance apart), stepping over those edge artefacts.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .metrics import (
    SWD_NHOOD,
    EvalInputError,
    _as_bchw,
    _descriptors,
    _jumps,
    _shape_hw,
    _sliced_wasserstein,
    laplacian_pyramid,
    seam_stats,
    split_halves,
    swd_levels_for,
)

__all__ = [
    "DIRECTIONS", "Box", "check_box", "canonical", "from_canonical", "canonical_box", "boxes_overlap",
    "valid_positions", "allowed_rect", "crop", "block_means", "lowres_psnr", "energy_score_db", "line_profile",
    "layout_correlation", "boundary_seam_stats", "boundary_seam_ratio", "texture_ratio", "decode_hard_cut",
    "gap_seam_stats", "hard_cut_seam_ratio",
]

DIRECTIONS = ("right", "left", "up", "down")
Box = tuple  # (x, y, w, h) in pixels


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------

def check_box(box: Sequence[int], height: int, width: int, what: str = "box") -> tuple[int, int, int, int]:
    """(x, y, w, h) -> ints, checked to lie inside a height x width image with w, h >= 1."""
    if len(box) != 4:
        raise EvalInputError(f"{what} must be (x, y, w, h) in pixels, got {box!r}")
    x, y, w, h = (int(v) for v in box)
    if w < 1 or h < 1 or x < 0 or y < 0 or x + w > width or y + h > height:
        raise EvalInputError(f"{what} (x={x}, y={y}, w={w}, h={h}) must have w, h >= 1 and lie inside the "
                             f"{width}x{height} px image (x + w <= {width}, y + h <= {height})")
    return x, y, w, h


def _check_direction(direction: str) -> str:
    if direction not in DIRECTIONS:
        raise EvalInputError(f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    return direction


def canonical(image: torch.Tensor, direction: str) -> torch.Tensor:
    """IMAGE [B,H,W,C] oriented so that a continuation in ``direction`` runs to the right:
    right: as is; left: mirrored; down: transposed (top -> left); up: flipped, then transposed."""
    _check_direction(direction)
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if direction == "left":
        return image.flip(2)
    if direction == "down":
        return image.transpose(1, 2)
    if direction == "up":
        return image.flip(1).transpose(1, 2)
    return image


def from_canonical(image: torch.Tensor, direction: str) -> torch.Tensor:
    """The inverse of :func:`canonical`: a canonical-frame IMAGE back in the reference's orientation."""
    _check_direction(direction)
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if direction == "left":
        return image.flip(2)
    if direction == "down":
        return image.transpose(1, 2)
    if direction == "up":
        return image.transpose(1, 2).flip(1)
    return image


def canonical_box(box: Sequence[int], height: int, width: int, direction: str) -> tuple[int, int, int, int]:
    """A box of a height x width image, in the frame :func:`canonical` makes of that image."""
    x, y, w, h = check_box(box, height, width)
    _check_direction(direction)
    if direction == "left":
        return width - x - w, y, w, h
    if direction == "down":
        return y, x, h, w
    if direction == "up":
        return height - y - h, x, h, w
    return x, y, w, h


def boxes_overlap(a: Sequence[int], b: Sequence[int]) -> bool:
    """Whether two (x, y, w, h) boxes share at least one pixel."""
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def valid_positions(height: int, width: int, crop_h: int, crop_w: int, excluded: Sequence[int] | None) -> torch.Tensor:
    """bool [height - crop_h + 1, width - crop_w + 1]: True where a crop_h x crop_w crop with its
    top-left corner there lies inside the image and shares no pixel with ``excluded`` (a box)."""
    if crop_h > height or crop_w > width or crop_h < 1 or crop_w < 1:
        raise EvalInputError(f"a {crop_w}x{crop_h} px crop does not fit the {width}x{height} px reference")
    ok = torch.ones(height - crop_h + 1, width - crop_w + 1, dtype=torch.bool)
    if excluded is not None:
        bx, by, bw, bh = excluded
        ys = torch.arange(ok.shape[0])
        xs = torch.arange(ok.shape[1])
        hit_y = (ys < by + bh) & (ys + crop_h > by)
        hit_x = (xs < bx + bw) & (xs + crop_w > bx)
        ok &= ~(hit_y[:, None] & hit_x[None, :])
    return ok


def allowed_rect(height: int, width: int, excluded: Sequence[int]) -> tuple[int, int, int, int]:
    """The largest of the four full-width / full-height rectangles beside ``excluded`` (left of it,
    right of it, above, below): the part of the reference a model trained without the box saw, as
    one rectangle. Raises when the box covers the whole image."""
    bx, by, bw, bh = check_box(excluded, height, width, "held-out box")
    cands = [(0, 0, bx, height), (bx + bw, 0, width - bx - bw, height),
             (0, 0, width, by), (0, by + bh, width, height - by - bh)]
    best = max(cands, key=lambda r: r[2] * r[3])
    if best[2] * best[3] == 0:
        raise EvalInputError(f"held-out box {tuple(excluded)} covers the whole {width}x{height} px reference: "
                             "nothing is left to draw controls from")
    return best


def crop(image: torch.Tensor, box: Sequence[int]) -> torch.Tensor:
    """IMAGE [B,H,W,C] -> the (x, y, w, h) crop [B,h,w,C]."""
    if image.ndim == 3:
        image = image.unsqueeze(0)
    x, y, w, h = check_box(box, image.shape[1], image.shape[2])
    return image[:, y:y + h, x:x + w]


# --------------------------------------------------------------------------------------------
# Agreement with the truth at token resolution
# --------------------------------------------------------------------------------------------

def block_means(image: torch.Tensor, block: int = 8) -> torch.Tensor:
    """IMAGE [B,H,W,C] -> [B,3,H//block,W//block]: mean colour of each block x block px block (a
    partial last block is dropped)."""
    x = _as_bchw(image)
    block = int(block)
    if block < 1 or x.shape[2] < block or x.shape[3] < block:
        raise EvalInputError(f"block must be >= 1 and fit the {x.shape[3]}x{x.shape[2]} px image, got {block}")
    return F.avg_pool2d(x.double(), block, block)


def _same_size(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if _shape_hw(a) != _shape_hw(b):
        raise EvalInputError(f"{what}: region and truth must have the same size, got {_shape_hw(a)} and "
                             f"{_shape_hw(b)} (H, W)")


def lowres_psnr(region: torch.Tensor, truth: torch.Tensor, block: int = 8, cap: float = 100.0) -> float:
    """PSNR in dB (data range 1) between block means (:func:`block_means`) of region and truth,
    averaged over the batch (broadcast when one of them has batch 1); ``cap`` for identical ones."""
    _same_size(region, truth, "lowres_psnr")
    a, b = torch.broadcast_tensors(block_means(region, block), block_means(truth, block))
    mse = (a - b).pow(2).mean(dim=(1, 2, 3))
    vals = torch.where(mse > 0, -10.0 * torch.log10(mse.clamp_min(1e-300)), torch.full_like(mse, math.inf))
    return vals.clamp(max=cap).mean().item()


def energy_score_db(draws: Sequence[torch.Tensor], truth: torch.Tensor, block: int = 8, cap: float = 100.0) -> float:
    """Energy score of ``draws`` (IMAGEs of the truth's size, one per seed: samples of what a
    generator makes here) against ``truth``, on ``block`` px block means, in dB (-20 log10; higher is
    better, ``cap`` when it is 0). With x_i the draws' block means and y the truth's, norms divided
    by the square root of the number of values (so one draw's ``|x - y|`` is its RMS error)::

        ES = mean_i |x_i - y| - sum_{i != j} |x_i - x_j| / (2 n (n - 1))

    Strictly proper (Gneiting & Raftery 2007): no set of draws scores better, in expectation,
    than draws from the distribution the truth comes from; spreading draws where the truth could
    be is credited, and blurring them together is not rewarded. Needs at least 2 draws. Draws that
    are all equal (a point forecast) score their low-res PSNR. ES >= 0 by the triangle inequality.
    """
    if len(draws) < 2:
        raise EvalInputError(f"the energy score needs at least 2 draws (seeds), got {len(draws)}")
    for d in draws:
        _same_size(d, truth, "energy_score_db")
    x = torch.cat([block_means(d, block)[:1] for d in draws]).flatten(1)  # [n, values]
    y = block_means(truth, block)[:1].flatten(1)                           # [1, values]
    n, scale = x.shape[0], math.sqrt(x.shape[1])
    to_truth = (x - y).norm(dim=1).mean() / scale
    spread = torch.cdist(x, x).sum() / (n * (n - 1)) / scale
    es = (to_truth - spread / 2).item()
    return cap if es <= 10 ** (-cap / 20) else min(cap, -20.0 * math.log10(es))


def line_profile(image: torch.Tensor, axis: str = "rows") -> torch.Tensor:
    """Mean colour of each pixel row (``axis="rows"``: [B, H, 3]) or column (``"cols"``: [B, W, 3])."""
    x = _as_bchw(image).double()
    if axis == "rows":
        return x.mean(dim=3).transpose(1, 2)
    if axis == "cols":
        return x.mean(dim=2).transpose(1, 2)
    raise EvalInputError(f"axis must be 'rows' or 'cols', got {axis!r}")


def layout_correlation(region: torch.Tensor, truth: torch.Tensor, axis: str = "rows") -> float:
    """Pearson correlation of the two line profiles (:func:`line_profile`): each channel centred on
    its own mean, the three channels pooled into one vector. 0 when either profile is constant (no
    layout to agree with). Mean over the batch."""
    _same_size(region, truth, "layout_correlation")
    a, b = torch.broadcast_tensors(line_profile(region, axis), line_profile(truth, axis))
    a = (a - a.mean(dim=1, keepdim=True)).flatten(1)
    b = (b - b.mean(dim=1, keepdim=True)).flatten(1)
    na, nb = a.norm(dim=1), b.norm(dim=1)
    ok = (na > 1e-9) & (nb > 1e-9)
    r = torch.where(ok, (a * b).sum(1) / (na * nb).clamp_min(1e-300), torch.zeros_like(na))
    return r.mean().item()


# --------------------------------------------------------------------------------------------
# The boundary between given and generated pixels
# --------------------------------------------------------------------------------------------

def boundary_seam_stats(window: torch.Tensor, split: int, direction: str = "right", band: int = 16,
                        stat: str = "mean") -> dict:
    """Colour jump across the given/generated boundary of a window image, against its neighbours.

    ``window``: IMAGE [B,H,W,C], the given part and the generated part side by side along
    ``direction`` (see the module docstring); ``split``: the given part's thickness in px. In the
    canonical (``right``) frame, line jump k is the mean over rows of the Euclidean RGB distance
    between pixel columns k and k + 1; the boundary is k = split - 1; the band is the ``band``
    line jumps on each side of it (fewer where the window ends). ``stat``: ``"mean"`` (default;
    the truth scores 1 on average) or ``"median"`` (robust to a real edge inside the band).

    Returns ``ratio`` (boundary / stat of the band; 1.0 when both are 0, inf when only the band is
    flat), ``boundary``, ``band`` (the stat), ``band_given`` and ``band_generated`` (each side's
    mean, to see e.g. a blurrier generated side) and ``band_pairs``.
    """
    x = _as_bchw(canonical(window, direction).contiguous())
    w = x.shape[3]
    split, band = int(split), int(band)
    if not 1 <= split <= w - 1:
        raise EvalInputError(f"split {split} px must leave at least one given and one generated pixel line "
                             f"in the window, which is {w} px long along {direction!r}")
    if band < 1:
        raise EvalInputError(f"band must be >= 1 px, got {band}")
    if stat not in ("mean", "median"):
        raise EvalInputError(f"stat must be 'mean' or 'median', got {stat!r}")
    lines = _jumps(x, 3).mean(dim=(0, 1)).double()  # [W-1]: jump k between columns k and k+1
    k = split - 1
    given = lines[max(0, k - band):k]
    gen = lines[k + 1:k + 1 + band]
    both = torch.cat([given, gen])
    if both.numel() == 0:
        raise EvalInputError(f"window {w} px along {direction!r} has no pixel lines beside the boundary")
    ref = both.mean() if stat == "mean" else both.quantile(0.5)  # the midpoint median of an even count
    b, ref = lines[k].item(), ref.item()
    ratio = (1.0 if b == 0 else math.inf) if ref == 0 else b / ref
    return {"ratio": ratio, "boundary": b, "band": ref, "band_given": given.mean().item() if given.numel() else None,
            "band_generated": gen.mean().item() if gen.numel() else None, "band_pairs": int(both.numel()), "stat": stat}


def boundary_seam_ratio(window: torch.Tensor, split: int, direction: str = "right", band: int = 16,
                        stat: str = "mean") -> float:
    """Boundary jump / band jump of :func:`boundary_seam_stats`. ~1: invisible boundary."""
    return boundary_seam_stats(window, split, direction, band, stat)["ratio"]


# --------------------------------------------------------------------------------------------
# Texture
# --------------------------------------------------------------------------------------------

def _descriptor_sets(image: torch.Tensor, levels: int, seed: int, n: int) -> list[torch.Tensor]:
    """metrics.swd_per_level's per-level descriptor sets of one image (same positions, same seeds)."""
    pyr = laplacian_pyramid(_as_bchw(image), levels)
    return [_descriptors(pyr[li], n, torch.Generator().manual_seed(seed * 1000 + li)) for li in range(levels)]


def _swd_sets(da: list, db: list, seed: int, n_directions: int) -> float:
    """Mean over levels of the sliced Wasserstein distance between two descriptor-set lists, with
    metrics.swd_per_level's directions: equals metrics.swd of the two images."""
    dim = 3 * SWD_NHOOD * SWD_NHOOD
    out = []
    for li, (a, b) in enumerate(zip(da, db)):
        g = torch.Generator().manual_seed(seed * 1000 + 500 + li)
        dirs = torch.randn(dim, n_directions, generator=g, dtype=torch.float64)
        out.append(_sliced_wasserstein(a, b, dirs / dirs.norm(dim=0, keepdim=True)))
    return sum(out) / len(out)


def texture_ratio(region: torch.Tensor, allowed: torch.Tensor, seed: int = 0, *, n_descriptors: int = 2048,
                  n_directions: int = 256, details: bool = False, halves: dict | None = None):
    """``SWD(region, allowed) / SWD(allowed half 1, allowed half 2)`` (metrics.swd, the same pyramid
    depth, descriptors, directions and seed for both). ``allowed``: IMAGE of the reference's allowed
    region (:func:`allowed_rect`). Only texture statistics: judge it against the truth's own ratio.
    ``halves``: the ``details`` dict of an earlier call with a region of the same size and the same
    ``allowed``, seed and settings; its denominator and the allowed region's descriptors are reused
    (same result, less work)."""
    h1, h2 = split_halves(allowed if allowed.ndim == 4 else allowed.unsqueeze(0))
    levels = swd_levels_for(region, h1, h2)
    key = (levels, seed, n_descriptors, n_directions, tuple(allowed.shape))
    if halves is not None and halves.get("key") == key:
        den, ref_sets = halves["swd_allowed_halves"], halves["allowed_descriptors"]
    else:
        den = _swd_sets(_descriptor_sets(h1, levels, seed, n_descriptors),
                        _descriptor_sets(h2, levels, seed, n_descriptors), seed, n_directions)
        ref_sets = _descriptor_sets(allowed, levels, seed, n_descriptors)
    num = _swd_sets(_descriptor_sets(region, levels, seed, n_descriptors), ref_sets, seed, n_directions)
    ratio = num / den if den > 0 else math.inf
    if details:
        return {"ratio": ratio, "swd": num, "swd_allowed_halves": den, "levels": levels, "key": key,
                "allowed_descriptors": ref_sets}
    return ratio


# --------------------------------------------------------------------------------------------
# Seams where the decoder cannot hide them
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def decode_hard_cut(vqgan, tokens: torch.Tensor, patch_tokens: Sequence[int], chunk: int = 32) -> torch.Tensor:
    """Token grid [B, h, w] -> IMAGE [B, h*f, w*f, 3]: every (ph, pw)-token patch decoded on its own
    by ``vqgan.decode_tokens`` and the pieces put side by side with hard cuts (no cross-fade), as
    ``NuwaInfinity.decode(..., blend=False)``. ``patch_tokens``: (ph, pw) or (pf, ph, pw); h and w
    must be whole patches. Patches go through the decoder ``chunk`` at a time as one batch (the
    decoder treats batch items independently, so this equals one call per patch)."""
    pt = tuple(int(v) for v in patch_tokens)[-2:]
    if tokens.ndim != 3:
        raise EvalInputError(f"tokens must be [B, h, w], got shape {tuple(tokens.shape)}")
    b, h, w = tokens.shape
    ph, pw = pt
    if ph < 1 or pw < 1 or h % ph or w % pw:
        raise EvalInputError(f"the token grid {h}x{w} must be whole {ph}x{pw}-token patches")
    nh, nw = h // ph, w // pw
    device = next(vqgan.parameters()).device
    patches = tokens.reshape(b, nh, ph, nw, pw).permute(0, 1, 3, 2, 4).reshape(b * nh * nw, ph, pw)
    pieces = torch.cat([vqgan.decode_tokens(patches[i:i + chunk].to(device)).float().cpu()
                        for i in range(0, len(patches), chunk)])  # [b*nh*nw, 3, ph*f, pw*f]
    c, hp, wp = pieces.shape[1:]
    x = pieces.reshape(b, nh, nw, c, hp, wp).permute(0, 3, 1, 4, 2, 5).reshape(b, c, nh * hp, nw * wp)
    return ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).contiguous()


def gap_seam_stats(image: torch.Tensor, patch_px, gap: int = 0) -> dict:
    """metrics.seam_stats generalised to pairs ``2 * gap + 1`` px apart.

    A boundary pair is pixel ``k*p - 1 - gap`` against pixel ``k*p + gap`` (the ``gap`` px on each
    side of a patch border skipped); interior pairs are all pairs the same distance apart whose two
    pixels lie in the same patch. ``gap = 0`` is exactly metrics.seam_stats (adjacent pixels). A
    gap steps over what a patch's own decoder adds at its edges (zero padding of a patch decoded
    alone), so what is left is whether the *content* continues across the border. Returns
    ``ratio`` (both axes pooled), ``ratio_x``, ``ratio_y``, pair counts and ``gap``."""
    x = _as_bchw(image).double()
    ph, pw = (patch_px, patch_px) if isinstance(patch_px, int) else (int(patch_px[0]), int(patch_px[1]))
    gap = int(gap)
    d = 2 * gap + 1
    if gap < 0 or d >= min(ph, pw):
        raise EvalInputError(f"gap must be >= 0 and 2 * gap + 1 smaller than the patch, got gap={gap}, "
                             f"patch={patch_px!r} (largest gap: {(min(ph, pw) - 2) // 2})")
    out: dict = {"gap": gap, "patch_px": [ph, pw]}
    tot = [0.0, 0, 0.0, 0]
    for axis, dim, p in (("x", 3, pw), ("y", 2, ph)):
        n = x.shape[dim]
        out[f"ratio_{axis}"] = None
        if n <= d:
            continue
        j = (x.narrow(dim, d, n - d) - x.narrow(dim, 0, n - d)).pow(2).sum(1).sqrt().movedim(dim - 1, -1)
        i = torch.arange(n - d)  # pair i: pixels i and i + d along dim
        is_b = (i + 1 + gap) % p == 0
        is_i = (i // p) == ((i + d) // p)
        s = [j[..., is_b].sum().item(), j[..., is_b].numel(), j[..., is_i].sum().item(), j[..., is_i].numel()]
        out[f"ratio_{axis}"] = _pooled_ratio(*s)
        out[f"boundary_pairs_{axis}"] = s[1]
        tot = [a + b for a, b in zip(tot, s)]
    out["ratio"] = _pooled_ratio(*tot)
    out["boundary_pairs"], out["interior_pairs"] = tot[1], tot[3]
    return out


def _pooled_ratio(b_sum, b_n, i_sum, i_n):
    if b_n == 0 or i_n == 0:
        return None
    b, i = b_sum / b_n, i_sum / i_n
    if i == 0:
        return 1.0 if b == 0 else math.inf
    return b / i


def hard_cut_seam_ratio(image: torch.Tensor, patch_px, gap: int = 0) -> float | None:
    """The seam ratio of an image decoded with hard cuts (:func:`decode_hard_cut`), on the patch
    grid starting at pixel (0, 0): metrics.seam_ratio for ``gap = 0``, else :func:`gap_seam_stats`.
    The image must be whole patches (a partial one would hide a border). Compare with the same
    number for real tokens and for a token patchwork decoded the same way (controls.py): a patch
    decoded alone has edge artefacts of its own, which at ``gap = 0`` can score real tokens as high
    as a patchwork; a gap of half a token or so steps over them. ``None`` without a border."""
    h, w = _shape_hw(image)
    ph, pw = (patch_px, patch_px) if isinstance(patch_px, int) else (int(patch_px[0]), int(patch_px[1]))
    if h % ph or w % pw:
        raise EvalInputError(f"a hard-cut image must be whole {ph}x{pw} px patches, got {h}x{w} px (H, W)")
    if gap == 0:
        return seam_stats(image, (ph, pw))["ratio"]
    return gap_seam_stats(image, (ph, pw), gap)["ratio"]
