"""Model manifest (`weights.json`): where each model file comes from, its hash, where it goes.

    python -m nuwa_core.weights list   [--models-dir DIR ...]
    python -m nuwa_core.weights verify [NAME ...] [--models-dir DIR ...]
    python -m nuwa_core.weights fetch NAME [--models-dir DIR]

A manifest entry is {name, url, sha256, size, licence, folder, kind, description}: `name` is
the file name, `folder` the model folder it belongs in (relative to a models root, e.g. "nuwa"
or "nuwa/vqgan"). `url` is null for files shipped inside the pack; `sha256`/`size` are null
when no trustworthy value is known, and then verification says so instead of passing.

Folders searched for a file of folder F: `<root>/F` for every `--models-dir` root, every root in
the environment variable NUWA_MODELS_DIR (os.pathsep-separated), `$COMFYUI_DIR/models` when
that variable is set, and the pack's own `models/` folder. Inside ComfyUI the nodes pass the
folders ComfyUI registered instead (see `find_model_file`).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterable, Sequence

from .checkpoint import sha256_file

PACK_DIR = Path(__file__).resolve().parent.parent
MANIFEST_PATH = PACK_DIR / "weights.json"
PACK_MODELS_DIR = PACK_DIR / "models"
REQUIRED_FIELDS = ("name", "url", "sha256", "size", "licence", "folder", "kind", "description")

PRESENT = "present"
MISSING = "missing"
MISMATCH = "hash mismatch"
SIZE_MISMATCH = "size mismatch"
UNVERIFIED = "unverified: no hash in manifest"


class WeightsError(ValueError):
    """A manifest, download or verification problem; the message says what and what would fix it."""


class ModelNotFoundError(WeightsError, FileNotFoundError):
    """A model file is in none of the folders searched."""


@dataclasses.dataclass(frozen=True)
class WeightEntry:
    name: str
    url: str | None
    sha256: str | None
    size: int | None
    licence: str
    folder: str
    kind: str
    description: str
    shipped: bool = False

    @classmethod
    def from_dict(cls, raw: dict, where: str = "weights.json") -> "WeightEntry":
        if not isinstance(raw, dict):
            raise WeightsError(f"{where}: each model entry must be an object, found {type(raw).__name__}")
        missing = [f for f in REQUIRED_FIELDS if f not in raw]
        if missing:
            raise WeightsError(f"{where}: entry {raw.get('name', '?')!r} lacks {', '.join(missing)}; "
                               f"every entry needs {', '.join(REQUIRED_FIELDS)}")
        name = raw["name"]
        if not isinstance(name, str) or not name or "/" in name or "\\" in name:
            raise WeightsError(f"{where}: entry name {name!r} must be a plain file name")
        sha = raw["sha256"]
        if sha is not None and (not isinstance(sha, str) or len(sha) != 64
                                or any(c not in "0123456789abcdef" for c in sha)):
            raise WeightsError(f"{where}: {name}: sha256 must be 64 lowercase hex digits or null, got {sha!r}")
        size = raw["size"]
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size <= 0):
            raise WeightsError(f"{where}: {name}: size must be a positive number of bytes or null, got {size!r}")
        url = raw["url"]
        if url is not None and not (isinstance(url, str) and "://" in url):
            raise WeightsError(f"{where}: {name}: url must be a URL or null, got {url!r}")
        folder = raw["folder"]
        if not isinstance(folder, str) or not folder or folder.startswith(("/", "\\")) or ".." in folder.split("/"):
            raise WeightsError(f"{where}: {name}: folder must be a relative model folder like 'nuwa', got {folder!r}")
        for key in ("licence", "kind", "description"):
            if not isinstance(raw[key], str):
                raise WeightsError(f"{where}: {name}: {key} must be a string")
        return cls(name=name, url=url, sha256=sha, size=size, licence=raw["licence"], folder=folder,
                   kind=raw["kind"], description=raw["description"], shipped=bool(raw.get("shipped", False)))


def load_manifest(path: str | os.PathLike | None = None) -> dict[str, WeightEntry]:
    """Read and check the manifest; returns {file name: entry}. A missing manifest is empty."""
    path = Path(path) if path is not None else MANIFEST_PATH
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise WeightsError(f"{path}: not valid JSON ({err})") from err
    models = raw.get("models") if isinstance(raw, dict) else None
    if not isinstance(models, list):
        raise WeightsError(f"{path}: expected an object with a 'models' list")
    entries: dict[str, WeightEntry] = {}
    for item in models:
        entry = WeightEntry.from_dict(item, where=str(path))
        if entry.name in entries:
            raise WeightsError(f"{path}: {entry.name} is listed twice")
        entries[entry.name] = entry
    return entries


def search_folders(folder: str, models_dirs: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """Folders where a file of model folder `folder` is looked for, most specific first, no duplicates."""
    roots: list[Path] = [Path(d) for d in models_dirs]
    roots += [Path(d) for d in os.environ.get("NUWA_MODELS_DIR", "").split(os.pathsep) if d]
    if os.environ.get("COMFYUI_DIR"):
        roots.append(Path(os.environ["COMFYUI_DIR"]) / "models")
    roots.append(PACK_MODELS_DIR)
    out: list[Path] = []
    for root in roots:
        candidate = root / folder
        if candidate not in out:
            out.append(candidate)
    return out


def find_model_file(name: str, folders: Sequence[str | os.PathLike],
                    manifest: dict[str, WeightEntry] | None = None) -> Path:
    """The first `folder/name` that exists; otherwise an error naming the file, every folder
    searched and, when the manifest knows the file, where to get it."""
    if os.path.isabs(name) and Path(name).is_file():
        return Path(name)
    for folder in folders:
        candidate = Path(folder) / name
        if candidate.is_file():
            return candidate
    if manifest is None:
        try:
            manifest = load_manifest()
        except WeightsError:
            manifest = {}
    searched = "\n".join(f"  - {Path(f)}" for f in folders) or "  (no folders were given)"
    msg = f"Model file not found: {name}\nLooked in:\n{searched}"
    entry = manifest.get(Path(name).name)
    if entry is not None:
        if entry.url:
            msg += (f"\nDownload it with `python -m nuwa_core.weights fetch {entry.name}` or by hand from "
                    f"{entry.url} and put it in one of the folders above ({entry.licence}).")
        else:
            msg += (f"\n{entry.name} ships with ComfyUI-NUWA in models/{entry.folder}/; reinstall the pack "
                    f"if it is missing ({entry.description}).")
    else:
        msg += "\nIt is not in the pack's weights.json manifest; check the file name."
    raise ModelNotFoundError(msg)


@dataclasses.dataclass
class Status:
    entry: WeightEntry
    state: str
    path: Path | None
    detail: str = ""


def verify_file(entry: WeightEntry, path: str | os.PathLike) -> Status:
    """Check a file against its manifest entry: size first (cheap), then sha256."""
    path = Path(path)
    if not path.is_file():
        return Status(entry, MISSING, None, f"{path} does not exist")
    size = path.stat().st_size
    if entry.size is not None and size != entry.size:
        return Status(entry, SIZE_MISMATCH, path,
                      f"{path} has {size} bytes, the manifest expects {entry.size}: incomplete or a different file")
    if entry.sha256 is None:
        return Status(entry, UNVERIFIED, path, f"{path} exists ({size} bytes) but the manifest has no sha256 for it")
    digest = sha256_file(path)
    if digest != entry.sha256:
        return Status(entry, MISMATCH, path,
                      f"{path} has sha256 {digest}, the manifest expects {entry.sha256}: "
                      f"the file is corrupt, incomplete or a different version; delete it and fetch it again")
    return Status(entry, PRESENT, path, f"{path} matches sha256 {digest[:12]}...")


def status(entry: WeightEntry, models_dirs: Iterable[str | os.PathLike] = (), check_hash: bool = False) -> Status:
    for folder in search_folders(entry.folder, models_dirs):
        path = folder / entry.name
        if path.is_file():
            if check_hash:
                return verify_file(entry, path)
            if entry.size is not None and path.stat().st_size != entry.size:
                return Status(entry, SIZE_MISMATCH, path, f"{path.stat().st_size} bytes, expected {entry.size}")
            return Status(entry, PRESENT, path)
    searched = ", ".join(str(f) for f in search_folders(entry.folder, models_dirs))
    return Status(entry, MISSING, None, f"not in {searched}")


def _no_network_message(entry: WeightEntry, dest: Path, err: BaseException) -> str:
    return (f"Could not download {entry.name} from {entry.url}: {err}. "
            f"Is this machine offline? Download it by hand (licence: {entry.licence}) and save it as {dest}, "
            f"then run `python -m nuwa_core.weights verify {entry.name}`.")


def fetch(entry: WeightEntry, dest_folder: str | os.PathLike, timeout: float = 60.0,
          chunk: int = 1 << 20, progress=None) -> Path:
    """Download `entry` into dest_folder atomically: stream into a temporary file next to the
    target, check size and sha256, then os.replace. Nothing is left behind on failure."""
    dest_folder = Path(dest_folder)
    dest = dest_folder / entry.name
    if not entry.url:
        raise WeightsError(f"{entry.name} has no download URL in the manifest: {entry.description}")
    dest_folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{entry.name}.", suffix=".part", dir=dest_folder)
    h = hashlib.sha256()
    written = 0
    try:
        try:
            request = urllib.request.Request(entry.url, headers={"User-Agent": "ComfyUI-NUWA weights fetch"})
            with urllib.request.urlopen(request, timeout=timeout) as response, os.fdopen(fd, "wb") as out:
                fd = -1
                total = response.headers.get("Content-Length")
                total = int(total) if total and total.isdigit() else entry.size
                while block := response.read(chunk):
                    out.write(block)
                    h.update(block)
                    written += len(block)
                    if progress is not None:
                        progress(written, total)
                out.flush()
                os.fsync(out.fileno())
        except (urllib.error.URLError, OSError, TimeoutError) as err:
            raise WeightsError(_no_network_message(entry, dest, err)) from err
        if entry.size is not None and written != entry.size:
            raise WeightsError(f"{entry.name}: downloaded {written} bytes, the manifest expects {entry.size}; "
                               f"the download was cut short or the file changed upstream. Nothing was saved.")
        digest = h.hexdigest()
        if entry.sha256 is not None and digest != entry.sha256:
            raise WeightsError(f"{entry.name}: downloaded file has sha256 {digest}, the manifest expects "
                               f"{entry.sha256}. Nothing was saved.")
        os.replace(tmp, dest)
    finally:
        if fd != -1:
            os.close(fd)
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


def _print_progress(done: int, total: int | None) -> None:
    mib = done / (1 << 20)
    if total:
        sys.stderr.write(f"\r  {mib:8.1f} / {total / (1 << 20):.1f} MiB")
    else:
        sys.stderr.write(f"\r  {mib:8.1f} MiB")
    sys.stderr.flush()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nuwa_core.weights", description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", default=None, help=f"manifest to read (default {MANIFEST_PATH})")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("list", "show every model and whether it is present"),
                            ("verify", "hash the files present and compare with the manifest"),
                            ("fetch", "download a model into its folder and verify it")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--models-dir", action="append", default=[],
                       help="a models root (contains nuwa/ ...); repeatable; fetch saves into the first")
        if name == "verify":
            p.add_argument("names", nargs="*", help="file names (default: all present)")
        if name == "fetch":
            p.add_argument("name", help="file name from the manifest")
    args = parser.parse_args(argv)
    try:
        manifest = load_manifest(args.manifest)
    except WeightsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.command == "list":
        for entry in manifest.values():
            st = status(entry, args.models_dir)
            where = st.path if st.path else st.detail
            print(f"{entry.name:48s} {st.state:14s} [{entry.folder}] {where}")
        return 0
    if args.command == "verify":
        names = args.names or list(manifest)
        unknown = [n for n in names if n not in manifest]
        if unknown:
            print(f"error: not in the manifest: {', '.join(unknown)}; known: {', '.join(manifest)}", file=sys.stderr)
            return 2
        failed = False
        for name in names:
            st = status(manifest[name], args.models_dir, check_hash=True)
            if st.state == MISSING and not args.names:
                print(f"{name}: {MISSING} (skipped)")
                continue
            print(f"{name}: {st.state}: {st.detail}")
            failed |= st.state in (MISMATCH, SIZE_MISMATCH) or (st.state == MISSING)
        return 1 if failed else 0
    if args.command == "fetch":
        entry = manifest.get(args.name)
        if entry is None:
            print(f"error: {args.name} is not in the manifest; known: {', '.join(manifest)}", file=sys.stderr)
            return 2
        dest_folder = search_folders(entry.folder, args.models_dir)[0]
        try:
            path = fetch(entry, dest_folder, progress=_print_progress)
        except WeightsError as err:
            print(f"\nerror: {err}", file=sys.stderr)
            return 1
        print(f"\nsaved {path}" + ("" if entry.sha256 else f" ({UNVERIFIED})"))
        return 0
    return 2


if __name__ == "__main__":
    raise SystemExit(main())


_verified: dict[tuple[str, int, int], str] = {}


def check_listed_file(path: str | os.PathLike, manifest: dict[str, WeightEntry] | None = None) -> None:
    """Before loading: a file the manifest lists with a size or sha256 must match them.

    Files the manifest does not know (a user's own models) pass. Each (path, size, mtime) is
    hashed once per process.
    """
    path = Path(path)
    entry = (load_manifest() if manifest is None else manifest).get(path.name)
    if entry is None or (entry.sha256 is None and entry.size is None):
        return
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _verified:
        result = verify_file(entry, path)
        if result.state not in (PRESENT, UNVERIFIED):
            raise WeightsError(f"{result.detail} (manifest entry {entry.name} in weights.json)")
        _verified[key] = result.state
