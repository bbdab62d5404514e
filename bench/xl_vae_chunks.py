"""T-KLVAE long-video chunking: hard cuts vs overlapping, cross-faded windows (issue 15 item 5).

Real camera pans (bench/_xl_pans.py: real skies over real grounds, 1 px per frame) of F frames are
encoded by the shipped T-KLVAE (windows of 4, overlap 3: the new default), and the latents decoded as
one window (the whole clip: the reference) and in windows of each plan: `hard C` (C frames side by
side, what XLModel.decode did with C = 16) and `blend C/O` (C frames, O shared with the next window,
cross-faded: the new default is C = the training clip length 4, O = C - 1). Per plan, over every video:

  placement: mean |frame - the same frame decoded as one window| at frames next to a window edge
             (the last frame before it and the first after it) and at the others (control);
  jump:      mean |x[t+1] - x[t]| minus the same in the one-window decode, at the frame pairs a
             window edge falls between and at the others (control): what a cut adds to the motion;
  time:      seconds to decode all the videos (one torch thread; the fastest of --repeat runs).

The encoder is measured the same way in latent space (diffusion scale). `python bench/xl_vae_chunks.py
[--videos 4] [--frames 64] [--repeat 3] [--json out.json]`.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))
from _xl_pans import pan, video_scenes

from nuwa_core.xl.t_klvae import load_t_klvae, temporal_windows

VAE = ROOT.parent / "models" / "nuwa_xl" / "t_klvae_default.safetensors"
PLANS = {"hard 16": (16, 0), "hard 4": (4, 0), "blend 16/8": (16, 8), "blend 4/1": (4, 1), "blend 4/2": (4, 2),
         "blend 4/3": (4, 3)}


def videos(n: int, frames: int, seed: int) -> list[torch.Tensor]:
    rng = random.Random(seed)
    out = []
    for scenes in video_scenes(n, 3, rng):
        f, _ = pan(scenes, rng)
        x = torch.from_numpy(np.stack(f[:frames])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        if x.shape[0] < frames:
            raise SystemExit(f"a pan has only {x.shape[0]} frames; ask for fewer")
        out.append(x)
    return out


def edges(f: int, chunk: int, overlap: int) -> tuple[list[int], list[int]]:
    """(frames next to a window edge, frame pairs t -> t+1 a window edge falls between)."""
    cuts = sorted({a for a, _, _ in temporal_windows(f, chunk, overlap)} | {e for _, e, _ in temporal_windows(f, chunk, overlap)})
    cuts = [c for c in cuts if 0 < c < f]
    return sorted({c - 1 for c in cuts} | set(cuts)), [c - 1 for c in cuts]


def scores(out: list[torch.Tensor], ref: list[torch.Tensor], f: int, chunk: int, overlap: int,
           real: list[torch.Tensor] | None = None) -> dict:
    near, pairs = edges(f, chunk, overlap)
    far = [t for t in range(f) if t not in near]
    other = [t for t in range(f - 1) if t not in pairs]
    dev = torch.stack([(o - r).abs().flatten(1).mean(1) for o, r in zip(out, ref)])  # [videos, F]
    jump = torch.stack([((o[1:] - o[:-1]).abs() - (r[1:] - r[:-1]).abs()).flatten(1).mean(1)
                        for o, r in zip(out, ref)])  # [videos, F-1]
    raw = torch.stack([(o[1:] - o[:-1]).abs().flatten(1).mean(1) for o in out])

    def m(x, idx):
        return float(x[:, idx].mean()) if idx else float("nan")
    rec = {} if real is None else {"l1_real": float(torch.stack([(o - x).abs().mean() for o, x in zip(out, real)]).mean())}
    return {**rec, "placement_edge": m(dev, near), "placement_other": m(dev, far),
            "jump_excess_edge": m(jump, pairs), "jump_excess_other": m(jump, other),
            "jump_edge": m(raw, pairs), "jump_other": m(raw, other)}


def timed(fn, repeat: int):
    """(fn()'s result, the fastest of `repeat` runs in seconds)."""
    best, out = float("inf"), None
    for _ in range(max(repeat, 1)):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=int, default=4)
    p.add_argument("--frames", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=3, help="timed runs per plan (the fastest counts)")
    p.add_argument("--json", default="")
    args = p.parse_args()
    torch.set_num_threads(1)
    vae = load_t_klvae(VAE).eval()
    s = vae.config.latent_scale
    clips = videos(args.videos, args.frames, args.seed)
    f = args.frames
    res: dict = {"videos": args.videos, "frames": f, "clip_frames": vae.config.clip_frames, "decode": {}, "encode": {}}
    with torch.no_grad():
        r = args.repeat
        z_ref, sec = timed(lambda: [vae.encode(x[None])[0] * s for x in clips], r)
        res["encode"]["one window"] = {"seconds": sec}
        for name, (c, o) in PLANS.items():
            z, sec = timed(lambda c=c, o=o: [vae.encode(x[None], chunk=c, overlap=o)[0] * s for x in clips], r)
            res["encode"][name] = {"seconds": sec, **scores(z, z_ref, f, c, o)}
        lat = [vae.encode(x[None], chunk=4, overlap=3)[0] for x in clips]  # the latents every decode gets
        ref, sec = timed(lambda: [vae.decode(z[None])[0] for z in lat], r)
        res["decode"]["one window"] = {"seconds": sec, **scores(ref, ref, f, f, 0, clips)}
        res["decode"]["real video"] = {"seconds": float("nan"), **scores(clips, clips, f, 4, 0)}
        for name, (c, o) in PLANS.items():
            out, sec = timed(lambda c=c, o=o: [vae.decode(z[None], chunk=c, overlap=o)[0] for z in lat], r)
            res["decode"][name] = {"seconds": sec, **scores(out, ref, f, c, o, clips)}
    for part in ("decode", "encode"):
        print(f"{part} ({args.videos} pans x {f} frames; placement / jump excess: mean abs, "
              f"{'pixels -1..1' if part == 'decode' else 'latents x latent_scale'})")
        print(f"  {'plan':<11} {'placement edge':>14} {'other':>8} {'jump+ edge':>11} {'other':>8} "
              f"{'jump edge':>10} {'other':>8} {'L1 real':>8} {'seconds':>8}")
        for name, r in res[part].items():
            cols = [r.get(k, float("nan")) for k in ("placement_edge", "placement_other", "jump_excess_edge",
                                                     "jump_excess_other", "jump_edge", "jump_other", "l1_real")]
            print(f"  {name:<11} {cols[0]:>14.5f} {cols[1]:>8.5f} {cols[2]:>11.5f} {cols[3]:>8.5f} "
                  f"{cols[4]:>10.5f} {cols[5]:>8.5f} {cols[6]:>8.5f} {r['seconds']:>8.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
