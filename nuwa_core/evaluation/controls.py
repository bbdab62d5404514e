"""Controls: near misses of a generated region, built from the same reference and scored exactly
like the model's output, so that no score stands alone.

A score is evidence only if it separates the real thing from these. Every fill function returns an
IMAGE ``[1, h, w, 3]`` of the requested size (h, w in px); the ones drawing from the reference
never touch the ``excluded`` box (the held-out region: the model never saw it either) and are
seeded (``torch.Generator().manual_seed(seed)``), so the same seed gives the same fill.

What each control shows
-----------------------
- *real* (the truth itself; not a function here): the ceiling of every score.
- :func:`random_real_fill` (*random real*): a same-size real crop from elsewhere in the reference.
  Right texture, wrong place. A continuation that uses its context must beat it on agreement
  with the truth (low-res PSNR, layout); one that does not, ignores its context.
- :func:`patchwork_fill` (*patchwork*): patch-sized real crops from random places, rows mixed.
  Real texture, no layout, a seam on every patch border: what an incoherent patch-by-patch
  generator produces. Texture scores (SWD) rate it like real; layout and seam scores must not.
- :func:`patch_nn_fill` (*patch-NN*): a classical, training-free use of context (GPNN-style):
  match the band of given pixels next to the region against every position of the allowed
  reference (block means, L2) and copy what follows the best match; longer regions continue
  from what was copied. A learned model should beat it on agreement with the truth. With
  ``choices=8`` and a seed (*patch-NN drawn*) each step copies one of the 8 best matches, drawn:
  a training-free *sampler* that uses context, the control for scores over several draws
  (region_scores.energy_score_db), where a single deterministic copy is a point forecast.
- :func:`flat_fill` (*flat*): the given part's mean colour. A dumb control for PSNR-like scores:
  full-resolution PSNR rewards blur, so a flat fill often beats every real texture there.
- :func:`line_mean_fill` (*line mean*): each pixel line of the given part, across the direction
  of continuation, carried on as its mean colour: a smear with the layout (the horizon at its
  height) and no texture at all. On a strip that goes on much as it began this is close to the
  best *point forecast* of the block means, so low-res PSNR rates it above any real continuation;
  a score that ranks it above a plausible continuation rewards blur, not continuing.
- :func:`iid_token_fill` / :func:`random_tokens` (*i.i.d. tokens*): random codebook entries
  through the tokenizer's decoder: the decoder's own look without any model.
- :func:`token_patchwork`, :func:`hard_cut_seam_controls`: patch-sized blocks of a real token grid,
  rows mixed; decoded with hard cuts (region_scores.decode_hard_cut) it is the seam control for
  the hard-cut seam ratio, with the real tokens decoded the same way as the other side.
- :func:`single_image_controls`: the reference's own seam / SWD scores and those of a patchwork of
  it, for the single-image report (``python -m nuwa_core.eval IMAGE``).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .metrics import EvalInputError, _as_bchw, _shape_hw, seam_ratio, split_halves, swd_levels_for, swd_per_level
from .region_scores import decode_hard_cut, hard_cut_seam_ratio, valid_positions

__all__ = [
    "random_real_fill", "patchwork_fill", "patch_nn_fill", "flat_fill", "line_mean_fill", "random_tokens",
    "iid_token_fill", "token_patchwork", "hard_cut_seam_controls", "single_image_controls",
]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _pick(ok: torch.Tensor, gen: torch.Generator, what: str) -> tuple[int, int]:
    """A uniformly drawn True position (y, x) of a bool [H', W'] map."""
    where = torch.nonzero(ok)
    if len(where) == 0:
        raise EvalInputError(f"no place in the reference fits {what} without touching the held-out box: "
                             "use a smaller region or a larger reference")
    y, x = where[int(torch.randint(len(where), (1,), generator=gen))].tolist()
    return y, x


def _ref(reference: torch.Tensor) -> torch.Tensor:
    """IMAGE -> its first image as [1, H, W, 3] 0..1 (checked)."""
    return _as_bchw(reference, "reference")[:1].permute(0, 2, 3, 1)


def random_real_fill(reference: torch.Tensor, excluded: Sequence[int] | None, size_hw: Sequence[int],
                     seed: int = 0) -> torch.Tensor:
    """A real ``size_hw`` = (h, w) px crop of the reference at a seeded random position outside
    ``excluded`` (x, y, w, h): IMAGE [1, h, w, 3]."""
    ref = _ref(reference)
    h, w = (int(v) for v in size_hw)
    ok = valid_positions(ref.shape[1], ref.shape[2], h, w, excluded)
    y, x = _pick(ok, _generator(seed), f"a {w}x{h} px crop")
    return ref[:, y:y + h, x:x + w].clone()


def patchwork_fill(reference: torch.Tensor, excluded: Sequence[int] | None, size_hw: Sequence[int],
                   patch_hw: Sequence[int] | int, seed: int = 0) -> torch.Tensor:
    """IMAGE [1, h, w, 3] tiled with patch-sized real crops, each from a seeded random position
    (any row, any column) outside ``excluded``; the grid starts at (0, 0) and the last row/column of
    tiles is cut to the size."""
    ref = _ref(reference)
    h, w = (int(v) for v in size_hw)
    ph, pw = (int(patch_hw), int(patch_hw)) if isinstance(patch_hw, int) else (int(patch_hw[0]), int(patch_hw[1]))
    ok = valid_positions(ref.shape[1], ref.shape[2], ph, pw, excluded)
    gen = _generator(seed)
    out = ref.new_empty(1, h, w, 3)
    for i in range(0, h, ph):
        for j in range(0, w, pw):
            y, x = _pick(ok, gen, f"a {pw}x{ph} px patch")
            th, tw = min(ph, h - i), min(pw, w - j)
            out[:, i:i + th, j:j + tw] = ref[:, y:y + th, x:x + tw]
    return out


def flat_fill(given: torch.Tensor, size_hw: Sequence[int]) -> torch.Tensor:
    """IMAGE [1, h, w, 3] of the given part's mean colour."""
    g = _as_bchw(given, "given")[:1]
    h, w = (int(v) for v in size_hw)
    return g.mean(dim=(2, 3)).view(1, 1, 1, 3).expand(1, h, w, 3).contiguous()


