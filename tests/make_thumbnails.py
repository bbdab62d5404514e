"""Regenerate the shipped workflows' thumbnails (example_workflows/<name>.jpg) from the shipped models.

    python tests/make_thumbnails.py                      # outpaint_spiral and infinite_panorama
    python tests/make_thumbnails.py outpaint_spiral      # just one
    COMFYUI_DIR=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/comfy/venv/bin/python \
        python tests/make_thumbnails.py --comfyui        # the NUWA-XL workflows, on a real ComfyUI
    ... --comfyui nuwa_xl_ksampler                       # just one

Runs each workflow's API copy (tests/workflows/shipped/<name>.json) with the pack's own node
functions, wired as the JSON wires them, without ComfyUI: only the nodes the SaveImage node
depends on are run (previews and Canvas Save are not needed for a picture). The two stock nodes
on that path are stood in for: LoadImage reads the file from models/nuwa/ (inside ComfyUI the pack
copies it from there into the input folder), SaveImage hands back its images. CPU, seeded by the
workflow's own seed, so a rerun on the same model gives the same pictures (a few minutes).

Thumbnails: the saved image scaled to 512 px wide; a panorama wider than 8:1 is cut into strips
of 4:1 stacked with 6 px dark gaps; a saved video (SaveAnimatedWEBP, stood in for: its frames are
taken as they are) is 5 frames from its first to its last in a row. JPEG quality 85. The workflows that run on the shipped
NUWA-Infinity models are made this way (SHIPPED_RUNS, text_to_image_wide on the text model included). The
one-shot templates (outpaint_your_own_painting, seamless_texture) first train their model (their
Train One-Shot's 10 minutes; the second loads what the first trained), into a temporary model folder
(NUWA_MODELS_DIR), never into the pack's models/nuwa.

--comfyui: the NUWA-XL workflows (XL_WORKFLOWS: nuwa_xl_long_video, nuwa_xl_ksampler,
nuwa_xl_fill_between_frames) need ComfyUI's
own nodes (KSampler, SaveAnimatedWEBP), so they run on a real ComfyUI server (CPU, a temporary
--base-directory, started as the real-server tests start it) with the shipped default XL model
(models/nuwa_xl); their thumbnail is a contact sheet of every frame of the animated WEBP the
workflow saved, 13 frames a row at the frames' own size (64 x 48: 832 px wide), no gaps. Seeded by
the workflows' own seeds. Rerun after the default XL model is retrained (a few minutes each).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/: its helper modules, however this file is run
from _pack import import_pack  # noqa: E402
from _workflows import API_DIR, REPO, SHIPPED_IMAGES, SHIPPED_RUNS, UI_DIR, XL_WORKFLOWS  # noqa: E402

WIDTH = 512
STRIP_ASPECT = 4  # strips of 4:1 ...
STRIP_ABOVE = 8  # ... for images wider than 8:1
GAP, GAP_COLOUR = 6, (24, 24, 24)
QUALITY = 85
SHEET_COLS = 13  # XL contact sheets: 65 frames -> 13 x 5
SHEET_MAX_WIDTH = 1024


def load_image(image: str):
    """Stand-in for ComfyUI's LoadImage: IMAGE [1, H, W, 3] in 0..1 and an empty MASK."""
    path = REPO / "models" / "nuwa" / image
    if image not in SHIPPED_IMAGES or not path.is_file():
        raise FileNotFoundError(f"LoadImage {image!r}: only the shipped {SHIPPED_IMAGES} in models/nuwa/ are known here")
    with Image.open(path) as img:
        pixels = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(pixels)[None]
    return tensor, torch.zeros(tensor.shape[1:3])


def run_workflow(prompt: dict) -> list[torch.Tensor]:
    """The IMAGE batches the workflow saves, in node-id order."""
    mappings, results = import_pack().NODE_CLASS_MAPPINGS, {}

    def value(nid: str):
        if nid in results:
            return results[nid]
        node = prompt[nid]
        kind = node["class_type"]
        inputs = {k: value(v[0])[v[1]] if isinstance(v, list) else v for k, v in node["inputs"].items()}
        if kind == "LoadImage":
            out = load_image(inputs["image"])
        elif kind in mappings:
            cls = mappings[kind]
            out = getattr(cls(), cls.FUNCTION)(**inputs)
            out = out["result"] if isinstance(out, dict) else out
        else:
            raise ValueError(f"node {nid}: {kind} is neither one of the pack's nodes nor stood in for here")
        results[nid] = tuple(out)
        return results[nid]

    # what SaveImage saves, and the image Canvas Save keeps beside its canvas
    saved = [prompt[nid]["inputs"].get(key) for nid in sorted(prompt, key=int)
             for kind, key in (("SaveImage", "images"), ("NUWACanvasSave", "image"), ("SaveAnimatedWEBP", "images"))
             if prompt[nid]["class_type"] == kind]
    saved = [link for link in saved if isinstance(link, list)]
    if not saved:
        raise ValueError("the workflow saves no image (SaveImage, or Canvas Save with an image)")
    return [value(link[0])[link[1]] for link in saved]


