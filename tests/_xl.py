"""Tiny random NUWA-XL models and node inputs for the XL node tests (CPU, no downloads)."""
from __future__ import annotations

from pathlib import Path

import torch

from nuwa_core.xl.mask_temporal_diffusion import MaskTemporalDiffusion, MTDConfig
from nuwa_core.xl.model import save_mtd_xl
from nuwa_core.xl.t_klvae import TKLVAE, TKLVAEConfig, save_t_klvae

from _pack import node


def save_tiny(folder: Path, prompts: str, context_dim: int = 8, suffix: str = ""):
    """folder/vae{suffix}.safetensors and folder/mtd{suffix}.safetensors: a tiny T-KLVAE and MTD (L 3, depth 2)."""
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    save_t_klvae(TKLVAE(TKLVAEConfig.tiny()), folder / f"vae{suffix}.safetensors")
    info = {"role": "both", "L": 3, "depth": 2, "prompts": prompts, "fps": 6.0, "width": 16, "height": 16}
    save_mtd_xl(MaskTemporalDiffusion(MTDConfig.tiny(context_dim=context_dim)), folder / f"mtd{suffix}.safetensors",
                info)


def load_xl(pack, vae="vae.safetensors", mtd="mtd.safetensors", local="(same as global)"):
    """The XL_MODEL of the NUWA-XL Model Loader node."""
    return node(pack, "NUWAXLModelLoader")(vae, mtd, local)[0]


def xl_cond(n_prompts, width=8, tokens=4, batch=1):
    """A CONDITIONING list of `n_prompts` random prompts, as CLIP Text Encode makes them."""
    return [[torch.randn(batch, tokens, width), {"pooled_output": torch.randn(batch, width)}] for _ in range(n_prompts)]
