"""Real ComfyUI server with this pack installed (skipped unless COMFYUI_DIR is set).

    COMFYUI_DIR=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/comfy/venv/bin/python \
        python -m pytest -q -m comfyui tests/test_comfyui_server.py
"""
from __future__ import annotations

import copy
import json
import time
import uuid
from pathlib import Path

import pytest

from _comfyui import PACK_LINK_NAME, SHIPPED_RUN_TIMEOUT, animated_frames, browser_env
from _pack import import_pack
from _workflows import API_DIR, CORE_NODES, RUNNABLE, SHIPPED_IMAGES, SHIPPED_MODELS, SHIPPED_RUNS, UI_DIR, XL_WORKFLOWS

pytestmark = pytest.mark.comfyui

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((Path(__file__).resolve().parent / "workflows").glob("*.json"))
RUN_TIMEOUT = 300


def test_pack_imports_without_failure(comfyui_server):
    log = comfyui_server.log()
    failed = [line for line in log.splitlines() if "IMPORT FAILED" in line and "ComfyUI-NUWA" in line]
    assert not failed, f"the pack failed to import:\n{log[-6000:]}"
    assert "ComfyUI-NUWA" in log, "the pack's import-time line is missing: was it loaded at all?\n" + log[-3000:]


def test_object_info_lists_every_node(comfyui_server):
    info = comfyui_server.get("/object_info")
    pack = import_pack()
    mappings, names = pack.NODE_CLASS_MAPPINGS, pack.NODE_DISPLAY_NAME_MAPPINGS
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
    types, outputs = comfyui_server.run_prompt(prompt, workflow.name, RUN_TIMEOUT)
    assert "progress" in types, f"{workflow.name}: no progress message; saw {sorted(set(types))}"
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
        prompt_id = comfyui_server.queue(prompt, client_id)
        seen = comfyui_server.follow(ws, prompt_id, time.monotonic() + RUN_TIMEOUT, on_message)
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


# --- the shipped example workflows (example_workflows/, API copies in tests/workflows/shipped/) ---

@pytest.fixture(scope="module")
def shipped_server(comfyui_server):
    """The server, with the shipped models reachable (ComfyUI searches the pack's models/nuwa/). Nothing is
    put into its input folder: the pack copied the templates' example images there when ComfyUI loaded it
    (checked here), as in a user's fresh ComfyUI."""
    from nuwa_core.checkpoint import CheckpointError
    from nuwa_core.infinity.generation import NuwaInfinity
    shipped = REPO / "models" / "nuwa"
    for name in (*SHIPPED_MODELS, *SHIPPED_IMAGES):
        if not (shipped / name).is_file():
            pytest.skip(f"models/nuwa/{name} is absent")
    for name in SHIPPED_MODELS:
        try:
            NuwaInfinity.load(shipped / name)
        except CheckpointError as err:  # a real failure of the shipped workflows, named before ComfyUI hides it
            pytest.fail(f"the shipped workflows cannot run: {err}")
    for name in SHIPPED_IMAGES:
        copied = comfyui_server.base / "input" / name
        assert copied.is_file(), (f"the pack did not copy {name} into ComfyUI's input folder when it loaded:\n"
                                  f"{comfyui_server.log()[-3000:]}")
        assert copied.read_bytes() == (shipped / name).read_bytes(), name
    return comfyui_server


def test_templates_are_served_from_example_workflows(comfyui_server):
    """Workflow -> Browse Templates: /workflow_templates lists the pack's templates under its folder name,
    and each template and its thumbnail is served from example_workflows/ (no rename hint in the log)."""
    import urllib.request
    listed = comfyui_server.get("/workflow_templates")
    names = sorted(p.stem for p in UI_DIR.glob("*.json"))
    assert sorted(listed.get(PACK_LINK_NAME, [])) == names, listed
    for name in names:
        for suffix in (".json", ".jpg"):
            url = f"{comfyui_server.url}/api/workflow_templates/{PACK_LINK_NAME}/{name}{suffix}"
            with urllib.request.urlopen(url, timeout=30) as r:
                assert r.status == 200 and r.read() == (UI_DIR / f"{name}{suffix}").read_bytes(), url
    assert "consider renaming it to 'example_workflows'" not in comfyui_server.log()


