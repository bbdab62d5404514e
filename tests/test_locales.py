"""locales/en/nodeDefs.json: the frontend labels every input of every node from it (ComfyUI serves a pack's
locales/ folder; its frontend names an input `nodeDefs.<node>.inputs.<input>.name`, falling back to the raw
input name such as `e_w`)."""
import json
from pathlib import Path

import pytest

LOCALE = Path(__file__).resolve().parent.parent / "locales" / "en" / "nodeDefs.json"


def test_every_input_of_every_node_has_a_display_name_and_no_name_is_stale(pack):
    names = json.loads(LOCALE.read_text())
    missing, stale = [], []
    for node_id, cls in pack.items():
        spec = cls.INPUT_TYPES()
        inputs = [name for section in ("required", "optional") for name in spec.get(section, {})]
        labelled = names.get(node_id, {}).get("inputs", {})
        missing += [f"{node_id}.{name}" for name in inputs if not labelled.get(name, {}).get("name")]
        stale += [f"{node_id}.{name}" for name in labelled if name not in inputs]
    stale += [node_id for node_id in names if node_id not in pack]
    assert not missing, f"inputs without a display name in {LOCALE.name}: {missing}"
    assert not stale, f"names in {LOCALE.name} for inputs or nodes that do not exist: {stale}"


_LABELS_SCRIPT = r"""
const { chromium } = require(process.env.NUWA_PLAYWRIGHT_CORE);
(async () => {
  const browser = await chromium.launch({executablePath: process.env.NUWA_CHROMIUM, headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu']});
  try {
    const page = await browser.newPage();
    await page.goto(process.argv[2], {waitUntil: 'load', timeout: 180000});
    await page.waitForFunction(() => window.app && window.app.graph && window.LiteGraph, null, {timeout: 180000});
    const labels = await page.evaluate(() => {
      const out = {};
      for (const type of ['NUWAContextPool', 'NUWADirectionPlanner']) {
        const node = window.LiteGraph.createNode(type);
        window.app.graph.add(node);
        out[type] = Object.fromEntries((node.widgets || []).map(w => [w.name, w.label]));
      }
      return out;
    });
    console.log(JSON.stringify(labels));
  } finally {
    await browser.close();
  }
})().catch(e => { console.error(e); process.exit(1); });
"""


@pytest.mark.comfyui
def test_the_real_frontend_shows_the_display_names(comfyui_server, tmp_path):
    """The shipped frontend labels the Context Pool's widgets from the locale, not as e_w / e_h / e_f."""
    import subprocess

    from _comfyui import browser_env
    env = browser_env()
    if isinstance(env, str):
        pytest.skip(env)
    script = tmp_path / "labels.js"
    script.write_text(_LABELS_SCRIPT)
    run = subprocess.run(["node", str(script), comfyui_server.url + "/"], capture_output=True, text=True,
                         env=env, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    labels = json.loads(run.stdout.strip().splitlines()[-1])
    names = json.loads(LOCALE.read_text())
    for node_id, widgets in labels.items():
        for widget, label in widgets.items():
            if widget in names[node_id]["inputs"]:
                assert label == names[node_id]["inputs"][widget]["name"], (node_id, widget, label)
    assert labels["NUWAContextPool"]["e_w"] == "context left/right (patches)"


@pytest.mark.comfyui
def test_the_server_serves_the_nodes_through_the_v3_api_with_their_display_names(comfyui_server):
    """ComfyUI (with comfy_api) takes the pack's comfy_entrypoint: its V3 schemas carry each input's display name
    from the locale (the classic form has none), with the classic types, options and widget order kept."""
    info = comfyui_server.get("/object_info/NUWAContextPool")["NUWAContextPool"]
    e_w = info["input"]["required"]["e_w"]
    assert e_w[0] == "INT" and e_w[1]["display_name"] == "context left/right (patches)" and e_w[1]["min"] == -1
    assert info["input_order"]["required"] == ["e_w", "e_h", "e_f"]
    planner = comfyui_server.get("/object_info/NUWADirectionPlanner")["NUWADirectionPlanner"]
    assert planner["input"]["required"]["anchor"][0][:2] == ["center", "top_left"]  # a combo's type is its choices
    assert planner["input_order"]["optional"] == ["mask", "units", "feather", "wrap", "frames_to_add"]
