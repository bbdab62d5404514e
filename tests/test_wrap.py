"""Tileable canvases (CanvasState.wrap): context, the pool's Remove, decoding and planning across the joint."""
import dataclasses

import pytest
import torch
from _pack import node
from _tiny import tiny_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nuwa_core.evaluation.metrics import wrap_seam_ratio
from nuwa_core.infinity import arbitrary_direction_controller as adc, generation as g
from nuwa_core.infinity.arbitrary_direction_controller import Order
from nuwa_core.infinity.canvas import CanvasState
from nuwa_core.infinity.generation import given_weight
from nuwa_core.infinity.nearby_context_pool import last_needed_steps
from nuwa_core.infinity.patch_samplers import SamplerSettings
from nuwa_core.infinity.renderer import Context

FAST = SamplerSettings(top_k=16)


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def contexts(monkeypatch):
    """Spy: for every patch sampled, (coord, [(position as selected, cache)], the Context the renderer got)."""
    seen, select, sample = [], Context.from_pool.__func__, g.SAMPLERS["ar"]
    pending = {}

    def from_pool(cls, selected, coord, emb, device):
        pending.update(coord=coord, selected=selected, ctx=select(cls, selected, coord, emb, device))
        return pending["ctx"]

    def sampler(renderer, context, *rest):
        assert context is pending["ctx"]
        seen.append((pending["coord"], pending["selected"], context))
        return sample(renderer, context, *rest)

    monkeypatch.setattr(Context, "from_pool", classmethod(from_pool))
    monkeypatch.setitem(g.SAMPLERS, "ar", sampler)
    return seen


def caches_added(monkeypatch):
    added, add = {}, g.NearbyContextPool.add
    monkeypatch.setattr(g.NearbyContextPool, "add",
                        lambda self, c, cache, o: added.__setitem__(c, cache) or add(self, c, cache, o))
    return added


def test_geometry_takes_the_short_way_round_the_joint():
    x, xy = adc.periods((1, 3, 4), "x"), adc.periods((1, 3, 4), "xy")
    assert x == (0, 0, 4) and xy == (0, 3, 4) and adc.periods((1, 3, 4), "none") == adc.NO_PERIODS
    assert adc.offset((0, 1, 0), (0, 1, 3), x) == (0, 0, 1)  # the first column is right of the last
    assert adc.offset((0, 1, 0), (0, 1, 3)) == (0, 0, -3)
    assert adc.offset((0, 0, 2), (0, 0, 0), x) == (0, 0, 2)  # a tie goes the direct way
    assert adc.offset((0, 0, 1), (0, 2, 3), xy) == (0, 1, -2)
    assert adc.seen_from((0, 1, 3), (0, 1, 0), x) == (0, 1, 4)
    assert adc.neighbours((0, 0, 3), (0, 1, 1), (1, 2, 4), x) == [(0, 0, 0), (0, 0, 2), (0, 1, 0), (0, 1, 2), (0, 1, 3)]
    assert adc.neighbours((0, 0, 3), (0, 1, 1), (1, 2, 4)) == [(0, 0, 2), (0, 1, 2), (0, 1, 3)]
    with pytest.raises(ValueError, match="wrap must be one of"):
        adc.periods((1, 3, 4), "y")


def test_without_wrap_the_last_column_sees_nothing_to_its_right(monkeypatch):
    m = tiny_model()
    seen = contexts(monkeypatch)
    st = m.blank_canvas(2, 4)
    assert st.wrap == "none"
    m.generate(st, m.plan_fill(st), FAST, generator=seeded())
    assert all(c[2] < coord[2] or (c[2] == coord[2] and c[1] < coord[1]) for coord, sel, _ in seen for c, _ in sel)


