"""What the held-out continuation benches share (sampling_temperature.py, candidate_patches.py): the
shipped panorama model and its test box as defaults, the arguments naming another model and box, the
per-setting summary of an `evaluate_continuation` result, and how its numbers print."""
from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "models" / "nuwa" / "nuwa_infinity_default.safetensors"
IMAGE = REPO / "models" / "nuwa" / "nuwa_infinity_default.png"
DIRECTIONS = ("right", "left", "up", "down")


def add_reference_arguments(p: argparse.ArgumentParser) -> None:
    """MODEL, --image, --heldout and --seeds, defaulting to the shipped panorama on its test box."""
    p.add_argument("model", nargs="?", default=str(MODEL))
    p.add_argument("--image", default=str(IMAGE), help="the reference the model was trained on (without the box)")
    p.add_argument("--heldout", type=int, nargs=4, default=[768, 0, 256, 128], metavar=("X", "Y", "W", "H"))
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))


def summary(result: dict) -> dict:
    """The model's row of an evaluate_continuation result over DIRECTIONS: low-res PSNR per direction
    and its mean, the margins, the energy score and its margin per direction (None with one seed),
    hard-cut seam and texture (mean of the directions)."""
    mean = {d: result["directions"][d]["mean"]["model"] for d in DIRECTIONS}
    lowres = [mean[d]["lowres_psnr"] for d in DIRECTIONS]
    return {"lowres_psnr": lowres, "mean": sum(lowres) / len(DIRECTIONS),
            "margin_db": [result["directions"][d]["margin_db"] for d in DIRECTIONS],
            "energy_db": [mean[d]["energy_db"] for d in DIRECTIONS],
            "energy_margin_db": [result["directions"][d]["energy_margin_db"] for d in DIRECTIONS],
            "hardcut_seam": sum(mean[d]["hardcut_seam"] for d in DIRECTIONS) / len(DIRECTIONS),
            "texture": sum(mean[d]["texture"] for d in DIRECTIONS) / len(DIRECTIONS)}


def f2(values) -> str:
    return " / ".join("-" if x is None else f"{x:.2f}" for x in values)
