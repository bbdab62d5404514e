"""Best of N candidate patches (issue 11): each patch drawn N times from its own streams, the draw
kept that best predicts its known neighbours in the reverse order, lies nearest the other draws and
meets its known neighbours' edges."""
import pytest
import torch
import torch.nn.functional as F
from _tiny import tiny_model

from nuwa_core.infinity import candidate_patches as cp, generation as g
from nuwa_core.infinity.arbitrary_direction_controller import Order
from nuwa_core.infinity.patch_samplers import SamplerSettings
from nuwa_core.infinity.renderer import Context

FAST = SamplerSettings(top_k=16)


def image(h=32, w=48, seed=0):
    return torch.rand(1, h, w, 3, generator=torch.Generator().manual_seed(seed))


def with_candidates(n, **kw):
    return SamplerSettings(top_k=16, candidates=n, **kw)


def recording(monkeypatch, prefer):
    """Replace the score by prefer(candidate tokens [n, B, M]) -> [n, B], recording every call."""
    calls = []

    def score(rows, coords, tokens, n, order, select, patch_tokens, codebook):
        b = tokens.shape[0] // (rows.halves * len(coords))
        per_candidate = tokens[:len(coords) * b].view(len(coords), b, -1)  # the sampled half
        calls.append((list(coords), per_candidate.clone()))
        return prefer(per_candidate).float()
    monkeypatch.setattr(g, "candidate_scores", score)
    return calls


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_each_canvas_keeps_its_best_candidate_tokens_and_cache(monkeypatch, guidance):
    """With a score that prefers the candidate with the largest token sum, every generated patch of
    every batch row is that candidate, and its pooled cache is the one its tokens make."""
    text = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1)) if guidance != 1 else None
    m = tiny_model(text_dim=8 if text is not None else 0)
    calls = recording(monkeypatch, lambda t: t.sum(-1))
    st = m.canvas_from_image(image().repeat(2, 1, 1, 1))  # 2 x 3 patches, all given, 2 canvases
    seen = {}  # every cache pooled on the way (the pool frees those no later patch selects)
    out = m.generate(st, m.plan_extension(st, right=2), with_candidates(3, guidance=guidance), text=text, generator=4,
                     callback=lambda n, total, state: seen.update(state.pool.caches))
    assert sum(len(coords) for coords, _ in calls) == 4 * 3
    kept = []
    for coords, tokens in calls:
        for i in range(0, len(coords), 3):
            best = tokens[i:i + 3].sum(-1).argmax(0)  # [B]
            kept += best.tolist()
            for b, k in enumerate(best):
                assert torch.equal(out.patch_tokens(coords[i])[b], tokens[i + int(k), b])
            assert not torch.equal(tokens[i], tokens[i + 1])  # the candidates differ
    assert len(set(kept)) > 1  # not always the same candidate
    last, earlier = (0, 1, 4), [(0, 0, 3), (0, 1, 3), (0, 0, 4)]  # its context in the right strip's order
    rows = g.PatchBatch(m.renderer, m._text(text, 2), guided=text is not None)
    context = rows.context([(last, [(c, seen[c]) for c in earlier])])
    kept = out.patch_tokens(last).repeat(rows.halves, 1)
    want = m.renderer.encode(kept, Order.DOWN_RIGHT, context, rows.text_kv(1))
    torch.testing.assert_close(out.pool.caches[last], want, rtol=1e-4, atol=1e-5)


def test_the_first_candidate_is_the_patch_own_draw(monkeypatch):
    """Candidate 0 draws from the stream a single draw uses: preferring it gives today's canvas."""
    m = tiny_model()
    st = m.canvas_from_image(image())
    plan = m.plan_extension(st, left=1, right=1, up=1)
    single = m.generate(st, plan, FAST, generator=9)
    recording(monkeypatch, lambda t: (torch.arange(t.shape[0]) % 3 == 0)[:, None].expand(t.shape[:2]))
    assert torch.equal(m.generate(st, plan, with_candidates(3), generator=9).tokens, single.tokens)


