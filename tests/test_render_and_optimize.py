"""Render-and-optimize (Algorithm 1): the caches it adds to the pool, with transfer on and off."""
import pytest
import torch

from _tiny import tiny_renderer
from nuwa_core.infinity import arbitrary_direction_controller as adc
from nuwa_core.infinity.nearby_context_pool import NearbyContextPool
from nuwa_core.infinity.renderer import Context
from nuwa_core.training import renderer as renderer_stage


def pooled_caches(monkeypatch, r, tokens, order):
    """Run render_and_optimize with frozen weights (lr 0); every (coord, cache, order) it pools."""
    added = []
    add = NearbyContextPool.add
    monkeypatch.setattr(NearbyContextPool, "add", lambda self, c, cache, o: added.append((c, cache, o)) or add(self, c, cache, o))
    opt = torch.optim.SGD(r.parameters(), lr=0.0)
    renderer_stage.render_and_optimize(r, renderer_stage._TeacherForced(r), tokens, order, opt, torch.Generator())
    return added


@pytest.mark.parametrize("decoder", ["ar", "nar"])
@pytest.mark.parametrize("transfer", [True, False])
def test_pooled_cache_is_made_without_context_only_with_transfer_off(monkeypatch, decoder, transfer):
    r = tiny_renderer(decoder=decoder, transfer=transfer).train()
    tokens = torch.randint(64, (2, 1, 8, 8), generator=torch.Generator().manual_seed(1))  # 2 x 2 patches
    order = adc.Order.RIGHT_DOWN
    added = pooled_caches(monkeypatch, r, tokens, order)
    assert [c for c, _, _ in added] == adc.split((1, 2, 2), order) and all(o is order for _, _, o in added)
    empty = Context(None, None, 0)
    with torch.no_grad():
        alone = [r.encode(tokens[:, 0, 4 * i:4 * i + 4, 4 * j:4 * j + 4].reshape(2, -1), order, empty, r.text_kv(None))
                 for (_, i, j), _, _ in added]
    same = [torch.allclose(cache, want, atol=1e-5) for (_, cache, _), want in zip(added, alone)]
    assert same[0]  # the first patch has no context either way
    assert all(same[1:]) is (not transfer)
    assert not any(cache.requires_grad for _, cache, _ in added)


def test_token_noise_corrupts_what_patches_read_not_what_they_predict(monkeypatch):
    """--token-noise: the patches read random codes at about the given share (their own earlier
    tokens, and through their caches every later patch's context), while every loss is taken
    against the true tokens; 0 reads the truth."""
    r = tiny_renderer().train()
    tokens = torch.randint(64, (2, 1, 8, 8), generator=torch.Generator().manual_seed(1))
    order = adc.Order.DOWN_RIGHT
    seen = []
    forward = renderer_stage._TeacherForced.forward
    monkeypatch.setattr(renderer_stage._TeacherForced, "forward",
                        lambda self, read, *a, **k: seen.append(read) or forward(self, read, *a, **k))
    targets = []
    cross_entropy = renderer_stage.F.cross_entropy
    monkeypatch.setattr(renderer_stage.F, "cross_entropy",
                        lambda logits, target, **k: targets.append(target) or cross_entropy(logits, target, **k))
    opt = torch.optim.SGD(r.parameters(), lr=0.0)
    patches = [tokens[:, 0, 4 * i:4 * i + 4, 4 * j:4 * j + 4].reshape(2, -1) for _, i, j in adc.split((1, 2, 2), order)]
    reads = {}
    for noise, seed in ((0.0, 0), (0.5, 0), (0.5, 1)):
        seen.clear(), targets.clear()
        renderer_stage.render_and_optimize(r, renderer_stage._TeacherForced(r), tokens, order, opt,
                                           torch.Generator().manual_seed(seed), token_noise=noise)
        assert len(targets) == len(patches)
        assert all(torch.equal(t.reshape(2, -1), p) for t, p in zip(targets, patches))  # targets: the truth
        reads[noise, seed] = torch.cat(seen)
        changed = (reads[noise, seed] != torch.cat(patches)).float().mean().item()
        assert changed == 0.0 if noise == 0.0 else 0.3 < changed < 0.6  # half replaced, 1 in 64 by the same code
    assert not torch.equal(reads[0.5, 0], reads[0.5, 1])  # drawn from the sample's generator
