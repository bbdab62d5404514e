"""The pack under test, imported the way ComfyUI imports a custom node folder.

ComfyUI's `nodes.load_custom_node` names the module after the folder's path ("." -> "_x_"), builds a
spec from `<folder>/__init__.py`, registers the module in sys.modules and runs it: no sys.path entry,
so the folder's name need not be a Python name (`ComfyUI-NUWA`). Every test that needs the pack's
nodes goes through `import_pack()`, so the pack is imported once per process, under one name.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

PACK_DIR = Path(__file__).resolve().parent.parent
MODULE_NAME = str(PACK_DIR).replace(".", "_x_")  # as ComfyUI's load_custom_node names a folder's module


def import_pack() -> ModuleType:
    """The pack's root module (`__init__.py`), imported on the first call and cached in sys.modules."""
    module = sys.modules.get(MODULE_NAME)
    if module is None:
        spec = importlib.util.spec_from_file_location(MODULE_NAME, PACK_DIR / "__init__.py",
                                                      submodule_search_locations=[str(PACK_DIR)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[MODULE_NAME] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(MODULE_NAME, None)
            raise
    return module


def node(mappings, node_id: str):
    """The FUNCTION of a fresh instance of node `node_id`, called as ComfyUI calls it: its outputs
    (the "result" of a node that also returns UI data; a UI-only node's dict as it is)."""
    cls = mappings[node_id]
    function = getattr(cls(), cls.FUNCTION)

    def call(*args, **kwargs):
        out = function(*args, **kwargs)
        return out["result"] if isinstance(out, dict) and "result" in out else out
    return call
