"""The wavefront schedule and per-patch random streams (issue 16): the same canvas as one patch at a
time, for every order, decoder, composed outpainting, masks, frames, wrapping, guidance and batch."""
import pytest
import torch
from _tiny import tiny_model

from nuwa_core.infinity import arbitrary_direction_controller as adc, generation as g
from nuwa_core.infinity.arbitrary_direction_controller import Order
from nuwa_core.infinity.patch_samplers import PatchStreams, SamplerSettings, gumbel_noise
from nuwa_core.infinity.renderer import Context, patch_row_split, patch_rows
from nuwa_core.infinity.wavefront import patch_seed, sequential, wavefronts

FAST = SamplerSettings(top_k=16)


def image(h=32, w=48, seed=0):
    return torch.rand(1, h, w, 3, generator=torch.Generator().manual_seed(seed))


def both(m, st, plan, settings=FAST, seed=7, **kw):
    """The plan run with each schedule (max_wave 3 in the wavefront: waves are also cut); same seed."""
    one = m.generate(st, plan, settings, generator=seed, schedule="sequential", **kw)
    many = m.generate(st, plan, settings, generator=seed, schedule="wavefront", max_wave=3, **kw)
    return one, many


def assert_same(one, many):
    assert one.known.all() and many.known.all()
    assert torch.equal(one.tokens, many.tokens)
    assert set(one.pool.caches) == set(many.pool.caches)
    for c in one.pool.caches:
        torch.testing.assert_close(one.pool.caches[c], many.pool.caches[c], rtol=1e-4, atol=1e-5)


def test_down_right_with_extent_one_is_the_anti_diagonal_wavefront():
    grid, extent = (1, 16, 16), (0, 1, 1)
    waves = wavefronts(adc.split(grid, Order.DOWN_RIGHT), extent, grid)
    assert len(waves) == 46 and sum(map(len, waves)) == 256
    for t, wave in enumerate(waves):
        assert all(2 * j + i == t for _, i, j in wave)
    # two rows high: every patch needs the one before it, nothing to batch
    assert len(wavefronts(adc.split((1, 2, 64), Order.DOWN_RIGHT), extent, (1, 2, 64))) == 128
    assert len(wavefronts(adc.split((1, 2, 64), Order.RIGHT_DOWN), extent, (1, 2, 64))) == 64 + 2
    assert [len(w) for w in wavefronts(adc.split(grid, Order.DOWN_RIGHT), extent, grid, max_size=3)][:12] == \
        [1, 1, 2, 2, 3, 3, 3, 1, 3, 1, 3, 2]
    assert sequential(["a", "b"], extent, grid) == [["a"], ["b"]]


@pytest.mark.parametrize("order", list(Order))
@pytest.mark.parametrize("extent", [(0, 1, 1), (0, 2, 1), (0, 1, 2)])
def test_every_wave_sees_exactly_its_sequential_context(order, extent):
    grid = (1, 5, 6)
    for periods in (adc.NO_PERIODS, adc.periods(grid, "xy")):
        coords = adc.split(grid, order)
        position = {c: n for n, c in enumerate(coords)}
        wave_of = {c: t for t, w in enumerate(wavefronts(coords, extent, grid, periods)) for c in w}
        for c in coords:
            for n in adc.neighbours(c, extent, grid, periods):
                # earlier in the order -> an earlier wave; later -> a later wave (never the same one)
                assert (wave_of[n] < wave_of[c]) == (position[n] < position[c]), (c, n)


@pytest.mark.parametrize("decoder", ["ar", "nar", "pnar"])
@pytest.mark.parametrize("order", list(Order))
def test_same_canvas_with_either_schedule_for_every_order_and_decoder(decoder, order):
    m = tiny_model(decoder=decoder)
    st = m.blank_canvas(4, 5, batch=2)
    one, many = both(m, st, m.plan_fill(st, order))
    assert_same(one, many)
    calls = []
    m.generate(st, m.plan_fill(st, order), FAST, generator=7, callback=lambda n, t, s: calls.append(n))
    assert len(calls) < 20 and calls[-1] == 20  # fewer steps than patches, the callback after each


