"""Pixel-Guided VQGAN (NUWA-Infinity section 3.3.2): decode frame n's tokens with frame n-1's pixels.

A video decoded frame by frame with the plain VQGAN flickers: each frame's tokens are decoded on
their own, so detail the tokens do not pin down is re-invented in every frame. PG-VQGAN decodes
frame n with the same decoder plus a *guidance encoder* over frame n-1's pixels: it has as many
levels as the decoder, and each level's output is added (element-sum) to the decoder's output at
the same resolution and channel count (the mid block's too), so the decoder can carry the previous
frame's detail over wherever the tokens agree with it.

    PixelGuidedDecoder          the VQGAN's decoder, post_quant_conv and codebook (copied), + `guide`
      GuidanceEncoder           conv_in, then per level: ResnetBlocks, a zero-initialised 1x1 `out`
                                conv (the fusion), a Downsample; at the lowest level a mid fusion too
    decode_video(vqgan, pg, tokens [F, h, w], first_frame)   frame by frame, tile by tile

Every fusion's output conv starts at zero, so a fresh PG-VQGAN decodes exactly as the VQGAN it was
made from; training (nuwa_core.training.pgvqgan) teaches it to use the guidance. The first frame
has no previous one: image animation uses the given image, text-to-video the plain VQGAN.

Files: `.safetensors`, nuwa_kind="pgvqgan", the config as JSON. A PG-VQGAN decodes the tokens of
one tokenizer only: check_pair refuses a VQGAN whose codebook or post_quant_conv differ.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import checkpoint
from .vqgan import (
    Decoder,
    Downsample,
    ResnetBlock,
    VectorQuantizer,
    VQGANConfig,
    VQModel,
    _scale,
    blend_windows,
    window_batch,
)

KIND = "pgvqgan"
# the tensors that fix what a token id decodes to: a PG-VQGAN fits only a VQGAN with these
TOKEN_TENSORS = ("quantize.embedding.weight", "post_quant_conv.weight", "post_quant_conv.bias")


class PairError(ValueError):
    """A PG-VQGAN and a VQGAN that do not decode the same tokens."""


@dataclass
class PGVQGANConfig:
    vqgan: VQGANConfig = field(default_factory=VQGANConfig)  # the tokenizer whose decoder was copied
    guide_blocks: int = 1      # ResnetBlocks per guidance level
    fuse_mid: bool = True      # also add guidance to the decoder's mid block output (lowest resolution)

    @property
    def levels(self) -> int:
        return len(self.vqgan.ch_mult)

    def to_json(self) -> str:
        return checkpoint.config_to_json(self)

    @classmethod
    def from_json(cls, text: str) -> PGVQGANConfig:
        raw = json.loads(text)
        vq = checkpoint.config_from_json(VQGANConfig, json.dumps(raw.pop("vqgan")))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(vqgan=vq, **{k: v for k, v in raw.items() if k in known})


class GuidanceEncoder(nn.Module):
    """Previous frame [B, 3, H, W] -> one feature per decoder level i: [B, ch*ch_mult[i], H/2^i, W/2^i]
    (level 0 first), plus the mid block's [B, ch*ch_mult[-1], H/f, W/f] (None without fuse_mid)."""

    def __init__(self, cfg: PGVQGANConfig):
        super().__init__()
        vq = cfg.vqgan
        chs = [vq.ch * m for m in vq.ch_mult]
        self.conv_in = nn.Conv2d(vq.in_channels, vq.ch, 3, 1, 1)
        self.down = nn.ModuleList()
        c = vq.ch
        for i, c_out in enumerate(chs):
            level = nn.Module()
            blocks = []
            for _ in range(cfg.guide_blocks):
                blocks.append(ResnetBlock(c, c_out, vq.dropout))
                c = c_out
            level.block = nn.ModuleList(blocks)
            level.out = _zero_conv(c)
            if i != len(chs) - 1:
                level.downsample = Downsample(c)
            self.down.append(level)
        if cfg.fuse_mid:
            self.mid = nn.Module()
            self.mid.block = ResnetBlock(c, c, vq.dropout)
            self.mid.out = _zero_conv(c)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        h = self.conv_in(x)
        levels = []
        for level in self.down:
            for block in level.block:
                h = block(h)
            levels.append(level.out(h))
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        mid = self.mid.out(self.mid.block(h)) if hasattr(self, "mid") else None
        return levels, mid


