"""NUWA-XL training (the inference bundle is in nuwa_xl.py).

    python -m nuwa_core.train t_klvae ...   fine-tune (--init SD_VAE_FILE) or train from scratch
                                            (--preset tiny|tiny_f8|sd) the T-KLVAE on video clips:
                                            L1 reconstruction + a small KL term (--kl-weight, 0 = off).
    python -m nuwa_core.train xl ...        train Mask Temporal Diffusion directly on long videos.

XL training samples each clip the way the tree uses the model (Diffusion over Diffusion, with L frames
per call and `depth` levels): level k of the tree has its frames (L-1)^(depth-1-k) video frames apart.
- level 0 (global): L frames spread over (L-1)^depth frames of the video, no visual condition
  (cond zeros, mask all zeros: exactly what the model sees from generate_keyframes);
- level k >= 1 (local): L frames at that level's stride, the first and last given (mask 1 there),
  as fill_between passes them.
`--role global|local|both` picks the levels one model learns (both: one model serves the whole tree).
Prompts are per-frame text embeddings from `--text-embeddings FILE` ([video frames, n, d], one video),
dropped to the null context (zeros) with probability `--text-drop`; without them the model is
unconditional and always sees the zero context. Loss: diffusion.training_loss (eps MSE, eq. 5).

Latents are precomputed once with the frozen T-KLVAE (posterior mean x its latent_scale). All random
choices (clip, level, timestep, noise) come from one data generator, so `--resume` continues
exactly; checkpointing, signals, --max-minutes, NaN stop and DDP are those of nuwa_core.train (Run).
The trained files are written by t_klvae.save_t_klvae and nuwa_xl.save_mtd_xl.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from . import diffusion
from .diffusion_over_diffusion import _check_tree, frames_for
from .mask_temporal_diffusion import MaskTemporalDiffusion, MTDConfig
from .nuwa_xl import XLModel, contact_sheet, load_mtd_xl, save_mtd_xl, save_png
from .t_klvae import TKLVAE, TKLVAEConfig, load_t_klvae, save_t_klvae
from .train import Dist, Run, TrainingError, _dtype, _set_lr

VIDEO_EXTS = {".avi", ".mp4", ".mkv", ".mov", ".webm", ".gif", ".m4v", ".mpg", ".mpeg", ".ogv", ".wmv"}
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


# =============================================================================================
# Videos

def parse_size(text: str) -> tuple[int, int]:
    """"64x48" (width x height) or "64" (square) -> (width, height)."""
    try:
        parts = [int(p) for p in str(text).lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1:
        raise TrainingError(f"--size must be WIDTHxHEIGHT (e.g. 64x48) or one number, got {text!r}")
    return parts[0], parts[1]


def fit_frame(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """Scale to cover (width, height), centre-crop, -> uint8 [H, W, 3]."""
    w, h = size
    img = img.convert("RGB")
    s = max(w / img.width, h / img.height)
    nw, nh = max(w, round(img.width * s)), max(h, round(img.height * s))
    img = img.resize((nw, nh), Image.LANCZOS)
    left, top = (nw - w) // 2, (nh - h) // 2
    return np.asarray(img.crop((left, top, left + w, top + h)))


def list_video_sources(spec: str) -> list[Path]:
    """A video file, a folder of frames (one video), or a folder of video files / frame folders."""
    p = Path(spec)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise TrainingError(f"--videos {spec}: no such file or folder")
    if any(c.suffix.lower() in IMAGE_EXTS for c in p.iterdir()):
        return [p]
    out = [c for c in sorted(p.iterdir()) if (c.is_file() and c.suffix.lower() in VIDEO_EXTS) or
           (c.is_dir() and any(g.suffix.lower() in IMAGE_EXTS for g in c.iterdir()))]
    if not out:
        raise TrainingError(f"--videos {spec}: no video files ({', '.join(sorted(VIDEO_EXTS))}) "
                            f"nor frame folders in it")
    return out


def _decode_frames(path: Path):
    """Yields PIL frames and returns fps, through PyAV, else imageio."""
    try:
        import av  # type: ignore
    except ImportError:
        av = None
    if av is not None:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate) if stream.average_rate else 0.0
            return [f.to_image() for f in container.decode(stream)], fps
    try:
        import imageio.v3 as iio  # type: ignore
    except ImportError as err:
        raise TrainingError(f"reading {path.name} needs PyAV (`pip install av`) or imageio") from err
    fps = float(iio.immeta(path).get("fps", 0.0) or 0.0)
    return [Image.fromarray(a) for a in iio.imiter(path)], fps


def read_video(path: Path, size: tuple[int, int], frame_step: int = 1, max_frames: int = 0,
               fps: float = 0.0) -> tuple[torch.Tensor, float]:
    """-> uint8 [F, 3, H, W] (every frame_step-th frame, resized and centre-cropped), fps after the step."""
    if path.is_dir():
        files = sorted(c for c in path.iterdir() if c.suffix.lower() in IMAGE_EXTS)
        frames, src_fps = [Image.open(f) for f in files], fps or 10.0
    else:
        frames, src_fps = _decode_frames(path)
        src_fps = fps or src_fps or 10.0
    frames = frames[::frame_step]
    if max_frames:
        frames = frames[:max_frames]
    if not frames:
        raise TrainingError(f"{path}: no frames could be read")
    arr = np.stack([fit_frame(f, size) for f in frames])  # [F, H, W, 3]
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous(), src_fps / frame_step


def load_videos(spec: str, size: tuple[int, int], frame_step: int = 1, max_frames: int = 0,
                min_frames: int = 1) -> tuple[list[torch.Tensor], float]:
    videos, fps = [], 0.0
    for src in list_video_sources(spec):
        v, fps = read_video(src, size, frame_step, max_frames)
        if v.shape[0] >= min_frames:
            videos.append(v)
    if not videos:
        raise TrainingError(f"--videos {spec}: no video has the {min_frames} frames a training clip "
                            f"needs (after --frame-step {frame_step}); use shorter clips or longer videos")
    return videos, fps


def to_model(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1.0


def random_clips(videos: list[torch.Tensor], n: int, frames: int, stride: int, gen: torch.Generator,
                 flip: bool = False) -> torch.Tensor:
    """n clips of `frames` frames `stride` apart -> float [n, frames, 3, H, W] in -1..1."""
    span = (frames - 1) * stride + 1
    lengths = torch.tensor([max(v.shape[0] - span + 1, 0) for v in videos], dtype=torch.float64)
    out = []
    for _ in range(n):
        vi = int(torch.multinomial(lengths, 1, generator=gen))
        start = int(torch.randint(int(lengths[vi]), (1,), generator=gen))
        clip = to_model(videos[vi][start:start + span:stride])
        if flip and bool(torch.rand((), generator=gen) < 0.5):
            clip = clip.flip(-1)
        out.append(clip)
    return torch.stack(out)


# =============================================================================================
# T-KLVAE stage

def tklvae_preset(name: str) -> TKLVAEConfig:
    presets = {
        "tiny": TKLVAEConfig.tiny,  # f2, for tests
        "tiny_f8": lambda: TKLVAEConfig(ch=16, ch_mult=(1, 2, 2, 4), num_res_blocks=1, num_groups=8),
        "sd": TKLVAEConfig.sd,
    }
    if name not in presets:
        raise TrainingError(f"--preset {name!r}: choose one of {sorted(presets)}")
    return presets[name]()


class _VAEStep(nn.Module):
    """encode -> posterior sample -> decode in one forward (one DDP forward per backward)."""

    def __init__(self, vae: TKLVAE):
        super().__init__()
        self.vae = vae

    def forward(self, video: torch.Tensor, noise: torch.Tensor):
        vae = self.vae
        b, f = video.shape[:2]
        moments = vae.quant_conv(vae.encoder(video.flatten(0, 1), f))
        if vae.config.double_z:
            mean, logvar = moments.chunk(2, dim=1)
            logvar = logvar.clamp(-30.0, 20.0)
            z = mean + torch.exp(0.5 * logvar) * noise
        else:
            mean, logvar, z = moments, None, moments
        rec = vae.decoder(vae.post_quant_conv(z), f)
        return rec.view_as(video), mean, logvar


@torch.no_grad()
def measure_latent_scale(vae: TKLVAE, clips: torch.Tensor) -> float:
    """1 / std of the posterior means (LDM's recipe for the 0.18215 of SD)."""
    was = vae.training
    vae.eval()
    z = torch.cat([vae.encode(c[None].to(next(vae.parameters()).device)) for c in clips])
    vae.train(was)
    return float(1.0 / z.float().std().clamp_min(1e-6))


def t_klvae_config_dict(args, cfg: TKLVAEConfig) -> dict:
    return {"stage": "t_klvae", "preset": args.preset, "init": args.init or "", "size": args.size,
            "clip_frames": args.clip_frames, "clip_stride": args.clip_stride, "frame_step": args.frame_step,
            "batch": args.batch, "lr": args.lr, "kl_weight": args.kl_weight, "seed": args.seed,
            "flip": args.flip, "world": int(os.environ.get("WORLD_SIZE", "1")),
            "model": dataclasses.asdict(cfg)}


def train_t_klvae(args) -> dict:
    dist = Dist()
    torch.manual_seed(args.seed)
    if args.init:
        vae = load_t_klvae(args.init).float()
    else:
        vae = TKLVAE(tklvae_preset(args.preset))
    cfg = vae.config
    size = parse_size(args.size)
    f = cfg.downsample_factor
    if size[0] % f or size[1] % f:
        raise TrainingError(f"--size {args.size}: width and height must be multiples of the VAE's "
                            f"downsampling factor {f}")
    span = (args.clip_frames - 1) * args.clip_stride + 1
    videos, fps = load_videos(args.videos, size, args.frame_step, args.max_frames, span)
    vae.to(dist.device).train()
    step_module = _VAEStep(vae)
    opt = torch.optim.Adam(vae.parameters(), lr=args.lr, betas=(0.5, 0.9))
    data_gen = torch.Generator().manual_seed(args.seed + 1000 * dist.rank)
    run = Run("t_klvae", args, dist, {"t_klvae": vae}, {"t_klvae": opt}, t_klvae_config_dict(args, cfg), data_gen)
    step = int(run.resume()["step"]) if args.resume else 0
    ddp = dist.wrap(step_module)
    sample_in = random_clips(videos, 2, args.clip_frames, args.clip_stride, torch.Generator().manual_seed(123))

    def one_step(step, check):
        x = random_clips(videos, args.batch, args.clip_frames, args.clip_stride, data_gen, args.flip)
        zshape = (x.shape[0] * x.shape[1], cfg.z_channels, size[1] // f, size[0] // f)
        noise = torch.randn(zshape, generator=data_gen)
        x, noise = x.to(dist.device), noise.to(dist.device)
        _set_lr(opt, args.lr, step, args.warmup)
        rec, mean, logvar = ddp(x, noise)
        l1 = (rec - x).abs().mean()
        kl = torch.zeros((), device=x.device)
        if logvar is not None:
            kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        loss = l1 + args.kl_weight * kl
        check(loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.item(), "l1": l1.item(), "kl": kl.item()}

    step, stopped, stats = run.loop(step, one_step, ["step", "time", "loss", "l1", "kl"],
                                    postfix=lambda st, _: {"l1": f"{st['l1']:.4f}", "kl": f"{st['kl']:.3f}"},
                                    sample=lambda path: _vae_samples(vae, sample_in, path))
    if dist.main:
        scale = args.latent_scale
        if scale == "auto" or (scale == "" and not args.init):
            vae.config = dataclasses.replace(vae.config, latent_scale=measure_latent_scale(vae, sample_in))
        elif scale not in ("", "keep"):
            vae.config = dataclasses.replace(vae.config, latent_scale=float(scale))
        save_t_klvae(vae, run.out, dtype=_dtype(args.save_dtype))
        print(f"[train] t_klvae: stopped ({stopped}) at step {step}; latent_scale {vae.config.latent_scale:.5g}; "
              f"wrote {run.out}", file=sys.stderr)
    run.finish()
    return {"step": step, "stopped": stopped, "fps": fps, "latent_scale": vae.config.latent_scale, **stats}


@torch.no_grad()
def _vae_samples(vae: TKLVAE, clips: torch.Tensor, path: Path):
    was = vae.training
    vae.eval()
    dev = next(vae.parameters()).device
    rec = torch.cat([vae.decode(vae.encode(c[None].to(dev))) for c in clips]).cpu()
    vae.train(was)
    rows = [torch.cat(list(v), dim=-1) for v in (*clips, *rec)]  # each [3, H, F*W]
    save_png(torch.cat(rows, dim=-2), path)


# =============================================================================================
# XL (Mask Temporal Diffusion) stage

def mtd_preset(name: str, latent_channels: int, context_dim: int) -> MTDConfig:
    kw = {"latent_channels": latent_channels, "context_dim": context_dim}
    presets = {
        "tiny": lambda: MTDConfig.tiny(**kw),
        "small": lambda: MTDConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=2,
                                   attention_levels=(0, 1), num_heads=4, num_groups=8, **kw),
        "sd": lambda: MTDConfig.sd(**kw),
    }
    if name not in presets:
        raise TrainingError(f"--preset {name!r}: choose one of {sorted(presets)}")
    return presets[name]()


def role_levels(role: str, depth: int) -> list[int]:
    levels = {"global": [0], "local": list(range(1, depth)), "both": list(range(depth))}[role]
    if not levels:
        raise TrainingError(f"--role local needs --depth >= 2 (depth {depth} has no local level)")
    return levels


def level_stride(L: int, depth: int, level: int) -> int:
    """Video frames between consecutive frames of tree level `level` (0 = global)."""
    return (L - 1) ** (depth - 1 - level)


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


@torch.no_grad()
def encode_videos(vae: TKLVAE, videos: list[torch.Tensor], chunk: int, device) -> list[torch.Tensor]:
    """uint8 videos -> diffusion latents (posterior mean x latent_scale) [F, c, h, w], chunk frames at a time."""
    vae.eval()
    out = []
    for v in videos:
        parts = [vae.encode(to_model(v[s:s + chunk])[None].to(device))[0].cpu() for s in range(0, v.shape[0], chunk)]
        out.append(torch.cat(parts) * vae.config.latent_scale)
    return out


def xl_batch(latents: list[torch.Tensor], n: int, L: int, depth: int, levels: list[int], gen: torch.Generator,
             text: torch.Tensor | None = None, text_drop: float = 0.0, context_dim: int = 0,
             time_reverse: bool = False):
    """One training batch: x0 [n, L, c, h, w], context [n, L, m, d], cond [n, L, c, h, w], mask [n, L], levels [n]."""
    xs, ctxs, conds, masks, lv = [], [], [], [], []
    for _ in range(n):
        level = levels[int(torch.randint(len(levels), (1,), generator=gen))]
        stride = level_stride(L, depth, level)
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
            ctx = text[idx]
            if text_drop and bool(torch.rand((), generator=gen) < text_drop):
                ctx = torch.zeros_like(ctx)
        else:
            ctx = torch.zeros(L, 1, context_dim)
        xs.append(x0), ctxs.append(ctx), conds.append(cond), masks.append(mask), lv.append(level)
    return torch.stack(xs), torch.stack(ctxs), torch.stack(conds), torch.stack(masks), torch.tensor(lv)


def xl_config_dict(args, mcfg: MTDConfig, vae_cfg: TKLVAEConfig) -> dict:
    return {"stage": "xl", "preset": args.preset, "init": args.init or "", "vae": Path(args.vae).name,
            "vae_latent_scale": vae_cfg.latent_scale, "size": args.size, "frame_step": args.frame_step,
            "L": args.L, "depth": args.depth, "role": args.role, "batch": args.batch, "lr": args.lr,
            "seed": args.seed, "text_embeddings": Path(args.text_embeddings).name if args.text_embeddings else "",
            "text_drop": args.text_drop, "time_reverse": args.time_reverse,
            "world": int(os.environ.get("WORLD_SIZE", "1")), "model": dataclasses.asdict(mcfg)}


def train_xl(args) -> dict:
    dist = Dist()
    torch.manual_seed(args.seed)
    _check_tree(args.L, args.depth)
    levels = role_levels(args.role, args.depth)
    vae = load_t_klvae(args.vae).float().to(dist.device)
    for p in vae.parameters():
        p.requires_grad_(False)
    size = parse_size(args.size)
    f = vae.config.downsample_factor
    if size[0] % f or size[1] % f:
        raise TrainingError(f"--size {args.size}: width and height must be multiples of the T-KLVAE's "
                            f"downsampling factor {f}")
    videos, fps = load_videos(args.videos, size, args.frame_step, args.max_frames, 1)
    text = load_text_embeddings(args.text_embeddings, videos[0].shape[0]) if args.text_embeddings else None
    if text is not None and len(videos) != 1:
        raise TrainingError("--text-embeddings: per-frame embeddings are supported for one video only")
    context_dim = text.shape[-1] if text is not None else args.context_dim
    if args.init:
        model, _ = load_mtd_xl(args.init)
        model = model.float()
    else:
        model = MaskTemporalDiffusion(mtd_preset(args.preset, vae.config.z_channels, context_dim))
    mcfg = model.config
    if mcfg.context_dim != context_dim and text is not None:
        raise TrainingError(f"--text-embeddings are {context_dim} wide but the model takes {mcfg.context_dim}")
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
    info = {"role": args.role, "L": args.L, "depth": args.depth, "prompts": "text" if text is not None else "none",
            "fps": fps, "width": size[0], "height": size[1], "latent_shape": [mcfg.latent_channels, lh, lw],
            "vae": Path(args.vae).name}
    step = int(run.resume()["step"]) if args.resume else 0
    ddp = dist.wrap(model)

    def one_step(step, check):
        x0, ctx, cond, mask, lv = xl_batch(latents, args.batch, args.L, args.depth, levels, data_gen, text,
                                           args.text_drop, context_dim, args.time_reverse)
        x0, ctx, cond, mask = (t.to(dist.device) for t in (x0, ctx, cond, mask))
        _set_lr(opt, args.lr, step, args.warmup)
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
        save_mtd_xl(model, run.out, info, dtype=_dtype(args.save_dtype))
        print(f"[train] xl: stopped ({stopped}) at step {step}; wrote {run.out}", file=sys.stderr)
    run.finish()
    return {"step": step, "stopped": stopped, **stats}


def add_arguments(sub) -> None:
    """The `t_klvae` and `xl` subcommands of `python -m nuwa_core.train`."""

    def common(s):
        s.add_argument("--videos", required=True, help="a video file (PyAV/imageio), a folder of frames, or a "
                       "folder of videos / frame folders")
        s.add_argument("--out", required=True, help="output .safetensors (training state goes next to it)")
        s.add_argument("--size", default="64x48", help="frame size WIDTHxHEIGHT after resize + centre crop")
        s.add_argument("--frame-step", type=int, default=1, help="keep every N-th video frame")
        s.add_argument("--max-frames", type=int, default=0, help="use at most this many frames per video (0: all)")
        s.add_argument("--steps", type=int, default=100000)
        s.add_argument("--max-minutes", type=float, default=0.0, help="stop (and save) after this wall time")
        s.add_argument("--batch", type=int, default=4, help="clips per step")
        s.add_argument("--lr", type=float)
        s.add_argument("--warmup", type=int, default=100, help="linear warm-up of the learning rate, in steps")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--resume", action="store_true")
        s.add_argument("--save-every", type=int, default=200)
        s.add_argument("--save-dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
        s.add_argument("--sample-every", type=int, default=0)
        s.add_argument("--sample-dir", default=None)
        s.add_argument("--log-dir", default=None, help="write a CSV log here")
        s.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
        s.add_argument("--quiet", action="store_true")
        s.add_argument("--debug-nan-at", type=int, default=None, help=argparse_suppress())

    v = sub.add_parser("t_klvae", help="fine-tune / train the T-KLVAE (NUWA-XL) on videos")
    common(v)
    v.add_argument("--preset", default="sd", help="tiny (f2, tests) | tiny_f8 | sd (used without --init)")
    v.add_argument("--init", default=None, help="start from this SD 1.x VAE or T-KLVAE file")
    v.add_argument("--clip-frames", type=int, default=4, help="frames per training clip")
    v.add_argument("--clip-stride", type=int, default=1, help="video frames between clip frames")
    v.add_argument("--kl-weight", type=float, default=1e-4, help="weight of the KL term (0: off)")
    v.add_argument("--flip", action="store_true", help="random horizontal flips")
    v.add_argument("--latent-scale", default="", help="auto (1/std of the latents; the default from scratch), "
                   "keep (the default with --init) or a number")

    x = sub.add_parser("xl", help="train Mask Temporal Diffusion (NUWA-XL) on long videos")
    common(x)
    x.add_argument("--vae", required=True, help="the frozen T-KLVAE .safetensors")
    x.add_argument("--preset", default="small", help="MTD size: tiny | small | sd (used without --init)")
    x.add_argument("--init", default=None, help="start from this MTD file")
    x.add_argument("--L", type=int, default=5, help="frames per diffusion call")
    x.add_argument("--depth", type=int, default=3, help="tree depth the strides are sampled for")
    x.add_argument("--role", choices=("global", "local", "both"), default="both",
                   help="global: keyframes only; local: in-filling levels; both: one model for the whole tree")
    x.add_argument("--text-embeddings", default=None, help="per-frame prompt embeddings [frames, n, d] "
                   "(.safetensors with 'embeddings' or .pt); without: unconditional (zero context)")
    x.add_argument("--text-drop", type=float, default=0.1, help="probability of the null (zero) context")
    x.add_argument("--context-dim", type=int, default=32, help="prompt width of an unconditional model")
    x.add_argument("--time-reverse", action="store_true", help="random time reversal of clips")
    x.add_argument("--encode-chunk", type=int, default=16, help="frames per T-KLVAE encode call")
    x.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip (0: off)")


def argparse_suppress():
    import argparse
    return argparse.SUPPRESS


def run(args) -> dict:
    if args.lr is None:
        args.lr = 1e-4 if args.stage == "t_klvae" else 2e-4
    for name in ("steps", "batch", "frame_step"):
        if getattr(args, name) < 1:
            raise TrainingError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return train_t_klvae(args) if args.stage == "t_klvae" else train_xl(args)




__all__ = ["train_t_klvae", "train_xl", "add_arguments", "run", "read_video", "load_videos", "xl_batch",
           "level_stride", "frames_for"]
