// ComfyUI-NUWA: the interactive Direction Planner.
//
// Adds a picture of the canvas to every "NUWA Direction Planner" node: the existing canvas with
// its patch grid, the patches the extension adds around it, and the order they are generated in.
// Drag a side of the grown canvas outward or inward to change left / right / up / down in whole
// patches; click outside a side to add one patch there (shift-click removes one). Editing the
// widgets redraws the picture. Before the node has run the canvas size is unknown, so the canvas
// is drawn at its last known size (or an assumed 4 x 4 patches); after a run the node's
// `nuwa_plan` UI payload gives the real grid, the kept patches and the generation order.
//
// Only the frontend's public extension API is used: app.registerExtension, beforeRegisterNodeDef
// (onExecuted), nodeCreated and node.addDOMWidget.
import { app } from "../../../scripts/app.js";

const NODE_TYPE = "NUWADirectionPlanner";
const WIDGET_NAME = "nuwa_direction_planner";
const SIDES = ["left", "right", "up", "down"];
const ASSUMED = { frames: 1, rows: 4, cols: 4, ph: 64, pw: 64 };
const MAX_PATCHES = 4096; // nodes/planning_nodes.py refuses larger canvases
const PROPERTY = "nuwa_planner_canvas"; // last known canvas size, saved with the workflow
const BAND = 22; // px around the grid where a click adds a patch on that side
const EDGE = 7; // px either side of an edge line that pick the edge up
const HEADER = 34; // px of text above the picture
const MIN_HEIGHT = 240;

// ---- what the node will do (mirrors nodes/_engine.py and the loop circle of
// nuwa_core/infinity/arbitrary_direction_controller.py: plan_outpaint) --------------------------

const ANCHOR_SHARES = {
  center: [0.5, 0.5], top_left: [0, 0], top: [0, 0.5], top_right: [0, 1], left: [0.5, 0],
  right: [0.5, 1], bottom_left: [1, 0], bottom: [1, 0.5], bottom_right: [1, 1],
};

