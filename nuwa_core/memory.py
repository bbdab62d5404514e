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
