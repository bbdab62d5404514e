import pytest
import torch

from _tiny import tiny_model
from nuwa_core import memory
from nuwa_core.infinity import generation
from nuwa_core.checkpoint import CheckpointError
from nuwa_core.infinity.canvas import CanvasState
from nuwa_core.infinity.generation import NuwaInfinity
from nuwa_core.infinity.nearby_context_pool import NearbyContextPool
from nuwa_core.infinity.patch_samplers import SamplerSettings
from nuwa_core.infinity.renderer import Context

FAST = SamplerSettings(top_k=16)


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def image(h=32, w=48, c=3, seed=0):
    return torch.rand(1, h, w, c, generator=torch.Generator().manual_seed(seed))


def test_unconditional_canvas_any_size_and_same_seed_same_output():
    m = tiny_model()
    st = m.blank_canvas(1, 12)
    a = m.generate(st, m.plan_fill(st), FAST, generator=seeded(0))
    b = m.generate(st, m.plan_fill(st), FAST, generator=seeded(0))
    c = m.generate(st, m.plan_fill(st), FAST, generator=seeded(1))
    assert a.known.all() and not st.known.any()  # the input state is left untouched
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    assert (a.tokens >= 0).all()
    assert m.decode(a).shape == (1, 16, 192, 3)


def test_every_patch_generated_once_from_already_generated_context(monkeypatch):
    m = tiny_model()
    st = m.canvas_from_image(image())  # 2 x 3 patches, all given
    plan = m.plan_extension(st, left=1, right=2, up=1, down=1)
    selections = []
    original = Context.from_pool.__func__

    def spy(cls, selected, coord, emb, device):
        selections.append((coord, [c for c, _ in selected]))
        return original(cls, selected, coord, emb, device)

    monkeypatch.setattr(Context, "from_pool", classmethod(spy))
    done, marks = [], []  # marks: the selection that made each patch, the last one before its callback
    out = m.generate(st, plan, FAST, generator=seeded(),
                     callback=lambda n, total, s: done.append(n) or marks.append(len(selections) - 1))
    given = {(0, i + 1, j + 1) for i in range(2) for j in range(3)}
    planned = [c for _, c in plan.steps()]
    assert len(planned) == len(set(planned)) and set(planned).isdisjoint(given)
    assert done == list(range(1, len(planned) + 1)) and out.known.all()
    pre = selections[:marks[0]]
    assert pre and {c for c, _ in pre} <= given  # pre-caching only touches given patches
    for coord, ctx in pre:
        assert set(ctx) <= given
    for t, n in enumerate(marks):
        coord, ctx = selections[n]
        assert coord == planned[t]
        assert set(ctx) <= given | set(planned[:t]), (coord, ctx)  # only what exists already
        assert ctx  # outpainting always has context
    for n, (coord, ctx) in enumerate(selections):  # re-encoding between segments: existing patches only
        made = given | set(planned[:sum(mark < n for mark in marks)])
        assert coord in made or n in marks
        assert set(ctx) <= made, (coord, ctx)


@pytest.mark.parametrize("decoder", ["ar", "nar", "pnar"])
@pytest.mark.parametrize("extension", [dict(left=2), dict(right=2), dict(up=1), dict(down=1),
                                       dict(left=1, right=1, up=1, down=1)])
def test_outpainting_keeps_the_given_tokens_and_pixels(decoder, extension):
    m = tiny_model(decoder=decoder)
    img = image()
    st = m.canvas_from_image(img)
    out = m.generate(st, m.plan_extension(st, **extension), FAST, generator=seeded())
    top, left = extension.get("up", 0), extension.get("left", 0)
    assert torch.equal(out.tokens[:, :, top * 4:top * 4 + 8, left * 4:left * 4 + 12], st.tokens)
    assert out.known.all() and out.grid == (1, 2 + top + extension.get("down", 0),
                                            3 + left + extension.get("right", 0))
    px = (top * 16, left * 16)
    hard = m.decode(out, feather=0)
    assert torch.allclose(hard[:, px[0]:px[0] + 32, px[1]:px[1] + 48], img, atol=1e-6)
    # by default the given pixels fade in over two tokens (8 px here) from the sides that meet generated ones
    feathered = m.decode(out)
    f = 8
    inner = (slice(None), slice(px[0] + (f if top else 0), px[0] + 32 - (f if extension.get("down") else 0)),
             slice(px[1] + (f if left else 0), px[1] + 48 - (f if extension.get("right") else 0)))
    assert torch.allclose(feathered[inner], hard[inner], atol=1e-6)
    outside = torch.ones(hard.shape[1:3], dtype=torch.bool)
    outside[px[0]:px[0] + 32, px[1]:px[1] + 48] = False
    assert torch.equal(feathered[:, outside], hard[:, outside])  # generated pixels are not touched
    if extension.get("right"):  # the last given column is mostly the decoded reconstruction
        edge = px[1] + 47
        assert (feathered[:, px[0]:px[0] + 32, edge] - hard[:, px[0]:px[0] + 32, edge]).abs().max() > 1e-3


