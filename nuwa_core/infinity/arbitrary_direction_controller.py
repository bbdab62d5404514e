"""Arbitrary Direction Controller (NUWA-Infinity, section 3.1; appendix C).

ADC.Split turns a canvas of patches into an ordered patch sequence, ADC.Emb gives the
order-aware relative position embeddings.

Coordinates are (k, i, j) = (frame, row, column) on a grid of (F, H, W) patches; an image is a
video of one frame. The four basic orders flatten space two ways and always run frames
forward (frames are the outermost sort):

    DOWN_RIGHT  (omega,  down then right): each column top->bottom, columns left->right. Extends right.
    DOWN_LEFT   (omega*, down then left):  each column top->bottom, columns right->left. Extends left.
    RIGHT_DOWN  (zeta,   right then down): each row left->right, rows top->bottom.      Extends down.
    RIGHT_UP    (zeta*,  right then up):   each row left->right, rows bottom->top.      Extends up.

`time_index` is the paper's T(i, j, k, r) and `coordinate` its inverse T^-1. The same flattening
orders the tokens inside a patch (the local autoregression follows the global direction).

Outpainting composes the basic orders with the appendix's loop circle: one strip to the left,
one below, one to the right, one above, and again, until every requested extension is done.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

Coord = tuple[int, int, int]  # (frame, row, column)
Grid = tuple[int, int, int]  # (frames, rows, columns)


class Order(str, enum.Enum):
    DOWN_RIGHT = "down_right"
    DOWN_LEFT = "down_left"
    RIGHT_DOWN = "right_down"
    RIGHT_UP = "right_up"

    @property
    def id(self) -> int:
        return ORDERS.index(self)


ORDERS = tuple(Order)
# the basic order that grows a canvas in each direction
ORDER_FOR_DIRECTION = {"left": Order.DOWN_LEFT, "right": Order.DOWN_RIGHT,
                       "down": Order.RIGHT_DOWN, "up": Order.RIGHT_UP}
LOOP_CIRCLE = ("left", "down", "right", "up")  # appendix C's default circle


def time_index(coord: Coord, order: Order, grid: Grid) -> int:
    """T: coordinate -> position in the generation sequence of `order` over `grid`."""
    k, i, j = coord
    _, h, w = grid
    if order is Order.DOWN_RIGHT:
        n = j * h + i
    elif order is Order.DOWN_LEFT:
        n = (w - 1 - j) * h + i
    elif order is Order.RIGHT_DOWN:
        n = i * w + j
    else:  # RIGHT_UP
        n = (h - 1 - i) * w + j
    return k * h * w + n


def coordinate(n: int, order: Order, grid: Grid) -> Coord:
    """T^-1: position in the generation sequence -> coordinate."""
    _, h, w = grid
    k, n = divmod(n, h * w)
    if order is Order.DOWN_RIGHT:
        j, i = divmod(n, h)
    elif order is Order.DOWN_LEFT:
        j, i = divmod(n, h)
        j = w - 1 - j
    elif order is Order.RIGHT_DOWN:
        i, j = divmod(n, w)
    else:
        i, j = divmod(n, w)
        i = h - 1 - i
    return k, i, j


def split(grid: Grid, order: Order) -> list[Coord]:
    """ADC.Split for training and unconditional canvases: every patch of `grid`, in `order`."""
    f, h, w = grid
    return [coordinate(n, order, grid) for n in range(f * h * w)]


def local_permutation(patch: Grid, order: Order) -> torch.Tensor:
    """Raster indices (k*h*w + i*w + j) of a patch's tokens in the order they are generated. [M]"""
    f, h, w = patch
    return torch.tensor([k * h * w + i * w + j for k, i, j in split(patch, order)], dtype=torch.long)


def default_order(grid: Grid) -> Order:
    """Grow along the long side so the context pool stays a few columns (or rows) wide."""
    _, h, w = grid
    return Order.DOWN_RIGHT if w >= h else Order.RIGHT_DOWN


@dataclass
class Segment:
    """A run of patches generated in one basic order."""
    order: Order
    patches: list[Coord]


