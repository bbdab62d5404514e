"""NUWA-Infinity inference: the paper's Algorithm 2, a canvas state, and the model bundle.

    q_1:K = ADC.Split(h)                        given patches, pre-cached first
    for each q_k: c = NCP.Select(q_k); a_k = NUWA(q_k, c, e, y); NCP.Add(a_k); NCP.Remove()
    p_1:N = ADC.Split(x)                        patches to generate, in the planned order
    for each p_n: c = NCP.Select(p_n); p_n, a_n = NUWA(0, c, e, y); NCP.Add(a_n); NCP.Remove()
    return VQGAN.decode(x)

A CanvasState is the token grid, which patches are known, the pool and the given pixels: it is
what a generation returns and what can be saved and continued later.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from . import arbitrary_direction_controller as adc
from .arbitrary_direction_controller import Coord, Grid, Order, Plan
from .checkpoint import (CheckpointError, atomic_write, config_from_json, config_to_json, load_state_dict,
                         load_strict, save_model_file)
from .images import check_finite, image_to_model, model_to_image
from .nearby_context_pool import NearbyContextPool, last_needed_steps
from .patch_samplers import SAMPLERS, SamplerSettings
from .renderer import Context, Renderer, RendererConfig
from .vqgan import VQGANConfig, VQModel

BUNDLE_KIND = "nuwa_infinity"
CANVAS_KIND = "nuwa_canvas"
UNKNOWN = -1  # token id of a patch not generated yet


class GenerationCancelled(Exception):
    """Raised by callers' callbacks to abort; `generate` itself stops cleanly when a callback returns False."""