# The real frontend opens each runnable template as Browse Templates does (fetched from the server's template
# route, app.loadGraphData), queues it with its own Queue call (app.queuePrompt), reads the prompt id from its
# POST /api/prompt, records the prompt's messages on the page's websocket and waits for its /history entry.
_QUEUE_SCRIPT = r"""
const { chromium } = require(process.env.NUWA_PLAYWRIGHT_CORE);
(async () => {
  const [url, pack, timeoutS, ...names] = process.argv.slice(2);
  const browser = await chromium.launch({executablePath: process.env.NUWA_CHROMIUM, headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking']});
  const out = {results: {}};
  try {
    const page = await browser.newPage();
    let pageErrors = [];
    page.on('pageerror', e => pageErrors.push(String(e)));
    const frames = [];  // [prompt_id, type] of the websocket's JSON messages
    page.on('websocket', ws => ws.on('framereceived', f => {
      if (typeof f.payload !== 'string') return;  // binary preview images
      try { const m = JSON.parse(f.payload); frames.push([(m.data || {}).prompt_id, m.type]); } catch (e) {}
    }));
    await page.goto(url, {waitUntil: 'load', timeout: 180000});
    await page.waitForFunction(() => window.app && window.app.graph && window.LiteGraph, null, {timeout: 180000});
    await page.waitForTimeout(2000);
    for (const name of names) {
      pageErrors = [];
      const started = Date.now();
      const result = {};
      out.results[name] = result;
      await page.keyboard.press('Escape');
      const loaded = await page.evaluate(async ([pack, name]) => {
        const r = await fetch(`/api/workflow_templates/${pack}/${name}.json`);
        if (r.status !== 200) return {status: r.status};
        await window.app.loadGraphData(await r.json(), true, true, name);
        return {status: 200, nodes: window.app.graph.nodes.length};
      }, [pack, name]);
      result.loaded = loaded;
      if (loaded.status !== 200) continue;
      await page.waitForTimeout(1000);
      const posted = page.waitForResponse(r => r.url().endsWith('/api/prompt') && r.request().method() === 'POST',
                                          {timeout: 120000});
      await page.evaluate(() => window.app.queuePrompt(0, 1));
      const response = await posted;
      result.postStatus = response.status();
      result.postBody = await response.json();
      const id = result.postBody.prompt_id;
      if (result.postStatus === 200 && id) {
        const deadline = Date.now() + Number(timeoutS) * 1000;
        while (Date.now() < deadline) {
          const history = await page.evaluate(async id => (await fetch(`/api/history/${id}`)).json(), id);
          if (history[id]) {
            result.status = history[id].status;
            result.outputs = history[id].outputs;
            result.prompt = history[id].prompt[2];
            break;
          }
          await page.waitForTimeout(1000);
        }
      }
      await page.waitForTimeout(500);  // the last websocket frames
      result.messages = frames.filter(([pid]) => pid === id).map(([, type]) => type);
      result.dialogs = await page.evaluate(() => [...document.querySelectorAll('.p-dialog')].map(d => d.innerText));
      result.pageErrors = pageErrors;
      result.seconds = (Date.now() - started) / 1000;
    }
  } finally {
    await browser.close();
  }
  console.log(JSON.stringify(out));
})().catch(e => { console.error(e); process.exit(1); });
"""


