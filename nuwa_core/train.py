"""Training entry points: `python -m nuwa_core.train vqgan|renderer|bundle|sample|t_klvae|xl ...`.

    vqgan     trains / fine-tunes the tokenizer: L1 (+ LPIPS from a local file, `--lpips`) +
              codebook/commitment loss, a small PatchGAN discriminator (hinge loss) switched on
              after --disc-start steps. `--train decoder` fine-tunes only the decoder, so the
              tokens (and renderers trained on them) stay valid.
    bundle    puts such a fine-tuned decoder into a trained bundle (checks the tokens match).
    renderer  the render-and-optimize strategy (render-and-optimize paper, Algorithm 1): every
              training sample is split into patches in a random one of the four ADC orders; each
              patch is rendered teacher-forced from the Nearby Context Pool, its loss optimized at
              once (`--accumulate`: one step per sample instead), and its detached cache added to
              the pool for the patches after it. Captions (`--clip` or `--text-embeddings`, see
              captions.py) feed the cross-attention, dropped with probability --text-drop.

One-shot mode (`--one-shot`, NUWA-Infinity appendix D) draws random crops from one large image
with RandomResizedCrop, horizontal flip, mirror (reflection at the borders), small rotation and
shear, noise and colour jitter, implemented with torch only, all from one seeded generator.

Checkpointing (every stage, through `Run`): `OUT.train.safetensors` holds the fp32 weights of
everything being trained (and the discriminator), `OUT.train.pt` the step, optimizer, RNG and
data-generator state (plain tensors and dicts, readable with weights_only=True); both are written atomically.
`--resume` continues exactly. SIGINT/SIGTERM and `--max-minutes` save before stopping; a NaN
loss stops without overwriting the last good checkpoint. `OUT` itself is the shipped model
(`--save-dtype`, fp16 by default). Data position = the data generator's state: samples are drawn
from it, so restoring it continues the same sample sequence.

Distributed: under `torchrun --nproc_per_node=N` each process draws its own samples (seed + rank)
and gradients are averaged by DistributedDataParallel (gloo on CPU, nccl on CUDA).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import arbitrary_direction_controller as adc
from .checkpoint import CheckpointError, atomic_write, load_state_dict, save_model_file, stored_dtype
from .images import image_to_model, load_image, model_to_image, save_image
from .nearby_context_pool import NearbyContextPool, last_needed_steps
from .renderer import Context, Renderer, RendererConfig
from .vqgan import VQModel, get_config, load_vqgan, save_vqgan

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


class TrainingError(ValueError):
    """Bad training input or a run that cannot continue; the message says what and why."""


class TrainingDiverged(TrainingError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


# =============================================================================================
# Data

def list_images(spec: str) -> list[Path]:
    path = Path(spec)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise TrainingError(f"--images {spec}: no such file or folder")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise TrainingError(f"--images {spec}: the folder holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def load_images(spec: str, downscale: int = 1, min_size: tuple[int, int] = (1, 1)) -> list[torch.Tensor]:
    """Files -> list of [3, H, W] in -1..1 (RGBA composited over white), each checked for size."""
    out = []
    for path in list_images(spec):
        try:
            image = load_image(path)  # [1, H, W, 3]
        except ValueError as err:
            raise TrainingError(f"unreadable training image {path}: {err}") from err
        x = image_to_model(image)  # [1, 3, H, W]
        if downscale > 1:
            h, w = x.shape[-2] // downscale, x.shape[-1] // downscale
            if h < 1 or w < 1:
                raise TrainingError(f"{path} is too small to downscale by {downscale}")
            x = F.interpolate(x, size=(h, w), mode="area")
        h, w = x.shape[-2:]
        if h < min_size[0] or w < min_size[1]:
            raise TrainingError(f"training image {path} is {w}x{h} px (after --downscale {downscale}), smaller than "
                                f"one training crop of {min_size[1]}x{min_size[0]} px; use larger images or a "
                                f"smaller --crop/--patch")
        out.append(x[0].clamp(-1, 1))
    return out


def _uniform(gen, lo, hi, n=None):
    if n is None:
        return lo + (hi - lo) * torch.rand((), generator=gen).item()
    return lo + (hi - lo) * torch.rand(n, generator=gen)


@dataclasses.dataclass
class Augment:
    """Appendix D's augmentations (probabilities / magnitudes). Zero disables one."""
    scale: tuple = (0.6, 1.0)      # RandomResizedCrop: side of the source window / the largest that fits
    ratio_jitter: float = 0.15     # log aspect-ratio jitter of the source window
    hflip: float = 0.5
    vflip: float = 0.0             # off by default: skies do not belong under seas
    rotate_deg: float = 4.0        # on a square window; a long strip is tilted so its ends move as far
    shear: float = 0.08
    noise: float = 0.02            # std in -1..1 units
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1

    @classmethod
    def off(cls) -> "Augment":
        return cls(scale=(1.0, 1.0), ratio_jitter=0.0, hflip=0.0, vflip=0.0, rotate_deg=0.0, shear=0.0, noise=0.0,
                   brightness=0.0, contrast=0.0, saturation=0.0)


def random_crops(images: list[torch.Tensor], n: int, size: tuple[int, int], gen: torch.Generator,
                 aug: Augment) -> torch.Tensor:
    """n crops of size (h, w) px, [n, 3, h, w] in -1..1, drawn with `gen` only."""
    return random_crops_with_sources(images, n, size, gen, aug)[0]


