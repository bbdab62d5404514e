"""Mask Temporal Diffusion started from a Stable Diffusion 1.x UNet (NUWA-XL section 3.2).

The paper initialises the MTD's spatial layers from a pretrained text-to-image model and its temporal
layers as the identity. mtd_from_sd_unet reads an LDM / ComfyUI UNet state dict (the
`model.diffusion_model.*` keys of a whole checkpoint, or a bare UNet file) into an MTD built with
MTDConfig.sd (GEGLU feed-forward, GroupNorm eps 1e-6 before each transformer). Every spatial weight is
taken from the UNet; the temporal convolutions stay the identity, the temporal attentions' output
projections zero and the condition injections zero (the condition cascade is then unused), so with
F = 1 (or any F) and no given frame the MTD computes the UNet's eps frame by frame.

Key map (LDM -> MTD), with n counting input_blocks / output_blocks as the LDM UNet builds them:
time_embed.{0,2} -> time_embed.{0,2}; input_blocks.0.0 -> conv_in; input_blocks.n.0 (ResBlock
in_layers.{0,2}, emb_layers.1, out_layers.{0,3}, skip_connection) -> down[i][j].res.{norm1, conv1,
emb_proj, norm2, conv2, skip}; input_blocks.n.1 (SpatialTransformer norm, proj_in (1x1 conv),
transformer_blocks.0.{norm1, attn1, norm2, attn2, norm3, ff.net.0.proj, ff.net.2}, proj_out) ->
down[i][j].attn.{norm, proj_in, ln_sa, sa, ln_pa, pa, ln_mlp, mlp.0.proj, mlp.1, proj_out};
input_blocks.n.0.op -> downsample[i]; middle_block.{0,1,2} -> mid[0].res, mid[0].attn, mid[1].res;
output_blocks.n.{0,1} -> up[i][j]; output_blocks.n.{1,2}.conv -> upsample[i - 1]; out.{0,2} ->
norm_out, conv_out. Attention to_q/to_k/to_v/to_out.0 -> q/k/v/out.

Only SD 1.x's architecture is read: SDXL (label_emb, context 2048, deeper transformers), SD 2.x
(context 1024, linear proj_in/proj_out, v-prediction for the 768 models), inpainting UNets (9 input
channels) and diffusers-layout files are refused, naming what was found.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from .. import checkpoint
from .mask_temporal_diffusion import MaskTemporalDiffusion, MTDConfig

PREFIX = "model.diffusion_model."


class SDUNetError(checkpoint.CheckpointError):
    pass


def read_sd_unet(path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The UNet tensors of a checkpoint (`model.diffusion_model.*`, prefix removed) or a bare UNet file.
    A .safetensors checkpoint's other tensors (VAE, text encoder) are not read."""
    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file():
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            if any(k.startswith(PREFIX) for k in keys):
                return {k[len(PREFIX):]: f.get_tensor(k) for k in keys if k.startswith(PREFIX)}
            return {k: f.get_tensor(k) for k in keys}
    state, _ = checkpoint.load_state_dict(path, allow_pickle=allow_pickle)
    return strip_prefix(state)


