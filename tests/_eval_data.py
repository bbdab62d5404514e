"""Real data for the evaluation tests (../shared/data next to the repository, or $NUWA_SHARED_DATA) and the
shipped tokenizer.

Everything here is read-only and small: the garching panorama composited over white and downscaled by 4
(1024 x 128, exactly the shipped model's training image), other photos downscaled by non-integer factors
(which also blurs away the JPEG 8 x 8 block grid), and the shipped bundle's VQGAN alone (its renderer is
not needed, so the tokenizer loads whatever the renderer's code looks like).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
# .ci/run clones the pack elsewhere (as ComfyUI-NUWA/) and passes the data folder of the checkout it came from
DATA = Path(os.environ.get("NUWA_SHARED_DATA") or REPO.parent / "shared" / "data")
GARCHING = DATA / "panoramas" / "garching.png"
STARRY = DATA / "paintings" / "starry_night_van_gogh_PD.jpg"
SEEDING = DATA / "landscapes" / "seeding_by_Clements_Engelhardt_CC0.jpg"
SHIPPED = REPO / "models" / "nuwa" / "nuwa_infinity_default.safetensors"

needs_data = pytest.mark.skipif(not (GARCHING.is_file() and STARRY.is_file() and SEEDING.is_file()),
                                reason="shared real data (../shared/data or $NUWA_SHARED_DATA) absent")
needs_shipped = pytest.mark.skipif(not SHIPPED.is_file(), reason="shipped model file absent")


def downscale(img: torch.Tensor, factor: float) -> torch.Tensor:
    x = F.interpolate(img.permute(0, 3, 1, 2), scale_factor=factor, mode="bilinear", antialias=True,
                      align_corners=False)
    return x.clamp(0, 1).permute(0, 2, 3, 1).contiguous()


@functools.lru_cache(maxsize=None)
def load(name: str) -> torch.Tensor:
    """IMAGE [1, H, W, 3]: 'garching' 1024x128, 'starry' 578x461, 'seeding' 568x320 (W x H)."""
    from nuwa_core.images import load_image
    if name == "garching":
        return downscale(load_image(GARCHING), 0.25)
    if name == "starry":
        return downscale(load_image(STARRY), 1 / 1.3)
    if name == "seeding":
        return downscale(load_image(SEEDING), 1 / 2.7)
    raise KeyError(name)


@functools.lru_cache(maxsize=1)
def shipped_vqgan():
    """The shipped bundle's tokenizer (small_f8, trained one-shot on garching), float32, eval."""
    from nuwa_core.checkpoint import config_from_json, load_state_dict, load_strict
    from nuwa_core.infinity.vqgan import VQGANConfig, VQModel
    tensors, meta = load_state_dict(SHIPPED)
    vq = VQModel(config_from_json(VQGANConfig, meta["vqgan_config"]))
    load_strict(vq, {k[6:]: v.float() for k, v in tensors.items() if k.startswith("vqgan.")}, f"{SHIPPED} (vqgan)")
    return vq.eval()


@pytest.fixture(scope="module")
def one_thread():
    """torch on one intra-op thread for a test module, then as before. On two cores shared with other
    jobs, two threads that wait for each other at every op made these tests 5-100x slower at random."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
