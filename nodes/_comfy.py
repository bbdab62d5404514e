"""The few ComfyUI services the nodes use, each with a plain fallback when ComfyUI is absent
(tests, scripts). Only public, documented helpers are used: no internals, no monkey-patching."""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger("ComfyUI-NUWA")

PACK_DIR = Path(__file__).resolve().parent.parent
PACK_MODELS_DIR = PACK_DIR / "models"
MODEL_FOLDER = "nuwa"
MODEL_EXTENSIONS = (".safetensors",)


def _folder_paths():
    try:
        import folder_paths  # type: ignore
        return folder_paths
    except ImportError:
        return None


def register_model_folders() -> None:
    """Register the "nuwa" model folder: <ComfyUI models>/nuwa (created) and the pack's own
    models/nuwa. extra_model_paths.yaml entries with the key `nuwa` add to or override these."""
    fp = _folder_paths()
    if fp is None:
        return
    comfy_dir = os.path.join(fp.models_dir, MODEL_FOLDER)
    try:
        os.makedirs(comfy_dir, exist_ok=True)
    except OSError as err:  # a read-only install still works with the shipped folder
        log.warning("ComfyUI-NUWA: could not create %s: %s", comfy_dir, err)
    fp.add_model_folder_path(MODEL_FOLDER, comfy_dir)
    fp.add_model_folder_path(MODEL_FOLDER, str(PACK_MODELS_DIR / MODEL_FOLDER))
    # get_filename_list filters by extension only when the set is non-empty
    paths, exts = fp.folder_names_and_paths[MODEL_FOLDER]
    exts.update(MODEL_EXTENSIONS)


def model_folders() -> list[str]:
    fp = _folder_paths()
    if fp is not None:
        try:
            return list(fp.get_folder_paths(MODEL_FOLDER))
        except Exception:  # folder not registered (pack imported oddly)
            pass
    from nuwa_core.weights import search_folders
    return [str(p) for p in search_folders(MODEL_FOLDER)]


def list_models() -> list[str]:
    """File names for the loader's combo, relative to the nuwa folders, shipped default first."""
    fp = _folder_paths()
    names: list[str] = []
    if fp is not None:
        try:
            names = list(fp.get_filename_list(MODEL_FOLDER))
        except Exception:
            names = []
    else:
        for folder in model_folders():
            root = Path(folder)
            if root.is_dir():
                names += [p.relative_to(root).as_posix() for p in sorted(root.rglob("*"))
                          if p.suffix in MODEL_EXTENSIONS and p.is_file()]
    # files of other kinds kept under nuwa/ (vqgan/, clip/ from weights.json; one-shot runs' working files in
    # training/; PG-VQGAN decoders in pgvqgan/, listed by PG-VQGAN Decode; text encoders in text_encoders/,
    # listed by NUWA Text Encoder Loader) are not models to load
    names = sorted({n for n in names
                    if not n.startswith(("vqgan/", "clip/", "training/", "pgvqgan/", "text_encoders/"))})
    default = DEFAULT_MODEL
    return [default] + [n for n in names if n != default]


DEFAULT_MODEL = "nuwa_infinity_default.safetensors"


def register_subfolder(subfolder: str, comfy_name: str) -> None:
    """A model folder for files of one kind kept under "nuwa" (pgvqgan/, text_encoders/): ComfyUI/models/nuwa/
    SUBFOLDER (created) and the pack's models/nuwa/SUBFOLDER, registered as ComfyUI folder `comfy_name`."""
    fp = _folder_paths()
    if fp is None:
        return
    comfy_dir = os.path.join(fp.models_dir, MODEL_FOLDER, subfolder)
    try:
        os.makedirs(comfy_dir, exist_ok=True)
    except OSError as err:
        log.warning("ComfyUI-NUWA: could not create %s: %s", comfy_dir, err)
    fp.add_model_folder_path(comfy_name, comfy_dir)
    fp.add_model_folder_path(comfy_name, str(PACK_MODELS_DIR / MODEL_FOLDER / subfolder))
    fp.folder_names_and_paths[comfy_name][1].update(MODEL_EXTENSIONS)


def subfolder_paths(subfolder: str, comfy_name: str) -> list[str]:
    """SUBFOLDER of every "nuwa" folder, the folders registered as `comfy_name`, the pack's own."""
    folders = [str(Path(f) / subfolder) for f in model_folders()]
    fp = _folder_paths()
    if fp is not None:
        with contextlib.suppress(KeyError):  # folder not registered (pack imported oddly)
            folders += list(fp.get_folder_paths(comfy_name))
    folders.append(str(PACK_MODELS_DIR / MODEL_FOLDER / subfolder))
    return list(dict.fromkeys(folders))