def test_given_weight_ramps_only_towards_generated_pixels():
    from nuwa_core.infinity.generation import given_weight
    w = given_weight((4, 6), (0, 2), (4, 10), feather=3)  # given touches the canvas' top and bottom
    assert torch.equal(w[:, 0], torch.full((4,), 0.25)) and torch.equal(w[:, 2], torch.full((4,), 0.75))
    assert torch.allclose(w[0], torch.tensor([0.25, 0.5, 0.75, 0.75, 0.5, 0.25]))
    assert torch.equal(given_weight((4, 6), (0, 0), (4, 6), feather=3), torch.ones(4, 6))  # nothing generated
    assert torch.equal(given_weight((4, 6), (0, 2), (4, 10), feather=0), torch.ones(4, 6))


def test_given_weight_keeps_unmasked_pixels_and_ramps_around_a_hole():
    from nuwa_core.infinity.generation import given_weight
    regenerate = torch.zeros(9, 9)
    regenerate[4, 4] = 1  # one pixel in the middle of a given image that covers the whole canvas
    w = given_weight((9, 9), (0, 0), (9, 9), feather=2, regenerate=regenerate)
    assert w[4, 4] == 0 and w[3, 3] == w[4, 5] == pytest.approx(1 / 3) and w[2, 4] == pytest.approx(2 / 3)
    assert w[1, 4] == 1 and w[0].eq(1).all()  # farther than the feather: the given pixel as it is
    soft = torch.full((9, 9), 0.25)
    assert torch.equal(given_weight((9, 9), (0, 0), (9, 9), feather=2, regenerate=soft), torch.full((9, 9), 0.75))


def test_canvas_file_keeps_the_mask_feather_and_source(tmp_path):
    m = tiny_model()
    st = m.canvas_from_image(torch.rand(1, 40, 60, 3), fit="crop")
    assert st.source_size == (40, 60) and st.source_box == (4, 6, 32, 48)
    mask = torch.zeros(st.pixel_size)
    mask[2:5, 3:9] = 0.5
    st = st.forget(_cells(st.grid, (0, 0, 0)), mask)
    st.feather = 3
    st.save(tmp_path / "c.safetensors")
    back = CanvasState.load(tmp_path / "c.safetensors")
    assert torch.equal(back.given_mask, st.given_mask) and back.given_mask.max() == 0.5
    assert (back.feather, back.source_size, back.source_box) == (3, (40, 60), (4, 6, 32, 48))
    assert torch.equal(m.decode(back), m.decode(st))


def test_text_conditioning_changes_the_canvas():
    m = tiny_model(text_dim=16)
    st = m.blank_canvas(1, 3)
    text = torch.randn(1, 7, 16)
    a = m.generate(st, m.plan_fill(st), FAST, text=text, generator=seeded())
    b = m.generate(st, m.plan_fill(st), FAST, text=text * 3, generator=seeded())
    assert not torch.equal(a.tokens, b.tokens)


def test_pool_stays_bounded_while_the_canvas_grows():
    m = tiny_model()  # extent (0, 1, 1)
    sizes = []
    st = m.blank_canvas(2, 1)
    st = m.generate(st, m.plan_fill(st), FAST, generator=seeded())
    g = seeded()
    for _ in range(12):  # grow right, call after call, as an artist would
        st = m.generate(st, m.plan_extension(st, right=2), FAST, generator=g,
                        callback=lambda n, t, s: sizes.append(s.pool.size))
    assert st.grid == (1, 2, 25)
    assert max(sizes) <= 2 * 3  # two rows, the current column and the one before (+ the next)
    long = m.blank_canvas(2, 40)
    long_sizes = []
    m.generate(long, m.plan_fill(long), FAST, generator=g, callback=lambda n, t, s: long_sizes.append(s.pool.size))
    assert max(long_sizes) == max(long_sizes[:12])  # no growth with length


