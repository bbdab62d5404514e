"""ComfyUI nodes of ComfyUI-NUWA: thin nodes over nuwa_core, declared in the classic form (which
works without ComfyUI) and served through the V3 API where ComfyUI has it (_v3.py).

Node ids (the keys of NODE_CLASS_MAPPINGS) and the order of each node's widgets are frozen:
saved workflows store widget values by position. Add new widgets at the end, as optional inputs.
"""
from ._comfy import register_model_folders
from . import (canvas_nodes, model_nodes, planning_nodes, render_nodes, text_nodes, training_nodes, video_nodes,
               xl_ksampler_nodes, xl_nodes)

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for _module in (model_nodes, text_nodes, canvas_nodes, planning_nodes, render_nodes, video_nodes, training_nodes,
                xl_nodes, xl_ksampler_nodes):
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "register_model_folders"]