@dataclass
class CanvasState:
    tokens: torch.Tensor            # [B, F, h, w] token ids, UNKNOWN where not generated
    known: torch.Tensor             # [F, H, W] bool, per patch
    patch_size: tuple               # (pf, ph, pw) tokens per patch
    pool: NearbyContextPool | None = None
    given: torch.Tensor | None = None   # IMAGE [B, Hpx, Wpx, 3] kept as is on frame 0
    given_origin: tuple = (0, 0)        # (row px, column px) of `given` on the canvas
    pixels_per_token: int = 16          # the VQGAN's downsampling factor

    @property
    def grid(self) -> Grid:
        return tuple(self.known.shape)

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    def patch_slices(self, coord: Coord):
        (pf, ph, pw), (k, i, j) = self.patch_size, coord
        return (slice(None), slice(k * pf, (k + 1) * pf), slice(i * ph, (i + 1) * ph), slice(j * pw, (j + 1) * pw))

    def patch_tokens(self, coord: Coord) -> torch.Tensor:
        """[B, M] raster tokens of one patch."""
        return self.tokens[self.patch_slices(coord)].flatten(1)

    def set_patch(self, coord: Coord, tokens: torch.Tensor) -> None:
        view = self.tokens[self.patch_slices(coord)]
        view.copy_(tokens.view(view.shape).to(view.device))
        self.known[coord] = True

    def clone(self) -> "CanvasState":
        pool = None
        if self.pool is not None:
            pool = NearbyContextPool(self.pool.extent)
            pool.caches = dict(self.pool.caches)
        return dataclasses.replace(self, tokens=self.tokens.clone(), known=self.known.clone(), pool=pool)

    def grown(self, plan: Plan) -> "CanvasState":
        """A copy on the plan's grid: the old canvas moved by plan.offset, new frames appended."""
        state = self.clone()
        (f0, h0, w0), (f1, h1, w1), (top, left) = self.grid, plan.grid, plan.offset
        if f1 < f0 or h1 < h0 + top or w1 < w0 + left:
            raise ValueError(f"plan grid {plan.grid} with offset {plan.offset} does not contain the canvas {self.grid}")
        if (f1, h1, w1) == (f0, h0, w0):
            return state
        pf, ph, pw = self.patch_size
        tokens = self.tokens.new_full((self.batch, f1 * pf, h1 * ph, w1 * pw), UNKNOWN)
        tokens[:, :f0 * pf, top * ph:(top + h0) * ph, left * pw:(left + w0) * pw] = self.tokens
        known = torch.zeros(plan.grid, dtype=torch.bool)
        known[:f0, top:top + h0, left:left + w0] = self.known
        state.tokens, state.known = tokens, known
        if state.pool is not None:
            state.pool.shift(top, left)
        px = self.pixels_per_token
        state.given_origin = (self.given_origin[0] + top * ph * px, self.given_origin[1] + left * pw * px)
        return state

    def forget(self, cells) -> "CanvasState":
        """A copy with the patches where `cells` (bool [F, rows, cols], the patch grid) is True
        made unknown again, so a plan_fill + generate regenerates exactly those (mask inpainting).

        Dropped, because it describes the old content: the tokens of those patches; the pool's
        caches of those patches and of every cached patch within the pool's extent of one (their
        hidden states attended to the old tokens; generate() re-caches them from their tokens);
        the given pixels over those patches (decode pastes them back, they would cover the new
        ones). The canvas holds one rectangle of given pixels: when the kept part is still a
        rectangle it is cropped to it, when the forgotten patches cut a hole in it all of it is
        dropped (the tokens decode there instead). Everything else is kept as is.
        """
        cells = torch.as_tensor(cells).to(device="cpu")
        if tuple(cells.shape) != tuple(self.grid):
            raise ValueError(f"forget: the mask must be the canvas' patch grid (frames, rows, cols) = "
                             f"{tuple(self.grid)}, got shape {tuple(cells.shape)}")
        cells = cells.bool()
        state = self.clone()
        coords = [tuple(c) for c in torch.nonzero(cells).tolist()]
        if not coords:
            return state
        for coord in coords:
            state.tokens[state.patch_slices(coord)] = UNKNOWN
        state.known = state.known & ~cells
        if state.pool is not None:
            stale = [c for c in state.pool.caches if any(adc.within_extent(c, f, state.pool.extent) for f in coords)]
            for c in stale:
                del state.pool.caches[c]
        if state.given is not None and cells[0].any():
            state.given, state.given_origin = self._given_without(cells[0])
        return state

    def _given_without(self, cells: torch.Tensor):
        """(given, origin) with the pixels of the frame-0 patches `cells` [rows, cols] removed."""
        (_, ph, pw), px = self.patch_size, self.pixels_per_token
        top, left = self.given_origin
        gh, gw = self.given.shape[1:3]
        kept = torch.ones(gh, gw, dtype=torch.bool)
        for i, j in torch.nonzero(cells).tolist():
            r0, c0 = i * ph * px - top, j * pw * px - left
            kept[max(0, r0):max(0, r0 + ph * px), max(0, c0):max(0, c0 + pw * px)] = False
        if kept.all():
            return self.given, self.given_origin
        rows, cols = torch.nonzero(kept.any(1)).flatten(), torch.nonzero(kept.any(0)).flatten()
        if len(rows) == 0:
            return None, (0, 0)
        r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        if not kept[r0:r1, c0:c1].all():
            return None, (0, 0)  # a hole: one rectangle cannot hold what is left
        return self.given[:, r0:r1, c0:c1].clone(), (top + r0, left + c0)

    # ---- persistence -------------------------------------------------------------------------
    def save(self, path) -> None:
        """One .safetensors file: tokens, known patches, given pixels and the pool's caches."""
        tensors = {"tokens": self.tokens.cpu().contiguous(), "known": self.known.to(torch.uint8).contiguous()}
        if self.given is not None:
            tensors["given"] = self.given.cpu().contiguous()
        extent = None
        if self.pool is not None:
            extent = list(self.pool.extent)
            for (k, i, j), cache in self.pool.caches.items():
                tensors[f"pool.{k}.{i}.{j}"] = cache.cpu().contiguous()
        meta = {"nuwa_kind": CANVAS_KIND, "patch_size": json.dumps(list(self.patch_size)),
                "given_origin": json.dumps(list(self.given_origin)), "pool_extent": json.dumps(extent),
                "pixels_per_token": str(self.pixels_per_token)}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path) -> "CanvasState":
        tensors, meta = load_state_dict(path)
        if meta.get("nuwa_kind") != CANVAS_KIND:
            raise CheckpointError(f"{path} is not a NUWA canvas (kind {meta.get('nuwa_kind')!r}, expected {CANVAS_KIND!r})")
        extent = json.loads(meta["pool_extent"])
        pool = None
        if extent is not None:
            pool = NearbyContextPool(tuple(extent))
            for name, value in tensors.items():
                if name.startswith("pool."):
                    pool.add(tuple(int(x) for x in name.split(".")[1:]), value)
        return cls(tokens=tensors["tokens"], known=tensors["known"].bool(),
                   patch_size=tuple(json.loads(meta["patch_size"])), pool=pool, given=tensors.get("given"),
                   given_origin=tuple(json.loads(meta["given_origin"])), pixels_per_token=int(meta["pixels_per_token"]))


