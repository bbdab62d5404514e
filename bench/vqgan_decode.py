"""Decoding a canvas against generating it: the tiled VQGAN decode one window at a time (the old
path, max_windows=1) and batched (the default, vqgan.window_batch), and the live preview's
incremental update after one patch changed against a full decode.

Shipped default model (`models/nuwa/nuwa_infinity_default.safetensors`: patches of 8x8 tokens, the
f8 tokenizer, windows of 8 + 2*2 tokens), a 2x64-patch panorama (16 x 512 tokens, 128 x 4096 px) of
random valid tokens, 2 threads (the users' default). Generation: the same 2x64 canvas grown once
with top-k 100 (--gen-cols N: an N-column canvas instead, its time scaled by 64 / N). Every decode
is timed as the best of --repeat runs. The last line is JSON:

decode_one_s / decode_batched_s   the tiled decode of the canvas, one window at a time / batched
decode_speedup                    decode_one_s / decode_batched_s
generate_s                        generating the canvas (scaled when --gen-cols < 64)
decode_over_generate_before/after decode_one_s / generate_s, decode_s / generate_s
batched_max_abs_diff              max |batched - one at a time| (float rounding; must be <= 5e-5)
decode_nchw_s / encode_nchw_s     the batched decode, and encoding the canvas's 128 x 4096 px, with the
                                  maps in the contiguous (NCHW) layout used before session 47
decode_s / encode_s               the same with the layout VQModel uses now (channels-last on the CPU)
layout_decode_speedup / _encode_  decode_nchw_s / decode_s, encode_nchw_s / encode_s (alternating rounds)
layout_max_abs_diff               max |channels-last decode - NCHW decode| (float rounding)
preview_full_s                    the old preview: NuwaInfinity.decode of frame 0 of the whole canvas
preview_incremental_s             PreviewDecoder after one patch changed (windows decoded: preview_windows)
preview_speedup                   preview_full_s / preview_incremental_s
preview_max_abs_diff              max |incremental preview - full decode|
"""
import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch

from nuwa_core.infinity.generation import NuwaInfinity
from nuwa_core.infinity.patch_samplers import SamplerSettings
from nuwa_core.infinity.preview import PreviewDecoder
from nuwa_core.infinity.vqgan import VQModel, window_batch

MODEL = REPO / "models" / "nuwa" / "nuwa_infinity_default.safetensors"
ROWS, COLS = 2, 64


def best(fn, repeat: int):
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2, help="runs per decode timing (the best counts)")
    parser.add_argument("--gen-cols", type=int, default=COLS, help="columns of the generated canvas (time scaled)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = NuwaInfinity.load(MODEL)
    vq, tile = model.vqgan, model.vqgan_tile
    state = model.blank_canvas(ROWS, COLS)
    g = torch.Generator().manual_seed(0)
    state.tokens.copy_(torch.randint(0, vq.config.n_embed, state.tokens.shape, generator=g))
    state.known.fill_(True)
    tokens = state.tokens[:, 0]  # [1, 16, 512]

    def decode(max_windows):
        return lambda: vq.decode_tokens_tiled(tokens, tile=tile, overlap=tile // 4, max_windows=max_windows)

    decode(None)()  # warm-up
    one_s, one = best(decode(1), args.repeat)
    batched_s, batched = best(decode(None), args.repeat)

    # the maps' memory layout: channels-last (VQModel._conv_layout) against the contiguous layout before it,
    # alternating, each one's best of 3 rounds; the encoder on an image the canvas's size
    pixels = batched.clamp(-1, 1)
    channels_last, nchw = VQModel._conv_layout, staticmethod(lambda x: x)
    decode_times, encode_times, decoded = {"nchw": [], "channels_last": []}, {"nchw": [], "channels_last": []}, {}
    for _ in range(3):
        for name, fn in (("nchw", nchw), ("channels_last", staticmethod(channels_last))):
            VQModel._conv_layout = fn
            decode(None)()  # the other layout's kernels are cached separately: warm them
            dec_s, decoded[name] = best(decode(None), args.repeat)
            decode_times[name].append(dec_s)
            encode_times[name].append(best(lambda: vq.encode_tokens(pixels), args.repeat)[0])
    VQModel._conv_layout = staticmethod(channels_last)
    nchw_dec, cl_dec = min(decode_times["nchw"]), min(decode_times["channels_last"])
    nchw_enc, cl_enc = min(encode_times["nchw"]), min(encode_times["channels_last"])

    # generation of the same canvas (or a narrower one, scaled)
    gen = model.blank_canvas(ROWS, args.gen_cols)
    t = time.perf_counter()
    model.generate(gen, model.plan_fill(gen), SamplerSettings(top_k=100), generator=torch.Generator().manual_seed(0))
    generate_s = (time.perf_counter() - t) * COLS / args.gen_cols

    # the preview: the old full decode of frame 0, and the incremental update after one patch changed
    full_s, full = best(lambda: model.decode(state)[0], args.repeat)
    preview = PreviewDecoder(model)
    preview(state)
    incremental = []
    for n in range(args.repeat):
        state.set_patch((0, 1, 20 + 7 * n), torch.randint(0, vq.config.n_embed, (1, 64), generator=g))
        t = time.perf_counter()
        image = preview(state)
        incremental.append(time.perf_counter() - t)
    incremental_s = min(incremental)
    full = model.decode(state)[0]

    result = {
        "canvas_patches": [ROWS, COLS], "tokens": list(tokens.shape[1:]), "tile": tile, "overlap": tile // 4,
        "threads": args.threads, "windows": preview.decoder.windows,
        "windows_per_call": window_batch(vq.config, tile, 1, tokens.device, vq._dtype()),
        "decode_one_s": round(one_s, 3), "decode_batched_s": round(batched_s, 3),
        "decode_speedup": round(one_s / batched_s, 2),
        "batched_max_abs_diff": float((batched - one).abs().max()),
        "decode_nchw_s": round(nchw_dec, 3), "decode_s": round(cl_dec, 3),
        "encode_nchw_s": round(nchw_enc, 3), "encode_s": round(cl_enc, 3),
        "layout_decode_speedup": round(nchw_dec / cl_dec, 2), "layout_encode_speedup": round(nchw_enc / cl_enc, 2),
        "layout_max_abs_diff": float((decoded["channels_last"] - decoded["nchw"]).abs().max()),
        "generate_s": round(generate_s, 3), "generated_cols": args.gen_cols,
        "decode_over_generate_before": round(one_s / generate_s, 3),
        "decode_over_generate_after": round(cl_dec / generate_s, 3),
        "preview_full_s": round(full_s, 3), "preview_incremental_s": round(incremental_s, 4),
        "preview_windows": preview.decoder.decoded, "preview_speedup": round(full_s / incremental_s, 1),
        "preview_max_abs_diff": float((image - full).abs().max()),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
