"""What a user installs: torch is left to ComfyUI, requirements.txt (ComfyUI-Manager's list) and pyproject.toml
agree, the README starts with its two commands and says how to install into ComfyUI, and LICENSE names the
licence of every shipped model file beside the code's MIT."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from _workflows import RUNNABLE, UI_DIR

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parent.parent


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _requirements() -> list[str]:
    lines = (REPO / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_torch_is_left_to_comfyui():
    deps = _pyproject()["project"]["dependencies"]
    assert "torch" not in {_name(d) for d in deps}, deps
    assert "torch" not in {_name(r) for r in _requirements()}, _requirements()
    # what ComfyUI-Manager installs is what `pip install -e .` installs
    assert sorted(_requirements()) == sorted(deps)


def test_readme_starts_with_its_two_commands_which_install_torch_themselves():
    readme = (REPO / "README.md").read_text()
    match = re.match(r"# ComfyUI-NUWA\n\n```\n(.+)\n(.+)\n```\n", readme)
    assert match, readme[:400]
    for command in match.groups():  # torch is no longer a dependency: a fresh machine gets it from the command
        assert command.startswith("python3 -m venv .venv && .venv/bin/pip install torch==") and " -e " in command
    for section in ("## Install in ComfyUI", "## Use"):
        assert section in readme, section
    install = readme[readme.index("## Install in ComfyUI"):]
    for needed in ("custom_nodes", "ComfyUI-Manager", "requirements.txt", "models/nuwa", "extra_model_paths.yaml",
                   "python -m nuwa_core.weights verify", "Browse Templates"):
        assert needed in install, needed


def test_license_is_mit_and_names_every_shipped_model_licence():
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License") and _pyproject()["project"]["license"] == {"text": "MIT"}
    manifest = json.loads((REPO / "weights.json").read_text())["models"]
    shipped = [m for m in manifest if m.get("shipped")]
    assert shipped
    for model in shipped:
        path = f"models/{model['folder']}/{model['name']}"
        assert (REPO / path).is_file(), path
        assert path in text, f"LICENSE does not name {path}"
        licence = model["licence"].split(" (")[0]  # "GPL-2+", "MIT", "BSD-3-Clause"
        spelled = {"BSD-3-Clause": "BSD 3-Clause"}.get(licence, licence)
        paragraph = next(p for p in text.split("\n- ") if path in p)
        assert spelled in paragraph, f"LICENSE gives {path} another licence than weights.json ({licence})"
    for notice in sorted((REPO / "models").glob("*/LICENCE.md")):
        assert notice.relative_to(REPO).as_posix() in text, notice


def test_license_names_the_licence_of_every_thumbnail_made_with_a_shipped_model():
    """A runnable template's thumbnail is its output on a shipped model, so it takes that model's licence."""
    text = (REPO / "LICENSE").read_text()
    for name in RUNNABLE:
        thumb = (UI_DIR / f"{name}.jpg").relative_to(REPO).as_posix()
        assert thumb in text, f"LICENSE does not say under which licence {thumb} is offered"
