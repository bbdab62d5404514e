"""The pack's small text encoder (nuwa_core/text_encoder.py), its `text` training stage, renderers trained
on it (`train renderer --text-encoder`) and classifier-free guidance in the patch samplers."""
from __future__ import annotations

import pytest
import torch
from _tiny import tiny_model
from _training import renderer_args, write_image
from safetensors.torch import save_file

from nuwa_core import train
from nuwa_core.checkpoint import sha256_file
from nuwa_core.infinity.generation import NuwaInfinity
from nuwa_core.infinity.patch_samplers import SamplerSettings
from nuwa_core.text_encoder import TextEncoderError, WordTextConfig, WordTextEncoder, load_text_encoder
from nuwa_core.training import loop

CAPTIONS = ("a blue sky over the sea", "a grey sky over a green meadow")


def _encoder(**kw) -> WordTextEncoder:
    torch.manual_seed(0)
    return WordTextEncoder(WordTextConfig(vocab=("a", "blue", "grey", "sky", "over", "the", "sea"), width=16,
                                          heads=2, **kw)).eval()


def _captioned(tmp_path, captions=CAPTIONS):
    folder = tmp_path / "images"
    for n, caption in enumerate(captions):
        write_image(folder / f"img{n}.png", seed=n)
        (folder / f"img{n}.txt").write_text(caption, encoding="utf-8")
    return folder


def test_words_ignore_case_and_punctuation_and_unknown_words_are_named():
    enc = _encoder()
    torch.testing.assert_close(enc.encode(["A Blue sky, over the SEA!"]), enc.encode(["a blue sky over the sea"]))
    assert not torch.allclose(enc.encode(["a blue sky over the sea"]), enc.encode(["a grey sky over the sea"]))
    assert not torch.allclose(enc.encode(["the sea over a blue sky"]), enc.encode(["a blue sky over the sea"]))
    assert enc.unknown_words("a red sky over the lava") == ["red", "lava"]
    assert enc.encode(["a red sky"]).shape == (1, 16, 16)


def test_empty_and_overlong_prompts_are_refused_by_name():
    enc = _encoder(context_length=6)
    with pytest.raises(TextEncoderError, match="has no words"):
        enc.encode(["  ,. "])
    with pytest.raises(TextEncoderError, match="has 5 words.*at most 4"):
        enc.encode(["a blue sky over sea"])


def test_padding_does_not_change_a_prompt_s_features():
    """A prompt's features do not depend on what else is in the batch (padding is masked)."""
    enc = _encoder()
    alone = enc.encode(["a sky"])
    batched = enc.encode(["a sky", "a blue sky over the sea"])[:1]
    torch.testing.assert_close(alone[:, :4], batched[:, :4])


