"""A NUWA-XL Mask Temporal Diffusion model as a stock ComfyUI MODEL (needs ComfyUI; imported lazily).

Only the nodes of xl_ksampler_nodes.py import this module, inside their functions, so the pack still
imports without ComfyUI. Public ComfyUI classes are subclassed, nothing is patched:

- `comfy.supported_models_base.BASE` config: no UNet of ComfyUI's own is built
  (`disable_unet_model_creation`), the LDM linear schedule 0.00085 -> 0.012 over 1000 steps
  (ComfyUI's ModelSamplingDiscrete "linear" = nuwa_core.xl.diffusion.ldm_alphas_cumprod), eps prediction.
- A `comfy.latent_formats.LatentFormat` with the T-KLVAE's latent scale, 3 latent dimensions
  (video latents [B, C, F, h, w], ComfyUI's layout for video models).
- `comfy.model_base.BaseModel` whose diffusion_model is the MTD behind a small layout adapter, and
  whose extra_conds turn two conditioning keys into model inputs:
  `nuwa_xl_given` (raw LATENT frames [B, C, F, h, w] + per-frame 0/1 mask, set by the In-between
  node: the local level's first/last frame visual condition) and `nuwa_xl_frame_context` (one prompt
  per frame [B, F, n, d], set by NUWA-XL Prompts).
- `comfy.model_patcher.ModelPatcher` around it, so ComfyUI's memory manager loads and offloads it.
"""
from __future__ import annotations

import torch

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models_base

GIVEN_KEY = "nuwa_xl_given"
FRAME_CONTEXT_KEY = "nuwa_xl_frame_context"


class NUWAXLLatentFormat(comfy.latent_formats.LatentFormat):
    latent_channels = 4
    latent_dimensions = 3  # [B, C, F, h, w]

    def __init__(self, scale_factor: float = 1.0, latent_channels: int = 4):
        self.scale_factor = float(scale_factor)
        self.latent_channels = int(latent_channels)


class NUWAXLModelConfig(comfy.supported_models_base.BASE):
    unet_config = {"disable_unet_model_creation": True}
    unet_extra_config = {}
    sampling_settings = {"beta_schedule": "linear", "linear_start": 0.00085, "linear_end": 0.012,
                         "timesteps": 1000}
    latent_format = NUWAXLLatentFormat
    memory_usage_factor = 2.0
    supported_inference_dtypes = [torch.bfloat16, torch.float16, torch.float32]


class MTDAdapter(torch.nn.Module):
    """ComfyUI's diffusion_model call -> MaskTemporalDiffusion: x [B, C, F, h, w] <-> [B, F, C, h, w];
    the prompt is c_crossattn [B, n, d] for every frame, or nuwa_xl_frame_context [B, F, n, d]."""

    def __init__(self, mtd):
        super().__init__()
        self.mtd = mtd

    @property
    def dtype(self) -> torch.dtype:
        return next(self.mtd.parameters()).dtype

    def _check_device(self, device) -> None:
        """The MTD has no comfy.ops layers: it runs only with every weight on the latents' device. A
        partial load (low VRAM, --novram) would crash inside a layer; name the cause instead."""
        off = [name for name, p in self.mtd.named_parameters() if p.device != device]
        if off:
            raise MemoryError(f"NUWA-XL: ComfyUI loaded only part of the Mask Temporal Diffusion model onto {device} "
                              f"({len(off)} weight tensors, e.g. {off[0]}, stayed on {self.mtd.get_parameter(off[0]).device}); "
                              f"it cannot run split between devices: unload other models, sample fewer frames "
                              f"or segments at once, or start ComfyUI with --cpu (not --novram)")

    def forward(self, x, timesteps, context=None, control=None, transformer_options={}, **kwargs):
        self._check_device(x.device)
        b, c, f = x.shape[:3]
        d = self.mtd.config.context_dim
        frame_context = kwargs.get(FRAME_CONTEXT_KEY)
        if frame_context is not None:
            if frame_context.shape[1] != f:
                raise ValueError(f"NUWA-XL: the per-frame prompts are for {frame_context.shape[1]} frames but the "
                                 f"latent has {f}; set NUWA-XL Prompts' frames to the latent's frame count")
            context = frame_context
        if context is None:
            context = x.new_zeros(b, 1, d)
        if context.shape[-1] != d:
            raise ValueError(f"NUWA-XL: the conditioning is {context.shape[-1]} wide but this Mask Temporal "
                             f"Diffusion model takes {d}-wide prompts; make the conditioning with NUWA-XL Prompts "
                             f"(for KSampler) from the text encoder the model was trained with (or none, for an "
                             f"unconditional model)")
        cond = mask = None
        given = kwargs.get(GIVEN_KEY)
        if given is not None:
            cond = given[:, :c].movedim(1, 2)  # [B, F, C, h, w], zero at generated frames
            mask = given[:, c, :, 0, 0]  # [B, F]
        eps = self.mtd(x.movedim(1, 2), timesteps, context, cond, mask)
        return eps.movedim(2, 1)


class NUWAXLBaseModel(comfy.model_base.BaseModel):
    nuwa_name = "NUWA-XL Mask Temporal Diffusion"

    def __init__(self, model_config, mtd, device=None):
        super().__init__(model_config, comfy.model_base.ModelType.EPS, device=device)
        self.diffusion_model = MTDAdapter(mtd)

    def memory_required(self, input_shape, cond_shapes=None):
        """The MTD's own estimate (nuwa_core.memory.mtd_working_bytes) for latents [B, C, F, h, w]."""
        from nuwa_core.memory import mtd_working_bytes
        b, _, f, h, w = (list(input_shape) + [1] * 5)[:5]
        mtd = self.diffusion_model.mtd
        return mtd_working_bytes(mtd.config, b, f, h, w, self.diffusion_model.dtype)

    def extra_conds(self, **kwargs):
        out = super().extra_conds(**kwargs)
        given = kwargs.get(GIVEN_KEY)
        if given is not None:
            latents, mask = given["samples"], given["mask"]  # raw LATENT [B, C, F, h, w], [B, F]
            z = self.process_latent_in(latents) * mask[:, None, :, None, None]
            m = mask[:, None, :, None, None].expand(-1, 1, -1, *z.shape[-2:]).to(z)
            out[GIVEN_KEY] = comfy.conds.CONDNoiseShape(torch.cat([z, m], dim=1))
        frame_context = kwargs.get(FRAME_CONTEXT_KEY)
        if frame_context is not None:
            out[FRAME_CONTEXT_KEY] = comfy.conds.CONDRegular(frame_context)
        return out


def as_comfy_model(mtd, latent_scale: float) -> comfy.model_patcher.ModelPatcher:
    """A MaskTemporalDiffusion -> a ComfyUI MODEL (ModelPatcher over a BaseModel). The MTD's weights
    are shared, not copied: ComfyUI may move them between its devices."""
    config = NUWAXLModelConfig({"disable_unet_model_creation": True})
    config.latent_format = NUWAXLLatentFormat(latent_scale, mtd.config.latent_channels)
    model = NUWAXLBaseModel(config, mtd)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())
