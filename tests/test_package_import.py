"""The repository root imports as a ComfyUI pack with ComfyUI absent; nuwa_core never imports ComfyUI."""
import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMFY_MODULES = {"comfy", "folder_paths", "server", "nodes", "execution", "comfy_extras", "comfy_api"}


def test_root_imports_as_a_package_without_comfyui(tmp_path):
    # a fresh interpreter, run from elsewhere, with no ComfyUI module importable
    code = f"""
import importlib.util, sys
for name in {sorted(COMFY_MODULES - {"nodes"})!r}:
    assert importlib.util.find_spec(name) is None, name + " is importable: not a ComfyUI-free test"
spec = importlib.util.spec_from_file_location("some_pack_dir", {str(REPO / "__init__.py")!r},
                                              submodule_search_locations=[{str(REPO)!r}])
module = importlib.util.module_from_spec(spec)
sys.modules["some_pack_dir"] = module
spec.loader.exec_module(module)
mappings = module.NODE_CLASS_MAPPINGS
assert mappings and set(mappings) == set(module.NODE_DISPLAY_NAME_MAPPINGS), mappings
for node_id, cls in mappings.items():
    assert node_id.startswith("NUWA"), node_id
    assert cls.CATEGORY.startswith("NUWA/"), node_id
    assert cls.DESCRIPTION, node_id
    assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES), node_id
    spec_ = cls.INPUT_TYPES()
    for section in spec_.values():
        for name, value in section.items():
            assert value[1].get("tooltip"), (node_id, name)
import nuwa_core
assert nuwa_core.__path__[0].endswith("nuwa_core")
assert not any(m == "comfy" or m.startswith("comfy.") or m in ("folder_paths", "server") for m in sys.modules)
print("ok", len(mappings))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("ok")


def test_node_ids_are_frozen():
    """Saved workflows name these ids; renaming one breaks users' files."""
    code = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("p", {str(REPO / "__init__.py")!r}, submodule_search_locations=[{str(REPO)!r}])
m = importlib.util.module_from_spec(spec); sys.modules["p"] = m; spec.loader.exec_module(m)
print(",".join(sorted(m.NODE_CLASS_MAPPINGS)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    shipped = {"NUWAModelLoader", "NUWAVQGANEncode", "NUWAVQGANDecode", "NUWAContextPool", "NUWADirectionPlanner",
               "NUWAPatchRenderer", "NUWACanvasSave", "NUWACanvasLoad", "NUWAEmptyCanvas",
               "NUWAXLModelLoader", "NUWAXLGlobalDiffusion", "NUWAXLLocalDiffusion", "NUWAXLCoarseToFine",
               "NUWAXLDecode", "NUWAXLModelAsComfy", "NUWAXLEmptyLatentVideo", "NUWAXLPromptsForKSampler",
               "NUWAXLInbetweenForKSampler", "NUWAXLJoinSegments", "NUWAXLDecodeLatent",
               "NUWAPGVQGANDecode"}
    assert shipped <= set(out.stdout.strip().split(","))


def test_nuwa_core_never_imports_comfyui():
    offenders = []
    for path in sorted((REPO / "nuwa_core").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in COMFY_MODULES:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno} imports {name}")
    assert not offenders, offenders
