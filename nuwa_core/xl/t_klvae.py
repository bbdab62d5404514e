"""T-KLVAE (NUWA-XL section 3.1): the Stable Diffusion KL autoencoder plus temporal layers.

Spatial modules keep the LDM key names of SD 1.x VAE files (`encoder.down.0.block.0.conv1.weight`,
...), so an image VAE loads into them unchanged. Each 3x3 spatial convolution gets a sibling
`<name>_t`, a temporal Conv1d initialised as the identity (eq. 1), and each spatial attention
`attn_1` a sibling `attn_1_t`, a temporal attention whose output projection is zero (eq. 2), so a
fresh T-KLVAE equals the image VAE frame by frame.

Videos are [B, F, 3, H, W] in -1..1, latents [B, F, z, H/8, W/8] (SD preset), unscaled: callers
multiply by `config.latent_scale` (0.18215) before diffusion and divide after.

Long videos: `encode` / `decode` take `chunk` (frames per temporal window) and `overlap` (frames
consecutive windows share, default chunk - 1: a window starts at every frame). Each window goes
through the network on its own and the windows are cross-faded over their shared frames with linear
weights that sum to 1 at every frame (temporal_windows), so no frame sees a hard chunk boundary and
memory is that of `chunk` frames. With the default every frame but the first and last chunk - 1 is
the same mix of every window position (no period at all: a stride of chunk // 2 leaves a flicker
with that period, measured in bench/xl_vae_chunks.py), at about `chunk` times a hard cut's work. `config.clip_frames` records the clip length the model was trained on (4 when a file does
not say): the callers' default chunk.

T-KLVAE files carry `nuwa_kind="t_klvae"` in their metadata and the tensor `MARKER_KEY`, so
neither this loader nor ComfyUI's stock VAE loader takes one for a plain VAE (which would silently
drop the temporal weights).
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .. import checkpoint
from ..checkpoint import CheckpointError

KIND = "t_klvae"
MARKER_KEY = "nuwa_t_klvae.version"
FORMAT_VERSION = 1
LDM_PREFIX = "first_stage_model."


@dataclass
class TKLVAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    double_z: bool = True
    num_groups: int = 32
    temporal: bool = True  # False: the plain image KLVAE (same keys minus the temporal layers)
    temporal_kernel: int = 3
    latent_scale: float = 0.18215  # applied outside the VAE
    clip_frames: int = 4  # frames per training clip (training records it): the default chunk for long videos

    def __post_init__(self):
        for m in self.ch_mult:
            if (self.ch * m) % self.num_groups:
                raise ValueError(f"channel count {self.ch * m} (ch {self.ch} x ch_mult {m}) is not divisible by "
                                 f"num_groups {self.num_groups}; pick ch and num_groups so it is")
        if self.temporal_kernel % 2 == 0:
            raise ValueError(f"temporal_kernel must be odd to have a centre tap, got {self.temporal_kernel}")
        if int(self.clip_frames) < 1:
            raise ValueError(f"clip_frames must be >= 1, got {self.clip_frames}")

    @classmethod
    def sd(cls, **overrides) -> "TKLVAEConfig":
        """Stable Diffusion 1.x AutoencoderKL (downsampling x8, 4 latent channels)."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides) -> "TKLVAEConfig":
        """A few thousand parameters, downsampling x2, for tests and CPU."""
        return cls(**{"ch": 8, "ch_mult": (1, 2), "num_res_blocks": 1, "num_groups": 4, **overrides})

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


def _norm(c: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, c, eps=1e-6, affine=True)


def to_frames(x: torch.Tensor, f: int) -> torch.Tensor:
    """Every pixel's sequence of frames, for the temporal layers."""
    return rearrange(x, "(b f) c h w -> (b h w) c f", f=f)


def from_frames(x: torch.Tensor, f: int, h: int, w: int) -> torch.Tensor:
    """The inverse of to_frames: back to a batch of frames."""
    return rearrange(x, "(b h w) c f -> (b f) c h w", f=f, h=h, w=w)


