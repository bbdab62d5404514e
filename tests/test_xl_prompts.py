"""Prompted NUWA-XL: classifier-free guidance, the prompt schedule per level, captions for the xl stage."""
import sys

import pytest
import torch
from _pack import import_pack, node
from _xl import load_xl, xl_cond
from test_xl_training import _frames, _xl_args
from test_xl_tree import SHAPE, D, perturbed

from nuwa_core import train
from nuwa_core.checkpoint import sha256_file
from nuwa_core.text_encoder import WordTextConfig, WordTextEncoder
from nuwa_core.training import loop, xl as xt
from nuwa_core.xl.diffusion import guided, sample_ddim
from nuwa_core.xl.diffusion_over_diffusion import generate_long_video, prompt_schedule, spread_prompts
from nuwa_core.xl.model import load_mtd_xl

VOCAB = ("a", "blue", "grey", "sky", "over", "the", "sea", "green", "meadow")


def _ids(prompts):
    """Prompts whose value names them: prompt p is p + 1 everywhere -> [P, 1, 1]."""
    return torch.arange(1, prompts + 1, dtype=torch.float32)[:, None, None]


def test_guidance_batches_both_passes_and_mixes_them():
    calls = []

    def model(x, t, ctx):
        calls.append(x.shape[0])
        return x * 0 + ctx.mean(dim=(1, 2, 3), keepdim=True)[..., None]  # eps = the prompt's value

    x, t = torch.randn(2, 3, 1, 2, 2), torch.full((2,), 10.0)
    ctx = torch.full((2, 3, 1, 1), 2.0)
    assert torch.equal(guided(model, (ctx,), (torch.zeros_like(ctx),), 1.0)(x, t), torch.full_like(x, 2.0))
    assert calls == [2]  # guidance 1: the conditional pass alone
    out = guided(model, (ctx,), (torch.zeros_like(ctx),), 3.0)(x, t)
    assert calls == [2, 4] and torch.allclose(out, torch.full_like(x, 6.0))  # 0 + 3 * (2 - 0), one batch of 2B
    with pytest.raises(ValueError, match="null condition must have its condition's shape"):
        guided(model, (ctx,), (torch.zeros(1, 1, 1, 1),), 2.0)


def test_spread_prompts_and_the_schedule_per_level():
    p = _ids(3)  # three equal parts of 9 frames
    assert spread_prompts(p, 9).flatten().tolist() == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert spread_prompts(_ids(2), 5).flatten().tolist() == [1, 1, 2, 2, 2]
    assert spread_prompts(p, 3).flatten().tolist() == [1, 2, 3]
    assert spread_prompts(_ids(1), 4).flatten().tolist() == [1] * 4
    # L=3, depth 3: levels of 3, 5, 9 frames. Keyframe prompts alone drive every level, by position
    levels = prompt_schedule([_ids(3)], 3, 3)
    assert [lv.flatten().tolist() for lv in levels] == [[1, 2, 3], [1, 1, 2, 3, 3], [1, 1, 1, 2, 2, 2, 3, 3, 3]]
    # denser prompts for level 2 (5: one per frame); level 3 takes them, spread over its 9 frames
    levels = prompt_schedule([_ids(3), 10 + _ids(5)], 3, 3)
    assert [lv.flatten().tolist() for lv in levels] == [
        [1, 2, 3], [11, 12, 13, 14, 15], [11, 11, 12, 12, 13, 14, 14, 15, 15]]
    # only level 3 given: the coarser levels read it at their frames' moments
    levels = prompt_schedule([None, None, 20 + _ids(9)], 3, 3)
    assert [lv.flatten().tolist() for lv in levels] == [[21, 25, 29], [21, 23, 25, 27, 29], list(range(21, 30))]
    with pytest.raises(ValueError, match="level 3 but the tree has only 2 levels"):
        prompt_schedule([_ids(1), None, _ids(1)], 3, 2)


def test_guided_tree_is_seeded_and_guidance_zero_is_the_null_prompt():
    model = perturbed(0)
    prompts = torch.randn(1, 2, D)
    run = lambda p, g, seed=0: generate_long_video(
        model, model, p, 3, 2, SHAPE, sampler=sample_ddim, steps=2, generator=torch.Generator().manual_seed(seed),
        guidance=g)
    with torch.no_grad():
        a, b = run(prompts, 4.0), run(prompts, 4.0)
        plain, null = run(prompts, 1.0), run(torch.zeros(1, 2, D), 1.0)
        zero = run(prompts, 0.0)
    assert torch.equal(a, b) and not torch.allclose(a, plain, atol=1e-4)
    assert torch.allclose(zero, null, atol=1e-5)  # guidance 0: only the unconditional (null) pass counts


