"""A global model and a local model per depth (issue 15 item 3): which MTD fills which level of the tree,
the bundle, the loader and Add Local Model nodes, and the warnings and errors for a tree the models
were not trained for. Tiny random models on the CPU."""
import warnings

import pytest
import torch
from _pack import node
from _xl import load_xl

from nuwa_core.xl.diffusion_over_diffusion import generate_long_video, level_spacing
from nuwa_core.xl.mask_temporal_diffusion import MaskTemporalDiffusion, MTDConfig
from nuwa_core.xl.model import LocalModel, XLModel, save_mtd_xl, trained_levels
from nuwa_core.xl.t_klvae import TKLVAE, TKLVAEConfig

INFO = {"L": 3, "depth": 3, "prompts": "none", "fps": 6.0, "width": 16, "height": 16}


def tiny_mtd(seed: int) -> MaskTemporalDiffusion:
    torch.manual_seed(seed)
    return MaskTemporalDiffusion(MTDConfig.tiny(context_dim=8)).eval()


def counting(mtd: MaskTemporalDiffusion, calls: list, name: str) -> MaskTemporalDiffusion:
    mtd.register_forward_hook(lambda module, args, out: calls.append((name, args[0].shape[0])))
    return mtd


def test_trained_levels_and_spacings_come_from_the_files_info():
    assert trained_levels({"role": "both", "depth": 3}) == [0, 1, 2]
    assert trained_levels({"role": "global", "depth": 3}) == [0]
    assert trained_levels({"role": "local", "depth": 3}) == [1, 2]
    assert trained_levels({"role": "local", "depth": 3, "levels": [2]}) == [2]
    assert trained_levels({}) is None
    mtd = tiny_mtd(0)
    assert LocalModel.from_info(mtd, {"role": "both", "L": 5, "depth": 3}).spacings == (4, 1)
    assert LocalModel.from_info(mtd, {"role": "local", "L": 5, "depth": 4, "levels": [1]}).spacings == (16,)
    assert LocalModel.from_info(mtd, {"role": "global", "L": 5, "depth": 3}).spacings == ()
    assert LocalModel.from_info(mtd, {}).spacings is None
    assert [level_spacing(5, 3, k) for k in range(3)] == [16, 4, 1]


def per_level_bundle(calls=None):
    """A global MTD and one local MTD per local level of an L=3, depth-3 tree (frames 2 and 1 apart)."""
    calls = [] if calls is None else calls
    g = counting(tiny_mtd(0), calls, "global")
    level1 = LocalModel.from_info(counting(tiny_mtd(1), calls, "level1"), {**INFO, "role": "local", "levels": [1]})
    level2 = LocalModel.from_info(counting(tiny_mtd(2), calls, "level2"), {**INFO, "role": "local", "levels": [2]})
    vae = TKLVAE(TKLVAEConfig.tiny()).eval()
    return XLModel(vae, g, [level2, level1], {**INFO, "role": "global"}), calls


def test_each_level_of_the_tree_runs_the_local_model_trained_for_its_spacing():
    model, calls = per_level_bundle()
    assert model.local_for(2) is model.local_models[1].mtd and model.local_for(1) is model.local_models[0].mtd
    with pytest.raises(ValueError, match="no local model for a local level whose frames are 1 video frames apart"):
        model.local_for(1, L=5)  # trained with L=3: its spacing means other frames at L=5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the tree the models were trained for: no warning
        frames = model.generate(L=3, depth=3, steps=2, seed=0)
    assert frames.shape[0] == 9
    order = [name for name, _ in calls]
    assert order == ["global"] * 2 + ["level1"] * 2 + ["level2"] * 2  # 2 DDIM steps per level
    assert [b for name, b in calls if name == "level2"] == [4, 4]  # level 2: 4 segments in one batch


def test_a_bundle_whose_levels_share_one_mtd_equals_the_shared_model():
    mtd, vae = tiny_mtd(0), TKLVAE(TKLVAEConfig.tiny()).eval()
    shared = XLModel(vae, mtd, mtd, {**INFO, "role": "both"}).generate(L=3, depth=3, steps=2, seed=3)
    split = [LocalModel.from_info(mtd, {**INFO, "role": "local", "levels": [k]}) for k in (2, 1)]
    per_level = XLModel(vae, mtd, split, {**INFO, "role": "both"}).generate(L=3, depth=3, steps=2, seed=3)
    assert torch.equal(shared, per_level)


