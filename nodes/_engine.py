"""Every call the nodes make into nuwa_core's engine, in one place.

The engine (nuwa_core.infinity.generation) owns all model logic; this module only adapts ComfyUI's
values (IMAGE, MASK, CONDITIONING, widget numbers) to its calls.
"""
from __future__ import annotations

import math

import torch

from nuwa_core.infinity.patch_samplers import EPSILON_DEFAULT  # noqa: F401  (the Render node's default)

DECODER_CHOICES = ("auto", "AR", "NAR", "P-NAR")
_DECODER_IDS = {"auto": "auto", "AR": "ar", "NAR": "nar", "P-NAR": "pnar"}


def load_model(path, device="cpu"):
    from nuwa_core.infinity.generation import NuwaInfinity  # imported on first use: ComfyUI starts faster
    from nuwa_core.weights import check_listed_file
    check_listed_file(path)
    return NuwaInfinity.load(str(path), device=device)


def sampler_settings(decoder: str, temperature: float, top_k: int, top_p: float, steps: int, epsilon: float):
    from nuwa_core.infinity.patch_samplers import SamplerSettings
    return SamplerSettings(decoder=_DECODER_IDS[decoder], temperature=float(temperature), top_k=int(top_k),
                           top_p=float(top_p), steps=int(steps), epsilon=float(epsilon))


def text_from_conditioning(conditioning) -> torch.Tensor | None:
    """CONDITIONING from CLIP Text Encode is [[tensor [1,77,768], {...}], ...]: take the first tensor."""
    if conditioning is None:
        return None
    try:
        cond = conditioning[0][0]
    except (IndexError, KeyError, TypeError) as err:
        raise ValueError("conditioning: expected the output of a CLIP Text Encode node "
                         "(a list of [tensor, dict] pairs)") from err
    if not isinstance(cond, torch.Tensor) or cond.dim() != 3:
        raise ValueError(f"conditioning: expected a tensor [batch, tokens, dim], got "
                         f"{getattr(cond, 'shape', type(cond).__name__)}")
    return cond


def extension_for_target(current: int, target_px: int, patch_px: int, anchor_first: float) -> tuple[int, int]:
    """Patches to add before/after along one axis to reach at least target_px pixels.
    anchor_first: share of the growth that goes before (0 = all after, 0.5 = both sides, 1 = all before)."""
    if target_px <= 0:
        return 0, 0
    needed = max(math.ceil(target_px / patch_px) - current, 0)
    before = int(round(needed * anchor_first))
    return before, needed - before


ANCHORS = ("center", "top_left", "top", "top_right", "left", "right", "bottom_left", "bottom", "bottom_right")
# anchor = where the existing canvas stays; returns the share of growth placed (above, left)
_ANCHOR_SHARES = {"center": (0.5, 0.5), "top_left": (0.0, 0.0), "top": (0.0, 0.5), "top_right": (0.0, 1.0),
                  "left": (0.5, 0.0), "right": (0.5, 1.0), "bottom_left": (1.0, 0.0), "bottom": (1.0, 0.5),
                  "bottom_right": (1.0, 1.0)}


def anchor_shares(anchor: str) -> tuple[float, float]:
    return _ANCHOR_SHARES[anchor]


def mask_to_patch_grid(mask: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """MASK [B,H,W] (1 = generate) -> bool [F, rows, cols]: a patch is regenerated if any of its
    area is masked. One mask per frame, or one mask for every frame."""
    f, rows, cols = grid
    if mask.dim() == 2:
        mask = mask[None]
    m = mask.float()[:, None]
    cells = torch.nn.functional.adaptive_max_pool2d(m, (rows, cols))[:, 0] > 0.5
    if cells.shape[0] == 1:
        cells = cells.expand(f, rows, cols)
    elif cells.shape[0] != f:
        raise ValueError(f"mask has {cells.shape[0]} frames, the canvas has {f}: give one mask or one per frame")
    return cells.clone()
