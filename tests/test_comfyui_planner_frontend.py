"""The interactive Direction Planner (web/js/nuwa_direction_planner.js) in the real frontend.

Headless Chromium (Debian `chromium`, driven by `playwright-core` from npm: no browser download) opens
the frontend of a real ComfyUI server with this pack, adds a NUWA Direction Planner node, drags the right
side of its picture and clicks above its top side with real mouse events, and checks the node's widgets;
then it queues a small graph built in the page (tiny test model) and checks the picture takes the grid
the node sent back (`nuwa_plan` UI payload). Skipped without COMFYUI_DIR, node, playwright-core
(NUWA_PLAYWRIGHT_CORE=path/to/node_modules/playwright-core) or chromium (NUWA_CHROMIUM).

    COMFYUI_DIR=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/comfy/venv/bin/python \
    NUWA_PLAYWRIGHT_CORE=/path/to/node_modules/playwright-core \
        python -m pytest -q -m comfyui tests/test_comfyui_planner_frontend.py

NUWA_SCREENSHOTS=folder keeps the page's screenshots there (default: the test's temporary folder).
"""
from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from pathlib import Path

import pytest
from _comfyui import PACK_LINK_NAME, TEST_MODEL, browser_env as find_browser

pytestmark = pytest.mark.comfyui

REPO = Path(__file__).resolve().parent.parent
SCRIPT = "js/nuwa_direction_planner.js"
DRAG_PATCHES = 3  # the right side is dragged this many patches (and a third of one) outward

