"""NUWA-XL node functions with ComfyUI absent, on tiny random models (CPU, no downloads)."""
import sys
from pathlib import Path

import pytest
import torch

from _pack import import_pack, node
from _xl import load_xl, xl_cond

REPO = Path(__file__).resolve().parent.parent
XL_IDS = ("NUWAXLModelLoader", "NUWAXLGlobalDiffusion", "NUWAXLLocalDiffusion", "NUWAXLCoarseToFine", "NUWAXLDecode")


def test_nodes_are_registered_in_the_xl_category(pack):
    # descriptions and tooltips of every registered node: tests/test_package_import.py
    for node_id in XL_IDS:
        assert pack[node_id].CATEGORY == "NUWA/XL", node_id


def test_loader_lists_files_by_kind_default_first_and_names_folders(pack, models_dir):
    req = pack["NUWAXLModelLoader"].INPUT_TYPES()["required"]
    vaes, mtds, locals_ = req["t_klvae_name"][0], req["mtd_name"][0], req["local_mtd_name"][0]
    assert vaes[0] == "t_klvae_default.safetensors" and {"vae.safetensors", "vae_text.safetensors"} <= set(vaes)
    assert mtds[0] == "mtd_default.safetensors" and "mtd_text.safetensors" in mtds and "vae.safetensors" not in mtds
    assert locals_[0] == "(same as global)"
    model = load_xl(pack)
    assert [lm.mtd for lm in model.local_models] == [model.global_mtd]
    assert not model.takes_prompts and model.fps == 6.0
    two = load_xl(pack, mtd="mtd.safetensors", local="mtd_text.safetensors")
    assert len(two.local_models) == 1 and two.local_models[0].mtd is not two.global_mtd
    with pytest.raises(FileNotFoundError) as info:
        load_xl(pack, mtd="absent.safetensors")
    assert "absent.safetensors" in str(info.value) and str(models_dir / "nuwa_xl") in str(info.value)
    with pytest.raises(ValueError, match="not a Mask Temporal Diffusion"):
        load_xl(pack, mtd="vae.safetensors")


def test_shipped_default_is_found_without_setup(pack, monkeypatch):
    monkeypatch.delenv("NUWA_MODELS_DIR", raising=False)
    if not (REPO / "models" / "nuwa_xl" / "mtd_default.safetensors").is_file():
        pytest.skip("the default XL model is not in this checkout")
    model = load_xl(pack, "t_klvae_default.safetensors", "mtd_default.safetensors")
    assert model.info["L"] >= 3


def test_coarse_to_fine_makes_the_whole_tree(pack, models_dir):
    model = load_xl(pack)
    images, fps, latents = node(pack, "NUWAXLCoarseToFine")(model, 3, 3, 2, 7, 0)
    assert images.shape == (9, 16, 16, 3) and 0 <= images.min() and images.max() <= 1 and fps == 6.0
    assert latents["latents"].shape[0] == 9
    again, _, _ = node(pack, "NUWAXLCoarseToFine")(model, 3, 3, 2, 7, 2)  # 2 segments per batch: same video
    assert torch.allclose(again, images, atol=1e-5)
    # unconditional model: a prompt is an error that says so, guidance without prompts changes nothing
    with pytest.raises(ValueError, match="mtd.safetensors is unconditional .* disconnect the conditioning"):
        node(pack, "NUWAXLCoarseToFine")(model, 3, 3, 2, 7, 0, xl_cond(1, width=768))
    guided, _, _ = node(pack, "NUWAXLCoarseToFine")(model, 3, 3, 2, 7, 0, None, 3.0)
    assert torch.equal(guided, images)


def test_global_local_decode_chain_equals_the_tree(pack, models_dir):
    model = load_xl(pack, "vae_text.safetensors", "mtd_text.safetensors")
    cond = xl_cond(3)
    (keys,) = node(pack, "NUWAXLGlobalDiffusion")(model, 3, 2, 5, 2, cond)
    assert keys["latents"].shape[0] == 3 and keys["frames_apart"] == 2.0
    (filled,) = node(pack, "NUWAXLLocalDiffusion")(model, keys, 3, 2, 5, 0)
    assert filled["latents"].shape[0] == 5 and torch.equal(filled["latents"][::2], keys["latents"])
    images, fps = node(pack, "NUWAXLDecode")(model, filled)
    assert images.shape == (5, 16, 16, 3) and fps == 6.0
    key_images, key_fps = node(pack, "NUWAXLDecode")(model, keys)
    assert key_fps == 3.0
    alone = torch.cat([model.decode(keys["latents"][i:i + 1]) for i in range(3)])  # keyframes apart: each alone
    assert torch.allclose(key_images, ((alone.permute(0, 2, 3, 1) + 1) / 2).clamp(0, 1), atol=1e-5)
    one = node(pack, "NUWAXLCoarseToFine")(model, 3, 2, 2, 5, 0, xl_cond(1))[0]
    assert one.shape == (5, 16, 16, 3)


def test_bad_inputs_give_clear_errors(pack, models_dir):
    model = load_xl(pack, "vae_text.safetensors", "mtd_text.safetensors")
    c2f = node(pack, "NUWAXLCoarseToFine")
    with pytest.raises(ValueError, match="at least 3"):
        c2f(model, 2, 2, 2, 0, 0)
    with pytest.raises(ValueError, match="depth must be at least 1"):
        c2f(model, 3, 0, 2, 0, 0)
    with pytest.raises(ValueError, match="768 wide .from a CLIP Text Encode.* but mtd_text.safetensors takes 8-wide"):
        c2f(model, 3, 2, 2, 0, 0, xl_cond(1, width=768))
    wrong = [[torch.randn(1, 4, 16), {"nuwa_text_encoder": "other_text"}]]
    with pytest.raises(ValueError, match="16 wide .from the text encoder other_text. but mtd_text.safetensors takes "
                                         "8-wide"):
        c2f(model, 3, 2, 2, 0, 0, wrong)
    with pytest.raises(ValueError, match="level 3 .conditioning_level_3. but the tree has 2"):
        c2f(model, 3, 2, 2, 0, 0, None, 1.0, conditioning_level_3=xl_cond(2))
    with pytest.raises(ValueError, match="CLIP Text Encode"):
        c2f(model, 3, 2, 2, 0, 0, "a cat")
    (keys,) = node(pack, "NUWAXLGlobalDiffusion")(model, 3, 1, 0, 2)
    with pytest.raises(ValueError, match="at least 2 input frames"):
        node(pack, "NUWAXLLocalDiffusion")(model, {"latents": keys["latents"][:1]}, 3, 1, 0, 0)
    with pytest.raises(ValueError, match="at least 3"):
        node(pack, "NUWAXLLocalDiffusion")(model, keys, 2, 1, 0, 0)


def test_cancel_is_checked_every_step(pack, models_dir, monkeypatch):
    xl_nodes = sys.modules[f"{import_pack().__name__}.nodes.xl_nodes"]
    calls = []

    class Interrupted(Exception):
        pass

    def check():
        calls.append(1)
        if len(calls) == 3:
            raise Interrupted

    monkeypatch.setattr(xl_nodes._comfy, "check_interrupted", check)
    with pytest.raises(Interrupted):
        node(pack, "NUWAXLCoarseToFine")(load_xl(pack), 3, 2, 2, 0, 0)
    assert len(calls) == 3  # steps 1-2 of the global level, then the first local step
