"""Shared fixtures. The helpers they use live in tests/_*.py (importable: `pythonpath` in pyproject.toml).

`comfyui_server` starts a real ComfyUI with this pack installed (tests/_comfyui.py). Set COMFYUI_DIR
to a ComfyUI checkout (and COMFYUI_PYTHON to an interpreter that has its requirements, default: the
one running pytest); without COMFYUI_DIR those tests are skipped. The checkout is not modified: the
server runs with --base-directory in a temporary folder whose custom_nodes/ComfyUI-NUWA links to this
repository, so models, inputs, outputs and the user database all live in that folder.

The repository root is a ComfyUI pack folder, not a package of tests: it holds ComfyUI's entry point,
`__init__.py`, so pytest would collect it as a package and import that file on its own, as a module
named after the clone's folder with the folder *above* the clone on sys.path (a clone named `nuwa`),
or not at all (`ComfyUI-NUWA` is not a Python name: "attempted relative import with no known parent
package"). `pytest_configure` below has it collected as a plain directory, so the suite runs the same
wherever the pack is cloned; tests import the pack the way ComfyUI does (tests/_pack.py).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from _pack import import_pack

pytest.register_assert_rewrite("_comfyui")  # before its first import: its asserts explain a failed run as a test's do

PACK_DIR = Path(__file__).resolve().parent.parent


class _PackRootIsADirectory:
    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path, parent):
        if path == PACK_DIR:
            return pytest.Dir.from_parent(parent, path=path)
        return None


def pytest_configure(config):
    # a plugin, not a hook of this conftest: the root's own collection is not asked of conftests below it
    config.pluginmanager.register(_PackRootIsADirectory(), "nuwa-pack-root-is-a-directory")


@pytest.fixture(scope="session")
def comfyui_dir() -> Path:
    value = os.environ.get("COMFYUI_DIR")
    if not value:
        pytest.skip("COMFYUI_DIR is not set (path to a ComfyUI checkout); real-server tests skipped")
    path = Path(value).expanduser().resolve()
    if not (path / "main.py").is_file():
        pytest.skip(f"COMFYUI_DIR={value} has no main.py; real-server tests skipped")
    return path


@pytest.fixture(scope="session")
def comfyui_server(comfyui_dir, tmp_path_factory):
    from _comfyui import ComfyUIStartError, start_comfyui, write_test_model
    base = tmp_path_factory.mktemp("comfy_base")
    write_test_model(base / "models" / "nuwa")
    try:
        with start_comfyui(comfyui_dir, base) as server:
            yield server
    except ComfyUIStartError as err:
        pytest.fail(str(err))
    finally:
        if os.environ.get("COMFYUI_KEEP_BASE"):
            print(f"ComfyUI base directory kept: {base}")
        else:
            shutil.rmtree(base / "models", ignore_errors=True)


@pytest.fixture(scope="session")
def pack():
    """The pack's NODE_CLASS_MAPPINGS, the pack imported as ComfyUI imports it (tests/_pack.py)."""
    return import_pack().NODE_CLASS_MAPPINGS


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A tiny random VQGAN tokenizer file, for training runs."""
    import torch
    from nuwa_core.infinity.vqgan import VQModel, get_config, save_vqgan
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tok") / "tiny_vq.safetensors"
    save_vqgan(VQModel(get_config("tiny")), path)
    return path


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory):
    """A tiny random T-KLVAE file, for NUWA-XL training runs."""
    import torch

    from nuwa_core.xl.t_klvae import TKLVAE, TKLVAEConfig, save_t_klvae
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vae") / "tiny_vae.safetensors"
    save_t_klvae(TKLVAE(TKLVAEConfig.tiny()), path)
    return path


@pytest.fixture()
def models_dir(tmp_path, monkeypatch):
    """NUWA_MODELS_DIR with tiny random NUWA-XL models: unconditional vae/mtd in nuwa_xl/, text-conditioned
    vae_text/mtd_text in nuwa/."""
    from _xl import save_tiny
    monkeypatch.setenv("NUWA_MODELS_DIR", str(tmp_path))
    save_tiny(tmp_path / "nuwa_xl", "none")
    save_tiny(tmp_path / "nuwa", "text", suffix="_text")
    return tmp_path