_BROWSER_SCRIPT = r"""
const { chromium } = require(process.env.NUWA_PLAYWRIGHT_CORE);
const path = require('path');
(async () => {
  const [url, shots, model, dragPatches] = process.argv.slice(2);
  const browser = await chromium.launch({executablePath: process.env.NUWA_CHROMIUM, headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking']});
  // page errors by phase: 'startup' is the frontend's own start (before any planner exists)
  const out = {pageErrors: [], consoleErrors: [], steps: []};
  let phase = 'startup';
  const step = (name, data) => out.steps.push({name, ...data});
  try {
    const page = await browser.newPage({viewport: {width: 1280, height: 900}});
    page.on('pageerror', e => out.pageErrors.push({phase, error: String(e), stack: String(e.stack || '')}));
    page.on('console', m => { if (m.type() === 'error') out.consoleErrors.push(m.text()); });
    await page.goto(url, {waitUntil: 'load', timeout: 180000});
    await page.waitForFunction(() => window.app && window.app.graph && window.LiteGraph && window.app.canvas,
                               null, {timeout: 180000});
    await page.waitForTimeout(2000);
    await page.keyboard.press('Escape');
    out.extension = await page.evaluate(() => window.app.extensions.map(e => e.name).includes('NUWA.DirectionPlanner'));

    // a planner node on an empty graph, at zoom 1
    phase = 'planner';
    const made = await page.evaluate(() => {
      const app = window.app;
      app.graph.clear();
      app.canvas.ds.scale = 1;
      app.canvas.ds.offset = [0, 0];
      const node = window.LiteGraph.createNode('NUWADirectionPlanner');
      node.pos = [80, 60];
      app.graph.add(node);
      node.setSize([420, Math.max(node.size[1], 520)]);
      app.graph.setDirtyCanvas(true, true);
      window.__planner = node;
      return {id: node.id, widgets: node.widgets.map(w => w.name)};
    });
    step('created', made);
    await page.waitForFunction(() => {
      const el = document.querySelector('.nuwa-direction-planner');
      const p = window.__planner?.nuwaPlanner;
      return el && el.getBoundingClientRect().width > 100 && p && p.state && p.state.size[0] > 100;
    }, null, {timeout: 30000});
    await page.waitForTimeout(500);

    // where things are on screen: client px of a side's edge and of the band beyond it
    const where = () => page.evaluate(() => {
      const p = window.__planner.nuwaPlanner; // p.state: what was drawn last (not redrawn here)
      const r = p.element.getBoundingClientRect();
      const zoom = r.width / p.element.clientWidth;
      const [x0, y0, x1, y1] = p.state.box;
      const X = x => r.left + x * zoom, Y = y => r.top + y * zoom;
      return {state: p.state, zoom,
              rightEdge: [X(x1), Y((y0 + y1) / 2)], aboveTop: [X((x0 + x1) / 2), Y(y0 - 11)],
              cellPx: p.state.cell * zoom,
              values: Object.fromEntries(window.__planner.widgets.map(w => [w.name, w.value]))};
    });
    const before = await where();
    step('before', before);
    await page.screenshot({path: path.join(shots, 'planner_before.png')});

    // drag the right side outward with the mouse
    const cellPx = before.state.cell * before.zoom;
    const [rx, ry] = before.rightEdge;
    await page.mouse.move(rx, ry);
    await page.mouse.down();
    const dx = (Number(dragPatches) + 0.3) * cellPx;
    await page.mouse.move(rx + dx / 2, ry + 2, {steps: 6});
    const during = await page.evaluate(() => window.__planner.nuwaPlanner.state);
    await page.mouse.move(rx + dx, ry + 3, {steps: 6});
    await page.mouse.up();
    await page.waitForTimeout(300);
    const dragged = await where();
    step('dragged', {...dragged, during});
    await page.screenshot({path: path.join(shots, 'planner_dragged.png')});

    // a click in the band above the top side adds one patch there
    await page.mouse.click(...dragged.aboveTop);
    await page.waitForTimeout(300);
    const clicked = await where();
    step('clicked', clicked);

    // dragged inward past zero: the widget stops at its min
    await page.mouse.move(...clicked.rightEdge);
    await page.mouse.down();
    await page.mouse.move(clicked.rightEdge[0] - (clicked.values.right + 2.3) * clicked.cellPx, clicked.rightEdge[1], {steps: 8});
    await page.mouse.up();
    await page.waitForTimeout(300);
    const clamped = await where();
    step('clamped', clamped);

    // the widget's own arrow on the graph canvas (a real click) redraws the picture
    const arrow = await page.evaluate(() => {
      const node = window.__planner, c = window.app.canvas;
      const w = node.widgets.find(w => w.name === 'left');
      const [x, y] = c.ds.convertOffsetToCanvas([node.pos[0] + node.size[0] - 22, node.pos[1] + w.y + 10]);
      const r = c.canvas.getBoundingClientRect();
      return {point: [r.left + x, r.top + y], draws: node.nuwaPlanner.draws, left: w.value};
    });
    await page.mouse.click(...arrow.point);
    await page.waitForTimeout(400);
    step('arrow', {...arrow, after: await where()});

    // a widget edited elsewhere (as the frontend does when a value is typed) redraws the picture
    const edited = await page.evaluate(async () => {
      const node = window.__planner, p = node.nuwaPlanner;
      const drawsBefore = p.draws;
      const w = node.widgets.find(w => w.name === 'left');
      w.setValue(2, {e: undefined, node, canvas: window.app.canvas});
      window.app.graph.setDirtyCanvas(true, true);
      await new Promise(r => setTimeout(r, 400));
      return {drawsBefore, state: p.state, left: w.value};
    });
    step('edited', edited);
    await page.screenshot({path: path.join(shots, 'planner_edited.png')});

    // a target width replaces left/right (split by the anchor); dragging a side hands the axis back
    // to the widgets, starting from what the target gave
    await page.evaluate(() => {
      const node = window.__planner, pw = node.nuwaPlanner.state.canvas.pw, cols = node.nuwaPlanner.state.canvas.cols;
      for (const [name, v] of [['left', 0], ['right', 0], ['anchor', 'center'], ['target_width', (cols + 4) * pw]]) {
        node.widgets.find(w => w.name === name).value = v;
      }
      window.app.graph.setDirtyCanvas(true, true);
    });
    await page.waitForTimeout(300);
    const target = await where();
    await page.mouse.move(...target.rightEdge);
    await page.mouse.down();
    await page.mouse.move(target.rightEdge[0] + 1.2 * target.cellPx, target.rightEdge[1], {steps: 6});
    await page.mouse.up();
    await page.waitForTimeout(300);
    step('target', {before: target, after: await where()});

    // run it: model loader, an empty 32 x 32 image, encode, the planner, a preview of its order
    const run = await page.evaluate(async (model) => {
      const app = window.app, LG = window.LiteGraph;
      const add = (type, pos) => { const n = LG.createNode(type); n.pos = pos; app.graph.add(n); return n; };
      const planner = window.__planner;
      const loader = add('NUWAModelLoader', [-700, 60]);
      loader.widgets.find(w => w.name === 'model_name').value = model;
      const image = add('EmptyImage', [-700, 260]);
      image.widgets.find(w => w.name === 'width').value = 32;
      image.widgets.find(w => w.name === 'height').value = 32;
      image.widgets.find(w => w.name === 'color').value = Date.now() % 0xffffff; // never a cached run
      const encode = add('NUWAVQGANEncode', [-350, 160]);
      const preview = add('PreviewImage', [560, 60]);
      const slot = (node, name) => node.findInputSlot(name);
      loader.connect(0, encode, slot(encode, 'model'));
      image.connect(0, encode, slot(encode, 'image'));
      loader.connect(0, planner, slot(planner, 'model'));
      encode.connect(0, planner, slot(planner, 'canvas'));
      planner.connect(1, preview, slot(preview, 'images'));
      for (const [name, v] of [['left', 1], ['right', 2], ['up', 1], ['down', 0]]) {
        planner.widgets.find(w => w.name === name).value = v;
      }
      app.graph.setDirtyCanvas(true, true);
      const prompt = (await app.graphToPrompt()).output;
      const done = new Promise((resolve) => {
        const api = window.comfyAPI.api.api;
        const finish = (type) => (ev) => resolve({type, detail: ev.detail});
        api.addEventListener('execution_success', finish('execution_success'));
        api.addEventListener('execution_error', finish('execution_error'));
      });
      await app.queuePrompt(0, 1);
      const result = await Promise.race([done, new Promise(r => setTimeout(() => r({type: 'timeout'}), 240000))]);
      await new Promise(r => setTimeout(r, 800));
      planner.nuwaPlanner.redraw();
      return {result: {type: result.type, message: result.detail?.exception_message},
              prompt, plannerId: String(planner.id), state: planner.nuwaPlanner.state,
              payload: planner.nuwaPlanner.payload};
    }, model);
    step('run', run);
    await page.evaluate(() => { const a = window.app; a.canvas.ds.offset = [760, 0]; a.graph.setDirtyCanvas(true, true); });
    await page.waitForTimeout(500);
    await page.screenshot({path: path.join(shots, 'planner_after_run.png')});

    // pixel units after the run: a drag of one patch adds the patch size the node reported
    await page.evaluate(() => {
      const node = window.__planner;
      node.widgets.find(w => w.name === 'units').value = 'pixels';
      node.widgets.find(w => w.name === 'right').value = 2 * node.nuwaPlanner.payload.patch_px[1];
      node.widgets.find(w => w.name === 'left').value = node.nuwaPlanner.payload.patch_px[1];
      node.widgets.find(w => w.name === 'up').value = node.nuwaPlanner.payload.patch_px[0];
    });
    const pixels = await where();
    await page.mouse.move(...pixels.rightEdge);
    await page.mouse.down();
    await page.mouse.move(pixels.rightEdge[0] + 1.2 * pixels.cellPx, pixels.rightEdge[1], {steps: 6});
    await page.mouse.up();
    await page.waitForTimeout(300);
    step('pixels', {before: pixels, after: await where()});
    await page.screenshot({path: path.join(shots, 'planner_pixels.png')});
  } finally {
    await browser.close();
  }
  console.log(JSON.stringify(out));
})().catch(e => { console.error(e); process.exit(1); });
"""


