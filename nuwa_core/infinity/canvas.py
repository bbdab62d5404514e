"""The canvas: a token grid on a patch grid (frames, rows, columns), which patches are known, the
Nearby Context Pool of its cached patches, and the given pixels.

It is what Algorithm 2 (generation.py) reads and returns, and what can be saved and continued later.
A canvas can wrap (`wrap`, adc.WRAPS): its edges meet, so generation selects context and decoding
sees tokens across the joint, and the decoded image tiles with no seam. Set it with
`NuwaInfinity.blank_canvas(..., wrap=)` or `dataclasses.replace(state, wrap="x")`.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import torch
from safetensors.torch import save_file

from ..checkpoint import CheckpointError, atomic_write, load_state_dict
from . import arbitrary_direction_controller as adc
from .arbitrary_direction_controller import Coord, Grid, Order, Plan
from .nearby_context_pool import NearbyContextPool

CANVAS_KIND = "nuwa_canvas"
UNKNOWN = -1  # token id of a patch not generated yet


@dataclass
class CanvasState:
    tokens: torch.Tensor            # [B, F, h, w] token ids, UNKNOWN where not generated
    known: torch.Tensor             # [F, H, W] bool, per patch
    patch_size: tuple               # (pf, ph, pw) tokens per patch
    pool: NearbyContextPool | None = None
    given: torch.Tensor | None = None   # IMAGE [B, Hpx, Wpx, 3] kept as is on frame 0
    given_origin: tuple = (0, 0)        # (row px, column px) of `given` on the canvas
    pixels_per_token: int = 16          # the VQGAN's downsampling factor
    given_mask: torch.Tensor | None = None  # [Hpx, Wpx] over `given`, 1 = regenerated (not shown), None = all 0
    feather: int | None = None          # px the given pixels fade over at their edge; None = two tokens
    source_size: tuple | None = None    # (H, W) px of the image the canvas was encoded from
    source_box: tuple | None = None     # (top, left, height, width) of that image that became `given`
    wrap: str = "none"                  # "none", "x" (columns wrap: a 360-degree panorama), "xy" (a torus)
    origin: tuple = (0, 0)              # (rows, cols) of patches added above / left since the canvas was made

    def __post_init__(self):
        adc.check_wrap(self.wrap)

    @property
    def grid(self) -> Grid:
        return tuple(self.known.shape)

    @property
    def periods(self) -> Grid:
        """The grid's size along the axes that wrap, 0 along the others (adc.periods)."""
        return adc.periods(self.grid, self.wrap)

    def check_growth(self, rows: int, cols: int) -> None:
        """Refuse adding rows / columns along an axis that wraps: it has no edge to grow from."""
        _, wrap_rows, wrap_cols = self.periods
        for added, wraps, sides, how in ((cols, wrap_cols, "left/right", "horizontally"),
                                         (rows, wrap_rows, "top/bottom", "vertically")):
            if added and wraps:
                raise ValueError(f"the canvas wraps {how} (wrap={self.wrap!r}): it has no {sides} edge to extend "
                                 f"from; fill or regenerate its patches instead, or make it wrap='none' to grow it")

    def stream_coord(self, coord: Coord) -> Coord:
        """Where a patch lies relative to the canvas as first made: what seeds its random stream
        (wavefront.patch_seed), unchanged when the canvas later grows up or left."""
        k, i, j = coord
        return k, i - self.origin[0], j - self.origin[1]

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    def patch_slices(self, coord: Coord):
        (pf, ph, pw), (k, i, j) = self.patch_size, coord
        return (slice(None), slice(k * pf, (k + 1) * pf), slice(i * ph, (i + 1) * ph), slice(j * pw, (j + 1) * pw))

    def patch_tokens(self, coord: Coord) -> torch.Tensor:
        """[B, M] raster tokens of one patch."""
        return self.tokens[self.patch_slices(coord)].flatten(1)

    def set_patch(self, coord: Coord, tokens: torch.Tensor) -> None:
        view = self.tokens[self.patch_slices(coord)]
        view.copy_(tokens.view(view.shape).to(view.device))
        self.known[coord] = True

    def clone(self) -> "CanvasState":
        pool = None if self.pool is None else self.pool.copy()
        return dataclasses.replace(self, tokens=self.tokens.clone(), known=self.known.clone(), pool=pool)

    def grown(self, plan: Plan) -> "CanvasState":
        """A copy on the plan's grid: the old canvas moved by plan.offset, new frames appended."""
        state = self.clone()
        (f0, h0, w0), (f1, h1, w1), (top, left) = self.grid, plan.grid, plan.offset
        if f1 < f0 or h1 < h0 + top or w1 < w0 + left:
            raise ValueError(f"plan grid {plan.grid} with offset {plan.offset} does not contain the canvas {self.grid}")
        self.check_growth(h1 - h0, w1 - w0)
        if (f1, h1, w1) == (f0, h0, w0):
            return state
        pf, ph, pw = self.patch_size
        tokens = self.tokens.new_full((self.batch, f1 * pf, h1 * ph, w1 * pw), UNKNOWN)
        tokens[:, :f0 * pf, top * ph:(top + h0) * ph, left * pw:(left + w0) * pw] = self.tokens
        known = torch.zeros(plan.grid, dtype=torch.bool)
        known[:f0, top:top + h0, left:left + w0] = self.known
        state.tokens, state.known = tokens, known
        if state.pool is not None:
            state.pool.shift(top, left)
        px = self.pixels_per_token
        state.given_origin = (self.given_origin[0] + top * ph * px, self.given_origin[1] + left * pw * px)
        state.origin = (self.origin[0] + top, self.origin[1] + left)
        return state

    def forget(self, cells, pixel_mask: torch.Tensor | None = None) -> "CanvasState":
        """A copy with the patches where `cells` (bool [F, rows, cols], the patch grid) is True
        made unknown again, so a plan_fill + generate regenerates exactly those (mask inpainting).

        Dropped, because it describes the old content: the tokens of those patches; the pool's
        caches of those patches and of every cached patch within the pool's extent of one (their
        hidden states attended to the old tokens; generate() re-caches them from their tokens).
        The given pixels are kept: `given_mask` marks which of them the new content replaces at
        decode, `pixel_mask` ([Hpx, Wpx] of frame 0 on the canvas, 1 = regenerate, soft values
        blend) when given, else the whole area of the forgotten frame-0 patches. Outside it, the
        decoded canvas shows the given pixels as they are.
        """
        cells = torch.as_tensor(cells).to(device="cpu")
        if tuple(cells.shape) != tuple(self.grid):
            raise ValueError(f"forget: the mask must be the canvas' patch grid (frames, rows, cols) = "
                             f"{tuple(self.grid)}, got shape {tuple(cells.shape)}")
        cells = cells.bool()
        state = self.clone()
        coords = [tuple(c) for c in torch.nonzero(cells).tolist()]
        if not coords:
            return state
        for coord in coords:
            state.tokens[state.patch_slices(coord)] = UNKNOWN
        state.known = state.known & ~cells
        if state.pool is not None:
            periods = self.periods
            stale = [c for c in state.pool.caches
                     if any(adc.within_extent(c, f, state.pool.extent, periods) for f in coords)]
            for c in stale:
                state.pool.discard(c)
        if state.given is not None:
            state.given_mask = self._regenerated_given(cells[0], pixel_mask)
        return state

    @property
    def pixel_size(self) -> tuple[int, int]:
        """(H, W) px of one frame of the decoded canvas."""
        return self.tokens.shape[2] * self.pixels_per_token, self.tokens.shape[3] * self.pixels_per_token

    def _regenerated_given(self, cells: torch.Tensor, pixel_mask: torch.Tensor | None) -> torch.Tensor:
        """given_mask after also regenerating `pixel_mask` (canvas px) or the frame-0 patches `cells`."""
        top, left = self.given_origin
        gh, gw = self.given.shape[1:3]
        if pixel_mask is None:
            (_, ph, pw), px = self.patch_size, self.pixels_per_token
            pixel_mask = cells.float().repeat_interleave(ph * px, 0).repeat_interleave(pw * px, 1)
        elif tuple(pixel_mask.shape) != self.pixel_size:
            raise ValueError(f"forget: pixel_mask must cover the canvas, {self.pixel_size} px (height, width), "
                             f"got shape {tuple(pixel_mask.shape)}")
        new = pixel_mask[top:top + gh, left:left + gw].detach().float().cpu().clamp(0, 1)
        return new if self.given_mask is None else torch.maximum(self.given_mask, new)

    # ---- persistence -------------------------------------------------------------------------
    def save(self, path) -> None:
        """One .safetensors file: tokens, known patches, given pixels and the pool's caches (with
        the order each was made in)."""
        tensors = {"tokens": self.tokens.cpu().contiguous(), "known": self.known.to(torch.uint8).contiguous()}
        if self.given is not None:
            tensors["given"] = self.given.cpu().contiguous()
        if self.given_mask is not None:
            tensors["given_mask"] = self.given_mask.cpu().contiguous()
        extent, orders = None, {}
        if self.pool is not None:
            extent = list(self.pool.extent)
            for (k, i, j), cache in self.pool.caches.items():
                tensors[f"pool.{k}.{i}.{j}"] = cache.cpu().contiguous()
                order = self.pool.orders.get((k, i, j))
                orders[f"{k}.{i}.{j}"] = None if order is None else order.value
        meta = {"nuwa_kind": CANVAS_KIND, "patch_size": json.dumps(list(self.patch_size)),
                "given_origin": json.dumps(list(self.given_origin)), "pool_extent": json.dumps(extent),
                "pool_orders": json.dumps(orders), "pixels_per_token": str(self.pixels_per_token),
                "feather": json.dumps(self.feather), "source_size": json.dumps(self.source_size),
                "source_box": json.dumps(self.source_box), "wrap": self.wrap, "origin": json.dumps(list(self.origin))}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path) -> "CanvasState":
        tensors, meta = load_state_dict(path)
        if meta.get("nuwa_kind") != CANVAS_KIND:
            raise CheckpointError(f"{path} is not a NUWA canvas (kind {meta.get('nuwa_kind')!r}, expected {CANVAS_KIND!r})")
        extent = json.loads(meta["pool_extent"])
        orders = json.loads(meta.get("pool_orders", "{}"))  # absent in older canvases: unknown
        pool = None
        if extent is not None:
            pool = NearbyContextPool(tuple(extent))
            for name, value in tensors.items():
                if name.startswith("pool."):
                    order = orders.get(name[len("pool."):])
                    pool.add(tuple(int(x) for x in name.split(".")[1:]), value, None if order is None else Order(order))
        optional = {name: json.loads(meta.get(name, "null")) for name in ("feather", "source_size", "source_box")}
        return cls(tokens=tensors["tokens"], known=tensors["known"].bool(),
                   patch_size=tuple(json.loads(meta["patch_size"])), pool=pool, given=tensors.get("given"),
                   given_origin=tuple(json.loads(meta["given_origin"])), pixels_per_token=int(meta["pixels_per_token"]),
                   given_mask=tensors.get("given_mask"), feather=optional["feather"],
                   source_size=_tuple_or_none(optional["source_size"]), source_box=_tuple_or_none(optional["source_box"]),
                   wrap=meta.get("wrap", "none"),  # canvases saved before wrapping existed do not wrap
                   origin=tuple(json.loads(meta.get("origin", "[0, 0]"))))


def _tuple_or_none(value):
    return None if value is None else tuple(value)
