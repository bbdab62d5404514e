"""Image animation on held-out footage: does the frame context make the next frames closer to what really came next?

From a real frame of the held-out part of the shipped video model's footage (vtest_opencv.avi frames
600..794: the model trained on frames 0..599), K frames are generated two ways, same seed, same
decoding (the shipped PG-VQGAN, the real frame as frame 0):
  e_f = 2   the model's trained frame extent: each new frame reads the two before it;
  e_f = 0   the same model, no frame context (extent (0, 1, 1)): each new frame is made from nothing.
Controls, on the same reference in the same run:
  real continuation    the real next K frames, encoded and decoded as generated ones are (the tokenizer's ceiling);
  frozen frame         the given frame repeated K times (a plaza is mostly still: a strong score to beat);
  real, elsewhere      K real frames that follow another held-out frame (real motion, the wrong place);
  shuffled real        the real next K frames in a random order.
Scores over frames 1..K, against the real next K frames:
  lowres_psnr   PSNR of 8 x 8-pixel block means (token resolution: layout and colour, not texture);
  flicker       mean |frame_t - frame_t-1| (0..1 units): the real clip's own value is the reference, not 0.
Goal (the video issue): e_f = 2 above e_f = 0 in lowres_psnr and below it in flicker.
"""
import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from _data import SHARED_DATA

from nuwa_core.infinity.generation import NuwaInfinity
from nuwa_core.infinity.patch_samplers import SamplerSettings
from nuwa_core.infinity.pixel_guided_vqgan import decode_video, load_pgvqgan
from nuwa_core.training.data import read_video, to_model

MODELS = ROOT / "models" / "nuwa"
VIDEO = SHARED_DATA / "video" / "vtest_opencv.avi"


def lowres(x: torch.Tensor) -> torch.Tensor:  # [F, 3, H, W] in -1..1 -> [F, 3, H/8, W/8] in 0..1
    return F.avg_pool2d((x + 1) / 2, 8)


def lowres_psnr(frames: torch.Tensor, real: torch.Tensor) -> float:
    mse = (lowres(frames) - lowres(real)).pow(2).mean().clamp(min=1e-10)
    return float(10 * torch.log10(1 / mse))


def flicker(frames: torch.Tensor) -> float:
    return float(((frames[1:] - frames[:-1]).abs() / 2).mean())