def test_save_load_round_trip_and_unknown_layout(tmp_path):
    enc = _encoder()
    enc.save(tmp_path / "words.safetensors")
    back = load_text_encoder(tmp_path / "words.safetensors")
    assert (back.name, back.width, back.config.vocab) == ("words", 16, enc.config.vocab)
    torch.testing.assert_close(back.encode(list(CAPTIONS)), enc.encode(list(CAPTIONS)))
    save_file({"model.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(TextEncoderError, match="other.safetensors is not a text encoder.*Accepted layouts: "
                                               "nuwa_text_encoder"):
        load_text_encoder(tmp_path / "other.safetensors")


def test_text_stage_trains_an_encoder_of_the_captions_words(tmp_path):
    folder = _captioned(tmp_path)
    out = tmp_path / "text.safetensors"
    res = train.main(["text", "--images", str(folder), "--out", str(out), "--steps", "3", "--batch", "4",
                      "--width", "16", "--heads", "2", "--layers", "1", "--crop", "16", "--quiet", "--save-every", "0"])
    assert res["step"] == 3
    enc = load_text_encoder(out)
    assert enc.config.vocab == ("a", "blue", "green", "grey", "meadow", "over", "sea", "sky", "the")
    assert enc.encode(["a blue sky"]).shape[-1] == 16


def test_text_stage_names_bad_captions(tmp_path):
    folder = _captioned(tmp_path, ("a sea", "a sea"))
    with pytest.raises(loop.TrainingError, match="at least 2 different"):
        train.main(["text", "--images", str(folder), "--out", str(tmp_path / "t.safetensors"), "--steps", "1"])
    (folder / "img1.txt").unlink()
    with pytest.raises(loop.TrainingError, match=r"the text stage: no caption .* img1\.png"):
        train.main(["text", "--images", str(folder), "--out", str(tmp_path / "t.safetensors"), "--steps", "1"])


def test_renderer_trained_with_text_encoder_records_it(tmp_path, tokenizer):
    folder = _captioned(tmp_path)
    enc = _encoder()
    enc.save(tmp_path / "words.safetensors")
    out = tmp_path / "model.safetensors"
    train.main(renderer_args(folder, tokenizer, out, "--steps", "2", "--text-encoder", str(tmp_path / "words.safetensors")))
    m = NuwaInfinity.load(out)
    assert m.text_encoder == {"name": "words", "width": 16, "sha256": sha256_file(tmp_path / "words.safetensors")}
    assert m.renderer.config.text_dim == 16
    m.save(tmp_path / "again.safetensors")
    assert NuwaInfinity.load(tmp_path / "again.safetensors").text_encoder == m.text_encoder
    with pytest.raises(loop.TrainingError, match="one way: --text-encoder or --text-embeddings"):
        train.main(renderer_args(folder, tokenizer, out, "--steps", "1", "--text-encoder", "a.safetensors",
                                 "--text-embeddings", "b.safetensors"))


@pytest.mark.parametrize("decoder", ["ar", "nar", "pnar"])
def test_guidance_zero_is_the_unconditional_canvas_and_guidance_changes_it(decoder):
    """Classifier-free guidance runs [with text; without text] together: at scale 0 the sampled canvas is
    exactly the one made without a prompt (same seed), at scale 1 exactly the conditional one."""
    m = tiny_model(text_dim=8, decoder=decoder)
    text = torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(1)) * 30  # strong enough to move an untrained model
    st = m.blank_canvas(2, 3)

    def run(guidance, prompt):
        s = SamplerSettings(top_k=0, steps=3, guidance=guidance)
        return m.generate(st, m.plan_fill(st), s, text=prompt, generator=torch.Generator().manual_seed(0)).tokens

    unconditional, conditional = run(1.0, None), run(1.0, text)
    assert torch.equal(run(0.0, text), unconditional)
    assert not torch.equal(conditional, unconditional)
    assert not torch.equal(run(4.0, text), conditional)
    assert torch.equal(run(4.0, None), unconditional)  # no prompt: nothing to guide


def test_guided_canvas_continues_across_calls():
    """A guided canvas keeps its pool of 2B caches; a later call (guided or not) reads the canvas on."""
    m = tiny_model(text_dim=8)
    text = torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(1))
    st = m.blank_canvas(1, 2)
    s = SamplerSettings(top_k=0, guidance=3.0)
    st = m.generate(st, m.plan_fill(st), s, text=text, generator=torch.Generator().manual_seed(0))
    grown = m.generate(st, m.plan_extension(st, right=1), s, text=text, generator=torch.Generator().manual_seed(0))
    plain = m.generate(st, m.plan_extension(st, right=1), SamplerSettings(top_k=0), text=text,
                       generator=torch.Generator().manual_seed(0))
    assert torch.equal(grown.tokens[..., :8], st.tokens) and torch.equal(plain.tokens[..., :8], st.tokens)
    assert bool(grown.known.all()) and bool(plain.known.all())


# ---- nodes: NUWA Text Encoder Loader, NUWA Text Encode, the Patch Renderer's prompt checks and guidance ----------

def _text_model(encoder_name="words", width=16):
    m = tiny_model(text_dim=width)
    m.text_encoder = {"name": encoder_name, "width": width}
    with torch.no_grad():  # a random tiny renderer barely reads its text: make the prompt matter
        for blk in m.renderer.blocks:
            blk.xproj.weight.mul_(30)
    return m


