import math

import pytest
import torch

from _tiny import tiny_renderer
from nuwa_core.infinity.arbitrary_direction_controller import ORDERS, Order
from nuwa_core.infinity.nearby_context_pool import NearbyContextPool
from nuwa_core.infinity import patch_samplers
from nuwa_core.infinity.patch_samplers import (SamplerSettings, cosine_schedule, decode_ar, filter_logits,
                                               gumbel_temperature, sample_ar, sample_categorical, sample_pnar)
from nuwa_core.infinity.renderer import Context, RendererConfig


def context_for(renderer, coord=(0, 1, 1), batch=2):
    """Two random context caches at offsets up-left and left of `coord`."""
    cfg = renderer.config
    pool = NearbyContextPool(cfg.extent)
    g = torch.Generator().manual_seed(1)
    for c in [(0, 0, 0), (0, 1, 0)]:
        pool.add(c, torch.randn(cfg.n_layer, batch, cfg.tokens_per_patch, cfg.d_model, generator=g), Order.DOWN_RIGHT)
    return Context.from_pool(pool.select(coord), coord, renderer.rel, "cpu")


@pytest.mark.parametrize("rpe", ["pre", "post"])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("text_dim", [0, 24])
def test_kv_cache_decoding_matches_full_recompute(rpe, order, text_dim):
    r = tiny_renderer(rpe=rpe, text_dim=text_dim)
    ctx = context_for(r)
    text = torch.randn(2, 5, text_dim) if text_dim else None
    text_kv = r.text_kv(text)
    forced = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))  # raster
    perm, _ = r.permutation(order)
    step_logits = []

    def choose(logits):  # record the cached step's logits, feed the forced token
        step_logits.append(logits)
        return forced[:, perm[len(step_logits) - 1]]

    tokens, cache = decode_ar(r, ctx, order, text_kv, 2, choose)
    full_logits, full_cache = r.teacher_forced(forced, order, ctx, text_kv)
    assert torch.equal(tokens, forced)
    cached = torch.stack(step_logits, dim=1)  # generation order
    assert (cached - full_logits[:, perm]).abs().max() <= 1e-4
    assert (cache - full_cache).abs().max() <= 1e-4


def test_context_changes_the_prediction_and_empty_context_works():
    r = tiny_renderer()
    tokens = torch.randint(0, 64, (2, 16))
    with_ctx, _ = r.teacher_forced(tokens, Order.DOWN_RIGHT, context_for(r), r.text_kv(None))
    without, _ = r.teacher_forced(tokens, Order.DOWN_RIGHT, Context(None, None, 0), r.text_kv(None))
    assert not torch.allclose(with_ctx, without)


@pytest.mark.parametrize("step", [0, 10, 15])
def test_ar_logits_are_causal_in_the_local_order(step):
    """The logits of token t (slot t) do not depend on tokens >= t."""
    r = tiny_renderer()
    order = Order.RIGHT_UP
    perm, _ = r.permutation(order)
    a = torch.randint(0, 64, (1, 16))
    b = a.clone()
    b[0, perm[step]] = (a[0, perm[step]] + 1) % 64
    la, _ = r.teacher_forced(a, order, context_for(r, batch=1), r.text_kv(None))
    lb, _ = r.teacher_forced(b, order, context_for(r, batch=1), r.text_kv(None))
    assert torch.allclose(la[:, perm[:step + 1]], lb[:, perm[:step + 1]], atol=1e-6)  # up to and incl. `step`
    if step < 15:
        assert not torch.allclose(la[:, perm[step + 1:]], lb[:, perm[step + 1:]])


@pytest.mark.parametrize("decoder", ["ar", "nar", "pnar"])
def test_batch_equals_single(decoder):
    r = tiny_renderer(decoder=decoder)
    ctx = context_for(r)
    tokens = torch.randint(0, 64, (2, 16))
    masked = torch.rand(2, 16) < 0.5
    logits, cache = r.teacher_forced(tokens, Order.DOWN_LEFT, ctx, r.text_kv(None), masked=masked)
    one = Context(ctx.hidden[:, 1:], ctx.rel, ctx.n_patches)
    l1, c1 = r.teacher_forced(tokens[1:], Order.DOWN_LEFT, one, r.text_kv(None), masked=masked[1:])
    assert torch.allclose(logits[1:], l1, atol=1e-5) and torch.allclose(cache[:, 1:], c1, atol=1e-5)