def line_mean_fill(given: torch.Tensor, length: int) -> torch.Tensor:
    """Continue ``given`` [1, gh, gw, 3] to the right (canonical frame) by ``length`` px, each pixel
    row as its mean colour in the given part: IMAGE [1, gh, length, 3]."""
    g = _as_bchw(given, "given")[:1]  # [1, 3, gh, gw]
    if int(length) < 1:
        raise EvalInputError(f"length must be >= 1 px, got {length}")
    return g.mean(dim=3, keepdim=True).expand(-1, -1, -1, int(length)).permute(0, 2, 3, 1).contiguous()


def patch_nn_fill(reference: torch.Tensor, excluded: Sequence[int] | None, given: torch.Tensor, length: int,
                  band: int | None = None, block: int = 8, step: int | None = None, details: bool = False,
                  choices: int = 1, seed: int = 0):
    """Continue ``given`` to the right by ``length`` px with real pixels (canonical frame; see
    region_scores.canonical for the other directions).

    Query: the last ``band`` px columns of what is there (given, then given + copied so far),
    reduced to ``block`` x ``block`` px block means. Every position of the reference where a
    (given height) x (band + step) px rectangle lies outside ``excluded`` is a candidate; the one
    whose band has the smallest L2 distance to the query (first in raster order on ties) lends the
    ``step`` px that follow its band. Repeats until ``length`` px are filled. ``band`` defaults to
    the given part's width, ``step`` to ``band``. ``choices`` > 1: each step lends what follows one
    of the ``choices`` best matches, drawn uniformly (``seed``) instead of the best. Returns IMAGE
    [1, gh, length, 3], or with ``details`` a dict with ``fill``, ``sources`` [(x, y) of each
    copied piece in the reference] and ``distances`` (mean squared block difference of each match).
    """
    ref = _as_bchw(reference, "reference")[:1].double()  # [1, 3, H, W]
    ctx = _as_bchw(given, "given")[:1].double()  # [1, 3, gh, gw]
    H, W = ref.shape[2:]
    gh, gw = ctx.shape[2:]
    length, block = int(length), int(block)
    band = min(gw, int(band or gw))
    step = int(step or band)
    if length < 1 or step < 1 or band < 1 or int(choices) < 1:
        raise EvalInputError(f"length, band, step and choices must be >= 1, got {length}, {band}, {step}, {choices}")
    gen = _generator(seed) if int(choices) > 1 else None
    if gh < block or band < block:
        raise EvalInputError(f"the query band {band}x{gh} px (W x H) must hold at least one {block} px block")
    nbh, nbw = gh // block, band // block
    pooled = F.avg_pool2d(ref, block, stride=1)  # [1, 3, H-b+1, W-b+1]: block mean with its corner at (y, x)
    ones = torch.ones(1, 3, nbh, nbw, dtype=torch.float64)
    sq = F.conv2d(pooled.pow(2), ones, dilation=block)  # [1, 1, H-nbh*b+1, W-nbw*b+1]
    pieces, sources, dists = [], [], []
    done = 0
    while done < length:
        s = min(step, length - done)
        if gh > H or band + s > W:
            raise EvalInputError(f"a {band + s}x{gh} px match does not fit the {W}x{H} px reference")
        q = F.avg_pool2d(ctx[..., -band:], block, block)[..., :nbh, :nbw]  # [1, 3, nbh, nbw]
        d = sq - 2 * F.conv2d(pooled, q, dilation=block) + q.pow(2).sum()
        d = d[0, 0, :H - gh + 1, :W - band - s + 1]
        ok = valid_positions(H, W, gh, band + s, excluded)
        d = torch.where(ok, d, torch.full_like(d, math.inf))
        best = int(torch.argmin(d))
        if not math.isfinite(d.flatten()[best].item()):
            raise EvalInputError(f"no place in the reference fits a {band + s}x{gh} px match outside the held-out box")
        if gen is not None:
            near = torch.topk(d.flatten(), min(int(choices), d.numel()), largest=False).indices
            near = near[torch.isfinite(d.flatten()[near])]
            best = int(near[torch.randint(len(near), (1,), generator=gen)])
        y, x = divmod(best, d.shape[1])
        piece = ref[..., y:y + gh, x + band:x + band + s]
        pieces.append(piece)
        sources.append((x + band, y))
        dists.append(max(d[y, x].item(), 0.0) / (3 * nbh * nbw))
        ctx = torch.cat([ctx, piece], dim=3)
        done += s
    fill = torch.cat(pieces, dim=3).float().permute(0, 2, 3, 1).contiguous()
    if details:
        return {"fill": fill, "sources": sources, "distances": dists, "band": band, "step": step}
    return fill


