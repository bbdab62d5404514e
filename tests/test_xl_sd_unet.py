"""nuwa_core/xl/sd_unet.py: Mask Temporal Diffusion started from an SD 1.x UNet.

CPU tests build the LDM-named state dict from an MTD (mtd_to_sd_unet), load it back, and check that the
temporal, temporal-attention and injection layers are identity / zero after loading; SDXL-, SD 2.x- and
inpainting-shaped state dicts are refused naming what was found. The ComfyUI test (marked comfyui,
skipped without COMFYUI_DIR) builds ComfyUI's own UNetModel in COMFYUI_PYTHON with SD 1.x's structure at
small width (model_channels 32, channel_mult (1, 2, 4, 4), 2 res blocks, attention at levels 0-2 and in
the middle, 8 heads, context 64, 1x1-conv projections), random weights (every parameter perturbed, the
zero-initialised ones too), saves them under model.diffusion_model.* and its eps on fixed inputs; the
MTD loaded from that file must give the same eps with F = 1 and no given frame (mask all zero).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from nuwa_core.xl import sd_unet
from nuwa_core.xl.mask_temporal_diffusion import MaskTemporalDiffusion, MTDConfig, load_mtd, save_mtd

SMALL = {"model_channels": 32, "context_dim": 64}  # SD 1.x's structure at 1/10 width, 64-wide prompts


def randomize(model, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def sd_state(cfg=None, seed=0, prefix=sd_unet.PREFIX):
    """A random SD 1.x UNet state dict in LDM layout, built through the inverse key map."""
    torch.manual_seed(seed)
    mtd = randomize(MaskTemporalDiffusion(cfg or MTDConfig.sd(**SMALL)), seed)
    return {prefix + k: v for k, v in sd_unet.mtd_to_sd_unet(mtd).items()}, mtd


def test_sd_config_is_sd_compatible_and_old_files_keep_their_blocks(tmp_path):
    cfg = MTDConfig.sd()
    assert (cfg.feed_forward, cfg.transformer_norm_eps) == ("geglu", 1e-6)
    assert (cfg.model_channels, cfg.channel_mult, cfg.num_res_blocks, cfg.attention_levels, cfg.num_heads,
            cfg.context_dim) == (320, (1, 2, 4, 4), 2, (0, 1, 2), 8, 768)
    assert (MTDConfig().feed_forward, MTDConfig().transformer_norm_eps) == ("gelu", 1e-5)
    # a file written before these fields existed: its config JSON lacks them and loads as it was saved
    from nuwa_core import checkpoint
    torch.manual_seed(0)
    old = randomize(MaskTemporalDiffusion(MTDConfig.tiny()))
    raw = json.loads(checkpoint.config_to_json(old.config))
    del raw["feed_forward"], raw["transformer_norm_eps"]
    path = tmp_path / "old.safetensors"
    checkpoint.save_model_file(path, old.state_dict(), "mask_temporal_diffusion")
    tensors = load_file(str(path))
    save_file(tensors, str(path), metadata={"nuwa_kind": "mask_temporal_diffusion", "config": json.dumps(raw)})
    again = load_mtd(path)
    assert again.config == old.config
    x, ctx = torch.randn(1, 2, 4, 8, 8), torch.randn(1, 2, 3, 32)
    with torch.no_grad():
        assert torch.equal(again(x, 5.0, ctx), old(x, 5.0, ctx))
    with pytest.raises(ValueError, match="feed_forward"):
        MTDConfig.tiny(feed_forward="swiglu")


def test_round_trip_through_ldm_names(tmp_path):
    state, source = sd_state()
    assert len(state) == 686  # as SD 1.5's UNet
    model = sd_unet.mtd_from_sd_unet(state)
    assert model.config == source.config
    back = sd_unet.mtd_to_sd_unet(model)
    assert back.keys() == {k[len(sd_unet.PREFIX):] for k in state}
    for k, v in back.items():
        assert torch.equal(v, state[sd_unet.PREFIX + k]), k
    # a bare UNet file and a checkpoint whose other parts (VAE, CLIP) are not read
    bare, ckpt = tmp_path / "unet.safetensors", tmp_path / "ckpt.safetensors"
    save_file({k: v.contiguous() for k, v in back.items()}, str(bare))
    save_file({**{k: v.contiguous() for k, v in state.items()}, "first_stage_model.decoder.conv_in.weight":
               torch.zeros(3, 3), "cond_stage_model.x": torch.zeros(2)}, str(ckpt))
    for path in (bare, ckpt):
        loaded = sd_unet.mtd_from_sd_unet(path, config=MTDConfig.sd(**SMALL))
        for k, v in sd_unet.mtd_to_sd_unet(loaded).items():
            assert torch.equal(v, back[k]), (path.name, k)
    # saved as an MTD file it loads as itself
    save_mtd(model, tmp_path / "mtd.safetensors")
    assert load_mtd(tmp_path / "mtd.safetensors").config.feed_forward == "geglu"


def frame_inputs(b=2, f=3, seed=3, context_dim=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, f, 4, 16, 16, generator=g)
    ctx = torch.randn(b, f, 5, context_dim, generator=g)
    mask = (torch.rand(b, f, generator=g) < 0.5).float()
    mask[:, 0] = 1
    cond = torch.randn(b, f, 4, 16, 16, generator=g) * mask[:, :, None, None, None]
    return x, ctx, cond, mask


def test_temporal_and_injection_layers_start_at_identity():
    torch.set_num_threads(1)
    state, _ = sd_state(seed=2)
    model = sd_unet.mtd_from_sd_unet(state).eval()
    x, ctx, cond, mask = frame_inputs()
    t = torch.tensor([17.0, 803.5])
    with torch.no_grad():
        framewise = torch.stack([model(x[:, i:i + 1], t, ctx[:, i:i + 1])[:, 0] for i in range(x.shape[1])], 1)
        video = model(x, t, ctx, cond, mask)  # F = 3, a random mask and keyframes: still frame by frame
        assert (video - framewise).abs().max() < 1e-5
        # the layers that were left alone are the temporal ones: perturbing them makes frames interact
        for name, p in model.named_parameters():
            if any(s in name for s in ("_t.", ".ta.", ".inject.")):
                p.add_(torch.randn_like(p) * 0.05)
        assert (model(x, t, ctx, cond, mask) - framewise).abs().max() > 1e-3


def test_other_architectures_are_refused_naming_what_was_found():
    state, _ = sd_state(prefix="")
    sd2 = {k: (torch.zeros(v.shape[0], 1024) if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))
               else v[:, :, 0, 0] if k.endswith((".proj_in.weight", ".proj_out.weight")) else v)
           for k, v in state.items()}
    with pytest.raises(sd_unet.SDUNetError, match=r"SD 2\.x.*context_dim 1024, linear proj_in"):
        sd_unet.mtd_from_sd_unet(sd2)
    xl = dict(state)
    xl["label_emb.0.0.weight"] = torch.zeros(128, 2816)
    for k in [k for k in state if ".transformer_blocks.0." in k]:
        xl[k.replace(".transformer_blocks.0.", ".transformer_blocks.1.")] = state[k]
    with pytest.raises(sd_unet.SDUNetError, match=r"SDXL-like.*transformer depth 2.*label_emb"):
        sd_unet.mtd_from_sd_unet(xl)
    inpaint = dict(state, **{"input_blocks.0.0.weight": torch.zeros(32, 9, 3, 3)})
    with pytest.raises(sd_unet.SDUNetError, match="9 input and 4 output channels"):
        sd_unet.mtd_from_sd_unet(inpaint)
    with pytest.raises(sd_unet.SDUNetError, match="diffusers-layout"):
        sd_unet.mtd_from_sd_unet({"conv_in.weight": torch.zeros(1), "down_blocks.0.x": torch.zeros(1)})
    with pytest.raises(sd_unet.SDUNetError, match=r"context_dim 768 \(UNet: 64\)"):
        sd_unet.mtd_from_sd_unet(state, config=MTDConfig.sd(model_channels=32))
    with pytest.raises(sd_unet.SDUNetError, match="feed_forward 'gelu'"):
        sd_unet.mtd_from_sd_unet(state, config=MTDConfig(**SMALL))
    extra = dict(state, **{"input_blocks.1.0.extra.weight": torch.zeros(1)})
    with pytest.raises(sd_unet.SDUNetError, match="unexpected: input_blocks.1.0.extra.weight"):
        sd_unet.mtd_from_sd_unet(extra)


COMFY_SCRIPT = r"""
import sys
import torch
comfy_dir, out_path = sys.argv[1], sys.argv[2]
sys.path.insert(0, comfy_dir)
import comfy.cli_args
comfy.cli_args.args.cpu = True
torch.set_num_threads(1)
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from safetensors.torch import save_file

