"""The `text` stage: the pack's small text encoder (text_encoder.WordTextEncoder), trained
contrastively on captioned images, as CLIP trains its text tower.

Every image's same-name `.txt` is its caption. The vocabulary is every word of the captions. A small
image tower (strided convolutions over a random crop, mean-pooled) and the text tower's end-token
feature are projected to one space. The loss is CLIP's symmetric cross-entropy over the batch's
image x caption similarities. Images with the same caption count as matches (the targets are
spread over them), because a few captions cover many images. Only the text tower is written; the image
tower only shapes it.

Afterwards the renderer (`train renderer --text-encoder FILE`) and NUWA-XL (`train xl --text-encoder FILE`)
read its per-token features [T, width] through cross-attention, frozen, as they would read CLIP's.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

from ..text_encoder import WordTextConfig, WordTextEncoder, words
from .captions import read_captions
from .data import Augment, list_images, load_images, random_crops_with_sources
from .loop import Dist, Run, TrainingError, dtype_named, set_lr

DEFAULT_LR = 1e-3


class ImageTower(nn.Module):
    """[B, 3, H, W] in -1..1 -> [B, width]: four stride-2 convolutions, mean over positions."""

    def __init__(self, width: int, channels: int = 32):
        super().__init__()
        layers, c_in = [], 3
        for c in (channels, 2 * channels, 4 * channels, 4 * channels):
            layers += [nn.Conv2d(c_in, c, 4, 2, 1), nn.GroupNorm(8, c), nn.SiLU()]
            c_in = c
        self.net = nn.Sequential(*layers)
        self.out = nn.Linear(c_in, width)

    def forward(self, x):
        return self.out(self.net(x).mean((-2, -1)))


class _Contrastive(nn.Module):
    def __init__(self, text: WordTextEncoder, width: int):
        super().__init__()
        self.text, self.image = text, ImageTower(width)
        self.text_proj = nn.Linear(text.width, width, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(2.659))  # log(1 / 0.07), CLIP's start

    def forward(self, images, ids, same):
        """images [B, 3, H, W], ids [B, T], same [B, B] bool (same caption) -> loss."""
        t = F.normalize(self.text_proj(self.text.pooled(self.text(ids), ids)), dim=-1)
        v = F.normalize(self.image(images), dim=-1)
        logits = self.logit_scale.clamp(max=4.6052).exp() * v @ t.T  # [B images, B captions]
        target = same.float() / same.sum(1, keepdim=True)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def vocabulary(captions: list[str]) -> tuple[str, ...]:
    vocab = sorted({w for c in captions for w in words(c)})
    if not vocab:
        raise TrainingError("the captions hold no words: write a description in each image's .txt")
    return tuple(vocab)


def train_text(args) -> dict:
    paths = list_images(args.images)
    captions = read_captions(paths, "the text stage")
    empty = [p.name for p, c in zip(paths, captions) if not words(c)]
    if empty:
        raise TrainingError(f"the text stage learns from descriptions, but these images' captions are empty: "
                            f"{', '.join(empty[:8])}")
    if len(set(captions)) < 2:
        raise TrainingError("every image has the same caption: contrastive training needs at least 2 different ones")
    longest = max(len(words(c)) for c in captions)
    context = max(args.context_length, longest + 2)
    dist = Dist(getattr(args, "device", None))
    torch.manual_seed(args.seed)
    cfg = WordTextConfig(vocab=vocabulary(captions), context_length=context, width=args.width,
                         layers=args.layers, heads=args.heads)
    encoder = WordTextEncoder(cfg)
    model = _Contrastive(encoder, args.width).to(dist.device).train()
    crop = (args.crop, args.crop)
    images = load_images(args.images, args.downscale, crop)
    ids = encoder.tokenize(captions)                          # [n, T]
    distinct = {c: n for n, c in enumerate(sorted(set(captions)))}
    caption_index = torch.tensor([distinct[c] for c in captions])
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    data_gen = torch.Generator().manual_seed(args.seed + 1000 * dist.rank)
    config = {"stage": "text", "text": {k: v for k, v in vars(cfg).items() if k != "vocab"}, "vocab": list(cfg.vocab),
              "crop": args.crop, "downscale": args.downscale, "batch": args.batch, "lr": args.lr, "seed": args.seed,
              "world": int(os.environ.get("WORLD_SIZE", "1"))}
    run = Run("text", args, dist, {"text": model}, {"text": opt}, config, data_gen)
    step = int(run.resume()["step"]) if args.resume else 0
    aug = Augment(scale=(0.5, 1.0), rotate_deg=0.0, shear=0.0, noise=0.0)
    ddp = dist.wrap(model)

    def one_step(step, check):
        x, sources = random_crops_with_sources(images, args.batch, crop, data_gen, aug)
        src = torch.tensor(sources)
        same = caption_index[src][:, None] == caption_index[src][None, :]
        set_lr(opt, args.lr, step, args.warmup, run.lr_total())
        loss = ddp(x.to(dist.device), ids[src].to(dist.device), same.to(dist.device))
        check(loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.item()}

    step, stopped, stats = run.loop(step, one_step, ["step", "time", "loss"],
                                    postfix=lambda st, _: {"loss": f"{st['loss']:.3f}"})
    if dist.main:
        encoder.name = run.out.stem
        encoder.save(run.out, dtype=dtype_named(args.save_dtype))
        print(f"[train] text: stopped ({stopped}) at step {step}, loss {stats['loss']:.3f}; {len(cfg.vocab)} words, "
              f"width {cfg.width}; wrote {run.out}", file=sys.stderr)
    run.finish()
    return {"step": step, "stopped": stopped, "vocab": len(cfg.vocab), **stats}


def add_arguments(p) -> None:
    p.set_defaults(lr=DEFAULT_LR)
    p.add_argument("--width", type=int, default=64, help="feature width D (the renderer's text_dim, XL's context_dim)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--context-length", type=int, default=16, help="tokens per prompt (start + words + end), at "
                   "least the longest caption's")
    p.add_argument("--crop", type=int, default=128, help="side of the image tower's random square crops (px)")


def run(args) -> dict:
    return train_text(args)
