"""Renderer captions: precomputed embeddings (--text-embeddings) and an open_clip text tower (--clip)."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import save_file

from nuwa_core import train
from nuwa_core.training import loop, renderer as renderer_stage
from nuwa_core.checkpoint import CheckpointError
from _training import renderer_args, trained_weights, write_image

WIDTH = 12


def _folder(tmp_path, captions=("a red sky", "green hills")):
    folder = tmp_path / "images"
    for n, caption in enumerate(captions):
        write_image(folder / f"img{n}.png", seed=n)
        (folder / f"img{n}.txt").write_text(caption, encoding="utf-8")
    return folder


def _embeddings(tmp_path, stems=("img0", "img1"), shape=(5, WIDTH)):
    gen = torch.Generator().manual_seed(0)
    path = tmp_path / "captions.safetensors"
    save_file({s: torch.randn(shape, generator=gen) for s in stems}, str(path))
    return path


def test_text_embeddings_train_resume_exactly_and_the_bundle_generates_with_text(tmp_path, tokenizer):
    folder, emb = _folder(tmp_path), _embeddings(tmp_path)
    torch.set_num_threads(1)
    text_args = ("--text-embeddings", str(emb), "--text-drop", "0.5")
    train.main(renderer_args(folder, tokenizer, tmp_path / "one.safetensors", "--steps", "4", *text_args))
    train.main(renderer_args(folder, tokenizer, tmp_path / "two.safetensors", "--steps", "4", "--stop-at", "2",
                             *text_args))
    train.main(renderer_args(folder, tokenizer, tmp_path / "two.safetensors", "--steps", "4", "--resume", *text_args))
    a, b = trained_weights(tmp_path / "one.safetensors"), trained_weights(tmp_path / "two.safetensors")
    assert any(k.endswith(".xk.weight") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with pytest.raises(loop.TrainingError, match="text.drop"):  # another caption dropout: another run
        train.main(renderer_args(folder, tokenizer, tmp_path / "two.safetensors", "--steps", "5", "--resume",
                                 "--text-embeddings", str(emb)))

    from nuwa_core.infinity.generation import NuwaInfinity
    from nuwa_core.infinity.patch_samplers import SamplerSettings
    m = NuwaInfinity.load(tmp_path / "one.safetensors")
    assert m.renderer.config.text_dim == WIDTH  # taken from the embeddings
    text = torch.randn(1, 5, WIDTH)
    st = m.blank_canvas(1, 3)
    st = m.generate(st, m.plan_fill(st), SamplerSettings(top_k=8), text=text,
                    generator=torch.Generator().manual_seed(0))
    assert st.known.all() and m.decode(st).shape == (1, 8, 24, 3)
    r, ctx, tokens = m.renderer, renderer_stage.Context(None, None, 0), st.tokens[:, 0, :2, :2].reshape(1, 4)
    with_text = r.teacher_forced(tokens, renderer_stage.adc.Order.RIGHT_DOWN, ctx, r.text_kv(text.float()))[0]
    without = r.teacher_forced(tokens, renderer_stage.adc.Order.RIGHT_DOWN, ctx, r.text_kv(None))[0]
    assert not torch.allclose(with_text, without)  # the caption reaches the logits


def test_text_embeddings_errors_name_the_problem(tmp_path, tokenizer):
    folder = _folder(tmp_path)
    with pytest.raises(loop.TrainingError, match="no embedding for 1 training image.*img1"):
        train.main(renderer_args(folder, tokenizer, tmp_path / "x.safetensors", "--steps", "1",
                                 "--text-embeddings", str(_embeddings(tmp_path, stems=("img0",)))))
    emb = _embeddings(tmp_path)
    with pytest.raises(loop.TrainingError, match=f"--text-dim 16 does not match.*{WIDTH} wide"):
        train.main(renderer_args(folder, tokenizer, tmp_path / "x.safetensors", "--steps", "1",
                                 "--text-embeddings", str(emb), "--text-dim", "16"))
    with pytest.raises(loop.TrainingError, match="needs captions"):
        train.main(renderer_args(folder, tokenizer, tmp_path / "x.safetensors", "--steps", "1", "--text-dim", "16"))
    with pytest.raises(loop.TrainingError, match="not both"):
        train.main(renderer_args(folder, tokenizer, tmp_path / "x.safetensors", "--steps", "1",
                                 "--text-embeddings", str(emb), "--clip", "c.safetensors", "--clip-model", "ViT-B-32"))


def test_vector_embeddings_are_one_token(tmp_path, tokenizer):
    folder, emb = _folder(tmp_path), _embeddings(tmp_path, shape=(WIDTH,))
    res = train.main(renderer_args(folder, tokenizer, tmp_path / "v.safetensors", "--steps", "1",
                                   "--text-embeddings", str(emb), "--text-drop", "0"))
    assert res["step"] == 1


def test_clip_names_images_without_caption_and_a_missing_open_clip(tmp_path, tokenizer, monkeypatch):
    folder = _folder(tmp_path)
    (folder / "img1.txt").unlink()
    args = renderer_args(folder, tokenizer, tmp_path / "x.safetensors", "--steps", "1",
                         "--clip", str(tmp_path / "clip.safetensors"), "--clip-model", "ViT-B-32")
    with pytest.raises(loop.TrainingError, match=r"no caption \(same-name .txt\) for 1 training image.*img1.png"):
        train.main(args)
    (folder / "img1.txt").write_text("", encoding="utf-8")  # an empty caption is allowed
    monkeypatch.setitem(sys.modules, "open_clip", None)  # as if not installed
    with pytest.raises(loop.TrainingError, match="pip install open_clip_torch"):
        train.main(args)
    with pytest.raises(loop.TrainingError, match="--clip-allow-pickle"):
        train.main([a.replace("clip.safetensors", "clip.bin") for a in args])


# ---- a real open_clip text tower (tiny, random), when open_clip is installed ---------------------

TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 24, "heads": 2, "layers": 2}}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    open_clip = pytest.importorskip("open_clip")
    folder = tmp_path_factory.mktemp("clip")
    config = folder / "nuwa-tiny-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model("nuwa-tiny-clip", pretrained=None)
    weights = folder / "tiny_clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return config, weights, model.eval()


def test_clip_features_are_open_clips_tokens_before_pooling(tiny_clip):
    from nuwa_core.training import captions
    config, weights, reference = tiny_clip
    tower, tokenizer = captions.load_text_tower(str(weights), str(config))
    ids = tokenizer(["a red sky", "green hills over the sea"])
    tokens = captions._token_features(tower, ids)
    assert tokens.shape == (2, 77, TINY_CLIP["text_cfg"]["width"])
    # open_clip's own pooled text feature = our token sequence at the end token, projected
    pooled = tokens[torch.arange(2), ids.argmax(-1)] @ reference.text_projection
    torch.testing.assert_close(pooled, reference.encode_text(ids))


def test_clip_captions_train_a_text_renderer(tmp_path, tokenizer, tiny_clip):
    config, weights, _ = tiny_clip
    folder = _folder(tmp_path)
    res = train.main(renderer_args(folder, tokenizer, tmp_path / "c.safetensors", "--steps", "2",
                                   "--clip", str(weights), "--clip-model", str(config), "--text-drop", "0"))
    assert res["step"] == 2
    from nuwa_core.infinity.generation import NuwaInfinity
    assert NuwaInfinity.load(tmp_path / "c.safetensors").renderer.config.text_dim == TINY_CLIP["text_cfg"]["width"]


def test_clip_weights_of_another_layout_name_the_keys(tmp_path, tiny_clip):
    from nuwa_core.training import captions
    config, weights, _ = tiny_clip
    from nuwa_core.checkpoint import load_state_dict
    sd, _ = load_state_dict(weights)
    del sd["ln_final.weight"]
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match="missing keys: ln_final.weight"):
        captions.load_text_tower(str(tmp_path / "bad.safetensors"), str(config))
