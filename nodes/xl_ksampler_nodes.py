"""NUWA-XL through ComfyUI's own sampler stack: the MTD as a stock MODEL for KSampler and friends.

    NUWA-XL Model Loader -> NUWA-XL Model (for KSampler) -> KSampler (any sampler/scheduler)
    NUWA-XL Empty Latent Video -> latent_image;  NUWA-XL Prompts (for KSampler) -> positive/negative
    KSampler -> NUWA-XL Decode LATENT -> IMAGE (+ fps)

That is one global level (keyframes). A local level (in-filling between given frames) is
NUWA-XL In-between (for KSampler) -> KSampler (with the local MODEL) -> NUWA-XL Join Segments:
every adjacent pair of input frames becomes one L-frame segment in the batch, the pair given to the
model as its visual condition (first/last frame latents + mask, through the conditioning).

LATENT here is ComfyUI's video layout {"samples": [B, C, F, h, w]} with raw T-KLVAE latents (the
MODEL's latent format applies the T-KLVAE's scale). The ComfyUI adapter lives in _xl_comfy_model.py
and is imported only when a node runs, so the pack imports without ComfyUI.
"""
from __future__ import annotations

import torch

from . import _comfy
from .xl_nodes import (
    CATEGORY,
    _check_tree,
    _load,
    _model_input,
    conditioning_prompts,
    decoded_output,
    level_patcher,
    spread_prompts,
    vae_memory,
)

FRAMES_APART_KEY = "nuwa_xl_frames_apart"
GIVEN_KEY = "nuwa_xl_given"  # same strings as _xl_comfy_model (which needs ComfyUI to import)
FRAME_CONTEXT_KEY = "nuwa_xl_frame_context"
LEVELS = ("global", "local")


def _video_latent(latent, what: str) -> torch.Tensor:
    try:
        samples = latent["samples"]
    except (TypeError, KeyError):
        raise ValueError(f"{what}: expected a LATENT ({{'samples': tensor}}), got {type(latent).__name__}")
    if samples.ndim != 5:
        raise ValueError(f"{what}: expected a video LATENT [batch, channels, frames, height, width] (from NUWA-XL "
                         f"Empty Latent Video / KSampler), got shape {tuple(samples.shape)}")
    return samples


class NUWAXLModelAsComfy:
    DESCRIPTION = ("Wraps a NUWA-XL Mask Temporal Diffusion model as a stock ComfyUI MODEL (eps prediction, the LDM "
                   "linear schedule 0.00085-0.012 over 1000 steps, video latents [B, C, F, h, w]) so KSampler, "
                   "SamplerCustom and every stock sampler and scheduler can run it, and ComfyUI's memory manager "
                   "loads and offloads it. 'global' makes keyframes from an empty latent; 'local' fills between "
                   "given frames (use NUWA-XL In-between). ControlNets and LoRAs do not apply to it.")
    CATEGORY = CATEGORY
    FUNCTION = "wrap"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("A ComfyUI MODEL for KSampler; its LATENTs are [batch, 4, frames, h, w] T-KLVAE latents.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"xl_model": _model_input(),
                             "level": (list(LEVELS), {"default": "global", "tooltip":
                                       "Which MTD to wrap: 'global' (keyframes) or 'local' (in-filling); the same "
                                       "model unless the loader picked a separate local MTD."})},
                "optional": {"frames_apart": ("INT", {"default": 0, "min": 0, "max": 1 << 20, "tooltip":
                                              "For 'local' with a local model per level (NUWA-XL Add Local Model): "
                                              "the spacing, in video frames, of the frames the level makes ((L-1)^"
                                              "(depth-1-k) at level k; 1 for the deepest), which picks the model "
                                              "trained on it. 0: the only local model."})}}

    def wrap(self, xl_model, level="global", frames_apart=0):
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
        try:
            return (level_patcher(xl_model, level, frames_apart),)  # a clone of the loader's one ModelPatcher per MTD
        except ValueError as err:
            raise ValueError(f"NUWA-XL Model (for KSampler): {err}") from None