@dataclass
class Plan:
    """What to generate: the canvas grid after growth, where the old canvas lands, and the segments.

    `offset` = (rows added above, columns added left): old (k, i, j) becomes (k, i + top, j + left).
    `precache_order` orders the given patches fed through the renderer before generation.
    """
    grid: Grid
    offset: tuple[int, int] = (0, 0)
    segments: list[Segment] = field(default_factory=list)
    precache_order: Order = Order.DOWN_RIGHT

    def steps(self) -> list[tuple[Order, Coord]]:
        return [(s.order, c) for s in self.segments for c in s.patches]

    def __len__(self) -> int:
        return sum(len(s.patches) for s in self.segments)


def _block(frames: int, rows: range, cols: range, order: Order) -> list[Coord]:
    sub = split((frames, len(rows), len(cols)), order)
    return [(k, rows.start + i, cols.start + j) for k, i, j in sub]


def check_counts(**counts: int) -> None:
    for name, value in counts.items():
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a whole number of patches >= 0, got {value!r}")


def plan_outpaint(grid: Grid, left: int = 0, right: int = 0, up: int = 0, down: int = 0,
                  step: int = 1) -> Plan:
    """Extend a fully known canvas of `grid` patches by whole patches in any mix of directions.

    Strips of `step` patches are added around the growing rectangle in the loop circle
    left, down, right, up (appendix C), each in the basic order of its direction, so every new
    patch sees as much already generated context as possible.
    """
    check_counts(left=left, right=right, up=up, down=down)
    if step < 1:
        raise ValueError(f"step must be >= 1 patch, got {step}")
    f, h, w = grid
    if min(grid) < 1:
        raise ValueError(f"the canvas to extend must have at least one patch, got grid {grid}")
    requested = {"left": left, "right": right, "up": up, "down": down}
    remaining = dict(requested)
    rows, cols = range(up, up + h), range(left, left + w)  # known rectangle in the new canvas
    segments: list[Segment] = []
    while any(remaining.values()):
        for direction in LOOP_CIRCLE:
            n = min(step, remaining[direction])
            if n == 0:
                continue
            remaining[direction] -= n
            order = ORDER_FOR_DIRECTION[direction]
            if direction == "left":
                strip = _block(f, rows, range(cols.start - n, cols.start), order)
                cols = range(cols.start - n, cols.stop)
            elif direction == "right":
                strip = _block(f, rows, range(cols.stop, cols.stop + n), order)
                cols = range(cols.start, cols.stop + n)
            elif direction == "down":
                strip = _block(f, range(rows.stop, rows.stop + n), cols, order)
                rows = range(rows.start, rows.stop + n)
            else:
                strip = _block(f, range(rows.start - n, rows.start), cols, order)
                rows = range(rows.start - n, rows.stop)
            segments.append(Segment(order, strip))
    first = next((d for d in LOOP_CIRCLE if requested[d]), "right")
    return Plan(grid=(f, h + up + down, w + left + right), offset=(up, left), segments=segments,
                precache_order=ORDER_FOR_DIRECTION[first])


def plan_fill(known: torch.Tensor, order: Order | None = None) -> Plan:
    """Generate every unknown patch of a canvas. known: bool [F, H, W].

    Nothing known: the whole canvas in one basic order (along its long side by default).
    A known rectangle inside each frame: outpainting around it (loop circle).
    Anything else (a mask, later frames of a video): unknown patches in `order`.
    """
    grid = tuple(known.shape)
    order = order or default_order(grid)
    if not known.any():
        return Plan(grid=grid, segments=[Segment(order, split(grid, order))], precache_order=order)
    frames_known = known.any(dim=(1, 2))
    if frames_known.all():
        rows = torch.nonzero(known.any(dim=(0, 2))).flatten()
        cols = torch.nonzero(known.any(dim=(0, 1))).flatten()
        r0, r1, c0, c1 = rows.min().item(), rows.max().item() + 1, cols.min().item(), cols.max().item() + 1
        if known[:, r0:r1, c0:c1].all() and known.sum() == grid[0] * (r1 - r0) * (c1 - c0):
            inner = plan_outpaint((grid[0], r1 - r0, c1 - c0), left=c0, right=grid[2] - c1,
                                  up=r0, down=grid[1] - r1)
            return Plan(grid=grid, segments=inner.segments, precache_order=inner.precache_order)
    todo = [c for c in split(grid, order) if not known[c]]
    return Plan(grid=grid, segments=[Segment(order, todo)], precache_order=order)


