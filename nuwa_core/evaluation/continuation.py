"""Held-out continuation: does a model continue an image the way the image goes on?

``python -m nuwa_core.eval continuation MODEL --image REF --heldout X Y W H`` (evaluation/cli.py),
or :func:`evaluate_continuation` from Python.

Protocol
--------
The model was trained on the reference *without* the held-out box (x, y, w, h px). For each
direction a window of whole patches is cut inside the box (at its top-left corner; by default as
many patches as fit); the model is given the part of the window on the far side (for ``right``:
the left part, by default half the patches along the direction, at least one) and generates the
rest (``plan_extension``, then ``decode``: given pixels pasted back). Every control fills the same
region and is scored exactly like the model's output (controls.py):

    model        the generator under test (or any ``generate_fn``)
    real         the truth itself (the ceiling)
    real tokens  the truth through the tokenizer, decoded like the model's output (the ceiling a
                 generator of tokens can reach; only with a model)
    random real  a same-size real crop from outside the held-out box (seeded)
    patchwork    patch-sized real crops from outside the box, rows mixed (seeded)
    patch-NN     training-free continuation: copy what follows the best low-res match of the given
                 band (one patch thick) from outside the box, iteratively
    patch-NN drawn  the same, each step copying one of the 8 best matches, drawn by the seed: a
                 training-free sampler that uses its context
    flat         the given part's mean colour
    line mean    each pixel line of the given part carried on as its mean colour: a smear with the
                 layout and no texture (what low-res PSNR rewards most; see energy)
    i.i.d. tokens random codebook tokens over the region, decoded like the model's output (only
                 with a model)

Scores (region_scores.py; columns of the table)
-----------------------------------------------
    lowres_psnr   dB, block means (``block`` px, 8 = one f8 token) against the truth; higher is better
    layout        correlation of the per-row (left/right) or per-column (up/down) colour profile
                  with the truth; 1 = same layout
    boundary_seam jump across the given/generated line / jumps within ``band`` px beside it; ~1
                  for real pixels. The given pixels are real and the generated ones decoded, so
                  a token generator's floor is the ``real tokens`` row, not ``real``
    texture       SWD(region, allowed rectangle of the reference) / SWD(its halves): compare with
                  the ``real`` row, it is texture only (a patchwork scores like real)
    hardcut_seam  seam ratio of the window's tokens decoded patch by patch without cross-fade
                  (last given patch + generated patches), pairs ``hardcut_gap`` px off each border;
                  compare with ``real`` (real tokens hard-cut) and ``patchwork`` (re-encoded)
    psnr_fullres  dB at full resolution (rewards blur: ``flat`` often wins; JSON and table, for
                  comparison only)
    energy_db     over all seeds at once (each seed one draw of the row): the energy score of the
                  draws' block means against the truth, in dB (region_scores.energy_score_db; with
                  2 or more seeds). Strictly proper: draws from the distribution the truth comes
                  from score best in expectation, so a blur is not rewarded over plausible draws as
                  one draw's low-res PSNR rewards it. Deterministic rows score their low-res PSNR.
    token_nll     (per direction, AR models; no sampling) nats per token the model gives the truth's
                  own tokens, teacher-forced where it generates, beside the unigram of the codes of
                  the part it saw and the uniform ln V (``truth_token_nll``): above the unigram, the
                  renderer is confidently wrong about a place it has not seen (it memorised)

Summary: per direction, ``margin_db`` = mean over seeds of the model's low-res PSNR minus the
better of the *random real* and *patch-NN* means. Above 0: the model uses its context better than
copying real pixels from elsewhere; below 0 it does not (yet). ``margin_vs_flat_db`` likewise
against the flat fill. ``energy_margin_db``: the model's energy score minus the best of every
training-free control's (random real, patchwork, patch-NN, patch-NN drawn, flat, line mean), the
margin a sampler can be held to (``energy_summary``). Evaluate only on regions the model never
trained on.
"""
from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