def contact_sheet(model: NuwaInfinity, pg, path: Path, settings: SamplerSettings, frames=(0, 20, 100),
                  seed: int = 0) -> None:
    """The template's still (models/nuwa/nuwa_infinity_plaza.jpg) animated for max(frames) frames: the chosen
    frames in a row, decoded by the PG-VQGAN (top) and by the plain VQGAN frame by frame (bottom)."""
    from PIL import Image

    from nuwa_core.images import load_image
    still = load_image(MODELS / "nuwa_infinity_plaza.jpg")
    canvas = model.canvas_from_image(still)
    out = model.generate(canvas, model.plan_frames(canvas, max(frames)), settings,
                         generator=torch.Generator().manual_seed(seed))
    given = still[0].permute(2, 0, 1) * 2 - 1
    rows = [decode_video(model.vqgan, decoder, out.tokens[0], given, model.vqgan_tile) for decoder in (pg, None)]
    h, w, gap = given.shape[1], given.shape[2], 4
    sheet = Image.new("RGB", (len(frames) * (w + gap) - gap, 2 * h + gap), (24, 24, 24))
    for r, video in enumerate(rows):
        for c, k in enumerate(frames):
            pixels = ((video[k].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            sheet.paste(Image.fromarray(pixels), (c * (w + gap), r * (h + gap)))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    print(f"contact sheet: frames {frames} (top: PG-VQGAN, bottom: plain VQGAN) -> {path}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(MODELS / "nuwa_infinity_plaza.safetensors"))
    p.add_argument("--pgvqgan", default=str(MODELS / "pgvqgan" / "pgvqgan_plaza.safetensors"))
    p.add_argument("--video", default=str(VIDEO))
    p.add_argument("--starts", default="610,660,710,760", help="held-out frames to animate from")
    p.add_argument("--frames", type=int, default=8, help="K frames generated after each")
    p.add_argument("--size", default="256x192", help="frame size (the model's training size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.5, help="the image_animation template's: at 1.0 the "
                   "frames drift from the still within 20 frames")
    p.add_argument("--contact-sheet", default=None, metavar="PNG", help="also animate the template's still for 100 "
                   "frames and save frames 0, 20 and 100 here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model = NuwaInfinity.load(args.model)
    pg = load_pgvqgan(args.pgvqgan)
    settings = SamplerSettings(top_k=args.top_k, temperature=args.temperature)
    if args.contact_sheet:
        contact_sheet(model, pg, Path(args.contact_sheet), settings, seed=args.seed)
    w, h = (int(v) for v in args.size.split("x"))
    video = to_model(read_video(Path(args.video), (w, h))[0])  # [T, 3, H, W] -1..1
    starts, k = [int(s) for s in args.starts.split(",")], args.frames
    e_f = model.renderer.config.extent[0]
    tile = model.vqgan_tile
    gen = torch.Generator().manual_seed(args.seed)

    def decoded(tokens, first):  # tokens [F, h, w] -> [F, 3, H, W], frame 0 the given real frame
        return decode_video(model.vqgan, pg, tokens, first, tile)

    rows: dict[str, list[dict]] = {}
    for n, start in enumerate(starts):
        given, real = video[start], video[start + 1:start + 1 + k]
        still = ((given.permute(1, 2, 0)[None] + 1) / 2).clamp(0, 1)  # IMAGE [1, H, W, 3]
        canvas = model.canvas_from_image(still)
        candidates = {}
        for name, extent in ((f"NUWA-Infinity, e_f = {e_f}", None), ("no frame context, e_f = 0", (0,) + tuple(
                model.renderer.config.extent[1:]))):
            out = model.generate(canvas, model.plan_frames(canvas, k), settings, extent=extent,
                                 generator=torch.Generator().manual_seed(args.seed + n))
            candidates[name] = decoded(out.tokens[0], given)[1:]
        real_tokens = model.vqgan.encode_tokens_tiled(torch.cat([given[None], real]), tile=tile, overlap=tile // 4)
        candidates["real continuation (control)"] = decoded(real_tokens, given)[1:]
        candidates["frozen frame (control)"] = given[None].expand(k, -1, -1, -1)
        other = starts[(n + 1) % len(starts)]
        candidates["real, elsewhere (control)"] = video[other + 1:other + 1 + k]
        candidates["shuffled real (control)"] = real[torch.randperm(k, generator=gen)]
        for name, frames in candidates.items():
            with_given = torch.cat([given[None], frames])  # flicker counts the step from the given frame too
            rows.setdefault(name, []).append({"lowres_psnr": lowres_psnr(frames, real), "flicker": flicker(with_given)})
        print(f"start {start}: " + ", ".join(f"{name.split(',')[0]} {rows[name][-1]['lowres_psnr']:.2f}"
                                            for name in candidates), flush=True)
    real_flicker = sum(flicker(torch.cat([video[s][None], video[s + 1:s + 1 + k]])) for s in starts) / len(starts)
    table = {name: {m: round(sum(r[m] for r in rs) / len(rs), 4) for m in ("lowres_psnr", "flicker")}
             for name, rs in rows.items()}
    print(f"\n{len(starts)} held-out starts x {k} frames, {w}x{h}, top-k {args.top_k}, temperature "
          f"{args.temperature}; the real footage's own flicker: {real_flicker:.4f}")
    print(f"{'row':>34} | lowres PSNR dB | flicker")
    for name, r in table.items():
        print(f"{name:>34} | {r['lowres_psnr']:14.2f} | {r['flicker']:.4f}")
    ours, none = table[f"NUWA-Infinity, e_f = {e_f}"], table["no frame context, e_f = 0"]
    figures = {"rows": table, "real_flicker": round(real_flicker, 4),
               "closer_than_no_context": ours["lowres_psnr"] > none["lowres_psnr"],
               "flickers_less_than_no_context": ours["flicker"] < none["flicker"],
               "beats_frozen_frame": ours["lowres_psnr"] > table["frozen frame (control)"]["lowres_psnr"]}
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
