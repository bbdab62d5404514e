"""NUWA models in ComfyUI's own memory manager (skipped unless COMFYUI_DIR is set; COMFYUI_PYTHON is the
interpreter with ComfyUI's requirements).

A script in ComfyUI's interpreter drives ComfyUI's real model_management.load_models_gpu and
ModelPatcher.load on the pack's ModelPatcher (nodes/_comfy.py). No GPU is needed: the `meta` device
stands for the GPU (a tensor on it mixed with a CPU tensor raises the same "not on the expected
device" error as CUDA with CPU), and ComfyUI's get_free_memory is answered for it with a chosen
budget, as a GPU of that size would answer.

- ComfyUI's own ModelPatcher.load with a budget below the model size leaves a NUWA model split
  between devices while reporting a full load (model_lowvram False): running it then crashes with a
  device mismatch. This is the finding of issue 12 (item 6), shown on ComfyUI's code.
- load_for_run (what every NUWA-Infinity node calls) refuses such a model cleanly, naming the MiB
  needed and free: after a partial load left by an earlier run, with a GPU too small for the model
  plus its working memory (load_models_gpu decides a partial load itself), and under --novram.
  (It also offloads the partly loaded weights, which `meta` cannot show: its tensors hold no data.)
- With room enough, load_models_gpu loads it whole on the device; on the CPU (ComfyUI --cpu) a
  generation and its decode run, and the pool's caches of the canvas the Patch Renderer returns are
  on ComfyUI's intermediate device.
- NUWA-XL: one ModelPatcher per network (T-KLVAE, MTD; the same for both levels when one MTD serves
  both), NUWA-XL Model (for KSampler) returns clones of it; the core nodes load through
  load_models_gpu (so Unload Models reaches them) and refuse a partial load; the KSampler route,
  loaded partially by ComfyUI itself, stops with a clear error instead of a device mismatch.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.comfyui

REPO = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import importlib.util, json, sys
import torch
comfy_dir, repo = sys.argv[1], sys.argv[2]
sys.path[:0] = [comfy_dir, repo, repo + "/tests"]
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.model_management as mm
spec = importlib.util.spec_from_file_location("nuwa_comfy", repo + "/nodes/_comfy.py")
nc = importlib.util.module_from_spec(spec); spec.loader.exec_module(nc)
from _tiny import tiny_model
from nuwa_core.infinity.generation import NuwaInfinity
from nuwa_core.infinity.renderer import Renderer, RendererConfig
from nuwa_core.infinity.vqgan import VQModel, get_config
from nuwa_core.infinity.patch_samplers import SamplerSettings

GPU = torch.device("meta")  # the simulated GPU
FREE = {"bytes": 0}
real_free = mm.get_free_memory

def fake_free(dev=None, torch_free_too=False):
    if dev is not None and torch.device(dev).type == "meta":
        return (FREE["bytes"], 0) if torch_free_too else FREE["bytes"]
    return real_free(dev, torch_free_too)

mm.get_free_memory = fake_free
out = {}

def on_gpu(model):
    patcher = nc.wrap_for_memory_management(model, "test model")
    patcher.load_device = GPU
    return patcher

def where(model):
    devs = {}
    for _, t in list(model.named_parameters()) + list(model.named_buffers()):
        devs[t.device.type] = devs.get(t.device.type, 0) + 1
    return devs

def refusal(fn):
    try:
        fn()
    except nc.ModelDoesNotFitError as err:
        return str(err)
    return None

# 1. ComfyUI's own ModelPatcher.load with a budget below the model size (the old state of things)
model = tiny_model()
patcher = on_gpu(model)
size = patcher.model_size()
patcher.load(GPU, lowvram_model_memory=size // 3)
image = torch.rand(1, 32, 32, 3)
try:
    model.canvas_from_image(image)
    crash = None
except RuntimeError as err:
    crash = str(err)
out["partial"] = {"size": size, "loaded": patcher.loaded_size(), "model_lowvram": bool(patcher.model.model_lowvram),
                  "devices": where(model), "crash": crash}
# ... and load_for_run after it: ComfyUI counts the model as loaded and adds nothing; NUWA refuses
FREE["bytes"] = 2 ** 30
out["partial"]["refusal"] = refusal(lambda: nc.load_for_run(patcher, 12345678))

# 2. a GPU too small for the weights plus the working memory: load_models_gpu decides a partial load
# (as on a GPU: --cpu made vram_state DISABLED, which never loads partially)
mm.vram_state = mm.VRAMState.NORMAL_VRAM
torch.manual_seed(0)
big = NuwaInfinity(VQModel(get_config("tiny")), Renderer(RendererConfig(
    vocab_size=64, patch_size=(1, 4, 4), n_layer=16, n_head=4, d_model=512, extent=(0, 1, 1)))).eval()
patcher = on_gpu(big)
size = patcher.model_size()
FREE["bytes"] = int(size * 0.8)
msg = refusal(lambda: nc.load_for_run(patcher, 64 * 2 ** 20))
out["small_gpu"] = {"size": size, "free": FREE["bytes"], "refusal": msg}

# 3. a model of that size with room enough: loaded whole, nothing refused (a fresh one: the weights
# the refused load put on `meta` have no data to bring back)
torch.manual_seed(0)
big = NuwaInfinity(VQModel(get_config("tiny")), Renderer(RendererConfig(
    vocab_size=64, patch_size=(1, 4, 4), n_layer=16, n_head=4, d_model=512, extent=(0, 1, 1)))).eval()
patcher = on_gpu(big)
FREE["bytes"] = 8 * size + 2 ** 31
out["big_gpu"] = {"refusal": refusal(lambda: nc.load_for_run(patcher, 64 * 2 ** 20)), "devices": where(big),
                  "loaded": patcher.loaded_size(), "size": size}
del big, patcher

# 4. --novram: ComfyUI keeps weights off the GPU (a 0.1-byte budget)
model = tiny_model()
patcher = on_gpu(model)
state = mm.vram_state
mm.vram_state = mm.VRAMState.NO_VRAM
try:
    out["novram"] = {"refusal": refusal(lambda: nc.load_for_run(patcher, 1000))}
finally:
    mm.vram_state = state

# 5. ComfyUI --cpu: the real run, on the CPU
model = tiny_model()
patcher = nc.wrap_for_memory_management(model, "cpu model")
out["cpu"] = {"load_device": str(patcher.load_device), "dtype": str(nc.inference_dtype(10 ** 6))}
canvas = model.canvas_from_image(image)
nc.load_for_run(patcher, nc.vqgan_memory(model, 1))
plan = model.plan_extension(canvas, right=1)
nc.load_for_run(patcher, nc.render_memory(model, canvas, [plan]))
grown = model.generate(canvas, plan, SamplerSettings(top_k=8), generator=torch.Generator().manual_seed(0))
grown = nc.canvas_to(grown, mm.intermediate_device())
out["cpu"].update({"image": tuple(model.decode(grown).shape), "devices": where(model),
                   "pool": sorted({c.device.type for c in grown.pool.caches.values()}),
                   "render_memory": nc.render_memory(model, canvas, [plan]), "vqgan_memory": nc.vqgan_memory(model)})
print("RESULT " + json.dumps(out))
"""


