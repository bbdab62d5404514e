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
4. The AR step through torch.compile (issue 16 item 3's option; inductor's C++ backend here),
   whole patches as in part 2, against today's step, alternating: seconds per token, seconds
   spent compiling (cold caches), graphs compiled (recompiles), tokens equal. `CompiledStep` is
   the plain use (TokenStep's call compiled); with --tuned-compile also `TunedStep`, the most
   favourable variant found (fixed-shape masked attention, frozen weights, max-autotune, C++
   wrapper, weight guards dropped). Neither is faster on this CPU, so the package has no compile
   option (README, Speed); if compiling fails here the row says why.
5. The floor of an eager step at batch 1: each of today's step's operations for one token (slot M/2
   of a patch over 4 context patches; the layers, the head, the greedy choice and the next slot's
   input) timed alone, over and over on the same tensors (so warm in cache, no other work between),
   and summed; the matmuls (16 linear, 8 attention bmm, the head) also summed apart. An eager step
   running these operations one after another takes about their sum at best (each as fast as when
   repeated alone). The same at each wave size of the 16 x 16 canvas, summed over its waves: the
   floor of the waves beside their time and the goal's (the sequential time / 4). `--floor-only`
   runs this part alone, with one run of the 16 x 16 canvas in each schedule (under a minute).

Run from the repo root: `python bench/wavefront.py` (about 3-5 minutes on 2 CPU cores, compiling
included); the last line is one JSON object. Every time is the fastest of `--repeats` runs
(part 2 and 4: 5), alternating.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nuwa_core.infinity import patch_samplers, wavefront
from nuwa_core.infinity.arbitrary_direction_controller import Order
from nuwa_core.infinity.generation import NuwaInfinity
from nuwa_core.infinity.patch_samplers import SamplerSettings, decode_ar
from nuwa_core.infinity.preview import PreviewDecoder
from nuwa_core.infinity.renderer import Context, Renderer, RendererConfig, TokenStep

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


def patch_context(r: Renderer, batch: int) -> Context:
    """One AR patch's context: 4 patches of random layer inputs, `batch` rows (patches x canvases)."""
    cache = torch.randn(r.config.n_layer, batch, r.config.tokens_per_patch, r.config.d_model,
                        generator=torch.Generator().manual_seed(0))
    selected = [((0, 0, 0), cache), ((0, 0, 1), cache), ((0, 0, 2), cache), ((0, 1, 0), cache)]
    return Context.from_pool(selected, (0, 1, 1), r.rel, "cpu")


def greedy(logits: torch.Tensor) -> torch.Tensor:  # the network's step, not the sampler's
    return logits.argmax(-1)


def token_latency(model: NuwaInfinity, batch: int, decode, repeats: int) -> float:
    """Seconds per token of one AR patch over 4 context patches, `batch` rows (patches x canvases)."""
    r = model.renderer
    context, text_kv = patch_context(r, batch), r.text_kv(None)
    decode(r, context, Order.DOWN_RIGHT, text_kv, batch, greedy)
    best = min(timed(lambda: decode(r, context, Order.DOWN_RIGHT, text_kv, batch, greedy))[1] for _ in range(repeats))
    return best / (r.config.tokens_per_patch + 1)


def patch_decode(r: Renderer, batch: int, step: type):
    """One AR patch through decode_ar, its step made by `step` (renderer.TokenStep or a subclass)."""
    context, text_kv = patch_context(r, batch), r.text_kv(None)

    def run():
        with mock.patch.object(patch_samplers, "TokenStep", step):
            return decode_ar(r, context, Order.DOWN_RIGHT, text_kv, batch, greedy)
    return run


class CompiledStep(TokenStep):
    """renderer.TokenStep with its call through one torch.compile'd function (inductor, default
    mode and shapes: t, the rows and the key count become symbolic after the first recompile, so
    the patches of every later slot and batch share a graph). Swapped into decode_ar for part 4."""
    call = None

    @classmethod
    def reset(cls):
        cls.call = torch.compile(TokenStep.__call__)

    def __call__(self, x, t, layers=None):
        return CompiledStep.call(self, x, t, layers)


def compiled_step(model: NuwaInfinity, batches, repeats: int, step=CompiledStep) -> dict:
    """Part 4: whole AR patches (decode_ar) with `step` against today's step, alternating,
    from a cold compile (inductor's on-disk caches in an empty folder). Per batch: the fastest
    seconds per token of each, the first compiled patch's extra seconds (compiling), the graphs
    compiled by then, tokens equal and the layer inputs' largest difference. Any exception (no
    C++ compiler, no inductor) is reported instead."""
    from torch._dynamo.utils import counters
    r, m = model.renderer, model.renderer.config.tokens_per_patch
    rows = {}
    held = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        try:
            torch._dynamo.reset()
            counters.clear()
            step.reset()
            for batch in batches:
                eager, compiled = patch_decode(r, batch, TokenStep), patch_decode(r, batch, step)
                (tokens, inputs), first = timed(compiled)
                graphs = counters["stats"]["unique_graphs"]
                ref = eager()
                t_eager, t_comp = float("inf"), float("inf")
                for _ in range(repeats):
                    t_eager = min(t_eager, timed(eager)[1])
                    t_comp = min(t_comp, timed(compiled)[1])
                rows[batch] = {"eager_us": round(t_eager / (m + 1) * 1e6, 1),
                               "compiled_us": round(t_comp / (m + 1) * 1e6, 1),
                               "speedup": round(t_eager / t_comp, 2), "compile_s": round(max(0.0, first - t_comp), 1),
                               "graphs": graphs, "same_tokens": bool(torch.equal(tokens, ref[0])),
                               "max_diff": float((inputs - ref[1]).abs().max())}
            rows["graphs_after_timing"] = counters["stats"]["unique_graphs"]
        except Exception as e:  # noqa: BLE001 - the bench reports why compiling did not work here
            rows["error"] = f"{type(e).__name__}: {e}"[:300]
        finally:
            torch._dynamo.reset()
            if held is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = held
    return rows


class TunedStep(TokenStep):
    """The most favourable compiled step found (--tuned-compile): every slot attends to the whole
    key buffer (zeros after the slot, masked), so one static shape serves every t; the slot is a
    tensor; the weights are module parameters, frozen into the graph; max-autotune (inductor's C++
    GEMM template against MKL) and the C++ wrapper; dynamo guards only the step's tensor arguments
    (one graph per rows x context keys), not the 48 weights nor the module: unsafe in general,
    right here because every step comes from one renderer's weights. Shipped model's layers only
    (no text, no attention mask)."""
    compiled = None

    @classmethod
    def reset(cls):
        cls.compiled = None

    class Layers(torch.nn.Module):
        def __init__(self, step: TokenStep):
            super().__init__()
            self.h = step.h
            self.w = torch.nn.ParameterList(torch.nn.Parameter(w.clone(), requires_grad=False) for layer in step.layers
                                            for w in (*layer[0][:2], *layer[1], *layer[5], *layer[7][:2], *layer[8], *layer[9]))

        def forward(self, x, at, keys: list, values: list):
            rows, d = x.shape
            dh, shape, inputs = d // self.h, (d,), [x]
            for l in range(len(keys)):
                ln1_w, ln1_b, qkv_b, qkv_w, proj_b, proj_w, ln2_w, ln2_b, fc_b, fc_w, out_b, out_w = (
                    self.w[12 * l + i] for i in range(12))
                qkv = torch.addmm(qkv_b, torch.layer_norm(x, shape, ln1_w, ln1_b), qkv_w).view(rows * self.h, 3, dh)
                keys[l].index_copy_(2, at.view(1), qkv[:, 1:2].transpose(1, 2))
                values[l].index_copy_(1, at.view(1), qkv[:, 2:3])
                scores = torch.bmm(qkv[:, :1], keys[l]).masked_fill(torch.arange(keys[l].shape[2]) > at, float("-inf"))
                x = torch.addmm(proj_b, torch.bmm(scores.softmax(-1), values[l]).view(rows, d), proj_w) + x
                u = F.gelu(torch.addmm(fc_b, torch.layer_norm(x, shape, ln2_w, ln2_b), fc_w), approximate="tanh")
                x = torch.addmm(out_b, u, out_w) + x
                inputs.append(x)
            return torch.stack(inputs[:-1]), x

    def __init__(self, *args):
        super().__init__(*args)
        for layer in self.layers:
            assert layer[4] is None and layer[6] is None, "tuned step: the shipped model's layers only"
            layer[2][:, :, self.n_ctx:] = 0  # keys / values not written yet: masked, but must not be NaN
            layer[3][:, self.n_ctx:] = 0
        self.at = [torch.tensor(self.n_ctx + t) for t in range(self.inputs.shape[1])]
        if TunedStep.compiled is None:
            TunedStep.compiled = torch.compile(TunedStep.Layers(self).eval(), dynamic=False, options={
                "max_autotune": True, "freezing": True, "cpp_wrapper": True,
                "guard_filter_fn": lambda entries: [e.guard_type != "TENSOR_MATCH" or not e.name.startswith("self")
                                                    for e in entries]})

    def __call__(self, x, t, layers=None):
        # every call runs all layers (the last slot's partial run too: one layer more, same inputs)
        self.inputs[:, t], x = TunedStep.compiled(x.contiguous(), self.at[t], [layer[2] for layer in self.layers],
                                                  [layer[3] for layer in self.layers])
        return x


def flops_per_token(cfg: RendererConfig, rows: int, keys: int) -> float:
    d = cfg.d_model
    per_layer = 2 * d * d * (3 + 1 + 2 * cfg.mlp_ratio) + 2 * 2 * keys * d  # projections, MLP, attention
    return rows * (cfg.n_layer * per_layer + 2 * d * cfg.vocab_size)


def part4(model: NuwaInfinity, tuned: bool) -> dict:
    compiled = {"torch.compile": compiled_step(model, (1, 4, 8, 16), repeats=5)}
    if tuned:
        compiled["tuned"] = compiled_step(model, (1, 4, 8, 16), repeats=5, step=TunedStep)
    for name, rows in compiled.items():
        if "error" in rows:
            print(f"AR step compiled ({name}): not compiled here: {rows['error']}", flush=True)
        for batch, c in rows.items():
            if isinstance(batch, int):
                print(f"AR step compiled ({name}) batch {batch:2d}: {c['compiled_us']:7.1f} us/token against "
                      f"{c['eager_us']:7.1f} eager ({c['speedup']:.2f}x), compiling {c['compile_s']:.1f} s, "
                      f"graphs by then {c['graphs']}, same tokens {c['same_tokens']}, "
                      f"largest difference {c['max_diff']:.1e}", flush=True)
    return compiled


def step_operations(model: NuwaInfinity, rows: int = 1) -> list:
    """(kind, thunk) for each operation of one token through renderer.TokenStep at `rows` rows (patches
    x canvases), as its __call__, logits and decode_ar run them, on a patch over 4 context patches
    halfway through it."""
    r = model.renderer
    m = r.config.tokens_per_patch
    t = m // 2  # a slot halfway through the patch
    step = TokenStep(r, patch_context(r, rows), r.text_kv(None), rows, m + 1)
    x = (r.order_emb.weight[Order.DOWN_RIGHT.id] + r.next_positions(Order.DOWN_RIGHT)[0]).expand(rows, -1)  # decode_ar's slot 0
    for s in range(t + 1):  # slot t too: every key and value the operations read is written
        step(x, s)
    d, h = step.d, step.h
    dh, at, end, shape = d // h, step.n_ctx + t, step.n_ctx + t + 1, (d,)
    first, tokens = step.inputs[0, t].clone(), torch.zeros(rows, m, dtype=torch.long)
    ops = [("other", lambda: step.inputs[0, t].copy_(first))]
    for l, (ln_1, qkv_w, keys_t, values, bias, proj, _text, ln_2, fc, out) in enumerate(step.layers):
        x = step.inputs[l, t]
        normed = torch.layer_norm(x, shape, *ln_1)
        qkv = torch.addmm(qkv_w[0], normed, qkv_w[1]).view(rows * h, 3, dh)
        scores = torch.bmm(qkv.narrow(1, 0, 1), keys_t.narrow(2, 0, end))
        probs = scores.softmax(-1)
        y = torch.bmm(probs, values.narrow(1, 0, end)).view(rows, d)
        x2 = torch.addmm(proj[0], y, proj[1]).add_(x)
        normed2 = torch.layer_norm(x2, shape, *ln_2)
        u = F.gelu(torch.addmm(fc[0], normed2, fc[1]), approximate="tanh")
        scratch_scores, scratch_x, scratch_u, mlp_out, scratch_out = (v.clone() for v in (scores, x2, u, x2, x2))
        if l < len(step.layers) - 1:  # the output written into the next layer's input buffer (here a scratch one)
            residual = ("other", lambda a=x2, b=mlp_out, o=scratch_out: torch.add(a, b, out=o))
        else:
            residual = ("other", lambda a=scratch_out, b=mlp_out: a.add_(b))
        ops += [("other", lambda x=x, ln_1=ln_1: torch.layer_norm(x, shape, *ln_1)),
                ("linear", lambda n=normed, w=qkv_w: torch.addmm(w[0], n, w[1]).view(rows * h, 3, dh)),
                ("other", lambda k=keys_t, q=qkv: k.select(2, at).copy_(q.select(1, 1))),
                ("other", lambda v=values, q=qkv: v.select(1, at).copy_(q.select(1, 2))),
                ("attention", lambda k=keys_t, q=qkv: torch.bmm(q.narrow(1, 0, 1), k.narrow(2, 0, end)))]
        if bias is not None:
            ops.append(("other", lambda s=scratch_scores, b=bias: s.add_(b.narrow(2, 0, end))))
        ops += [("other", lambda s=scores: s.softmax(-1)),
                ("attention", lambda p=probs, v=values: torch.bmm(p, v.narrow(1, 0, end)).view(rows, d)),
                ("linear", lambda y=y, w=proj: torch.addmm(w[0], y, w[1])),
                ("other", lambda a=scratch_x, x=x: a.add_(x)),
                ("other", lambda x=x2, w=ln_2: torch.layer_norm(x, shape, *w)),
                ("linear", lambda n=normed2, w=fc: torch.addmm(w[0], n, w[1])),
                ("other", lambda a=scratch_u: F.gelu(a, approximate="tanh")),
                ("linear", lambda u=u, w=out: torch.addmm(w[0], u, w[1])),
                residual]
    ln_f, head = step.head
    last = step.inputs[-1, t]
    normed = torch.layer_norm(last, (d,), *ln_f)
    logits = torch.mm(normed, head)
    token, after = greedy(logits), r.positions()[0]
    ops += [("other", lambda: torch.layer_norm(last, (d,), *ln_f)),
            ("linear", lambda: torch.mm(normed, head)),
            ("other", lambda: greedy(logits)),
            ("other", lambda: tokens[:, t].copy_(token)),
            ("other", lambda: torch.add(F.embedding(token, r.tok_emb.weight), after))]
    return ops


def step_floor(model: NuwaInfinity, step_us: float | None, repeats: int = 2000, rows: int = 1) -> dict:
    """Part 5: the sum of today's step's operations at `rows` rows each timed alone (fastest of 3),
    beside the step's own time per token (step_us, measured by the caller)."""
    with torch.inference_mode():
        ops = step_operations(model, rows)
        alone = {"linear": 0.0, "attention": 0.0, "other": 0.0}
        for kind, op in ops:
            for _ in range(50):
                op()
            best = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                for _ in range(repeats):
                    op()
                best = min(best, (time.perf_counter() - start) / repeats)
            alone[kind] += best
    floor = sum(alone.values()) * 1e6
    return {"operations": len(ops), "step_us": None if step_us is None else round(step_us, 1), "floor_us": round(floor, 1),
            "matmuls_us": round((alone["linear"] + alone["attention"]) * 1e6, 1),
            **{f"{k}_us": round(v * 1e6, 1) for k, v in alone.items()}}


def print_floor(floor: dict, reference_us: float) -> None:
    print(f"AR step floor, batch 1: today's step {floor['step_us']:.0f} us/token; its {floor['operations']} "
          f"operations each alone sum to {floor['floor_us']:.0f} us (linear {floor['linear_us']:.0f}, attention "
          f"{floor['attention_us']:.0f}, the rest {floor['other_us']:.0f}); the goal's 3x cut of the replaced "
          f"step's {reference_us:.0f} us needs <= {reference_us / 3:.0f} us", flush=True)


def wave_floor(model: NuwaInfinity, sequential_s: float, wavefront_s: float, repeats: int = 500) -> dict:
    """Part 5 for the 16 x 16 canvas in waves: per wave, the floor of its step at the wave's rows (every
    operation alone, as step_floor) times the patch's tokens, summed over the waves; beside the canvas's
    sequential and wavefront times (measured by the caller) and the goal's (sequential / 4). It leaves
    out everything but the token steps (contexts, pool, sampler, the cache's last slot), and its rows
    share one context as part 2's do (a wave's rows each have their own), so an eager run of these
    waves takes about this at best."""
    state = model.blank_canvas(16, 16)
    waves = [w for _, segment in wavefront.plan_waves(model.plan_fill(state), state.wrap,
                                                      tuple(model.renderer.config.extent), max_size=wavefront.MAX_WAVE) for w in segment]
    sizes = sorted({len(w) for w in waves})
    per_rows = {n: step_floor(model, None, repeats, rows=n) for n in sizes}
    floor_s = sum(per_rows[len(w)]["floor_us"] for w in waves) * model.renderer.config.tokens_per_patch * 1e-6
    kinds = ("floor_us", "linear_us", "attention_us", "other_us")
    return {"waves": len(waves), "floor_by_rows": {n: {k: f[k] for k in kinds} for n, f in per_rows.items()},
            "floor_s": round(floor_s, 2),
            "sequential_s": sequential_s, "wavefront_s": wavefront_s, "goal_s": round(sequential_s / 4, 2),
            "ratio_at_floor": round(sequential_s / floor_s, 2)}


def print_wave_floor(w: dict) -> None:
    rows = "; ".join(f"{n} rows {f['floor_us']:.0f} us ({f['linear_us']:.0f} + {f['attention_us']:.0f} + {f['other_us']:.0f})"
                     for n, f in w["floor_by_rows"].items())
    print(f"16 x 16 AR in {w['waves']} waves: the steps' operations alone sum to {w['floor_s']:.2f} s (per token, "
          f"linear + attention + the rest: {rows}); the waves took {w['wavefront_s']:.2f} s, sequential "
          f"{w['sequential_s']:.2f} s, the goal's 4x needs <= {w['goal_s']:.2f} s (at the floor the ratio would be "
          f"{w['ratio_at_floor']:.2f})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2, this machine's cores)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each schedule; the fastest counts")
    parser.add_argument("--tuned-compile", action="store_true",
                        help="part 4 also with the most favourable compiled step found (TunedStep; about 1 minute more)")
    parser.add_argument("--compiled-only", action="store_true", help="part 4 only (2-3 minutes)")
    parser.add_argument("--floor-only", action="store_true", help="part 5 only, with the replaced step's batch-1 time and the 16 x 16 canvas (under a minute)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = NuwaInfinity.load(MODEL)
    if args.compiled_only:
        compiled = part4(model, args.tuned_compile)
        print(json.dumps({"compiled_step": compiled, "compiled_token_speedup": compiled["torch.compile"].get(1, {}).get("speedup")}))
        return
    if args.floor_only:
        reference_us = token_latency(model, 1, reference_decode_ar, repeats=5) * 1e6
        floor = step_floor(model, token_latency(model, 1, decode_ar, repeats=5) * 1e6)
        print_floor(floor, reference_us)
        canvas = schedules(model, 16, 16, SETTINGS, repeats=1)
        waves = wave_floor(model, canvas["sequential_s"], canvas["wavefront_s"])
        print_wave_floor(waves)
        print(json.dumps({"step_floor": floor, "reference_us": round(reference_us, 1),
                          "goal_token_us": round(reference_us / 3, 1), "wave_floor": waves}))
        return
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

    compiled = part4(model, args.tuned_compile)
    floor = step_floor(model, latency[1]["token_us"])  # part 2's batch-1 time of today's step
    print_floor(floor, latency[1]["reference_us"])
    waves = wave_floor(model, results["ar_16x16"]["sequential_s"], results["ar_16x16"]["wavefront_s"])
    print_wave_floor(waves)

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
                      "decode": decode, "compiled_step": compiled, "step_floor": floor, "wave_floor": waves,
                      "compiled_token_speedup": compiled["torch.compile"].get(1, {}).get("speedup"),
                      "speedup_16x16_ar": results["ar_16x16"]["ratio"], "goal_speedup": 4,
                      "batch1_cut": latency[1]["cut"], "goal_batch1_cut": 3,
                      "identical": all(v["identical"] for v in results.values())}))


if __name__ == "__main__":
    main()