def test_wrap_x_gives_the_last_column_the_first_columns_caches_at_plus_one(monkeypatch):
    m = tiny_model()  # extent (0, 1, 1), patches of 4 x 4 tokens
    seen, added = contexts(monkeypatch), caches_added(monkeypatch)
    st = m.blank_canvas(2, 4, wrap="x")
    out = m.generate(st, m.plan_fill(st, Order.DOWN_RIGHT), FAST, generator=seeded())
    assert out.known.all() and out.wrap == "x"
    by_coord = {coord: (dict(sel), ctx) for coord, sel, ctx in seen}
    assert (0, 0, -1) not in by_coord[(0, 0, 0)][0]  # the first column has nothing across the joint yet
    emb, tokens = m.renderer.rel, 16
    for i in range(2):
        selected, ctx = by_coord[(0, i, 3)]
        for row in range(2):  # the first column, seen as column 4, with its own cache
            assert torch.equal(selected[(0, row, 4)], added[(0, row, 0)])
        keys = list(selected)
        n = keys.index((0, i, 4))
        assert ctx.rel[n * tokens:(n + 1) * tokens].eq(emb.index((0, 0, 1))).all()  # offset dw = +1
        assert torch.equal(ctx.hidden[:, :, n * tokens:(n + 1) * tokens], added[(0, i, 0)])


def test_a_torus_gives_the_last_row_the_first_rows_caches_at_plus_one(monkeypatch):
    m = tiny_model()
    seen, added = contexts(monkeypatch), caches_added(monkeypatch)
    st = m.blank_canvas(3, 3, wrap="xy")
    m.generate(st, m.plan_fill(st, Order.RIGHT_DOWN), FAST, generator=seeded())
    selected, ctx = next((dict(sel), ctx) for coord, sel, ctx in seen if coord == (0, 2, 2))
    assert len(selected) == 8  # the last patch sees all round it, across both joints
    for position, cache_of in (((0, 3, 2), (0, 0, 2)), ((0, 3, 3), (0, 0, 0)), ((0, 2, 3), (0, 2, 0))):
        assert torch.equal(selected[position], added[cache_of])
    n = list(selected).index((0, 3, 3))
    assert ctx.rel[n * 16].item() == m.renderer.rel.index((0, 1, 1))


def test_the_pool_keeps_a_cache_while_a_patch_across_the_joint_can_select_it(monkeypatch):
    assert last_needed_steps([(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 0, 3)], (0, 0, 1))[(0, 0, 0)] == 1
    wrapped = last_needed_steps([(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 0, 3)], (0, 0, 1), periods=(0, 0, 4))
    assert wrapped[(0, 0, 0)] == 3 and (0, 0, -1) not in wrapped and (0, 0, 4) not in wrapped
    m = tiny_model()
    seen = contexts(monkeypatch)
    st = m.blank_canvas(2, 10, wrap="x")
    sizes = []
    out = m.generate(st, m.plan_fill(st), FAST, generator=seeded(), callback=lambda n, t, s: sizes.append(s.pool.size))
    made = set()
    for coord, selected, _ in seen:  # every patch selects every made patch within the extent, across the joint too
        want = {n for n in adc.neighbours(coord, (0, 1, 1), out.grid, out.periods) if n in made}
        assert {adc.wrapped(c, out.periods) for c, _ in selected} == want, coord
        made.add(coord)
    assert max(sizes) <= 2 * 3 + 2  # the usual band, and the first column kept for the last
    assert set(out.pool.caches) == {(0, 0, 9), (0, 1, 9)}  # the first column freed once the last is made


def test_forget_drops_the_caches_across_the_joint_too():
    m = tiny_model()
    st = m.blank_canvas(1, 4, wrap="x")
    st = m.generate(st, m.plan_fill(st), FAST, generator=seeded())
    assert (0, 0, 3) in st.pool.caches
    cells = torch.zeros(st.grid, dtype=torch.bool)
    cells[0, 0, 0] = True
    assert (0, 0, 3) not in st.forget(cells).pool.caches  # it attended to the forgotten first column
    assert (0, 0, 3) in dataclasses.replace(st, wrap="none").forget(cells).pool.caches


