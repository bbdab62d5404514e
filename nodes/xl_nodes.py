"""NUWA-XL nodes: model loader, Global Diffusion, Local Diffusion, Coarse-to-Fine (the whole tree), Decode,
Encode (a user's own frames -> keyframes for Local Diffusion; nuwa_core.xl.keyframes).

Model files are looked up in the "nuwa" model folder (ComfyUI/models/nuwa, the pack's models/nuwa,
extra_model_paths.yaml `nuwa:`) and in the "nuwa_xl" folder: ComfyUI/models/nuwa_xl and the pack's own
models/nuwa_xl, where the default XL model ships. The combos list only files of the right kind
(read from the safetensors header), the shipped default first.

Sampling runs the core's DDIM loop (nuwa_core.xl.diffusion) with ComfyUI's ProgressBar and cancel checks
in its per-step callback, with classifier-free guidance (`guidance`, 1 = off) against the null prompt.
Prompts: stock CONDITIONING from NUWA Text Encode (the pack's text encoder) or CLIP Text Encode, as wide
as the model's prompts; P prompts (joined with Conditioning (Combine)) cut the frames they are for
into P equal parts, in order (nuwa_core.xl.diffusion_over_diffusion.spread_prompts). Coarse-to-Fine takes one schedule per level
(the paper's denser prompts for deeper levels); a level without its own takes the coarser one's.
A prompt to an unconditional model is an error.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch
from PIL import Image

from . import _comfy

CATEGORY = "NUWA/XL"
XL_FOLDER = "nuwa_xl"
PACK_XL_DIR = _comfy.PACK_MODELS_DIR / XL_FOLDER
DEFAULT_VAE = "t_klvae_default.safetensors"
DEFAULT_MTD = "mtd_default.safetensors"
SAME_AS_GLOBAL = "(same as global)"
VAE_KIND, MTD_KIND = "t_klvae", "mask_temporal_diffusion"
LATENTS_TYPE = "NUWAXL_LATENTS"
MODEL_TYPE = "NUWAXL_MODEL"


def register_xl_folder() -> None:
    """The "nuwa_xl" model folder: ComfyUI/models/nuwa_xl (if the user makes it) and the pack's models/nuwa_xl."""
    fp = _comfy._folder_paths()
    if fp is None:
        return
    fp.add_model_folder_path(XL_FOLDER, str(Path(fp.models_dir) / XL_FOLDER))
    fp.add_model_folder_path(XL_FOLDER, str(PACK_XL_DIR))
    fp.folder_names_and_paths[XL_FOLDER][1].update(_comfy.MODEL_EXTENSIONS)


register_xl_folder()


def xl_folders() -> list[str]:
    folders = list(_comfy.model_folders())
    fp = _comfy._folder_paths()
    extra: list[str] = []
    if fp is not None:
        try:
            extra = list(fp.get_folder_paths(XL_FOLDER))
        except Exception:
            extra = []
    if not extra:
        from nuwa_core.weights import search_folders
        extra = [str(p) for p in search_folders(XL_FOLDER)]
    return list(dict.fromkeys(folders + extra + [str(PACK_XL_DIR)]))


def file_kind(path: Path) -> str | None:
    """`nuwa_kind` from a .safetensors header without reading the weights."""
    try:
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            if n > 100_000_000:
                return None
            return json.loads(f.read(n)).get("__metadata__", {}).get("nuwa_kind")
    except (OSError, ValueError, struct.error):
        return None


def list_xl_models(kind: str, default: str) -> list[str]:
    names: list[str] = []
    for folder in xl_folders():
        root = Path(folder)
        if not root.is_dir():
            continue
        for p in sorted(root.rglob("*.safetensors")):
            if p.name.endswith(".train.safetensors") or not p.is_file():
                continue
            if file_kind(p) == kind:
                names.append(p.relative_to(root).as_posix())
    names = sorted(set(names))
    return [default] + [n for n in names if n != default]


def xl_model_path(name: str) -> Path:
    from nuwa_core.weights import find_model_file
    return find_model_file(name, xl_folders())


# ---- conversions ------------------------------------------------------------------------------

def _to_image(frames: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] -1..1 -> IMAGE [N, H, W, 3] 0..1 on ComfyUI's intermediate device."""
    img = ((frames.float().clamp(-1, 1) + 1.0) / 2.0).permute(0, 2, 3, 1).contiguous()
    return img.to(_comfy.intermediate_device())


