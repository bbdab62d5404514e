"""NUWA Train One-Shot on a real ComfyUI server (skipped without COMFYUI_DIR; see tests/conftest.py).

A short budget trains, saves the model where the Model Loader lists it and feeds it on to the nodes after
it; ComfyUI's cancel stops a run within seconds, with the server running on and the run's progress kept."""
from __future__ import annotations

import json
import time
import uuid

import pytest

RUN_TIMEOUT = 300

pytestmark = pytest.mark.comfyui
IMAGE = "nuwa_infinity_starry_night.jpg"  # copied into the input folder by the pack when ComfyUI loads it


def _prompt(name: str, minutes: float, seed: int) -> dict:
    """Load Image -> Train One-Shot -> VQGAN Encode -> VQGAN Decode -> Preview Image (an output node pulls it)."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": IMAGE}},
        "2": {"class_type": "NUWATrainOneShot", "inputs": {"image": ["1", 0], "minutes": minutes, "model_name": name,
                                                           "continue_training": False, "seed": seed}},
        "3": {"class_type": "NUWAVQGANEncode", "inputs": {"model": ["2", 0], "image": ["1", 0], "fit": "crop"}},
        "4": {"class_type": "NUWAVQGANDecode", "inputs": {"model": ["2", 0], "canvas": ["3", 0]}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
    }


def test_training_saves_a_model_the_loader_lists(comfyui_server):
    name = f"server_{uuid.uuid4().hex[:6]}"
    types, outputs = comfyui_server.run_prompt(_prompt(name, 1.0, 1), "train one-shot", RUN_TIMEOUT)
    assert "progress" in types and outputs["5"]["images"], (types, outputs)
    model = comfyui_server.base / "models" / "nuwa" / f"{name}.safetensors"
    assert model.is_file(), sorted(p.name for p in model.parent.iterdir())
    from nuwa_core.checkpoint import read_metadata
    record = json.loads(read_metadata(model)["one_shot"])
    assert record["settings"]["minutes"] == 1.0 and record["renderer_steps"] > 0, record
    listed = comfyui_server.get("/object_info/NUWAModelLoader")["NUWAModelLoader"]["input"]["required"]["model_name"][0]
    assert f"{name}.safetensors" in listed and not any(n.startswith("training/") for n in listed), listed


def test_cancel_stops_training_within_seconds_and_keeps_its_progress(comfyui_server):
    name = f"cancel_{uuid.uuid4().hex[:6]}"
    prompt = _prompt(name, 5.0, 2)
    client_id = uuid.uuid4().hex
    ws = comfyui_server.websocket(client_id)
    sent = {}

    def on_message(msg):
        if msg["type"] == "progress" and "at" not in sent and msg["data"].get("node") == "2":
            status, _ = comfyui_server.post("/interrupt", {})
            assert status == 200
            sent["at"] = time.monotonic()

    try:
        prompt_id = comfyui_server.queue(prompt, client_id)
        seen = comfyui_server.follow(ws, prompt_id, time.monotonic() + RUN_TIMEOUT, on_message)
    finally:
        ws.close()
    stopped_after = time.monotonic() - sent["at"]
    assert [m["type"] for m in seen][-1] == "execution_interrupted", [m["type"] for m in seen][-5:]
    assert stopped_after < 60, f"the run went on for {stopped_after:.0f} s after cancel"
    work = comfyui_server.base / "models" / "nuwa" / "training" / name
    state = json.loads((work / "one_shot.json").read_text())
    assert state["tokenizer"]["started"], state
    assert (work / "tokenizer.safetensors.train.safetensors").is_file(), sorted(p.name for p in work.iterdir())
    assert comfyui_server.get("/system_stats")["system"]  # the server runs on