class NUWAXLEmptyLatentVideo:
    DESCRIPTION = ("An empty NUWA-XL video LATENT [batch, 4, frames, h, w] at the model's frame size, for KSampler "
                   "with NUWA-XL Model (for KSampler): the global level, L keyframes from noise.")
    CATEGORY = CATEGORY
    FUNCTION = "make"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("Zeros of the model's latent shape (KSampler adds the noise).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "xl_model": _model_input(),
            "frames": ("INT", {"default": 5, "min": 3, "max": 64, "tooltip":
                               "Frames per diffusion call (the paper's L); the default model was trained with 5."}),
            "depth": ("INT", {"default": 3, "min": 1, "max": 8, "tooltip":
                              "Depth of the tree these keyframes start: they are (L-1)^(depth-1) frames apart in "
                              "the final video (sets the fps NUWA-XL Decode LATENT reports)."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Videos sampled together."}),
        }}

    def make(self, xl_model, frames, depth, batch_size):
        _check_tree(frames, depth)
        c, h, w = xl_model.latent_shape()
        samples = torch.zeros(batch_size, c, frames, h, w, device=_comfy.intermediate_device())
        return ({"samples": samples, FRAMES_APART_KEY: float((frames - 1) ** (depth - 1))},)


class NUWAXLPromptsForKSampler:
    DESCRIPTION = ("CONDITIONING for KSampler with NUWA-XL Model (for KSampler): one prompt for every frame, or "
                   "several (NUWA Text Encode nodes joined with Conditioning (Combine)) that cut the level's frames "
                   "into equal parts, in order: each level of the tree takes its own schedule, denser for deeper "
                   "levels. Without conditioning it is the model's null prompt (what the model learned with the text "
                   "dropped): wire that to negative and raise KSampler's cfg for classifier-free guidance, or to "
                   "both with cfg 1 for an unconditional model.")
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("Prompts the NUWA-XL MODEL understands (positive and/or negative of KSampler).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
                    "xl_model": _model_input(),
                    "frames": ("INT", {"default": 5, "min": 1, "max": 4096, "tooltip":
                                       "Frames of the level the prompts are for: the latent's frames (global "
                                       "level); for NUWA-XL In-between its output frames, (K-1)(L-1)+1 (denser "
                                       "prompts), or its K input frames (the same parts "
                                       "of the video). The prompts are spread over them."})},
                "optional": {"conditioning": ("CONDITIONING", {"tooltip":
                             "From NUWA Text Encode (several joined with Conditioning (Combine): equal parts of "
                             "the frames, in order), from the text encoder the MTD was trained with. Leave "
                             "empty for the null prompt."})}}

    def encode(self, xl_model, frames, conditioning=None):
        prompts = conditioning_prompts(conditioning, xl_model, "NUWA-XL Prompts conditioning")
        if prompts is None:
            return ([[xl_model.null_prompts().cpu(), {}]],)
        prompts = spread_prompts(prompts.cpu(), frames)
        if prompts.shape[0] == 1:
            return ([[prompts, {}]],)
        return ([[prompts[:1], {FRAME_CONTEXT_KEY: prompts[None]}]],)


def _with_given(conditioning, given, frame_context_for):
    out = []
    for tensor, options in conditioning:
        options = dict(options)
        options[GIVEN_KEY] = given
        if FRAME_CONTEXT_KEY in options:
            options[FRAME_CONTEXT_KEY] = frame_context_for(options[FRAME_CONTEXT_KEY])
        out.append([tensor, options])
    return out


class NUWAXLInbetweenForKSampler:
    DESCRIPTION = ("Local diffusion through KSampler (one level of the tree): every adjacent pair of the input frames "
                   "becomes the first and last frame of an L-frame segment, all segments one batch of the output "
                   "LATENT. The pair goes into positive and negative as the model's visual condition. Sample with "
                   "NUWA-XL Model (for KSampler) at level 'local', then NUWA-XL Join Segments.")
    CATEGORY = CATEGORY
    FUNCTION = "prepare"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("positive", "negative", "latent")
    OUTPUT_TOOLTIPS = ("Positive conditioning with the given frames.", "Negative conditioning with the given frames.",
                       "Empty segments [K-1, 4, L, h, w] for KSampler.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "positive": ("CONDITIONING", {"tooltip": "From NUWA-XL Prompts (for KSampler)."}),
            "negative": ("CONDITIONING", {"tooltip": "From NUWA-XL Prompts (for KSampler); the same for cfg 1."}),
            "frames": ("LATENT", {"tooltip": "K >= 2 frames [1, 4, K, h, w]: the keyframes from KSampler, or the "
                                  "output of NUWA-XL Join Segments for the next level."}),
            "L": ("INT", {"default": 5, "min": 3, "max": 64, "tooltip":
                          "Frames per segment (the paper's L), given first and last included."}),
        }}

    def prepare(self, positive, negative, frames, L):
        _check_tree(L, 1)
        lat = _video_latent(frames, "NUWA-XL In-between frames")
        if lat.shape[0] != 1:
            raise ValueError(f"NUWA-XL In-between takes one video (LATENT batch 1), got a batch of {lat.shape[0]}")
        k = lat.shape[2]
        if k < 2:
            raise ValueError(f"NUWA-XL In-between needs at least 2 input frames, got {k}")
        s, total = k - 1, (k - 1) * (L - 1) + 1
        kf = lat[0].movedim(1, 0)  # [K, C, h, w]
        given = torch.zeros(s, L, *kf.shape[1:], dtype=kf.dtype)
        given[:, 0], given[:, -1] = kf[:-1].cpu(), kf[1:].cpu()
        mask = torch.zeros(s, L, dtype=kf.dtype)
        mask[:, 0] = mask[:, -1] = 1.0
        index = torch.arange(s)[:, None] * (L - 1) + torch.arange(L)  # [S, L] video frame of each slot

        def frame_context_for(ctx):  # [1, P, n, d] prompts of the input or output frames -> [S, L, n, d]
            if ctx.shape[1] not in (1, k, total):
                raise ValueError(f"NUWA-XL In-between: the prompts are for {ctx.shape[1]} frames but this level has "
                                 f"{k} input and {total} output frames; set NUWA-XL Prompts' frames to {total} "
                                 f"(denser prompts) or {k}")
            p = ctx[0].expand(k, *ctx.shape[2:]) if ctx.shape[1] == 1 else ctx[0]
            return spread_prompts(p, total)[index]

        given = {"samples": given.movedim(2, 1).contiguous(), "mask": mask}  # [S, C, L, h, w]
        apart = float(frames.get(FRAMES_APART_KEY, 1.0)) / (L - 1)
        latent = {"samples": torch.zeros(s, kf.shape[1], L, *kf.shape[2:], device=_comfy.intermediate_device()),
                  FRAMES_APART_KEY: apart}
        return (_with_given(positive, given, frame_context_for), _with_given(negative, given, frame_context_for),
                latent)


