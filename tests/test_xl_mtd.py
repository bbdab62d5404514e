"""Mask Temporal Diffusion: zero-initialised condition, factorized layers, file round trip."""
import pytest
import torch

from nuwa_core import checkpoint
from nuwa_core.xl.mask_temporal_diffusion import MaskTemporalDiffusion, MTDConfig, load_mtd, save_mtd


def inputs(b=2, f=5, seed=0, context_dim=32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, f, 4, 8, 8, generator=g)
    ctx = torch.randn(b, f, 7, context_dim, generator=g)
    cond = torch.randn(b, f, 4, 8, 8, generator=g)
    mask = torch.zeros(b, f)
    mask[:, 0] = mask[:, -1] = 1
    return x, ctx, cond * mask[:, :, None, None, None], mask


def perturb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model


@pytest.mark.parametrize("mi,si", [(True, True), (True, False), (False, True), (False, False)])
def test_fresh_model_ignores_condition(mi, si):
    torch.manual_seed(0)
    model = MaskTemporalDiffusion(MTDConfig.tiny(multiscale_injection=mi, symmetric_injection=si)).eval()
    x, ctx, cond, mask = inputs()
    t = torch.tensor([10.0, 737.5])
    with torch.no_grad():
        plain = model(x, t, ctx)
        conditioned = model(x, t, ctx, cond, mask)
        assert torch.equal(plain, conditioned)
        perturb(model)  # once trained, the condition matters
        assert not torch.allclose(model(x, t, ctx), model(x, t, ctx, cond, mask))


def test_injection_switches_set_where_the_condition_enters():
    def injected(**kw):
        model = MaskTemporalDiffusion(MTDConfig.tiny(channel_mult=(1, 2, 2), **kw))
        return sorted({k.split(".inject.")[0].rsplit(".", 1)[0] for k in model.state_dict() if ".inject." in k})
    assert injected() == ["down.0", "down.1", "down.2", "up.0", "up.1", "up.2"]
    assert injected(symmetric_injection=False) == ["up.0", "up.1", "up.2"]
    assert injected(multiscale_injection=False) == ["down.0", "up.0"]
    assert injected(multiscale_injection=False, symmetric_injection=False) == ["up.0"]


def test_frames_are_independent_for_spatial_layers_only():
    torch.manual_seed(0)
    model = MaskTemporalDiffusion(MTDConfig.tiny()).eval()
    x, ctx, _, _ = inputs(b=1, f=4)
    with torch.no_grad():
        whole = model(x, 500.0, ctx)
        # fresh temporal convs are the identity and temporal attentions add zero: frames stay independent
        per_frame = torch.cat([model(x[:, i:i + 1], 500.0, ctx[:, i:i + 1]) for i in range(4)], dim=1)
        assert (whole - per_frame).abs().max() < 1e-5
        perturb(model)
        whole = model(x, 500.0, ctx)
        per_frame = torch.cat([model(x[:, i:i + 1], 500.0, ctx[:, i:i + 1]) for i in range(4)], dim=1)
        assert (whole - per_frame).abs().max() > 1e-3  # trained temporal layers mix frames


def test_per_frame_prompts_and_shared_prompt():
    torch.manual_seed(0)
    model = MaskTemporalDiffusion(MTDConfig.tiny(context_dim=768)).eval()
    x, _, _, _ = inputs(b=1, f=3)
    clip = torch.randn(1, 77, 768)  # ComfyUI CONDITIONING
    with torch.no_grad():
        shared = model(x, 999.0, clip)
        repeated = model(x, 999.0, clip[:, None].expand(1, 3, 77, 768))
    assert torch.equal(shared, repeated)


def test_batch_equals_single():
    torch.manual_seed(0)
    model = perturb(MaskTemporalDiffusion(MTDConfig.tiny()).eval())
    x, ctx, cond, mask = inputs(b=3)
    t = torch.tensor([1.0, 400.0, 999.0])
    with torch.no_grad():
        batch = model(x, t, ctx, cond, mask)
        single = torch.cat([model(x[i:i + 1], t[i:i + 1], ctx[i:i + 1], cond[i:i + 1], mask[i:i + 1])
                            for i in range(3)])
    assert (batch - single).abs().max() < 1e-5


def test_save_load_round_trip(tmp_path):
    cfg = MTDConfig.tiny(symmetric_injection=False, temporal_kernel=5)
    model = perturb(MaskTemporalDiffusion(cfg).eval())
    path = tmp_path / "mtd.safetensors"
    save_mtd(model, path)
    assert checkpoint.read_metadata(path)["nuwa_kind"] == "mask_temporal_diffusion"
    loaded = load_mtd(path).eval()
    assert loaded.config == cfg
    x, ctx, cond, mask = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x, 3.0, ctx, cond, mask), model(x, 3.0, ctx, cond, mask))


def test_load_refuses_other_files(tmp_path):
    path = tmp_path / "other.safetensors"
    checkpoint.save_model_file(path, {"w": torch.zeros(1)}, "t_klvae")
    with pytest.raises(checkpoint.CheckpointError, match="not a Mask Temporal Diffusion file"):
        load_mtd(path)


def test_bad_inputs_are_explained():
    model = MaskTemporalDiffusion(MTDConfig.tiny())
    x, ctx, cond, mask = inputs()
    with pytest.raises(ValueError, match="multiples of 2"):
        model(torch.zeros(2, 5, 4, 7, 8), 1.0, ctx)
    with pytest.raises(ValueError, match="prompt embeddings"):
        model(x, 1.0, torch.zeros(2, 5, 7, 768))
    with pytest.raises(ValueError, match="together"):
        model(x, 1.0, ctx, cond)
