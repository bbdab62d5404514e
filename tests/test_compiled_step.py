"""bench/wavefront.py part 4: the AR step through torch.compile (issue 16 item 3's optional part).

Measured, not shipped: on this CPU a compiled step is no faster (README, Speed), so the package
has no compile option and decode_ar always runs renderer.TokenStep eagerly. These tests keep the
measurement honest: the harness swaps the compiled step in for its own runs only, compares it
with today's step token for token, and reports (does not crash) where compiling fails.
"""
import importlib.util
import os
from pathlib import Path

import pytest
import torch
from _tiny import tiny_model

from nuwa_core.infinity import patch_samplers
from nuwa_core.infinity.renderer import TokenStep

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("wavefront_bench", ROOT / "bench" / "wavefront.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_harness_swaps_the_step_for_its_own_runs_only(bench):
    r = tiny_model().renderer
    calls = []

    class Counting(TokenStep):
        def __call__(self, x, t, layers=None):
            calls.append(t)
            return super().__call__(x, t, layers)

    tokens, inputs = bench.patch_decode(r, 2, Counting)()
    m = r.config.tokens_per_patch
    assert calls == list(range(m + 1))  # every slot, the last one's partial run too
    assert patch_samplers.TokenStep is TokenStep  # decode_ar's own step is back
    ref_tokens, ref_inputs = bench.patch_decode(r, 2, TokenStep)()
    assert torch.equal(tokens, ref_tokens) and torch.equal(inputs, ref_inputs)
    assert len(calls) == m + 1  # the eager run did not go through the swapped step


def test_compile_failure_is_reported_not_raised(bench, monkeypatch, tmp_path):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    model = tiny_model()
    monkeypatch.setattr(torch, "compile", no_compiler)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    rows = bench.compiled_step(model, (1,), repeats=1)
    assert rows == {"error": "RuntimeError: no C++ compiler"}
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path)  # the cold-compile folder was temporary


def test_uncompiled_step_gives_todays_tokens_exactly(bench, monkeypatch):
    """torch.compile as the identity: the harness itself changes nothing (a compiled run's
    difference is the compiler's)."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    rows = bench.compiled_step(tiny_model(), (1, 3), repeats=1)
    for batch in (1, 3):
        assert rows[batch]["same_tokens"] and rows[batch]["max_diff"] == 0.0
        assert rows[batch]["graphs"] == 0


@pytest.mark.skipif(not os.environ.get("NUWA_TEST_COMPILE"),
                    reason="compiling with inductor takes 20-70 s on 2 shared cores; set NUWA_TEST_COMPILE=1 "
                           "(bench/wavefront.py part 4 checks the shipped model's tokens every run)")
def test_compiled_step_matches_eager_within_float_tolerance(bench):
    """Inductor fuses and reorders float sums (layer norm, softmax): not bit-identical, within 1e-5."""
    pytest.importorskip("torch._inductor")
    rows = bench.compiled_step(tiny_model(), (1,), repeats=1)
    if "error" in rows:
        pytest.skip(f"torch.compile unavailable here: {rows['error']}")
    assert rows[1]["same_tokens"] and rows[1]["max_diff"] < 1e-5
    assert rows[1]["graphs"] <= 3  # t static then symbolic, and the last slot's partial run


@pytest.mark.parametrize("rows", [1, 3])
def test_floor_times_the_operations_of_one_token(bench, rows):
    """Part 5's floor sums the step's operations timed alone: they must be the operations one token
    really dispatches in decode_ar (from one slot's call to the next), no more and no fewer, at one
    row and at a wave's several."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    log = []

    class Recording(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view:  # the operation and its tensors' shapes (rows among them)
                log.append((str(func), tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))))
            return func(*args, **(kwargs or {}))

    class Marking(TokenStep):
        def __call__(self, x, t, layers=None):
            log.append(f"slot {t}")
            return super().__call__(x, t, layers)

    model = tiny_model()
    with Recording():
        bench.patch_decode(model.renderer, rows, Marking)()
    t = model.renderer.config.tokens_per_patch // 2  # the slot step_operations times
    one_token = Counter(log[log.index(f"slot {t}") + 1:log.index(f"slot {t + 1}")])
    log.clear()
    with torch.inference_mode(), Recording():  # as step_floor runs them
        ops = bench.step_operations(model, rows)
        log.clear()
        for _, op in ops:
            op()
    assert Counter(log) == one_token
    assert {kind for kind, _ in ops} == {"linear", "attention", "other"}