@pytest.fixture(scope="module")
def frontend_runs(shipped_server, tmp_path_factory) -> dict | str:
    """Every runnable template queued once from the real frontend (_QUEUE_SCRIPT): {name: result}, or why the
    browser could not be used. The tests below check these runs; without a browser they queue the API copies."""
    import subprocess
    env = browser_env()
    if isinstance(env, str):
        return env
    if not (REPO / "models" / "nuwa_xl" / "mtd_default.safetensors").is_file():
        return "models/nuwa_xl/mtd_default.safetensors is absent"
    script = tmp_path_factory.mktemp("frontend") / "queue_templates.js"
    script.write_text(_QUEUE_SCRIPT)
    start = time.monotonic()
    run = subprocess.run(["node", str(script), shipped_server.url + "/", PACK_LINK_NAME, str(SHIPPED_RUN_TIMEOUT),
                          *RUNNABLE], check=False, capture_output=True, text=True, env=env,
                         timeout=SHIPPED_RUN_TIMEOUT * len(RUNNABLE) + 600)
    assert run.returncode == 0, f"browser script failed:\n{run.stderr[-4000:]}\n{run.stdout[-2000:]}"
    results = json.loads(run.stdout.strip().splitlines()[-1])["results"]
    print(f"queued {len(RUNNABLE)} templates from the frontend in {time.monotonic() - start:.0f}s: "
          + ", ".join(f"{n} {results[n].get('seconds', 0):.0f}s" for n in RUNNABLE))
    return results


def test_frontend_queues_every_runnable_template(shipped_server, frontend_runs):
    """Each runnable template (tests/_workflows.py RUNNABLE: all but those whose model is not shipped), opened
    and queued from the real frontend in this fresh ComfyUI, is accepted, runs to success on the shipped models
    with every saving node's files written, and the page raises no error. What ran is the template's API copy."""
    if isinstance(frontend_runs, str):
        pytest.skip(frontend_runs)
    for name in RUNNABLE:
        result = frontend_runs[name]
        assert result["loaded"]["status"] == 200, f"{name}: the template route answered {result['loaded']}"
        assert result["postStatus"] == 200, f"{name}: the server refused the prompt: {json.dumps(result['postBody'])[:3000]}"
        assert result.get("status"), f"{name}: no /history entry within {SHIPPED_RUN_TIMEOUT:.0f}s"
        assert result["status"]["status_str"] == "success" and result["status"]["completed"], (
            f"{name}: {json.dumps(result['status'])[:4000]}\nserver log:\n{shipped_server.log()[-3000:]}")
        assert "execution_success" in result["messages"] and "execution_error" not in result["messages"], (
            name, result["messages"][-10:])
        assert not result["pageErrors"], f"{name}: page errors {result['pageErrors']}"
        assert not result["dialogs"], f"{name}: dialogs {result['dialogs']}"
        api = json.loads((API_DIR / f"{name}.json").read_text())
        ran = {nid: {"class_type": n["class_type"], "inputs": n["inputs"]} for nid, n in result["prompt"].items()}
        assert ran == api, f"{name}: the frontend queued\n{json.dumps(ran, indent=1)}"
        saving = [nid for nid, n in api.items() if n["class_type"] in SAVING_NODES]
        assert saving, f"{name}: no saving node ({SAVING_NODES})"
        for nid in saving:
            files = _saved_files(shipped_server, result["outputs"].get(nid, {}))
            assert files, f"{name}: {api[nid]['class_type']} {nid} saved nothing: {result['outputs']}"
            missing = [f for f in files if not f.is_file()]
            assert not missing, f"{name}: {api[nid]['class_type']} {nid} reported files that do not exist: {missing}"


# nodes that write files into the output folder, and the keys of their /history outputs that list them
SAVING_NODES = ("SaveImage", "SaveAnimatedWEBP", "NUWACanvasSave")


def _saved_files(server, node_outputs: dict) -> list[Path]:
    return [server.base / "output" / f["subfolder"] / f["filename"]
            for key in ("images", "nuwa_canvas") for f in node_outputs.get(key, []) if f.get("type") == "output"]


