"""The shipped example workflows (UI format, `example_workflows/`) against the pack's nodes.

Runs without ComfyUI and in seconds. For every shipped workflow:
- every node type is one of ours (NODE_CLASS_MAPPINGS) or a stock ComfyUI node of the small
  allow-list CORE_NODES in tests/_workflows.py, whose sockets and widget names are spelled out there
  (the real-server test checks the allow-list against a live /object_info);
- `widgets_values` match the node's widgets in order, type, min/max/step and combo choices,
  including the frontend's extra `control_after_generate` value after seed widgets and the
  LoadImage upload button;
- links agree with the nodes' inputs/outputs (ids, slots, types), required sockets are wired;
- a same-name `.jpg` thumbnail exists;
- the UI -> API conversion below equals the committed API copy in tests/workflows/shipped/,
  which the real-server test runs (so the two cannot drift).

Regenerate the API copies after editing a UI workflow:  python tests/test_workflows.py --write
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

from _pack import import_pack
from _workflows import (API_DIR, CORE_NODES, EXPECTED, NOT_RUNNABLE, NOT_RUNNABLE_NOTE, REPO, RUNNABLE, SHIPPED_IMAGES,
                        SHIPPED_MODELS, SHIPPED_RUNS, TRAINED, UI_DIR, XL_FRAMES, XL_WORKFLOWS)

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
SEED_CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
SEED_WIDGET_NAMES = ("seed", "noise_seed")  # the frontend adds control_after_generate to these

# frontend-only nodes: shown in the graph, never sent to the server
VIRTUAL_NODES = {"Note": [("text", ("STRING", {}))], "MarkdownNote": [("text", ("STRING", {}))]}


def _is_widget(spec) -> bool:
    kind = spec[0]
    return isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES


def node_spec(node_type: str) -> dict:
    """{"inputs": [(name, type)], "widgets": [(name, (kind, options))], "outputs": [(name, type)]}."""
    if node_type in CORE_NODES:
        return CORE_NODES[node_type]
    if node_type in VIRTUAL_NODES:
        return {"inputs": [], "widgets": VIRTUAL_NODES[node_type], "outputs": []}
    mappings = import_pack().NODE_CLASS_MAPPINGS
    if node_type not in mappings:
        raise KeyError(f"unknown node type {node_type!r}: neither ours ({sorted(mappings)}) "
                       f"nor an allowed core node ({sorted(CORE_NODES)})")
    cls = mappings[node_type]
    types = cls.INPUT_TYPES()
    inputs, widgets, required = [], [], set()
    for section in ("required", "optional"):
        for name, spec in types.get(section, {}).items():
            spec = (spec[0], spec[1] if len(spec) > 1 else {})
            if _is_widget(spec):
                widgets.append((name, spec))
            else:
                inputs.append((name, spec[0]))
                if section == "required":
                    required.add(name)
    names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
    return {"inputs": inputs, "widgets": widgets, "outputs": list(zip(names, cls.RETURN_TYPES)),
            "required": required}


def has_seed_control(name: str, spec) -> bool:
    kind, opts = spec
    return kind == "INT" and (opts.get("control_after_generate") or name in SEED_WIDGET_NAMES)


def widget_problem(node_type: str, name: str, spec, value) -> str | None:
    """None if `value` is valid for this widget, else what is wrong."""
    kind, opts = spec
    where = f"{node_type}.{name}={value!r}"
    if node_type == "NUWAModelLoader" and name == "model_name":
        # the combo lists the files present; shipped workflows must name a shipped model
        return None if value in SHIPPED_MODELS else f"{where}: shipped workflows load one of {SHIPPED_MODELS}"
    if node_type == "NUWACanvasLoad" and name == "canvas_file":  # 'latest', or a file the user saved
        return None if value == "latest" or (isinstance(value, str) and ".nuwacanvas.safetensors" in value) else \
            f"{where}: expected 'latest' or a .nuwacanvas.safetensors file name"
    if kind == "file":
        return None if isinstance(value, str) and value else f"{where}: expected a file name"
    if kind == "upload":
        return None if value == opts["value"] else f"{where}: expected {opts['value']!r}"
    if isinstance(kind, (list, tuple)) or kind == "COMBO":
        choices = list(kind) if isinstance(kind, (list, tuple)) else list(opts.get("options", []))
        return None if value in choices else f"{where}: not one of {choices}"
    if kind == "INT":
        if not isinstance(value, int) or isinstance(value, bool):
            return f"{where}: expected an integer"
    elif kind == "FLOAT":
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return f"{where}: expected a number"
    elif kind == "STRING":
        return None if isinstance(value, str) else f"{where}: expected a string"
    elif kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"{where}: expected true/false"
    if "min" in opts and value < opts["min"]:
        return f"{where}: below min {opts['min']}"
    if "max" in opts and value > opts["max"]:
        return f"{where}: above max {opts['max']}"
    step = opts.get("step")
    if kind == "INT" and step and step > 1 and value % step:
        return f"{where}: not a multiple of step {step}"
    return None


def split_widgets(node: dict, spec: dict) -> tuple[dict, list[str]]:
    """Map a UI node's widgets_values onto widget names: ({name: value}, problems)."""
    values = list(node.get("widgets_values") or [])
    out, problems, i = {}, [], 0
    for name, wspec in spec["widgets"]:
        if i >= len(values):
            problems.append(f"node {node['id']} {node['type']}: no value for widget {name!r} "
                            f"({len(values)} values for {len(spec['widgets'])} widgets)")
            return out, problems
        out[name] = values[i]
        i += 1
        if has_seed_control(name, wspec):
            if i >= len(values) or values[i] not in SEED_CONTROL_VALUES:
                problems.append(f"node {node['id']} {node['type']}: after {name!r} the frontend stores "
                                f"control_after_generate, one of {SEED_CONTROL_VALUES}")
            i += 1
    if i != len(values):
        problems.append(f"node {node['id']} {node['type']}: {len(values)} widgets_values, expected {i}")
    return out, problems


