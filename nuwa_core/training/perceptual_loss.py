"""LPIPS perceptual distance (Zhang et al. 2018, "lin" variant on VGG16) for the VQGAN stage.

    d(x, y) = sum_l mean_hw( w_l . (f_l(x) / |f_l(x)| - f_l(y) / |f_l(y)|)^2 )

f_l are the VGG16 activations relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of the input after a
fixed scaling layer, |.| the channel-wise L2 norm, w_l learned non-negative 1x1 convolutions.

The state-dict keys are those of `lpips.LPIPS(net='vgg').state_dict()` (`scaling_layer.*`,
`net.slice1..5.N.*`, `lin0..4.model.1.weight`), so that model saved once loads here strictly:

    safetensors.torch.save_model(lpips.LPIPS(net='vgg'), "lpips_vgg.safetensors")

(`save_model`, not `save_file`: `lpips` lists its heads a second time as `lins.N.*`, sharing
memory; either name is read.) Nothing is downloaded: the file holds the VGG16 trunk as well as
the lin heads.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ..checkpoint import load_state_dict, load_strict

# VGG16 `features` indices of the five slices (each ends at a ReLU) and their output channels
VGG16_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
VGG16_FEATURES = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
CHANNELS = (64, 128, 256, 512, 512)


def vgg16_features() -> list[nn.Module]:
    """torchvision's vgg16().features layer list (conv 3x3 + ReLU, max-pool 'M'), without torchvision."""
    layers, c_in = [], 3
    for v in VGG16_FEATURES:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU()]
            c_in = v
    return layers


class ScalingLayer(nn.Module):
    """Maps -1..1 images to the statistics the VGG trunk was trained on (the published constants)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def forward(self, x):
        return (x - self.shift) / self.scale


class VGG16Slices(nn.Module):
    def __init__(self):
        super().__init__()
        layers = vgg16_features()
        for n, (start, end) in enumerate(VGG16_SLICES, 1):
            # keep torchvision's indices as module names: net.slice2.5.weight is features[5]
            setattr(self, f"slice{n}", nn.Sequential(OrderedDict((str(i), layers[i]) for i in range(start, end))))

    def forward(self, x) -> list[torch.Tensor]:
        feats = []
        for n in range(1, len(VGG16_SLICES) + 1):
            x = getattr(self, f"slice{n}")(x)
            feats.append(x)
        return feats


class LinHead(nn.Module):
    """Dropout + 1x1 conv to one channel (index 1: the published key `model.1.weight`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x):
        return self.model(x)


def _unit_channels(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    def __init__(self):
        super().__init__()
        self.scaling_layer = ScalingLayer()
        self.net = VGG16Slices()
        for n, c in enumerate(CHANNELS):
            setattr(self, f"lin{n}", LinHead(c))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y [B, 3, H, W] in -1..1 -> distance [B]."""
        fx, fy = self.net(self.scaling_layer(x)), self.net(self.scaling_layer(y))
        total = 0
        for n, (a, b) in enumerate(zip(fx, fy)):
            diff = (_unit_channels(a) - _unit_channels(b)).pow(2)
            total = total + getattr(self, f"lin{n}")(diff).mean(dim=(1, 2, 3))
        return total


def load_lpips(path) -> LPIPS:
    """A frozen LPIPS (eval mode, no gradients to its weights) from a .safetensors (or a weights-only
    .pth/.pt) file in the `lpips.LPIPS(net='vgg')` layout; missing or unexpected keys are named."""
    tensors, _ = load_state_dict(path)
    for key in [k for k in tensors if k.startswith("lins.")]:
        tensors.setdefault("lin" + key[len("lins."):], tensors.pop(key))  # lins.0.model.1.weight -> lin0.model...
    model = LPIPS()
    load_strict(model, tensors, f"LPIPS weights {path}")
    return model.eval().requires_grad_(False)


def lpips_for_run(args, device, side: int | None = None) -> LPIPS | None:
    """The stage's --lpips loss on `device`, or None without --lpips (arguments.lpips_arguments);
    side: the smaller side of the images it compares (default: --crop)."""
    if not args.lpips:
        return None
    if side is None and args.crop < 16:
        from .loop import TrainingError
        raise TrainingError(f"--lpips needs --crop >= 16 (its VGG16 halves the image 4 times), got {args.crop}")
    if side is not None and side < 16:
        from .loop import TrainingError
        raise TrainingError(f"--lpips needs frames of at least 16 px a side (its VGG16 halves the image 4 times), "
                            f"got {side}")
    return load_lpips(args.lpips).to(device)
