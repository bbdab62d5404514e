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
    model = NuwaInfinity.load(str(path), device=device)
    model.source_path = str(path)  # named when a file paired with it does not fit (PG-VQGAN Decode)
    return model


def sampler_settings(decoder: str, temperature: float, top_k: int, top_p: float, steps: int, epsilon: float,
                     guidance: float = 1.0, candidates: int = 1):
    from nuwa_core.infinity.patch_samplers import SamplerSettings
    return SamplerSettings(decoder=_DECODER_IDS[decoder], temperature=float(temperature), top_k=int(top_k),
                           top_p=float(top_p), steps=int(steps), epsilon=float(epsilon), guidance=float(guidance),
                           candidates=int(candidates))


def text_from_conditioning(conditioning, model=None) -> torch.Tensor | None:
    """CONDITIONING ([[tensor [1, T, D], {...}], ...], from CLIP Text Encode or NUWA Text Encode): the first
    tensor. With `model` (a NUWA-Infinity model), checked against the text encoder it was trained with."""
    if conditioning is None:
        return None
    try:
        cond, extra = conditioning[0][0], conditioning[0][1]
    except (IndexError, KeyError, TypeError) as err:
        raise ValueError("conditioning: expected the output of a CLIP Text Encode or NUWA Text Encode node "
                         "(a list of [tensor, dict] pairs)") from err
    if not isinstance(cond, torch.Tensor) or cond.dim() != 3:
        raise ValueError(f"conditioning: expected a tensor [batch, tokens, dim], got "
                         f"{getattr(cond, 'shape', type(cond).__name__)}")
    if model is not None:
        check_prompt_fits(cond, extra if isinstance(extra, dict) else {}, model)
    return cond


def check_prompt_fits(cond: torch.Tensor, extra: dict, model) -> None:
    width, trained = cond.shape[-1], model.renderer.config.text_dim
    made_by = extra.get("nuwa_text_encoder")
    source = f"NUWA Text Encode with {made_by}" if made_by else "a CLIP Text Encode node"
    if not trained:
        raise ValueError(f"this NUWA model has no text path (trained without captions), but a prompt from {source} "
                         f"is connected: remove the conditioning, or load a model trained with captions "
                         f"(the shipped nuwa_infinity_scenes.safetensors)")
    encoder = (model.text_encoder or {}).get("name")
    with_encoder = f" (trained with the text encoder {encoder})" if encoder else ""
    if width != trained:
        raise ValueError(f"the prompt is {width} wide (from {source}) but this model reads {trained}-wide prompts"
                         f"{with_encoder}; encode the prompt with the encoder the model was trained with")
    from nuwa_core.text_encoder import different_file
    why = different_file({"name": made_by, "sha256": extra.get("nuwa_text_encoder_sha256")}, model.text_encoder)
    if why:
        raise ValueError(f"NUWA Patch Renderer: {why}")


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


def patches_for_pixels(pixels: int, patch_px: int) -> int:
    """Whole patches that cover `pixels` px (a pixel pad is rounded up, as stock outpainting pads)."""
    return math.ceil(max(int(pixels), 0) / patch_px)


def mask_on_canvas(mask: torch.Tensor | None, canvas) -> torch.Tensor | None:
    """MASK [B,H,W] or [H,W] (1 = generate) -> [B, Hpx, Wpx] on the canvas' pixel grid, or None
    when nothing is painted (LoadImage gives an all-zero 64x64 mask for an image without alpha).

    Accepted sizes: the canvas' own (a mask made for the decoded canvas), the image the canvas was
    encoded from (mapped through the encode's crop or resize, as `ImagePadForOutpaint` and the
    mask editor give it), or the given pixels' (the image after cropping)."""
    if mask is None:
        return None
    if mask.dim() == 2:
        mask = mask[None]
    if mask.dim() != 3:
        raise ValueError(f"mask: expected a MASK [batch, height, width], got shape {tuple(mask.shape)}")
    mask = mask.detach().float().cpu().clamp(0, 1)
    if not mask.any():
        return None
    size, canvas_px = tuple(mask.shape[1:]), canvas.pixel_size
    if size == canvas_px:
        return mask
    given = canvas.given
    placed = None
    if given is not None and size == tuple(given.shape[1:3]):
        placed = mask
    elif given is not None and canvas.source_size is not None and size == tuple(canvas.source_size):
        top, left, h, w = canvas.source_box
        placed = mask[:, top:top + h, left:left + w]
        if tuple(placed.shape[1:]) != tuple(given.shape[1:3]):  # the encode resized the image
            binary = bool(((placed == 0) | (placed == 1)).all())
            placed = torch.nn.functional.interpolate(
                placed[:, None], size=tuple(given.shape[1:3]), mode="nearest-exact" if binary else "bilinear",
                align_corners=None if binary else False)[:, 0].clamp(0, 1)
    if placed is None:
        sizes = [f"the canvas {canvas_px[1]}x{canvas_px[0]}"]
        if canvas.source_size is not None:
            sizes.append(f"the encoded image {canvas.source_size[1]}x{canvas.source_size[0]}")
        raise ValueError(f"mask is {size[1]}x{size[0]} px; it must be the size of {' or '.join(sizes)} px "
                         "(width x height)")
    out = torch.zeros(placed.shape[0], *canvas_px)
    top, left = canvas.given_origin
    out[:, top:top + placed.shape[1], left:left + placed.shape[2]] = placed
    return out


def mask_to_patch_grid(mask: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """MASK [B,H,W] (1 = generate) -> bool [F, rows, cols]: a patch is regenerated if any of its
    area is masked, even faintly (a feathered edge blends new pixels there). One mask per frame,
    or one mask for every frame."""
    f, rows, cols = grid
    if mask.dim() == 2:
        mask = mask[None]
    m = mask.float()[:, None]
    cells = torch.nn.functional.adaptive_max_pool2d(m, (rows, cols))[:, 0] > 0
    if cells.shape[0] == 1:
        cells = cells.expand(f, rows, cols)
    elif cells.shape[0] != f:
        raise ValueError(f"mask has {cells.shape[0]} frames, the canvas has {f}: give one mask or one per frame")
    return cells.clone()