def strip_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if any(k.startswith(PREFIX) for k in state):
        return {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    return dict(state)


def _index(keys, pattern: str) -> set[int]:
    rx = re.compile(pattern)
    return {int(m.group(1)) for k in keys if (m := rx.match(k))}


def describe_sd_unet(state: Mapping[str, torch.Tensor]) -> dict:
    """What an LDM-layout UNet state dict (prefix removed) is: its widths, levels and the features that
    tell SD 1.x from SD 2.x and SDXL."""
    keys = list(state)
    if "input_blocks.0.0.weight" not in state or "out.2.weight" not in state:
        if any(k.startswith(("down_blocks.", "conv_in.")) for k in keys):
            found = "a diffusers-layout UNet (down_blocks.*, conv_in)"
        elif any(k.startswith(("first_stage_model.", "cond_stage_model.", "conditioner.")) for k in keys):
            found = "a checkpoint without model.diffusion_model.* UNet keys"
        else:
            found = f"{len(keys)} tensors, none an LDM UNet's (e.g. {', '.join(sorted(keys)[:3]) or 'none'})"
        raise SDUNetError(f"not an LDM / ComfyUI UNet: found {found}; expected input_blocks.*, middle_block.*, "
                          f"output_blocks.*, out.* (bare, or under {PREFIX} in a checkpoint)")
    conv_in = state["input_blocks.0.0.weight"]
    mc = conv_in.shape[0]
    inputs = sorted(_index(keys, r"input_blocks\.(\d+)\."))
    downs = sorted(n for n in inputs if f"input_blocks.{n}.0.op.weight" in state)
    nrb = (downs[0] if downs else len(inputs)) - 1
    levels = len(downs) + 1
    mult, attention = [], []
    for i in range(levels):
        first = 1 + i * (nrb + 1)
        w = state.get(f"input_blocks.{first}.0.out_layers.3.weight")
        mult.append(int(w.shape[0]) // mc if w is not None else -1)
        if f"input_blocks.{first}.1.proj_in.weight" in state:
            attention.append(i)
    to_k = sorted(k for k in keys if k.endswith("attn2.to_k.weight"))
    proj_in = [state[k] for k in keys if k.endswith(".proj_in.weight")]
    depth = max((n + 1 for n in _index(keys, r".*transformer_blocks\.(\d+)\.")), default=0)
    ff = [state[k] for k in keys if k.endswith("ff.net.0.proj.weight")]
    return {
        "in_channels": int(conv_in.shape[1]), "out_channels": int(state["out.2.weight"].shape[0]),
        "model_channels": int(mc), "channel_mult": tuple(mult), "num_res_blocks": nrb,
        "attention_levels": tuple(attention),
        "context_dim": int(state[to_k[0]].shape[1]) if to_k else None,
        "linear_proj": bool(proj_in) and proj_in[0].ndim == 2,
        "transformer_depth": depth,
        "label_emb": any(k.startswith("label_emb.") for k in keys),
        "temporal": any("time_stack" in k or "time_mixer" in k for k in keys),
        "geglu": bool(ff) and ff[0].shape[0] == 8 * ff[0].shape[1],
        "middle_attention": "middle_block.1.proj_in.weight" in state,
    }


def _refusal(d: dict) -> str | None:
    """Why a described UNet is not SD 1.x's architecture, naming what was found; None when it is."""
    seen = (f"context_dim {d['context_dim']}, {'linear' if d['linear_proj'] else '1x1-conv'} proj_in/proj_out, "
            f"transformer depth {d['transformer_depth']}, channel_mult {d['channel_mult']}, "
            f"{d['in_channels']} input channels{', label_emb (ADM)' if d['label_emb'] else ''}")
    if d["label_emb"] or d["context_dim"] == 2048 or d["transformer_depth"] > 1:
        return f"an SDXL-like UNet ({seen})"
    if d["temporal"]:
        return f"a video UNet with temporal layers (time_stack / time_mixer: SVD-like; {seen})"
    if d["context_dim"] == 1024 or d["linear_proj"]:
        return (f"an SD 2.x-like UNet ({seen}); SD 2.x's 768-v models are v-prediction, its layers use "
                f"linear projections and 64-wide heads")
    if d["in_channels"] != d["out_channels"]:
        return f"a UNet with {d['in_channels']} input and {d['out_channels']} output channels (inpainting / " \
               f"instruct-pix2pix-like; {seen})"
    if not d["geglu"] or d["context_dim"] is None or not d["middle_attention"] or min(d["channel_mult"]) < 1:
        return f"a UNet of another layout ({seen}; GEGLU {d['geglu']}, middle attention {d['middle_attention']})"
    return None


def config_for_sd_unet(state: Mapping[str, torch.Tensor], **overrides) -> MTDConfig:
    """The MTDConfig (MTDConfig.sd with the UNet's widths and levels) that an SD 1.x UNet loads into.
    overrides: MTD-only settings (temporal_kernel, multiscale_injection, ...) or num_heads (8 in SD 1.x,
    which the weights cannot show)."""
    d = describe_sd_unet(state)
    why = _refusal(d)
    if why is not None:
        raise SDUNetError(f"this UNet is not SD 1.x's architecture: found {why}. Only SD 1.x UNets "
                          f"(1x1-conv transformer projections, one transformer per block, GEGLU, no label_emb) "
                          f"load into Mask Temporal Diffusion")
    return MTDConfig.sd(**{"latent_channels": d["in_channels"], "model_channels": d["model_channels"],
                           "channel_mult": d["channel_mult"], "num_res_blocks": d["num_res_blocks"],
                           "attention_levels": d["attention_levels"], "context_dim": d["context_dim"],
                           **overrides})


_RES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "emb_proj": "emb_layers.1", "norm2": "out_layers.0",
        "conv2": "out_layers.3", "skip": "skip_connection"}
_ATTN = {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"}


def _transformer_map(cfg: MTDConfig) -> dict[str, str]:
    out = {"norm": "norm", "proj_in": "proj_in", "proj_out": "proj_out", "ln_sa": "transformer_blocks.0.norm1",
           "ln_pa": "transformer_blocks.0.norm2", "ln_mlp": "transformer_blocks.0.norm3",
           "mlp.0.proj": "transformer_blocks.0.ff.net.0.proj", "mlp.1": "transformer_blocks.0.ff.net.2"}
    for ours, theirs in (("sa", "attn1"), ("pa", "attn2")):
        for a, b in _ATTN.items():
            out[f"{ours}.{a}"] = f"transformer_blocks.0.{theirs}.{b}"
    return out


def module_map(cfg: MTDConfig) -> dict[str, str]:
    """MTD module prefix -> LDM module prefix, for every spatial layer (the modules the UNet fills)."""
    if cfg.feed_forward != "geglu":
        raise SDUNetError(f"an SD UNet needs feed_forward 'geglu' (MTDConfig.sd), this config has "
                          f"{cfg.feed_forward!r}")
    m = {"time_embed.0": "time_embed.0", "time_embed.2": "time_embed.2", "conv_in": "input_blocks.0.0",
         "norm_out": "out.0", "conv_out": "out.2"}
    levels, nrb = len(cfg.channel_mult), cfg.num_res_blocks
    attn = _transformer_map(cfg)

    def layer(ours: str, theirs: str, has_attn: bool):
        for a, b in _RES.items():
            m[f"{ours}.res.{a}"] = f"{theirs}.0.{b}"
        if has_attn:
            for a, b in attn.items():
                m[f"{ours}.attn.{a}"] = f"{theirs}.1.{b}"

    for i in range(levels):
        for j in range(nrb):
            layer(f"down.{i}.{j}", f"input_blocks.{1 + i * (nrb + 1) + j}", i in cfg.attention_levels)
        if i < levels - 1:
            m[f"downsample.{i}"] = f"input_blocks.{1 + i * (nrb + 1) + nrb}.0.op"
    for a, b in _RES.items():
        m[f"mid.0.res.{a}"] = f"middle_block.0.{b}"
        m[f"mid.1.res.{a}"] = f"middle_block.2.{b}"
    for a, b in attn.items():
        m[f"mid.0.attn.{a}"] = f"middle_block.1.{b}"
    for i in range(levels):
        for j in range(nrb + 1):
            n = (levels - 1 - i) * (nrb + 1) + j
            layer(f"up.{i}.{j}", f"output_blocks.{n}", i in cfg.attention_levels)
            if i > 0 and j == nrb:
                m[f"upsample.{i - 1}"] = f"output_blocks.{n}.{2 if i in cfg.attention_levels else 1}.conv"
    return m


def _key_map(model: MaskTemporalDiffusion) -> dict[str, str]:
    """MTD state-dict key -> LDM key, for the keys of `model` that an SD UNet fills."""
    modules = module_map(model.config)
    out = {}
    for key in model.state_dict():
        prefix, _, leaf = key.rpartition(".")
        if prefix in modules:
            out[key] = f"{modules[prefix]}.{leaf}"
    return out


def _is_proj(key: str) -> bool:
    return key.endswith((".proj_in.weight", ".proj_out.weight"))


def load_sd_unet_into(model: MaskTemporalDiffusion, state: Mapping[str, torch.Tensor], source: str = "the UNet"):
    """Copy an SD 1.x UNet's weights (LDM keys, prefix removed) into `model`'s spatial layers; the rest of
    `model` (temporal layers, temporal attention, condition injection and its cascade) is left as it is.
    Every UNet tensor must find its place and every spatial weight must come from the UNet."""
    keys = _key_map(model)
    own = model.state_dict()
    missing = sorted(b for b in keys.values() if b not in state)
    used = set(keys.values())
    unexpected = sorted(k for k in state if k not in used)
    misshapen = []
    new = {}
    for a, b in keys.items():
        if b not in state:
            continue
        v = state[b]
        if _is_proj(a) and v.ndim == 4 and own[a].ndim == 2:
            v = v[:, :, 0, 0]  # SD 1.x's 1x1-conv projections are our Linear layers
        if v.shape != own[a].shape:
            misshapen.append(f"{b}: file {tuple(v.shape)} vs {a} {tuple(own[a].shape)}")
        new[a] = v
    if missing or unexpected or misshapen:
        parts = [f"{len(x)} {what}: {', '.join(x[:6])}{' ...' if len(x) > 6 else ''}"
                 for what, x in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen)) if x]
        raise SDUNetError(f"{source} does not fit an MTD of config {model.config}: " + "; ".join(parts))
    with torch.no_grad():
        for a, v in new.items():
            own[a].copy_(v.to(own[a].dtype))
    return model


