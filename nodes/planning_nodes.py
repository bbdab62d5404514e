"""Context Pool options and Direction Planner (what to generate, in which order)."""
from __future__ import annotations

import colorsys
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from . import _comfy, _engine

CATEGORY = "NUWA/Infinity"
MAX_PATCHES = 4096


class NUWAContextPool:
    DESCRIPTION = ("Nearby Context Pool options: how far (in patches) each new patch looks at already "
                   "generated ones. Smaller extents use less memory and time (0, 0, 0 renders every patch alone); "
                   "-1 keeps the model's trained extent. A larger extent than the model was trained with is refused.")
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = ("NUWA_CONTEXT",)
    RETURN_NAMES = ("context",)
    OUTPUT_TOOLTIPS = ("Context options for the Patch Renderer's optional context input.",)

    @classmethod
    def INPUT_TYPES(cls):
        tip = "Patches of context {} of a new patch; -1 = the model's trained value."
        return {"required": {
            "e_w": ("INT", {"default": -1, "min": -1, "max": 64, "tooltip": tip.format("left/right")}),
            "e_h": ("INT", {"default": -1, "min": -1, "max": 64, "tooltip": tip.format("above/below")}),
            "e_f": ("INT", {"default": -1, "min": -1, "max": 64, "tooltip": tip.format("in earlier frames")}),
        }}

    def build(self, e_w, e_h, e_f):
        return ({"extent": (int(e_f), int(e_h), int(e_w))},)


def _palette(n: int) -> list[tuple[int, int, int]]:
    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb((i * 0.61803) % 1.0, 0.45, 0.95)) for i in range(max(n, 1))]


def plan_cells(plans, grid) -> list[tuple[tuple[int, int, int], int]]:
    """((frame, row, column) on `grid`, segment number) of every planned patch, in generation order.
    Plans made before the last one (a mask's fill before an extension) sit on the canvas before
    it grew: they are moved by the last plan's offset."""
    top, left = tuple(plans[-1].offset) if len(plans) > 1 else (0, 0)
    cells, segment = [], 0
    for n, plan in enumerate(plans):
        dy, dx = (top, left) if n < len(plans) - 1 else (0, 0)
        for seg in plan.segments:
            cells += [((int(k), int(i) + dy, int(j) + dx), segment) for k, i, j in seg.patches]
            segment += 1
    return cells


