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
    assert len(plan) == 3 * 4 - 2 * 2 and tuple(plan.plan.grid) == (1, 3, 4)
    assert preview.shape == (1, 3 * preview.shape[1] // 3, preview.shape[2], 3) and preview.max() <= 1
    image_out, grown = node(pack, "NUWAPatchRenderer")(model, canvas, plan, 5, "auto", 4, 1.0, 16, 1.0)
    assert image_out.shape == (1, 48, 64, 3) and bool(grown.known.all())
    assert torch.equal(canvas.tokens, before) and canvas.grid == (1, 2, 2), "the input canvas was modified"
    again, _ = node(pack, "NUWAPatchRenderer")(model, canvas, plan, 5, "auto", 4, 1.0, 16, 1.0)
    assert torch.equal(again, image_out), "same seed, different image"
    (decoded,) = node(pack, "NUWAVQGANDecode")(model, grown)
    assert decoded.shape == image_out.shape


def test_render_epsilon_reaches_the_sampler(pack, model):
    """epsilon 0.5 keeps only the likeliest token: the same canvas as top-k 1; the default differs."""
    (canvas,) = node(pack, "NUWAVQGANEncode")(model, torch.rand(1, 32, 40, 3), "crop")
    plan, _ = node(pack, "NUWADirectionPlanner")(model, canvas, 1, 1, 0, 1, 0, 0, "center")
    render = node(pack, "NUWAPatchRenderer")
    greedy = render(model, canvas, plan, 3, "auto", 4, 1.0, 1, 1.0, epsilon=0.0)[1].tokens
    assert torch.equal(render(model, canvas, plan, 7, "auto", 4, 1.0, 0, 1.0, epsilon=0.5)[1].tokens, greedy)
    assert not torch.equal(render(model, canvas, plan, 7, "auto", 4, 1.0, 0, 1.0)[1].tokens, greedy)


def test_target_size_and_mask_plans(pack, model):
    (canvas,) = node(pack, "NUWAVQGANEncode")(model, torch.rand(1, 32, 32, 3), "refuse")
    plan, _ = node(pack, "NUWADirectionPlanner")(model, canvas, 0, 0, 0, 0, 64, 48, "top_left")
    assert tuple(plan.plan.grid) == (1, 3, 4) and tuple(plan.plan.offset) == (0, 0)
    mask = torch.zeros(1, 32, 32)
    mask[:, 20:30, 20:30] = 1
    plan, _ = node(pack, "NUWADirectionPlanner")(model, canvas, 0, 0, 0, 0, 0, 0, "center", mask)
    assert [tuple(c) for s in plan.plan.segments for c in s.patches] == [(0, 1, 1)]
    _, out = node(pack, "NUWAPatchRenderer")(model, canvas, plan, 1, "auto", 4, 1.0, 16, 1.0)
    assert bool(out.known.all()) and bool(canvas.known.all())
    with pytest.raises(ValueError, match="no patch is masked"):
        node(pack, "NUWADirectionPlanner")(model, canvas, 0, 0, 0, 0, 0, 0, "center", torch.zeros(1, 32, 32))


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
    src = tmp_path / "output" / "runs" / "x" / saved["filename"]
    (tmp_path / "input").mkdir()
    src.rename(tmp_path / "input" / saved["filename"])
    cls = pack["NUWACanvasLoad"]
    assert cls.INPUT_TYPES()["required"]["canvas_file"][0] == [saved["filename"]]
    assert cls.VALIDATE_INPUTS(saved["filename"]) is True
    assert "not found" in cls.VALIDATE_INPUTS("nope.nuwacanvas.safetensors")
    (loaded,) = node(pack, "NUWACanvasLoad")(saved["filename"])
    assert torch.equal(loaded.tokens, canvas.tokens)
    with pytest.raises(ValueError, match="inside the input folder"):
        cls.VALIDATE_INPUTS("../../etc/passwd")