def random_crops_with_sources(images: list[torch.Tensor], n: int, size: tuple[int, int], gen: torch.Generator,
                              aug: Augment) -> tuple[torch.Tensor, list[int]]:
    """random_crops, and the index of the image each crop came from.

    Each crop samples a source window (random resized crop), maps it through a small rotation and
    shear with reflection at the borders (the mirror augmentation), flips, then colour jitter and noise.
    """
    out_h, out_w = size
    crops, sources = [], []
    for _ in range(n):
        sources.append(int(torch.randint(len(images), (1,), generator=gen)))
        img = images[sources[-1]]
        H, W = img.shape[-2:]
        fit = min(H / out_h, W / out_w)  # largest window of the output aspect that fits
        s = _uniform(gen, *aug.scale) * fit
        r = math.exp(_uniform(gen, -aug.ratio_jitter, aug.ratio_jitter)) if aug.ratio_jitter else 1.0
        win_h, win_w = min(H, out_h * s / math.sqrt(r)), min(W, out_w * s * math.sqrt(r))
        cy = _uniform(gen, win_h / 2, H - win_h / 2)
        cx = _uniform(gen, win_w / 2, W - win_w / 2)
        ang = math.radians(_uniform(gen, -aug.rotate_deg, aug.rotate_deg)) if aug.rotate_deg else 0.0
        # the angle is meant for a square window: on a long strip the same angle would move its ends by
        # tan(ang) * long / 2 (a horizon tilting out of a 1024x128 panorama), so the far end moves as far
        # as it would on a square of the short side
        ang = math.atan(math.tan(ang) * min(win_h, win_w) / max(win_h, win_w))
        sh = _uniform(gen, -aug.shear, aug.shear) if aug.shear else 0.0
        fx = -1.0 if torch.rand((), generator=gen).item() < aug.hflip else 1.0
        fy = -1.0 if torch.rand((), generator=gen).item() < aug.vflip else 1.0
        # output normalized coords (u, v) in -1..1 -> source pixel offsets from the window centre
        rot = torch.tensor([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
        a = rot @ torch.tensor([[1.0, sh], [0.0, 1.0]]) @ torch.diag(torch.tensor([fx * win_w / 2, fy * win_h / 2]))
        # to the source's normalized coords (align_corners=False: x_norm = (2 px + 1) / W - 1, px continuous)
        scale = torch.tensor([2.0 / W, 2.0 / H])
        theta = torch.zeros(1, 2, 3)
        theta[0, :, :2] = scale[:, None] * a
        theta[0, :, 2] = torch.tensor([2.0 * cx / W - 1.0, 2.0 * cy / H - 1.0])
        grid = F.affine_grid(theta, (1, 3, out_h, out_w), align_corners=False)
        x = F.grid_sample(img[None], grid, mode="bilinear", padding_mode="reflection", align_corners=False)[0]
        if aug.brightness or aug.contrast or aug.saturation:
            x = (x + 1) / 2
            x = x * _uniform(gen, 1 - aug.brightness, 1 + aug.brightness)
            mean = x.mean()
            x = (x - mean) * _uniform(gen, 1 - aug.contrast, 1 + aug.contrast) + mean
            gray = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]
            x = (x - gray) * _uniform(gen, 1 - aug.saturation, 1 + aug.saturation) + gray
            x = x.clamp(0, 1) * 2 - 1
        if aug.noise:
            x = x + aug.noise * torch.randn(x.shape, generator=gen)
        crops.append(x.clamp(-1, 1))
    return torch.stack(crops), sources


def fixed_crops(images: list[torch.Tensor], n: int, size: tuple[int, int]) -> torch.Tensor:
    """Deterministic crops (no augmentation) for samples and evaluation: evenly spaced along the width."""
    h, w = size
    out = []
    for t in range(n):
        img = images[t % len(images)]
        H, W = img.shape[-2:]
        top = (H - h) // 2
        left = int(round((W - w) * (t / max(1, n - 1)))) if n > 1 else (W - w) // 2
        out.append(img[:, top:top + h, left:left + w])
    return torch.stack(out)


# =============================================================================================
# Distributed

class Dist:
    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        self.device = torch.device("cpu")
        if self.enabled:
            import torch.distributed as td
            if torch.cuda.is_available():
                self.device = torch.device("cuda", self.local_rank)
                torch.cuda.set_device(self.device)
            if not td.is_initialized():
                td.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        elif torch.cuda.is_available():
            self.device = torch.device("cuda")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, module: nn.Module, find_unused_parameters: bool = False) -> nn.Module:
        if not self.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                   broadcast_buffers=False, find_unused_parameters=find_unused_parameters)

    def barrier(self):
        if self.enabled:
            import torch.distributed as td
            td.barrier()

    def any_flag(self, flag: bool) -> bool:
        """True on every rank when any rank raised the flag (stop requests, NaN)."""
        if not self.enabled:
            return flag
        import torch.distributed as td
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        td.all_reduce(t)
        return bool(t.item() > 0)

    def close(self):
        if self.enabled:
            import torch.distributed as td
            if td.is_initialized():
                td.destroy_process_group()


# =============================================================================================
# Checkpoints and run plumbing

def train_paths(out: Path) -> tuple[Path, Path]:
    return out.with_name(out.name + ".train.safetensors"), out.with_name(out.name + ".train.pt")


def rank_state_path(out: Path, rank: int) -> Path:
    return out.with_name(out.name + f".train.rank{rank}.pt")


def save_training(out: Path, modules: dict[str, nn.Module], state: dict, dist: Dist, data_gen: torch.Generator):
    """Weights (fp32 safetensors) and the state file; data RNG per rank."""
    if dist.enabled:  # every rank keeps its own data position
        rank_state = {"data_rng": data_gen.get_state()}
        atomic_write(rank_state_path(out, dist.rank), lambda tmp: torch.save(rank_state, tmp))
    if not dist.main:
        return
    weights, state_file = train_paths(out)
    tensors = {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}
    save_model_file(weights, tensors, "training_checkpoint", extra_metadata={"step": str(state["step"])})
    full = dict(state)
    full["data_rng"] = data_gen.get_state()
    full["torch_rng"] = torch.get_rng_state()
    atomic_write(state_file, lambda tmp: torch.save(full, tmp))


