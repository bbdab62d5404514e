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
        _comfy.load_for_run(getattr(model, "comfy_patcher", None), _comfy.vqgan_memory(model, image.shape[0]))
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
        _comfy.load_for_run(getattr(model, "comfy_patcher", None), _comfy.vqgan_memory(model, decode=True))
        image = model.decode(canvas)
        return (image.to(_comfy.intermediate_device()),)


def _safe_prefix(prefix: str) -> str:
    prefix = prefix.replace("\\", "/").strip("/")
    parts = [p for p in prefix.split("/") if p not in ("", ".", "..")]
    if not parts:
        raise ValueError(f"filename_prefix {prefix!r} is empty; use something like 'nuwa/canvas'")
    return "/".join(parts)


def _numbered(prefix: str) -> tuple[Path, str, list[tuple[int, Path]]]:
    """The output folder of `prefix`, its file base name, and the (counter, path) of every file Canvas
    Save numbered there (an absent folder has none)."""
    prefix = _safe_prefix(prefix)
    folder, base = (_comfy.output_directory() / prefix).parent, Path(prefix).name
    pattern = re.compile(re.escape(base) + r"_(\d{5})" + re.escape(CANVAS_SUFFIX) + "$")
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := pattern.match(p.name))] \
        if folder.is_dir() else []
    return folder, base, found


def latest_canvas(prefix: str) -> Path | None:
    """The last canvas Canvas Save wrote under `prefix` (the highest counter), or None."""
    files = [(n, p) for n, p in _numbered(prefix)[2] if p.is_file()]
    return max(files)[1] if files else None


class NUWACanvasSave:
    DESCRIPTION = ("Saves a canvas (tokens, which patches are known, the image's own pixels and mask) to ComfyUI's "
                   "output folder, numbered, so a generation can be grown further in a later run: Canvas Load "
                   "lists it, and its 'latest' choice always takes the last one saved under a prefix.")
    CATEGORY = CATEGORY
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ()
    OUTPUT_TOOLTIPS = ()

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "canvas": ("NUWA_CANVAS", {"tooltip": "The canvas to keep."}),
                "filename_prefix": ("STRING", {"default": "nuwa/canvas", "tooltip":
                    f"Path inside the output folder; a counter and '{CANVAS_SUFFIX}' are appended. Canvas Load "
                    "with 'latest' and the same prefix loads the last one."}),
            },
            "optional": {
                "image": ("IMAGE", {"tooltip": "The decoded canvas (Patch Renderer's image): saved beside the canvas "
                                               "as a PNG of the same name and shown on this node."}),
            },
        }

    def save(self, canvas, filename_prefix, image=None):
        folder, base, used = _numbered(filename_prefix)
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{base}_{max((n for n, _ in used), default=0) + 1:05d}{CANVAS_SUFFIX}"
        canvas.save(folder / name)
        out_dir = _comfy.output_directory()
        subfolder = os.path.relpath(folder, out_dir)
        subfolder = "" if subfolder == "." else subfolder.replace(os.sep, "/")
        ui = {"nuwa_canvas": [{"filename": name, "subfolder": subfolder, "type": "output"}]}
        if image is not None:
            from PIL import Image
            png = name[:-len(CANVAS_SUFFIX)] + ".png"
            pixels = (image[0].detach().float().cpu().clamp(0, 1).numpy() * 255).round().astype("uint8")
            Image.fromarray(pixels).save(folder / png)
            ui["images"] = [{"filename": png, "subfolder": subfolder, "type": "output"}]
        return {"ui": ui}


LATEST = "latest"
OUTPUT_TAG = " [output]"


def _listed_canvases() -> list[str]:
    """Canvases in the output folder (annotated as ComfyUI annotates them) then in the input folder."""
    names = []
    for root, tag in ((_comfy.output_directory(), OUTPUT_TAG), (_comfy.input_directory(), "")):
        if root.is_dir():
            names += sorted(p.relative_to(root).as_posix() + tag for p in root.rglob(f"*{CANVAS_SUFFIX}")
                            if p.is_file())
    return names


class NUWACanvasLoad:
    DESCRIPTION = ("Loads a canvas saved by Canvas Save, to grow it further: 'latest' takes the last one saved "
                   "under `latest_prefix` (so every queued run continues the previous one), or pick a file from the "
                   "output or input folder. With 'latest' and nothing saved yet, the `start` canvas is used.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("NUWA_CANVAS",)
    RETURN_NAMES = ("canvas",)
    OUTPUT_TOOLTIPS = ("The saved canvas, with its known patches, tokens, pool and given pixels.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "canvas_file": ([LATEST] + _listed_canvases(), {"default": LATEST, "tooltip":
                    f"'latest': the last canvas saved under latest_prefix; or a '{CANVAS_SUFFIX}' file from the "
                    "output folder ([output]) or the input folder. Press R in the editor to refresh the list."}),
            },
            "optional": {
                "latest_prefix": ("STRING", {"default": "nuwa/canvas", "tooltip":
                    "The Canvas Save filename_prefix whose last file 'latest' loads."}),
                "start": ("NUWA_CANVAS", {"lazy": True, "tooltip":
                    "Used (and only then computed) when 'latest' finds no saved canvas: the first run's canvas, "
                    "e.g. VQGAN Encode of your image."}),
            },
        }

    @classmethod
    def _path(cls, canvas_file, latest_prefix="nuwa/canvas") -> Path | None:
        if canvas_file == LATEST:
            return latest_canvas(latest_prefix)
        if canvas_file.endswith(OUTPUT_TAG):
            root, name = _comfy.output_directory().resolve(), canvas_file[:-len(OUTPUT_TAG)]
        else:
            root, name = _comfy.input_directory().resolve(), canvas_file
        path = (root / name).resolve()
        if root not in path.parents:
            raise ValueError(f"canvas_file {canvas_file!r} must be inside the folder {root}")
        return path

    @classmethod
    def IS_CHANGED(cls, canvas_file, latest_prefix="nuwa/canvas", start=None):
        path = cls._path(canvas_file, latest_prefix)
        if path is None or not path.is_file():
            return "none"  # 'latest' with nothing saved yet: the start canvas decides
        return f"{path}:{path.stat().st_mtime_ns}"

    @classmethod
    def VALIDATE_INPUTS(cls, canvas_file, latest_prefix="nuwa/canvas"):
        path = cls._path(canvas_file, latest_prefix)
        if canvas_file != LATEST and not path.is_file():
            return f"Canvas file not found: {canvas_file} (looked in {path.parent})"
        return True

    def check_lazy_status(self, canvas_file, latest_prefix="nuwa/canvas", start=None):
        path = self._path(canvas_file, latest_prefix)
        return ["start"] if start is None and (path is None or not path.is_file()) else []

    def load(self, canvas_file, latest_prefix="nuwa/canvas", start=None):
        from nuwa_core.infinity.canvas import CanvasState
        path = self._path(canvas_file, latest_prefix)
        if path is not None and path.is_file():
            return (CanvasState.load(path),)
        if canvas_file == LATEST and start is not None:
            return (start,)
        folder = _numbered(latest_prefix)[0]
        raise ValueError(f"no canvas saved under '{latest_prefix}' yet (looked for {Path(latest_prefix).name}_NNNNN"
                         f"{CANVAS_SUFFIX} in {folder}): connect a start canvas (e.g. VQGAN Encode of your image) "
                         "for the first run, or pick a saved file")


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