def test_wrapped_decode_rolls_with_the_tokens_and_the_plain_one_does_not():
    m = tiny_model()  # 4 px per token, tiles of 4 tokens
    f = m.vqgan.downsample_factor
    for wrap, dims in (("x", (2,)), ("xy", (1, 2))):
        st = m.blank_canvas(2, 4, wrap=wrap)
        st.tokens = torch.randint(0, 64, st.tokens.shape, generator=seeded(1))
        st.known[:] = True
        shifts = {1: 4, 2: 8}  # rows by one tile, columns by two
        rolled = dataclasses.replace(st, tokens=st.tokens.roll([shifts[d] for d in dims], [d + 1 for d in dims]))
        image = m.decode(st)
        want = image.roll([shifts[d] * f for d in dims], list(dims))
        assert torch.allclose(m.decode(rolled), want, atol=1e-5), wrap
        plain = dataclasses.replace(st, wrap="none")
        rolled_plain = dataclasses.replace(rolled, wrap="none")
        assert not torch.allclose(m.decode(rolled_plain), m.decode(plain).roll([shifts[d] * f for d in dims], list(dims)),
                                  atol=1e-3)
        assert torch.equal(m.decode(st, blend=False), m.decode(plain, blend=False))  # blocks are cut apart anyway
    tall = m.blank_canvas(1, 1, wrap="x")  # one tile wide: the window runs round onto itself
    tall.tokens = torch.randint(0, 64, tall.tokens.shape, generator=seeded(2))
    tall.known[:] = True
    assert torch.isfinite(m.decode(tall)).all() and m.decode(tall).shape == (1, 16, 16, 3)


def test_given_pixels_fade_towards_generated_pixels_across_the_joint():
    # given pixels on the left half of a canvas 10 px wide, generated on the right: the joint meets the left edge
    plain = given_weight((4, 5), (0, 0), (4, 10), feather=3)
    wrapped = given_weight((4, 5), (0, 0), (4, 10), feather=3, wrap=(False, True))
    assert torch.equal(plain[:, 0], torch.ones(4)) and torch.equal(wrapped[:, 0], torch.full((4,), 0.25))
    assert torch.equal(wrapped[:, 4], plain[:, 4]) and torch.equal(wrapped.flip(1), wrapped)
    torus = given_weight((3, 10), (0, 0), (6, 10), feather=2, wrap=(True, True))
    assert torch.allclose(torus[:, 0], torch.tensor([1 / 3, 2 / 3, 1 / 3]))
    assert torch.equal(given_weight((3, 10), (0, 0), (6, 10), feather=2, wrap=(False, True))[0], torch.ones(10))


def test_the_wrapped_sides_cannot_be_extended_and_the_others_can():
    m = tiny_model()
    st = m.blank_canvas(1, 3, wrap="x")
    st = m.generate(st, m.plan_fill(st), FAST, generator=seeded())
    for side in ("left", "right"):
        with pytest.raises(ValueError, match=r"wraps horizontally .*no left/right edge"):
            m.plan_extension(st, **{side: 1})
    with pytest.raises(ValueError, match="wraps horizontally"):  # a plan made without the canvas is refused too
        m.generate(st, adc.plan_outpaint(st.grid, right=1), FAST)
    down = m.generate(st, m.plan_extension(st, down=1), FAST, generator=seeded())
    assert down.grid == (1, 2, 3) and down.known.all() and down.wrap == "x"
    torus = dataclasses.replace(st, wrap="xy")
    with pytest.raises(ValueError, match=r"wraps vertically .*no top/bottom edge"):
        m.plan_extension(torus, up=1)


def test_the_canvas_file_keeps_wrap_and_old_files_do_not_wrap(tmp_path):
    m = tiny_model()
    st = m.blank_canvas(2, 3, wrap="xy")
    st = m.generate(st, m.plan_fill(st), FAST, generator=seeded())
    st.save(tmp_path / "c.safetensors")
    back = CanvasState.load(tmp_path / "c.safetensors")
    assert back.wrap == "xy" and torch.equal(m.decode(back), m.decode(st))
    with safe_open(tmp_path / "c.safetensors", "pt") as opened:  # a canvas saved before wrapping existed
        meta = {k: v for k, v in opened.metadata().items() if k != "wrap"}
    save_file(load_file(tmp_path / "c.safetensors"), tmp_path / "old.safetensors", metadata=meta)
    assert CanvasState.load(tmp_path / "old.safetensors").wrap == "none"
    with pytest.raises(ValueError, match="wrap must be one of"):
        dataclasses.replace(st, wrap="both")


