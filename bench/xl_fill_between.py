"""NUWA-XL from a user's own frames (NUWA-XL Encode -> Local Diffusion): are the given frames kept, and how close
are the frames filled between them to the real frames they stand for?

A held-out camera pan of the shipped model's kind (bench/_xl_pans.py, seed --seed, not one of the training pans),
its frames --start, --start + 16, --start + 32 as keyframes (the template's example frames are these at the
defaults), two Local Diffusion levels of L=5 (3 -> 9 -> 33 frames: 1 frame apart, the pan's own spacing), decoded;
every row is compared with the 33 real frames, mean absolute error on 0..1 pixels, in the same run:

  keyframe positions      the decoded video at the given frames (kept: the T-KLVAE's round trip sets the floor)
  in-between frames       the 30 generated frames
  controls                the T-KLVAE's round trip of the real frames (encoded as a clip, decoded); a pixel
                          cross-fade of the two keyframes around each frame; the nearest keyframe; the filled
                          video's frames shuffled

    python bench/xl_fill_between.py [--steps 30] [--seed 2026] [--start 104] [--prompts "a blue sky over the sea" ...]
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _xl_pans import pan

from nuwa_core.xl.keyframes import encode_keyframes
from nuwa_core.xl.model import XLModel

SCENES = [("a blue sky", "the sea"), ("a sunset sky", "a flower field")]
APART, L = 16, 5


def mae(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().mean(dim=(1, 2, 3))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", default=str(REPO / "models/nuwa_xl/t_klvae_default.safetensors"))
    p.add_argument("--mtd", default=str(REPO / "models/nuwa_xl/mtd_default.safetensors"))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seed", type=int, default=2026, help="the pan's seed (the training pans: seed 0)")
    p.add_argument("--start", type=int, default=104)
    p.add_argument("--sample-seed", type=int, default=0)
    p.add_argument("--prompts", nargs="*", default=[], help="captions through the shipped text encoder, spread over "
                   "the frames in equal parts (default: none, the template's run)")
    p.add_argument("--guidance", type=float, default=1.0)
    args = p.parse_args()
    torch.set_num_threads(1)
    frames, _ = pan(SCENES, random.Random(args.seed))
    real = torch.from_numpy(np.stack(frames[args.start:args.start + 2 * APART + 1]).astype(np.float32) / 255)
    real = real.permute(0, 3, 1, 2) * 2 - 1  # [33, 3, 48, 64] in -1..1
    model = XLModel.load(args.vae, args.mtd)
    prompts = None
    if args.prompts:
        from nuwa_core.text_encoder import load_text_encoder
        enc = load_text_encoder(REPO / "models/nuwa/text_encoders/nuwa_text_scenes.safetensors")
        feats = [enc.encode([t])[0].float() for t in args.prompts]
        n = max(f.shape[0] for f in feats)  # shorter prompts padded with zeros, as the nodes pad them
        prompts = torch.stack([torch.cat([f, f.new_zeros(n - f.shape[0], f.shape[1])]) for f in feats])
    keys = encode_keyframes(model, real[::APART])
    lat = keys
    for _ in range(2):
        from nuwa_core.xl.diffusion_over_diffusion import spread_prompts
        levels = None if prompts is None or prompts.shape[0] == 1 else spread_prompts(prompts, (lat.shape[0] - 1) * (L - 1) + 1)
        lat = model.fill(lat, levels if levels is not None else prompts, L, args.steps, args.sample_seed,
                         guidance=args.guidance)
    assert torch.equal(lat[::APART].cpu(), keys), "Local Diffusion changed the given keyframes"
    to01 = lambda x: (x.float().clamp(-1, 1) + 1) / 2
    video, truth = to01(model.decode(lat)), to01(real)
    idx = torch.arange(truth.shape[0])
    mid = idx % APART != 0
    t = (idx % APART).float()[:, None, None, None] / APART
    left, right = truth[::APART][idx // APART], truth[::APART][torch.clamp(idx // APART + 1, max=2)]
    round_trip = to01(model.decode(model.encode(real)))
    shuffled = video[torch.randperm(len(idx), generator=torch.Generator().manual_seed(0))]
    rows = {
        "keyframe positions (filled video)": mae(video, truth)[~mid],
        "keyframes' own round trip (alone)": mae(to01(torch.cat([model.decode(k[None]) for k in keys])), truth[::APART]),
        "in-between frames (filled video)": mae(video, truth)[mid],
        "control: T-KLVAE round trip of the real clip": mae(round_trip, truth)[mid],
        "control: pixel cross-fade of the keyframes": mae(left * (1 - t) + right * t, truth)[mid],
        "control: nearest keyframe": mae(truth[::APART][(idx + APART // 2) // APART], truth)[mid],
        "control: filled video shuffled": mae(shuffled, truth)[mid],
    }
    print(f"pan seed {args.seed}, frames {args.start}..{args.start + 2 * APART}, keyframes {APART} apart, L={L}, "
          f"2 levels, {args.steps} steps, prompts {args.prompts or 'none'}, guidance {args.guidance}")
    for name, err in rows.items():
        print(f"  {name:48s} mean abs error {err.mean():.4f}  ({', '.join(f'{e:.3f}' for e in err[:3])}...)")


if __name__ == "__main__":
    main()
