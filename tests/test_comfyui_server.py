"""Real ComfyUI server with this pack installed (skipped unless COMFYUI_DIR is set).

    COMFYUI_DIR=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/comfy/venv/bin/python \
        python -m pytest -q -m comfyui tests/test_comfyui_server.py
"""
from __future__ import annotations

import copy
import importlib.util
import json
import sys
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.comfyui

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((Path(__file__).resolve().parent / "workflows").glob("*.json"))
RUN_TIMEOUT = 300


def _pack_mappings():
    name = "_nuwa_pack_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    module = sys.modules[name]
    return module.NODE_CLASS_MAPPINGS, module.NODE_DISPLAY_NAME_MAPPINGS


def _queue(server, prompt, client_id):
    status, body = server.post("/prompt", {"prompt": prompt, "client_id": client_id})
    assert status == 200, f"POST /prompt answered {status}: {json.dumps(body, indent=1)[:3000]}"
    return body["prompt_id"]


def _follow(server, ws, prompt_id, deadline, on_message=None):
    """Collect this prompt's websocket messages until it succeeds, fails or is interrupted."""
    seen = []
    try:
        for msg in ws.messages(deadline):
            data = msg.get("data") or {}
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            seen.append(msg)
            if on_message is not None:
                on_message(msg)
            if msg["type"] in ("execution_success", "execution_error", "execution_interrupted"):
                return seen
    except TimeoutError:
        raise AssertionError(f"prompt {prompt_id} did not finish in time; last messages: "
                             f"{[m['type'] for m in seen][-20:]}\nserver log:\n{server.log()[-3000:]}") from None
    return seen


def test_pack_imports_without_failure(comfyui_server):
    log = comfyui_server.log()
    failed = [line for line in log.splitlines() if "IMPORT FAILED" in line and "ComfyUI-NUWA" in line]
    assert not failed, f"the pack failed to import:\n{log[-6000:]}"
    assert "ComfyUI-NUWA" in log, "the pack's import-time line is missing: was it loaded at all?\n" + log[-3000:]


def test_object_info_lists_every_node(comfyui_server):
    info = comfyui_server.get("/object_info")
    mappings, names = _pack_mappings()
    missing = sorted(set(mappings) - set(info))
    assert not missing, f"nodes missing from /object_info: {missing}"
    for node_id in mappings:
        entry = info[node_id]
        assert entry["category"].startswith("NUWA/"), node_id
        assert entry["display_name"] == names[node_id]
        assert entry["description"], f"{node_id} has no DESCRIPTION"
        for section in ("required", "optional"):
            for inp, spec in entry["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_id}.{inp} has no tooltip"
    loader = info["NUWAModelLoader"]["input"]["required"]["model_name"]
    assert "nuwa_test_tiny.safetensors" in loader[0], loader


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[w.stem for w in WORKFLOWS])
def test_workflow_runs(comfyui_server, workflow):
    prompt = json.loads(workflow.read_text())
    client_id = uuid.uuid4().hex
    ws = comfyui_server.websocket(client_id)
    try:
        prompt_id = _queue(comfyui_server, prompt, client_id)
        seen = _follow(comfyui_server, ws, prompt_id, time.monotonic() + RUN_TIMEOUT)
    finally:
        ws.close()
    types = [m["type"] for m in seen]
    assert types and types[-1] == "execution_success", (
        f"{workflow.name}: {json.dumps(seen[-1] if seen else None, indent=1)[:4000]}\n"
        f"server log:\n{comfyui_server.log()[-4000:]}")
    assert "progress" in types, f"{workflow.name}: no progress message; saw {sorted(set(types))}"
    history = comfyui_server.get(f"/history/{prompt_id}")[prompt_id]
    outputs = history["outputs"]
    save_nodes = [nid for nid, node in prompt.items() if node["class_type"] == "SaveImage"]
    for nid in save_nodes:
        images = outputs[nid]["images"]
        assert images, f"{workflow.name}: SaveImage {nid} produced nothing"
        for image in images:
            path = comfyui_server.base / "output" / image["subfolder"] / image["filename"]
            assert path.is_file() and path.stat().st_size > 0, path


def test_invalid_widget_is_a_validation_error(comfyui_server):
    prompt = json.loads((Path(__file__).parent / "workflows" / "outpaint_right.json").read_text())
    # every output of this workflow depends on the planner, so nothing can run: 400
    bad = copy.deepcopy(prompt)
    planner = next(nid for nid, n in bad.items() if n["class_type"] == "NUWADirectionPlanner")
    bad[planner]["inputs"]["anchor"] = "nowhere"
    bad[planner]["inputs"]["left"] = -5
    status, body = comfyui_server.post("/prompt", {"prompt": bad, "client_id": uuid.uuid4().hex})
    assert status == 400, body
    errors = body["node_errors"][planner]["errors"]
    assert {e["type"] for e in errors} >= {"value_not_in_list", "value_smaller_than_min"}, errors
    # a bad renderer widget is reported too; ComfyUI still runs outputs that do not depend on it
    bad = copy.deepcopy(prompt)
    renderer = next(nid for nid, n in bad.items() if n["class_type"] == "NUWAPatchRenderer")
    bad[renderer]["inputs"]["decoder"] = "not-a-decoder"
    for nid in [nid for nid, n in bad.items() if n["class_type"] == "PreviewImage" and n["inputs"]["images"][0] == planner]:
        del bad[nid]
    status, body = comfyui_server.post("/prompt", {"prompt": bad, "client_id": uuid.uuid4().hex})
    assert status == 400 and renderer in body["node_errors"], body
    # the server is still healthy
    assert comfyui_server.get("/system_stats")["system"]


def test_interrupt_stops_a_long_run(comfyui_server):
    prompt = json.loads((Path(__file__).parent / "workflows" / "outpaint_right.json").read_text())
    planner = next(nid for nid, n in prompt.items() if n["class_type"] == "NUWADirectionPlanner")
    prompt[planner]["inputs"].update(left=0, right=60, up=0, down=1)  # hundreds of patches
    renderer = next(nid for nid, n in prompt.items() if n["class_type"] == "NUWAPatchRenderer")
    prompt[renderer]["inputs"]["seed"] = 12345  # not cached from the other tests
    client_id = uuid.uuid4().hex
    ws = comfyui_server.websocket(client_id)
    interrupted = {"sent": False}

    def on_message(msg):
        if msg["type"] == "progress" and not interrupted["sent"] and msg["data"].get("node") == renderer:
            status, _ = comfyui_server.post("/interrupt", {})
            assert status == 200
            interrupted["sent"] = True

    try:
        prompt_id = _queue(comfyui_server, prompt, client_id)
        seen = _follow(comfyui_server, ws, prompt_id, time.monotonic() + RUN_TIMEOUT, on_message)
    finally:
        ws.close()
    assert interrupted["sent"], "the renderer never reported progress"
    types = [m["type"] for m in seen]
    assert types[-1] == "execution_interrupted", f"expected an interrupted run, got {types[-5:]}"
    progress = [m["data"]["value"] for m in seen if m["type"] == "progress" and m["data"].get("node") == renderer]
    total = next(m["data"]["max"] for m in seen if m["type"] == "progress" and m["data"].get("node") == renderer)
    assert max(progress) < total, "the run finished before the interrupt took effect"
    # the server still runs prompts afterwards
    assert comfyui_server.get("/system_stats")["system"]