class RelativePositionEmbedding(nn.Module):
    """ADC.Emb: one learned vector per patch offset inside the extent, per layer.

    A table of (2e_f+1)(2e_h+1)(2e_w+1) entries. Pre-RPE (the paper's choice) adds a d_model
    vector to the keys of each context patch (and of the current patch, offset 0); post-RPE
    (the ablation) adds one scalar per head to the attention logits instead.
    """

    def __init__(self, extent: Grid, n_layer: int, d_model: int, n_head: int, mode: str = "pre"):
        super().__init__()
        if mode not in ("pre", "post"):
            raise ValueError(f"rpe mode must be 'pre' or 'post', got {mode!r}")
        self.extent, self.mode = tuple(extent), mode
        n_offsets = math.prod(2 * e + 1 for e in self.extent)
        width = d_model if mode == "pre" else n_head
        self.table = nn.Parameter(torch.randn(n_layer, n_offsets, width) * 0.02)

    def index(self, offset: Coord) -> int:
        """Table row of a patch at `offset` = (dk, di, dj) from the current patch."""
        ef, eh, ew = self.extent
        dk, di, dj = offset
        if abs(dk) > ef or abs(di) > eh or abs(dj) > ew:
            raise ValueError(f"offset {offset} lies outside the extent {self.extent}")
        return ((dk + ef) * (2 * eh + 1) + (di + eh)) * (2 * ew + 1) + (dj + ew)

    def forward(self, layer: int, indices: torch.Tensor) -> torch.Tensor:
        """indices [N] -> [N, d_model] (pre) or [N, n_head] (post)."""
        return self.table[layer, indices]


# Tileable canvases: which edges meet. "x": the last column's right neighbour is the first column
# (a 360-degree panorama); "xy": the last row's lower neighbour is the first row too (a torus).
WRAPS = ("none", "x", "xy")
NO_PERIODS = (0, 0, 0)


def check_wrap(wrap: str) -> str:
    if wrap not in WRAPS:
        raise ValueError(f"wrap must be one of {WRAPS} (none, columns wrap, rows and columns wrap), got {wrap!r}")
    return wrap


def periods(grid: Grid, wrap: str) -> Grid:
    """(frames, rows, columns) sizes of the grid along the axes that wrap, 0 along the others."""
    check_wrap(wrap)
    _, h, w = grid
    return 0, h if wrap == "xy" else 0, w if wrap != "none" else 0


def offset(a: Coord, b: Coord, periods: Grid = NO_PERIODS) -> Coord:
    """a - b, the short way round every axis with a period (a tie goes the direct way)."""
    return tuple(min((x - y, x - y - p, x - y + p), key=abs) if p else x - y for x, y, p in zip(a, b, periods))


def seen_from(coord: Coord, other: Coord, periods: Grid = NO_PERIODS) -> Coord:
    """Where `other` lies as seen from `coord`: continued past a wrapped edge (column -1 is column W-1)."""
    return tuple(c + d for c, d in zip(coord, offset(other, coord, periods)))


def wrapped(coord: Coord, periods: Grid = NO_PERIODS) -> Coord:
    """A coordinate past a wrapped edge brought back onto the grid."""
    return tuple(x % p if p else x for x, p in zip(coord, periods))


def within_extent(a: Coord, b: Coord, extent: Grid, periods: Grid = NO_PERIODS) -> bool:
    return all(abs(d) <= e for d, e in zip(offset(a, b, periods), extent))


def neighbours(coord: Coord, extent: Grid, grid: Grid, periods: Grid = NO_PERIODS) -> list[Coord]:
    """Every other patch of `grid` within `extent` of `coord` (across the wrapped edges too)."""
    spans = [sorted({(c + d) % n for d in range(-e, e + 1)}) if p else range(max(0, c - e), min(n, c + e + 1))
             for c, e, n, p in zip(coord, extent, grid, periods)]
    return [(kk, ii, jj) for kk in spans[0] for ii in spans[1] for jj in spans[2] if (kk, ii, jj) != coord]