def random_tokens(n_embed: int, shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """LongTensor of ``shape`` with i.i.d. uniform ids in [0, n_embed) (seeded)."""
    return torch.randint(0, int(n_embed), tuple(int(s) for s in shape), generator=_generator(seed))


@torch.no_grad()
def iid_token_fill(vqgan, size_hw: Sequence[int], seed: int = 0) -> torch.Tensor:
    """IMAGE [1, h, w, 3]: i.i.d. random codebook tokens decoded at once by ``vqgan.decode_tokens``
    (h, w whole tokens)."""
    f = vqgan.downsample_factor
    h, w = (int(v) for v in size_hw)
    if h % f or w % f:
        raise EvalInputError(f"an i.i.d.-token fill must be whole {f} px tokens, got {w}x{h} px")
    tokens = random_tokens(vqgan.config.n_embed, (1, h // f, w // f), seed)
    x = vqgan.decode_tokens(tokens.to(next(vqgan.parameters()).device)).float().cpu()
    return ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).contiguous()


def token_patchwork(tokens: torch.Tensor, patch_tokens: Sequence[int], seed: int = 0,
                    out_hw: Sequence[int] | None = None) -> torch.Tensor:
    """[B, h, w] token grid -> [B, H, W] (default the same size) tiled with (ph, pw)-token blocks
    of it from seeded random positions (any row, any column), the grid starting at (0, 0)."""
    if tokens.ndim != 3:
        raise EvalInputError(f"tokens must be [B, h, w], got shape {tuple(tokens.shape)}")
    ph, pw = (int(v) for v in tuple(patch_tokens)[-2:])
    b, h, w = tokens.shape
    oh, ow = (h, w) if out_hw is None else (int(out_hw[0]), int(out_hw[1]))
    ok = valid_positions(h, w, ph, pw, None)
    gen = _generator(seed)
    out = tokens.new_empty(b, oh, ow)
    for i in range(0, oh, ph):
        for j in range(0, ow, pw):
            y, x = _pick(ok, gen, f"a {pw}x{ph}-token patch")
            th, tw = min(ph, oh - i), min(pw, ow - j)
            out[:, i:i + th, j:j + tw] = tokens[:, y:y + th, x:x + tw]
    return out


def hard_cut_seam_controls(vqgan, tokens: torch.Tensor, patch_tokens: Sequence[int], seed: int = 0,
                           gap: int = 0) -> dict:
    """Hard-cut seam ratios (region_scores.hard_cut_seam_ratio) of a real token grid [B, h, w]
    and of a token patchwork of it (:func:`token_patchwork`), both decoded patch by patch
    (region_scores.decode_hard_cut): ``{"real_tokens": r, "patchwork_tokens": r}``. A generated
    canvas decoded the same way should sit near the first, an incoherent one near the second."""
    pt = tuple(int(v) for v in patch_tokens)[-2:]
    f = vqgan.downsample_factor
    patch_px = (pt[0] * f, pt[1] * f)
    real = hard_cut_seam_ratio(decode_hard_cut(vqgan, tokens, pt), patch_px, gap)
    mixed = hard_cut_seam_ratio(decode_hard_cut(vqgan, token_patchwork(tokens, pt, seed), pt), patch_px, gap)
    return {"real_tokens": real, "patchwork_tokens": mixed}


def single_image_controls(reference: torch.Tensor, patch_px=None, seed: int = 0, *,
                          n_descriptors: int = 8192, n_directions: int = 512) -> dict:
    """Controls for the single-image report: ``{"reference": {...}, "patchwork": {...}}``.

    ``seam_ratio`` (metrics.seam_ratio on ``patch_px``): of the reference itself, and of a
    patchwork of it (patch-sized crops from random places, rows mixed, same size). ``swd_ratio``:
    both controls are drawn from the reference's second half and compared with its first half,
    over SWD(first half, second half): 1.0 for the real half by construction, and the patchwork of
    the second half beside it (it keeps all real texture, so SWD rates it about as real: SWD does
    not see layout). ``None`` where a score cannot be computed (no patch size, too small)."""
    ref = _ref(reference)
    h, w = _shape_hw(ref)
    out = {"reference": {"seam_ratio": None, "swd_ratio": None}, "patchwork": {"seam_ratio": None, "swd_ratio": None}}
    if patch_px is not None:
        ph, pw = (patch_px, patch_px) if isinstance(patch_px, int) else tuple(int(v) for v in patch_px)
        if ph <= h and pw <= w:
            out["reference"]["seam_ratio"] = seam_ratio(ref, (ph, pw))
            out["patchwork"]["seam_ratio"] = seam_ratio(patchwork_fill(ref, None, (h, w), (ph, pw), seed), (ph, pw))
    h1, h2 = split_halves(ref)
    patch = patch_px or max(8, min(_shape_hw(h2)) // 4)
    ph, pw = (patch, patch) if isinstance(patch, int) else tuple(int(v) for v in patch)
    try:
        pw2 = patchwork_fill(h2, None, _shape_hw(h2), (min(ph, h2.shape[1]), min(pw, h2.shape[2])), seed)
        levels = swd_levels_for(h1, h2)
        kw = dict(levels=levels, n_descriptors=n_descriptors, n_directions=n_directions)
        den = sum(swd_per_level(h1, h2, seed, **kw))
        if den > 0:
            out["reference"]["swd_ratio"] = 1.0
            out["patchwork"]["swd_ratio"] = sum(swd_per_level(pw2, h1, seed, **kw)) / den
    except EvalInputError:
        pass
    return out