def _template_run(server, frontend_runs, name: str) -> tuple[dict, list[str], dict]:
    """(API prompt, websocket message types, /history outputs) of one run of a shipped template: the frontend's
    run when it succeeded (ComfyUI's cache keeps only the last prompt's outputs, so running the API copy again
    would compute it all a second time), else a run of its API copy."""
    prompt = json.loads((API_DIR / f"{name}.json").read_text())
    result = frontend_runs.get(name) if isinstance(frontend_runs, dict) else None
    if result and (result.get("status") or {}).get("status_str") == "success":
        ran = {nid: {"class_type": n["class_type"], "inputs": n["inputs"]} for nid, n in result["prompt"].items()}
        assert ran == prompt, f"{name}: the frontend ran another prompt than the API copy"
        print(f"{name}: checked on the frontend's run ({result['seconds']:.0f}s)")
        return prompt, result["messages"], result["outputs"]
    start = time.monotonic()
    types, outputs = server.run_prompt(prompt, name, SHIPPED_RUN_TIMEOUT)
    print(f"{name}: ran in {time.monotonic() - start:.1f}s")
    return prompt, types, outputs


def test_shipped_workflows_match_object_info(comfyui_server):
    """Every node of every shipped workflow exists in the live server, and the stock nodes'
    sockets and widgets are what tests/_workflows.py's allow-list says."""
    info = comfyui_server.get("/object_info")
    shipped = sorted(API_DIR.glob("*.json"))
    assert shipped
    for path in shipped:
        for nid, node in json.loads(path.read_text()).items():
            assert node["class_type"] in info, f"{path.name} node {nid}: {node['class_type']} unknown to the server"
    for node_type, spec in CORE_NODES.items():
        entry = info[node_type]
        inputs = {**entry["input"].get("required", {}), **entry["input"].get("optional", {})}
        widgets = [n for n, (kind, _) in spec["widgets"] if kind != "upload"]
        sockets = dict(spec["inputs"])
        for name in widgets:
            assert name in inputs, f"{node_type}: no widget {name!r} on the server ({sorted(inputs)})"
        for name, typ in sockets.items():
            assert name in inputs and inputs[name][0] == typ, f"{node_type}.{name}: {inputs.get(name)}"
        for name, (kind, _) in spec["widgets"]:  # combo values we allow must be offered by the server
            if isinstance(kind, (list, tuple)):
                served = inputs[name][0]
                served = served if isinstance(served, list) else inputs[name][1].get("options", [])
                assert set(kind) <= set(served), f"{node_type}.{name}: {sorted(set(kind) - set(served))} not offered"
        assert list(entry["output"]) == [t for _, t in spec["outputs"]], (node_type, entry["output"])


