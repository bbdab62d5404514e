"""Sequential vs wavefront schedule, the AR token step, and decoding against generating (issue 16).

1. Canvases of 16 x 16 and 2 x 64 patches filled from blank, with the shipped default model (AR)
   and a P-NAR renderer of the same shape (random weights: no P-NAR model ships; speed and
   equality only): renderer steps and wall time of the sequential and the wavefront schedule in
   the same process, same seed, and whether the canvases are identical. Goal: wall-time ratio
   >= 4 on the 16 x 16 AR canvas, outputs identical.
2. The AR step: seconds per token of one patch (4 context patches, as inside a canvas) with
   today's renderer.TokenStep and with the step it replaced (`reference_decode_ar` below, kept
   here as the reference: Block.forward per layer per token), at batch 1 and at the batches a
   wavefront runs, and the FLOP/s achieved as a share of this machine's matmul rate measured in
   the same run (a 1024^3 float32 matmul). Goal: batch-1 latency cut >= 3x.
3. Decoding the AR canvases (model.decode, windows batched) against generating them, and the Patch
   Renderer's final decode of one image, which its incremental previews have already made.

Run from the repo root: `python bench/wavefront.py` (about 3-6 minutes on 2 CPU cores); the last
line is one JSON object. Every time is the fastest of `--repeats` runs, alternating.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nuwa_core.infinity.arbitrary_direction_controller import Order
from nuwa_core.infinity.generation import NuwaInfinity
from nuwa_core.infinity.patch_samplers import SamplerSettings, decode_ar
from nuwa_core.infinity.preview import PreviewDecoder
from nuwa_core.infinity.renderer import Context, Renderer, RendererConfig

MODEL = ROOT / "models" / "nuwa" / "nuwa_infinity_default.safetensors"
SETTINGS = SamplerSettings(top_k=100, epsilon=0.01)  # the Patch Renderer's defaults for this model


@torch.no_grad()
def reference_decode_ar(renderer: Renderer, context: Context, order: Order, text_kv, batch: int, choose):
    """The AR step before issue 16, for comparison: every layer through Block.forward (module
    calls, separate q / k / v projections, SDPA) with a preallocated KV buffer per layer."""
    cfg = renderer.config
    m, d, dh, n_layer = cfg.tokens_per_patch, cfg.d_model, cfg.d_model // cfg.n_head, cfg.n_layer
    ctx_kv = renderer.context_kv(context)
    perm, inv = renderer.permutation(order)
    pos = renderer.positions()[perm]
    nxt = renderer.next_positions(order)
    n_ctx = 0 if context.hidden is None else context.hidden.shape[2]
    kv = []
    for layer_kv in ctx_kv:
        k, v = (pos.new_zeros(batch, cfg.n_head, n_ctx + m + 1, dh) for _ in range(2))
        if layer_kv is not None:
            k[:, :, :n_ctx], v[:, :, :n_ctx] = layer_kv
        kv.append((k, v, n_ctx))
    hidden = pos.new_zeros(n_layer, batch, m, d)
    tokens = torch.zeros(batch, m, dtype=torch.long, device=pos.device)
    masks = [renderer.attn_mask(l, context, 1, m + 1, causal=False) for l in range(n_layer)]
    x = (renderer.order_emb.weight[order.id] + nxt[0]).expand(batch, 1, d)
    for t in range(m + 1):
        for l, blk in enumerate(renderer.blocks):
            if t:
                hidden[l, :, t - 1] = x[:, 0]
            if t == m and l == n_layer - 1:
                break
            mask = None if masks[l] is None else masks[l][..., :n_ctx + t + 1]
            x = blk(x, None, renderer.self_key_emb(l), mask, text_kv[l], kv_cache=kv[l], pos=t)
        if t == m:
            break
        token = choose(renderer.head(renderer.ln_f(x[:, 0])))
        tokens[:, t] = token
        x = renderer.tok_emb(token)[:, None] + pos[t] + nxt[t + 1]
    return tokens[:, inv], hidden[:, :, inv]


def pnar_twin(model: NuwaInfinity) -> NuwaInfinity:
    torch.manual_seed(0)
    cfg = RendererConfig(**{**model.renderer.config.__dict__, "decoder": "pnar"})
    return NuwaInfinity(model.vqgan, Renderer(cfg)).eval()


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def schedules(model: NuwaInfinity, rows: int, cols: int, settings: SamplerSettings, repeats: int) -> dict:
    """Both schedules `repeats` times, alternating; the fastest run of each (a shared machine's load
    only ever adds time)."""
    state = model.blank_canvas(rows, cols)
    plan = model.plan_fill(state)
    steps, t_seq, t_wave = [], float("inf"), float("inf")
    for _ in range(repeats):
        seq, t = timed(lambda: model.generate(state, plan, settings, generator=0, schedule="sequential"))
        t_seq = min(t_seq, t)
        steps.clear()
        wave, t = timed(lambda: model.generate(state, plan, settings, generator=0, schedule="wavefront",
                                               callback=lambda n, total, s: steps.append(n)))
        t_wave = min(t_wave, t)
    return {"patches": len(plan), "wavefront_steps": len(steps), "sequential_s": round(t_seq, 2),
            "wavefront_s": round(t_wave, 2), "ratio": round(t_seq / t_wave, 2),
            "identical": bool(torch.equal(seq.tokens, wave.tokens)), "state": wave, "seconds": t_wave}


def matmul_rate() -> float:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    _, t = timed(lambda: [a @ b for _ in range(5)])
    return 5 * 2 * 1024 ** 3 / t


def token_latency(model: NuwaInfinity, batch: int, decode, repeats: int) -> float:
    """Seconds per token of one AR patch over 4 context patches, `batch` rows (patches x canvases)."""
    r = model.renderer
    cache = torch.randn(r.config.n_layer, batch, r.config.tokens_per_patch, r.config.d_model,
                        generator=torch.Generator().manual_seed(0))
    selected = [((0, 0, 0), cache), ((0, 0, 1), cache), ((0, 0, 2), cache), ((0, 1, 0), cache)]
    context = Context.from_pool(selected, (0, 1, 1), r.rel, "cpu")
    text_kv = r.text_kv(None)
    greedy = lambda logits: logits.argmax(-1)  # the network's step, not the sampler's
    decode(r, context, Order.DOWN_RIGHT, text_kv, batch, greedy)
    best = min(timed(lambda: decode(r, context, Order.DOWN_RIGHT, text_kv, batch, greedy))[1] for _ in range(repeats))
    return best / (r.config.tokens_per_patch + 1)


def flops_per_token(cfg: RendererConfig, rows: int, keys: int) -> float:
    d = cfg.d_model
    per_layer = 2 * d * d * (3 + 1 + 2 * cfg.mlp_ratio) + 2 * 2 * keys * d  # projections, MLP, attention
    return rows * (cfg.n_layer * per_layer + 2 * d * cfg.vocab_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2, this machine's cores)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each schedule; the fastest counts")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = NuwaInfinity.load(MODEL)
    pnar = pnar_twin(model)
    results = {}
    for name, m, settings in (("ar", model, SETTINGS), ("pnar", pnar, SamplerSettings(top_k=100, steps=8))):
        for rows, cols in ((16, 16), (2, 64)):
            r = schedules(m, rows, cols, settings, args.repeats)
            results[f"{name}_{rows}x{cols}"] = r
            print(f"{name:4s} {rows:2d}x{cols:<3d} patches {r['patches']:4d}  wavefront steps {r['wavefront_steps']:4d}  "
                  f"sequential {r['sequential_s']:7.2f} s  wavefront {r['wavefront_s']:7.2f} s  "
                  f"ratio {r['ratio']:5.2f}  identical {r['identical']}", flush=True)

    rate = matmul_rate()
    cfg = model.renderer.config
    keys = 4 * cfg.tokens_per_patch + cfg.tokens_per_patch // 2  # mean keys a slot attends to
    latency = {}
    for batch in (1, 4, 8, 16):
        new = token_latency(model, batch, decode_ar, repeats=5)
        old = token_latency(model, batch, reference_decode_ar, repeats=5)
        share = flops_per_token(cfg, batch, keys) / new / rate
        latency[batch] = {"token_us": round(new * 1e6, 1), "reference_us": round(old * 1e6, 1),
                          "cut": round(old / new, 2), "us_per_row": round(new * 1e6 / batch, 1),
                          "matmul_share": round(share, 4)}
        print(f"AR step batch {batch:2d}: {new * 1e6:7.1f} us/token ({new * 1e6 / batch:6.1f} per row), "
              f"reference {old * 1e6:7.1f} us, cut {old / new:4.2f}x, {share:.2%} of the matmul rate "
              f"({rate / 1e9:.1f} GFLOP/s)", flush=True)

    decode = {}
    for name in ("ar_2x64", "ar_16x16"):
        made = results[name]
        full = min(timed(lambda made=made: model.decode(made["state"]))[1] for _ in range(args.repeats))
        # the Patch Renderer's final decode of one image: its previews decoded the canvas as it grew,
        # the last one at the last step, so only what changed since (here nothing) is decoded again
        previews = PreviewDecoder(model)
        previews(made["state"])
        final = min(timed(lambda made=made, previews=previews: previews(made["state"]))[1] for _ in range(args.repeats))
        decode[name] = {"decode_s": round(full, 2), "over_generate": round(full / made["seconds"], 3),
                        "node_final_decode_s": round(final, 3)}
        print(f"decode {name}: {full:.2f} s against generating it {made['seconds']:.2f} s "
              f"(ratio {full / made['seconds']:.2f}); the node's final decode after its last preview {final:.3f} s",
              flush=True)

    summary = {k: {f: v[f] for f in ("patches", "wavefront_steps", "sequential_s", "wavefront_s", "ratio", "identical")}
               for k, v in results.items()}
    print(json.dumps({"schedules": summary, "ar_step": latency, "matmul_gflops": round(rate / 1e9, 1),
                      "decode": decode,
                      "speedup_16x16_ar": results["ar_16x16"]["ratio"], "goal_speedup": 4,
                      "batch1_cut": latency[1]["cut"], "goal_batch1_cut": 3,
                      "identical": all(v["identical"] for v in results.values())}))


if __name__ == "__main__":
    main()