TEXT_ENCODER_KEY = "nuwa_text_encoder"  # what NUWA Text Encode puts into its CONDITIONING's options


def _model_name(model) -> str:
    return model.info.get("file") or "this MTD model"


def _trained_with(model) -> str:
    enc = model.text_encoder
    return f"trained with the text encoder {enc['name']}" if enc.get("name") else "trained with"


def conditioning_prompts(conditioning, model, what: str) -> torch.Tensor | None:
    """CONDITIONING -> prompt embeddings [P, n, d] (every entry's batch, in order: P >= 1), or None (no
    conditioning). Errors name what was wrong: a prompt to an unconditional model, a width or text
    encoder other than the model's (both named, with where each comes from)."""
    if conditioning is None:
        return None
    try:
        entries = [(c[0], c[1] if len(c) > 1 and isinstance(c[1], dict) else {}) for c in conditioning]
    except (TypeError, IndexError, KeyError):
        raise ValueError(f"{what}: expected CONDITIONING from NUWA Text Encode or CLIP Text Encode (a list of "
                         f"[tensor, dict]), got {type(conditioning).__name__}")
    prompts, sources = [], []
    for t, options in entries:
        if not isinstance(t, torch.Tensor) or t.ndim != 3:
            raise ValueError(f"{what}: expected CONDITIONING from NUWA Text Encode or CLIP Text Encode, whose "
                             f"entries hold a tensor [batch, tokens, width]; got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
        prompts += list(t.float())
        sources += [(options.get(TEXT_ENCODER_KEY), options.get(TEXT_ENCODER_KEY + "_sha256"))] * t.shape[0]
    if not model.takes_prompts:
        raise ValueError(f"{what}: {_model_name(model)} is unconditional (trained without prompts) and cannot follow "
                         f"a prompt; disconnect the conditioning, or load a prompted MTD (one trained with "
                         f"captions, e.g. the shipped mtd_default.safetensors)")
    from nuwa_core.text_encoder import different_file
    expected = model.text_encoder
    for p, (source, sha) in zip(prompts, sources):
        where = f"from the text encoder {source}" if source else "from a CLIP Text Encode or another node"
        if source and expected.get("name") and source != expected["name"]:
            raise ValueError(f"{what}: the conditioning comes from the text encoder {source} but {_model_name(model)} "
                             f"was trained with {expected['name']} ({model.context_dim} wide); encode the prompts "
                             f"with {expected['name']} in NUWA Text Encode")
        why = different_file({"name": source, "sha256": sha}, expected)
        if why:
            raise ValueError(f"{what}: {why}")
        if p.shape[-1] != model.context_dim:
            raise ValueError(f"{what}: the conditioning is {p.shape[-1]} wide ({where}) but {_model_name(model)} "
                             f"takes {model.context_dim}-wide prompts (its context_dim, {_trained_with(model)}); "
                             f"encode the prompts with the text encoder the MTD was trained with")
    n = max(p.shape[0] for p in prompts)
    prompts = [torch.cat([p, p.new_zeros(n - p.shape[0], p.shape[-1])]) for p in prompts]  # pad shorter prompts
    return torch.stack(prompts)


def spread_prompts(prompts: torch.Tensor | None, frames: int):
    """P prompts over `frames` frames, P equal parts in order -> one per frame (None and one prompt
    stay as they are); see nuwa_core.xl.diffusion_over_diffusion.spread_prompts."""
    from nuwa_core.xl.diffusion_over_diffusion import spread_prompts as spread
    if prompts is None or prompts.shape[0] == 1:
        return prompts
    return spread(prompts, frames)


class _Sampling:
    """The per-step callback: ComfyUI progress (with a preview of the current frame) and cancel checks."""

    def __init__(self, model, total: int, preview: bool = True):
        self.model, self.total, self.done, self.preview = model, total, 0, preview
        self.bar = _comfy.Progress(total)

    def __call__(self, info) -> bool:
        _comfy.check_interrupted()
        self.done += 1
        image = None
        if self.preview and self.bar.bar is not None:
            x0 = info["denoised"][0]  # [L, c, h, w]
            frame = self.model.decode(x0[x0.shape[0] // 2:][:1])[0]
            arr = ((frame.float().clamp(-1, 1) + 1) * 127.5).byte().permute(1, 2, 0).cpu().numpy()
            image = Image.fromarray(arr)
        self.bar.update(min(self.done, self.total), image)
        return False


def _check_tree(L: int, depth: int) -> None:
    from nuwa_core.xl.diffusion_over_diffusion import _check_tree as check
    check(L, depth)


def _runs(segments: int, max_batch: int) -> int:
    return math.ceil(segments / max_batch) if max_batch else 1


# ---- ComfyUI's memory manager ------------------------------------------------------------------
# One ModelPatcher per network, made once by the loader (or NUWA-XL Add Local Model for the model it
# adds): the T-KLVAE, the global MTD and each distinct local MTD (one patcher when one MTD serves
# several levels). The MTDs' patchers are the stock MODEL of _xl_comfy_model (a BaseModel), so the
# KSampler route clones them (NUWA-XL Model (for KSampler)) and ComfyUI sees one model, whichever
# route or level runs it; "Unload Models" offloads them all.

PATCHERS_ATTR = "comfy_patchers"


def attach_patchers(model, reuse: dict | None = None) -> None:
    """Give an XLModel its ModelPatchers, keyed by the network's id (no-op without ComfyUI); `reuse`:
    patchers of a bundle sharing these networks, kept for the networks they wrap."""
    try:
        import comfy.model_management  # type: ignore  # noqa: F401
    except ImportError:
        return
    from ._xl_comfy_model import as_comfy_model
    scale = model.vae.config.latent_scale
    patchers = {}
    for net in model.networks():
        if reuse is not None and id(net) in reuse:
            patchers[id(net)] = reuse[id(net)]
        elif net is model.vae:
            patchers[id(net)] = _comfy.wrap_for_memory_management(net, "NUWA-XL T-KLVAE")
        else:
            patchers[id(net)] = as_comfy_model(net, scale)
    setattr(model, PATCHERS_ATTR, patchers)


def only_local(model):
    """The bundle's one local MTD; a ValueError naming them when there are several (pick by spacing)."""
    distinct = {id(lm.mtd): lm for lm in model.local_models}
    if len(distinct) == 1:
        return next(iter(distinct.values())).mtd
    if not distinct:
        raise ValueError("this NUWA-XL model has no local MTD; add one with NUWA-XL Add Local Model")
    have = "; ".join(lm.describe() for lm in distinct.values())
    raise ValueError(f"this NUWA-XL model has {len(distinct)} local models ({have}); set frames_apart to the spacing "
                     f"of the frames the level makes to pick one")


def level_mtd(model, level: str, frames_apart: float = 0):
    """The MTD of a level: the global one, or the local one for frames `frames_apart` apart (0: the only one)."""
    if level == "global":
        return model.global_mtd
    return model.local_for(frames_apart) if frames_apart else only_local(model)


def level_patcher(model, level: str, frames_apart: float = 0):
    """The MODEL for KSampler: a clone of the level's one ModelPatcher (ComfyUI's clones share the
    weights and their loaded state), or a fresh one for a model the loader did not wrap."""
    mtd = level_mtd(model, level, frames_apart)
    patchers = getattr(model, PATCHERS_ATTR, None)
    if patchers is not None:
        return patchers[id(mtd)].clone()
    from ._xl_comfy_model import as_comfy_model
    return as_comfy_model(mtd, model.vae.config.latent_scale)


def _load(model, networks, memory_required: int = 0):
    """Ask ComfyUI to load the model's `networks` (modules: the T-KLVAE, MTDs) with `memory_required`
    bytes of working memory beside them; without ComfyUI (scripts, tests), move the model to the
    torch device."""
    patchers = getattr(model, PATCHERS_ATTR, None)
    if patchers is None:
        model.to(_comfy.torch_device())
        return model
    chosen = list({id(net): patchers[id(net)] for net in networks}.values())
    _comfy.load_for_run(chosen, memory_required)
    return model


def _dtype(module) -> torch.dtype:
    return next(module.parameters()).dtype


def vae_memory(model, frames: int = 16) -> int:
    """Working memory of decoding `frames` frames (XLModel.decode's chunk) at the model's frame size."""
    from nuwa_core.memory import video_vae_bytes
    _, h, w = model.latent_shape()
    f = model.vae.config.downsample_factor
    return video_vae_bytes(model.vae.config, frames, h * f, w * f, _dtype(model.vae))


def sampling_memory(model, mtd, segments: int, L: int, preview: bool = True, guidance: float = 1.0) -> int:
    """Working memory of sampling `segments` L-frame segments at once with the MTD `mtd` (twice the
    batch with classifier-free guidance; plus one decoded preview frame)."""
    from nuwa_core.memory import mtd_working_bytes
    _, h, w = model.latent_shape()
    batch = max(int(segments), 1) * (1 if guidance == 1.0 else 2)
    need = mtd_working_bytes(mtd.config, batch, L, h, w, _dtype(mtd))
    return need + (vae_memory(model, 1) if preview else 0)


def decoded_output(model, frames: torch.Tensor, frames_apart: float) -> tuple:
    """Decoded frames [N, 3, H, W] -> the decode nodes' (IMAGE, fps): the video's fps over the frames' spacing."""
    return _to_image(frames), float(model.fps / max(frames_apart, 1e-9))


# ---- nodes ------------------------------------------------------------------------------------

class NUWAXLModelLoader:
    DESCRIPTION = ("Loads a NUWA-XL model: a T-KLVAE (video autoencoder) and Mask Temporal Diffusion models, from "
                   "the 'nuwa' model folder or 'nuwa_xl' (ComfyUI/models/nuwa_xl, the pack's models/nuwa_xl, where "
                   "the default model ships). One MTD can serve the global (keyframes) and the local (in-filling) "
                   "levels, or pick a separate local model; for the paper's local model per depth, chain NUWA-XL Add "
                   "Local Model. The default model follows prompts of the shipped text encoder nuwa_text_scenes ('a "
                   "blue sky over the sea': a camera panning across that scene).")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (MODEL_TYPE,)
    RETURN_NAMES = ("xl_model",)
    OUTPUT_TOOLTIPS = ("The NUWA-XL model; feed it to Coarse-to-Fine, or to Global Diffusion / Local Diffusion.",)

    @classmethod
    def INPUT_TYPES(cls):
        mtds = list_xl_models(MTD_KIND, DEFAULT_MTD)
        return {"required": {
            "t_klvae_name": (list_xl_models(VAE_KIND, DEFAULT_VAE), {
                "default": DEFAULT_VAE, "tooltip": "T-KLVAE file (video autoencoder with temporal layers)."}),
            "mtd_name": (mtds, {"default": DEFAULT_MTD, "tooltip": "Mask Temporal Diffusion file for the global "
                                "level (keyframes), and for every level unless a local model is picked."}),
            "local_mtd_name": ([SAME_AS_GLOBAL] + mtds, {"default": SAME_AS_GLOBAL, "tooltip":
                                "Mask Temporal Diffusion file for the local (in-filling) levels (a file trained for "
                                f"one level serves that level only); '{SAME_AS_GLOBAL}' uses the global model."}),
        }}

    def load(self, t_klvae_name, mtd_name, local_mtd_name=SAME_AS_GLOBAL):
        from nuwa_core.weights import check_listed_file
        from nuwa_core.xl.model import XLModel
        local = None if local_mtd_name == SAME_AS_GLOBAL else xl_model_path(local_mtd_name)
        paths = [xl_model_path(t_klvae_name), xl_model_path(mtd_name)] + ([local] if local else [])
        for path in paths:
            check_listed_file(path)
        # ComfyUI's dtypes for the device (fp32 on the CPU): the MTDs as its diffusion models, the
        # T-KLVAE as its VAEs (bf16 or fp32: fp16 VAEs overflow)
        model = XLModel.load(paths[0], paths[1], [local] if local else [])
        params = sum(p.numel() for p in model.global_mtd.parameters())
        model.to_dtypes(_comfy.inference_dtype(params), _comfy.vae_dtype())
        attach_patchers(model)
        return (model,)


class NUWAXLAddLocalModel:
    DESCRIPTION = ("Adds a local (in-filling) Mask Temporal Diffusion model to a NUWA-XL model: the paper's local model "
                   "per depth. The file records the tree levels it was trained on (python -m nuwa_core.train xl --role "
                   "local --level K), so it fills the levels whose frames are that far apart, ahead of the loader's "
                   "local model there. Chain one per level; Local Diffusion and Coarse-to-Fine pick by the spacing.")
    CATEGORY = CATEGORY
    FUNCTION = "add"
    RETURN_TYPES = (MODEL_TYPE,)
    RETURN_NAMES = ("xl_model",)
    OUTPUT_TOOLTIPS = ("The same NUWA-XL model with this local model added (the input is left as it was).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"xl_model": _model_input(),
                             "mtd_name": (list_xl_models(MTD_KIND, DEFAULT_MTD), {"tooltip":
                                          "Mask Temporal Diffusion file trained for one or more local levels "
                                          "(--role local [--level K], or --role both)."})}}

    def add(self, xl_model, mtd_name):
        from nuwa_core.weights import check_listed_file
        from nuwa_core.xl.model import LocalModel, load_mtd_xl
        path = xl_model_path(mtd_name)
        check_listed_file(path)
        mtd, info = load_mtd_xl(path)
        local = LocalModel.from_info(mtd.eval().to(dtype=_dtype(xl_model.global_mtd)), info, path.name)
        if local.spacings == ():
            raise ValueError(f"{path.name} was trained for the global level only (its levels: "
                             f"{info.get('levels', info.get('role'))}); pick a file trained with --role local or both")
        if local.L is not None and xl_model.info.get("L") not in (None, local.L):
            raise ValueError(f"{path.name} was trained with L={local.L} but this model's global MTD with "
                             f"L={xl_model.info['L']}; the tree needs one L for every level")
        out = xl_model.with_local(local)
        attach_patchers(out, getattr(xl_model, PATCHERS_ATTR, None))
        return (out,)


def _model_input(tip="From NUWA-XL Model Loader."):
    return (MODEL_TYPE, {"tooltip": tip})


def _common_widgets(L_default=5):
    return {
        "L": ("INT", {"default": L_default, "min": 3, "max": 64, "tooltip":
                      "Frames per diffusion call (the paper's L); the default model was trained with 5."}),
        "steps": ("INT", {"default": 30, "min": 1, "max": 1000, "tooltip": "DDIM steps per diffusion call."}),
        "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                         "tooltip": "Random seed; the same seed and inputs give the same video."}),
    }


_COND_TIP = ("Prompts from NUWA Text Encode (or CLIP Text Encode for a model trained on CLIP): one for every frame, "
             "or several joined with Conditioning (Combine), which cut the frames into equal parts, in order (2: the "
             "first half and the second; as many as frames: one each). Must come from the text encoder the MTD was trained with.")
_GUIDANCE = ("FLOAT", {"default": 1.0, "min": 0.0, "max": 30.0, "step": 0.1, "round": 0.01, "tooltip":
             "Classifier-free guidance scale against the null prompt (1 = off: one pass per step; above 1 "
             "follows the prompts more closely at twice the compute). Ignored without prompts."})


class NUWAXLGlobalDiffusion:
    DESCRIPTION = ("Global diffusion (NUWA-XL eq. 18): makes the L keyframes of a long video from prompts, all in one "
                   "diffusion call. Fill them with Local Diffusion, or use Coarse-to-Fine for the whole tree.")
    CATEGORY = CATEGORY
    FUNCTION = "generate"
    RETURN_TYPES = (LATENTS_TYPE,)
    RETURN_NAMES = ("keyframes",)
    OUTPUT_TOOLTIPS = ("L keyframe latents, (L-1)^(depth-1) video frames apart; to Local Diffusion or NUWA-XL Decode.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"xl_model": _model_input(), **_common_widgets(),
                             "depth": ("INT", {"default": 3, "min": 1, "max": 8, "tooltip":
                                       "Depth of the tree these keyframes start: they are (L-1)^(depth-1) frames "
                                       "apart in the final video (sets the fps of their preview)."}),
                             "guidance": _GUIDANCE},
                "optional": {"conditioning": ("CONDITIONING", {"tooltip": _COND_TIP})}}

    def generate(self, xl_model, L, steps, seed, depth, conditioning=None, guidance=1.0):
        xl_model.check_tree(L, depth)
        prompts = conditioning_prompts(conditioning, xl_model, "Global Diffusion conditioning")
        prompts = spread_prompts(prompts, L)
        g = xl_model.global_mtd
        model = _load(xl_model, (g, xl_model.vae), sampling_memory(xl_model, g, 1, L, guidance=guidance))
        cb = _Sampling(model, steps)
        keyframes = model.keyframes(prompts, L, steps, seed, callback=cb, guidance=guidance)
        apart = float((L - 1) ** (depth - 1))
        return ({"latents": keyframes.cpu(), "L": L, "frames_apart": apart, "prompts": prompts},)


class NUWAXLLocalDiffusion:
    DESCRIPTION = ("Local diffusion (NUWA-XL eqs. 19-20), one level of the tree: every pair of adjacent input frames "
                   "becomes the first and last frame of an L-frame segment whose L-2 middle frames are generated. "
                   "K frames in -> (K-1)(L-1)+1 frames out; the input frames are kept exactly.")
    CATEGORY = CATEGORY
    FUNCTION = "fill"
    RETURN_TYPES = (LATENTS_TYPE,)
    RETURN_NAMES = ("frames",)
    OUTPUT_TOOLTIPS = ("The denser frames; chain another Local Diffusion for the next level, or decode them.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"xl_model": _model_input(),
                             "keyframes": (LATENTS_TYPE, {"tooltip": "From Global Diffusion or another Local Diffusion."}),
                             **_common_widgets(),
                             "segments_per_batch": ("INT", {"default": 0, "min": 0, "max": 4096, "tooltip":
                                                    "Segments sampled together (0 = all at once; lower it to save "
                                                    "memory, the result is the same)."}),
                             "guidance": _GUIDANCE},
                "optional": {"conditioning": ("CONDITIONING", {"tooltip": _COND_TIP + " Here: spread over the output "
                                              "frames; without it, the prompts that came with the input frames."})}}

    def fill(self, xl_model, keyframes, L, steps, seed, segments_per_batch, conditioning=None, guidance=1.0):
        from nuwa_core.xl.keyframes import check_keyframe_latents
        _check_tree(L, 1)
        lat = keyframes["latents"]
        try:
            check_keyframe_latents(xl_model, lat)
        except ValueError as err:
            raise ValueError(f"Local Diffusion: {err}") from None
        k = lat.shape[0]
        if k < 2:
            raise ValueError(f"Local Diffusion needs at least 2 input frames, got {k}")
        frames = (k - 1) * (L - 1) + 1
        prompts = conditioning_prompts(conditioning, xl_model, "Local Diffusion conditioning")
        if prompts is None:
            prompts = keyframes.get("prompts")
            if prompts is not None and prompts.shape[0] not in (1, k):
                prompts = None
        prompts = spread_prompts(prompts, frames)
        apart = keyframes.get("frames_apart", 1.0) / (L - 1)  # the spacing of the frames this level makes
        try:
            mtd = xl_model.local_for(apart, L)
        except ValueError as err:
            raise ValueError(f"Local Diffusion: {err}") from None
        need = sampling_memory(xl_model, mtd, segments_per_batch or k - 1, L, guidance=guidance)
        model = _load(xl_model, (mtd, xl_model.vae), need)
        cb = _Sampling(model, steps * _runs(k - 1, segments_per_batch))
        out = model.fill(lat, prompts, L, steps, seed, callback=cb, max_batch=segments_per_batch or None,
                         guidance=guidance, local=mtd)
        return ({"latents": out.cpu(), "L": L, "frames_apart": apart, "prompts": prompts},)


