"""`python -m nuwa_core.train STAGE ...`: one subcommand per training stage.

NUWA-Infinity: `one-shot` (both stages on one image in a time budget: one_shot.py),
`vqgan` (the tokenizer), `renderer` (render-and-optimize, Algorithm 1), `bundle`
(swap a fine-tuned decoder into a trained model), `sample` (look at a trained model).
`pgvqgan` (the Pixel-Guided VQGAN decoder for video, on frame pairs).
Prompts: `text` (the pack's small text encoder, on captioned images).
NUWA-XL: `t_klvae` (the temporal KL-VAE), `xl` (Mask Temporal Diffusion).
Every training stage runs through loop.Run: resume, checkpoints, stop requests, DDP, logging.
"""
from __future__ import annotations

import argparse
import functools
import sys

import torch

from ..checkpoint import CheckpointError
from . import bundle, one_shot, pgvqgan, renderer, sample, t_klvae, text, vqgan, xl
from .arguments import image_arguments, video_arguments
from .loop import TrainingError

# stage: (module with add_arguments(parser) and run(args) -> dict, help, the data it trains on)
STAGES = {
    "vqgan": (vqgan, "train / fine-tune the VQGAN tokenizer", image_arguments),
    "renderer": (renderer, "render-and-optimize training of the renderer (images or videos)",
                 functools.partial(image_arguments, videos=True)),
    "text": (text, "train the pack's small text encoder contrastively on captioned images (.txt beside each)",
             image_arguments),
    "one-shot": (one_shot, "tokenizer + renderer of one image in a time budget (IMAGE --minutes N --out FILE)", None),
    "sample": (sample, "sample a trained bundle: outpainting and a panorama, as PNGs", None),
    "bundle": (bundle, "swap a fine-tuned decoder (same tokens) into a trained bundle", None),
    "pgvqgan": (pgvqgan, "train a Pixel-Guided VQGAN decoder on pairs of consecutive video frames", video_arguments),
    "t_klvae": (t_klvae, "fine-tune / train the T-KLVAE (NUWA-XL) on videos", video_arguments),
    "xl": (xl, "train Mask Temporal Diffusion (NUWA-XL) on long videos", video_arguments),
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
    for name in ("steps", "batch", "frame_step", "frames", "max_stride"):
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
