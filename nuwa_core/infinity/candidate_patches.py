"""Best of N candidate patches: keep the draw that best explains the patches around it, agrees
with the other draws and meets its known neighbours' edges.

Not in the papers (issue 11: generated patches must continue their context). A renderer samples
each patch given its context, one token at a time; nothing checks the finished patch against that
context as a whole, and the tokens drawn late in a patch can drift from it. With
`SamplerSettings.candidates` N > 1, every patch is drawn N times (each from its own random stream)
and each candidate gets three scores:

- neighbours: how likely the same renderer finds the known neighbours when it renders them the
  other way round, with the candidate as their context,

      neighbours(c) = sum over q in context(p) that come after p in reverse(order) of
                      log p_renderer(tokens of q | c at p; reverse(order))

  i.e. the candidate that best predicts its context, not the one the model finds most likely itself
  (that draw tends to be the most ordinary one, as a low temperature gives; measured worse);
- agreement: minus its squared distance, token by token in the tokenizer's codebook space, to the
  other candidates. The draw nearest the others is the minimum-Bayes-risk pick under that distance:
  the model's own sample that lies closest to what the model expects there on average;
- border: minus the squared codebook distance between its edge tokens and the facing edge tokens of
  each known patch that shares an edge with it (same frame): the hard-cut seam, in the codebook's
  space (neither score above looks at the edge itself).

The candidate kept is the one that beats the most others on the three scores together (ranks
added; ties keep the earlier candidate, so candidate 0, the patch's own draw, wins a full tie). The
reverse order (DOWN_RIGHT <-> DOWN_LEFT, RIGHT_DOWN <-> RIGHT_UP) is one the renderer was trained
in, and in it the context patches come after the candidate at offsets that order trains (frames stay
forward, so the patches of earlier frames are not scored: in a video, a candidate answers to its own
frame's neighbours). A patch with no known neighbour (a blank canvas's first) is chosen by agreement
alone. One teacher-forced pass encodes the N candidates (no context: as a first patch is), one more
scores every (candidate, neighbour) pair: two renderer forwards next to the N token-by-token draws;
agreement and border are codebook lookups, an N x N distance and a sum over the shared edges. NAR
and P-NAR renderers score each neighbour token from an all-masked patch (their one-pass
likelihood). Measured on the held-out boxes in README (Evaluation).
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import arbitrary_direction_controller as adc
from .arbitrary_direction_controller import Coord, Order
from .renderer import Context, patch_row_split
from .wavefront import patch_seed

REVERSE = {Order.DOWN_RIGHT: Order.DOWN_LEFT, Order.DOWN_LEFT: Order.DOWN_RIGHT,
           Order.RIGHT_DOWN: Order.RIGHT_UP, Order.RIGHT_UP: Order.RIGHT_DOWN}
# a known patch one step away in the same frame -> (the candidate's edge, the known patch's facing edge,
# the token axis they run across in [B, frames, rows, columns, d]: 2 rows, 3 columns)
EDGES = {(0, 0, 1): (-1, 0, 3), (0, 0, -1): (0, -1, 3), (0, 1, 0): (-1, 0, 2), (0, -1, 0): (0, -1, 2)}
_UNBOUNDED = (1, 1 << 24, 1 << 24)  # time_index over a grid this large orders any two offsets lexicographically


def comes_after(a: Coord, b: Coord, order: Order) -> bool:
    """Whether the patch at `a` comes after the one at `b` in `order` (coordinates as seen from each
    other: a wrapped canvas's patch across the joint may lie outside the grid)."""
    return adc.time_index(a, order, _UNBOUNDED) > adc.time_index(b, order, _UNBOUNDED)


def candidate_streams(seed: int, stream_coord: Coord, n: int) -> list[torch.Generator]:
    """The random streams of a patch's n candidates; the first is the patch's own stream, so one
    candidate draws exactly what sampling without candidates draws."""
    return [torch.Generator().manual_seed(patch_seed(seed, stream_coord if k == 0 else (*stream_coord, k)))
            for k in range(n)]


@torch.no_grad()
def neighbour_loglik(rows, coords: list[Coord], tokens: torch.Tensor, order: Order, select,
                     patch_tokens: Callable[[Coord], torch.Tensor]) -> torch.Tensor:
    """The score above for each candidate. rows: generation.PatchBatch; coords [n] the candidates'
    places (a patch's N candidates in a row); tokens [halves*n*B, M] raster, their tokens
    (renderer.patch_rows layout); select(coord) -> the (place, cache) pairs of its context;
    patch_tokens(coord) -> [halves*B, M] known tokens. Returns [n, B] (0 for a patch with no
    neighbour after it in the reverse order)."""
    renderer, n, halves = rows.renderer, len(coords), rows.halves
    b = tokens.shape[0] // (halves * n)
    reverse = REVERSE[order]
    owned = [(i, near) for i, coord in enumerate(coords) for near, _ in select(coord)
             if comes_after(near, coord, reverse)]  # (candidate, a neighbour it is scored on)
    score = tokens.new_zeros(n, b, dtype=torch.float32)
    if not owned:
        return score
    caches = rows.split(renderer.encode(tokens, reverse, Context(None, None, 0), rows.text_kv(n)), n, dim=1)
    pairs = [(near, [(coords[i], caches[i])]) for i, near in owned]
    targets = [patch_tokens(near) for _, near in owned]
    owners = [i for i, _ in owned]
    target = rows.rows(targets)  # [halves*R*B, M]
    # AR: log p of each token given the ones before it; NAR / P-NAR: of each token from an all-masked patch
    everything = torch.ones_like(target, dtype=torch.bool)
    logits, _ = renderer.teacher_forced(target, reverse, rows.context(pairs), rows.text_kv(len(pairs)), everything)
    loglik = -F.cross_entropy(logits.float().transpose(1, 2), target, reduction="none").sum(1)
    per_pair = torch.stack([part[:b] for part in patch_row_split(loglik, len(pairs), halves, 0)])  # [R, B] (with text)
    return score.index_add_(0, torch.tensor(owners, device=score.device), per_pair)


def keep_best(parts: list[torch.Tensor], score: torch.Tensor, halves: int, dim: int) -> torch.Tensor:
    """parts: one patch's N candidates, each with halves*B rows along `dim` (tokens [halves*B, M]:
    dim 0; caches [L, halves*B, M, d]: dim 1); score [N, B] -> for each canvas the best candidate's
    rows, in the parts' shape."""
    best = score.argmax(0).repeat(halves).to(parts[0].device)  # both halves of a canvas keep one candidate
    stacked = torch.stack(parts).movedim(dim + 1, 1)  # [N, halves*B, ..]
    return stacked[best, torch.arange(best.numel(), device=best.device)].movedim(0, dim)


def agreement(tokens: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """tokens [n, B, M] one patch's candidates; codebook [V, d] the tokenizer's code vectors ->
    [n, B]: minus each candidate's squared distance to the others, summed over the others and the
    patch's tokens."""
    x = codebook[tokens].flatten(2).float().transpose(0, 1)  # [B, n, M*d]
    return -torch.cdist(x, x).square().sum(-1).T


def border_agreement(tokens: torch.Tensor, coord: Coord, patch_size: tuple, select,
                     patch_tokens: Callable[[Coord], torch.Tensor], codebook: torch.Tensor) -> torch.Tensor:
    """tokens [n, B, M] one patch's candidates at `coord` -> [n, B]: minus the squared codebook
    distance between each candidate's edge tokens and the facing edge of every known patch that
    shares that edge (same frame), summed."""
    n, b = tokens.shape[:2]
    sides = [(near, EDGES[step]) for near, _ in select(coord)
             if (step := adc.offset(near, coord)) in EDGES]
    score = tokens.new_zeros(n, b, dtype=torch.float32)
    if not sides:
        return score
    cand = codebook[tokens.view(n, b, *patch_size)].float()  # [n, B, pf, ph, pw, d]
    for near, (mine, theirs, axis) in sides:
        known = codebook[patch_tokens(near)[:b].view(b, *patch_size)].float()  # [B, pf, ph, pw, d]
        score -= (cand.select(axis + 1, mine) - known.select(axis, theirs)).square().sum((-1, -2, -3))
    return score


def ranks(score: torch.Tensor) -> torch.Tensor:
    """score [n, B] -> [n, B]: how many of the n candidates each one beats (equal scores beat none)."""
    return (score[:, None] > score[None]).sum(1)


def candidate_scores(rows, coords: list[Coord], tokens: torch.Tensor, n: int, order: Order, select,
                     patch_tokens: Callable[[Coord], torch.Tensor], codebook: torch.Tensor) -> torch.Tensor:
    """The score above for a wave's candidates: coords [P*n] each patch's n
    candidates in a row, tokens [halves*P*n*B, M] theirs (renderer.patch_rows layout) -> [P*n, B]:
    per patch, the neighbours', agreement's and border's ranks among its n candidates, added."""
    fetch = functools.cache(patch_tokens)  # both scores read the same neighbours: fetch each once per wave
    likelihood = neighbour_loglik(rows, coords, tokens, order, select, fetch)  # [P*n, B]
    b = likelihood.shape[1]
    sampled = tokens[:len(coords) * b].view(len(coords), b, -1)  # the sampled half: [P*n, B, M]
    shape = tuple(rows.renderer.config.patch_size)
    return torch.cat([ranks(likelihood[i:i + n]) + ranks(agreement(sampled[i:i + n], codebook))
                      + ranks(border_agreement(sampled[i:i + n], coords[i], shape, select, fetch, codebook))
                      for i in range(0, len(coords), n)])
