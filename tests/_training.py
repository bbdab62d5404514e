"""Inputs for the training tests: a small image, the command lines of tiny training runs, a run's weights."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from nuwa_core.checkpoint import load_state_dict
from nuwa_core.training import loop


def write_image(path: Path, w=64, h=32, seed=0, mode="RGB"):
    """A smooth striped image with a little noise (w x h, seeded), saved to `path`; returns `path`."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / 5.0 + c) * 0.5 + 0.5 + 0.1 * np.cos(yy / 3.0) for c in range(3)], -1)
    arr = (np.clip(base + 0.05 * rng.standard_normal(base.shape), 0, 1) * 255).astype(np.uint8)
    img = Image.fromarray(arr)
    if mode == "RGBA":
        img = img.convert("RGBA")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def vqgan_args(img, out, *extra):
    """`train vqgan` arguments for a tiny tokenizer run on `img` (a file or folder), saved to `out`."""
    return ["vqgan", "--images", str(img), "--out", str(out), "--preset", "tiny", "--crop", "16", "--batch", "2",
            "--warmup", "2", "--disc-start", "2", "--restart-every", "3", "--quiet", "--save-every", "0", *extra]


def renderer_args(img, tok, out, *extra):
    """`train renderer` arguments for a tiny renderer run on `img` with tokenizer file `tok`, saved to `out`."""
    return ["renderer", "--images", str(img), "--tokenizer", str(tok), "--out", str(out), "--layers", "1",
            "--heads", "2", "--dim", "32", "--patch", "2x2", "--extent", "0,1,1", "--sample-patches", "2x2",
            "--batch", "2", "--warmup", "2", "--quiet", "--save-every", "0", *extra]


def trained_weights(out: Path):
    """The state dict of the weights a run saved to `out`."""
    return load_state_dict(loop.train_paths(out)[0])[0]
