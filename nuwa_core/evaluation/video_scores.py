"""Scores of a whole video (frames in time order): temporal consistency and drift over time.

Frames are float arrays [F, H, W, 3] in 0..1 (numpy or torch). Every score here is only meaningful
beside control rows computed in the same run on the same reference (the real clip, its frames
shuffled, a frame repeated, ...): see bench/xl_quality.py.

  warp_errors       DIS optical flow (OpenCV) from each frame to the one before it, computed on the
                    video itself, then mean |x_n - warp(x_{n-1})| over the pixels whose source lies
                    inside the frame: how well the previous frame, moved, explains the next. Low for
                    smooth motion; a frozen video scores 0 (a blind spot: pair it with a motion or
                    quality score).
  colour_stats      per-frame RGB mean and std [F, 6].
  colour_distance   L2 distance between the mean colour statistics of two frame sets (e.g. a window of
                    a video and reference frames of the same scene): where in time a video departs from
                    what it should show (drift at the end of a long video vs its start).
  pca_basis, frechet_distance_pca
                    FD of feature sets in a reference set's top principal directions (few samples).
  window_starts     evenly spaced window starts covering a video.
"""
from __future__ import annotations

import numpy as np
import torch

from .metrics import EvalInputError


def _cv2():
    try:
        import cv2
    except ImportError as err:  # the `eval` extra
        raise ImportError("DIS optical flow needs OpenCV: pip install opencv-python-headless (the `eval` extra)") from err
    return cv2


def _frames(frames, what: str = "frames") -> np.ndarray:
    x = frames.detach().cpu().float().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames, np.float32)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise EvalInputError(f"{what}: expected [F, H, W, 3] in 0..1, got shape {tuple(x.shape)}")
    return np.ascontiguousarray(x, dtype=np.float32)


def warp_errors(frames, preset: str = "medium") -> list[float]:
    """Per consecutive pair (n-1, n), n >= 1: mean |x_n - x_{n-1} warped by the DIS flow of the video itself|
    over the pixels whose flow source lies inside the frame (0..1 scale) -> F-1 values."""
    cv2 = _cv2()
    x = _frames(frames)
    if len(x) < 2:
        raise EvalInputError(f"warp_errors needs at least 2 frames, got {len(x)}")
    presets = {"ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST, "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
               "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}
    dis = cv2.DISOpticalFlow_create(presets[preset])
    gray = [cv2.cvtColor((f * 255).round().clip(0, 255).astype(np.uint8), cv2.COLOR_RGB2GRAY) for f in x]
    h, w = gray[0].shape
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    out = []
    for n in range(1, len(x)):
        flow = dis.calc(gray[n], gray[n - 1], None)  # frame_n(p) ~ frame_{n-1}(p + flow(p))
        mx, my = xs + flow[..., 0], ys + flow[..., 1]
        warped = cv2.remap(x[n - 1], mx, my, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        valid = (mx >= 0) & (mx <= w - 1) & (my >= 0) & (my <= h - 1)
        diff = np.abs(x[n] - warped)[valid]
        out.append(float(diff.mean()) if diff.size else 0.0)
    return out


def warp_error(frames, preset: str = "medium") -> float:
    """Mean of warp_errors over the video."""
    return float(np.mean(warp_errors(frames, preset)))


def colour_stats(frames) -> np.ndarray:
    """[F, H, W, 3] -> per-frame RGB mean and std [F, 6]."""
    x = _frames(frames)
    return np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2))], axis=1)


def window_starts(frames: int, window: int, count: int) -> list[int]:
    """`count` evenly spaced starts of `window`-frame windows over `frames` frames (first at 0, last ending
    at the last frame)."""
    if window < 1 or window > frames or count < 1:
        raise EvalInputError(f"window {window} must be 1..{frames} frames and count >= 1, got count {count}")
    last = frames - window
    if count == 1:
        return [0]
    return [round(last * i / (count - 1)) for i in range(count)]


def colour_distance(frames, reference) -> float:
    """L2 distance between the mean colour statistics (colour_stats averaged over the frames) of two frame
    sets of any lengths, e.g. a window of a video and the reference frames that show the same scene."""
    return float(np.linalg.norm(colour_stats(frames).mean(0) - colour_stats(reference).mean(0)))


def pca_basis(features: torch.Tensor, dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean [D] and the top `dims` principal directions [D, dims] of a feature set [N, D] (float64)."""
    f = features.double()
    if f.ndim != 2 or not 1 <= dims <= min(f.shape[0] - 1, f.shape[1]):
        raise EvalInputError(f"pca_basis: need [N, D] features with 1 <= dims <= min(N-1, D), got "
                             f"{tuple(f.shape)} and dims {dims}")
    mean = f.mean(0)
    _, _, v = torch.linalg.svd(f - mean, full_matrices=False)
    return mean, v[:dims].T


def frechet_distance_pca(feats_a: torch.Tensor, feats_b: torch.Tensor, basis: tuple[torch.Tensor, torch.Tensor]) -> float:
    """frechet_distance of both feature sets projected on a PCA basis (pca_basis, fitted on a reference set).

    With fewer samples than feature dimensions (e.g. 64 frames, 1280-d EfficientNet-Lite0 features) the
    full covariances are rank-deficient and FD rewards a collapsed set (one frame repeated: no covariance
    term to mismatch); in the reference's top `dims` directions, with several samples per dimension,
    the covariance terms are estimated and a collapsed set scores worse than a fresh sample."""
    from .metrics import frechet_distance
    mean, comps = basis
    return frechet_distance((feats_a.double() - mean) @ comps, (feats_b.double() - mean) @ comps)
