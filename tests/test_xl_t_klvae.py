"""T-KLVAE: identity initialisation, SD 1.x VAE key compatibility, file markers."""
import pytest
import torch
from safetensors.torch import save_file

from nuwa_core import checkpoint
from nuwa_core.xl.t_klvae import (MARKER_KEY, TKLVAE, TKLVAEConfig, config_from_image_vae, load_t_klvae,
                               save_t_klvae, t_klvae_from_state_dict)

CH, CH_MULT, NRB, Z = 8, (1, 2, 2), 1, 4


def ldm_vae_shapes(ch=CH, ch_mult=CH_MULT, nrb=NRB, z=Z):
    """The SD 1.x AutoencoderKL state dict (LDM names -> shapes), written out from the architecture rules."""
    s = {}

    def conv(name, cin, cout, k):
        s[f"{name}.weight"], s[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        s[f"{name}.weight"], s[f"{name}.bias"] = (c,), (c,)

    def resblock(name, cin, cout):
        norm(f"{name}.norm1", cin), conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout), conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def mid(prefix, c):
        resblock(f"{prefix}.mid.block_1", c, c)
        norm(f"{prefix}.mid.attn_1.norm", c)
        for p in ("q", "k", "v", "proj_out"):
            conv(f"{prefix}.mid.attn_1.{p}", c, c, 1)
        resblock(f"{prefix}.mid.block_2", c, c)

    chans = [ch * m for m in ch_mult]
    conv("encoder.conv_in", 3, ch, 3)
    cin = ch
    for i, c in enumerate(chans):
        for j in range(nrb):
            resblock(f"encoder.down.{i}.block.{j}", cin, c)
            cin = c
        if i < len(chans) - 1:
            conv(f"encoder.down.{i}.downsample.conv", c, c, 3)
    mid("encoder", cin)
    norm("encoder.norm_out", cin), conv("encoder.conv_out", cin, 2 * z, 3)
    conv("quant_conv", 2 * z, 2 * z, 1), conv("post_quant_conv", z, z, 1)
    conv("decoder.conv_in", z, chans[-1], 3)
    mid("decoder", chans[-1])
    cin = chans[-1]
    for i in reversed(range(len(chans))):
        for j in range(nrb + 1):
            resblock(f"decoder.up.{i}.block.{j}", cin, chans[i])
            cin = chans[i]
        if i > 0:
            conv(f"decoder.up.{i}.upsample.conv", cin, cin, 3)
    norm("decoder.norm_out", cin), conv("decoder.conv_out", cin, 3, 3)
    return s


def random_ldm_state(seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) * 0.1 for k, shape in ldm_vae_shapes(**kw).items()}


def ldm_to_diffusers(state, n_levels=len(CH_MULT)):
    """The inverse mapping, written independently of the loader's regexes."""
    attn = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
    out = {}
    for key, value in state.items():
        p = key.split(".")
        if p[1] == "down":
            head = (f"encoder.down_blocks.{p[2]}.resnets.{p[4]}" if p[3] == "block"
                    else f"encoder.down_blocks.{p[2]}.downsamplers.0.conv")
            key = ".".join([head] + p[5:])
        elif p[1] == "up":
            i = n_levels - 1 - int(p[2])
            head = (f"decoder.up_blocks.{i}.resnets.{p[4]}" if p[3] == "block"
                    else f"decoder.up_blocks.{i}.upsamplers.0.conv")
            key = ".".join([head] + p[5:])
        elif p[1] == "mid":
            if p[2].startswith("block_"):
                key = ".".join([p[0], "mid_block.resnets", str(int(p[2][-1]) - 1)] + p[3:])
            else:
                key = ".".join([p[0], "mid_block.attentions.0", attn[p[3]], p[4]])
                if p[3] != "norm" and p[4] == "weight":
                    value = value[:, :, 0, 0]
        elif p[1] == "norm_out":
            key = f"{p[0]}.conv_norm_out.{p[2]}"
        out[key.replace("nin_shortcut", "conv_shortcut")] = value
    return out


def tiny(**kw):
    return TKLVAEConfig(ch=CH, ch_mult=CH_MULT, num_res_blocks=NRB, num_groups=4, **kw)


def test_sd_preset_has_exactly_the_sd_vae_keys():
    with torch.device("meta"):
        model = TKLVAE(TKLVAEConfig.sd())
    image_keys = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in model.temporal_state_dict()}
    assert image_keys == ldm_vae_shapes(ch=128, ch_mult=(1, 2, 4, 4), nrb=2, z=4)
    assert len(image_keys) == 248


