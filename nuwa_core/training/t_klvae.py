"""The `t_klvae` stage (NUWA-XL): fine-tune (--init SD_VAE_FILE) or train from scratch
(--preset tiny|tiny_f8|sd) the temporal KL-VAE on video clips: L1 reconstruction + a small KL term
(--kl-weight, 0 = off); the latent scale is measured (1/std of the posterior means) or kept.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn

from ..xl.model import save_png
from ..xl.t_klvae import TKLVAE, TKLVAEConfig, load_t_klvae, save_t_klvae
from .data import load_videos, parse_size, random_clips
from .loop import Dist, Run, TrainingError, dtype_named, set_lr

DEFAULT_LR = 1e-4


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
        set_lr(opt, args.lr, step, args.warmup, run.lr_total())
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
        # the clip length it learnt on: the default temporal window when encoding / decoding long videos
        vae.config = dataclasses.replace(vae.config, clip_frames=args.clip_frames)
        scale = args.latent_scale
        if scale == "auto" or (scale == "" and not args.init):
            vae.config = dataclasses.replace(vae.config, latent_scale=measure_latent_scale(vae, sample_in))
        elif scale not in ("", "keep"):
            vae.config = dataclasses.replace(vae.config, latent_scale=float(scale))
        save_t_klvae(vae, run.out, dtype=dtype_named(args.save_dtype))
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


def add_arguments(p) -> None:
    p.add_argument("--preset", default="sd", help="tiny (f2, tests) | tiny_f8 | sd (used without --init)")
    p.add_argument("--init", default=None, help="start from this SD 1.x VAE or T-KLVAE file")
    p.add_argument("--clip-frames", type=int, default=4, help="frames per training clip")
    p.add_argument("--clip-stride", type=int, default=1, help="video frames between clip frames")
    p.add_argument("--kl-weight", type=float, default=1e-4, help="weight of the KL term (0: off)")
    p.add_argument("--flip", action="store_true", help="random horizontal flips")
    p.add_argument("--latent-scale", default="", help="auto (1/std of the latents; the default from scratch), "
                   "keep (the default with --init) or a number")


def run(args) -> dict:
    if args.lr is None:
        args.lr = DEFAULT_LR
    return train_t_klvae(args)
