"""NUWA-Infinity inference: the paper's Algorithm 2 and the model bundle (a VQGAN and a renderer).

    q_1:K = ADC.Split(h)                        given patches, pre-cached first
    for each q_k: c = NCP.Select(q_k); a_k = NUWA(q_k, c, e, y); NCP.Add(a_k); NCP.Remove()
    p_1:N = ADC.Split(x)                        patches to generate, in the planned order
    for each p_n: c = NCP.Select(p_n); p_n, a_n = NUWA(0, c, e, y); NCP.Add(a_n); NCP.Remove()
    return VQGAN.decode(x)

Composed outpainting (several segments, each in its own basic order) would otherwise feed a
segment caches made in another local order, which no training sample does; by default every
segment first re-encodes, in its own order, the cached patches it can select (`reencode_pooled`).

The canvas it reads and returns (tokens, known patches, pool, given pixels) is canvas.CanvasState.
On a canvas that wraps (CanvasState.wrap) Select, Remove and the pre-caching reach across the
joint, and decoding cross-fades across it.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import (
    CheckpointError,
    config_from_json,
    config_to_json,
    load_state_dict,
    load_strict,
    save_model_file,
)
from ..images import check_finite, image_to_model, model_to_image, to_rgb
from ..memory import check_memory
from . import arbitrary_direction_controller as adc, wavefront
from .arbitrary_direction_controller import Coord, Grid, Order, Plan
from .candidate_patches import candidate_scores, candidate_streams, keep_best
from .canvas import UNKNOWN, CanvasState
from .nearby_context_pool import NearbyContextPool, last_needed_steps
from .patch_samplers import SAMPLERS, PatchStreams, SamplerSettings, both_halves, check_overflow
from .renderer import Context, Renderer, RendererConfig, patch_row_split, patch_rows
from .vqgan import VQGANConfig, VQModel

BUNDLE_KIND = "nuwa_infinity"


class GenerationCancelled(Exception):
    """Raised by callers' callbacks to abort; `generate` itself stops cleanly when a callback returns False."""


Callback = Callable[[int, int, CanvasState], "bool | None"]


