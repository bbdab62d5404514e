"""The NUWA-Infinity nodes and ComfyUI's memory manager, with ComfyUI absent (a stand-in patcher):
every node that runs the model asks for it to be loaded with an estimate of its working memory, the
Patch Renderer's canvas leaves with its pool's caches on ComfyUI's intermediate device, and a canvas
whose caches are on another device or dtype than the model is taken up. The real memory manager is
exercised in tests/test_comfyui_memory.py."""
from __future__ import annotations

import sys

import pytest
import torch
from _pack import MODULE_NAME, import_pack, node
from _tiny import tiny_model

from nuwa_core.infinity.patch_samplers import SamplerSettings
from nuwa_core.infinity.renderer import RendererConfig
from nuwa_core.infinity.vqgan import VQGANConfig, window_batch
from nuwa_core.memory import renderer_working_bytes, vqgan_window_bytes


@pytest.fixture
def comfy_helpers(pack):
    import_pack()
    return sys.modules[f"{MODULE_NAME}.nodes._comfy"]


@pytest.fixture
def loads(comfy_helpers, monkeypatch):
    """(patcher, memory_required) of every load_for_run call."""
    calls = []
    monkeypatch.setattr(comfy_helpers, "load_for_run", lambda patcher, memory_required=0: calls.append(
        (patcher, memory_required)))
    return calls


def _model_with_patcher():
    model = tiny_model()
    model.comfy_patcher = object()  # what NUWAModelLoader attaches under ComfyUI
    return model


def test_every_infinity_node_loads_the_model_with_its_working_memory(pack, loads, comfy_helpers):
    model = _model_with_patcher()
    (canvas,) = node(pack, "NUWAVQGANEncode")(model, torch.rand(2, 32, 32, 3), "refuse")
    node(pack, "NUWAVQGANDecode")(model, canvas)
    assert [p for p, _ in loads] == [model.comfy_patcher] * 2, "Encode / Decode did not ask ComfyUI to load the model"
    encode, decode = (m for _, m in loads)
    assert encode > comfy_helpers.vqgan_memory(model, 1) > 0, "the encode estimate should grow with the image batch"
    # the decode batches windows of a frame (vqgan.window_batch): a window's memory times the batch
    window = comfy_helpers.vqgan_memory(model, 1)
    assert decode == window_batch(model.vqgan.config, model.vqgan_tile) * window > window
    plan = model.plan_extension(canvas, right=2)
    node(pack, "NUWAPatchRenderer")(model, canvas, plan, 1, "auto", 4, 1.0, 16, 1.0)
    patcher, render = loads[-1]
    assert patcher is model.comfy_patcher and render > decode


def test_render_returns_the_pool_on_the_intermediate_device(pack, comfy_helpers, monkeypatch):
    """Caches leave the node on ComfyUI's intermediate device (the `meta` device stands in for it: the
    model runs on the CPU, so a cache there was moved)."""
    model = tiny_model()
    (canvas,) = node(pack, "NUWAVQGANEncode")(model, torch.rand(1, 32, 32, 3), "refuse")
    plan = model.plan_extension(canvas, right=1)
    monkeypatch.setattr(comfy_helpers, "intermediate_device", lambda: torch.device("meta"))
    image, grown = node(pack, "NUWAPatchRenderer")(model, canvas, plan, 1, "auto", 4, 1.0, 16, 1.0)
    assert grown.pool.caches and {c.device.type for c in grown.pool.caches.values()} == {"meta"}
    assert image.device.type == "meta"


def test_a_canvas_with_caches_of_another_dtype_is_taken_up():
    """A canvas from a bf16 model (or a file, or a node output moved off the GPU) extended by an fp32
    model: its pooled caches are moved to the model's device and dtype before they are selected."""
    model = tiny_model()
    state = model.blank_canvas(1, 2)
    state = model.generate(state, model.plan_fill(state), SamplerSettings(top_k=8),
                           generator=torch.Generator().manual_seed(0))
    reference = model.generate(state, model.plan_extension(state, right=1), SamplerSettings(top_k=8),
                               generator=torch.Generator().manual_seed(1))
    state.pool.caches = {c: cache.to(torch.bfloat16) for c, cache in state.pool.caches.items()}
    grown = model.generate(state, model.plan_extension(state, right=1), SamplerSettings(top_k=8),
                           generator=torch.Generator().manual_seed(1))
    assert grown.known.all() and grown.tokens.shape == reference.tokens.shape
    assert {c.dtype for c in grown.pool.caches.values()} == {torch.float32}


def test_working_memory_estimates_scale_with_what_they_hold():
    cfg = RendererConfig()  # the paper's renderer
    one = renderer_working_bytes(cfg, (1, 4, 16), 1)
    assert renderer_working_bytes(cfg, (1, 4, 32), 1) > one  # a longer canvas keeps a longer band of caches
    assert renderer_working_bytes(cfg, (1, 4, 16), 2) > 1.9 * one
    assert renderer_working_bytes(cfg, (1, 4, 16), 1, dtype=torch.bfloat16) < 0.6 * one
    assert renderer_working_bytes(cfg, (1, 4, 16), 1, wave=8) > 3 * one  # 8 patches' contexts at once
    cache = cfg.n_layer * cfg.tokens_per_patch * cfg.d_model * 4  # one pooled patch, fp32
    assert 25 * cache < one < 400 * cache  # at least the 25 caches a patch selects, not the whole canvas
    vq = VQGANConfig()
    assert vqgan_window_bytes(vq, 16, 2) > vqgan_window_bytes(vq, 16, 1) > vqgan_window_bytes(vq, 8, 1) > 0
    assert vqgan_window_bytes(vq, 16, 1, torch.float16) < vqgan_window_bytes(vq, 16, 1)
