"""A global model and a local model per tree level vs one shared model, at the same training budget
(issue 15 item 3): does NUWA-XL gain from the paper's separate models (a global diffusion model and one
local diffusion model per depth) over one MTD that serves the whole tree?

Start: the shipped prompted MTD (models/nuwa_xl/mtd_default.safetensors: role both, L=5, depth 3,
4,000 steps on the captioned pans of `bench/_xl_pans.py --videos 12 --seed 0`). From it, with the
training command itself (`python -m nuwa_core.train xl`, called in-process; every setting as the
shipped run's but --init, --lr, --warmup, --decay linear and --steps):
  shared, seed S        --role both for N steps (its clips drawn from all 3 levels)
  global / local 1 / local 2, seed S
                        --role global, --role local --level 1, --role local --level 2: N/3 steps each
                        (the three together cost what the shared run costs, and see as many clips of
                        each level as the shared run does on average)
for --seeds training seeds (the spread between seeds of the same arm is the noise floor).

Scores, on held-out pans (`bench/_xl_pans.py --seed 1`: other crops, horizons and scene orders of the
same photos), encoded by the shipped T-KLVAE the way training encodes them:
  eps-MSE, model x level   --eval-clips clips of each level (xl_batch with that level only, their own
                           captions, no prompt drop), each at every timestep of a fixed grid (the
                           midpoints of --timesteps equal bins of 0..999) with fixed noise: the same
                           clips, timesteps and noise for every model (paired). Mean over the frames
                           the model generates (all 5 at level 0; the middle 3 at the local levels:
                           the given first and last frames are replaced at sampling). Control rows: the
                           unchanged start model and every specialist on the levels it did not train.
  win?                     a specialist beats the shared model on its level only when its gain is
                           larger than both the spread between the shared model's seeds and twice the
                           paired standard error over the clips (else: not a win, printed as such)
  tree, warping error      a whole tree (depth 3, 65 frames, --tree-steps DDIM steps, guidance 3) from
                           the captions of a held-out 65-frame pan (bench/xl_quality.held_out_pan), by
                           the start model, the shared models and the specialists (global -> local 1 ->
                           local 2), --tree-seeds sampling seeds each: mean DIS-flow warping error
                           (nuwa_core.evaluation.video_scores.warp_errors) beside the held-out pan
                           decoded by the T-KLVAE and its frames shuffled (the control)

    python bench/xl_local_levels.py [--steps 150] [--seeds 2] [--threads 1]
Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from xl_quality import TEXT_ENCODER, XL, held_out_pan, to_image

from nuwa_core import train
from nuwa_core.evaluation.video_scores import warp_errors
from nuwa_core.text_encoder import load_text_encoder
from nuwa_core.training import xl as xt
from nuwa_core.training.data import load_videos
from nuwa_core.xl.diffusion import q_sample
from nuwa_core.xl.diffusion_over_diffusion import generate_long_video, level_spacing
from nuwa_core.xl.model import XLModel, load_mtd_xl

L, DEPTH = 5, 3
SIZE = (64, 48)


def make_pans(out: Path, videos: int, seed: int) -> Path:
    """bench/_xl_pans.py's captioned pans (made once; kept under outputs/)."""
    if len(list(out.glob("pan_*.txt"))) != videos:
        subprocess.run([sys.executable, str(ROOT / "bench" / "_xl_pans.py"), "--out", str(out), "--videos",
                        str(videos), "--seed", str(seed)], check=True, stdout=subprocess.DEVNULL)
    return out


class EncodeOnce:
    """The training command encodes its videos with the frozen T-KLVAE on every call (94 s for the 5,586
    training frames on one thread): within this bench every run trains on the same pans, so the latents
    are computed once and handed back to each run (the same function, the same inputs)."""

    def __init__(self):
        self.cache, self.original = {}, xt.encode_videos

    def __call__(self, vae, videos, chunk, device):
        key = (chunk, tuple(tuple(v.shape) for v in videos), tuple(int(v[::97].sum()) for v in videos))
        if key not in self.cache:
            self.cache[key] = self.original(vae, videos, chunk, device)
        return [z.clone() for z in self.cache[key]]


