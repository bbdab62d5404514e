"""NUWA Model Loader."""
from __future__ import annotations

import torch

from . import _comfy, _engine

CATEGORY = "NUWA/Infinity"


class NUWAModelLoader:
    DESCRIPTION = ("Loads a NUWA-Infinity model file (VQGAN tokenizer + patch renderer) from the "
                   "'nuwa' model folder: ComfyUI/models/nuwa, the pack's own models/nuwa (where the "
                   "default model ships) or any `nuwa:` folder of extra_model_paths.yaml.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("NUWA_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The loaded model; feed it to VQGAN Encode/Decode, Direction Planner and Patch Renderer.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (_comfy.list_models(), {
                "default": _comfy.DEFAULT_MODEL,
                "tooltip": "Model file in the 'nuwa' model folder. The default model ships with the pack."}),
        }}

    def load(self, model_name):
        path = _comfy.model_path(model_name)
        model = _engine.load_model(path, device="cpu")
        # ComfyUI's dtype for the device (fp16, else bf16, where it supports them; fp32 on the CPU); the
        # weights are kept in it on the offload device too
        dtype = _comfy.inference_dtype(sum(p.numel() for p in model.parameters()))
        if dtype != torch.float32:
            model = model.to(dtype=dtype)
        patcher = _comfy.wrap_for_memory_management(model, f"NUWA-Infinity model {model_name}")
        if patcher is not None:
            try:
                model.comfy_patcher = patcher
            except AttributeError:
                pass
        return (model,)


NODE_CLASS_MAPPINGS = {"NUWAModelLoader": NUWAModelLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"NUWAModelLoader": "NUWA Model Loader"}