def _zero_conv(c: int) -> nn.Conv2d:
    conv = nn.Conv2d(c, c, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class PixelGuidedDecoder(nn.Module):
    """A VQGAN decoder (with its post_quant_conv and codebook) guided by the previous frame's pixels."""

    def __init__(self, config: PGVQGANConfig):
        super().__init__()
        vq = config.vqgan
        if config.guide_blocks < 1:
            raise ValueError(f"guide_blocks must be >= 1, got {config.guide_blocks}")
        self.config = config
        self.quantize = VectorQuantizer(vq.n_embed, vq.embed_dim, vq.beta)
        self.post_quant_conv = nn.Conv2d(vq.embed_dim, vq.z_channels, 1)
        self.decoder = Decoder(vq)
        self.guide = GuidanceEncoder(config)

    @classmethod
    def from_vqgan(cls, vqgan: VQModel, guide_blocks: int = 1, fuse_mid: bool = True) -> PixelGuidedDecoder:
        """A PG-VQGAN that decodes exactly as `vqgan` (its decoder, post_quant_conv and codebook copied;
        the guidance fusions zero)."""
        pg = cls(PGVQGANConfig(vqgan=dataclasses.replace(vqgan.config), guide_blocks=guide_blocks, fuse_mid=fuse_mid))
        pg.quantize.load_state_dict(vqgan.quantize.state_dict())
        pg.post_quant_conv.load_state_dict(vqgan.post_quant_conv.state_dict())
        pg.decoder.load_state_dict(vqgan.decoder.state_dict())
        ref = next(vqgan.parameters())
        return pg.to(device=ref.device, dtype=ref.dtype)

    @property
    def downsample_factor(self) -> int:
        return self.config.vqgan.downsample_factor

    def _dtype(self) -> torch.dtype:
        return self.post_quant_conv.weight.dtype

    def decode(self, z_q: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """z_q [B, embed_dim, h, w] (codebook vectors), previous [B, 3, h*f, w*f] in -1..1 ->
        [B, 3, h*f, w*f]; differentiable (training)."""
        f = self.downsample_factor
        if previous.ndim != 4 or previous.shape[0] != z_q.shape[0] or \
                tuple(previous.shape[2:]) != (z_q.shape[2] * f, z_q.shape[3] * f):
            raise ValueError(f"the previous frame must be [B, 3, H, W] = [{z_q.shape[0]}, 3, {z_q.shape[2] * f}, "
                             f"{z_q.shape[3] * f}] for tokens of {z_q.shape[2]}x{z_q.shape[3]} at {f} px per "
                             f"token, got shape {tuple(previous.shape)}")
        levels, mid = self.guide(VQModel._conv_layout(previous.to(z_q.dtype)))
        d = self.decoder
        h = d.mid.block_2(d.mid.attn_1(d.mid.block_1(d.conv_in(self.post_quant_conv(VQModel._conv_layout(z_q))))))
        if mid is not None:
            h = h + mid
        for i in reversed(range(len(d.up))):
            level = d.up[i]
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            h = h + levels[i]  # level i's output: resolution H/2^i, ch*ch_mult[i] channels
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return d.conv_out(F.silu(d.norm_out(h))).contiguous()

    def forward(self, tokens: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """Training: tokens [B, h, w], previous [B, 3, H, W] -> [B, 3, H, W]."""
        return self.decode(self.quantize.embed(tokens.long()), previous)

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """tokens [B, h, w] ids, previous [B, 3, h*f, w*f] in -1..1 -> [B, 3, h*f, w*f] (not clamped)."""
        if tokens.ndim != 3:
            raise ValueError(f"expected tokens [B, h, w], got shape {tuple(tokens.shape)}")
        n = self.config.vqgan.n_embed
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= n):
            raise ValueError(f"token ids must lie in [0, {n}), got {tokens.min().item()}..{tokens.max().item()}")
        return self.decode(self.quantize.embed(tokens.long()), previous.to(self._dtype()))

    @torch.no_grad()
    def decode_tokens_tiled(self, tokens: torch.Tensor, previous: torch.Tensor, tile: int = 16, overlap: int = 4,
                            wrap: tuple[bool, bool] = (False, False), max_windows: int | None = None) -> torch.Tensor:
        """decode_tokens window by window, cross-faded exactly as VQModel.decode_tokens_tiled (the
        same plan: vqgan.blend_windows); each window is guided by the previous frame's pixels under
        it. tokens [B, h, w], previous [B, 3, h*f, w*f] -> [B, 3, h*f, w*f]. max_windows: windows of
        one shape decoded together (None: vqgan.window_batch's budget, counting the guidance
        encoder as a second decoder; 1: one at a time)."""
        f = self.downsample_factor
        B, h, w = tokens.shape
        if tuple(previous.shape) != (B, 3, h * f, w * f):
            raise ValueError(f"the previous frame must be [B, 3, H, W] = [{B}, 3, {h * f}, {w * f}] for tokens "
                             f"{tuple(tokens.shape)}, got shape {tuple(previous.shape)}")

        def window(ys, xs):
            rows, cols = _scale(ys, f), _scale(xs, f)
            if not isinstance(rows, slice):
                rows = rows.to(previous.device)
            if not isinstance(cols, slice):
                cols = cols.to(previous.device)
            return tokens[:, ys][:, :, xs], previous[:, :, rows][:, :, :, cols]

        if max_windows is None:
            max_windows = window_batch(self.config.vqgan, tile, 2 * B, tokens.device, self._dtype())
        return blend_windows(self.decode_tokens, tokens.shape, f, tile, overlap, wrap, take=window,
                             max_windows=max_windows)


# ---------------------------------------------------------------------------------------------
# Video

class DecodeCancelled(Exception):
    """decode_video's callback returned False."""


@torch.no_grad()
def decode_video(vqgan: VQModel, pg: PixelGuidedDecoder | None, tokens: torch.Tensor,
                 first_frame: torch.Tensor | None, tile: int,
                 callback: Callable[[int, int, torch.Tensor], bool | None] | None = None,
                 overlap: int | None = None, wrap: tuple[bool, bool] = (False, False)) -> torch.Tensor:
    """Frames of tokens [F, h, w] -> pixels [F, 3, h*f, w*f] in -1..1 (clamped, on the CPU, float32).

    Frame 0 is `first_frame` [3, H, W] in -1..1 when given (image animation: the given image),
    else the plain VQGAN's tiled decode of its tokens (text-to-video). Every later frame is decoded
    by the PG-VQGAN guided by the previous *decoded* frame, window by window, so memory stays flat
    at any canvas size and length (one frame on the device at a time). pg None: every frame by the
    plain VQGAN (the baseline). callback(frame_index, frames, frame [3, H, W]) after each frame;
    returning False raises DecodeCancelled (or it may raise its own exception). overlap: tokens the
    windows share (default tile // 4, as NuwaInfinity.decode); wrap (rows, columns): a canvas that wraps.
    """
    if tokens.ndim != 3:
        raise ValueError(f"expected tokens [F, h, w] (one video), got shape {tuple(tokens.shape)}")
    n_frames, h, w = tokens.shape
    if n_frames < 1:
        raise ValueError("decode_video needs at least one frame of tokens, got 0")
    f = vqgan.downsample_factor
    overlap = tile // 4 if overlap is None else overlap
    device = next(vqgan.parameters()).device
    if pg is not None:
        check_pair(pg, vqgan)
    if first_frame is not None and tuple(first_frame.shape) != (3, h * f, w * f):
        raise ValueError(f"first_frame must be [3, H, W] = [3, {h * f}, {w * f}] for tokens of {h}x{w} at {f} px "
                         f"per token, got shape {tuple(first_frame.shape)}")
    out = torch.empty(n_frames, 3, h * f, w * f)
    previous = None
    for n in range(n_frames):
        frame_tokens = tokens[n:n + 1].to(device)
        if n == 0 and first_frame is not None:
            x = first_frame[None].to(device=device, dtype=torch.float32)
        elif pg is None or previous is None:
            x = vqgan.decode_tokens_tiled(frame_tokens, tile=tile, overlap=overlap, wrap=wrap)
        else:
            x = pg.decode_tokens_tiled(frame_tokens, previous, tile=tile, overlap=overlap, wrap=wrap)
        x = x.float().clamp(-1, 1)
        previous = x.to(next(pg.parameters()).dtype) if pg is not None else None
        out[n] = x[0].cpu()
        if callback is not None and callback(n, n_frames, out[n]) is False:
            raise DecodeCancelled(f"decoding cancelled after frame {n + 1} of {n_frames}")
    return out


# ---------------------------------------------------------------------------------------------
# Files and pairing

def token_fingerprint(vqgan: VQModel | PixelGuidedDecoder) -> str:
    """A short hash of what token ids decode to (codebook + post_quant_conv, at fp16), for the record."""
    state = vqgan.state_dict()
    h = hashlib.sha256()
    for k in TOKEN_TENSORS:
        h.update(state[k].detach().to("cpu", torch.float16).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def save_pgvqgan(pg: PixelGuidedDecoder, path, vqgan_fingerprint: str, dtype: torch.dtype | None = None,
                 metadata: dict[str, str] | None = None) -> None:
    """Write `.safetensors` (atomically) with nuwa_kind="pgvqgan", its config and the fingerprint of
    the VQGAN it was trained with (token_fingerprint)."""
    checkpoint.save_model_file(path, pg.state_dict(), KIND, extra_metadata={
        **(metadata or {}), "config": pg.config.to_json(), "vqgan_fingerprint": str(vqgan_fingerprint)}, dtype=dtype)


def load_pgvqgan(path, device="cpu", dtype: torch.dtype = torch.float32) -> PixelGuidedDecoder:
    """A PG-VQGAN file -> PixelGuidedDecoder (eval); refuses files of another kind, naming what they are."""
    path = Path(path)
    state, meta = checkpoint.load_state_dict(path)
    kind = meta.get("nuwa_kind")
    if kind != KIND:
        raise checkpoint.CheckpointError(f"{path.name} holds a {kind or 'foreign'} model, not a PG-VQGAN "
                                         f"(expected nuwa_kind={KIND!r} in its metadata)")
    try:
        config = PGVQGANConfig.from_json(meta["config"])
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise checkpoint.CheckpointError(f"{path.name}: missing or unreadable PG-VQGAN config metadata: {err}") from err
    pg = PixelGuidedDecoder(config)
    checkpoint.load_strict(pg, state, source=f"{path.name} (PG-VQGAN)")
    pg.source = str(path)
    return pg.to(device=device, dtype=dtype).eval()


def token_tensors_that_differ(pg: PixelGuidedDecoder, vqgan: VQModel) -> list[str]:
    """TOKEN_TENSORS that differ between the two beyond storage rounding (fp16 / bf16 files):
    empty when the PG-VQGAN decodes the VQGAN's tokens."""
    ours, theirs = pg.state_dict(), vqgan.state_dict()
    out = []
    for k in TOKEN_TENSORS:
        a, b = ours[k].detach().float().cpu(), theirs[k].detach().float().cpu()
        # bf16 keeps 8 significant bits: a value stored at fp16 or bf16 on either side is within 2^-7 of the other
        if a.shape != b.shape or not torch.allclose(a, b, rtol=2 ** -7, atol=1e-6):
            out.append(k)
    return out


def check_pair(pg: PixelGuidedDecoder, vqgan: VQModel, pg_path=None, vqgan_path=None) -> None:
    """Raise PairError, naming both files, when `pg` was not trained for `vqgan`'s tokens (another
    codebook or post_quant_conv, or another VQGAN configuration)."""
    pg_name = Path(pg_path).name if pg_path else Path(getattr(pg, "source", "the PG-VQGAN")).name
    vq_name = Path(vqgan_path).name if vqgan_path else "the VQGAN"
    theirs = vqgan.config
    ours = pg.config.vqgan
    fields = ("ch", "ch_mult", "num_res_blocks", "z_channels", "embed_dim", "n_embed", "out_ch", "attn_resolutions",
              "resolution")
    differ = [k for k in fields if tuple(_as_tuple(getattr(ours, k))) != tuple(_as_tuple(getattr(theirs, k)))]
    if differ:
        detail = ", ".join(f"{k} {getattr(ours, k)} vs {getattr(theirs, k)}" for k in differ)
        raise PairError(f"the PG-VQGAN {pg_name} was made from another VQGAN configuration than {vq_name}'s "
                        f"({detail}); use the PG-VQGAN trained for {vq_name} (train one with `python -m "
                        f"nuwa_core.train pgvqgan --tokenizer {vq_name} ...`) or 'none'")
    changed = token_tensors_that_differ(pg, vqgan)
    if changed:
        raise PairError(f"the PG-VQGAN {pg_name} decodes other tokens than {vq_name} ({', '.join(changed)} "
                        f"differ): it was trained with another tokenizer. Use the PG-VQGAN trained for "
                        f"{vq_name} (`python -m nuwa_core.train pgvqgan --tokenizer {vq_name} ...`) or 'none'")


def _as_tuple(v):
    return v if isinstance(v, (tuple, list)) else (v,)


def load_tokenizer(path) -> VQModel:
    """A bare VQGAN file or a NUWA-Infinity bundle (its VQGAN) -> VQModel (eval, float32, CPU)."""
    from .generation import BUNDLE_KIND, NuwaInfinity
    path = Path(path)
    meta = checkpoint.read_metadata(path) if path.suffix == ".safetensors" and path.is_file() else {}
    if meta.get("nuwa_kind") == BUNDLE_KIND:
        return NuwaInfinity.load(path).vqgan.float().eval()
    from .vqgan import load_vqgan
    return load_vqgan(path).float().eval()