Callback = Callable[[int, int, CanvasState], "bool | None"]


class NuwaInfinity(nn.Module):
    """A VQGAN tokenizer and a renderer, with Algorithm 2 on top."""

    def __init__(self, vqgan: VQModel, renderer: Renderer):
        super().__init__()
        if renderer.config.vocab_size != vqgan.config.n_embed:
            raise ValueError(f"renderer vocabulary {renderer.config.vocab_size} != VQGAN codebook {vqgan.config.n_embed}")
        self.vqgan, self.renderer = vqgan, renderer

    # ---- files ---------------------------------------------------------------------------------
    def save(self, path, dtype: torch.dtype | None = None) -> None:
        state = {f"vqgan.{k}": v for k, v in self.vqgan.state_dict().items()}
        state.update({f"renderer.{k}": v for k, v in self.renderer.state_dict().items()})
        save_model_file(path, state, BUNDLE_KIND, extra_metadata={
            "vqgan_config": config_to_json(self.vqgan.config),
            "renderer_config": config_to_json(self.renderer.config)}, dtype=dtype)

    @classmethod
    def load(cls, path, device="cpu", dtype: torch.dtype = torch.float32) -> "NuwaInfinity":
        tensors, meta = load_state_dict(path)
        if meta.get("nuwa_kind") != BUNDLE_KIND:
            raise CheckpointError(f"{path} is a {meta.get('nuwa_kind') or 'foreign'} file, not a NUWA-Infinity "
                                  f"model (expected nuwa_kind={BUNDLE_KIND!r} in its metadata)")
        vqgan = VQModel(config_from_json(VQGANConfig, meta["vqgan_config"]))
        renderer = Renderer(config_from_json(RendererConfig, meta["renderer_config"]))
        load_strict(vqgan, {k[6:]: v for k, v in tensors.items() if k.startswith("vqgan.")}, f"{path} (vqgan)")
        load_strict(renderer, {k[9:]: v for k, v in tensors.items() if k.startswith("renderer.")}, f"{path} (renderer)")
        return cls(vqgan, renderer).to(device=device, dtype=dtype).eval()

    # ---- geometry --------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.renderer.pos_f.device

    @property
    def patch_size(self) -> tuple:
        return self.renderer.config.patch_size

    @property
    def patch_pixels(self) -> tuple[int, int]:
        f = self.vqgan.downsample_factor
        return self.patch_size[1] * f, self.patch_size[2] * f

    def patch_counts(self, height_px: int, width_px: int, mode: str = "refuse") -> tuple[int, int]:
        """Pixels -> (rows, columns) of patches. mode 'refuse' needs whole patches; 'pad' rounds up."""
        counts = []
        for name, size, patch in (("height", height_px, self.patch_pixels[0]), ("width", width_px, self.patch_pixels[1])):
            if size <= 0:
                raise ValueError(f"canvas {name} must be > 0 pixels, got {size}")
            if size % patch and mode == "refuse":
                lo, hi = max(patch, size // patch * patch), (size // patch + 1) * patch
                raise ValueError(f"canvas {name} {size} px is not a whole number of {patch} px patches: "
                                 f"use {lo} or {hi}, or mode='pad' to round up")
            if mode not in ("refuse", "pad"):
                raise ValueError(f"mode must be 'refuse' or 'pad', got {mode!r}")
            counts.append(math.ceil(size / patch))
        return counts[0], counts[1]

    def blank_canvas(self, rows: int, cols: int, frames: int = 1, batch: int = 1) -> CanvasState:
        for name, n in (("rows", rows), ("cols", cols), ("frames", frames), ("batch", batch)):
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {n!r}")
        pf, ph, pw = self.patch_size
        return CanvasState(tokens=torch.full((batch, frames * pf, rows * ph, cols * pw), UNKNOWN, dtype=torch.long),
                           known=torch.zeros(frames, rows, cols, dtype=torch.bool), patch_size=self.patch_size,
                           pixels_per_token=self.vqgan.downsample_factor)

    @torch.no_grad()
    def canvas_from_image(self, image: torch.Tensor, fit: str = "refuse", frames: int = 1) -> CanvasState:
        """IMAGE [B, H, W, C] -> a canvas whose patches are all known (frame 0 of `frames`).

        fit: 'refuse' (sizes must be whole patches), 'crop' (centre crop to whole patches) or
        'resize' (resample to the nearest whole number of patches).
        """
        x = image_to_model(image)  # [B, 3, H, W]
        (php, pwp), (_, _, h, w) = self.patch_pixels, x.shape
        if h % php or w % pwp:
            rows, cols = max(1, round(h / php)), max(1, round(w / pwp))
            if fit == "crop":
                rows, cols = h // php, w // pwp
                if rows < 1 or cols < 1:
                    raise ValueError(f"image {w}x{h} px is smaller than one {pwp}x{php} px patch; use fit='resize'")
                top, left = (h - rows * php) // 2, (w - cols * pwp) // 2
                x = x[:, :, top:top + rows * php, left:left + cols * pwp]
            elif fit == "resize":
                x = F.interpolate(x, size=(rows * php, cols * pwp), mode="bicubic", align_corners=False).clamp(-1, 1)
            elif fit == "refuse":
                raise ValueError(f"image {w}x{h} px is not a whole number of {pwp}x{php} px patches: use "
                                 f"fit='crop' ({w // pwp * pwp}x{h // php * php}) or fit='resize' "
                                 f"({cols * pwp}x{rows * php})")
            else:
                raise ValueError(f"fit must be 'refuse', 'crop' or 'resize', got {fit!r}")
        tile = self.vqgan_tile
        tokens = self.vqgan.encode_tokens_tiled(x.to(self.device, self.vqgan_dtype), tile=tile, overlap=tile // 4).cpu()
        state = self.blank_canvas(x.shape[2] // php, x.shape[3] // pwp, frames=frames, batch=x.shape[0])
        state.tokens[:, :self.patch_size[0]] = tokens[:, None]
        state.known[0] = True
        state.given = model_to_image(x.cpu())
        return state

    @property
    def vqgan_tile(self) -> int:
        """Tokens per side of the windows the VQGAN encodes and decodes in: one patch.

        Its attention at token resolution is global, so windows keep memory flat on large
        canvases and match the crops small one-shot tokenizers are trained on.
        """
        return max(self.patch_size[1:])

    @property
    def vqgan_dtype(self) -> torch.dtype:
        return next(self.vqgan.parameters()).dtype

    # ---- plans -----------------------------------------------------------------------------------
    def plan_extension(self, state: CanvasState, left=0, right=0, up=0, down=0, step: int = 1) -> Plan:
        """Outpaint whole patches around a fully known canvas (the appendix's loop circle)."""
        if not state.known.all():
            raise ValueError("plan_extension needs a fully generated canvas; use plan_fill to finish it first")
        return adc.plan_outpaint(state.grid, left=left, right=right, up=up, down=down, step=step)

    def plan_fill(self, state: CanvasState, order: Order | None = None) -> Plan:
        """Every unknown patch of the canvas (unconditional canvases, masks, later video frames)."""
        return adc.plan_fill(state.known, order)

    def plan_frames(self, state: CanvasState, frames: int) -> Plan:
        """Append `frames` patch-frames after the canvas and plan them (frames forward)."""
        f, h, w = state.grid
        grid = (f + frames, h, w)
        known = torch.zeros(grid, dtype=torch.bool)
        known[:f] = state.known
        return adc.plan_fill(known)

    # ---- Algorithm 2 -------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, state: CanvasState, plan: Plan, settings: SamplerSettings | None = None,
                 text: torch.Tensor | None = None, generator: torch.Generator | None = None,
                 callback: Callback | None = None, extent: Grid | None = None) -> CanvasState:
        """Generate the plan's patches on a copy of `state`; the input state is left untouched.

        extent (e_f, e_h, e_w): how far the Nearby Context Pool reaches; default the trained
        extent, smaller is allowed (less memory and time, less context), larger is not.

        callback(done, total, state) runs after every patch; returning False stops cleanly and
        returns the canvas with the patches made so far.
        """
        settings = settings or SamplerSettings()
        cfg = self.renderer.config
        decoder = cfg.decoder if settings.decoder == "auto" else settings.decoder
        if decoder != cfg.decoder:
            raise ValueError(f"this renderer was trained as {cfg.decoder!r}; it cannot decode as {decoder!r} "
                             f"(use decoder='auto' or {cfg.decoder!r})")
        if tuple(state.patch_size) != tuple(cfg.patch_size):
            raise ValueError(f"canvas patches are {state.patch_size} tokens but the renderer's are {cfg.patch_size}")
        extent = self._extent(extent)
        state = state.grown(plan)
        steps = plan.steps()
        self._check_plan(state, steps)
        check_memory(self.estimate_bytes(state.grid, state.batch), "this generation")
        text_kv = self.renderer.text_kv(self._text(text, state.batch))
        pool = state.pool if _pool_fits(state.pool, cfg, state, extent) else NearbyContextPool(extent)
        last = last_needed_steps([c for _, c in steps], extent, keep=self._frontier(plan, state, extent))

        for coord in self._precache_list(state, steps, pool, plan.precache_order, extent):
            context = Context.from_pool(pool.select(coord), coord, self.renderer.rel, self.device)
            tokens = state.patch_tokens(coord).to(self.device)
            pool.add(coord, self.renderer.encode(tokens, plan.precache_order, context, text_kv))
        pool.remove(-1, last)

        sample = SAMPLERS[decoder]
        state.pool = pool
        for t, (order, coord) in enumerate(steps):
            context = Context.from_pool(pool.select(coord), coord, self.renderer.rel, self.device)
            tokens, cache = sample(self.renderer, context, order, text_kv, state.batch, settings, generator)
            state.set_patch(coord, tokens.cpu())
            pool.add(coord, cache)
            pool.remove(t, last)
            if callback is not None and callback(t + 1, len(steps), state) is False:
                break
        return state

    def _extent(self, extent) -> Grid:
        trained = tuple(self.renderer.config.extent)
        if extent is None:
            return trained
        extent = tuple(int(e) for e in extent)
        if len(extent) != 3 or any(e < 0 or e > t for e, t in zip(extent, trained)):
            raise ValueError(f"context extent (e_f, e_h, e_w) = {extent} must be >= 0 and within the "
                             f"trained extent {trained}")
        return extent

    def _text(self, text, batch):
        if text is None:
            return None
        check_finite(text, "text embeddings")
        if text.ndim == 2:
            text = text[None]
        if text.shape[0] not in (1, batch):
            raise ValueError(f"text has batch {text.shape[0]} but the canvas has batch {batch}; give 1 or {batch}")
        return text.to(self.device, self.renderer.pos_f.dtype).expand(batch, -1, -1)

    @staticmethod
    def _check_plan(state: CanvasState, steps) -> None:
        seen = set()
        for _, coord in steps:
            if any(c < 0 or c >= n for c, n in zip(coord, state.grid)):
                raise ValueError(f"planned patch {coord} lies outside the canvas grid {state.grid}")
            if state.known[coord] or coord in seen:
                raise ValueError(f"patch {coord} is planned but already {'known' if state.known[coord] else 'planned'}")
            seen.add(coord)

    @staticmethod
    def _precache_list(state: CanvasState, steps, pool: NearbyContextPool, order: Order, extent: Grid) -> list[Coord]:
        """Known patches the plan can select (and their own known context), not yet in the pool."""
        grid = state.grid
        ring1 = {n for _, c in steps for n in adc.neighbours(c, extent, grid) if state.known[n]} - set(pool.caches)
        ring2 = {n for c in ring1 for n in adc.neighbours(c, extent, grid) if state.known[n]}
        todo = (ring1 | ring2) - set(pool.caches)
        return sorted(todo, key=lambda c: adc.time_index(c, order, grid))

    @staticmethod
    def _frontier(plan: Plan, state: CanvasState, extent: Grid) -> list[Coord]:
        """Patches to keep cached after the plan: the band a continuation in its last direction selects."""
        if not plan.segments:
            return []
        (ef, eh, ew), (f, h, w) = extent, state.grid
        order = plan.segments[-1].order
        rows, cols, frames = range(h), range(w), range(max(0, f - ef), f) if ef else range(f)
        if order is Order.DOWN_RIGHT:
            cols = range(max(0, w - ew), w)
        elif order is Order.DOWN_LEFT:
            cols = range(min(ew, w))
        elif order is Order.RIGHT_DOWN:
            rows = range(max(0, h - eh), h)
        else:
            rows = range(min(eh, h))
        return [(k, i, j) for k in frames for i in rows for j in cols]

    def estimate_bytes(self, grid: Grid, batch: int) -> int:
        """Rough peak memory of generating and decoding a canvas: output image, tokens, pool."""
        cfg = self.renderer.config
        f, h, w = grid
        php, pwp = self.patch_pixels
        image = batch * f * cfg.patch_size[0] * h * php * w * pwp * 3 * 4
        tokens = batch * f * h * w * cfg.tokens_per_patch * 8
        ef, eh, ew = cfg.extent
        band = min(f * h * w, (ef + 1) * (2 * eh + 1) * (2 * ew + 1) * max(h, w))
        pool = band * cfg.n_layer * batch * cfg.tokens_per_patch * cfg.d_model * 4
        return image + tokens + pool

    # ---- decoding ------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, state: CanvasState, tile: int | None = None) -> torch.Tensor:
        """Canvas -> IMAGE [B*F, H, W, 3], decoded window by window; unknown patches are grey.

        The given image's own pixels are pasted back over its area.
        """
        b, ft, h, w = state.tokens.shape
        tokens = state.tokens.reshape(b * ft, h, w)
        tile = tile or self.vqgan_tile
        out = []
        for frame in tokens:  # one frame at a time keeps memory flat in the frame count too
            x = self.vqgan.decode_tokens_tiled(frame.clamp(min=0)[None].to(self.device), tile=tile, overlap=tile // 4)
            out.append(model_to_image(x.float().cpu()))
        image = torch.cat(out)  # [B*F, H, W, 3]
        f_px = self.vqgan.downsample_factor
        unknown = (tokens == UNKNOWN).repeat_interleave(f_px, 1).repeat_interleave(f_px, 2)
        image[unknown] = 0.5
        if state.given is not None:
            top, left = state.given_origin
            gh, gw = state.given.shape[1:3]
            frame0 = image.view(b, ft, *image.shape[1:])[:, 0]
            frame0[:, top:top + gh, left:left + gw] = state.given.to(image.dtype)
        return image


def _pool_fits(pool: NearbyContextPool | None, cfg: RendererConfig, state: CanvasState, extent: Grid) -> bool:
    if pool is None or tuple(pool.extent) != tuple(extent):
        return False
    return all(c.shape[0] == cfg.n_layer and c.shape[1] == state.batch and c.shape[2] == cfg.tokens_per_patch
               and c.shape[3] == cfg.d_model for c in pool.caches.values())


def available_bytes(device=None) -> int | None:
    """Free memory on the device that will hold the canvas (None when unknown)."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_memory(needed: int, what: str) -> None:
    free = available_bytes()
    if free is not None and needed > free:
        raise MemoryError(f"{what} needs about {needed / 2**30:.1f} GiB but only {free / 2**30:.1f} GiB is "
                          f"available; generate a smaller canvas or extend it in several steps")
