"""nuwa_core/clip_text_encoder.py: CLIP-L text features as ComfyUI's CLIP Text Encode computes them.

CPU tests use a tiny random CLIP (width 64, 2 layers, 16 positions) over a tiny BPE merge list written
by the test, so they need neither downloads nor CLIP's vocabulary; the few checks of real CLIP token ids
run where the vocabulary is found (ComfyUI or open_clip installed) and skip otherwise.

The ComfyUI test (marked comfyui, skipped without COMFYUI_DIR) writes random weights of the full CLIP-L
shape in ComfyUI's clip_l.safetensors layout, the same weights in open_clip's and an SD 1.5 checkpoint's
layouts, and a 248-position Long-CLIP file; in COMFYUI_PYTHON it loads them with ComfyUI's own CLIPLoader
node (the checkpoint through the checkpoint loader's CLIP path) and runs its CLIPTextEncode node; the
CONDITIONING tensors are compared with ClipTextEncoder's features, and ComfyUI's tokens with this
module's for those prompts, a list of tricky ones and 300 random ones.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nuwa_core import clip_text_encoder as cte
from nuwa_core.checkpoint import CheckpointError
from nuwa_core.clip_text_encoder import CLIP_LAYOUTS, ClipTextEncoder, ClipTextError, clip_layout

REPO = Path(__file__).resolve().parent.parent

# a tiny merge list, in a valid learning order (a merge only uses symbols that exist before it)
TINY_MERGES = [("t", "h"), ("th", "e</w>"), ("c", "a"), ("ca", "t</w>"), ("r", "e"), ("re", "d</w>"),
               ("s", "k"), ("sk", "y</w>"), ("a", "n"), ("an", "d</w>"), ("o", "n"), ("on", "e</w>")]
TINY = {"width": 64, "layers": 2, "hidden": 128, "positions": 16}


def tiny_vocab_file(folder: Path, merges=TINY_MERGES) -> Path:
    path = folder / "tiny_merges.txt"
    path.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return path


def canonical_weights(width, layers, hidden, positions, vocab, seed=0, scale=0.3) -> dict[str, torch.Tensor]:
    """Random CLIP text weights under the module's own (transformers, no text_model.) names."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, mean=0.0):
        return mean + scale * torch.randn(*shape, generator=gen)
    sd = {"embeddings.token_embedding.weight": r(vocab, width),
          "embeddings.position_embedding.weight": r(positions, width),
          "final_layer_norm.weight": r(width, mean=1.0), "final_layer_norm.bias": r(width)}
    for i in range(layers):
        p = f"encoder.layers.{i}."
        for ln in ("layer_norm1", "layer_norm2"):
            sd[p + ln + ".weight"], sd[p + ln + ".bias"] = r(width, mean=1.0), r(width)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[p + f"self_attn.{proj}.weight"] = r(width, width) / width ** 0.5 * 3
            sd[p + f"self_attn.{proj}.bias"] = r(width)
        sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = r(hidden, width) / width ** 0.5 * 3, r(hidden)
        sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = r(width, hidden) / hidden ** 0.5 * 3, r(width)
    return sd


def as_clip_l(sd):
    """ComfyUI's models/text_encoders/clip_l.safetensors: transformers' CLIPTextModel keys."""
    out = {"text_model." + k: v for k, v in sd.items()}
    width = sd["final_layer_norm.weight"].shape[0]
    out["text_projection.weight"] = torch.zeros(width, width)  # present in real files, unused by the conditioning
    out["text_model.embeddings.position_ids"] = torch.arange(sd["embeddings.position_embedding.weight"].shape[0])[None]
    return out