def test_continuing_in_the_same_direction_reuses_the_frontier_caches():
    m = tiny_model()
    st = m.blank_canvas(1, 4)
    st = m.generate(st, m.plan_fill(st), FAST, generator=seeded())
    assert set(st.pool.caches) == {(0, 0, 3)}  # the last column serves the next one
    calls = []
    original = m.renderer.encode
    m.renderer.encode = lambda *a, **k: calls.append(1) or original(*a, **k)
    m.generate(st, m.plan_extension(st, right=2), FAST, generator=seeded())
    assert not calls  # nothing had to be pre-cached again


def test_cancel_keeps_what_was_made():
    m = tiny_model()
    st = m.blank_canvas(2, 4)
    out = m.generate(st, m.plan_fill(st), FAST, generator=seeded(), callback=lambda n, t, s: n < 3)
    assert out.known.sum() == 3 and (out.tokens >= 0).sum() == 3 * 16
    finished = m.generate(out, m.plan_fill(out), FAST, generator=seeded())
    assert finished.known.all() and torch.equal(finished.tokens[out.tokens >= 0], out.tokens[out.tokens >= 0])


def test_bundle_and_canvas_round_trip(tmp_path):
    m = tiny_model()
    m.save(tmp_path / "model.safetensors")
    loaded = NuwaInfinity.load(tmp_path / "model.safetensors")
    st = m.canvas_from_image(image())
    a = m.generate(st, m.plan_extension(st, right=1), FAST, generator=seeded())
    a.save(tmp_path / "canvas.safetensors")
    back = CanvasState.load(tmp_path / "canvas.safetensors")
    assert torch.equal(back.tokens, a.tokens) and torch.equal(back.known, a.known)
    assert set(back.pool.caches) == set(a.pool.caches) and torch.equal(back.given, a.given)
    # continuing the reloaded canvas with the reloaded model == continuing the original
    x = m.generate(a, m.plan_extension(a, right=2), FAST, generator=seeded(5))
    y = loaded.generate(back, loaded.plan_extension(back, right=2), FAST, generator=seeded(5))
    assert torch.equal(x.tokens, y.tokens)
    assert torch.allclose(m.decode(x), loaded.decode(y))


def test_checkpoint_with_wrong_shapes_names_the_keys(tmp_path):
    m = tiny_model()
    m.save(tmp_path / "model.safetensors")
    from safetensors.torch import load_file, save_file
    from nuwa_core.checkpoint import read_metadata
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["renderer.head.weight"] = torch.zeros(10, 32)
    save_file(tensors, tmp_path / "bad.safetensors", metadata=read_metadata(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"renderer\.head\.weight|head\.weight: file \(10, 32\)"):
        NuwaInfinity.load(tmp_path / "bad.safetensors")


def test_canvas_sizes_and_images_are_checked():
    m = tiny_model()  # patches are 16 x 16 px
    assert m.patch_counts(32, 48) == (2, 3)
    assert m.patch_counts(33, 48, mode="pad") == (3, 3)
    with pytest.raises(ValueError, match="33 px is not a whole number of 16 px patches: use 32 or 48"):
        m.patch_counts(33, 48)
    for bad in [(0, 10), (-16, 16)]:
        with pytest.raises(ValueError, match="must be > 0"):
            m.patch_counts(*bad)
    with pytest.raises(ValueError, match="rows must be a whole number >= 1"):
        m.blank_canvas(0, 4)
    with pytest.raises(ValueError, match="fit='crop'"):
        m.canvas_from_image(image(h=30))
    assert m.canvas_from_image(image(h=40, w=50), fit="crop").grid == (1, 2, 3)
    assert m.canvas_from_image(image(h=40, w=50), fit="resize").grid == (1, 2, 3)
    assert m.canvas_from_image(image(c=4)).known.all()  # RGBA
    assert m.canvas_from_image(image(c=1)).known.all()  # grayscale
    nan = image()
    nan[0, 3, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        m.canvas_from_image(nan)
    st = m.blank_canvas(1, 2)
    with pytest.raises(ValueError, match="NaN"):
        m.generate(st, m.plan_fill(st), FAST, text=torch.full((1, 3, 8), float("nan")))


def test_a_canvas_larger_than_memory_is_refused_with_an_estimate(monkeypatch):
    m = tiny_model()
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 10_000_000)
    st = m.blank_canvas(1, 1)
    with pytest.raises(MemoryError, match=r"needs about .* GiB but only 0\.0 GiB"):
        m.generate(st, m.plan_extension(m.generate(st, m.plan_fill(st)), right=4000))


def test_the_memory_check_asks_the_device_that_holds_the_canvas(monkeypatch):
    asked = []
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: asked.append(device))  # None: unknown
    m = tiny_model()
    st = m.blank_canvas(1, 1)
    m.generate(st, m.plan_fill(st))
    assert asked and all(d is not None and torch.device(d) == m.device for d in asked)


