"""The `xl` stage (NUWA-XL): train Mask Temporal Diffusion directly on long videos.

Each clip is sampled the way the tree uses the model (Diffusion over Diffusion, with L frames per
call and `depth` levels): level k of the tree has its frames (L-1)^(depth-1-k) video frames apart.
- level 0 (global): L frames spread over (L-1)^depth frames of the video, no visual condition
  (cond zeros, mask all zeros: exactly what the model sees from generate_keyframes);
- level k >= 1 (local): L frames at that level's stride, the first and last given (mask 1 there),
  as fill_between passes them.
`--role global|local|both` picks the levels one model learns (both: one model serves the whole tree);
`--role local --level K` trains on level K only (one local model per depth, as the paper has them).
The saved info records them as `levels` (0 = global).
Prompts come from one of two sources, dropped to the null context (zeros, the null prompt of
classifier-free guidance at sampling) with probability `--text-drop`:
- `--text-encoder FILE`: captions beside the videos, encoded once, up front, through the pack's text
  path (nuwa_core.text_encoder: the pack's own word-level encoder or a CLIP-L file). Each video file
  or frame folder NAME has NAME.txt beside it with one `FRAME: caption` line where a caption starts
  (frames of the source video, counted from 0, before --frame-step; the first line at frame 0); a
  frame takes the caption of the last line at or before it. One line without `FRAME:` captions the
  whole video. The model's file records the encoder (name, width), which the nodes check prompts
  against.
- `--text-embeddings FILE`: per-frame embeddings [video frames, n, d] of one video.
Without either the model is unconditional and always sees the zero context. Loss:
diffusion.training_loss (eps MSE, eq. 5).

Latents are precomputed once with the frozen T-KLVAE (posterior mean x its latent_scale). All random
choices (clip, level, timestep, noise) come from one data generator, so `--resume` continues exactly.
The trained file is written by xl.model.save_mtd_xl.

`--init-unet FILE` starts the MTD from an SD 1.x UNet (a checkpoint's model.diffusion_model.* keys or a
bare UNet file; xl.sd_unet.mtd_from_sd_unet): its spatial layers are the UNet's, the temporal layers,
temporal attentions and condition injections start at identity / zero, as the paper initialises it.
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
from pathlib import Path

import torch

from ..checkpoint import CheckpointError
from ..xl import diffusion
from ..xl.diffusion_over_diffusion import _check_tree, level_spacing
from ..xl.mask_temporal_diffusion import MaskTemporalDiffusion, MTDConfig
from ..xl.model import XLModel, contact_sheet, load_mtd_xl, save_mtd_xl, save_png
from ..xl.sd_unet import mtd_from_sd_unet
from ..xl.t_klvae import TKLVAE, TKLVAEConfig, load_t_klvae
from .data import list_video_sources, load_videos, parse_size, to_model
from .loop import Dist, Run, TrainingError, dtype_named, set_lr

DEFAULT_LR = 2e-4


def mtd_preset(name: str, latent_channels: int, context_dim: int) -> MTDConfig:
    kw = {"latent_channels": latent_channels, "context_dim": context_dim}

    def two_level(channels: int) -> MTDConfig:  # small and medium differ only in width
        return MTDConfig(model_channels=channels, channel_mult=(1, 2), num_res_blocks=2, attention_levels=(0, 1),
                         num_heads=4, num_groups=8, **kw)

    presets = {
        "tiny": lambda: MTDConfig.tiny(**kw),
        "small": lambda: two_level(32),
        "medium": lambda: two_level(48),
        "sd": lambda: MTDConfig.sd(**kw),
    }
    if name not in presets:
        raise TrainingError(f"--preset {name!r}: choose one of {sorted(presets)}")
    return presets[name]()


def mtd_from_unet_file(path: str, latent_channels: int) -> MaskTemporalDiffusion:
    """--init-unet: an MTD whose spatial layers are an SD 1.x UNet's (temporal and injection layers fresh)."""
    try:
        model = mtd_from_sd_unet(path)
    except CheckpointError as err:  # not found, a pickle, another architecture (SDUNetError)
        raise TrainingError(f"--init-unet: {err}") from None
    if model.config.latent_channels != latent_channels:
        raise TrainingError(f"--init-unet {Path(path).name} takes {model.config.latent_channels}-channel latents but "
                            f"the T-KLVAE makes {latent_channels}")
    return model