def as_sd1_checkpoint(sd):
    out = {"cond_stage_model.transformer.text_model." + k: v for k, v in sd.items()}
    out["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(4, 4, 3, 3)  # the UNet, ignored
    out["first_stage_model.decoder.conv_in.weight"] = torch.zeros(4, 4, 3, 3)  # the VAE, ignored
    return out


def as_open_clip(sd):
    """open_clip's text tower names, with one fused in_proj per block, plus an image-tower key."""
    top = {"embeddings.token_embedding.weight": "token_embedding.weight",
           "embeddings.position_embedding.weight": "positional_embedding",
           "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
    block = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    out = {top[k]: v for k, v in sd.items() if k in top}
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))
    for i in range(layers):
        p = f"encoder.layers.{i}."
        for ours, theirs in block.items():
            for wb in ("weight", "bias"):
                out[f"transformer.resblocks.{i}.{theirs}.{wb}"] = sd[f"{p}{ours}.{wb}"]
        for wb in ("weight", "bias"):
            out[f"transformer.resblocks.{i}.attn.in_proj_{wb}"] = torch.cat(
                [sd[f"{p}self_attn.{n}.{wb}"] for n in ("q_proj", "k_proj", "v_proj")])
    out["visual.conv1.weight"] = torch.zeros(8, 3, 4, 4)
    out["logit_scale"] = torch.tensor(4.6)
    return out