def test_a_cuda_canvas_is_checked_against_the_gpus_free_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10_000_000, 80 * 2**30))
    with pytest.raises(MemoryError, match=r"only 0\.0 GiB is available on cuda:0"):
        memory.check_memory(2**30, "this generation", torch.device("cuda:0"))


def test_wrong_decoder_and_plans_are_refused():
    m = tiny_model()
    st = m.blank_canvas(1, 2)
    with pytest.raises(ValueError, match="trained as 'ar'"):
        m.generate(st, m.plan_fill(st), SamplerSettings(decoder="nar"))
    done = m.generate(st, m.plan_fill(st))
    with pytest.raises(ValueError, match="already known"):
        m.generate(done, m.plan_fill(st))


def test_image_animation_fills_later_frames():
    m = tiny_model(extent=(1, 1, 1))
    st = m.canvas_from_image(image(), frames=3)
    out = m.generate(st, m.plan_fill(st), FAST, generator=seeded())
    assert out.known.all() and torch.equal(out.tokens[:, 0], st.tokens[:, 0])
    assert m.decode(out).shape == (3, 32, 48, 3)


def test_a_smaller_context_extent_selects_less_and_a_larger_one_is_refused(monkeypatch):
    m = tiny_model(extent=(0, 2, 2))
    st = m.blank_canvas(3, 4)
    seen = []
    original = Context.from_pool.__func__
    monkeypatch.setattr(Context, "from_pool", classmethod(
        lambda cls, sel, coord, emb, dev: seen.append(len(sel)) or original(cls, sel, coord, emb, dev)))
    full = m.generate(st, m.plan_fill(st), FAST, generator=seeded())
    widest = max(seen)
    seen.clear()
    m.generate(st, m.plan_fill(st), FAST, generator=seeded(), extent=(0, 0, 0))
    assert widest > 0 and max(seen) == 0  # caches off: every patch alone
    seen.clear()
    m.generate(st, m.plan_fill(st), FAST, generator=seeded(), extent=(0, 1, 1))
    assert 0 < max(seen) < widest and full.known.all()
    with pytest.raises(ValueError, match="within the trained extent"):
        m.generate(st, m.plan_fill(st), FAST, extent=(0, 3, 2))


def _outpainted():
    """A 2 x 4 patch canvas: the image's 2 x 3 patches given, one column outpainted (pool: column 3)."""
    m = tiny_model()
    img = image()
    st = m.canvas_from_image(img)
    st = m.generate(st, m.plan_extension(st, right=1), FAST, generator=seeded())
    assert set(st.pool.caches) == {(0, 0, 3), (0, 1, 3)} and st.given.shape == (1, 32, 48, 3)
    return m, img, st


def _cells(grid, *coords):
    cells = torch.zeros(grid, dtype=torch.bool)
    for c in coords:
        cells[c] = True
    return cells