class NUWAXLDecode:
    DESCRIPTION = "Decodes NUWA-XL latents to frames with the model's T-KLVAE (a few frames at a time)."
    CATEGORY = CATEGORY
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE", "FLOAT")
    RETURN_NAMES = ("images", "fps")
    OUTPUT_TOOLTIPS = ("The frames as an IMAGE batch.",
                       "Frames per second of these frames (the model's video fps / their spacing).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"xl_model": _model_input(),
                             "latents": (LATENTS_TYPE, {"tooltip": "From Global, Local Diffusion or Coarse-to-Fine."})}}

    def decode(self, xl_model, latents):
        model = _load(xl_model, (xl_model.vae,), vae_memory(xl_model))
        apart = latents.get("frames_apart", 1.0)  # keyframes far apart are decoded each alone
        return decoded_output(model, model.decode(latents["latents"], frames_apart=apart), apart)


class NUWAXLEncode:
    DESCRIPTION = ("Encodes your own frames (an IMAGE batch: Load Image nodes joined with Batch Images, or a video's "
                   "frames from a video loader) with the model's T-KLVAE into keyframe latents, as Global Diffusion "
                   "makes them: feed them to Local Diffusion to fill between your frames (it keeps them). The frames "
                   "must be the model's frame size (the shipped model: 64x48) or be scaled and centre-cropped to it by "
                   "the size option; at least 2 frames.")
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = (LATENTS_TYPE,)
    RETURN_NAMES = ("keyframes",)
    OUTPUT_TOOLTIPS = ("Keyframe latents, one per frame taken; to Local Diffusion (or NUWA-XL Decode).",)

    @classmethod
    def INPUT_TYPES(cls):
        from nuwa_core.xl.keyframes import FIT_MODES, FIT_REFUSE
        return {"required": {
            "xl_model": _model_input(),
            "images": ("IMAGE", {"tooltip": "The frames, in order: an IMAGE batch [N, H, W, 3] of at least 2 frames."}),
            "size": (list(FIT_MODES), {"default": FIT_REFUSE, "tooltip":
                     "Frames of another size than the model's: refuse them with an error naming the size that fits, "
                     "or scale each (keeping its aspect) until it covers the model's size and cut out the centre."}),
            "every": ("INT", {"default": 1, "min": 1, "max": 4096, "tooltip":
                      "Take frames 0, every, 2*every, ... of the batch as keyframes (1: every frame; e.g. 16 to take "
                      "keyframes 16 frames apart from a video)."}),
            "frames_apart": ("INT", {"default": 0, "min": 0, "max": 1 << 20, "tooltip":
                             "Frames of the final video between two of these keyframes (sets the fps of decoding "
                             "them; each Local Diffusion level divides it by L-1). 0: as far apart as Global "
                             "Diffusion's keyframes, (L-1)^(depth-1) of the model (L=5, depth 3: 16)."}),
        }}

    def encode(self, xl_model, images, size, every=1, frames_apart=0):
        from nuwa_core.xl.keyframes import encode_keyframes
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] not in (3, 4):
            raise ValueError(f"NUWA-XL Encode: expected an IMAGE batch [N, H, W, 3], got "
                             f"{tuple(getattr(images, 'shape', ())) or type(images).__name__}")
        frames = images[..., :3].float().permute(0, 3, 1, 2) * 2.0 - 1.0  # an alpha channel is dropped
        if not frames_apart:
            L, depth = int(xl_model.info.get("L", 5)), int(xl_model.info.get("depth", 3))
            frames_apart = (L - 1) ** max(depth - 1, 0)
        model = _load(xl_model, (xl_model.vae,), vae_memory(xl_model))
        try:  # consecutive frames of a clip are encoded together, keyframes further apart one at a time
            latents = encode_keyframes(model, frames, size, every, neighbours=every == 1 and frames_apart == 1)
        except ValueError as err:
            taken = f" (frames 0, {every}, ... of {images.shape[0]})" if every > 1 else ""
            raise ValueError(f"NUWA-XL Encode{taken}: {err}") from None
        return ({"latents": latents, "L": latents.shape[0], "frames_apart": float(frames_apart), "prompts": None},)