def list_subfolder(subfolder: str, comfy_name: str) -> list[str]:
    """Every model file of the subfolder's folders, sorted."""
    names: set[str] = set()
    for folder in subfolder_paths(subfolder, comfy_name):
        root = Path(folder)
        if root.is_dir():
            names |= {p.relative_to(root).as_posix() for p in root.rglob("*")
                      if p.suffix in MODEL_EXTENSIONS and p.is_file()}
    return sorted(names)


def model_path(name: str) -> Path:
    from nuwa_core.weights import find_model_file
    return find_model_file(name, model_folders())


def torch_device() -> torch.device:
    try:
        import comfy.model_management as mm  # type: ignore
        return mm.get_torch_device()
    except ImportError:
        return torch.device("cpu")


def intermediate_device() -> torch.device:
    try:
        import comfy.model_management as mm  # type: ignore
        return mm.intermediate_device()
    except ImportError:
        return torch.device("cpu")


def check_interrupted() -> None:
    """Raise ComfyUI's interrupt exception if the user pressed cancel; no-op without ComfyUI."""
    try:
        import comfy.model_management as mm  # type: ignore
    except ImportError:
        return
    mm.throw_exception_if_processing_interrupted()


def interrupted() -> bool:
    """Whether the user pressed cancel, without raising (a run that stops at its own next check); False
    without ComfyUI."""
    try:
        import comfy.model_management as mm  # type: ignore
    except ImportError:
        return False
    return bool(mm.processing_interrupted())


try:
    from comfy.model_management import InterruptProcessingException as Interrupted  # type: ignore
except ImportError:
    class Interrupted(Exception):
        """ComfyUI's cancel, raised by check_interrupted and its progress hook (absent without ComfyUI)."""


def free_memory(needed: int, device: torch.device) -> None:
    """Unload other models until `needed` bytes are free on `device` (no-op without ComfyUI)."""
    try:
        import comfy.model_management as mm  # type: ignore
    except ImportError:
        return
    mm.free_memory(needed, device)


def soft_empty_cache() -> None:
    """Hand the device's cached blocks back (ComfyUI's soft_empty_cache; no-op without ComfyUI)."""
    try:
        import comfy.model_management as mm  # type: ignore
    except ImportError:
        return
    mm.soft_empty_cache()


class Progress:
    """comfy.utils.ProgressBar when available (live JPEG preview), else nothing."""

    def __init__(self, total: int):
        self.total = max(int(total), 1)
        try:
            import comfy.utils  # type: ignore
            self.bar = comfy.utils.ProgressBar(self.total)
        except ImportError:
            self.bar = None

    def update(self, done: int, preview=None, max_px: int = 512) -> None:
        if self.bar is None:
            return
        if preview is not None:
            self.bar.update_absolute(done, self.total, ("JPEG", preview, max_px))
        else:
            self.bar.update_absolute(done, self.total)


def output_directory() -> Path:
    fp = _folder_paths()
    return Path(fp.get_output_directory()) if fp is not None else Path.cwd() / "output"


def input_directory() -> Path:
    fp = _folder_paths()
    return Path(fp.get_input_directory()) if fp is not None else Path.cwd() / "input"


# ---- ComfyUI's memory manager ------------------------------------------------------------------
# NUWA models are plain PyTorch modules (no comfy.ops layers that cast weights on the fly), so they
# run only with every weight on one device. A ModelPatcher lets ComfyUI load and offload them like
# its own models; load_for_run asks for a full load with an estimate of the run's working memory
# and refuses, naming what was needed and what was free, when ComfyUI could place only part of
# the weights (low VRAM, --novram, other models in the way): never a device-mismatch crash.

MiB = 2 ** 20
# fp16 first: the shipped weights are fp16, and tests/test_half_precision.py measures fp16 far closer
# to fp32 than bf16 (NUWA-Infinity max token-probability error 0.001 vs 0.03; XL latents 0.05% vs 0.8%)
INFERENCE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class ModelDoesNotFitError(MemoryError):
    """ComfyUI could not put all of a NUWA model's weights on its device."""


def inference_dtype(parameters: int, supported=INFERENCE_DTYPES) -> torch.dtype:
    """The dtype to run a model of `parameters` weights in on ComfyUI's device: ComfyUI's own choice
    for diffusion models (comfy.model_management.unet_dtype, which honours --fp32-unet, --bf16-unet,
    --fp16-unet and --force-fp32 and asks should_use_bf16 / should_use_fp16 of the device), among
    `supported` in order of preference; float32 without ComfyUI and on the CPU."""
    try:
        import comfy.model_management as mm  # type: ignore
    except ImportError:
        return torch.float32
    dtype = mm.unet_dtype(device=mm.get_torch_device(), model_params=int(parameters), supported_dtypes=list(supported))
    return dtype if dtype in supported else torch.float32