@pytest.mark.parametrize("decoder", ["ar", "pnar"])
def test_same_canvas_with_either_schedule_and_in_batch_or_alone(decoder):
    m = tiny_model(decoder=decoder)
    st = m.canvas_from_image(image())
    plan = m.plan_extension(st, left=1, right=2, up=1, down=1)
    one = m.generate(st, plan, with_candidates(3), generator=2, schedule="sequential")
    many = m.generate(st, plan, with_candidates(3), generator=2, schedule="wavefront", max_wave=2)
    assert torch.equal(one.tokens, many.tokens)
    assert not torch.equal(one.tokens, m.generate(st, plan, FAST, generator=2).tokens)
    for wrap in ("x", "xy"):  # neighbours across the joint are scored where they lie as seen from the patch
        blank = m.blank_canvas(3, 4, wrap=wrap)
        a = m.generate(blank, m.plan_fill(blank), with_candidates(2), generator=1, schedule="sequential")
        b = m.generate(blank, m.plan_fill(blank), with_candidates(2), generator=1, max_wave=3)
        assert torch.equal(a.tokens, b.tokens)
    if decoder != "ar":
        return  # a P-NAR canvas's rows draw their noise step after step: row 0 of 2 is not a canvas alone
    two = m.blank_canvas(2, 3, batch=2)
    assert torch.equal(m.generate(two, m.plan_fill(two), with_candidates(2), generator=6).tokens[:1],
                       m.generate(m.blank_canvas(2, 3), m.plan_fill(two), with_candidates(2), generator=6).tokens)


def test_the_score_is_the_neighbours_reverse_likelihood():
    """neighbour_loglik against the formula computed one pair at a time: candidate encoded in the
    reverse order without context, each later neighbour teacher-forced with it as its context."""
    m = tiny_model()
    r = m.renderer
    st = m.canvas_from_image(image())  # 2 x 3 patches, all given
    coord = (0, 0, 3)  # right of the given patches
    near = [(0, 0, 2), (0, 1, 2), (0, 0, 4)]  # its neighbours as select gives them (the caches are not used)
    rows = g.PatchBatch(r)
    candidates = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    tokens_of = {c: st.patch_tokens(c) for c in [(0, i, j) for i in range(2) for j in range(3)]}
    score = cp.neighbour_loglik(rows, [coord, coord], candidates, Order.DOWN_RIGHT, lambda c: [(n, None) for n in near],
                                tokens_of.__getitem__)
    assert score.shape == (2, 1)
    later = [n for n in near if cp.comes_after(n, coord, Order.DOWN_LEFT)]
    assert later == [(0, 0, 2), (0, 1, 2)]  # further right comes earlier when growing left: not scored
    for k in range(2):
        cache = r.encode(candidates[k:k + 1], Order.DOWN_LEFT, Context(None, None, 0), r.text_kv(None))
        want = 0.0
        for near in later:
            ctx = Context.from_pool([(coord, cache)], near, r.rel, "cpu")
            logits, _ = r.teacher_forced(tokens_of[near], Order.DOWN_LEFT, ctx, r.text_kv(None))
            want -= F.cross_entropy(logits[0], tokens_of[near][0], reduction="sum").item()
        assert score[k, 0].item() == pytest.approx(want, rel=1e-4)


def test_comes_after_follows_each_order_across_a_wrapped_joint():
    assert cp.comes_after((0, 0, -1), (0, 0, 0), Order.DOWN_LEFT)  # further left: later when growing left
    assert not cp.comes_after((0, 0, -1), (0, 0, 0), Order.DOWN_RIGHT)
    assert cp.comes_after((0, 1, 5), (0, 0, 0), Order.RIGHT_DOWN) and not cp.comes_after((0, 1, 5), (0, 0, 0), Order.RIGHT_UP)
    assert cp.comes_after((0, 0, 4), (0, 0, 3), Order.DOWN_RIGHT)  # column W seen from W - 1
    assert {cp.REVERSE[cp.REVERSE[o]] for o in Order} == set(Order)


def test_memory_estimate_counts_the_candidates(monkeypatch):
    m = tiny_model()
    st = m.blank_canvas(2, 2)
    asked = []
    monkeypatch.setattr(g, "check_memory", lambda need, what, device: asked.append(need))
    m.generate(st, m.plan_fill(st), FAST, generator=0)
    m.generate(st, m.plan_fill(st), with_candidates(4), generator=0)
    assert asked[1] > asked[0]


