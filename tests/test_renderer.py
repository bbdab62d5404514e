import pytest
import torch

from _tiny import tiny_renderer
from nuwa_core.infinity.arbitrary_direction_controller import ORDERS, Order
from nuwa_core.infinity.nearby_context_pool import NearbyContextPool
from nuwa_core.infinity.patch_samplers import (SamplerSettings, cosine_schedule, decode_ar, filter_logits, sample_categorical,
                                     sample_pnar)
from nuwa_core.infinity.renderer import Context, RendererConfig


def context_for(renderer, coord=(0, 1, 1), batch=2):
    """Two random context caches at offsets up-left and left of `coord`."""
    cfg = renderer.config
    pool = NearbyContextPool(cfg.extent)
    g = torch.Generator().manual_seed(1)
    for c in [(0, 0, 0), (0, 1, 0)]:
        pool.add(c, torch.randn(cfg.n_layer, batch, cfg.tokens_per_patch, cfg.d_model, generator=g))
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


def test_ar_logits_are_causal_in_the_local_order():
    r = tiny_renderer()
    order = Order.RIGHT_UP
    perm, _ = r.permutation(order)
    a = torch.randint(0, 64, (1, 16))
    b = a.clone()
    b[0, perm[10]] = (a[0, perm[10]] + 1) % 64  # change the 11th generated token
    la, _ = r.teacher_forced(a, order, Context(None, None, 0), r.text_kv(None))
    lb, _ = r.teacher_forced(b, order, Context(None, None, 0), r.text_kv(None))
    assert torch.allclose(la[:, perm[:11]], lb[:, perm[:11]], atol=1e-6)  # up to and incl. step 10
    assert not torch.allclose(la[:, perm[11:]], lb[:, perm[11:]])


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
