"""The T-KLVAE stage's objective (issue 15 item 4): Latent Diffusion's KL-VAE loss (training/vae_loss.py) on
hand-made tensors, the discriminator's start, resume, the earlier objective, and the latent scale measured
after training, stored in the file and used by the NUWA-XL model."""
from __future__ import annotations

import argparse
import csv
import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_cpu_noise import RANDOM_FUNCTIONS
from test_perceptual_loss import _random_lpips_file
from test_xl_training import _frames, _same, _vae_args

from nuwa_core import train
from nuwa_core.training import loop, t_klvae as tk, vae_loss
from nuwa_core.xl.mask_temporal_diffusion import MaskTemporalDiffusion, MTDConfig
from nuwa_core.xl.model import XLModel, save_mtd_xl
from nuwa_core.xl.t_klvae import load_t_klvae


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    return _frames(tmp_path_factory.mktemp("video") / "clip")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_nll_is_summed_over_pixels_and_divided_by_the_images():
    x = torch.zeros(2, 3, 2, 2)
    rec = torch.zeros(2, 3, 2, 2)
    rec[0, 0, 0, 0], rec[1, 2, 1, 1], rec[1, 1, 0, 1] = 1.0, -2.0, 0.5
    assert vae_loss.nll_loss(x, rec).item() == pytest.approx((1.0 + 2.0 + 0.5) / 2)
    # LPIPS per image, added to every pixel (LDM broadcasts it over the reconstruction loss): 12 pixels each
    p = torch.tensor([0.1, 0.3])
    assert vae_loss.nll_loss(x, rec, p, 0.5).item() == pytest.approx((3.5 + 0.5 * 12 * (0.1 + 0.3)) / 2)
    assert vae_loss.nll_loss(x, rec, p, 0.0).item() == pytest.approx(3.5 / 2)
    # the logvar form: rec / exp(logvar) + logvar on every pixel, then summed / n
    lv = math.log(2.0)
    assert vae_loss.nll_loss(x, rec, logvar=lv).item() == pytest.approx((3.5 / 2 + 24 * lv) / 2)


def test_kl_is_summed_over_latent_elements_and_divided_by_the_images():
    mean = torch.zeros(4, 2, 3, 3)
    logvar = torch.zeros(4, 2, 3, 3)
    assert vae_loss.kl_loss(mean, logvar).item() == 0.0  # the prior itself
    mean[1, 0, 0, 0], mean[3, 1, 2, 2] = 2.0, -1.0
    logvar[2, 1, 1, 1] = math.log(3.0)
    one = 0.5 * (3.0 - 1.0 - math.log(3.0))
    assert vae_loss.kl_loss(mean, logvar).item() == pytest.approx((0.5 * 4 + 0.5 * 1 + one) / 4)
    # the weight relative to the reconstruction: the same sums per image, so 1e-6 is LDM's ratio
    assert tk.KL_WEIGHT == {"ldm": 1e-6, "l1": 1e-4}


def test_adaptive_weight_is_the_gradient_norm_ratio_at_the_last_layer():
    last = torch.randn(3, 4, requires_grad=True)
    nll, g = 3.0 * last.sum(), -1.0 * last.sum()  # gradients 3 and -1 everywhere: norms 3 sqrt(12), sqrt(12)
    w = vae_loss.adaptive_weight(nll, g, last, disc_weight=0.5)
    assert not w.requires_grad
    assert w.item() == pytest.approx(0.5 * 3 * math.sqrt(12) / (math.sqrt(12) + 1e-4), rel=1e-6)
    assert vae_loss.adaptive_weight(nll, 0.0 * last.sum(), last, 1.0).item() == pytest.approx(1e4)  # clamped
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.0])
    assert vae_loss.hinge_d_loss(real, fake).item() == pytest.approx(0.5 * ((0 + 0.5) / 2 + (0 + 1.0) / 2))
    assert not vae_loss.disc_active(2, 3) and vae_loss.disc_active(3, 3)


def _log(tmp_path):
    with open(tmp_path / "t_klvae.csv") as fh:
        return list(csv.DictReader(fh))


def test_ldm_objective_is_the_default_and_the_discriminator_starts_at_disc_start(tmp_path, frames):
    res = train.main(_vae_args(frames, tmp_path / "d.safetensors", "--steps", "4", "--disc-start", "2",
                               "--log-dir", str(tmp_path)))
    rows = _log(tmp_path)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    for r in rows[:2]:  # optimizer steps 0 and 1: no adversarial term, no discriminator step
        assert float(r["g_adv"]) == 0.0 and float(r["d_loss"]) == 0.0 and float(r["d_weight"]) == 0.0
        assert float(r["loss"]) == pytest.approx(float(r["nll"]) + 1e-6 * float(r["kl"]), rel=1e-5)
    for r in rows[2:]:
        assert float(r["d_loss"]) > 0 and float(r["d_weight"]) > 0
        assert float(r["loss"]) == pytest.approx(float(r["nll"]) + 1e-6 * float(r["kl"])
                                                 + float(r["d_weight"]) * float(r["g_adv"]), rel=1e-4, abs=1e-4)
    # nll is the L1 summed per frame: mean |x - rec| x 3 x 16 x 16 (no LPIPS file given)
    assert res["nll"] == pytest.approx(res["l1"] * 3 * 16 * 16, rel=1e-4)