def test_forget_makes_the_masked_patches_unknown_and_keeps_everything_else():
    m, img, st = _outpainted()
    before = st.tokens.clone()
    left = st.forget(_cells(st.grid, (0, 0, 0), (0, 1, 0)))  # the image's left column
    assert torch.equal(st.tokens, before) and st.known.all()  # the input state is left untouched
    assert left.known[0, :, 0].sum() == 0 and left.known[0, :, 1:].all()
    assert (left.tokens[:, :, :, :4] == generation.UNKNOWN).all()
    assert torch.equal(left.tokens[:, :, :, 4:], before[:, :, :, 4:])
    assert set(left.pool.caches) == {(0, 0, 3), (0, 1, 3)}  # out of the extent of column 0: still valid
    assert torch.equal(left.given, img) and left.given_origin == (0, 0)  # the given pixels are kept...
    assert left.given_mask[:, :16].eq(1).all() and left.given_mask[:, 16:].eq(0).all()  # ...and masked where new
    near = st.forget(_cells(st.grid, (0, 0, 2)))
    assert not near.pool.caches  # both cached patches are within the extent: they attended to it
    assert torch.equal(near.given, img)  # a hole in the given rectangle: only the hole is masked
    assert near.given_mask[:16, 32:].eq(1).all() and near.given_mask.sum() == 16 * 16
    outside = st.forget(_cells(st.grid, (0, 1, 3)))  # an outpainted patch: no given pixel is masked
    assert torch.equal(outside.given, img) and not outside.given_mask.any()
    assert torch.equal(st.forget(torch.zeros(st.grid, dtype=torch.bool)).tokens, before)


def test_generate_after_forget_fills_only_the_forgotten_patches():
    m, img, st = _outpainted()
    forgotten = st.forget(_cells(st.grid, (0, 0, 0), (0, 1, 0)))
    plan = m.plan_fill(forgotten)
    assert sorted(c for _, c in plan.steps()) == [(0, 0, 0), (0, 1, 0)]
    done = []
    out = m.generate(forgotten, plan, FAST, generator=seeded(3), callback=lambda n, t, s: done.append(n))
    assert done == [1, 2] and out.known.all() and (out.tokens >= 0).all()
    assert torch.equal(out.tokens[:, :, :, 4:], st.tokens[:, :, :, 4:])
    assert not torch.equal(out.tokens[:, :, :, :4], st.tokens[:, :, :, :4])
    decoded = m.decode(out)
    assert torch.allclose(decoded[:, :, 24:40], img[:, :, 24:40], atol=1e-6)  # kept given pixels (inside the 8 px fades)
    assert not torch.allclose(decoded[:, :, :16], img[:, :, :16], atol=1e-3)  # regenerated, not pasted over


def test_forget_with_a_wrong_mask_shape_names_expected_and_got():
    _, _, st = _outpainted()
    with pytest.raises(ValueError, match=r"\(1, 2, 4\), got shape \(2, 4\)"):
        st.forget(torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(1, 2, 4\), got shape \(1, 32, 64\)"):
        st.forget(torch.ones(1, 32, 64))


# ---- composed outpainting: caches re-encoded in each segment's order ----------------------------

def _selected_orders(monkeypatch):
    """Spy: for every patch generated, its step order and the orders of the caches it selects."""
    from nuwa_core.infinity import generation as g
    seen, original = [], g.SAMPLERS["ar"]

    def sampler(renderer, context, order, *rest):
        seen.append((order, list(pending)))
        return original(renderer, context, order, *rest)

    pending = []
    select = NearbyContextPool.select

    def spy(self, coord):
        out = select(self, coord)
        pending[:] = [self.orders[c] for c, _ in out]
        return out

    monkeypatch.setattr(NearbyContextPool, "select", spy)
    monkeypatch.setitem(g.SAMPLERS, "ar", sampler)
    return seen


def test_reencode_feeds_every_segment_caches_made_in_its_own_order(monkeypatch):
    m = tiny_model()
    st = m.canvas_from_image(image())
    plan = m.plan_extension(st, left=1, down=1, right=1, up=1)
    assert len({s.order for s in plan.segments}) == 4
    seen = _selected_orders(monkeypatch)
    m.generate(st, plan, FAST, generator=seeded(), reencode=False)
    assert any(o is not order for order, orders in seen for o in orders)  # without: orders mix
    seen.clear()
    m.generate(st, plan, FAST, generator=seeded(), reencode=True)
    assert len(seen) == len(plan) and all(orders for _, orders in seen)
    for order, orders in seen:
        assert all(o is order for o in orders), (order, orders)


def test_reencode_is_deterministic_bounded_and_a_no_op_in_one_direction(monkeypatch):
    m = tiny_model()
    st = m.canvas_from_image(image())
    both = m.plan_extension(st, left=1, down=1, right=1, up=1)
    a = m.generate(st, both, FAST, generator=seeded(3))
    b = m.generate(st, both, FAST, generator=seeded(3))
    off = m.generate(st, both, FAST, generator=seeded(3), reencode=False)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, off.tokens)
    assert a.pool.peak_size == off.pool.peak_size  # re-encoding replaces caches, adds none
    from nuwa_core.infinity import generation as g
    done = []
    original = g.reencode_pooled
    monkeypatch.setattr(g, "reencode_pooled", lambda *args: done.extend(original(*args)) or [])
    right = m.plan_extension(st, right=2)
    x = m.generate(st, right, FAST, generator=seeded(4), reencode=True)
    y = m.generate(st, right, FAST, generator=seeded(4), reencode=False)
    more = m.generate(x, m.plan_extension(x, right=1), FAST, generator=seeded(5), reencode=True)
    assert not done  # one direction, and a continuation in it: nothing to re-encode
    assert torch.equal(x.tokens, y.tokens) and more.known.all()
    for c in x.pool.caches:
        assert torch.equal(x.pool.caches[c], y.pool.caches[c])


