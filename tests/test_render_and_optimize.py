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