XL_SCRIPT = r"""
import importlib.util, json, sys
import torch
comfy_dir, repo = sys.argv[1], sys.argv[2]
sys.path[:0] = [comfy_dir, repo, repo + "/tests"]
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.model_management as mm
spec = importlib.util.spec_from_file_location("nuwa_pack_under_test", repo + "/__init__.py",
                                              submodule_search_locations=[repo])
pack = importlib.util.module_from_spec(spec); sys.modules[spec.name] = pack; spec.loader.exec_module(pack)
xl = sys.modules["nuwa_pack_under_test.nodes.xl_nodes"]
nc = sys.modules["nuwa_pack_under_test.nodes._comfy"]
nodes = sys.modules["nuwa_pack_under_test.nodes"].NODE_CLASS_MAPPINGS  # the classic classes (a ComfyUI with comfy_api is given comfy_entrypoint)
from nuwa_core.xl.mask_temporal_diffusion import MaskTemporalDiffusion, MTDConfig
from nuwa_core.xl.model import XLModel
from nuwa_core.xl.t_klvae import TKLVAE, TKLVAEConfig

def tiny_xl(separate_local=False):
    torch.manual_seed(0)
    mtd = MaskTemporalDiffusion(MTDConfig.tiny(context_dim=8)).eval()
    local = MaskTemporalDiffusion(MTDConfig.tiny(context_dim=8)).eval() if separate_local else mtd
    model = XLModel(TKLVAE(TKLVAEConfig.tiny()).eval(), mtd, local, {"prompts": "none", "width": 16, "height": 16})
    xl.attach_patchers(model)
    return model

def loaded():
    return [lm.model for lm in mm.current_loaded_models]

out = {}
model = tiny_xl()
p = {"vae": model.comfy_patchers[id(model.vae)], "global": model.comfy_patchers[id(model.global_mtd)],
     "local": model.comfy_patchers[id(model.local_models[0].mtd)]}
wrap = nodes["NUWAXLModelAsComfy"]().wrap
g, l = wrap(model, "global")[0], wrap(model, "local")[0]
out["one_patcher"] = {"same_for_both_levels": p["global"] is p["local"], "clones": g.is_clone(l) and g.is_clone(p["global"]),
                      "distinct_objects": g is not l and g is not p["global"], "vae_separate": p["vae"] is not p["global"]}
keyframes = nodes["NUWAXLGlobalDiffusion"]().generate(model, 3, 2, 0, 2)[0]
out["global_loads"] = {"global": any(m is p["global"] for m in loaded()), "vae": any(m is p["vae"] for m in loaded()),
                       "frames": list(keyframes["latents"].shape)}
mm.unload_all_models()
out["unloaded"] = len(mm.current_loaded_models)
images = nodes["NUWAXLDecode"]().decode(model, keyframes)[0]
out["decode_loads_vae_only"] = [m is p["vae"] for m in loaded()] == [True]
out["decode"] = list(images.shape)
two = tiny_xl(separate_local=True)
wrap2 = wrap(two, "global")[0], wrap(two, "local")[0]
out["separate_local"] = {"two_patchers": two.comfy_patchers[id(two.global_mtd)] is not
                         two.comfy_patchers[id(two.local_models[0].mtd)], "not_clones": not wrap2[0].is_clone(wrap2[1])}
# a local model per depth added to a loaded bundle: the bundle's patchers are kept, the new MTD gets its own
from nuwa_core.xl.model import LocalModel
extra = LocalModel(MaskTemporalDiffusion(MTDConfig.tiny(context_dim=8)).eval(), (1,), "extra")
more = model.with_local(extra)
xl.attach_patchers(more, model.comfy_patchers)
mp = more.comfy_patchers
out["add_local"] = {"kept": mp[id(model.global_mtd)] is p["global"] and mp[id(model.vae)] is p["vae"],
                    "new": mp[id(extra.mtd)] is not p["global"],
                    "picked": wrap(more, "local", 1)[0].is_clone(mp[id(extra.mtd)]),
                    "other_spacing": wrap(more, "local", 4)[0].is_clone(p["global"])}

# a partial load under --novram (meta stands for the GPU): the core route refuses cleanly
real_free = mm.get_free_memory
mm.get_free_memory = lambda dev=None, torch_free_too=False: ((2 ** 30, 0) if torch_free_too else 2 ** 30) \
    if dev is not None and torch.device(dev).type == "meta" else real_free(dev, torch_free_too)
model = tiny_xl()
for patcher in model.comfy_patchers.values():
    patcher.load_device = torch.device("meta")
mm.vram_state = mm.VRAMState.NO_VRAM
try:
    nodes["NUWAXLGlobalDiffusion"]().generate(model, 3, 2, 0, 2)
    out["novram"] = None
except nc.ModelDoesNotFitError as err:
    out["novram"] = str(err)
mm.vram_state = mm.VRAMState.DISABLED

# the KSampler route: ComfyUI's own partial load of the MODEL, then a model call: a clear error
model = tiny_xl()
patcher = wrap(model, "global")[0]
patcher.load(torch.device("meta"), lowvram_model_memory=patcher.model_size() // 3)
x = torch.zeros(1, 4, 3, 8, 8, device="meta")
try:
    patcher.model.diffusion_model(x, torch.zeros(1, device="meta"), torch.zeros(1, 1, 8, device="meta"))
    out["ksampler_partial"] = None
except MemoryError as err:
    out["ksampler_partial"] = str(err)
print("RESULT " + json.dumps(out))
"""