def vae_dtype(supported=(torch.bfloat16, torch.float32)) -> torch.dtype:
    """ComfyUI's dtype for a VAE on its VAE device (comfy.model_management.vae_dtype: honours
    --fp32-vae / --bf16-vae / --fp16-vae); float32 without ComfyUI and on the CPU."""
    try:
        import comfy.model_management as mm  # type: ignore
    except ImportError:
        return torch.float32
    dtype = mm.vae_dtype(mm.vae_device(), list(supported))
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32


def wrap_for_memory_management(model, name: str = "NUWA model"):
    """Wrap the model's networks in a comfy ModelPatcher so ComfyUI's memory manager can load
    them to the GPU and offload them when another model needs room. Returns the patcher or None."""
    try:
        import comfy.model_management as mm  # type: ignore
        import comfy.model_patcher  # type: ignore
    except ImportError:
        return None
    # a holder module: ModelPatcher sets attributes such as `.device` on what it wraps, which
    # must not clash with the engine model's own properties
    nets = torch.nn.ModuleDict({"nuwa": model})
    nets.nuwa_name = name
    size = sum(t.numel() * t.element_size() for t in list(nets.parameters()) + list(nets.buffers()))
    return comfy.model_patcher.ModelPatcher(nets, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device(), size=size)


def _same_device(a: torch.device, b: torch.device) -> bool:
    a, b = torch.device(a), torch.device(b)
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def misplaced_tensors(module: torch.nn.Module, device) -> list[str]:
    """Names of the module's parameters and buffers that are not on `device`."""
    tensors = list(module.named_parameters()) + list(module.named_buffers())
    return [name for name, t in tensors if not _same_device(t.device, device)]


def load_for_run(patcher, memory_required: int = 0) -> None:
    """Ask ComfyUI to put the model on its device (offloading others if needed) before a run, with
    `memory_required` bytes of working memory (activations, the context pool) kept free beside
    the weights. A NUWA model runs only whole on one device: if ComfyUI placed only part of it,
    raise ModelDoesNotFitError naming what was needed and what was free. `patcher` may be a list
    (networks used together, loaded in one call)."""
    patchers = [p for p in (patcher if isinstance(patcher, (list, tuple)) else [patcher]) if p is not None]
    if not patchers:
        return
    import comfy.model_management as mm  # type: ignore
    memory_required = max(int(memory_required), 0)
    mm.load_models_gpu(patchers, memory_required=memory_required, minimum_memory_required=memory_required)
    for one in patchers:
        _check_loaded(mm, one, memory_required)


def _check_loaded(mm, patcher, memory_required: int) -> None:
    device = patcher.load_device
    off = misplaced_tensors(patcher.model, device)
    if not off:
        return
    size, loaded = patcher.model_size(), patcher.loaded_size()
    try:
        free = mm.get_free_memory(device)
    except Exception:  # noqa: BLE001  (a device ComfyUI cannot measure: name what is known)
        free = None
    try:  # every weight back on the offload device: a consistent model, loaded afresh next time
        patcher.detach()
    except Exception as err:  # noqa: BLE001  (the refusal below is what the user must see)
        log.warning("ComfyUI-NUWA: could not offload the partly loaded model: %s", err)
    name = getattr(patcher.model, "nuwa_name", "NUWA model")
    hint = ""
    if getattr(mm, "vram_state", None) == mm.VRAMState.NO_VRAM:
        hint = " ComfyUI runs with --novram, which keeps model weights off the GPU; start it without --novram."
    free_text = "an unknown amount" if free is None else f"{free / MiB:.0f} MiB"
    raise ModelDoesNotFitError(
        f"The {name} needs all of its {size / MiB:.0f} MiB of weights plus about {memory_required / MiB:.0f} MiB "
        f"of working memory on {device}, but ComfyUI placed only {loaded / MiB:.0f} MiB of the weights there "
        f"({free_text} free; {len(off)} weight tensors, e.g. {off[0]}, were left elsewhere). NUWA models cannot "
        f"run split between devices: unload other models (Unload Models / a smaller workflow), make a smaller "
        f"canvas, batch or video, or start ComfyUI with --cpu.{hint}")


# ---- NUWA-Infinity working memory (nuwa_core.memory's estimates for a node's run) ---------------

def _model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def vqgan_memory(model, batch: int = 1, decode: bool = False) -> int:
    """Working memory of VQGAN Encode / Decode: one window of the tiled VQGAN over `batch` images at a
    time; decode: up to vqgan.window_batch's windows of one frame at a time (a fixed budget per call)."""
    from nuwa_core.memory import vqgan_window_bytes
    cfg, tile, dtype = model.vqgan.config, model.vqgan_tile, _model_dtype(model)
    one = vqgan_window_bytes(cfg, tile, max(int(batch), 1), dtype)
    if not decode:
        return one
    from nuwa_core.infinity.vqgan import window_batch  # on the device the run loads the model on
    return max(one, window_batch(cfg, tile, 1, torch_device(), dtype) * vqgan_window_bytes(cfg, tile, 1, dtype))


