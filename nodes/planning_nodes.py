"""Context Pool options and Direction Planner (what to generate, in which order)."""
from __future__ import annotations

import colorsys
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


def draw_plan(plan, grid, known=None, cell: int | None = None) -> torch.Tensor:
    """IMAGE [F, H, W, 3] of the canvas grid: known patches grey, each new patch coloured by its
    segment (one basic order) and numbered in generation order (1 = first)."""
    f, rows, cols = grid
    cell = cell or max(16, min(64, 1024 // max(rows, cols, 1)))
    known_cells = torch.zeros(grid, dtype=torch.bool) if known is None else known
    step_of, seg_of = {}, {}
    for s_i, seg in enumerate(plan.segments):
        for coord in seg.patches:
            step_of[tuple(coord)] = len(step_of) + 1
            seg_of[tuple(coord)] = s_i
    colours = _palette(len(plan.segments))
    try:
        font = ImageFont.load_default(size=max(8, cell // 3))
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    frames = []
    for k in range(f):
        img = Image.new("RGB", (cols * cell, rows * cell), (40, 40, 40))
        d = ImageDraw.Draw(img)
        for i in range(rows):
            for j in range(cols):
                box = (j * cell, i * cell, (j + 1) * cell - 1, (i + 1) * cell - 1)
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
                   "by whole patches left/right/up/down, grow it to a target size around an anchor, or, with a "
                   "mask, regenerate the masked patches. Outputs the plan and a picture of it: numbered cells "
                   "show the generation order, one colour per basic order, grey = kept patches.")
    CATEGORY = CATEGORY
    FUNCTION = "plan"
    RETURN_TYPES = ("NUWA_PLAN", "IMAGE")
    RETURN_NAMES = ("plan", "order_preview")
    OUTPUT_TOOLTIPS = ("The plan for the Patch Renderer (canvas size after growth and the ordered patches).",
                       "The plan drawn as numbered cells, one image per frame.")

    @classmethod
    def INPUT_TYPES(cls):
        patches = {"default": 0, "min": 0, "max": 256, "step": 1}
        return {
            "required": {
                "model": ("NUWA_MODEL", {"tooltip": "From NUWA Model Loader; gives the patch size in pixels."}),
                "canvas": ("NUWA_CANVAS", {"tooltip": "The canvas to extend or fill (VQGAN Encode, Canvas Load, "
                                                      "or a blank canvas from the Patch Renderer's output)."}),
                "left": ("INT", dict(patches, tooltip="Patches to add on the left.")),
                "right": ("INT", dict(patches, default=1, tooltip="Patches to add on the right.")),
                "up": ("INT", dict(patches, tooltip="Patches to add on top.")),
                "down": ("INT", dict(patches, tooltip="Patches to add at the bottom.")),
                "target_width": ("INT", {"default": 0, "min": 0, "max": 65536, "step": 8, "tooltip":
                    "If > 0: grow the canvas to at least this many pixels wide (replaces left/right)."}),
                "target_height": ("INT", {"default": 0, "min": 0, "max": 65536, "step": 8, "tooltip":
                    "If > 0: grow the canvas to at least this many pixels high (replaces up/down)."}),
                "anchor": (list(_engine.ANCHORS), {"default": "center", "tooltip":
                    "Where the existing canvas stays when growing to a target size."}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "If given: regenerate every patch the mask touches (1 = generate), "
                                             "on the canvas as it is (no growth); extension widgets are ignored."}),
            },
        }

    def plan(self, model, canvas, left, right, up, down, target_width, target_height, anchor, mask=None):
        f, rows, cols = canvas.grid
        regenerate = None
        if mask is not None:
            regenerate = _engine.mask_to_patch_grid(mask, (f, rows, cols))
            if not regenerate.any():
                raise ValueError("mask: no patch is masked (MASK 1 = area to generate); nothing to plan")
            plan = model.plan_fill(canvas.forget(regenerate))
            known = _known(canvas) & ~regenerate
        else:
            if target_width > 0 or target_height > 0:
                ph, pw = model.patch_pixels
                share_up, share_left = _engine.anchor_shares(anchor)
                if target_width > 0:
                    left, right = _engine.extension_for_target(cols, target_width, pw, share_left)
                if target_height > 0:
                    up, down = _engine.extension_for_target(rows, target_height, ph, share_up)
            grown = f * (rows + up + down) * (cols + left + right)
            if grown > MAX_PATCHES:
                raise ValueError(f"the planned canvas has {grown} patches, more than {MAX_PATCHES}; "
                                 f"plan in several runs (Canvas Save / Load) or extend by fewer patches")
            if left + right + up + down == 0:
                if bool(_known(canvas).all()):
                    raise ValueError("nothing to plan: the canvas is fully generated and no extension, target "
                                     "size or mask was given")
                plan = model.plan_fill(canvas)
            else:
                plan = model.plan_extension(canvas, left=left, right=right, up=up, down=down)
            offset = tuple(plan.offset)
            known = torch.zeros(tuple(plan.grid), dtype=torch.bool)
            known[:f, offset[0]:offset[0] + rows, offset[1]:offset[1] + cols] = _known(canvas)
        preview = draw_plan(plan, tuple(plan.grid), known)
        return (PlanSpec(plan, regenerate), preview.to(_comfy.intermediate_device()))


def _known(canvas) -> torch.Tensor:
    return canvas.known.detach().cpu().bool()


@dataclass
class PlanSpec:
    """NUWA_PLAN: the core Plan plus, for mask plans, the patches to forget before generating."""
    plan: object
    regenerate: torch.Tensor | None = None

    def prepare(self, canvas):
        if self.regenerate is None:
            return canvas.clone()
        if tuple(self.regenerate.shape) != tuple(canvas.grid):
            raise ValueError(f"the plan was made for a canvas of {tuple(self.regenerate.shape)} patches, "
                             f"this canvas has {tuple(canvas.grid)}: connect the same canvas to both nodes")
        return canvas.forget(self.regenerate)

    def __len__(self):
        return len(self.plan)


def as_plan_spec(plan) -> PlanSpec:
    return plan if isinstance(plan, PlanSpec) else PlanSpec(plan)


NODE_CLASS_MAPPINGS = {"NUWAContextPool": NUWAContextPool, "NUWADirectionPlanner": NUWADirectionPlanner}
NODE_DISPLAY_NAME_MAPPINGS = {"NUWAContextPool": "NUWA Context Pool", "NUWADirectionPlanner": "NUWA Direction Planner"}
