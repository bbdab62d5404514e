"""`python -m nuwa_core.train STAGE ...`: one subcommand per training stage.

NUWA-Infinity: `one-shot` (both stages on one image in a time budget: one_shot.py),
`vqgan` (the tokenizer), `renderer` (render-and-optimize, Algorithm 1), `bundle`
(swap a fine-tuned decoder into a trained model), `sample` (look at a trained model).
NUWA-XL: `t_klvae` (the temporal KL-VAE), `xl` (Mask Temporal Diffusion).
Every training stage runs through loop.Run: resume, checkpoints, stop requests, DDP, logging.
"""
from __future__ import annotations

import argparse
import sys

import torch

from ..checkpoint import CheckpointError
from . import bundle, one_shot, renderer, sample, t_klvae, vqgan, xl
from .loop import TrainingError


def _training_arguments(p, batch: int, batch_help: str | None = None) -> None:
    """What every training stage (anything run through loop.Run) takes."""
    p.add_argument("--out", required=True, help="output .safetensors (training state goes next to it)")
    p.add_argument("--steps", type=int, default=100000)
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop (and save) after this wall time: a safety "
                   "stop; where a run ends is better given in steps (--steps, --stop-at)")
    p.add_argument("--stop-at", type=int, default=0, help="save and stop at this step, to continue later with "
                   "--resume and the same --steps (the learning-rate schedule runs over --steps)")
    p.add_argument("--batch", type=int, default=batch, help=batch_help)
    p.add_argument("--lr", type=float, help="learning rate (default: the stage's DEFAULT_LR)")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up of the learning rate, in optimizer steps")
    p.add_argument("--decay", choices=("none", "linear"), default="none", help="after the warm-up: constant, or "
                   "linear decay to 0 at --steps (NUWA-Infinity appendix A; the renderer's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--save-dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    p.add_argument("--sample-every", type=int, default=0)
    p.add_argument("--sample-dir", default=None)
    p.add_argument("--log-dir", default=None, help="write a CSV log here")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--debug-nan-at", type=int, default=None, help=argparse.SUPPRESS)


def _image_arguments(p) -> None:
    p.add_argument("--images", required=True, help="an image file or a folder of images")
    _training_arguments(p, batch=8)
    p.add_argument("--one-shot", action="store_true", help="random augmented crops of one large image (appendix D)")
    p.add_argument("--downscale", type=int, default=1, help="shrink the training images by this factor first")
    p.add_argument("--train-box", default=None, metavar="X,Y,W,H", help="train only on this box of every image "
                   "(pixels after --downscale), holding the rest out: a model evaluated on continuing into a region "
                   "must never have trained on it")
    p.add_argument("--debug-dump-replicas", action="store_true", help=argparse.SUPPRESS)


def _video_arguments(p) -> None:
    p.add_argument("--videos", required=True, help="a video file (PyAV/imageio), a folder of frames, or a "
                   "folder of videos / frame folders")
    p.add_argument("--size", default="64x48", help="frame size WIDTHxHEIGHT after resize + centre crop")
    p.add_argument("--frame-step", type=int, default=1, help="keep every N-th video frame")
    p.add_argument("--max-frames", type=int, default=0, help="use at most this many frames per video (0: all)")
    _training_arguments(p, batch=4, batch_help="clips per step")


# stage: (module with add_arguments(parser) and run(args) -> dict, help, the data it trains on)
STAGES = {
    "vqgan": (vqgan, "train / fine-tune the VQGAN tokenizer", _image_arguments),
    "renderer": (renderer, "render-and-optimize training of the renderer", _image_arguments),
    "one-shot": (one_shot, "tokenizer + renderer of one image in a time budget (IMAGE --minutes N --out FILE)", None),
    "sample": (sample, "sample a trained bundle: outpainting and a panorama, as PNGs", None),
    "bundle": (bundle, "swap a fine-tuned decoder (same tokens) into a trained bundle", None),
    "t_klvae": (t_klvae, "fine-tune / train the T-KLVAE (NUWA-XL) on videos", _video_arguments),
    "xl": (xl, "train Mask Temporal Diffusion (NUWA-XL) on long videos", _video_arguments),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nuwa_core.train", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="stage", required=True)
    for name, (module, help_text, data_arguments) in STAGES.items():
        s = sub.add_parser(name, help=help_text, description=module.__doc__)
        if data_arguments is not None:
            data_arguments(s)
        module.add_arguments(s)
        s.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("steps", "batch", "frame_step"):
        if getattr(args, name, 1) < 1:
            raise TrainingError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return STAGES[args.stage][0].run(args)


def cli(argv=None) -> int:
    try:
        res = main(argv)
    except (TrainingError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 130 if res.get("stopped") == "signal" else 0
