"""NUWA-XL inference: the T-KLVAE + Mask Temporal Diffusion bundle the nodes and samples use.

Model files: the T-KLVAE through t_klvae.save_t_klvae; the MTD as mask_temporal_diffusion files
(loadable by load_mtd) plus the metadata key `nuwa_xl` (JSON: role, L, depth, the tree levels it was
trained on `levels`, prompts, fps, frame size, and for a prompted model `text_encoder`: the name, width
and file sha256 of the text encoder it was trained with) that the nodes read for their defaults and
checks. Training (`python -m nuwa_core.train t_klvae|xl`) lives in training/t_klvae.py and training/xl.py.

The paper has a global model and a local model per depth: a bundle holds one global MTD and any
number of local MTDs, each serving the frame spacings it was trained on (`LocalModel`). A local
level fills L frames `spacing` video frames apart ((L-1)^(depth-1-k) at level k of a depth-`depth`
tree); `XLModel.local_for` picks the local model trained on that spacing. One MTD trained with
`--role both` serves every level, as before.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import InitVar, dataclass, field, replace
from pathlib import Path

import torch
from einops import rearrange
from PIL import Image

from .. import checkpoint
from .diffusion_over_diffusion import _check_tree, fill_between, generate_keyframes, generate_long_video, level_spacing
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


def trained_levels(info: dict) -> list[int] | None:
    """The tree levels (0 = global) an MTD was trained on, from its `nuwa_xl` info: `levels`, else what
    its `role` trains at its `depth`; None when the file does not say (saved without training info)."""
    if "levels" in info:
        return [int(k) for k in info["levels"]]
    if "depth" not in info:
        return None
    depth = int(info["depth"])
    return {"global": [0], "local": list(range(1, depth))}.get(info.get("role", "both"), list(range(depth)))


def check_vae_pairing(info: dict, vae: TKLVAE, vae_name: str, mtd_name: str) -> None:
    """Warn when an MTD is paired with a T-KLVAE other than the one whose latents it learned: its
    recorded `vae_latent_scale` differs from this T-KLVAE's by more than 1% (the diffusion latents
    would be scaled wrongly), or, in files that do not record it, the T-KLVAE's file name differs."""
    scale = vae.config.latent_scale
    trained_scale, trained_vae = info.get("vae_latent_scale"), info.get("vae")
    if trained_scale is not None:
        if abs(scale - float(trained_scale)) > 0.01 * abs(float(trained_scale)):
            warnings.warn(f"{mtd_name} was trained on latents scaled by {float(trained_scale):.4g} (T-KLVAE "
                          f"{trained_vae or '?'}) but {vae_name} scales by {scale:.4g}; pick the T-KLVAE it was "
                          f"trained with", stacklevel=3)
    elif trained_vae and trained_vae != vae_name:
        warnings.warn(f"{mtd_name} was trained on the latents of {trained_vae}, not {vae_name}; unless that is the "
                      f"same file renamed, pick the T-KLVAE it was trained with", stacklevel=3)


@dataclass
class LocalModel:
    """A local MTD and the frame spacings it was trained to fill (video frames between its L frames,
    deepest level 1); None: not recorded, it serves any spacing."""
    mtd: MaskTemporalDiffusion
    spacings: tuple[int, ...] | None
    name: str = ""
    L: int | None = None

    @classmethod
    def from_info(cls, mtd: MaskTemporalDiffusion, info: dict, name: str = "") -> LocalModel:
        levels = trained_levels(info)
        if levels is None or "L" not in info:
            return cls(mtd, None, name or info.get("file", ""))
        L, depth = int(info["L"]), int(info["depth"])
        spacings = tuple(sorted({level_spacing(L, depth, k) for k in levels if k > 0}, reverse=True))
        return cls(mtd, spacings, name or info.get("file", ""), L)

    def describe(self) -> str:
        name = self.name or "the local MTD"
        if not self.spacings:
            return f"{name} (trained for no local level)"
        return f"{name} (frames {', '.join(map(str, self.spacings))} apart)"