def test_reencode_replaces_a_cache_with_the_one_its_order_makes():
    """reencode_pooled: a cache made in another order becomes the teacher-forced one of the new order,
    with the caches before it in that order as its context; one forward per re-encoded patch."""
    from nuwa_core.infinity.arbitrary_direction_controller import Order
    from nuwa_core.infinity.generation import PatchBatch, reencode_pooled
    m = tiny_model()
    r, grid = m.renderer, (1, 2, 2)
    tokens = {(0, i, j): torch.randint(0, 64, (1, 16), generator=seeded(i * 2 + j)) for i in range(2) for j in range(2)}
    pool = NearbyContextPool((0, 1, 1))
    empty = Context(None, None, 0)
    for c, t in tokens.items():
        pool.add(c, r.encode(t, Order.DOWN_RIGHT, empty, r.text_kv(None)), Order.DOWN_RIGHT)
    calls = []
    encode = r.encode
    r.encode = lambda *a, **k: calls.append(1) or encode(*a, **k)
    done = reencode_pooled(PatchBatch(r), pool, [(0, 1, 0), (0, 1, 1)], Order.RIGHT_UP, grid, tokens.__getitem__)
    assert done == [(0, 1, 0), (0, 1, 1)] and len(calls) == 2 and len(pool) == 4
    assert pool.orders[(0, 1, 0)] is Order.RIGHT_UP and pool.orders[(0, 0, 0)] is Order.DOWN_RIGHT
    # RIGHT_UP runs the bottom row first: (0,1,0) has no predecessor, (0,1,1) has (0,1,0), re-encoded
    assert torch.allclose(pool.caches[(0, 1, 0)], encode(tokens[(0, 1, 0)], Order.RIGHT_UP, empty, r.text_kv(None)))
    ctx = Context.from_pool([((0, 1, 0), pool.caches[(0, 1, 0)])], (0, 1, 1), r.rel, "cpu")
    assert torch.allclose(pool.caches[(0, 1, 1)], encode(tokens[(0, 1, 1)], Order.RIGHT_UP, ctx, r.text_kv(None)))
    assert reencode_pooled(PatchBatch(r), pool, [(0, 1, 0)], Order.RIGHT_UP, grid, tokens.__getitem__) == []


def test_pool_orders_survive_save_load_shift_and_forget(tmp_path):
    m, _, st = _outpainted()
    from nuwa_core.infinity.arbitrary_direction_controller import Order
    assert set(st.pool.orders.values()) == {Order.DOWN_RIGHT}
    st.save(tmp_path / "c.safetensors")
    back = CanvasState.load(tmp_path / "c.safetensors")
    assert back.pool.orders == st.pool.orders
    grown = back.grown(m.plan_extension(back, left=1))
    assert set(grown.pool.orders) == set(grown.pool.caches) == {(0, 0, 4), (0, 1, 4)}
    gone = st.forget(_cells(st.grid, (0, 0, 2)))
    assert gone.pool.orders == {} and st.pool.orders  # the input's pool is left alone


# ---- transfer off (the "w/o caches" ablation) -----------------------------------------------------