def ui_to_api(workflow: dict) -> dict:
    """The API-format prompt the frontend would send for this UI workflow."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in sorted(workflow["nodes"], key=lambda n: n["id"]):
        if node["type"] in VIRTUAL_NODES:
            continue
        if node.get("mode", 0) != 0:
            raise ValueError(f"node {node['id']}: muted/bypassed nodes are not converted (mode {node['mode']})")
        spec = node_spec(node["type"])
        values, _ = split_widgets(node, spec)
        inputs = {name: values[name] for name, (kind, _) in spec["widgets"]
                  if kind != "upload" and name in values}
        for inp in node.get("inputs") or []:
            if inp.get("link") is not None:
                link = links[inp["link"]]
                inputs[inp["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def workflow_problems(workflow: dict) -> list[str]:
    problems = []
    for key in ("nodes", "links", "last_node_id", "last_link_id", "version", "extra", "groups"):
        if key not in workflow:
            problems.append(f"missing top-level key {key!r}")
    if workflow.get("version") != 0.4:
        problems.append(f"version {workflow.get('version')!r}, the frontend writes 0.4")
    nodes = {}
    for node in workflow.get("nodes", []):
        if node["id"] in nodes:
            problems.append(f"duplicate node id {node['id']}")
        nodes[node["id"]] = node
        for key in ("type", "pos", "size", "inputs", "outputs", "widgets_values", "mode"):
            if key not in node:
                problems.append(f"node {node['id']}: missing {key!r}")
    if nodes and max(nodes) > workflow.get("last_node_id", -1):
        problems.append("last_node_id is smaller than a node id")
    links = {}
    for link in workflow.get("links", []):
        if len(link) != 6 or link[0] in links:
            problems.append(f"bad or duplicate link {link}")
            continue
        links[link[0]] = link
    if links and max(links) > workflow.get("last_link_id", -1):
        problems.append("last_link_id is smaller than a link id")

    for node in nodes.values():
        try:
            spec = node_spec(node["type"])
        except KeyError as err:
            problems.append(f"node {node['id']}: {err.args[0]}")
            continue
        values, widget_errors = split_widgets(node, spec)
        problems += widget_errors
        for name, wspec in spec["widgets"]:
            if name in values and (msg := widget_problem(node["type"], name, wspec, values[name])):
                problems.append(f"node {node['id']}: {msg}")
        sockets = [(i["name"], i["type"]) for i in node.get("inputs", []) if "widget" not in i]
        if sockets != spec["inputs"]:
            problems.append(f"node {node['id']} {node['type']}: inputs {sockets}, expected {spec['inputs']}")
        outputs = [(o["name"], o["type"]) for o in node.get("outputs", [])]
        if outputs != spec["outputs"]:
            problems.append(f"node {node['id']} {node['type']}: outputs {outputs}, expected {spec['outputs']}")
        for slot, inp in enumerate(node.get("inputs", [])):
            lid = inp.get("link")
            if lid is None:
                if inp["name"] in spec.get("required", {i for i, _ in spec["inputs"]}):
                    problems.append(f"node {node['id']} {node['type']}: required input {inp['name']!r} not connected")
                continue
            link = links.get(lid)
            if link is None:
                problems.append(f"node {node['id']}: input {inp['name']!r} names missing link {lid}")
            elif (link[3], link[4]) != (node["id"], slot) or link[5] != inp["type"]:
                problems.append(f"link {link} does not match node {node['id']} input {slot} {inp['name']!r}")
        for slot, out in enumerate(node.get("outputs", [])):
            for lid in out.get("links") or []:
                link = links.get(lid)
                if link is None or (link[1], link[2]) != (node["id"], slot) or link[5] != out["type"]:
                    problems.append(f"node {node['id']} output {slot}: link {lid} is {link}")
    for lid, (_, src, sslot, dst, dslot, typ) in links.items():
        if src not in nodes or dst not in nodes:
            problems.append(f"link {lid} joins missing nodes {src} -> {dst}")
            continue
        outs, ins = nodes[src].get("outputs", []), nodes[dst].get("inputs", [])
        if sslot >= len(outs) or lid not in (outs[sslot].get("links") or []):
            problems.append(f"link {lid}: not listed by node {src} output {sslot}")
        if dslot >= len(ins) or ins[dslot].get("link") != lid:
            problems.append(f"link {lid}: not the link of node {dst} input {dslot}")
    return problems


def ui_workflows() -> list[Path]:
    return sorted(UI_DIR.glob("*.json"))


WORKFLOWS = ui_workflows()


def test_the_shipped_workflows_are_all_there():
    assert tuple(sorted(EXPECTED)) == tuple(sorted(w.stem for w in WORKFLOWS)), [w.name for w in WORKFLOWS]
    assert sorted(p.stem for p in API_DIR.glob("*.json")) == sorted(EXPECTED)


@pytest.mark.parametrize("path", WORKFLOWS, ids=[w.stem for w in WORKFLOWS])
def test_workflow_nodes_widgets_and_links(path):
    workflow = json.loads(path.read_text())
    problems = workflow_problems(workflow)
    assert not problems, f"{path.name}:\n" + "\n".join(problems)
    types = {n["type"] for n in workflow["nodes"]}
    if path.stem in XL_WORKFLOWS:  # the whole tree in one node, one stock KSampler per level, or the user's frames filled
        assert "NUWAXLModelLoader" in types and ("NUWAXLCoarseToFine" in types or "KSampler" in types or
                                                 {"NUWAXLEncode", "NUWAXLLocalDiffusion"} <= types)
    else:
        assert ("NUWAModelLoader" in types or "NUWATrainOneShot" in types) and "NUWAPatchRenderer" in types
    note = workflow["extra"].get("nuwa_note", "")
    assert note, f"{path.name}: extra.nuwa_note should tell the user what the workflow does"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[w.stem for w in WORKFLOWS])
def test_workflow_has_a_thumbnail(path):
    from PIL import Image
    thumb = path.with_suffix(".jpg")
    assert thumb.is_file(), f"{path.name}: no thumbnail {thumb.name}"
    assert thumb.stat().st_size < 200_000, f"{thumb.name} is {thumb.stat().st_size} bytes"
    with Image.open(thumb) as img:
        assert img.format == "JPEG" and 128 <= img.width <= 1024, (img.format, img.size)


@pytest.mark.parametrize("path", WORKFLOWS, ids=[w.stem for w in WORKFLOWS])
def test_api_copy_is_the_conversion_of_the_ui_workflow(path):
    api = API_DIR / path.name
    assert api.is_file(), f"no API copy {api}; run: python tests/test_workflows.py --write"
    assert ui_to_api(json.loads(path.read_text())) == json.loads(api.read_text()), (
        f"{api} differs from the conversion of {path}; run: python tests/test_workflows.py --write")


def _assert_prompted_by_the_shipped_text_encoder(prompt: dict) -> None:
    """The Patch Renderer's conditioning is a NUWA Text Encode of a prompt with the shipped text encoder."""
    renderer = next(n for n in prompt.values() if n["class_type"] == "NUWAPatchRenderer")["inputs"]
    encode = prompt[renderer["conditioning"][0]]
    assert encode["class_type"] == "NUWATextEncode" and encode["inputs"]["text"].strip()
    assert prompt[encode["inputs"]["text_encoder"][0]]["inputs"]["text_encoder_name"] == "nuwa_text_scenes.safetensors"


