"""The `renderer` stage: the render-and-optimize strategy (NUWA-Infinity, Algorithm 1).

Every training sample is split into patches in a random one of the four ADC orders; each patch is
rendered teacher-forced from the Nearby Context Pool, its loss optimized at once (`--accumulate`:
one step per sample instead), and its detached cache added to the pool for the patches after it.
Captions (`--clip` or `--text-embeddings`, see captions.py) feed the cross-attention, dropped with
probability --text-drop.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import stored_dtype
from ..images import save_image
from ..infinity import arbitrary_direction_controller as adc
from ..infinity.generation import NuwaInfinity, PatchBatch, reencode_pooled
from ..infinity.nearby_context_pool import NearbyContextPool, last_needed_steps
from ..infinity.patch_samplers import SamplerSettings
from ..infinity.renderer import Context, Renderer, RendererConfig
from ..infinity.vqgan import VQModel, load_vqgan
from ..text_encoder import describe, load_text_encoder
from . import captions
from .bundle import token_tensors_that_differ
from .data import (
    MAX_CROP_TRIES,
    Augment,
    augmented_window,
    list_images,
    list_video_sources,
    load_images,
    load_videos,
    parse_box,
    parse_frame_range,
    parse_size,
    photometric,
    random_crops_with_sources,
    to_model,
    warp,
)
from .loop import Dist, Run, TrainingError, dtype_named, dump_replica, set_lr

DEFAULT_LR = 3e-4


def parse_triple(text: str, name: str) -> tuple[int, int, int]:
    try:
        vals = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        vals = ()
    if len(vals) == 2:
        vals = (1,) + vals
    if len(vals) != 3 or min(vals) < 0:
        raise TrainingError(f"{name} {text!r}: expected ROWSxCOLS or F,H,W whole numbers")
    return vals


def renderer_config_from_args(args, vocab: int) -> RendererConfig:
    return RendererConfig(vocab_size=vocab, patch_size=parse_triple(args.patch, "--patch"), n_layer=args.layers,
                          n_head=args.heads, d_model=args.dim, extent=parse_triple(args.extent, "--extent"),
                          text_dim=args.text_dim, decoder=args.decoder, rpe=args.rpe, transfer=not args.no_transfer,
                          dropout=args.dropout)


class _TeacherForced(nn.Module):
    """Lets DistributedDataParallel see `teacher_forced` as the module's forward."""

    def __init__(self, renderer: Renderer):
        super().__init__()
        self.renderer = renderer

    def forward(self, tokens, order, ctx, masked, text=None):
        return self.renderer.teacher_forced(tokens, order, ctx, self.renderer.text_kv(text), masked=masked)


def pnar_mask(b: int, m: int, gen: torch.Generator) -> torch.Tensor:
    """P-NAR training mask: a ratio r ~ U(0,1] per sample, cos(pi/2 r) of the tokens hidden (>= 1)."""
    r = torch.rand(b, generator=gen)
    n = (torch.cos(math.pi / 2 * r) * m).ceil().clamp(1, m).long()
    scores = torch.rand(b, m, generator=gen)
    ranks = scores.argsort(1).argsort(1)
    return ranks < n[:, None]


def training_steps(grid: adc.Grid, gen: torch.Generator, outpaint_share: float) -> list[tuple[adc.Order, adc.Coord]]:
    """The walk of one training sample's patches, (order, patch) in turn, drawn as generation walks a canvas.

    With probability 1 - outpaint_share: one of the four basic orders over the whole grid (a canvas
    grown from nothing). Otherwise an outpainting plan (ADC.Split at inference, appendix C): a random
    known block of patches in the plan's pre-cache order, then the strips around it in the loop
    circle, each in its direction's order, so later strips read caches made in other orders, as they
    do when a painting is outpainted on several sides.
    """
    f, h, w = grid
    order = adc.ORDERS[int(torch.randint(len(adc.ORDERS), (1,), generator=gen))]
    # a clip is walked frames forward in one order (frame 0 first, as image animation pre-caches its image)
    if f > 1 or torch.rand((), generator=gen).item() >= outpaint_share or h * w == 1:
        return [(order, c) for c in adc.split(grid, order)]
    while True:  # a known block smaller than the grid
        kh, kw = (int(torch.randint(1, n + 1, (1,), generator=gen)) for n in (h, w))
        if (kh, kw) != (h, w):
            break
    top, left = int(torch.randint(h - kh + 1, (1,), generator=gen)), int(torch.randint(w - kw + 1, (1,), generator=gen))
    plan = adc.plan_outpaint((grid[0], kh, kw), left=left, right=w - kw - left, up=top, down=h - kh - top)
    known = [(k, i + top, j + left) for k, i, j in adc.split((grid[0], kh, kw), plan.precache_order)]
    return [(plan.precache_order, c) for c in known] + plan.steps()