@pytest.mark.parametrize("name", list(SHIPPED_RUNS))
def test_shipped_workflow_runs(shipped_server, frontend_runs, name):
    """The shipped NUWA-Infinity templates run on the shipped models (outpaint_spiral and grow_canvas_across_runs
    on the painting model and its image) and make what they say: checked on the frontend's run of the template,
    or a run of its API copy without a browser.
    text_to_image_wide and text_to_video run on the shipped text model and its text encoder."""
    from PIL import Image
    server = shipped_server
    prompt, types, outputs = _template_run(server, frontend_runs, name)
    assert "progress" in types, f"{name}: no progress message; saw {sorted(set(types))}"
    saving = [nid for nid, n in prompt.items() if n["class_type"] in SAVING_NODES]
    files = [f for nid in saving for f in _saved_files(server, outputs.get(nid, {}))]
    assert saving and all(f.is_file() for f in files), f"{name}: saved {files}: {outputs}"
    pictures = [f for f in files if f.suffix.lower() in (".png", ".jpg", ".webp")]
    assert pictures, f"{name}: no picture saved: {files}"
    with Image.open(pictures[0]) as img:
        size = img.size
    image = SHIPPED_RUNS[name][1]
    if image:
        with Image.open(server.base / "input" / image) as img:
            src = img.size
    if name == "outpaint_spiral":
        assert size[0] > src[0] and size[1] > src[1], (size, src)  # grown on every side
        previews = [nid for nid, n in prompt.items() if n["class_type"] == "PreviewImage"]
        assert all(outputs[nid]["images"] for nid in previews), "the order preview is missing"
    elif name == "infinite_panorama":
        assert size[0] >= 2048 and size[0] >= 8 * size[1], size
    elif name == "grow_canvas_across_runs":  # a first run: the painting, cropped to whole patches, one patch wider
        assert src[0] < size[0] <= src[0] + 64 and size[1] <= src[1], (size, src)
    elif name == "image_animation":  # the still and the 20 frames added after it, at the still's size
        from _comfyui import animated_frames
        frames = animated_frames(pictures[0])
        assert len(frames) == 21 and frames[0].size == src, (len(frames), frames[0].size, src)
    elif name == "text_to_video":  # every frame of the empty canvas, at its size
        from _comfyui import animated_frames
        empty = next(n for n in prompt.values() if n["class_type"] == "NUWAEmptyCanvas")["inputs"]
        frames = animated_frames(pictures[0])
        assert len(frames) == empty["frames"] > 1 and frames[0].size == (empty["width"], empty["height"]), \
            (len(frames), frames[0].size, empty)
    if any(prompt[nid]["class_type"] == "NUWACanvasSave" for nid in saving):
        assert any(f.name.endswith(".nuwacanvas.safetensors") for f in files), f"{name}: no canvas saved: {files}"


# --- optional: the real frontend loads every shipped UI workflow without a missing-nodes dialog ---

_BROWSER_SCRIPT = r"""
const fs = require('fs');
const { chromium } = require(process.env.NUWA_PLAYWRIGHT_CORE);
(async () => {
  const [url, ...files] = process.argv.slice(2);
  const browser = await chromium.launch({executablePath: process.env.NUWA_CHROMIUM, headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking']});
  const out = {results: {}, pageErrors: []};
  try {
    const page = await browser.newPage();
    page.on('pageerror', e => out.pageErrors.push(String(e)));
    await page.goto(url, {waitUntil: 'load', timeout: 180000});
    await page.waitForFunction(() => window.app && window.app.graph && window.LiteGraph, null, {timeout: 180000});
    await page.waitForTimeout(2000);
    for (const f of files) {
      const wf = JSON.parse(fs.readFileSync(f, 'utf8'));
      await page.keyboard.press('Escape');
      await page.evaluate(async (wf) => { await window.app.loadGraphData(wf, true, true, null); }, wf);
      await page.waitForTimeout(1500);
      out.results[f] = await page.evaluate(async (wf) => {
        const types = window.LiteGraph.registered_node_types || {};
        const missing = wf.nodes.map(n => n.type).filter(t => !types[t]);
        const dialogs = [...document.querySelectorAll('.p-dialog')].map(d => d.innerText);
        const prompt = (await window.app.graphToPrompt()).output;
        return {missing, dialogs, nodes: window.app.graph.nodes.length, prompt};
      }, wf);
    }
  } finally {
    await browser.close();
  }
  console.log(JSON.stringify(out));
})().catch(e => { console.error(e); process.exit(1); });
"""