def test_specific_contents():
    wf = {p.stem: json.loads(p.read_text()) for p in WORKFLOWS}
    api = {name: ui_to_api(w) for name, w in wf.items()}
    for name, prompt in api.items():
        if name in XL_WORKFLOWS:
            continue
        loaders = [n for n in prompt.values() if n["class_type"] == "NUWAModelLoader"]
        trainers = [n for n in prompt.values() if n["class_type"] == "NUWATrainOneShot"]
        assert bool(loaders) != bool(trainers), f"{name}: a template loads a shipped model or trains one"
        assert all(n["inputs"]["model_name"] in SHIPPED_MODELS for n in loaders), name
    for name, (model, image) in SHIPPED_RUNS.items():  # each template on the model made for it
        loaded = {n["inputs"]["model_name"] for n in api[name].values() if n["class_type"] == "NUWAModelLoader"}
        assert loaded == (set() if model == TRAINED else {model}), name
        assert [n["inputs"]["image"] for n in api[name].values() if n["class_type"] == "LoadImage"] == \
            ([image] if image else []), name
    # (a) outpainting: the painting, extended on all four sides, order drawing previewed
    a = api["outpaint_spiral"]
    planner = next(n for n in a.values() if n["class_type"] == "NUWADirectionPlanner")["inputs"]
    assert min(planner[k] for k in ("left", "right", "up", "down")) >= 1, planner
    previews = [n["inputs"]["images"] for n in a.values() if n["class_type"] == "PreviewImage"]
    pid = next(k for k, n in a.items() if n["class_type"] == "NUWADirectionPlanner")
    assert [pid, 1] in previews, "the planner's order_preview should go to a PreviewImage"
    # (b) panorama: wide blank canvas, saved image and canvas
    b = api["infinite_panorama"]
    empty = next(n for n in b.values() if n["class_type"] == "NUWAEmptyCanvas")["inputs"]
    assert empty["width"] >= 8 * empty["height"], empty
    assert {"SaveImage", "NUWACanvasSave"} <= {n["class_type"] for n in b.values()}
    # (c) text: NUWA Text Encode with the shipped text encoder feeds the renderer's conditioning, at 4:1
    c = api["text_to_image_wide"]
    _assert_prompted_by_the_shipped_text_encoder(c)
    empty = next(n for n in c.values() if n["class_type"] == "NUWAEmptyCanvas")["inputs"]
    assert empty["width"] == 4 * empty["height"], empty
    # (c') text to video: the same text path into a canvas of several frames, saved animated from the renderer's own
    # decode (frame by frame, as PG-VQGAN Decode's 'none' gives them: test_pgvqgan), not decoded a second time
    v = api["text_to_video"]
    _assert_prompted_by_the_shipped_text_encoder(v)
    empty = next(n for n in v.values() if n["class_type"] == "NUWAEmptyCanvas")["inputs"]
    assert empty["frames"] > 1, empty
    renderer = next(k for k, n in v.items() if n["class_type"] == "NUWAPatchRenderer")
    save = next(n for n in v.values() if n["class_type"] == "SaveAnimatedWEBP")["inputs"]
    assert save["images"] == [renderer, 0] and save["fps"] == 8.0
    assert not any(n["class_type"] == "NUWAPGVQGANDecode" for n in v.values())
    # (d) NUWA-XL: the shipped default XL model, the whole tree, saved as an animation at the model's fps
    d = api["nuwa_xl_long_video"]
    xl_loader = next(n for n in d.values() if n["class_type"] == "NUWAXLModelLoader")["inputs"]
    assert (xl_loader["t_klvae_name"], xl_loader["mtd_name"]) == ("t_klvae_default.safetensors", "mtd_default.safetensors")
    c2f = next(k for k, n in d.items() if n["class_type"] == "NUWAXLCoarseToFine")
    save = next(n for n in d.values() if n["class_type"] == "SaveAnimatedWEBP")["inputs"]
    assert save["images"] == [c2f, 0] and save["fps"] == [c2f, 1]
    # ... from a prompt schedule: two prompts of the shipped text encoder, joined, at guidance > 1
    assert d[c2f]["inputs"]["guidance"] > 1.0
    combine = d[d[c2f]["inputs"]["conditioning"][0]]
    assert combine["class_type"] == "ConditioningCombine"
    texts = [d[combine["inputs"][k][0]] for k in ("conditioning_1", "conditioning_2")]
    assert all(t["class_type"] == "NUWATextEncode" for t in texts)
    assert texts[0]["inputs"]["text"] != texts[1]["inputs"]["text"]
    encoders = {d[t["inputs"]["text_encoder"][0]]["inputs"]["text_encoder_name"] for t in texts}
    assert encoders == {"nuwa_text_scenes.safetensors"}
    assert "prompt schedule" in wf["nuwa_xl_long_video"]["extra"]["nuwa_note"]
    # (e) NUWA-XL through stock KSamplers: keyframes with the global MODEL, then each local level
    # In-between -> KSampler (local MODEL) -> Join Segments on the previous level's frames; prompts as positive,
    # the model's null prompt as negative, cfg > 1 (classifier-free guidance)
    e = api["nuwa_xl_ksampler"]
    kind = {nid: n["class_type"] for nid, n in e.items()}
    loader = next(n for n in e.values() if n["class_type"] == "NUWAXLModelLoader")["inputs"]
    assert (loader["t_klvae_name"], loader["mtd_name"]) == ("t_klvae_default.safetensors", "mtd_default.safetensors")
    level = {e[nid]["inputs"]["level"]: nid for nid in kind if kind[nid] == "NUWAXLModelAsComfy"}
    ksamplers = {nid: e[nid]["inputs"] for nid in kind if kind[nid] == "KSampler"}
    assert all(k["cfg"] > 1.0 and k["denoise"] == 1.0 for k in ksamplers.values()), ksamplers
    first = [nid for nid, k in ksamplers.items() if k["model"] == [level["global"], 0]]
    assert len(first) == 1 and kind[ksamplers[first[0]]["latent_image"][0]] == "NUWAXLEmptyLatentVideo"
    empty = e[ksamplers[first[0]]["latent_image"][0]]["inputs"]
    frames, L = first, empty["frames"]
    for _ in range(empty["depth"] - 1):  # one local level per remaining depth, each on the frames before it
        join = next(nid for nid in kind if kind[nid] == "NUWAXLJoinSegments" and e[nid]["inputs"]["frames"] == [frames[0], 0])
        ks = e[join]["inputs"]["segments"][0]
        assert kind[ks] == "KSampler" and ksamplers[ks]["model"] == [level["local"], 0]
        between = ksamplers[ks]["latent_image"][0]
        assert kind[between] == "NUWAXLInbetweenForKSampler" and e[between]["inputs"]["frames"] == [frames[0], 0]
        assert ksamplers[ks]["positive"] == [between, 0] and ksamplers[ks]["negative"] == [between, 1]
        assert e[between]["inputs"]["L"] == L
        frames = [join]
    assert len(ksamplers) == empty["depth"]
    decode = next(nid for nid in kind if kind[nid] == "NUWAXLDecodeLatent")
    assert e[decode]["inputs"]["samples"] == [frames[0], 0]
    save = next(n for n in e.values() if n["class_type"] == "SaveAnimatedWEBP")["inputs"]
    assert save["images"] == [decode, 0] and save["fps"] == [decode, 1]
    prompts = [nid for nid in kind if kind[nid] == "NUWAXLPromptsForKSampler"]
    null = [nid for nid in prompts if "conditioning" not in e[nid]["inputs"]]
    assert len(null) == 1 and all(k["negative"] == [null[0], 0] for k in ksamplers.values() if k["model"] ==
                                  [level["global"], 0])
    inbetweens = [nid for nid in kind if kind[nid] == "NUWAXLInbetweenForKSampler"]
    assert all(e[nid]["inputs"]["negative"] == [null[0], 0] for nid in inbetweens)
    assert all(kind[e[nid]["inputs"]["conditioning"][0]] == "ConditioningCombine" for nid in prompts if nid not in null)
    assert "null prompt" in wf["nuwa_xl_ksampler"]["extra"]["nuwa_note"]
    notes = [n for n in wf["nuwa_xl_ksampler"]["nodes"] if n["type"] in VIRTUAL_NODES]
    assert notes and "null prompt" in notes[0]["widgets_values"][0]
    assert len(wf["nuwa_xl_ksampler"]["groups"]) >= 4

    # (f) NUWA-XL from the user's own frames: the shipped example frames, loaded and batched in order, encoded at the
    # model's size (refused otherwise), then Local Diffusion level after level on the shipped model, decoded, saved
    f = api["nuwa_xl_fill_between_frames"]
    kind = {nid: n["class_type"] for nid, n in f.items()}
    loader = next(n for n in f.values() if n["class_type"] == "NUWAXLModelLoader")["inputs"]
    assert (loader["t_klvae_name"], loader["mtd_name"]) == ("t_klvae_default.safetensors", "mtd_default.safetensors")
    encode = next(nid for nid in kind if kind[nid] == "NUWAXLEncode")
    assert f[encode]["inputs"]["size"] == "refuse other sizes"

    def batch_order(ref) -> list[str]:
        n = f[ref[0]]
        if n["class_type"] == "LoadImage":
            return [n["inputs"]["image"]]
        assert n["class_type"] == "ImageBatch", n
        return batch_order(n["inputs"]["image1"]) + batch_order(n["inputs"]["image2"])
    assert tuple(batch_order(f[encode]["inputs"]["images"])) == XL_FRAMES["nuwa_xl_fill_between_frames"]
    decode = next(nid for nid in kind if kind[nid] == "NUWAXLDecode")
    chain, ref = [], f[decode]["inputs"]["latents"][0]
    while kind[ref] == "NUWAXLLocalDiffusion":
        chain.append(ref)
        ref = f[ref]["inputs"]["keyframes"][0]
    assert ref == encode and len(chain) == 2 and all(f[nid]["inputs"]["L"] == 5 for nid in chain)
    save = next(n for n in f.values() if n["class_type"] == "SaveAnimatedWEBP")["inputs"]
    assert save["images"] == [decode, 0] and save["fps"] == [decode, 1]
    assert "NUWA-XL Encode" in wf["nuwa_xl_fill_between_frames"]["extra"]["nuwa_note"]