def test_generate_long_video_takes_one_local_model_per_level():
    calls = []
    g = counting(tiny_mtd(0), calls, "g")
    locals_ = [counting(tiny_mtd(k), calls, f"l{k}") for k in (1, 2)]
    lat = generate_long_video(g, locals_, torch.zeros(1, 8), 3, 3, (4, 8, 8), steps=1,
                              generator=torch.Generator().manual_seed(0))
    assert lat.shape[0] == 9 and [name for name, _ in calls] == ["g", "l1", "l2"]
    with pytest.raises(ValueError, match="a local model for each of the 2 local levels .depth 3., got 1"):
        generate_long_video(g, locals_[:1], torch.zeros(1, 8), 3, 3, (4, 8, 8), steps=1)


def test_a_level_without_its_local_model_is_an_error_naming_what_there_is():
    model, _ = per_level_bundle()
    with pytest.raises(ValueError, match=r"frames are 4 video frames apart; this model's local models: .*"
                                         r"frames 1 apart.*frames 2 apart.*--role local --level K"):
        model.generate(L=3, depth=4, steps=1, seed=0)
    glob = XLModel(TKLVAE(TKLVAEConfig.tiny()).eval(), tiny_mtd(0), tiny_mtd(0), {**INFO, "role": "global"})
    with pytest.raises(ValueError, match="trained for no local level"):
        glob.local_for(1)
    glob.generate(L=3, depth=1, steps=1, seed=0)  # keyframes alone need no local model


