"""The main job on the shipped default model: outpaint and grow a panorama, PNGs into outputs/demo/.

    python -m nuwa_core.demo [--model PATH] [--image PATH] [--out DIR] [--seed N] [--width-factor K]

1. Outpaint a crop of the shipped training image to the left, right, up and down, and in all
   four directions at once (the appendix's loop circle).
2. Grow a panorama `--width-factor` times wider than the training image, patch by patch.
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
DEFAULT_MODEL = SHIPPED / "nuwa_infinity_default.safetensors"
DEFAULT_IMAGE = SHIPPED / "nuwa_infinity_default.png"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="image to outpaint (a crop is used)")
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width-factor", type=int, default=4, help="panorama width / training image width")
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--epsilon", type=float, default=EPSILON_DEFAULT, help="skip tokens less likely than this")
    args = parser.parse_args(argv)
    if not args.model.is_file():
        raise SystemExit(f"model file not found: {args.model} (the shipped default lives in {SHIPPED})")
    check_listed_file(args.model)
    try:
        model = NuwaInfinity.load(args.model)
    except CheckpointError as err:  # e.g. a bundle older than the renderer's current layout
        raise SystemExit(f"cannot run the demo on {args.model}: {err}") from None
    settings = SamplerSettings(top_k=args.top_k, temperature=args.temperature, epsilon=args.epsilon)
    image = load_image(args.image)  # [1, H, W, 3]
    php, pwp = model.patch_pixels
    rows, cols = image.shape[1] // php, image.shape[2] // pwp
    crop_cols = min(cols, 4)
    top, left = (rows - min(rows, 2)) // 2 * php, (cols - crop_cols) // 2 * pwp
    crop = image[:, top:top + min(rows, 2) * php, left:left + crop_cols * pwp]
    args.out.mkdir(parents=True, exist_ok=True)
    save_image(crop, args.out / "input_crop.png")
    canvas = model.canvas_from_image(crop)
    report = {}
    jobs = {"outpaint_left": dict(left=2), "outpaint_right": dict(right=2), "outpaint_up": dict(up=1),
            "outpaint_down": dict(down=1), "outpaint_all_directions": dict(left=2, right=2, up=1, down=1)}
    for name, extension in jobs.items():
        start = time.perf_counter()
        out = model.generate(canvas, model.plan_extension(canvas, **extension), settings,
                             generator=torch.Generator().manual_seed(args.seed))
        save_image(model.decode(out), args.out / f"{name}.png")
        report[name] = round(time.perf_counter() - start, 2)
        print(f"{name}: {out.grid[1]}x{out.grid[2]} patches in {report[name]} s -> {args.out / (name + '.png')}")
    panorama_cols = cols * args.width_factor
    start = time.perf_counter()
    blank = model.blank_canvas(rows, panorama_cols)
    pano = model.generate(blank, model.plan_fill(blank), settings, generator=torch.Generator().manual_seed(args.seed))
    pano_image = model.decode(pano)
    save_image(pano_image, args.out / "panorama.png")
    report["panorama"] = round(time.perf_counter() - start, 2)
    print(f"panorama: {rows}x{panorama_cols} patches ({pano_image.shape[2]}x{pano_image.shape[1]} px, "
          f"{args.width_factor}x the training width) in {report['panorama']} s -> {args.out / 'panorama.png'}")
    print(json.dumps({"seconds": report, "out": str(args.out)}))
    return report


if __name__ == "__main__":
    main()