def test_shipped_example_frames_are_the_model_frame_size():
    """The XL templates' example frames are the shipped default model's frame size (NUWA-XL Encode refuses others)."""
    from PIL import Image
    for name, frames in XL_FRAMES.items():
        assert [n for n in _loaded_images(json.loads((UI_DIR / f"{name}.json").read_text()))] == list(frames), name
        for frame in frames:
            with Image.open(REPO / "models" / "nuwa_xl" / frame) as img:
                assert img.size == (64, 48) and img.mode == "RGB", (frame, img.size, img.mode)


def _loaded_images(workflow: dict) -> list[str]:
    return [n["widgets_values"][0] for n in workflow["nodes"] if n["type"] == "LoadImage"]


def test_every_template_runs_on_the_shipped_models_or_says_it_does_not():
    """A template is runnable (queued from the real frontend by the real-server test) or its note opens by saying
    that it does not run on the shipped models; a template that is neither fails here."""
    assert not set(RUNNABLE) & set(NOT_RUNNABLE)
    for path in WORKFLOWS:
        workflow = json.loads(path.read_text())
        notes = [n["widgets_values"][0] for n in workflow["nodes"] if n["type"] in VIRTUAL_NODES]
        says_not = [t for t in [workflow["extra"]["nuwa_note"], *notes] if t.lstrip("#* ").startswith(NOT_RUNNABLE_NOTE)]
        if path.stem in NOT_RUNNABLE:
            assert notes and len(says_not) == 1 + len(notes), f"{path.name}: every note must open with {NOT_RUNNABLE_NOTE!r}"
        else:
            assert path.stem in RUNNABLE, f"{path.name}: neither in RUNNABLE nor in NOT_RUNNABLE (tests/_workflows.py)"
            assert not says_not, path.name