def test_bad_candidate_counts_are_named():
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="candidates .* whole number >= 1"):
            SamplerSettings(candidates=bad)


def test_scoring_keeps_every_tensor_on_the_models_device():
    """Device mixing without a GPU: the renderer, candidates and neighbours on `meta`."""
    r = tiny_model().renderer.to("meta")
    cache = torch.zeros(2, 1, 16, 32, device="meta")
    near = [((0, 0, 0), cache), ((0, 1, 0), cache)]
    tokens = torch.zeros(2, 16, dtype=torch.long, device="meta")
    score = cp.neighbour_loglik(g.PatchBatch(r), [(0, 0, 1), (0, 0, 1)], tokens, Order.DOWN_RIGHT, lambda c: near,
                                lambda c: torch.zeros(1, 16, dtype=torch.long, device="meta"))
    assert score.device.type == "meta" and score.shape == (2, 1)


def test_a_batch_holds_at_most_max_wave_draws(monkeypatch):
    """With N candidates a wave renders max_wave // N patches (N draws each): the same canvas as
    wider waves, in batches of at most max_wave rows."""
    m = tiny_model()
    st = m.blank_canvas(6, 10)  # waves of up to 3 patches
    plan = m.plan_fill(st)
    rows = []
    real = g.SAMPLERS["ar"]
    monkeypatch.setitem(g.SAMPLERS, "ar", lambda r, ctx, order, text_kv, batch, *a: rows.append(batch) or real(
        r, ctx, order, text_kv, batch, *a))
    narrow = m.generate(st, plan, with_candidates(3), generator=3, max_wave=5)
    assert max(rows) == 3  # one patch of three draws
    rows.clear()
    wide = m.generate(st, plan, with_candidates(3), generator=3)
    assert max(rows) == 9 and torch.equal(narrow.tokens, wide.tokens)