@pytest.mark.parametrize("decoder", ["ar", "pnar"])
def test_same_canvas_composed_outpainting_masks_and_wrapping(decoder):
    m = tiny_model(decoder=decoder)
    st = m.canvas_from_image(image())  # 2 x 3 patches, all given
    assert_same(*both(m, st, m.plan_extension(st, left=2, right=1, up=2, down=1)))
    cells = torch.zeros(st.grid, dtype=torch.bool)
    cells[0, :, 1:] = True
    hole = st.forget(cells)
    assert_same(*both(m, hole, m.plan_fill(hole)))
    for wrap in ("x", "xy"):
        blank = m.blank_canvas(4, 4, wrap=wrap)
        assert_same(*both(m, blank, m.plan_fill(blank)))


def test_same_video_with_either_schedule():
    m = tiny_model(extent=(1, 1, 1))
    st = m.canvas_from_image(image(), frames=1)
    assert_same(*both(m, st, m.plan_frames(st, 3)))


def test_same_canvas_with_guidance_post_rpe_and_no_transfer():
    text = torch.randn(1, 5, 8, generator=torch.Generator().manual_seed(1))
    guided = SamplerSettings(top_k=16, guidance=3.0)
    m = tiny_model(text_dim=8)
    st = m.blank_canvas(3, 4, batch=2)
    assert_same(*both(m, st, m.plan_fill(st), guided, text=text))
    for overrides in ({"rpe": "post"}, {"transfer": False}, {"rpe": "post", "decoder": "pnar"}):
        m = tiny_model(**overrides)
        assert_same(*both(m, st, m.plan_fill(st)))


def test_a_canvas_grown_in_several_calls_equals_one_grown_in_one():
    m = tiny_model()
    st = m.blank_canvas(4, 4)
    whole = m.generate(st, m.plan_fill(st), FAST, generator=11)
    part = m.generate(st, m.plan_fill(st), FAST, generator=11, callback=lambda n, t, s: n < 6)  # cancelled
    assert 0 < int(part.known.sum()) < 16
    rest = m.generate(part, m.plan_fill(part), FAST, generator=11)
    assert torch.equal(rest.tokens, whole.tokens)
    video = tiny_model(extent=(1, 1, 1))
    still = video.canvas_from_image(image())
    four = video.generate(still, video.plan_frames(still, 4), FAST, generator=3)
    two = video.generate(still, video.plan_frames(still, 2), FAST, generator=3)
    assert torch.equal(video.generate(two, video.plan_frames(two, 2), FAST, generator=3).tokens, four.tokens)
    # growing up moves every coordinate; the patch streams follow the canvas as first made
    given = m.canvas_from_image(image())
    up2 = m.generate(given, m.plan_extension(given, up=2), FAST, generator=5)
    up1 = m.generate(given, m.plan_extension(given, up=1), FAST, generator=5)
    assert up1.origin == (1, 0) and up2.origin == (2, 0)
    assert torch.equal(m.generate(up1, m.plan_extension(up1, up=1), FAST, generator=5).tokens, up2.tokens)
    # a generator: one seed drawn from it, the same as passing that seed
    assert torch.equal(m.generate(st, m.plan_fill(st), FAST, generator=torch.Generator().manual_seed(2)).tokens,
                       m.generate(st, m.plan_fill(st), FAST, generator=g.run_seed(torch.Generator().manual_seed(2))).tokens)


def test_remove_still_frees_each_cache_once_no_later_patch_selects_it():
    m = tiny_model()
    st = m.blank_canvas(6, 6)
    plan = m.plan_fill(st, Order.DOWN_RIGHT)
    extent = (0, 1, 1)
    frontier = set(m._frontier(plan, st.grown(plan), extent))
    held = []

    def check(n, total, state):
        made = {c for c in adc.split(state.grid, Order.DOWN_RIGHT) if state.known[c]}
        for c in state.pool.caches:  # each held cache is still selectable by a patch not made yet
            assert c in frontier or any(adc.within_extent(c, u, extent) for u in
                                        set(adc.split(state.grid, Order.DOWN_RIGHT)) - made), c
        held.append(len(state.pool))
    out = m.generate(st, plan, FAST, generator=1, callback=check)
    one = m.generate(st, plan, FAST, generator=1, schedule="sequential")
    assert set(out.pool.caches) == set(one.pool.caches) == frontier & set(out.pool.caches)
    assert out.pool.peak_size <= one.pool.peak_size + 6  # a wave of at most 6 patches is added at once


