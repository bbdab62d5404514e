"""NUWA-XL as a stock ComfyUI MODEL (nodes/_xl_comfy_model.py), against the real ComfyUI
(skipped unless COMFYUI_DIR is set; COMFYUI_PYTHON is the interpreter with ComfyUI's requirements).

- numerics, in a subprocess of ComfyUI's interpreter: ComfyUI's model_sampling of the wrapper has
  nuwa_core.xl.diffusion's alphas_cumprod; one BaseModel.apply_model call gives the core MTD's eps
  (global, and local with the visual condition and per-frame prompts through extra_conds);
  ComfyUI's euler over the core's DDIM timesteps equals the core's DDIM (eta 0) sampler.
- a live server runs NUWAXLModelLoader -> NUWA-XL Model (for KSampler) -> stock KSampler ->
  NUWA-XL Decode LATENT -> SaveImage on the shipped default model, then a local level through
  In-between / KSampler / Join Segments.
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
RUN_TIMEOUT = 600

NUMERICS = r"""
import importlib.util, json, sys
import torch
comfy_dir, repo = sys.argv[1], sys.argv[2]
sys.path[:0] = [comfy_dir, repo]
import comfy.cli_args
comfy.cli_args.args.cpu = True  # as the test server runs (--cpu); every tensor here is on the CPU
import comfy.model_management, comfy.sample, comfy.samplers
from nuwa_core.xl.diffusion import ldm_alphas_cumprod, sample_ddim, timesteps_for
from nuwa_core.xl.mask_temporal_diffusion import MaskTemporalDiffusion, MTDConfig
spec = importlib.util.spec_from_file_location("nuwa_xl_comfy_model", repo + "/nodes/_xl_comfy_model.py")
adapter = importlib.util.module_from_spec(spec); spec.loader.exec_module(adapter)

torch.manual_seed(0)
mtd = MaskTemporalDiffusion(MTDConfig.tiny(context_dim=8)).eval()
with torch.no_grad():  # random weights everywhere, zero-initialised injections included
    for p in mtd.parameters():
        p.copy_(torch.randn_like(p) * 0.2)
scale = 0.7
patcher = adapter.as_comfy_model(mtd, scale)
base = patcher.model
out = {"model_type": type(base).__mro__[1].__name__, "patcher": type(patcher).__name__}

ms = base.model_sampling
ac = 1.0 / (1.0 + ms.sigmas.double() ** 2)
out["alphas_cumprod_max_err"] = (ac - ldm_alphas_cumprod()).abs().max().item()
out["latent_scale"] = base.latent_format.scale_factor

B, F, C, H, W = 2, 5, 4, 8, 8
t = 537
sigma = ms.sigma(torch.tensor([float(t)] * B))
tc = ms.timestep(sigma)
out["timestep_err"] = (tc - t).abs().max().item()
x_t = torch.randn(B, F, C, H, W)  # variance-preserving x_t, the core's convention
x_comfy = (x_t * (1 + sigma.view(-1, 1, 1, 1, 1) ** 2).sqrt()).movedim(1, 2)  # ComfyUI: x0 + sigma eps
ctx = torch.randn(B, 3, 8)

def eps_from(denoised):
    return ((x_comfy - denoised) / sigma.view(-1, 1, 1, 1, 1)).movedim(2, 1)

with torch.no_grad():
    core = mtd(x_t, tc, ctx)
    comfy_eps = eps_from(base.apply_model(x_comfy, sigma, c_crossattn=ctx))
    out["global_eps_max_err"] = (comfy_eps - core).abs().max().item()

    # local: first/last frames given (raw latents; the model scales them) and one prompt per frame
    raw = torch.randn(B, C, F, H, W)
    mask = torch.zeros(B, F); mask[:, 0] = mask[:, -1] = 1
    frame_ctx = torch.randn(B, F, 3, 8)
    conds = base.extra_conds(nuwa_xl_given={"samples": raw, "mask": mask}, nuwa_xl_frame_context=frame_ctx,
                             cross_attn=ctx, device="cpu", noise=x_comfy)
    kw = {k: v.process_cond(batch_size=B, area=None).cond for k, v in conds.items()}
    c_crossattn = kw.pop("c_crossattn")
    comfy_eps = eps_from(base.apply_model(x_comfy, sigma, c_crossattn=c_crossattn, **kw))
    given = (raw * scale * mask[:, None, :, None, None]).movedim(1, 2)
    core = mtd(x_t, tc, frame_ctx, given, mask)
    out["local_eps_max_err"] = (comfy_eps - core).abs().max().item()
    out["local_differs_from_global"] = (core - mtd(x_t, tc, frame_ctx)).abs().max().item()

    # ComfyUI's euler on the core's DDIM timesteps == the core's deterministic DDIM
    steps = 6
    ts = timesteps_for(steps)
    noise = torch.randn(1, F, C, H, W)
    p = torch.randn(1, 3, 8)
    ref = sample_ddim(lambda x, tt: mtd(x, tt, p), noise, steps)
    sigmas = torch.cat([ms.sigma(torch.tensor([float(v) for v in ts])), torch.zeros(1)])
    positive = [[p, {}]]
    got = comfy.sample.sample_custom(patcher, noise.movedim(1, 2), 1.0, comfy.samplers.ksampler("euler"), sigmas,
                                     positive, positive, torch.zeros(1, C, F, H, W), disable_pbar=True, seed=0)
    out["ddim_vs_euler_max_err"] = (got.movedim(1, 2) * scale - ref).abs().max().item()
    out["ddim_scale"] = ref.abs().max().item()
