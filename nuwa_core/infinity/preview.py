"""Incremental decoding for live previews: re-decode only the VQGAN windows whose tokens changed.

A preview decodes the canvas after every few patches, but a patch only changes the windows of
VQModel.decode_tokens_tiled that contain one of its tokens (with the shipped 8x8-token patches and
a 2-token overlap, at most 3x3 windows of a canvas of any size). IncrementalDecoder keeps every
window's weighted piece of the last decode, re-decodes the windows with a changed token and sums
the pieces again, in the same order as a full decode: the image equals a full decode up to float
rounding (the windows are batched differently), with no drift however many calls it makes.
"""
from __future__ import annotations

import torch

from ..images import model_to_image
from .canvas import UNKNOWN, CanvasState
from .vqgan import VQModel, _add_at, _blend_weights, _decode_groups, _scale, _weigh, window_batch

# Past this many bytes of kept pieces (~2.25x the image with a tile // 4 overlap) a decoder keeps
# nothing and decodes in full every time, as a plain decode would.
MAX_KEPT_BYTES = 512 * 2 ** 20


class IncrementalDecoder:
    """decode_tokens_tiled(tokens, tile, overlap, wrap) that re-decodes only the windows whose
    tokens changed since its last call. A call with another shape, device, dtype or plan starts over.
    `decoded` is the number of windows the last call decoded, `windows` the plan's total."""

    def __init__(self, vqgan: VQModel, tile: int = 16, overlap: int | None = None,
                 wrap: tuple[bool, bool] = (False, False), max_windows: int | None = None,
                 max_kept_bytes: int = MAX_KEPT_BYTES):
        self.vqgan, self.tile = vqgan, tile
        self.overlap = tile // 4 if overlap is None else overlap
        self.wrap, self.max_windows, self.max_kept_bytes = tuple(wrap), max_windows, max_kept_bytes
        self.decoded = self.windows = 0
        self.reset()

    def reset(self) -> None:
        """Forget the last decode (the next call decodes every window)."""
        self._key = self._tokens = None
        self._plan, self._pieces = [], {}

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, h, w] ids -> [B, 3, h*f, w*f] in -1..1 (not clamped), as decode_tokens_tiled."""
        if tokens.ndim != 3:
            raise ValueError(f"expected tokens [B, h, w], got shape {tuple(tokens.shape)}")
        vq, f = self.vqgan, self.vqgan.downsample_factor
        B, h, w = tokens.shape
        key = (tuple(tokens.shape), tokens.device, vq._dtype(), self.tile, self.overlap, self.wrap)
        if key != self._key:
            self.reset()
            rows = _blend_weights(h, self.tile, self.overlap, f, self.wrap[0])
            cols = _blend_weights(w, self.tile, self.overlap, f, self.wrap[1])
            self._plan = [(ys, wy, xs, wx) for ys, wy in rows for xs, wx in cols]
            self._key = key
            changed = range(len(self._plan))
        else:
            diff = (tokens != self._tokens).any(0)  # [h, w]
            changed = [k for k, (ys, _, xs, _) in enumerate(self._plan) if diff[ys][:, xs].any()] \
                if diff.any() else []
        max_windows = self.max_windows or window_batch(vq.config, self.tile, B, tokens.device, vq._dtype())
        windows = {(id(ys), id(xs)): k for k, (ys, _, xs, _) in enumerate(self._plan)}
        for group, pieces in _decode_groups([self._plan[k][0::2] for k in changed],
                                            lambda ys, xs: tokens[:, ys][:, :, xs], vq.decode_tokens, max_windows):
            for (ys, xs), piece in zip(group, pieces):
                k = windows[id(ys), id(xs)]
                self._pieces[k] = _weigh(piece, self._plan[k][1], self._plan[k][3])
        self.decoded, self.windows = len(changed), len(self._plan)
        out = None
        for k, (ys, _, xs, _) in enumerate(self._plan):  # the order of blend_windows
            piece = self._pieces[k]
            if out is None:
                out = piece.new_zeros(B, piece.shape[1], h * f, w * f)
            _add_at(out, piece, _scale(ys, f), _scale(xs, f))
        kept = sum(p.numel() * p.element_size() for p in self._pieces.values())
        if kept > self.max_kept_bytes:
            self.reset()
        else:
            self._tokens = tokens.clone()
        return out


class PreviewDecoder:
    """The live preview of a canvas: batch row 0, frame 0, as NuwaInfinity.decode shows it (unknown
    patches grey, the given pixels composited back with the canvas' feather), re-decoding only the
    windows that changed since the last call. One per run (or per model: it compares tokens, so a
    decoder given an unrelated canvas only decodes more)."""

    def __init__(self, model, max_windows: int | None = None):
        self.model = model
        self.decoder = IncrementalDecoder(model.vqgan, model.vqgan_tile, max_windows=max_windows)

    @torch.no_grad()
    def __call__(self, state: CanvasState) -> torch.Tensor:
        """-> IMAGE [H, W, 3] 0..1 on the CPU (float32)."""
        from .generation import given_weight  # generation imports this module's neighbours

        model, inc = self.model, self.decoder
        f_px = model.vqgan.downsample_factor
        wrap = tuple(p > 0 for p in state.periods[1:])
        if wrap != inc.wrap or model.vqgan_tile != inc.tile:
            inc.wrap, inc.tile, inc.overlap = wrap, model.vqgan_tile, model.vqgan_tile // 4
        tokens = state.tokens[0, 0]  # [h, w]
        x = inc(tokens.clamp(min=0)[None].to(model.device))
        image = model_to_image(x.float().cpu())[0]  # [H, W, 3]
        unknown = (tokens == UNKNOWN).cpu().repeat_interleave(f_px, 0).repeat_interleave(f_px, 1)
        image[unknown] = 0.5
        if state.given is not None:
            top, left = state.given_origin
            gh, gw = state.given.shape[1:3]
            feather = 2 * f_px if state.feather is None else state.feather
            weight = given_weight((gh, gw), (top, left), tuple(image.shape[:2]), feather,
                                  regenerate=state.given_mask, wrap=wrap)[:, :, None]
            region = image[top:top + gh, left:left + gw]
            region.copy_(torch.lerp(region, state.given[0].to(image.dtype), weight))
        return image
