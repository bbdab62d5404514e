"""Attention kernel: PyTorch's scaled_dot_product_attention, or xformers when it is importable
and the tensors are on CUDA (xformers has no CPU/MPS kernels and pins one torch build)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # optional accelerator
    import xformers.ops as xops
except Exception:  # any import failure (absent, or built for another torch) means: use SDPA
    xops = None


def attention(q, k, v, mask=None, dropout: float = 0.0):
    """q [B, h, Tq, d], k/v [B, h, Tk, d]; mask: None, bool [.., Tq, Tk] (True = attend) or float bias."""
    if xops is not None and q.is_cuda and (mask is None or mask.dtype != torch.bool):
        bias = None if mask is None else mask.to(q.dtype).expand(q.shape[0], q.shape[1], -1, -1)
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_bias=bias, p=dropout)
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