def test_ldm_resume_with_the_discriminator_on_equals_one_run(tmp_path, frames):
    extra = ("--disc-start", "1")
    train.main(_vae_args(frames, tmp_path / "one.safetensors", "--steps", "3", *extra))
    train.main(_vae_args(frames, tmp_path / "two.safetensors", "--steps", "2", *extra))
    train.main(_vae_args(frames, tmp_path / "two.safetensors", "--steps", "3", "--resume", *extra))
    _same(tmp_path / "one.safetensors", tmp_path / "two.safetensors")  # VAE, discriminator and optimizers
    with pytest.raises(loop.TrainingError, match="disc_start"):  # another objective: not the same run
        train.main(_vae_args(frames, tmp_path / "two.safetensors", "--steps", "4", "--resume"))


def test_lpips_from_a_local_file(tmp_path, frames):
    weights = _random_lpips_file(tmp_path / "lpips.safetensors")
    res = train.main(_vae_args(frames, tmp_path / "p.safetensors", "--steps", "1", "--lpips", str(weights)))
    assert res["lpips"] > 0
    assert res["nll"] == pytest.approx((res["l1"] + res["lpips"]) * 3 * 16 * 16, rel=1e-4)
    with pytest.raises(loop.TrainingError, match="lpips"):
        train.main(_vae_args(frames, tmp_path / "q.safetensors", "--steps", "1", "--objective", "l1",
                             "--lpips", str(weights)))


def test_the_earlier_objective_stays_and_its_checkpoints_resume(tmp_path, frames):
    res = train.main(_vae_args(frames, tmp_path / "o.safetensors", "--steps", "1", "--objective", "l1"))
    assert res["loss"] == pytest.approx(res["l1"] + 1e-4 * res["kl"], rel=1e-5)  # mean L1 + 1e-4 x mean KL
    # its run configuration has no new keys: checkpoints written before --objective existed resume with it
    args = argparse.Namespace(preset="tiny", init=None, size="16", clip_frames=3, clip_stride=1, frame_step=1,
                              batch=2, lr=1e-4, kl_weight=1e-4, seed=0, flip=False, objective="l1",
                              disc_start=50001, disc_weight=0.5, lpips=None, lpips_weight=1.0)
    d = tk.t_klvae_config_dict(args, tk.tklvae_preset("tiny"))
    assert {"objective", "disc_start", "disc_weight", "lpips"}.isdisjoint(d)
    train.main(_vae_args(frames, tmp_path / "o.safetensors", "--steps", "2", "--objective", "l1", "--resume"))


def test_a_short_run_stores_the_measured_scale_and_the_xl_model_uses_it(tmp_path, frames, capsys):
    res = train.main(_vae_args(frames, tmp_path / "s.safetensors", "--steps", "2"))
    err = capsys.readouterr().err
    assert f"latent std {res['latent_std']:.5g}" in err and "stored latent_scale" in err
    with safe_open(str(tmp_path / "s.safetensors"), "pt") as fh:
        stored = json.loads(fh.metadata()["config"])["latent_scale"]
    assert stored == pytest.approx(1.0 / res["latent_std"], rel=1e-6) and stored != pytest.approx(0.18215)
    torch.manual_seed(0)
    save_mtd_xl(MaskTemporalDiffusion(MTDConfig.tiny(context_dim=8)), tmp_path / "mtd.safetensors",
                {"role": "both", "L": 3, "depth": 2, "prompts": "none", "fps": 6.0, "width": 16, "height": 16})
    model = XLModel.load(tmp_path / "s.safetensors", tmp_path / "mtd.safetensors")
    assert model.vae.config.latent_scale == pytest.approx(stored)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    z = model.encode(x)
    with torch.no_grad():
        raw = model.vae.encode(x[None], chunk=model.vae.config.clip_frames)[0]
    assert torch.allclose(z, raw * stored, atol=1e-5)
    assert z.std().item() == pytest.approx(raw.std().item() * stored, rel=1e-4)
    # a file whose config has no latent_scale keeps the former value
    with safe_open(str(tmp_path / "s.safetensors"), "pt") as fh:
        meta = dict(fh.metadata())
    tensors = load_file(str(tmp_path / "s.safetensors"))
    cfg = json.loads(meta["config"])
    del cfg["latent_scale"]
    save_file(tensors, str(tmp_path / "old.safetensors"), {**meta, "config": json.dumps(cfg)})
    assert load_t_klvae(tmp_path / "old.safetensors").config.latent_scale == pytest.approx(0.18215)


def test_the_ldm_objective_draws_on_the_cpu_generator(tmp_path, frames, monkeypatch):
    """Issue 15 item 1's rule (tests/test_cpu_noise.py) for this stage's new path: no draw passes both
    generator= and device=."""
    seeded = []
    for name in RANDOM_FUNCTIONS:
        original = getattr(torch, name)

        def wrapper(*args, _name=name, _original=original, **kwargs):
            gen = kwargs.get("generator")
            assert gen is None or kwargs.get("device") is None, f"torch.{_name}: generator= and device="
            seeded.append(gen is not None)
            return _original(*args, **kwargs)
        monkeypatch.setattr(torch, name, wrapper)
    train.main(_vae_args(frames, tmp_path / "c.safetensors", "--steps", "2", "--disc-start", "1"))
    assert any(seeded)  # the clips and the posterior noise come from the data generator
