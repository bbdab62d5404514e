"""Baselines: the taming-style sliding-window sampler and the evaluation images (tiny models, CPU)."""
import json

import pytest
import torch

from nuwa_core.evaluation import baselines
from nuwa_core.evaluation.baselines import canvas_from_tokens, generate_images, taming_sliding_window
from nuwa_core.infinity.canvas import UNKNOWN
from nuwa_core.images import save_image
from nuwa_core.infinity.patch_samplers import SamplerSettings

from _tiny import tiny_model, tiny_renderer


@pytest.fixture(autouse=True)
def one_thread():
    """Token-by-token sampling is many tiny ops: on a loaded machine extra threads only stall."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def gpt(window=4):
    return tiny_renderer(patch_size=(1, window, window), extent=(0, 0, 0))


def test_sliding_window_fills_canvas_and_is_seeded():
    g = gpt()
    s = SamplerSettings(top_k=8)
    a = taming_sliding_window(g, s, torch.Generator().manual_seed(0), rows=6, cols=10)
    b = taming_sliding_window(g, s, torch.Generator().manual_seed(0), rows=6, cols=10)
    c = taming_sliding_window(g, s, torch.Generator().manual_seed(1), rows=6, cols=10)
    assert a.shape == (1, 6, 10) and a.dtype == torch.long
    assert (a >= 0).all() and (a < 64).all()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sliding_window_keeps_given_tokens_and_window_context_matters():
    g = gpt()
    s = SamplerSettings(top_k=8)
    given = torch.randint(0, 64, (2, 4, 8), generator=torch.Generator().manual_seed(3))
    toks = given.clone()
    toks[:, :, 5:] = UNKNOWN
    out = taming_sliding_window(g, s, torch.Generator().manual_seed(0), tokens=toks)
    assert out.shape == (2, 4, 8)
    assert torch.equal(out[:, :, :5], given[:, :, :5]) and (out[:, :, 5:] >= 0).all()
    assert (toks[:, :, 5:] == UNKNOWN).all()  # the input is left untouched


def test_sliding_window_matches_bench_original_when_rows_equal_window():
    """The bench's former inline sampler (rows == window), token for token."""
    from nuwa_core.infinity.arbitrary_direction_controller import Order
    from nuwa_core.infinity.patch_samplers import filter_logits, sample_categorical
    from nuwa_core.infinity.renderer import Context
    g, s, W, R, C = gpt(), SamplerSettings(top_k=8), 4, 4, 9
    gen = torch.Generator().manual_seed(0)
    ref = torch.zeros(1, R, C, dtype=torch.long)
    with torch.no_grad():
        for i in range(R):
            for j in range(C):
                j0 = min(max(j - W // 2, 0), C - W)
                window = ref[:, :, j0:j0 + W].reshape(1, -1)
                t = i * W + (j - j0)
                logits, _ = g(g.ar_inputs(window[:, :t], Order.RIGHT_DOWN), Context(None, None, 0),
                              g.text_kv(None), causal=True)
                ref[0, i, j] = sample_categorical(filter_logits(logits[:, -1], s), gen)
    out = taming_sliding_window(g, s, torch.Generator().manual_seed(0), rows=R, cols=C)
    assert torch.equal(out, ref)


def test_sliding_window_errors_name_the_problem():
    g = gpt()
    with pytest.raises(ValueError, match="smaller than the 4x4 window"):
        taming_sliding_window(g, SamplerSettings(), None, rows=3, cols=10)
    with pytest.raises(ValueError, match="rows and cols"):
        taming_sliding_window(g, SamplerSettings(), None)
    with pytest.raises(ValueError, match="must fit"):
        taming_sliding_window(g, SamplerSettings(), None, rows=8, cols=8, window=(5, 5))


def test_canvas_from_tokens_decodes():
    m = tiny_model(patch_size=(1, 4, 4), extent=(0, 0, 0))
    toks = torch.randint(0, 64, (1, 4, 8))
    st = canvas_from_tokens(m, toks)
    assert st.known.all() and st.grid == (1, 1, 2)
    img = m.decode(st)
    assert img.shape[1:3] == (4 * m.vqgan.downsample_factor, 8 * m.vqgan.downsample_factor)
    with pytest.raises(ValueError, match="whole number"):
        canvas_from_tokens(m, toks[:, :, :6])


@pytest.mark.parametrize("kind", ["nuwa", "no_context", "taming"])
def test_generate_images_all_kinds(kind):
    m = tiny_model(extent=(0, 1, 1) if kind == "nuwa" else (0, 0, 0))
    php, pwp = m.patch_pixels
    image = torch.rand(1, php, 4 * pwp, 3)
    res = generate_images(m, kind, image, SamplerSettings(top_k=8), seed=0, width_factor=2)
    assert res["panorama"].shape == (1, php, 8 * pwp, 3)
    assert res["outpaint"].shape == image.shape and res["reconstruction"].shape == image.shape
    fade = 2 * m.vqgan.downsample_factor  # the given pixels fade in over two tokens next to the generated ones
    assert torch.equal(res["outpaint"][:, :, :3 * pwp - fade], image[:, :, :3 * pwp - fade])  # given pixels kept
    assert res["held_out_crop"] == [3 * pwp, 0, pwp, php]
    again = generate_images(m, kind, image, SamplerSettings(top_k=8), seed=0, width_factor=2)
    assert torch.equal(res["panorama"], again["panorama"])


def test_cli_writes_pngs(tmp_path):
    m = tiny_model(extent=(0, 1, 1))
    path = tmp_path / "m.safetensors"
    m.save(path)
    php, pwp = m.patch_pixels
    save_image(torch.rand(1, php, 4 * pwp, 3), tmp_path / "img.png")
    assert baselines.main([str(path), "--image", str(tmp_path / "img.png"), "--kind", "no_context",
                           "--out", str(tmp_path / "o"), "--width-factor", "2"]) == 0
    for name in ("panorama", "outpaint", "reconstruction"):
        assert (tmp_path / "o" / f"{name}.png").is_file()
    assert json.loads((tmp_path / "o" / "info.json").read_text())["kind"] == "no_context"
    assert baselines.main([str(path), "--image", str(tmp_path / "img.png"), "--out", str(tmp_path / "p"),
                           "--given-cols", "9"]) == 2


def test_whole_window_forward_samples_the_same_tokens():
    """Running the network over the whole window per token (taming's cost) changes nothing sampled."""
    g, s = gpt(), SamplerSettings(top_k=8)
    prefix = taming_sliding_window(g, s, torch.Generator().manual_seed(0), rows=6, cols=10)
    whole = taming_sliding_window(g, s, torch.Generator().manual_seed(0), rows=6, cols=10, whole_window=True)
    assert torch.equal(prefix, whole)


def test_no_kind_sees_the_held_out_pixels_in_its_given_tokens(monkeypatch):
    """Outpainting's given tokens come from the given pixels alone, for every kind: changing only
    the held-out columns of the image changes none of them."""
    m = tiny_model(extent=(0, 0, 0))
    php, pwp = m.patch_pixels
    f = m.vqgan.downsample_factor
    image = torch.rand(1, php, 4 * pwp, 3, generator=torch.Generator().manual_seed(0))
    other = image.clone()
    other[:, :, 3 * pwp:] = torch.rand(1, php, pwp, 3, generator=torch.Generator().manual_seed(1))
    given_cols = 3 * pwp // f
    seen = []
    sliding, generate = baselines.taming_sliding_window, m.generate

    def spy_sliding(*args, tokens=None, **kwargs):
        if tokens is not None:  # the outpainting call
            seen.append(tokens[:, :, :given_cols].clone())
            assert (tokens[:, :, given_cols:] == UNKNOWN).all()
        return sliding(*args, tokens=tokens, **kwargs)

    def spy_generate(state, plan, *args, **kwargs):
        if state.known.any():
            seen.append(state.tokens[:, 0].clone())
        return generate(state, plan, *args, **kwargs)

    monkeypatch.setattr(baselines, "taming_sliding_window", spy_sliding)
    monkeypatch.setattr(m, "generate", spy_generate)
    for kind in ("nuwa", "no_context", "taming"):
        seen.clear()
        for img in (image, other):
            generate_images(m, kind, img, SamplerSettings(top_k=8), seed=0, width_factor=1, given_cols=3)
        assert len(seen) == 2 and seen[0].shape[-1] == given_cols, kind
        assert torch.equal(seen[0], seen[1]), kind
    assert not torch.equal(baselines._encode(m, image, 4)[:, :, :given_cols],
                           baselines._encode(m, other, 4)[:, :, :given_cols])  # whole-image encoding would
