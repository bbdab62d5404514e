"""Growing one row of patches from 8 to 128: time per patch and memory must stay flat.

time_ratio   = seconds per patch over the last 8 patches of a 128-patch row
               / seconds per patch of an 8-patch row (same process, same model); goal <= 1.15.
memory_ratio = peak resident memory of generating and decoding the 128-patch row
               / the same for the 8-patch row, each measured in a fresh child process of this
               script, with the output image's own bytes taken out; goal <= 1.2.
The pool's peak size (patch caches held) is printed for both.
"""
import json
import subprocess
import sys
import time

import torch

from nuwa_core.infinity.generation import NuwaInfinity
from nuwa_core.infinity.patch_samplers import SamplerSettings
from nuwa_core.infinity.renderer import Renderer, RendererConfig
from nuwa_core.infinity.vqgan import VQModel, get_config

SHORT, LONG = 8, 128


def build() -> NuwaInfinity:
    torch.manual_seed(0)
    vqgan = VQModel(get_config("small_f8"))
    cfg = RendererConfig(vocab_size=vqgan.config.n_embed, patch_size=(1, 8, 8), n_layer=4, n_head=4, d_model=128,
                         extent=(0, 2, 2))
    return NuwaInfinity(vqgan, Renderer(cfg)).eval()


def grow(model: NuwaInfinity, cols: int, stamps: list | None = None):
    state = model.blank_canvas(1, cols)
    hook = None if stamps is None else (lambda n, total, s: stamps.append(time.perf_counter()))
    return model.generate(state, model.plan_fill(state), SamplerSettings(top_k=64),
                          generator=torch.Generator().manual_seed(0), callback=hook)


def child(cols: int) -> None:
    """Generate and decode one row; print peak RSS minus the output image, and the pool's peak."""
    torch.set_num_threads(1)
    model = build()
    state = grow(model, cols)
    image = model.decode(state)
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"peak_bytes": peak - image.numel() * image.element_size(), "pool_peak": state.pool.peak_size}))


def measure_child(cols: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(cols)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    torch.set_num_threads(1)
    model = build()
    grow(model, 2)  # warm-up
    start = time.perf_counter()
    grow(model, SHORT)
    per_patch_short = (time.perf_counter() - start) / SHORT
    stamps = []
    grow(model, LONG, stamps)
    per_patch_long = (stamps[-1] - stamps[-SHORT - 1]) / SHORT
    small, large = measure_child(SHORT), measure_child(LONG)
    print(f"s/patch: {per_patch_short:.4f} at {SHORT} patches, {per_patch_long:.4f} at the end of {LONG}")
    print(f"peak memory without the image: {small['peak_bytes'] / 2**20:.1f} MiB vs {large['peak_bytes'] / 2**20:.1f} MiB;"
          f" pool peak {small['pool_peak']} vs {large['pool_peak']} patch caches")
    print(json.dumps({"time_ratio": round(per_patch_long / per_patch_short, 3), "time_goal": 1.15,
                      "memory_ratio": round(large["peak_bytes"] / small["peak_bytes"], 3), "memory_goal": 1.2,
                      "pool_peak_short": small["pool_peak"], "pool_peak_long": large["pool_peak"],
                      "s_per_patch_short": round(per_patch_short, 4), "s_per_patch_long": round(per_patch_long, 4)}))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(int(sys.argv[2]))
    else:
        main()