def draw_plan(plans, grid, known=None, cell: int | None = None, caption: str | None = None) -> torch.Tensor:
    """IMAGE [F, H, W, 3] of the canvas grid: known patches grey, each new patch coloured by its
    segment (one basic order) and numbered in generation order (1 = first); `caption` in a band on top."""
    plans = plans if isinstance(plans, (list, tuple)) else [plans]
    f, rows, cols = grid
    cell = cell or max(16, min(64, 1024 // max(rows, cols, 1)))
    known_cells = torch.zeros(grid, dtype=torch.bool) if known is None else known
    ordered = plan_cells(plans, grid)
    step_of = {c: n + 1 for n, (c, _) in enumerate(ordered)}
    seg_of = dict(ordered)
    colours = _palette(max((s for _, s in ordered), default=0) + 1)
    try:
        font = ImageFont.load_default(size=max(8, cell // 3))
        caption_font = ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1
        font = caption_font = ImageFont.load_default()
    band = 22 if caption else 0
    frames = []
    for k in range(f):
        img = Image.new("RGB", (max(cols * cell, 8 * len(caption or "")), rows * cell + band), (40, 40, 40))
        d = ImageDraw.Draw(img)
        if caption:
            d.text((4, 3), caption, fill=(230, 230, 230), font=caption_font)
        for i in range(rows):
            for j in range(cols):
                box = (j * cell, band + i * cell, (j + 1) * cell - 1, band + (i + 1) * cell - 1)
                c = (k, i, j)
                if c in step_of:
                    d.rectangle(box, fill=colours[seg_of[c]], outline=(20, 20, 20))
                    text = str(step_of[c])
                    tw, th = d.textbbox((0, 0), text, font=font)[2:]
                    d.text((box[0] + (cell - tw) / 2, box[1] + (cell - th) / 2), text, fill=(0, 0, 0), font=font)
                else:
                    shade = (128, 128, 128) if bool(known_cells[k, i, j]) else (60, 60, 60)
                    d.rectangle(box, fill=shade, outline=(20, 20, 20))
        frames.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0))
    return torch.stack(frames)


class NUWADirectionPlanner:
    DESCRIPTION = ("Plans what to generate and in which order (Arbitrary Direction Controller): extend the canvas "
                   "left/right/up/down (in patches, or in pixels rounded up to whole patches), grow it to a target "
                   "size around an anchor, regenerate what a mask paints, or both: a mask from the mask editor or "
                   "ImagePadForOutpaint (the image's size, as encoded) is mapped onto the canvas, and outside it the "
                   "output keeps the image's own pixels, faded in over `feather` px. `wrap` makes the canvas "
                   "tileable (a 360-degree panorama, a seamless texture). Outputs the plan and a picture of it: "
                   "numbered cells show the generation order, one colour per basic order, grey = kept patches; its "
                   "caption gives the patch size in pixels.")
    CATEGORY = CATEGORY
    FUNCTION = "plan"
    RETURN_TYPES = ("NUWA_PLAN", "IMAGE")
    RETURN_NAMES = ("plan", "order_preview")
    OUTPUT_TOOLTIPS = ("The plan for the Patch Renderer (canvas size after growth and the ordered patches).",
                       "The plan drawn as numbered cells, one image per frame.")

    @classmethod
    def INPUT_TYPES(cls):
        pads = {"default": 0, "min": 0, "max": 65536, "step": 1}
        side = "{} of the canvas: patches, or pixels when units = pixels (rounded up to whole patches)."
        return {
            "required": {
                "model": ("NUWA_MODEL", {"tooltip": "From NUWA Model Loader; gives the patch size in pixels."}),
                "canvas": ("NUWA_CANVAS", {"tooltip": "The canvas to extend or fill (VQGAN Encode, Canvas Load, "
                                                      "or a blank canvas from the Patch Renderer's output)."}),
                "left": ("INT", dict(pads, tooltip="Added on the left " + side.format("left"))),
                "right": ("INT", dict(pads, default=1, tooltip="Added on the right " + side.format("right"))),
                "up": ("INT", dict(pads, tooltip="Added on top " + side.format("top"))),
                "down": ("INT", dict(pads, tooltip="Added at the bottom " + side.format("bottom"))),
                "target_width": ("INT", {"default": 0, "min": 0, "max": 65536, "step": 8, "tooltip":
                    "If > 0: grow the canvas to at least this many pixels wide (replaces left/right)."}),
                "target_height": ("INT", {"default": 0, "min": 0, "max": 65536, "step": 8, "tooltip":
                    "If > 0: grow the canvas to at least this many pixels high (replaces up/down)."}),
                "anchor": (list(_engine.ANCHORS), {"default": "center", "tooltip":
                    "Where the existing canvas stays when growing to a target size."}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "Regenerate what it paints (1 = generate; soft values blend): every patch "
                                             "it touches is regenerated, and outside the mask the image's own pixels "
                                             "are kept. The size of the encoded image (before fit) or of the canvas. "
                                             "An empty mask is ignored. Combines with extension."}),
                "units": (list(UNITS), {"default": "patches", "tooltip":
                    "What left/right/up/down count: whole patches, or pixels rounded up to whole patches "
                    "(the patch size in pixels is written on the order preview)."}),
                "feather": ("INT", {"default": -1, "min": -1, "max": 1024, "tooltip":
                    "Pixels over which the image's own pixels fade into generated ones at their edge; beyond it the "
                    "output equals the input exactly. 0 = hard edge, -1 = two tokens."}),
                "wrap": (list(PLANNER_WRAPS), {"default": "keep", "tooltip":
                    "Make the canvas tileable: horizontal = its right edge meets its left (a 360-degree panorama: the "
                    "last column is generated and decoded with the first beside it), both = every edge meets the "
                    "opposite one (a seamless texture), none = not tileable. keep = as the incoming canvas is (a "
                    "blank canvas is not tileable; a loaded tileable one stays so). A wrapped side cannot be "
                    "extended; the saved image tiles with no seam."}),
                "frames_to_add": ("INT", {"default": 0, "min": 0, "max": MAX_FRAMES, "tooltip":
                    "Video: append this many frames after the canvas' last frame and plan them, frames forward "
                    "(image animation from an encoded image; a longer video from a generated one). Needs a video "
                    "model (trained with a frame extent e_f > 0); not combined with left/right/up/down or a mask."}),
            },
        }

    def plan(self, model, canvas, left, right, up, down, target_width, target_height, anchor, mask=None,
             units="patches", feather=-1, wrap="keep", frames_to_add=0):
        f, rows, cols = canvas.grid
        if wrap not in PLANNER_WRAPS:
            raise ValueError(f"wrap must be one of {tuple(PLANNER_WRAPS)}, got {wrap!r}")
        wrap = PLANNER_WRAPS[wrap] or canvas.wrap  # CanvasState.wrap from here on
        if frames_to_add:
            return self._plan_frames(model, canvas, int(frames_to_add), mask, left + right + up + down,
                                     target_width + target_height, wrap)
        ph, pw = model.patch_pixels
        if units not in UNITS:
            raise ValueError(f"units must be one of {UNITS}, got {units!r}")
        canvas = dataclasses.replace(canvas, wrap=wrap)  # plans (and refuses growth) as the renderer will
        if units == "pixels":
            left, right = _engine.patches_for_pixels(left, pw), _engine.patches_for_pixels(right, pw)
            up, down = _engine.patches_for_pixels(up, ph), _engine.patches_for_pixels(down, ph)
        if target_width > 0 or target_height > 0:
            share_up, share_left = _engine.anchor_shares(anchor)
            if target_width > 0:
                left, right = _engine.extension_for_target(cols, target_width, pw, share_left)
            if target_height > 0:
                up, down = _engine.extension_for_target(rows, target_height, ph, share_up)
        grown = f * (rows + up + down) * (cols + left + right)
        if grown > MAX_PATCHES:
            raise ValueError(f"the planned canvas has {grown} patches, more than {MAX_PATCHES}; "
                             f"plan in several runs (Canvas Save / Load) or extend by fewer patches")
        pixel_mask = _engine.mask_on_canvas(mask, canvas)
        regenerate = None if pixel_mask is None else _engine.mask_to_patch_grid(pixel_mask, (f, rows, cols))
        extend = left + right + up + down > 0
        plans = []
        if regenerate is not None:
            plans.append(model.plan_fill(canvas.forget(regenerate, pixel_mask[0])))
        elif not extend:
            if bool(_known(canvas).all()):
                raise ValueError("nothing to plan: the canvas is fully generated and no extension, target "
                                 "size or painted mask was given")
            plans.append(model.plan_fill(canvas))
        if extend:
            plans.append(model.plan_extension(canvas, left=left, right=right, up=up, down=down))
        grid, offset = tuple(plans[-1].grid), tuple(plans[-1].offset) if extend else (0, 0)
        kept = _known(canvas) if regenerate is None else _known(canvas) & ~regenerate
        known = torch.zeros(grid, dtype=torch.bool)
        known[:f, offset[0]:offset[0] + rows, offset[1]:offset[1] + cols] = kept
        spec = PlanSpec(plans, regenerate, None if pixel_mask is None else pixel_mask[0],
                        None if feather < 0 else int(feather), wrap)
        caption = (f"{grid[2]} x {grid[1]} patches of {pw} x {ph} px = {grid[2] * pw} x {grid[1] * ph} px, "
                   f"{len(spec)} to generate" + ("" if wrap == "none" else f", wrap: {WRAP_NAMES[wrap]}"))
        preview = draw_plan(plans, grid, known, caption=caption)
        ui = {"nuwa_plan": [{"grid": list(grid), "old_grid": [f, rows, cols], "offset": list(offset),
                             "patch_px": [ph, pw], "order": [list(c) for c, _ in plan_cells(plans, grid)],
                             "segments": [len(s.patches) for p in plans for s in p.segments],
                             "known": known[0].int().tolist()}]}
        return {"ui": ui, "result": (spec, preview.to(_comfy.intermediate_device()))}


    @staticmethod
    def _plan_frames(model, canvas, frames: int, mask, extension: int, targets: int, wrap: str):
        if extension or targets or (mask is not None and bool(mask.gt(0).any())):
            raise ValueError("frames_to_add plans new frames only: set left/right/up/down and the target sizes to 0 "
                             "and leave the mask empty, then extend the frames' canvas in a second planner")
        e_f = model.renderer.config.extent[0]
        if e_f == 0:
            raise ValueError("this model was trained on images (frame extent e_f = 0): new frames would not see the "
                             "frames before them. Load a video model (e.g. nuwa_infinity_plaza.safetensors)")
        if not bool(_known(canvas).all()):
            raise ValueError("frames_to_add continues a fully generated canvas; render its unknown patches first")
        f, rows, cols = canvas.grid
        if (f + frames) * rows * cols > MAX_FRAMES * MAX_PATCHES_PER_FRAME:
            raise ValueError(f"{f + frames} frames of {rows} x {cols} patches is more than this planner draws "
                             f"({MAX_FRAMES * MAX_PATCHES_PER_FRAME} patches); add frames in several runs (Canvas "
                             f"Save / Load keep the video's context)")
        canvas = dataclasses.replace(canvas, wrap=wrap)
        plan = model.plan_frames(canvas, frames)
        grid = tuple(plan.grid)
        known = torch.zeros(grid, dtype=torch.bool)
        known[:f] = True
        spec = PlanSpec([plan], None, None, None, wrap)
        ph, pw = model.patch_pixels
        shown = min(grid[0], f + PREVIEW_NEW_FRAMES)
        caption = (f"{frames} new frames of {cols} x {rows} patches of {pw} x {ph} px; frames {f}..{shown - 1} shown")
        preview = draw_plan([plan], (shown,) + grid[1:], known[:shown], caption=caption)
        ui = {"nuwa_plan": [{"grid": list(grid), "old_grid": [f, rows, cols], "offset": [0, 0],
                             "patch_px": [ph, pw], "order": [list(c) for c, _ in plan_cells([plan], grid)
                                                             if c[0] < f + 1],
                             "segments": [len(s.patches) for s in plan.segments], "known": known[0].int().tolist()}]}
        return {"ui": ui, "result": (spec, preview[f:].to(_comfy.intermediate_device()))}


UNITS = ("patches", "pixels")
MAX_FRAMES = 4096             # frames a plan may add
MAX_PATCHES_PER_FRAME = 64    # with as many frames: the video plan's bound
PREVIEW_NEW_FRAMES = 3        # a video plan's picture shows its first new frames
WRAPS = {"none": "none", "horizontal": "x", "both": "xy"}  # the planner's choice -> CanvasState.wrap
PLANNER_WRAPS = {"keep": None, **WRAPS}  # keep: the incoming canvas' own setting
WRAP_NAMES = {v: k for k, v in WRAPS.items()}


def _known(canvas) -> torch.Tensor:
    return canvas.known.detach().cpu().bool()


@dataclass
class PlanSpec:
    """NUWA_PLAN: the core Plans run one after the other (a mask's fill, then an extension) and,
    for mask plans, what to forget before generating and which pixels the mask regenerates."""
    plans: list
    regenerate: torch.Tensor | None = None   # bool [F, rows, cols] of the canvas before growth
    pixel_mask: torch.Tensor | None = None   # [Hpx, Wpx] frame 0 of that canvas, 1 = regenerate
    feather: int | None = None               # px; None keeps the canvas' setting
    wrap: str | None = None                  # CanvasState.wrap; None keeps the canvas' setting

    def prepare(self, canvas):
        """A copy of the canvas ready for the first plan (the input canvas is never modified)."""
        if self.wrap is not None:  # first: what a forgotten patch makes stale reaches across the joint
            canvas = dataclasses.replace(canvas, wrap=self.wrap)
        if self.regenerate is None:
            state = canvas.clone()
        elif tuple(self.regenerate.shape) != tuple(canvas.grid):
            raise ValueError(f"the plan was made for a canvas of {tuple(self.regenerate.shape)} patches, "
                             f"this canvas has {tuple(canvas.grid)}: connect the same canvas to both nodes")
        else:
            state = canvas.forget(self.regenerate, self.pixel_mask)
        if self.feather is not None:
            state.feather = self.feather
        return state

    def __len__(self):
        return sum(len(p) for p in self.plans)


def as_plan_spec(plan) -> PlanSpec:
    return plan if isinstance(plan, PlanSpec) else PlanSpec([plan])


NODE_CLASS_MAPPINGS = {"NUWAContextPool": NUWAContextPool, "NUWADirectionPlanner": NUWADirectionPlanner}
NODE_DISPLAY_NAME_MAPPINGS = {"NUWAContextPool": "NUWA Context Pool", "NUWADirectionPlanner": "NUWA Direction Planner"}
