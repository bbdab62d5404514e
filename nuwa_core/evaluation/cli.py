"""`python -m nuwa_core.eval IMAGE [--reference REAL] [--patch PX] [--json-out F] ...`

Prints notes and then, as its last stdout line, one JSON object with every metric it could compute
(``null`` for those it could not); the metrics are in evaluation/metrics.py. See ``--help``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from ..images import load_image
from .metrics import EvalInputError, evaluate


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m nuwa_core.eval",
        description="Offline metrics for a generated image: seam ratio, Laplacian SWD ratio to a real "
                    "reference, FD-EffLite0 (optional packages), drift along the long axis, PSNR/SSIM. "
                    "The last stdout line is one JSON object.")
    p.add_argument("image", help="generated image file (RGBA is composited over white)")
    p.add_argument("--reference", help="real image to compare with (SWD ratio, FD-EffLite0, PSNR/SSIM)")
    p.add_argument("--patch", type=int, nargs="+", metavar="PX",
                   help="patch size in pixels (one value, or height width); needed for seam_ratio")
    p.add_argument("--json-out", help="also write the JSON object to this file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--swd-descriptors", type=int, default=8192, help="7x7 descriptors per pyramid level")
    p.add_argument("--no-fd", action="store_true", help="skip FD-EffLite0 (the slowest metric)")
    p.add_argument("--fd-block", type=int, default=128, help="block size in pixels for FD-EffLite0")
    p.add_argument("--fd-stride", type=int, default=None, help="block step for FD-EffLite0 (default: the block)")
    p.add_argument("--drift-window", type=int, default=None, help="drift window in pixels (default: short side)")
    p.add_argument("--crop", type=int, nargs=4, metavar=("X", "Y", "W", "H"),
                   help="region compared by PSNR/SSIM (e.g. a held-out crop)")
    args = p.parse_args(argv)
    try:
        image = load_image(args.image)
        reference = load_image(args.reference) if args.reference else None
        patch = None
        if args.patch:
            if len(args.patch) > 2:
                raise EvalInputError(f"--patch takes one or two values (height width), got {args.patch}")
            patch = args.patch[0] if len(args.patch) == 1 else tuple(args.patch)
        else:
            print("note: no --patch given, seam_ratio is null", file=sys.stderr)
        if reference is None:
            print("note: no --reference given, swd_ratio / FD-EffLite0 / PSNR / SSIM are null", file=sys.stderr)
        result = {"image": str(args.image), "reference": args.reference}
        result.update(evaluate(image, reference, patch, seed=args.seed, n_descriptors=args.swd_descriptors,
                               fd=not args.no_fd, fd_block=args.fd_block, fd_stride=args.fd_stride,
                               drift_window=args.drift_window, crop=args.crop))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    line = json.dumps(result, allow_nan=False)
    if args.json_out:
        out = Path(args.json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(line + "\n")
    print(line, flush=True)
    return 0
