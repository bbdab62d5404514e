"""fp16 / bf16 against fp32 on the shipped models (CPU: torch runs both there, slowly; the nodes pick
them only where ComfyUI says the device supports them).

NUWA-Infinity (the shipped panorama model, on two patches of its held-out part): the VQGAN decodes
the same tokens to nearly the same pixels; the renderer's teacher-forced next-token logits give the
same top-1 token and, under the same CPU gumbel noise, the same sampled token almost everywhere; in
fp16 a greedy extension gives the same tokens. AR generations diverge after the first flipped token
(each token is conditioned on the ones before; bf16 flips a near tie where fp16 does not), so
per-token agreement is measured teacher-forced. Measured (CPU, torch 2.13): bf16 VQGAN encode
token agreement 0.789, decode 58.7 dB, top-1 1.000, same-noise sampled 0.969, max prob error 0.032,
greedy 0.17; fp16 0.969, 77.7 dB, 1.000, 1.000, 0.0011, greedy 1.000. Hence fp16 first where the device has it (nodes/_comfy.py).
NUWA-XL (the shipped MTD and T-KLVAE): keyframes sampled with the same seed stay close to fp32.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from nuwa_core.infinity.arbitrary_direction_controller import Order
from nuwa_core.infinity.generation import NuwaInfinity
from nuwa_core.infinity.patch_samplers import SamplerSettings, filter_logits, gumbel_noise
from nuwa_core.infinity.renderer import Context
from nuwa_core.xl.model import XLModel

REPO = Path(__file__).resolve().parent.parent
INFINITY = REPO / "models" / "nuwa" / "nuwa_infinity_default.safetensors"
IMAGE = REPO / "models" / "nuwa" / "nuwa_infinity_default.png"
XL_VAE = REPO / "models" / "nuwa_xl" / "t_klvae_default.safetensors"
XL_MTD = REPO / "models" / "nuwa_xl" / "mtd_default.safetensors"
LOW = [torch.bfloat16, torch.float16]


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float = 1.0) -> float:
    mse = ((a.float() - b.float()) ** 2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(peak ** 2 / mse)


@pytest.fixture(scope="module")
def infinity32():
    if not (INFINITY.is_file() and IMAGE.is_file()):
        pytest.skip("the shipped NUWA-Infinity model is absent")
    return NuwaInfinity.load(INFINITY)


@pytest.fixture(scope="module")
def canvas(infinity32):
    """Two patches of the image shipped beside the model (the part it was not trained on)."""
    import numpy as np
    from PIL import Image
    ph, pw = infinity32.patch_pixels
    with Image.open(IMAGE) as img:
        pixels = torch.from_numpy(np.array(img.convert("RGB"))).float()
    left = pixels.shape[1] - 2 * pw
    return infinity32.canvas_from_image(pixels[None, :ph, left:] / 255)


def _teacher_forced_logits(model, canvas) -> torch.Tensor:
    """Logits of the right patch's tokens given its own prefix and the left patch as context."""
    r, order = model.renderer, Order.DOWN_RIGHT
    text_kv = r.text_kv(None)
    left, right = (canvas.patch_tokens((0, 0, j)).to(model.device) for j in (0, 1))
    cache = r.encode(left, order, Context(None, None, 0), text_kv)
    context = Context.from_pool([((0, 0, 0), cache)], (0, 0, 1), r.rel, model.device)
    logits, _ = r.teacher_forced(right, order, context, text_kv)
    return logits.float()


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_infinity_low_precision_matches_fp32(infinity32, canvas, dtype):
    model = NuwaInfinity.load(INFINITY, dtype=dtype)
    assert next(model.parameters()).dtype == dtype

    encoded = (model.canvas_from_image(canvas.given).tokens == canvas.tokens).float().mean().item()
    bare = canvas.clone()
    bare.given = None  # the VQGAN's own pixels, not the given image pasted back
    decoded = psnr(model.decode(bare), infinity32.decode(bare))

    with torch.no_grad():
        ref, low = _teacher_forced_logits(infinity32, canvas), _teacher_forced_logits(model, canvas)
    top1 = (ref.argmax(-1) == low.argmax(-1)).float().mean().item()
    settings = SamplerSettings(top_k=0, epsilon=0.01)
    noise = gumbel_noise(ref.shape, torch.Generator().manual_seed(1), "cpu")  # the same CPU noise for both
    sampled = ((filter_logits(ref, settings) + noise).argmax(-1) == (filter_logits(low, settings) + noise).argmax(-1))
    prob_err = (ref.softmax(-1) - low.softmax(-1)).abs().max().item()

    plan = infinity32.plan_extension(canvas, right=1)
    greedy = SamplerSettings(top_k=1)
    a = infinity32.generate(canvas, plan, greedy, generator=torch.Generator().manual_seed(0))
    b = model.generate(canvas, model.plan_extension(canvas, right=1), greedy, generator=torch.Generator().manual_seed(0))
    new = a.tokens[..., canvas.tokens.shape[-1]:]
    greedy_agree = (b.tokens[..., canvas.tokens.shape[-1]:] == new).float().mean().item()
    print(f"{dtype}: VQGAN encode token agreement {encoded:.3f}, decode PSNR vs fp32 {decoded:.1f} dB; teacher-forced top-1 agreement {top1:.3f}, "
          f"same-noise sampled agreement {sampled.float().mean().item():.3f}, max prob error {prob_err:.4f}; "
          f"greedy extension token agreement {greedy_agree:.3f}")
    assert decoded >= 45.0 and encoded >= 0.6  # the encoder's nearest-code choice flips at near ties
    assert top1 >= 0.95 and sampled.float().mean().item() >= 0.9
    if dtype == torch.float16:  # the shipped weights are fp16: only the activations round
        assert prob_err <= 0.01 and greedy_agree >= 0.9 and encoded >= 0.9
    else:  # bf16 keeps 8 bits of mantissa: a near tie flips, and the greedy continuation after it differs
        assert prob_err <= 0.08


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_xl_low_precision_matches_fp32(dtype):
    if not (XL_VAE.is_file() and XL_MTD.is_file()):
        pytest.skip("the shipped NUWA-XL model is absent")
    ref = XLModel.load(XL_VAE, XL_MTD)
    model = XLModel.load(XL_VAE, XL_MTD, dtype=dtype, vae_dtype=torch.float32)
    assert next(model.global_mtd.parameters()).dtype == dtype
    L = int(ref.info.get("L", 5))
    a = ref.keyframes(None, L, 8, seed=2)
    b = model.keyframes(None, L, 8, seed=2)
    assert a.dtype == b.dtype == torch.float32  # the sampler's latents stay float32
    rel = ((a - b).norm() / a.norm()).item()
    frames = psnr(ref.decode(a).clamp(-1, 1), ref.decode(b).clamp(-1, 1), peak=2.0)
    vae = XLModel.load(XL_VAE, XL_MTD, vae_dtype=torch.bfloat16)
    vae_psnr = psnr(vae.decode(a).clamp(-1, 1), ref.decode(a).clamp(-1, 1), peak=2.0)
    print(f"{dtype}: XL keyframe latents relative error {rel:.4f}, decoded PSNR vs fp32 {frames:.1f} dB; "
          f"bf16 T-KLVAE decode PSNR {vae_psnr:.1f} dB")
    assert rel <= 0.1 and frames >= 30.0 and vae_psnr >= 35.0
