"""The `t_klvae` stage (NUWA-XL): fine-tune (--init SD_VAE_FILE) or train from scratch
(--preset tiny|tiny_f8|sd) the temporal KL-VAE on video clips.

The objective (`--objective ldm`, the default) is the image KL-VAE's, as the paper says (section 3.1):
Latent Diffusion's (vae_loss.py), every frame one image: L1 (+ LPIPS from a local file, `--lpips`)
summed over pixels / frames, KL summed over latent elements / frames with weight 1e-6, and a PatchGAN
discriminator (vqgan.PatchDiscriminator, hinge loss) whose generator term is weighted adaptively from
the decoder's last layer, from step --disc-start on. `--objective l1` is the stage's earlier
objective, mean L1 + --kl-weight (1e-4) x mean KL, which the shipped T-KLVAE was trained with.

After training the std of the posterior means of a few batches of the training clips is measured
and printed; the latent scale stored with the model (config.latent_scale, used by every NUWA-XL
path) is 1/std (--latent-scale auto, the default from scratch), kept (the default with --init) or
a given number.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import torch
from torch import nn

from ..xl.model import save_png
from ..xl.t_klvae import TKLVAE, TKLVAEConfig, load_t_klvae, save_t_klvae
from . import vae_loss
from .arguments import lpips_arguments
from .data import load_videos, parse_size, random_clips
from .loop import Dist, Run, TrainingError, dtype_named, set_lr
from .perceptual_loss import lpips_for_run
from .vqgan import PatchDiscriminator

DEFAULT_LR = 1e-4
KL_WEIGHT = {"ldm": 1e-6, "l1": 1e-4}  # --kl-weight's default per --objective
SCALE_BATCHES = 4  # batches of training clips the latent std is measured on


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
        f = video.shape[1]
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
def latent_std(vae: TKLVAE, clips: torch.Tensor) -> float:
    """The std of the posterior means of clips [N, F, 3, H, W] over every element (LDM measured SD's
    0.18215 as 1 / this on a batch; the XL stage trains on posterior mean x latent_scale)."""
    was = vae.training
    vae.eval()
    z = torch.cat([vae.encode(c[None].to(next(vae.parameters()).device)) for c in clips])
    vae.train(was)
    return float(z.float().std().clamp_min(1e-6))


def measure_latent_scale(vae: TKLVAE, clips: torch.Tensor) -> float:
    """1 / latent_std."""
    return 1.0 / latent_std(vae, clips)


def t_klvae_config_dict(args, cfg: TKLVAEConfig) -> dict:
    d = {"stage": "t_klvae", "preset": args.preset, "init": args.init or "", "size": args.size,
         "clip_frames": args.clip_frames, "clip_stride": args.clip_stride, "frame_step": args.frame_step,
         "batch": args.batch, "lr": args.lr, "kl_weight": args.kl_weight, "seed": args.seed,
         "flip": args.flip, "world": int(os.environ.get("WORLD_SIZE", "1")),
         "model": dataclasses.asdict(cfg)}
    if args.objective != "l1":  # only then, so checkpoints of the earlier objective still resume with --objective l1
        d.update(objective=args.objective, disc_start=args.disc_start, disc_weight=args.disc_weight,
                 **({"lpips": Path(args.lpips).name, "lpips_weight": args.lpips_weight} if args.lpips else {}))
    return d


def train_t_klvae(args) -> dict:
    if args.kl_weight is None:
        args.kl_weight = KL_WEIGHT[args.objective]
    if args.objective == "l1" and args.lpips:
        raise TrainingError("--lpips belongs to --objective ldm (the image VAE's objective); --objective l1 is "
                            "L1 + KL only")
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
    modules, optims = {"t_klvae": vae}, {"t_klvae": opt}
    ldm = args.objective == "ldm"
    perceptual = disc = opt_d = disc_ddp = None
    if ldm:
        perceptual = lpips_for_run(args, dist.device, side=min(size))
        if perceptual is None and dist.main:
            print("[train] t_klvae: no --lpips file: the perceptual term of the objective is off", file=sys.stderr)
        disc = PatchDiscriminator(n_layers=3 if min(size) >= 32 else 2).to(dist.device).train()  # 4x4 convs need >= 2 px
        opt_d = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=(0.5, 0.9))
        modules["disc"], optims["disc"] = disc, opt_d
    data_gen = torch.Generator().manual_seed(args.seed + 1000 * dist.rank)
    run = Run("t_klvae", args, dist, modules, optims, t_klvae_config_dict(args, cfg), data_gen)
    step = int(run.resume()["step"]) if args.resume else 0
    ddp = dist.wrap(step_module)
    if ldm:
        disc_ddp = dist.wrap(disc)
    sample_in = random_clips(videos, 2, args.clip_frames, args.clip_stride, torch.Generator().manual_seed(123))

    def one_step(step, check):
        x = random_clips(videos, args.batch, args.clip_frames, args.clip_stride, data_gen, args.flip)
        zshape = (x.shape[0] * x.shape[1], cfg.z_channels, size[1] // f, size[0] // f)
        noise = torch.randn(zshape, generator=data_gen)
        x, noise = x.to(dist.device), noise.to(dist.device)
        set_lr(opt, args.lr, step, args.warmup, run.lr_total())
        if ldm:
            set_lr(opt_d, args.lr, step, args.warmup, run.lr_total())
            return ldm_step(step, check, x, *ddp(x, noise))
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

    def ldm_step(step, check, x, rec, mean, logvar):
        xf, rf = x.flatten(0, 1), rec.flatten(0, 1)  # every frame one image
        p_loss = perceptual(rf, xf) if perceptual is not None else None
        nll = vae_loss.nll_loss(xf, rf, p_loss, args.lpips_weight)
        kl = vae_loss.kl_loss(mean, logvar) if logvar is not None else torch.zeros((), device=x.device)
        loss = nll + args.kl_weight * kl
        use_disc = vae_loss.disc_active(step, args.disc_start)
        g_adv = d_weight = d_loss = torch.zeros(())
        if use_disc:
            disc.requires_grad_(False)
            g_adv = -(disc_ddp(rf) if not dist.enabled else disc(rf)).mean()
            disc.requires_grad_(True)
            d_weight = vae_loss.adaptive_weight(nll, g_adv, vae.decoder.conv_out.weight, args.disc_weight)
            loss = loss + d_weight * g_adv
        check(loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if use_disc:
            logits = disc_ddp(torch.cat([xf, rf.detach()]))  # one pass: DDP allows one forward per backward
            d_loss = vae_loss.hinge_d_loss(logits[:len(xf)], logits[len(xf):])
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
        return {"loss": loss.item(), "l1": (rf - xf).abs().mean().item(), "kl": kl.item(), "nll": nll.item(),
                "lpips": p_loss.mean().item() if p_loss is not None else 0.0, "g_adv": g_adv.item(),
                "d_weight": float(d_weight), "d_loss": d_loss.item()}

    fields = ["step", "time", "loss", "l1", "kl"]
    if ldm:
        fields += ["nll", "g_adv", "d_weight", "d_loss"] + (["lpips"] if perceptual is not None else [])
    step, stopped, stats = run.loop(step, one_step, fields,
                                    postfix=lambda st, _: {"l1": f"{st['l1']:.4f}", "kl": f"{st['kl']:.3f}"},
                                    sample=lambda path: _vae_samples(vae, sample_in, path))
    if dist.main:
        # the clip length it learnt on: the default temporal window when encoding / decoding long videos
        vae.config = dataclasses.replace(vae.config, clip_frames=args.clip_frames)
        # the latent std on a few batches of training clips (its own generator: the run's data order is untouched)
        scale_gen = torch.Generator().manual_seed(args.seed + 7919)
        clips = torch.cat([random_clips(videos, args.batch, args.clip_frames, args.clip_stride, scale_gen)
                           for _ in range(SCALE_BATCHES)])
        std = latent_std(vae, clips)
        scale = args.latent_scale
        if scale == "auto" or (scale == "" and not args.init):
            vae.config = dataclasses.replace(vae.config, latent_scale=1.0 / std)
        elif scale not in ("", "keep"):
            vae.config = dataclasses.replace(vae.config, latent_scale=float(scale))
        kept = vae.config.latent_scale
        print(f"[train] t_klvae: latent std {std:.5g} (posterior means of {len(clips)} training clips), 1/std "
              f"{1.0 / std:.5g}; stored latent_scale {kept:.5g}" + ("" if abs(kept * std - 1.0) <= 0.1 else
              f": the scaled latents' std is {kept * std:.3g}, not 1 (--latent-scale auto stores 1/std)"),
              file=sys.stderr)
        save_t_klvae(vae, run.out, dtype=dtype_named(args.save_dtype))
        print(f"[train] t_klvae: stopped ({stopped}) at step {step}; latent_scale {vae.config.latent_scale:.5g}; "
              f"wrote {run.out}", file=sys.stderr)
    else:
        std = float("nan")
    run.finish()
    return {"step": step, "stopped": stopped, "fps": fps, "latent_scale": vae.config.latent_scale,
            "latent_std": std, **stats}


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
    p.add_argument("--objective", choices=("ldm", "l1"), default="ldm",
                   help="ldm: the image KL-VAE's (Latent Diffusion's) objective, L1 (+ LPIPS with --lpips) and KL "
                   "summed per frame, a PatchGAN from --disc-start with an adaptive weight; l1: mean L1 + "
                   "--kl-weight x mean KL (the stage's earlier objective; the shipped T-KLVAE's)")
    p.add_argument("--kl-weight", type=float, default=None,
                   help="weight of the KL term (0: off; default 1e-6 with --objective ldm, 1e-4 with l1)")
    p.add_argument("--disc-start", type=int, default=50001, help="--objective ldm: the step the discriminator "
                   "starts at (SD's kl-f8: 50001; lower it for short runs)")
    p.add_argument("--disc-weight", type=float, default=0.5, help="--objective ldm: factor on the adaptive "
                   "adversarial weight (SD's kl-f8: 0.5)")
    lpips_arguments(p)
    p.add_argument("--flip", action="store_true", help="random horizontal flips")
    p.add_argument("--latent-scale", default="", help="auto (1/std of the latents; the default from scratch), "
                   "keep (the default with --init) or a number")


def run(args) -> dict:
    if args.lr is None:
        args.lr = DEFAULT_LR
    return train_t_klvae(args)
