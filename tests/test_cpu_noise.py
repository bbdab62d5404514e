"""Noise on the CPU, as ComfyUI makes it: every random draw of the NUWA-Infinity samplers and the
NUWA-XL samplers / training loss comes from a CPU generator and is moved to the model's device, so a
seed gives the same tokens and latents on CPU, CUDA and MPS.

No GPU runs here, and the `meta` device accepts a CPU generator, so the rule is enforced
structurally: torch's random functions are wrapped, and a draw that passes both `generator=` and
`device=` (the pattern that fails on CUDA with a CPU generator, and that gives device-dependent noise
with a device generator) fails the test. Models reporting the `meta` device check that the nodes and
XLModel make CPU generators (torch.Generator(device="meta") raises).
"""
from __future__ import annotations

import pytest
import torch
from _pack import node
from _tiny import tiny_model, tiny_renderer

from nuwa_core.infinity import patch_samplers
from nuwa_core.infinity.arbitrary_direction_controller import Order
from nuwa_core.infinity.generation import NuwaInfinity
from nuwa_core.infinity.patch_samplers import SamplerSettings, gumbel_noise
from nuwa_core.infinity.renderer import Context
from nuwa_core.xl import diffusion
from nuwa_core.xl.diffusion_over_diffusion import generate_long_video
from nuwa_core.xl.mask_temporal_diffusion import MaskTemporalDiffusion, MTDConfig
from nuwa_core.xl.model import XLModel
from nuwa_core.xl.t_klvae import TKLVAE, TKLVAEConfig

RANDOM_FUNCTIONS = ("rand", "randn", "randint", "randperm", "normal", "multinomial", "bernoulli", "poisson")


@pytest.fixture
def draws(monkeypatch):
    """Every call of torch's random functions while the test runs: (name, generator, device kwarg);
    a call passing both generator= and device= fails at once."""
    seen = []
    for name in RANDOM_FUNCTIONS:
        original = getattr(torch, name)

        def wrapper(*args, _name=name, _original=original, **kwargs):
            gen, device = kwargs.get("generator"), kwargs.get("device")
            if gen is not None and device is not None:
                raise AssertionError(f"torch.{_name} drew with generator= (on {gen.device}) and device={device}: "
                                     f"draw on the generator's (CPU) device, then move the result")
            seen.append((_name, gen, device))
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch, name, wrapper)
    return seen


def _seeded(draws):
    return [d for d in draws if d[1] is not None]


@pytest.mark.parametrize("decoder", ["ar", "nar", "pnar"])
def test_infinity_samplers_draw_on_the_cpu(draws, decoder):
    r = tiny_renderer(decoder=decoder)
    gen = torch.Generator().manual_seed(0)
    sample = patch_samplers.SAMPLERS[decoder]
    tokens, _ = sample(r, Context(None, None, 0), Order.DOWN_RIGHT, r.text_kv(None), 2, SamplerSettings(steps=3), gen)
    assert tokens.shape == (2, 16)
    seeded = _seeded(draws)
    assert seeded and all(g is gen for _, g, _ in seeded), "the sampler's draws did not use its generator"


def test_generate_draws_on_the_cpu(draws):
    m = tiny_model(decoder="pnar")
    state = m.blank_canvas(2, 2)
    m.generate(state, m.plan_fill(state), SamplerSettings(steps=2), generator=torch.Generator().manual_seed(1))
    assert _seeded(draws)


def test_gumbel_noise_is_made_on_the_cpu_then_moved():
    a = gumbel_noise((3, 5), torch.Generator().manual_seed(4), "cpu")
    on_meta = gumbel_noise((3, 5), torch.Generator().manual_seed(4), torch.device("meta"))
    assert on_meta.device.type == "meta" and on_meta.shape == a.shape and a.dtype == torch.float32
    assert torch.equal(a, gumbel_noise((3, 5), torch.Generator().manual_seed(4), "cpu"))


def test_xl_sampling_and_training_draw_on_the_cpu(draws):
    torch.manual_seed(0)
    mtd = MaskTemporalDiffusion(MTDConfig.tiny(context_dim=8)).eval()
    gen = torch.Generator().manual_seed(0)
    prompts = torch.zeros(1, 2, 8)
    with torch.no_grad():
        lat = generate_long_video(mtd, mtd, prompts, 3, 2, (4, 8, 8), steps=2, generator=gen,
                                  sampler=diffusion.sample_ddpm)
    assert lat.shape == (5, 4, 8, 8)
    x0 = torch.randn(2, 3, 4, 8, 8)
    loss = diffusion.training_loss(lambda x, t: mtd(x, t, prompts.expand(2, -1, -1)), x0, generator=gen)
    assert torch.isfinite(loss)
    vae = TKLVAE(TKLVAEConfig.tiny()).eval()
    with torch.no_grad():
        vae.encode(torch.zeros(1, 2, 3, 16, 16), sample=True, generator=gen)
    assert len(_seeded(draws)) >= 4


def test_training_loss_noise_does_not_depend_on_the_device():
    """The loss's t and noise are drawn on the CPU: the same for a model on `meta` as on the CPU
    (before, they were drawn with device=x0.device, which raises on CUDA with a CPU generator)."""
    seen = []

    def spy(x, t):
        seen.append((x.device.type, t))
        return torch.zeros_like(x)

    x0 = torch.zeros(3, 2, 4, 4)
    diffusion.training_loss(spy, x0, generator=torch.Generator().manual_seed(7))
    diffusion.training_loss(spy, x0.to("meta"), generator=torch.Generator().manual_seed(7))
    assert seen[0][0] == "cpu" and seen[1][0] == "meta"
    assert seen[1][1].device.type == "meta"
    expected = torch.randint(0, 1000, (3,), generator=torch.Generator().manual_seed(7))
    assert torch.equal(seen[0][1].long(), expected)


def _meta_xl() -> XLModel:
    torch.manual_seed(0)
    mtd = MaskTemporalDiffusion(MTDConfig.tiny(context_dim=8)).eval()
    vae = TKLVAE(TKLVAEConfig.tiny()).eval()
    return XLModel(vae, mtd, mtd, {"prompts": "none", "width": 16, "height": 16}).to("meta")


def test_xl_model_samples_with_a_cpu_generator_on_another_device():
    """XLModel made its generator on the model's device: torch.Generator(device='meta') raises, as
    torch.Generator(device='mps') gives other noise than the CPU."""
    model = _meta_xl()
    keyframes = model.keyframes(None, 3, 2, seed=3)
    assert keyframes.device.type == "meta" and keyframes.shape == (3, 4, 8, 8)
    filled = model.fill(keyframes, None, 3, 2, seed=3)
    assert filled.device.type == "meta" and filled.shape == (5, 4, 8, 8)


def test_render_node_passes_its_seed(pack, monkeypatch):
    model = tiny_model()
    canvas = model.blank_canvas(1, 2)
    plan = model.plan_fill(canvas)
    seen = {}

    class Stop(Exception):
        pass

    def spy(self, state, plan, settings=None, text=None, generator=None, **kwargs):
        seen["generator"] = generator
        raise Stop

    monkeypatch.setattr(NuwaInfinity, "device", property(lambda self: torch.device("meta")))
    monkeypatch.setattr(NuwaInfinity, "generate", spy)
    with pytest.raises(Stop):
        node(pack, "NUWAPatchRenderer")(model, canvas, plan, 5, "auto", 4, 1.0, 16, 1.0)
    assert seen["generator"] == 5  # the seed itself: each patch's stream is a CPU generator seeded from it