def test_agreement_is_minus_the_summed_squared_distance_to_the_other_candidates():
    codebook = torch.randn(10, 3, generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(0, 10, (4, 2, 5), generator=torch.Generator().manual_seed(1))  # [n, B, M]
    e = codebook[tokens]  # [n, B, M, d]
    want = torch.stack([-sum(((e[i] - e[j]) ** 2).sum((-1, -2)) for j in range(4)) for i in range(4)])
    torch.testing.assert_close(cp.agreement(tokens, codebook), want, rtol=1e-4, atol=1e-4)
    spread = torch.tensor([0, 1, 2, 9])[:, None, None].expand(4, 1, 3)  # [n, B, M]: one code per candidate
    # squared distances: the candidate nearest the candidates' mean (code 3) wins, not the first or the outlier
    assert cp.agreement(spread, torch.arange(10.0)[:, None])[:, 0].argmax() == 2


def test_ranks_count_the_candidates_beaten_and_ties_beat_none():
    assert cp.ranks(torch.tensor([[0.5], [2.0], [-1.0], [2.0]]))[:, 0].tolist() == [1, 2, 0, 2]
    assert cp.ranks(torch.zeros(3, 2)).eq(0).all()


def unfetched(coord):
    raise AssertionError(f"no known patch is selected, yet {coord} was fetched")


def test_candidate_scores_add_the_ranks_per_patch(monkeypatch):
    """Two patches of 3 candidates: each patch's score is its neighbours' rank plus its agreement's
    rank among its own 3 (no known patch beside them: the border's rank is 0), and with no neighbour
    to score (likelihood all 0) agreement decides."""
    likelihood = torch.tensor([[3.0], [1.0], [2.0], [0.0], [0.0], [0.0]])
    monkeypatch.setattr(cp, "neighbour_loglik", lambda *a: likelihood.clone())
    codebook = torch.arange(8.0)[:, None]
    tokens = torch.tensor([[0, 0], [7, 7], [1, 1], [5, 5], [2, 2], [6, 6]])  # [P*n*B, M], B = 1
    rows = g.PatchBatch(tiny_model().renderer)
    score = cp.candidate_scores(rows, [(0, 0, 0)] * 3 + [(0, 0, 1)] * 3, tokens, 3, Order.DOWN_RIGHT,
                                lambda c: [], unfetched, codebook)  # no known patch: border ranks all 0
    agree = [cp.agreement(tokens[i:i + 3, None], codebook)[:, 0] for i in (0, 3)]
    assert agree[0].argmax() == 2 and agree[1].argmax() == 0  # codes 1 (between 0 and 7), 5 (between 2 and 6)
    assert score[:, 0].tolist() == [2 + 1, 0 + 0, 1 + 2, 0 + 2, 0 + 0, 0 + 1]
    assert score[3:].argmax() == 0


def test_border_agreement_sums_the_squared_distance_across_each_shared_edge():
    """Candidates [[1, 2], [3, 4]] and all 5s at (0, 1, 1), patches of 1 x 2 x 2 tokens, a 1-d codebook
    (code k at k): known patches right, above, left and below count by their facing edge; a diagonal
    one and one in another frame do not."""
    known = {(0, 1, 2): [[2, 9], [4, 9]],   # facing column [2, 4]
             (0, 0, 1): [[0, 0], [1, 2]],   # facing row [1, 2]
             (0, 1, 0): [[7, 1], [7, 3]],   # facing column [1, 3]
             (0, 2, 1): [[3, 5], [0, 0]],   # facing row [3, 5]
             (0, 0, 0): [[9, 9], [9, 9]], (-1, 1, 1): [[9, 9], [9, 9]]}
    tokens = torch.tensor([[1, 2, 3, 4], [5, 5, 5, 5]])[:, None]  # [n, B, M]
    score = cp.border_agreement(tokens, (0, 1, 1), (1, 2, 2), lambda c: [(near, None) for near in known],
                                lambda c: torch.tensor(known[c]).view(1, 4), torch.arange(10.0)[:, None])
    # candidate 0 matches every edge but the lower one ([3, 4] against [3, 5]); candidate 1: 10 + 25 + 20 + 4
    assert score[:, 0].tolist() == [-1.0, -59.0]
    assert cp.border_agreement(tokens, (0, 1, 1), (1, 2, 2), lambda c: [], None, None).eq(0).all()


def test_candidate_scores_add_the_border_rank(monkeypatch):
    """Two candidates tie on the neighbours' score and on agreement (two draws are equally near each
    other): the one whose edge matches its known left neighbour wins."""
    monkeypatch.setattr(cp, "neighbour_loglik", lambda *a: torch.zeros(2, 1))
    rows = g.PatchBatch(tiny_model().renderer)  # patches of 1 x 4 x 4 tokens
    left = torch.arange(16).view(1, 16)  # its last column: 3, 7, 11, 15
    tokens = torch.stack([torch.zeros(16, dtype=torch.long), torch.arange(16).view(4, 4).flip(1).flatten()])
    score = cp.candidate_scores(rows, [(0, 0, 1)] * 2, tokens, 2, Order.DOWN_RIGHT,
                                lambda c: [((0, 0, 0), None)], lambda c: left, torch.arange(16.0)[:, None])
    assert score[:, 0].tolist() == [0, 1]


def test_a_first_patch_keeps_the_candidate_nearest_the_others(monkeypatch):
    """A blank canvas's first patch has no neighbour to score: it keeps the draw nearest the other
    draws, not simply the first."""
    m = tiny_model()
    blank = m.blank_canvas(1, 1)
    seen = []

    def recorded(rows, coords, tokens, *args):
        seen.append(tokens.clone())
        return cp.candidate_scores(rows, coords, tokens, *args)
    monkeypatch.setattr(g, "candidate_scores", recorded)
    kept = m.generate(blank, m.plan_fill(blank), with_candidates(4), generator=2).patch_tokens((0, 0, 0))
    (tokens,) = seen  # [4, M]: the 4 draws, batch 1
    agree = cp.agreement(tokens[:, None], m.vqgan.quantize.embedding.weight.detach())[:, 0]
    assert agree.argmax() != 0 and len({tuple(t.tolist()) for t in tokens}) == 4
    assert torch.equal(kept[0], tokens[agree.argmax()])
