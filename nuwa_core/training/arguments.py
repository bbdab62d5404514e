"""The command-line arguments the training stages share (cli.py builds the parsers; one_shot.py builds
the two stages it runs the same way)."""
from __future__ import annotations

import argparse


def training_arguments(p, batch: int, batch_help: str | None = None) -> None:
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


def image_arguments(p, videos: bool = False) -> None:
    """videos: the stage also trains on videos (--videos, --frames, ...), given instead of --images."""
    if videos:
        source = p.add_mutually_exclusive_group(required=True)
        source.add_argument("--images", help="an image file or a folder of images")
        source.add_argument("--videos", help="a video file (PyAV), a folder of frames, or a folder of videos / frame "
                            "folders: samples are clips of --frames patch-frames")
        p.add_argument("--video-size", default="256x192", help="with --videos: frame size WIDTHxHEIGHT after resize + "
                       "centre crop")
        p.add_argument("--frames", type=int, default=2, help="with --videos: patch-frames per training sample (at "
                       "least e_f + 1, so the whole frame extent is trained)")
        p.add_argument("--max-stride", type=int, default=1, help="with --videos: a clip's frames are S apart, S drawn "
                       "from 1..N per sample (temporal augmentation: motions of several speeds)")
        p.add_argument("--frame-range", default=None, metavar="A,B", help="with --videos: train only on frames "
                       "A..B-1 of every video (the rest held out for evaluation)")
    else:
        p.add_argument("--images", required=True, help="an image file or a folder of images")
    training_arguments(p, batch=8)
    p.add_argument("--one-shot", action="store_true", help="random augmented crops of one large image (appendix D)")
    p.add_argument("--downscale", type=int, default=1, help="shrink the training images by this factor first")
    p.add_argument("--train-box", default=None, metavar="X,Y,W,H", help="train only on this box of every image "
                   "(pixels after --downscale), holding the rest out: a model evaluated on continuing into a region "
                   "must never have trained on it")
    p.add_argument("--debug-dump-replicas", action="store_true", help=argparse.SUPPRESS)


def video_arguments(p) -> None:
    p.add_argument("--videos", required=True, help="a video file (PyAV/imageio), a folder of frames, or a "
                   "folder of videos / frame folders")
    p.add_argument("--size", default="64x48", help="frame size WIDTHxHEIGHT after resize + centre crop")
    p.add_argument("--frame-step", type=int, default=1, help="keep every N-th video frame")
    p.add_argument("--max-frames", type=int, default=0, help="use at most this many frames per video (0: all)")
    training_arguments(p, batch=4, batch_help="clips per step")


def lpips_arguments(p) -> None:
    """The LPIPS perceptual loss of the stages that train a decoder (vqgan, pgvqgan): perceptual_loss.lpips_for_run."""
    p.add_argument("--lpips", default=None, help="add the LPIPS perceptual loss (VGG16): a local .safetensors "
                   "holding lpips.LPIPS(net='vgg').state_dict() (nothing is downloaded)")
    p.add_argument("--lpips-weight", type=float, default=1.0, help="weight of the LPIPS loss (with --lpips)")
