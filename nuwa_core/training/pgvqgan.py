"""The `pgvqgan` stage: train a Pixel-Guided VQGAN decoder (NUWA-Infinity section 3.3.2) on videos.

    python -m nuwa_core.train pgvqgan --tokenizer VQGAN_OR_BUNDLE.safetensors --videos VIDEO \\
        --frame-range 0,600 --size 256x192 --steps 2000 --out pgvqgan.safetensors

It starts from the trained VQGAN (a bare VQGAN file or a NUWA-Infinity bundle's): its decoder,
post_quant_conv and codebook are copied and the guidance encoder's fusions are zero, so step 0
decodes exactly as the VQGAN. The VQGAN's encoder and codebook stay frozen (the tokens are what the
renderer makes, and post_quant_conv too, so the pairing check holds); the decoder copy and the
guidance encoder train. A sample is a pair of consecutive frames n-1, n (the same random crop and
flip on both): frame n's tokens, guided by frame n-1's pixels, must decode to frame n's pixels.
Loss: L1 (`--lpips FILE` adds the pack's LPIPS; off by default: VGG16 costs more than the whole
decoder on the CPU).

Guidance noise (`--recon-guidance P`, default 0.5): with probability P per sample the guidance is
frame n-1's *reconstruction* (the plain VQGAN's decode of its tokens) instead of its real pixels.
At inference the guidance is always a decoded frame, with the tokenizer's blur and artefacts; a
decoder that saw only real previous frames learns to trust them as sharp truth and copies their
detail, which then carries decoding errors from frame to frame. Decoded guidance during training
teaches it to take from the previous frame only what helps. `--pg-guidance Q` goes one step further:
of those samples, a share Q is guided by the PG-VQGAN's own decode of frame n-1 (no gradient), which
is what inference feeds it from the second frame on; without it, decoding a video feeds the PG-VQGAN
its own outputs, a kind of guidance it never trained on, and its error grows frame after frame.

Temporal loss (`--temporal-weight W`, default 0: off): W * mean |(out - guidance) - (frame n - frame n-1)|,
the decoded change from the guidance frame against the real change between the two frames. At
inference the guidance *is* the previous output, so this term is the frame-to-frame change itself
measured against the real one: where the scene stands still the output should repeat the guidance
rather than re-invent its detail (the L1 term alone rewards each frame's accuracy, not agreement
between frames). With real-pixel guidance it equals the L1 term.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from ..checkpoint import CheckpointError
from ..images import model_to_image, save_image
from ..infinity.pixel_guided_vqgan import (
    PairError,
    PixelGuidedDecoder,
    check_pair,
    load_pgvqgan,
    load_tokenizer,
    save_pgvqgan,
    token_fingerprint,
)
from ..infinity.vqgan import VQModel
from .arguments import lpips_arguments
from .data import list_video_sources, parse_frame_range, parse_size, read_video, to_model
from .loop import Dist, Run, TrainingError, dtype_named, set_lr
from .perceptual_loss import lpips_for_run

DEFAULT_LR = 1e-4
DEFAULT_SIZE = "256x192"  # 4 x 3 patches of 64 px (8-token patches of an f8 VQGAN)


def read_frames(spec: str, size: tuple[int, int], frame_range: tuple[int, int] | None = None,
                frame_step: int = 1) -> list[torch.Tensor]:
    """Every video of `spec` (a file, a folder of frames, a folder of those) as uint8 [T, 3, H, W] at
    `size` (width, height), frames frame_range[0]..[1]-1 only when given, then every frame_step-th.
    A video that cannot be decoded is an error naming it; one with fewer than 2 frames left too."""
    videos, sources = [], list_video_sources(spec)
    for src in sources:
        try:
            v, _ = read_video(src, size, 1, frame_range[1] if frame_range else 0)
        except TrainingError:
            raise
        except Exception as err:  # PyAV / imageio / PIL raise their own types for broken files
            raise TrainingError(f"cannot decode the video {src}: {type(err).__name__}: {err}; give a video file "
                                f"FFmpeg reads (.mp4, .avi, ...) or a folder of its frames as images") from err
        if frame_range is not None:
            if v.shape[0] <= frame_range[0]:
                raise TrainingError(f"{src}: --frame-range {frame_range[0]},{frame_range[1]} starts after its last "
                                    f"frame (it has {v.shape[0]} frames)")
            v = v[frame_range[0]:frame_range[1]]
        videos.append(v[::frame_step])
    return check_videos(videos, [str(s) for s in sources])


def check_videos(videos: list[torch.Tensor], names: list[str] | None = None) -> list[torch.Tensor]:
    """uint8 [T, 3, H, W] videos of at least 2 frames each (a pair is 2 consecutive frames)."""
    if not videos:
        raise TrainingError("no videos to train on")
    for i, v in enumerate(videos):
        name = names[i] if names and i < len(names) else f"video {i}"
        if not isinstance(v, torch.Tensor) or v.ndim != 4 or v.shape[1] != 3 or v.dtype != torch.uint8:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise TrainingError(f"{name}: expected uint8 frames [T, 3, H, W], got {got}"
                                + (f" of {v.dtype}" if isinstance(v, torch.Tensor) else ""))
        if v.shape[0] < 2:
            raise TrainingError(f"{name}: a training pair needs 2 consecutive frames, the clip has {v.shape[0]} "
                                f"(after --frame-range / --frame-step); use a longer clip or a wider range")
    return videos


def sample_pairs(videos: list[torch.Tensor], n: int, crop: tuple[int, int], gen: torch.Generator,
                 flip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """n pairs of consecutive frames -> (previous, current), float [n, 3, h, w] in -1..1 each: the same
    random crop (and horizontal flip) on both frames of a pair."""
    h, w = crop
    pairs = torch.tensor([v.shape[0] - 1 for v in videos], dtype=torch.float64)
    prev, cur = [], []
    for _ in range(n):
        vi = int(torch.multinomial(pairs, 1, generator=gen))
        v = videos[vi]
        t = 1 + int(torch.randint(v.shape[0] - 1, (1,), generator=gen))
        H, W = v.shape[-2:]
        top = int(torch.randint(H - h + 1, (1,), generator=gen))
        left = int(torch.randint(W - w + 1, (1,), generator=gen))
        pair = to_model(v[t - 1:t + 1, :, top:top + h, left:left + w])
        if flip and bool(torch.rand((), generator=gen) < 0.5):
            pair = pair.flip(-1)
        prev.append(pair[0])
        cur.append(pair[1])
    return torch.stack(prev), torch.stack(cur)


def temporal_loss(out: torch.Tensor, guidance: torch.Tensor, cur: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """mean |(out - guidance) - (cur - prev)|: the decoded change from the guidance frame against the real
    change from frame n-1 (prev) to frame n (cur); 0 when the output moves from the guidance exactly as the
    real frames move."""
    return ((out - guidance) - (cur - prev)).abs().mean()


def pgvqgan_config_dict(args, vq: VQModel) -> dict:
    return {"stage": "pgvqgan", "tokenizer": Path(args.tokenizer).name, "vqgan": token_fingerprint(vq),
            "size": args.size, "crop": args.crop, "batch": args.batch, "lr": args.lr, "seed": args.seed,
            "recon_guidance": args.recon_guidance, "frame_range": args.frame_range or "",
            "frame_step": args.frame_step, "guide_blocks": args.guide_blocks,
            **({"lpips": Path(args.lpips).name, "lpips_weight": args.lpips_weight} if args.lpips else {}),
            # only when used, so checkpoints from before these options existed still resume
            **({"pg_guidance": args.pg_guidance} if args.pg_guidance else {}),
            **({"temporal_weight": args.temporal_weight} if args.temporal_weight else {}),
            **({"init": Path(args.init).name} if args.init else {})}


def train_pgvqgan(args, videos: list[torch.Tensor] | None = None, monitor=None) -> dict:
    """The stage on --videos, or on `videos` (uint8 [T, 3, H, W] each, e.g. frames a caller already holds;
    --frame-range, --frame-step and --max-frames apply to them too); `monitor`: see loop.Run. -> the run's stats."""
    if not 0.0 <= args.recon_guidance <= 1.0:
        raise TrainingError(f"--recon-guidance is a probability in 0..1, got {args.recon_guidance}")
    if not 0.0 <= args.pg_guidance <= 1.0:
        raise TrainingError(f"--pg-guidance is a probability in 0..1, got {args.pg_guidance}")
    if args.temporal_weight < 0:
        raise TrainingError(f"--temporal-weight must be >= 0, got {args.temporal_weight}")
    if args.guide_blocks < 1:
        raise TrainingError(f"--guide-blocks must be >= 1, got {args.guide_blocks}")
    dist = Dist(getattr(args, "device", None))
    torch.manual_seed(args.seed)
    try:
        vq = load_tokenizer(args.tokenizer).to(dist.device)
    except CheckpointError as err:
        raise TrainingError(f"--tokenizer {args.tokenizer}: {err}") from err
    for p in vq.parameters():
        p.requires_grad_(False)
    f = vq.downsample_factor
    if args.crop % f or args.crop < f:
        raise TrainingError(f"--crop {args.crop} must be a positive multiple of the VQGAN's downsample factor {f}")
    frame_range = parse_frame_range(args.frame_range)
    if videos is None:
        videos = read_frames(args.videos, parse_size(args.size), frame_range, args.frame_step)
    else:
        videos = check_videos(videos)
        if frame_range is not None:
            videos = [v[frame_range[0]:frame_range[1]] for v in videos]
        videos = check_videos([v[::args.frame_step] for v in videos])
    if args.max_frames:
        videos = check_videos([v[:args.max_frames] for v in videos])
    small = [tuple(v.shape[-2:]) for v in videos if min(v.shape[-2:]) < args.crop]
    if small:
        raise TrainingError(f"--crop {args.crop} is larger than the frames ({small[0][1]}x{small[0][0]} px): "
                            f"use a smaller --crop or a larger --size")
    crop = (args.crop, args.crop)
    if args.init:  # continue from a trained PG-VQGAN of this tokenizer
        try:
            pg = load_pgvqgan(args.init)
            check_pair(pg, vq, args.init, args.tokenizer)
        except (CheckpointError, PairError) as err:
            raise TrainingError(f"--init {args.init}: {err}") from err
        pg = pg.to(dist.device).train()
    else:
        pg = PixelGuidedDecoder.from_vqgan(vq, guide_blocks=args.guide_blocks).to(dist.device).train()
    for part in (pg.quantize, pg.post_quant_conv):  # what a token decodes to: fixed (check_pair compares them)
        part.requires_grad_(False)
    perceptual = lpips_for_run(args, dist.device)
    trainable = [p for p in pg.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=args.lr, betas=(0.5, 0.9))
    data_gen = torch.Generator().manual_seed(args.seed + 1000 * dist.rank)
    run = Run("pgvqgan", args, dist, {"pgvqgan": pg}, {"pgvqgan": opt}, pgvqgan_config_dict(args, vq), data_gen,
              monitor)
    step = 0
    if args.resume:
        step = int(run.resume()["step"])
    pg_ddp = dist.wrap(pg)
    sample_prev, sample_cur = sample_pairs(videos, 4, crop, torch.Generator().manual_seed(123), flip=False)
    run.preview = lambda: _preview(vq, pg, sample_prev, sample_cur)

    def one_step(step, check):
        prev, cur = (x.to(dist.device) for x in sample_pairs(videos, args.batch, crop, data_gen, flip=True))
        set_lr(opt, args.lr, step, args.warmup, run.lr_total())
        real_prev = prev
        with torch.no_grad():
            both = vq.encode_tokens(torch.cat([prev, cur]))
            tokens_prev, tokens = both[:len(prev)], both[len(prev):]
            use_rec = torch.rand(len(prev), generator=data_gen) < args.recon_guidance
            own = 0
            if bool(use_rec.any()):
                picked = tokens_prev[use_rec.to(tokens_prev.device)]
                rec = vq.decode_tokens(picked).clamp(-1, 1)
                if args.pg_guidance > 0:  # some of them: the PG-VQGAN's own decode of frame n-1, as at inference
                    use_pg = (torch.rand(len(rec), generator=data_gen) < args.pg_guidance).to(rec.device)
                    own = int(use_pg.sum())
                    if own:
                        rec[use_pg] = pg.decode(pg.quantize.embed(picked[use_pg]), rec[use_pg]).clamp(-1, 1)
                prev = prev.clone()
                prev[use_rec.to(prev.device)] = rec
        out = pg_ddp(tokens, prev)
        l1 = (out - cur).abs().mean()
        lpips = perceptual(out, cur).mean() if perceptual is not None else torch.zeros((), device=out.device)
        temporal = (temporal_loss(out, prev, cur, real_prev) if args.temporal_weight > 0
                    else torch.zeros((), device=out.device))
        loss = l1 + args.lpips_weight * lpips + args.temporal_weight * temporal
        check(loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.item(), "l1": l1.item(), "lpips": lpips.item(), "temporal": temporal.item(),
                "recon_guided": int(use_rec.sum()), "pg_guided": own}

    def postfix(st, steps_per_s):
        return {"l1": f"{st['l1']:.4f}", "pps": f"{args.batch * dist.world * steps_per_s:.1f}"}

    fields = ["step", "time", "loss", "l1", "recon_guided", "pg_guided"] + (["lpips"] if perceptual is not None else []) \
        + (["temporal"] if args.temporal_weight > 0 else [])
    step, stopped, stats = run.loop(step, one_step, fields, postfix=postfix,
                                    sample=lambda path: save_image(run.preview(), path))
    if dist.main:
        save_pgvqgan(pg, run.out, token_fingerprint(vq), dtype=dtype_named(args.save_dtype),
                     metadata={"vqgan_source": Path(args.tokenizer).name, "steps": str(step),
                               "frame_range": args.frame_range or ""})
        print(f"[train] pgvqgan: stopped ({stopped}) at step {step}; wrote {run.out} and its training checkpoint",
              file=sys.stderr)
    run.finish()
    return {"step": step, "stopped": stopped, "out": str(run.out), **stats}