def render_memory(model, canvas, plans, extent=None, guided: bool = False, max_wave: int | None = None,
                  candidates: int = 1) -> int:
    """Working memory of the Patch Renderer: the renderer with its context pool on the largest grid
    the plans grow the canvas to (twice the batch with classifier-free guidance), the widest wave of
    patches rendered together (each patch's `candidates` draws side by side), plus a VQGAN window for
    the previews and the final decode."""
    from nuwa_core.infinity import wavefront
    from nuwa_core.memory import renderer_working_bytes
    grids = [tuple(canvas.grid)] + [tuple(p.grid) for p in plans]
    grid = tuple(max(g[i] for g in grids) for i in range(3))
    cfg = model.renderer.config
    extent = tuple(extent or cfg.extent)
    per_wave = wavefront.patches_per_wave(max_wave or wavefront.MAX_WAVE, candidates)
    wave = max((wavefront.widest(wavefront.plan_waves(p, canvas.wrap, extent, max_size=per_wave)) for p in plans),
               default=1)  # the patches the wavefront schedule renders together
    return (renderer_working_bytes(cfg, grid, canvas.batch * (2 if guided else 1), extent, _model_dtype(model),
                                   wave=wave * candidates)
            + vqgan_memory(model, 1, decode=True))


def canvas_to(state, device):
    """The canvas with its pool's caches moved to `device` (ComfyUI's intermediate device for a node's
    output: the canvas sits in ComfyUI's output cache, where GPU caches would hold VRAM for good).
    Tokens and given pixels already live on the CPU. The pool's dict is replaced, not edited: a copy
    of the pool shares its cache tensors with the canvas it came from."""
    pool = getattr(state, "pool", None)
    if pool is not None and pool.caches:
        pool.caches = {coord: cache.to(device) for coord, cache in pool.caches.items()}
    return state


def copy_example_inputs(input_dir: str | os.PathLike | None = None) -> list[Path]:
    """Copy the shipped images that the templates' LoadImage nodes name (example_workflows/*.json) from
    the pack's models/<folder>/ into ComfyUI's input folder, so every template runs on first open.
    A file already there is left alone (it may be the user's own). Never raises: a read-only input
    folder or a broken template is logged and the pack loads anyway. Returns the files written.
    Without ComfyUI (no `folder_paths`) and no `input_dir`, nothing is copied."""
    import json
    import shutil
    import tempfile
    copied: list[Path] = []
    try:
        if input_dir is None:
            fp = _folder_paths()
            if fp is None:
                return copied
            input_dir = fp.get_input_directory()
        target_dir = Path(input_dir)
        wanted: set[str] = set()
        for template in sorted((PACK_DIR / "example_workflows").glob("*.json")):
            try:
                nodes = json.loads(template.read_text(encoding="utf-8")).get("nodes", [])
            except (OSError, ValueError) as err:
                log.warning("ComfyUI-NUWA: template %s unreadable: %s", template.name, err)
                continue
            for node in nodes:
                values = node.get("widgets_values") if node.get("type") == "LoadImage" else None
                if values and isinstance(values[0], str) and values[0] == Path(values[0]).name:
                    wanted.add(values[0])  # a plain file name, never a path out of input/
        for name in sorted(wanted):
            if (target_dir / name).exists():
                continue
            sources = sorted(p for p in PACK_MODELS_DIR.glob(f"*/{name}") if p.is_file())
            if not sources:
                log.warning("ComfyUI-NUWA: a template loads %s, which the pack does not ship", name)
                continue
            try:
                target_dir.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=target_dir)
                os.close(fd)
                try:
                    shutil.copyfile(sources[0], tmp)
                    os.replace(tmp, target_dir / name)  # whole or absent, never half a file
                finally:
                    if os.path.exists(tmp):
                        os.remove(tmp)
                copied.append(target_dir / name)
            except OSError as err:
                log.warning("ComfyUI-NUWA: could not copy the example image %s into %s (%s); copy it there "
                            "by hand to run the templates that load it", sources[0], target_dir, err)
        if copied:
            log.info("ComfyUI-NUWA: copied the templates' example images into %s: %s", target_dir,
                     ", ".join(p.name for p in copied))
    except Exception as err:  # noqa: BLE001  (loading the pack must never fail over an example image)
        log.warning("ComfyUI-NUWA: example images not copied: %s", err)
    return copied
