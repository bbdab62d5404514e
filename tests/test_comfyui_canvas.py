"""The artist's canvas on a real ComfyUI server (skipped unless COMFYUI_DIR is set): a painted mask keeps
the image outside it, a mask of the uncropped image lands on the cropped canvas, and a canvas grows over
queued runs with no file copied by hand.

    COMFYUI_DIR=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/comfy/venv/bin/python \
        python -m pytest -q -m comfyui tests/test_comfyui_canvas.py
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.comfyui

RUN_TIMEOUT = 300
MODEL = "nuwa_test_tiny.safetensors"  # 16 px patches (tests/_comfyui.py writes it)


def _saved(server, entry) -> np.ndarray:
    with Image.open(server.base / "output" / entry["subfolder"] / entry["filename"]) as img:
        return np.asarray(img.convert("RGB"))


def test_a_painted_mask_keeps_the_unmasked_pixels_and_lands_on_the_cropped_canvas(comfyui_server):
    """LoadImage's mask (painted as transparency) of a 60 x 32 image encoded with fit=crop (6 px cut on each
    side): the stroke at x = 38-39 is in the canvas' third column, and every unmasked pixel of the output is
    the input's, byte for byte (feather 0)."""
    server = comfyui_server
    rng = np.random.default_rng(0)
    rgba = np.concatenate([rng.integers(0, 256, (32, 60, 3)), np.full((32, 60, 1), 255)], axis=2).astype(np.uint8)
    rgba[20:24, 38:40, 3] = 0  # the stroke: ComfyUI's mask is 1 - alpha
    Image.fromarray(rgba, "RGBA").save(server.base / "input" / "nuwa_test_stroke.png")
    prompt = {
        "1": {"class_type": "NUWAModelLoader", "inputs": {"model_name": MODEL}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "nuwa_test_stroke.png"}},
        "3": {"class_type": "NUWAVQGANEncode", "inputs": {"model": ["1", 0], "image": ["2", 0], "fit": "crop"}},
        "4": {"class_type": "NUWADirectionPlanner", "inputs": {
            "model": ["1", 0], "canvas": ["3", 0], "left": 0, "right": 0, "up": 0, "down": 0, "target_width": 0,
            "target_height": 0, "anchor": "center", "mask": ["2", 1], "units": "patches", "feather": 0}},
        "5": {"class_type": "NUWAPatchRenderer", "inputs": {
            "model": ["1", 0], "canvas": ["3", 0], "plan": ["4", 0], "seed": 3, "decoder": "auto", "steps": 4,
            "temperature": 1.0, "top_k": 16, "top_p": 1.0}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "nuwa_test/masked"}},
    }
    _, outputs = server.run_prompt(prompt, "masked", RUN_TIMEOUT)
    assert outputs["4"]["nuwa_plan"][0]["order"] == [[0, 1, 2]]  # the stroke's patch, not the uncropped column 1
    out = _saved(server, outputs["6"]["images"][0])
    given = rgba[:, 6:54, :3]
    assert out.shape == given.shape
    kept = np.ones(given.shape[:2], dtype=bool)
    kept[20:24, 32:34] = False
    assert np.array_equal(out[kept], given[kept]), "pixels outside the mask changed"
    assert np.abs(out[~kept].astype(int) - given[~kept]).mean() > 5, "the masked pixels were not regenerated"


