"""LPIPS from a local file: lpips.LPIPS(net='vgg') key layout, strict loading, use in the vqgan stage."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from nuwa_core import train
from nuwa_core.training import loop
from nuwa_core.checkpoint import CheckpointError
from nuwa_core.training.perceptual_loss import LPIPS, load_lpips
from _training import vqgan_args, write_image

# lpips.LPIPS(net='vgg').state_dict() without its `lins.N` duplicates: torchvision vgg16().features
# indices of the 13 convolutions, in five slices; one bias-free 1x1 head per slice
VGG_CONVS = {1: (0, 2), 2: (5, 7), 3: (10, 12, 14), 4: (17, 19, 21), 5: (24, 26, 28)}
LPIPS_KEYS = ({"scaling_layer.shift", "scaling_layer.scale"}
              | {f"net.slice{s}.{i}.{p}" for s, convs in VGG_CONVS.items() for i in convs for p in ("weight", "bias")}
              | {f"lin{n}.model.1.weight" for n in range(5)})


def _random_lpips_file(path, alias_heads=False):
    """A randomly initialised LPIPS with non-negative heads (as the published ones), saved as lpips does."""
    torch.manual_seed(0)
    model = LPIPS()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for n in range(5):
        sd[f"lin{n}.model.1.weight"].abs_()
        if alias_heads:  # the name lpips.LPIPS also gives each head
            sd[f"lins.{n}.model.1.weight"] = sd.pop(f"lin{n}.model.1.weight")
    save_file(sd, str(path))
    return path


def test_key_layout_is_lpips_vgg():
    assert set(LPIPS().state_dict()) == LPIPS_KEYS


@pytest.mark.parametrize("alias_heads", [False, True])
def test_loads_frozen_zero_for_identical_positive_otherwise(tmp_path, alias_heads):
    model = load_lpips(_random_lpips_file(tmp_path / "lpips.safetensors", alias_heads))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=gen)).clamp(-1, 1).requires_grad_()
    assert torch.equal(model(x, x), torch.zeros(2))
    d = model(x, y)
    assert d.shape == (2,) and (d > 0).all()
    d.sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0  # the loss reaches the reconstruction


def test_wrong_layout_names_the_missing_keys(tmp_path):
    sd = {k: v for k, v in LPIPS().state_dict().items() if k.startswith("lin")}  # heads only, no VGG trunk
    save_file(sd, str(tmp_path / "heads.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing keys: net\.slice1\.0\.bias"):
        load_lpips(tmp_path / "heads.safetensors")


def test_vqgan_trains_with_lpips(tmp_path):
    img = write_image(tmp_path / "a.png")
    weights = _random_lpips_file(tmp_path / "lpips.safetensors")
    torch.set_num_threads(1)
    res = train.main(vqgan_args(img, tmp_path / "v.safetensors", "--steps", "2", "--lpips", str(weights),
                                "--lpips-weight", "0.5"))
    assert res["step"] == 2 and res["lpips"] > 0 and (tmp_path / "v.safetensors").is_file()
    with pytest.raises(loop.TrainingError, match="lpips"):  # another loss: not the same run
        train.main(vqgan_args(img, tmp_path / "v.safetensors", "--steps", "3", "--resume"))
    with pytest.raises(CheckpointError, match="not found"):
        train.main(vqgan_args(img, tmp_path / "w.safetensors", "--steps", "1", "--lpips", str(tmp_path / "none.pth")))


def test_matches_the_lpips_package(tmp_path):
    """Same distances as lpips.LPIPS(net='vgg') (its shipped heads, a random VGG trunk: no download)."""
    lpips = pytest.importorskip("lpips")
    from safetensors.torch import save_model
    reference = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()
    save_model(reference, str(tmp_path / "lpips_vgg.safetensors"))
    ours = load_lpips(tmp_path / "lpips_vgg.safetensors")
    gen = torch.Generator().manual_seed(2)
    x, y = (torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1 for _ in range(2))
    torch.testing.assert_close(ours(x, y), reference(x, y).flatten())
