"""Does a renderer generalise or memorise? The truth's tokens, teacher-forced, where it must continue
a place it never saw, against a place it trained on (issue 11; no sampling, seconds a model).

    python bench/token_likelihood.py [MODEL ... --image REF --heldout X Y W H --seen X Y W H]

For each model and direction, the continuation protocol's window (nuwa_core/evaluation/
continuation.py) in the held-out box and, the same way, in a box of the part the model trained on:
the nats per token the model gives the real tokens where it would generate
(`NuwaInfinity.token_nll`: given part pre-cached, plan walked as `generate` walks it), the first
token of each patch (what its context alone must predict), and two controls that use no context:
the unigram of the codes of the seen part (add-1/2) and the uniform ln V. A renderer that
generalises scores below both in the held-out box; one that memorised scores far lower in the seen
box and above both in the held-out box: it is confidently wrong about a place it has not seen.

Default: both shipped models on their test boxes (panorama x 768-1024 held out, x 256-512 seen;
painting x 512-752 held out, x 256-496 seen). Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from _continuation import DIRECTIONS, IMAGE, MODEL

from nuwa_core.evaluation.continuation import plan_window, seen_code_nll, truth_token_nll
from nuwa_core.images import load_image
from nuwa_core.infinity.generation import NuwaInfinity

PAINTING = REPO / "models" / "nuwa" / "nuwa_infinity_starry_night.safetensors"
SHIPPED = [  # (name, model, reference, held-out box, seen box)
    ("panorama", MODEL, IMAGE, (768, 0, 256, 128), (256, 0, 256, 128)),
    ("painting", PAINTING, PAINTING.with_suffix(".jpg"), (512, 0, 240, 600), (256, 0, 240, 600)),
]


def score(model: NuwaInfinity, reference: torch.Tensor, heldout, seen) -> dict:
    """Per direction: held-out and seen NLL (model, first token), the held-out box's controls."""
    hw = reference.shape[1:3]
    code_nll = seen_code_nll(model, reference, heldout)  # the unigram control, once per model
    out = {}
    for d in DIRECTIONS:
        held = truth_token_nll(model, reference, heldout, plan_window(heldout, d, model.patch_pixels, hw), None, code_nll)
        own = truth_token_nll(model, reference, heldout, plan_window(seen, d, model.patch_pixels, hw), None, code_nll)
        out[d] = {"heldout": held["model"], "heldout_first": held["first"], "seen": own["model"],
                  "seen_first": own["first"], "unigram": held["unigram"], "uniform": held["uniform"]}
    out["mean"] = {k: sum(out[d][k] for d in DIRECTIONS) / len(DIRECTIONS) for k in out[DIRECTIONS[0]]}
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", help="bundles scored on --image (default: both shipped models)")
    p.add_argument("--image", default=str(IMAGE))
    p.add_argument("--heldout", type=int, nargs=4, default=[768, 0, 256, 128], metavar=("X", "Y", "W", "H"))
    p.add_argument("--seen", type=int, nargs=4, default=[256, 0, 256, 128], metavar=("X", "Y", "W", "H"),
                   help="a box of the part the models trained on")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = [(Path(m).stem, Path(m), Path(args.image), tuple(args.heldout), tuple(args.seen)) for m in args.models] \
        if args.models else SHIPPED
    figures = {}
    print("nats per token of the real tokens, teacher-forced; per direction right / left / up / down, then the mean")
    for name, path, image, heldout, seen in runs:
        res = score(NuwaInfinity.load(path), load_image(image), heldout, seen)
        figures[name] = {k: round(v, 3) for k, v in res["mean"].items()}
        print(f"{name} ({path.name}; held out {heldout}, seen {seen})")
        for key, label in (("heldout", "held-out box"), ("heldout_first", "  first token of a patch"),
                           ("seen", "seen box"), ("seen_first", "  first token of a patch"),
                           ("unigram", "control: unigram of the seen part"), ("uniform", "control: uniform")):
            vals = " / ".join(f"{res[d][key]:.2f}" for d in DIRECTIONS)
            print(f"  {label:36s} {vals}   mean {res['mean'][key]:.2f}")
        verdict = "generalises" if res["mean"]["heldout"] < min(res["mean"]["unigram"], res["mean"]["uniform"]) \
            else "memorised: above the context-free controls where it has not been"
        print(f"  -> {verdict}", flush=True)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
