"""Tiny random NUWA-Infinity models for tests (CPU, no downloads)."""
import torch

from nuwa_core.infinity.generation import NuwaInfinity
from nuwa_core.infinity.renderer import Renderer, RendererConfig
from nuwa_core.infinity.vqgan import VQModel, get_config


def tiny_renderer(**overrides) -> Renderer:
    cfg = dict(vocab_size=64, patch_size=(1, 4, 4), n_layer=2, n_head=2, d_model=32, extent=(0, 1, 1))
    cfg.update(overrides)
    torch.manual_seed(0)
    return Renderer(RendererConfig(**cfg)).eval()


def tiny_model(**overrides) -> NuwaInfinity:
    torch.manual_seed(0)
    vqgan = VQModel(get_config("tiny"))
    return NuwaInfinity(vqgan, tiny_renderer(**overrides)).eval()