def test_captions_per_frame_and_their_errors(tmp_path):
    video = tmp_path / "pan"
    video.mkdir()
    cap = tmp_path / "pan.txt"
    cap.write_text("# scenes\n0: a blue sky over the sea\n5: a grey sky over a green meadow\n", encoding="utf-8")
    assert xt.frame_captions(video, 4, frame_step=2) == ["a blue sky over the sea"] * 3 + [
        "a grey sky over a green meadow"]
    cap.write_text("a blue sky over the sea\n", encoding="utf-8")  # one line: the whole video
    assert xt.frame_captions(video, 2) == ["a blue sky over the sea"] * 2
    for text, message in (("3: a sky\n", "frames 0..2 have no caption"),
                          ("0: a sky\nthe sea\n", "line 2: 'the sea' is not `FRAME: caption`"),
                          ("0: a sky\n0: the sea\n", "frame 0 comes after frame 0")):
        cap.write_text(text, encoding="utf-8")
        with pytest.raises(loop.TrainingError, match=message):
            xt.frame_captions(video, 4)
    with pytest.raises(loop.TrainingError, match="no captions for the video clip.mp4: expected clip.txt"):
        xt.frame_captions(tmp_path / "clip.mp4", 4)


def test_encode_captions_once_and_refuse_unknown_words():
    torch.manual_seed(0)
    enc = WordTextEncoder(WordTextConfig(vocab=VOCAB, width=8, context_length=8, layers=1, heads=2), "tiny_text")
    caps = [["a blue sky over the sea"] * 2 + ["a grey sky over the sea"], ["a grey sky over the sea"]]
    table, ids = xt.encode_captions(enc, caps)
    assert table.shape == (2, 8, 8) and [i.tolist() for i in ids] == [[0, 0, 1], [1]]
    assert torch.allclose(table[1], enc.encode(["a grey sky over the sea"])[0])
    with pytest.raises(loop.TrainingError, match=r"does not know the words \['flower'\]"):
        xt.encode_captions(enc, [["a flower over the sea"]])


def test_xl_stage_trains_on_captions_through_the_text_encoder(tmp_path, vae_file):
    torch.manual_seed(0)
    enc_path = tmp_path / "tiny_text.safetensors"
    WordTextEncoder(WordTextConfig(vocab=VOCAB, width=8, context_length=8, layers=1, heads=2)).save(enc_path)
    videos = tmp_path / "videos"
    _frames(videos / "a", n=10), _frames(videos / "b", n=10)
    (videos / "a.txt").write_text("0: a blue sky over the sea\n5: a grey sky over the sea\n", encoding="utf-8")
    out = tmp_path / "mtd.safetensors"
    args = _xl_args(videos, vae_file, out, "--steps", "1", "--text-encoder", str(enc_path), "--depth", "2")
    with pytest.raises(loop.TrainingError, match="no captions for the video b: expected b.txt"):
        train.main(args)
    (videos / "b.txt").write_text("a green meadow\n", encoding="utf-8")
    train.main(args)
    model, info = load_mtd_xl(out)
    assert info["prompts"] == "text" and info["text_encoder"] == {"name": "tiny_text", "width": 8,
                                                                   "sha256": sha256_file(enc_path)}
    assert model.config.context_dim == 8


def test_nodes_check_the_text_encoder_and_take_a_schedule_per_level(pack, models_dir):
    model = load_xl(pack, "vae_text.safetensors", "mtd_text.safetensors")
    model.info["text_encoder"] = {"name": "scenes_text", "width": 8}
    c2f = node(pack, "NUWAXLCoarseToFine")
    other = [[torch.randn(1, 4, 8), {"nuwa_text_encoder": "other_text"}]]
    with pytest.raises(ValueError, match="from the text encoder other_text but mtd_text.safetensors was trained "
                                         "with scenes_text"):
        c2f(model, 3, 2, 2, 0, 0, other)
    xl_nodes = sys.modules[f"{import_pack().__name__}.nodes.xl_nodes"]
    keys, dense = xl_cond(2), xl_cond(5)
    levels = xl_nodes.level_schedule(model, 3, 3, keys, {"conditioning_level_2": dense}, "test")
    assert [lv.shape[0] for lv in levels] == [3, 5, 9]
    assert torch.equal(levels[0][0], keys[0][0][0]) and torch.equal(levels[0][1], keys[1][0][0])
    assert torch.equal(levels[1][3], dense[3][0][0]) and torch.equal(levels[2][6], dense[3][0][0])
    assert torch.equal(levels[2][7], dense[4][0][0])
    a = c2f(model, 3, 2, 2, 0, 0, keys, 3.0)[0]
    assert torch.equal(a, c2f(model, 3, 2, 2, 0, 0, keys, 3.0)[0])
    assert not torch.equal(a, c2f(model, 3, 2, 2, 0, 0, keys, 1.0)[0])