print("RESULT " + json.dumps(out))
"""


def test_wrapper_matches_the_core_numerically(comfyui_dir):
    python = os.environ.get("COMFYUI_PYTHON") or sys.executable
    run = subprocess.run([python, "-c", NUMERICS, str(comfyui_dir), str(REPO)], capture_output=True, text=True,
                         timeout=600, cwd=str(comfyui_dir), env=dict(os.environ, OMP_NUM_THREADS="1"))
    line = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
    assert run.returncode == 0 and line, f"{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
    out = json.loads(line[-1][len("RESULT "):])
    print(out)
    assert out["model_type"] == "BaseModel" and out["patcher"] == "ModelPatcher"
    assert out["latent_scale"] == pytest.approx(0.7)
    assert out["alphas_cumprod_max_err"] <= 1e-6, out
    assert out["timestep_err"] <= 1e-2, out
    assert out["global_eps_max_err"] <= 1e-5, out
    assert out["local_eps_max_err"] <= 1e-5, out
    assert out["local_differs_from_global"] > 1e-3, out  # the visual condition really reaches the model
    assert out["ddim_vs_euler_max_err"] <= 1e-4 * max(1.0, out["ddim_scale"]), out


def _has_default_model() -> bool:
    return (REPO / "models" / "nuwa_xl" / "mtd_default.safetensors").is_file()


def _ksampler(model, positive, negative, latent, seed, steps=4, sampler="euler", scheduler="normal"):
    return {"class_type": "KSampler", "inputs": {
        "model": model, "seed": seed, "steps": steps, "cfg": 1.0, "sampler_name": sampler, "scheduler": scheduler,
        "positive": positive, "negative": negative, "latent_image": latent, "denoise": 1.0}}


def keyframes_prompt(seed=3):
    return {
        "1": {"class_type": "NUWAXLModelLoader", "inputs": {"t_klvae_name": "t_klvae_default.safetensors",
                                                           "mtd_name": "mtd_default.safetensors",
                                                           "local_mtd_name": "(same as global)"}},
        "2": {"class_type": "NUWAXLModelAsComfy", "inputs": {"xl_model": ["1", 0], "level": "global"}},
        "3": {"class_type": "NUWAXLEmptyLatentVideo", "inputs": {"xl_model": ["1", 0], "frames": 5, "depth": 2,
                                                                 "batch_size": 1}},
        "4": {"class_type": "NUWAXLPromptsForKSampler", "inputs": {"xl_model": ["1", 0], "frames": 5}},
        "5": _ksampler(["2", 0], ["4", 0], ["4", 0], ["3", 0], seed),
        "6": {"class_type": "NUWAXLDecodeLatent", "inputs": {"xl_model": ["1", 0], "samples": ["5", 0]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "nuwa_xl_ksampler"}},
    }


def _saved(server, outputs, node):
    from PIL import Image
    images = outputs[node]["images"]
    sizes = []
    for image in images:
        path = server.base / "output" / image["subfolder"] / image["filename"]
        assert path.is_file() and path.stat().st_size > 0, path
        with Image.open(path) as img:
            sizes.append(img.size)
    return sizes


def test_stock_ksampler_makes_keyframes(comfyui_server):
    if not _has_default_model():
        pytest.skip("models/nuwa_xl/mtd_default.safetensors is absent")
    types, outputs = comfyui_server.run_prompt(keyframes_prompt(), "keyframes", RUN_TIMEOUT)
    assert "progress" in types  # KSampler's own progress
    sizes = _saved(comfyui_server, outputs, "7")
    assert sizes == [(64, 48)] * 5, sizes


def test_stock_ksampler_fills_between_keyframes(comfyui_server):
    """Global level, then one local level through In-between -> KSampler (local MODEL, another sampler and
    scheduler) -> Join Segments: 5 keyframes -> 17 frames."""
    if not _has_default_model():
        pytest.skip("models/nuwa_xl/mtd_default.safetensors is absent")
    prompt = keyframes_prompt(seed=4)
    prompt.update({
        "8": {"class_type": "NUWAXLModelAsComfy", "inputs": {"xl_model": ["1", 0], "level": "local"}},
        "9": {"class_type": "NUWAXLInbetweenForKSampler", "inputs": {"positive": ["4", 0], "negative": ["4", 0],
                                                                     "frames": ["5", 0], "L": 5}},
        "10": _ksampler(["8", 0], ["9", 0], ["9", 1], ["9", 2], 5, sampler="dpmpp_2m", scheduler="karras"),
        "11": {"class_type": "NUWAXLJoinSegments", "inputs": {"segments": ["10", 0], "frames": ["5", 0]}},
        "12": {"class_type": "NUWAXLDecodeLatent", "inputs": {"xl_model": ["1", 0], "samples": ["11", 0]}},
        "13": {"class_type": "SaveImage", "inputs": {"images": ["12", 0], "filename_prefix": "nuwa_xl_ksampler_local"}},
    })
    _, outputs = comfyui_server.run_prompt(prompt, "keyframes + local level", RUN_TIMEOUT)
    assert _saved(comfyui_server, outputs, "13") == [(64, 48)] * 17
    assert len(_saved(comfyui_server, outputs, "7")) == 5
