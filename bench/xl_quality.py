"""NUWA-XL quality, measured (issue 15 item 6): per-frame FD-EffLite0, temporal consistency (DIS-flow
warping error) and drift over a long video, on held-out real footage, with the controls in the same run;
and the paper's comparison at small scale: diffusion over diffusion vs autoregressive over diffusion
with the same model and budget, quality at the first frames vs the last, not only speed.

Footage: camera pans cut by bench/_xl_pans.py from the same photos the shipped model trained on, but
from other random strips (the shipped pans were made with --seed 0; here --clip-seed and --ref-seed):
new crops, horizons, scene orders and widths, never seen as such in training (the photos themselves
were). The held-out clip A (its first N frames) gives every generated video its per-frame captions
(the prompt schedule), so all rows show the same scenes at the same times. The reference set B of the
FD scores: --ref-pans other pans across the same scenes (each strip drawn anew from its own seed),
all their frames, encoded and decoded by the model's T-KLVAE (real content at the detail the decoder
can give, as generated frames have it; the raw row therefore pays for the detail the decoder drops).

Rows (N frames each, 64x48):
  real clip A, raw                  the held-out frames as they are
  real clip A, T-KLVAE decoded      encoded and decoded by the model's own T-KLVAE: the upper bound for
                                    generated video (the decoder's detail)
  real decoded, frames shuffled     control: the same frames in random order (FD cannot see order: it is
                                    equal to the decoded row by construction)
  real decoded, frame 0 frozen      control: the first decoded frame repeated N times (no motion at all)
  frame by frame (MTD, F=1)         control: every frame sampled alone by the same MTD as a one-frame
                                    video from its own caption, its own noise, decoded alone: no temporal
                                    coupling anywhere (the temporal layers are not bypassed: they see one
                                    frame, zero-padded, which couples nothing)
  diffusion over diffusion          NUWA-XL's tree, L=5, depth --depth ((L-1)^depth + 1 = N frames)
  AR over diffusion                 the same model: a first window of L frames from nothing, then windows
                                    whose first K=2 frames are the last 2 made (mask 1) and L-K new ones;
                                    K=2 makes the window count equal to the tree's (1 + 4 + ... + 4^(depth-1)),
                                    so both evaluate the same number of frames with the same DDIM steps
Scores (lower is better, frames 0..1):
  FD all            Frechet distance of EfficientNet-Lite0 features (whole frame resized to 224) of the
                    row's N frames vs the reference B's frames, in B's top --pca (16) principal directions:
                    N frames in 1280 dimensions give rank-deficient covariances that reward a collapsed
                    set (fd_all_1280, printed beside it, is that full-dimensional value). Few samples
                    (N, and the frames of one clip are strongly correlated): compare rows only
  FD first / last   the same for the first / last W frames of the row (W=--window) vs the frames of B
                    captioned with the scenes A shows in that window: the quality at the start vs the end
                    of the long video
  warp              mean DIS-flow warping error between consecutive frames, the flow computed on the row
                    itself (nuwa_core.evaluation.video_scores.warp_errors); warp first / last: over the
                    pairs inside the first / last W frames
  colour first/last distance of the mean RGB mean/std of the row's first / last W frames from those of
                    the same frames of B (decoded, the window's scenes): drift away from the footage
Every score is printed beside the controls; a line after the table names every control that scores at
least as well as the decoded real clip on a score (such a score cannot back a claim on its own).

    python bench/xl_quality.py [--depth 4] [--steps 20] [--guidance 3] [--threads 2]
Last line: one JSON object.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from _xl_pans import pan, video_scenes

from nuwa_core.evaluation.metrics import (
    EFFLITE0_PACKAGES,
    efflite0_available,
    efflite0_block_features,
    frechet_distance,
)
from nuwa_core.evaluation.video_scores import colour_distance, frechet_distance_pca, pca_basis, warp_errors
from nuwa_core.text_encoder import load_text_encoder
from nuwa_core.xl.diffusion import cpu_randn, guided, sample_ddim
from nuwa_core.xl.diffusion_over_diffusion import frames_for, in_model_dtype, null_prompts
from nuwa_core.xl.model import XLModel

XL = ROOT / "models" / "nuwa_xl"
TEXT_ENCODER = ROOT / "models" / "nuwa" / "text_encoders" / "nuwa_text_scenes.safetensors"
K = 2  # AR context frames


def held_out_pan(seed: int, frames: int) -> tuple[torch.Tensor, list[str]]:
    """A pan of bench/_xl_pans.py from its own seed (4 scenes, more if it is too short) -> (its first
    `frames` frames [N, H, W, 3] 0..1, their captions)."""
    for scenes in (4, 5, 6):
        rng = random.Random(seed)
        out, caps = pan(video_scenes(1, scenes, rng)[0], rng)
        if len(out) >= frames:
            return torch.from_numpy(np.stack(out[:frames])).float() / 255, caps[:frames]
    raise SystemExit(f"pan of seed {seed} is shorter than {frames} frames")


def reference_pans(captions: list[str], seeds: list[int]) -> tuple[torch.Tensor, list[str]]:
    """Whole pans across the scenes of `captions` in their order, each strip drawn anew from its own seed
    (other crops, horizons, widths) -> (all their frames [M, H, W, 3] 0..1, their captions): real frames
    of the same scenes."""
    scenes = [tuple(c.split(" over ")) for c in dict.fromkeys(captions)]
    out, caps = [], []
    for seed in seeds:
        frames, c = pan(scenes, random.Random(seed))
        out += frames
        caps += c
    return torch.from_numpy(np.stack(out)).float() / 255, caps


def to_image(frames: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] -1..1 -> [N, H, W, 3] 0..1."""
    return ((frames.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).contiguous()


def autoregressive(model, ctx: torch.Tensor, L: int, shape, steps: int, guidance: float, generator):
    """AR over diffusion: frames 0..L-1 from nothing, then windows whose first K frames are the last K made.
    ctx [N, n, d]: each frame's prompt -> latents [N, c, h, w]; also the number of windows."""
    n = ctx.shape[0]
    fn_model = in_model_dtype(model)
    c0 = ctx[None, :L]
    fn = guided(fn_model, (c0,), (null_prompts(c0),), guidance)
    frames = list(sample_ddim(fn, cpu_randn((1, L, *shape), generator), steps, generator=generator)[0])
    windows = 1
    mask = torch.zeros(1, L)
    mask[:, :K] = 1.0
    while len(frames) < n:
        start = len(frames) - K
        c = ctx[start:start + L]
        if c.shape[0] < L:  # the last window runs past the end: its captions repeat the last one
            c = torch.cat([c, c[-1:].expand(L - c.shape[0], *c.shape[1:])])
        c = c[None]
        cond = torch.zeros((1, L, *shape))
        cond[0, :K] = torch.stack(frames[-K:])
        fn = guided(fn_model, (c, cond, mask), (null_prompts(c), cond, mask), guidance)
        x0 = sample_ddim(fn, cpu_randn((1, L, *shape), generator), steps, generator=generator)[0]
        frames.extend(x0[K:])
        windows += 1
    return torch.stack(frames[:n]), windows


def frame_by_frame(model, ctx: torch.Tensor, shape, steps: int, guidance: float, generator) -> torch.Tensor:
    """Every frame a one-frame video of its own prompt and noise (no given frame) -> latents [N, c, h, w]."""
    c = ctx[:, None]  # [N, 1, n, d]
    fn = guided(in_model_dtype(model), (c,), (null_prompts(c),), guidance)
    return sample_ddim(fn, cpu_randn((ctx.shape[0], 1, *shape), generator), steps, generator=generator)[:, 0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", default=str(XL / "t_klvae_default.safetensors"))
    p.add_argument("--mtd", default=str(XL / "mtd_default.safetensors"))
    p.add_argument("--text-encoder", default=str(TEXT_ENCODER))
    p.add_argument("--depth", type=int, default=4, help="tree depth (L=5: 4 -> 257 frames, 3 -> 65)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps per diffusion call (every method)")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--window", type=int, default=0, help="frames of the first / last window (default N/4)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--clip-seed", type=int, default=101, help="seed of held-out pan A (the shipped pans: seed 0)")
    p.add_argument("--ref-seed", type=int, default=202, help="first seed of the reference pans B")
    p.add_argument("--ref-pans", type=int, default=2, help="reference pans B (the FD reference)")
    p.add_argument("--pca", type=int, default=16, help="FD in the reference's top PCA directions (0: all 1280)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not efflite0_available():
        raise SystemExit(f"needs the eval extra: pip install {EFFLITE0_PACKAGES} opencv-python-headless")
    t_start = time.time()
    model = XLModel.load(args.vae, args.mtd)
    encoder = load_text_encoder(args.text_encoder)
    L = int(model.info.get("L", 5))
    n = frames_for(L, args.depth)
    w = args.window or n // 4
    shape = model.latent_shape()
    trained_depth = model.info.get("depth")
    if trained_depth is not None and int(trained_depth) != args.depth:
        print(f"note: the model was trained for depth {trained_depth} (its top level's frames "
              f"{(L - 1) ** (int(trained_depth) - 1)} apart); depth {args.depth} puts them {(L - 1) ** (args.depth - 1)} "
              "apart: the tree's upper levels run at a stride it never saw", file=sys.stderr)

    clip, caps = held_out_pan(args.clip_seed, n)
    ref, ref_caps = reference_pans(caps, [args.ref_seed + i for i in range(args.ref_pans)])
    unique = sorted(set(caps))
    emb = dict(zip(unique, encoder.encode(unique)))
    ctx = torch.stack([emb[c] for c in caps])  # [N, n_tok, d]
    print(f"{n} frames (L={L}, depth {args.depth}), {args.steps} DDIM steps, guidance {args.guidance:g}, "
          f"window {w}, {torch.get_num_threads()} threads; clip A: pan seed {args.clip_seed} "
          f"({len(unique)} captions), reference B: {ref.shape[0]} frames of {args.ref_pans} pans of the same "
          "scenes, decoded by the T-KLVAE", file=sys.stderr, flush=True)

    with torch.no_grad():
        decoded = to_image(model.decode(model.encode(clip.permute(0, 3, 1, 2) * 2 - 1)))
        videos = {"real clip A, raw": clip, "real clip A, T-KLVAE decoded": decoded}
        order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
        videos["real decoded, frames shuffled"] = decoded[order]
        videos["real decoded, frame 0 frozen"] = decoded[:1].expand(n, -1, -1, -1).contiguous()
        seconds, extra = {}, {}

        t0 = time.time()
        gen = torch.Generator().manual_seed(args.seed)
        lat = frame_by_frame(model.global_mtd, ctx, shape, args.steps, args.guidance, gen)
        videos["frame by frame (MTD, F=1)"] = to_image(model.decode(lat, frames_apart=2))
        seconds["frame by frame (MTD, F=1)"] = time.time() - t0

        t0 = time.time()
        levels = [ctx[::(L - 1) ** (args.depth - 1 - k)] for k in range(args.depth)]
        videos["diffusion over diffusion"] = to_image(model.generate(L=L, depth=args.depth, steps=args.steps,
                                                                     seed=args.seed, prompts=levels,
                                                                     guidance=args.guidance))
        seconds["diffusion over diffusion"] = time.time() - t0
        extra["tree_windows"] = sum((L - 1) ** k for k in range(args.depth))

        t0 = time.time()
        gen = torch.Generator().manual_seed(args.seed)
        lat, extra["ar_windows"] = autoregressive(model.global_mtd, ctx, L, shape, args.steps, args.guidance, gen)
        videos["AR over diffusion"] = to_image(model.decode(lat))
        seconds["AR over diffusion"] = time.time() - t0
        print(f"generated in {time.time() - t_start:.0f} s; features ...", file=sys.stderr, flush=True)

        feats = {name: efflite0_block_features(v, block=224) for name, v in videos.items()}
        ref_dec = to_image(model.decode(model.encode(ref.permute(0, 3, 1, 2) * 2 - 1)))
        ref_f = efflite0_block_features(ref_dec, block=224)
    basis = pca_basis(ref_f, args.pca) if args.pca else (torch.zeros(ref_f.shape[1]), torch.eye(ref_f.shape[1]))

    # the first and last W frames, each against the reference frames of the scenes A shows there
    windows = {"first": slice(0, w), "last": slice(n - w, n)}
    scene_ref = {}
    for key, sl in windows.items():
        keep = torch.tensor([c in set(caps[sl]) for c in ref_caps])
        scene_ref[key] = (ref_f[keep], ref_dec[keep])
    rows = {}
    for name, v in videos.items():
        f = feats[name]
        rows[name] = {"fd_all": frechet_distance_pca(f, ref_f, basis), "fd_all_1280": frechet_distance(f, ref_f)}
        for key, sl in windows.items():
            rows[name][f"fd_{key}"] = frechet_distance_pca(f[sl], scene_ref[key][0], basis)
        errs = warp_errors(v)
        rows[name]["warp"] = float(np.mean(errs))
        rows[name]["warp_first"], rows[name]["warp_last"] = float(np.mean(errs[:w - 1])), float(np.mean(errs[-(w - 1):]))
        for key, sl in windows.items():
            rows[name][f"colour_{key}"] = colour_distance(v[sl], scene_ref[key][1])

    cols = ("fd_all", "fd_first", "fd_last", "fd_all_1280", "warp", "warp_first", "warp_last", "colour_first",
            "colour_last")
    fmt = {c: "8.4f" for c in cols} | {"fd_all": "8.2f", "fd_first": "8.2f", "fd_last": "8.2f", "fd_all_1280": "8.1f"}
    print(f"\n{'row':32s} " + " ".join(f"{c:>12s}" for c in cols) + f" {'s':>7s}")
    for name, r in rows.items():
        s = f"{seconds[name]:7.1f}" if name in seconds else f"{'':>7s}"
        print(f"{name:32s} " + " ".join(f"{r[c]:12{fmt[c][1:]}}" for c in cols) + f" {s}")

    controls = ("real decoded, frames shuffled", "real decoded, frame 0 frozen", "frame by frame (MTD, F=1)")
    real = rows["real clip A, T-KLVAE decoded"]
    fooled = {c: [k for k in controls if rows[k][c] <= real[c] * (1 + 1e-6) + 1e-9] for c in cols}
    print()
    for c, ks in fooled.items():
        if ks:
            print(f"{c}: ranks {' + '.join(ks)} at least as well as the decoded real clip: not usable alone")
        else:
            print(f"{c}: every control scores worse than the decoded real clip")
    tree, ar = rows["diffusion over diffusion"], rows["AR over diffusion"]
    print(f"\nfirst {w} -> last {w} frames, FD: tree {tree['fd_first']:.1f} -> {tree['fd_last']:.1f}, "
          f"AR {ar['fd_first']:.1f} -> {ar['fd_last']:.1f}, real decoded {real['fd_first']:.1f} -> {real['fd_last']:.1f}; "
          f"colour distance from the footage: tree {tree['colour_first']:.3f} -> {tree['colour_last']:.3f}, "
          f"AR {ar['colour_first']:.3f} -> {ar['colour_last']:.3f}; warping error: tree {tree['warp_first']:.4f} -> "
          f"{tree['warp_last']:.4f}, AR {ar['warp_first']:.4f} -> {ar['warp_last']:.4f}, real decoded "
          f"{real['warp_first']:.4f} -> {real['warp_last']:.4f}")
    print(f"note: FD from {n} frames (first / last: {w}) of one clip each, in {args.pca or 1280} dimensions: few, "
          "correlated samples; only the rows' order means anything, and a frames-shuffled row equals the real one "
          "on fd_all by construction (FD cannot see order)")
    print(json.dumps({
        "bench": "xl_quality", "mtd": Path(args.mtd).name, "frames": n, "L": L, "depth": args.depth,
        "steps": args.steps, "guidance": args.guidance, "window": w, "clip_seed": args.clip_seed,
        "ref_seed": args.ref_seed, "ar_context_frames": K, **extra,
        "rows": {k: {c: round(v, 4) for c, v in r.items()} for k, r in rows.items()},
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "controls_scoring_as_well_as_real": fooled,
        "threads": torch.get_num_threads(), "total_seconds": round(time.time() - t_start, 1)}))


if __name__ == "__main__":
    main()
