"""Temporal consistency of the Pixel-Guided VQGAN: the same tokens decoded two ways, on held-out clips.

    python bench/pgvqgan_flicker.py [--model BUNDLE] [--pgvqgan FILE] [--video VIDEO] [--frames 600,795]
                                    [--clips 4] [--clip-frames 16] [--size 256x192] [--train-minutes N]

Tokens are the model VQGAN's tiled encoding of real held-out frames (frames A..B-1 of the video, which
the PG-VQGAN never trained on), so every row decodes the same tokens; rows:
  real             the real clip (control: the motion itself)
  plain VQGAN      every frame decoded on its own (the baseline)
  PG-VQGAN (IA)    frame 0 the real frame (image animation), later frames guided by the previous decoded one
  PG-VQGAN (T2V)   frame 0 by the plain VQGAN (text-to-video), later frames as above
  PG-VQGAN (self)  every frame by the PG-VQGAN guided by the plain decode of its *own* tokens: no
                   information from another frame. Training fine-tunes the decoder copy on the video, so
                   a PG-VQGAN can beat the plain VQGAN by fitting the video's look alone; this row
                   separates that from what the previous frame adds (the IA / T2V rows should beat it)
  shuffled real    real held-out frames from other times (at least a clip away), in random order: a
                   control that must score far worse
Metrics (pixels in 0..1), over the pairs of frames (n-1, n) for n >= 2 and frames n >= 1, leaving out
frame 0, which the rows set differently by design:
  flicker      mean |x_n - x_{n-1}|
  warp_error   mean |x_n - warp(x_{n-1})| where the real frames' motion is DIS optical flow (OpenCV,
               computed on the real frames, so every row is warped by the same real motion); only pixels
               whose source lies inside the frame count
  psnr         of each frame against the real frame (a PG-VQGAN that copied the previous frame would keep
               low flicker and lose PSNR here)
Without --pgvqgan's file, --train-minutes N trains one first with the `pgvqgan` stage on frames 0..A-1
of the same video (into outputs/bench_pgvqgan/). Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from _data import SHARED_DATA

from nuwa_core.checkpoint import read_metadata
from nuwa_core.infinity.generation import BUNDLE_KIND, NuwaInfinity
from nuwa_core.infinity.pixel_guided_vqgan import check_pair, decode_video, load_pgvqgan, load_tokenizer
from nuwa_core.training.data import parse_frame_range, parse_size, to_model
from nuwa_core.training.pgvqgan import read_frames

DEFAULT_MODEL = REPO / "models" / "nuwa" / "nuwa_infinity_plaza.safetensors"
DEFAULT_PGVQGAN = REPO / "models" / "nuwa" / "pgvqgan" / "pgvqgan_plaza.safetensors"
DEFAULT_VIDEO = SHARED_DATA / "video" / "vtest_opencv.avi"
ROWS = ("real", "plain VQGAN", "PG-VQGAN (self)", "PG-VQGAN (IA)", "PG-VQGAN (T2V)", "shuffled real")


def _cv2():
    try:
        import cv2
    except ImportError as err:
        raise SystemExit("this bench needs OpenCV's DIS optical flow: pip install opencv-python-headless "
                         "(the pack's `eval` extra)") from err
    return cv2


def to_unit(x: torch.Tensor) -> np.ndarray:
    """[F, 3, H, W] in -1..1 -> float32 [F, H, W, 3] in 0..1."""
    return ((x.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).contiguous().numpy()


def real_flows(frames: np.ndarray) -> list[np.ndarray]:
    """DIS flow of the real frames [F, H, W, 3] (0..1): flows[n-1] [H, W, 2] maps each pixel of frame n
    to where it was in frame n-1 (frame_n(p) ~ frame_{n-1}(p + flow(p)))."""
    cv2 = _cv2()
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    gray = [cv2.cvtColor((f * 255).round().astype(np.uint8), cv2.COLOR_RGB2GRAY) for f in frames]
    return [dis.calc(gray[n], gray[n - 1], None) for n in range(1, len(frames))]


def warp_back(frame: np.ndarray, flow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """frame [H, W, 3] (frame n-1) sampled at p + flow(p) -> (warped [H, W, 3], valid [H, W] bool)."""
    cv2 = _cv2()
    h, w = flow.shape[:2]
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    mx, my = xs + flow[..., 0], ys + flow[..., 1]
    warped = cv2.remap(frame, mx, my, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    valid = (mx >= 0) & (mx <= w - 1) & (my >= 0) & (my <= h - 1)
    return warped, valid


def scores(frames: np.ndarray, real: np.ndarray, flows: list[np.ndarray], first: int = 2) -> dict[str, float]:
    """flicker, warp_error over pairs (n-1, n) for n >= first, psnr over frames n >= first - 1."""
    flicker, warp, psnrs = [], [], []
    for n in range(first, len(frames)):
        flicker.append(float(np.abs(frames[n] - frames[n - 1]).mean()))
        warped, valid = warp_back(frames[n - 1], flows[n - 1])
        warp.append(float(np.abs(frames[n] - warped)[valid].mean()))
    for n in range(first - 1, len(frames)):
        mse = float(((frames[n] - real[n]) ** 2).mean())
        psnrs.append(10 * math.log10(1 / mse) if mse > 0 else float("inf"))
    return {"flicker": float(np.mean(flicker)), "warp_error": float(np.mean(warp)), "psnr": float(np.mean(psnrs))}


def clip_starts(length: int, clips: int, clip_frames: int) -> list[int]:
    if length < clip_frames:
        raise SystemExit(f"the held-out range has {length} frames, fewer than one clip of --clip-frames {clip_frames}")
    last = length - clip_frames
    return sorted({round(last * i / max(1, clips - 1)) for i in range(clips)}) if clips > 1 else [last // 2]


def train_fallback(args, a: int) -> Path:
    from nuwa_core.training import pgvqgan as stage
    from nuwa_core.training.cli import build_parser
    out = REPO / "outputs" / "bench_pgvqgan" / "pgvqgan_bench.safetensors"
    cmd = ["pgvqgan", "--tokenizer", str(args.model), "--videos", str(args.video), "--frame-range", f"0,{a}",
           "--size", args.size, "--out", str(out), "--steps", "100000", "--max-minutes", str(args.train_minutes),
           "--quiet", "--save-every", "0", "--seed", str(args.seed)]
    print(f"[bench] no PG-VQGAN at {args.pgvqgan}: training one for {args.train_minutes} min: "
          f"python -m nuwa_core.train {' '.join(cmd)}", file=sys.stderr)
    stage.run(build_parser().parse_args(cmd))
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="NUWA-Infinity bundle (its VQGAN tokenizes), "
                   "or a bare VQGAN file")
    p.add_argument("--tile", type=int, default=0, help="tokens per side of the decode windows (default: the bundle's "
                   "patch; 8 for a bare VQGAN)")
    p.add_argument("--pgvqgan", type=Path, default=DEFAULT_PGVQGAN, help="PG-VQGAN trained for the model's VQGAN")
    p.add_argument("--video", type=Path, default=DEFAULT_VIDEO)
    p.add_argument("--frames", default="600,795", help="held-out frames A,B (A..B-1)")
    p.add_argument("--clips", type=int, default=4)
    p.add_argument("--clip-frames", type=int, default=16, help="frames per clip (the PG-VQGAN's first few frames "
                   "drift from frame 0 towards its steady state: short clips weigh that transient)")
    p.add_argument("--size", default="256x192", help="frame size WIDTHxHEIGHT after resize + centre crop")
    p.add_argument("--train-minutes", type=float, default=0.0, help="without the --pgvqgan file: train one first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    if not args.model.is_file():
        raise SystemExit(f"no model at {args.model}; give --model (e.g. models/nuwa/nuwa_infinity_default.safetensors)")
    a, b = parse_frame_range(args.frames)
    if args.clip_frames < 3:
        raise SystemExit(f"--clip-frames must be >= 3 (the first frame is left out of the scores), got {args.clip_frames}")
    pg_path = args.pgvqgan
    if not pg_path.is_file():
        if args.train_minutes <= 0:
            raise SystemExit(f"no PG-VQGAN at {pg_path}; give --pgvqgan, or --train-minutes N to train one first")
        pg_path = train_fallback(args, a)
    if read_metadata(args.model).get("nuwa_kind") == BUNDLE_KIND:
        model = NuwaInfinity.load(args.model)
        vq, tile = model.vqgan.float().eval(), args.tile or model.vqgan_tile
    else:  # a bare VQGAN file (e.g. a tokenizer whose renderer is still training)
        vq, tile = load_tokenizer(args.model), args.tile or 8
    pg = load_pgvqgan(pg_path)
    check_pair(pg, vq, pg_path, args.model)
    (held,) = read_frames(str(args.video), parse_size(args.size), (a, b))
    gen = torch.Generator().manual_seed(args.seed)
    per_row: dict[str, list[dict]] = {r: [] for r in ROWS}
    starts = clip_starts(held.shape[0], args.clips, args.clip_frames)
    for s in starts:
        real_x = to_model(held[s:s + args.clip_frames])  # [K, 3, H, W]
        tokens = vq.encode_tokens_tiled(real_x, tile=tile, overlap=tile // 4)
        real = to_unit(real_x)
        flows = real_flows(real)
        # frames from other times of the held-out range (away from this clip), in random order
        away = torch.tensor([t for t in range(held.shape[0]) if abs(t - s) >= args.clip_frames])
        if len(away) < len(real_x):
            raise SystemExit(f"the held-out range {a},{b} is too short for the shuffled control: it needs frames "
                             f"at least {args.clip_frames} away from each clip")
        shuffled = to_unit(to_model(held[away[torch.randperm(len(away), generator=gen)[:len(real_x)]]]))
        plain = decode_video(vq, None, tokens, None, tile)
        self_guided = torch.cat([pg.decode_tokens_tiled(tokens[n:n + 1], plain[n:n + 1], tile=tile, overlap=tile // 4)
                                 for n in range(len(tokens))])
        rows = {
            "real": real,
            "plain VQGAN": to_unit(plain),
            "PG-VQGAN (self)": to_unit(self_guided),
            "PG-VQGAN (IA)": to_unit(decode_video(vq, pg, tokens, real_x[0], tile)),
            "PG-VQGAN (T2V)": to_unit(decode_video(vq, pg, tokens, None, tile)),
            "shuffled real": shuffled,
        }
        for name, frames in rows.items():
            per_row[name].append(scores(frames, real, flows))
    result = {k: {r: round(float(np.mean([c[k] for c in per_row[r]])), 5) for r in ROWS}
              for k in ("flicker", "warp_error", "psnr")}
    result["psnr"]["real"] = None  # infinite: the reference itself
    print(f"{'row':16s} {'flicker':>9s} {'warp_err':>9s} {'psnr dB':>8s}")
    for r in ROWS:
        ps = result["psnr"][r]
        print(f"{r:16s} {result['flicker'][r]:9.4f} {result['warp_error'][r]:9.4f} "
              f"{'inf' if ps is None else f'{ps:.2f}':>8s}")
    pg_rows = ("PG-VQGAN (IA)", "PG-VQGAN (T2V)")
    result["pg_lower_than_plain"] = all(result[k][r] < result[k]["plain VQGAN"]
                                        for k in ("flicker", "warp_error") for r in pg_rows)
    result["pg_lower_than_self_guided"] = all(result[k][r] < result[k]["PG-VQGAN (self)"]
                                              for k in ("flicker", "warp_error") for r in pg_rows)
    result["shuffled_far_worse"] = result["warp_error"]["shuffled real"] > 2 * max(
        result["warp_error"][r] for r in ROWS if r != "shuffled real")
    result["settings"] = {"model": str(args.model), "pgvqgan": str(pg_path), "video": str(args.video),
                          "frames": [a, b], "clip_starts": [a + s for s in starts], "clip_frames": args.clip_frames,
                          "size": args.size, "tile": tile}
    result["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