LAYOUTS = {"clip_l": as_clip_l, "sd1_checkpoint": as_sd1_checkpoint, "open_clip": as_open_clip}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(canonical weights, vocabulary path) of the tiny CLIP."""
    vocab_path = tiny_vocab_file(tmp_path_factory.mktemp("vocab"))
    vocab = 2 * 256 + len(TINY_MERGES) + 2
    return canonical_weights(vocab=vocab, **TINY), vocab_path


def tiny_encoder(tiny, layout="clip_l", **kw) -> ClipTextEncoder:
    sd, vocab_path = tiny
    return ClipTextEncoder.from_state_dict(LAYOUTS[layout](sd), layout, "tiny", vocabulary=vocab_path, **kw)


def test_layouts_are_detected_and_described():
    sd = canonical_weights(vocab=8, width=64, layers=1, hidden=8, positions=4)
    for name, convert in LAYOUTS.items():
        assert clip_layout(convert(sd).keys()) == name
        assert CLIP_LAYOUTS.get(name)
    old_sd1 = {"cond_stage_model.transformer." + k: v for k, v in sd.items()}  # pre-text_model transformers
    assert clip_layout(old_sd1) == "sd1_checkpoint"
    assert clip_layout(sd.keys()) is None  # bare canonical names are no file layout
    assert clip_layout(["model.diffusion_model.x", "first_stage_model.y"]) is None
    assert clip_layout(["token_embedding.weight", "blocks.0.qkv.weight"]) is None  # the pack's word encoder
    assert clip_layout([]) is None


def test_the_three_layouts_give_the_same_features(tiny):
    prompts = ["the red cat", "one sky and the cat, red!"]
    feats = {name: tiny_encoder(tiny, name).encode(prompts) for name in LAYOUTS}
    ref = feats["clip_l"]
    assert ref.shape == (2, TINY["positions"], TINY["width"]) and ref.dtype == torch.float32
    assert ref.abs().max() > 0.1 and ref[0].sub(ref[1]).abs().max() > 1e-2
    for name, f in feats.items():
        assert torch.equal(f, ref), name
    old = {"cond_stage_model.transformer." + k: v for k, v in tiny[0].items()}
    f = ClipTextEncoder.from_state_dict(old, "sd1_checkpoint", "old", vocabulary=tiny[1]).encode(prompts)
    assert torch.equal(f, ref)


def test_weights_are_rounded_as_comfyui_stores_them(tiny):
    half = tiny_encoder(tiny)
    full = tiny_encoder(tiny, weight_dtype=None)
    w = tiny[0]["encoder.layers.0.mlp.fc1.weight"]
    assert torch.equal(half.encoder.layers[0].mlp.fc1.weight, w.half().float())
    assert torch.equal(full.encoder.layers[0].mlp.fc1.weight, w)
    assert half.encoder.layers[0].mlp.fc1.weight.dtype == torch.float32
    a, b = half.encode(["the cat"]), full.encode(["the cat"])
    assert 0 < (a - b).abs().max() < 1e-2


def test_attributes_and_batch_equals_single(tiny):
    enc = tiny_encoder(tiny)
    assert enc.name == "tiny" and enc.width == TINY["width"] and enc.length == TINY["positions"]
    both = enc.encode(["the cat", "red sky"])
    assert torch.allclose(both[1:], enc.encode(["red sky"]), atol=1e-6)
    assert enc.encode([]).shape == (0, TINY["positions"], TINY["width"])
    with pytest.raises(ClipTextError, match="list of prompts"):
        enc.encode("the cat")


def test_padding_and_end_token(tiny):
    enc = tiny_encoder(tiny)
    t = enc.tokenizer
    assert (t.start, t.end, t.size) == (t.size - 2, t.size - 1, 2 * 256 + len(TINY_MERGES) + 2)
    the, cat = t.ids["the</w>"], t.ids["cat</w>"]
    assert t("The  CAT") == [the, cat]
    ids, weights = enc.tokenize("The  CAT")
    L = TINY["positions"]
    assert ids == [[t.start, the, cat] + [t.end] * (L - 3)]  # start, tokens, end, padded with the end token
    assert weights == [[1.0] * L]
    feats = enc.encode(["the cat"])[0]
    assert torch.equal(feats, enc(torch.tensor(ids))[0])
    # under the causal mask the features up to the end token do not depend on what follows it
    other_pad = torch.tensor([[t.start, the, cat, t.end] + [0] * (L - 4)])
    assert torch.allclose(enc(other_pad)[0, :4], feats[:4], atol=1e-6)
    assert (enc(other_pad)[0, 4:] - feats[4:]).abs().max() > 1e-3  # ... but the padding positions do
    # an empty prompt is start, end, padding, as ComfyUI encodes it
    assert enc.tokenize("")[0] == enc.tokenize("   ")[0] == [[t.start] + [t.end] * (L - 1)]


def test_long_prompts_go_on_in_further_rows(tiny):
    enc = tiny_encoder(tiny)
    t, L = enc.tokenizer, TINY["positions"]
    cat = t.ids["cat</w>"]
    for n, rows in ((L - 2, 1), (L - 1, 2), (2 * (L - 2), 2), (2 * (L - 2) + 1, 3)):
        ids, _ = enc.tokenize(" ".join(["cat"] * n))
        assert len(ids) == rows and all(len(r) == L for r in ids), n
        assert all(r[0] == t.start and r[-1] == t.end for r in ids)
        assert sum(i == cat for r in ids for i in r) == n
    ids, _ = enc.tokenize(" ".join(["cat"] * (L - 1)))
    assert ids[0] == [t.start] + [cat] * (L - 2) + [t.end]
    assert ids[1] == [t.start, cat, t.end] + [t.end] * (L - 3)
    feats = enc.encode([" ".join(["cat"] * (L - 1))])
    assert feats.shape == (1, 2 * L, TINY["width"])
    assert torch.equal(feats[0, L:], enc(torch.tensor(ids[1:]))[0])
    with pytest.raises(ClipTextError, match="different numbers of 16-token rows"):
        enc.encode(["the cat", " ".join(["cat"] * L)])


def test_a_short_bracketed_group_moves_whole_to_the_next_row(tiny):
    enc = tiny_encoder(tiny)
    t = enc.tokenizer
    ids, weights = enc.tokenize(" ".join(["cat"] * 12) + " (the red sky:1.5)")
    assert len(ids) == 2
    assert ids[0][13:] == [t.end] * 3  # row closed after 12 tokens, padded: the 3-token group did not fit
    assert ids[1][:5] == [t.start, t.ids["the</w>"], t.ids["red</w>"], t.ids["sky</w>"], t.end]
    assert weights[1][:5] == [1.0, 1.5, 1.5, 1.5, 1.0]


def test_prompt_weights_as_comfyui(tiny):
    enc = tiny_encoder(tiny)
    assert cte.weighted_segments("a (red:1.5) sky") == [("a ", 1.0), ("red", 1.5), (" sky", 1.0)]
    assert cte.weighted_segments("((sky))") == [("sky", pytest.approx(1.21))]
    assert cte.weighted_segments("(a (b:0.5) c:2)") == [("a ", 2.0), ("b", 0.5), (" c", 2.0)]
    assert cte.weighted_segments("(x:abc)") == [("x:abc", pytest.approx(1.1))]
    assert cte.weighted_segments("\\(not a weight\\)") == [("(not a weight)", 1.0)]
    feats = enc.encode(["the (red:1.5) sky"])[0]
    ids, weights = enc.tokenize("the (red:1.5) sky")
    plain = enc(torch.tensor(ids))[0]
    empty = enc(torch.tensor([[enc.tokenizer.start] + [enc.tokenizer.end] * (TINY["positions"] - 1)]))[0]
    assert weights[0][:5] == [1.0, 1.0, 1.5, 1.0, 1.0]
    assert torch.allclose(feats[2], empty[2] + 1.5 * (plain[2] - empty[2]), atol=1e-6)
    mask = torch.ones(len(feats), dtype=torch.bool)
    mask[2] = False
    assert torch.equal(feats[mask], plain[mask])
    # unit weights change nothing but where the groups start
    assert torch.equal(enc.encode(["the (red:1) sky"]), enc.encode(["the red sky"]))


@pytest.mark.parametrize("prompt, match", [
    ("a (red sky", "unclosed"), ("a red) sky", "unmatched"), ("embedding:style a cat", "textual-inversion"),
    ("a cat <|endoftext|>", "special token"), ("A <|STARTOFTEXT|>", "special token"),
    ("a cat\x00", "control"), ("zero\u200bwidth", "format"), ("猫", "CJK"), ("ΑΣ", "sigma")])
def test_prompts_comfyui_would_read_otherwise_are_refused(tiny, prompt, match):
    with pytest.raises(ClipTextError, match=match):
        tiny_encoder(tiny).encode([prompt])


def test_bad_files_give_clear_errors(tiny, tmp_path):
    sd, vocab_path = tiny
    missing = as_clip_l(sd)
    del missing["text_model.encoder.layers.1.mlp.fc2.bias"]
    with pytest.raises(CheckpointError, match=r"missing keys: encoder\.layers\.1\.mlp\.fc2\.bias"):
        ClipTextEncoder.from_state_dict(missing, "clip_l", "bad", vocabulary=vocab_path)
    extra = as_clip_l(sd)
    extra["text_model.encoder.layers.0.self_attn.rotary.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"unexpected keys: encoder\.layers\.0\.self_attn\.rotary\.weight"):
        ClipTextEncoder.from_state_dict(extra, "clip_l", "bad", vocabulary=vocab_path)
    odd = as_open_clip(sd)
    odd["transformer.resblocks.0.attn.scale"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"transformer\.resblocks\.0\.attn\.scale"):
        ClipTextEncoder.from_state_dict(odd, "open_clip", "bad", vocabulary=vocab_path)
    misshapen = as_clip_l(sd)
    misshapen["text_model.final_layer_norm.bias"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match="shape mismatches: final_layer_norm.bias"):
        ClipTextEncoder.from_state_dict(misshapen, "clip_l", "bad", vocabulary=vocab_path)
    with pytest.raises(ClipTextError, match="unknown CLIP layout 'diffusers'.*clip_l, sd1_checkpoint, open_clip"):
        ClipTextEncoder.from_state_dict(as_clip_l(sd), "diffusers", "bad", vocabulary=vocab_path)
    with pytest.raises(ClipTextError, match="cannot read the text encoder's shape"):
        ClipTextEncoder.from_state_dict(as_clip_l(sd), "open_clip", "bad", vocabulary=vocab_path)
    big = canonical_weights(vocab=2 * 256 + len(TINY_MERGES) + 2, width=64, layers=23, hidden=8, positions=4)
    with pytest.raises(ClipTextError, match="23 layers.*CLIP-H or CLIP-G"):
        ClipTextEncoder.from_state_dict(as_clip_l(big), "clip_l", "big", vocabulary=vocab_path)
    wide = canonical_weights(vocab=2 * 256 + len(TINY_MERGES) + 2, width=96, layers=1, hidden=8, positions=4)
    with pytest.raises(ClipTextError, match="width 96 is not a multiple of 64"):
        ClipTextEncoder.from_state_dict(as_clip_l(wide), "clip_l", "wide", vocabulary=vocab_path)
    more = canonical_weights(vocab=2 * 256 + len(TINY_MERGES) + 5, width=64, layers=1, hidden=8, positions=4)
    with pytest.raises(ClipTextError, match="needs 15 BPE merges.*has 12"):
        ClipTextEncoder.from_state_dict(as_clip_l(more), "clip_l", "more", vocabulary=vocab_path)


def test_a_missing_vocabulary_names_where_it_was_looked_for(tiny, tmp_path, monkeypatch):
    monkeypatch.delenv(cte.VOCAB_ENV, raising=False)
    monkeypatch.setenv("COMFYUI_DIR", str(tmp_path / "no_comfyui"))
    monkeypatch.setattr(cte, "_here_comfyui", lambda: tmp_path / "not_installed")
    monkeypatch.setattr(cte, "_package_dir", lambda name: None)
    with pytest.raises(ClipTextError, match="vocabulary.*not found") as err:
        ClipTextEncoder.from_state_dict(as_clip_l(tiny[0]), "clip_l", "tiny")
    text = str(err.value)
    for where in (cte.VOCAB_ENV, str(tmp_path / "no_comfyui"), str(tmp_path / "not_installed"), "open_clip",
                  "comfy/sd1_tokenizer/merges.txt", "pip install open_clip_torch"):
        assert where in text, where
    monkeypatch.setenv(cte.VOCAB_ENV, str(tiny[1]))  # the environment variable is enough
    assert ClipTextEncoder.from_state_dict(as_clip_l(tiny[0]), "clip_l", "tiny").tokenizer.size == 2 * 256 + 14
    with pytest.raises(ClipTextError, match="no such file"):
        cte.find_vocabulary(tmp_path / "nothing.txt")


def test_a_gzipped_vocabulary_reads_the_same(tiny, tmp_path):
    import gzip
    gz = tmp_path / "merges.txt.gz"
    gz.write_bytes(gzip.compress(Path(tiny[1]).read_bytes() + b"x y\n" * 3))  # extra merges beyond the vocab: unused
    a = tiny_encoder(tiny).encode(["the red cat"])
    b = ClipTextEncoder.from_state_dict(as_clip_l(tiny[0]), "clip_l", "tiny", vocabulary=gz).encode(["the red cat"])
    assert torch.equal(a, b)


def _real_vocabulary():
    try:
        return cte.find_vocabulary()
    except ClipTextError as err:
        pytest.skip(f"CLIP's vocabulary is not installed here: {str(err).splitlines()[0]}")


def test_real_clip_token_ids():
    path = _real_vocabulary()
    t = cte.ClipTokenizer(cte._read_merges(str(path))[:49408 - 514], str(path))
    assert (t.size, t.start, t.end) == (49408, 49406, 49407)
    assert t("a photo of a cat") == [320, 1125, 539, 320, 2368]
    assert t("A  Photo OF a CAT") == [320, 1125, 539, 320, 2368]
    assert t("It's a Dog's life!") == [585, 568, 320, 1929, 568, 970, 256]
    assert t("naïve café") == [1097, 35689, 563, 15304]
    ids, _ = t.rows("a photo of a cat")
    assert ids == [[49406, 320, 1125, 539, 320, 2368] + [49407] * 71]


# ---------------------------------------------------------------------------------------------------------
# against the real ComfyUI

COMFY_PROMPTS = [
    "a photo of a cat",
    "A Photo, OF a CAT!!  Mixed-case; punctuation: it's 3.14 (yes)... \\(literal brackets\\)",
    "",
    "a (red:1.3) fox in ((deep)) snow, (moonlight:0.8)",
    ("an extremely detailed panoramic landscape painting of rolling green hills, a winding river, scattered "
     "oak trees, distant snow-capped mountains under a dramatic sunset sky with orange, pink and purple clouds, "
     "a small wooden farmhouse with smoke rising from the chimney, sheep grazing in the meadow, wildflowers "
     "in the foreground, a red barn, a stone bridge over the river, a flock of birds in the sky, a fox at the edge "
     "of the forest, soft golden light, highly detailed, sharp focus, trending on artstation"),
]

# tokens only (cheap): compared with ComfyUI's clip.tokenize
TOKEN_PROMPTS = [
    "naïve café, Résumé & CO. -- 1,000,000 (x2)... it's 'quoted' we'll they'd",
    "emoji 🐱🐶 ☃ and symbols ©®™ ½ x² ٣ Ⅻ; Привет мир, नमस्ते, مرحبا",
    "tabs\tand\nnewlines   and \u00a0odd\u3000spaces",
    "(a (nested (deep:1.4) group) here:0.7) \\(escaped\\) (x:abc) (:1.2) ((y))",
    "short, " * 30 + "(a weighted group of more than eight tokens that has to be split across rows:1.2) " * 4,
    "supercalifragilisticexpialidocious " * 40,
]



def random_prompts(n: int, seed: int = 0) -> list[str]:
    """Seeded random prompts over many scripts, symbols and the weighting syntax, for the token comparison
    (those this module refuses are left out)."""
    import random
    rng = random.Random(seed)
    ranges = [(32, 127), (32, 127), (32, 127), (0xA0, 0x250), (0x370, 0x3FF), (0x400, 0x4FF), (0x600, 0x6FF),
              (0x900, 0x97F), (0x2000, 0x206F), (0x1F300, 0x1F64F), (0xFF00, 0xFFEF), (0x3040, 0x30FF)]
    pieces = ["cat", "Dog's", "A", "(x:1.1)", "((y))", "12", "!!", "\\(", "\\)", " ", ",", "word " * 9]
    out = []
    while len(out) < n:
        chars = "".join(chr(rng.randrange(*rng.choice(ranges))) for _ in range(rng.randint(0, 40)))
        words = [rng.choice(pieces + [chars]) for _ in range(rng.randint(1, 30))]
        prompt = " ".join(words) if rng.random() < 0.7 else chars
        try:
            cte.check_prompt(prompt)
            cte.weighted_segments(prompt)
        except ClipTextError:
            continue
        out.append(prompt)
    return out


COMFY_SCRIPT = r"""
import json, sys
import torch
comfy_dir, folder, out_path = sys.argv[1], sys.argv[2], sys.argv[3]
prompts, token_prompts = json.loads(sys.argv[4]), json.loads(sys.argv[5])
sys.path.insert(0, comfy_dir)
import comfy.cli_args
comfy.cli_args.args.cpu = True  # as the test servers run
torch.set_num_threads(1)
import folder_paths
folder_paths.add_model_folder_path("text_encoders", folder)
import comfy.sd, comfy.supported_models, comfy.utils
import nodes
from safetensors.torch import save_file


