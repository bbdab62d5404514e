"""ComfyUI entry point of ComfyUI-NUWA.

In a ComfyUI with the V3 node API (comfy_api.latest) the nodes are served through `comfy_entrypoint`
as io.ComfyNode classes (nodes/_v3.py); in an older one ComfyUI reads NODE_CLASS_MAPPINGS /
NODE_DISPLAY_NAME_MAPPINGS. Importing it without ComfyUI installed must work too (tests, scripts):
the node classes themselves only touch ComfyUI modules inside their functions, and the model
folder is registered only when `folder_paths` exists.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import os
import sys
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent
CORE_DIR = PACK_DIR / "nuwa_core"

_log = logging.getLogger("ComfyUI-NUWA")


def _ensure_core_importable() -> None:
    """Make `import nuwa_core` resolve to this pack's copy without putting the pack on sys.path.

    ComfyUI-Manager installs requirements.txt, not this package, so `nuwa_core` is usually not
    importable by name. Adding the pack folder to sys.path would also expose its `nodes/` and
    `tests/` folders as top-level names (ComfyUI has its own `nodes`), so the package is
    registered directly instead.
    """
    existing = sys.modules.get("nuwa_core")
    if existing is not None:
        locations = [os.path.realpath(p) for p in (getattr(existing, "__path__", None) or [])]
        if os.path.realpath(CORE_DIR) not in locations:
            _log.warning("ComfyUI-NUWA: another 'nuwa_core' is already imported from %s; "
                         "this pack expects %s", locations, CORE_DIR)
        return
    spec = importlib.util.find_spec("nuwa_core") if _can_find_spec() else None
    if spec is not None and spec.submodule_search_locations and \
            os.path.realpath(CORE_DIR) in [os.path.realpath(p) for p in spec.submodule_search_locations]:
        return  # installed in editable mode, or run from the repository root
    init = CORE_DIR / "__init__.py"
    if init.is_file():
        spec = importlib.util.spec_from_file_location("nuwa_core", init,
                                                      submodule_search_locations=[str(CORE_DIR)])
    else:  # namespace-style package (no __init__.py)
        spec = importlib.machinery.ModuleSpec("nuwa_core", None, is_package=True)
        spec.submodule_search_locations = [str(CORE_DIR)]
    module = importlib.util.module_from_spec(spec)
    sys.modules["nuwa_core"] = module
    if spec.loader is not None:
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop("nuwa_core", None)
            raise


def _can_find_spec() -> bool:
    try:
        importlib.util.find_spec("nuwa_core")
        return True
    except (ImportError, ValueError):
        return False


_ensure_core_importable()

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, register_model_folders  # noqa: E402
from .nodes._v3 import comfy_entrypoint_for, v3_available

register_model_folders()
from .nodes._comfy import copy_example_inputs

copy_example_inputs()  # the images the templates load, into ComfyUI's input folder (absent ones only)

WEB_DIRECTORY = "./web"  # the Direction Planner's frontend extension (web/js/)

if v3_available():
    # a ComfyUI with the V3 API: served as io.ComfyNode classes (same node ids). ComfyUI reads
    # comfy_entrypoint only from a module without NODE_CLASS_MAPPINGS.
    comfy_entrypoint = comfy_entrypoint_for(NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS)
    del NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    __all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
else:
    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
