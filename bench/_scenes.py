"""The captioned scenes the shipped text models learn from: a real sky over a real ground, each cut from
the photos and panoramas in ../shared/data, captioned "<sky> over <ground>".

Three skies x three grounds: every sky appears over every ground and every ground under every sky,
so a caption's two halves each name something the picture shows (one photo, several captions).

    python bench/_scenes.py --out outputs/scenes [--per-pair 6] [--seed 0] [--pans]

writes NAME.png + NAME.txt pairs (the layout `train text` / `train renderer` read as captions); with
--pans, the same scenes as camera pans instead (the text-to-video data): a frame folder NAME/ of
square crops of the full height from the left edge to the right (25 frames of 192 x 192), each
PAN_STEP px right of the last, and NAME.txt.
bench/text_following.py builds the same scenes in memory for its classifier and controls.
"""
from __future__ import annotations

import argparse
import functools
import random
from pathlib import Path

import numpy as np
from _data import SHARED_DATA as DATA
from PIL import Image

SIZE = (384, 192)  # width, height: 6 x 3 patches of the shipped renderer (64 px)
HORIZON = 80       # px from the top, +- HORIZON_JITTER
HORIZON_JITTER = 12
PAN_STEP = 8       # px the camera moves per frame: one token of the f8 tokenizer

# name -> (file, box (left, top, right, bottom) in the source's pixels where the crops are taken)
SKIES = {
    "a blue sky": ("landscapes/picosdeeuropa_by_Aitzol_Berasategi_CC-BY-4.0.jpg", (0, 0, 900, 260)),
    "a sunset sky": ("landscapes/after-the-rain_by_stefonarch_CC-BY-SA-3.0.jpg", (0, 0, 1536, 520)),
    "a grey sky": ("landscapes/fog_by_stefonarch_CC-BY-SA-3.0.jpg", (0, 0, 1536, 400)),
}
GROUNDS = {
    "the sea": ("panoramas/ocean.png", (0, 16, 2048, 256)),
    "a flower field": ("panoramas/garching.png", (0, 72, 4096, 512)),
    "a green meadow": ("landscapes/aitzgorri_by_Aitzol_Berasategi_CC-BY-4.0.jpg", (0, 760, 1536, 1023)),
}
# what a sky's clouds look like, as a test on a band's pixels [h, w, 3] in 0..1 (numpy or torch): the blue
# sky's white clouds, the sunset's orange plumes (the grey sky has none); bench/text_following.py splits
# its blue skies by the first
CLOUD_PIXELS = {
    "a blue sky": lambda band: (band > 0.7).all(-1),
    "a sunset sky": lambda band: band[..., 0] - band[..., 2] > 50 / 255,
}
# a crop is SCALE x the target band's size in source pixels (more for the large panorama)
SCALE = {"panoramas/garching.png": (2.5, 3.5), "panoramas/ocean.png": (1.2, 2.0)}


def data_dir() -> Path:
    if not DATA.is_dir():
        raise SystemExit(f"the real data is not where it is looked for: {DATA} (../shared/data beside the repo)")
    return DATA


@functools.lru_cache(maxsize=None)
def _open(rel: str) -> Image.Image:
    """A source as RGB, read once (panoramas: only fully opaque rows are inside the boxes)."""
    return Image.open(data_dir() / rel).convert("RGB")


def _band(source: tuple[str, tuple], size: tuple[int, int], rng: random.Random) -> Image.Image:
    """A random crop of the source box, of the band's aspect, resized to `size` (width, height)."""
    rel, (left, top, right, bottom) = source
    lo, hi = SCALE.get(rel, (1.0, 1.6))
    s = rng.uniform(lo, hi)
    w, h = min(right - left, round(size[0] * s)), min(bottom - top, round(size[1] * s))
    x, y = rng.randint(left, right - w), rng.randint(top, bottom - h)
    crop = _open(rel).crop((x, y, x + w, y + h)).resize(size, Image.Resampling.LANCZOS)
    return crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop


def scene(sky: str, ground: str, rng: random.Random, cloudy: float = 0.0) -> Image.Image:
    """One picture: the sky's band above the ground's, blended over 8 px at a jittered horizon.
    cloudy: a sky that has clouds (CLOUD_PIXELS) is cropped again until they cover this share of its band."""
    horizon = HORIZON + rng.randint(-HORIZON_JITTER, HORIZON_JITTER)
    blend = 8
    top = np.asarray(_band(SKIES[sky], (SIZE[0], horizon + blend), rng), dtype=np.float32)
    while cloudy and sky in CLOUD_PIXELS and CLOUD_PIXELS[sky](top / 255).mean() < cloudy:
        top = np.asarray(_band(SKIES[sky], (SIZE[0], horizon + blend), rng), dtype=np.float32)
    low = np.asarray(_band(GROUNDS[ground], (SIZE[0], SIZE[1] - horizon + blend), rng), dtype=np.float32)
    out = np.zeros((SIZE[1], SIZE[0], 3), np.float32)
    out[:horizon - blend] = top[:horizon - blend]
    out[horizon + blend:] = low[2 * blend:]
    ramp = np.linspace(0, 1, 2 * blend, dtype=np.float32)[:, None, None]
    out[horizon - blend:horizon + blend] = top[horizon - blend:] * (1 - ramp) + low[:2 * blend] * ramp
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))


def captions() -> list[str]:
    return [f"{sky} over {ground}" for sky in SKIES for ground in GROUNDS]


def scenes(per_pair: int, seed: int, cloudy: float = 0.0) -> list[tuple[str, Image.Image]]:
    """per_pair pictures of every (sky, ground): [(caption, image)], the same for the same seed."""
    rng = random.Random(seed)
    return [(f"{sky} over {ground}", scene(sky, ground, rng, cloudy))
            for sky in SKIES for ground in GROUNDS for _ in range(per_pair)]


def pan(img: Image.Image) -> list[Image.Image]:
    """A scene -> square frames of its full height, a camera panning right across it PAN_STEP px a frame."""
    side = img.height
    return [img.crop((x, 0, x + side, side)) for x in range(0, img.width - side + 1, PAN_STEP)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--per-pair", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pans", action="store_true", help="write each scene as a frame folder of a camera pan")
    p.add_argument("--cloudy", type=float, default=0.0,
                   help="crop the blue and sunset skies again until their clouds cover this share of the band "
                        "(0: any crop)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for n, (caption, img) in enumerate(scenes(args.per_pair, args.seed, args.cloudy)):
        stem = f"{n:03d}_{caption.replace(' ', '_')}"
        if args.pans:
            (out / stem).mkdir(exist_ok=True)
            for k, frame in enumerate(pan(img)):
                frame.save(out / stem / f"{k:05d}.png")
        else:
            img.save(out / f"{stem}.png")
        (out / f"{stem}.txt").write_text(caption + "\n", encoding="utf-8")
    print(f"{n + 1} captioned {'pans' if args.pans else 'scenes'} in {out}")


if __name__ == "__main__":
    main()