def test_frontend_loads_shipped_workflows(comfyui_server, tmp_path):
    """Headless Chromium opens the real frontend, loads each shipped UI workflow, and finds every
    node type registered, no 'missing nodes' dialog, and the frontend's own API conversion
    (graphToPrompt) equal to the committed API copy. Skipped without node, playwright-core
    (NUWA_PLAYWRIGHT_CORE=path/to/node_modules/playwright-core) or chromium (NUWA_CHROMIUM)."""
    import subprocess
    env = browser_env()
    if isinstance(env, str):
        pytest.skip(env)
    script = tmp_path / "load_workflows.js"
    script.write_text(_BROWSER_SCRIPT)
    files = sorted(UI_DIR.glob("*.json"))
    run = subprocess.run(["node", str(script), comfyui_server.url + "/", *map(str, files)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, f"browser script failed:\n{run.stderr[-4000:]}\n{run.stdout[-2000:]}"
    out = json.loads(run.stdout.strip().splitlines()[-1])
    for path in files:
        result = out["results"][str(path)]
        assert not result["missing"], f"{path.name}: node types unknown to the frontend: {result['missing']}"
        missing_dialogs = [d for d in result["dialogs"] if "missing" in d.lower()]
        assert not missing_dialogs, f"{path.name}: {missing_dialogs}"
        prompt = {nid: {"class_type": n["class_type"], "inputs": n["inputs"]} for nid, n in result["prompt"].items()}
        expected = json.loads((API_DIR / path.name).read_text())
        assert prompt == expected, f"{path.name}: the frontend converts it to\n{json.dumps(prompt, indent=1)}"


def _xl_frames(prompt: dict) -> int:
    """Frames an XL workflow makes: (L-1)^depth + 1, from Coarse-to-Fine or the KSampler route's Empty Latent Video;
    from a user's K frames (NUWA-XL Encode), (K-1)(L-1)+1 for each Local Diffusion level after it."""
    def count(ref) -> int:  # frames out of an IMAGE or NUWA-XL latents output
        node = prompt[ref[0]]
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "LoadImage":
            return 1
        if kind == "ImageBatch":
            return count(inputs["image1"]) + count(inputs["image2"])
        if kind == "NUWAXLEncode":
            return -(-count(inputs["images"]) // inputs["every"])
        if kind == "NUWAXLLocalDiffusion":
            return (count(inputs["keyframes"]) - 1) * (inputs["L"] - 1) + 1
        if kind == "NUWAXLDecode":
            return count(inputs["latents"])
        raise AssertionError(f"unexpected {kind} on the way to SaveAnimatedWEBP")
    if any(node["class_type"] == "NUWAXLEncode" for node in prompt.values()):
        save = next(node for node in prompt.values() if node["class_type"] == "SaveAnimatedWEBP")
        return count(save["inputs"]["images"])
    for node in prompt.values():
        if node["class_type"] == "NUWAXLCoarseToFine":
            return (node["inputs"]["L"] - 1) ** node["inputs"]["depth"] + 1
        if node["class_type"] == "NUWAXLEmptyLatentVideo":
            return (node["inputs"]["frames"] - 1) ** node["inputs"]["depth"] + 1
    raise AssertionError("no NUWA-XL Coarse-to-Fine or Empty Latent Video in the workflow")


@pytest.mark.parametrize("name", list(XL_WORKFLOWS))
def test_shipped_xl_workflow_runs(shipped_server, frontend_runs, name):
    """The NUWA-XL workflows (Coarse-to-Fine; stock KSampler per level) run on the shipped default XL model
    (models/nuwa_xl) and save an animated WEBP with every frame of the tree (checked on the frontend's run
    of the template, or a run of its API copy without a browser)."""
    if not (REPO / "models" / "nuwa_xl" / "mtd_default.safetensors").is_file():
        pytest.skip("models/nuwa_xl/mtd_default.safetensors is absent")
    prompt, types, outputs = _template_run(shipped_server, frontend_runs, name)
    assert "progress" in types, f"{name}: no progress message; saw {sorted(set(types))}"
    saved = [o["images"] for nid, o in outputs.items() if prompt[nid]["class_type"] == "SaveAnimatedWEBP"]
    assert saved and saved[0], f"{name}: SaveAnimatedWEBP produced nothing: {outputs}"
    webp = shipped_server.base / "output" / saved[0][0]["subfolder"] / saved[0][0]["filename"]
    frames = animated_frames(webp)  # merged identical frames counted by their duration
    assert len(frames) == _xl_frames(prompt), (len(frames), _xl_frames(prompt))