def role_levels(role: str, depth: int, level: int | None = None) -> list[int]:
    """The tree levels (0 = global) a model of `role` learns; `level` (--level, role local only): that one."""
    levels = {"global": [0], "local": list(range(1, depth)), "both": list(range(depth))}[role]
    if not levels:
        raise TrainingError(f"--role local needs --depth >= 2 (depth {depth} has no local level)")
    if level is None:
        return levels
    if role != "local":
        raise TrainingError(f"--level {level} needs --role local (one local model per tree level, levels "
                            f"1..{depth - 1} at depth {depth}); --role {role} trains the levels {levels}")
    if level not in levels:
        raise TrainingError(f"--level {level}: depth {depth} has the local levels 1..{depth - 1} (level 0 is the "
                            f"global model's, --role global)")
    return [level]


def load_text_embeddings(path: str | None, frames: int) -> torch.Tensor | None:
    if not path:
        return None
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        tensors = load_file(path)
    else:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    emb = tensors if isinstance(tensors, torch.Tensor) else (
        tensors.get("embeddings") if "embeddings" in tensors else next(iter(tensors.values())))
    if emb.ndim == 2:
        emb = emb[:, None]
    if emb.ndim != 3 or emb.shape[0] != frames:
        raise TrainingError(f"--text-embeddings {path}: expected [frames={frames}, n, d] (one entry per "
                            f"video frame after --frame-step), got {tuple(emb.shape)}")
    return emb.float()


CAPTION_LINE = re.compile(r"^\s*(\d+)\s*:\s*(.*?)\s*$")
ENCODE_BATCH = 32


def caption_file(source: Path) -> Path:
    """Where a video's captions are: NAME.txt beside the video file NAME.ext or the frame folder NAME."""
    return source.parent / f"{source.name}.txt" if source.is_dir() else source.with_suffix(".txt")


def parse_captions(path: Path) -> list[tuple[int, str]]:
    """A caption file -> [(first source frame, caption)], starting at frame 0, frames increasing."""
    lines = [(n, line.strip()) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if line.strip() and not line.strip().startswith("#")]
    if not lines:
        raise TrainingError(f"captions {path} are empty: write one `FRAME: caption` line where each caption "
                            f"starts (the first at frame 0), e.g. `0: a blue sky over the sea`")
    if len(lines) == 1 and not CAPTION_LINE.match(lines[0][1]):
        return [(0, lines[0][1])]
    out: list[tuple[int, str]] = []
    for n, line in lines:
        m = CAPTION_LINE.match(line)
        if m is None or not m.group(2):
            raise TrainingError(f"captions {path}, line {n}: {line!r} is not `FRAME: caption` (a frame number of "
                                f"the video from 0, a colon, the caption), e.g. `120: a grey sky over the sea`")
        frame = int(m.group(1))
        if out and frame <= out[-1][0]:
            raise TrainingError(f"captions {path}, line {n}: frame {frame} comes after frame {out[-1][0]}; the "
                                f"lines must go forward in the video")
        out.append((frame, m.group(2)))
    if out[0][0] != 0:
        raise TrainingError(f"captions {path}: frames 0..{out[0][0] - 1} have no caption (the first line starts "
                            f"at frame {out[0][0]}); start the first line at frame 0")
    return out


def frame_captions(source: Path, frames: int, frame_step: int = 1) -> list[str]:
    """The caption of each of the `frames` frames read from `source` (every frame_step-th source frame)."""
    path = caption_file(source)
    if not path.is_file():
        raise TrainingError(f"--text-encoder: no captions for the video {source.name}: expected {path.name} beside "
                            f"it, with one `FRAME: caption` line where each caption starts (e.g. `0: a blue sky "
                            f"over the sea`)")
    spans = parse_captions(path)
    out, k = [], 0
    for i in range(frames):
        while k + 1 < len(spans) and spans[k + 1][0] <= i * frame_step:
            k += 1
        out.append(spans[k][1])
    return out


