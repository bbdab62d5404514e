"""The `vqgan` stage: train or fine-tune the tokenizer.

L1 (+ LPIPS from a local file, `--lpips`) + codebook/commitment loss, and a small PatchGAN
discriminator (hinge loss) switched on after --disc-start steps. `--train decoder` fine-tunes only
the decoder, so the tokens (and renderers trained on them) stay valid; the `bundle` stage then swaps
such a decoder into a trained model.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..images import model_to_image, save_image
from ..infinity.vqgan import VQModel, get_config, load_vqgan, save_vqgan
from .arguments import lpips_arguments
from .data import Augment, fixed_crops, load_images, parse_box, random_crops
from .loop import Dist, Run, TrainingError, dtype_named, dump_replica, set_lr
from .perceptual_loss import lpips_for_run

DEFAULT_LR = 2e-4


class PatchDiscriminator(nn.Module):
    """A small PatchGAN (pix2pix NLayerDiscriminator layout, GroupNorm instead of BatchNorm so
    the batch composition does not change its output)."""

    def __init__(self, ch: int = 32, n_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(3, ch, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = ch
        for i in range(1, n_layers):
            c_out = min(ch * 2 ** i, ch * 8)
            layers += [nn.Conv2d(c, c_out, 4, 2, 1), nn.GroupNorm(8, c_out), nn.LeakyReLU(0.2)]
            c = c_out
        layers += [nn.Conv2d(c, c, 4, 1, 1), nn.GroupNorm(8, c), nn.LeakyReLU(0.2), nn.Conv2d(c, 1, 4, 1, 1)]
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, x):
        return self.net(x)


@torch.no_grad()
def _restart_dead_codes(vq: VQModel, usage: torch.Tensor, z: torch.Tensor, gen: torch.Generator) -> int:
    """Codes unused since the last restart take the value of random encoder outputs (CPU-budget trick
    against codebook collapse). z: [N, C] encoder outputs of the current batch."""
    dead = torch.nonzero(usage == 0).flatten()
    if len(dead) == 0 or len(z) == 0:
        return 0
    pick = torch.randint(len(z), (len(dead),), generator=gen)
    noise = 0.01 * z.std() * torch.randn(len(dead), z.shape[1], generator=gen)
    vq.quantize.embedding.weight.data[dead] = (z[pick].cpu() + noise).to(vq.quantize.embedding.weight)
    return len(dead)


def vqgan_config_dict(args) -> dict:
    return {"stage": "vqgan", "preset": args.preset, "crop": args.crop, "batch": args.batch, "lr": args.lr,
            "disc_start": args.disc_start, "disc_weight": args.disc_weight, "one_shot": args.one_shot,
            "downscale": args.downscale, "seed": args.seed, "restart_every": args.restart_every,
            "world": int(os.environ.get("WORLD_SIZE", "1")), "init": args.init or "", "train": args.train,
            # each only where it changes what ran before it existed, so older checkpoints still resume
            **({"crop_scale": args.crop_scale} if args.one_shot and args.crop_scale != "image" else {}),
            **({"lpips": Path(args.lpips).name, "lpips_weight": args.lpips_weight} if args.lpips else {}),
            **({"lowres_weight": args.lowres_weight} if args.lowres_weight else {}),
            **({"shift_weight": args.shift_weight} if args.shift_weight else {})}


def train_vqgan(args, images: list[torch.Tensor] | None = None, keep_out: list[torch.Tensor | None] | None = None,
                monitor=None) -> dict:
    """The stage on --images, or on `images` ([3, H, W] in -1..1) with `keep_out` masks (> 0: never
    in a crop) when a caller holds them (one_shot.py); `monitor`: see loop.Run."""
    dist = Dist(getattr(args, "device", None))
    torch.manual_seed(args.seed)
    f = get_config(args.preset).downsample_factor
    if args.crop % f:
        raise TrainingError(f"--crop {args.crop} must be a multiple of the preset's downsample factor {f}")
    if images is None:
        images = load_images(args.images, args.downscale, (args.crop, args.crop), parse_box(args.train_box))
    cfg = get_config(args.preset)
    if args.init:
        vq = load_vqgan(args.init).float()
        cfg = vq.config
    elif args.train == "decoder":
        raise TrainingError("--train decoder fine-tunes the decoder of an existing tokenizer: give that "
                            "tokenizer with --init")
    else:
        vq = VQModel(cfg)
    if args.train == "decoder":  # tokens stay exactly as they were: renderers trained on them stay valid
        for part in (vq.encoder, vq.quant_conv, vq.quantize):
            part.requires_grad_(False)
        args.restart_every = 0
    if args.shift_weight and dist.enabled:
        raise TrainingError("--shift-weight runs in one process only (its second encoder pass bypasses the "
                            "distributed wrapper); run without torchrun or without --shift-weight")
    perceptual = lpips_for_run(args, dist.device)
    token_px = cfg.downsample_factor
    disc = PatchDiscriminator(n_layers=3 if args.crop >= 32 else 2)  # its 4x4 convs need >= 2 px at the end
    vq.to(dist.device).train()
    disc.to(dist.device).train()
    opt_g = torch.optim.Adam([p for p in vq.parameters() if p.requires_grad], lr=args.lr, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=(0.5, 0.9))
    data_gen = torch.Generator().manual_seed(args.seed + 1000 * dist.rank)
    run = Run("vqgan", args, dist, {"vqgan": vq, "disc": disc}, {"vqgan": opt_g, "disc": opt_d},
              vqgan_config_dict(args), data_gen, monitor)
    step, usage = 0, torch.zeros(cfg.n_embed, dtype=torch.long)
    if args.resume:
        st = run.resume()
        step, usage = int(st["step"]), st["usage"]
    vq_ddp, disc_ddp = dist.wrap(vq), dist.wrap(disc)
    if args.one_shot:
        aug = Augment() if args.crop_scale == "image" else Augment(scale=(0.8, 1.25), scale_of="crop")
    else:
        aug = Augment(scale=(0.8, 1.0), rotate_deg=0.0, shear=0.0, noise=0.0)
    sample_in = fixed_crops(images, 4, (args.crop, args.crop))
    run.preview = lambda: _vq_sample_image(vq, sample_in)

    def one_step(step, check):
        margin = token_px if args.shift_weight else 0  # room for the shifted copy
        x = random_crops(images, args.batch, (args.crop + margin, args.crop + margin), data_gen, aug,
                         keep_out).to(dist.device)
        set_lr(opt_g, args.lr, step, args.warmup, run.lr_total())
        set_lr(opt_d, args.lr, step, args.warmup, run.lr_total())
        if args.shift_weight:
            x, shifted, offsets = shifted_pairs(x, args.crop, token_px, data_gen)
        restarted = 0
        # at the start of the step after every restart_every-th, not at the end of that one: a run that
        # ends there ships no code its decoder never trained with, and one stopped there and resumed
        # (usage is in the checkpoint) restarts exactly as one run does, whatever --steps says
        if args.restart_every and step and step % args.restart_every == 0:
            with torch.no_grad():
                z = vq.quant_conv(vq.encoder(x)).permute(0, 2, 3, 1).reshape(-1, cfg.embed_dim)
            if dist.enabled:  # identical restarts on every rank: use rank 0's batch
                import torch.distributed as td
                td.broadcast(z, 0)
                td.all_reduce(usage)
            restarted = _restart_dead_codes(vq, usage, z, data_gen if not dist.enabled else
                                            torch.Generator().manual_seed(args.seed + step))
            usage.zero_()
        shift = torch.zeros(())
        if args.shift_weight:
            z, z_shifted = vq.quant_conv(vq.encoder(torch.cat([x, shifted]))).chunk(2)
            shift = shift_equivariance_loss(z, z_shifted, offsets / token_px)
            z_q, q_loss, ids = vq.quantize(z)
            rec = vq.decode(z_q)
        else:
            rec, q_loss, ids = vq_ddp(x)
        l1 = (rec - x).abs().mean()
        lpips = perceptual(rec, x).mean() if perceptual is not None else torch.zeros(())
        # each token's mean colour: the layout a renderer composes from tokens (L1 alone lets it drift)
        lowres = (F.mse_loss(F.avg_pool2d(rec, token_px), F.avg_pool2d(x, token_px)) if args.lowres_weight
                  else torch.zeros(()))
        loss = l1 + args.lpips_weight * lpips + args.lowres_weight * lowres + args.shift_weight * shift + q_loss
        use_disc = step >= args.disc_start
        g_adv = torch.zeros(())
        if use_disc:
            for p in disc.parameters():
                p.requires_grad_(False)
            g_adv = -disc_ddp(rec).mean() if not dist.enabled else -disc(rec).mean()
            loss = loss + args.disc_weight * g_adv
            for p in disc.parameters():
                p.requires_grad_(True)
        check(loss)
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        d_loss = torch.zeros(())
        if use_disc:
            logits = disc_ddp(torch.cat([x, rec.detach()]))  # one pass: DDP allows one forward per backward
            real, fake = logits[:len(x)], logits[len(x):]
            d_loss = 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
        usage.add_(torch.bincount(ids.flatten().cpu(), minlength=cfg.n_embed))
        return {"loss": loss.item(), "l1": l1.item(), "lpips": lpips.item(), "lowres": lowres.item(),
                "codebook": q_loss.item(), "shift": shift.item(), "g_adv": g_adv.item(), "d_loss": d_loss.item(),
                "codes_used": int((usage > 0).sum()), "restarted": restarted}

    def postfix(st, steps_per_s):
        return {"l1": f"{st['l1']:.4f}", "cb": f"{st['codebook']:.4f}", "d": f"{st['d_loss']:.3f}",
                "ips": f"{args.batch * dist.world * steps_per_s:.1f}"}

    fields = ["step", "time", "loss", "l1", "codebook", "g_adv", "d_loss", "codes_used", "restarted"]
    fields += ["lpips"] if perceptual is not None else []
    fields += ["lowres"] if args.lowres_weight else []
    fields += ["shift"] if args.shift_weight else []
    step, stopped, stats = run.loop(step, one_step, fields, postfix=postfix,
                                    sample=lambda path: save_image(run.preview(), path),
                                    extra=lambda: {"usage": usage.clone()})
    if args.debug_dump_replicas:
        dump_replica(run.out, vq, dist)
    if dist.main:
        save_vqgan(vq, run.out, dtype=dtype_named(args.save_dtype))
        print(f"[train] vqgan: stopped ({stopped}) at step {step}; wrote {run.out} and its training checkpoint",
              file=sys.stderr)
    run.finish()
    return {"step": step, "stopped": stopped, **stats}


def shifted_pairs(x: torch.Tensor, crop: int, f: int, gen: torch.Generator):
    """Crops x [B, 3, crop + f, crop + f] -> (their top-left crop x [B, 3, crop, crop], the same crop moved
    by a random 1..f-1 px down and right, offsets [B, 2] px (dy, dx))."""
    offsets = torch.randint(0, f, (len(x), 2), generator=gen)
    offsets[offsets.sum(1) == 0, 1] = 1  # a zero shift teaches nothing
    shifted = torch.stack([img[:, dy:dy + crop, dx:dx + crop] for img, (dy, dx) in zip(x, offsets.tolist())])
    return x[..., :crop, :crop], shifted, offsets.to(x.device, torch.float32)


def shift_equivariance_loss(z: torch.Tensor, z_shifted: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """How far the encoder is from moving with its input: latents [B, C, h, w] of a crop and of the same
    crop moved by `offsets` [B, 2] tokens (fractions of a token, dy and dx): the moved crop's latent at
    (i, j) against the crop's latent bilinearly read at (i + dy, j + dx), over the (h - 1) x (w - 1) tokens
    both cover; squared error relative to the latents' variance, so shrinking them does not pay.
    A tokenizer whose latents jump between neighbouring positions re-spells a picture moved by one
    pixel (the shipped small_f8: 77% of its tokens), and a renderer cannot learn from shifted crops."""
    h, w = z.shape[-2:]
    ys = torch.arange(h - 1, device=z.device, dtype=z.dtype)
    xs = torch.arange(w - 1, device=z.device, dtype=z.dtype)
    py = ys[None, :, None] + offsets[:, 0, None, None]  # [B, h-1, 1] positions in z's token grid
    px = xs[None, None, :] + offsets[:, 1, None, None]  # [B, 1, w-1]
    grid = torch.stack(torch.broadcast_tensors(2 * px / (w - 1) - 1, 2 * py / (h - 1) - 1), dim=-1)
    target = F.grid_sample(z, grid, mode="bilinear", align_corners=True)  # [B, C, h-1, w-1]
    return F.mse_loss(z_shifted[..., :h - 1, :w - 1], target) / (z.var() + 1e-6)


@torch.no_grad()
def _vq_sample_image(vq: VQModel, x: torch.Tensor) -> torch.Tensor:
    """The crops x [n, 3, h, w] over their reconstructions, as one IMAGE [1, 2h, n w, 3]."""
    was = vq.training
    vq.eval()
    rec = vq(x.to(vq.quant_conv.weight.device))[0].cpu()
    vq.train(was)
    grid = torch.cat([torch.cat(list(x), dim=2), torch.cat(list(rec), dim=2)], dim=1)  # [3, 2h, n*w]
    return model_to_image(grid[None])


def add_arguments(p) -> None:
    p.add_argument("--preset", default="small_f8")
    p.add_argument("--init", default=None, help="start from this VQGAN file (fine-tuning)")
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--train", choices=("all", "decoder"), default="all",
                   help="decoder: fine-tune only the decoder of the --init tokenizer (its encoder and codebook, "
                   "hence its tokens, stay fixed; no code restarts), e.g. to sharpen it with the discriminator "
                   "without retraining the renderers that use it")
    p.add_argument("--disc-start", type=int, default=2000)
    p.add_argument("--disc-weight", type=float, default=0.1)
    p.add_argument("--restart-every", type=int, default=100, help="re-seed unused codes every N steps (0: off)")
    p.add_argument("--crop-scale", choices=("native", "image"), default="native",
                   help="with --one-shot, the size of a crop's source window: native (default): 0.8-1.25 of the "
                   "crop itself, the image at about its own resolution, as a canvas encodes it; image: 0.6-1 of "
                   "the largest window that fits the image (appendix D's random resized crop: a large image is "
                   "seen shrunk several times, and its tokens at full size come out blurred and off colour)")
    p.add_argument("--lowres-weight", type=float, default=0.0,
                   help="add this times the squared error of each token's mean colour (f x f px block means of "
                   "the reconstruction against the input): keeps the layout a renderer composes from tokens")
    p.add_argument("--shift-weight", type=float, default=0.0,
                   help="add this times a shift-equivariance loss: the latents of a crop moved by 1-7 px must be "
                   "the crop's latents read between tokens, so a picture moved by a pixel keeps most of its "
                   "tokens (one process only)")
    lpips_arguments(p)


def run(args) -> dict:
    if args.lr is None:
        args.lr = DEFAULT_LR
    return train_vqgan(args)
