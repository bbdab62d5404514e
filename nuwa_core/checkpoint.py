"""Safe model files: safetensors with the config in its metadata, atomic writes, guarded pickle.

Every model of the pack is saved as one `.safetensors` file whose metadata holds
`nuwa_kind` (what the file is, e.g. "vqgan", "renderer") and `config` (the model's
dataclass config as JSON), so a file alone rebuilds its model. Pickled checkpoints
(`.ckpt`, `.pt`, `.pth`, e.g. taming's Lightning files) are read with
`weights_only=True`; anything needing arbitrary unpickling is refused unless the caller
passes `allow_pickle=True` explicitly.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class CheckpointError(ValueError):
    """A model file that cannot be used as asked; the message says why and what would work."""


def atomic_write(path: str | os.PathLike, write_fn) -> None:
    """Call write_fn(tmp_path) then move the result over `path`, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def config_to_json(config: Any) -> str:
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


def config_from_json(cls, text: str):
    """Rebuild a dataclass config, ignoring keys this version does not know and converting lists to tuples."""
    raw = json.loads(text)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in raw.items():
        if name in fields:
            kwargs[name] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)


def save_model_file(path, state_dict: Mapping[str, torch.Tensor], kind: str, config: Any = None,
                    extra_metadata: Mapping[str, str] | None = None, dtype: torch.dtype | None = None) -> None:
    """Write a `.safetensors` model file atomically. `dtype` (e.g. torch.float16) casts floating tensors."""
    tensors = {}
    for k, v in state_dict.items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.contiguous()
    metadata = {"nuwa_kind": kind}
    if config is not None:
        metadata["config"] = config_to_json(config)
    metadata.update(extra_metadata or {})
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_metadata(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def stored_dtype(path) -> torch.dtype:
    """dtype of the first tensor of a .safetensors file (a bundle's storage precision), reading only that tensor."""
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(next(iter(f.keys()))).dtype


def load_state_dict(path, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read weights (and safetensors metadata) from a file, on the CPU.

    Lightning checkpoints keep their weights under "state_dict"; that level is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file not found: {path}")
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    if path.suffix not in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path.name}: unknown model file type {path.suffix!r}; "
                              f"expected .safetensors or one of {', '.join(PICKLE_SUFFIXES)}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError or RuntimeError depending on version
        if not allow_pickle:
            raise CheckpointError(
                f"{path.name} contains pickled Python objects beyond plain tensors, which could run "
                f"arbitrary code when loaded. Convert it to .safetensors, or, if you trust its source, "
                f"load it with allow_pickle=True. (torch said: {str(err).splitlines()[0]})") from err
        obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path.name}: expected a dict of tensors, found {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    return tensors, {}


def load_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str,
                drop_prefixes: tuple[str, ...] = ()) -> None:
    """load_state_dict(strict=True) with one error naming every missing, unexpected and misshapen key."""
    state = {k: v for k, v in state_dict.items() if not k.startswith(drop_prefixes)}
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    misshapen = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                       for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or misshapen:
        def listing(title, keys):
            if not keys:
                return ""
            shown = ", ".join(keys[:12]) + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")
            return f"\n  {title}: {shown}"
        raise CheckpointError(
            f"{source} does not match the model built from its config"
            + listing("missing keys", missing) + listing("unexpected keys", unexpected)
            + listing("shape mismatches", misshapen))
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