def train_arm(out: Path, pans: Path, args, role: str, steps: int, seed: int, level: int | None = None) -> float:
    argv = ["xl", "--videos", str(pans), "--vae", args.vae, "--text-encoder", args.text_encoder, "--size",
            f"{SIZE[0]}x{SIZE[1]}", "--init", args.mtd, "--L", str(L), "--depth", str(DEPTH), "--role", role,
            "--time-reverse", "--text-drop", "0.15", "--batch", str(args.batch), "--lr", str(args.lr), "--warmup",
            str(args.warmup), "--decay", args.decay, "--steps", str(steps), "--save-every", "0", "--seed", str(seed), "--threads",
            str(args.threads), "--quiet", "--out", str(out)]
    if level is not None:
        argv += ["--level", str(level)]
    t0 = time.time()
    train.main(argv)
    return time.time() - t0


def held_out_batches(pans: Path, args, vae) -> dict:
    """Per level: a fixed batch (x0, ctx, cond, mask) of held-out clips, as training draws them."""
    kept: list[int] = []
    videos, _ = load_videos(str(pans), SIZE, 1, 0, 1, kept=kept)
    latents = xt.encode_videos(vae, videos, 0, "cpu")
    text, _ = xt.load_caption_text(SimpleNamespace(videos=str(pans), frame_step=1, text_encoder=args.text_encoder),
                                   videos, kept)
    out = {}
    for level in range(DEPTH):
        gen = torch.Generator().manual_seed(args.eval_seed + level)
        x0, ctx, cond, mask, _ = xt.xl_batch(latents, args.eval_clips, L, DEPTH, [level], gen, text, 0.0)
        out[level] = (x0, ctx, cond, mask)
    return out


@torch.no_grad()
def eps_mse(model, batch, ts: list[int], noise: torch.Tensor) -> torch.Tensor:
    """Per clip: eps-MSE over the generated frames (mask 0), mean over the timestep grid -> [n]."""
    x0, ctx, cond, mask = batch
    keep = (1 - mask)[:, :, None, None, None]
    per = []
    for i, t in enumerate(ts):
        tt = torch.full((x0.shape[0],), t, dtype=torch.long)
        eps = model(q_sample(x0, tt, noise[i]), tt.float(), ctx, cond, mask)
        per.append((((eps - noise[i]) ** 2) * keep).sum((1, 2, 3, 4)) / (keep.sum((1, 2, 3, 4)) * x0[0, 0].numel()))
    return torch.stack(per).mean(0)


@torch.no_grad()
def tree(models: list, ctx: torch.Tensor, shape, steps: int, seed: int, guidance: float) -> torch.Tensor:
    """Global model -> local level 1 -> local level 2 (generate_long_video, a model per level) -> latents [65, c, h, w]."""
    per_level = [ctx[::level_spacing(L, DEPTH, k)] for k in range(DEPTH)]
    return generate_long_video(models[0], models[1:], per_level, L, DEPTH, shape, steps=steps,
                               generator=torch.Generator().manual_seed(seed), guidance=guidance)