def test_logit_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]])

    def f(**kw):
        return filter_logits(logits, SamplerSettings(**{"top_k": 0, **kw}))
    assert torch.isinf(f(top_k=2)[0, 2:]).all()
    kept = f(top_p=0.7)  # p = .64 .24 .09 .03: nucleus of 0.7 keeps two
    assert torch.isfinite(kept[0, :2]).all() and torch.isinf(kept[0, 2:]).all()
    assert torch.allclose(f(temperature=2.0), logits / 2)
    kept = f(epsilon=0.05)  # drops the .03 token only
    assert torch.isfinite(kept[0, :3]).all() and torch.isinf(kept[0, 3])
    assert torch.isfinite(f(epsilon=0.9)[0, 0]) and torch.isinf(f(epsilon=0.9)[0, 1:]).all()  # the top token stays
    with pytest.raises(ValueError, match="epsilon"):
        SamplerSettings(epsilon=1.0)


def test_epsilon_removes_a_label_smoothing_floor():
    """A model trained with label smoothing a gives every code about a / V; epsilon above that floor
    samples only the codes the model means, top-k alone does not."""
    v, a = 512, 0.15
    probs = torch.full((1, v), a / v)
    probs[0, :3] += torch.tensor([0.5, 0.25, 0.1])  # the codes it means; the floor holds the rest
    logits = probs.log()
    gen = torch.Generator().manual_seed(0)
    draws = lambda s: torch.stack([sample_categorical(filter_logits(logits, s), gen) for _ in range(2000)])
    assert (draws(SamplerSettings(top_k=100)) >= 3).float().mean() > 0.02  # ~3% of draws off the floor
    assert (draws(SamplerSettings(top_k=100, epsilon=2 * a / v)) < 3).all()


def test_pnar_schedule_and_fixed_tokens():
    assert cosine_schedule(0.0) == 1.0 and abs(cosine_schedule(1.0)) < 1e-12
    r = tiny_renderer(decoder="pnar")
    g = torch.Generator().manual_seed(0)
    tokens, cache = sample_pnar(r, Context(None, None, 0), Order.DOWN_RIGHT, r.text_kv(None), 3,
                                SamplerSettings(steps=6), g)
    assert tokens.shape == (3, 16) and (tokens < 64).all() and cache.shape == (2, 3, 16, 32)


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="decoder must be one of"):
        RendererConfig(decoder="diffusion")
    with pytest.raises(ValueError, match="divisible"):
        RendererConfig(d_model=30, n_head=4)
    r = tiny_renderer(text_dim=768)
    with pytest.raises(ValueError, match="512 wide .* 768"):
        r.text_kv(torch.zeros(1, 77, 512))


@pytest.mark.parametrize("step", [15, 6])  # the patch's last token (the corner touching the next patches), a middle one
@pytest.mark.parametrize("order", [Order.DOWN_RIGHT, Order.RIGHT_UP])
def test_ar_cache_holds_each_token_at_its_own_position(step, order):
    """Changing one token changes the layer-0 cache at that token's raster position and nowhere
    else (slot r of the cache is token r), and the deeper layers after it; the last token too."""
    r = tiny_renderer()
    perm, _ = r.permutation(order)
    a = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(4))
    b = a.clone()
    b[:, perm[step]] = (a[:, perm[step]] + 1) % 64
    ctx = context_for(r)
    _, ca = r.teacher_forced(a, order, ctx, r.text_kv(None))
    _, cb = r.teacher_forced(b, order, ctx, r.text_kv(None))
    changed = (ca - cb).abs().amax(dim=(1, 3)) > 1e-6  # [L, M] raster
    assert changed[0].tolist() == [i == int(perm[step]) for i in range(16)]
    assert changed[1, perm[step:]].all() and not changed[1, perm[:step]].any()  # causal in the local order