def checkpoint_clip(path):
    # CheckpointLoaderSimple's CLIP part (comfy.sd.load_state_dict_guess_config), for an SD 1.5 checkpoint
    sd = comfy.utils.load_torch_file(path, safe_load=True)
    config = comfy.supported_models.SD15(dict(comfy.supported_models.SD15.unet_config))
    clip_sd = config.process_clip_state_dict(sd)
    clip = comfy.sd.CLIP(config.clip_target(state_dict=sd), embedding_directory=None, tokenizer_data=clip_sd,
                         parameters=comfy.utils.calculate_parameters(clip_sd))
    missing, unexpected = clip.load_sd(clip_sd, full_model=True)
    assert not [k for k in missing if "text_projection" not in k and "logit_scale" not in k], missing
    return clip


out, tokens = {}, {}
for name in ("clip_l.safetensors", "open_clip_l.safetensors", "sd1_checkpoint.safetensors",
             "long_clip_l.safetensors"):
    if name.startswith("sd1"):
        clip = checkpoint_clip(folder + "/" + name)
    else:
        clip = nodes.CLIPLoader().load_clip(name, type="stable_diffusion")[0]
    for n, prompt in enumerate(prompts):
        with torch.inference_mode():
            cond = nodes.CLIPTextEncode().encode(clip, prompt)[0]
        assert len(cond) == 1, len(cond)
        out[f"{name}/{n}"] = cond[0][0].float().contiguous().clone()
    for n, prompt in enumerate(prompts + token_prompts):
        rows = clip.tokenize(prompt)["l"]
        tokens[f"{name}/{n}"] = [[int(t) for t, w in row] for row in rows], [[float(w) for t, w in row] for row in rows]
    del clip
