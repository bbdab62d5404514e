"""A user's own frames -> NUWA-XL keyframe latents, for Local Diffusion to fill between (pure PyTorch).

The T-KLVAE encodes the frames (its posterior mean, times the model's latent_scale: the latents the
MTD samples and fill_between keeps). The frames must be the model's frame size, the size its MTD
was trained on and Global Diffusion makes (the MTD file's `nuwa_xl` width / height): other sizes are
refused, naming the size given and the one that fits, unless `fit` asks to scale and centre-crop
them to it. Local Diffusion fills between adjacent keyframes, so there must be at least two.
Keyframes far apart in time are encoded one at a time (the T-KLVAE's temporal layers only ever saw
neighbouring frames); consecutive frames of a clip together.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

FIT_REFUSE = "refuse other sizes"
FIT_CROP = "scale and centre-crop to the model's size"
FIT_MODES = (FIT_REFUSE, FIT_CROP)
MIN_KEYFRAMES = 2


def model_frame_size(model) -> tuple[int, int]:
    """(width, height) in pixels of the frames the XLModel makes and takes."""
    _, h, w = model.latent_shape()
    f = model.vae.config.downsample_factor
    return w * f, h * f


def scale_and_crop(frames: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """[N, 3, H, W] -> [N, 3, height, width]: scaled (antialiased bilinear) until it covers width x height,
    keeping its aspect, then the centre cut out."""
    _, _, h, w = frames.shape
    if (w, h) == (width, height):
        return frames
    s = max(width / w, height / h)
    sw, sh = max(width, round(w * s)), max(height, round(h * s))
    x = F.interpolate(frames.float(), size=(sh, sw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (sh - height) // 2, (sw - width) // 2
    return x[:, :, top:top + height, left:left + width].clamp(-1, 1)


def fit_frames(frames: torch.Tensor, width: int, height: int, fit: str = FIT_REFUSE) -> torch.Tensor:
    """Frames [N, 3, H, W] at width x height: as they are, scaled and cropped (FIT_CROP), or refused."""
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"expected frames [N, 3, H, W] (RGB), got {tuple(frames.shape)}")
    if fit not in FIT_MODES:
        raise ValueError(f"fit must be one of {FIT_MODES}, got {fit!r}")
    _, _, h, w = frames.shape
    if (w, h) == (width, height):
        return frames
    if fit == FIT_CROP:
        return scale_and_crop(frames, width, height)
    raise ValueError(f"the frames are {w}x{h} (width x height) but this NUWA-XL model makes and takes {width}x{height} "
                     f"frames (the size its MTD was trained on, and the size of Global Diffusion's keyframes); give "
                     f"{width}x{height} frames, or set the size option to '{FIT_CROP}'")


def check_keyframe_count(n: int) -> None:
    if n < MIN_KEYFRAMES:
        raise ValueError(f"got {n} frame(s) but Local Diffusion fills between adjacent keyframes, so it needs at least "
                         f"{MIN_KEYFRAMES} (K keyframes -> (K-1)(L-1)+1 frames after one level); give {MIN_KEYFRAMES} "
                         f"or more")


def check_keyframe_latents(model, latents: torch.Tensor) -> None:
    """Keyframe latents [K, c, h, w] that the model can fill between: its latent channels and its frame size."""
    c, h, w = model.latent_shape()
    f = model.vae.config.downsample_factor
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
        raise ValueError(f"expected keyframe latents [frames, {c}, {h}, {w}] (from Global Diffusion, NUWA-XL Encode or "
                         f"Local Diffusion), got {tuple(getattr(latents, 'shape', ())) or type(latents).__name__}")
    if latents.shape[1] != c:
        raise ValueError(f"the keyframes have {latents.shape[1]} latent channels but this model's T-KLVAE and MTD take "
                         f"{c}; make them with this model (NUWA-XL Encode, Global Diffusion)")
    kh, kw = latents.shape[2:]
    if (kh, kw) != (h, w):
        raise ValueError(f"the keyframes are latents of {kw * f}x{kh * f} frames ({kw}x{kh} latents) but this model makes "
                         f"and takes {w * f}x{h * f} frames ({w}x{h} latents); encode frames of that size with NUWA-XL "
                         f"Encode (its size option can scale and crop them)")


def select_keyframes(frames: torch.Tensor, every: int = 1) -> torch.Tensor:
    """Frames 0, every, 2*every, ... of a video (every >= 1)."""
    if every < 1:
        raise ValueError(f"every must be 1 or more, got {every}")
    return frames[::every]


@torch.no_grad()
def encode_keyframes(model, frames: torch.Tensor, fit: str = FIT_REFUSE, every: int = 1,
                     neighbours: bool = False) -> torch.Tensor:
    """Frames [N, 3, H, W] in -1..1 -> keyframe latents [K, c, h, w] (float32, on the CPU) of frames 0, every,
    2*every, ... at the model's frame size, as Global Diffusion makes them and Local Diffusion takes them.
    model: an XLModel (nuwa_core.xl.model). neighbours: the frames taken are consecutive frames of a video, encoded
    together (the T-KLVAE's temporal layers see each other); otherwise (keyframes far apart in time) each frame is
    encoded alone, so no temporal layer mixes frames that are not neighbours. Errors name the size or count given
    and the one needed."""
    width, height = model_frame_size(model)
    frames = fit_frames(select_keyframes(frames, every), width, height, fit).float()
    check_keyframe_count(frames.shape[0])
    if neighbours:
        return model.encode(frames).float().cpu()
    return model.encode(frames, chunk=1, overlap=0).float().cpu()  # a temporal window per frame
