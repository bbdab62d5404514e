"""NUWA Train One-Shot: a model of the artist's own image, trained inside ComfyUI (nuwa_core.training.one_shot)."""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import _comfy
from .model_nodes import NUWAModelLoader

log = logging.getLogger("ComfyUI-NUWA")
CATEGORY = "NUWA/Infinity"
START_FROM = {"shipped model": "shipped", "scratch": "scratch"}
WRAPS = {"none": "none", "horizontal": "x", "both": "xy"}
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.-]{0,99}")


def model_name_checked(name: str) -> str:
    """The model's file stem from the node's `model_name` (".safetensors" optional), or a clear error."""
    stem = name.strip().removesuffix(".safetensors")
    if not NAME.fullmatch(stem):
        raise ValueError(f"model_name {name!r}: use letters, digits, spaces, '_', '-' and '.' (no folders), up to "
                         f"100 characters, e.g. my_painting")
    return stem


def _trained_as(path: Path) -> dict:
    """The one-shot record in a model file's metadata ({} for another kind of file or none)."""
    from nuwa_core.checkpoint import read_metadata
    try:
        return json.loads(read_metadata(path).get("one_shot", "{}"))
    except (OSError, ValueError):
        return {}


def _image_and_mask(image: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """IMAGE [B, H, W, C] -> [3, H, W] in -1..1 (one image), or the frames [B, 3, H, W] of a video (B > 1);
    MASK -> [H, W] or None when empty."""
    from nuwa_core.images import image_to_model
    x = image_to_model(image) if image.shape[0] > 1 else image_to_model(image)[0]
    if mask is None:
        return x, None
    m = mask[0] if mask.ndim == 3 else mask
    if not bool(m.gt(0.5).any()):  # LoadImage's mask of an image without a painted alpha
        return x, None
    if tuple(m.shape) != tuple(x.shape[-2:]):
        raise ValueError(f"the mask is {m.shape[-1]}x{m.shape[-2]} px but the image is {x.shape[-1]}x{x.shape[-2]}: "
                         f"give the mask of this image (white = leave out of training)")
    return x, m.gt(0.5)


def _preview_picture(image: torch.Tensor) -> Image.Image:
    return Image.fromarray((image[0].float().clamp(0, 1).cpu().numpy() * 255).astype(np.uint8))


class NUWATrainOneShot:
    DESCRIPTION = ("Trains a NUWA-Infinity model of one image (your painting) in a time budget: the tokenizer, then "
                   "the patch renderer, as the shipped models were trained. The model is saved in the 'nuwa' model "
                   "folder as <model_name>.safetensors (the Model Loader lists it) and returned at once. Run again "
                   "with the same image and settings and it is loaded, not retrained; 'continue_training' trains the "
                   "saved model further. Cancel stops it, keeping what it learned. About 10 minutes on a CPU give a "
                   "usable model; a GPU is used when ComfyUI has one. A batch of video frames trains a video model "
                   "and its PG-VQGAN instead.")
    CATEGORY = CATEGORY
    FUNCTION = "train"
    RETURN_TYPES = ("NUWA_MODEL", "STRING")
    RETURN_NAMES = ("model", "model_name")
    OUTPUT_TOOLTIPS = ("The trained model, ready for VQGAN Encode, Direction Planner and Patch Renderer.",
                       "Its file name in the 'nuwa' model folder.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The image to learn, at least 128x128 px; the model learns it at this "
                                "size, so give it at the size you will outpaint it. A batch of frames (a loaded "
                                "video, 4 frames or more) trains a video model for image animation, and its PG-VQGAN "
                                "(nuwa/pgvqgan/<model_name>.safetensors, for PG-VQGAN Decode); frames larger than "
                                "256 px are scaled down, and the first 600 are used."}),
            "minutes": ("FLOAT", {"default": 10.0, "min": 0.1, "max": 24 * 60.0, "step": 0.5,
                                  "tooltip": "Time budget. About 10 minutes on a 2-core CPU for a usable model."}),
            "model_name": ("STRING", {"default": "my_painting", "tooltip": "File name in the 'nuwa' model folder. "
                                      "A model there trained on another image or with other settings is replaced; "
                                      "the old file is kept in nuwa/training/<name>/previous.safetensors."}),
            "continue_training": ("BOOLEAN", {"default": False, "tooltip": "Train the saved model of this name for "
                                              "'minutes' more (same image, mask and settings), each time it runs."}),
        }, "optional": {
            "mask": ("MASK", {"tooltip": "White = leave out of training (e.g. a region the model must not copy)."}),
            "start_from": (list(START_FROM), {"default": "shipped model", "tooltip": "Fine-tune the shipped "
                           "model's tokenizer and renderer, or train new ones."}),
            "image_wraps": (list(WRAPS), {"default": "none", "tooltip": "Whether the image itself wraps around "
                            "(a 360-degree panorama: horizontal; a texture that tiles: both). A seamless canvas "
                            "from an ordinary image needs none here: set wrap on the Direction Planner."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31 - 1, "tooltip": "Seeds the training: the same image, settings and seed train the same model when run to fixed step counts."}),
        }}

    @classmethod
    def IS_CHANGED(cls, model_name="my_painting", continue_training=False, **_):
        if continue_training:
            return float("nan")  # every run trains further
        try:
            path = _output_folder() / f"{model_name_checked(model_name)}.safetensors"
        except ValueError:
            return "invalid name"  # the run itself says what is wrong with it
        return path.stat().st_mtime_ns if path.is_file() else "absent"  # rerun when the file changed or went

    def train(self, image, minutes, model_name, continue_training, mask=None, start_from="shipped model",
              image_wraps="none", seed=0):
        from nuwa_core.training import one_shot
        from nuwa_core.training.loop import TrainingError
        stem = model_name_checked(model_name)
        folder = _output_folder()
        out, work = folder / f"{stem}.safetensors", folder / one_shot.TRAINING_FOLDER / stem
        if start_from not in START_FROM or image_wraps not in WRAPS:
            raise ValueError(f"start_from must be one of {list(START_FROM)} and image_wraps one of {list(WRAPS)}")
        x, keep_out = _image_and_mask(image, mask)
        settings = one_shot.OneShotSettings(minutes=float(minutes), start_from=START_FROM[start_from],
                                            wrap=WRAPS[image_wraps], seed=int(seed))
        key = one_shot.image_key(x, keep_out, settings)
        record = _trained_as(out) if out.is_file() else {}
        if (not continue_training and record.get("key") == key
                and record.get("settings", {}).get("minutes") == settings.minutes):
            log.info("ComfyUI-NUWA: %s is already trained on this image with these settings; loading it", out.name)
            return self._loaded(stem)
        if out.is_file() and not continue_training:  # another image or other settings: keep the old model
            work.mkdir(parents=True, exist_ok=True)
            shutil.copy2(out, work / "previous.safetensors")
        progress = _comfy.Progress(1000)

        def on_progress(p):
            if _comfy.interrupted():  # the run stops at its next check and saves; ComfyUI's progress hook would raise
                return
            try:
                progress.update(int(1000 * p.fraction), None if p.preview is None else _preview_picture(p.preview))
            except _comfy.Interrupted:  # cancel pressed since the line above: same as there
                pass

        try:
            summary = one_shot.train_one_shot(x, out, settings, keep_out, resume=bool(continue_training), work_dir=work,
                                              device=_comfy.torch_device(), on_progress=on_progress,
                                              should_stop=_comfy.interrupted, make_room=_comfy.free_memory)
        except TrainingError as err:
            raise ValueError(str(err)) from err
        finally:
            _comfy.soft_empty_cache()  # hand back the device memory training cached
        if summary["stopped"] in one_shot.STOPPED_BY_USER:
            _comfy.check_interrupted()  # ComfyUI shows the run as cancelled; what was learned is saved
            if summary["out"] is None:
                raise RuntimeError(f"training was stopped before the renderer began; nothing usable was written. "
                                   f"The tokenizer's progress is kept in {work}: turn on continue_training to go on")
        return self._loaded(stem)

    @staticmethod
    def _loaded(stem: str):
        name = f"{stem}.safetensors"
        return (NUWAModelLoader().load(name)[0], name)


def _output_folder() -> Path:
    """Where trained models go: the first 'nuwa' model folder (ComfyUI's models/nuwa)."""
    return Path(_comfy.model_folders()[0])


NODE_CLASS_MAPPINGS = {"NUWATrainOneShot": NUWATrainOneShot}
NODE_DISPLAY_NAME_MAPPINGS = {"NUWATrainOneShot": "NUWA Train One-Shot"}