save_file(out, out_path)
print("TOKENS " + json.dumps(tokens))
"""


@pytest.mark.comfyui
def test_features_equal_comfyui_clip_text_encode(comfyui_dir, tmp_path):
    python = os.environ.get("COMFYUI_PYTHON") or sys.executable
    torch.set_num_threads(1)
    sd = canonical_weights(vocab=49408, width=768, layers=12, hidden=3072, positions=77, seed=1)
    save_file({k: v.contiguous() for k, v in as_clip_l(sd).items()}, str(tmp_path / "clip_l.safetensors"))
    save_file({k: v.contiguous() for k, v in as_open_clip(sd).items()}, str(tmp_path / "open_clip_l.safetensors"))
    save_file({k: v.contiguous() for k, v in as_sd1_checkpoint(sd).items()},
              str(tmp_path / "sd1_checkpoint.safetensors"))
    long_sd = dict(sd)  # Long-CLIP: 248 positions, which ComfyUI reads as 248-token rows
    long_sd["embeddings.position_embedding.weight"] = torch.randn(248, 768, generator=torch.Generator().manual_seed(2))
    save_file({k: v.contiguous() for k, v in as_clip_l(long_sd).items()}, str(tmp_path / "long_clip_l.safetensors"))
    token_prompts = TOKEN_PROMPTS + random_prompts(300)
    out = tmp_path / "comfy_conditioning.safetensors"
    run = subprocess.run([python, "-c", COMFY_SCRIPT, str(comfyui_dir), str(tmp_path), str(out),
                          json.dumps(COMFY_PROMPTS), json.dumps(token_prompts)], capture_output=True, text=True,
                         timeout=1200, check=False, cwd=str(comfyui_dir), env=dict(os.environ, OMP_NUM_THREADS="1"))
    line = [ln for ln in run.stdout.splitlines() if ln.startswith("TOKENS ")]
    assert run.returncode == 0 and line, f"{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
    comfy_tokens = json.loads(line[-1][len("TOKENS "):])
    from safetensors.torch import load_file
    comfy = load_file(str(out))
    vocab = Path(comfyui_dir) / "comfy" / "sd1_tokenizer" / "merges.txt"
    tensors = as_clip_l(sd)
    ours = ClipTextEncoder.from_state_dict(tensors, "clip_l", "clip_l", vocabulary=vocab)
    full = ClipTextEncoder.from_state_dict(tensors, "clip_l", "clip_l", vocabulary=vocab, weight_dtype=None)
    long_ = ClipTextEncoder.from_state_dict(as_clip_l(long_sd), "clip_l", "long_clip_l", vocabulary=vocab)
    report = {}
    for n, prompt in enumerate(COMFY_PROMPTS):
        for name in ("clip_l.safetensors", "open_clip_l.safetensors", "sd1_checkpoint.safetensors"):
            assert [list(x) for x in ours.tokenize(prompt)] == comfy_tokens[f"{name}/{n}"], prompt
        mine = ours.encode([prompt])
        for name in ("clip_l.safetensors", "open_clip_l.safetensors", "sd1_checkpoint.safetensors"):
            theirs = comfy[f"{name}/{n}"]
            assert mine.shape == theirs.shape, (prompt, mine.shape, theirs.shape)
            report[f"{name}/{n}"] = (mine - theirs).abs().max().item()
        assert [list(x) for x in long_.tokenize(prompt)] == comfy_tokens[f"long_clip_l.safetensors/{n}"], prompt
        theirs = comfy[f"long_clip_l.safetensors/{n}"]
        assert theirs.shape == (1, 248, 768)
        report[f"long_clip_l.safetensors/{n}"] = (long_.encode([prompt]) - theirs).abs().max().item()
        report[f"float32_weights/{n}"] = (full.encode([prompt]) - comfy[f"clip_l.safetensors/{n}"]).abs().max().item()
        report[f"scale/{n}"] = mine.abs().max().item()
        if n == 0:
            first = mine
    # the last padding position differs between prompts only through attention: it is exercised
    report["attention_spread"] = (ours.encode([COMFY_PROMPTS[2]]) - first)[0, -1].abs().max().item()
    for n, prompt in enumerate(token_prompts, start=len(COMFY_PROMPTS)):
        assert [list(x) for x in ours.tokenize(prompt)] == comfy_tokens[f"clip_l.safetensors/{n}"], prompt
    print(json.dumps(report, indent=1))
    assert comfy["clip_l.safetensors/4"].shape == (1, 154, 768)  # the long prompt: two rows
    assert comfy["clip_l.safetensors/0"].shape == (1, 77, 768)
    worst = max(v for k, v in report.items() if k.split("/")[0].endswith(".safetensors"))
    assert worst <= 1e-4, report
    assert min(v for k, v in report.items() if k.startswith("float32")) > 10 * worst, report  # float16 matters
    assert report["attention_spread"] > 1e-2, report


def test_a_renderer_trains_on_a_comfyui_clip_file_and_records_it(tiny, tmp_path, tokenizer, monkeypatch):
    """`train renderer --text-encoder clip_l.safetensors`: the captions go through the same encoder as at use
    time, and the bundle names it, so NUWA's Patch Renderer can tell a prompt from another encoder."""
    from _training import renderer_args, write_image

    from nuwa_core import train
    from nuwa_core.checkpoint import sha256_file
    from nuwa_core.infinity.generation import NuwaInfinity
    sd, vocab_path = tiny
    monkeypatch.setenv(cte.VOCAB_ENV, str(vocab_path))
    clip_file = tmp_path / "clip_l.safetensors"
    save_file({k: v.contiguous() for k, v in as_clip_l(sd).items()}, str(clip_file))
    folder = tmp_path / "images"
    for n, caption in enumerate(("a red sky", "green hills")):
        write_image(folder / f"img{n}.png", seed=n)
        (folder / f"img{n}.txt").write_text(caption, encoding="utf-8")
    out = tmp_path / "model.safetensors"
    train.main(renderer_args(folder, tokenizer, out, "--steps", "2", "--text-encoder", str(clip_file)))
    model = NuwaInfinity.load(out)
    assert model.text_encoder == {"name": "clip_l", "width": TINY["width"], "sha256": sha256_file(clip_file)}
    assert model.renderer.config.text_dim == TINY["width"]