@pytest.mark.parametrize("decoder", ["ar", "pnar"])
def test_transfer_off_pools_context_free_caches_when_generating(decoder):
    m = tiny_model(decoder=decoder, transfer=False)
    st = m.canvas_from_image(image())
    out = m.generate(st, m.plan_extension(st, right=1, down=1), FAST, generator=seeded())
    empty = Context(None, None, 0)
    assert len(out.pool.caches) >= 3
    for coord, cache in out.pool.caches.items():  # pre-cached given patches and generated ones
        want = m.renderer.encode(out.patch_tokens(coord), out.pool.orders[coord], empty, m.renderer.text_kv(None))
        assert torch.allclose(cache, want, atol=1e-5), coord
    on = tiny_model(decoder=decoder)
    lit = on.generate(st, on.plan_extension(st, right=1, down=1), FAST, generator=seeded())
    coord = (0, 2, 3)  # the last patch: it had context
    want = on.renderer.encode(lit.patch_tokens(coord), lit.pool.orders[coord], empty, on.renderer.text_kv(None))
    assert not torch.allclose(lit.pool.caches[coord], want, atol=1e-5)


def test_transfer_is_saved_in_the_bundle_and_old_configs_default_to_it(tmp_path):
    import json
    from safetensors.torch import load_file, save_file
    from nuwa_core.checkpoint import read_metadata
    m = tiny_model(transfer=False)
    m.save(tmp_path / "off.safetensors")
    assert NuwaInfinity.load(tmp_path / "off.safetensors").renderer.config.transfer is False
    meta = read_metadata(tmp_path / "off.safetensors")
    cfg = json.loads(meta["renderer_config"])
    del cfg["transfer"]
    save_file(load_file(tmp_path / "off.safetensors"), tmp_path / "old.safetensors",
              metadata={**meta, "renderer_config": json.dumps(cfg)})
    assert NuwaInfinity.load(tmp_path / "old.safetensors").renderer.config.transfer is True


def test_an_ar_bundle_from_before_the_slot_change_names_the_fix(tmp_path):
    from safetensors.torch import load_file, save_file
    from nuwa_core.checkpoint import read_metadata
    tiny_model().save(tmp_path / "m.safetensors")
    old = {k: v for k, v in load_file(tmp_path / "m.safetensors").items() if ".next_" not in k}
    save_file(old, tmp_path / "old.safetensors", metadata=read_metadata(tmp_path / "m.safetensors"))
    with pytest.raises(CheckpointError, match="next_end the file lacks.*retrain it"):
        NuwaInfinity.load(tmp_path / "old.safetensors")


# ---- decoding --------------------------------------------------------------------------------------