def test_templates_load_only_images_the_pack_ships():
    """LoadImage can only open files in ComfyUI's input folder: every image a template loads is a plain
    file name shipped in models/<folder>/, which the pack copies there (nodes/_comfy.py copy_example_inputs)."""
    loaded = set()
    for path in WORKFLOWS:
        for name in _loaded_images(json.loads(path.read_text())):
            assert isinstance(name, str) and name == Path(name).name, f"{path.name}: LoadImage {name!r} is not a file name"
            assert sorted((REPO / "models").glob(f"*/{name}")), f"{path.name}: LoadImage {name!r} is not shipped in models/"
            loaded.add(name)
    assert set(SHIPPED_IMAGES) <= loaded


def test_the_pack_copies_the_templates_images_into_the_input_folder(tmp_path, caplog):
    copy = import_pack().nodes._comfy.copy_example_inputs
    wanted = sorted({name for path in WORKFLOWS for name in _loaded_images(json.loads(path.read_text()))})
    assert wanted, "no template loads an image (outpaint_spiral loads its painting)"
    input_dir = tmp_path / "input"
    assert sorted(p.name for p in copy(input_dir)) == wanted
    assert sorted(p.name for p in input_dir.iterdir()) == wanted  # no temporary files left behind
    for name in wanted:
        shipped = next((REPO / "models").glob(f"*/{name}"))
        assert (input_dir / name).read_bytes() == shipped.read_bytes(), name
    assert copy(input_dir) == []  # present: nothing to do
    (input_dir / wanted[0]).write_bytes(b"the user's own file of that name")
    assert copy(input_dir) == [] and (input_dir / wanted[0]).read_bytes() == b"the user's own file of that name"
    blocker = tmp_path / "not_a_folder"  # an input folder that cannot be made: logged, never raised
    blocker.write_text("x")
    with caplog.at_level(logging.WARNING, logger="ComfyUI-NUWA"):
        assert copy(blocker / "input") == []
    assert "could not copy" in caplog.text and wanted[0] in caplog.text


