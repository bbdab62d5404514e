"""The `sample` stage: look at a trained bundle (outpainting a real crop, extending it, a panorama)."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ..images import image_to_model, load_image, save_image
from ..infinity.generation import NuwaInfinity
from ..infinity.patch_samplers import SamplerSettings


def sample_bundle(args) -> dict:
    """Outpaint a crop of a real image on every side, extend it to the right, and fill a blank
    panorama; writes PNGs (and the VQGAN reconstruction of the crop) to --out-dir."""
    m = NuwaInfinity.load(args.model)
    out_dir = Path(args.out_dir)
    settings = SamplerSettings(top_k=args.top_k, temperature=args.temperature)
    written = {}

    def gen():
        return torch.Generator().manual_seed(args.seed)

    if args.image:
        image = load_image(args.image)
        if args.downscale > 1:
            x = F.interpolate(image.permute(0, 3, 1, 2), scale_factor=1 / args.downscale, mode="area")
            image = x.permute(0, 2, 3, 1).clamp(0, 1)
        php, pwp = m.patch_pixels
        h, w = image.shape[1:3]
        rows, cols = min(h // php, args.rows), min(w // pwp, args.cols)
        left = (w - cols * pwp) // 2
        crop = image[:, :rows * php, left:left + cols * pwp]
        save_image(crop, out_dir / "input.png")
        st = m.canvas_from_image(crop, fit="crop")
        # re-encode in patch-sized windows, as the renderer was trained (canvas_from_image uses 16-token tiles)
        t = max(m.patch_size[1:])
        st.tokens[:, :1] = m.vqgan.encode_tokens_tiled(image_to_model(crop), tile=t, overlap=t // 4)[:, None]
        recon = NuwaInfinity.decode(m, dataclasses.replace(st, given=None))
        save_image(recon, out_dir / "vqgan_reconstruction.png")
        o = m.generate(st, m.plan_extension(st, left=1, right=1, up=1, down=1), settings, generator=gen())
        save_image(m.decode(o), out_dir / "outpaint_all_sides.png")
        r = m.generate(st, m.plan_extension(st, right=args.extend), settings, generator=gen())
        save_image(m.decode(r), out_dir / "extend_right.png")
        written.update(input=crop.shape, outpaint=o.grid, extend_right=r.grid)
    st = m.blank_canvas(args.rows, args.pano_cols)
    p = m.generate(st, m.plan_fill(st), settings, generator=gen())
    save_image(m.decode(p), out_dir / "panorama_from_blank.png")
    written["panorama"] = p.grid
    print(f"[train] samples written to {out_dir}: {written}", file=sys.stderr)
    return {"stopped": "done", **{k: str(v) for k, v in written.items()}}


def add_arguments(p) -> None:
    p.add_argument("--model", required=True)
    p.add_argument("--image", default=None, help="a real image to outpaint (its centre crop)")
    p.add_argument("--downscale", type=int, default=1)
    p.add_argument("--rows", type=int, default=2, help="patch rows of the crop / panorama")
    p.add_argument("--cols", type=int, default=3, help="patch columns of the crop")
    p.add_argument("--extend", type=int, default=4, help="patches to extend the crop to the right")
    p.add_argument("--pano-cols", type=int, default=8)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="outputs/samples")


def run(args) -> dict:
    return sample_bundle(args)
