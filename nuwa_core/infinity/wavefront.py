"""The wavefront schedule of Algorithm 2, and per-patch random streams.

Patch p selects only patches within its extent that come before it in the plan's order
(NCP.Select over what has been made). Patches whose selected context is complete can therefore be
rendered together, in one batch: each patch's wave is one more than the latest wave of the earlier
patches within its extent, so every patch sees exactly the context it has in the sequential order,
and no patch of its wave (none lies within its extent). The plan, and what each patch selects,
stay the paper's; only how many renderer calls they take changes. Down-right on an h x w grid with
extent (1, 1) gives the anti-diagonals t = 2j + i: h + 2(w - 1) waves instead of h*w patches; a
canvas two patches high has none (each patch needs the one above-left or beside it).

Each patch draws its randomness from its own stream, seeded from the run's seed and the patch's
coordinate (`patch_seed`), so the canvas a seed gives does not depend on the schedule, on which
patches share a batch, or on whether the canvas was grown in one call or several.
"""
from __future__ import annotations

import hashlib

from . import arbitrary_direction_controller as adc
from .arbitrary_direction_controller import Coord, Grid

SCHEDULES = ("wavefront", "sequential")
MAX_WAVE = 32  # patches one step renders together at most (memory: NuwaInfinity.estimate_bytes)


def sequential(coords: list[Coord], extent: Grid, grid: Grid, periods: Grid = adc.NO_PERIODS,
               max_size: int | None = None) -> list[list[Coord]]:
    """One patch per step, in the plan's order (the reference schedule)."""
    return [[c] for c in coords]


def wavefronts(coords: list[Coord], extent: Grid, grid: Grid, periods: Grid = adc.NO_PERIODS,
               max_size: int | None = None) -> list[list[Coord]]:
    """`coords` (in generation order) grouped into waves whose patches only select patches of
    earlier waves (or patches made before: not in `coords`). Within a wave the plan's order is
    kept; a wave larger than `max_size` is cut into consecutive batches (its patches are
    independent, so any cut gives the same canvas)."""
    position = {c: n for n, c in enumerate(coords)}
    level: dict[Coord, int] = {}
    for n, coord in enumerate(coords):
        earlier = [level[c] for c in adc.neighbours(coord, extent, grid, periods) if position.get(c, n) < n]
        level[coord] = 1 + max(earlier, default=-1)
    waves: list[list[Coord]] = [[] for _ in range(1 + max(level.values(), default=-1))]
    for coord in coords:
        waves[level[coord]].append(coord)
    if not max_size:
        return waves
    return [wave[s:s + max_size] for wave in waves for s in range(0, len(wave), max_size)]


def schedule(name: str):
    """'wavefront' or 'sequential' -> fn(coords, extent, grid, periods, max_size) -> waves."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}")
    return wavefronts if name == "wavefront" else sequential


def plan_waves(plan: adc.Plan, wrap: str, extent: Grid, name: str = "wavefront",
               max_size: int | None = None) -> list[tuple[adc.Order, list[list[Coord]]]]:
    """(order, waves) of every segment of `plan` on a canvas that wraps as `wrap`. Segments stay
    apart: a segment starts once the one before it is done (it may re-encode that one's caches)."""
    run, periods = schedule(name), adc.periods(plan.grid, wrap)
    return [(segment.order, run(segment.patches, extent, plan.grid, periods, max_size)) for segment in plan.segments]


def patches_per_wave(max_wave: int, candidates: int = 1) -> int:
    """Patches one step renders together so that its rows (each patch's `candidates` draws side by
    side) stay within `max_wave`; at least one."""
    return max(1, max_wave // candidates)


def widest(waves: list[tuple[adc.Order, list[list[Coord]]]]) -> int:
    """The most patches one step renders together (1 for an empty plan)."""
    return max((len(wave) for _, segment in waves for wave in segment), default=1)


def patch_seed(seed: int, coord: Coord) -> int:
    """The seed of a patch's own random stream: a hash of the run's seed and its coordinate, so
    neighbouring patches get unrelated streams (a sum or an offset would correlate them)."""
    digest = hashlib.blake2b(f"{int(seed)}:{':'.join(str(int(c)) for c in coord)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2 ** 63 - 1)
