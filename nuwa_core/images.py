"""Image tensors at the edges of the core: ComfyUI's IMAGE layout, files, and input checks.

IMAGE is float [B, H, W, C] in 0..1 (ComfyUI's layout). Models work on [B, 3, H, W] in -1..1.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def check_finite(x: torch.Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise ValueError(f"{what} contains {bad} NaN or infinite values; pass a finite tensor")


def to_rgb(image: torch.Tensor) -> torch.Tensor:
    """[B, H, W, C] with C in {1, 2, 3, 4} -> [B, H, W, 3]. Alpha is composited over white."""
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4:
        raise ValueError(f"expected an IMAGE of shape [B, H, W, C], got shape {tuple(image.shape)}")
    c = image.shape[-1]
    if c in (2, 4):
        alpha = image[..., -1:]
        image = image[..., :-1] * alpha + (1.0 - alpha)
        c -= 1
    if c == 1:
        image = image.expand(*image.shape[:-1], 3)
    elif c != 3:
        raise ValueError(f"expected 1 (gray), 2 (gray+alpha), 3 (RGB) or 4 (RGBA) channels, got {c}")
    return image


def image_to_model(image: torch.Tensor) -> torch.Tensor:
    """IMAGE [B, H, W, C] 0..1 -> model input [B, 3, H, W] -1..1, after converting and checking it."""
    check_finite(image, "input image")
    image = to_rgb(image.float()).clamp(0, 1)
    return image.permute(0, 3, 1, 2) * 2.0 - 1.0


def model_to_image(x: torch.Tensor) -> torch.Tensor:
    """Model output [B, 3, H, W] -1..1 -> IMAGE [B, H, W, 3] 0..1."""
    return ((x.float().clamp(-1, 1) + 1.0) / 2.0).permute(0, 2, 3, 1).contiguous()


def load_image(path) -> torch.Tensor:
    """A file -> IMAGE [1, H, W, 3]. RGBA is composited over white, grayscale expanded."""
    path = Path(path)
    try:
        pil = Image.open(path)
        pil.load()
    except Exception as err:
        raise ValueError(f"cannot read image {path}: {err}") from err
    if pil.mode not in ("RGB", "RGBA", "L", "LA"):
        pil = pil.convert("RGBA" if "A" in pil.getbands() else "RGB")
    array = np.asarray(pil, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[..., None]
    return to_rgb(torch.from_numpy(array.copy()).unsqueeze(0))


def save_image(image: torch.Tensor, path) -> None:
    """IMAGE [1, H, W, 3] or [H, W, 3] -> PNG/JPEG file (parent folders created)."""
    if image.ndim == 4:
        image = image[0]
    array = (image.clamp(0, 1).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