def test_the_planner_declares_the_wrap_the_renderer_generates_and_decodes_with(pack):
    m = tiny_model()
    (canvas,) = node(pack, "NUWAEmptyCanvas")(m, 64, 32, 1, 1)
    assert "wrap" in pack["NUWADirectionPlanner"].INPUT_TYPES()["optional"]
    plan, _ = node(pack, "NUWADirectionPlanner")(m, canvas, 0, 0, 0, 0, 0, 0, "center", wrap="horizontal")
    assert plan.wrap == "x" and canvas.wrap == "none"  # the input canvas is not changed
    image, grown = node(pack, "NUWAPatchRenderer")(m, canvas, plan, 0, "auto", 4, 1.0, 16, 1.0)
    assert grown.wrap == "x" and torch.equal(image, m.decode(grown))
    kept, _ = node(pack, "NUWADirectionPlanner")(m, grown, 0, 0, 0, 1, 0, 0, "center")  # wrap: keep (the default)
    assert kept.wrap == "x"  # a loaded tileable canvas stays tileable
    _, grown_down = node(pack, "NUWAPatchRenderer")(m, grown, kept, 0, "auto", 4, 1.0, 16, 1.0)
    assert grown_down.wrap == "x" and grown_down.grid == (1, grown.grid[1] + 1, grown.grid[2])
    blank, _ = node(pack, "NUWADirectionPlanner")(m, canvas, 0, 0, 0, 0, 0, 0, "center")
    assert blank.wrap == "none"  # a blank canvas is not tileable
    plain, _ = node(pack, "NUWADirectionPlanner")(m, grown, 0, 0, 0, 1, 0, 0, "center", wrap="none")
    assert plain.wrap == "none"  # asked: the plan unwraps it
    with pytest.raises(ValueError, match="wraps horizontally"):
        node(pack, "NUWADirectionPlanner")(m, grown, 0, 1, 0, 0, 0, 0, "center", wrap="horizontal")
    with pytest.raises(ValueError, match="wraps vertically"):
        node(pack, "NUWADirectionPlanner")(m, grown, 0, 0, 0, 1, 0, 0, "center", wrap="both")
    with pytest.raises(ValueError, match="wrap must be one of"):
        node(pack, "NUWADirectionPlanner")(m, canvas, 0, 0, 0, 0, 0, 0, "center", wrap="x")


def test_wrap_seam_ratio_measures_either_joint_beside_the_patch_borders():
    ramp = torch.linspace(0, 1, 64).view(1, 1, 64, 1).expand(1, 64, 64, 3)
    assert wrap_seam_ratio(ramp, axis="x") > 30 and wrap_seam_ratio(ramp.transpose(1, 2), axis="y") > 30
    assert wrap_seam_ratio(ramp, axis="y") == 1.0  # flat along the rows: nothing jumps
    levels = torch.tensor([0.0, 0.25, 0.5, 0.5]).repeat_interleave(16)  # patches of 16 px: steps at two of 3 borders
    steps = levels.view(1, 1, 64, 1).expand(1, 8, 64, 3)
    assert wrap_seam_ratio(steps, 16) == pytest.approx(0.5 / (0.5 / 3))  # joint 0.5 / border mean 0.5 / 3
    assert wrap_seam_ratio(steps[:, :, :16], 16) is None  # one patch: no border to compare with
    edged = steps.clone()
    edged[:, :, 0::16] = edged[:, :, 15::16] = 1.0  # what a patch decoded alone does at its edges
    assert wrap_seam_ratio(edged, 16) != pytest.approx(3.0)
    assert wrap_seam_ratio(edged, 16, gap=2) == pytest.approx(3.0)  # pixels 2 px off the joint and the borders
    assert wrap_seam_ratio(edged, 16, gap=8) is None  # pairs as far apart as a patch: no border pair
    with pytest.raises(ValueError, match="axis"):
        wrap_seam_ratio(ramp, axis="z")