@pytest.fixture(scope="module")
def browser_env():
    env = find_browser()
    if isinstance(env, str):
        pytest.skip(env)
    return env


def test_extension_script_is_served(comfyui_server):
    listed = comfyui_server.get("/extensions")
    url = f"/extensions/{PACK_LINK_NAME}/{SCRIPT}"
    assert url in listed, f"{url} is not among the frontend's extension scripts: {listed}"
    with urllib.request.urlopen(comfyui_server.url + url, timeout=30) as r:
        body = r.read().decode()
    assert body == (REPO / "web" / SCRIPT).read_text()


@pytest.fixture(scope="module")
def session(comfyui_server, browser_env, tmp_path_factory):
    """One browser session (the steps of _BROWSER_SCRIPT), shared by the checks below."""
    work = tmp_path_factory.mktemp("planner_frontend")
    shots = Path(os.environ.get("NUWA_SCREENSHOTS") or work)
    shots.mkdir(parents=True, exist_ok=True)
    script = work / "planner.js"
    script.write_text(_BROWSER_SCRIPT)
    run = subprocess.run(["node", str(script), comfyui_server.url + "/", str(shots), TEST_MODEL, str(DRAG_PATCHES)],
                         capture_output=True, text=True, env=browser_env, timeout=600, check=False)
    assert run.returncode == 0, f"browser script failed:\n{run.stderr[-4000:]}\n{run.stdout[-2000:]}"
    out = json.loads(run.stdout.strip().splitlines()[-1])
    out["steps"] = {s["name"]: s for s in out["steps"]}
    out["shots"] = shots
    return out


def test_widget_shown_and_no_page_errors(session):
    assert session["extension"], "the frontend did not register the NUWA.DirectionPlanner extension"
    created = session["steps"]["created"]
    assert "nuwa_direction_planner" in created["widgets"], created
    before = session["steps"]["before"]
    assert before["state"]["mode"] == "schematic"  # not run yet: the canvas size is assumed
    assert before["state"]["size"][0] > 100 and before["state"]["size"][1] >= 200, before["state"]
    # the frontend's own start can log an error of its own (1.27.10: a settings onChange); from the
    # moment a planner exists there must be none, and none anywhere from this pack's script
    later = [e for e in session["pageErrors"] if e["phase"] != "startup"]
    assert not later, later
    ours = [e for e in session["pageErrors"] if "nuwa" in (e["error"] + e["stack"]).lower()]
    assert not ours, ours
    ours = [m for m in session["consoleErrors"] if "nuwa" in m.lower()]
    assert not ours, ours
    assert (session["shots"] / "planner_before.png").is_file()