def load_training(out: Path, modules: dict[str, nn.Module], config: dict, dist: Dist) -> dict:
    weights, state_file = train_paths(out)
    if not weights.is_file() or not state_file.is_file():
        raise TrainingError(f"--resume: no training checkpoint next to {out} (expected {weights.name} and "
                            f"{state_file.name}); start without --resume")
    state = torch.load(state_file, map_location="cpu", weights_only=True)
    saved, config = _flat(json.loads(state["config"])), _flat(json.loads(json.dumps(config, sort_keys=True)))
    diff = sorted(k for k in set(saved) | set(config) if saved.get(k, "<absent>") != config.get(k, "<absent>"))
    if diff:
        detail = "; ".join(f"{k}: checkpoint {saved.get(k, '<absent>')!r} vs now {config.get(k, '<absent>')!r}"
                           for k in diff)
        raise TrainingError(f"--resume: the checkpoint {state_file.name} was trained with another configuration "
                            f"({detail}); use the same settings or start a new run")
    tensors, _ = load_state_dict(weights)
    from .checkpoint import load_strict
    for name, m in modules.items():
        prefix = name + "."
        load_strict(m, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                    f"{weights.name} ({name})")
    if dist.enabled:
        rp = rank_state_path(out, dist.rank)
        if rp.is_file():
            state["data_rng"] = torch.load(rp, map_location="cpu", weights_only=True)["data_rng"]
    return state


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop saves and stops at the next step boundary."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        if hasattr(signal, "SIGTERM"):
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    self._old[sig] = signal.signal(sig, self._handle)
                except ValueError:  # not the main thread
                    pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # second signal: give up at once
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\n[train] received signal {signum}: saving a checkpoint and stopping after this step",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def stop_reason(stop: StopRequest, dist: Dist, t0: float, max_minutes: float | None) -> str | None:
    """Why a training loop must stop now ("signal", "max-minutes"), agreed across DDP ranks; else None."""
    if dist.any_flag(stop.signal is not None):
        return "signal"
    if max_minutes and dist.any_flag((time.time() - t0) / 60 >= max_minutes):
        return "max-minutes"
    return None


class CsvLog:
    def __init__(self, log_dir: str | None, name: str, fields: list[str], resume: bool, enabled: bool):
        self.file = None
        if log_dir and enabled:
            path = Path(log_dir) / f"{name}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            new = not (resume and path.is_file())
            self.file = open(path, "w" if new else "a", newline="")
            self.writer = csv.DictWriter(self.file, fieldnames=fields, extrasaction="ignore")
            if new:
                self.writer.writeheader()

    def write(self, row: dict):
        if self.file:
            self.writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
            self.file.flush()

    def close(self):
        if self.file:
            self.file.close()


def _progress(total, initial, enabled, desc):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True,
                mininterval=2.0, file=sys.stderr)


def _set_lr(opt, lr, step, warmup):
    f = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    for g in opt.param_groups:
        g["lr"] = lr * f


def _finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all())


class Run:
    """What every training stage shares: resume, checkpoints and the step loop (CSV log, progress bar,
    signal / --max-minutes stop, NaN stop, saving every --save-every and sampling every --sample-every
    steps). A stage says what one step is and what its checkpoint holds beyond weights and optimizers."""

    def __init__(self, name: str, args, dist: Dist, modules: dict[str, nn.Module], optims: dict,
                 config: dict, data_gen: torch.Generator):
        self.name, self.args, self.dist = name, args, dist
        self.modules, self.optims, self.config, self.data_gen = modules, optims, config, data_gen
        self.out = Path(args.out)

    def resume(self) -> dict:
        """Weights, optimizers and RNGs from the training checkpoint; -> its state (step, extras)."""
        st = load_training(self.out, self.modules, self.config, self.dist)
        for name, opt in self.optims.items():
            opt.load_state_dict(st["optim"][name])
        self.data_gen.set_state(st["data_rng"])
        torch.set_rng_state(st["torch_rng"])
        return st

    def save(self, step: int, **extra):
        state = {"step": step, **extra, "optim": {k: o.state_dict() for k, o in self.optims.items()},
                 "config": json.dumps(self.config, sort_keys=True)}
        save_training(self.out, self.modules, state, self.dist, self.data_gen)

    def loop(self, step: int, one_step, fields: list[str], postfix=None, sample=None, extra=dict):
        """Runs one_step(step, check) -> stats until --steps or a stop; saves at the end. -> (step, stopped, stats).

        check(loss) raises TrainingDiverged on a NaN/inf loss (any rank); postfix(stats, steps_per_s) ->
        progress-bar fields (the rate counts this run's steps only, also after --resume); sample(path) writes a sample (main rank); extra() -> what save() stores besides the optimizers.
        """
        args, dist = self.args, self.dist
        log = CsvLog(args.log_dir, self.name, fields, args.resume, dist.main)
        bar = _progress(args.steps, step, dist.main and not args.quiet, self.name)
        t0, first, last_good, stopped = time.time(), step, None, "steps"
        stats: dict = {"loss": float("nan")}

        def check(loss: torch.Tensor):
            bad = not _finite(loss.detach()) or step == args.debug_nan_at
            if dist.any_flag(bad):
                raise TrainingDiverged(_nan_message(self.out, step, last_good))

        try:
            with StopRequest() as stop:
                while step < args.steps:
                    reason = stop_reason(stop, dist, t0, args.max_minutes)
                    if reason:
                        stopped = reason
                        break
                    res = one_step(step, check)
                    step += 1
                    stats = {"step": step, "time": time.time() - t0, **res}
                    log.write(stats)
                    if bar is not None:
                        bar.update(1)
                        if postfix is not None:
                            bar.set_postfix(**postfix(stats, (step - first) / max(1e-9, stats["time"])))
                    if args.save_every and step % args.save_every == 0:
                        self.save(step, **extra())
                        last_good = step
                    if sample is not None and args.sample_every and dist.main and step % args.sample_every == 0:
                        sample(Path(args.sample_dir or "outputs/samples") / f"{self.name}_{step:06d}.png")
        finally:
            if bar is not None:
                bar.close()
            log.close()
        self.save(step, **extra())
        return step, stopped, stats

    def finish(self):
        self.dist.barrier()
        self.dist.close()


