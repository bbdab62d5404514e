"""Empty Canvas and Patch Renderer (Algorithm 2: generate the planned patches)."""
from __future__ import annotations

import time
import weakref

import numpy as np
from PIL import Image

from nuwa_core.infinity.preview import PreviewDecoder

from . import _comfy, _engine
from .planning_nodes import PlanSpec, as_plan_spec

CATEGORY = "NUWA/Infinity"


class NUWAEmptyCanvas:
    DESCRIPTION = ("A canvas with no known patch, for generation from scratch (unconditional or from a prompt). "
                   "Its size is rounded up to whole patches.")
    CATEGORY = CATEGORY
    FUNCTION = "make"
    RETURN_TYPES = ("NUWA_CANVAS",)
    RETURN_NAMES = ("canvas",)
    OUTPUT_TOOLTIPS = ("An empty canvas; plan it with Direction Planner (all directions 0 = fill it).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("NUWA_MODEL", {"tooltip": "From NUWA Model Loader; gives the patch size in pixels."}),
            "width": ("INT", {"default": 512, "min": 8, "max": 65536, "step": 8,
                              "tooltip": "Canvas width in pixels, rounded up to whole patches."}),
            "height": ("INT", {"default": 256, "min": 8, "max": 65536, "step": 8,
                               "tooltip": "Canvas height in pixels, rounded up to whole patches."}),
            "frames": ("INT", {"default": 1, "min": 1, "max": 4096,
                               "tooltip": "Patch-frames (1 for an image; video models: frames / frames per patch)."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64,
                                   "tooltip": "Independent canvases generated together."}),
        }}

    def make(self, model, width, height, frames, batch_size):
        rows, cols = model.patch_counts(height, width, mode="pad")
        return (model.blank_canvas(rows, cols, frames=frames, batch=batch_size),)


def _preview(model, state, decoder=None) -> Image.Image:
    """Batch row 0, frame 0 of the canvas, decoded incrementally: only the VQGAN windows whose tokens
    changed since the last preview are decoded again (nuwa_core.infinity.preview). decoder: a
    PreviewDecoder for this run; None: one kept per model (it compares tokens, so any canvas is safe)."""
    image = (decoder or _preview_decoder(model))(state)
    return Image.fromarray((image.clamp(0, 1).numpy() * 255).astype(np.uint8))


_PREVIEWS = weakref.WeakKeyDictionary()  # model -> its PreviewDecoder


def _preview_decoder(model) -> PreviewDecoder:
    decoder = _PREVIEWS.get(model)
    if decoder is None:
        decoder = _PREVIEWS[model] = PreviewDecoder(model)
    return decoder