def test_batched_rows_and_patch_streams_keep_each_patch_apart():
    a, b = torch.arange(6.).view(2, 3), torch.arange(6., 12.).view(2, 3)  # rows [with text; without], B=1
    rows = patch_rows([a, b], halves=2, dim=0)
    assert rows[:, 0].tolist() == [0, 6, 3, 9]  # half-major: both patches' guided rows first
    assert all(torch.equal(x, y) for x, y in zip(patch_row_split(rows, 2, 2, 0), (a, b)))
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    noise = gumbel_noise((4, 5), PatchStreams(gens), "cpu")
    assert torch.equal(noise[2:], gumbel_noise((2, 5), torch.Generator().manual_seed(2), "cpu"))
    with pytest.raises(ValueError, match="3 rows cannot be shared by 2 patch streams"):
        PatchStreams(gens).rand((3, 5))
    seeds = {patch_seed(0, (0, i, j)) for i in range(8) for j in range(8)}
    assert len(seeds) == 64 and patch_seed(0, (0, 1, 2)) != patch_seed(1, (0, 1, 2))


def test_padded_context_rows_equal_each_patch_alone():
    m = tiny_model(rpe="post")
    r = m.renderer
    caches = [torch.randn(2, 1, 16, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    contexts = [Context.from_pool([((0, 0, 0), caches[0]), ((0, 0, 1), caches[1])], (0, 1, 1), r.rel, "cpu"),
                Context(None, None, 0),
                Context.from_pool([((0, 1, 0), caches[2])], (0, 1, 1), r.rel, "cpu")]
    tokens = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(0))
    batch = g.PatchBatch(r)
    together = r.encode(tokens, Order.DOWN_RIGHT, Context.batched(contexts), r.text_kv(None))
    for p, ctx in enumerate(contexts):
        alone = r.encode(tokens[p:p + 1], Order.DOWN_RIGHT, ctx, r.text_kv(None))
        torch.testing.assert_close(batch.split(together, 3, dim=1)[p], alone, rtol=1e-5, atol=1e-6)


def test_bad_schedule_arguments_are_named():
    m = tiny_model()
    st = m.blank_canvas(2, 2)
    with pytest.raises(ValueError, match="schedule must be one of"):
        m.generate(st, m.plan_fill(st), FAST, schedule="diagonal")
    with pytest.raises(ValueError, match="max_wave"):
        m.generate(st, m.plan_fill(st), FAST, max_wave=0)
    with pytest.raises(TypeError, match="a seed"):
        m.generate(st, m.plan_fill(st), FAST, generator=1.5)


def test_pooled_caches_of_a_wave_do_not_share_its_batch_tensor():
    m = tiny_model()
    st = m.blank_canvas(4, 4)
    out = m.generate(st, m.plan_fill(st), FAST, generator=1)
    storages = [c.untyped_storage().data_ptr() for c in out.pool.caches.values()]
    assert len(set(storages)) == len(storages)
    assert all(c.is_contiguous() and c.untyped_storage().nbytes() == c.numel() * c.element_size()
               for c in out.pool.caches.values())


@pytest.mark.parametrize("decoder", ["ar", "nar"])  # (P-NAR counts its masked tokens: data a meta tensor lacks)
def test_a_padded_wave_keeps_every_tensor_on_the_models_device(decoder):
    """Device mixing without a GPU: a renderer on `meta` renders a wave of patches with padded
    contexts; a mask, buffer or noise made on the CPU would fail to combine with it."""
    r = tiny_model(decoder=decoder, rpe="post").renderer.to("meta")
    caches = [torch.zeros(2, 1, 16, 32, device="meta") for _ in range(3)]
    contexts = [Context.from_pool([((0, 0, 0), caches[0]), ((0, 0, 1), caches[1])], (0, 1, 1), r.rel, "meta"),
                Context(None, None, 0), Context.from_pool([((0, 1, 0), caches[2])], (0, 1, 1), r.rel, "meta")]
    batch = g.PatchBatch(r)
    streams = PatchStreams([torch.Generator().manual_seed(i) for i in range(3)])
    sample = g.SAMPLERS[decoder]
    tokens, cache = sample(r, Context.batched(contexts), Order.DOWN_RIGHT, batch.text_kv(3), 3, FAST, streams)
    assert tokens.device.type == cache.device.type == "meta" and cache.shape == (2, 3, 16, 32)