def test_sampled_ar_cache_is_the_context_free_one_with_transfer_off():
    """decode_ar's own cache sees the context; with transfer off the AR sampler hands the pool the
    cache of a pass without it, as teacher forcing does."""
    r = tiny_renderer(transfer=False)
    ctx = context_for(r)
    tokens, pooled = sample_ar(r, ctx, Order.DOWN_LEFT, r.text_kv(None), 2, SamplerSettings(top_k=4),
                               torch.Generator().manual_seed(0))
    empty = r.encode(tokens, Order.DOWN_LEFT, Context(None, None, 0), r.text_kv(None))
    assert torch.allclose(pooled, empty, atol=1e-5)
    perm, _ = r.permutation(Order.DOWN_LEFT)
    replay = []
    _, own = decode_ar(r, ctx, Order.DOWN_LEFT, r.text_kv(None), 2,
                       lambda logits: replay.append(1) or tokens[:, perm[len(replay) - 1]])
    assert not torch.allclose(own, pooled, atol=1e-3)  # decoding's own cache saw the context


@pytest.mark.parametrize("decoder", ["ar", "nar", "pnar"])
def test_transfer_off_makes_the_cache_without_context_and_keeps_the_logits_with_it(decoder):
    masked = torch.rand(2, 16, generator=torch.Generator().manual_seed(5)) < 0.5
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(6))
    base = context_for(tiny_renderer())
    other = Context(base.hidden * -2.0, base.rel, base.n_patches)
    for transfer in (True, False):
        r = tiny_renderer(decoder=decoder, transfer=transfer)
        la, ca = r.teacher_forced(tokens, Order.RIGHT_DOWN, context_for(r), r.text_kv(None), masked=masked)
        lb, cb = r.teacher_forced(tokens, Order.RIGHT_DOWN, other, r.text_kv(None), masked=masked)
        assert not torch.allclose(la, lb)  # the patch's own prediction always sees its context
        assert torch.allclose(ca, cb) is (not transfer)
        if not transfer:
            empty = r.teacher_forced(tokens, Order.RIGHT_DOWN, Context(None, None, 0), r.text_kv(None), masked=masked)
            assert torch.allclose(ca, empty[1], atol=1e-6)
            assert torch.allclose(ca, r.encode(tokens, Order.RIGHT_DOWN, context_for(r), r.text_kv(None)), atol=1e-6)


def test_epsilon_cuts_the_models_own_distribution_before_top_k():
    """p = .30 .12 then a floor of 62 codes. top_k=2 renormalises the kept pair to .71 / .29: an
    epsilon of .2 applied after it would keep the .12 token; on the model's distribution it is cut."""
    probs = torch.full((1, 64), 0.58 / 62)
    probs[0, :2] = torch.tensor([0.3, 0.12])
    kept = filter_logits(probs.log(), SamplerSettings(top_k=2, epsilon=0.2))
    assert torch.isfinite(kept[0, 0]) and torch.isinf(kept[0, 1:]).all()
    # epsilon reads the temperature-scaled distribution: the .12 token passes .1, at T = 2 (.05) it does not
    plain = filter_logits(probs.log(), SamplerSettings(top_k=0, epsilon=0.1))
    assert torch.isfinite(plain[0, :2]).all() and torch.isinf(plain[0, 2:]).all()
    flat = filter_logits(probs.log(), SamplerSettings(top_k=0, temperature=2.0, epsilon=0.1))
    assert torch.isfinite(flat[0, 0]) and torch.isinf(flat[0, 1:]).all()


