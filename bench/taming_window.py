"""The paper's "Taming" baseline: a 16x16-token sliding-window sampler, no cache.

For every token, taming's large-image sampler crops the 16 x 16 token window around it and runs
the transformer over the whole window, with no cache. The baseline here is that sampler over a
network of the same size as this engine's renderer (4 layers, width 512, 8 heads, 1024 codes:
smaller than the paper's Base, 16 x 768), producing the same canvas: one row of 4 patches of
16 x 16 tokens (16 x 64 tokens). This engine renders the same canvas patch by patch with the
Nearby Context Pool and the KV cache.
Prints the baseline's time / the engine's; goal >= 20.
"""
import json
import time

import torch

from nuwa_core.infinity.generation import NuwaInfinity
from nuwa_core.evaluation.baselines import taming_sliding_window  # raster order, a full window forward per token
from nuwa_core.infinity.patch_samplers import SamplerSettings
from nuwa_core.infinity.renderer import Renderer, RendererConfig
from nuwa_core.infinity.vqgan import VQModel, VQGANConfig

WINDOW = 16
ROWS, COLS = 16, 64  # tokens


def config(extent) -> RendererConfig:
    return RendererConfig(vocab_size=1024, patch_size=(1, WINDOW, WINDOW), n_layer=4, n_head=8, d_model=512,
                          extent=extent)


def main():
    torch.manual_seed(0)
    torch.set_num_threads(1)  # many small ops: one thread avoids sync stalls on a shared machine
    settings = SamplerSettings(top_k=100)
    vqgan = VQModel(VQGANConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), z_channels=16,
                                embed_dim=16, n_embed=1024, resolution=32))
    engine = NuwaInfinity(vqgan, Renderer(config((0, 2, 2)))).eval()
    gpt = Renderer(config((0, 0, 0))).eval()  # same size, no context: a plain windowed GPT

    state = engine.blank_canvas(ROWS // WINDOW, COLS // WINDOW)
    start = time.perf_counter()
    out = engine.generate(state, engine.plan_fill(state), settings, generator=torch.Generator().manual_seed(0))
    ours = time.perf_counter() - start
    start = time.perf_counter()
    baseline_tokens = taming_sliding_window(gpt, settings, torch.Generator().manual_seed(0), rows=ROWS, cols=COLS,
                                            whole_window=True)
    baseline = time.perf_counter() - start
    assert out.tokens.shape[-2:] == baseline_tokens.shape[-2:]
    print(f"canvas {ROWS}x{COLS} tokens: sliding window {baseline:.1f} s, NUWA-Infinity {ours:.2f} s")
    print(json.dumps({"speedup": round(baseline / ours, 1), "goal": 20, "baseline_s": round(baseline, 2),
                      "engine_s": round(ours, 3), "canvas_tokens": [ROWS, COLS], "window": WINDOW,
                      "n_layer": 4, "d_model": 512}))


if __name__ == "__main__":
    main()