@torch.no_grad()
def _preview(vq: VQModel, pg: PixelGuidedDecoder, prev: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
    """Rows: previous frame, real frame, plain VQGAN decode, PG-VQGAN decode (guided by the previous
    frame's reconstruction, as at inference); one IMAGE [1, 4h, n w, 3]."""
    was = pg.training
    pg.eval()
    device = pg.post_quant_conv.weight.device
    prev, cur = prev.to(device), cur.to(device)
    tokens = vq.encode_tokens(torch.cat([prev, cur]))
    plain = vq.decode_tokens(tokens).clamp(-1, 1)
    guided = pg.decode_tokens(tokens[len(prev):], plain[:len(prev)]).clamp(-1, 1)
    pg.train(was)
    rows = [prev, cur, plain[len(prev):], guided]
    grid = torch.cat([torch.cat(list(r.float().cpu()), dim=2) for r in rows], dim=1)  # [3, 4h, n*w]
    return model_to_image(grid[None])


def add_arguments(p) -> None:
    p.set_defaults(size=DEFAULT_SIZE)  # video_arguments' --size, here a whole number of 64 px patches
    p.add_argument("--tokenizer", required=True, help="the trained VQGAN: a VQGAN file or a NUWA-Infinity bundle "
                   "(its VQGAN); its encoder, codebook and post_quant_conv stay frozen")
    p.add_argument("--frame-range", default=None, metavar="A,B", help="train only on frames A..B-1 of every video "
                   "(the rest held out for evaluation), before --frame-step")
    p.add_argument("--crop", type=int, default=96, help="training crop side in px, the same on both frames of a "
                   "pair (default: the tiled decode's window for 8-token patches of an f8 VQGAN, 12 tokens)")
    p.add_argument("--recon-guidance", type=float, default=0.5, help="probability of guiding with the previous "
                   "frame's VQGAN reconstruction instead of its real pixels (inference guides with decoded frames)")
    p.add_argument("--pg-guidance", type=float, default=0.0, help="of the reconstruction-guided samples, the share "
                   "guided by the PG-VQGAN's own decode of frame n-1 (itself guided by the reconstruction, no gradient): "
                   "what inference feeds it after the first frame")
    p.add_argument("--temporal-weight", type=float, default=0.0, help="weight of a temporal loss: mean |(output - "
                   "guidance) - (frame n - frame n-1)|, the decoded change from the guidance frame against the real "
                   "change (0: off)")
    p.add_argument("--init", default=None, help="continue from this trained PG-VQGAN file (of the same tokenizer)")
    p.add_argument("--guide-blocks", type=int, default=1, help="ResnetBlocks per level of the guidance encoder "
                   "(ignored with --init: the file's)")
    lpips_arguments(p)


def run(args) -> dict:
    if args.lr is None:
        args.lr = DEFAULT_LR
    return train_pgvqgan(args)