# =============================================================================================
# VQGAN stage

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
            # only when used, so checkpoints from before --lpips existed still resume
            **({"lpips": Path(args.lpips).name, "lpips_weight": args.lpips_weight} if args.lpips else {})}


def train_vqgan(args) -> dict:
    dist = Dist()
    torch.manual_seed(args.seed)
    f = get_config(args.preset).downsample_factor
    if args.crop % f:
        raise TrainingError(f"--crop {args.crop} must be a multiple of the preset's downsample factor {f}")
    images = load_images(args.images, args.downscale, (args.crop, args.crop))
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
    perceptual = None
    if args.lpips:
        if args.crop < 16:
            raise TrainingError(f"--lpips needs --crop >= 16 (its VGG16 halves the image 4 times), got {args.crop}")
        from .perceptual_loss import load_lpips
        perceptual = load_lpips(args.lpips).to(dist.device)
    disc = PatchDiscriminator(n_layers=3 if args.crop >= 32 else 2)  # its 4x4 convs need >= 2 px at the end
    vq.to(dist.device).train()
    disc.to(dist.device).train()
    opt_g = torch.optim.Adam([p for p in vq.parameters() if p.requires_grad], lr=args.lr, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=(0.5, 0.9))
    data_gen = torch.Generator().manual_seed(args.seed + 1000 * dist.rank)
    run = Run("vqgan", args, dist, {"vqgan": vq, "disc": disc}, {"vqgan": opt_g, "disc": opt_d},
              vqgan_config_dict(args), data_gen)
    step, usage = 0, torch.zeros(cfg.n_embed, dtype=torch.long)
    if args.resume:
        st = run.resume()
        step, usage = int(st["step"]), st["usage"]
    vq_ddp, disc_ddp = dist.wrap(vq), dist.wrap(disc)
    aug = Augment() if args.one_shot else Augment(scale=(0.8, 1.0), rotate_deg=0.0, shear=0.0, noise=0.0)
    sample_in = fixed_crops(images, 4, (args.crop, args.crop))

    def one_step(step, check):
        x = random_crops(images, args.batch, (args.crop, args.crop), data_gen, aug).to(dist.device)
        _set_lr(opt_g, args.lr, step, args.warmup)
        _set_lr(opt_d, args.lr, step, args.warmup)
        rec, q_loss, ids = vq_ddp(x)
        l1 = (rec - x).abs().mean()
        lpips = perceptual(rec, x).mean() if perceptual is not None else torch.zeros(())
        loss = l1 + args.lpips_weight * lpips + q_loss
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
        restarted, done = 0, step + 1
        if args.restart_every and done % args.restart_every == 0:  # independent of --steps: resumable
            with torch.no_grad():
                z = vq.quant_conv(vq.encoder(x)).permute(0, 2, 3, 1).reshape(-1, cfg.embed_dim)
            if dist.enabled:  # identical restarts on every rank: use rank 0's batch
                import torch.distributed as td
                td.broadcast(z, 0)
                td.all_reduce(usage)
            restarted = _restart_dead_codes(vq, usage, z, data_gen if not dist.enabled else
                                            torch.Generator().manual_seed(args.seed + done))
            usage.zero_()
        return {"loss": loss.item(), "l1": l1.item(), "lpips": lpips.item(), "codebook": q_loss.item(),
                "g_adv": g_adv.item(), "d_loss": d_loss.item(), "codes_used": int((usage > 0).sum()),
                "restarted": restarted}

    def postfix(st, steps_per_s):
        return {"l1": f"{st['l1']:.4f}", "cb": f"{st['codebook']:.4f}", "d": f"{st['d_loss']:.3f}",
                "ips": f"{args.batch * dist.world * steps_per_s:.1f}"}

    fields = ["step", "time", "loss", "l1", "codebook", "g_adv", "d_loss", "codes_used", "restarted"]
    fields += ["lpips"] if perceptual is not None else []
    step, stopped, stats = run.loop(step, one_step, fields, postfix=postfix,
                                    sample=lambda path: _vq_samples(vq, sample_in, path),
                                    extra=lambda: {"usage": usage.clone()})
    if args.debug_dump_replicas:
        _dump_replica(run.out, vq, dist)
    if dist.main:
        save_vqgan(vq, run.out, dtype=_dtype(args.save_dtype))
        print(f"[train] vqgan: stopped ({stopped}) at step {step}; wrote {run.out} and its training checkpoint",
              file=sys.stderr)
    run.finish()
    return {"step": step, "stopped": stopped, **stats}


@torch.no_grad()
def _vq_samples(vq: VQModel, x: torch.Tensor, path: Path):
    was = vq.training
    vq.eval()
    rec = vq(x.to(vq.quant_conv.weight.device))[0].cpu()
    vq.train(was)
    grid = torch.cat([torch.cat(list(x), dim=2), torch.cat(list(rec), dim=2)], dim=1)  # [3, 2h, n*w]
    save_image(model_to_image(grid[None]), path)


def _dump_replica(out: Path, module: nn.Module, dist: Dist):
    """Tests: every rank writes its own copy of the weights, to check the replicas agree."""
    sd = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    atomic_write(out.with_name(out.name + f".replica{dist.rank}.pt"), lambda tmp: torch.save(sd, tmp))


def _nan_message(out: Path, step: int, last_good) -> str:
    weights, _ = train_paths(out)
    where = (f"the last good checkpoint ({weights.name}, step {last_good}) is kept" if last_good is not None
             else "no checkpoint of this run was written yet" + (" (an older one is kept)" if weights.is_file() else ""))
    return (f"the loss became NaN or infinite at step {step}; stopping without saving. {where}. "
            f"Lower --lr or resume from the checkpoint with --resume")


def _dtype(name: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


# =============================================================================================
# Renderer stage (render-and-optimize)

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
                          text_dim=args.text_dim, decoder=args.decoder, rpe=args.rpe)


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