class NUWAXLJoinSegments:
    DESCRIPTION = ("Joins the segments KSampler made from NUWA-XL In-between into one video LATENT "
                   "[1, 4, (K-1)(L-1)+1, h, w]; the input frames are put back exactly.")
    CATEGORY = CATEGORY
    FUNCTION = "join"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The denser video; decode it, or feed it to another NUWA-XL In-between.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "segments": ("LATENT", {"tooltip": "KSampler's output for the LATENT of NUWA-XL In-between."}),
            "frames": ("LATENT", {"tooltip": "The frames given to NUWA-XL In-between."}),
        }}

    def join(self, segments, frames):
        seg = _video_latent(segments, "NUWA-XL Join Segments segments")
        kf = _video_latent(frames, "NUWA-XL Join Segments frames")
        s, c, L = seg.shape[:3]
        if kf.shape[0] != 1 or kf.shape[2] != s + 1 or kf.shape[1] != c or kf.shape[3:] != seg.shape[3:]:
            raise ValueError(f"NUWA-XL Join Segments: {s} segments {tuple(seg.shape)} need the {s + 1} frames "
                             f"[1, {c}, {s + 1}, ...] they were made from, got {tuple(kf.shape)}")
        kf = kf[0].to(seg)
        seg = seg.clone()
        seg[:, :, 0], seg[:, :, -1] = kf[:, :-1].movedim(1, 0), kf[:, 1:].movedim(1, 0)
        video = torch.cat([seg[:, :, :-1].movedim(0, 1).reshape(c, s * (L - 1), *seg.shape[3:]), kf[:, -1:]], dim=1)
        out = {"samples": video[None], FRAMES_APART_KEY: float(segments.get(FRAMES_APART_KEY, 1.0))}
        return (out,)


class NUWAXLDecodeLatent:
    DESCRIPTION = ("Decodes a NUWA-XL video LATENT (from KSampler with NUWA-XL Model (for KSampler), or Join "
                   "Segments) to frames with the model's T-KLVAE; a batch of videos comes out one after another.")
    CATEGORY = CATEGORY
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE", "FLOAT")
    RETURN_NAMES = ("images", "fps")
    OUTPUT_TOOLTIPS = ("The frames as an IMAGE batch.",
                       "Frames per second of these frames (the model's video fps / their spacing).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"xl_model": _model_input(),
                             "samples": ("LATENT", {"tooltip": "A video LATENT [batch, 4, frames, h, w]."})}}

    def decode(self, xl_model, samples):
        lat = _video_latent(samples, "NUWA-XL Decode LATENT")
        c = xl_model.vae.config.z_channels
        if lat.shape[1] != c:
            raise ValueError(f"NUWA-XL Decode LATENT: this T-KLVAE decodes {c}-channel latents, got {lat.shape[1]}")
        model = _load(xl_model, (xl_model.vae,), vae_memory(xl_model))
        z = lat.movedim(2, 1).flatten(0, 1).float() * model.vae.config.latent_scale  # diffusion latents
        apart = float(samples.get(FRAMES_APART_KEY, 1.0))  # keyframes far apart are decoded each alone
        frames = torch.cat([model.decode(z[b * lat.shape[2]:(b + 1) * lat.shape[2]], frames_apart=apart)
                            for b in range(lat.shape[0])])
        return decoded_output(model, frames, apart)


NODE_CLASS_MAPPINGS = {
    "NUWAXLModelAsComfy": NUWAXLModelAsComfy,
    "NUWAXLEmptyLatentVideo": NUWAXLEmptyLatentVideo,
    "NUWAXLPromptsForKSampler": NUWAXLPromptsForKSampler,
    "NUWAXLInbetweenForKSampler": NUWAXLInbetweenForKSampler,
    "NUWAXLJoinSegments": NUWAXLJoinSegments,
    "NUWAXLDecodeLatent": NUWAXLDecodeLatent,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "NUWAXLModelAsComfy": "NUWA-XL Model (for KSampler)",
    "NUWAXLEmptyLatentVideo": "NUWA-XL Empty Latent Video",
    "NUWAXLPromptsForKSampler": "NUWA-XL Prompts (for KSampler)",
    "NUWAXLInbetweenForKSampler": "NUWA-XL In-between (for KSampler)",
    "NUWAXLJoinSegments": "NUWA-XL Join Segments",
    "NUWAXLDecodeLatent": "NUWA-XL Decode LATENT",
}
