"""Captioned camera pans for the prompted NUWA-XL model: the camera moves sideways across a strip of
scenes, each a real sky over a real ground (the sources and captions of bench/_scenes.py:
"<sky> over <ground>"), neighbouring scenes cross-faded over a few pixels. Every frame is captioned
with the scene under its centre column, so a video's caption changes where the pan crosses into the
next scene: the prompt schedule says which scene the camera shows when.

    python bench/_xl_pans.py --out outputs/xl_pans [--videos 12] [--seed 0]

writes one frame folder per video (NAME/00000.png ...) and its caption file NAME.txt beside it, one
`FRAME: caption` line where a caption starts (the format `train xl --captions` reads).
bench/xl_text_following.py takes its real frames of each class from here (scene_frames).
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _scenes import GROUNDS, SKIES, _open

FRAME = (64, 48)             # width, height: the shipped NUWA-XL frame size
HORIZON = (16, 22)           # sky height in px, drawn once per video
SECTION = (112, 176)         # width of one scene in the strip, px
FADE = 12                    # cross-fade between neighbouring scenes, px
SPEED = 1                    # px the camera moves per frame
SCALE = {"panoramas/garching.png": (4.0, 6.0), "panoramas/ocean.png": (2.0, 3.0)}
# Skies are cut wider than grounds: a 64 px frame then shows as much of its sky photo as a text-to-image
# scene's top third does (about 400 source px), so each sky keeps what tells it apart (the blue sky's
# clouds, the sunset's orange band). At (2, 3) most frames of every sky were a plain blue-grey strip.
SKY_SCALE = (6.0, 9.0)


def _band(source, size, rng: random.Random, scale: tuple[float, float] | None = None) -> np.ndarray:
    """A random crop of the source box with the band's aspect, `scale` x its size in source pixels (by
    default the source's SCALE), resized to size (width, height) -> float [h, w, 3]."""
    rel, (left, top, right, bottom) = source
    lo, hi = scale or SCALE.get(rel, (2.0, 3.0))
    s = rng.uniform(lo, hi)
    w = min(right - left, round(size[0] * s))
    h = min(bottom - top, round(w * size[1] / size[0]))
    w = min(right - left, round(h * size[0] / size[1]))
    x, y = rng.randint(left, right - w), rng.randint(top, bottom - h)
    crop = _open(rel).crop((x, y, x + w, y + h)).resize(size, Image.Resampling.LANCZOS)
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(crop, dtype=np.float32)


def section(sky: str, ground: str, width: int, horizon: int, rng: random.Random) -> np.ndarray:
    """One scene of the strip [48, width, 3]: the sky above the ground, blended over 4 px at the horizon."""
    h, blend = FRAME[1], 2
    top = _band(SKIES[sky], (width, horizon + blend), rng, SKY_SCALE)
    low = _band(GROUNDS[ground], (width, h - horizon + blend), rng)
    out = np.zeros((h, width, 3), np.float32)
    out[:horizon - blend] = top[:horizon - blend]
    out[horizon + blend:] = low[2 * blend:]
    ramp = np.linspace(0, 1, 2 * blend, dtype=np.float32)[:, None, None]
    out[horizon - blend:horizon + blend] = top[horizon - blend:] * (1 - ramp) + low[:2 * blend] * ramp
    return out


def strip(scenes: list[tuple[str, str]], rng: random.Random) -> tuple[np.ndarray, list[int]]:
    """Scenes side by side, cross-faded over FADE px -> (strip [48, W, 3] float, start column of each scene)."""
    horizon = rng.randint(*HORIZON)
    parts = [section(s, g, rng.randint(*SECTION), horizon, rng) for s, g in scenes]
    out, starts = parts[0], [0]
    for p in parts[1:]:
        ramp = np.linspace(0, 1, FADE, dtype=np.float32)[None, :, None]
        mixed = out[:, -FADE:] * (1 - ramp) + p[:, :FADE] * ramp
        starts.append(out.shape[1] - FADE // 2)
        out = np.concatenate([out[:, :-FADE], mixed, p[:, FADE:]], axis=1)
    return out, starts


def pan(scenes: list[tuple[str, str]], rng: random.Random) -> tuple[list[np.ndarray], list[str]]:
    """The camera moving left to right across the strip: frames [48, 64, 3] uint8 and each frame's caption."""
    s, starts = strip(scenes, rng)
    names = [f"{sky} over {ground}" for sky, ground in scenes]
    frames, caps = [], []
    for x in range(0, s.shape[1] - FRAME[0] + 1, SPEED):
        frames.append(s[:, x:x + FRAME[0]].round().clip(0, 255).astype(np.uint8))
        centre = x + FRAME[0] // 2
        caps.append(names[max(i for i, a in enumerate(starts) if a <= centre)])
    return frames, caps


def caption_lines(caps: list[str]) -> list[str]:
    """Per-frame captions -> `FRAME: caption` lines where a caption starts."""
    return [f"{i}: {c}" for i, c in enumerate(caps) if i == 0 or caps[i - 1] != c]


def video_scenes(n_videos: int, per_video: int, rng: random.Random) -> list[list[tuple[str, str]]]:
    """Every (sky, ground) about equally often; neighbouring scenes differ in their ground."""
    pairs = [(s, g) for s in SKIES for g in GROUNDS]
    pool: list[tuple[str, str]] = []
    out = []
    for _ in range(n_videos):
        chosen: list[tuple[str, str]] = []
        while len(chosen) < per_video:
            if not pool:
                pool = pairs[:]
                rng.shuffle(pool)
            pick = next((p for p in pool if not chosen or p[1] != chosen[-1][1]), pool[0])
            pool.remove(pick)
            chosen.append(pick)
        out.append(chosen)
    return out


def scene_frames(ground: str, n: int, seed: int, with_sky: bool = False) -> list:
    """n real frames [48, 64, 3] uint8 wholly of one ground (skies in turn, random crops and positions);
    with_sky: (frame, sky) pairs."""
    rng = random.Random(seed)
    out = []
    for k in range(n):
        sky = list(SKIES)[k % len(SKIES)]
        s = section(sky, ground, FRAME[0] + 32, rng.randint(*HORIZON), rng)
        x = rng.randint(0, 32)
        frame = s[:, x:x + FRAME[0]].round().clip(0, 255).astype(np.uint8)
        out.append((frame, sky) if with_sky else frame)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--videos", type=int, default=12)
    p.add_argument("--scenes", type=int, default=4, help="scenes per video")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    total = 0
    for n, scenes in enumerate(video_scenes(args.videos, args.scenes, rng)):
        frames, caps = pan(scenes, rng)
        folder = out / f"pan_{n:02d}"
        folder.mkdir(exist_ok=True)
        for k, f in enumerate(frames):
            Image.fromarray(f).save(folder / f"{k:05d}.png")
        (out / f"pan_{n:02d}.txt").write_text("\n".join(caption_lines(caps)) + "\n", encoding="utf-8")
        total += len(frames)
    print(f"{args.videos} captioned pans, {total} frames, in {out}")


if __name__ == "__main__":
    main()