def thumbnail(image: torch.Tensor) -> Image.Image:
    """IMAGE [B, H, W, 3] -> the first image at WIDTH px wide, long panoramas in stacked strips."""
    img = Image.fromarray((image[0].float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8))
    w, h = img.size
    if w <= STRIP_ABOVE * h:
        return img.resize((WIDTH, round(h * WIDTH / w)), Image.LANCZOS)
    strip_w = STRIP_ASPECT * h
    strips = [img.crop((x, 0, min(x + strip_w, w), h)) for x in range(0, w, strip_w)]
    scale = WIDTH / strip_w
    strips = [s.resize((max(1, round(s.width * scale)), round(h * scale)), Image.LANCZOS) for s in strips]
    sh = strips[0].height
    sheet = Image.new("RGB", (WIDTH, len(strips) * sh + (len(strips) - 1) * GAP), GAP_COLOUR)
    for n, s in enumerate(strips):
        sheet.paste(s, (0, n * (sh + GAP)))
    return sheet


def frame_strip(frames: torch.Tensor, shown: int = 5) -> Image.Image:
    """IMAGE [F, H, W, 3] of a video -> `shown` frames evenly spaced from the first to the last, in a row with
    GAP px between them, scaled down to SHEET_MAX_WIDTH."""
    picks = torch.linspace(0, frames.shape[0] - 1, min(shown, frames.shape[0])).round().long().tolist()
    h, w = frames.shape[1:3]
    sheet = Image.new("RGB", (len(picks) * w + (len(picks) - 1) * GAP, h), GAP_COLOUR)
    for n, k in enumerate(picks):
        pixels = (frames[k].float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
        sheet.paste(Image.fromarray(pixels), (n * (w + GAP), 0))
    if sheet.width > SHEET_MAX_WIDTH:
        sheet = sheet.resize((SHEET_MAX_WIDTH, round(sheet.height * SHEET_MAX_WIDTH / sheet.width)), Image.LANCZOS)
    return sheet


def contact_sheet(webp: Path) -> Image.Image:
    """Every frame of an animated WEBP, SHEET_COLS a row, at the frames' size (scaled down to SHEET_MAX_WIDTH)."""
    from _comfyui import animated_frames
    frames = animated_frames(webp)
    w, h = frames[0].size
    cols = min(SHEET_COLS, len(frames))
    rows = -(-len(frames) // cols)
    sheet = Image.new("RGB", (cols * w, rows * h), GAP_COLOUR)
    for n, frame in enumerate(frames):
        sheet.paste(frame, ((n % cols) * w, (n // cols) * h))
    if sheet.width > SHEET_MAX_WIDTH:
        sheet = sheet.resize((SHEET_MAX_WIDTH, round(sheet.height * SHEET_MAX_WIDTH / sheet.width)), Image.LANCZOS)
    return sheet


def main_comfyui(names: list[str]) -> None:
    """Run the NUWA-XL workflows on a real ComfyUI (COMFYUI_DIR, COMFYUI_PYTHON) and write their thumbnails."""
    import os
    import tempfile
    from _comfyui import run_xl_workflow, start_comfyui
    for name in names:
        if name not in XL_WORKFLOWS:
            raise SystemExit(f"{name}: --comfyui makes the NUWA-XL workflows' thumbnails {XL_WORKFLOWS}")
    comfyui_dir = os.environ.get("COMFYUI_DIR")
    if not comfyui_dir or not (Path(comfyui_dir) / "main.py").is_file():
        raise SystemExit("--comfyui needs COMFYUI_DIR (a ComfyUI checkout; COMFYUI_PYTHON: its interpreter)")
    if not (REPO / "models" / "nuwa_xl" / "mtd_default.safetensors").is_file():
        raise SystemExit("models/nuwa_xl/mtd_default.safetensors is absent")
    with tempfile.TemporaryDirectory(prefix="nuwa_thumbs_") as tmp:
        with start_comfyui(Path(comfyui_dir).resolve(), Path(tmp)) as server:
            for name in names or XL_WORKFLOWS:
                _, webp = run_xl_workflow(server, name)
                sheet = contact_sheet(webp)
                target = UI_DIR / f"{name}.jpg"
                sheet.save(target, "JPEG", quality=QUALITY)
                print(f"{name}: {webp.name} -> {target} {sheet.size}")


def main(names: list[str]) -> None:
    import os
    import tempfile
    torch.manual_seed(0)
    # the nodes' output folder is the working directory's without ComfyUI: start from an empty one, so a
    # Canvas Load 'latest' starts from its start canvas as in a fresh ComfyUI
    os.chdir(tempfile.mkdtemp(prefix="nuwa_thumbs_"))
    # models trained by a template (NUWA Train One-Shot) go to the first model folder: a temporary one
    os.environ.setdefault("NUWA_MODELS_DIR", tempfile.mkdtemp(prefix="nuwa_thumb_models_"))
    for name in names or SHIPPED_RUNS:
        if name not in SHIPPED_RUNS:
            raise SystemExit(f"{name}: not a workflow that runs on a shipped model ({sorted(SHIPPED_RUNS)})")
        prompt = json.loads((API_DIR / f"{name}.json").read_text())
        image = run_workflow(prompt)[0]
        saves_video = any(n["class_type"] == "SaveAnimatedWEBP" for n in prompt.values())
        thumb = frame_strip(image) if saves_video else thumbnail(image)
        target = UI_DIR / f"{name}.jpg"
        thumb.save(target, "JPEG", quality=QUALITY)
        print(f"{name}: saved image {tuple(image.shape)} -> {target} {thumb.size}")


if __name__ == "__main__":
    args = sys.argv[1:]
    if "--comfyui" in args:
        main_comfyui([a for a in args if a != "--comfyui"])
    else:
        main(args)