class NuwaInfinity(nn.Module):
    """A VQGAN tokenizer and a renderer, with Algorithm 2 on top."""

    def __init__(self, vqgan: VQModel, renderer: Renderer, text_encoder: dict | None = None):
        """text_encoder: what the renderer's captions were encoded with ({"name", "width"}), kept in the
        file so a prompt from another encoder is refused by name."""
        super().__init__()
        if renderer.config.vocab_size != vqgan.config.n_embed:
            raise ValueError(f"renderer vocabulary {renderer.config.vocab_size} != VQGAN codebook {vqgan.config.n_embed}")
        self.vqgan, self.renderer, self.text_encoder = vqgan, renderer, text_encoder

    # ---- files ---------------------------------------------------------------------------------
    def save(self, path, dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None) -> None:
        """Write the bundle (atomically); `metadata`: more string entries for its header (how it was trained)."""
        state = {f"vqgan.{k}": v for k, v in self.vqgan.state_dict().items()}
        state.update({f"renderer.{k}": v for k, v in self.renderer.state_dict().items()})
        if self.text_encoder:
            metadata = {**(metadata or {}), "text_encoder": json.dumps(self.text_encoder)}
        save_model_file(path, state, BUNDLE_KIND, extra_metadata={
            **(metadata or {}), "vqgan_config": config_to_json(self.vqgan.config),
            "renderer_config": config_to_json(self.renderer.config)}, dtype=dtype)

    @classmethod
    def load(cls, path, device="cpu", dtype: torch.dtype = torch.float32) -> "NuwaInfinity":
        tensors, meta = load_state_dict(path)
        if meta.get("nuwa_kind") != BUNDLE_KIND:
            raise CheckpointError(f"{path} is a {meta.get('nuwa_kind') or 'foreign'} file, not a NUWA-Infinity "
                                  f"model (expected nuwa_kind={BUNDLE_KIND!r} in its metadata)")
        vqgan = VQModel(config_from_json(VQGANConfig, meta["vqgan_config"]))
        renderer = Renderer(config_from_json(RendererConfig, meta["renderer_config"]))
        renderer_state = {k[9:]: v for k, v in tensors.items() if k.startswith("renderer.")}
        if renderer.config.decoder == "ar" and "next_end" not in renderer_state:
            raise CheckpointError(f"{path} holds an AR renderer from before its slots changed (every token is now "
                                  f"cached at its own position, with next-position tables next_f/next_h/next_w/"
                                  f"next_end the file lacks); this version cannot run it: retrain it "
                                  f"(models/nuwa/TRAINING.md has the shipped model's commands)")
        load_strict(vqgan, {k[6:]: v for k, v in tensors.items() if k.startswith("vqgan.")}, f"{path} (vqgan)")
        load_strict(renderer, renderer_state, f"{path} (renderer)")
        text_encoder = json.loads(meta["text_encoder"]) if "text_encoder" in meta else None
        return cls(vqgan, renderer, text_encoder).to(device=device, dtype=dtype).eval()

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

    def blank_canvas(self, rows: int, cols: int, frames: int = 1, batch: int = 1, wrap: str = "none") -> CanvasState:
        """An empty canvas; wrap 'x' makes a 360-degree panorama, 'xy' a seamless texture (adc.WRAPS)."""
        for name, n in (("rows", rows), ("cols", cols), ("frames", frames), ("batch", batch)):
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {n!r}")
        pf, ph, pw = self.patch_size
        return CanvasState(tokens=torch.full((batch, frames * pf, rows * ph, cols * pw), UNKNOWN, dtype=torch.long),
                           known=torch.zeros(frames, rows, cols, dtype=torch.bool), patch_size=self.patch_size,
                           pixels_per_token=self.vqgan.downsample_factor, wrap=wrap)

    @torch.no_grad()
    def canvas_from_image(self, image: torch.Tensor, fit: str = "refuse", frames: int = 1) -> CanvasState:
        """IMAGE [B, H, W, C] -> a canvas whose patches are all known (frame 0 of `frames`).

        fit: 'refuse' (sizes must be whole patches), 'crop' (centre crop to whole patches) or
        'resize' (resample to the nearest whole number of patches).
        """
        x = image_to_model(image)  # [B, 3, H, W]
        (php, pwp), (_, _, h, w) = self.patch_pixels, x.shape
        box = (0, 0, h, w)  # the part of the image that becomes the canvas (masks are mapped through it)
        if h % php or w % pwp:
            rows, cols = max(1, round(h / php)), max(1, round(w / pwp))
            if fit == "crop":
                rows, cols = h // php, w // pwp
                if rows < 1 or cols < 1:
                    raise ValueError(f"image {w}x{h} px is smaller than one {pwp}x{php} px patch; use fit='resize'")
                top, left = (h - rows * php) // 2, (w - cols * pwp) // 2
                x = x[:, :, top:top + rows * php, left:left + cols * pwp]
                box = (top, left, rows * php, cols * pwp)
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
        top, left, bh, bw = box
        if (bh, bw) == tuple(x.shape[2:]):  # the image's own values: [-1, 1] and back is not exact in float
            rgb = to_rgb(image.detach().cpu().float()).clamp(0, 1)
            state.given = rgb[:, top:top + bh, left:left + bw].clone()
        else:  # resized
            state.given = model_to_image(x.cpu())
        state.source_size, state.source_box = (h, w), box
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
        """Outpaint whole patches around a fully known canvas (the appendix's loop circle); not
        across the joint of a canvas that wraps."""
        state.check_growth(up + down, left + right)
        if not state.known.all():
            raise ValueError("plan_extension needs a fully generated canvas; use plan_fill to finish it first")
        return adc.plan_outpaint(state.grid, left=left, right=right, up=up, down=down, step=step)

    def plan_fill(self, state: CanvasState, order: Order | None = None) -> Plan:
        """Every unknown patch of the canvas (unconditional canvases, masks, later video frames)."""
        return adc.plan_fill(state.known, order)

    def plan_frames(self, state: CanvasState, frames: int) -> Plan:
        """Append `frames` patch-frames after the canvas and plan them (frames forward): image animation
        from an encoded image, or a longer video. Frame 0's patches are pre-cached (Algorithm 2's first loop)."""
        if not isinstance(frames, int) or frames < 1:
            raise ValueError(f"frames to add must be a whole number >= 1, got {frames!r}")
        f, h, w = state.grid
        grid = (f + frames, h, w)
        known = torch.zeros(grid, dtype=torch.bool)
        known[:f] = state.known
        return adc.plan_fill(known)

    # ---- Algorithm 2 -------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, state: CanvasState, plan: Plan, settings: SamplerSettings | None = None,
                 text: torch.Tensor | None = None, generator: torch.Generator | int | None = None,
                 callback: Callback | None = None, extent: Grid | None = None,
                 reencode: bool = True, schedule: str = "wavefront", max_wave: int = wavefront.MAX_WAVE) -> CanvasState:
        """Generate the plan's patches on a copy of `state`; the input state is left untouched.

        generator: a seed, or a CPU generator that one seed is drawn from (None: torch's default
        one). Every patch samples from its own stream, seeded from it and the patch's place on the
        canvas (wavefront.patch_seed), so a seed gives the same canvas with either schedule and
        when a canvas is grown in several calls (each given the same seed) instead of one.

        extent (e_f, e_h, e_w): how far the Nearby Context Pool reaches; default the trained
        extent, smaller is allowed (less memory and time, less context), larger is not.

        reencode: at the start of every segment, re-encode in the segment's order the cached
        patches its patches can select that were made in another order (`reencode_pooled`; one
        renderer forward each). Nothing changes for a plan in one order.

        schedule: 'wavefront' renders together, in one batch of at most `max_wave` patches, the
        patches whose selected context is complete (wavefront.py); 'sequential' one patch at a
        time. Same plan, same context for every patch, same canvas. With candidates, a batch holds
        at most `max_wave` draws (max_wave // candidates patches).

        callback(done, total, state) runs after every wave (every patch when sequential);
        returning False stops cleanly and returns the canvas with the patches made so far.
        """
        settings = settings or SamplerSettings()
        cfg = self.renderer.config
        decoder = cfg.decoder if settings.decoder == "auto" else settings.decoder
        if decoder != cfg.decoder:
            raise ValueError(f"this renderer was trained as {cfg.decoder!r}; it cannot decode as {decoder!r} "
                             f"(use decoder='auto' or {cfg.decoder!r})")
        if tuple(state.patch_size) != tuple(cfg.patch_size):
            raise ValueError(f"canvas patches are {state.patch_size} tokens but the renderer's are {cfg.patch_size}")
        if not isinstance(max_wave, int) or max_wave < 1:
            raise ValueError(f"max_wave (patches rendered in one batch) must be a whole number >= 1, got {max_wave!r}")
        run_schedule = wavefront.schedule(schedule)
        extent = self._extent(extent)
        n_draws = settings.candidates
        waves = wavefront.plan_waves(plan, state.wrap, extent, schedule, wavefront.patches_per_wave(max_wave, n_draws))
        seed = run_seed(generator)
        state = state.grown(plan)
        self._check_plan(state, plan.steps())
        # classifier-free guidance runs a batch of 2B: B rows with the text, B without (patch_samplers.guided)
        guided = text is not None and settings.guidance != 1.0
        if not guided and settings.guidance != 1.0:
            settings = dataclasses.replace(settings, guidance=1.0)  # nothing to guide without a prompt
        grid, periods = state.grid, state.periods
        batch = state.batch * (2 if guided else 1)
        check_memory(self.estimate_bytes(grid, batch, wave=wavefront.widest(waves) * n_draws), "this generation",
                     self.device)
        rows = PatchBatch(self.renderer, self._text(text, state.batch), guided)
        pool = state.pool if _pool_fits(state.pool, cfg, batch, extent) else NearbyContextPool(extent)
        # a canvas from a file or a node's output keeps its caches on the CPU: onto the model's device and dtype
        pool.caches = {c: cache.to(self.device, self.renderer.pos_f.dtype) for c, cache in pool.caches.items()}
        pool.periods = periods
        executed = [c for _, segment_waves in waves for w in segment_waves for c in w]
        last = last_needed_steps(executed, extent, keep=self._frontier(plan, state, extent), periods=periods)

        def patch_tokens(coord: Coord) -> torch.Tensor:
            return both_halves(state.patch_tokens(coord).to(self.device), settings)

        precache = self._precache_list(state, executed, pool, plan.precache_order, extent)
        for wave in run_schedule(precache, extent, grid, periods, max_wave):
            rows.encode(wave, plan.precache_order, pool, pool.select, patch_tokens)
        pool.remove(-1, last)

        sample = SAMPLERS[decoder]
        codebook = self.vqgan.quantize.embedding.weight.detach().to(self.device)  # [V, d]: where candidates agree
        state.pool = pool
        done = 0
        for order, segment_waves in waves:
            if reencode:
                segment = [c for w in segment_waves for c in w]
                near = {n for c in segment for n in adc.neighbours(c, extent, grid, periods)}
                reencode_pooled(rows, pool, near, order, grid, patch_tokens,
                                lambda coords: run_schedule(coords, extent, grid, periods, max_wave))
            for wave in segment_waves:
                drawn = [c for c in wave for _ in range(n_draws)]  # each patch's candidates side by side
                streams = PatchStreams([g for c in wave for g in candidate_streams(seed, state.stream_coord(c), n_draws)])
                context = rows.context([(c, pool.select(c)) for c in drawn])
                tokens, cache = sample(self.renderer, context, order, rows.text_kv(len(drawn)), batch * len(drawn),
                                       settings, streams)
                check_overflow(cache)
                token_parts, cache_parts = rows.split(tokens, len(drawn), dim=0), rows.split(cache, len(drawn), dim=1)
                if n_draws > 1:
                    score = candidate_scores(rows, drawn, tokens, n_draws, order, pool.select,
                                             lambda c: patch_tokens(adc.wrapped(c, periods)), codebook)
                    patches = [slice(i * n_draws, (i + 1) * n_draws) for i in range(len(wave))]  # candidate rows
                    token_parts = [keep_best(token_parts[s], score[s], rows.halves, 0) for s in patches]
                    cache_parts = [keep_best(cache_parts[s], score[s], rows.halves, 1) for s in patches]
                for coord, patch, patch_cache in zip(wave, token_parts, cache_parts):
                    state.set_patch(coord, patch[:state.batch].cpu())  # the sampled half
                    pool.add(coord, patch_cache, order)
                done += len(wave)
                pool.remove(done - 1, last)
                if callback is not None and callback(done, len(executed), state) is False:
                    return state
        return state

    @torch.no_grad()
    def token_nll(self, state: CanvasState, plan: Plan, tokens: torch.Tensor, text: torch.Tensor | None = None,
                  extent: Grid | None = None, reencode: bool = True) -> torch.Tensor:
        """How likely the renderer finds given tokens where `plan` would generate: the plan walked
        as `generate` walks it (given patches pre-cached, segments re-encoded, one patch at a time),
        each planned patch teacher-forced with `tokens` [B, F, h, w] (the grown canvas's grid, e.g.
        the truth's encoding) instead of sampled. -> NLL in nats [N, B, M]: planned patch (plan
        order) x canvas x token (raster). A held-out region's NLL against ln(vocabulary) tells
        generalising from memorising (evaluation/continuation.py). AR renderers; no guidance."""
        cfg = self.renderer.config
        if cfg.decoder != "ar":
            raise ValueError(f"token_nll teacher-forces an AR renderer; this one decodes as {cfg.decoder!r}")
        extent = self._extent(extent)
        grown = state.grown(plan)
        if tuple(tokens.shape) != tuple(grown.tokens.shape):
            raise ValueError(f"tokens {tuple(tokens.shape)} must have the grown canvas's shape {tuple(grown.tokens.shape)} "
                             "[B, F, h, w]")
        self._check_plan(grown, plan.steps())
        truth = grown.clone()  # the given patches as the canvas has them, the planned ones from `tokens`
        truth.tokens = torch.where(grown.tokens == UNKNOWN, tokens.to(grown.tokens), grown.tokens)
        rows = PatchBatch(self.renderer, self._text(text, state.batch))
        pool = NearbyContextPool(extent)
        pool.periods = grown.periods
        executed = [c for _, c in plan.steps()]
        last = last_needed_steps(executed, extent, keep=[], periods=grown.periods)

        def known(coord: Coord) -> torch.Tensor:
            return truth.patch_tokens(coord).to(self.device)

        for coord in self._precache_list(grown, executed, pool, plan.precache_order, extent):
            rows.encode([coord], plan.precache_order, pool, pool.select, known)
        pool.remove(-1, last)
        nll = []
        for order, coords in [(s.order, s.patches) for s in plan.segments]:
            if reencode:
                near = {n for c in coords for n in adc.neighbours(c, extent, grown.grid, grown.periods)}
                reencode_pooled(rows, pool, near, order, grown.grid, known)
            for coord in coords:
                target = known(coord)                                            # [B, M] raster
                logits, cache = self.renderer.teacher_forced(target, order, rows.context([(coord, pool.select(coord))]),
                                                             rows.text_kv(1))
                nll.append(F.cross_entropy(logits.float().transpose(1, 2), target, reduction="none"))
                pool.add(coord, cache, order)
                pool.remove(len(nll) - 1, last)
        return torch.stack(nll) if nll else torch.zeros(0, state.batch, cfg.tokens_per_patch)

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
        if not self.renderer.config.text_dim:
            raise ValueError("a prompt was given, but this model has no text path (its renderer was trained without "
                             "captions, text_dim 0): remove the conditioning, or load a model trained with captions")
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
    def _precache_list(state: CanvasState, planned: list[Coord], pool: NearbyContextPool, order: Order,
                       extent: Grid) -> list[Coord]:
        """Known patches the plan can select (and their own known context), not yet in the pool."""
        grid, periods = state.grid, state.periods
        ring1 = {n for c in planned for n in adc.neighbours(c, extent, grid, periods) if state.known[n]} - set(pool.caches)
        ring2 = {n for c in ring1 for n in adc.neighbours(c, extent, grid, periods) if state.known[n]}
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

    def estimate_bytes(self, grid: Grid, batch: int, wave: int = 1) -> int:
        """Rough peak memory of generating and decoding a canvas: output image, tokens, pool, and the
        contexts of a wave of `wave` patches rendered together."""
        cfg = self.renderer.config
        f, h, w = grid
        php, pwp = self.patch_pixels
        image = batch * f * cfg.patch_size[0] * h * php * w * pwp * 3 * 4
        tokens = batch * f * h * w * cfg.tokens_per_patch * 8
        ef, eh, ew = cfg.extent
        band = min(f * h * w, (ef + 1) * (2 * eh + 1) * (2 * ew + 1) * max(h, w))
        cache = cfg.n_layer * batch * cfg.tokens_per_patch * cfg.d_model * 4
        context = wave * (ef + 1) * (2 * eh + 1) * (2 * ew + 1) * cache * 3  # selected caches, their keys, values
        return image + tokens + band * cache + context

    # ---- decoding ------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, state: CanvasState, tile: int | None = None, blend: bool = True,
               feather: int | None = None) -> torch.Tensor:
        """Canvas -> IMAGE [B*F, H, W, 3], decoded window by window; unknown patches are grey.

        blend: neighbouring windows overlap and cross-fade (VQModel.decode_tokens_tiled); False:
        every tile x tile block of tokens is decoded on its own and cut hard at its borders, so
        seams show where the decoder cannot hide them (an evaluation control).
        The given image's own pixels are composited back over its area except where its mask
        regenerated them, faded in over `feather` px (default: the canvas' own setting, else two
        tokens) from every edge that meets generated pixels, so the tokenizer's reconstruction
        error does not draw a line around them (0: pasted with a hard edge). Farther than that
        from generated pixels the output equals the given image exactly.

        A canvas that wraps is decoded as a circle (or torus): the windows at the joint see the
        tokens across it and cross-fade into them, so the image tiles with no seam; given pixels
        fade towards generated pixels across the joint too. Without blend every block is cut
        apart anyway, the joint as any other block border.
        """
        b, ft, h, w = state.tokens.shape
        tokens = state.tokens.reshape(b * ft, h, w)
        tile = tile or self.vqgan_tile
        wrap = tuple(p > 0 for p in state.periods[1:])
        f_px = self.vqgan.downsample_factor
        # one frame at a time, written into the output: memory holds the output once, at any frame count
        image = torch.empty(b * ft, h * f_px, w * f_px, 3)  # [B*F, H, W, 3]
        for n, frame in enumerate(tokens):
            frame = frame.clamp(min=0)[None].to(self.device)
            if blend:
                x = self.vqgan.decode_tokens_tiled(frame, tile=tile, overlap=tile // 4, wrap=wrap)
            else:
                x = self.vqgan.decode_tokens_blocks(frame, tile=tile)
            image[n] = model_to_image(x.float().cpu())[0]
        unknown = (tokens == UNKNOWN).repeat_interleave(f_px, 1).repeat_interleave(f_px, 2)
        image[unknown] = 0.5
        if state.given is not None:
            top, left = state.given_origin
            gh, gw = state.given.shape[1:3]
            frame0 = image.view(b, ft, *image.shape[1:])[:, 0]
            if feather is None:
                feather = 2 * f_px if state.feather is None else state.feather
            weight = given_weight((gh, gw), (top, left), tuple(frame0.shape[1:3]), feather,
                                  regenerate=state.given_mask, wrap=wrap)[None, :, :, None]
            region = frame0[:, top:top + gh, left:left + gw]
            region.copy_(torch.lerp(region, state.given.to(image.dtype), weight))  # exact where weight is 1
        return image


def given_weight(size: tuple[int, int], origin: tuple[int, int], canvas: tuple[int, int], feather: int,
                 regenerate: torch.Tensor | None = None, wrap: tuple[bool, bool] = (False, False)) -> torch.Tensor:
    """[h, w] weight of given pixels of `size` at `origin` on a canvas of `canvas` px.

    1 - regenerate (the given mask: 1 = replaced by generated pixels, soft values blend), and
    within `feather` px of a canvas pixel that shows no given pixel (outside the given rectangle,
    or fully regenerated) at most d / (feather + 1), d the chessboard distance to it: a linear ramp
    that reaches 1 / (feather + 1) next to generated pixels. The canvas' own borders do not count,
    except along an axis that wraps (rows, columns): there the pixels across the joint do.
    """
    (h, w), (top, left), (ch, cw) = size, origin, canvas
    keep = torch.ones(h, w) if regenerate is None else (1 - regenerate.float().cpu()).clamp(0, 1)
    if feather <= 0:
        return keep
    # a window of the canvas around the given rectangle: nothing farther than `feather` px matters
    # (the whole of an axis that wraps: its far side is near)
    r0, r1 = (0, ch) if wrap[0] else (max(top - feather, 0), min(top + h + feather, ch))
    c0, c1 = (0, cw) if wrap[1] else (max(left - feather, 0), min(left + w + feather, cw))
    shown = torch.zeros(r1 - r0, c1 - c0)
    inside = (slice(top - r0, top - r0 + h), slice(left - c0, left - c0 + w))
    shown[inside] = (keep > 0).float()
    generated = (1 - shown)[None, None]  # [1, 1, H, W]
    wrap_h, wrap_w = int(wrap[0]), int(wrap[1])
    ramp = torch.zeros(h, w)
    for _ in range(feather + 1):  # after k dilations, `generated` holds every pixel within k px of one
        ramp += 1 - generated[0, 0][inside]
        # -inf padding: borders are not generated; an axis that wraps is padded with its far side instead
        generated = F.pad(generated, (wrap_w, wrap_w, wrap_h, wrap_h), mode="circular")
        generated = F.max_pool2d(generated, 3, stride=1, padding=(1 - wrap_h, 1 - wrap_w))
    return torch.minimum(keep, ramp / (feather + 1))


class PatchBatch:
    """P patches run as one batch of rows (renderer.patch_rows: half-major, then patch, then canvas):
    their contexts padded into one, their outputs split back, the text's keys and values for P.

    text [B, T, D] or None; guided: the rows are [with text; without] (classifier-free guidance).
    """

    def __init__(self, renderer: Renderer, text: torch.Tensor | None = None, guided: bool = False):
        self.renderer, self.text, self.halves = renderer, text, 2 if guided else 1
        self._text_kv: dict[int, list] = {}

    def text_kv(self, patches: int) -> list:
        if patches not in self._text_kv:
            text = None if self.text is None else self.text.repeat(patches, 1, 1)
            self._text_kv[patches] = self.renderer.text_kv(text, with_null=self.halves == 2)
        return self._text_kv[patches]

    def context(self, selections: list[tuple[Coord, list]]) -> Context:
        """[(coord, NCP.Select(coord))] -> the batch's context."""
        device = self.renderer.pos_f.device
        return Context.batched([Context.from_pool(sel, c, self.renderer.rel, device) for c, sel in selections],
                               self.halves)

    def rows(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Per patch [halves*B, ..] -> [halves*P*B, ..]."""
        return parts[0] if len(parts) == 1 else patch_rows(parts, self.halves, dim=0)

    def split(self, x: torch.Tensor, patches: int, dim: int) -> list[torch.Tensor]:
        """[.., halves*P*B, ..] along `dim` -> per patch [.., halves*B, ..], each its own tensor (a
        view would keep the whole batch alive in the pool for as long as any one patch is held)."""
        return [x] if patches == 1 else [part.contiguous() for part in patch_row_split(x, patches, self.halves, dim)]

    def encode(self, coords: list[Coord], order: Order, pool: NearbyContextPool, select,
               patch_tokens: Callable[[Coord], torch.Tensor]) -> None:
        """Teacher-force known patches that do not select each other, in one renderer forward, and
        add their caches to the pool. select(coord) -> the (position, cache) pairs it sees."""
        context = self.context([(c, select(c)) for c in coords])
        tokens = self.rows([patch_tokens(c) for c in coords])
        cache = check_overflow(self.renderer.encode(tokens, order, context, self.text_kv(len(coords))))
        for coord, patch_cache in zip(coords, self.split(cache, len(coords), dim=1)):
            pool.add(coord, patch_cache, order)


@torch.no_grad()
def reencode_pooled(rows: PatchBatch, pool: NearbyContextPool, coords: Iterable[Coord], order: Order, grid: Grid,
                    patch_tokens: Callable[[Coord], torch.Tensor], waves=None) -> list[Coord]:
    """Re-encode, teacher-forced in `order`, the pool's caches among `coords` that were made in
    another (or an unknown) order, so what a segment in `order` selects is what training in
    `order` makes. Returns the re-encoded coordinates; one renderer forward each, or one per
    wave when `waves` (coords -> lists of coords, wavefront.py) groups them.

    They go in `order`'s sequence over `grid`, each with the pooled caches that precede it in
    that order as its context (as in a training sample in `order`; one re-encoded before serves
    the next). patch_tokens(coord) -> its tokens [B, M] raster, on the renderer's device.
    Caches are replaced in place: the pool holds no more patches than before. On a canvas that
    wraps (pool.periods), a patch across the joint comes before or after by where it lies as seen
    from the re-encoded one, as in a training sample laid out around it.
    """
    todo = sorted((c for c in set(coords) if c in pool and pool.orders.get(c) is not order),
                  key=lambda c: adc.time_index(c, order, grid))

    def before(coord: Coord) -> list:
        n = adc.time_index(coord, order, grid)
        return [(c, cache) for c, cache in pool.select(coord) if adc.time_index(c, order, grid) < n]

    for wave in waves(todo) if waves else [[c] for c in todo]:
        rows.encode(wave, order, pool, before, patch_tokens)
    return todo


def run_seed(generator: torch.Generator | int | None) -> int:
    """The seed the patch streams of one generate() call derive from: the int given, or one drawn
    from the generator (None: torch's default generator)."""
    if isinstance(generator, bool) or not isinstance(generator, (int, torch.Generator, type(None))):
        raise TypeError(f"generator must be a seed (int), a CPU torch.Generator or None, got {type(generator).__name__}")
    if isinstance(generator, int):
        return generator
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"the generator must be a CPU generator (noise is drawn on the CPU and moved, so a seed "
                         f"gives one image on every device), got one on {generator.device}")
    return int(torch.randint(0, 2 ** 62, (1,), generator=generator))


def _pool_fits(pool: NearbyContextPool | None, cfg: RendererConfig, batch: int, extent: Grid) -> bool:
    """A canvas's pool can be read on: same extent and cache shapes (batch: 2B when guided)."""
    if pool is None or tuple(pool.extent) != tuple(extent):
        return False
    return all(c.shape[0] == cfg.n_layer and c.shape[1] == batch and c.shape[2] == cfg.tokens_per_patch
               and c.shape[3] == cfg.d_model for c in pool.caches.values())