torch.manual_seed(0)
unet = UNetModel(image_size=32, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=2,
                 channel_mult=(1, 2, 4, 4), num_heads=8, use_spatial_transformer=True,
                 transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[1] * 9 + [0] * 3,
                 transformer_depth_middle=1, context_dim=64, use_linear_in_transformer=False,
                 dtype=torch.float32, device="cpu").eval()
with torch.no_grad():  # ComfyUI's ops leave weights uninitialised: set every one, zero-init outputs too
    for module in unet.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                p.copy_(torch.randn(p.shape) * 0.1 + (1.0 if name == "weight" else 0.0))
            elif p.ndim > 1:
                p.copy_(torch.randn(p.shape) / p[0].numel() ** 0.5)
            else:
                p.copy_(torch.randn(p.shape) * 0.1)
g = torch.Generator().manual_seed(1)
x = torch.randn(2, 4, 16, 16, generator=g)
t = torch.tensor([3.0, 811.25])
ctx = torch.randn(2, 7, 64, generator=g)
with torch.no_grad():
    eps = unet(x, t, context=ctx)
state = {"model.diffusion_model." + k: v.contiguous() for k, v in unet.state_dict().items()}
state.update({"x": x, "t": t, "ctx": ctx, "eps": eps.contiguous()})
save_file(state, out_path)
print("PARAMS", sum(p.numel() for p in unet.parameters()), len(unet.state_dict()))
"""


@pytest.mark.comfyui
def test_eps_equals_comfyui_unet(comfyui_dir, tmp_path):
    python = os.environ.get("COMFYUI_PYTHON") or sys.executable
    out = tmp_path / "comfy_unet.safetensors"
    run = subprocess.run([python, "-c", COMFY_SCRIPT, str(comfyui_dir), str(out)], capture_output=True, text=True,
                         timeout=600, check=False, cwd=str(comfyui_dir), env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0 and out.is_file(), f"{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
    torch.set_num_threads(1)
    data = load_file(str(out))
    x, t, ctx, theirs = (data.pop(k) for k in ("x", "t", "ctx", "eps"))
    model = sd_unet.mtd_from_sd_unet(out).eval()
    assert model.config == MTDConfig.sd(**SMALL)
    with torch.no_grad():
        ours = model(x[:, None], t, ctx, torch.zeros_like(x[:, None]), torch.zeros(2, 1))[:, 0]
    diff = (ours - theirs).abs().max().item()
    print(json.dumps({"max_abs_diff": diff, "eps_abs_max": theirs.abs().max().item(),
                      "eps_std": theirs.std().item()}))
    assert theirs.std() > 0.05  # not a degenerate output
    assert diff <= 1e-4, diff


def test_train_xl_starts_from_an_sd_unet_file(tmp_path, vae_file):
    from test_xl_training import _frames, _xl_args

    from nuwa_core import train
    from nuwa_core.training.loop import TrainingError
    from nuwa_core.xl.model import load_mtd_xl
    torch.set_num_threads(1)
    frames = _frames(tmp_path / "video" / "clip")
    cfg = MTDConfig.sd(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                       context_dim=8)
    state, source = sd_state(cfg, seed=4)
    unet = tmp_path / "sd_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(unet))
    out = tmp_path / "from_sd.safetensors"
    res = train.main(_xl_args(frames, vae_file, out, "--steps", "1", "--init-unet", str(unet)))
    assert res["step"] == 1 and torch.isfinite(torch.tensor(res["loss"]))
    model, info = load_mtd_xl(out)
    assert model.config == cfg and info["L"] == 3
    # one step moved the weights away from the UNet's, but only a little: it started there
    start = sd_unet.mtd_to_sd_unet(source)
    trained = sd_unet.mtd_to_sd_unet(model)
    assert max((trained[k] - start[k]).abs().max().item() for k in start) < 0.01
    assert any(not torch.equal(trained[k], start[k]) for k in start)
    with pytest.raises(TrainingError, match="not both"):
        train.main(_xl_args(frames, vae_file, tmp_path / "x.safetensors", "--steps", "1", "--init-unet", str(unet),
                            "--init", str(out)))
    xl = {**state, sd_unet.PREFIX + "label_emb.0.0.weight": torch.zeros(128, 2816)}
    save_file({k: v.contiguous() for k, v in xl.items()}, str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(TrainingError, match="--init-unet: sdxl.safetensors: .*SDXL-like"):
        train.main(_xl_args(frames, vae_file, tmp_path / "y.safetensors", "--steps", "1", "--init-unet",
                            str(tmp_path / "sdxl.safetensors")))


COMFY_SHAPES_SCRIPT = r"""
import json, sys
import torch
comfy_dir, ours_path = sys.argv[1], sys.argv[2]
sys.path.insert(0, comfy_dir)
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.model_detection
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

common = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=2,
              use_spatial_transformer=True, legacy=False, dtype=torch.float32, device="meta")
configs = {  # full-size UNets as ComfyUI's model detection configures them
    "sd15": dict(common, channel_mult=(1, 2, 4, 4), transformer_depth=[1] * 6 + [0] * 2,
                 transformer_depth_output=[1] * 9 + [0] * 3, transformer_depth_middle=1, context_dim=768,
                 num_heads=8, use_linear_in_transformer=False),
    "sd21": dict(common, channel_mult=(1, 2, 4, 4), transformer_depth=[1] * 6 + [0] * 2,
                 transformer_depth_output=[1] * 9 + [0] * 3, transformer_depth_middle=1, context_dim=1024,
                 num_head_channels=64, use_linear_in_transformer=True),
    "sdxl": dict(common, channel_mult=(1, 2, 4), transformer_depth=[0, 0, 2, 2, 10, 10],
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], transformer_depth_middle=10,
                 context_dim=2048, num_head_channels=64, use_linear_in_transformer=True, num_classes="sequential",
                 adm_in_channels=2816),
}
out = {name: {k: list(v.shape) for k, v in UNetModel(**kw).state_dict().items()} for name, kw in configs.items()}
with torch.device("meta"):
    ours = {"model.diffusion_model." + k: torch.empty(v) for k, v in json.load(open(ours_path)).items()}
