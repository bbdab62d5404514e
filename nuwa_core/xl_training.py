"""NUWA-XL training and the small inference bundle the nodes use.

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
exactly; checkpointing, signals, --max-minutes, NaN stop and DDP are those of nuwa_core.train.

Model files: the T-KLVAE through t_klvae.save_t_klvae; the MTD as mask_temporal_diffusion files
(loadable by load_mtd) plus the metadata key `nuwa_xl` (JSON: role, L, depth, prompts, fps, frame
size) that the nodes read for their defaults.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from . import checkpoint
from . import diffusion
from .diffusion_over_diffusion import _check_tree, fill_between, frames_for, generate_keyframes, generate_long_video
from .mask_temporal_diffusion import KIND as MTD_KIND, MaskTemporalDiffusion, MTDConfig
from .t_klvae import TKLVAE, TKLVAEConfig, load_t_klvae, save_t_klvae

VIDEO_EXTS = {".avi", ".mp4", ".mkv", ".mov", ".webm", ".gif", ".m4v", ".mpg", ".mpeg", ".ogv", ".wmv"}
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
XL_META_KEY = "nuwa_xl"


def _train():  # nuwa_core.train imports this module lazily; import it back lazily too
    from . import train
    return train


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
        raise _train().TrainingError(f"--size must be WIDTHxHEIGHT (e.g. 64x48) or one number, got {text!r}")
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
        raise _train().TrainingError(f"--videos {spec}: no such file or folder")
    if any(c.suffix.lower() in IMAGE_EXTS for c in p.iterdir()):
        return [p]
    out = [c for c in sorted(p.iterdir()) if (c.is_file() and c.suffix.lower() in VIDEO_EXTS) or
           (c.is_dir() and any(g.suffix.lower() in IMAGE_EXTS for g in c.iterdir()))]
    if not out:
        raise _train().TrainingError(f"--videos {spec}: no video files ({', '.join(sorted(VIDEO_EXTS))}) "
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
        raise _train().TrainingError(f"reading {path.name} needs PyAV (`pip install av`) or imageio") from err
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
        raise _train().TrainingError(f"{path}: no frames could be read")
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
        raise _train().TrainingError(f"--videos {spec}: no video has the {min_frames} frames a training clip "
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
        raise _train().TrainingError(f"--preset {name!r}: choose one of {sorted(presets)}")
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
    T = _train()
    dist = T.Dist()
    torch.manual_seed(args.seed)
    if args.init:
        vae = load_t_klvae(args.init).float()
    else:
        vae = TKLVAE(tklvae_preset(args.preset))
    cfg = vae.config
    size = parse_size(args.size)
    f = cfg.downsample_factor
    if size[0] % f or size[1] % f:
        raise T.TrainingError(f"--size {args.size}: width and height must be multiples of the VAE's "
                              f"downsampling factor {f}")
    span = (args.clip_frames - 1) * args.clip_stride + 1
    videos, fps = load_videos(args.videos, size, args.frame_step, args.max_frames, span)
    vae.to(dist.device).train()
    step_module = _VAEStep(vae)
    opt = torch.optim.Adam(vae.parameters(), lr=args.lr, betas=(0.5, 0.9))
    data_gen = torch.Generator().manual_seed(args.seed + 1000 * dist.rank)
    out = Path(args.out)
    config = t_klvae_config_dict(args, cfg)
    step = 0
    if args.resume:
        st = T.load_training(out, {"t_klvae": vae}, config, dist)
        step = int(st["step"])
        opt.load_state_dict(st["optim"]["t_klvae"])
        data_gen.set_state(st["data_rng"])
        torch.set_rng_state(st["torch_rng"])
    ddp = dist.wrap(step_module)
    sample_in = random_clips(videos, 2, args.clip_frames, args.clip_stride, torch.Generator().manual_seed(123))
    log = T.CsvLog(args.log_dir, "t_klvae", ["step", "time", "loss", "l1", "kl"], args.resume, dist.main)
    bar = T._progress(args.steps, step, dist.main and not args.quiet, "t_klvae")
    t0, last_good, stopped = time.time(), None, "steps"
    stats = {"loss": float("nan")}

    def save():
        state = {"step": step, "optim": {"t_klvae": opt.state_dict()}, "config": json.dumps(config, sort_keys=True)}
        T.save_training(out, {"t_klvae": vae}, state, dist, data_gen)

    with T.StopRequest() as stop:
        while step < args.steps:
            reason = T.stop_reason(stop, dist, t0, args.max_minutes)
            if reason:
                stopped = reason
                break
            x = random_clips(videos, args.batch, args.clip_frames, args.clip_stride, data_gen, args.flip)
            zshape = (x.shape[0] * x.shape[1], cfg.z_channels, size[1] // f, size[0] // f)
            noise = torch.randn(zshape, generator=data_gen)
            x, noise = x.to(dist.device), noise.to(dist.device)
            T._set_lr(opt, args.lr, step, args.warmup)
            rec, mean, logvar = ddp(x, noise)
            l1 = (rec - x).abs().mean()
            kl = torch.zeros((), device=x.device)
            if logvar is not None:
                kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
            loss = l1 + args.kl_weight * kl
            if args.debug_nan_at is not None and step == args.debug_nan_at:
                loss = loss * float("nan")
            if dist.any_flag(not T._finite(loss.detach())):
                raise T.TrainingDiverged(T._nan_message(out, step, last_good))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            stats = {"step": step, "time": time.time() - t0, "loss": loss.item(), "l1": l1.item(), "kl": kl.item()}
            log.write(stats)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(l1=f"{stats['l1']:.4f}", kl=f"{stats['kl']:.3f}")
            if args.save_every and step % args.save_every == 0:
                save()
                last_good = step
            if args.sample_every and dist.main and step % args.sample_every == 0:
                _vae_samples(vae, sample_in, Path(args.sample_dir or "outputs/samples") / f"t_klvae_{step:06d}.png")
    if bar is not None:
        bar.close()
    save()
    if dist.main:
        scale = args.latent_scale
        if scale == "auto" or (scale == "" and not args.init):
            vae.config = dataclasses.replace(vae.config, latent_scale=measure_latent_scale(vae, sample_in))
        elif scale not in ("", "keep"):
            vae.config = dataclasses.replace(vae.config, latent_scale=float(scale))
        save_t_klvae(vae, out, dtype=T._dtype(args.save_dtype))
        print(f"[train] t_klvae: stopped ({stopped}) at step {step}; latent_scale {vae.config.latent_scale:.5g}; "
              f"wrote {out}", file=sys.stderr)
    log.close()
    dist.barrier()
    dist.close()
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


def save_png(x: torch.Tensor, path: Path):
    """[3, H, W] in -1..1 -> PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(arr).save(path)


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
        raise _train().TrainingError(f"--preset {name!r}: choose one of {sorted(presets)}")
    return presets[name]()


