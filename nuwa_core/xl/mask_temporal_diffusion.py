"""Mask Temporal Diffusion (NUWA-XL section 3.2): the Mask 3D-UNet eps_theta(x_t, p, t, x_0^c).

An SD-style UNet over latent videos [B, F, c, h, w] with factorized layers: spatial layers see the
frames folded into the batch, (b f) c h w; temporal layers see (b h w) c f. Temporal convolutions
start as the identity and temporal attentions with a zero output projection, as in the T-KLVAE.

The visual condition is x_0^c (latents of the given frames, zero elsewhere) and the per-frame mask
(1 = frame given, 0 = frame to generate). x_0^c goes through a cascade of strided convolutions to
every resolution; at each DownBlock/UpBlock layer zero-initialised convolutions turn it and the mask
into scale/shift (eqs. 10-11), so a fresh model ignores the condition. The global diffusion model
gets no given frames (all masked); the local one gets the first and last.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .. import checkpoint
from .t_klvae import TemporalConv

KIND = "mask_temporal_diffusion"


@dataclass
class MTDConfig:
    latent_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (0, 1, 2)  # levels with SA / PA / TA
    num_heads: int = 8
    context_dim: int = 768  # prompt embedding width (CLIP-L: 768)
    num_groups: int = 32
    temporal_kernel: int = 3
    multiscale_injection: bool = True  # "MI" of Table 2b: condition at every scale, else the highest only
    symmetric_injection: bool = True  # "SI": into DownBlocks and UpBlocks, else UpBlocks only
    # SD compatibility (defaults: the blocks the first MTD files were saved with; files without these keys
    # load with them): the transformer's MLP, "gelu" (c -> 4c -> c) or SD's "geglu" (c -> 8c gated to 4c -> c),
    # and the eps of the GroupNorm in front of each transformer (SD: 1e-6; its ResBlocks and output use 1e-5)
    feed_forward: str = "gelu"
    transformer_norm_eps: float = 1e-5

    def __post_init__(self):
        for m in self.channel_mult:
            c = self.model_channels * m
            if c % self.num_groups or c % self.num_heads:
                raise ValueError(f"channel count {c} (model_channels x {m}) must be divisible by num_groups "
                                 f"{self.num_groups} and num_heads {self.num_heads}")
        if self.feed_forward not in ("gelu", "geglu"):
            raise ValueError(f"feed_forward must be 'gelu' or 'geglu', got {self.feed_forward!r}")
        if self.temporal_kernel % 2 == 0:
            raise ValueError(f"temporal_kernel must be odd to have a centre tap, got {self.temporal_kernel}")

    @classmethod
    def sd(cls, **overrides) -> MTDConfig:
        """The SD 1.x UNet's widths, levels and blocks (GEGLU, GroupNorm eps 1e-6 before attention), with
        CLIP-L prompts: spatial weights load from an SD 1.x UNet (sd_unet.mtd_from_sd_unet)."""
        return cls(**{"feed_forward": "geglu", "transformer_norm_eps": 1e-6, **overrides})

    @classmethod
    def tiny(cls, **overrides) -> MTDConfig:
        return cls(**{"model_channels": 16, "channel_mult": (1, 2), "num_res_blocks": 1,
                      "attention_levels": (0, 1), "num_heads": 2, "context_dim": 32, "num_groups": 4,
                      **overrides})

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    def injects(self, level: int, up: bool) -> bool:
        return (up or self.symmetric_injection) and (self.multiscale_injection or level == 0)


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Float positions or timesteps t [N] -> [N, dim] (cos, sin), as SD's timestep embedding."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Spatial conv -> temporal conv, twice, with the timestep embedding added in between."""

    def __init__(self, cin: int, cout: int, temb: int, cfg: MTDConfig):
        super().__init__()
        self.norm1 = nn.GroupNorm(cfg.num_groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.conv1_t = TemporalConv(cout, cfg.temporal_kernel)
        self.emb_proj = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(cfg.num_groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv2_t = TemporalConv(cout, cfg.temporal_kernel)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor, f: int) -> torch.Tensor:
        # x: [(b f), cin, h, w], emb: [(b f), temb] -> [(b f), cout, h, w]
        h = self.conv1_t(self.conv1(F.silu(self.norm1(x))), f)
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2_t(self.conv2(F.silu(self.norm2(h))), f)
        return self.skip(x) + h


class Injection(nn.Module):
    """Eqs. 10-11: h = w^c h + b^c + h, then h = w^m h + b^m + h, with zero-initialised convolutions."""

    def __init__(self, c: int):
        super().__init__()
        self.cond = _zero(nn.Conv2d(c, 2 * c, 1))
        self.mask = _zero(nn.Conv2d(1, 2 * c, 1))

    def forward(self, h: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # h, cond: [(b f), c, h, w]; mask: [(b f), 1, h, w]
        w, b = self.cond(cond).chunk(2, dim=1)
        h = w * h + b + h
        w, b = self.mask(mask).chunk(2, dim=1)
        return w * h + b + h


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int | None = None, zero_out: bool = False):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(context_dim or dim, dim, bias=False)
        self.v = nn.Linear(context_dim or dim, dim, bias=False)
        self.out = _zero(nn.Linear(dim, dim)) if zero_out else nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        # x: [N, n, dim], context: [N, m, context_dim] -> [N, n, dim]
        context = x if context is None else context
        q, k, v = (rearrange(t, "N n (heads d) -> N heads n d", heads=self.heads)
                   for t in (self.q(x), self.k(context), self.v(context)))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(rearrange(y, "N heads n d -> N n (heads d)"))


class GEGLU(nn.Module):
    """SD's gated feed-forward input: Linear(c, 2 inner), half of it times GELU of the other half."""

    def __init__(self, c: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(c, 2 * inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class Transformer(nn.Module):
    """Spatial self-attention (SA), prompt cross-attention (PA), temporal self-attention (TA), MLP."""

    def __init__(self, c: int, cfg: MTDConfig):
        super().__init__()
        self.norm = nn.GroupNorm(cfg.num_groups, c, eps=cfg.transformer_norm_eps)
        self.proj_in = nn.Linear(c, c)
        self.ln_sa, self.sa = nn.LayerNorm(c), Attention(c, cfg.num_heads)
        self.ln_pa, self.pa = nn.LayerNorm(c), Attention(c, cfg.num_heads, cfg.context_dim)
        self.ln_ta, self.ta = nn.LayerNorm(c), Attention(c, cfg.num_heads, zero_out=True)
        self.ln_mlp = nn.LayerNorm(c)
        if cfg.feed_forward == "geglu":
            self.mlp = nn.Sequential(GEGLU(c, 4 * c), nn.Linear(4 * c, c))
        else:
            self.mlp = nn.Sequential(nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c))
        self.proj_out = nn.Linear(c, c)

    def forward(self, x: torch.Tensor, context: torch.Tensor, f: int) -> torch.Tensor:
        # x: [(b f), c, h, w], context: [(b f), n, d]
        c, hh, ww = x.shape[1:]
        h = self.proj_in(rearrange(self.norm(x), "bf c h w -> bf (h w) c"))
        h = h + self.sa(self.ln_sa(h))
        h = h + self.pa(self.ln_pa(h), context)
        t = rearrange(h, "(b f) (h w) c -> (b h w) f c", f=f, h=hh)  # every pixel's frames
        pos = sinusoidal_embedding(torch.arange(f, device=x.device), c).to(t.dtype)  # which frame is which
        t = t + self.ta(self.ln_ta(t) + pos)
        h = rearrange(t, "(b h w) f c -> (b f) (h w) c", h=hh, w=ww)
        h = h + self.mlp(self.ln_mlp(h))
        return x + rearrange(self.proj_out(h), "bf (h w) c -> bf c h w", h=hh)


class Layer(nn.Module):
    """ResBlock, then the condition injection and the attention stack where configured."""

    def __init__(self, cin: int, cout: int, temb: int, cfg: MTDConfig, attention: bool, inject: bool):
        super().__init__()
        self.res = ResBlock(cin, cout, temb, cfg)
        self.inject = Injection(cout) if inject else None
        self.attn = Transformer(cout, cfg) if attention else None

    def forward(self, h, emb, context, cond, mask, f):
        h = self.res(h, emb, f)
        if self.inject is not None:
            h = self.inject(h, cond, mask)
        return h if self.attn is None else self.attn(h, context, f)


class MaskTemporalDiffusion(nn.Module):
    def __init__(self, config: MTDConfig):
        super().__init__()
        self.config = cfg = config
        mc, chans = cfg.model_channels, [cfg.model_channels * m for m in cfg.channel_mult]
        temb = 4 * mc
        self.time_embed = nn.Sequential(nn.Linear(mc, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.conv_in = nn.Conv2d(cfg.latent_channels, mc, 3, padding=1)
        self.conv_in_t = TemporalConv(mc, cfg.temporal_kernel)

        # x_0^c cascade: one feature map per level that receives the condition
        n_cond = len(chans) if cfg.multiscale_injection else 1
        self.cond_in = nn.Conv2d(cfg.latent_channels, chans[0], 3, padding=1)
        self.cond_down = nn.ModuleList(nn.Conv2d(chans[i - 1], chans[i], 3, stride=2, padding=1)
                                       for i in range(1, n_cond))

        skips, c = [mc], mc
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        for i, cout in enumerate(chans):
            self.down.append(nn.ModuleList(
                Layer(c if j == 0 else cout, cout, temb, cfg, i in cfg.attention_levels, cfg.injects(i, up=False))
                for j in range(cfg.num_res_blocks)))
            c = cout
            skips += [c] * cfg.num_res_blocks
            if i < len(chans) - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.mid = nn.ModuleList([Layer(c, c, temb, cfg, True, False), Layer(c, c, temb, cfg, False, False)])
        self.up = nn.ModuleList()  # up[i] is level i (0 = full resolution), run from the deepest
        self.upsample = nn.ModuleList()
        up_levels, upsamples = [], []
        for i in reversed(range(len(chans))):
            cout, layers = chans[i], []
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(Layer(c + skips.pop(), cout, temb, cfg, i in cfg.attention_levels,
                                    cfg.injects(i, up=True)))
                c = cout
            up_levels.append(nn.ModuleList(layers))
            if i > 0:
                upsamples.append(nn.Conv2d(c, c, 3, padding=1))
        self.up.extend(reversed(up_levels))
        self.upsample.extend(reversed(upsamples))  # upsample[i - 1] takes level i up to level i - 1
        self.norm_out = nn.GroupNorm(cfg.num_groups, c)
        self.conv_out = nn.Conv2d(c, cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor,
                cond: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """eps_theta: x [B, F, c, h, w] noisy latents; t [B] (or one) float timesteps in [0, 999];
        context [B, F, n, d] one prompt per frame, or [B, n, d] for all frames; cond [B, F, c, h, w]
        latents of the given frames (zero elsewhere) and mask [B, F] (1 = given), both None for no
        given frame. -> [B, F, c, h, w]"""
        b, f = self._check(x, context, cond, mask)
        cfg = self.config
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(-1).expand(b)
        weights = self.time_embed[0].weight.dtype  # fp16 / bf16 weights take their own dtype's input
        emb = self.time_embed(sinusoidal_embedding(t, cfg.model_channels).to(weights)).to(x.dtype)
        emb = emb.repeat_interleave(f, dim=0)  # [(b f), temb]
        if context.ndim == 3:
            context = context[:, None].expand(b, f, *context.shape[1:])
        context = context.flatten(0, 1).to(x.dtype)  # [(b f), n, d]
        if cond is None:
            cond, mask = torch.zeros_like(x), torch.zeros(b, f, device=x.device, dtype=x.dtype)

        conds = [F.silu(self.cond_in(cond.flatten(0, 1).to(x.dtype)))]  # per level [(b f), c_i, h_i, w_i]
        for conv in self.cond_down:
            conds.append(F.silu(conv(conds[-1])))
        masks = [mask.to(x.dtype).reshape(b * f, 1, 1, 1).expand(-1, 1, *c.shape[2:]) for c in conds]

        def level_cond(i):
            return (conds[i], masks[i]) if i < len(conds) else (None, None)

        h = self.conv_in_t(self.conv_in(x.flatten(0, 1)), f)  # [(b f), mc, h, w]
        skips = [h]
        for i, layers in enumerate(self.down):
            for layer in layers:
                h = layer(h, emb, context, *level_cond(i), f)
                skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
                skips.append(h)
        for layer in self.mid:
            h = layer(h, emb, context, None, None, f)
        for i in reversed(range(len(self.up))):
            for layer in self.up[i]:
                h = layer(torch.cat([h, skips.pop()], dim=1), emb, context, *level_cond(i), f)
            if i > 0:
                h = self.upsample[i - 1](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        out = self.conv_out(F.silu(self.norm_out(h)))
        return out.view(b, f, *out.shape[1:])

    def _check(self, x, context, cond, mask) -> tuple[int, int]:
        cfg = self.config
        if x.ndim != 5 or x.shape[2] != cfg.latent_channels:
            raise ValueError(f"expected latents [B, F, {cfg.latent_channels}, h, w], got {tuple(x.shape)}")
        b, f, _, h, w = x.shape
        if h % cfg.downsample_factor or w % cfg.downsample_factor:
            raise ValueError(f"latent height and width must be multiples of {cfg.downsample_factor}, got {h}x{w}")
        if context.shape[-1] != cfg.context_dim or context.ndim not in (3, 4) or context.shape[0] != b or (
                context.ndim == 4 and context.shape[1] != f):
            raise ValueError(f"expected prompt embeddings [{b}, {f}, n, {cfg.context_dim}] or [{b}, n, "
                             f"{cfg.context_dim}], got {tuple(context.shape)}")
        if (cond is None) != (mask is None):
            raise ValueError("pass cond and mask together (or neither, for no given frame)")
        if cond is not None and (cond.shape != x.shape or tuple(mask.shape) != (b, f)):
            raise ValueError(f"expected cond {tuple(x.shape)} and mask ({b}, {f}), got {tuple(cond.shape)} "
                             f"and {tuple(mask.shape)}")
        return b, f


def save_mtd(model: MaskTemporalDiffusion, path, dtype: torch.dtype | None = None) -> None:
    checkpoint.save_model_file(path, model.state_dict(), KIND, model.config, dtype=dtype)


def load_mtd_with_metadata(path, allow_pickle: bool = False) -> tuple[MaskTemporalDiffusion, dict]:
    """An MTD file -> (model, the file's metadata)."""
    state, metadata = checkpoint.load_state_dict(path, allow_pickle=allow_pickle)
    name = getattr(path, "name", str(path))
    if metadata.get("nuwa_kind") != KIND or "config" not in metadata:
        raise checkpoint.CheckpointError(
            f"{name} is not a Mask Temporal Diffusion file (nuwa_kind={metadata.get('nuwa_kind')!r}, expected "
            f"{KIND!r} with a config): pick the MTD file (a T-KLVAE goes in its own slot); MTD files are "
            f"written by mask_temporal_diffusion.save_mtd and `python -m nuwa_core.train xl`")
    model = MaskTemporalDiffusion(checkpoint.config_from_json(MTDConfig, metadata["config"]))
    checkpoint.load_strict(model, state, name)
    return model, metadata


def load_mtd(path, allow_pickle: bool = False) -> MaskTemporalDiffusion:
    return load_mtd_with_metadata(path, allow_pickle)[0]
