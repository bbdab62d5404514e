"""Held-out continuation with best-of-N candidate patches (issue 11; nuwa_core/infinity/candidate_patches.py).

    python bench/candidate_patches.py [MODEL --image REF --heldout X Y W H] [--seeds 0 .. 9]
                                      [--candidates 1 4 8]

Runs the held-out continuation protocol (python -m nuwa_core.eval continuation: the model beside
random real pixels, patch-NN copying and the other controls, against the truth) once per candidate
count N, same windows and seeds: every patch drawn N times, the draw kept that ranks best on how
likely the renderer finds its known neighbours in the reverse order, how near it lies to the
other draws and how near its edges lie to the known neighbours' facing edges (N = 1: one draw, as
the paper samples). Top-k
100 and epsilon 0.01, as the README's tables. Default: the shipped panorama model on its test box
(x 768-1024), seeds 0-9, N = 1, 4, 8 (7.5 minutes on 2 CPU cores).

Per N: low-res PSNR per direction and its mean, the margin over the better of random real and
patch-NN, the energy score of the seeds' draws (proper: it does not reward blur) and its margin over
the best training-free control, boundary and hard-cut seams, texture, and the seconds spent
generating (model.generate, all directions and seeds) as a ratio to N = 1 in the same run. Last
line: one JSON object.

`--sheet PNG --sheet-seeds 0 1` (and nothing else run) draws the windows themselves: per direction
(columns right, left, up, down), the truth, then each N's continuation for each sheet seed (rows),
the given part real and the generated part decoded, a white line between them.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from _continuation import DIRECTIONS, add_reference_arguments, f2, summary

from nuwa_core.evaluation.continuation import evaluate_continuation, model_generator, plan_window
from nuwa_core.images import load_image, save_image
from nuwa_core.infinity.generation import NuwaInfinity
from nuwa_core.infinity.patch_samplers import SamplerSettings


class Timed:
    """model.generate with the seconds it takes added up."""

    def __init__(self, model: NuwaInfinity):
        self.model, self.seconds = model, 0.0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def generate(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.model.generate(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def run(model, reference, heldout, candidates: int, seeds) -> dict:
    timed = Timed(model)
    settings = SamplerSettings(top_k=100, epsilon=0.01, candidates=candidates)
    with torch.no_grad():
        res = evaluate_continuation(reference, heldout, timed, directions=DIRECTIONS, seeds=seeds,
                                    settings=settings, log=False)
    mean = {d: res["directions"][d]["mean"] for d in DIRECTIONS}
    return {**summary(res),
            "boundary_seam": sum(mean[d]["model"]["boundary_seam"] for d in DIRECTIONS) / 4,
            "generate_s": timed.seconds,
            "controls": {row: {"lowres_psnr": [mean[d][row]["lowres_psnr"] for d in DIRECTIONS],
                               "energy_db": [mean[d][row]["energy_db"] for d in DIRECTIONS],
                               "hardcut_seam": sum(mean[d][row]["hardcut_seam"] for d in DIRECTIONS) / 4,
                               "texture": sum(mean[d][row]["texture"] for d in DIRECTIONS) / 4}
                         for row in ("real tokens", "random real", "patch-NN", "patch-NN drawn", "patchwork",
                                     "line mean")}}


def sheet(model, reference, heldout, counts, seeds, path) -> None:
    """The PNG described in the module docstring."""
    columns = []
    for direction in DIRECTIONS:
        plan = plan_window(heldout, direction, model.patch_pixels, reference.shape[1:3])
        x, y, w, h = plan.window
        gx, gy, gw, gh = plan.given
        rows = [reference[:, y:y + h, x:x + w].clone()]
        for n in counts:
            generate = model_generator(model, SamplerSettings(top_k=100, epsilon=0.01, candidates=n))
            for seed in seeds:
                with torch.no_grad():
                    window = generate(reference[:, gy:gy + gh, gx:gx + gw], direction, plan.generated_patches, seed)[0]
                rows.append(window[:, :h, :w])
        for row in rows:  # the generated side's first pixels against the given part, white
            if direction in ("right", "left"):
                row[:, :, gw if direction == "right" else gx - x - 1] = 1.0
            else:
                row[:, gh if direction == "down" else gy - y - 1] = 1.0
        gap = torch.ones(1, 4, w, 3)
        columns.append(torch.cat([part for row in rows for part in (row, gap)][:-1], dim=1))
    tallest = max(c.shape[1] for c in columns)
    columns = [torch.cat([c, torch.ones(1, tallest - c.shape[1], c.shape[2], 3)], dim=1) for c in columns]
    gap = torch.ones(1, tallest, 8, 3)
    save_image(torch.cat([part for c in columns for part in (c, gap)][:-1], dim=2), path)
    print(f"sheet: truth, then {', '.join(f'{n} candidates' for n in counts)} x seeds {list(seeds)} "
          f"(rows); {', '.join(DIRECTIONS)} (columns) -> {path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_reference_arguments(p)
    p.add_argument("--candidates", type=int, nargs="+", default=[1, 4, 8], help="draws per patch, one row each")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2, this machine's cores)")
    p.add_argument("--sheet", help="draw the continuations into this PNG instead of scoring them")
    p.add_argument("--sheet-seeds", type=int, nargs="+", default=[0, 1], help="seeds drawn on the sheet")
    args = p.parse_args(argv)
    if any(n < 1 for n in args.candidates):
        p.error(f"--candidates are whole numbers >= 1, got {args.candidates}")
    torch.set_num_threads(args.threads)
    model = NuwaInfinity.load(args.model)
    reference = load_image(args.image)
    if args.sheet:
        sheet(model, reference, args.heldout, args.candidates, args.sheet_seeds, args.sheet)
        return 0
    rows = {}
    for n in args.candidates:
        r = rows[n] = run(model, reference, args.heldout, n, args.seeds)
        print(f"{n:2d} candidates: low-res {f2(r['lowres_psnr'])} (mean {r['mean']:.2f}), margins "
              f"{f2(r['margin_db'])}, energy {f2(r['energy_db'])} (margins {f2(r['energy_margin_db'])}), "
              f"boundary {r['boundary_seam']:.2f}, hard-cut {r['hardcut_seam']:.2f}, "
              f"texture {r['texture']:.2f}, generating {r['generate_s']:.1f} s", flush=True)
    controls = next(iter(rows.values()))["controls"]
    for name, c in controls.items():
        print(f"control {name}: low-res {f2(c['lowres_psnr'])}, energy {f2(c['energy_db'])}, "
              f"hard-cut {c['hardcut_seam']:.2f}, texture {c['texture']:.2f}")
    base = rows[args.candidates[0]]
    print(json.dumps({"model": Path(args.model).name, "heldout": args.heldout, "seeds": args.seeds,
                      "rows": {n: {**{k: v for k, v in r.items() if k != "controls"},
                                   "time_ratio": r["generate_s"] / base["generate_s"],
                                   "mean_gain_db": r["mean"] - base["mean"]} for n, r in rows.items()},
                      "controls": controls, "goal_margin_db": 1.0}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
