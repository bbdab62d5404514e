"""Node functions with ComfyUI absent, on a tiny random model (CPU, no downloads)."""
import sys

import pytest
import torch

from _pack import import_pack, node
from _tiny import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_loader_finds_model_and_names_folders_when_missing(pack, tmp_path, monkeypatch):
    monkeypatch.setenv("NUWA_MODELS_DIR", str(tmp_path))
    (tmp_path / "nuwa").mkdir()
    tiny_model().save(tmp_path / "nuwa" / "mine.safetensors")
    combo = pack["NUWAModelLoader"].INPUT_TYPES()["required"]["model_name"][0]
    assert combo[0] == "nuwa_infinity_default.safetensors" and "mine.safetensors" in combo
    (loaded,) = node(pack, "NUWAModelLoader")("mine.safetensors")
    assert loaded.patch_pixels == (16, 16)
    with pytest.raises(FileNotFoundError) as info:
        node(pack, "NUWAModelLoader")("absent.safetensors")
    assert "absent.safetensors" in str(info.value) and str(tmp_path / "nuwa") in str(info.value)


def test_encode_plan_render_decode(pack, model):
    image = torch.rand(1, 32, 40, 3)
    (canvas,) = node(pack, "NUWAVQGANEncode")(model, image, "crop")
    before = canvas.tokens.clone()
    plan, preview = node(pack, "NUWADirectionPlanner")(model, canvas, 1, 1, 0, 1, 0, 0, "center")
    assert len(plan) == 3 * 4 - 2 * 2 and tuple(plan.plans[-1].grid) == (1, 3, 4)
    assert preview.shape == (1, 3 * preview.shape[1] // 3, preview.shape[2], 3) and preview.max() <= 1
    image_out, grown = node(pack, "NUWAPatchRenderer")(model, canvas, plan, 5, "auto", 4, 1.0, 16, 1.0)
    assert image_out.shape == (1, 48, 64, 3) and bool(grown.known.all())
    assert torch.equal(canvas.tokens, before) and canvas.grid == (1, 2, 2), "the input canvas was modified"
    again, _ = node(pack, "NUWAPatchRenderer")(model, canvas, plan, 5, "auto", 4, 1.0, 16, 1.0)
    assert torch.equal(again, image_out), "same seed, different image"
    (decoded,) = node(pack, "NUWAVQGANDecode")(model, grown)
    assert decoded.shape == image_out.shape
    assert (decoded - image_out).abs().max() <= 1e-5  # the renderer's incremental decode is the full decode


def test_render_epsilon_reaches_the_sampler(pack, model):
    """epsilon 0.5 keeps only the likeliest token: the same canvas as top-k 1; the default differs."""
    (canvas,) = node(pack, "NUWAVQGANEncode")(model, torch.rand(1, 32, 40, 3), "crop")
    plan, _ = node(pack, "NUWADirectionPlanner")(model, canvas, 1, 1, 0, 1, 0, 0, "center")
    render = node(pack, "NUWAPatchRenderer")
    greedy = render(model, canvas, plan, 3, "auto", 4, 1.0, 1, 1.0, epsilon=0.0)[1].tokens
    assert torch.equal(render(model, canvas, plan, 7, "auto", 4, 1.0, 0, 1.0, epsilon=0.5)[1].tokens, greedy)
    assert not torch.equal(render(model, canvas, plan, 7, "auto", 4, 1.0, 0, 1.0)[1].tokens, greedy)


def test_render_candidates_reach_the_generator(pack, model):
    """candidates 3 gives the engine's canvas for SamplerSettings(candidates=3), not the single draw."""
    from nuwa_core.infinity.patch_samplers import SamplerSettings
    (canvas,) = node(pack, "NUWAVQGANEncode")(model, torch.rand(1, 32, 40, 3), "crop")
    plan, _ = node(pack, "NUWADirectionPlanner")(model, canvas, 1, 1, 0, 1, 0, 0, "center")
    render = node(pack, "NUWAPatchRenderer")
    best = render(model, canvas, plan, 3, "auto", 4, 1.0, 16, 1.0, epsilon=0.0, candidates=3)[1].tokens
    state = plan.prepare(canvas)
    engine = model.generate(state, plan.plans[0], SamplerSettings(top_k=16, candidates=3), generator=3)
    assert torch.equal(best, engine.tokens)
    assert not torch.equal(render(model, canvas, plan, 3, "auto", 4, 1.0, 16, 1.0, epsilon=0.0)[1].tokens, best)
    comfy = sys.modules[import_pack().__name__ + ".nodes._comfy"]  # the memory asked of ComfyUI grows with the draws
    assert comfy.render_memory(model, canvas, plan.plans, candidates=4) > comfy.render_memory(model, canvas, plan.plans)


def test_target_size_and_mask_plans(pack, model):
    (canvas,) = node(pack, "NUWAVQGANEncode")(model, torch.rand(1, 32, 32, 3), "refuse")
    plan, _ = node(pack, "NUWADirectionPlanner")(model, canvas, 0, 0, 0, 0, 64, 48, "top_left")
    assert tuple(plan.plans[-1].grid) == (1, 3, 4) and tuple(plan.plans[-1].offset) == (0, 0)
    mask = torch.zeros(1, 32, 32)
    mask[:, 20:30, 20:30] = 1
    plan, _ = node(pack, "NUWADirectionPlanner")(model, canvas, 0, 0, 0, 0, 0, 0, "center", mask)
    assert [tuple(c) for s in plan.plans[0].segments for c in s.patches] == [(0, 1, 1)]
    _, out = node(pack, "NUWAPatchRenderer")(model, canvas, plan, 1, "auto", 4, 1.0, 16, 1.0)
    assert bool(out.known.all()) and bool(canvas.known.all())
    with pytest.raises(ValueError, match="no extension, target size or painted mask"):
        node(pack, "NUWADirectionPlanner")(model, canvas, 0, 0, 0, 0, 0, 0, "center", torch.zeros(1, 32, 32))


# ---- the artist's pixels: masks, crops, pixel pads ---------------------------------------------

def _within(mask: torch.Tensor, px: int) -> torch.Tensor:
    """bool [H, W]: pixels within `px` (chessboard) of a masked one."""
    grown = mask.float()[None, None]
    for _ in range(px):
        grown = torch.nn.functional.max_pool2d(grown, 3, stride=1, padding=1)
    return grown[0, 0] > 0


def _stroke_mask(h, w):
    """An L-shaped stroke: what remains of the image is no rectangle (it dropped the whole image before)."""
    mask = torch.zeros(1, h, w)
    mask[:, 3:13, 20:27] = 1
    mask[:, 10:13, 20:40] = 1
    return mask


@pytest.mark.parametrize("feather", [0, 4])
def test_a_painted_mask_keeps_the_image_outside_it(pack, model, feather):
    image = torch.rand(1, 32, 48, 3)
    (canvas,) = node(pack, "NUWAVQGANEncode")(model, image, "refuse")
    mask = _stroke_mask(32, 48)
    plan, _ = node(pack, "NUWADirectionPlanner")(model, canvas, 0, 0, 0, 0, 0, 0, "center", mask, feather=feather)
    assert sorted(c for p in plan.plans for s in p.segments for c in s.patches) == [(0, 0, 1), (0, 0, 2)]
    out, grown = node(pack, "NUWAPatchRenderer")(model, canvas, plan, 2, "auto", 4, 1.0, 16, 1.0)
    near = _within(mask[0], feather)
    assert torch.equal(out[0][~near], image[0][~near]), "pixels outside the mask (and its feather) changed"
    assert (out[0][mask[0] > 0] - image[0][mask[0] > 0]).abs().mean() > 0.05, "the masked area was not regenerated"
    band = near & (mask[0] == 0)
    if feather:  # the band blends: neither the input nor the decoded pixels alone
        assert (out[0][band] - image[0][band]).abs().max() > 1e-4
    (decoded,) = node(pack, "NUWAVQGANDecode")(model, grown)
    assert torch.equal(decoded, out), "the canvas keeps the mask and feather for later decodes"


def test_a_mask_the_size_of_the_image_lands_on_the_cropped_canvas(pack, model):
    """fit=crop cuts 6 px off the left of a 60 px wide image: a stroke at x = 38-39 of the image is at
    x = 32-33 of the canvas, in its third column (pooling the uncropped mask put it in the second)."""
    image = torch.rand(1, 32, 60, 3)
    (canvas,) = node(pack, "NUWAVQGANEncode")(model, image, "crop")
    assert canvas.grid == (1, 2, 3) and canvas.source_box == (0, 6, 32, 48)
    mask = torch.zeros(1, 32, 60)
    mask[:, 20:24, 38:40] = 1
    plan, _ = node(pack, "NUWADirectionPlanner")(model, canvas, 0, 0, 0, 0, 0, 0, "center", mask, feather=0)
    assert [c for p in plan.plans for s in p.segments for c in s.patches] == [(0, 1, 2)]
    out, _ = node(pack, "NUWAPatchRenderer")(model, canvas, plan, 2, "auto", 4, 1.0, 16, 1.0)
    kept = torch.ones(32, 48, dtype=torch.bool)
    kept[20:24, 32:34] = False
    assert torch.equal(out[0][kept], image[0, :, 6:54][kept])


def test_a_resized_image_takes_its_mask_resized(pack, model):
    (canvas,) = node(pack, "NUWAVQGANEncode")(model, torch.rand(1, 30, 50, 3), "resize")  # -> 32 x 48
    mask = torch.zeros(1, 30, 50)
    mask[:, :, 40:] = 1  # the right fifth: x >= 38.4 on the canvas, the third column only
    plan, _ = node(pack, "NUWADirectionPlanner")(model, canvas, 0, 0, 0, 0, 0, 0, "center", mask)
    assert sorted(c for p in plan.plans for s in p.segments for c in s.patches) == [(0, 0, 2), (0, 1, 2)]


def test_a_mask_combines_with_extension_and_an_empty_mask_is_ignored(pack, model):
    image = torch.rand(1, 32, 48, 3)
    (canvas,) = node(pack, "NUWAVQGANEncode")(model, image, "refuse")
    mask = torch.zeros(1, 32, 48)
    mask[:, 0:8, 0:8] = 1
    plan, _ = node(pack, "NUWADirectionPlanner")(model, canvas, 0, 1, 0, 0, 0, 0, "center", mask, feather=0)
    assert [len(p) for p in plan.plans] == [1, 2] and tuple(plan.plans[-1].grid) == (1, 2, 4)
    out, grown = node(pack, "NUWAPatchRenderer")(model, canvas, plan, 4, "auto", 4, 1.0, 16, 1.0)
    assert out.shape == (1, 32, 64, 3) and bool(grown.known.all())
    kept = torch.ones(32, 48, dtype=torch.bool)
    kept[0:8, 0:8] = False
    assert torch.equal(out[0, :, :48][kept], image[0][kept])
    unpainted = torch.zeros(1, 64, 64)  # LoadImage's mask of an image without alpha: a different size, all 0
    plan, _ = node(pack, "NUWADirectionPlanner")(model, canvas, 0, 1, 0, 0, 0, 0, "center", unpainted)
    assert [len(p) for p in plan.plans] == [2] and plan.regenerate is None


def test_a_mask_of_another_size_names_the_sizes_that_fit(pack, model):
    (canvas,) = node(pack, "NUWAVQGANEncode")(model, torch.rand(1, 32, 60, 3), "crop")
    with pytest.raises(ValueError, match=r"mask is 20x10 px; .*the canvas 48x32 or the encoded image 60x32"):
        node(pack, "NUWADirectionPlanner")(model, canvas, 0, 0, 0, 0, 0, 0, "center", torch.ones(1, 10, 20))


def test_pads_in_pixels_round_up_to_patches_and_the_preview_names_the_patch_size(pack, model):
    (canvas,) = node(pack, "NUWAVQGANEncode")(model, torch.rand(1, 32, 32, 3), "refuse")
    plan, preview = node(pack, "NUWADirectionPlanner")(model, canvas, 1, 20, 0, 16, 0, 0, "center", None,
                                                       units="pixels")
    assert tuple(plan.plans[-1].grid) == (1, 3, 5) and tuple(plan.plans[-1].offset) == (0, 1)
    out = pack["NUWADirectionPlanner"]().plan(model, canvas, 1, 20, 0, 16, 0, 0, "center", units="pixels")
    info = out["ui"]["nuwa_plan"][0]
    assert info["grid"] == [1, 3, 5] and info["old_grid"] == [1, 2, 2] and info["offset"] == [0, 1]
    assert info["patch_px"] == [16, 16] and len(info["order"]) == 15 - 4 == sum(info["segments"])
    assert info["known"][0] == [0, 1, 1, 0, 0] and info["known"][2] == [0] * 5
    assert preview.shape[1] > 3 * 16, "the caption band is missing"
    with pytest.raises(ValueError, match="units must be one of"):
        node(pack, "NUWADirectionPlanner")(model, canvas, 1, 0, 0, 0, 0, 0, "center", None, units="inches")


def test_empty_canvas_and_context(pack, model):
    (canvas,) = node(pack, "NUWAEmptyCanvas")(model, 40, 20, 1, 2)
    assert canvas.grid == (1, 2, 3) and canvas.batch == 2
    plan, _ = node(pack, "NUWADirectionPlanner")(model, canvas, 0, 0, 0, 0, 0, 0, "center")
    (ctx,) = node(pack, "NUWAContextPool")(-1, -1, -1)
    image, _ = node(pack, "NUWAPatchRenderer")(model, canvas, plan, 0, "auto", 4, 1.0, 0, 0.9, None, ctx)
    assert image.shape == (2, 32, 48, 3)
    (wide,) = node(pack, "NUWAContextPool")(5, -1, -1)
    with pytest.raises(ValueError, match="trained"):
        node(pack, "NUWAPatchRenderer")(model, canvas, plan, 0, "auto", 4, 1.0, 0, 0.9, None, wide)


def test_conditioning_is_taken_from_clip_text_encode_format(pack):
    from nuwa_core.infinity.generation import NuwaInfinity  # noqa: F401  (engine present)
    engine = sys.modules[f"{import_pack().__name__}.nodes._engine"]
    cond = [[torch.randn(1, 77, 768), {"pooled_output": torch.randn(1, 768)}]]
    assert engine.text_from_conditioning(cond).shape == (1, 77, 768)
    with pytest.raises(ValueError, match="CLIP Text Encode"):
        engine.text_from_conditioning([])


def test_canvas_save_load_round_trip(pack, model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (canvas,) = node(pack, "NUWAVQGANEncode")(model, torch.rand(1, 32, 32, 3), "refuse")
    ui = node(pack, "NUWACanvasSave")(canvas, "runs/../x/canvas")
    saved = ui["ui"]["nuwa_canvas"][0]
    assert saved["filename"] == "canvas_00001.nuwacanvas.safetensors" and saved["subfolder"] == "runs/x"
    cls = pack["NUWACanvasLoad"]
    listed = f"runs/x/{saved['filename']} [output]"
    assert cls.INPUT_TYPES()["required"]["canvas_file"][0] == ["latest", listed]  # no copying to input/
    assert cls.VALIDATE_INPUTS(listed) is True
    (loaded,) = node(pack, "NUWACanvasLoad")(listed)
    assert torch.equal(loaded.tokens, canvas.tokens) and torch.equal(loaded.given, canvas.given)
    (tmp_path / "input").mkdir()  # canvases copied into the input folder, as before, still load
    (tmp_path / "output" / "runs" / "x" / saved["filename"]).rename(tmp_path / "input" / saved["filename"])
    assert cls.INPUT_TYPES()["required"]["canvas_file"][0] == ["latest", saved["filename"]]
    (loaded,) = node(pack, "NUWACanvasLoad")(saved["filename"])
    assert torch.equal(loaded.tokens, canvas.tokens)
    assert "not found" in cls.VALIDATE_INPUTS("nope.nuwacanvas.safetensors")
    with pytest.raises(ValueError, match="inside the folder"):
        cls.VALIDATE_INPUTS("../../etc/passwd")


def test_latest_continues_the_last_saved_canvas_and_starts_from_start(pack, model, tmp_path, monkeypatch):
    """A canvas grown run after run: 'latest' loads what the previous run saved under the prefix; before
    the first save it asks for (lazily) and passes on the start canvas."""
    monkeypatch.chdir(tmp_path)
    cls, load = pack["NUWACanvasLoad"], node(pack, "NUWACanvasLoad")
    (start,) = node(pack, "NUWAVQGANEncode")(model, torch.rand(1, 32, 32, 3), "refuse")
    assert cls().check_lazy_status("latest", "grow/c") == ["start"] and cls.IS_CHANGED("latest", "grow/c") == "none"
    with pytest.raises(ValueError, match=r"no canvas saved under 'grow/c' yet .*connect a start canvas"):
        load("latest", "grow/c")
    widths = []
    for run in range(3):
        (canvas,) = load("latest", "grow/c", start=start)
        plan, _ = node(pack, "NUWADirectionPlanner")(model, canvas, 0, 1, 0, 0, 0, 0, "center")
        image, grown = node(pack, "NUWAPatchRenderer")(model, canvas, plan, run, "auto", 4, 1.0, 16, 1.0)
        ui = node(pack, "NUWACanvasSave")(grown, "grow/c", image)
        widths.append(image.shape[2])
        assert cls().check_lazy_status("latest", "grow/c") == []
        assert ui["ui"]["images"][0]["filename"] == f"c_{run + 1:05d}.png"
    assert widths == [48, 64, 80]  # each run continued the previous one
    changed = cls.IS_CHANGED("latest", "grow/c")
    assert changed.endswith(str((tmp_path / "output" / "grow" / "c_00003.nuwacanvas.safetensors").stat().st_mtime_ns))
    (other,) = load("latest", "other/c", start=start)
    assert other is start  # another prefix: nothing saved there yet

def test_progress_preview_and_cancel_run_per_wavefront_step(pack, model, monkeypatch):
    """A 4 x 4 blank canvas renders in 10 wavefront steps: the bar moves once per step to the patches
    made so far, a preview can be shown at each, and ComfyUI's interrupt stops the run between steps."""
    comfy = sys.modules[f"{import_pack().__name__}.nodes._comfy"]
    updates, previews = [], []

    class Bar:
        def update_absolute(self, done, total, preview=None):
            updates.append((done, total))
            previews.append(preview is not None)

    monkeypatch.setattr(comfy.Progress, "__init__", lambda self, total: setattr(self, "total", total)
                        or setattr(self, "bar", Bar()))
    (canvas,) = node(pack, "NUWAEmptyCanvas")(model, 64, 64, 1, 1)
    plan, _ = node(pack, "NUWADirectionPlanner")(model, canvas, 0, 0, 0, 0, 0, 0, "center")
    node(pack, "NUWAPatchRenderer")(model, canvas, plan, 3, "auto", 4, 1.0, 16, 1.0)
    assert [d for d, _ in updates] == [1, 2, 4, 6, 8, 10, 12, 14, 15, 16] and {t for _, t in updates} == {16}
    assert previews[0] and previews[-1]  # the first step and the finished canvas are previewed

    class Interrupted(Exception):
        pass
    calls = []
    monkeypatch.setattr(comfy, "check_interrupted", lambda: calls.append(1) if len(calls) < 3 else
                        (_ for _ in ()).throw(Interrupted()))
    updates.clear()
    with pytest.raises(Interrupted):
        node(pack, "NUWAPatchRenderer")(model, canvas, plan, 3, "auto", 4, 1.0, 16, 1.0)
    assert [d for d, _ in updates] == [1, 2, 4]  # stopped at the fourth step's check