def test_fresh_t_klvae_equals_image_vae_frame_by_frame():
    torch.manual_seed(0)
    image_vae = TKLVAE(tiny(temporal=False)).eval()
    t_vae = t_klvae_from_state_dict(image_vae.state_dict(), config=tiny()).eval()
    video = torch.rand(2, 5, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = t_vae.encode(video)
        z_ref = torch.stack([image_vae.encode(video[:, i:i + 1])[:, 0] for i in range(5)], dim=1)
        x = t_vae.decode(z)
        x_ref = torch.stack([image_vae.decode(z[:, i:i + 1])[:, 0] for i in range(5)], dim=1)
    assert z.shape == (2, 5, 4, 4, 4)
    assert (z - z_ref).abs().max() <= 1e-5
    assert (x - x_ref).abs().max() <= 1e-5


def test_temporal_layers_start_as_identity():
    model = TKLVAE(tiny())
    convs = [m for m in model.modules() if type(m).__name__ == "TemporalConv"]
    attns = [m for m in model.modules() if type(m).__name__ == "TemporalAttention"]
    assert len(attns) == 2 and len(convs) > 10
    for conv in convs:
        k = conv.kernel_size[0]
        expected = torch.zeros_like(conv.weight)
        expected[range(conv.in_channels), range(conv.in_channels), k // 2] = 1
        assert torch.equal(conv.weight, expected) and not conv.bias.any()
    for attn in attns:
        assert not attn.proj_out.weight.any() and not attn.proj_out.bias.any()


@pytest.mark.parametrize("variant", ["ldm", "prefixed", "diffusers"])
def test_sd_vae_files_load_strictly(tmp_path, variant):
    state = random_ldm_state()
    if variant == "prefixed":
        file_state = {f"first_stage_model.{k}": v for k, v in state.items()}
        file_state["model.diffusion_model.out.0.weight"] = torch.zeros(3)  # a whole SD checkpoint
    elif variant == "diffusers":
        file_state = ldm_to_diffusers(state)
        assert "decoder.up_blocks.0.upsamplers.0.conv.weight" in file_state
    else:
        file_state = state
    path = tmp_path / "vae.safetensors"
    save_file(file_state, str(path))
    model = load_t_klvae(path, config=tiny())
    loaded = model.state_dict()
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k
    assert all(k in state for k in loaded if k not in model.temporal_state_dict())


def test_config_is_read_off_an_image_vae():
    cfg = config_from_image_vae(random_ldm_state(), num_groups=4)
    assert (cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.z_channels, cfg.double_z) == (CH, CH_MULT, NRB, Z, True)


def test_missing_key_is_named():
    state = random_ldm_state()
    del state["encoder.mid.attn_1.q.weight"]
    with pytest.raises(checkpoint.CheckpointError, match="encoder.mid.attn_1.q.weight"):
        t_klvae_from_state_dict(state, config=tiny())


def test_other_architectures_are_named():
    vq = {"quantize.embedding.weight": torch.zeros(16, 4), "encoder.conv_in.weight": torch.zeros(8, 3, 3, 3)}
    with pytest.raises(checkpoint.CheckpointError, match="VQGAN"):
        t_klvae_from_state_dict(vq)
    sd3 = random_ldm_state(z=16)
    for config in (tiny(), None):
        with pytest.raises(checkpoint.CheckpointError, match="16 latent channels"):
            t_klvae_from_state_dict(sd3, config=config)
    with pytest.raises(checkpoint.CheckpointError, match="no KL autoencoder"):
        t_klvae_from_state_dict({"foo.weight": torch.zeros(1)})


def test_save_load_round_trip_with_marker(tmp_path):
    torch.manual_seed(1)
    model = TKLVAE(tiny()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # leave the identity init
    path = tmp_path / "t.safetensors"
    save_t_klvae(model, path)
    state, meta = checkpoint.load_state_dict(path)
    assert meta["nuwa_kind"] == "t_klvae" and MARKER_KEY in state
    loaded = load_t_klvae(path).eval()
    assert loaded.config == model.config
    video = torch.rand(1, 3, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.encode(video), model.encode(video))
    # with its marker tensor alone (metadata lost), a T-KLVAE file is still not read as an image VAE
    with pytest.raises(checkpoint.CheckpointError, match="T-KLVAE file without its config"):
        t_klvae_from_state_dict(state, {})


def test_encode_sample_is_seeded():
    model = TKLVAE(tiny()).eval()
    video = torch.rand(1, 2, 3, 8, 8)
    with torch.no_grad():
        a = model.encode(video, sample=True, generator=torch.Generator().manual_seed(3))
        b = model.encode(video, sample=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_bad_shapes_are_explained():
    model = TKLVAE(tiny())
    with pytest.raises(ValueError, match="multiples of 4"):
        model.encode(torch.zeros(1, 2, 3, 6, 8))
    with pytest.raises(ValueError, match=r"\[B, F, 3, H, W\]"):
        model.encode(torch.zeros(2, 3, 8, 8))
