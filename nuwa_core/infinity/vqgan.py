"""Taming-compatible VQGAN: the tokenizer between pixels [-1, 1] and token grids.

The module tree and parameter names follow taming-transformers (`VQModel` with `encoder`,
`decoder`, `quantize` = VectorQuantizer2, `quant_conv`, `post_quant_conv`), so the public
`vqgan_imagenet_f16_*` Lightning checkpoints load strictly without taming or Lightning.
Our own files are `.safetensors` with `nuwa_kind="vqgan"` and the config as JSON metadata.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .. import checkpoint

KIND = "vqgan"


@dataclass
class VQGANConfig:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)  # taming's rule: level i has attention iff resolution // 2**i is listed
    z_channels: int = 256
    embed_dim: int = 256
    n_embed: int = 1024
    resolution: int = 256  # only decides where attention sits; any multiple of f can be encoded
    in_channels: int = 3
    out_ch: int = 3
    dropout: float = 0.0
    beta: float = 0.25

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def attn_levels(self) -> list[bool]:
        return [self.resolution // 2 ** i in self.attn_resolutions for i in range(len(self.ch_mult))]


_F16 = dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
            z_channels=256, embed_dim=256, resolution=256)
PRESETS: dict[str, VQGANConfig] = {
    "f16_1024": VQGANConfig(**_F16, n_embed=1024),     # taming vqgan_imagenet_f16_1024
    "f16_16384": VQGANConfig(**_F16, n_embed=16384),   # taming vqgan_imagenet_f16_16384 (NUWA-Infinity's)
    # CPU-trainable demo tokenizer: f8, attention only at the lowest level (256 // 2**3 = 32).
    "small_f8": VQGANConfig(ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=1, attn_resolutions=(32,),
                            z_channels=64, embed_dim=64, n_embed=512, resolution=256),
    # Tests: f4, attention at the lowest level (16 // 2**2 = 4); channel counts divisible by 32 for GroupNorm.
    "tiny": VQGANConfig(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, attn_resolutions=(4,),
                        z_channels=16, embed_dim=16, n_embed=64, resolution=16),
}


def get_config(name: str) -> VQGANConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown VQGAN preset {name!r}; known presets: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])


# ---------------------------------------------------------------------------------------------
# Building blocks (taming/modules/diffusionmodules/model.py names, temb_channels = 0)

def Normalize(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, dropout: float):
        super().__init__()
        self.norm1 = Normalize(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.norm2 = Normalize(c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        if c_in != c_out:
            self.nin_shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions (1x1 conv projections)."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = Normalize(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):  # x: [B, C, H, W]
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (m(h).reshape(B, 1, C, H * W).transpose(2, 3) for m in (self.q, self.k, self.v))  # [B,1,HW,C]
        h = F.scaled_dot_product_attention(q, k, v)  # scale C**-0.5, as taming
        return x + self.proj_out(h.transpose(2, 3).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x):  # asymmetric pad, as taming: [H, W] -> [H/2, W/2]
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks: list[nn.Module], attn: list[nn.Module]) -> nn.Module:
    m = nn.Module()
    m.block, m.attn = nn.ModuleList(blocks), nn.ModuleList(attn)
    return m


def _mid(c: int, dropout: float) -> nn.Module:
    m = nn.Module()
    m.block_1, m.attn_1, m.block_2 = ResnetBlock(c, c, dropout), AttnBlock(c), ResnetBlock(c, c, dropout)
    return m


class Encoder(nn.Module):
    """[B, in_channels, H, W] -> [B, z_channels, H/f, W/f]."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        chs = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, 1, 1)
        self.down = nn.ModuleList()
        c = cfg.ch
        for i, (c_out, has_attn) in enumerate(zip(chs, cfg.attn_levels())):
            blocks, attn = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(c, c_out, cfg.dropout))
                c = c_out
                if has_attn:
                    attn.append(AttnBlock(c))
            level = _level(blocks, attn)
            if i != len(chs) - 1:
                level.downsample = Downsample(c)
            self.down.append(level)
        self.mid = _mid(c, cfg.dropout)
        self.norm_out = Normalize(c)
        self.conv_out = nn.Conv2d(c, cfg.z_channels, 3, 1, 1)  # double_z=False for VQ

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """[B, z_channels, h, w] -> [B, out_ch, h*f, w*f]. `up[i]` works at resolution level i, so
    `up[-1]` is the lowest resolution and runs first (taming builds the list in reverse)."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        chs = [cfg.ch * m for m in cfg.ch_mult]
        attn_levels = cfg.attn_levels()
        c = chs[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, 1, 1)
        self.mid = _mid(c, cfg.dropout)
        up = []
        for i in reversed(range(len(chs))):
            blocks, attn = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(c, chs[i], cfg.dropout))
                c = chs[i]
                if attn_levels[i]:
                    attn.append(AttnBlock(c))
            level = _level(blocks, attn)
            if i != 0:
                level.upsample = Upsample(c)
            up.insert(0, level)
        self.up = nn.ModuleList(up)
        self.norm_out = Normalize(c)
        self.conv_out = nn.Conv2d(c, cfg.out_ch, 3, 1, 1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """taming's VectorQuantizer2 with legacy=True: nearest-codebook lookup, straight-through gradient."""

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25):
        super().__init__()
        self.n_embed, self.embed_dim, self.beta = n_embed, embed_dim, beta
        self.embedding = nn.Embedding(n_embed, embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)

    @torch.no_grad()
    def nearest(self, z: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """z: [B, C, h, w] -> ids [B, h, w]; chunked so N x n_embed distances stay small."""
        B, C, h, w = z.shape
        flat = rearrange(z, "B C h w -> (B h w) C")
        e = self.embedding.weight
        e2 = (e ** 2).sum(1)
        ids = [(e2 - 2 * part @ e.t()).argmin(1) for part in flat.split(chunk)]  # |z|^2 is constant per row
        return rearrange(torch.cat(ids), "(B h w) -> B h w", B=B, h=h)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:  # [B, h, w] -> [B, C, h, w]
        return rearrange(self.embedding(ids), "B h w C -> B C h w").contiguous()

    def forward(self, z):  # z: [B, C, h, w] -> (z_q [B, C, h, w], loss, ids [B, h, w])
        ids = self.nearest(z)
        z_q = self.embed(ids)
        # legacy beta placement (taming's default, which its checkpoints were trained with):
        # beta weights the codebook term, not the commitment term.
        loss = torch.mean((z_q.detach() - z) ** 2) + self.beta * torch.mean((z_q - z.detach()) ** 2)
        z_q = z + (z_q - z).detach()  # straight-through estimator
        return z_q, loss, ids


# ---------------------------------------------------------------------------------------------

class VQModel(nn.Module):
    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config.n_embed, config.embed_dim, config.beta)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def _dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def check_size(self, H: int, W: int) -> None:
        f = self.downsample_factor
        if H % f or W % f:
            def near(n):
                lo = max(f, n // f * f)
                return f"{lo} or {lo + f}" if lo != n else str(n)
            raise ValueError(f"image size {H}x{W} is not a multiple of the VQGAN's downsample factor {f}; "
                             f"use a height of {near(H)} and a width of {near(W)}")

    @staticmethod
    def _conv_layout(x: torch.Tensor) -> torch.Tensor:
        """The maps' memory layout for the convolutions: channels-last on the CPU, where oneDNN's
        convolutions run 1.2-1.8x faster in it (bench/vqgan_decode.py; same values up to float
        rounding); other devices keep what they are given."""
        return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x

    def encode_maps(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 3, H, W] -1..1 -> the encoder's maps before quantization [B, embed_dim, H/f, W/f] (contiguous)."""
        return self.quant_conv(self.encoder(self._conv_layout(x))).contiguous()

    def encode(self, x: torch.Tensor):
        """x: [B, 3, H, W] -1..1 -> (z_q [B, embed_dim, H/f, W/f] straight-through, loss, ids [B, H/f, W/f])."""
        return self.quantize(self.encode_maps(x))

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:  # [B, embed_dim, h, w] -> [B, 3, h*f, w*f]
        return self.decoder(self.post_quant_conv(self._conv_layout(z_q))).contiguous()

    def forward(self, x: torch.Tensor):
        """Training: x [B, 3, H, W] -> (reconstruction [B, 3, H, W], codebook loss, token ids [B, H/f, W/f])."""
        self.check_size(x.shape[-2], x.shape[-1])
        z_q, loss, ids = self.encode(x)
        return self.decode(z_q), loss, ids

    @torch.no_grad()
    def encode_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 3, H, W] in -1..1 -> LongTensor [B, H/f, W/f]."""
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected images [B, {self.config.in_channels}, H, W], got shape {tuple(x.shape)}")
        self.check_size(x.shape[-2], x.shape[-1])
        return self.quantize.nearest(self.encode_maps(x.to(self._dtype())))

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: LongTensor [B, h, w] -> [B, 3, h*f, w*f] in -1..1 (not clamped)."""
        if tokens.ndim != 3:
            raise ValueError(f"expected tokens [B, h, w], got shape {tuple(tokens.shape)}")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.config.n_embed):
            raise ValueError(f"token ids must lie in [0, {self.config.n_embed}), "
                             f"got {tokens.min().item()}..{tokens.max().item()}")
        return self.decode(self.quantize.embed(tokens.long()))

    @torch.no_grad()
    def decode_tokens_tiled(self, tokens: torch.Tensor, tile: int = 16, overlap: int = 4,
                            wrap: tuple[bool, bool] = (False, False), max_windows: int | None = None) -> torch.Tensor:
        """decode_tokens in windows of at most (tile + 2*overlap)^2 tokens, cross-faded.

        The decoder's attention is global over the token grid, so a whole large canvas at once
        costs memory quadratic in its area; windows bound it. Neighbouring windows see different
        context, so cutting them apart at tile borders leaves a visible seam every `tile` tokens
        (on patch borders, since tiles are patches); instead each window fades out linearly over
        the 2*overlap tokens it shares with its neighbour. Equals decode_tokens exactly when one
        window covers the canvas.

        wrap (rows, columns): the grid's edges along that axis meet (a tileable canvas). Windows
        there wrap round the joint, so the last tile and the first are cross-faded as any two
        neighbours are, and rolling the tokens by whole tiles rolls the image.

        max_windows: windows of one shape decoded together, stacked along the batch axis (None:
        window_batch's, a fixed memory budget; 1: one at a time). The result equals the one at a
        time decode up to float rounding (~1e-5: on the CPU the convolutions' kernels depend on the batch).
        """
        if max_windows is None:
            max_windows = window_batch(self.config, tile, tokens.shape[0], tokens.device, self._dtype())
        return blend_windows(self.decode_tokens, tokens.shape, self.downsample_factor, tile, overlap, wrap,
                             take=lambda ys, xs: tokens[:, ys][:, :, xs], max_windows=max_windows)

    @torch.no_grad()
    def decode_tokens_blocks(self, tokens: torch.Tensor, tile: int = 16, max_windows: int | None = None) -> torch.Tensor:
        """decode_tokens of every tile x tile block [B, <=tile, <=tile] on its own, pasted side by
        side: hard cuts at the block borders (blocks at the far edges are smaller when the size
        is not a multiple of tile). [B, h, w] -> [B, 3, h*f, w*f]. max_windows: blocks of one
        shape decoded together, as decode_tokens_tiled."""
        if tile < 1:
            raise ValueError(f"tile must be >= 1 token, got {tile}")
        f = self.downsample_factor
        B, h, w = tokens.shape
        if max_windows is None:
            max_windows = window_batch(self.config, tile, B, tokens.device, self._dtype())
        out = None
        blocks = [(slice(y, min(y + tile, h)), slice(x, min(x + tile, w))) for y in range(0, h, tile)
                  for x in range(0, w, tile)]
        for group, pieces in _decode_groups(blocks, lambda ys, xs: tokens[:, ys, xs], self.decode_tokens, max_windows):
            for (ys, xs), piece in zip(group, pieces):
                if out is None:
                    out = piece.new_zeros(B, piece.shape[1], h * f, w * f)
                out[:, :, _scale(ys, f), _scale(xs, f)] = piece
        return out

    @torch.no_grad()
    def encode_tokens_tiled(self, x: torch.Tensor, tile: int = 16, overlap: int = 4) -> torch.Tensor:
        """encode_tokens in windows of (tile + 2*overlap) tokens' worth of pixels, keeping each
        window's centre tokens (the encoder's mid attention is global too)."""
        f = self.downsample_factor
        self.check_size(x.shape[-2], x.shape[-1])
        h, w = x.shape[-2] // f, x.shape[-1] // f
        out = torch.empty(x.shape[0], h, w, dtype=torch.long, device=x.device)
        for (ys, xs), (ky, kx), (oy, ox) in _windows(h, w, tile, overlap):
            out[:, oy, ox] = self.encode_tokens(x[:, :, _scale(ys, f), _scale(xs, f)])[:, ky, kx]
        return out