def load(path) -> torch.nn.Module:
    return load_mtd_xl(path)[0].float().eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", default=str(XL / "t_klvae_default.safetensors"))
    p.add_argument("--mtd", default=str(XL / "mtd_default.safetensors"), help="the start (role both)")
    p.add_argument("--text-encoder", default=str(TEXT_ENCODER))
    p.add_argument("--out", default=str(ROOT / "outputs" / "xl_local_levels"))
    p.add_argument("--steps", type=int, default=150, help="N: the shared run's steps; each specialist N/3")
    p.add_argument("--seeds", type=int, default=2, help="training seeds of every arm")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--decay", choices=("none", "linear"), default="linear",
                   help="learning rate after the warm-up: linear to 0 at each run's last step, or constant")
    p.add_argument("--eval-clips", type=int, default=32, help="held-out clips per level")
    p.add_argument("--timesteps", type=int, default=6, help="timestep grid: midpoints of this many bins")
    p.add_argument("--eval-seed", type=int, default=7)
    p.add_argument("--tree-steps", type=int, default=20)
    p.add_argument("--tree-seeds", type=int, default=1)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--clip-seed", type=int, default=101, help="held-out pan whose captions drive the trees")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t_start, load_start = time.time(), os.getloadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pans_train = make_pans(out / "pans_train", 12, 0)
    pans_eval = make_pans(out / "pans_heldout", 2, 1)
    xt.encode_videos = EncodeOnce()
    spec_steps = args.steps // 3
    print(f"N = {args.steps} steps shared, {spec_steps} per specialist, batch {args.batch}, lr {args.lr:g}, "
          f"{args.seeds} seed(s), {torch.get_num_threads()} thread(s), load {load_start[0]:.2f}",
          file=sys.stderr, flush=True)

    files, seconds = {"start": Path(args.mtd)}, {}
    arms = [("shared", "both", None, args.steps), ("global", "global", None, spec_steps),
            ("local 1", "local", 1, spec_steps), ("local 2", "local", 2, spec_steps)]
    for seed in range(args.seeds):
        for name, role, level, steps in arms:
            key = f"{name}, seed {seed}"
            files[key] = out / f"{name.replace(' ', '')}_s{seed}.safetensors"
            seconds[key] = train_arm(files[key], pans_train, args, role, steps, seed, level)
            print(f"trained {key}: {steps} steps in {seconds[key]:.0f} s (total {time.time() - t_start:.0f} s)",
                  file=sys.stderr, flush=True)
    for seed in range(args.seeds):
        assert load_mtd_xl(files[f"local 2, seed {seed}"])[1]["levels"] == [2]
    t_train = time.time() - t_start

    # --- eps-MSE on held-out clips, model x level
    vae = XLModel.load(args.vae, args.mtd)
    batches = held_out_batches(pans_eval, args, vae.vae)
    ts = [int((i + 0.5) * 1000 / args.timesteps) for i in range(args.timesteps)]
    gen = torch.Generator().manual_seed(args.eval_seed)
    noise = {lv: torch.randn((len(ts), *b[0].shape), generator=gen) for lv, b in batches.items()}
    t0 = time.time()
    per_clip = {}
    for key, path in files.items():
        model = load(path)
        per_clip[key] = {lv: eps_mse(model, batches[lv], ts, noise[lv]) for lv in range(DEPTH)}
    t_eval = time.time() - t0
    table = {k: {lv: float(v.mean()) for lv, v in r.items()} for k, r in per_clip.items()}

    print(f"\neps-MSE on held-out clips ({args.eval_clips} per level x {len(ts)} timesteps, fixed noise; "
          "lower is better)")
    print(f"{'model':22s} " + " ".join(f"{'level ' + str(lv):>10s}" for lv in range(DEPTH)))
    for key, r in table.items():
        print(f"{key:22s} " + " ".join(f"{r[lv]:10.5f}" for lv in range(DEPTH)))

    # --- specialist vs shared on its own level: gain, the seeds' spread, the paired standard error
    verdicts = {}
    spec_of = {0: "global", 1: "local 1", 2: "local 2"}
    print()
    for lv, spec in spec_of.items():
        shared = [table[f"shared, seed {s}"][lv] for s in range(args.seeds)]
        special = [table[f"{spec}, seed {s}"][lv] for s in range(args.seeds)]
        gain = float(np.mean(shared) - np.mean(special))
        spread = max(float(np.ptp(shared)), float(np.ptp(special))) if args.seeds > 1 else 0.0
        diffs = [per_clip[f"shared, seed {s}"][lv] - per_clip[f"{spec}, seed {s}"][lv] for s in range(args.seeds)]
        d = torch.stack(diffs).mean(0)
        se = float(d.std() / len(d) ** 0.5)
        start = table["start"][lv]
        win = bool(gain > max(spread, 2 * se))
        verdicts[lv] = {"specialist": spec, "shared": round(float(np.mean(shared)), 5),
                        "specialist_mse": round(float(np.mean(special)), 5), "gain": round(gain, 5),
                        "seed_spread": round(spread, 5), "paired_se": round(se, 5), "start": round(start, 5),
                        "shared_gain_over_start": round(start - float(np.mean(shared)), 5), "win": win}
        print(f"level {lv}: shared {np.mean(shared):.5f}, {spec} {np.mean(special):.5f}: specialist gain "
              f"{gain:+.5f} ({100 * gain / np.mean(shared):+.1f}%) vs seed spread {spread:.5f}, 2 x paired SE "
              f"{2 * se:.5f} -> {'a win' if win else 'NOT a win'}; start {start:.5f} (fine-tuning shared: "
              f"{start - np.mean(shared):+.5f})")

    # --- the controls: each specialist on the levels it did not train, against the start model
    wrong = {}
    for lv, spec in spec_of.items():
        for other in range(DEPTH):
            if other != lv:
                v = float(np.mean([table[f"{spec}, seed {s}"][other] for s in range(args.seeds)]))
                wrong[f"{spec} on level {other}"] = round(v / table["start"][other], 3)
    print("specialists on the levels they did not train, eps-MSE / the start model's: "
          + ", ".join(f"{k} {v:.2f}x" for k, v in wrong.items()))

    # --- whole trees: warping error, shared vs specialists, beside the real pan and its shuffled frames
    t0 = time.time()
    encoder = load_text_encoder(args.text_encoder)
    n = (L - 1) ** DEPTH + 1
    clip, caps = held_out_pan(args.clip_seed, n)
    unique = sorted(set(caps))
    emb = dict(zip(unique, encoder.encode(unique)))
    ctx = torch.stack([emb[c] for c in caps]).float()
    shape = vae.latent_shape()
    warp = {}
    with torch.no_grad():
        decoded = to_image(vae.decode(vae.encode(clip.permute(0, 3, 1, 2) * 2 - 1)))
    warp["real pan, T-KLVAE decoded"] = [float(np.mean(warp_errors(decoded)))]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    warp["real decoded, frames shuffled"] = [float(np.mean(warp_errors(decoded[order])))]
    trees = {"start (one model)": ["start"] * DEPTH}
    for s in range(args.seeds):
        trees[f"shared, seed {s}"] = [f"shared, seed {s}"] * DEPTH
        trees[f"specialists, seed {s}"] = [f"{m}, seed {s}" for m in spec_of.values()]
    for name, keys in trees.items():
        loaded = {k: load(files[k]) for k in set(keys)}
        ms = [loaded[k] for k in keys]
        warp[name] = []
        for seed in range(args.tree_seeds):
            lat = tree(ms, ctx, shape, args.tree_steps, seed, args.guidance)
            with torch.no_grad():
                warp[name].append(float(np.mean(warp_errors(to_image(vae.decode(lat))))))
    t_tree = time.time() - t0
    print(f"\nwhole tree (L={L}, depth {DEPTH}, {n} frames, {args.tree_steps} DDIM steps, guidance "
          f"{args.guidance:g}, {args.tree_seeds} sampling seeds): mean DIS-flow warping error (lower is smoother)")
    for name, v in warp.items():
        print(f"{name:32s} " + " ".join(f"{x:.4f}" for x in v) + f"   mean {np.mean(v):.4f}")
    generated = [np.mean(v) for k, v in warp.items() if k in trees]
    warp_usable = bool(warp["real decoded, frames shuffled"][0] > max(generated))
    print("warp: every tree is smoother than the shuffled real frames" if warp_usable else
          "warp: the shuffled real frames score at least as well as a generated tree: this score cannot rank "
          "the trees here (at 65 frames a pan stays within one or two scenes)")

    load_end = os.getloadavg()
    total = time.time() - t_start
    print(f"\n{total:.0f} s ({t_train:.0f} s training, {t_eval:.0f} s eps-MSE, {t_tree:.0f} s trees), "
          f"{torch.get_num_threads()} thread(s), load average {load_start[0]:.2f} at the start, {load_end[0]:.2f} "
          "at the end", file=sys.stderr)
    print(json.dumps({
        "bench": "xl_local_levels", "start": Path(args.mtd).name, "L": L, "depth": DEPTH,
        "shared_steps": args.steps, "specialist_steps": spec_steps, "batch": args.batch, "lr": args.lr,
        "warmup": args.warmup, "decay": args.decay, "seeds": args.seeds, "eval_clips": args.eval_clips, "timesteps": ts,
        "eps_mse": {k: [round(r[lv], 5) for lv in range(DEPTH)] for k, r in table.items()},
        "specialist_vs_shared": verdicts, "wrong_level_vs_start": wrong,
        "tree_warp": {k: [round(x, 4) for x in v] for k, v in warp.items()}, "tree_warp_beats_shuffled": warp_usable,
        "train_seconds": {k: round(v, 1) for k, v in seconds.items()},
        "seconds": {"train": round(t_train, 1), "eps_mse": round(t_eval, 1), "trees": round(t_tree, 1),
                    "total": round(total, 1)},
        "threads": torch.get_num_threads(), "load_average": [round(load_start[0], 2), round(load_end[0], 2)]}))


if __name__ == "__main__":
    main()
