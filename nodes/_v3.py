"""The pack's nodes served through ComfyUI's V3 node API (`comfy_api.latest`: io.ComfyNode, comfy_entrypoint).

Each node is declared once, in the classic form (INPUT_TYPES, FUNCTION, ...), because that form works
without ComfyUI: tests, scripts and the workflow checks call it directly. In a ComfyUI that has the V3
API, every node is served as an io.ComfyNode with the same node id, its inputs in the same order with
the same options (saved workflows keep their widget values), each input's display name from
locales/en/nodeDefs.json, and the classic function, validation, change check and lazy check behind
execute / validate_inputs / fingerprint_inputs / check_lazy_status.
"""
from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path

LOCALE = Path(__file__).resolve().parent.parent / "locales" / "en" / "nodeDefs.json"


def v3_available() -> bool:
    try:
        from comfy_api.latest import ComfyExtension, io  # noqa: F401
    except ImportError:
        return False
    return True


def _input(io, name: str, spec: tuple, optional: bool, display_name: str | None):
    kind, options = spec[0], dict(spec[1]) if len(spec) > 1 else {}
    common = {"display_name": display_name, "optional": optional, "tooltip": options.pop("tooltip", None),
              "lazy": options.pop("lazy", None)}
    if isinstance(kind, (list, tuple)):  # a combo: its choices, read when ComfyUI asks for the schema
        combo = _listed_combo(io)(name, options=list(kind), default=options.pop("default", None), **common)
        combo.extra_dict.update(options)  # Combo.Input takes no extra_dict argument; its base class keeps one
        return combo
    # everything else keeps its classic type name and options as they are (INT min/max/step, STRING
    # multiline, sockets such as IMAGE or NUWA_CANVAS): ComfyUI validates and the frontend draws them alike
    return io.Custom(kind).Input(name, extra_dict=options, **common)


@functools.cache
def _listed_combo(io):
    """io.Combo.Input published with its choices as the input's type, as classic combos are.

    ComfyUI (0.3.64) checks a prompt's combo value against the choices only when the type is that
    list; a V3 combo's type is "COMBO", so an unknown value would pass validation and fail later.
    """
    class ListedCombo(io.Combo.Input):
        def get_io_type(self):
            return list(self.options)
    return ListedCombo


def _calling(function, kwargs: dict):
    """Call a classic hook with the inputs its signature names (as ComfyUI calls classic nodes)."""
    names = inspect.signature(function).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in names.values()):
        return function(**kwargs)
    return function(**{k: v for k, v in kwargs.items() if k in names})


def _with_signature_of(hook, wrapper):
    """ComfyUI reads a validation hook's parameters to know which inputs it checks itself: keep them."""
    functools.update_wrapper(wrapper, hook)
    wrapper.__signature__ = inspect.signature(hook)
    return classmethod(wrapper)


def comfy_node(io, node_id: str, classic, display_name: str, input_names: dict):
    """An io.ComfyNode serving the classic node class `classic` under `node_id`."""

    def define_schema(cls):
        spec = classic.INPUT_TYPES()
        inputs = [_input(io, name, s, section == "optional", input_names.get(name, {}).get("name"))
                  for section in ("required", "optional") for name, s in spec.get(section, {}).items()]
        names = getattr(classic, "RETURN_NAMES", None) or classic.RETURN_TYPES
        tips = getattr(classic, "OUTPUT_TOOLTIPS", None) or (None,) * len(classic.RETURN_TYPES)
        outputs = [io.Custom(kind).Output(display_name=name, tooltip=tip)
                   for kind, name, tip in zip(classic.RETURN_TYPES, names, tips)]
        return io.Schema(node_id=node_id, display_name=display_name, category=classic.CATEGORY,
                         description=getattr(classic, "DESCRIPTION", ""), inputs=inputs, outputs=outputs,
                         is_output_node=bool(getattr(classic, "OUTPUT_NODE", False)))

    def execute(cls, **kwargs):
        out = getattr(classic(), classic.FUNCTION)(**kwargs)
        if isinstance(out, dict):  # {"ui": ..., "result": (...)} or UI only
            return io.NodeOutput(*out.get("result", ()), ui=out.get("ui"))
        return io.NodeOutput(*out)

    body = {"define_schema": classmethod(define_schema), "execute": classmethod(execute),
            "__doc__": f"{display_name} ({node_id}), served through the V3 API.", "__module__": __name__}
    if hasattr(classic, "VALIDATE_INPUTS"):
        hook = classic.VALIDATE_INPUTS
        body["validate_inputs"] = _with_signature_of(hook, lambda cls, **kwargs: _calling(hook, kwargs))
    if hasattr(classic, "IS_CHANGED"):
        body["fingerprint_inputs"] = classmethod(lambda cls, **kwargs: _calling(classic.IS_CHANGED, kwargs))
    if hasattr(classic, "check_lazy_status"):
        body["check_lazy_status"] = classmethod(
            lambda cls, **kwargs: _calling(classic().check_lazy_status, kwargs))
    return type(node_id, (io.ComfyNode,), body)


def comfy_entrypoint_for(classes: dict, display_names: dict):
    """The `comfy_entrypoint` ComfyUI calls to list a V3 extension's nodes."""
    from comfy_api.latest import ComfyExtension, io

    labels = json.loads(LOCALE.read_text(encoding="utf-8"))
    nodes = [comfy_node(io, node_id, classic, display_names[node_id], labels.get(node_id, {}).get("inputs", {}))
             for node_id, classic in classes.items()]

    class NuwaExtension(ComfyExtension):
        async def get_node_list(self):
            return nodes

    async def comfy_entrypoint() -> ComfyExtension:
        return NuwaExtension()
    return comfy_entrypoint
