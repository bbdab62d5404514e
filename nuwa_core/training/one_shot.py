"""The `one-shot` stage: a NUWA-Infinity model of one image in a time budget (appendix D), in one call.

`python -m nuwa_core.train one-shot IMAGE --minutes N --out FILE` and the *NUWA Train One-Shot* node
both run `train_one_shot`: the tokenizer stage (vqgan.py), then the renderer stage (renderer.py) on
the tokens it makes, with the recipe models/nuwa/TRAINING.md trained the shipped models with. Each
stage gets a share of the budget; a few steps into it, its step count is fitted to the time it has
left, so the learning rate warms up and decays to 0 over the run as it does in a run given in steps
(the counts are reported: giving them as fixed steps reproduces a run exactly). Everything a run
learned is kept when it stops early (cancel, Ctrl-C); `resume=True` trains the saved run further
(the renderer, on the same tokenizer: its tokens are what the renderer learned to continue).

A video (frames [T, 3, H, W], e.g. the IMAGE batch of a loaded video) trains three stages: the
tokenizer on its frames, the renderer on clips of VIDEO_CLIP_FRAMES frames with a frame extent
(VIDEO_EXTENT: each new frame reads the frames before it), and the Pixel-Guided VQGAN (pgvqgan.py) on
pairs of consecutive frames, written beside the model as pgvqgan/NAME.safetensors; "shipped" starts
from the shipped video model.

A mask leaves a region out of training: no training crop reads its pixels, which are greyed out
before anything is encoded. `wrap` says the image itself wraps around (a 360-degree panorama, a
texture that already tiles): crops may cross its joint. A seamless canvas from an image that does
not wrap needs no wrap here: it is planned and decoded with wrap (the Direction Planner's `wrap`).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoint import atomic_write
from ..infinity.generation import NuwaInfinity
from ..infinity.vqgan import save_vqgan
from ..weights import PACK_MODELS_DIR
from . import pgvqgan as pgvqgan_stage, renderer as renderer_stage, vqgan as vqgan_stage
from .arguments import image_arguments, video_arguments
from .loop import TrainingError

SHIPPED_MODEL = PACK_MODELS_DIR / "nuwa" / "nuwa_infinity_default.safetensors"
SHIPPED_VIDEO_MODEL = PACK_MODELS_DIR / "nuwa" / "nuwa_infinity_plaza.safetensors"
VIDEO_EXTENT = (2, 1, 1)    # (e_f, e_h, e_w): a new frame reads the two before it (the shipped video model's)
VIDEO_CLIP_FRAMES = 3       # a training clip: e_f + 1 frames, so the whole frame extent is trained
VIDEO_MAX_STRIDE = 3        # clips of frames 1..3 apart: motions of several speeds
VIDEO_SAMPLE_PATCHES = 2    # a clip is 2 x 2 patches in each frame
VIDEO_TOKENIZER_FRAMES = 120  # the tokenizer trains on at most this many frames, evenly spaced
VIDEO_MAX_FRAMES = 600      # the renderer and PG-VQGAN train on the first 600 (encoding them is the setup's cost)
VIDEO_MAX_SIDE = 256        # frames larger than this (their long side) are downscaled first: CPU-sized runs
PGVQGAN_SHARE = 0.25        # of a video's budget; the tokenizer gets tokenizer_share, the renderer the rest
PGVQGAN_FOLDER = "pgvqgan"  # beside the model: where the PG-VQGAN Decode node looks
START_FROM = ("shipped", "scratch")  # fine-tune the shipped default model's tokenizer and renderer, or train new ones
WRAPS = ("none", "x", "xy")
PATCH_PX = 64        # the recipe's patches: 8x8 tokens of the f8 tokenizer
MAX_SAMPLE_PATCHES = 3  # a training sample is up to 3x3 patches (the painting recipe)
MIN_SAMPLE_PATCHES = 2  # and at least 2x2: a patch must have neighbours to learn continuation from
FINAL_SAVE_SECONDS = 3.0  # kept back from the budget for writing the model
STATE_FILE = "one_shot.json"
TOKENIZER_FILE = "tokenizer.safetensors"  # in the work folder: the run's tokenizer
TRAINING_FOLDER = "training"  # in a models/nuwa folder: runs' working files (the loader does not list them)
STOPPED_BY_USER = ("cancel", "signal")  # should_stop(), Ctrl-C / SIGTERM
IN_MEMORY = "(in memory)"  # the stages get the image as a tensor, not from --images


@dataclasses.dataclass
class OneShotSettings:
    minutes: float = 10.0
    start_from: str = "shipped"
    tokenizer_share: float = 0.3      # of the budget; the renderer gets the rest
    wrap: str = "none"                # the training image wraps: "x" (horizontally) or "xy" (both ways)
    seed: int = 0
    tokenizer_steps: int = 0          # fixed step counts instead of the budget (0: fitted to it)
    renderer_steps: int = 0
    pgvqgan_steps: int = 0            # videos: the PG-VQGAN's fixed steps (0: fitted to the budget)
    tokenizer_lr: float = 5e-4        # the shipped models' recipe (models/nuwa/TRAINING.md)
    renderer_lr: float = 3e-4

    def check(self) -> None:
        if self.start_from not in START_FROM:
            raise TrainingError(f"start_from must be one of {START_FROM}, got {self.start_from!r}")
        if self.wrap not in WRAPS:
            raise TrainingError(f"wrap must be one of {WRAPS}, got {self.wrap!r}")
        if min(self.tokenizer_steps, self.renderer_steps, self.pgvqgan_steps) < 0:
            raise TrainingError("fixed step counts are whole numbers >= 0 (0: fitted to the budget)")
        fixed = self.tokenizer_steps and self.renderer_steps
        if not fixed and not self.minutes > 0:
            raise TrainingError(f"the time budget must be more than 0 minutes, got {self.minutes}; about 10 minutes "
                                f"on a CPU gives a usable model of one painting, a few minutes on a GPU")
        if not 0.0 < self.tokenizer_share < 1.0:
            raise TrainingError(f"tokenizer_share is the budget's share for the tokenizer, strictly between 0 and 1, "
                                f"got {self.tokenizer_share}")

    def identity(self) -> dict:
        """What changes what is learned; not how long (minutes, step counts), which resuming extends."""
        return {"start_from": self.start_from, "wrap": self.wrap, "seed": self.seed,
                "tokenizer_share": self.tokenizer_share, "tokenizer_lr": self.tokenizer_lr,
                "renderer_lr": self.renderer_lr}


@dataclasses.dataclass
class OneShotProgress:
    """What the caller's on_progress receives, before every training step."""
    stage: str                  # "tokenizer" | "renderer" | "pgvqgan" (videos)
    step: int
    steps: int                  # the stage's planned steps (fitted to the budget a few steps in)
    fraction: float             # of the whole run done, 0..1
    elapsed: float              # seconds since the run started
    loss: float
    preview: torch.Tensor | None = None  # IMAGE [1, H, W, 3], every preview_every seconds