class NUWAPatchRenderer:
    DESCRIPTION = ("Generates the planned patches one by one (NUWA-Infinity, Algorithm 2): each patch sees the nearby "
                   "patches already on the canvas, and is sampled autoregressively (AR), all at once (NAR) or in a "
                   "few refinement steps (P-NAR). A prompt (NUWA Text Encode, or CLIP Text Encode for CLIP-L models) conditions text models. "
                   "Shows a live preview and stops cleanly on cancel.")
    CATEGORY = CATEGORY
    FUNCTION = "render"
    RETURN_TYPES = ("IMAGE", "NUWA_CANVAS")
    RETURN_NAMES = ("image", "canvas")
    OUTPUT_TOOLTIPS = ("The decoded canvas [batch*frames, height, width, 3].",
                       "The grown canvas with its context pool, to save, extend further or decode again.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("NUWA_MODEL", {"tooltip": "From NUWA Model Loader."}),
                "canvas": ("NUWA_CANVAS", {"tooltip": "The canvas the plan was made for (it is not modified)."}),
                "plan": ("NUWA_PLAN", {"tooltip": "From Direction Planner: what to generate and in which order."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                 "tooltip": "Random seed; the same seed and inputs give the same image."}),
                "decoder": (list(_engine.DECODER_CHOICES), {"default": "auto", "tooltip":
                    "How tokens inside a patch are sampled: auto = what the model was trained for; AR one token "
                    "at a time, NAR all at once, P-NAR a few refinement steps. A model only decodes as trained."}),
                "steps": ("INT", {"default": 8, "min": 1, "max": 256,
                                  "tooltip": "P-NAR refinement steps per patch (ignored by AR and NAR)."}),
                "temperature": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 5.0, "step": 0.01,
                                          "tooltip": "Sampling temperature: lower is safer and blurrier, higher more varied."}),
                "top_k": ("INT", {"default": 768, "min": 0, "max": 65536,
                                  "tooltip": "Sample only among the k likeliest tokens; 0 = off."}),
                "top_p": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                                    "tooltip": "Nucleus sampling: keep the smallest set of tokens with this total probability; 1 = off."}),
            },
            "optional": {
                "conditioning": ("CONDITIONING", {"tooltip": "Prompt for text-conditioned models: from NUWA Text "
                                                             "Encode (models trained with a NUWA text encoder) or "
                                                             "CLIP Text Encode (models trained on CLIP-L); leave empty "
                                                             "otherwise."}),
                "context": ("NUWA_CONTEXT", {"tooltip": "Nearby Context Pool options (extent); default: the model's."}),
                "epsilon": ("FLOAT", {"default": _engine.EPSILON_DEFAULT, "min": 0.0, "max": 0.5, "step": 0.001, "tooltip":
                    "Skip tokens less likely than this (epsilon sampling); 0 = off. Models trained with label smoothing "
                    "(the one-shot default) give every token a small floor that would otherwise be sampled as noise."}),
                "guidance": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 20.0, "step": 0.1, "tooltip":
                    "Classifier-free guidance of the prompt: 1 = off; above 1 follows the prompt more (each patch is "
                    "rendered with and without it: about twice the time). Ignored without a prompt."}),
                "candidates": ("INT", {"default": 1, "min": 1, "max": 16, "tooltip":
                    "Draws per patch: each patch is sampled this many times and the draw kept that best predicts "
                    "the patches around it, lies nearest the other draws and meets their edges (continues its "
                    "context better, with smoother patch borders; about "
                    "this many times the time and memory of a patch). 1 = a single draw, as the paper samples. "
                    "With a prompt keep 1: the kept draws are the smoothest, and follow the prompt less."}),
            },
        }

    def render(self, model, canvas, plan, seed, decoder, steps, temperature, top_k, top_p,
               conditioning=None, context=None, epsilon=_engine.EPSILON_DEFAULT, guidance=1.0, candidates=1):
        spec: PlanSpec = as_plan_spec(plan)
        settings = _engine.sampler_settings(decoder, temperature, top_k, top_p, steps, epsilon, guidance, candidates)
        text = _engine.text_from_conditioning(conditioning, model)
        extent = None  # the engine refuses an extent beyond the trained one, naming both
        if context is not None:
            trained = tuple(model.renderer.config.extent)
            extent = tuple(t if e < 0 else e for e, t in zip(context["extent"], trained))
        memory = _comfy.render_memory(model, canvas, spec.plans, extent, guided=text is not None and guidance != 1,
                                      candidates=settings.candidates)
        _comfy.load_for_run(getattr(model, "comfy_patcher", None), memory)
        state = spec.prepare(canvas)  # a copy: the input canvas is never modified
        seed = int(seed) % (2 ** 63)  # every patch draws CPU noise from its own stream of it: one image per seed on every device
        total = len(spec)
        progress = _comfy.Progress(total)
        last = {"t": 0.0, "cost": 0.0}
        previews = _preview_decoder(model)

        finished = 0  # patches of the plans run before this one (a mask's fill, then an extension)

        def callback(done, total_, current):
            _comfy.check_interrupted()  # raises ComfyUI's interrupt; nothing half-written escapes
            preview = None
            now = time.perf_counter()
            # previews decode the canvas: keep them to about a fifth of the run's time
            if progress.bar is not None and (finished + done == total or now - last["t"] >= 5 * last["cost"]):
                preview = _preview(model, current, previews)
                last["t"], last["cost"] = time.perf_counter(), time.perf_counter() - now
            progress.update(finished + done, preview)
            return True

        result = state
        for core_plan in spec.plans:  # one seed for all of them: each patch's stream is keyed by its place
            result = model.generate(result, core_plan, settings, text=text, generator=seed, callback=callback,
                                    extent=extent)
            finished += len(core_plan)
        if result.batch == 1 and result.tokens.shape[1] == 1:
            # one image: the previews decoded it as it grew, window by window; only the windows changed
            # since the last one are decoded now (the same pixels as model.decode)
            image = previews(result)[None]
        else:
            image = model.decode(result)
        device = _comfy.intermediate_device()
        return (image.to(device), _comfy.canvas_to(result, device))


NODE_CLASS_MAPPINGS = {"NUWAEmptyCanvas": NUWAEmptyCanvas, "NUWAPatchRenderer": NUWAPatchRenderer}
NODE_DISPLAY_NAME_MAPPINGS = {"NUWAEmptyCanvas": "NUWA Empty Canvas", "NUWAPatchRenderer": "NUWA Patch Renderer"}