function roundHalfEven(x) { // Python's round()
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

function extensionForTarget(current, targetPx, patchPx, shareBefore) {
  if (targetPx <= 0) return [0, 0];
  const needed = Math.max(Math.ceil(targetPx / patchPx) - current, 0);
  const before = roundHalfEven(needed * shareBefore);
  return [before, needed - before];
}

// Frame 0 of the loop-circle plan: strips of one patch, left, down, right, up, again.
function planOutpaint(rows, cols, ext) {
  const rem = { ...ext };
  let r0 = ext.up, r1 = ext.up + rows, c0 = ext.left, c1 = ext.left + cols;
  const order = [], segments = [];
  const push = (cells) => { segments.push(cells.length); order.push(...cells); };
  while (rem.left + rem.right + rem.up + rem.down > 0) {
    for (const dir of ["left", "down", "right", "up"]) {
      if (rem[dir] <= 0) continue;
      rem[dir] -= 1;
      const cells = [];
      if (dir === "left") { c0 -= 1; for (let i = r0; i < r1; i++) cells.push([i, c0]); }
      else if (dir === "right") { for (let i = r0; i < r1; i++) cells.push([i, c1]); c1 += 1; }
      else if (dir === "down") { for (let j = c0; j < c1; j++) cells.push([r1, j]); r1 += 1; }
      else { r0 -= 1; for (let j = c0; j < c1; j++) cells.push([r0, j]); }
      push(cells);
    }
  }
  return { order, segments };
}

function palette(i) { // the colours of nodes/planning_nodes.py's order preview
  const h = (i * 0.61803) % 1, s = 0.45, v = 0.95;
  const k = Math.floor(h * 6), f = h * 6 - k, p = v * (1 - s), q = v * (1 - s * f), t = v * (1 - s * (1 - f));
  const [r, g, b] = [[v, t, p], [q, v, p], [p, v, t], [p, q, v], [t, p, v], [v, p, q]][k % 6];
  return `rgb(${Math.round(r * 255)},${Math.round(g * 255)},${Math.round(b * 255)})`;
}

// ---- the widget -------------------------------------------------------------------------------

class DirectionPlanner {
  constructor(node) {
    this.node = node;
    this.payload = null; // message.nuwa_plan[0] of the last run
    this.drag = null; // {side, start, x0, y0, moved, frozen layout}
    this.hover = null;
    this.draws = 0;
    this.signature = "";
    this.state = null; // what was drawn last (read by the tests, handy when debugging)
    this.element = document.createElement("div");
    this.element.className = "nuwa-direction-planner";
    Object.assign(this.element.style, { width: "100%", height: "100%", position: "relative", overflow: "hidden" });
    this.canvas = document.createElement("canvas");
    Object.assign(this.canvas.style, { width: "100%", height: "100%", display: "block", touchAction: "none",
      borderRadius: "4px" });
    this.element.append(this.canvas);
    this.element.title = "Drag a side of the canvas to extend it (whole patches); click beside a side to add one "
      + "patch, shift-click to remove one. Numbers: generation order; grey: kept patches.";
    for (const type of ["pointerdown", "pointermove", "pointerup", "pointercancel", "pointerleave"]) {
      this.canvas.addEventListener(type, (e) => this.onPointer(e));
    }
    this.canvas.addEventListener("wheel", (e) => { // zoom/pan the graph as over the rest of the node
      e.preventDefault();
      app.canvas?.processMouseWheel?.(e);
    }, { passive: false });
    new ResizeObserver(() => this.redraw()).observe(this.element);
  }

  // -- widget values
  widget(name) { return this.node.widgets?.find((w) => w.name === name); }
  value(name, fallback = 0) { const w = this.widget(name); return w === undefined ? fallback : w.value; }
  pixels() { return this.value("units", "patches") === "pixels"; }
  linked(name) { // a widget driven by a link cannot be changed from here
    const input = this.node.inputs?.find((i) => i.widget?.name === name);
    return input != null && input.link != null;
  }

  canvasInfo() { // the canvas the node extends: from the last run, else the last known, else assumed
    if (this.payload) {
      const [frames, rows, cols] = this.payload.old_grid, [ph, pw] = this.payload.patch_px;
      return { frames, rows, cols, ph, pw, known: true };
    }
    const saved = this.node.properties?.[PROPERTY];
    if (Array.isArray(saved) && saved.length === 5) {
      const [frames, rows, cols, ph, pw] = saved;
      return { frames, rows, cols, ph, pw, known: false, saved: true };
    }
    return { ...ASSUMED, known: false, saved: false };
  }

  patchesOf(side, canvas) {
    const v = Number(this.value(side)) || 0;
    if (!this.pixels()) return v;
    return Math.ceil(v / (side === "left" || side === "right" ? canvas.pw : canvas.ph));
  }

  extension(canvas) { // patches the node will add on each side (target size replaces the widgets)
    const ext = Object.fromEntries(SIDES.map((s) => [s, this.patchesOf(s, canvas)]));
    const tw = Number(this.value("target_width")) || 0, th = Number(this.value("target_height")) || 0;
    const [shareUp, shareLeft] = ANCHOR_SHARES[this.value("anchor", "center")] ?? [0.5, 0.5];
    if (tw > 0) [ext.left, ext.right] = extensionForTarget(canvas.cols, tw, canvas.pw, shareLeft);
    if (th > 0) [ext.up, ext.down] = extensionForTarget(canvas.rows, th, canvas.ph, shareUp);
    return ext;
  }

  // -- the plan to draw
  model() {
    const canvas = this.canvasInfo();
    const ext = this.extension(canvas);
    const rows = canvas.rows + ext.up + ext.down, cols = canvas.cols + ext.left + ext.right;
    const p = this.payload;
    if (p && p.grid[1] === rows && p.grid[2] === cols && p.offset[0] === ext.up && p.offset[1] === ext.left) {
      // the last run planned exactly this: draw what the node sent
      const order = [];
      for (const [k, i, j] of p.order) if (k === 0) order.push([i, j]);
      return { mode: "plan", canvas, ext, rows, cols, offset: [ext.up, ext.left], order,
        segmentOf: segmentIndex(p.order, p.segments), known: p.known };
    }
    const planned = planOutpaint(canvas.rows, canvas.cols, ext);
    const segOf = [];
    planned.segments.forEach((n, s) => { for (let m = 0; m < n; m++) segOf.push(s); });
    return { mode: canvas.known ? "preview" : "schematic", canvas, ext, rows, cols, offset: [ext.up, ext.left],
      order: planned.order, segmentOf: segOf, known: null };
  }

  // -- layout (CSS px inside the element; frozen while dragging so the pointer maps to patches)
  layout(m) {
    const w = this.element.clientWidth, h = this.element.clientHeight;
    if (this.drag) {
      const f = this.drag.frozen;
      const x0 = f.oldX - m.ext.left * f.cell, y0 = f.oldY - m.ext.up * f.cell;
      return { w, h, cell: f.cell, x0, y0, x1: x0 + m.cols * f.cell, y1: y0 + m.rows * f.cell };
    }
    const aw = Math.max(w - 2 * BAND, 10), ah = Math.max(h - HEADER - 2 * BAND, 10);
    const cell = Math.max(2, Math.min(48, aw / m.cols, ah / m.rows));
    const gw = cell * m.cols, gh = cell * m.rows;
    const x0 = BAND + (aw - gw) / 2, y0 = HEADER + BAND + (ah - gh) / 2;
    return { w, h, cell, x0, y0, x1: x0 + gw, y1: y0 + gh };
  }

  // -- drawing
  redraw() {
    const el = this.element, cv = this.canvas;
    const w = el.clientWidth, h = el.clientHeight;
    if (!w || !h) return;
    const rect = el.getBoundingClientRect();
    const zoom = rect.width / w || 1;
    const dpr = (window.devicePixelRatio || 1) * Math.max(zoom, 0.25);
    if (cv.width !== Math.round(w * dpr) || cv.height !== Math.round(h * dpr)) {
      cv.width = Math.round(w * dpr);
      cv.height = Math.round(h * dpr);
    }
    const ctx = cv.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    const m = this.model(), L = this.layout(m);
    ctx.fillStyle = "#1c1c1c";
    ctx.fillRect(0, 0, w, h);
    const [top, left] = m.offset, c = L.cell;
    const stepOf = new Map();
    m.order.forEach(([i, j], n) => stepOf.set(i * m.cols + j, n));
    for (let i = 0; i < m.rows; i++) {
      for (let j = 0; j < m.cols; j++) {
        const x = L.x0 + j * c, y = L.y0 + i * c;
        const n = stepOf.get(i * m.cols + j);
        let fill;
        if (n !== undefined) fill = palette(m.segmentOf[n] ?? 0);
        else if (m.known) fill = m.known[i]?.[j] ? "#808080" : "#3c3c3c";
        else fill = i >= top && i < top + m.canvas.rows && j >= left && j < left + m.canvas.cols ? "#808080" : "#3c3c3c";
        ctx.fillStyle = fill;
        ctx.fillRect(x, y, c, c);
      }
    }
    if (c >= 4) { // patch grid
      ctx.strokeStyle = "rgba(20,20,20,0.9)";
      ctx.lineWidth = 1;
      ctx.beginPath();
      for (let i = 0; i <= m.rows; i++) { ctx.moveTo(L.x0, L.y0 + i * c); ctx.lineTo(L.x1, L.y0 + i * c); }
      for (let j = 0; j <= m.cols; j++) { ctx.moveTo(L.x0 + j * c, L.y0); ctx.lineTo(L.x0 + j * c, L.y1); }
      ctx.stroke();
    }
    if (m.order.length > 1 && c >= 6) { // the generation order: a path through each segment's patches
      ctx.strokeStyle = "rgba(0,0,0,0.3)";
      ctx.lineWidth = Math.max(1, c / 12);
      ctx.beginPath();
      m.order.forEach(([i, j], n) => {
        const x = L.x0 + (j + 0.5) * c, y = L.y0 + (i + 0.5) * c;
        if (n === 0 || m.segmentOf[n] !== m.segmentOf[n - 1]) ctx.moveTo(x, y); else ctx.lineTo(x, y);
      });
      ctx.stroke();
    }
    if (c >= 14) { // step numbers, 1 = first
      ctx.fillStyle = "#000";
      ctx.textAlign = "center";
      ctx.textBaseline = "middle";
      ctx.font = `${Math.max(8, Math.floor(c / 3))}px sans-serif`;
      m.order.forEach(([i, j], n) => ctx.fillText(String(n + 1), L.x0 + (j + 0.5) * c, L.y0 + (i + 0.5) * c));
    }
    // the existing canvas
    ctx.strokeStyle = "#f0f0f0";
    ctx.lineWidth = 2;
    ctx.strokeRect(L.x0 + left * c, L.y0 + top * c, m.canvas.cols * c, m.canvas.rows * c);
    // the sides: handles to drag, "+" to click
    for (const side of SIDES) this.drawSide(ctx, side, L, m);
    // text
    const { ph, pw } = m.canvas;
    const lines = [];
    const size = `${m.canvas.cols}\u00d7${m.canvas.rows}`, grown = `${m.cols}\u00d7${m.rows}`;
    if (m.canvas.known) {
      lines.push(`canvas ${size} \u2192 ${grown} patches (${m.cols * pw}\u00d7${m.rows * ph} px), patch ${pw}\u00d7${ph} px`);
    } else {
      const what = m.canvas.saved ? "last known" : "assumed";
      lines.push(`canvas ${size} patches (${what}) \u2192 ${grown}; patch ${pw}\u00d7${ph} px (${what})`);
    }
    const total = m.canvas.frames * m.rows * m.cols;
    const notes = [];
    if (m.mode === "plan") notes.push(`plan of the last run: ${m.order.length} new patches`);
    else if (m.mode === "preview") notes.push(`${m.order.length} new patches (queue to confirm)`);
    else notes.push(`${m.order.length} new patches \u2014 queue once to see the real canvas`);
    if (m.canvas.frames > 1) notes.push(`frame 1 of ${m.canvas.frames}`);
    if (Number(this.value("target_width")) > 0 || Number(this.value("target_height")) > 0) notes.push("target size set");
    if (this.pixels()) notes.push("units: pixels");
    lines.push(notes.join(" \u00b7 "));
    ctx.textAlign = "left";
    ctx.textBaseline = "top";
    ctx.font = "11px sans-serif";
    ctx.fillStyle = "#ddd";
    lines.forEach((t, n) => ctx.fillText(t, 6, 4 + 14 * n, w - 12));
    if (total > MAX_PATCHES) {
      ctx.fillStyle = "#ff6b6b";
      ctx.textAlign = "right";
      ctx.fillText(`${total} patches > ${MAX_PATCHES}: too many for one run`, w - 6, h - 14);
    }
    this.draws += 1;
    this.state = {
      mode: m.mode, draws: this.draws, canvas: { ...m.canvas }, extension: { ...m.ext },
      values: Object.fromEntries([...SIDES, "target_width", "target_height", "anchor", "units"]
        .map((n) => [n, this.value(n, null)])),
      grid: [m.rows, m.cols], offset: [top, left], cell: c, box: [L.x0, L.y0, L.x1, L.y1],
      size: [w, h], order: m.order.length, text: lines,
    };
    this.element.dataset.mode = m.mode;
    this.element.dataset.draws = String(this.draws);
  }

  drawSide(ctx, side, L, m) {
    const active = this.drag?.side === side || (!this.drag && this.hover === side);
    const locked = this.locked(side);
    ctx.strokeStyle = locked ? "#777" : active ? "#ffd24a" : "#4aa3ff";
    ctx.lineWidth = active ? 4 : 3;
    ctx.beginPath();
    const [a, b] = this.edgeLine(side, L);
    ctx.moveTo(...a);
    ctx.lineTo(...b);
    ctx.stroke();
    // "+" in the band beyond the side, with the count
    const [cx, cy] = this.bandCentre(side, L);
    ctx.fillStyle = locked ? "#777" : active ? "#ffd24a" : "#9cc9ff";
    ctx.textAlign = "center";
    ctx.textBaseline = "middle";
    ctx.font = "11px sans-serif";
    ctx.fillText(`+${m.ext[side]}`, cx, cy);
  }

  edgeLine(side, L) {
    if (side === "left") return [[L.x0, L.y0], [L.x0, L.y1]];
    if (side === "right") return [[L.x1, L.y0], [L.x1, L.y1]];
    if (side === "up") return [[L.x0, L.y0], [L.x1, L.y0]];
    return [[L.x0, L.y1], [L.x1, L.y1]];
  }

  bandCentre(side, L) {
    const mx = (L.x0 + L.x1) / 2, my = (L.y0 + L.y1) / 2;
    if (side === "left") return [Math.max(L.x0 - BAND / 2, 8), my];
    if (side === "right") return [Math.min(L.x1 + BAND / 2, L.w - 8), my];
    if (side === "up") return [mx, Math.max(L.y0 - BAND / 2, HEADER)];
    return [mx, Math.min(L.y1 + BAND / 2, L.h - 6)];
  }

  // which side a point (CSS px in the element) picks, and whether it is on the edge line itself
  hit(x, y, L) {
    const near = [
      ["left", Math.abs(x - L.x0), y >= L.y0 - EDGE && y <= L.y1 + EDGE],
      ["right", Math.abs(x - L.x1), y >= L.y0 - EDGE && y <= L.y1 + EDGE],
      ["up", Math.abs(y - L.y0), x >= L.x0 - EDGE && x <= L.x1 + EDGE],
      ["down", Math.abs(y - L.y1), x >= L.x0 - EDGE && x <= L.x1 + EDGE],
    ].filter(([, d, inSpan]) => inSpan && d <= EDGE).sort((p, q) => p[1] - q[1]);
    if (near.length) return { side: near[0][0], edge: true };
    const out = { left: L.x0 - x, right: x - L.x1, up: L.y0 - y, down: y - L.y1 };
    const best = SIDES.reduce((s, t) => (out[t] > out[s] ? t : s), "left");
    return out[best] > 0 ? { side: best, edge: false } : null;
  }

  locked(side) {
    if (this.linked(side)) return true;
    const target = side === "left" || side === "right" ? "target_width" : "target_height";
    return Number(this.value(target)) > 0 && this.linked(target);
  }

  // -- interaction
  local(e) { // pointer -> CSS px inside the element (the frontend scales DOM widgets with the graph)
    const r = this.element.getBoundingClientRect();
    const zoom = r.width / (this.element.clientWidth || 1) || 1;
    return [(e.clientX - r.left) / zoom, (e.clientY - r.top) / zoom];
  }

  onPointer(e) {
    if (e.type === "pointerdown" && e.button !== 0) { // middle/right button: the graph's, as elsewhere
      app.canvas?.processMouseDown?.(e);
      return;
    }
    const [x, y] = this.local(e);
    const m = this.model();
    const L = this.layout(m);
    if (e.type === "pointerdown") {
      const h = this.hit(x, y, L);
      if (!h || this.locked(h.side)) return;
      e.preventDefault();
      e.stopPropagation();
      this.canvas.setPointerCapture?.(e.pointerId);
      this.takeOverTarget(h.side, m);
      const ext = this.extension(this.canvasInfo());
      this.drag = { side: h.side, start: ext[h.side], x0: x, y0: y, moved: false, shift: e.shiftKey,
        frozen: { cell: L.cell, oldX: L.x0 + m.ext.left * L.cell, oldY: L.y0 + m.ext.up * L.cell } };
      this.redraw();
      return;
    }
    if (e.type === "pointermove") {
      if (!this.drag) {
        const h = this.hit(x, y, L);
        const side = h && !this.locked(h.side) ? h.side : null;
        this.canvas.style.cursor = !side ? "default" : side === "left" || side === "right" ? "ew-resize" : "ns-resize";
        if (side !== this.hover) { this.hover = side; this.redraw(); }
        return;
      }
      e.preventDefault();
      const d = this.drag;
      const along = { left: d.x0 - x, right: x - d.x0, up: d.y0 - y, down: y - d.y0 }[d.side];
      if (Math.abs(x - d.x0) > 3 || Math.abs(y - d.y0) > 3) d.moved = true;
      if (d.moved) this.setPatches(d.side, d.start + Math.round(along / d.frozen.cell), e);
      return;
    }
    if (e.type === "pointerup" || e.type === "pointercancel") {
      const d = this.drag;
      if (!d) return;
      this.drag = null;
      this.canvas.releasePointerCapture?.(e.pointerId);
      if (e.type === "pointerup" && !d.moved) this.setPatches(d.side, d.start + (d.shift ? -1 : 1), e);
      this.redraw();
      app.graph?.setDirtyCanvas(true, true);
      return;
    }
    if (e.type === "pointerleave" && !this.drag && this.hover) {
      this.hover = null;
      this.redraw();
    }
  }

  // dragging a side whose axis is set by a target size: that axis switches to the widgets,
  // starting from what the target gave (target set to 0)
  takeOverTarget(side, m) {
    const horizontal = side === "left" || side === "right";
    const target = horizontal ? "target_width" : "target_height";
    if (!(Number(this.value(target)) > 0)) return;
    const pair = horizontal ? ["left", "right"] : ["up", "down"];
    this.write(target, 0);
    for (const s of pair) this.setPatches(s, m.ext[s]);
  }

  setPatches(side, patches, e) { // patches -> the widget's units, clamped to its min/max
    const w = this.widget(side);
    if (!w) return;
    const canvas = this.canvasInfo();
    const unit = this.pixels() ? (side === "left" || side === "right" ? canvas.pw : canvas.ph) : 1;
    let v = Math.max(0, patches) * unit;
    const lo = w.options?.min ?? 0, hi = w.options?.max ?? Infinity;
    v = Math.min(Math.max(v, lo), hi);
    if (unit > 1 && v % unit) v = Math.floor(v / unit) * unit; // stay on whole patches below the max
    this.write(side, v, e);
  }

  write(name, v, e) {
    const w = this.widget(name);
    if (!w || w.value === v) { this.redraw(); return; }
    if (typeof w.setValue === "function") w.setValue(v, { e, node: this.node, canvas: app.canvas });
    else { w.value = v; w.callback?.(v, app.canvas, this.node, undefined, e); }
    this.node.setDirtyCanvas?.(true, true);
    this.redraw();
  }

  // -- called by the node
  setPlan(p) {
    if (!p || !Array.isArray(p.grid) || !Array.isArray(p.old_grid)) return;
    this.payload = p;
    const [frames, rows, cols] = p.old_grid, [ph, pw] = p.patch_px;
    this.node.properties ??= {};
    this.node.properties[PROPERTY] = [frames, rows, cols, ph, pw];
    this.redraw();
  }

  checkChanged() { // every canvas frame: redraw when a widget, the size or the zoom changed
    const r = this.element.getBoundingClientRect();
    const sig = JSON.stringify([[...SIDES, "target_width", "target_height", "anchor", "units"]
      .map((n) => this.value(n, null)), SIDES.map((s) => this.linked(s)), this.element.clientWidth,
    this.element.clientHeight, Math.round(r.width)]);
    if (sig !== this.signature) {
      this.signature = sig;
      this.redraw();
    }
  }
}

function segmentIndex(order, segments) {
  const out = [];
  segments.forEach((n, s) => { for (let m = 0; m < n; m++) out.push(s); });
  // keep frame 0's entries, the ones drawn
  return order.map((c, n) => [c[0], out[n]]).filter(([k]) => k === 0).map(([, s]) => s);
}

app.registerExtension({
  name: "NUWA.DirectionPlanner",

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE_TYPE) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const plan = message?.nuwa_plan?.[0];
      if (plan) this.nuwaPlanner?.setPlan(plan);
    };
  },

  async nodeCreated(node) {
    if (node?.comfyClass !== NODE_TYPE && node?.type !== NODE_TYPE) return;
    if (node.nuwaPlanner) return;
    const planner = new DirectionPlanner(node);
    node.nuwaPlanner = planner;
    const widget = node.addDOMWidget(WIDGET_NAME, "nuwa_direction_planner", planner.element, {
      serialize: false, // neither in the saved workflow's widgets_values nor in the prompt
      hideOnZoom: false,
      getValue: () => undefined,
      setValue: () => {},
      getMinHeight: () => MIN_HEIGHT,
      onDraw: () => planner.checkChanged(),
    });
    widget.serialize = false;
    widget.nuwaPlanner = planner;
    const size = node.computeSize?.();
    if (size) node.setSize?.([Math.max(size[0], 340), Math.max(size[1], node.size?.[1] ?? 0)]);
    requestAnimationFrame(() => planner.redraw());
  },
});
