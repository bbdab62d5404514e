"""The tiled VQGAN decode batches equal windows (same image as one window at a time, within float
rounding), and previews re-decode only the windows whose tokens changed."""
import sys

import numpy as np
import pytest
import torch
from _pack import import_pack
from _tiny import tiny_model

from nuwa_core.infinity.canvas import UNKNOWN
from nuwa_core.infinity.pixel_guided_vqgan import PixelGuidedDecoder
from nuwa_core.infinity.preview import IncrementalDecoder, PreviewDecoder
from nuwa_core.infinity.vqgan import VQModel, _blend_weights, get_config, window_batch
from nuwa_core.memory import vqgan_window_bytes

TOL = 5e-5  # float rounding: on the CPU the channels-last convolutions pick kernels by batch and size


@pytest.fixture(scope="module")
def vq():
    torch.manual_seed(0)
    return VQModel(get_config("tiny")).eval()


def rand_tokens(shape, seed=0):
    return torch.randint(0, 64, shape, generator=torch.Generator().manual_seed(seed))


def spy_calls(monkeypatch, cls=VQModel):
    seen = []
    original = cls.decode_tokens

    def spy(self, t, *rest):
        seen.append(tuple(t.shape))
        return original(self, t, *rest)
    monkeypatch.setattr(cls, "decode_tokens", spy)
    return seen


@pytest.mark.parametrize("wrap", [(False, False), (False, True), (True, True)])
def test_batched_tiled_decode_equals_one_window_at_a_time(vq, monkeypatch, wrap):
    # 9 x 14 tokens, tile 4: the last row / column tile is shorter, so round a joint the windows
    # come in several shapes; batch 2 canvases
    tokens = rand_tokens((2, 9, 14), seed=1)
    seen = spy_calls(monkeypatch)
    one = vq.decode_tokens_tiled(tokens, tile=4, overlap=1, wrap=wrap, max_windows=1)
    n_windows = len(seen)
    assert all(s[0] == 2 for s in seen)
    seen.clear()
    batched = vq.decode_tokens_tiled(tokens, tile=4, overlap=1, wrap=wrap, max_windows=4)
    assert (batched - one).abs().max() <= TOL
    # every window decoded once, at most 4 windows (of 2 rows) per call, each call of one shape
    assert sum(s[0] for s in seen) == 2 * n_windows and max(s[0] for s in seen) <= 2 * 4
    assert len(seen) < n_windows
    if wrap == (False, False):
        assert len({s[1:] for s in seen}) == 1  # shifted inwards at the borders: all windows alike
    else:
        assert len({s[1:] for s in seen}) > 1  # the joint's shorter tile: more than one shape


def test_batched_blocks_equal_one_block_at_a_time(vq, monkeypatch):
    tokens = rand_tokens((1, 10, 7), seed=2)  # tile 3: blocks of 3x3, 3x1, 1x3 and 1x1
    seen = spy_calls(monkeypatch)
    one = vq.decode_tokens_blocks(tokens, tile=3, max_windows=1)
    assert len(seen) == 4 * 3
    seen.clear()
    batched = vq.decode_tokens_blocks(tokens, tile=3, max_windows=8)
    assert (batched - one).abs().max() <= TOL
    assert sum(s[0] for s in seen) == 12 and len(seen) == 4  # the six 3x3 blocks in one call, then 3x1, 1x3, 1x1
    # a block pasted as decoded on its own
    assert torch.allclose(batched[..., 12:24, 12:24], vq.decode_tokens(tokens[:, 3:6, 3:6]), atol=TOL)


def test_batched_pixel_guided_decode_equals_one_window_at_a_time(vq):
    pg = PixelGuidedDecoder.from_vqgan(vq).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for level in [*pg.guide.down, pg.guide.mid]:
            torch.nn.init.normal_(level.out.weight, std=0.2)  # guidance that changes the output
    tokens = rand_tokens((1, 6, 10), seed=3)
    prev = torch.rand(1, 3, 24, 40, generator=torch.Generator().manual_seed(4)) * 2 - 1
    for wrap in [(False, False), (False, True)]:
        one = pg.decode_tokens_tiled(tokens, prev, tile=2, overlap=1, wrap=wrap, max_windows=1)
        batched = pg.decode_tokens_tiled(tokens, prev, tile=2, overlap=1, wrap=wrap, max_windows=6)
        assert (batched - one).abs().max() <= TOL
        assert (one - vq.decode_tokens_tiled(tokens, tile=2, overlap=1, wrap=wrap)).abs().max() > 1e-3


def test_window_batch_stays_within_its_budget():
    small, big = get_config("small_f8"), get_config("f16_16384")
    n = window_batch(small, 8)
    assert n >= 2 and n * vqgan_window_bytes(small, 8) <= 32 * 2 ** 20  # the shipped tokenizer batches
    assert window_batch(big, 16) == 1  # one f16 window is past the CPU budget: one at a time, as before
    assert window_batch(small, 8, batch=64) == 1
    assert window_batch(small, 8, device="cuda") > n  # accelerators: a larger budget
    with pytest.raises(ValueError, match="max_windows"):
        VQModel(get_config("tiny")).decode_tokens_tiled(rand_tokens((1, 4, 4)), tile=2, overlap=1, max_windows=0)