@pytest.mark.parametrize("factor", [0.9, 1.1])
def test_pnar_gumbel_temperature_is_linear_4_5_to_1_and_used_as_is(monkeypatch, factor):
    """Each step's confidence noise is scaled by the linear 4.5 -> 1.0 schedule (appendix A) and
    nothing else (no second (1 - r) annealing): a probe whose outcome flips where the temperature
    crosses `factor` times the expected one pins it within 10% at every step."""
    s = SamplerSettings(top_k=0, steps=4)
    expected = [4.5 - 3.5 * (step + 1) / 4 for step in range(3)]  # steps 0..2 re-mask; the last fixes all
    assert [gumbel_temperature((step + 1) / 4, s) for step in range(3)] == expected
    assert gumbel_temperature(0.0, s) == 4.5 and gumbel_temperature(1.0, s) == 1.0
    r = tiny_renderer(decoder="pnar")
    logits = torch.zeros(1, 16, 64)
    logits[0, :, 0] = 8.0 - 0.4 * torch.arange(16)  # token 0 everywhere, less sure further on
    log_p = logits.log_softmax(-1)[..., 0]  # [1, 16]
    probe = {"step": 0}
    threshold = [factor * t for t in expected]

    def noise(shape, generator, device):
        if len(shape) == 3:  # sample_categorical: no noise, argmax
            return torch.zeros(shape)
        theta = threshold[probe["step"]]
        probe["step"] += 1
        return (-log_p / theta).expand(shape)  # confidence = log_p * (1 - t_g / theta)

    seen = []
    monkeypatch.setattr(patch_samplers, "gumbel_noise", noise)
    monkeypatch.setattr(r, "forward", lambda x, *a, **k: (logits.expand(x.shape[0], -1, -1), None))
    original = r.parallel_inputs
    monkeypatch.setattr(r, "parallel_inputs", lambda tokens, order: seen.append(tokens.clone()) or original(tokens, order))
    sample_pnar(r, Context(None, None, 0), Order.DOWN_RIGHT, r.text_kv(None), 1, s, torch.Generator())
    # confidence = |log_p| (t_g / theta - 1): with t_g > theta the surest tokens (low index) score
    # lowest and stay masked, with t_g < theta the least sure ones do
    for step in range(3):
        unknown = torch.nonzero(seen[step][0] == 64).flatten()  # ascending index = descending log_p
        n_mask = max(1, min(len(unknown) - 1, math.floor(16 * cosine_schedule((step + 1) / 4))))
        want = torch.zeros(16, dtype=torch.bool)
        want[unknown[:n_mask] if factor < 1 else unknown[-n_mask:]] = True
        assert torch.equal(seen[step + 1][0] == 64, want), step


def test_epsilon_and_top_k_keep_exactly_the_tokens_both_rules_keep():
    """filter_logits skips top-k when it cannot remove an epsilon-likely token (top_k >= 1/epsilon):
    the same tokens as applying both rules one after the other, ties and peaked rows included."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.cat([torch.randn(64, 512, generator=gen) * s for s in (0.5, 2.0, 6.0)])
    logits[:8, :300] = 0.0  # ties
    for top_k, epsilon in ((100, 0.01), (768, 0.01), (200, 0.005), (50, 0.01), (10, 0.2)):
        got = filter_logits(logits, SamplerSettings(top_k=top_k, epsilon=epsilon))
        probs = logits.softmax(-1)
        keep = (probs >= epsilon) | (probs == probs.amax(-1, keepdim=True))
        if top_k < logits.shape[-1]:
            kth = torch.topk(logits.masked_fill(~keep, float("-inf")), top_k, dim=-1).values[..., -1:]
            keep &= logits >= kth
        assert torch.equal(torch.isfinite(got), keep), (top_k, epsilon)


def test_the_token_step_follows_weights_changed_in_place():
    """TokenStep keeps fused copies of the weights; an optimizer step (in place) must not leave it stale."""
    r = tiny_renderer()
    tokens = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(3))
    perm, _ = r.permutation(Order.DOWN_RIGHT)
    for _ in range(2):
        forced = iter(tokens[0, perm])
        _, cache = decode_ar(r, Context(None, None, 0), Order.DOWN_RIGHT, r.text_kv(None), 1,
                             lambda logits: next(forced)[None])
        _, full = r.teacher_forced(tokens, Order.DOWN_RIGHT, Context(None, None, 0), r.text_kv(None))
        assert (cache - full).abs().max() <= 1e-4
        with torch.no_grad():
            r.blocks[0].q.weight.mul_(3.0)  # as an optimizer step would


def test_the_token_step_runs_on_weights_made_under_inference_mode():
    """ComfyUI runs nodes under torch.inference_mode: weights loaded there have no version counter."""
    with torch.inference_mode():
        r = tiny_renderer()
        tokens, cache = decode_ar(r, Context(None, None, 0), Order.DOWN_RIGHT, r.text_kv(None), 1,
                                  lambda logits: logits.argmax(-1))
    assert tokens.shape == (1, 16) and cache.shape == (2, 1, 16, 32)
