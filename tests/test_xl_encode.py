"""NUWA-XL Encode: a user's own frames -> keyframe latents that Local Diffusion fills between (ComfyUI absent,
CPU): on tiny random models (tests/_xl.py) and on the shipped default model with its example keyframes."""
from pathlib import Path

import numpy as np
import pytest
import torch
from _pack import node
from _xl import load_xl

REPO = Path(__file__).resolve().parent.parent
SHIPPED_KEYFRAMES = [REPO / "models" / "nuwa_xl" / f"nuwa_xl_keyframe_{k}.png" for k in (1, 2, 3)]


def _image(frames: int, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(frames, h, w, 3, generator=g)


def test_encode_local_diffusion_decode_keeps_the_given_frames(pack, models_dir):
    model = load_xl(pack)  # tiny: 16x16 frames, L 3, depth 2, fps 6
    images = _image(3)
    (keys,) = node(pack, "NUWAXLEncode")(model, images, "refuse other sizes")
    assert keys["latents"].shape == (3, *model.latent_shape()) and keys["prompts"] is None
    assert keys["frames_apart"] == 2.0  # the model's (L-1)^(depth-1)
    # the latents are the T-KLVAE's (posterior mean x latent_scale) of each frame alone: keyframes 2 frames apart are
    # not neighbours, so no temporal layer mixes them
    frames = images.permute(0, 3, 1, 2) * 2 - 1
    assert torch.allclose(keys["latents"], torch.cat([model.encode(f[None]) for f in frames]), atol=1e-6)
    (filled,) = node(pack, "NUWAXLLocalDiffusion")(model, keys, 3, 2, 0, 0)
    assert filled["latents"].shape[0] == 5 and filled["frames_apart"] == 1.0
    assert torch.equal(filled["latents"][::2], keys["latents"])  # Local Diffusion keeps the given keyframes
    video, fps = node(pack, "NUWAXLDecode")(model, filled)
    assert video.shape == (5, 16, 16, 3) and fps == 6.0
    (apart,) = node(pack, "NUWAXLEncode")(model, images, "refuse other sizes", 1, 8)
    assert apart["frames_apart"] == 8.0 and node(pack, "NUWAXLDecode")(model, apart)[1] == 6.0 / 8
    # consecutive frames of a clip (1 frame apart): encoded together, as the T-KLVAE encodes a clip
    (clip,) = node(pack, "NUWAXLEncode")(model, images, "refuse other sizes", 1, 1)
    assert clip["frames_apart"] == 1.0 and torch.allclose(clip["latents"], model.encode(frames), atol=1e-6)


def test_every_nth_frame_of_a_video(pack, models_dir):
    model = load_xl(pack)
    video = _image(7)
    (keys,) = node(pack, "NUWAXLEncode")(model, video, "refuse other sizes", 3)  # frames 0, 3, 6
    (direct,) = node(pack, "NUWAXLEncode")(model, video[::3].contiguous(), "refuse other sizes")
    assert keys["latents"].shape[0] == 3 and torch.allclose(keys["latents"], direct["latents"], atol=1e-6)


def test_frames_of_the_wrong_size_are_refused_or_cropped(pack, models_dir):
    model = load_xl(pack)
    with pytest.raises(ValueError, match=r"frames are 24x20 \(width x height\) but this NUWA-XL model makes and "
                                         r"takes 16x16 frames.*scale and centre-crop"):
        node(pack, "NUWAXLEncode")(model, _image(3, h=20, w=24), "refuse other sizes")
    # the explicit option: scaled until it covers 16x16, keeping its aspect, then the centre cut out
    wide = torch.zeros(2, 16, 48, 3)
    wide[:, :, 16:32] = 1.0  # a white centre third
    (keys,) = node(pack, "NUWAXLEncode")(model, wide, "scale and centre-crop to the model's size")
    (white,) = node(pack, "NUWAXLEncode")(model, torch.ones(2, 16, 16, 3), "refuse other sizes")
    assert torch.allclose(keys["latents"], white["latents"], atol=1e-5)
    (small,) = node(pack, "NUWAXLEncode")(model, _image(2, h=6, w=9), "scale and centre-crop to the model's size")
    assert small["latents"].shape == (2, *model.latent_shape())


def test_local_diffusion_refuses_keyframes_of_another_size_or_width(pack, models_dir):
    model = load_xl(pack)  # 16x16 frames: 4 channels of 4x4 latents (f4)
    c, h, w = model.latent_shape()
    f = model.vae.config.downsample_factor
    wrong = {"latents": torch.randn(3, c, h + 1, w + 2)}
    with pytest.raises(ValueError, match=rf"Local Diffusion: the keyframes are latents of {(w + 2) * f}x{(h + 1) * f} "
                                         rf"frames \({w + 2}x{h + 1} latents\) but this model makes and takes 16x16 "
                                         rf"frames \({w}x{h} latents\); encode frames of that size with NUWA-XL Encode"):
        node(pack, "NUWAXLLocalDiffusion")(model, wrong, 3, 1, 0, 0)
    with pytest.raises(ValueError, match=rf"Local Diffusion: the keyframes have {c + 1} latent channels but .* take {c}"):
        node(pack, "NUWAXLLocalDiffusion")(model, {"latents": torch.randn(3, c + 1, h, w)}, 3, 1, 0, 0)


def test_too_few_frames_or_not_an_image_batch_are_refused(pack, models_dir):
    model = load_xl(pack)
    with pytest.raises(ValueError, match=r"NUWA-XL Encode: got 1 frame\(s\) .* needs at least 2"):
        node(pack, "NUWAXLEncode")(model, _image(1), "refuse other sizes")
    with pytest.raises(ValueError, match=r"NUWA-XL Encode \(frames 0, 4, ... of 3\): got 1 frame\(s\)"):
        node(pack, "NUWAXLEncode")(model, _image(3), "refuse other sizes", 4)
    with pytest.raises(ValueError, match=r"expected an IMAGE batch \[N, H, W, 3\], got \(16, 16, 3\)"):
        node(pack, "NUWAXLEncode")(model, _image(1)[0], "refuse other sizes")
    # an alpha channel (RGBA frames) is dropped
    rgba = torch.cat([_image(2), torch.ones(2, 16, 16, 1)], dim=-1)
    (keys,) = node(pack, "NUWAXLEncode")(model, rgba, "refuse other sizes")
    assert torch.allclose(keys["latents"], node(pack, "NUWAXLEncode")(model, _image(2), "refuse other sizes")[0]["latents"])


def _shipped_keyframes() -> torch.Tensor:
    from PIL import Image
    return torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255.0)
                        for p in SHIPPED_KEYFRAMES])


