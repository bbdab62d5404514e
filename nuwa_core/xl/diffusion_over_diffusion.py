"""Diffusion over Diffusion (NUWA-XL section 3.3): keyframes first, then recursive in-filling.

The global model makes L keyframes from L prompts (no given frame). Each local level takes every
pair of adjacent frames of the level above as the first and last frames of an L-frame segment and
fills the L-2 between them; all segments of a level run as one batch. Depth m gives (L-1)^m + 1
frames: level 0 (global) has L frames, level k has (L-1)^(k+1) + 1. Frames of an upper level are
copied exactly into the levels below.

Prompts are embeddings (e.g. CLIP-L [n, 768] per frame), one entry per level: a tensor
[frames of that level, n, d] (frame j of level k sits at frame j * (L-1)^(m-1-k) of the video), or
a single prompt [n, d] / [1, n, d] repeated over the level. One tensor instead of a list is used
for every level. `prompt_schedule` makes those entries from what a user gives: P prompts per level
(the paper's denser prompts for deeper levels), spread over the video in time order.

The null prompt is zeros (`null_prompts`), what training feeds when it drops the text;
`guidance` > 1 samples with classifier-free guidance against it (diffusion.guided).

Latents here are the diffusion latents (T-KLVAE latents times config.latent_scale), [N, c, h, w].
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .diffusion import cpu_randn, guided, sample_ddim


def frames_for(L: int, depth: int) -> int:
    """Frames made by depth levels of L-frame diffusion: (L-1)^depth + 1."""
    _check_tree(L, depth)
    return (L - 1) ** depth + 1


def level_spacing(L: int, depth: int, level: int) -> int:
    """Video frames between the L frames of tree level `level` (0 = global) of a depth-`depth` tree."""
    return (L - 1) ** (depth - 1 - level)


def depth_for(L: int, frames: int) -> int:
    """The depth whose tree makes exactly `frames` frames; ValueError naming the nearest reachable counts."""
    _check_tree(L, 1)
    depth = 1
    while frames_for(L, depth) < frames:
        depth += 1
    if frames_for(L, depth) != frames:
        below = frames_for(L, depth - 1) if depth > 1 else None
        nearest = f"{below} (depth {depth - 1}) or " if below else ""
        raise ValueError(f"{frames} frames cannot be made with L={L}: the tree makes (L-1)^depth + 1 frames; "
                         f"nearest are {nearest}{frames_for(L, depth)} (depth {depth})")
    return depth


def _check_tree(L: int, depth: int) -> None:
    if L < 3:
        raise ValueError(f"L (frames per diffusion call) must be at least 3 to have a frame between the first "
                         f"and the last, got {L}")
    if depth < 1:
        raise ValueError(f"depth must be at least 1 (1 = global keyframes only), got {depth}")


def level_prompts(prompts: torch.Tensor, frames: int, what: str = "prompts") -> torch.Tensor:
    """One level's prompt embeddings [frames, n, d], or one [n, d] / [1, n, d] to repeat -> [frames, n, d]."""
    if prompts.ndim == 2:
        prompts = prompts[None]
    if prompts.ndim != 3 or prompts.shape[0] not in (1, frames):
        raise ValueError(f"{what}: need {frames} prompt embeddings [{frames}, n, d] (one per frame) or one "
                         f"[n, d] to repeat, got shape {tuple(prompts.shape)}")
    return prompts.expand(frames, *prompts.shape[1:])


