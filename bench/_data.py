"""Where the benches find the real data: ../shared/data beside the repository, or the folder
$NUWA_SHARED_DATA names (a pack cloned into ComfyUI's custom_nodes/), as the tests read it."""
import os
from pathlib import Path

SHARED_DATA = Path(os.environ.get("NUWA_SHARED_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")