def _run(comfyui_dir, script=SCRIPT):
    python = os.environ.get("COMFYUI_PYTHON") or sys.executable
    run = subprocess.run([python, "-c", script, str(comfyui_dir), str(REPO)], capture_output=True, text=True, check=False,
                         timeout=600, cwd=str(comfyui_dir), env=dict(os.environ, OMP_NUM_THREADS="1"))
    line = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
    assert run.returncode == 0 and line, f"{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
    return json.loads(line[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def result(comfyui_dir):
    out = _run(comfyui_dir)
    print(json.dumps(out, indent=1))
    return out


def test_comfyui_partial_load_of_a_plain_module_reports_full_and_crashes(result):
    """The finding itself, on ComfyUI's code: part of the weights on the device, a full load reported."""
    p = result["partial"]
    assert 0 < p["loaded"] < p["size"] and p["model_lowvram"] is False, p
    assert p["devices"].get("meta") and p["devices"].get("cpu"), p
    assert p["crash"] and "device" in p["crash"], p


def test_load_for_run_refuses_a_partial_load_naming_needed_and_free(result):
    p = result["partial"]
    assert p["refusal"], "a model split between devices was accepted"
    assert "MiB" in p["refusal"] and "1024 MiB free" in p["refusal"] and "12 MiB of working memory" in p["refusal"]

    s = result["small_gpu"]
    assert s["refusal"] and f"{s['free'] / 2 ** 20:.0f} MiB free" in s["refusal"], s
    assert f"{s['size'] / 2 ** 20:.0f} MiB of weights" in s["refusal"] and "64 MiB of working memory" in s["refusal"]


def test_load_for_run_loads_whole_when_it_fits(result):
    b = result["big_gpu"]
    assert b["refusal"] is None and list(b["devices"]) == ["meta"] and b["loaded"] == b["size"], b


def test_novram_is_refused_with_a_hint(result):
    n = result["novram"]
    assert n["refusal"] and "--novram" in n["refusal"], n


def test_cpu_run_and_caches_on_the_intermediate_device(result):
    c = result["cpu"]
    assert c["load_device"] == "cpu" and c["dtype"] == "torch.float32"
    assert c["image"] == [1, 32, 48, 3] and list(c["devices"]) == ["cpu"] and c["pool"] == ["cpu"], c
    assert c["render_memory"] > c["vqgan_memory"] > 0


@pytest.fixture(scope="module")
def xl_result(comfyui_dir):
    out = _run(comfyui_dir, XL_SCRIPT)
    print(json.dumps(out, indent=1))
    return out


def test_xl_one_patcher_per_model_cloned_per_level(xl_result):
    one = xl_result["one_patcher"]
    assert one == {"same_for_both_levels": True, "clones": True, "distinct_objects": True, "vae_separate": True}, one
    assert xl_result["separate_local"] == {"two_patchers": True, "not_clones": True}
    assert xl_result["add_local"] == {"kept": True, "new": True, "picked": True, "other_spacing": True}


def test_xl_nodes_load_through_comfyui(xl_result):
    assert xl_result["global_loads"] == {"global": True, "vae": True, "frames": [3, 4, 8, 8]}, xl_result
    assert xl_result["unloaded"] == 0  # Unload Models reaches them
    assert xl_result["decode_loads_vae_only"] and xl_result["decode"] == [3, 16, 16, 3]


def test_xl_partial_loads_are_refused(xl_result):
    assert xl_result["novram"] and "--novram" in xl_result["novram"] and "MiB" in xl_result["novram"]
    assert xl_result["ksampler_partial"] and "only part" in xl_result["ksampler_partial"]
