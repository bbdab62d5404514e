"""Training data: images (one-shot augmentation, NUWA-Infinity appendix D) and videos.

One-shot mode draws random crops from one large image with RandomResizedCrop, horizontal flip,
mirror (reflection at the borders), small rotation and shear, noise and colour jitter, implemented
with torch only, all from one seeded generator. Videos are read with PyAV (else imageio) or from
folders of frames, resized and centre-cropped to one size, and drawn as clips.
"""
from __future__ import annotations

import dataclasses
import math
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..images import image_to_model, load_image
from .loop import TrainingError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".avi", ".mp4", ".mkv", ".mov", ".webm", ".gif", ".m4v", ".mpg", ".mpeg", ".ogv", ".wmv")


# =============================================================================================
# Images

def list_images(spec: str) -> list[Path]:
    path = Path(spec)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise TrainingError(f"--images {spec}: no such file or folder")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise TrainingError(f"--images {spec}: the folder holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def parse_box(text: str | None) -> tuple[int, int, int, int] | None:
    """"X,Y,W,H" (pixels) -> (x, y, w, h); None stays None."""
    if text is None:
        return None
    try:
        box = tuple(int(v) for v in str(text).split(","))
    except ValueError:
        box = ()
    if len(box) != 4 or min(box) < 0 or box[2] < 1 or box[3] < 1:
        raise TrainingError(f"--train-box {text!r}: expected X,Y,W,H in whole pixels (W, H >= 1), e.g. 0,0,768,128")
    return box


def load_images(spec: str, downscale: int = 1, min_size: tuple[int, int] = (1, 1),
                box: tuple[int, int, int, int] | None = None) -> list[torch.Tensor]:
    """Files -> list of [3, H, W] in -1..1 (RGBA composited over white), each checked for size;
    `box` (x, y, w, h px after downscaling): only that part of every image."""
    out = []
    for path in list_images(spec):
        try:
            image = load_image(path)  # [1, H, W, 3]
        except ValueError as err:
            raise TrainingError(f"unreadable training image {path}: {err}") from err
        x = image_to_model(image)  # [1, 3, H, W]
        if downscale > 1:
            h, w = x.shape[-2] // downscale, x.shape[-1] // downscale
            if h < 1 or w < 1:
                raise TrainingError(f"{path} is too small to downscale by {downscale}")
            x = F.interpolate(x, size=(h, w), mode="area")
        if box is not None:
            bx, by, bw, bh = box
            if bx + bw > x.shape[-1] or by + bh > x.shape[-2]:
                raise TrainingError(f"--train-box {bx},{by},{bw},{bh} reaches outside {path.name}, which is "
                                    f"{x.shape[-1]}x{x.shape[-2]} px after --downscale {downscale}")
            x = x[..., by:by + bh, bx:bx + bw]
        h, w = x.shape[-2:]
        if h < min_size[0] or w < min_size[1]:
            raise TrainingError(f"training image {path} is {w}x{h} px (after --downscale {downscale}), smaller than "
                                f"one training crop of {min_size[1]}x{min_size[0]} px; use larger images or a "
                                f"smaller --crop/--patch")
        out.append(x[0].clamp(-1, 1))
    return out


def _uniform(gen, lo, hi, n=None):
    if n is None:
        return lo + (hi - lo) * torch.rand((), generator=gen).item()
    return lo + (hi - lo) * torch.rand(n, generator=gen)


@dataclasses.dataclass
class Augment:
    """Appendix D's augmentations (probabilities / magnitudes). Zero disables one."""
    scale: tuple = (0.6, 1.0)      # RandomResizedCrop: side of the source window / the largest that fits
    scale_of: str = "image"        # ... that fits the image; "crop": / the crop's own size (native resolution)
    ratio_jitter: float = 0.15     # log aspect-ratio jitter of the source window
    hflip: float = 0.5
    vflip: float = 0.0             # off by default: skies do not belong under seas
    rotate_deg: float = 4.0        # on a square window; a long strip is tilted so its ends move as far
    shear: float = 0.08
    noise: float = 0.02            # std in -1..1 units
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1

    @classmethod
    def off(cls) -> "Augment":
        return cls(scale=(1.0, 1.0), ratio_jitter=0.0, hflip=0.0, vflip=0.0, rotate_deg=0.0, shear=0.0, noise=0.0,
                   brightness=0.0, contrast=0.0, saturation=0.0)


def random_crops(images: list[torch.Tensor], n: int, size: tuple[int, int], gen: torch.Generator,
                 aug: Augment, keep_out: list[torch.Tensor | None] | None = None) -> torch.Tensor:
    """n crops of size (h, w) px, [n, 3, h, w] in -1..1, drawn with `gen` only."""
    return random_crops_with_sources(images, n, size, gen, aug, keep_out)[0]


MAX_CROP_TRIES = 200


def random_crops_with_sources(images: list[torch.Tensor], n: int, size: tuple[int, int], gen: torch.Generator,
                              aug: Augment, keep_out: list[torch.Tensor | None] | None = None
                              ) -> tuple[torch.Tensor, list[int]]:
    """random_crops, and the index of the image each crop came from.

    Each crop samples a source window (random resized crop), maps it through a small rotation and
    shear with reflection at the borders (the mirror augmentation), flips, then colour jitter and noise.
    keep_out: per image a [H, W] mask (> 0: left out of training) or None; a window that would read
    any left-out pixel is drawn again.
    """
    crops, sources = [], []
    for _ in range(n):
        for _ in range(MAX_CROP_TRIES):
            source = int(torch.randint(len(images), (1,), generator=gen))
            grid = augmented_window(images[source].shape[-2:], size, gen, aug)
            mask = keep_out[source] if keep_out is not None else None
            if mask is None or not bool(warp(mask[None].float(), grid).gt(0).any()):  # bilinear: any share of a left-out pixel
                break
        else:
            raise TrainingError(f"no {size[1]}x{size[0]} px training crop avoids the left-out region in "
                                f"{MAX_CROP_TRIES} draws: leave less of the image out or train on a larger image")
        sources.append(source)
        crops.append(photometric(warp(images[source], grid), gen, aug))
    return torch.stack(crops), sources


def augmented_window(source_size: tuple[int, int], size: tuple[int, int], gen: torch.Generator,
                     aug: Augment) -> torch.Tensor:
    """The sampling grid [1, h, w, 2] of one augmented crop of `size` (h, w) from an image of
    `source_size`: a random resized window, a small rotation and shear, flips (appendix D)."""
    out_h, out_w = size
    H, W = source_size
    # scale_of "image": a share of the largest window of the output aspect that fits (RandomResizedCrop);
    # "crop": of the crop's own size, so crops keep about the image's own resolution
    fit = min(H / out_h, W / out_w) if aug.scale_of == "image" else 1.0
    s = _uniform(gen, *aug.scale) * fit
    r = math.exp(_uniform(gen, -aug.ratio_jitter, aug.ratio_jitter)) if aug.ratio_jitter else 1.0
    win_h, win_w = min(H, out_h * s / math.sqrt(r)), min(W, out_w * s * math.sqrt(r))
    cy = _uniform(gen, win_h / 2, H - win_h / 2)
    cx = _uniform(gen, win_w / 2, W - win_w / 2)
    ang = math.radians(_uniform(gen, -aug.rotate_deg, aug.rotate_deg)) if aug.rotate_deg else 0.0
    # the angle is meant for a square window: on a long strip the same angle would move its ends by
    # tan(ang) * long / 2 (a horizon tilting out of a 1024x128 panorama), so the far end moves as far
    # as it would on a square of the short side
    ang = math.atan(math.tan(ang) * min(win_h, win_w) / max(win_h, win_w))
    sh = _uniform(gen, -aug.shear, aug.shear) if aug.shear else 0.0
    fx = -1.0 if torch.rand((), generator=gen).item() < aug.hflip else 1.0
    fy = -1.0 if torch.rand((), generator=gen).item() < aug.vflip else 1.0
    # output normalized coords (u, v) in -1..1 -> source pixel offsets from the window centre
    rot = torch.tensor([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
    a = rot @ torch.tensor([[1.0, sh], [0.0, 1.0]]) @ torch.diag(torch.tensor([fx * win_w / 2, fy * win_h / 2]))
    # to the source's normalized coords (align_corners=False: x_norm = (2 px + 1) / W - 1, px continuous)
    scale = torch.tensor([2.0 / W, 2.0 / H])
    theta = torch.zeros(1, 2, 3)
    theta[0, :, :2] = scale[:, None] * a
    theta[0, :, 2] = torch.tensor([2.0 * cx / W - 1.0, 2.0 * cy / H - 1.0])
    return F.affine_grid(theta, (1, 1, out_h, out_w), align_corners=False)


def warp(x: torch.Tensor, grid: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """[C, H, W] sampled on `grid` (augmented_window), reflected at the borders -> [C, h, w]."""
    return F.grid_sample(x[None], grid, mode=mode, padding_mode="reflection", align_corners=False)[0]


def photometric(x: torch.Tensor, gen: torch.Generator, aug: Augment) -> torch.Tensor:
    """Colour jitter and pixel noise of one crop [3, h, w] in -1..1."""
    if aug.brightness or aug.contrast or aug.saturation:
        x = (x + 1) / 2
        x = x * _uniform(gen, 1 - aug.brightness, 1 + aug.brightness)
        mean = x.mean()
        x = (x - mean) * _uniform(gen, 1 - aug.contrast, 1 + aug.contrast) + mean
        gray = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]
        x = (x - gray) * _uniform(gen, 1 - aug.saturation, 1 + aug.saturation) + gray
        x = x.clamp(0, 1) * 2 - 1
    if aug.noise:
        x = x + aug.noise * torch.randn(x.shape, generator=gen)
    return x.clamp(-1, 1)


def fixed_crops(images: list[torch.Tensor], n: int, size: tuple[int, int]) -> torch.Tensor:
    """Deterministic crops (no augmentation) for samples and evaluation: evenly spaced along the width."""
    h, w = size
    out = []
    for t in range(n):
        img = images[t % len(images)]
        H, W = img.shape[-2:]
        top = (H - h) // 2
        left = int(round((W - w) * (t / max(1, n - 1)))) if n > 1 else (W - w) // 2
        out.append(img[:, top:top + h, left:left + w])
    return torch.stack(out)


# =============================================================================================
# Videos

def parse_size(text: str) -> tuple[int, int]:
    """"64x48" (width x height) or "64" (square) -> (width, height)."""
    try:
        parts = [int(p) for p in str(text).lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1:
        raise TrainingError(f"--size must be WIDTHxHEIGHT (e.g. 64x48) or one number, got {text!r}")
    return parts[0], parts[1]


def fit_frame(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """Scale to cover (width, height), centre-crop, -> uint8 [H, W, 3]."""
    w, h = size
    img = img.convert("RGB")
    s = max(w / img.width, h / img.height)
    nw, nh = max(w, round(img.width * s)), max(h, round(img.height * s))
    img = img.resize((nw, nh), Image.LANCZOS)
    left, top = (nw - w) // 2, (nh - h) // 2
    return np.asarray(img.crop((left, top, left + w, top + h)))


def list_video_sources(spec: str) -> list[Path]:
    """A video file, a folder of frames (one video), or a folder of video files / frame folders."""
    p = Path(spec)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise TrainingError(f"--videos {spec}: no such file or folder")
    if any(c.suffix.lower() in IMAGE_SUFFIXES for c in p.iterdir()):
        return [p]
    out = [c for c in sorted(p.iterdir()) if (c.is_file() and c.suffix.lower() in VIDEO_SUFFIXES) or
           (c.is_dir() and any(g.suffix.lower() in IMAGE_SUFFIXES for g in c.iterdir()))]
    if not out:
        raise TrainingError(f"--videos {spec}: no video files ({', '.join(sorted(VIDEO_SUFFIXES))}) "
                            f"nor frame folders in it")
    return out


def decode_frames(path: Path, max_frames: int = 0):
    """-> (PIL frames (the first max_frames when > 0), fps), through PyAV, else imageio."""
    try:
        import av  # type: ignore
    except ImportError:
        av = None
    if av is not None:
        try:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    raise TrainingError(f"{path}: the file holds no video stream")
                stream = container.streams.video[0]
                fps = float(stream.average_rate) if stream.average_rate else 0.0
                return [f.to_image() for f in islice(container.decode(stream), max_frames or None)], fps
        except av.error.FFmpegError as err:
            raise TrainingError(f"cannot decode the video {path}: {err}; give a video file FFmpeg reads "
                                f"(e.g. .mp4, .avi) or a folder of its frames as images") from err
    try:
        import imageio.v3 as iio  # type: ignore
    except ImportError as err:
        raise TrainingError(f"reading {path.name} needs PyAV (`pip install av`) or imageio") from err
    fps = float(iio.immeta(path).get("fps", 0.0) or 0.0)
    return [Image.fromarray(a) for a in islice(iio.imiter(path), max_frames or None)], fps


def read_video(path: Path, size: tuple[int, int], frame_step: int = 1, max_frames: int = 0,
               fps: float = 0.0) -> tuple[torch.Tensor, float]:
    """-> uint8 [F, 3, H, W] (every frame_step-th frame, resized and centre-cropped), fps after the step."""
    if path.is_dir():
        files = sorted(c for c in path.iterdir() if c.suffix.lower() in IMAGE_SUFFIXES)
        frames, src_fps = [Image.open(f) for f in files], fps or 10.0
        odd = next(((f, img) for f, img in zip(files, frames) if img.size != frames[0].size), None)
        if odd is not None:
            raise TrainingError(f"{path}: frames of mixed sizes ({files[0].name} is {frames[0].width}x"
                                f"{frames[0].height} px, {odd[0].name} is {odd[1].width}x{odd[1].height}); the "
                                f"frames of one video must all be one size")
    else:
        frames, src_fps = decode_frames(path)
        src_fps = fps or src_fps or 10.0
    frames = frames[::frame_step]
    if max_frames:
        frames = frames[:max_frames]
    if not frames:
        raise TrainingError(f"{path}: no frames could be read")
    arr = np.stack([fit_frame(f, size) for f in frames])  # [F, H, W, 3]
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous(), src_fps / frame_step


def parse_frame_range(text: str | None) -> tuple[int, int] | None:
    """"A,B" -> (A, B): frames A..B-1; None stays None."""
    if text is None:
        return None
    try:
        a, b = (int(v) for v in str(text).split(","))
    except ValueError:
        a, b = -1, -1
    if a < 0 or b <= a:
        raise TrainingError(f"--frame-range {text!r}: expected A,B with 0 <= A < B (frames A..B-1), e.g. 0,600")
    return a, b


def load_videos(spec: str, size: tuple[int, int], frame_step: int = 1, max_frames: int = 0,
                min_frames: int = 1, frame_range: tuple[int, int] | None = None,
                kept: list[int] | None = None) -> tuple[list[torch.Tensor], float]:
    """Every video of `spec` as uint8 [T, 3, H, W] (frames frame_range[0]..[1]-1 only, when given), and the fps.
    Videos shorter than `min_frames` (after the range and step) are skipped; none left is an error. `kept`: a
    list that receives the list_video_sources index of every video returned (to match captions to them)."""
    videos, fps, lengths = [], 0.0, []
    for n, src in enumerate(list_video_sources(spec)):
        v, fps = read_video(src, size, frame_step, max_frames)
        if frame_range is not None:
            v = v[frame_range[0] // frame_step:frame_range[1] // frame_step]
        lengths.append(f"{src.name}: {v.shape[0]}")
        if v.shape[0] >= min_frames:
            videos.append(v)
            if kept is not None:
                kept.append(n)
    if not videos:
        raise TrainingError(f"--videos {spec}: no video has the {min_frames} frames a training clip needs (frames "
                            f"kept: {', '.join(lengths)}); use shorter clips (fewer --frames, a smaller stride) "
                            f"or longer videos")
    return videos, fps


def to_model(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1.0


def random_clips(videos: list[torch.Tensor], n: int, frames: int, stride: int, gen: torch.Generator,
                 flip: bool = False) -> torch.Tensor:
    """n clips of `frames` frames `stride` apart -> float [n, frames, 3, H, W] in -1..1."""
    span = (frames - 1) * stride + 1
    lengths = torch.tensor([max(v.shape[0] - span + 1, 0) for v in videos], dtype=torch.float64)
    out = []
    for _ in range(n):
        vi = int(torch.multinomial(lengths, 1, generator=gen))
        start = int(torch.randint(int(lengths[vi]), (1,), generator=gen))
        clip = to_model(videos[vi][start:start + span:stride])
        if flip and bool(torch.rand((), generator=gen) < 0.5):
            clip = clip.flip(-1)
        out.append(clip)
    return torch.stack(out)