def test_text_nodes_load_encode_and_the_renderer_follows_guidance(pack, tmp_path, monkeypatch):
    from _pack import node
    monkeypatch.setenv("NUWA_MODELS_DIR", str(tmp_path))
    (tmp_path / "nuwa" / "text_encoders").mkdir(parents=True)
    _encoder().save(tmp_path / "nuwa" / "text_encoders" / "words.safetensors")
    combo = pack["NUWATextEncoderLoader"].INPUT_TYPES()["required"]["text_encoder_name"][0]
    assert combo[0] == "nuwa_text_scenes.safetensors" and "words.safetensors" in combo
    assert "text_encoders/words.safetensors" not in pack["NUWAModelLoader"].INPUT_TYPES()["required"]["model_name"][0]
    (encoder,) = node(pack, "NUWATextEncoderLoader")("words.safetensors")
    (cond,) = node(pack, "NUWATextEncode")(encoder, "A blue sky over the sea")
    assert cond[0][0].shape == (1, 16, 16) and cond[0][1]["nuwa_text_encoder"] == "words"
    with pytest.raises(ValueError, match="the prompt is empty"):
        node(pack, "NUWATextEncode")(encoder, "   ")
    model = _text_model()
    (canvas,) = node(pack, "NUWAEmptyCanvas")(model, 32, 48, 1, 1)
    plan, _ = node(pack, "NUWADirectionPlanner")(model, canvas, 0, 0, 0, 0, 0, 0, "center")
    render = node(pack, "NUWAPatchRenderer")
    args = (model, canvas, plan, 3, "auto", 4, 1.0, 0, 1.0)
    plain, _ = render(*args, conditioning=cond)
    assert torch.equal(render(*args, conditioning=cond, guidance=1.0)[0], plain)
    assert not torch.equal(render(*args, conditioning=cond, guidance=5.0)[0], plain)
    assert torch.equal(render(*args, conditioning=cond, guidance=0.0)[0], render(*args)[0])


def test_renderer_names_the_prompt_that_does_not_fit(pack):
    from _pack import node
    canvas = tiny_model().blank_canvas(1, 1)
    render = node(pack, "NUWAPatchRenderer")
    plan, _ = node(pack, "NUWADirectionPlanner")(tiny_model(), canvas, 0, 0, 0, 0, 0, 0, "center")
    clip = [[torch.zeros(1, 77, 768), {"pooled_output": torch.zeros(1, 768)}]]
    ours = [[torch.zeros(1, 16, 16), {"nuwa_text_encoder": "other"}]]
    with pytest.raises(ValueError, match="no text path.*CLIP Text Encode"):
        render(tiny_model(), canvas, plan, 0, "auto", 4, 1.0, 0, 1.0, conditioning=clip)
    with pytest.raises(ValueError, match="768 wide \\(from a CLIP Text Encode node\\).*16-wide.*text encoder words"):
        render(_text_model(), canvas, plan, 0, "auto", 4, 1.0, 0, 1.0, conditioning=clip)
    with pytest.raises(ValueError, match="text encoder other, but the model was trained with words: load words"):
        render(_text_model(), canvas, plan, 0, "auto", 4, 1.0, 0, 1.0, conditioning=ours)


def test_a_retrained_encoder_under_the_same_name_is_refused(pack, tmp_path, monkeypatch):
    """Models record the sha256 of the pack text encoder they were trained with; a prompt from another file of
    the same name (the encoder retrained or replaced) is refused, for NUWA-Infinity and NUWA-XL alike."""
    from _pack import node
    monkeypatch.setenv("NUWA_MODELS_DIR", str(tmp_path))
    folder = tmp_path / "nuwa" / "text_encoders"
    folder.mkdir(parents=True)
    _encoder().save(folder / "words.safetensors")
    (encoder,) = node(pack, "NUWATextEncoderLoader")("words.safetensors")
    (cond,) = node(pack, "NUWATextEncode")(encoder, "a blue sky")
    assert cond[0][1]["nuwa_text_encoder_sha256"] == encoder.sha256
    model = _text_model()
    model.text_encoder = {"name": "words", "width": 16, "sha256": encoder.sha256}
    canvas = model.blank_canvas(1, 1)
    plan, _ = node(pack, "NUWADirectionPlanner")(model, canvas, 0, 0, 0, 0, 0, 0, "center")
    render = node(pack, "NUWAPatchRenderer")
    render(model, canvas, plan, 0, "auto", 4, 1.0, 0, 1.0, conditioning=cond)  # the same file: fine
    model.text_encoder["sha256"] = "0" * 64
    with pytest.raises(ValueError, match="named words that is not the one the model was trained with"):
        render(model, canvas, plan, 0, "auto", 4, 1.0, 0, 1.0, conditioning=cond)
