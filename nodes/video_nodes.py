"""NUWA PG-VQGAN Decode: a video canvas -> frames, each frame after the first decoded by the Pixel-Guided
VQGAN (NUWA-Infinity section 3.3.2) guided by the previous decoded frame, so the video flickers less.

PG-VQGAN files (nuwa_kind "pgvqgan", trained with `python -m nuwa_core.train pgvqgan`) live in the
`pgvqgan` folder of the "nuwa" model folder: ComfyUI/models/nuwa/pgvqgan, the pack's
models/nuwa/pgvqgan, the `pgvqgan/` of any `nuwa:` folder of extra_model_paths.yaml, and any
`nuwa_pgvqgan:` folder of it (the registered ComfyUI folder "nuwa_pgvqgan").
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from PIL import Image

from . import _comfy

CATEGORY = "NUWA/Infinity"
PG_SUBFOLDER = "pgvqgan"           # under every "nuwa" model folder
PG_FOLDER = "nuwa_pgvqgan"         # the ComfyUI folder name registered for it
NONE = "none"


_comfy.register_subfolder(PG_SUBFOLDER, PG_FOLDER)


def list_pgvqgans() -> list[str]:
    """'none' (the plain VQGAN frame by frame), then every .safetensors of the pgvqgan folders."""
    return [NONE] + _comfy.list_subfolder(PG_SUBFOLDER, PG_FOLDER)


def pgvqgan_path(name: str) -> Path:
    from nuwa_core.weights import find_model_file
    return find_model_file(name, _comfy.subfolder_paths(PG_SUBFOLDER, PG_FOLDER))


def _pil(frame: torch.Tensor) -> Image.Image:  # [3, H, W] in -1..1
    return Image.fromarray(((frame.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())


class NUWAPGVQGANDecode:
    DESCRIPTION = ("Decodes a video canvas frame by frame: the first frame as VQGAN Decode does (the given image, "
                   "for image animation, is kept as it is), every later frame by a Pixel-Guided VQGAN that also sees "
                   "the previous decoded frame's pixels, so detail carries over and the video flickers less "
                   "(NUWA-Infinity 3.3.2). Tile by tile, so memory stays flat at any size and length. 'none' decodes "
                   "every frame with the plain VQGAN. A PG-VQGAN trained for another tokenizer is refused.")
    CATEGORY = CATEGORY
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE", "FLOAT")
    RETURN_NAMES = ("images", "fps")
    OUTPUT_TOOLTIPS = (("The frames as an image batch [batch*frames, height, width, 3] (canvas 0's frames first); "
                        "unknown patches are grey."),
                       "The frame rate, passed through, for a video-saving node.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("NUWA_MODEL", {"tooltip": "From NUWA Model Loader; must be the model that made the canvas."}),
            "canvas": ("NUWA_CANVAS", {"tooltip": "A video canvas from Patch Renderer or Canvas Load (frames forward)."}),
            "pgvqgan_name": (list_pgvqgans(), {"default": NONE, "tooltip": (
                "PG-VQGAN file in models/nuwa/pgvqgan, trained for this model's VQGAN (`python -m nuwa_core.train "
                "pgvqgan`); 'none' = the plain VQGAN frame by frame.")}),
            "fps": ("FLOAT", {"default": 10.0, "min": 0.01, "max": 240.0, "step": 0.01,
                              "tooltip": "Frames per second of the video, passed to the fps output."}),
        }}

    def decode(self, model, canvas, pgvqgan_name, fps):
        from nuwa_core.images import model_to_image
        from nuwa_core.infinity.canvas import UNKNOWN
        from nuwa_core.infinity.pixel_guided_vqgan import check_pair, decode_video, load_pgvqgan
        _comfy.check_interrupted()
        _comfy.load_for_run(getattr(model, "comfy_patcher", None), 2 * _comfy.vqgan_memory(model, decode=True))
        vq = model.vqgan
        pg = None
        if pgvqgan_name != NONE:
            path = pgvqgan_path(pgvqgan_name)
            pg = load_pgvqgan(path, device=model.device, dtype=model.vqgan_dtype)
            check_pair(pg, vq, path, getattr(model, "source_path", None) or "the loaded NUWA model's VQGAN")
        b, ft = canvas.tokens.shape[:2]
        f_px, tile = vq.downsample_factor, model.vqgan_tile
        wrap = tuple(p > 0 for p in canvas.periods[1:])
        progress = _comfy.Progress(b * ft)
        last = {"t": 0.0}
        out = []
        for i in range(b):
            # frame 0 exactly as VQGAN Decode (NuwaInfinity.decode): grey unknown patches, given pixels composited
            one = dataclasses.replace(canvas, tokens=canvas.tokens[i:i + 1, :1], known=canvas.known[:1], pool=None,
                                      given=None if canvas.given is None else canvas.given[i:i + 1])
            first = model.decode(one)[0]  # [H, W, 3] in 0..1
            done = i * ft

            def callback(n, frames, frame, done=done):
                _comfy.check_interrupted()
                now = time.perf_counter()
                preview = None
                if progress.bar is not None and (n == frames - 1 or now - last["t"] >= 1.0):
                    preview, last["t"] = _pil(frame), now
                progress.update(done + n + 1, preview)
                return True

            video = decode_video(vq, pg, canvas.tokens[i].clamp(min=0), first.permute(2, 0, 1) * 2 - 1, tile,
                                 wrap=wrap, callback=callback)  # [ft, 3, H, W] in -1..1
            frames = model_to_image(video[1:])  # [ft - 1, H, W, 3]
            unknown = (canvas.tokens[i, 1:] == UNKNOWN).repeat_interleave(f_px, 1).repeat_interleave(f_px, 2)
            frames[unknown] = 0.5
            out += [first[None].float(), frames]
        image = torch.cat(out)  # [B*F, H, W, 3]
        return (image.to(_comfy.intermediate_device()), float(fps))


NODE_CLASS_MAPPINGS = {"NUWAPGVQGANDecode": NUWAPGVQGANDecode}
NODE_DISPLAY_NAME_MAPPINGS = {"NUWAPGVQGANDecode": "NUWA PG-VQGAN Decode"}