def test_a_tree_the_shared_model_was_not_trained_for_warns_and_names_what_it_was():
    mtd = tiny_mtd(0)
    model = XLModel(TKLVAE(TKLVAEConfig.tiny()).eval(), mtd, mtd, {**INFO, "role": "both", "file": "m.safetensors"})
    with pytest.warns(UserWarning, match="depth 4: the global MTD m.safetensors was trained on keyframes 4 frames "
                                         "apart .depth 3.; depth 4 asks for keyframes 8 apart"):
        model.check_tree(3, 4)
    with pytest.warns(UserWarning, match="4 video frames apart: m.safetensors .frames 2, 1 apart. was not trained"):
        model.tree_locals(3, 4)
    with pytest.warns(UserWarning, match="L=4: the global MTD m.safetensors was trained with L=3 .* use L=3"):
        model.check_tree(4, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.check_tree(3, 3)
        model.tree_locals(3, 3)


def test_with_local_makes_a_new_bundle_and_checks_the_prompt_width():
    model, _ = per_level_bundle()
    extra = LocalModel.from_info(tiny_mtd(5), {**INFO, "role": "local", "levels": [2]}, "new.safetensors")
    more = model.with_local(extra)
    assert more.local_for(1) is extra.mtd and model.local_for(1) is not extra.mtd  # the input is unchanged
    assert more.global_mtd is model.global_mtd and more.vae is model.vae
    torch.manual_seed(0)
    wide = LocalModel(MaskTemporalDiffusion(MTDConfig.tiny(context_dim=16)), (1,), "wide.safetensors")
    with pytest.raises(ValueError, match="wide.safetensors takes 16-wide prompts but this model's global MTD takes 8"):
        model.with_local(wide)


def save_level_files(folder):
    folder.mkdir(parents=True, exist_ok=True)
    save_mtd_xl(tiny_mtd(0), folder / "mtd_global.safetensors", {**INFO, "role": "global"})
    for level in (1, 2):
        save_mtd_xl(tiny_mtd(level), folder / f"mtd_level{level}.safetensors", {**INFO, "role": "local", "levels": [level]})
    save_mtd_xl(tiny_mtd(9), folder / "mtd_L5.safetensors", {**INFO, "L": 5, "role": "local", "levels": [1]})


def test_xlmodel_load_takes_a_local_file_per_level(models_dir):
    folder = models_dir / "nuwa_xl"
    save_level_files(folder)
    model = XLModel.load(folder / "vae.safetensors", folder / "mtd_global.safetensors",
                         [folder / "mtd_level2.safetensors", folder / "mtd_level1.safetensors"])
    assert [lm.spacings for lm in model.local_models] == [(1,), (2,)]
    assert [lm.name for lm in model.local_models] == ["mtd_level2.safetensors", "mtd_level1.safetensors"]
    assert model.generate(L=3, depth=3, steps=1, seed=0).shape[0] == 9


def test_add_local_model_node_builds_the_per_depth_bundle(pack, models_dir):
    save_level_files(models_dir / "nuwa_xl")
    c2f = node(pack, "NUWAXLCoarseToFine")
    add = node(pack, "NUWAXLAddLocalModel")
    model = load_xl(pack, mtd="mtd_global.safetensors")
    with pytest.raises(ValueError, match="Coarse-to-Fine .L=3, depth 3.: .*mtd_global.safetensors .trained for no "
                                         "local level.*NUWA-XL Add Local Model"):
        c2f(model, 3, 3, 1, 0, 0)
    (one,) = add(model, "mtd_level1.safetensors")
    with pytest.raises(ValueError, match="frames are 1 video frames apart; .*mtd_level1.safetensors .frames 2 apart."):
        c2f(one, 3, 3, 1, 0, 0)
    (both,) = add(one, "mtd_level2.safetensors")
    assert [lm.name for lm in both.local_models][:2] == ["mtd_level2.safetensors", "mtd_level1.safetensors"]
    images, _, _ = c2f(both, 3, 3, 1, 0, 0)
    assert images.shape[0] == 9
    # the Local Diffusion chain picks the MTD of each level by the spacing of the frames it makes
    calls = []
    for lm in both.local_models[:2]:
        counting(lm.mtd, calls, lm.name)
    (keys,) = node(pack, "NUWAXLGlobalDiffusion")(both, 3, 1, 0, 3)  # 3 keyframes 4 frames apart
    (mid,) = node(pack, "NUWAXLLocalDiffusion")(both, keys, 3, 1, 0, 0)
    (dense,) = node(pack, "NUWAXLLocalDiffusion")(both, mid, 3, 1, 0, 0)
    assert dense["latents"].shape[0] == 9 and dense["frames_apart"] == 1.0
    assert [name for name, _ in calls] == ["mtd_level1.safetensors", "mtd_level2.safetensors"]
    with pytest.raises(ValueError, match="mtd_global.safetensors was trained for the global level only"):
        add(model, "mtd_global.safetensors")
    with pytest.raises(ValueError, match="mtd_L5.safetensors was trained with L=5 but this model's global MTD with L=3"):
        add(model, "mtd_L5.safetensors")


def test_ksampler_route_picks_the_local_model_by_spacing(pack, models_dir):
    import sys

    from _pack import import_pack
    xl_nodes = sys.modules[f"{import_pack().__name__}.nodes.xl_nodes"]
    save_level_files(models_dir / "nuwa_xl")
    (model,) = node(pack, "NUWAXLAddLocalModel")(load_xl(pack, mtd="mtd_global.safetensors"), "mtd_level1.safetensors")
    (model,) = node(pack, "NUWAXLAddLocalModel")(model, "mtd_level2.safetensors")
    assert xl_nodes.level_mtd(model, "local", 2) is model.local_models[1].mtd
    assert xl_nodes.level_mtd(model, "local", 1) is model.local_models[0].mtd
    assert xl_nodes.level_mtd(model, "global") is model.global_mtd
    with pytest.raises(ValueError, match="3 local models .*set frames_apart"):
        xl_nodes.level_mtd(model, "local")
    shared = load_xl(pack)
    assert xl_nodes.level_mtd(shared, "local") is shared.global_mtd


def test_an_mtd_paired_with_another_t_klvae_warns(models_dir):
    folder = models_dir / "nuwa_xl"
    vae = TKLVAE(TKLVAEConfig.tiny())
    save_mtd_xl(tiny_mtd(0), folder / "mtd_scaled.safetensors",
                {**INFO, "role": "both", "vae": "other.safetensors", "vae_latent_scale": 0.5})
    save_mtd_xl(tiny_mtd(0), folder / "mtd_named.safetensors", {**INFO, "role": "both", "vae": "other.safetensors"})
    save_mtd_xl(tiny_mtd(0), folder / "mtd_same.safetensors",
                {**INFO, "role": "both", "vae": "x.safetensors", "vae_latent_scale": vae.config.latent_scale})
    with pytest.warns(UserWarning, match=r"mtd_scaled.safetensors was trained on latents scaled by 0.5 .T-KLVAE "
                                         r"other.safetensors. but vae.safetensors scales by"):
        XLModel.load(folder / "vae.safetensors", folder / "mtd_scaled.safetensors")
    with pytest.warns(UserWarning, match="trained on the latents of other.safetensors, not vae.safetensors"):
        XLModel.load(folder / "vae.safetensors", folder / "mtd_named.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the scale it was trained with, under another name: fine
        XLModel.load(folder / "vae.safetensors", folder / "mtd_same.safetensors")
