"""Held-out continuation at other sampling temperatures (issue 11; models/nuwa/TRAINING.md 5c).

    python bench/sampling_temperature.py [MODEL --image REF --heldout X Y W H] [--seeds 0 .. 9]
                                         [--settings 1 edge:0.5 ...] [--candidates N]

Runs the held-out continuation protocol (python -m nuwa_core.eval continuation: the model beside
random real pixels, patch-NN copying and the other controls, against the truth) once per sampling
setting, same windows and seeds: `T` samples every token at temperature T, `edge:T` only a patch's
edge tokens (Renderer.edge_tokens: the row and the column of its first token, which lie against
its context) and the others at 1; `--candidates N` draws each patch N times and keeps the best
(candidate_patches.py; default 1). Top-k 100 and epsilon 0.01, as the README's tables. Default: the
shipped panorama model on its test box (x 768-1024) with temperature 1 and edge tokens at 0.5,
seeds 0-9 (about 5 minutes on 2 CPU cores). The README's validation rows ran a model trained on
x < 512 on the box x 512-768 of the strip cut to 768 px (TRAINING.md 5b).

Per setting: low-res PSNR per direction and its mean, the margin over the better of random real and
patch-NN, the energy score of the seeds' draws and its margin over the best training-free control
(evaluation/continuation.py), hard-cut seam and texture. Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from unittest import mock

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from _continuation import DIRECTIONS, add_reference_arguments, f2, summary

from nuwa_core.evaluation.continuation import evaluate_continuation
from nuwa_core.images import load_image
from nuwa_core.infinity import patch_samplers as ps
from nuwa_core.infinity.generation import NuwaInfinity


def edge_cooled(decode_ar, edge_temperature: float):
    """patch_samplers.decode_ar with the logits of every patch's edge tokens divided by
    `edge_temperature` before sample_ar's own sampling (at temperature 1 there), the others as
    they are: sample_ar unchanged, its noise stream included, only the edge logits' scale differs."""
    def decode(renderer, context, order, text_kv, batch, choose):
        perm, _ = renderer.permutation(order)
        edge = iter(renderer.edge_tokens(order)[perm].tolist())  # generation order
        return decode_ar(renderer, context, order, text_kv, batch,
                         lambda logits: choose(logits / edge_temperature if next(edge) else logits))
    return decode


def run(model, reference, heldout, setting: str, seeds, candidates: int = 1) -> dict:
    edge = setting.startswith("edge:")
    t = float(setting.split(":")[-1])
    settings = ps.SamplerSettings(top_k=100, epsilon=0.01, temperature=1.0 if edge else t, candidates=candidates)
    decode = edge_cooled(ps.decode_ar, t) if edge else ps.decode_ar
    with mock.patch.object(ps, "decode_ar", decode), torch.no_grad():
        res = evaluate_continuation(reference, heldout, model, directions=DIRECTIONS, seeds=seeds,
                                    settings=settings, log=False)
    mean = {d: res["directions"][d]["mean"] for d in DIRECTIONS}
    return {**summary(res),
            "controls": {row: [mean[d][row]["lowres_psnr"] for d in DIRECTIONS] for row in ("random real", "patch-NN")}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_reference_arguments(p)
    p.add_argument("--settings", nargs="+", default=["1", "edge:0.5"],
                   help="T (every token at temperature T) or edge:T (edge tokens at T, the others at 1)")
    p.add_argument("--candidates", type=int, default=1, help="draws per patch, the best kept (default 1)")
    args = p.parse_args(argv)
    if args.candidates < 1:
        p.error(f"--candidates is a whole number >= 1, got {args.candidates}")
    for s in args.settings:
        try:
            if float(s.removeprefix("edge:")) <= 0:
                raise ValueError
        except ValueError:
            p.error(f"a setting is T or edge:T with T > 0, e.g. 0.7 or edge:0.5; got {s!r}")
    model = NuwaInfinity.load(args.model)
    reference = load_image(args.image)
    rows = {}
    for s in args.settings:
        r = rows[s] = run(model, reference, args.heldout, s, args.seeds, args.candidates)
        print(f"{s:>10}: low-res {f2(r['lowres_psnr'])} (mean {r['mean']:.2f}), margins {f2(r['margin_db'])}, "
              f"energy {f2(r['energy_db'])} (margins {f2(r['energy_margin_db'])}), "
              f"hard-cut {r['hardcut_seam']:.2f}, texture {r['texture']:.2f}", flush=True)
    controls = next(iter(rows.values()))["controls"]
    print(f"{'controls':>10}: random real {f2(controls['random real'])}, patch-NN {f2(controls['patch-NN'])} "
          f"(right / left / up / down)")
    print(json.dumps({"model": Path(args.model).name, "heldout": args.heldout, "seeds": args.seeds,
                      "candidates": args.candidates,
                      "rows": {s: {k: v for k, v in r.items() if k != "controls"} for s, r in rows.items()},
                      "controls": controls}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
