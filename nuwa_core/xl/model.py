"""NUWA-XL inference: the T-KLVAE + Mask Temporal Diffusion bundle the nodes and samples use.

Model files: the T-KLVAE through t_klvae.save_t_klvae; the MTD as mask_temporal_diffusion files
(loadable by load_mtd) plus the metadata key `nuwa_xl` (JSON: role, L, depth, prompts, fps, frame
size, and for a prompted model `text_encoder`: the name, width and file sha256 of the text encoder it
was trained with) that the nodes read for their defaults and checks. Training (`python -m
nuwa_core.train t_klvae|xl`) lives in training/t_klvae.py and training/xl.py.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from einops import rearrange
from PIL import Image

from .. import checkpoint
from .diffusion_over_diffusion import fill_between, generate_keyframes, generate_long_video
from .mask_temporal_diffusion import KIND as MTD_KIND, MaskTemporalDiffusion, load_mtd_with_metadata
from .t_klvae import TKLVAE, load_t_klvae

XL_META_KEY = "nuwa_xl"


def save_mtd_xl(model: MaskTemporalDiffusion, path, info: dict, dtype: torch.dtype | None = None) -> None:
    checkpoint.save_model_file(path, model.state_dict(), MTD_KIND, model.config,
                               extra_metadata={XL_META_KEY: json.dumps(info, sort_keys=True)}, dtype=dtype)


def load_mtd_xl(path) -> tuple[MaskTemporalDiffusion, dict]:
    """An MTD file and its `nuwa_xl` info ({} for files saved by save_mtd)."""
    model, metadata = load_mtd_with_metadata(path)
    return model, json.loads(metadata.get(XL_META_KEY, "{}"))


@dataclass
class XLModel:
    """T-KLVAE + global and local MTD (the same object when one model serves both), with the info
    saved next to the MTD weights (L, depth, fps, frame size, whether it takes prompts)."""
    vae: TKLVAE
    global_mtd: MaskTemporalDiffusion
    local_mtd: MaskTemporalDiffusion
    info: dict = field(default_factory=dict)

    @classmethod
    def load(cls, vae_path, mtd_path, local_mtd_path=None, dtype: torch.dtype = torch.float32,
             vae_dtype: torch.dtype | None = None) -> "XLModel":
        """dtype: the MTDs' weights and compute dtype (fp16 / bf16 where the device supports them);
        vae_dtype: the T-KLVAE's (default: dtype)."""
        vae = load_t_klvae(vae_path).eval()
        g, info = load_mtd_xl(mtd_path)
        l = g
        if local_mtd_path is not None and Path(local_mtd_path) != Path(mtd_path):
            l, linfo = load_mtd_xl(local_mtd_path)
            info = {**linfo, **info}
        info = {**info, "file": Path(mtd_path).name}
        for m in {id(g): g, id(l): l}.values():
            m.eval()
            if m.config.latent_channels != vae.config.z_channels:
                raise checkpoint.CheckpointError(
                    f"the MTD takes {m.config.latent_channels}-channel latents but the T-KLVAE makes "
                    f"{vae.config.z_channels}; pick a matching pair")
        return cls(vae, g, l, info).to_dtypes(dtype, vae_dtype)

    def to_dtypes(self, dtype: torch.dtype = torch.float32, vae_dtype: torch.dtype | None = None) -> XLModel:
        """Weights (and compute) of the MTDs in `dtype`, of the T-KLVAE in `vae_dtype` (default: dtype).
        Samplers keep their latents in float32 (diffusion_over_diffusion.in_model_dtype)."""
        for m in {id(self.global_mtd): self.global_mtd, id(self.local_mtd): self.local_mtd}.values():
            m.to(dtype=dtype)
        self.vae.to(dtype=vae_dtype or dtype)
        return self

    @property
    def context_dim(self) -> int:
        return self.global_mtd.config.context_dim

    @property
    def takes_prompts(self) -> bool:
        return self.info.get("prompts", "text") != "none"

    @property
    def text_encoder(self) -> dict:
        """{"name", "width", "sha256"} of the text encoder the model was trained with ({} if not recorded)."""
        return dict(self.info.get("text_encoder") or {})

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
        """The global MTD's device (ComfyUI may hold the T-KLVAE and a local MTD elsewhere: each
        network's inputs go to its own device)."""
        return next(self.global_mtd.parameters()).device

    @staticmethod
    def _place(module) -> dict:
        p = next(module.parameters())
        return {"device": p.device, "dtype": p.dtype}

    def null_prompts(self, frames: int = 1) -> torch.Tensor:
        return torch.zeros(frames, 1, self.context_dim, device=self.device)

    def _chunking(self, chunk: int | None, overlap: int | None, frames_apart: float) -> tuple[int, int | None]:
        """The T-KLVAE's temporal windows: `chunk` frames (default: the clip length it was trained on)
        overlapping by `overlap` (default chunk - 1); frames further apart than neighbours
        (keyframes, frames_apart > 1) each go through alone, so no temporal layer mixes them."""
        if frames_apart > 1:
            return 1, 0
        return (self.vae.config.clip_frames if chunk is None else chunk), overlap

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, chunk: int | None = None, overlap: int | None = None,
               frames_apart: float = 1.0) -> torch.Tensor:
        """Diffusion latents [N, c, h, w] -> frames [N, 3, H, W] in -1..1 (float32), in overlapping,
        cross-faded windows of `chunk` frames (t_klvae.temporal_windows; default: the T-KLVAE's
        training clip length, config.clip_frames); frames_apart > 1 (keyframes): each frame alone."""
        chunk, overlap = self._chunking(chunk, overlap, frames_apart)
        z = latents.to(**self._place(self.vae)) / self.vae.config.latent_scale
        return self.vae.decode(z[None], chunk=chunk, overlap=overlap)[0].float()

    @torch.no_grad()
    def encode(self, frames: torch.Tensor, chunk: int | None = None, overlap: int | None = None,
               frames_apart: float = 1.0) -> torch.Tensor:
        """Frames [N, 3, H, W] in -1..1 -> diffusion latents [N, c, h, w] (float32), in the windows
        decode uses; frames_apart > 1 (frames that are not neighbours in time): each frame alone."""
        chunk, overlap = self._chunking(chunk, overlap, frames_apart)
        x = frames.to(**self._place(self.vae))
        return self.vae.encode(x[None], chunk=chunk, overlap=overlap)[0].float() * self.vae.config.latent_scale

    # Without prompts there is nothing to guide: guidance is then off (the null prompt twice is one pass).

    @torch.no_grad()
    def keyframes(self, prompts, L, steps, seed, callback=None, width=0, height=0, guidance=1.0):
        gen = torch.Generator().manual_seed(seed)  # CPU noise: the same video on every device
        guidance = 1.0 if prompts is None else guidance
        prompts = self.null_prompts() if prompts is None else prompts.to(self.device)
        return generate_keyframes(self.global_mtd, prompts, L, self.latent_shape(width, height), steps=steps,
                                  generator=gen, callback=callback, guidance=guidance)

    @torch.no_grad()
    def fill(self, keyframes, prompts, L, steps, seed, callback=None, max_batch=None, guidance=1.0):
        gen = torch.Generator().manual_seed(seed)  # CPU noise: the same video on every device
        device = self._place(self.local_mtd)["device"]
        guidance = 1.0 if prompts is None else guidance
        prompts = self.null_prompts().to(device) if prompts is None else prompts.to(device)
        return fill_between(self.local_mtd, keyframes.to(device, torch.float32), prompts, L, steps=steps,
                            generator=gen, callback=callback, max_batch=max_batch, guidance=guidance)

    @torch.no_grad()
    def generate(self, L=5, depth=3, steps=50, seed=0, prompts=None, callback=None, max_batch=None,
                 width=0, height=0, guidance=1.0) -> torch.Tensor:
        """The whole tree -> frames [(L-1)^depth + 1, 3, H, W] in -1..1. prompts: one tensor for every
        level, or a list per level (prompt_schedule); guidance: classifier-free guidance (1 = off)."""
        gen = torch.Generator().manual_seed(seed)  # CPU noise: the same video on every device
        guidance = 1.0 if prompts is None else guidance
        prompts = self.null_prompts() if prompts is None else prompts
        prompts = [p.to(self.device) for p in prompts] if isinstance(prompts, list) else prompts.to(self.device)
        lat = generate_long_video(self.global_mtd, self.local_mtd, prompts, L, depth,
                                  self.latent_shape(width, height), steps=steps, generator=gen,
                                  callback=callback, max_batch=max_batch, guidance=guidance)
        return self.decode(lat)


def contact_sheet(frames: torch.Tensor, cols: int = 0) -> torch.Tensor:
    """Frames [N, 3, H, W] -> one image [3, rows*H, cols*W] (row-major)."""
    n = frames.shape[0]
    cols = cols or math.ceil(math.sqrt(n * frames.shape[2] / frames.shape[3]))
    rows = math.ceil(n / cols)
    pad = torch.full((rows * cols - n, *frames.shape[1:]), -1.0, device=frames.device)
    return rearrange(torch.cat([frames, pad]), "(rows cols) c h w -> c (rows h) (cols w)", rows=rows).cpu()


def save_png(x: torch.Tensor, path) -> None:
    """[3, H, W] in -1..1 -> PNG at path (str or Path; folders are made)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(arr).save(path)
