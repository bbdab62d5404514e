import itertools

import pytest
import torch

from nuwa_core.infinity import arbitrary_direction_controller as adc
from nuwa_core.infinity.arbitrary_direction_controller import ORDERS, Order


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("grid", [(1, 1, 1), (1, 3, 5), (2, 4, 3), (3, 1, 7)])
def test_inverse_of_time_index_recovers_every_coordinate(order, grid):
    n = grid[0] * grid[1] * grid[2]
    coords = [adc.coordinate(t, order, grid) for t in range(n)]
    assert sorted(coords) == sorted(itertools.product(*map(range, grid)))  # T^-1 is a bijection
    assert all(adc.time_index(c, order, grid) == t for t, c in enumerate(coords))  # T(T^-1(t)) = t
    for c in itertools.product(*map(range, grid)):
        assert adc.coordinate(adc.time_index(c, order, grid), order, grid) == c  # T^-1(T(x)) = x


def test_basic_orders_follow_the_paper():
    grid = (2, 2, 3)  # 2 frames, 2 rows, 3 columns
    first_frame = {o: adc.split(grid, o)[:6] for o in ORDERS}
    assert first_frame[Order.DOWN_RIGHT] == [(0, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1), (0, 0, 2), (0, 1, 2)]
    assert first_frame[Order.DOWN_LEFT] == [(0, 0, 2), (0, 1, 2), (0, 0, 1), (0, 1, 1), (0, 0, 0), (0, 1, 0)]
    assert first_frame[Order.RIGHT_DOWN] == [(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 0), (0, 1, 1), (0, 1, 2)]
    assert first_frame[Order.RIGHT_UP] == [(0, 1, 0), (0, 1, 1), (0, 1, 2), (0, 0, 0), (0, 0, 1), (0, 0, 2)]
    for o in ORDERS:  # frames always run forward
        assert all(k == 1 for k, _, _ in adc.split(grid, o)[6:])


def test_local_permutation_orders_tokens_like_patches():
    perm = adc.local_permutation((1, 2, 2), Order.DOWN_LEFT)
    assert perm.tolist() == [1, 3, 0, 2]  # raster ids of (0,1), (1,1), (0,0), (1,0)


def test_outpaint_plan_covers_the_ring_once_in_loop_circle_order():
    plan = adc.plan_outpaint((1, 2, 2), left=2, right=1, up=1, down=2)
    assert plan.grid == (1, 5, 5) and plan.offset == (1, 2)
    steps = [c for _, c in plan.steps()]
    known = {(0, i, j) for i in (1, 2) for j in (2, 3)}
    everything = set(itertools.product(range(1), range(5), range(5)))
    assert len(steps) == len(set(steps)) and set(steps) == everything - known
    directions = [s.order for s in plan.segments]
    assert directions[:4] == [Order.DOWN_LEFT, Order.RIGHT_DOWN, Order.DOWN_RIGHT, Order.RIGHT_UP]
    assert plan.precache_order is Order.DOWN_LEFT
    # every new patch touches (shares an edge or corner with) something already there
    have = set(known)
    for c in steps:
        assert any(n in have for n in adc.neighbours(c, (0, 1, 1), plan.grid)), c
        have.add(c)


@pytest.mark.parametrize("direction,order", list(adc.ORDER_FOR_DIRECTION.items()))
def test_single_direction_extension_uses_its_basic_order(direction, order):
    plan = adc.plan_outpaint((1, 2, 2), **{direction: 3})
    assert {s.order for s in plan.segments} == {order}
    assert plan.precache_order is order


def test_fill_plan_of_known_rectangle_is_an_outpaint_and_of_empty_canvas_one_order():
    known = torch.zeros(1, 4, 6, dtype=torch.bool)
    plan = adc.plan_fill(known)
    assert len(plan.segments) == 1 and plan.segments[0].order is Order.DOWN_RIGHT and len(plan) == 24
    assert adc.plan_fill(torch.zeros(1, 6, 2, dtype=torch.bool)).segments[0].order is Order.RIGHT_DOWN
    known[:, 1:3, 2:4] = True
    plan = adc.plan_fill(known)
    assert len(plan) == 20 and plan.segments[0].order is Order.DOWN_LEFT
    video = torch.zeros(3, 2, 2, dtype=torch.bool)
    video[0] = True  # image animation: first frame given
    assert [c[0] for _, c in adc.plan_fill(video).steps()] == [1] * 4 + [2] * 4


def test_bad_extension_counts_are_refused():
    with pytest.raises(ValueError, match="left must be a whole number"):
        adc.plan_outpaint((1, 2, 2), left=-1)
    with pytest.raises(ValueError, match="step"):
        adc.plan_outpaint((1, 2, 2), right=2, step=0)


def test_relative_embedding_table_covers_the_extent():
    emb = adc.RelativePositionEmbedding((3, 2, 2), n_layer=2, d_model=8, n_head=2)
    assert emb.table.shape == (2, 7 * 5 * 5, 8)
    indices = {emb.index((dk, di, dj)) for dk in range(-3, 4) for di in range(-2, 3) for dj in range(-2, 3)}
    assert indices == set(range(7 * 5 * 5))
    with pytest.raises(ValueError, match="outside the extent"):
        emb.index((0, 3, 0))
    assert adc.RelativePositionEmbedding((0, 1, 1), 2, 8, 2, mode="post").table.shape == (2, 9, 2)