def render_and_optimize(renderer: Renderer, model: nn.Module, tokens: torch.Tensor, order, opt,
                        gen: torch.Generator, label_smoothing: float = 0.0, accumulate: bool = False,
                        no_context: bool = False, lr_fn=None, check=None,
                        text: torch.Tensor | None = None) -> dict:
    """Algorithm 1 on one batch of token grids [B, F*pf, H*ph, W*pw]: returns losses and step counts.
    text [B, T, D]: caption features for every patch's cross-attention (None: unconditioned).

    Every patch is rendered from the pool's context, its loss is optimized at once (or summed and
    optimized once per sample with `accumulate`), and its detached cache added to the pool.
    """
    cfg = renderer.config
    pf, ph, pw = cfg.patch_size
    b, ft, h, w = tokens.shape
    grid = (ft // pf, h // ph, w // pw)
    steps = adc.split(grid, order)
    last = last_needed_steps(steps, cfg.extent)
    pool = NearbyContextPool(cfg.extent)
    device = tokens.device
    losses, n_opt = [], 0
    if accumulate:
        opt.zero_grad(set_to_none=True)
    for t, coord in enumerate(steps):
        k, i, j = coord
        patch = tokens[:, k * pf:(k + 1) * pf, i * ph:(i + 1) * ph, j * pw:(j + 1) * pw].reshape(b, -1)
        ctx = Context(None, None, 0) if no_context else Context.from_pool(pool.select(coord), coord, renderer.rel, device)
        masked = pnar_mask(b, patch.shape[1], gen).to(device) if cfg.decoder == "pnar" else None
        logits, cache = model(patch, order, ctx, masked, text)
        if cfg.decoder == "pnar":
            loss = F.cross_entropy(logits[masked], patch[masked], label_smoothing=label_smoothing)
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
            pool.add(coord, cache.detach())
            pool.remove(t, last)
    if accumulate:
        if lr_fn is not None:
            lr_fn()
        opt.step()
        n_opt += 1
    return {"loss": sum(losses) / len(losses), "first_patch": losses[0], "optimizer_steps": n_opt,
            "patches": len(steps), "peak_pool": pool.peak_size}


@torch.no_grad()
def build_token_bank(vq: VQModel, images: list[torch.Tensor], variants: int, aug: Augment, seed: int, device,
                     f: int, tile: int = 8) -> list[torch.Tensor]:
    """Encode every training image `variants` times once, up front: variant 0 as is, 1 flipped,
    the rest through the full augmentation at the image's own size. -> list of token grids [h, w].

    CPU budget: encoding a fresh augmented crop per sample costs far more than the renderer step."""
    gen = torch.Generator().manual_seed(seed + 777)
    bank = []
    for img in images:
        H, W = img.shape[-2] // f * f, img.shape[-1] // f * f
        img = img[:, :H, :W]
        for v in range(variants):
            if v == 0:
                x = img[None]
            elif v == 1:
                x = img.flip(-1)[None]
            else:
                x = random_crops([img], 1, (H, W), gen, dataclasses.replace(aug, scale=(1.0, 1.0)))
            # windows of a patch-sized tile, as NuwaInfinity.decode uses: the tokenizer's mid attention
            # is global, so one pass over a whole large image sees far more tokens than it was trained on
            bank.append(vq.encode_tokens_tiled(x.to(device), tile=tile, overlap=tile // 4)[0].cpu())
    return bank


def token_crops(bank: list[torch.Tensor], n: int, size: tuple[int, int], gen: torch.Generator,
                wrap: bool) -> torch.Tensor:
    """n random token crops [n, 1, h, w] from the bank; `wrap`: columns wrap around (360-degree panoramas)."""
    return token_crops_with_sources(bank, n, size, gen, wrap)[0]


def token_crops_with_sources(bank: list[torch.Tensor], n: int, size: tuple[int, int], gen: torch.Generator,
                             wrap: bool) -> tuple[torch.Tensor, list[int]]:
    """token_crops, and the bank index each crop came from."""
    h, w = size
    out, sources = [], []
    for _ in range(n):
        sources.append(int(torch.randint(len(bank), (1,), generator=gen)))
        grid = bank[sources[-1]]
        H, W = grid.shape
        top = int(torch.randint(H - h + 1, (1,), generator=gen))
        if wrap:
            left = int(torch.randint(W, (1,), generator=gen))
            cols = (torch.arange(w) + left) % W
        else:
            left = int(torch.randint(W - w + 1, (1,), generator=gen))
            cols = torch.arange(left, left + w)
        out.append(grid[top:top + h][:, cols])
    return torch.stack(out)[:, None], sources


def renderer_config_dict(args, rcfg: RendererConfig) -> dict:
    return {"stage": "renderer", "renderer": dataclasses.asdict(rcfg), "tokenizer": str(Path(args.tokenizer).name),
            "sample_patches": args.sample_patches, "batch": args.batch, "lr": args.lr, "one_shot": args.one_shot,
            "downscale": args.downscale, "seed": args.seed, "accumulate": args.accumulate,
            "no_context": args.no_context, "label_smoothing": args.label_smoothing,
            "token_bank": args.token_bank, "wrap": args.wrap,
            "world": int(os.environ.get("WORLD_SIZE", "1")),
            **({"init": Path(args.init).name} if args.init else {}),  # only when used: older runs still resume
            # only with captions, so checkpoints from before captions existed still resume
            **({"text": {"clip": Path(args.clip).name if args.clip else "", "clip_model": args.clip_model or "",
                         "embeddings": Path(args.text_embeddings).name if args.text_embeddings else "",
                         "drop": args.text_drop}} if rcfg.text_dim else {})}


def caption_features(args) -> torch.Tensor | None:
    """[n_images, T, D] caption features of the training images (in list_images order), or None."""
    if args.clip and args.text_embeddings:
        raise TrainingError("give captions either as --clip (encode the .txt files) or as --text-embeddings, not both")
    if not (0.0 <= args.text_drop <= 1.0):
        raise TrainingError(f"--text-drop is a probability in 0..1, got {args.text_drop}")
    if not args.clip and not args.text_embeddings:
        if args.text_dim:
            raise TrainingError(f"--text-dim {args.text_dim} builds a text-conditioned renderer, which needs "
                                f"captions: give --clip (with --clip-model) or --text-embeddings")
        return None
    from . import captions
    paths = list_images(args.images)
    if args.text_embeddings:
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


def init_renderer(renderer: Renderer, bundle_path, vq: VQModel) -> None:
    """Start `renderer` from the renderer of a trained bundle (fine-tuning): same configuration, and
    the bundle's tokenizer must make the same tokens as the one this run trains on."""
    from .generation import NuwaInfinity
    bundle = NuwaInfinity.load(bundle_path)
    theirs = bundle.renderer.config
    if theirs != renderer.config:
        diff = {k: (v, getattr(renderer.config, k)) for k, v in dataclasses.asdict(theirs).items()
                if v != getattr(renderer.config, k)}
        raise TrainingError(f"--init {bundle_path} holds a renderer of another configuration than the flags build "
                            f"(field: bundle's vs flags'): {diff}; give the flags that match it")
    changed = token_tensors_that_differ(bundle.vqgan, vq, stored_dtype(bundle_path))
    if changed:
        raise TrainingError(f"--init {bundle_path} was trained on other tokens than --tokenizer makes "
                            f"({len(changed)} encoder/codebook tensors differ, e.g. {changed[0]}); give the "
                            f"tokenizer it was trained with")
    renderer.load_state_dict(bundle.renderer.float().state_dict())


def train_renderer(args) -> dict:
    text = caption_features(args)  # before seeding: building a CLIP tower draws random numbers
    dist = Dist()
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
    images = load_images(args.images, args.downscale, (ph * f, pw * f))
    if not args.one_shot:  # whole images: crop to whole patches, no resampling
        for n, img in enumerate(images):
            if img.shape[-2] < crop[0] or img.shape[-1] < crop[1]:
                crop = (min(crop[0], img.shape[-2] // (ph * f) * ph * f), min(crop[1], img.shape[-1] // (pw * f) * pw * f))
    renderer = Renderer(rcfg)
    if args.init and not args.resume:  # a resumed run's own weights replace these anyway
        init_renderer(renderer, args.init, vq)
    renderer.to(dist.device).train()
    # a dropped caption leaves the cross-attention weights without gradients on that rank
    model = dist.wrap(_TeacherForced(renderer), find_unused_parameters=text is not None)
    opt = torch.optim.AdamW(renderer.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    data_gen = torch.Generator().manual_seed(args.seed + 1000 * dist.rank)
    run = Run("renderer", args, dist, {"renderer": renderer}, {"renderer": opt}, renderer_config_dict(args, rcfg),
              data_gen)
    step, opt_steps = 0, 0
    if args.resume:
        st = run.resume()
        step, opt_steps = int(st["step"]), int(st["optimizer_steps"])
    aug = Augment() if args.one_shot else Augment.off()
    bank = None
    if args.token_bank:
        bank = build_token_bank(vq, images, args.token_bank, aug, args.seed, dist.device, f, max(rcfg.patch_size[1:]))

    def lr_fn():
        nonlocal opt_steps
        _set_lr(opt, args.lr, opt_steps, args.warmup)
        opt_steps += 1

    def one_step(step, check):
        if bank is not None:
            tokens, sources = token_crops_with_sources(bank, args.batch, (crop[0] // f, crop[1] // f), data_gen,
                                                       args.wrap)
            tokens, sources = tokens.to(dist.device), [s // args.token_bank for s in sources]
        else:
            x, sources = random_crops_with_sources(images, args.batch, crop, data_gen, aug)
            with torch.no_grad():  # patch-sized windows, as in build_token_bank
                t = max(rcfg.patch_size[1:])
                tokens = vq.encode_tokens_tiled(x.to(dist.device), tile=t, overlap=t // 4)[:, None]  # [B, 1, h, w]
        order = adc.ORDERS[int(torch.randint(len(adc.ORDERS), (1,), generator=data_gen))]
        captions = None
        # caption dropout, one draw per step (the whole batch): the renderer also learns to render without text
        if text is not None and torch.rand((), generator=data_gen).item() >= args.text_drop:
            captions = text[sources].to(dist.device)
        res = render_and_optimize(renderer, model, tokens, order, opt, data_gen, args.label_smoothing,
                                  args.accumulate, args.no_context, lr_fn, check, text=captions)
        return {"optimizer_steps": opt_steps, "loss": res["loss"], "first_patch": res["first_patch"],
                "order": order.value, "peak_pool": res["peak_pool"]}

    tokens_per_sample = (crop[0] // f) * (crop[1] // f)

    def postfix(st, steps_per_s):
        return {"loss": f"{st['loss']:.3f}", "tok_s": f"{args.batch * dist.world * tokens_per_sample * steps_per_s:.0f}"}

    fields = ["step", "optimizer_steps", "time", "loss", "first_patch", "order", "peak_pool"]
    step, stopped, stats = run.loop(step, one_step, fields, postfix=postfix,
                                    sample=lambda path: _renderer_samples(vq, renderer, images, path),
                                    extra=lambda: {"optimizer_steps": opt_steps})
    if args.debug_dump_replicas:
        _dump_replica(run.out, renderer, dist)
    if dist.main:
        from .generation import NuwaInfinity
        NuwaInfinity(vq, renderer).save(run.out, dtype=_dtype(args.save_dtype))
        print(f"[train] renderer: stopped ({stopped}) at step {step} ({opt_steps} optimizer steps); wrote {run.out}",
              file=sys.stderr)
    run.finish()
    return {"step": step, "stopped": stopped, "optimizer_steps": opt_steps, **stats}


@torch.no_grad()
def _renderer_samples(vq, renderer, images, path: Path):
    """A 1 x 4 patch canvas generated from nothing, decoded."""
    from .generation import NuwaInfinity
    from .patch_samplers import SamplerSettings
    was = renderer.training
    renderer.eval()
    m = NuwaInfinity(vq, renderer)
    st = m.blank_canvas(1, 4)
    st = m.generate(st, m.plan_fill(st), SamplerSettings(top_k=64), generator=torch.Generator().manual_seed(0))
    save_image(m.decode(st), path)
    renderer.train(was)


# =============================================================================================
# Checking a trained bundle

def sample_bundle(args) -> dict:
    """Outpaint a crop of a real image on every side, extend it to the right, and fill a blank
    panorama; writes PNGs (and the VQGAN reconstruction of the crop) to --out-dir."""
    from .generation import NuwaInfinity
    from .patch_samplers import SamplerSettings
    m = NuwaInfinity.load(args.model)
    out_dir = Path(args.out_dir)
    settings = SamplerSettings(top_k=args.top_k, temperature=args.temperature)
    written = {}

    def gen():
        return torch.Generator().manual_seed(args.seed)

    if args.image:
        image = load_image(args.image)
        if args.downscale > 1:
            x = F.interpolate(image.permute(0, 3, 1, 2), scale_factor=1 / args.downscale, mode="area")
            image = x.permute(0, 2, 3, 1).clamp(0, 1)
        php, pwp = m.patch_pixels
        h, w = image.shape[1:3]
        rows, cols = min(h // php, args.rows), min(w // pwp, args.cols)
        left = (w - cols * pwp) // 2
        crop = image[:, :rows * php, left:left + cols * pwp]
        save_image(crop, out_dir / "input.png")
        st = m.canvas_from_image(crop, fit="crop")
        # re-encode in patch-sized windows, as the renderer was trained (canvas_from_image uses 16-token tiles)
        t = max(m.patch_size[1:])
        st.tokens[:, :1] = m.vqgan.encode_tokens_tiled(image_to_model(crop), tile=t, overlap=t // 4)[:, None]
        recon = NuwaInfinity.decode(m, dataclasses.replace(st, given=None))
        save_image(recon, out_dir / "vqgan_reconstruction.png")
        o = m.generate(st, m.plan_extension(st, left=1, right=1, up=1, down=1), settings, generator=gen())
        save_image(m.decode(o), out_dir / "outpaint_all_sides.png")
        r = m.generate(st, m.plan_extension(st, right=args.extend), settings, generator=gen())
        save_image(m.decode(r), out_dir / "extend_right.png")
        written.update(input=crop.shape, outpaint=o.grid, extend_right=r.grid)
    st = m.blank_canvas(args.rows, args.pano_cols)
    p = m.generate(st, m.plan_fill(st), settings, generator=gen())
    save_image(m.decode(p), out_dir / "panorama_from_blank.png")
    written["panorama"] = p.grid
    print(f"[train] samples written to {out_dir}: {written}", file=sys.stderr)
    return {"stopped": "done", **{k: str(v) for k, v in written.items()}}


def token_tensors_that_differ(a: VQModel, b: VQModel, dtype: torch.dtype) -> list[str]:
    """Names of the encoder / quant_conv / codebook tensors that differ between two tokenizers at
    `dtype` (a bundle's storage precision): empty when both make the same tokens."""
    ours, theirs = a.state_dict(), b.state_dict()
    return [k for k in ours if k.startswith(("encoder.", "quant_conv.", "quantize."))
            and not torch.equal(ours[k].to(dtype), theirs[k].to(dtype))]


def assemble_bundle(args) -> dict:
    """A trained bundle with its tokenizer replaced by one that makes the same tokens (a decoder
    fine-tuned with `vqgan --train decoder`): its encoder and codebook must equal the bundle's."""
    from .generation import NuwaInfinity
    model = NuwaInfinity.load(args.model)
    vq = load_vqgan(args.tokenizer).float()
    if vq.config != model.vqgan.config:
        raise TrainingError(f"{args.tokenizer} is a VQGAN of another configuration than {args.model}'s "
                            f"tokenizer ({vq.config} vs {model.vqgan.config})")
    saved_dtype = stored_dtype(args.model)
    changed = token_tensors_that_differ(model.vqgan, vq, saved_dtype)
    if changed:
        raise TrainingError(f"{args.tokenizer} makes other tokens than {args.model}'s tokenizer ({len(changed)} "
                            f"encoder/codebook tensors differ, e.g. {changed[0]}); its renderer would not fit. "
                            f"Only a decoder fine-tuned with `vqgan --train decoder --init` can be swapped in")
    NuwaInfinity(vq, model.renderer).save(args.out, dtype=saved_dtype)
    print(f"[train] bundle: {args.model}'s renderer with {args.tokenizer}'s tokenizer -> {args.out}", file=sys.stderr)
    return {"stopped": "done", "out": str(args.out)}


# =============================================================================================
# Command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nuwa_core.train", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="stage", required=True)

    def common(s):
        s.add_argument("--images", required=True, help="an image file or a folder of images")
        s.add_argument("--out", required=True, help="output .safetensors (training state goes next to it)")
        s.add_argument("--steps", type=int, default=100000)
        s.add_argument("--max-minutes", type=float, default=0.0, help="stop (and save) after this wall time")
        s.add_argument("--batch", type=int, default=8)
        s.add_argument("--lr", type=float)
        s.add_argument("--warmup", type=int, default=100, help="linear warm-up of the learning rate, in optimizer steps")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--resume", action="store_true")
        s.add_argument("--one-shot", action="store_true", help="random augmented crops of one large image (appendix D)")
        s.add_argument("--downscale", type=int, default=1, help="shrink the training images by this factor first")
        s.add_argument("--save-every", type=int, default=200)
        s.add_argument("--save-dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
        s.add_argument("--sample-every", type=int, default=0)
        s.add_argument("--sample-dir", default=None)
        s.add_argument("--log-dir", default=None, help="write a CSV log here")
        s.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
        s.add_argument("--quiet", action="store_true")
        s.add_argument("--debug-nan-at", type=int, default=None, help=argparse.SUPPRESS)
        s.add_argument("--debug-dump-replicas", action="store_true", help=argparse.SUPPRESS)

    v = sub.add_parser("vqgan", help="train / fine-tune the VQGAN tokenizer")
    common(v)
    v.add_argument("--preset", default="small_f8")
    v.add_argument("--init", default=None, help="start from this VQGAN file (fine-tuning)")
    v.add_argument("--crop", type=int, default=64)
    v.add_argument("--train", choices=("all", "decoder"), default="all",
                   help="decoder: fine-tune only the decoder of the --init tokenizer (its encoder and codebook, "
                   "hence its tokens, stay fixed; no code restarts), e.g. to sharpen it with the discriminator "
                   "without retraining the renderers that use it")
    v.add_argument("--disc-start", type=int, default=2000)
    v.add_argument("--disc-weight", type=float, default=0.1)
    v.add_argument("--restart-every", type=int, default=100, help="re-seed unused codes every N steps (0: off)")
    v.add_argument("--lpips", default=None, help="add the LPIPS perceptual loss (VGG16): a local .safetensors "
                   "holding lpips.LPIPS(net='vgg').state_dict() (nothing is downloaded)")
    v.add_argument("--lpips-weight", type=float, default=1.0, help="weight of the LPIPS loss (with --lpips)")

    r = sub.add_parser("renderer", help="render-and-optimize training of the renderer")
    common(r)
    r.add_argument("--tokenizer", required=True, help="the frozen VQGAN .safetensors")
    r.add_argument("--init", default=None, help="fine-tune: start from the renderer of this bundle (e.g. the shipped "
                   "model; the flags must build the same renderer, --tokenizer must make its tokens)")
    r.add_argument("--layers", type=int, default=4)
    r.add_argument("--heads", type=int, default=4)
    r.add_argument("--dim", type=int, default=128)
    r.add_argument("--patch", default="8x8", help="tokens per patch, ROWSxCOLS")
    r.add_argument("--extent", default="0,1,1", help="E_F,E_H,E_W context extent in patches")
    r.add_argument("--decoder", choices=("ar", "nar", "pnar"), default="ar")
    r.add_argument("--rpe", choices=("pre", "post"), default="pre")
    r.add_argument("--text-dim", type=int, default=0, help="caption feature width D (0: taken from the captions)")
    r.add_argument("--sample-patches", default="2x4", help="patches per training sample, ROWSxCOLS")
    r.add_argument("--label-smoothing", type=float, default=None, help="default 0.15 with --one-shot, else 0")
    r.add_argument("--weight-decay", type=float, default=0.01)
    r.add_argument("--token-bank", type=int, default=0, help="encode each image N times up front (0: encode "
                   "every augmented sample; N>0: variant 0 plain, 1 flipped, the rest augmented) then crop tokens")
    r.add_argument("--wrap", action="store_true", help="token crops wrap around horizontally (360-degree panoramas)")
    r.add_argument("--accumulate", action="store_true", help="one optimizer step per sample (ablation)")
    r.add_argument("--no-context", action="store_true", help="baseline: every patch without context")
    r.add_argument("--clip", default=None, help="captions: encode each image's same-name .txt with the open_clip "
                   "text tower in this local file (.safetensors; per-token last-layer features, as ComfyUI's "
                   "CLIP Text Encode gives them). Needs open_clip: pip install open_clip_torch")
    r.add_argument("--clip-model", default=None, help="open_clip architecture of --clip, e.g. ViT-B-32 (D=512) or "
                   "ViT-L-14-quickgelu (OpenAI CLIP-L = ComfyUI's SD1 text encoder, D=768), or a .json config")
    r.add_argument("--clip-allow-pickle", action="store_true", help="let --clip read a .bin/.pt file "
                   "(torch.load with weights_only=True) instead of only .safetensors")
    r.add_argument("--text-embeddings", default=None, help="captions precomputed: a .safetensors with one tensor "
                   "per image file stem, [T, D] or [D]")
    r.add_argument("--text-drop", type=float, default=0.1, help="probability that a training step's batch goes "
                   "without captions, so the model also renders unconditioned")
    s = sub.add_parser("sample", help="sample a trained bundle: outpainting and a panorama, as PNGs")
    s.add_argument("--model", required=True)
    s.add_argument("--image", default=None, help="a real image to outpaint (its centre crop)")
    s.add_argument("--downscale", type=int, default=1)
    s.add_argument("--rows", type=int, default=2, help="patch rows of the crop / panorama")
    s.add_argument("--cols", type=int, default=3, help="patch columns of the crop")
    s.add_argument("--extend", type=int, default=4, help="patches to extend the crop to the right")
    s.add_argument("--pano-cols", type=int, default=8)
    s.add_argument("--top-k", type=int, default=64)
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out-dir", default="outputs/samples")
    s.add_argument("--threads", type=int, default=0)
    b = sub.add_parser("bundle", help="swap a fine-tuned decoder (same tokens) into a trained bundle")
    b.add_argument("--model", required=True, help="the trained NUWA-Infinity bundle")
    b.add_argument("--tokenizer", required=True, help="a VQGAN from `vqgan --train decoder --init` of its tokenizer")
    b.add_argument("--out", required=True)
    b.add_argument("--threads", type=int, default=0)
    from .xl_training import add_arguments as _xl_arguments  # NUWA-XL: t_klvae and xl
    _xl_arguments(sub)
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.stage == "sample":
        return sample_bundle(args)
    if args.stage == "bundle":
        return assemble_bundle(args)
    if args.stage in ("t_klvae", "xl"):
        from .xl_training import run as _xl_run
        return _xl_run(args)
    if args.lr is None:
        args.lr = 2e-4 if args.stage == "vqgan" else 3e-4
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("steps", "batch"):
        if getattr(args, name) < 1:
            raise TrainingError(f"--{name} must be >= 1, got {getattr(args, name)}")
    return train_vqgan(args) if args.stage == "vqgan" else train_renderer(args)


def cli(argv=None) -> int:
    try:
        res = main(argv)
    except (TrainingError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 130 if res.get("stopped") == "signal" else 0


if __name__ == "__main__":
    sys.exit(cli())
