"""`python -m nuwa_core.eval IMAGE [--reference REAL] [--patch PX] [--json-out F] ...` (one image) and
`python -m nuwa_core.eval continuation MODEL --image REF --heldout X Y W H ...` (held-out continuation).

Both print a readable table with control rows and then, as their last stdout line, one JSON object
with every figure (``null`` where one could not be computed); notes go to stderr. The metrics are in
evaluation/metrics.py and region_scores.py, the controls in controls.py, the protocol in
continuation.py. See ``--help`` of each form.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from ..images import load_image
from .metrics import EvalInputError, evaluate

SUBCOMMANDS = ("continuation",)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "continuation":
        return continuation_main(argv[1:])
    return image_main(argv)


def _write(result: dict, json_out: str | None) -> None:
    line = json.dumps(result, allow_nan=False)
    if json_out:
        out = Path(json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(line + "\n")
    print(line, flush=True)


# ------------------------------------------------------------------------------------ one image

def image_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m nuwa_core.eval",
        description="Offline metrics for a generated image: seam ratio, Laplacian SWD ratio to a real "
                    "reference, FD-EffLite0 (optional packages), drift along the long axis, PSNR/SSIM, with "
                    "control rows (the reference's own scores, a patchwork of the reference). The last stdout "
                    "line is one JSON object.",
        epilog="Held-out continuation (does a model use its context? scores with controls: random real crops, "
               "a patchwork, patch nearest neighbour, i.i.d. tokens): "
               "python -m nuwa_core.eval continuation MODEL --image REF --heldout X Y W H  "
               "(see python -m nuwa_core.eval continuation --help). An image file named 'continuation' "
               "is given as ./continuation.")
    p.add_argument("image", help="generated image file (RGBA is composited over white)")
    p.add_argument("--reference", help="real image to compare with (SWD ratio, FD-EffLite0, PSNR/SSIM, controls)")
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
    p.add_argument("--no-controls", action="store_true", help="skip the control rows (reference, patchwork)")
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
            print("note: no --reference given, swd_ratio / FD-EffLite0 / PSNR / SSIM / controls are null",
                  file=sys.stderr)
        result = {"image": str(args.image), "reference": args.reference}
        result.update(evaluate(image, reference, patch, seed=args.seed, n_descriptors=args.swd_descriptors,
                               fd=not args.no_fd, fd_block=args.fd_block, fd_stride=args.fd_stride,
                               drift_window=args.drift_window, crop=args.crop))
        result["controls"] = None
        if reference is not None and not args.no_controls:
            from .controls import single_image_controls
            result["controls"] = single_image_controls(reference, patch, args.seed, n_descriptors=args.swd_descriptors)
            print(_image_table(result), flush=True)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _write(result, args.json_out)
    return 0


def _image_table(result: dict) -> str:
    def f(v):
        return "-" if v is None else f"{v:.2f}"
    c = result["controls"]
    rows = [("image", result.get("seam_ratio"), result.get("swd_ratio")),
            ("reference", c["reference"]["seam_ratio"], c["reference"]["swd_ratio"]),
            ("patchwork of reference", c["patchwork"]["seam_ratio"], c["patchwork"]["swd_ratio"])]
    lines = [f"{'':24s}{'seam ratio':>12s}{'SWD ratio':>12s}"]
    lines += [f"{name:24s}{f(seam):>12s}{f(swd):>12s}" for name, seam, swd in rows]
    lines.append("controls: the reference's SWD ratio is 1 by definition (its halves); the patchwork keeps all "
                 "real texture, so SWD rates it about as real. A decode that cross-fades over patch borders "
                 "reads a seam ratio near 1 whatever the content: measure seams on a hard-cut decode, and "
                 "coherence with `python -m nuwa_core.eval continuation`.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- continuation

def continuation_main(argv: Sequence[str]) -> int:
    from .continuation import ACROSS_SEEDS, ROWS, SCORES, evaluate_continuation, format_table
    from .region_scores import DIRECTIONS
    p = argparse.ArgumentParser(
        prog="python -m nuwa_core.eval continuation",
        description="Held-out continuation: cut a window of whole patches inside the held-out box, give the "
                    "model the part on the far side of each direction, generate the rest, and score it and "
                    f"every control ({', '.join(ROWS[1:])}) against the truth: {', '.join(SCORES)} per seed, "
                    f"{', '.join(ACROSS_SEEDS)} over all seeds' draws (a proper score; 2 or more seeds). Prints a "
                    "table per direction and, as the last stdout line, one JSON object. The model must not "
                    "have trained on the held-out box. Details: nuwa_core/evaluation/continuation.py.")
    p.add_argument("model", help="NUWA-Infinity bundle (.safetensors)")
    p.add_argument("--image", required=True, help="the reference image the model was trained on (without the box)")
    p.add_argument("--heldout", type=int, nargs=4, required=True, metavar=("X", "Y", "W", "H"),
                   help="held-out box in pixels of the reference")
    p.add_argument("--directions", nargs="+", default=list(DIRECTIONS), choices=DIRECTIONS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="one draw each (default 0 1 2); the energy score needs 2 or more")
    p.add_argument("--top-k", type=int, default=100, help="sampler top-k (default 100, as the README's tables)")
    p.add_argument("--epsilon", type=float, default=0.01, help="sampler epsilon (default 0.01)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--candidates", type=int, default=1,
                   help="draws per patch, the one kept that best predicts its neighbours, agrees "
                   "with the other draws and meets its neighbours' edges (default 1)")
    p.add_argument("--extent", type=int, nargs=3, metavar=("F", "H", "W"),
                   help="context extent for generation (default the trained one; 0 0 0 = no context)")
    p.add_argument("--window", type=int, nargs=2, metavar=("ROWS", "COLS"),
                   help="window in patches (default: as many as fit the held-out box)")
    p.add_argument("--given", type=int, help="patches given along the direction (default half, at least 1)")
    p.add_argument("--block", type=int, default=8, help="block size in px of the low-res scores (default 8)")
    p.add_argument("--band", type=int, default=16, help="band in px beside the boundary for its seam ratio")
    p.add_argument("--nn-band", type=int, help="patch-NN's matched band in px (default one patch)")
    p.add_argument("--hardcut-gap", type=int, default=4, help="px skipped each side of a border by the hard-cut "
                                                               "seam ratio (0 = adjacent pixels)")
    p.add_argument("--swd-descriptors", type=int, default=2048, help="7x7 descriptors per pyramid level")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json-out", help="also write the JSON object to this file")
    args = p.parse_args(argv)
    try:
        import torch

        from ..infinity.generation import NuwaInfinity
        from ..infinity.patch_samplers import SamplerSettings
        reference = load_image(args.image)
        model = NuwaInfinity.load(args.model, device=args.device)
        settings = SamplerSettings(top_k=args.top_k, epsilon=args.epsilon, temperature=args.temperature,
                                   candidates=args.candidates)
        with torch.no_grad():
            result = evaluate_continuation(
                reference, args.heldout, model, directions=args.directions, seeds=args.seeds, settings=settings,
                extent=args.extent, window_patches=args.window, given_patches=args.given, block=args.block,
                band=args.band, nn_band=args.nn_band, hardcut_gap=args.hardcut_gap,
                swd_descriptors=args.swd_descriptors)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = {"model": str(args.model), "image": str(args.image), **result}
    print(format_table(result), flush=True)
    _write(result, args.json_out)
    return 0
