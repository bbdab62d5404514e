"""Nearby Context Pool (NUWA-Infinity, section 3.2; render-and-optimize paper, Eq. 2-4).

The pool keeps, for each generated patch, its cache a_n = [p_n; h^1; ...; h^(L-1)]: the input of
every renderer layer for that patch, a tensor [L, B, M, d]. Unbiased hidden states are stored;
the relative position embedding is added when a cache is read, since offsets change as the
canvas is generated.

    Select(p): the caches within the extent of p. The pool only ever holds patches already
               generated, so these are exactly the context patches earlier in the order. On a
               canvas that wraps, the extent reaches across the joint (`periods`).
    Add(a_n):  store the cache of a generated patch, and the local order it was made in (a
               cache depends on it: AR slots, order embeddings), so composed orders can re-encode
               (generation.reencode_pooled).
    Remove():  drop every cache that no future patch can select. What "future" means is given
               by the caller as the last step at which each patch is still needed (see
               `last_needed_steps`), so composed outpainting orders are handled like the four
               basic ones; with one basic order this is the paper's Eq. 4.

The pool's size is bounded by the extent and the canvas' short side, not by the canvas length.
"""
from __future__ import annotations

from typing import Iterable

import torch

from .arbitrary_direction_controller import NO_PERIODS, Coord, Grid, Order, seen_from, within_extent, wrapped

NEEDED_FOREVER = float("inf")


class NearbyContextPool:
    def __init__(self, extent: Grid):
        self.extent = tuple(extent)
        self.caches: dict[Coord, torch.Tensor] = {}
        self.orders: dict[Coord, Order | None] = {}  # None: not known (a canvas saved before orders were)
        # the canvas' size along the axes that wrap, 0 along the others (adc.periods; set by generate)
        self.periods: Grid = NO_PERIODS
        self.peak_size = 0

    def select(self, coord: Coord) -> list[tuple[Coord, torch.Tensor]]:
        """NCP.Select: (position, cache) of every cached patch within the extent, in a fixed order.

        On a canvas that wraps (`periods`), a patch across the joint is given where it lies as
        seen from `coord` (the first column seen from the last is column W): its offset is the
        short way round.
        """
        return [(seen_from(coord, c, self.periods), self.caches[c]) for c in sorted(self.caches)
                if c != coord and within_extent(c, coord, self.extent, self.periods)]

    def add(self, coord: Coord, cache: torch.Tensor, order: Order | None) -> None:
        """NCP.Add: cache [L, B, M, d] of the patch at `coord`, made in local order `order`."""
        self.caches[coord] = cache
        self.orders[coord] = order
        self.peak_size = max(self.peak_size, len(self.caches))

    def discard(self, coord: Coord) -> None:
        self.caches.pop(coord, None)
        self.orders.pop(coord, None)

    def remove(self, step: int, last_needed: dict[Coord, float]) -> None:
        """NCP.Remove: evict caches no patch after `step` will select (unknown patches: evicted)."""
        for coord in [c for c in self.caches if last_needed.get(c, -1) <= step]:
            self.discard(coord)

    def shift(self, rows: int, cols: int) -> None:
        """Move every cache when the canvas grows up (rows) or left (cols)."""
        self.caches = {(k, i + rows, j + cols): v for (k, i, j), v in self.caches.items()}
        self.orders = {(k, i + rows, j + cols): v for (k, i, j), v in self.orders.items()}

    def copy(self) -> "NearbyContextPool":
        """A pool holding the same caches (not copied: they are never changed in place)."""
        pool = NearbyContextPool(self.extent)
        pool.caches, pool.orders, pool.periods = dict(self.caches), dict(self.orders), self.periods
        return pool

    def __contains__(self, coord: Coord) -> bool:
        return coord in self.caches

    def __len__(self) -> int:
        return len(self.caches)

    @property
    def size(self) -> int:
        """How many patch caches are held now."""
        return len(self.caches)

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.caches.values())


def last_needed_steps(steps: Iterable[Coord], extent: Grid, keep: Iterable[Coord] = (),
                      first_step: int = 0, periods: Grid = NO_PERIODS) -> dict[Coord, float]:
    """For every patch some planned patch can select: the last step that selects it.

    `steps` are the planned patches in generation order, numbered from `first_step`. A planned
    patch is needed by later planned patches within its extent (across the joint of a canvas
    that wraps: `periods` as the pool's). `keep` lists patches to keep past the plan's end (the
    frontier a continuation in the same direction will need).
    """
    ef, eh, ew = extent
    last: dict[Coord, float] = {}
    for t, (k, i, j) in enumerate(steps, start=first_step):
        for kk in range(k - ef, k + ef + 1):
            for ii in range(i - eh, i + eh + 1):
                for jj in range(j - ew, j + ew + 1):
                    last[wrapped((kk, ii, jj), periods)] = t
    for coord in keep:
        last[coord] = NEEDED_FOREVER
    return last
