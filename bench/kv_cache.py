"""AR patch decoding with the KV cache vs recomputing every token from scratch.

The baseline is what taming's sampler and lucidrains' nuwa-pytorch do: for every token, run the
whole network again over the context and the tokens so far. Both decode the same patch greedily
from the same context (M = 256 tokens, extent (0, 2, 2), a full context of 12 patches) and must
produce the same tokens. Prints the speedup of the cache; goal >= 20.
"""
import json
import time

import torch

from nuwa_core.infinity.arbitrary_direction_controller import Order
from nuwa_core.infinity.nearby_context_pool import NearbyContextPool
from nuwa_core.infinity.patch_samplers import decode_ar
from nuwa_core.infinity.renderer import Context, Renderer, RendererConfig


@torch.no_grad()
def decode_recompute(renderer, context, order, text_kv, batch, choose):
    """No cache: token t costs a full pass over [context; tokens < t]."""
    m = renderer.config.tokens_per_patch
    perm, inv = renderer.permutation(order)
    tokens = torch.zeros(batch, m, dtype=torch.long)
    for t in range(m):
        x = renderer.ar_inputs(tokens[:, :t], order)  # slots 0..t; slot t predicts token t
        logits, _ = renderer(x, context, text_kv, causal=True)  # context K/V projected again
        tokens[:, t] = choose(logits[:, -1])
    return tokens[:, inv]


def main():
    torch.manual_seed(0)
    torch.set_num_threads(1)  # many small ops: one thread avoids sync stalls on a shared machine
    cfg = RendererConfig(vocab_size=1024, patch_size=(1, 16, 16), n_layer=4, n_head=8, d_model=512, extent=(0, 2, 2))
    renderer = Renderer(cfg).eval()
    coord = (0, 2, 2)  # middle of a 5-row canvas generated down-right: 12 patches of context
    pool = NearbyContextPool(cfg.extent)
    for j in range(3):
        for i in range(5):
            if j < 2 or i < 2:
                pool.add((0, i, j), torch.randn(cfg.n_layer, 1, cfg.tokens_per_patch, cfg.d_model), Order.DOWN_RIGHT)
    context = Context.from_pool(pool.select(coord), coord, renderer.rel, "cpu")
    text_kv = renderer.text_kv(None)
    greedy = lambda logits: logits.argmax(-1)

    decode_ar(renderer, context, Order.DOWN_RIGHT, text_kv, 1, greedy)  # warm-up
    cached_times = []
    for _ in range(3):
        start = time.perf_counter()
        cached, _ = decode_ar(renderer, context, Order.DOWN_RIGHT, text_kv, 1, greedy)
        cached_times.append(time.perf_counter() - start)
    start = time.perf_counter()
    recomputed = decode_recompute(renderer, context, Order.DOWN_RIGHT, text_kv, 1, greedy)
    baseline = time.perf_counter() - start
    assert torch.equal(cached, recomputed), "cached and recomputed decoding disagree"
    cached_time = min(cached_times)
    print(f"context patches: {context.n_patches}, tokens per patch: {cfg.tokens_per_patch}")
    print(f"recompute: {baseline:.2f} s/patch, KV cache: {cached_time:.3f} s/patch")
    print(json.dumps({"speedup": round(baseline / cached_time, 1), "goal": 20,
                      "cached_s_per_patch": round(cached_time, 4), "recompute_s_per_patch": round(baseline, 3),
                      "tokens_per_patch": cfg.tokens_per_patch, "context_patches": context.n_patches,
                      "same_tokens": True}))


if __name__ == "__main__":
    main()