def test_shipped_model_fills_between_the_shipped_keyframes_and_keeps_them(pack, monkeypatch):
    """The template's first level on the shipped default model (3 steps: quick). Each decoded keyframe position is as
    close to its own input frame as the T-KLVAE's own round trip of the keyframes (the floor: its reconstruction error,
    0.04-0.08 mean abs on these pans), and closer than to the other input frames (the control: the same pan 16 and 32
    px on)."""
    monkeypatch.delenv("NUWA_MODELS_DIR", raising=False)
    if not (REPO / "models" / "nuwa_xl" / "mtd_default.safetensors").is_file():
        pytest.skip("the default XL model is not in this checkout")
    model = load_xl(pack, "t_klvae_default.safetensors", "mtd_default.safetensors")
    images = _shipped_keyframes()
    assert images.shape == (3, 48, 64, 3)
    (keys,) = node(pack, "NUWAXLEncode")(model, images, "refuse other sizes")
    (level2,) = node(pack, "NUWAXLLocalDiffusion")(model, keys, 5, 3, 0, 0)
    video, fps = node(pack, "NUWAXLDecode")(model, level2)
    assert video.shape == (9, 48, 64, 3) and fps == 10.0 / 4
    round_trip = (node(pack, "NUWAXLDecode")(model, keys)[0] - images).abs().mean(dim=(1, 2, 3))
    err = (video[::4, None] - images[None]).abs().mean(dim=(2, 3, 4))  # [decoded keyframe position, input frame]
    own, other = err.diagonal(), err[~torch.eye(3, dtype=torch.bool)]
    assert (own <= 1.1 * round_trip + 0.005).all(), (own, round_trip)
    assert own.mean() < 0.8 * other.mean(), err
