"""A tokenizer's round trip over a picture, as a canvas encodes and decodes it, on the part it was
trained on and on the part it never saw (issue 11: a renderer cannot place what its tokens cannot hold).

    python bench/tokenizer_round_trip.py [MODEL_OR_VQGAN ...] [--image PICTURE] [--split X]

Each file (a NUWA-Infinity bundle or a VQGAN file) encodes the picture in patch-sized windows and
decodes it as `NuwaInfinity.decode` does (windows cross-faded, no given pixels pasted back); the
picture is cut to whole 64 px patches. Scores, left of x = --split (trained on) and right of it
(held out): low-res PSNR (8 x 8 px block means against the truth's: the layout a renderer composes
from tokens) and full-resolution PSNR. Control rows in the same run: each token's true mean colour
spread over its 8 x 8 px (what a perfect low-res code keeps: infinite low-res PSNR, the full-resolution
PSNR of losing all detail inside a token), and the truth moved by one token (real pixels from the wrong
place). Default: the shipped painting model on The Starry Night, split at x = 512. Last line: one JSON
object. `--sheet FILE` also draws the truth and each file's round trip side by side at half size, a
white line at the split.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from nuwa_core.checkpoint import read_metadata
from nuwa_core.evaluation.metrics import psnr
from nuwa_core.evaluation.region_scores import block_means, lowres_psnr
from nuwa_core.images import load_image, save_image
from nuwa_core.infinity.generation import NuwaInfinity
from nuwa_core.infinity.vqgan import KIND as VQGAN_KIND, load_vqgan

PAINTING_MODEL = REPO / "models" / "nuwa" / "nuwa_infinity_starry_night.safetensors"
PAINTING = REPO / "models" / "nuwa" / "nuwa_infinity_starry_night.jpg"
PATCH_PX = 64


def with_tokenizer(path: str, host: NuwaInfinity | None) -> NuwaInfinity:
    """The bundle in `path`, or for a VQGAN file `host` (else the shipped painting model: its canvas
    windows) holding that tokenizer."""
    if read_metadata(path).get("nuwa_kind") != VQGAN_KIND:
        return NuwaInfinity.load(path)
    host = host or NuwaInfinity.load(PAINTING_MODEL)
    host.vqgan = load_vqgan(path).float().eval()
    return host


def decoded(host: NuwaInfinity, image: torch.Tensor) -> torch.Tensor:
    """image [1, H, W, 3] through host's tokenizer, encoded and decoded as a canvas -> [1, H, W, 3]."""
    state = host.canvas_from_image(image, fit="refuse")
    state.given = None  # the tokens' own pixels everywhere
    return host.decode(state)[:1]


def scores(image: torch.Tensor, truth: torch.Tensor, split: int) -> dict:
    parts = {"trained": slice(0, split), "held_out": slice(split, truth.shape[2])}
    return {name: {"lowres_psnr": lowres_psnr(image[:, :, s], truth[:, :, s], 8),
                   "psnr": psnr(image[:, :, s], truth[:, :, s], cap=100.0)} for name, s in parts.items()}


def sheet(pictures: list[torch.Tensor], split: int) -> torch.Tensor:
    """[1, H, W, 3] pictures -> one IMAGE: each at half size, a white line at the split, 8 px apart."""
    halves = []
    for x in pictures:
        x = x.clone()
        x[:, :, split - 1:split + 1] = 1.0
        halves.append(F.avg_pool2d(x.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1))
    gap = torch.ones(1, halves[0].shape[1], 8, 3)
    return torch.cat([part for x in halves for part in (x, gap)][:-1], dim=2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", default=[str(PAINTING_MODEL)], help="bundles or VQGAN files")
    p.add_argument("--image", default=str(PAINTING))
    p.add_argument("--split", type=int, default=512, help="x (px) where the held-out part starts")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sheet", help="also draw the truth and each round trip, side by side, into this image file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    truth = load_image(args.image)[:1]
    h, w = truth.shape[1] // PATCH_PX * PATCH_PX, truth.shape[2] // PATCH_PX * PATCH_PX
    truth = truth[:, :h, :w]
    if not 0 < args.split < w:
        p.error(f"--split {args.split} must lie inside the picture cut to whole patches (0 < x < {w})")
    rows, pictures, host = {}, [truth], None
    with torch.no_grad():
        for path in args.files:
            host = with_tokenizer(path, host)
            pictures.append(decoded(host, truth))
            rows[path] = scores(pictures[-1], truth, args.split)
    if args.sheet:
        save_image(sheet(pictures, args.split), args.sheet)
    token_means = F.interpolate(block_means(truth, 8).float(), scale_factor=8, mode="nearest").permute(0, 2, 3, 1)
    rows["control: each token's true mean colour"] = scores(token_means, truth, args.split)
    rows["control: the truth moved by one token"] = scores(truth.roll(8, dims=2), truth, args.split)
    print(f"{'row':48s} {'trained: low-res / full':>26s} {'held out: low-res / full':>26s}")
    for name, s in rows.items():
        cells = [f"{s[k]['lowres_psnr']:6.2f} / {s[k]['psnr']:5.2f}" for k in ("trained", "held_out")]
        print(f"{name:48s} {cells[0]:>26s} {cells[1]:>26s}")
    print(json.dumps({"image": Path(args.image).name, "split": args.split, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