# Windows decoded per call (window_batch): equal windows stacked along the batch axis share every
# layer's dispatch, but their feature maps must stay small. On this 2-core CPU, the shipped f8
# tokenizer's 12x12-token windows (~7.5 MB each, memory.vqgan_window_bytes) decode ~20% faster per
# window in batches of 2-4 than one at a time, and slower than one at a time in batches of 16 (the
# maps leave the cache); an accelerator wants large batches. The budget bounds a call's working
# memory, so memory stays flat on any canvas.
WINDOW_BATCH_BYTES = {"cpu": 32 * 2 ** 20}
WINDOW_BATCH_BYTES_DEFAULT = 1024 * 2 ** 20  # CUDA and other accelerators
MAX_WINDOW_BATCH = 64


def window_batch(cfg: VQGANConfig, tile: int, batch: int = 1, device=None, dtype: torch.dtype = torch.float32) -> int:
    """Windows of `tile` tokens (plus the usual tile // 4 overlap) over `batch` rows to decode in one
    call: as many as fit in the device's WINDOW_BATCH_BYTES (memory.vqgan_window_bytes), at least 1."""
    from ..memory import vqgan_window_bytes
    kind = torch.device(device).type if device is not None else "cpu"
    budget = WINDOW_BATCH_BYTES.get(kind, WINDOW_BATCH_BYTES_DEFAULT)
    return max(1, min(MAX_WINDOW_BATCH, budget // max(vqgan_window_bytes(cfg, tile, max(batch, 1), dtype), 1)))


def _decode_groups(windows, take, decode, max_windows: int):
    """Decode `windows` [(rows, cols), ...] in groups of up to max_windows of one shape, in order of
    first appearance: yields (group, pieces), pieces [B, C, win_h*f, win_w*f] one per window.
    take(rows, cols) -> the window's inputs (a tensor [B, ...] or a tuple of them); decode(*inputs)
    decodes the inputs of a group concatenated along the batch axis, window-major."""
    if max_windows < 1:
        raise ValueError(f"max_windows must be >= 1, got {max_windows}")
    pending: dict[tuple, list] = {}

    def flush(key):
        group = pending.pop(key)
        inputs = [take(*window) for window in group]
        if not isinstance(inputs[0], tuple):
            inputs = [(x,) for x in inputs]
        batched = [torch.cat(parts) if len(parts) > 1 else parts[0] for parts in zip(*inputs)]
        out = decode(*batched)
        return group, out.chunk(len(group)) if len(group) > 1 else (out,)

    for window in windows:
        key = tuple(_length(s) for s in window)
        pending.setdefault(key, []).append(window)
        if len(pending[key]) >= max_windows:
            yield flush(key)
    for key in list(pending):
        yield flush(key)


def _length(s: slice | torch.Tensor) -> int:
    return s.stop - s.start if isinstance(s, slice) else len(s)


def blend_windows(decode_window, shape: tuple[int, int, int], f: int, tile: int, overlap: int,
                  wrap: tuple[bool, bool] = (False, False), take=None, max_windows: int = 1) -> torch.Tensor:
    """The cross-faded window plan of VQModel.decode_tokens_tiled over a token grid of `shape`
    [B, h, w] at f px per token: decode_window(rows, cols) -> [B, C, win_h*f, win_w*f] decodes the
    window whose token rows / columns are `rows` / `cols` (slices, or index tensors round a joint);
    the pieces are weighted and summed into [B, C, h*f, w*f]. Other decoders over the same tokens
    (pixel_guided_vqgan.PixelGuidedDecoder) blend with it too.

    Batched: with take, take(rows, cols) gives a window's inputs (a tensor [B, ...] or a tuple of
    them) and decode_window(*inputs) decodes up to max_windows windows of one shape at once, their
    inputs concatenated along the batch axis (window-major) -> [n*B, C, win_h*f, win_w*f].
    """
    B, h, w = shape
    rows, cols = _blend_weights(h, tile, overlap, f, wrap[0]), _blend_weights(w, tile, overlap, f, wrap[1])
    weights = {}
    for ys, wy in rows:
        for xs, wx in cols:
            weights[id(ys), id(xs)] = (wy, wx)
    windows = [(ys, xs) for ys, _ in rows for xs, _ in cols]
    if take is None:  # decode_window(rows, cols) itself: one window a call
        take, max_windows = (lambda ys, xs: (ys, xs)), 1
    out = None
    for group, pieces in _decode_groups(windows, take, decode_window, max_windows):
        for (ys, xs), piece in zip(group, pieces):
            if out is None:
                out = piece.new_zeros(B, piece.shape[1], h * f, w * f)
            wy, wx = weights[id(ys), id(xs)]
            _add_at(out, _weigh(piece, wy, wx), _scale(ys, f), _scale(xs, f))
    return out


def _weigh(piece: torch.Tensor, wy: torch.Tensor, wx: torch.Tensor) -> torch.Tensor:
    """piece [B, C, H, W] * wy[H, None] * wx[None, W]."""
    return piece * (wy[:, None] * wx[None, :]).to(piece)


def _scale(s: slice | torch.Tensor, f: int) -> slice | torch.Tensor:
    """Tokens -> their pixels: a slice, or token indices (a window round a joint) -> pixel indices."""
    if isinstance(s, slice):
        return slice(s.start * f, s.stop * f)
    return (s[:, None] * f + torch.arange(f)).flatten()


def _add_at(out: torch.Tensor, value: torch.Tensor, rows, cols) -> None:
    """out[:, :, rows, cols] += value; rows / cols are slices or index tensors, which repeat pixels
    when a window is longer than its wrapped axis (each repeat adds)."""
    if isinstance(rows, slice) and isinstance(cols, slice):
        out[:, :, rows, cols] += value
        return
    rows, cols = (torch.arange(n)[i] if isinstance(i, slice) else i for n, i in zip(out.shape[2:], (rows, cols)))
    out.permute(2, 3, 0, 1).index_put_((rows[:, None].to(out.device), cols[None].to(out.device)),
                                       value.permute(2, 3, 0, 1), accumulate=True)


def _spans(n: int, tile: int, overlap: int):
    """1D plan: (window, kept part relative to the window, kept part in the canvas). Windows are
    shifted inwards at the borders so each one keeps its full (tile + 2*overlap) context."""
    if tile < 1 or overlap < 0:
        raise ValueError(f"tile must be >= 1 and overlap >= 0, got tile={tile}, overlap={overlap}")
    size = min(n, tile + 2 * overlap)
    for s in range(0, n, tile):
        e = min(s + tile, n)
        a = min(max(0, s - overlap), n - size)
        yield slice(a, a + size), slice(s - a, e - a), slice(s, e)


def _blend_weights(n: int, tile: int, overlap: int, f: int,
                   wrap: bool = False) -> list[tuple[slice | torch.Tensor, torch.Tensor]]:
    """1D cross-fade plan over n tokens: (window in tokens, per-pixel weight [window*f]).

    Each window ramps linearly over the 2*overlap*f pixels at each side it shares with a
    neighbour; the weights are then normalised so that they sum to exactly 1 at every pixel.
    wrap: the axis is a circle; every window is its tile and `overlap` tokens each side, taken
    round the joint (token indices instead of a slice), ramping at both ends.
    """
    if wrap:
        if tile < 1 or overlap < 0:
            raise ValueError(f"tile must be >= 1 and overlap >= 0, got tile={tile}, overlap={overlap}")
        plan, total = [], torch.zeros(n * f, dtype=torch.float64)
        for s in range(0, n, tile):
            window = torch.arange(s - overlap, min(s + tile, n) + overlap) % n
            size = len(window) * f
            up = (torch.arange(size, dtype=torch.float64) + 0.5) / (2 * overlap * f) if overlap else \
                torch.ones(size, dtype=torch.float64)
            plan.append((window, torch.minimum(up, up.flip(0)).clamp(max=1)))
            total.index_add_(0, _scale(window, f), plan[-1][1])
        return [(window, (weight / total[_scale(window, f)]).float()) for window, weight in plan]
    plan, total = [], torch.zeros(n * f, dtype=torch.float64)
    for window, _, _ in _spans(n, tile, overlap):
        if plan and plan[-1][0] == window:  # shifted inwards at the far border onto the previous one
            continue
        size = (window.stop - window.start) * f
        ramp = min(2 * overlap * f, size)
        up = (torch.arange(size, dtype=torch.float64) + 0.5) / ramp if ramp else torch.ones(size, dtype=torch.float64)
        weight = torch.ones(size, dtype=torch.float64)
        if window.start > 0:
            weight = torch.minimum(weight, up)
        if window.stop < n:
            weight = torch.minimum(weight, up.flip(0))
        plan.append((window, weight))
        total[_scale(window, f)] += weight
    return [(window, (weight / total[_scale(window, f)]).float()) for window, weight in plan]


def _windows(h: int, w: int, tile: int, overlap: int):
    for wy, ky, oy in _spans(h, tile, overlap):
        for wx, kx, ox in _spans(w, tile, overlap):
            yield (wy, wx), (ky, kx), (oy, ox)


# ---------------------------------------------------------------------------------------------
# Files

def infer_config(state_dict: Mapping[str, torch.Tensor]) -> VQGANConfig:
    """Rebuild a config from a taming-layout state dict's keys and shapes (a preset's when one matches)."""
    sd = state_dict
    try:
        n_embed, embed_dim = sd["quantize.embedding.weight"].shape
        ch, in_channels = sd["encoder.conv_in.weight"].shape[:2]
        n_levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.down."))
        ch_mult = tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(n_levels))
        num_res_blocks = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith("encoder.down.0.block."))
        z_channels = sd["encoder.conv_out.weight"].shape[0]
        out_ch = sd["decoder.conv_out.weight"].shape[0]
    except (KeyError, ValueError) as err:
        raise checkpoint.CheckpointError(
            f"cannot infer a VQGAN config from these weights (no taming VQGAN layout: {err}); "
            f"pass config= or one of the presets {', '.join(PRESETS)}") from err
    attn = [any(k.startswith(f"encoder.down.{i}.attn.") for k in sd) for i in range(n_levels)]
    cfg = VQGANConfig(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, z_channels=z_channels,
                      embed_dim=embed_dim, n_embed=n_embed, in_channels=in_channels, out_ch=out_ch,
                      resolution=256, attn_resolutions=tuple(256 // 2 ** i for i in range(n_levels) if attn[i]))
    for preset in PRESETS.values():
        if preset.attn_levels() == attn and all(getattr(preset, k) == getattr(cfg, k) for k in (
                "ch", "ch_mult", "num_res_blocks", "z_channels", "embed_dim", "n_embed", "in_channels", "out_ch")):
            return dataclasses.replace(preset)
    return cfg


def load_vqgan(path, config: VQGANConfig | None = None, allow_pickle: bool = False) -> VQModel:
    """A `.safetensors` file of ours (config in its metadata) or a taming Lightning `.ckpt` -> VQModel (eval).

    `config` overrides the file's; without either it is inferred from the weights' shapes.
    Pickled files load with weights_only=True; arbitrary objects need allow_pickle=True.
    """
    path = Path(path)
    state, meta = checkpoint.load_state_dict(path, allow_pickle=allow_pickle)
    kind = meta.get("nuwa_kind")
    if kind is not None and kind != KIND:
        raise checkpoint.CheckpointError(f"{path.name} holds a {kind!r} model, not a VQGAN ({KIND!r})")
    if config is None and "config" in meta:
        try:
            config = checkpoint.config_from_json(VQGANConfig, meta["config"])
        except (TypeError, json.JSONDecodeError) as err:
            raise checkpoint.CheckpointError(f"{path.name}: unreadable VQGAN config metadata: {err}") from err
    state = {k: v for k, v in state.items() if not k.startswith("loss.")}  # LPIPS + discriminator
    if config is None:
        config = infer_config(state)
    model = VQModel(config)
    checkpoint.load_strict(model, state, source=f"{path.name} (VQGAN {config})")
    return model.eval()


def save_vqgan(model: VQModel, path, dtype: torch.dtype | None = None) -> None:
    """Write `.safetensors` with nuwa_kind="vqgan" and the config; dtype (e.g. torch.float16) casts floats."""
    checkpoint.save_model_file(path, model.state_dict(), KIND, model.config, dtype=dtype)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