def windows_touching(n, tile, overlap, f, index, wrap=False):
    """Windows of a 1D plan that contain token `index`."""
    hits = []
    for k, (window, _) in enumerate(_blend_weights(n, tile, overlap, f, wrap)):
        tokens = torch.arange(n)[window] if isinstance(window, slice) else window
        if (tokens == index).any():
            hits.append(k)
    return hits


@pytest.mark.parametrize("wrap", [(False, False), (False, True), (True, True)])
def test_incremental_decoder_redecodes_only_changed_windows(vq, wrap):
    h, w, tile, overlap = 8, 14, 4, 1
    inc = IncrementalDecoder(vq, tile=tile, overlap=overlap, wrap=wrap, max_windows=3)
    tokens = rand_tokens((1, h, w), seed=5)
    full = vq.decode_tokens_tiled(tokens, tile=tile, overlap=overlap, wrap=wrap)
    assert (inc(tokens) - full).abs().max() <= TOL
    assert inc.decoded == inc.windows == len(_blend_weights(h, tile, overlap, 4, wrap[0])) * \
        len(_blend_weights(w, tile, overlap, 4, wrap[1]))
    # nothing changed: nothing decoded, the same image
    assert (inc(tokens) - full).abs().max() <= TOL and inc.decoded == 0
    for step, (y, x) in enumerate([(0, 0), (5, 13), (3, 7)]):  # corners (round the joint when wrapping), middle
        tokens = tokens.clone()
        tokens[0, y, x] = (tokens[0, y, x] + 1 + step) % 64
        out = inc(tokens)
        expected = len(windows_touching(h, tile, overlap, 4, y, wrap[0])) * \
            len(windows_touching(w, tile, overlap, 4, x, wrap[1]))
        assert inc.decoded == expected < inc.windows
        assert (out - vq.decode_tokens_tiled(tokens, tile=tile, overlap=overlap, wrap=wrap)).abs().max() <= TOL
    # a patch of 4x4 tokens changes
    tokens = tokens.clone()
    tokens[0, 4:8, 8:12] = rand_tokens((4, 4), seed=6)
    assert (inc(tokens) - vq.decode_tokens_tiled(tokens, tile=tile, overlap=overlap, wrap=wrap)).abs().max() <= TOL
    assert 0 < inc.decoded < inc.windows


def test_incremental_decoder_starts_over_when_the_canvas_grows(vq):
    inc = IncrementalDecoder(vq, tile=4, overlap=1)
    tokens = rand_tokens((1, 8, 8), seed=7)
    inc(tokens)
    grown = torch.cat([tokens, rand_tokens((1, 8, 4), seed=8)], dim=2)  # 8 x 12: a column of patches more
    assert (inc(grown) - vq.decode_tokens_tiled(grown, tile=4, overlap=1)).abs().max() <= TOL
    assert inc.decoded == inc.windows == 2 * 3
    # a tokens grid that does not fit max_kept_bytes keeps nothing: every call decodes everything
    small = IncrementalDecoder(vq, tile=4, overlap=1, max_kept_bytes=1000)
    small(tokens)
    assert (small(tokens) - vq.decode_tokens_tiled(tokens, tile=4, overlap=1)).abs().max() <= TOL
    assert small.decoded == small.windows


def grown_canvas(model, seed=0):
    """A 2x2-patch canvas from an image, extended by two patch columns (unknown, grey), one of them
    then generated: given pixels, unknown patches and generated ones."""
    g = torch.Generator().manual_seed(seed)
    state = model.canvas_from_image(torch.rand(1, 32, 32, 3, generator=g))
    state = state.grown(model.plan_extension(state, right=2))
    state.set_patch((0, 0, 2), rand_tokens((1, 16), seed=seed + 1))
    return state


def reference_preview(model, state):
    """The preview as it was: frame 0 of batch row 0 through NuwaInfinity.decode."""
    one = state.clone()
    one.tokens = one.tokens[:1, :state.patch_size[0]]
    one.known = one.known[:1]
    if one.given is not None:
        one.given = one.given[:1]
    return model.decode(one)[0]


def test_preview_decoder_matches_a_full_decode():
    model = tiny_model()
    state = grown_canvas(model)
    preview = PreviewDecoder(model)
    first = preview(state)
    assert first.shape == (32, 64, 3)
    assert (first - reference_preview(model, state)).abs().max() <= TOL
    assert (first[:, 48:] == 0.5).all()  # the unknown column is grey
    state.set_patch((0, 1, 3), rand_tokens((1, 16), seed=9))
    second = preview(state)
    assert (second - reference_preview(model, state)).abs().max() <= TOL
    assert 0 < preview.decoder.decoded < preview.decoder.windows
    assert not torch.equal(second[16:, 48:], first[16:, 48:])


def test_node_preview_is_incremental_per_model():
    pack = import_pack()
    render_nodes = sys.modules[pack.__name__ + ".nodes.render_nodes"]
    model = tiny_model()
    state = grown_canvas(model, seed=3)
    image = render_nodes._preview(model, state)
    expected = (reference_preview(model, state).clamp(0, 1).numpy() * 255).astype(np.uint8)
    assert np.abs(np.asarray(image).astype(int) - expected).max() <= 1
    decoder = render_nodes._PREVIEWS[model]
    assert decoder.decoder.decoded == decoder.decoder.windows
    state.set_patch((0, 0, 3), rand_tokens((1, 16), seed=4))
    render_nodes._preview(model, state)
    assert 0 < decoder.decoder.decoded < decoder.decoder.windows
    assert state.tokens[0, 0, 0, 15] != UNKNOWN  # the patch it decoded is known