def spread_prompts(prompts: torch.Tensor, frames: int) -> torch.Tensor:
    """P prompts [P, n, d] over `frames` evenly spaced frames -> [frames, n, d].

    The P prompts cut the span into P equal parts, in order; a frame takes the prompt of the part
    its position falls in (the last frame the last prompt). P = frames is one prompt per frame,
    P = 1 one for all, P = 2 the first half and the second. Positions, not counts, decide: a frame
    keeps its prompt at every level of the tree that has it."""
    p = prompts.shape[0]
    if p == 1 or p == frames:
        return prompts.expand(frames, *prompts.shape[1:])
    if frames == 1:
        return prompts[:1]
    index = torch.tensor([min(j * p // (frames - 1), p - 1) for j in range(frames)], device=prompts.device)
    return prompts[index]


def prompt_schedule(levels: Sequence[torch.Tensor | None], L: int, depth: int) -> list[torch.Tensor]:
    """A prompt schedule per level -> the `depth` per-level prompt tensors generate_long_video takes.

    levels[k] (k < depth; fewer entries are allowed): P_k prompts [P_k, n, d] for level k, any P_k >= 1,
    spread over that level's (L-1)^(k+1) + 1 frames (spread_prompts), or None. A level without its
    own prompts takes those of the nearest coarser level that has some (else the nearest finer
    one), spread over its frames: the keyframe prompts alone already drive the whole tree.
    """
    _check_tree(L, depth)
    given = list(levels)[:depth]
    if len(levels) > depth:
        extra = [k for k in range(depth, len(levels)) if levels[k] is not None]
        if extra:
            raise ValueError(f"prompts were given for level {extra[0] + 1} but the tree has only {depth} levels "
                             f"(depth {depth}); raise depth or leave that level's prompts out")
    given += [None] * (depth - len(given))
    have = [k for k, p in enumerate(given) if p is not None]
    if not have:
        raise ValueError("prompt_schedule: no level has prompts")
    out = []
    for k in range(depth):
        coarser = [j for j in have if j <= k]
        src = given[coarser[-1] if coarser else have[0]]
        if src.ndim == 2:
            src = src[None]
        if src.ndim != 3:
            raise ValueError(f"prompts of level {k + 1}: expected [prompts, n, d], got {tuple(src.shape)}")
        out.append(spread_prompts(src, frames_for(L, k + 1)))
    return out


def null_prompts(prompts: torch.Tensor) -> torch.Tensor:
    """The null prompt in the prompts' shape: zeros, what training feeds where it drops the text."""
    return torch.zeros_like(prompts)


def in_model_dtype(model):
    """model(x, t, *conditions) run in the model's own dtype (fp16 / bf16 weights) and answered in
    float32: the sampler's latents and its update stay float32, as ComfyUI keeps them. Plain
    callables and float32 models are returned as they are."""
    parameters = getattr(model, "parameters", None)
    first = next(parameters(), None) if callable(parameters) else None
    dtype = first.dtype if first is not None else torch.float32
    if dtype == torch.float32 or not dtype.is_floating_point:
        return model
    return lambda x, t, *conditions: model(x.to(dtype), t, *conditions).float()


def _level_callback(callback, level: int, levels: int):
    if callback is None:
        return None
    return lambda info: callback({**info, "level": level, "levels": levels})


def generate_keyframes(global_model, prompts: torch.Tensor, L: int, latent_shape: Sequence[int], *,
                       sampler: Callable = sample_ddim, steps: int = 50, noise: torch.Tensor | None = None,
                       generator: torch.Generator | None = None, callback=None,
                       guidance: float = 1.0) -> torch.Tensor:
    """Global diffusion (eq. 18): L prompts [L, n, d] (or one) -> L keyframe latents [L, c, h, w].
    guidance: classifier-free guidance scale against the null prompt (1 = off)."""
    _check_tree(L, 1)
    context = level_prompts(prompts, L, "global prompts")[None]  # [1, L, n, d]
    if noise is None:
        noise = cpu_randn((1, L, *latent_shape), generator, context.device)
    model = in_model_dtype(global_model)
    fn = guided(model, (context,), (null_prompts(context),), guidance)
    x0 = sampler(fn, noise, steps, generator=generator, callback=callback)
    return x0[0]


def fill_between(local_model, keyframes: torch.Tensor, prompts: torch.Tensor, L: int, *,
                 sampler: Callable = sample_ddim, steps: int = 50, noise: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, callback=None,
                 max_batch: int | None = None, guidance: float = 1.0) -> torch.Tensor:
    """Local diffusion (eqs. 19-20) over every adjacent pair at once.

    keyframes [K, c, h, w], prompts [(K-1)(L-1)+1, n, d] (or one), noise [K-1, L, c, h, w]
    -> [(K-1)(L-1)+1, c, h, w], keyframes[k] at frame k(L-1). max_batch splits the K-1 segments
    into several sampler runs (less memory; with a deterministic sampler the same result).
    guidance: classifier-free guidance scale (1 = off); the null pass keeps the given frames.
    """
    _check_tree(L, 1)
    k, shape = keyframes.shape[0], tuple(keyframes.shape[1:])
    if k < 2:
        raise ValueError(f"fill_between needs at least 2 keyframes, got {k}")
    segments, frames = k - 1, (k - 1) * (L - 1) + 1
    prompts = level_prompts(prompts, frames, "local prompts")
    index = torch.arange(segments)[:, None] * (L - 1) + torch.arange(L)  # [S, L] frame of each segment slot
    context = prompts[index.to(prompts.device)]  # [S, L, n, d]
    cond = torch.zeros((segments, L, *shape), dtype=keyframes.dtype, device=keyframes.device)
    cond[:, 0], cond[:, -1] = keyframes[:-1], keyframes[1:]
    mask = torch.zeros(segments, L, dtype=keyframes.dtype, device=keyframes.device)
    mask[:, 0] = mask[:, -1] = 1.0
    if noise is None:
        noise = cpu_randn((segments, L, *shape), generator, keyframes.device, keyframes.dtype)
    elif tuple(noise.shape) != (segments, L, *shape):
        raise ValueError(f"expected noise of shape {(segments, L, *shape)}, got {tuple(noise.shape)}")

    model = in_model_dtype(local_model)
    chunk = max_batch or segments
    outs = []
    for s in range(0, segments, chunk):
        sl = slice(s, s + chunk)
        ctx, c, m = context[sl], cond[sl], mask[sl]
        fn = guided(model, (ctx, c, m), (null_prompts(ctx), c, m), guidance)
        outs.append(sampler(fn, noise[sl], steps, generator=generator, callback=callback))
    x0 = torch.cat(outs)  # [S, L, c, h, w]
    x0[:, 0], x0[:, -1] = keyframes[:-1], keyframes[1:]  # given frames are kept exactly
    return torch.cat([x0[:, :-1].reshape(segments * (L - 1), *shape), keyframes[-1:]])


def generate_long_video(global_model, local_models, prompts, L: int, depth: int, latent_shape: Sequence[int], *,
                        sampler: Callable = sample_ddim, steps: int = 50, generator: torch.Generator | None = None,
                        callback=None, max_batch: int | None = None, guidance: float = 1.0) -> torch.Tensor:
    """The whole tree: -> latents [(L-1)^depth + 1, c, h, w].

    local_models: one model for every local level, or a list of depth-1 (level k uses entry k-1: the
    paper's local model per depth; XLModel.tree_locals picks them by the spacing they were trained on).
    prompts: a list of `depth` tensors (level k: [(L-1)^(k+1) + 1, n, d] or one [n, d]; prompt_schedule
    makes them from fewer prompts), or one tensor for every level. callback(info) gets the sampler's
    info plus "level" and "levels"; True cancels. guidance: classifier-free guidance scale (1 = off).
    """
    _check_tree(L, depth)
    if not isinstance(local_models, (list, tuple)):
        local_models = [local_models] * (depth - 1)
    if len(local_models) != depth - 1:
        raise ValueError(f"expected a local model for each of the {depth - 1} local levels (depth {depth}), "
                         f"got {len(local_models)}")
    if isinstance(prompts, torch.Tensor):
        prompts = [prompts] * depth
    if len(prompts) != depth:
        raise ValueError(f"expected prompts for {depth} levels (a list of {depth} tensors, or one tensor for "
                         f"all), got a list of {len(prompts)}")
    per_level = [level_prompts(p, frames_for(L, k + 1), f"prompts of level {k}") for k, p in enumerate(prompts)]
    frames = generate_keyframes(global_model, per_level[0], L, latent_shape, sampler=sampler, steps=steps,
                                generator=generator, callback=_level_callback(callback, 0, depth),
                                guidance=guidance)
    for k in range(1, depth):
        frames = fill_between(local_models[k - 1], frames, per_level[k], L, sampler=sampler, steps=steps,
                              generator=generator, callback=_level_callback(callback, k, depth),
                              max_batch=max_batch, guidance=guidance)
    return frames