def test_drag_right_edge_and_click_top(session):
    before, dragged, clicked = (session["steps"][k] for k in ("before", "dragged", "clicked"))
    v0 = before["values"]
    assert dragged["values"]["right"] == v0["right"] + DRAG_PATCHES, (v0, dragged["values"])
    assert dragged["during"]["extension"]["right"] > v0["right"], "the picture did not follow the drag"
    for side in ("left", "up", "down"):
        assert dragged["values"][side] == v0[side], side
    assert dragged["state"]["extension"]["right"] == v0["right"] + DRAG_PATCHES
    assert dragged["state"]["grid"][1] == before["state"]["grid"][1] + DRAG_PATCHES
    assert clicked["values"]["up"] == v0["up"] + 1, clicked["values"]
    assert clicked["values"]["right"] == dragged["values"]["right"]
    assert clicked["state"]["grid"][0] == dragged["state"]["grid"][0] + 1


def test_drag_is_clamped_to_the_widgets_min(session):
    clicked, clamped = session["steps"]["clicked"], session["steps"]["clamped"]
    assert clicked["values"]["right"] > 0
    assert clamped["values"]["right"] == 0, clamped["values"]  # dragged past zero: stops at min
    assert clamped["state"]["extension"]["right"] == 0
    assert clamped["state"]["grid"][1] == clicked["state"]["grid"][1] - clicked["values"]["right"]


def test_widget_edit_redraws(session):
    arrow = session["steps"]["arrow"]  # the widget's own arrow clicked on the graph canvas
    assert arrow["after"]["values"]["left"] == arrow["left"] + 1, arrow["after"]["values"]
    assert arrow["after"]["state"]["draws"] > arrow["draws"]
    assert arrow["after"]["state"]["extension"]["left"] == arrow["left"] + 1
    edited = session["steps"]["edited"]
    assert edited["left"] == 2
    assert edited["state"]["draws"] > edited["drawsBefore"]
    assert edited["state"]["extension"]["left"] == 2 and edited["state"]["values"]["left"] == 2
    drawn = arrow["after"]["state"]
    assert edited["state"]["grid"][1] == drawn["grid"][1] - drawn["extension"]["left"] + 2


def test_queued_run_draws_the_nodes_plan(session):
    run = session["steps"]["run"]
    assert run["result"]["type"] == "execution_success", run["result"]
    planner = run["prompt"][run["plannerId"]]
    assert "nuwa_direction_planner" not in planner["inputs"], "the picture widget leaked into the prompt"
    if run["payload"] is None:
        pytest.skip("the planner node sends no `nuwa_plan` UI payload yet (nodes/planning_nodes.py)")
    payload = run["payload"]
    _, rows, cols = payload["old_grid"]
    state = run["state"]
    assert state["mode"] == "plan", state
    assert state["canvas"]["rows"] == rows and state["canvas"]["cols"] == cols and state["canvas"]["known"]
    assert state["grid"] == payload["grid"][1:] == [rows + 1, cols + 3]
    assert state["offset"] == payload["offset"] == [1, 1]
    assert state["order"] == len([c for c in payload["order"] if c[0] == 0])
    assert f"patch {payload['patch_px'][1]}\u00d7{payload['patch_px'][0]} px" in state["text"][0], state["text"]


def test_target_width_drawn_and_handed_back_by_a_drag(session):
    before, after = session["steps"]["target"]["before"], session["steps"]["target"]["after"]
    assert before["values"]["target_width"] > 0 and before["values"]["right"] == 0
    assert before["state"]["extension"] == {"left": 2, "right": 2, "up": before["values"]["up"],
                                            "down": before["values"]["down"]}, before["state"]
    assert after["values"]["target_width"] == 0, after["values"]
    assert (after["values"]["left"], after["values"]["right"]) == (2, 3), after["values"]


def test_pixel_units_drag_by_the_reported_patch_size(session):
    run = session["steps"]["run"]
    if run["payload"] is None:
        pytest.skip("the planner node sends no `nuwa_plan` UI payload yet (nodes/planning_nodes.py)")
    pw = run["payload"]["patch_px"][1]
    before, after = session["steps"]["pixels"]["before"], session["steps"]["pixels"]["after"]
    assert before["values"]["units"] == "pixels" and before["values"]["right"] == 2 * pw
    assert before["state"]["mode"] == "plan"  # the same plan as the run, in pixels
    assert after["values"]["right"] == 3 * pw, after["values"]
    assert after["state"]["extension"]["right"] == 3 and after["state"]["mode"] == "preview"