def role_levels(role: str, depth: int) -> list[int]:
    levels = {"global": [0], "local": list(range(1, depth)), "both": list(range(depth))}[role]
    if not levels:
        raise _train().TrainingError(f"--role local needs --depth >= 2 (depth {depth} has no local level)")
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
        raise _train().TrainingError(f"--text-embeddings {path}: expected [frames={frames}, n, d] (one entry per "
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
            raise _train().TrainingError(
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


def save_mtd_xl(model: MaskTemporalDiffusion, path, info: dict, dtype: torch.dtype | None = None) -> None:
    checkpoint.save_model_file(path, model.state_dict(), MTD_KIND, model.config,
                               extra_metadata={XL_META_KEY: json.dumps(info, sort_keys=True)}, dtype=dtype)


def load_mtd_xl(path) -> tuple[MaskTemporalDiffusion, dict]:
    """An MTD file and its `nuwa_xl` info ({} for files saved by save_mtd)."""
    state, metadata = checkpoint.load_state_dict(path)
    name = Path(path).name
    if metadata.get("nuwa_kind") != MTD_KIND or "config" not in metadata:
        raise checkpoint.CheckpointError(
            f"{name} is not a Mask Temporal Diffusion file (nuwa_kind={metadata.get('nuwa_kind')!r}, expected "
            f"{MTD_KIND!r}); pick the MTD file (the T-KLVAE goes in the other slot)")
    model = MaskTemporalDiffusion(checkpoint.config_from_json(MTDConfig, metadata["config"]))
    checkpoint.load_strict(model, state, name)
    info = json.loads(metadata.get(XL_META_KEY, "{}"))
    return model, info


def train_xl(args) -> dict:
    T = _train()
    dist = T.Dist()
    torch.manual_seed(args.seed)
    _check_tree(args.L, args.depth)
    levels = role_levels(args.role, args.depth)
    vae = load_t_klvae(args.vae).float().to(dist.device)
    for p in vae.parameters():
        p.requires_grad_(False)
    size = parse_size(args.size)
    f = vae.config.downsample_factor
    if size[0] % f or size[1] % f:
        raise T.TrainingError(f"--size {args.size}: width and height must be multiples of the T-KLVAE's "
                              f"downsampling factor {f}")
    videos, fps = load_videos(args.videos, size, args.frame_step, args.max_frames, 1)
    text = load_text_embeddings(args.text_embeddings, videos[0].shape[0]) if args.text_embeddings else None
    if text is not None and len(videos) != 1:
        raise T.TrainingError("--text-embeddings: per-frame embeddings are supported for one video only")
    context_dim = text.shape[-1] if text is not None else args.context_dim
    if args.init:
        model, _ = load_mtd_xl(args.init)
        model = model.float()
    else:
        model = MaskTemporalDiffusion(mtd_preset(args.preset, vae.config.z_channels, context_dim))
    mcfg = model.config
    if mcfg.context_dim != context_dim and text is not None:
        raise T.TrainingError(f"--text-embeddings are {context_dim} wide but the model takes {mcfg.context_dim}")
    context_dim = mcfg.context_dim
    lh, lw = size[1] // f, size[0] // f
    if lh % mcfg.downsample_factor or lw % mcfg.downsample_factor:
        raise T.TrainingError(f"latents of {lw}x{lh} (--size {args.size} / {f}) must be multiples of the MTD's "
                              f"downsampling factor {mcfg.downsample_factor}; change --size or the preset")
    latents = encode_videos(vae, videos, args.encode_chunk, dist.device)
    model.to(dist.device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    data_gen = torch.Generator().manual_seed(args.seed + 1000 * dist.rank)
    out = Path(args.out)
    config = xl_config_dict(args, mcfg, vae.config)
    info = {"role": args.role, "L": args.L, "depth": args.depth, "prompts": "text" if text is not None else "none",
            "fps": fps, "width": size[0], "height": size[1], "latent_shape": [mcfg.latent_channels, lh, lw],
            "vae": Path(args.vae).name}
    step = 0
    if args.resume:
        st = T.load_training(out, {"mtd": model}, config, dist)
        step = int(st["step"])
        opt.load_state_dict(st["optim"]["mtd"])
        data_gen.set_state(st["data_rng"])
        torch.set_rng_state(st["torch_rng"])
    ddp = dist.wrap(model)
    log = T.CsvLog(args.log_dir, "xl", ["step", "time", "loss", "level"], args.resume, dist.main)
    bar = T._progress(args.steps, step, dist.main and not args.quiet, "xl")
    t0, last_good, stopped = time.time(), None, "steps"
    stats = {"loss": float("nan")}

    def save():
        state = {"step": step, "optim": {"mtd": opt.state_dict()}, "config": json.dumps(config, sort_keys=True)}
        T.save_training(out, {"mtd": model}, state, dist, data_gen)

    with T.StopRequest() as stop:
        while step < args.steps:
            reason = T.stop_reason(stop, dist, t0, args.max_minutes)
            if reason:
                stopped = reason
                break
            x0, ctx, cond, mask, lv = xl_batch(latents, args.batch, args.L, args.depth, levels, data_gen, text,
                                               args.text_drop, context_dim, args.time_reverse)
            x0, ctx, cond, mask = (t.to(dist.device) for t in (x0, ctx, cond, mask))
            T._set_lr(opt, args.lr, step, args.warmup)
            loss = diffusion.training_loss(lambda x, t: ddp(x, t, ctx, cond, mask), x0, generator=data_gen)
            if args.debug_nan_at is not None and step == args.debug_nan_at:
                loss = loss * float("nan")
            if dist.any_flag(not T._finite(loss.detach())):
                raise T.TrainingDiverged(T._nan_message(out, step, last_good))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            step += 1
            stats = {"step": step, "time": time.time() - t0, "loss": loss.item(), "level": float(lv.float().mean())}
            log.write(stats)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{stats['loss']:.4f}")
            if args.save_every and step % args.save_every == 0:
                save()
                last_good = step
            if args.sample_every and dist.main and step % args.sample_every == 0 and args.role == "both":
                bundle = XLModel(vae, model, model, info)
                frames = bundle.generate(L=args.L, depth=min(args.depth, 2), steps=20, seed=0)
                save_png(contact_sheet(frames), Path(args.sample_dir or "outputs/samples") / f"xl_{step:06d}.png")
                model.train()
    if bar is not None:
        bar.close()
    save()
    if dist.main:
        save_mtd_xl(model, out, info, dtype=T._dtype(args.save_dtype))
        print(f"[train] xl: stopped ({stopped}) at step {step}; wrote {out}", file=sys.stderr)
    log.close()
    dist.barrier()
    dist.close()
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
            raise _train().TrainingError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return train_t_klvae(args) if args.stage == "t_klvae" else train_xl(args)


# =============================================================================================
# Inference bundle (nodes, samples)

@dataclass
class XLModel:
    """T-KLVAE + global and local MTD (the same object when one model serves both), with the info
    saved next to the MTD weights (L, depth, fps, frame size, whether it takes prompts)."""
    vae: TKLVAE
    global_mtd: MaskTemporalDiffusion
    local_mtd: MaskTemporalDiffusion
    info: dict = field(default_factory=dict)

    @classmethod
    def load(cls, vae_path, mtd_path, local_mtd_path=None) -> "XLModel":
        vae = load_t_klvae(vae_path).float().eval()
        g, info = load_mtd_xl(mtd_path)
        l = g
        if local_mtd_path is not None and Path(local_mtd_path) != Path(mtd_path):
            l, linfo = load_mtd_xl(local_mtd_path)
            info = {**linfo, **info}
        for m in {id(g): g, id(l): l}.values():
            m.float().eval()
            if m.config.latent_channels != vae.config.z_channels:
                raise checkpoint.CheckpointError(
                    f"the MTD takes {m.config.latent_channels}-channel latents but the T-KLVAE makes "
                    f"{vae.config.z_channels}; pick a matching pair")
        return cls(vae, g, l, info)

    @property
    def context_dim(self) -> int:
        return self.global_mtd.config.context_dim

    @property
    def takes_prompts(self) -> bool:
        return self.info.get("prompts", "text") != "none"

    @property
    def fps(self) -> float:
        return float(self.info.get("fps", 8.0))

    def latent_shape(self, width: int = 0, height: int = 0) -> tuple[int, int, int]:
        f = self.vae.config.downsample_factor
        w = width or self.info.get("width", 64)
        h = height or self.info.get("height", 64)
        m = f * self.global_mtd.config.downsample_factor
        if w % m or h % m:
            raise ValueError(f"width and height must be multiples of {m} for this model, got {w}x{h}")
        return self.vae.config.z_channels, h // f, w // f

    def to(self, device) -> "XLModel":
        for m in (self.vae, self.global_mtd, self.local_mtd):
            m.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.global_mtd.parameters()).device

    def null_prompts(self, frames: int = 1) -> torch.Tensor:
        return torch.zeros(frames, 1, self.context_dim, device=self.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, chunk: int = 16) -> torch.Tensor:
        """Diffusion latents [N, c, h, w] -> frames [N, 3, H, W] in -1..1 (chunk frames per decode call)."""
        z = latents.to(self.device) / self.vae.config.latent_scale
        return torch.cat([self.vae.decode(z[s:s + chunk][None])[0] for s in range(0, z.shape[0], chunk)])

    @torch.no_grad()
    def encode(self, frames: torch.Tensor, chunk: int = 16) -> torch.Tensor:
        """Frames [N, 3, H, W] in -1..1 -> diffusion latents [N, c, h, w]."""
        x = frames.to(self.device)
        z = torch.cat([self.vae.encode(x[s:s + chunk][None])[0] for s in range(0, x.shape[0], chunk)])
        return z * self.vae.config.latent_scale

    @torch.no_grad()
    def keyframes(self, prompts, L, steps, seed, callback=None, width=0, height=0):
        gen = torch.Generator(device=self.device).manual_seed(seed)
        prompts = self.null_prompts() if prompts is None else prompts.to(self.device)
        return generate_keyframes(self.global_mtd, prompts, L, self.latent_shape(width, height), steps=steps,
                                  generator=gen, callback=callback)

    @torch.no_grad()
    def fill(self, keyframes, prompts, L, steps, seed, callback=None, max_batch=None):
        gen = torch.Generator(device=self.device).manual_seed(seed)
        prompts = self.null_prompts() if prompts is None else prompts.to(self.device)
        return fill_between(self.local_mtd, keyframes.to(self.device), prompts, L, steps=steps, generator=gen,
                            callback=callback, max_batch=max_batch)

    @torch.no_grad()
    def generate(self, L=5, depth=3, steps=50, seed=0, prompts=None, callback=None, max_batch=None,
                 width=0, height=0) -> torch.Tensor:
        """The whole tree -> frames [(L-1)^depth + 1, 3, H, W] in -1..1."""
        gen = torch.Generator(device=self.device).manual_seed(seed)
        prompts = self.null_prompts() if prompts is None else prompts
        lat = generate_long_video(self.global_mtd, self.local_mtd, prompts, L, depth,
                                  self.latent_shape(width, height), steps=steps, generator=gen,
                                  callback=callback, max_batch=max_batch)
        return self.decode(lat)


def contact_sheet(frames: torch.Tensor, cols: int = 0) -> torch.Tensor:
    """Frames [N, 3, H, W] -> one image [3, rows*H, cols*W] (row-major)."""
    n = frames.shape[0]
    cols = cols or math.ceil(math.sqrt(n * frames.shape[2] / frames.shape[3]))
    rows = math.ceil(n / cols)
    pad = torch.full((rows * cols - n, *frames.shape[1:]), -1.0, device=frames.device)
    grid = torch.cat([frames, pad]).view(rows, cols, *frames.shape[1:])
    return grid.permute(2, 0, 3, 1, 4).reshape(frames.shape[1], rows * frames.shape[2], cols * frames.shape[3]).cpu()


__all__ = ["XLModel", "contact_sheet", "train_t_klvae", "train_xl", "add_arguments", "run", "load_mtd_xl",
           "save_mtd_xl", "read_video", "load_videos", "xl_batch", "level_stride", "frames_for"]