def test_decode_without_blend_is_every_tile_decoded_on_its_own():
    m = tiny_model()
    st = m.blank_canvas(2, 3)
    st = m.generate(st, m.plan_fill(st), FAST, generator=seeded())  # 8 x 12 tokens
    f = m.vqgan.downsample_factor
    for tile in (4, 5):
        hard = m.decode(st, tile=tile, blend=False)
        tokens = st.tokens[0, 0]
        for y in range(0, 8, tile):
            for x in range(0, 12, tile):
                block = m.vqgan.decode_tokens(tokens[None, y:y + tile, x:x + tile])
                want = ((block.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)
                got = hard[:, y * f:(y + tile) * f, x * f:(x + tile) * f]
                assert torch.allclose(got, want, atol=1e-5), (tile, y, x)
    assert not torch.allclose(m.decode(st, tile=4), m.decode(st, tile=4, blend=False), atol=1e-3)


def test_a_generated_canvas_holds_ordinary_tensors_the_caller_can_edit():
    """The AR loop runs under inference mode; what generate returns must not be inference tensors
    (an in-place edit of one outside inference mode raises)."""
    m = tiny_model()
    st = m.blank_canvas(2, 2)
    out = m.generate(st, m.plan_fill(st), FAST, generator=0)
    tensors = [out.tokens, *out.pool.caches.values()]
    assert tensors[1:] and not any(t.is_inference() for t in tensors)
    for t in tensors:
        t.add_(0)


@pytest.mark.parametrize("dtype, given, fix", [
    (torch.float32, False, "its weights hold non-finite"),
    (torch.float32, True, "its weights hold non-finite"),  # refused while pre-caching the given patches
    (torch.float16, False, "run the model in float32 or bfloat16"),
])
def test_overflowing_activations_are_refused_naming_the_dtype(dtype, given, fix):
    """A renderer whose activations overflow (an infinite bias stands in for float16 overflow)
    stops with an error naming the dtype and what to do, for generated and for pre-cached
    patches; the same model with finite weights runs."""
    m = tiny_model().to(dtype)
    st = m.canvas_from_image(torch.rand(1, 32, 48, 3)) if given else m.blank_canvas(2, 2)
    plan = m.plan_extension(st, right=1) if given else m.plan_fill(st)
    m.generate(st, plan, SamplerSettings(top_k=16), generator=0)
    with torch.no_grad():
        m.renderer.blocks[0].mlp[2].bias[0] = float("inf")  # layer 1's inputs: the cache
    with pytest.raises(FloatingPointError, match=f"overflowed .* {dtype}: {fix}"):
        m.generate(st, plan, SamplerSettings(top_k=16), generator=0)


@pytest.mark.parametrize("decoder", ["ar", "nar", "pnar"])
def test_an_overflow_in_the_last_layer_is_refused(decoder):
    """The last layer's output reaches the logits only, no cache: an infinite value there (in the
    final layer norm's bias) is refused by every decoder, not drawn as garbage tokens."""
    m = tiny_model(decoder=decoder)
    st = m.blank_canvas(1, 2)
    m.generate(st, m.plan_fill(st), SamplerSettings(top_k=16), generator=0)
    with torch.no_grad():
        m.renderer.ln_f.bias[0] = float("inf")
    with pytest.raises(FloatingPointError, match="overflowed .* torch.float32: its weights hold non-finite"):
        m.generate(st, m.plan_fill(st), SamplerSettings(top_k=16), generator=0)


def test_token_nll_scores_tokens_in_the_context_generate_draws_them_in(monkeypatch):
    """token_nll walks the plan as generate does (pre-cache, re-encoded segments, pool), teacher-
    forced: the NLL it gives the tokens generate drew equals the log-probabilities the sampler
    drew them with, token by token (a context, order or cache off anywhere changes them)."""
    from nuwa_core.infinity.patch_samplers import decode_ar

    m = tiny_model()
    st = m.canvas_from_image(image())
    plan = m.plan_extension(st, left=1, down=1, right=1, up=1)
    drawn = []  # per patch: -log p of each drawn token, raster

    def recording_sampler(renderer, context, order, text_kv, batch, settings, streams):
        steps = []

        def choose(logits):
            logp = torch.log_softmax(logits.float(), -1)
            token = torch.multinomial(logp.exp(), 1, generator=streams_gen)[:, 0]
            steps.append(-logp.gather(1, token[:, None])[:, 0])
            return token

        tokens, cache = decode_ar(renderer, context, order, text_kv, batch, choose)
        inv = renderer.permutation(order)[1]
        drawn.append(torch.stack(steps, 1)[:, inv])
        return tokens, cache

    streams_gen = seeded(7)
    monkeypatch.setitem(generation.SAMPLERS, "ar", recording_sampler)
    made = m.generate(st, plan, FAST, generator=seeded(), schedule="sequential")
    monkeypatch.undo()
    nll = m.token_nll(st, plan, made.tokens)
    assert nll.shape == (len(plan), 1, 16)
    torch.testing.assert_close(nll, torch.stack(drawn), atol=1e-4, rtol=1e-4)
    other = made.clone()  # a token changed in the last patch: earlier patches score the same
    coord = plan.steps()[-1][1]
    other.set_patch(coord, (other.patch_tokens(coord) + 1) % 64)
    changed = m.token_nll(st, plan, other.tokens)
    assert torch.equal(changed[:-1], nll[:-1]) and not torch.equal(changed[-1], nll[-1])


def test_token_nll_refuses_wrong_shapes_and_non_ar_renderers():
    m = tiny_model()
    st = m.canvas_from_image(image())
    plan = m.plan_extension(st, right=1)
    with pytest.raises(ValueError, match=r"grown canvas's shape"):
        m.token_nll(st, plan, st.tokens)
    n = tiny_model(decoder="nar")
    with pytest.raises(ValueError, match="AR renderer"):
        n.token_nll(st, n.plan_extension(st, right=1), st.grown(plan).tokens)