from .controls import flat_fill, line_mean_fill, patch_nn_fill, patchwork_fill, random_real_fill, random_tokens
from .metrics import EvalInputError, _as_bchw, psnr
from .region_scores import (
    DIRECTIONS,
    allowed_rect,
    boundary_seam_ratio,
    canonical,
    canonical_box,
    check_box,
    crop,
    decode_hard_cut,
    energy_score_db,
    from_canonical,
    hard_cut_seam_ratio,
    layout_correlation,
    lowres_psnr,
    texture_ratio,
)

__all__ = ["ROWS", "SCORES", "ACROSS_SEEDS", "TRAINING_FREE", "WindowPlan", "plan_window", "model_generator",
           "evaluate_continuation", "seen_code_nll", "truth_token_nll", "format_table"]

ROWS = ("model", "real", "real tokens", "random real", "patchwork", "patch-NN", "patch-NN drawn", "flat", "line mean",
        "i.i.d. tokens")
SCORES = ("lowres_psnr", "layout", "boundary_seam", "texture", "hardcut_seam", "psnr_fullres")  # one value per seed
ACROSS_SEEDS = ("energy_db",)  # one value from all seeds' draws
# the controls that need no learning and do not see the truth: the energy margin's reference
TRAINING_FREE = ("random real", "patchwork", "patch-NN", "patch-NN drawn", "flat", "line mean")
PATCH_NN_CHOICES = 8  # patch-NN drawn: one of this many best matches per step
# A generator: (given IMAGE [1,gh,gw,3], direction, patches to add, seed) -> the whole window IMAGE
# [1,wh,ww,3] in the reference's orientation (given part included), or (IMAGE, tokens [1,h,w]).
GenerateFn = Callable[[torch.Tensor, str, int, int], "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]


@dataclass(frozen=True)
class WindowPlan:
    """Where one direction's test lies in the reference; boxes are (x, y, w, h) px."""
    direction: str
    window: tuple
    given: tuple
    generated: tuple
    given_patches: int       # along the direction
    generated_patches: int
    patch_px: tuple          # (ph, pw)

    @property
    def split_px(self) -> int:
        """The given part's thickness along the direction."""
        return self.given[2] if self.direction in ("left", "right") else self.given[3]

    @property
    def patch_along(self) -> int:
        return self.patch_px[1] if self.direction in ("left", "right") else self.patch_px[0]


def plan_window(heldout: Sequence[int], direction: str, patch_px: Sequence[int], image_hw: Sequence[int],
                window_patches: Sequence[int] | None = None, given_patches: int | None = None) -> WindowPlan:
    """The window (``window_patches`` = (rows, cols), default as many as fit the box) at the
    held-out box's top-left corner, split along ``direction``: ``given_patches`` (default half,
    at least 1) on the far side, the rest generated."""
    if direction not in DIRECTIONS:
        raise EvalInputError(f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    bx, by, bw, bh = check_box(heldout, image_hw[0], image_hw[1], "held-out box")
    ph, pw = (int(patch_px[0]), int(patch_px[1]))
    rows, cols = (bh // ph, bw // pw) if window_patches is None else (int(window_patches[0]), int(window_patches[1]))
    if rows < 1 or cols < 1 or rows * ph > bh or cols * pw > bw:
        raise EvalInputError(f"a window of {rows}x{cols} patches of {ph}x{pw} px (rows x cols) must fit the "
                             f"{bw}x{bh} px held-out box (at most {bh // ph}x{bw // pw} patches)")
    n = cols if direction in ("left", "right") else rows
    g = n // 2 if given_patches is None else int(given_patches)
    if n < 2 or not 1 <= g <= n - 1:
        raise EvalInputError(f"{direction!r}: the window has {n} patches along the direction; give between 1 and "
                             f"{n - 1} of them (got {g}), so that at least one is generated"
                             + (" (the held-out box must hold at least 2 patches along it)" if n < 2 else ""))
    window = (bx, by, cols * pw, rows * ph)
    k = n - g
    if direction == "right":
        given, gen = (bx, by, g * pw, rows * ph), (bx + g * pw, by, k * pw, rows * ph)
    elif direction == "left":
        given, gen = (bx + k * pw, by, g * pw, rows * ph), (bx, by, k * pw, rows * ph)
    elif direction == "down":
        given, gen = (bx, by, cols * pw, g * ph), (bx, by + g * ph, cols * pw, k * ph)
    else:
        given, gen = (bx, by + k * ph, cols * pw, g * ph), (bx, by, cols * pw, k * ph)
    return WindowPlan(direction, window, given, gen, g, k, (ph, pw))


def model_generator(model, settings=None, extent: Sequence[int] | None = None) -> GenerateFn:
    """A NuwaInfinity bundle as a ``generate_fn``: canvas_from_image(given), plan_extension in the
    direction, generate (seeded ``torch.Generator``; ``extent`` e.g. (0, 0, 0) for no context),
    decode. Returns (window IMAGE [1,H,W,3], tokens [1,h,w])."""
    def generate(given: torch.Tensor, direction: str, patches: int, seed: int):
        state = model.canvas_from_image(given, fit="refuse")
        plan = model.plan_extension(state, **{direction: int(patches)})
        out = model.generate(state, plan, settings, generator=torch.Generator().manual_seed(int(seed)),
                             extent=None if extent is None else tuple(extent))
        return model.decode(out)[:1], out.tokens[:1, 0].clone()
    return generate


def _crop_box(image: torch.Tensor, box, origin) -> torch.Tensor:
    x, y, w, h = box
    return image[:, y - origin[1]:y - origin[1] + h, x - origin[0]:x - origin[0] + w]


def evaluate_continuation(reference: torch.Tensor, heldout: Sequence[int], model=None, *,
                          directions: Sequence[str] = ("right",), seeds: Sequence[int] = (0,),
                          generate_fn: GenerateFn | None = None, settings=None, extent=None, patch_px=None,
                          window_patches=None, given_patches: int | None = None, block: int = 8, band: int = 16,
                          nn_band: int | None = None, hardcut_gap: int = 4, swd_descriptors: int = 2048,
                          swd_directions: int = 256, log=None) -> dict:
    """Run the protocol (module docstring) and return a JSON-ready dict.

    ``reference``: IMAGE [1,H,W,C] 0..1 (the first image of a batch is used). ``model``: a
    NuwaInfinity bundle; it generates unless ``generate_fn`` is given, and it provides the
    tokenizer rows (real tokens, i.i.d. tokens) and the hard-cut column. Without a model,
    ``generate_fn`` and ``patch_px`` (int or (h, w)) are needed and those rows/column are left out.
    ``nn_band``: patch-NN's matched band in px (default one patch, at most the given part).
    ``log``: a file for progress notes (default stderr; False for none).

    Returns ``{"directions": {d: {"plan", "mean": {row: {score: v}}, "per_seed": {row: {score:
    [v per seed]}}, "margin_db", "margin_db_per_seed", "margin_vs_flat_db", "energy_margin_db"}},
    "summary": {d: margin_db}, "energy_summary": {d: energy_margin_db}, "rows", "scores",
    "settings"...}``; ``mean`` also holds ``energy_db`` (None with one seed); with an AR model
    each direction also holds ``token_nll`` ({"model", "first", "unigram", "uniform"}); non-finite
    values become None.
    """
    ref = _as_bchw(reference, "reference")[:1].permute(0, 2, 3, 1).contiguous()  # [1, H, W, 3]
    H, W = ref.shape[1:3]
    if model is None and generate_fn is None:
        raise EvalInputError("give a model (NuwaInfinity) or a generate_fn to evaluate")
    if model is not None:
        patch = tuple(model.patch_pixels)
    elif patch_px is None:
        raise EvalInputError("without a model, patch_px (the generator's patch in pixels) is needed")
    else:
        patch = (int(patch_px), int(patch_px)) if isinstance(patch_px, int) else (int(patch_px[0]), int(patch_px[1]))
    gen_fn = generate_fn or model_generator(model, settings, extent)
    heldout = check_box(heldout, H, W, "held-out box")
    log = sys.stderr if log is None else log
    rows = [r for r in ROWS if model is not None or r not in ("real tokens", "i.i.d. tokens")]
    out: dict = {"protocol": "continuation", "reference_size": [H, W], "heldout": list(heldout),
                 "patch_px": list(patch), "seeds": [int(s) for s in seeds], "rows": rows,
                 "scores": list(SCORES + ACROSS_SEEDS),
                 "settings": {"block": block, "band": band, "nn_band": nn_band, "hardcut_gap": hardcut_gap,
                              "swd_descriptors": swd_descriptors, "swd_directions": swd_directions,
                              "extent": None if extent is None else list(extent),
                              "sampler": None if settings is None else asdict(settings)},
                 "directions": {}, "summary": {}, "energy_summary": {}}
    code_nll = seen_code_nll(model, ref, heldout) if model is not None and model.renderer.config.decoder == "ar" \
        else None  # token_nll's unigram control, one encoding of the seen part for every direction
    for direction in directions:
        plan = plan_window(heldout, direction, patch, (H, W), window_patches, given_patches)
        per_seed = {r: {s: [] for s in SCORES} for r in rows}
        draws = {r: [] for r in rows}  # the filled region of each seed, canonical frame
        for seed in seeds:
            if log:
                print(f"note: continuation {direction}, seed {seed}", file=log, flush=True)
            scores, regions, truth = _score_seed(ref, heldout, plan, int(seed), model, gen_fn, rows, block=block,
                                                 band=band, nn_band=nn_band, gap=hardcut_gap,
                                                 swd=(swd_descriptors, swd_directions))
            for r in rows:
                draws[r].append(regions[r])
                for s in SCORES:
                    per_seed[r][s].append(scores[r][s])
        mean = {r: {s: _mean(v) for s, v in d.items()} for r, d in per_seed.items()}
        for r in rows:
            mean[r]["energy_db"] = energy_score_db(draws[r], truth, block) if len(draws[r]) > 1 else None
        lr = per_seed
        margins = [m - max(a, b) for m, a, b in zip(lr["model"]["lowres_psnr"], lr["random real"]["lowres_psnr"],
                                                    lr["patch-NN"]["lowres_psnr"])]
        best = max(mean["random real"]["lowres_psnr"], mean["patch-NN"]["lowres_psnr"])
        out["directions"][direction] = {
            "plan": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(plan).items()},
            "mean": mean, "per_seed": per_seed,
            "margin_db": mean["model"]["lowres_psnr"] - best,
            "margin_db_per_seed": margins,
            "margin_vs_flat_db": mean["model"]["lowres_psnr"] - mean["flat"]["lowres_psnr"],
            "energy_margin_db": _energy_margin(mean)}
        if code_nll is not None:
            out["directions"][direction]["token_nll"] = truth_token_nll(model, ref, heldout, plan, extent, code_nll)
        out["summary"][direction] = out["directions"][direction]["margin_db"]
        out["energy_summary"][direction] = out["directions"][direction]["energy_margin_db"]
    return _json_ready(out)


def seen_code_nll(model, reference: torch.Tensor, heldout: Sequence[int]) -> torch.Tensor:
    """-log p [V] of each code under the unigram of the codes in the part of the reference the model
    saw (``allowed_rect``, encoded; add-1/2 smoothing): the context-free control of
    :func:`truth_token_nll`, the same for every direction of one reference."""
    H, W = reference.shape[1:3]
    seen = model.canvas_from_image(crop(reference, allowed_rect(H, W, heldout)), fit="crop").tokens
    counts = torch.bincount(seen.flatten(), minlength=model.vqgan.config.n_embed).double() + 0.5
    return -(counts / counts.sum()).log()


def truth_token_nll(model, reference: torch.Tensor, heldout: Sequence[int], plan: WindowPlan, extent=None,
                    code_nll: torch.Tensor | None = None) -> dict:
    """How likely the model finds the truth's tokens (the window encoded) where it generates,
    teacher-forced in the protocol's setting (NuwaInfinity.token_nll), in nats per token, beside
    two controls that use no context: the unigram of the codes in the part of the reference the
    model saw (``code_nll``, :func:`seen_code_nll` when not given) and the uniform ln V. A renderer
    that generalises scores below the unigram; one that memorised its training part scores above
    it (it is confidently wrong about a place it has not seen). ``first``: the first token of each
    patch in generation order, the one its context alone must predict."""
    state = model.canvas_from_image(crop(reference, plan.given), fit="refuse")
    grown_plan = model.plan_extension(state, **{plan.direction: plan.generated_patches})
    truth = model.canvas_from_image(crop(reference, plan.window), fit="refuse")
    nll = model.token_nll(state, grown_plan, truth.tokens, extent=None if extent is None else tuple(extent))
    first = [model.renderer.permutation(order)[0][0] for order, _ in grown_plan.steps()]
    code_nll = seen_code_nll(model, reference, heldout) if code_nll is None else code_nll
    planned = torch.stack([truth.patch_tokens(c) for _, c in grown_plan.steps()])  # [N, B, M]
    return {"model": nll.mean().item(), "first": torch.stack([nll[n, :, r] for n, r in enumerate(first)]).mean().item(),
            "unigram": code_nll[planned].mean().item(), "uniform": math.log(model.vqgan.config.n_embed)}


def _energy_margin(mean: dict) -> float | None:
    if mean["model"]["energy_db"] is None:
        return None
    return mean["model"]["energy_db"] - max(mean[r]["energy_db"] for r in TRAINING_FREE)


def _score_seed(ref, heldout, plan: WindowPlan, seed: int, model, gen_fn, rows, *, block, band, nn_band, gap, swd):
    """Scores of every row for one seed, each row's filled region and the truth's (canonical frame)."""
    d = plan.direction
    H, W = ref.shape[1:3]
    wx, wy = plan.window[:2]
    truth_win = crop(ref, plan.window)                        # [1, wh, ww, 3], reference orientation
    given = crop(ref, plan.given)
    split = plan.split_px
    cref = canonical(ref, d)                                  # canonical frame: continuation to the right
    cheld = canonical_box(heldout, H, W, d)
    allowed = crop(cref, allowed_rect(cref.shape[1], cref.shape[2], cheld))
    ctruth_win = canonical(truth_win, d)
    cgiven, ctruth = ctruth_win[:, :, :split], ctruth_win[:, :, split:]
    size = tuple(ctruth.shape[1:3])
    cpatch = plan.patch_px if d in ("left", "right") else plan.patch_px[::-1]

    windows, tokens = {}, {}                                  # row -> window IMAGE (reference orientation)
    result = gen_fn(given, d, plan.generated_patches, seed)
    win, tok = result if isinstance(result, tuple) else (result, None)
    win = _as_bchw(win, "generated window")[:1].permute(0, 2, 3, 1)
    if tuple(win.shape[1:3]) != tuple(truth_win.shape[1:3]):
        raise EvalInputError(f"the generator returned a {win.shape[2]}x{win.shape[1]} px image; the window is "
                             f"{truth_win.shape[2]}x{truth_win.shape[1]} px (given part included)")
    windows["model"], tokens["model"] = win, tok
    nn_band = min(split, nn_band or plan.patch_along)
    fills = {"real": ctruth,
             "random real": random_real_fill(cref, cheld, size, seed),
             "patchwork": patchwork_fill(cref, cheld, size, cpatch, seed),
             "patch-NN": patch_nn_fill(cref, cheld, cgiven, size[1], band=nn_band, block=block),
             "patch-NN drawn": patch_nn_fill(cref, cheld, cgiven, size[1], band=nn_band, block=block,
                                             choices=PATCH_NN_CHOICES, seed=seed),
             "flat": flat_fill(cgiven, size),
             "line mean": line_mean_fill(cgiven, size[1])}
    for name, fill in fills.items():
        windows[name] = from_canonical(torch.cat([cgiven, fill.to(cgiven.dtype)], dim=2), d)
    if model is not None:
        state = model.canvas_from_image(truth_win, fit="refuse")
        state.given, state.given_origin = given.clone(), (plan.given[1] - wy, plan.given[0] - wx)
        windows["real tokens"], tokens["real tokens"] = model.decode(state)[:1], state.tokens[:1, 0].clone()
        f = model.vqgan.downsample_factor
        gx, gy, gw, gh = plan.generated
        iid = state.clone()
        t = iid.tokens[:1, 0]
        t[:, (gy - wy) // f:(gy - wy + gh) // f, (gx - wx) // f:(gx - wx + gw) // f] = \
            random_tokens(model.vqgan.config.n_embed, (1, gh // f, gw // f), seed)
        windows["i.i.d. tokens"], tokens["i.i.d. tokens"] = model.decode(iid)[:1], t.clone()
    scores, regions, halves, hard_cache = {}, {}, None, {}
    for name in rows:
        cw = canonical(windows[name], d)
        region = regions[name] = cw[:, :, split:]
        s = {"lowres_psnr": lowres_psnr(region, ctruth, block),
             "layout": layout_correlation(region, ctruth, "rows"),
             "boundary_seam": boundary_seam_ratio(cw, split, "right", band),
             "texture": None,
             "psnr_fullres": psnr(region, ctruth, cap=100.0),
             "hardcut_seam": None}
        halves = texture_ratio(region, allowed, seed, n_descriptors=swd[0], n_directions=swd[1], details=True,
                               halves=halves)
        s["texture"] = halves["ratio"]
        if model is not None:
            tok = tokens.get(name)
            if tok is None:
                tok = model.canvas_from_image(windows[name], fit="refuse").tokens[:1, 0]
            key = tok.numpy().tobytes()
            if key not in hard_cache:  # e.g. real and real tokens: the same grid
                hard = canonical(decode_hard_cut(model.vqgan, tok, model.patch_size), d)
                hard_cache[key] = hard_cut_seam_ratio(hard[:, :, split - plan.patch_along:], cpatch, gap)
            s["hardcut_seam"] = hard_cache[key]
        scores[name] = s
    return scores, regions, ctruth


def _mean(values):
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return sum(vals) / len(vals)


def _json_ready(v):
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _json_ready(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_ready(x) for x in v]
    return v


_HEADERS = {"lowres_psnr": "lowres dB", "layout": "layout r", "boundary_seam": "boundary", "texture": "texture",
            "hardcut_seam": "hard-cut", "psnr_fullres": "full dB", "energy_db": "energy dB"}


def format_table(result: dict) -> str:
    """The readable report of :func:`evaluate_continuation`'s result: one table per direction
    (rows: model and controls; columns: mean scores over seeds) and its margin."""
    lines = []
    seeds = " ".join(str(s) for s in result["seeds"])
    for d, r in result["directions"].items():
        p = r["plan"]
        lines.append(f"continuation {d}: window {_box(p['window'])}, given {_box(p['given'])} "
                     f"({p['given_patches']} patches), generated {_box(p['generated'])} "
                     f"({p['generated_patches']} patches); mean of seeds {seeds}")
        lines.append(f"  {'':16s}" + "".join(f"{_HEADERS[s]:>11s}" for s in result["scores"]))
        for row in result["rows"]:
            vals = r["mean"][row]
            lines.append(f"  {row:16s}" + "".join(f"{_fmt(vals[s]):>11s}" for s in result["scores"]))
        lines.append(f"  margin: model - best of (random real, patch-NN) = {_fmt(r['margin_db'], '+.2f')} dB "
                     f"(per seed {', '.join(_fmt(m, '+.2f') for m in r['margin_db_per_seed'])}); "
                     f"model - flat = {_fmt(r['margin_vs_flat_db'], '+.2f')} dB")
        lines.append(f"  energy margin: model - best training-free control = "
                     f"{_fmt(r['energy_margin_db'], '+.2f')} dB")
        if "token_nll" in r:
            t = r["token_nll"]
            lines.append(f"  truth's tokens, teacher-forced: model {t['model']:.2f} nats/token (first of a patch "
                         f"{t['first']:.2f}), unigram of the seen part {t['unigram']:.2f}, uniform {t['uniform']:.2f}; "
                         "below both = generalises, above = confidently wrong where it has not been trained")
        lines.append("")
    lines.append("good: lowres dB and layout r high (real = 100 dB / 1.00); boundary near the real tokens row "
                 "(real pixels meet decoded ones) and below patchwork; hard-cut near real, below patchwork; "
                 "texture near the real row (texture only: a patchwork scores like real); energy dB high "
                 "(proper over the seeds' draws; line mean shows what blur earns in lowres dB)")
    return "\n".join(lines)


def _box(b) -> str:
    return f"x={b[0]} y={b[1]} {b[2]}x{b[3]}"


def _fmt(v, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)
