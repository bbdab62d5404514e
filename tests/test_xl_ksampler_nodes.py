"""The NUWA-XL "for KSampler" nodes with ComfyUI absent: registration, the latent / conditioning plumbing.
(The MODEL itself needs ComfyUI: tests/test_comfyui_ksampler.py.)"""
import pytest
import torch

from _pack import node
from _xl import load_xl, xl_cond

IDS = ("NUWAXLModelAsComfy", "NUWAXLEmptyLatentVideo", "NUWAXLPromptsForKSampler", "NUWAXLInbetweenForKSampler",
       "NUWAXLJoinSegments", "NUWAXLDecodeLatent")


def test_registered_in_the_xl_category(pack):
    # descriptions and tooltips of every registered node: tests/test_package_import.py
    for node_id in IDS:
        assert pack[node_id].CATEGORY == "NUWA/XL", node_id
    assert pack["NUWAXLModelAsComfy"].RETURN_TYPES == ("MODEL",)
    assert list(pack["NUWAXLModelAsComfy"].INPUT_TYPES()["required"]) == ["xl_model", "level"]


def test_model_node_needs_comfyui(pack, models_dir):
    with pytest.raises(ImportError):
        node(pack, "NUWAXLModelAsComfy")(load_xl(pack), "global")


def test_empty_latent_and_prompts(pack, models_dir):
    model = load_xl(pack)
    (lat,) = node(pack, "NUWAXLEmptyLatentVideo")(model, 3, 2, 2)
    assert lat["samples"].shape == (2, 4, 3, 8, 8) and not lat["samples"].any()
    assert lat["nuwa_xl_frames_apart"] == 2.0
    (null,) = node(pack, "NUWAXLPromptsForKSampler")(model, 3)  # unconditional: the null prompt
    assert len(null) == 1 and null[0][0].shape == (1, 1, 8) and not null[0][0].any() and null[0][1] == {}
    text = load_xl(pack, "vae_text.safetensors", "mtd_text.safetensors")
    (one,) = node(pack, "NUWAXLPromptsForKSampler")(text, 3, xl_cond(1))
    assert one[0][0].shape == (1, 4, 8) and one[0][1] == {}
    cond = xl_cond(3)
    (per,) = node(pack, "NUWAXLPromptsForKSampler")(text, 3, cond)
    assert per[0][1]["nuwa_xl_frame_context"].shape == (1, 3, 4, 8)
    assert torch.equal(per[0][1]["nuwa_xl_frame_context"][0, 2], cond[2][0][0])
    two = xl_cond(2)  # 2 prompts over 3 frames: the first half, then the second
    (spread,) = node(pack, "NUWAXLPromptsForKSampler")(text, 3, two)
    ctx = spread[0][1]["nuwa_xl_frame_context"][0]
    assert torch.equal(ctx[0], two[0][0][0]) and torch.equal(ctx[1], two[1][0][0])
    with pytest.raises(ValueError, match="unconditional"):
        node(pack, "NUWAXLPromptsForKSampler")(model, 3, xl_cond(1))


def test_inbetween_and_join_keep_the_given_frames(pack, models_dir):
    text = load_xl(pack, "vae_text.safetensors", "mtd_text.safetensors")
    (per,) = node(pack, "NUWAXLPromptsForKSampler")(text, 3, xl_cond(3))
    frames = {"samples": torch.randn(1, 4, 3, 8, 8), "nuwa_xl_frames_apart": 4.0}
    pos, neg, lat = node(pack, "NUWAXLInbetweenForKSampler")(per, per, frames, 5)
    assert lat["samples"].shape == (2, 4, 5, 8, 8) and lat["nuwa_xl_frames_apart"] == 1.0
    given = pos[0][1]["nuwa_xl_given"]
    assert given["samples"].shape == (2, 4, 5, 8, 8) and given["mask"].tolist() == [[1, 0, 0, 0, 1]] * 2
    assert torch.equal(given["samples"][1, :, -1], frames["samples"][0, :, 2])
    assert not given["samples"][:, :, 1:-1].any()
    ctx = pos[0][1]["nuwa_xl_frame_context"]  # prompts of 3 input frames spread over 9 frames, per segment
    assert ctx.shape == (2, 5, 4, 8)
    src = per[0][1]["nuwa_xl_frame_context"][0]
    assert torch.equal(ctx[0, 0], src[0]) and torch.equal(ctx[0, 4], src[1]) and torch.equal(ctx[1, 4], src[2])
    assert "nuwa_xl_given" not in per[0][1]  # inputs are not mutated
    # denser prompts: one per output frame of the level (9), each segment slot its own
    dense = xl_cond(9)
    (per9,) = node(pack, "NUWAXLPromptsForKSampler")(text, 9, dense)
    ctx9 = node(pack, "NUWAXLInbetweenForKSampler")(per9, per9, frames, 5)[0][0][1]["nuwa_xl_frame_context"]
    assert torch.equal(ctx9[0, 2], dense[2][0][0]) and torch.equal(ctx9[1, 1], dense[5][0][0])
    (per4,) = node(pack, "NUWAXLPromptsForKSampler")(text, 4, xl_cond(4))
    with pytest.raises(ValueError, match="prompts are for 4 frames .* 3 input and 9 output"):
        node(pack, "NUWAXLInbetweenForKSampler")(per4, per4, frames, 5)
    sampled = {**lat, "samples": torch.randn(2, 4, 5, 8, 8)}
    (video,) = node(pack, "NUWAXLJoinSegments")(sampled, frames)
    v = video["samples"]
    assert v.shape == (1, 4, 9, 8, 8) and torch.equal(v[0, :, ::4], frames["samples"][0])
    assert torch.equal(v[0, :, 5:8], sampled["samples"][1, :, 1:4])
    images, fps = node(pack, "NUWAXLDecodeLatent")(text, video)
    assert images.shape == (9, 16, 16, 3) and fps == 6.0
    # decoding equals the core decode of the same (scaled) latents
    z = v[0].movedim(1, 0) * text.vae.config.latent_scale
    assert torch.allclose(images, ((text.decode(z).clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1), atol=1e-6)
    with pytest.raises(ValueError, match="need the 3 frames"):
        node(pack, "NUWAXLJoinSegments")(sampled, {"samples": frames["samples"][:, :, :2]})
    with pytest.raises(ValueError, match="at least 2 input frames"):
        node(pack, "NUWAXLInbetweenForKSampler")(per, per, {"samples": frames["samples"][:, :, :1]}, 5)
    with pytest.raises(ValueError, match="video LATENT"):
        node(pack, "NUWAXLDecodeLatent")(text, {"samples": torch.zeros(1, 4, 4, 4)})
