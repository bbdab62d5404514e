"""VQGAN Encode / Decode and Canvas Save / Load: IMAGE <-> NUWA_CANVAS <-> file."""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from . import _comfy

CATEGORY = "NUWA/Infinity"
CANVAS_SUFFIX = ".nuwacanvas.safetensors"
FIT_MODES = ("refuse", "crop", "resize")


class NUWAVQGANEncode:
    DESCRIPTION = ("Turns an image (or a batch of video frames) into a NUWA canvas: VQGAN tokens on a "
                   "grid of patches, all marked as known, ready to be extended or filled.")
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("NUWA_CANVAS",)
    RETURN_NAMES = ("canvas",)
    OUTPUT_TOOLTIPS = ("A canvas of known patches; its size in patches is the image size divided by the patch size.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("NUWA_MODEL", {"tooltip": "From NUWA Model Loader: its VQGAN tokenizes the image."}),
            "image": ("IMAGE", {"tooltip": "Image(s) to start from. The batch is taken as frames of one video "
                                           "when the model generates video, else as independent images."}),
            "fit": (list(FIT_MODES), {"default": "crop", "tooltip":
                "When the image is not a whole number of patches: refuse (error), crop the edges, "
                "or resize to the nearest whole number of patches."}),
        }}

    def encode(self, model, image, fit):
        with torch.inference_mode():
            state = model.canvas_from_image(image.detach().cpu().float().clamp(0, 1), fit=fit)
        return (state,)


class NUWAVQGANDecode:
    DESCRIPTION = "Decodes a NUWA canvas back to pixels with the model's VQGAN."
    CATEGORY = CATEGORY
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The canvas as an image batch [batch*frames, height, width, 3]; unknown patches are grey.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("NUWA_MODEL", {"tooltip": "From NUWA Model Loader; must be the model that made the canvas."}),
            "canvas": ("NUWA_CANVAS", {"tooltip": "Canvas from VQGAN Encode, Patch Renderer or Canvas Load."}),
        }}

    def decode(self, model, canvas):
        _comfy.check_interrupted()
        image = model.decode(canvas)
        return (image.to(_comfy.intermediate_device()),)


def _safe_prefix(prefix: str) -> str:
    prefix = prefix.replace("\\", "/").strip("/")
    parts = [p for p in prefix.split("/") if p not in ("", ".", "..")]
    if not parts:
        raise ValueError(f"filename_prefix {prefix!r} is empty; use something like 'nuwa/canvas'")
    return "/".join(parts)


class NUWACanvasSave:
    DESCRIPTION = ("Saves a canvas (tokens, which patches are known) to ComfyUI's output folder so a long "
                   "generation can be resumed or extended later with Canvas Load.")
    CATEGORY = CATEGORY
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ()
    OUTPUT_TOOLTIPS = ()

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "canvas": ("NUWA_CANVAS", {"tooltip": "The canvas to keep."}),
            "filename_prefix": ("STRING", {"default": "nuwa/canvas", "tooltip":
                f"Path inside the output folder; a counter and '{CANVAS_SUFFIX}' are appended. "
                "Copy the file into the input folder to load it again."}),
        }}

    def save(self, canvas, filename_prefix):
        prefix = _safe_prefix(filename_prefix)
        out_dir = _comfy.output_directory()
        folder = (out_dir / prefix).parent
        base = Path(prefix).name
        folder.mkdir(parents=True, exist_ok=True)
        pattern = re.compile(re.escape(base) + r"_(\d{5})" + re.escape(CANVAS_SUFFIX) + "$")
        used = [int(m.group(1)) for p in folder.iterdir() if (m := pattern.match(p.name))]
        name = f"{base}_{(max(used) + 1) if used else 1:05d}{CANVAS_SUFFIX}"
        canvas.save(folder / name)
        subfolder = os.path.relpath(folder, out_dir)
        subfolder = "" if subfolder == "." else subfolder.replace(os.sep, "/")
        return {"ui": {"nuwa_canvas": [{"filename": name, "subfolder": subfolder, "type": "output"}]}}


def _input_canvases() -> list[str]:
    root = _comfy.input_directory()
    if not root.is_dir():
        return []
    return sorted(p.relative_to(root).as_posix() for p in root.rglob(f"*{CANVAS_SUFFIX}") if p.is_file())


class NUWACanvasLoad:
    DESCRIPTION = ("Loads a canvas saved by Canvas Save from ComfyUI's input folder, to resume or "
                   "extend a generation.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("NUWA_CANVAS",)
    RETURN_NAMES = ("canvas",)
    OUTPUT_TOOLTIPS = ("The saved canvas, with its known patches and tokens.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "canvas_file": (_input_canvases(), {"tooltip":
                f"A '{CANVAS_SUFFIX}' file in ComfyUI's input folder (copy it there from the output folder)."}),
        }}

    @classmethod
    def _path(cls, canvas_file) -> Path:
        root = _comfy.input_directory().resolve()
        path = (root / canvas_file).resolve()
        if root not in path.parents:
            raise ValueError(f"canvas_file {canvas_file!r} must be inside the input folder {root}")
        return path

    @classmethod
    def IS_CHANGED(cls, canvas_file):
        path = cls._path(canvas_file)
        return path.stat().st_mtime_ns if path.is_file() else float("nan")

    @classmethod
    def VALIDATE_INPUTS(cls, canvas_file):
        path = cls._path(canvas_file)
        if not path.is_file():
            return f"Canvas file not found: {canvas_file} (looked in {path.parent})"
        return True

    def load(self, canvas_file):
        from nuwa_core.infinity.canvas import CanvasState
        return (CanvasState.load(self._path(canvas_file)),)


NODE_CLASS_MAPPINGS = {
    "NUWAVQGANEncode": NUWAVQGANEncode,
    "NUWAVQGANDecode": NUWAVQGANDecode,
    "NUWACanvasSave": NUWACanvasSave,
    "NUWACanvasLoad": NUWACanvasLoad,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "NUWAVQGANEncode": "NUWA VQGAN Encode",
    "NUWAVQGANDecode": "NUWA VQGAN Decode",
    "NUWACanvasSave": "NUWA Canvas Save",
    "NUWACanvasLoad": "NUWA Canvas Load",
}
