"""Baselines NUWA-Infinity is compared with (``python -m nuwa_core.evaluation.baselines``).

- **No context**: a renderer trained with ``train renderer --no-context`` and generated with
  ``model.generate(..., extent=(0, 0, 0))``: every patch is rendered on its own, so what a seam
  looks like without the Nearby Context Pool. Nothing extra is needed here; :func:`generate_images`
  wraps it with the same plans as the other models.
- **Taming sliding window** (Esser et al. 2021, their large-image sampler): a plain windowed GPT
  (a renderer with extent (0, 0, 0) whose patch is the window, e.g. 16 x 16 tokens, trained on
  random crops) sampled token by token in raster order; for every token the window is centred on
  it (clamped to the canvas) and the network runs over the window's tokens up to that one, with
  no cache. :func:`taming_sliding_window` is that sampler; ``bench/taming_window.py`` times it.

The command line generates, for one bundle, the images the evaluation compares (a panorama N
times wider than the training image, and outpainting back into a held-out crop of it):

    python -m nuwa_core.evaluation.baselines MODEL --image TRAIN.png --kind nuwa|no_context|taming --out DIR
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ..images import image_to_model, load_image, save_image
from ..infinity.arbitrary_direction_controller import Order
from ..infinity.canvas import UNKNOWN, CanvasState
from ..infinity.generation import NuwaInfinity
from ..infinity.patch_samplers import SamplerSettings, filter_logits, sample_categorical
from ..infinity.renderer import Context, Renderer

KINDS = ("nuwa", "no_context", "taming")


@torch.no_grad()
def taming_sliding_window(gpt: Renderer, settings: SamplerSettings, generator: torch.Generator | None = None,
                          rows: int | None = None, cols: int | None = None, tokens: torch.Tensor | None = None,
                          window: tuple[int, int] | None = None, callback=None,
                          whole_window: bool = False) -> torch.Tensor:
    """Raster-order sampling of a rows x cols token canvas, a full window forward per token.

    gpt: a renderer without context (extent (0, 0, 0)); its patch (1, wh, ww) is the window unless
    `window` says otherwise (it must not be larger than the patch). `tokens` [B, rows, cols]:
    a canvas to complete, UNKNOWN (-1) where a token is to be sampled (outpainting); without it a
    blank 1 x rows x cols canvas. Returns the token grid [B, rows, cols] (a new tensor).
    callback(done_rows, rows) runs after every token row.
    whole_window: run the network over all the window's tokens for every token, as taming's
    sampler does (same samples: attention is causal), instead of only up to that token.
    """
    pf, ph, pw = gpt.config.patch_size
    wh, ww = window or (ph, pw)
    if pf != 1 or wh > ph or ww > pw:
        raise ValueError(f"window {wh}x{ww} tokens must fit the renderer's patch {ph}x{pw} (one frame)")
    if tokens is None:
        if rows is None or cols is None:
            raise ValueError("give rows and cols, or a token grid `tokens` [B, rows, cols]")
        tokens = torch.full((1, rows, cols), UNKNOWN, dtype=torch.long)
    else:
        if tokens.ndim != 3:
            raise ValueError(f"tokens must be [B, rows, cols], got shape {tuple(tokens.shape)}")
        tokens = tokens.clone().long()
    b, rows, cols = tokens.shape
    if rows < wh or cols < ww:
        raise ValueError(f"canvas {rows}x{cols} tokens is smaller than the {wh}x{ww} window")
    device = gpt.pos_f.device
    unknown = tokens == UNKNOWN
    work = tokens.clamp(min=0).to(device)  # unknown slots hold 0 until sampled; never read before then
    empty, text_kv = Context(None, None, 0), gpt.text_kv(None)
    for i in range(rows):
        i0 = min(max(i - wh // 2, 0), rows - wh)  # the window slides with the token
        for j in range(cols):
            todo = unknown[:, i, j]
            if not todo.any():
                continue
            j0 = min(max(j - ww // 2, 0), cols - ww)
            win = work[:, i0:i0 + wh, j0:j0 + ww].reshape(b, -1)
            t = (i - i0) * ww + (j - j0)  # position of the token inside its window (raster)
            seen = win if whole_window else win[:, :t]  # slot t (the last one then) predicts token t
            logits, _ = gpt(gpt.ar_inputs(seen, Order.RIGHT_DOWN), empty, text_kv, causal=True)
            new = sample_categorical(filter_logits(logits[:, t], settings), generator)
            work[:, i, j] = torch.where(todo.to(device), new, work[:, i, j])
        if callback is not None:
            callback(i + 1, rows)
    return work.cpu()


def canvas_from_tokens(model: NuwaInfinity, tokens: torch.Tensor) -> CanvasState:
    """A token grid [B, h, w] (whole patches of the model) as a fully known canvas, for decoding."""
    pf, ph, pw = model.patch_size
    b, h, w = tokens.shape
    if pf != 1 or h % ph or w % pw:
        raise ValueError(f"token grid {h}x{w} is not a whole number of {ph}x{pw} patches")
    state = model.blank_canvas(h // ph, w // pw, batch=b)
    state.tokens[:, 0] = tokens
    state.known[:] = (tokens != UNKNOWN).all()
    return state


def _encode(model: NuwaInfinity, image: torch.Tensor, tile: int) -> torch.Tensor:
    """IMAGE [B, H, W, 3] -> tokens [B, h, w], encoded in tile-sized windows (as decoding uses)."""
    x = image_to_model(image).to(model.device, model.vqgan_dtype)
    return model.vqgan.encode_tokens_tiled(x, tile=tile, overlap=tile // 4).cpu()


@torch.no_grad()
def generate_images(model: NuwaInfinity, kind: str, image: torch.Tensor, settings: SamplerSettings, seed: int = 0,
                    width_factor: int = 4, given_cols: int | None = None, tile: int | None = None) -> dict:
    """The evaluation's images for one model, as IMAGE tensors:

    - ``panorama``: a blank canvas as high as `image` and `width_factor` times as wide, filled;
    - ``outpaint``: `image`'s left `given_cols` patch columns given, the rest of its width
      outpainted to the right (compare with `image` over the held-out columns); every kind's
      given tokens are encoded from the given pixels alone (cropped first: the tokenizer's
      windows and receptive field would otherwise reach into the held-out columns);
    - ``reconstruction``: `image` through the tokenizer (encoded and decoded in `tile` windows).

    kind: 'nuwa' (the model's own context), 'no_context' (extent (0, 0, 0)) or 'taming' (the
    sliding-window sampler; the model's patch is the window). tile: tokens per VQGAN window
    (default the model's patch, as NuwaInfinity does).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    php, pwp = model.patch_pixels
    f = model.vqgan.downsample_factor
    tile = tile or model.vqgan_tile
    h, w = image.shape[1:3]
    if h % php or w % pwp:
        raise ValueError(f"image {w}x{h} px is not a whole number of {pwp}x{php} px patches")
    rows, cols = h // php, w // pwp
    given_cols = cols * 3 // 4 if given_cols is None else given_cols
    if not 0 < given_cols < cols:
        raise ValueError(f"given_cols must be between 1 and {cols - 1}, got {given_cols}")

    def gen():
        return torch.Generator().manual_seed(seed)

    out, seconds = {}, {}
    real_tokens = _encode(model, image, tile)
    out["reconstruction"] = model.decode(canvas_from_tokens(model, real_tokens), tile=tile)

    start = time.perf_counter()
    if kind == "taming":
        toks = taming_sliding_window(model.renderer, settings, gen(), rows=h // f, cols=w // f * width_factor)
        pano = canvas_from_tokens(model, toks)
    else:
        blank = model.blank_canvas(rows, cols * width_factor)
        pano = model.generate(blank, model.plan_fill(blank), settings, generator=gen(),
                              extent=(0, 0, 0) if kind == "no_context" else None)
    out["panorama"] = model.decode(pano, tile=tile)
    seconds["panorama"] = round(time.perf_counter() - start, 2)

    start = time.perf_counter()
    given = image[:, :, :given_cols * pwp]
    given_tokens = _encode(model, given, tile)
    if kind == "taming":
        toks = torch.full_like(real_tokens, UNKNOWN)
        toks[:, :, :given_tokens.shape[2]] = given_tokens
        toks = taming_sliding_window(model.renderer, settings, gen(), tokens=toks)
        state = canvas_from_tokens(model, toks)
    else:
        canvas = model.canvas_from_image(given)
        canvas.tokens[:, 0] = given_tokens
        state = model.generate(canvas, model.plan_extension(canvas, right=cols - given_cols), settings,
                               generator=gen(), extent=(0, 0, 0) if kind == "no_context" else None)
    state.given, state.given_origin = given, (0, 0)
    out["outpaint"] = model.decode(state, tile=tile)
    seconds["outpaint"] = round(time.perf_counter() - start, 2)
    out["seconds"] = seconds
    out["held_out_crop"] = [given_cols * pwp, 0, (cols - given_cols) * pwp, h]  # x, y, w, h
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m nuwa_core.evaluation.baselines", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="a NUWA-Infinity bundle (.safetensors)")
    p.add_argument("--image", type=Path, required=True, help="the (training) image: panorama height, held-out crop")
    p.add_argument("--kind", choices=KINDS, default="nuwa")
    p.add_argument("--out", type=Path, required=True, help="output folder for the PNGs and seconds.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top-k", type=int, default=100)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--epsilon", type=float, default=0.0, help="skip tokens less likely than this (0: off)")
    p.add_argument("--width-factor", type=int, default=4)
    p.add_argument("--given-cols", type=int, default=None, help="patch columns given for outpainting (default 3/4)")
    p.add_argument("--tile", type=int, default=None, help="tokens per VQGAN window (default: the model's patch)")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model = NuwaInfinity.load(args.model)
        image = load_image(args.image)
        res = generate_images(model, args.kind, image, SamplerSettings(top_k=args.top_k, temperature=args.temperature,
                                                                         epsilon=args.epsilon),
                              args.seed, args.width_factor, args.given_cols, args.tile)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("reconstruction", "panorama", "outpaint"):
        save_image(res[name], args.out / f"{name}.png")
    info = {"kind": args.kind, "model": str(args.model), "seconds": res["seconds"],
            "held_out_crop": res["held_out_crop"], "out": str(args.out)}
    (args.out / "info.json").write_text(json.dumps(info) + "\n")
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