def _whole(x, what: str) -> int:
    if isinstance(x, bool):
        raise TypeError(f"{what} must be a whole number, got {x!r}")
    try:
        return operator.index(x)
    except TypeError:
        raise TypeError(f"{what} must be a whole number, got {x!r}") from None


def temporal_windows(n: int, chunk: int, overlap: int | None = None) -> list[tuple[int, int, torch.Tensor]]:
    """The cross-fade plan of n frames: [(start, stop, weight [stop - start] float64)].

    Windows of `chunk` frames start every chunk - overlap frames; the last one is shifted inwards to end
    at frame n, so every window has the full `chunk` frames of context. A window's weight ramps up
    linearly over the frames it shares with the previous window and down over those it shares with the
    next ((i + 1) / (shared + 1) from its edge), and the weights are normalised so that they sum to
    exactly 1 at every frame. overlap: default chunk - 1. One window (chunk >= n) has weight 1.
    """
    chunk = _whole(chunk, "chunk (frames per temporal window)")
    if chunk < 1:
        raise ValueError(f"chunk (frames per temporal window) must be >= 1, got {chunk}")
    overlap = chunk - 1 if overlap is None else _whole(overlap, "overlap (frames consecutive windows share)")
    if not 0 <= overlap < chunk:
        raise ValueError(f"overlap (frames consecutive windows share) must be in 0..chunk - 1 = 0..{chunk - 1}, "
                         f"got {overlap}")
    if n <= chunk:
        return [(0, n, torch.ones(n, dtype=torch.float64))]
    starts = [*range(0, n - chunk, chunk - overlap), n - chunk]
    total = torch.zeros(n, dtype=torch.float64)
    plan = []
    for k, a in enumerate(starts):
        weight = torch.ones(chunk, dtype=torch.float64)
        edge = torch.arange(1, chunk + 1, dtype=torch.float64)  # 1 at the window's first frame
        if k > 0:  # frames shared with the previous window
            weight = torch.minimum(weight, edge / (starts[k - 1] + chunk - a + 1))
        if k + 1 < len(starts):  # frames shared with the next window
            weight = torch.minimum(weight, edge.flip(0) / (a + chunk - starts[k + 1] + 1))
        plan.append((a, a + chunk, weight))
        total[a:a + chunk] += weight
    return [(a, e, w / total[a:e]) for a, e, w in plan]