def image_key(image: torch.Tensor, keep_out: torch.Tensor | None, settings: OneShotSettings) -> str:
    """A hash of the image (8-bit), the left-out mask and the settings that change what is learned."""
    h = hashlib.sha256()
    h.update(((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy().tobytes())
    h.update(str(tuple(image.shape)).encode())
    if keep_out is not None:
        h.update(keep_out.gt(0).cpu().numpy().tobytes())
    h.update(json.dumps(settings.identity(), sort_keys=True).encode())
    return h.hexdigest()[:16]


def trainable_part(image: torch.Tensor, keep_out: torch.Tensor | None, wrap: str
                   ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int, int, int]]:
    """The image cut to the box around what the mask leaves (but never across a wrapping axis), the
    left-out pixels greyed, and the mask cut alike (None when nothing is left out). -> (image, mask, box x,y,w,h)."""
    _, H, W = image.shape
    if keep_out is None or not bool(keep_out.gt(0).any()):
        return image, None, (0, 0, W, H)
    if tuple(keep_out.shape) != (H, W):
        raise TrainingError(f"the mask is {keep_out.shape[-1]}x{keep_out.shape[-2]} px but the image is {W}x{H}: "
                            f"give a mask of the image's size (white = leave out of training)")
    left_out = keep_out.gt(0)
    kept = ~left_out
    if not bool(kept.any()):
        raise TrainingError("the mask covers the whole image, so nothing is left to train on: paint only the "
                            "regions to leave out (white = leave out)")
    rows, cols = kept.any(1).nonzero().flatten(), kept.any(0).nonzero().flatten()
    y0, y1 = (0, H) if wrap == "xy" else (int(rows[0]), int(rows[-1]) + 1)
    x0, x1 = (0, W) if wrap in ("x", "xy") else (int(cols[0]), int(cols[-1]) + 1)
    image = torch.where(left_out, torch.zeros(()), image)[:, y0:y1, x0:x1]
    mask = left_out[y0:y1, x0:x1]
    return image, (mask if bool(mask.any()) else None), (x0, y0, x1 - x0, y1 - y0)


def sample_patches(height: int, width: int, masked: bool) -> tuple[int, int]:
    """Patches per training sample (rows, cols) for a trainable part of height x width px."""
    rows, cols = min(MAX_SAMPLE_PATCHES, height // PATCH_PX), min(MAX_SAMPLE_PATCHES, width // PATCH_PX)
    if rows < MIN_SAMPLE_PATCHES or cols < MIN_SAMPLE_PATCHES:
        least = MIN_SAMPLE_PATCHES * PATCH_PX
        what = "the part of the image the mask leaves" if masked else "the image"
        raise TrainingError(f"{what} is {width}x{height} px; one-shot training needs at least {least}x{least} px "
                            f"({MIN_SAMPLE_PATCHES}x{MIN_SAMPLE_PATCHES} patches of {PATCH_PX} px, so every patch has "
                            f"neighbours to learn from): use a larger image, upscale it (e.g. Upscale Image By 2)"
                            + (", or leave less of it out" if masked else ""))
    return rows, cols


def padded_for_wrap(image: torch.Tensor, mask: torch.Tensor | None, wrap: str, pad: int):
    """A wrapping image continued across its joint by `pad` px (circularly), so crops can cross it: with `pad`
    one patch less than the widest sample, a sample may hold the joint at any offset."""
    if wrap == "none":
        return image, mask
    py = pad if wrap == "xy" else 0
    image = F.pad(image[None], (pad, pad, py, py), mode="circular")[0]
    if mask is not None:
        mask = F.pad(mask[None, None].float(), (pad, pad, py, py), mode="circular")[0, 0].bool()
    return image, mask


def training_memory_bytes(rows: int, cols: int, batch: int = 4, frames: int = 1) -> int:
    """Peak memory of a one-shot run on its device: the larger of its two stages, each its weights,
    gradients and Adam moments (16 bytes a weight, fp32) and its activations kept for the backward
    pass (about 3x what the forward alone holds: nuwa_core.memory's inference estimates)."""
    from ..checkpoint import config_from_json, read_metadata
    from ..infinity.renderer import Renderer, RendererConfig
    from ..infinity.vqgan import VQModel, get_config
    from ..memory import renderer_working_bytes, vqgan_window_bytes
    vq_cfg = get_config("small_f8")
    r_cfg = config_from_json(RendererConfig, read_metadata(SHIPPED_MODEL)["renderer_config"])
    weights = {"vq": sum(p.numel() for p in VQModel(vq_cfg).parameters()),
               "renderer": sum(p.numel() for p in Renderer(r_cfg).parameters())}
    tokenizer = 16 * weights["vq"] * 2 + 3 * vqgan_window_bytes(vq_cfg, PATCH_PX // 8, batch)  # x2: + discriminator
    renderer = 16 * weights["renderer"] + 3 * renderer_working_bytes(r_cfg, (frames, rows, cols), batch)
    return int(max(tokenizer, renderer + 4 * weights["vq"]))  # the frozen tokenizer beside the renderer


def _check_memory(needed: int, device, make_room) -> None:
    from ..memory import available_bytes
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if make_room is not None:
        make_room(needed, device)
    free = available_bytes(device if device.type == "cuda" else None)
    if free is not None and needed > free:
        where = f"on {device}" if device.type == "cuda" else "in RAM"
        raise TrainingError(f"one-shot training needs about {needed / 2**20:.0f} MiB but only {free / 2**20:.0f} MiB "
                            f"is free {where}: close other programs or unload models, or train on the CPU")


class _StageBudget:
    """The monitor of one stage (loop.Run): fits its step count to the time it has left, stops it at its
    deadline or when the caller asks, and reports progress (with a preview every so often)."""

    CALIBRATION_STEPS = 5

    def __init__(self, stage: str, deadline: float | None, fixed_steps: int, run_state: _RunState):
        self.stage, self.deadline, self.fixed_steps, self.state = stage, deadline, fixed_steps, run_state
        self.first: tuple[int, float] | None = None
        self.next_fit = self.CALIBRATION_STEPS

    def __call__(self, run, step: int, stats: dict):
        now = time.monotonic()
        if self.first is None:  # the stage's setup (encoding the token bank) is done: time steps from here
            self.first = (step, now)
            self.state.last_preview = now  # a stage's first preview shows it trained a while, not its start
            if self.fixed_steps:
                run.args.steps = self.fixed_steps
        first_step, first_time = self.first
        done = step - first_step
        # fitted after a few steps, then again each time the steps timed double (the time previews take,
        # a machine that gets busier): the schedule's end moves a little, and the run ends on its budget
        if not self.fixed_steps and done >= self.next_fit:
            per_step = (now - first_time) / done
            run.args.steps = step + max(1, int((self.deadline - now) / per_step))
            self.next_fit *= 2
        self.state.report(self.stage, step, run.args.steps, stats, run.preview)
        if self.state.should_stop():
            return "cancel"
        if self.deadline is not None and now >= self.deadline:
            return "budget"
        return None


class _RunState:
    """The whole run's clock, the caller's callbacks, and the preview timing."""

    def __init__(self, settings: OneShotSettings, on_progress, should_stop, preview_every: float):
        self.settings, self.on_progress, self._should_stop = settings, on_progress, should_stop
        self.preview_every = preview_every
        self.start = time.monotonic()
        self.budget = settings.minutes * 60.0
        self.fixed_steps: dict[str, int] = {}  # stage -> its fixed step count, when every stage has one
        self.last_preview = self.start
        self.first_renderer_preview: float | None = None

    def should_stop(self) -> bool:
        return bool(self._should_stop and self._should_stop())

    def report(self, stage: str, step: int, steps: int, stats: dict, preview_fn) -> None:
        now = time.monotonic()
        elapsed = now - self.start
        preview = None
        if preview_fn is not None and self.preview_every and now - self.last_preview >= self.preview_every:
            preview = preview_fn()
            self.last_preview = time.monotonic()
            if stage == "renderer" and self.first_renderer_preview is None:
                self.first_renderer_preview = self.last_preview - self.start
        s = self.settings
        if s.tokenizer_steps and s.renderer_steps:
            fixed = self.fixed_steps or {"tokenizer": s.tokenizer_steps, "renderer": s.renderer_steps}
            stages = list(fixed)
            fraction = (step + sum(fixed[n] for n in stages[:stages.index(stage)])) / sum(fixed.values())
        else:
            fraction = elapsed / self.budget
        if self.on_progress is not None:
            self.on_progress(OneShotProgress(stage, step, steps, min(1.0, fraction), elapsed,
                                             float(stats.get("loss", float("nan"))), preview))


def _stage_args(stage, flags: list[str], device, data_arguments=image_arguments) -> argparse.Namespace:
    """A stage module's arguments, parsed as `python -m nuwa_core.train` parses them, on `device`."""
    parser = argparse.ArgumentParser()
    data_arguments(parser)
    stage.add_arguments(parser)
    args = parser.parse_args(flags)
    args.device = device
    return args


def _read_state(work: Path) -> dict:
    path = work / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_state(work: Path, state: dict) -> None:
    atomic_write(work / STATE_FILE, lambda tmp: Path(tmp).write_text(json.dumps(state, indent=1, sort_keys=True)))


def _check_resumable(state: dict, key: str, work: Path, what: str) -> None:
    """A run can be continued only on what it was trained on (`what` names that, for the error)."""
    if state.get("key") != key:
        raise TrainingError(f"nothing to continue in {work}: " + (
            "no saved run there" if not state else f"its run was trained on another {what}") +
            "; train it anew (without continuing / --resume) instead")


def _common_flags(settings: OneShotSettings, work: Path) -> list[str]:
    """The flags every stage of a run gets."""
    return ["--seed", str(settings.seed), "--quiet", "--log-dir", str(work), "--save-every", "100"]


def _train_tokenizer(state: dict, work: Path, clock: _RunState, images: list[torch.Tensor], masks: list,
                     start_model: Path, common: list[str], resume: bool, device) -> str | None:
    """The tokenizer stage on `images` ([3, H, W] in -1..1, with their keep-out `masks`), fine-tuned from
    `start_model`'s tokenizer unless the run starts from scratch; skipped when the run's tokenizer is done.
    -> how the user stopped it ("cancel", "signal"), or None when it ran to its end."""
    if state["tokenizer"].get("done"):
        return None
    settings = clock.settings
    flags = ["--images", IN_MEMORY, "--out", str(work / TOKENIZER_FILE), "--one-shot", "--preset", "small_f8",
             "--crop", str(PATCH_PX), "--batch", "4", "--lr", str(settings.tokenizer_lr), "--warmup", "20",
             "--decay", "linear", "--disc-start", str(10 ** 9), "--restart-every", "50", "--steps", str(10 ** 9),
             *common]
    if settings.start_from == "shipped":
        shipped = work / "shipped_tokenizer.safetensors"
        save_vqgan(NuwaInfinity.load(start_model).vqgan, shipped)
        flags += ["--init", str(shipped)]
    if resume and state["tokenizer"].get("started"):
        flags.append("--resume")
    deadline = clock.start + settings.tokenizer_share * clock.budget if not settings.tokenizer_steps else None
    state["tokenizer"]["started"] = True
    _write_state(work, state)
    res = vqgan_stage.train_vqgan(_stage_args(vqgan_stage, flags, device), images, masks,
                                  _StageBudget("tokenizer", deadline, settings.tokenizer_steps, clock))
    state["tokenizer"].update(steps=res["step"], done=res["stopped"] not in STOPPED_BY_USER)
    _write_state(work, state)
    return res["stopped"] if res["stopped"] in STOPPED_BY_USER else None


def work_dir_for(out: Path) -> Path:
    """Where a run keeps its stages' checkpoints, logs and state: training/<name>/ beside the model (the
    Model Loader does not list it)."""
    return out.parent / TRAINING_FOLDER / out.stem


def train_one_shot(image: torch.Tensor, out, settings: OneShotSettings | None = None,
                   keep_out: torch.Tensor | None = None, resume: bool = False, work_dir=None, device=None,
                   on_progress: Callable[[OneShotProgress], None] | None = None,
                   should_stop: Callable[[], bool] | None = None, preview_every: float = 30.0,
                   make_room: Callable[[int, torch.device], None] | None = None) -> dict:
    """Train a model of `image` ([3, H, W] in -1..1) and write it to `out` (a NUWA-Infinity bundle).
    A video ([T, 3, H, W] in -1..1) also gets a PG-VQGAN, written to pgvqgan_path_for(out) (see the module's
    docstring); it takes no keep_out.

    keep_out [H, W]: > 0 where the image is left out of training. resume: continue the run saved in
    the work folder (same image, mask and settings; `settings.minutes` more). should_stop() -> True
    stops the run at the next step, keeping what it learned. make_room(bytes, device): called before
    training starts with the memory it needs (ComfyUI unloads other models), which is then checked.
    -> a summary: "stopped" ("budget", "steps" or "cancel"), "out" (None when stopped before the
    renderer began), step counts, seconds.
    """
    # training needs autograd, also when the caller runs under inference mode (ComfyUI runs nodes so), and
    # tensors made there cannot be saved for backward: the inputs are cloned outside it
    with torch.inference_mode(False), torch.enable_grad():
        return _train_one_shot(image.clone(), Path(out), settings or OneShotSettings(),
                               None if keep_out is None else keep_out.clone(), resume, work_dir, device, on_progress,
                               should_stop, preview_every, make_room)


def _train_one_shot(image, out: Path, settings: OneShotSettings, keep_out, resume, work_dir, device, on_progress,
                    should_stop, preview_every, make_room) -> dict:
    settings.check()
    if image.ndim == 4 and image.shape[1] == 3 and image.shape[0] > 1:
        if keep_out is not None and bool(keep_out.gt(0).any()):
            raise TrainingError("a mask cannot leave part of a video out of training: trim the video instead (e.g. "
                                "train on its first frames and score the rest)")
        return _train_video(image, out, settings, resume, work_dir, device, on_progress, should_stop, preview_every,
                            make_room)
    if image.ndim == 4 and image.shape[:2] == (1, 3):
        image = image[0]
    if image.ndim != 3 or image.shape[0] != 3:
        raise TrainingError(f"expected an RGB image [3, H, W] or video frames [T, 3, H, W], got shape "
                            f"{tuple(image.shape)}")
    work = Path(work_dir) if work_dir is not None else work_dir_for(out)
    key = image_key(image, keep_out, settings)
    state = _read_state(work)
    if resume:
        _check_resumable(state, key, work, "image, mask or settings (start_from, wrap, seed, tokenizer_share, "
                         "learning rates)")
    train_image, mask, box = trainable_part(image.float().clamp(-1, 1), keep_out, settings.wrap)
    masked = keep_out is not None and bool(keep_out.gt(0).any())
    rows, cols = sample_patches(train_image.shape[-2], train_image.shape[-1], masked)
    train_image, mask = padded_for_wrap(train_image, mask, settings.wrap, (MAX_SAMPLE_PATCHES - 1) * PATCH_PX)
    _check_memory(training_memory_bytes(rows, cols), device, make_room)
    work.mkdir(parents=True, exist_ok=True)
    if not resume:
        state = {"key": key, "settings": dataclasses.asdict(settings), "box": box, "tokenizer": {}, "renderer": {}}
        _write_state(work, state)
    clock = _RunState(settings, on_progress, should_stop, preview_every)
    tokenizer_file = work / TOKENIZER_FILE
    common = _common_flags(settings, work)
    stopped = _train_tokenizer(state, work, clock, [train_image], [mask], SHIPPED_MODEL, common, resume, device)
    if stopped:
        return _summary(state, clock, stopped, None)

    # ---- the renderer, on the tokenizer's tokens -------------------------------------------------
    renderer_out = work / "model.safetensors"
    flags = ["--tokenizer", str(tokenizer_file), "--images", IN_MEMORY, "--out", str(renderer_out), "--one-shot",
             "--token-bank", "8", "--aug-rotate", "2", "--aug-shear", "0.04", "--aug-noise", "0.01", "--batch", "4",
             "--lr", str(settings.renderer_lr), "--warmup", "100", "--sample-patches", f"{rows}x{cols}",
             "--steps", str(10 ** 9), *common]
    # no --wrap: a wrapping image comes padded across its joint (padded_for_wrap), so plain token crops already
    # cross it at every offset a sample can hold, and its edge tokens were encoded with their wrapped neighbours
    if settings.start_from == "shipped":
        flags += ["--init", str(SHIPPED_MODEL), "--init-tokens-may-differ"]
    if resume and state["renderer"].get("started"):
        flags.append("--resume")
    deadline = clock.start + clock.budget - FINAL_SAVE_SECONDS if not settings.renderer_steps else None
    renderer_steps = settings.renderer_steps and state["renderer"].get("steps", 0) + settings.renderer_steps
    state["renderer"]["started"] = True
    _write_state(work, state)
    res = renderer_stage.train_renderer(_stage_args(renderer_stage, flags, device), [train_image], [mask],
                                        _StageBudget("renderer", deadline, renderer_steps, clock))
    state["renderer"]["steps"] = res["step"]
    state["renderer"]["optimizer_steps"] = res["optimizer_steps"]
    _write_state(work, state)
    model = NuwaInfinity.load(renderer_out)
    summary = _summary(state, clock, res["stopped"], str(out))
    try:
        model.save(out, dtype=torch.float16, metadata={"one_shot": json.dumps(
            {"key": key, "settings": state["settings"], "tokenizer_steps": summary["tokenizer_steps"],
             "renderer_steps": summary["renderer_steps"]}, sort_keys=True)})
    except OSError as err:
        raise TrainingError(f"could not write the model to {out}: {err}. Any model file there before is unchanged, "
                            f"and what this run learned is kept in {work}: make room and continue the run") from err
    print(f"[train] one-shot: {summary['stopped']} after {summary['seconds']:.0f} s ({summary['tokenizer_steps']} "
          f"tokenizer + {summary['renderer_steps']} renderer steps); wrote {out}", file=sys.stderr)
    return summary


def pgvqgan_path_for(out) -> Path:
    """Where a video's one-shot run writes its PG-VQGAN: pgvqgan/NAME.safetensors beside the model."""
    out = Path(out)
    return out.parent / PGVQGAN_FOLDER / out.name


def video_frames_for_training(video: torch.Tensor) -> torch.Tensor:
    """Frames [T, 3, H, W] in -1..1 -> uint8 [T', 3, H', W']: the first VIDEO_MAX_FRAMES, the long side scaled
    down to VIDEO_MAX_SIDE px, centre-cropped to whole patches; refuses videos too short or too small."""
    t, _, h, w = video.shape
    if t < VIDEO_CLIP_FRAMES + 1:
        raise TrainingError(f"the video has {t} frames; one-shot training on a video needs at least "
                            f"{VIDEO_CLIP_FRAMES + 1} (a training clip is {VIDEO_CLIP_FRAMES} frames): give a longer "
                            f"video, or one image to train an image model")
    least = VIDEO_SAMPLE_PATCHES * PATCH_PX
    if h < least or w < least:
        raise TrainingError(f"the video's frames are {w}x{h} px; one-shot training on a video needs at least "
                            f"{least}x{least} px ({VIDEO_SAMPLE_PATCHES}x{VIDEO_SAMPLE_PATCHES} patches of {PATCH_PX} "
                            f"px): upscale it")
    video = video[:VIDEO_MAX_FRAMES].float().clamp(-1, 1)
    if max(h, w) > VIDEO_MAX_SIDE:
        scale = VIDEO_MAX_SIDE / max(h, w)
        h, w = max(least, round(h * scale)), max(least, round(w * scale))
        video = torch.cat([F.interpolate(chunk, size=(h, w), mode="area") for chunk in video.split(32)])
    hh, ww = h // PATCH_PX * PATCH_PX, w // PATCH_PX * PATCH_PX
    top, left = (h - hh) // 2, (w - ww) // 2
    frames = video[:, :, top:top + hh, left:left + ww]
    return ((frames + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _train_video(video, out: Path, settings: OneShotSettings, resume, work_dir, device, on_progress, should_stop,
                 preview_every, make_room) -> dict:
    """The three stages on a video (see the module's docstring): a bundle to `out`, a PG-VQGAN beside it."""
    frames = video_frames_for_training(video)  # uint8 [T, 3, H, W]
    work = Path(work_dir) if work_dir is not None else work_dir_for(out)
    key = image_key(video, None, settings)
    state = _read_state(work)
    if resume:
        _check_resumable(state, key, work, "video or settings")
    _check_memory(training_memory_bytes(VIDEO_SAMPLE_PATCHES, VIDEO_SAMPLE_PATCHES, frames=VIDEO_CLIP_FRAMES),
                  device, make_room)
    work.mkdir(parents=True, exist_ok=True)
    if not resume:
        state = {"key": key, "settings": dataclasses.asdict(settings), "video": list(frames.shape),
                 "tokenizer": {}, "renderer": {}, "pgvqgan": {}}
        _write_state(work, state)
    clock = _RunState(settings, on_progress, should_stop, preview_every)
    if settings.tokenizer_steps and settings.renderer_steps and settings.pgvqgan_steps:
        clock.fixed_steps = {"tokenizer": settings.tokenizer_steps, "renderer": settings.renderer_steps,
                             "pgvqgan": settings.pgvqgan_steps}
    shipped = settings.start_from == "shipped" and SHIPPED_VIDEO_MODEL.is_file()
    start_model = SHIPPED_VIDEO_MODEL if shipped else SHIPPED_MODEL
    tokenizer_file = work / TOKENIZER_FILE
    common = _common_flags(settings, work)
    size = f"{frames.shape[-1]}x{frames.shape[-2]}"
    renderer_end = clock.start + (1 - PGVQGAN_SHARE) * clock.budget

    # ---- the tokenizer, on frames spread over the video ------------------------------------------------
    picks = torch.linspace(0, len(frames) - 1, min(len(frames), VIDEO_TOKENIZER_FRAMES)).round().long().tolist()
    images = [frames[i].float() / 127.5 - 1 for i in picks]
    stopped = _train_tokenizer(state, work, clock, images, [None] * len(images), start_model, common, resume, device)
    if stopped:
        return _summary(state, clock, stopped, None)

    # ---- the renderer, on clips of the tokenizer's tokens ---------------------------------------------------
    renderer_out = work / "model.safetensors"
    if not state["renderer"].get("done"):
        e_f, e_h, e_w = VIDEO_EXTENT
        flags = ["--tokenizer", str(tokenizer_file), "--videos", IN_MEMORY, "--video-size", size, "--out",
                 str(renderer_out), "--one-shot", "--frames", str(VIDEO_CLIP_FRAMES), "--max-stride",
                 str(VIDEO_MAX_STRIDE), "--extent", f"{e_f},{e_h},{e_w}", "--batch", "4", "--lr",
                 str(settings.renderer_lr), "--warmup", "100", "--sample-patches",
                 f"{VIDEO_SAMPLE_PATCHES}x{VIDEO_SAMPLE_PATCHES}", "--steps", str(10 ** 9), *common]
        if shipped:
            flags += ["--init", str(SHIPPED_VIDEO_MODEL), "--init-tokens-may-differ"]
        if resume and state["renderer"].get("started"):
            flags.append("--resume")
        deadline = renderer_end if not settings.renderer_steps else None
        state["renderer"]["started"] = True
        _write_state(work, state)
        args = _stage_args(renderer_stage, flags, device, lambda p: image_arguments(p, videos=True))
        res = renderer_stage.train_renderer(args, monitor=_StageBudget("renderer", deadline, settings.renderer_steps,
                                                                       clock), videos=[frames])
        state["renderer"].update(steps=res["step"], optimizer_steps=res["optimizer_steps"],
                                 done=res["stopped"] not in STOPPED_BY_USER)
        _write_state(work, state)
        if res["stopped"] in STOPPED_BY_USER:
            return _save_video_model(state, clock, res["stopped"], key, renderer_out, out, None)

    # ---- the Pixel-Guided VQGAN, on pairs of consecutive frames -----------------------------------------
    pg_out = work / "pgvqgan.safetensors"
    flags = ["--tokenizer", str(tokenizer_file), "--videos", IN_MEMORY, "--size", size, "--out", str(pg_out),
             "--batch", "4", "--lr", str(pgvqgan_stage.DEFAULT_LR), "--warmup", "20", "--decay", "linear",
             "--steps", str(10 ** 9), *common]
    if resume and state["pgvqgan"].get("started"):
        flags.append("--resume")
    deadline = clock.start + clock.budget - FINAL_SAVE_SECONDS if not settings.pgvqgan_steps else None
    pg_steps = settings.pgvqgan_steps and state["pgvqgan"].get("steps", 0) + settings.pgvqgan_steps
    state["pgvqgan"]["started"] = True
    _write_state(work, state)
    res = pgvqgan_stage.train_pgvqgan(_stage_args(pgvqgan_stage, flags, device, video_arguments), [frames],
                                      _StageBudget("pgvqgan", deadline, pg_steps, clock))
    state["pgvqgan"]["steps"] = res["step"]
    _write_state(work, state)
    return _save_video_model(state, clock, res["stopped"], key, renderer_out, out, pg_out)


def _save_video_model(state, clock, stopped, key, renderer_out: Path, out: Path, pg_out: Path | None) -> dict:
    summary = _summary(state, clock, stopped, str(out))
    summary["pgvqgan_steps"] = state["pgvqgan"].get("steps", 0)
    record = json.dumps({"key": key, "settings": state["settings"], "video": state["video"],
                         **{f"{k}_steps": summary[f"{k}_steps"] for k in ("tokenizer", "renderer", "pgvqgan")}},
                        sort_keys=True)
    try:
        NuwaInfinity.load(renderer_out).save(out, dtype=torch.float16, metadata={"one_shot": record})
        if pg_out is not None:
            from ..infinity.pixel_guided_vqgan import load_pgvqgan, save_pgvqgan, token_fingerprint
            pg_path = pgvqgan_path_for(out)
            pg_path.parent.mkdir(parents=True, exist_ok=True)
            pg = load_pgvqgan(pg_out)
            save_pgvqgan(pg, pg_path, token_fingerprint(pg), dtype=torch.float16, metadata={"one_shot": record})
            summary["pgvqgan"] = str(pg_path)
    except OSError as err:
        raise TrainingError(f"could not write the model to {out}: {err}. Any model file there before is unchanged, "
                            f"and what this run learned is kept in {renderer_out.parent}: make room and continue "
                            f"the run") from err
    print(f"[train] one-shot (video): {stopped} after {summary['seconds']:.0f} s ({summary['tokenizer_steps']} "
          f"tokenizer + {summary['renderer_steps']} renderer + {summary['pgvqgan_steps']} PG-VQGAN steps); wrote "
          f"{out}" + (f" and {summary['pgvqgan']}" if "pgvqgan" in summary else ""), file=sys.stderr)
    return summary


def _summary(state: dict, clock: _RunState, stopped: str, out: str | None) -> dict:
    return {"stopped": stopped, "out": out, "tokenizer_steps": state["tokenizer"].get("steps", 0),
            "renderer_steps": state["renderer"].get("steps", 0),
            "renderer_optimizer_steps": state["renderer"].get("optimizer_steps", 0),
            "seconds": time.monotonic() - clock.start, "first_renderer_preview_s": clock.first_renderer_preview}


# ---- the command line ----------------------------------------------------------------------------

def add_arguments(p) -> None:
    p.add_argument("image", help="the image to learn (a painting, a photo, a panorama), or a video (a file PyAV "
                   "reads, or a folder of frames): a video model and its PG-VQGAN")
    p.add_argument("--out", required=True, help="the model file to write (.safetensors); the run's checkpoints, "
                   "logs and state go to training/NAME/ beside it")
    p.add_argument("--minutes", type=float, default=10.0, help="time budget for the whole run")
    p.add_argument("--mask", default=None, help="an image of the same size: white (> 50%%) = leave out of training")
    p.add_argument("--leave-out", default=None, metavar="X,Y,W,H", help="a box (px) to leave out of training, e.g. "
                   "the strip a continuation is scored on")
    p.add_argument("--start-from", choices=START_FROM, default="shipped", help="shipped: fine-tune the shipped "
                   "default model's tokenizer and renderer; scratch: train new ones")
    p.add_argument("--wrap", choices=WRAPS, default="none", help="the image itself wraps around: x (a 360-degree "
                   "panorama), xy (a texture that tiles); crops may cross its joint")
    p.add_argument("--tokenizer-share", type=float, default=0.3, help="share of the budget for the tokenizer")
    p.add_argument("--tokenizer-steps", type=int, default=0, help="fixed steps instead of the budget (with "
                   "--renderer-steps: reproduces a run from the counts it reported)")
    p.add_argument("--renderer-steps", type=int, default=0, help="fixed renderer steps (samples)")
    p.add_argument("--pgvqgan-steps", type=int, default=0, help="a video: fixed PG-VQGAN steps")
    p.add_argument("--frame-range", default=None, metavar="A,B", help="a video: train on frames A..B-1 only (the "
                   "rest held out for evaluation)")
    p.add_argument("--tokenizer-lr", type=float, default=OneShotSettings.tokenizer_lr)
    p.add_argument("--renderer-lr", type=float, default=OneShotSettings.renderer_lr)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue the run saved beside --out, for --minutes more")
    p.add_argument("--device", default=None, help="cuda, cuda:1, mps or cpu (default: CUDA when there is one)")
    p.add_argument("--preview-dir", default=None, help="write a preview PNG here every --preview-every seconds")
    p.add_argument("--preview-every", type=float, default=60.0)


def _keep_out_from_args(args, height: int, width: int) -> torch.Tensor | None:
    from ..images import load_image
    from .data import parse_box
    keep_out = None
    if args.mask:
        mask = load_image(args.mask)[0].mean(-1)  # [H, W] 0..1
        if tuple(mask.shape) != (height, width):
            raise TrainingError(f"--mask {args.mask} is {mask.shape[1]}x{mask.shape[0]} px but the image is "
                                f"{width}x{height}; give a mask of the image's size")
        keep_out = mask.gt(0.5)
    box = parse_box(args.leave_out)
    if box is not None:
        x, y, w, h = box
        keep_out = torch.zeros(height, width, dtype=torch.bool) if keep_out is None else keep_out
        keep_out[y:y + h, x:x + w] = True
    return keep_out


def _read_video(args) -> torch.Tensor:
    """The video argument -> frames [T, 3, H, W] in -1..1 (--frame-range applied)."""
    from .data import list_video_sources, parse_frame_range, read_video, to_model
    source = list_video_sources(args.image)[0]
    frames, _ = read_video(source, _native_size(source))
    frame_range = parse_frame_range(args.frame_range)
    if frame_range is not None:
        frames = frames[frame_range[0]:frame_range[1]]
    return to_model(frames)


def _native_size(source: Path) -> tuple[int, int]:
    """(width, height) of a video's frames, scaled down to VIDEO_MAX_SIDE on the long side."""
    from PIL import Image

    from .data import IMAGE_SUFFIXES, decode_frames
    if source.is_dir():
        first = min(c for c in source.iterdir() if c.suffix.lower() in IMAGE_SUFFIXES)
        w, h = Image.open(first).size
    else:
        w, h = decode_frames(source, max_frames=1)[0][0].size
    scale = min(1.0, VIDEO_MAX_SIDE / max(w, h))
    return max(1, round(w * scale)), max(1, round(h * scale))


def _is_video(path: str) -> bool:
    from .data import VIDEO_SUFFIXES
    p = Path(path)
    return p.is_dir() or p.suffix.lower() in VIDEO_SUFFIXES


def run(args) -> dict:
    from ..images import image_to_model, load_image, save_image
    if _is_video(args.image):
        if args.mask or args.leave_out:
            raise TrainingError("--mask / --leave-out leave part of an image out; for a video, hold frames out with "
                                "--frame-range instead")
        image, keep_out = _read_video(args), None
    else:
        try:
            image = image_to_model(load_image(args.image))[0]
        except (OSError, ValueError) as err:
            raise TrainingError(f"cannot read the image {args.image}: {err}") from err
        keep_out = _keep_out_from_args(args, image.shape[-2], image.shape[-1])
    settings = OneShotSettings(minutes=args.minutes, start_from=args.start_from, tokenizer_share=args.tokenizer_share,
                               wrap=args.wrap, seed=args.seed, tokenizer_steps=args.tokenizer_steps,
                               renderer_steps=args.renderer_steps, pgvqgan_steps=args.pgvqgan_steps,
                               tokenizer_lr=args.tokenizer_lr, renderer_lr=args.renderer_lr)
    last_line = [0.0]

    def on_progress(p: OneShotProgress) -> None:
        if p.preview is not None and args.preview_dir:
            save_image(p.preview, Path(args.preview_dir) / f"{p.stage}_{p.step:06d}.png")
        if p.elapsed - last_line[0] >= 10.0:
            last_line[0] = p.elapsed
            print(f"[train] one-shot {p.stage}: step {p.step}/{p.steps}, loss {p.loss:.3f}, {p.elapsed:.0f} s, "
                  f"{100 * p.fraction:.0f}%", file=sys.stderr, flush=True)

    return train_one_shot(image, args.out, settings, keep_out, resume=args.resume, device=args.device,
                          on_progress=on_progress, preview_every=args.preview_every if args.preview_dir else 0.0)