SCHEDULE_LEVELS = 3  # Coarse-to-Fine's prompt inputs: the keyframes' and levels 2..3 (deeper levels reuse the last)
_LEVEL_TIP = ("Denser prompts for level {k} of the tree (the paper's prompts with smaller time intervals): any "
              "number, joined with Conditioning (Combine), spread over this level's frames from the first to the "
              "last (as many as the level's frames, (L-1)^{k} + 1: one each). Deeper levels without their own "
              "prompts use these; leave empty to use the coarser level's.")


def level_schedule(model, L: int, depth: int, conditioning, levels: dict, what: str):
    """Coarse-to-Fine's prompt inputs -> the per-level prompt list of generate_long_video, or None."""
    from nuwa_core.xl.diffusion_over_diffusion import prompt_schedule
    given = [conditioning_prompts(conditioning, model, f"{what} conditioning")]
    for k in range(2, SCHEDULE_LEVELS + 1):
        c = levels.pop(f"conditioning_level_{k}", None)
        given.append(conditioning_prompts(c, model, f"{what} conditioning_level_{k}"))
    if levels:
        raise TypeError(f"{what}: unexpected inputs {sorted(levels)}")
    deepest = max((k for k, p in enumerate(given) if p is not None), default=-1)
    if deepest < 0:
        return None
    if deepest >= depth:
        raise ValueError(f"{what}: prompts were given for level {deepest + 1} (conditioning_level_{deepest + 1}) but "
                         f"the tree has {depth} level(s) (depth {depth}); raise depth or disconnect that input")
    return prompt_schedule(given, L, depth)