def test_converter_handles_seed_control_and_upload_widgets():
    workflow = {"nodes": [
        {"id": 1, "type": "LoadImage", "mode": 0, "inputs": [], "outputs": [],
         "widgets_values": ["x.png", "image"]},
        {"id": 2, "type": "NUWAPatchRenderer", "mode": 0,
         "inputs": [{"name": "canvas", "type": "NUWA_CANVAS", "link": 5}],
         "outputs": [], "widgets_values": [3, "randomize", "AR", 4, 0.5, 10, 0.9]},
        {"id": 3, "type": "Note", "mode": 0, "widgets_values": ["hi"]}],
        "links": [[5, 9, 1, 2, 0, "NUWA_CANVAS"]]}
    assert ui_to_api(workflow) == {
        "1": {"class_type": "LoadImage", "inputs": {"image": "x.png"}},
        "2": {"class_type": "NUWAPatchRenderer", "inputs": {
            "seed": 3, "decoder": "AR", "steps": 4, "temperature": 0.5, "top_k": 10, "top_p": 0.9,
            "canvas": ["9", 1]}}}
    bad = dict(workflow, nodes=[dict(workflow["nodes"][1], widgets_values=[3, "AR", 4, 0.5, 10, 0.9])])
    assert any("control_after_generate" in p for p in workflow_problems(bad))


def _write_api_copies() -> None:
    API_DIR.mkdir(parents=True, exist_ok=True)
    for path in ui_workflows():
        prompt = ui_to_api(json.loads(path.read_text()))
        (API_DIR / path.name).write_text(json.dumps(prompt, indent=1) + "\n")
        print("wrote", API_DIR / path.name)


if __name__ == "__main__":
    if "--write" in sys.argv[1:]:
        _write_api_copies()
    else:
        print(__doc__)
