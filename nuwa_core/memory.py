"""Free memory on the device that will hold a canvas, and a check that names what does not fit."""
from __future__ import annotations

import torch


def _on_cuda(device) -> bool:
    return device is not None and torch.device(device).type == "cuda"


def available_bytes(device=None) -> int | None:
    """Free memory on the device that will hold the canvas (None when unknown); host RAM unless CUDA."""
    if _on_cuda(device):
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_memory(needed: int, what: str, device=None) -> None:
    """Refuse `needed` bytes beyond what `device` (None: host RAM) has free."""
    free = available_bytes(device)
    if free is not None and needed > free:
        where = f"on {device}" if _on_cuda(device) else "in RAM"
        raise MemoryError(f"{what} needs about {needed / 2**30:.1f} GiB but only {free / 2**30:.1f} GiB is "
                          f"available {where}; generate a smaller canvas or extend it in several steps")


# ---- working memory on the model's device (what a run needs beside the weights) ----------------
# Estimates for ComfyUI's load_models_gpu(memory_required=..., minimum_memory_required=...): the
# memory manager keeps this much free beside the weights, unloading other models for it. They are
# upper bounds of the tensors alive at the peak, from the configs alone (duck-typed: memory.py
# imports no model code); a 1.5x margin covers the allocator's rounding and fragmentation.

MARGIN = 1.5


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def renderer_working_bytes(cfg, grid, batch: int, extent=None, dtype: torch.dtype = torch.float32,
                           wave: int = 1) -> int:
    """Peak device memory of the renderer generating on a canvas of `grid` (F, H, W) patches, pool included.

    cfg: a RendererConfig (n_layer, n_head, d_model, tokens_per_patch, extent, mlp_ratio, vocab_size).
    The pool holds the caches of the band of patches later patches can select: (e_f+1)(2e_h+1)
    patches across a row of the longer side, and never more than the canvas; one patch's context
    is the caches it selects, their per-layer keys and values, and the attention scores over
    [context; patch] (softmax in fp32). `wave` patches rendered together (the wavefront schedule)
    hold that many contexts, activations and new caches at once.
    """
    ef, eh, ew = tuple(extent or cfg.extent)
    f, h, w = grid
    layers, d, m, heads = cfg.n_layer, cfg.d_model, cfg.tokens_per_patch, cfg.n_head
    size, rows = _itemsize(dtype), batch * wave
    cache = layers * batch * m * d * size  # one pooled patch
    selected = (ef + 1) * (2 * eh + 1) * (2 * ew + 1)
    band = min(f * h * w, (ef + 1) * (2 * max(eh, ew) + 1) * max(h, w) + selected) + wave
    context = wave * selected * cache * 3  # the selected caches, their keys and values (every layer)
    scores = rows * heads * m * (selected + 1) * m * 4 * 2  # one layer's scores and softmax, fp32
    hidden = rows * m * d * (2 + cfg.mlp_ratio) * size * 2 + layers * rows * (m + 1) * d * size
    logits = rows * m * max(getattr(cfg, "vocab_size", 0), 1) * 4 * 3  # logits, filtered copy, noise
    return int(MARGIN * (band * cache + context + scores + hidden + logits))


def vqgan_window_bytes(cfg, tile: int, batch: int = 1, dtype: torch.dtype = torch.float32) -> int:
    """Peak device memory of the VQGAN encoding or decoding one window of (tile + 2 tile/4) tokens
    a side: a few full-resolution feature maps of the widest early level, and the global attention
    at token resolution.

    cfg: a VQGANConfig (ch, ch_mult, downsample_factor, z_channels).
    """
    size = _itemsize(dtype)
    tokens = tile + 2 * (tile // 4)
    px = tokens * cfg.downsample_factor
    widest = max(cfg.ch * mult * (px // 2 ** level) ** 2 for level, mult in enumerate(cfg.ch_mult))
    features = 4 * batch * widest * size + batch * 3 * px * px * 4 * 2  # activations; input and output image
    attention = batch * (tokens * tokens) ** 2 * 4 * 2 + 4 * batch * cfg.z_channels * tokens * tokens * size
    return int(MARGIN * (features + attention))


def video_vae_bytes(cfg, frames: int, height: int, width: int, dtype: torch.dtype = torch.float32) -> int:
    """Peak device memory of the T-KLVAE encoding or decoding `frames` frames of height x width
    pixels in one call: a few feature maps of every level (the decoder's last levels are the widest),
    the frames in and out, and the mid block's spatial attention at the latent resolution.

    cfg: a TKLVAEConfig (ch, ch_mult, z_channels).
    """
    size = _itemsize(dtype)
    maps = max(cfg.ch * mult * (height // 2 ** level) * (width // 2 ** level) for level, mult in enumerate(cfg.ch_mult))
    tokens = (height // 2 ** (len(cfg.ch_mult) - 1)) * (width // 2 ** (len(cfg.ch_mult) - 1))
    features = 4 * frames * maps * size + frames * 3 * height * width * 4 * 2
    attention = frames * tokens * tokens * 4 * 2
    return int(MARGIN * (features + attention))


def mtd_working_bytes(cfg, batch: int, frames: int, height: int, width: int,
                      dtype: torch.dtype = torch.float32) -> int:
    """Peak device memory of one Mask Temporal Diffusion call on latents [batch, frames, c, height, width]:
    the skip connections of every level, a few working maps, spatial attention over h*w (at the levels
    that have it, per frame) and temporal attention over the frames (per position), with the
    visual-condition cascade (a map per level).

    cfg: an MTDConfig (model_channels, channel_mult, num_res_blocks, attention_levels, num_heads).
    """
    size, n = _itemsize(dtype), batch * frames
    skips = work = attention = 0
    for level, mult in enumerate(cfg.channel_mult):
        c, hw = cfg.model_channels * mult, (height // 2 ** level) * (width // 2 ** level)
        skips += (cfg.num_res_blocks + 1) * c * hw * 2  # the skip and the condition's map
        work = max(work, 8 * c * hw)
        if level in tuple(cfg.attention_levels):
            attention = max(attention, cfg.num_heads * (hw * hw + hw * frames * frames // max(frames, 1)) * 4 * 2)
    return int(MARGIN * (n * (skips + work) * size + n * attention))