class NUWAXLCoarseToFine:
    DESCRIPTION = ("NUWA-XL Diffusion over Diffusion, the whole tree: global diffusion makes L keyframes, then each "
                   "of depth-1 local levels fills between adjacent frames, all segments of a level in one batch. "
                   "Makes (L-1)^depth + 1 frames (L=5, depth 3: 65) in only depth sequential rounds. Outputs an "
                   "IMAGE batch and its fps for SaveAnimatedWEBP, CreateVideo/SaveVideo or VideoHelperSuite.")
    CATEGORY = CATEGORY
    FUNCTION = "generate"
    RETURN_TYPES = ("IMAGE", "FLOAT", LATENTS_TYPE)
    RETURN_NAMES = ("images", "fps", "latents")
    OUTPUT_TOOLTIPS = ("The long video as an IMAGE batch of (L-1)^depth + 1 frames.",
                       "Frames per second the model was trained at.",
                       "The video's latents (to decode again, or refine with another Local Diffusion).")

    @classmethod
    def INPUT_TYPES(cls):
        w = _common_widgets()
        return {"required": {"xl_model": _model_input(), "L": w["L"],
                             "depth": ("INT", {"default": 3, "min": 1, "max": 8, "tooltip":
                                       "Levels of the tree: 1 = keyframes only; frames = (L-1)^depth + 1."}),
                             "steps": w["steps"], "seed": w["seed"],
                             "segments_per_batch": ("INT", {"default": 0, "min": 0, "max": 4096, "tooltip":
                                                    "Local segments sampled together (0 = a whole level at once; "
                                                    "lower it to save memory, the result is the same)."}),
                             "guidance": _GUIDANCE},
                "optional": {"conditioning": ("CONDITIONING", {"tooltip": _COND_TIP + " These are the keyframe "
                                              "prompts (level 1), and every level's unless a denser level below "
                                              "is given."}),
                             **{f"conditioning_level_{k}": ("CONDITIONING", {"tooltip": _LEVEL_TIP.format(k=k)})
                                for k in range(2, SCHEDULE_LEVELS + 1)}}}

    def generate(self, xl_model, L, depth, steps, seed, segments_per_batch, conditioning=None, guidance=1.0,
                 **levels):
        from nuwa_core.xl.diffusion_over_diffusion import generate_long_video
        xl_model.check_tree(L, depth)
        try:
            local = xl_model.tree_locals(L, depth)  # the local MTD of each level, by the spacing it was trained on
        except ValueError as err:
            raise ValueError(f"Coarse-to-Fine (L={L}, depth {depth}): {err}") from None
        levels = level_schedule(xl_model, L, depth, conditioning, levels, "Coarse-to-Fine")
        g = guidance if levels is not None else 1.0
        segments = [min((L - 1) ** k, segments_per_batch or (L - 1) ** k) for k in range(1, depth)]
        need = max([sampling_memory(xl_model, xl_model.global_mtd, 1, L, guidance=g), vae_memory(xl_model)]
                   + [sampling_memory(xl_model, mtd, n, L, guidance=g) for mtd, n in zip(local, segments)])
        model = _load(xl_model, [xl_model.global_mtd, *local, xl_model.vae], need)
        mb = segments_per_batch or None
        total = steps * (1 + sum(_runs((L - 1) ** k, segments_per_batch) for k in range(1, depth)))
        cb = _Sampling(model, total)
        if levels is None:
            levels = model.null_prompts()
        gen = torch.Generator().manual_seed(seed)  # CPU noise: the same video on every device
        levels = [p.to(model.device) for p in levels] if isinstance(levels, list) else levels.to(model.device)
        with torch.no_grad():
            lat = generate_long_video(model.global_mtd, local, levels, L, depth,
                                      model.latent_shape(), steps=steps, generator=gen, callback=cb, max_batch=mb,
                                      guidance=g)
            frames = model.decode(lat)
        return (*decoded_output(model, frames, 1.0), {"latents": lat.cpu(), "L": L, "frames_apart": 1.0,
                                                      "prompts": None})


NODE_CLASS_MAPPINGS = {
    "NUWAXLModelLoader": NUWAXLModelLoader,
    "NUWAXLAddLocalModel": NUWAXLAddLocalModel,
    "NUWAXLGlobalDiffusion": NUWAXLGlobalDiffusion,
    "NUWAXLLocalDiffusion": NUWAXLLocalDiffusion,
    "NUWAXLCoarseToFine": NUWAXLCoarseToFine,
    "NUWAXLDecode": NUWAXLDecode,
    "NUWAXLEncode": NUWAXLEncode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "NUWAXLModelLoader": "NUWA-XL Model Loader",
    "NUWAXLAddLocalModel": "NUWA-XL Add Local Model",
    "NUWAXLGlobalDiffusion": "NUWA-XL Global Diffusion",
    "NUWAXLLocalDiffusion": "NUWA-XL Local Diffusion",
    "NUWAXLCoarseToFine": "NUWA-XL Coarse-to-Fine (long video)",
    "NUWAXLDecode": "NUWA-XL Decode",
    "NUWAXLEncode": "NUWA-XL Encode (your frames -> keyframes)",
}