@dataclass
class XLModel:
    """T-KLVAE + a global MTD and the local MTDs (a local model per depth, or the global MTD itself
    when one model serves the whole tree), with the info saved next to the global MTD's weights (L,
    depth, fps, frame size, whether it takes prompts).

    `local` may be given as one MTD (it serves every level; its spacings read from `info`) or as a
    list of LocalModel; it is kept as the list `local_models`, the first match wins."""
    vae: TKLVAE
    global_mtd: MaskTemporalDiffusion
    local: InitVar[MaskTemporalDiffusion | list[LocalModel] | None]
    info: dict = field(default_factory=dict)
    local_models: list[LocalModel] = field(init=False)

    def __post_init__(self, local):
        if isinstance(local, list):
            self.local_models = list(local)
        else:
            self.local_models = [] if local is None else [LocalModel.from_info(local, self.info)]

    @classmethod
    def load(cls, vae_path, mtd_path, local_mtd_paths=(), dtype: torch.dtype = torch.float32,
             vae_dtype: torch.dtype | None = None) -> XLModel:
        """local_mtd_paths: a local MTD file or a list of them (a local model per depth), the first
        listed first to serve a spacing; none: the global MTD serves every level. dtype: the MTDs'
        weights and compute dtype (fp16 / bf16 where the device supports them); vae_dtype: the
        T-KLVAE's (default: dtype)."""
        vae = load_t_klvae(vae_path).eval()
        g, info = load_mtd_xl(mtd_path)
        info = {**info, "file": Path(mtd_path).name}
        if local_mtd_paths is None or isinstance(local_mtd_paths, (str, Path)):
            local_mtd_paths = [] if local_mtd_paths is None else [local_mtd_paths]
        locals_ = []
        for path in local_mtd_paths:
            if Path(path) == Path(mtd_path):
                locals_.append(LocalModel.from_info(g, info))
                continue
            m, linfo = load_mtd_xl(path)
            locals_.append(LocalModel.from_info(m, linfo, Path(path).name))
        check_vae_pairing(info, vae, Path(vae_path).name, Path(mtd_path).name)
        bundle = cls(vae, g, locals_ or g, info)
        for name, m in [(Path(mtd_path).name, g), *((lm.name, lm.mtd) for lm in bundle.local_models)]:
            bundle.check_fits(m.eval(), name)
        return bundle.to_dtypes(dtype, vae_dtype)

    def check_fits(self, mtd: MaskTemporalDiffusion, name: str) -> None:
        """CheckpointError unless `mtd` takes this bundle's latents (the T-KLVAE's channels) and prompts
        (the global MTD's width)."""
        name = name or "the MTD"
        if mtd.config.latent_channels != self.vae.config.z_channels:
            raise checkpoint.CheckpointError(
                f"{name} takes {mtd.config.latent_channels}-channel latents but the T-KLVAE makes "
                f"{self.vae.config.z_channels}; pick a matching pair")
        if mtd.config.context_dim != self.context_dim:
            raise checkpoint.CheckpointError(
                f"{name} takes {mtd.config.context_dim}-wide prompts but this model's global MTD takes "
                f"{self.context_dim}; pick models trained with one text encoder")

    def with_local(self, local: LocalModel) -> XLModel:
        """A new bundle (sharing every network) in which `local` serves its spacings first."""
        self.check_fits(local.mtd, local.name)
        return replace(self, local=[local, *self.local_models])

    def networks(self) -> list[torch.nn.Module]:
        """The T-KLVAE, the global MTD and every distinct local MTD, each once."""
        nets = {id(m): m for m in (self.vae, self.global_mtd, *(lm.mtd for lm in self.local_models))}
        return list(nets.values())

    def local_for(self, spacing: float, L: int | None = None) -> MaskTemporalDiffusion:
        """The local MTD for a level whose L frames are `spacing` video frames apart: the first local
        model trained on that spacing (with this L, when given), else one that does not record its
        spacings. With a single local model trained on other spacings it is used with a warning
        naming what it learned; among several, or when none was trained for a local level at all, a
        ValueError names them."""
        want = round(spacing) if abs(spacing - round(spacing)) < 1e-6 else spacing
        exact = [lm for lm in self.local_models
                 if lm.spacings and want in lm.spacings and (L is None or lm.L in (None, L))]
        match = exact or [lm for lm in self.local_models if lm.spacings is None]
        if match:
            return match[0].mtd
        have = "; ".join(lm.describe() for lm in self.local_models) or "none"
        what = f"a local level whose frames are {want:g} video frames apart"
        if len(self.local_models) == 1 and self.local_models[0].spacings:
            lm = self.local_models[0]
            warnings.warn(f"{what}: {lm.describe()} was not trained on that spacing; the in-betweens may not "
                          f"fit the motion (train a local model for it: python -m nuwa_core.train xl --role local "
                          f"--level K, or use the depth it was trained for)", stacklevel=2)
            return lm.mtd
        raise ValueError(f"no local model for {what}; this model's local models: {have}. Add one trained for that "
                         f"level (NUWA-XL Add Local Model; python -m nuwa_core.train xl --role local --level K), "
                         f"or use a depth these cover")

    def tree_locals(self, L: int, depth: int) -> list[MaskTemporalDiffusion]:
        """The local MTD of each local level 1..depth-1 of a depth-`depth` tree (local_for)."""
        return [self.local_for(level_spacing(L, depth, k), L) for k in range(1, depth)]

    def check_tree(self, L: int, depth: int) -> None:
        """Warn when L or the keyframes' spacing differ from what the global MTD was trained for (it
        then makes frames at a spacing it never saw); the local levels are checked by local_for."""
        _check_tree(L, depth)
        trained_L, trained_depth = self.info.get("L"), self.info.get("depth")
        name = f"the global MTD {self.info['file']}" if self.info.get("file") else "the global MTD"
        if trained_L is not None and int(trained_L) != L:
            warnings.warn(f"L={L}: {name} was trained with L={trained_L} frames "
                          f"per diffusion call; use L={trained_L}", stacklevel=2)
        elif trained_depth is not None and 0 in (trained_levels(self.info) or [0]) and int(trained_depth) != depth:
            warnings.warn(f"depth {depth}: {name} was trained on keyframes "
                          f"{level_spacing(L, int(trained_depth), 0)} frames apart (depth {trained_depth}); depth "
                          f"{depth} asks for keyframes {level_spacing(L, depth, 0)} apart, a pace it never saw",
                          stacklevel=2)

    def to_dtypes(self, dtype: torch.dtype = torch.float32, vae_dtype: torch.dtype | None = None) -> XLModel:
        """Weights (and compute) of the MTDs in `dtype`, of the T-KLVAE in `vae_dtype` (default: dtype).
        Samplers keep their latents in float32 (diffusion_over_diffusion.in_model_dtype)."""
        for m in self.networks()[1:]:
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

    def to(self, device) -> XLModel:
        for m in self.networks():
            m.to(device)
        return self

    @property
    def device(self) -> torch.device:
        """The global MTD's device (ComfyUI may hold the T-KLVAE and the local MTDs elsewhere: each
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
    def fill(self, keyframes, prompts, L, steps, seed, callback=None, max_batch=None, guidance=1.0, local=None):
        """Local diffusion between keyframes [K, c, h, w] with the local MTD `local` (default: the one
        for adjacent frames, local_for(1, L); a level whose frames lie further apart picks its own)."""
        gen = torch.Generator().manual_seed(seed)  # CPU noise: the same video on every device
        mtd = self.local_for(1, L) if local is None else local
        device = self._place(mtd)["device"]
        guidance = 1.0 if prompts is None else guidance
        prompts = self.null_prompts().to(device) if prompts is None else prompts.to(device)
        return fill_between(mtd, keyframes.to(device, torch.float32), prompts, L, steps=steps,
                            generator=gen, callback=callback, max_batch=max_batch, guidance=guidance)

    @torch.no_grad()
    def generate(self, L=5, depth=3, steps=50, seed=0, prompts=None, callback=None, max_batch=None,
                 width=0, height=0, guidance=1.0) -> torch.Tensor:
        """The whole tree -> frames [(L-1)^depth + 1, 3, H, W] in -1..1. prompts: one tensor for every
        level, or a list per level (prompt_schedule); guidance: classifier-free guidance (1 = off)."""
        self.check_tree(L, depth)
        local = self.tree_locals(L, depth)
        gen = torch.Generator().manual_seed(seed)  # CPU noise: the same video on every device
        guidance = 1.0 if prompts is None else guidance
        prompts = self.null_prompts() if prompts is None else prompts
        prompts = [p.to(self.device) for p in prompts] if isinstance(prompts, list) else prompts.to(self.device)
        lat = generate_long_video(self.global_mtd, local, prompts, L, depth,
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