def render_and_optimize(renderer: Renderer, model: nn.Module, tokens: torch.Tensor, walk, opt,
                        gen: torch.Generator, label_smoothing: float = 0.0, accumulate: bool = False,
                        no_context: bool = False, lr_fn=None, check=None,
                        text: torch.Tensor | None = None, reencode: bool = True, edge_weight: float = 1.0,
                        token_noise: float = 0.0) -> dict:
    """Algorithm 1 on one batch of token grids [B, F*pf, H*ph, W*pw]: returns losses and step counts.
    walk: one basic Order for the whole grid, or every patch as (order, coord) in turn (training_steps).
    text [B, T, D]: caption features for every patch's cross-attention (None: unconditioned).

    Every patch is rendered from the pool's context, its loss is optimized at once (or summed and
    optimized once per sample with `accumulate`), and its detached cache added to the pool (made
    without the context when the renderer's `transfer` is off: Renderer.teacher_forced).
    reencode: where the walk changes order (a new strip of an outpainting plan), the pooled caches
    the strip can select are first re-encoded in its order, as `NuwaInfinity.generate(reencode=True)`
    does, so a strip trains on the contexts it will read at inference.
    edge_weight: an AR patch's loss weights the tokens on its edge against the context
    (Renderer.edge_tokens: the first token's row and column) this many times the others.
    token_noise (AR): this share of the tokens a patch reads (its own earlier tokens, and through
    its cache every later patch's context) is replaced by random codes, drawn once per sample; the
    targets stay the true tokens. A held-out place is spelt in codes the renderer never saw in that
    order, so a context it can only use as an exact key to a remembered place misleads it there
    (TRAINING.md 5o); noisy keys train it to read its context approximately.
    """
    cfg = renderer.config
    pf, ph, pw = cfg.patch_size
    b, ft, h, w = tokens.shape
    grid = (ft // pf, h // ph, w // pw)
    steps = [(walk, c) for c in adc.split(grid, walk)] if isinstance(walk, adc.Order) else list(walk)
    last = last_needed_steps([c for _, c in steps], cfg.extent)
    pool = NearbyContextPool(cfg.extent)
    device = tokens.device
    losses, n_opt = [], 0
    if accumulate:
        opt.zero_grad(set_to_none=True)
    read = tokens  # what the patches read; the losses' targets stay `tokens`
    if token_noise > 0 and cfg.decoder == "ar":
        swap = torch.rand(tokens.shape, generator=gen) < token_noise
        codes = torch.randint(cfg.vocab_size, tokens.shape, generator=gen)
        read = torch.where(swap.to(device), codes.to(device), tokens)

    def patch_tokens(coord: adc.Coord, grid_tokens: torch.Tensor = read) -> torch.Tensor:  # [B, M] raster
        k, i, j = coord
        return grid_tokens[:, k * pf:(k + 1) * pf, i * ph:(i + 1) * ph, j * pw:(j + 1) * pw].reshape(b, -1)

    for t, (order, coord) in enumerate(steps):
        if reencode and not no_context and t > 0 and order is not steps[t - 1][0]:
            end = next((u for u in range(t, len(steps)) if steps[u][0] is not order), len(steps))
            strip = [c for _, c in steps[t:end]]
            near = {n for c in strip for n in adc.neighbours(c, cfg.extent, grid)}
            reencode_pooled(PatchBatch(renderer, text), pool, near, order, grid, patch_tokens)
        patch = patch_tokens(coord, tokens)
        ctx = Context(None, None, 0) if no_context else Context.from_pool(pool.select(coord), coord, renderer.rel, device)
        masked = pnar_mask(b, patch.shape[1], gen).to(device) if cfg.decoder == "pnar" else None
        logits, cache = model(patch_tokens(coord), order, ctx, masked, text)
        if cfg.decoder == "pnar":
            loss = F.cross_entropy(logits[masked], patch[masked], label_smoothing=label_smoothing)
        elif edge_weight != 1.0:
            per_token = F.cross_entropy(logits.transpose(1, 2), patch, reduction="none",
                                        label_smoothing=label_smoothing)  # [B, M]
            weight = 1.0 + (edge_weight - 1.0) * renderer.edge_tokens(order).to(per_token.dtype)  # [M]
            loss = (per_token * weight).sum() / (weight.sum() * b)
        else:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), patch.reshape(-1),
                                   label_smoothing=label_smoothing)
        if check is not None:
            check(loss)
        if accumulate:
            (loss / len(steps)).backward()
        else:
            if lr_fn is not None:
                lr_fn()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n_opt += 1
        losses.append(loss.item())
        if not no_context:
            pool.add(coord, cache.detach(), order)
            pool.remove(t, last)
    if accumulate:
        if lr_fn is not None:
            lr_fn()
        opt.step()
        n_opt += 1
    return {"loss": sum(losses) / len(losses), "first_patch": losses[0], "optimizer_steps": n_opt,
            "patches": len(steps), "peak_pool": pool.peak_size}