def mtd_from_sd_unet(source, config: MTDConfig | None = None, allow_pickle: bool = False,
                     **overrides) -> MaskTemporalDiffusion:
    """A fresh Mask Temporal Diffusion whose spatial layers are an SD 1.x UNet's.

    source: a file (a whole checkpoint with `model.diffusion_model.*` keys, or a bare UNet; .safetensors,
    or a pickle of plain tensors) or a state dict. config: the MTD's config (checked against the UNet);
    default MTDConfig.sd with the UNet's widths and levels, plus `overrides` (MTD-only settings)."""
    if isinstance(source, Mapping):
        state, name = strip_prefix(source), "the UNet state dict"
    else:
        state, name = read_sd_unet(source, allow_pickle), getattr(source, "name", Path(str(source)).name)
    try:
        found = config_for_sd_unet(state, **overrides)
    except SDUNetError as err:
        raise SDUNetError(f"{name}: {err}") from None
    if config is None:
        config = found
    else:
        sd_fields = ("latent_channels", "model_channels", "channel_mult", "num_res_blocks", "attention_levels",
                     "context_dim")
        diff = [f"{f} {getattr(config, f)} (UNet: {getattr(found, f)})" for f in sd_fields
                if getattr(config, f) != getattr(found, f)]
        if config.feed_forward != "geglu" or config.transformer_norm_eps != 1e-6:
            diff.append(f"feed_forward {config.feed_forward!r} / transformer_norm_eps {config.transformer_norm_eps} "
                        f"(SD: 'geglu' / 1e-6, as MTDConfig.sd)")
        if diff:
            raise SDUNetError(f"{name} does not fit the MTD config: {'; '.join(diff)}")
    model = MaskTemporalDiffusion(config)
    return load_sd_unet_into(model, state, name)


def mtd_to_sd_unet(model: MaskTemporalDiffusion) -> dict[str, torch.Tensor]:
    """The inverse map: the MTD's spatial weights under LDM UNet key names (prefix not added); the
    temporal and condition layers are left out."""
    own = model.state_dict()
    out = {}
    for a, b in _key_map(model).items():
        v = own[a].detach().clone()
        out[b] = v[:, :, None, None] if _is_proj(a) else v
    return out