class TemporalConv(nn.Conv1d):
    """Conv1d over the frames of every pixel, initialised as the identity: W[i, i, (k-1)/2] = 1 (eq. 1)."""

    def __init__(self, c: int, k: int):
        super().__init__(c, c, k, padding=k // 2)
        with torch.no_grad():
            self.weight.zero_()
            self.weight[range(c), range(c), k // 2] = 1.0
            self.bias.zero_()

    def forward(self, x: torch.Tensor, f: int) -> torch.Tensor:  # x: [(b f), c, h, w]
        return from_frames(super().forward(to_frames(x, f)), f, x.shape[2], x.shape[3])


class NoTemporal(nn.Module):
    """Stands in for a temporal layer in the image VAE (temporal=False); has no weights."""

    def forward(self, x: torch.Tensor, f: int) -> torch.Tensor:
        return x


def _temporal_conv(c: int, cfg: TKLVAEConfig) -> nn.Module:
    return TemporalConv(c, cfg.temporal_kernel) if cfg.temporal else NoTemporal()


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, cfg: TKLVAEConfig):
        super().__init__()
        self.norm1 = _norm(cin, cfg.num_groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.conv1_t = _temporal_conv(cout, cfg)
        self.norm2 = _norm(cout, cfg.num_groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv2_t = _temporal_conv(cout, cfg)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, f: int) -> torch.Tensor:  # [(b f), c, h, w]
        h = self.conv1_t(self.conv1(F.silu(self.norm1(x))), f)
        h = self.conv2_t(self.conv2(F.silu(self.norm2(h))), f)
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """LDM's single-head spatial self-attention with 1x1-conv projections."""

    def __init__(self, c: int, cfg: TKLVAEConfig):
        super().__init__()
        self.norm = _norm(c, cfg.num_groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [(b f), c, h, w]
        bf, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (p(y).flatten(2).transpose(1, 2) for p in (self.q, self.k, self.v))  # [(b f), hw, c]
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(bf, c, h, w)
        return x + self.proj_out(y)


class TemporalAttention(nn.Module):
    """Single-head self-attention over the frames of every pixel; proj_out starts at zero (eq. 2)."""

    def __init__(self, c: int, cfg: TKLVAEConfig):
        super().__init__()
        self.norm = _norm(c, cfg.num_groups)
        self.q, self.k, self.v, self.proj_out = (nn.Linear(c, c) for _ in range(4))
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, f: int) -> torch.Tensor:  # [(b f), c, h, w]
        y = self.norm(to_frames(x, f)).transpose(1, 2)  # [(b h w), f, c]
        y = F.scaled_dot_product_attention(self.q(y), self.k(y), self.v(y))
        return x + from_frames(self.proj_out(y).transpose(1, 2), f, x.shape[2], x.shape[3])


class Downsample(nn.Module):
    def __init__(self, c: int, cfg: TKLVAEConfig):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)
        self.conv_t = _temporal_conv(c, cfg)

    def forward(self, x: torch.Tensor, f: int) -> torch.Tensor:
        return self.conv_t(self.conv(F.pad(x, (0, 1, 0, 1))), f)  # LDM's asymmetric padding


class Upsample(nn.Module):
    def __init__(self, c: int, cfg: TKLVAEConfig):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.conv_t = _temporal_conv(c, cfg)

    def forward(self, x: torch.Tensor, f: int) -> torch.Tensor:
        return self.conv_t(self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest")), f)


class Level(nn.Module):
    """One resolution of the encoder (`down.i`, ending in `downsample`) or decoder (`up.i`, `upsample`)."""

    def __init__(self, blocks: list[ResnetBlock], downsample: Downsample | None = None,
                 upsample: Upsample | None = None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if downsample is not None:
            self.downsample = downsample
        if upsample is not None:
            self.upsample = upsample

    def forward(self, x: torch.Tensor, f: int) -> torch.Tensor:
        for block in self.block:
            x = block(x, f)
        for name in ("downsample", "upsample"):
            if hasattr(self, name):
                x = getattr(self, name)(x, f)
        return x


class Mid(nn.Module):
    def __init__(self, c: int, cfg: TKLVAEConfig):
        super().__init__()
        self.block_1 = ResnetBlock(c, c, cfg)
        self.attn_1 = AttnBlock(c, cfg)
        self.attn_1_t = TemporalAttention(c, cfg) if cfg.temporal else NoTemporal()
        self.block_2 = ResnetBlock(c, c, cfg)

    def forward(self, x: torch.Tensor, f: int) -> torch.Tensor:
        return self.block_2(self.attn_1_t(self.attn_1(self.block_1(x, f)), f), f)


class Encoder(nn.Module):
    def __init__(self, cfg: TKLVAEConfig):
        super().__init__()
        chans = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.conv_in_t = _temporal_conv(cfg.ch, cfg)
        levels, cin = [], cfg.ch
        for i, cout in enumerate(chans):
            blocks = [ResnetBlock(cin if j == 0 else cout, cout, cfg) for j in range(cfg.num_res_blocks)]
            down = Downsample(cout, cfg) if i < len(chans) - 1 else None
            levels.append(Level(blocks, downsample=down))
            cin = cout
        self.down = nn.ModuleList(levels)
        self.mid = Mid(cin, cfg)
        self.norm_out = _norm(cin, cfg.num_groups)
        zc = 2 * cfg.z_channels if cfg.double_z else cfg.z_channels
        self.conv_out = nn.Conv2d(cin, zc, 3, padding=1)
        self.conv_out_t = _temporal_conv(zc, cfg)

    def forward(self, x: torch.Tensor, f: int) -> torch.Tensor:  # [(b f), 3, H, W] -> [(b f), 2z, h, w]
        h = self.conv_in_t(self.conv_in(x), f)
        for level in self.down:
            h = level(h, f)
        h = self.mid(h, f)
        return self.conv_out_t(self.conv_out(F.silu(self.norm_out(h))), f)


class Decoder(nn.Module):
    def __init__(self, cfg: TKLVAEConfig):
        super().__init__()
        chans = [cfg.ch * m for m in cfg.ch_mult]
        cin = chans[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.conv_in_t = _temporal_conv(cin, cfg)
        self.mid = Mid(cin, cfg)
        levels = []
        for i in reversed(range(len(chans))):
            cout = chans[i]
            blocks = [ResnetBlock(cin if j == 0 else cout, cout, cfg) for j in range(cfg.num_res_blocks + 1)]
            levels.append(Level(blocks, upsample=Upsample(cout, cfg) if i > 0 else None))
            cin = cout
        self.up = nn.ModuleList(reversed(levels))  # up.0 is the full resolution, as in LDM
        self.norm_out = _norm(cin, cfg.num_groups)
        self.conv_out = nn.Conv2d(cin, cfg.out_channels, 3, padding=1)
        self.conv_out_t = _temporal_conv(cfg.out_channels, cfg)

    def forward(self, z: torch.Tensor, f: int) -> torch.Tensor:  # [(b f), z, h, w] -> [(b f), 3, H, W]
        h = self.mid(self.conv_in_t(self.conv_in(z), f), f)
        for level in reversed(self.up):
            h = level(h, f)
        return self.conv_out_t(self.conv_out(F.silu(self.norm_out(h))), f)


class TKLVAE(nn.Module):
    def __init__(self, config: TKLVAEConfig):
        super().__init__()
        self.config = config
        zc = 2 * config.z_channels if config.double_z else config.z_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(zc, zc, 1)
        self.post_quant_conv = nn.Conv2d(config.z_channels, config.z_channels, 1)

    def _check(self, x: torch.Tensor, channels: int, what: str, multiple: int) -> None:
        if x.ndim != 5 or x.shape[2] != channels:
            raise ValueError(f"expected {what} of shape [B, F, {channels}, H, W], got {tuple(x.shape)}")
        if x.shape[3] % multiple or x.shape[4] % multiple:
            raise ValueError(f"{what} height and width must be multiples of {multiple}, got "
                             f"{x.shape[3]}x{x.shape[4]}")

    def _windows(self, x: torch.Tensor, chunk: int | None, overlap: int | None):
        """Yield (start, stop, weight) of x's frames [B, F, ...] (see temporal_windows); chunk None: one."""
        f = x.shape[1]
        if chunk is not None and not self.config.temporal:
            overlap = 0  # frames are independent: windows side by side give the same result
        return temporal_windows(f, f if chunk is None else chunk, overlap)

    @staticmethod
    def _blend(x: torch.Tensor, plan, run) -> torch.Tensor:
        """run(x[:, a:e]) for every window, cross-faded into one [B, F, ...] tensor on x's device (a
        single window: run(x) as it is)."""
        if len(plan) == 1:
            return run(x)
        out = None
        for a, e, w in plan:
            y = run(x[:, a:e])
            if out is None:
                out = torch.zeros((x.shape[0], x.shape[1], *y.shape[2:]), dtype=torch.float32, device=x.device)
            out[:, a:e] += (y.float() * w.to(y.device, torch.float32).view(1, -1, *[1] * (y.ndim - 2))).to(x.device)
        return out.to(y.dtype)

    def _device(self) -> torch.device:
        return self.post_quant_conv.weight.device

    def encode(self, video: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None,
               chunk: int | None = None, overlap: int | None = None) -> torch.Tensor:
        """[B, F, 3, H, W] in -1..1 -> unscaled latents [B, F, z, h, w]: the posterior mean, or a draw.

        chunk: frames per temporal window (None: the whole clip at once), overlapping by `overlap`
        frames (default chunk - 1) and cross-faded (mean and log-variance; a draw is made once, from
        the blended posterior). With chunks each window moves to the model's device and the result
        stays on the video's."""
        self._check(video, self.config.in_channels, "video", self.config.downsample_factor)

        def run(x: torch.Tensor) -> torch.Tensor:
            b, f = x.shape[:2]
            m = self.quant_conv(self.encoder(x.to(self._device()).flatten(0, 1), f))
            return m.view(b, f, *m.shape[1:])

        moments = self._blend(video, self._windows(video, chunk, overlap), run)
        if self.config.double_z:
            mean, logvar = moments.chunk(2, dim=2)
            if sample:
                std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
                # drawn on the CPU (generator: a CPU generator), then moved: the same draw on every device
                noise = torch.randn(tuple(mean.flatten(0, 1).shape), generator=generator, dtype=torch.float32)
                mean = mean + std * noise.view(mean.shape).to(mean.device, mean.dtype)
        else:
            mean = moments
        return mean

    def decode(self, z: torch.Tensor, chunk: int | None = None, overlap: int | None = None) -> torch.Tensor:
        """Unscaled latents [B, F, z, h, w] -> video [B, F, 3, H, W] (about -1..1).

        chunk: frames per temporal window (None: the whole clip at once), overlapping by `overlap`
        frames (default chunk - 1) and cross-faded; memory is that of `chunk` frames. With chunks
        each window moves to the model's device and the video is assembled on z's device."""
        self._check(z, self.config.z_channels, "latents", 1)

        def run(x: torch.Tensor) -> torch.Tensor:
            b, f = x.shape[:2]
            y = self.decoder(self.post_quant_conv(x.to(self._device()).flatten(0, 1)), f)
            return y.view(b, f, *y.shape[1:])

        return self._blend(z, self._windows(z, chunk, overlap), run)

    def temporal_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights an image VAE file does not have."""
        temporal = tuple(name + "." for name, m in self.named_modules()
                         if isinstance(m, (TemporalConv, TemporalAttention)))
        return {k: v for k, v in self.state_dict().items() if k.startswith(temporal)}


# ---- files --------------------------------------------------------------------------------------

def save_t_klvae(model: TKLVAE, path, dtype: torch.dtype | None = None) -> None:
    state = {**model.state_dict(), MARKER_KEY: torch.tensor([FORMAT_VERSION], dtype=torch.int32)}
    checkpoint.save_model_file(path, state, KIND, model.config, dtype=dtype)


def load_t_klvae(path, config: TKLVAEConfig | None = None, allow_pickle: bool = False) -> TKLVAE:
    """A T-KLVAE file, or an SD 1.x image VAE file (LDM, `first_stage_model.`-prefixed or diffusers
    names) whose temporal layers then start as the identity."""
    state, metadata = checkpoint.load_state_dict(path, allow_pickle=allow_pickle)
    return t_klvae_from_state_dict(state, metadata, config, source=Path(path).name)


def t_klvae_from_state_dict(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                            config: TKLVAEConfig | None = None, source: str = "state dict") -> TKLVAE:
    metadata = metadata or {}
    kind = metadata.get("nuwa_kind")
    if kind == KIND or MARKER_KEY in state:
        if config is None:
            if "config" not in metadata:
                raise CheckpointError(f"{source} is a T-KLVAE file without its config metadata; "
                                      f"pass config=TKLVAEConfig(...) matching its weights")
            config = checkpoint.config_from_json(TKLVAEConfig, metadata["config"])
        model = TKLVAE(config)
        checkpoint.load_strict(model, state, source, drop_prefixes=(MARKER_KEY,))
        return model
    if kind is not None:
        raise CheckpointError(f"{source} is a NUWA {kind!r} file, not a T-KLVAE or an SD image VAE")
    state = image_vae_state_dict(state, source)
    z, expected = state["decoder.conv_in.weight"].shape[1], (config or TKLVAEConfig.sd()).z_channels
    if z != expected:
        raise CheckpointError(f"{source} is a VAE with {z} latent channels (SD3 and Flux VAEs have 16) but the "
                              f"T-KLVAE config expects {expected}; T-KLVAE builds on the SD 1.x "
                              f"KL autoencoder with 4 latent channels")
    model = TKLVAE(config or config_from_image_vae(state))
    checkpoint.load_strict(model, {**model.temporal_state_dict(), **state}, source)
    return model


def image_vae_state_dict(state: Mapping[str, torch.Tensor], source: str = "state dict") -> dict[str, torch.Tensor]:
    """An image VAE's weights under LDM names: strips `first_stage_model.`, converts diffusers names,
    and says what the file is when it is no KL autoencoder at all."""
    if any(k.startswith(LDM_PREFIX) for k in state):
        state = {k[len(LDM_PREFIX):]: v for k, v in state.items() if k.startswith(LDM_PREFIX)}
    if "quantize.embedding.weight" in state:
        raise CheckpointError(f"{source} is a taming VQGAN (VQModel, discrete codebook) file; load it as the "
                              f"NUWA-Infinity tokenizer (nuwa_core.vqgan). T-KLVAE needs an SD 1.x KL VAE")
    if any(k.startswith("model.diffusion_model.") for k in state) and "decoder.conv_in.weight" not in state:
        raise CheckpointError(f"{source} is a diffusion model checkpoint without VAE weights "
                              f"(no first_stage_model.* keys); pass an SD 1.x VAE file")
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in state):
        state = diffusers_to_ldm(state)
    if "decoder.conv_in.weight" not in state or "encoder.conv_in.weight" not in state:
        raise CheckpointError(f"{source} holds no KL autoencoder: expected keys like encoder.conv_in.weight and "
                              f"decoder.conv_in.weight (LDM), first_stage_model.* (a whole SD checkpoint) or "
                              f"encoder.down_blocks.* (diffusers); found e.g. {sorted(state)[:5]}")
    return dict(state)


def config_from_image_vae(state: Mapping[str, torch.Tensor], **overrides) -> TKLVAEConfig:
    """Read ch, ch_mult, num_res_blocks, z and double_z off an LDM-named image VAE state dict."""
    ch = state["encoder.conv_in.weight"].shape[0]
    levels = sorted({int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    ch_mult = tuple(state[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in levels)
    num_res_blocks = len({k.split(".")[4] for k in state if k.startswith("encoder.down.0.block.")})
    z = state["decoder.conv_in.weight"].shape[1]
    found = dict(in_channels=state["encoder.conv_in.weight"].shape[1], out_channels=state["decoder.conv_out.weight"].shape[0],
                 ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, z_channels=z,
                 double_z=state["encoder.conv_out.weight"].shape[0] == 2 * z)
    return TKLVAEConfig(**{**found, **overrides})


_ATTN_NAMES = {"group_norm": "norm", "to_q": "q", "query": "q", "to_k": "k", "key": "k", "to_v": "v",
               "value": "v", "to_out.0": "proj_out", "proj_attn": "proj_out"}


def diffusers_to_ldm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL names -> LDM names; Linear attention weights [c, c] -> 1x1 conv [c, c, 1, 1]."""
    n_up = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))), default=0)
    rules = [
        (r"^(encoder|decoder)\.conv_norm_out\.", lambda m: f"{m[1]}.norm_out."),
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"encoder.down.{m[1]}.block.{m[2]}."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.", lambda m: f"encoder.down.{m[1]}.downsample.conv."),
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
         lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}."),
        (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.",
         lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv."),
        (r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m[1]) + 1}."),
        (r"\.mid_block\.attentions\.0\.(group_norm|to_q|query|to_k|key|to_v|value|to_out\.0|proj_attn)\.",
         lambda m: f".mid.attn_1.{_ATTN_NAMES[m[1]]}."),
        (r"\.conv_shortcut\.", lambda m: ".nin_shortcut."),
    ]
    out = {}
    for key, value in state.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        if re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", key) and value.ndim == 2:
            value = value[:, :, None, None]
        out[key] = value
    return out