@dataclasses.dataclass
class TokenBank:
    """The training images encoded up front: token grids [h, w], and per grid the tokens left out of
    training ([h, w] bool, or None when nothing is)."""
    grids: list[torch.Tensor]
    left_out: list[torch.Tensor | None]


@torch.no_grad()
def build_token_bank(vq: VQModel, images: list[torch.Tensor], variants: int, aug: Augment, seed: int, device,
                     f: int, tile: int = 8, keep_out: list[torch.Tensor | None] | None = None) -> TokenBank:
    """Encode every training image `variants` times once, up front: variant 0 as is, 1 flipped,
    the rest through the full augmentation at the image's own size.

    keep_out: per image a [H, W] pixel mask (> 0: left out) or None; it goes through the same flips
    and warps, and a token whose f x f cell touches it is left out (token_crops never draws it).
    CPU budget: encoding a fresh augmented crop per sample costs far more than the renderer step."""
    gen = torch.Generator().manual_seed(seed + 777)
    grids, left_out = [], []
    for n, img in enumerate(images):
        H, W = img.shape[-2] // f * f, img.shape[-1] // f * f
        img = img[:, :H, :W]
        mask = keep_out[n] if keep_out is not None else None
        mask = None if mask is None else mask[:H, :W][None].float()
        for v in range(variants):
            if v == 0:
                x, m = img, mask
            elif v == 1:
                x, m = img.flip(-1), None if mask is None else mask.flip(-1)
            else:
                torch.randint(1, (1,), generator=gen)  # the draw that picked an image here before: banks stay as they were
                grid = augmented_window((H, W), (H, W), gen, dataclasses.replace(aug, scale=(1.0, 1.0)))
                x, m = photometric(warp(img, grid), gen, aug), None if mask is None else warp(mask, grid)
            # windows of a patch-sized tile, as NuwaInfinity.decode uses: the tokenizer's mid attention
            # is global, so one pass over a whole large image sees far more tokens than it was trained on
            grids.append(vq.encode_tokens_tiled(x[None].to(device), tile=tile, overlap=tile // 4)[0].cpu())
            left_out.append(None if m is None else F.max_pool2d(m.gt(0).float()[None], f)[0, 0].bool())
    return TokenBank(grids, left_out)


@dataclasses.dataclass
class VideoTokenBank:
    """The training videos encoded up front, frame by frame: token videos [T, h, w], each video plain and
    mirrored."""
    videos: list[torch.Tensor]


@torch.no_grad()
def build_video_token_bank(vq: VQModel, videos: list[torch.Tensor], device, tile: int = 8) -> VideoTokenBank:
    """uint8 videos [T, 3, H, W] -> their tokens, plain and flipped, in patch-sized windows as generation encodes."""
    out = []
    for video in videos:
        for flip in (False, True):
            frames = []
            for frame in video:
                x = to_model(frame)[None].to(device)
                x = x.flip(-1) if flip else x
                frames.append(vq.encode_tokens_tiled(x, tile=tile, overlap=tile // 4)[0].cpu())
            out.append(torch.stack(frames))  # [T, h, w]
    return VideoTokenBank(out)


def video_token_clips(bank: VideoTokenBank, n: int, frames: int, size: tuple[int, int], max_stride: int,
                      gen: torch.Generator) -> tuple[torch.Tensor, list[int]]:
    """n random clips [n, frames, h, w] of tokens: a random video (plain or mirrored), stride 1..max_stride
    (as long as the video holds the clip), start and window; and the index of the video each came from."""
    h, w = size
    out, sources = [], []
    for _ in range(n):
        source = int(torch.randint(len(bank.videos), (1,), generator=gen))
        video = bank.videos[source]
        sources.append(source // 2)  # the bank holds each video plain, then mirrored
        T, H, W = video.shape
        longest = max(1, min(max_stride, (T - 1) // max(frames - 1, 1)))
        stride = int(torch.randint(1, longest + 1, (1,), generator=gen))
        start = int(torch.randint(T - (frames - 1) * stride, (1,), generator=gen))
        top, left = (int(torch.randint(n_ - s_ + 1, (1,), generator=gen)) for n_, s_ in ((H, h), (W, w)))
        out.append(video[start:start + (frames - 1) * stride + 1:stride, top:top + h, left:left + w])
    return torch.stack(out), sources


def token_crops(bank: TokenBank, n: int, size: tuple[int, int], gen: torch.Generator, wrap: str = "none") -> torch.Tensor:
    """n random token crops [n, 1, h, w] from the bank; `wrap` "x": columns wrap around (a 360-degree
    panorama), "xy": rows too (a texture that tiles)."""
    return token_crops_with_sources(bank, n, size, gen, wrap)[0]


def token_crops_with_sources(bank: TokenBank, n: int, size: tuple[int, int], gen: torch.Generator,
                             wrap: str = "none") -> tuple[torch.Tensor, list[int]]:
    """token_crops, and the bank index each crop came from. A crop holding a left-out token is drawn again."""
    h, w = size
    out, sources = [], []
    for _ in range(n):
        for _ in range(MAX_CROP_TRIES):
            source = int(torch.randint(len(bank.grids), (1,), generator=gen))
            grid, left_out = bank.grids[source], bank.left_out[source]
            H, W = grid.shape
            rows = _crop_span(H, h, wrap == "xy", gen)
            cols = _crop_span(W, w, wrap in ("x", "xy"), gen)
            if left_out is None or not bool(left_out[rows][:, cols].any()):
                break
        else:
            raise TrainingError(f"no {w}x{h}-token training crop avoids the left-out region in {MAX_CROP_TRIES} "
                                f"draws: leave less of the image out or train on a larger image")
        sources.append(source)
        out.append(grid[rows][:, cols])
    return torch.stack(out)[:, None], sources


def _crop_span(length: int, size: int, wraps: bool, gen: torch.Generator) -> torch.Tensor:
    """Indices of a random span of `size` along an axis of `length`; a wrapping axis may cross its end."""
    if wraps:
        return (torch.arange(size) + int(torch.randint(length, (1,), generator=gen))) % length
    start = int(torch.randint(length - size + 1, (1,), generator=gen))
    return torch.arange(start, start + size)


def renderer_config_dict(args, rcfg: RendererConfig) -> dict:
    return {"stage": "renderer", "renderer": dataclasses.asdict(rcfg), "tokenizer": str(Path(args.tokenizer).name),
            "sample_patches": args.sample_patches, "batch": args.batch, "lr": args.lr, "one_shot": args.one_shot,
            "downscale": args.downscale, "seed": args.seed, "accumulate": args.accumulate,
            "no_context": args.no_context, "label_smoothing": args.label_smoothing,
            "token_bank": args.token_bank, "wrap": {"none": False, "x": True}.get(args.wrap, args.wrap), "outpaint_share": args.outpaint_share,
            "reencode": not args.no_reencode,
            **({"edge_weight": args.edge_weight} if args.edge_weight != 1.0 else {}),
            **({"token_noise": args.token_noise} if args.token_noise else {}),
            # only for videos, so image runs from before videos existed still resume
            **({"video": {"frames": args.frames, "max_stride": args.max_stride, "size": args.video_size,
                          "frame_range": args.frame_range}} if getattr(args, "videos", None) else {}),
            "augment": [args.aug_min_scale, args.aug_rotate, args.aug_shear, args.aug_noise],
            "world": int(os.environ.get("WORLD_SIZE", "1")),
            **({"init": Path(args.init).name} if args.init else {}),
            **({"init_tokens_may_differ": True} if args.init_tokens_may_differ else {}),  # only when used: older runs still resume
            # only with captions, so checkpoints from before captions existed still resume
            **({"text": {"clip": Path(args.clip).name if args.clip else "", "clip_model": args.clip_model or "",
                         "embeddings": Path(args.text_embeddings).name if args.text_embeddings else "",
                         "drop": args.text_drop,
                         **({"encoder": Path(args.text_encoder).name} if args.text_encoder else {})}}
               if rcfg.text_dim else {})}


def caption_features(args) -> torch.Tensor | None:
    """[n, T, D] caption features of the training images (in list_images order) or videos (list_video_sources
    order: a video file's or frame folder's same-name .txt / embedding key), or None."""
    sources = [f"--{k.replace('_', '-')}" for k in ("text_encoder", "clip", "text_embeddings") if getattr(args, k)]
    if len(sources) > 1:
        raise TrainingError(f"give captions one way: {' or '.join(sources)}, not both")
    if not (0.0 <= args.text_drop <= 1.0):
        raise TrainingError(f"--text-drop is a probability in 0..1, got {args.text_drop}")
    if not sources:
        if args.text_dim:
            raise TrainingError(f"--text-dim {args.text_dim} builds a text-conditioned renderer, which needs "
                                f"captions: give --text-encoder, --clip (with --clip-model) or --text-embeddings")
        return None
    paths = list_video_sources(args.videos) if getattr(args, "videos", None) else list_images(args.images)
    if args.text_encoder:
        encoder = load_text_encoder(args.text_encoder)
        args.text_encoder_info = describe(encoder)
        text = captions.encode_each(encoder, captions.read_captions(paths, "--text-encoder"), paths)
    elif args.text_embeddings:
        text = captions.load_text_embeddings(args.text_embeddings, paths)
    elif not args.clip_model:
        raise TrainingError("--clip needs --clip-model, the open_clip architecture of the weights (e.g. ViT-B-32; "
                            "ViT-L-14-quickgelu for OpenAI's CLIP-L, the SD1 text encoder ComfyUI uses)")
    else:
        text = captions.encode_captions(args.clip, args.clip_model, paths, args.clip_allow_pickle)
    width = text.shape[-1]
    if args.text_dim and args.text_dim != width:
        raise TrainingError(f"--text-dim {args.text_dim} does not match the caption features, which are {width} "
                            f"wide ({args.clip or args.text_embeddings}); use --text-dim {width} or leave it out")
    args.text_dim = width
    return text


def init_renderer(renderer: Renderer, bundle_path, vq: VQModel, tokens_may_differ: bool = False) -> None:
    """Start `renderer` from the renderer of a trained bundle (fine-tuning): same configuration, and
    the bundle's tokenizer must make the same tokens as the one this run trains on, unless
    `tokens_may_differ` (a tokenizer fine-tuned from the bundle's: its codes moved, the renderer adapts)."""
    bundle = NuwaInfinity.load(bundle_path)
    theirs = dataclasses.replace(bundle.renderer.config, dropout=renderer.config.dropout)  # training-only
    grows_frames = dataclasses.replace(theirs, extent=renderer.config.extent) == renderer.config and \
        theirs.extent[1:] == renderer.config.extent[1:] and theirs.extent[0] < renderer.config.extent[0]
    if theirs != renderer.config and not grows_frames:
        diff = {k: (v, getattr(renderer.config, k)) for k, v in dataclasses.asdict(theirs).items()
                if v != getattr(renderer.config, k)}
        raise TrainingError(f"--init {bundle_path} holds a renderer of another configuration than the flags build "
                            f"(field: bundle's vs flags'): {diff}; give the flags that match it (only a larger "
                            f"frame extent e_f may differ: an image model becoming a video model)")
    changed = [] if tokens_may_differ else token_tensors_that_differ(bundle.vqgan, vq, stored_dtype(bundle_path))
    if changed:
        raise TrainingError(f"--init {bundle_path} was trained on other tokens than --tokenizer makes "
                            f"({len(changed)} encoder/codebook tensors differ, e.g. {changed[0]}); give the "
                            f"tokenizer it was trained with")
    state = bundle.renderer.float().state_dict()
    if grows_frames:
        state["rel.table"] = grown_frame_table(bundle.renderer.rel, renderer.rel)
    renderer.load_state_dict(state)


def grown_frame_table(small: adc.RelativePositionEmbedding, large: adc.RelativePositionEmbedding) -> torch.Tensor:
    """The relative-position table of `large` (a larger frame extent e_f) started from `small`'s: offsets
    `small` has keep their trained entries; each new frame offset (dk, di, dj) takes the entry of
    (0, di, dj), so a patch in an earlier frame starts out read as the same-frame patch at that place."""
    ef_small, ef = small.extent[0], large.extent[0]
    _, eh, ew = large.extent
    table = torch.empty_like(large.table)
    for dk in range(-ef, ef + 1):
        source = dk if abs(dk) <= ef_small else 0
        for di in range(-eh, eh + 1):
            for dj in range(-ew, ew + 1):
                table[:, large.index((dk, di, dj))] = small.table[:, small.index((source, di, dj))].float()
    return table


def train_renderer(args, images: list[torch.Tensor] | None = None, keep_out: list[torch.Tensor | None] | None = None,
                   monitor=None, videos: list[torch.Tensor] | None = None) -> dict:
    """The stage on --images, or on `images` ([3, H, W] in -1..1) with `keep_out` masks (> 0: never
    in a training sample) when a caller holds them (one_shot.py); `monitor`: see loop.Run.
    On --videos (or `videos`, uint8 [T, 3, H, W] at --video-size) samples are clips of --frames patch-frames."""
    is_video = videos is not None or bool(getattr(args, "videos", None))
    if videos is not None and (args.clip or args.text_embeddings):
        raise TrainingError("captions are read for --videos files; videos given in memory train without them")
    text = caption_features(args)  # before seeding: building a CLIP tower draws random numbers
    if not 0.0 <= args.outpaint_share <= 1.0:
        raise TrainingError(f"--outpaint-share is a probability in 0..1, got {args.outpaint_share}")
    if not 0.0 <= args.token_noise < 1.0 or (args.token_noise and args.decoder != "ar"):
        raise TrainingError(f"--token-noise is the share of read tokens replaced by random codes, 0 <= P < 1, for "
                            f"--decoder ar; got {args.token_noise} with --decoder {args.decoder}")
    dist = Dist(getattr(args, "device", None))
    torch.manual_seed(args.seed)
    vq = load_vqgan(args.tokenizer).float().to(dist.device).eval()
    for p in vq.parameters():
        p.requires_grad_(False)
    rcfg = renderer_config_from_args(args, vq.config.n_embed)
    if args.label_smoothing is None:
        args.label_smoothing = 0.15 if args.one_shot else 0.0
    f = vq.downsample_factor
    rows, cols = parse_triple(args.sample_patches, "--sample-patches")[1:]
    _, ph, pw = rcfg.patch_size
    crop = (rows * ph * f, cols * pw * f)
    clip_frames = 1
    if is_video:
        clip_frames = _check_video_args(args, rcfg, f, rows, cols)
        if videos is None:
            kept: list[int] = []
            videos, _ = load_videos(args.videos, parse_size(args.video_size), min_frames=clip_frames,
                                    frame_range=parse_frame_range(args.frame_range), kept=kept)
            text = None if text is None else text[kept]  # the captions of the videos long enough to train on
        images = []
    elif images is None:
        images = load_images(args.images, args.downscale, (ph * f, pw * f), parse_box(args.train_box))
    if not args.one_shot:  # whole images: crop to whole patches, no resampling
        for n, img in enumerate(images):
            if img.shape[-2] < crop[0] or img.shape[-1] < crop[1]:
                crop = (min(crop[0], img.shape[-2] // (ph * f) * ph * f), min(crop[1], img.shape[-1] // (pw * f) * pw * f))
    renderer = Renderer(rcfg)
    if args.init and not args.resume:  # a resumed run's own weights replace these anyway
        init_renderer(renderer, args.init, vq, args.init_tokens_may_differ)
    renderer.to(dist.device).train()
    # a dropped caption leaves the cross-attention weights without gradients on that rank
    model = dist.wrap(_TeacherForced(renderer), find_unused_parameters=text is not None)
    opt = torch.optim.AdamW(renderer.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    data_gen = torch.Generator().manual_seed(args.seed + 1000 * dist.rank)
    run = Run("renderer", args, dist, {"renderer": renderer}, {"renderer": opt}, renderer_config_dict(args, rcfg),
              data_gen, monitor)
    step, opt_steps = 0, 0
    if args.resume:
        st = run.resume()
        step, opt_steps = int(st["step"]), int(st["optimizer_steps"])
    aug = Augment(scale=(args.aug_min_scale, 1.0), rotate_deg=args.aug_rotate, shear=args.aug_shear,
                  noise=args.aug_noise) if args.one_shot else Augment.off()
    bank = video_bank = None
    if is_video:
        video_bank = build_video_token_bank(vq, videos, dist.device, max(rcfg.patch_size[1:]))
    elif args.token_bank:
        bank = build_token_bank(vq, images, args.token_bank, aug, args.seed, dist.device, f, max(rcfg.patch_size[1:]),
                                keep_out)

    grid = (clip_frames // rcfg.patch_size[0], rows, cols)  # patches of one training sample
    patches_per_sample = 1 if args.accumulate else math.prod(grid)

    def lr_fn():  # the warm-up and decay count optimizer steps
        nonlocal opt_steps
        set_lr(opt, args.lr, opt_steps, args.warmup, run.lr_total(patches_per_sample))
        opt_steps += 1

    def one_step(step, check):
        if video_bank is not None:
            tokens, sources = video_token_clips(video_bank, args.batch, clip_frames, (crop[0] // f, crop[1] // f),
                                                args.max_stride, data_gen)
            tokens = tokens.to(dist.device)  # [B, F*pf, h, w]
        elif bank is not None:
            tokens, sources = token_crops_with_sources(bank, args.batch, (crop[0] // f, crop[1] // f), data_gen,
                                                       args.wrap)
            tokens, sources = tokens.to(dist.device), [s // args.token_bank for s in sources]
        else:
            x, sources = random_crops_with_sources(images, args.batch, crop, data_gen, aug, keep_out)
            with torch.no_grad():  # patch-sized windows, as in build_token_bank
                t = max(rcfg.patch_size[1:])
                tokens = vq.encode_tokens_tiled(x.to(dist.device), tile=t, overlap=t // 4)[:, None]  # [B, 1, h, w]
        walk = training_steps(grid, data_gen, args.outpaint_share)
        captions = None
        # caption dropout, one draw per step (the whole batch): the renderer also learns to render without text
        if text is not None and torch.rand((), generator=data_gen).item() >= args.text_drop:
            captions = text[sources].to(dist.device)
        res = render_and_optimize(renderer, model, tokens, walk, opt, data_gen, args.label_smoothing,
                                  args.accumulate, args.no_context, lr_fn, check, text=captions,
                                  reencode=not args.no_reencode, edge_weight=args.edge_weight,
                                  token_noise=args.token_noise)
        return {"optimizer_steps": opt_steps, "loss": res["loss"], "first_patch": res["first_patch"],
                "orders": "+".join(dict.fromkeys(o.value for o, _ in walk)), "peak_pool": res["peak_pool"]}

    tokens_per_sample = clip_frames * (crop[0] // f) * (crop[1] // f)

    def postfix(st, steps_per_s):
        return {"loss": f"{st['loss']:.3f}", "tok_s": f"{args.batch * dist.world * tokens_per_sample * steps_per_s:.0f}"}

    fields = ["step", "optimizer_steps", "time", "loss", "first_patch", "orders", "peak_pool"]
    run.preview = lambda: _renderer_sample_image(vq, renderer)
    step, stopped, stats = run.loop(step, one_step, fields, postfix=postfix,
                                    sample=lambda path: save_image(run.preview(), path),
                                    extra=lambda: {"optimizer_steps": opt_steps})
    if args.debug_dump_replicas:
        dump_replica(run.out, renderer, dist)
    if dist.main:
        NuwaInfinity(vq, renderer, getattr(args, "text_encoder_info", None)).save(run.out, dtype=dtype_named(args.save_dtype))
        print(f"[train] renderer: stopped ({stopped}) at step {step} ({opt_steps} optimizer steps); wrote {run.out}",
              file=sys.stderr)
    run.finish()
    return {"step": step, "stopped": stopped, "optimizer_steps": opt_steps, **stats}


def _check_video_args(args, rcfg: RendererConfig, f: int, rows: int, cols: int) -> int:
    """-> frames per clip (patch-frames x frames per patch), after checking the video flags fit the renderer."""
    ef = rcfg.extent[0]
    if args.frames < 2:
        raise TrainingError(f"--frames {args.frames}: a video sample needs at least 2 patch-frames, so frames learn "
                            f"to continue earlier ones (use e_f + 1 = {ef + 1} or more)")
    if args.frames < ef + 1:
        raise TrainingError(f"--frames {args.frames} trains less than the frame extent e_f = {ef} reaches: use "
                            f"--frames {ef + 1} or more, or a smaller --extent")
    width, height = parse_size(args.video_size)
    _, ph, pw = rcfg.patch_size
    if height % (ph * f) or width % (pw * f) or height < rows * ph * f or width < cols * pw * f:
        raise TrainingError(f"--video-size {width}x{height} must be whole {pw * f}x{ph * f} px patches and at least "
                            f"--sample-patches {rows}x{cols} of them ({cols * pw * f}x{rows * ph * f} px)")
    return args.frames * rcfg.patch_size[0]


@torch.no_grad()
def _renderer_sample_image(vq, renderer) -> torch.Tensor:
    """A 1 x 4 patch canvas generated from nothing, decoded: IMAGE [1, H, W, 3]."""
    was = renderer.training
    renderer.eval()
    m = NuwaInfinity(vq, renderer)
    st = m.blank_canvas(1, 4)
    st = m.generate(st, m.plan_fill(st), SamplerSettings(top_k=64), generator=torch.Generator().manual_seed(0))
    image = m.decode(st)
    renderer.train(was)
    return image


def add_arguments(p) -> None:
    p.set_defaults(decay="linear")
    p.add_argument("--tokenizer", required=True, help="the frozen VQGAN .safetensors")
    p.add_argument("--init", default=None, help="fine-tune: start from the renderer of this bundle (e.g. the shipped "
                   "model; the flags must build the same renderer, --tokenizer must make its tokens)")
    p.add_argument("--init-tokens-may-differ", action="store_true", help="with --init: --tokenizer was fine-tuned "
                   "from the bundle's tokenizer, so its tokens moved; start from the bundle's renderer anyway")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--patch", default="8x8", help="tokens per patch, ROWSxCOLS")
    p.add_argument("--extent", default="0,1,1", help="E_F,E_H,E_W context extent in patches")
    p.add_argument("--decoder", choices=("ar", "nar", "pnar"), default="ar")
    p.add_argument("--rpe", choices=("pre", "post"), default="pre")
    p.add_argument("--text-dim", type=int, default=0, help="caption feature width D (0: taken from the captions)")
    p.add_argument("--sample-patches", default="2x4", help="patches per training sample, ROWSxCOLS")
    p.add_argument("--label-smoothing", type=float, default=None, help="default 0.15 with --one-shot, else 0")
    p.add_argument("--edge-weight", type=float, default=1.0, help="AR: weight of a patch's tokens on its edge "
                   "against the context (the first token's row and column) in the loss, against 1 for the others")
    p.add_argument("--token-noise", type=float, default=0.0, help="AR: share of the tokens a patch reads (its own "
                   "earlier tokens and, through the pool, the context) replaced by random codes in training; the "
                   "targets stay true (0 <= P < 1): the context as an approximate, not an exact, key")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--dropout", type=float, default=0.0, help="dropout on attention weights and MLP outputs in "
                   "training (0 <= P < 1; generation never drops): against memorising a one-shot image")
    p.add_argument("--token-bank", type=int, default=0, help="encode each image N times up front (0: encode "
                   "every augmented sample; N>0: variant 0 plain, 1 flipped, the rest augmented) then crop tokens")
    p.add_argument("--wrap", nargs="?", const="x", default="none", choices=("none", "x", "xy"),
                   help="the training images wrap around: token crops may cross their joint; x (or --wrap alone): "
                   "horizontally (360-degree panoramas), xy: both ways (a texture that tiles)")
    p.add_argument("--aug-min-scale", type=float, default=0.6, help="one-shot: smallest random-resized-crop window, "
                   "as a share of the largest that fits (appendix D)")
    p.add_argument("--aug-rotate", type=float, default=4.0, help="one-shot: largest rotation in degrees")
    p.add_argument("--aug-shear", type=float, default=0.08, help="one-shot: largest shear")
    p.add_argument("--aug-noise", type=float, default=0.02, help="one-shot: pixel noise std (-1..1 units)")
    p.add_argument("--outpaint-share", type=float, default=0.75, help="share of samples walked as an outpainting "
                   "plan (a known block, then strips around it in the loop circle, orders mixed as at inference); "
                   "the rest in one basic order")
    p.add_argument("--no-transfer", action="store_true", help="ablation (w/o transfer): a patch's cache is made "
                   "without its own context, so nothing travels beyond the extent")
    p.add_argument("--no-reencode", action="store_true", help="a strip of an outpainting plan reads the pooled caches "
                   "as earlier strips made them, in other orders (default: re-encoded in the strip's order first, "
                   "as generate(reencode=True) does at inference)")
    p.add_argument("--accumulate", action="store_true", help="one optimizer step per sample (ablation)")
    p.add_argument("--no-context", action="store_true", help="baseline: every patch without context")
    p.add_argument("--text-encoder", default=None, help="captions: encode each image's (or video's) same-name .txt "
                   "with this text encoder: the pack's own (`train text`) or a ComfyUI CLIP-L file (clip_l.safetensors "
                   "or an SD 1.x checkpoint), so prompts at use time go through the same encoder")
    p.add_argument("--clip", default=None, help="captions: encode each image's same-name .txt with the open_clip "
                   "text tower in this local file (.safetensors; per-token last-layer features, as ComfyUI's "
                   "CLIP Text Encode gives them). Needs open_clip: pip install open_clip_torch")
    p.add_argument("--clip-model", default=None, help="open_clip architecture of --clip, e.g. ViT-B-32 (D=512) or "
                   "ViT-L-14-quickgelu (OpenAI CLIP-L = ComfyUI's SD1 text encoder, D=768), or a .json config")
    p.add_argument("--clip-allow-pickle", action="store_true", help="let --clip read a .bin/.pt file "
                   "(torch.load with weights_only=True) instead of only .safetensors")
    p.add_argument("--text-embeddings", default=None, help="captions precomputed: a .safetensors with one tensor "
                   "per image file stem, [T, D] or [D]")
    p.add_argument("--text-drop", type=float, default=0.1, help="probability that a training step's batch goes "
                   "without captions, so the model also renders unconditioned")


def run(args) -> dict:
    if args.lr is None:
        args.lr = DEFAULT_LR
    return train_renderer(args)