def test_a_canvas_grows_over_queued_runs(comfyui_server):
    """The same prompt queued twice: Canvas Load 'latest' starts from the encoded image the first time and
    from what Canvas Save wrote the second time, so each run adds a column."""
    server = comfyui_server
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3)).astype(np.uint8)).save(
        server.base / "input" / "nuwa_test_grow.png")
    prompt = {
        "1": {"class_type": "NUWAModelLoader", "inputs": {"model_name": MODEL}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "nuwa_test_grow.png"}},
        "3": {"class_type": "NUWAVQGANEncode", "inputs": {"model": ["1", 0], "image": ["2", 0], "fit": "crop"}},
        "4": {"class_type": "NUWACanvasLoad", "inputs": {"canvas_file": "latest", "latest_prefix": "nuwa_test/grow",
                                                         "start": ["3", 0]}},
        "5": {"class_type": "NUWADirectionPlanner", "inputs": {
            "model": ["1", 0], "canvas": ["4", 0], "left": 0, "right": 1, "up": 0, "down": 0, "target_width": 0,
            "target_height": 0, "anchor": "center"}},
        "6": {"class_type": "NUWAPatchRenderer", "inputs": {
            "model": ["1", 0], "canvas": ["4", 0], "plan": ["5", 0], "seed": 5, "decoder": "auto", "steps": 4,
            "temperature": 1.0, "top_k": 16, "top_p": 1.0}},
        "7": {"class_type": "NUWACanvasSave", "inputs": {"canvas": ["6", 1], "filename_prefix": "nuwa_test/grow",
                                                         "image": ["6", 0]}},
    }
    from nuwa_core.infinity.canvas import CanvasState
    saved, canvases = [], []
    for run in range(2):
        _, outputs = server.run_prompt(prompt, f"grow run {run + 1}", RUN_TIMEOUT)
        entry = outputs["7"]
        assert entry["nuwa_canvas"][0]["filename"] == f"grow_{run + 1:05d}.nuwacanvas.safetensors"
        saved.append(_saved(server, entry["images"][0]))
        canvases.append(CanvasState.load(server.base / "output" / "nuwa_test" / entry["nuwa_canvas"][0]["filename"]))
    assert [s.shape[1] for s in saved] == [48, 64]
    first, second = canvases
    assert second.grid == (1, 2, 4) and bool(second.known.all())
    assert second.tokens[..., :first.tokens.shape[-1]].equal(first.tokens), "run 2 did not continue run 1's canvas"


def test_stock_image_pad_for_outpaint_feeds_the_planner(comfyui_server):
    """ImagePadForOutpaint's IMAGE (grey pads) and MASK (1 on the pads, feathered into the image): the pad's
    patches are generated, and every pixel of the image its mask leaves at 0 comes back byte for byte."""
    server = comfyui_server
    rgb = np.random.default_rng(2).integers(0, 256, (32, 32, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(server.base / "input" / "nuwa_test_pad.png")
    prompt = {
        "1": {"class_type": "NUWAModelLoader", "inputs": {"model_name": MODEL}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "nuwa_test_pad.png"}},
        "3": {"class_type": "ImagePadForOutpaint", "inputs": {"image": ["2", 0], "left": 0, "top": 0, "right": 16,
                                                              "bottom": 0, "feathering": 6}},
        "4": {"class_type": "NUWAVQGANEncode", "inputs": {"model": ["1", 0], "image": ["3", 0], "fit": "crop"}},
        "5": {"class_type": "NUWADirectionPlanner", "inputs": {
            "model": ["1", 0], "canvas": ["4", 0], "left": 0, "right": 0, "up": 0, "down": 0, "target_width": 0,
            "target_height": 0, "anchor": "center", "mask": ["3", 1], "units": "patches", "feather": 0}},
        "6": {"class_type": "NUWAPatchRenderer", "inputs": {
            "model": ["1", 0], "canvas": ["4", 0], "plan": ["5", 0], "seed": 7, "decoder": "auto", "steps": 4,
            "temperature": 1.0, "top_k": 16, "top_p": 1.0}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "nuwa_test/padded"}},
    }
    _, outputs = server.run_prompt(prompt, "pad for outpaint", RUN_TIMEOUT)
    # the feathered mask reaches 6 px into the image: its second column of patches and the pad's are generated
    assert sorted(map(tuple, outputs["5"]["nuwa_plan"][0]["order"])) == [(0, 0, 1), (0, 0, 2), (0, 1, 1), (0, 1, 2)]
    out = _saved(server, outputs["7"]["images"][0])
    assert out.shape == (32, 48, 3)
    assert np.array_equal(out[:, :32 - 6], rgb[:, :32 - 6]), "the image's pixels outside the mask changed"
    assert np.abs(out[:, 32:].astype(int) - 128).mean() > 5, "the pad is still grey"