detected = comfy.model_detection.model_config_from_unet(ours, "model.diffusion_model.")
print("RESULT " + json.dumps({"shapes": out, "detected": type(detected).__name__}))
"""


@pytest.mark.comfyui
def test_full_size_key_map_matches_comfyui_sd15_and_refuses_sd2_sdxl(comfyui_dir, tmp_path):
    """Shapes only (meta tensors): MTDConfig.sd's spatial weights are exactly ComfyUI's SD 1.5 UNet's keys
    and shapes (ComfyUI's model detection calls them SD15); ComfyUI's SD 2.1 and SDXL UNets are refused."""
    with torch.device("meta"):
        ours = sd_unet.mtd_to_sd_unet(MaskTemporalDiffusion(MTDConfig.sd()))
    (tmp_path / "ours.json").write_text(json.dumps({k: list(v.shape) for k, v in ours.items()}))
    python = os.environ.get("COMFYUI_PYTHON") or sys.executable
    run = subprocess.run([python, "-c", COMFY_SHAPES_SCRIPT, str(comfyui_dir), str(tmp_path / "ours.json")],
                         capture_output=True, text=True, timeout=600, check=False, cwd=str(comfyui_dir),
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    line = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
    assert run.returncode == 0 and line, f"{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
    result = json.loads(line[-1][len("RESULT "):])
    assert result["detected"] == "SD15"
    theirs = result["shapes"]["sd15"]
    assert {k: list(v.shape) for k, v in ours.items()} == theirs
    assert sum(v.numel() for v in ours.values()) == 859_520_964  # SD 1.5's UNet
    with torch.device("meta"):
        def state(name):
            return {k: torch.empty(v) for k, v in result["shapes"][name].items()}
        assert sd_unet.config_for_sd_unet(state("sd15")) == MTDConfig.sd()
        with pytest.raises(sd_unet.SDUNetError, match=r"SD 2\.x-like UNet \(context_dim 1024, linear proj_in"):
            sd_unet.config_for_sd_unet(state("sd21"))
        with pytest.raises(sd_unet.SDUNetError, match=r"SDXL-like UNet \(context_dim 2048.*depth 10.*label_emb"):
            sd_unet.config_for_sd_unet(state("sdxl"))
