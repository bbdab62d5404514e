"""The main job on the shipped models: outpaint in every direction and grow a panorama, PNGs into outputs/demo/.

    python -m nuwa_core.demo [--out DIR] [--seed N] [--width-factor K]      the two shipped models
    python -m nuwa_core.demo --model PATH --image PATH [...]                 your own model and image

For each model: a crop from the right end of its image (the part the shipped models were not
trained on) is outpainted to the left, right, up and down, and in all four directions at once (the
appendix's loop circle); the panorama model also grows a panorama `--width-factor` times as wide
as its image, patch by patch.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .checkpoint import CheckpointError
from .images import load_image, save_image
from .infinity.generation import NuwaInfinity
from .infinity.patch_samplers import EPSILON_DEFAULT, SamplerSettings
from .weights import check_listed_file

SHIPPED = Path(__file__).resolve().parent.parent / "models" / "nuwa"
# name: (model, image, patches of the crop (rows, cols), whether to grow a panorama)
DEMOS = {
    "panorama": ("nuwa_infinity_default.safetensors", "nuwa_infinity_default.png", (2, 2), True),
    "painting": ("nuwa_infinity_starry_night.safetensors", "nuwa_infinity_starry_night.jpg", (3, 3), False),
}
EXTENSIONS = {"outpaint_left": dict(left=2), "outpaint_right": dict(right=2), "outpaint_up": dict(up=1),
              "outpaint_down": dict(down=1), "outpaint_all_directions": dict(left=1, right=1, up=1, down=1)}


def run_demo(model: NuwaInfinity, image: torch.Tensor, crop_patches: tuple[int, int], panorama: bool, out: Path,
             settings: SamplerSettings, seed: int, width_factor: int) -> dict:
    """Outpaint a crop of `image` (IMAGE [1, H, W, 3]) at its right end, vertically centred, and
    optionally grow a panorama; PNGs into `out`. -> seconds per job."""
    php, pwp = model.patch_pixels
    rows, cols = image.shape[1] // php, image.shape[2] // pwp
    crop_rows, crop_cols = min(rows, crop_patches[0]), min(cols, crop_patches[1])
    top, left = (rows - crop_rows) // 2 * php, image.shape[2] - crop_cols * pwp
    crop = image[:, top:top + crop_rows * php, left:left + crop_cols * pwp]
    out.mkdir(parents=True, exist_ok=True)
    save_image(crop, out / "input_crop.png")
    canvas = model.canvas_from_image(crop)
    report = {}
    for name, extension in EXTENSIONS.items():
        start = time.perf_counter()
        grown = model.generate(canvas, model.plan_extension(canvas, **extension), settings,
                               generator=torch.Generator().manual_seed(seed))
        save_image(model.decode(grown), out / f"{name}.png")
        report[name] = round(time.perf_counter() - start, 2)
        print(f"{name}: {grown.grid[1]}x{grown.grid[2]} patches in {report[name]} s -> {out / (name + '.png')}")
    if panorama:
        start = time.perf_counter()
        blank = model.blank_canvas(rows, cols * width_factor)
        pano = model.generate(blank, model.plan_fill(blank), settings, generator=torch.Generator().manual_seed(seed))
        pano_image = model.decode(pano)
        save_image(pano_image, out / "panorama.png")
        report["panorama"] = round(time.perf_counter() - start, 2)
        print(f"panorama: {rows}x{cols * width_factor} patches ({pano_image.shape[2]}x{pano_image.shape[1]} px, "
              f"{width_factor}x the image's width) in {report['panorama']} s -> {out / 'panorama.png'}")
    return report


def _load(path: Path) -> NuwaInfinity:
    if not path.is_file():
        raise SystemExit(f"model file not found: {path} (the shipped models live in {SHIPPED})")
    check_listed_file(path)
    try:
        return NuwaInfinity.load(path)
    except CheckpointError as err:  # e.g. a bundle older than the renderer's current layout
        raise SystemExit(f"cannot run the demo on {path}: {err}") from None


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="your own bundle (with --image)")
    parser.add_argument("--image", type=Path, default=None, help="image to outpaint (a crop at its right end)")
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width-factor", type=int, default=4, help="panorama width / image width")
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--epsilon", type=float, default=EPSILON_DEFAULT, help="skip tokens less likely than this")
    parser.add_argument("--candidates", type=int, default=1,
                        help="draws per patch, the one kept that best predicts its neighbours, agrees "
                        "with the other draws and meets its neighbours' edges (default 1)")
    args = parser.parse_args(argv)
    if (args.model is None) != (args.image is None):
        parser.error("give --model and --image together (or neither, for the shipped models)")
    settings = SamplerSettings(top_k=args.top_k, temperature=args.temperature, epsilon=args.epsilon,
                               candidates=args.candidates)
    demos = {"custom": (args.model, args.image, (2, 2), True)} if args.model else \
        {name: (SHIPPED / model, SHIPPED / image, crop, pano) for name, (model, image, crop, pano) in DEMOS.items()}
    report = {}
    for name, (model_path, image_path, crop, pano) in demos.items():
        print(f"[{name}] {model_path.name} on {image_path.name}")
        report[name] = run_demo(_load(model_path), load_image(image_path), crop, pano, args.out / name, settings,
                                args.seed, args.width_factor)
    print(json.dumps({"seconds": report, "out": str(args.out)}))
    return report


if __name__ == "__main__":
    main()