def encode_captions(encoder, captions: list[list[str]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Per-frame captions of every video -> (embeddings of each distinct caption [U, n, d] (encoded
    once), each video's caption index per frame [F] (long))."""
    unique = sorted({c for video in captions for c in video})
    unknown = getattr(encoder, "unknown_words", None)
    if unknown is not None:
        bad = {c: unknown(c) for c in unique if unknown(c)}
        if bad:
            caption, words = next(iter(bad.items()))
            raise TrainingError(f"--text-encoder {encoder.name} does not know the words {words} of the caption "
                                f"{caption!r} ({len(bad)} caption(s) with unknown words); use its vocabulary or "
                                f"another text encoder")
    table = torch.cat([encoder.encode(unique[s:s + ENCODE_BATCH]).float().cpu()
                       for s in range(0, len(unique), ENCODE_BATCH)])
    index = {c: n for n, c in enumerate(unique)}
    return table, [torch.tensor([index[c] for c in video], dtype=torch.long) for video in captions]


def load_caption_text(args, videos: list[torch.Tensor], kept: list[int]):
    """--text-encoder: every loaded video's per-frame captions, encoded -> ((table, ids), encoder info).
    kept: the list_video_sources index of each loaded video."""
    from ..text_encoder import describe, load_text_encoder
    sources = list_video_sources(args.videos)
    captions = [frame_captions(sources[n], v.shape[0], args.frame_step) for n, v in zip(kept, videos)]
    encoder = load_text_encoder(args.text_encoder)
    return encode_captions(encoder, captions), describe(encoder)


@torch.no_grad()
def encode_videos(vae: TKLVAE, videos: list[torch.Tensor], chunk: int, device) -> list[torch.Tensor]:
    """uint8 videos -> diffusion latents (posterior mean x latent_scale) [F, c, h, w], in overlapping,
    cross-faded windows of `chunk` frames (0: the T-KLVAE's training clip length); each window goes to
    the T-KLVAE's device (`device`), the latents come back to the CPU."""
    vae.eval()
    chunk = chunk or vae.config.clip_frames
    return [vae.encode(to_model(v)[None], chunk=chunk)[0].cpu() * vae.config.latent_scale for v in videos]


def xl_batch(latents: list[torch.Tensor], n: int, L: int, depth: int, levels: list[int], gen: torch.Generator,
             text: torch.Tensor | None = None, text_drop: float = 0.0, context_dim: int = 0,
             time_reverse: bool = False):
    """One training batch: x0 [n, L, c, h, w], context [n, L, m, d], cond [n, L, c, h, w], mask [n, L], levels [n].

    text: None (zero context), per-frame embeddings [F, m, d] of one video, or (embeddings [U, m, d],
    each video's embedding index per frame [F])."""
    if isinstance(text, torch.Tensor):
        text = (text, [torch.arange(text.shape[0])])
    xs, ctxs, conds, masks, lv = [], [], [], [], []
    for _ in range(n):
        level = levels[int(torch.randint(len(levels), (1,), generator=gen))]
        stride = level_spacing(L, depth, level)
        span = (L - 1) * stride
        lengths = torch.tensor([max(z.shape[0] - span, 0) for z in latents], dtype=torch.float64)
        if float(lengths.sum()) == 0:
            raise TrainingError(
                f"tree level {level} needs {span + 1} video frames (L={L}, depth={depth}: stride {stride}) but the "
                f"longest video has {max(z.shape[0] for z in latents)}; lower --depth / --L / --frame-step")
        vi = int(torch.multinomial(lengths, 1, generator=gen))
        start = int(torch.randint(int(lengths[vi]), (1,), generator=gen))
        idx = start + stride * torch.arange(L)
        if time_reverse and bool(torch.rand((), generator=gen) < 0.5):
            idx = idx.flip(0)
        x0 = latents[vi][idx]
        cond, mask = torch.zeros_like(x0), torch.zeros(L)
        if level > 0:
            cond[0], cond[-1] = x0[0], x0[-1]
            mask[0] = mask[-1] = 1.0
        if text is not None:
            ctx = text[0][text[1][vi][idx]]
            if text_drop and bool(torch.rand((), generator=gen) < text_drop):
                ctx = torch.zeros_like(ctx)
        else:
            ctx = torch.zeros(L, 1, context_dim)
        xs.append(x0), ctxs.append(ctx), conds.append(cond), masks.append(mask), lv.append(level)
    return torch.stack(xs), torch.stack(ctxs), torch.stack(conds), torch.stack(masks), torch.tensor(lv)


def xl_config_dict(args, mcfg: MTDConfig, vae_cfg: TKLVAEConfig) -> dict:
    level = getattr(args, "level", None)
    extra = {} if level is None else {"level": level}  # absent without --level: older checkpoints still resume
    return {**extra, "stage": "xl", "preset": args.preset, "init": args.init or "", "vae": Path(args.vae).name,
            "init_unet": Path(args.init_unet).name if args.init_unet else "",
            "vae_latent_scale": vae_cfg.latent_scale, "size": args.size, "frame_step": args.frame_step,
            "L": args.L, "depth": args.depth, "role": args.role, "batch": args.batch, "lr": args.lr,
            "seed": args.seed, "text_embeddings": Path(args.text_embeddings).name if args.text_embeddings else "",
            "text_encoder": Path(args.text_encoder).name if args.text_encoder else "",
            "text_drop": args.text_drop, "time_reverse": args.time_reverse,
            "world": int(os.environ.get("WORLD_SIZE", "1")), "model": dataclasses.asdict(mcfg)}


def train_xl(args) -> dict:
    dist = Dist()
    torch.manual_seed(args.seed)
    _check_tree(args.L, args.depth)
    levels = role_levels(args.role, args.depth, getattr(args, "level", None))
    vae = load_t_klvae(args.vae).float().to(dist.device)
    for p in vae.parameters():
        p.requires_grad_(False)
    size = parse_size(args.size)
    f = vae.config.downsample_factor
    if size[0] % f or size[1] % f:
        raise TrainingError(f"--size {args.size}: width and height must be multiples of the T-KLVAE's "
                            f"downsampling factor {f}")
    if args.text_embeddings and args.text_encoder:
        raise TrainingError("give --text-embeddings (precomputed) or --text-encoder (captions beside the videos), "
                            "not both")
    kept: list[int] = []
    videos, fps = load_videos(args.videos, size, args.frame_step, args.max_frames, 1, kept=kept)
    text, encoder_info, source = None, None, ""
    if args.text_embeddings:
        if len(videos) != 1:
            raise TrainingError("--text-embeddings: per-frame embeddings are supported for one video only; "
                                "captions for several videos go through --text-encoder")
        emb = load_text_embeddings(args.text_embeddings, videos[0].shape[0])
        text, source = (emb, [torch.arange(emb.shape[0])]), f"--text-embeddings {Path(args.text_embeddings).name}"
    elif args.text_encoder:
        text, encoder_info = load_caption_text(args, videos, kept)
        source = f"the text encoder {encoder_info['name']} (--text-encoder)"
    context_dim = text[0].shape[-1] if text is not None else args.context_dim
    if args.init and args.init_unet:
        raise TrainingError("give --init (an MTD file to go on from) or --init-unet (an SD 1.x UNet to start from), "
                            "not both")
    if args.init:
        model, _ = load_mtd_xl(args.init)
        model = model.float()
    elif args.init_unet:
        model = mtd_from_unet_file(args.init_unet, vae.config.z_channels).float()
    else:
        model = MaskTemporalDiffusion(mtd_preset(args.preset, vae.config.z_channels, context_dim))
    mcfg = model.config
    if mcfg.context_dim != context_dim and text is not None:
        start = "--init-unet UNet" if args.init_unet else "--init model"
        raise TrainingError(f"the prompts are {context_dim} wide ({source}) but the {start} takes "
                            f"{mcfg.context_dim}-wide prompts; start a new model or use a matching text encoder")
    context_dim = mcfg.context_dim
    lh, lw = size[1] // f, size[0] // f
    if lh % mcfg.downsample_factor or lw % mcfg.downsample_factor:
        raise TrainingError(f"latents of {lw}x{lh} (--size {args.size} / {f}) must be multiples of the MTD's "
                            f"downsampling factor {mcfg.downsample_factor}; change --size or the preset")
    latents = encode_videos(vae, videos, args.encode_chunk, dist.device)
    model.to(dist.device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    data_gen = torch.Generator().manual_seed(args.seed + 1000 * dist.rank)
    run = Run("xl", args, dist, {"mtd": model}, {"mtd": opt}, xl_config_dict(args, mcfg, vae.config), data_gen)
    info = {"role": args.role, "L": args.L, "depth": args.depth, "levels": levels,
            "prompts": "text" if text is not None else "none", "fps": fps, "width": size[0], "height": size[1],
            "latent_shape": [mcfg.latent_channels, lh, lw], "vae": Path(args.vae).name,
            "vae_latent_scale": vae.config.latent_scale}  # XLModel.load warns when paired with another scale
    if encoder_info is not None:
        info["text_encoder"] = encoder_info
    step = int(run.resume()["step"]) if args.resume else 0
    ddp = dist.wrap(model)

    def one_step(step, check):
        x0, ctx, cond, mask, lv = xl_batch(latents, args.batch, args.L, args.depth, levels, data_gen, text,
                                           args.text_drop, context_dim, args.time_reverse)
        x0, ctx, cond, mask = (t.to(dist.device) for t in (x0, ctx, cond, mask))
        set_lr(opt, args.lr, step, args.warmup, run.lr_total())
        loss = diffusion.training_loss(lambda x, t: ddp(x, t, ctx, cond, mask), x0, generator=data_gen)
        check(loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        return {"loss": loss.item(), "level": float(lv.float().mean())}

    def sample(path):
        frames = XLModel(vae, model, model, info).generate(L=args.L, depth=min(args.depth, 2), steps=20, seed=0)
        save_png(contact_sheet(frames), path)
        model.train()

    step, stopped, stats = run.loop(step, one_step, ["step", "time", "loss", "level"],
                                    postfix=lambda st, _: {"loss": f"{st['loss']:.4f}"},
                                    sample=sample if args.role == "both" else None)
    if dist.main:
        save_mtd_xl(model, run.out, info, dtype=dtype_named(args.save_dtype))
        print(f"[train] xl: stopped ({stopped}) at step {step}; wrote {run.out}", file=sys.stderr)
    run.finish()
    return {"step": step, "stopped": stopped, **stats}


def add_arguments(p) -> None:
    p.add_argument("--vae", required=True, help="the frozen T-KLVAE .safetensors")
    p.add_argument("--preset", default="small", help="MTD size: tiny | small | medium | sd (used without --init)")
    p.add_argument("--init", default=None, help="start from this MTD file")
    p.add_argument("--init-unet", default=None, help="start from an SD 1.x UNet: a checkpoint (its "
                   "model.diffusion_model.* weights) or a bare UNet file, .safetensors (or a .ckpt/.pt of plain "
                   "tensors); its widths replace --preset, temporal and condition layers start at identity / zero")
    p.add_argument("--L", type=int, default=5, help="frames per diffusion call")
    p.add_argument("--depth", type=int, default=3, help="tree depth the strides are sampled for")
    p.add_argument("--role", choices=("global", "local", "both"), default="both",
                   help="global: keyframes only; local: in-filling levels; both: one model for the whole tree")
    p.add_argument("--level", type=int, default=None,
                   help="with --role local: train on this tree level only (1..depth-1; its frames are "
                        "(L-1)^(depth-1-level) video frames apart): one local model per level, as the paper's")
    p.add_argument("--text-embeddings", default=None, help="per-frame prompt embeddings [frames, n, d] "
                   "(.safetensors with 'embeddings' or .pt); without: unconditional (zero context)")
    p.add_argument("--text-encoder", default=None, help="read every video's captions (NAME.txt beside the video "
                   "or frame folder NAME: `FRAME: caption` lines) and encode them once with this text encoder "
                   "(the pack's own, or a CLIP-L file)")
    p.add_argument("--text-drop", type=float, default=0.1, help="probability of the null (zero) context (the null "
                   "prompt classifier-free guidance samples against)")
    p.add_argument("--context-dim", type=int, default=32, help="prompt width of an unconditional model")
    p.add_argument("--time-reverse", action="store_true", help="random time reversal of clips")
    p.add_argument("--encode-chunk", type=int, default=0,
                   help="frames per T-KLVAE encode window (a window starts at every frame; they are cross-faded); "
                        "0: the clip length the T-KLVAE was trained on")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip (0: off)")


def run(args) -> dict:
    if args.lr is None:
        args.lr = DEFAULT_LR
    return train_xl(args)
