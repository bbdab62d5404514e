"""Training entry points: render-and-optimize, checkpoint/resume, failure modes (tiny configs, CPU)."""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nuwa_core.infinity import arbitrary_direction_controller as adc
from nuwa_core import train
from nuwa_core.training import data, loop, renderer as renderer_stage
from nuwa_core.checkpoint import atomic_write
from nuwa_core.infinity.renderer import Context, Renderer, RendererConfig
from nuwa_core.infinity.vqgan import VQModel, get_config, load_vqgan, save_vqgan

from _training import renderer_args, trained_weights, vqgan_args, write_image

REPO = Path(__file__).resolve().parents[1]


def _tiny_renderer(decoder="ar", vocab=64):
    torch.manual_seed(0)
    return Renderer(RendererConfig(vocab_size=vocab, patch_size=(1, 2, 2), n_layer=1, n_head=2, d_model=32,
                                   extent=(0, 1, 1), decoder=decoder))


# ---- render-and-optimize ----------------------------------------------------------------------

@pytest.mark.parametrize("decoder", ["ar", "pnar"])
def test_render_and_optimize_decreases_loss_on_a_repeated_grid(decoder):
    r = _tiny_renderer(decoder)
    opt = torch.optim.Adam(r.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(64, (2, 1, 4, 4), generator=torch.Generator().manual_seed(1))
    first = renderer_stage.render_and_optimize(r, renderer_stage._TeacherForced(r), tokens, adc.Order.DOWN_RIGHT, opt, gen)["loss"]
    for _ in range(15):
        last = renderer_stage.render_and_optimize(r, renderer_stage._TeacherForced(r), tokens, adc.Order.DOWN_RIGHT, opt, gen)["loss"]
    assert last < first - 0.5


def test_edge_tokens_are_the_first_tokens_row_and_column_in_every_order():
    r = Renderer(RendererConfig(vocab_size=64, patch_size=(1, 3, 4), n_layer=1, n_head=2, d_model=32,
                                extent=(0, 1, 1)))  # 3 x 4 tells rows from columns
    for order in adc.Order:
        first = int(r.permutation(order)[0][0])
        edge = r.edge_tokens(order).view(3, 4)
        want = torch.zeros(3, 4, dtype=torch.bool)
        want[first // 4] = True
        want[:, first % 4] = True
        assert torch.equal(edge, want), order
        assert int(edge.sum()) == 3 + 4 - 1


def test_edge_weight_weights_the_loss_of_the_edge_tokens():
    """edge_weight 1 is the plain loss; another weight is the weighted mean of the per-token losses."""
    tokens = torch.randint(64, (2, 1, 2, 2), generator=torch.Generator().manual_seed(1))  # one patch
    losses = {}
    for w in (1.0, 3.0):
        r = _tiny_renderer()
        opt = torch.optim.SGD(r.parameters(), lr=0.0)
        losses[w] = renderer_stage.render_and_optimize(r, renderer_stage._TeacherForced(r), tokens, adc.Order.DOWN_RIGHT,
                                                       opt, torch.Generator(), label_smoothing=0.1, edge_weight=w)["loss"]
    r = _tiny_renderer()
    with torch.no_grad():
        logits, _ = renderer_stage._TeacherForced(r)(tokens.reshape(2, 4), adc.Order.DOWN_RIGHT,
                                                     Context(None, None, 0), None, None)
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens.reshape(2, 4), reduction="none",
                                                  label_smoothing=0.1)  # [B, M]
    weight = torch.tensor([3.0, 3.0, 3.0, 1.0])  # a 2 x 2 patch down-right: all but the last token are edge
    assert losses[1.0] == pytest.approx(per_token.mean().item(), rel=1e-5)
    assert losses[3.0] == pytest.approx(((per_token * weight).sum() / (weight.sum() * 2)).item(), rel=1e-5)
    assert losses[3.0] != pytest.approx(losses[1.0], rel=1e-3)


def test_one_optimizer_step_per_patch_or_per_sample_with_accumulate():
    tokens = torch.randint(64, (2, 1, 4, 6), generator=torch.Generator().manual_seed(1))  # 2 x 3 patches
    for accumulate, expected in ((False, 6), (True, 1)):
        r = _tiny_renderer()
        opt = torch.optim.Adam(r.parameters(), lr=1e-3)
        calls = []
        orig = opt.step
        opt.step = lambda *a, **k: (calls.append(1), orig(*a, **k))[1]
        res = renderer_stage.render_and_optimize(r, renderer_stage._TeacherForced(r), tokens, adc.Order.RIGHT_DOWN, opt,
                                        torch.Generator(), accumulate=accumulate)
        assert res["optimizer_steps"] == expected == len(calls)
        assert res["patches"] == 6
        assert res["peak_pool"] >= 2  # the pool fed the later patches


def test_no_context_baseline_keeps_the_pool_empty():
    r = _tiny_renderer()
    opt = torch.optim.Adam(r.parameters(), lr=1e-3)
    tokens = torch.randint(64, (1, 1, 4, 4), generator=torch.Generator().manual_seed(1))
    res = renderer_stage.render_and_optimize(r, renderer_stage._TeacherForced(r), tokens, adc.Order.DOWN_LEFT, opt, torch.Generator(),
                                    no_context=True)
    assert res["peak_pool"] == 0 and res["optimizer_steps"] == 4


def test_augmented_crops_are_seeded_and_in_range():
    img = torch.rand(3, 40, 120) * 2 - 1
    a = data.random_crops([img], 3, (16, 32), torch.Generator().manual_seed(5), data.Augment())
    b = data.random_crops([img], 3, (16, 32), torch.Generator().manual_seed(5), data.Augment())
    assert a.shape == (3, 3, 16, 32) and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    plain = data.random_crops([img], 1, (40, 120), torch.Generator(), data.Augment.off())
    assert torch.allclose(plain[0], img, atol=1e-5)  # no augmentation: the identity window


def test_rotation_keeps_a_wide_strips_horizon_level():
    """The rotation angle is meant for a square window: on a 8:1 strip it must not tilt the horizon
    out of the image (tan(10 deg) * 512 px would move the ends by 90 px of a 64 px strip)."""
    img = -torch.ones(3, 64, 512)
    img[:, :32] = 1.0  # white sky over a black field
    aug = dataclasses.replace(data.Augment.off(), rotate_deg=10.0)
    for seed in range(4):
        x = data.random_crops([img], 1, (64, 512), torch.Generator().manual_seed(seed), aug)[0, 0]
        horizon = (x > 0).float().sum(0)  # sky pixels in each column
        # a square of the short side moves its ends by tan(10 deg) * 32 = 5.6 px
        assert horizon.min() >= 32 - 7 and horizon.max() <= 32 + 7, (seed, horizon.min(), horizon.max())
    square = data.random_crops([img[:, :, :64]], 1, (64, 64), torch.Generator().manual_seed(0), aug)[0, 0]
    tilt = (square > 0).float().sum(0)
    assert tilt[-1] - tilt[0] != 0  # a square crop still rotates


def test_native_crop_scale_keeps_a_large_images_resolution():
    """A tokenizer encodes a canvas at the image's own resolution; appendix D's random resized crop
    shows it a 600 px painting shrunk 6-9 times into each 64 px crop. scale_of "crop" keeps crops
    within 0.8-1.25 of native: measured on a ramp, px step per crop px against the image's own."""
    ramp = torch.linspace(-1, 1, 600).expand(3, 600, 600).contiguous()  # x -> value, 2/599 a px
    native_step = 2 / 599

    def steps(aug):
        x = data.random_crops([ramp], 16, (64, 64), torch.Generator().manual_seed(0), aug)[:, 0]
        return x.diff(dim=2).abs().mean((1, 2)) / native_step  # [16]: source px per crop px

    native = steps(data.Augment(scale=(0.8, 1.25), scale_of="crop", brightness=0.0, contrast=0.0, saturation=0.0,
                                noise=0.0))
    shrunk = steps(dataclasses.replace(data.Augment.off(), scale=(0.6, 1.0)))
    assert native.min() > 0.75 and native.max() < 1.35, native
    assert shrunk.min() > 5, shrunk


# ---- whole runs, resume, checkpoints -----------------------------------------------------------

def test_vqgan_resume_equals_one_run(tmp_path):
    img = write_image(tmp_path / "a.png")
    torch.set_num_threads(1)
    res = train.main(vqgan_args(img, tmp_path / "one.safetensors", "--steps", "6", "--one-shot"))
    assert res["step"] == 6 and (tmp_path / "one.safetensors").is_file()
    train.main(vqgan_args(img, tmp_path / "two.safetensors", "--steps", "3", "--one-shot"))
    train.main(vqgan_args(img, tmp_path / "two.safetensors", "--steps", "6", "--one-shot", "--resume"))
    a, b = trained_weights(tmp_path / "one.safetensors"), trained_weights(tmp_path / "two.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_vqgan_lowres_weight_adds_the_token_colour_error(tmp_path):
    img = write_image(tmp_path / "a.png")
    torch.set_num_threads(1)
    plain = train.main(vqgan_args(img, tmp_path / "a.safetensors", "--steps", "1", "--one-shot"))
    res = train.main(vqgan_args(img, tmp_path / "b.safetensors", "--steps", "1", "--one-shot", "--lowres-weight", "5"))
    assert "lowres" in res and res["lowres"] > 0
    assert res["loss"] == pytest.approx(res["l1"] + 5 * res["lowres"] + res["codebook"], rel=1e-5)
    assert plain["loss"] == pytest.approx(plain["l1"] + plain["codebook"], rel=1e-5)


def test_vqgan_restarts_no_codes_at_its_last_step(tmp_path):
    """A code re-seeded at a run's last step would ship without the decoder ever having trained with it:
    unused codes are re-seeded at the start of the step after every --restart-every-th."""
    img = write_image(tmp_path / "a.png")
    torch.set_num_threads(1)
    three = train.main(vqgan_args(img, tmp_path / "a.safetensors", "--steps", "3", "--one-shot"))
    four = train.main(vqgan_args(img, tmp_path / "b.safetensors", "--steps", "4", "--one-shot"))
    assert three["restarted"] == 0 and four["restarted"] > 0  # --restart-every 3: the tiny codebook has unused codes
    before, after = load_vqgan(tmp_path / "a.safetensors"), load_vqgan(tmp_path / "b.safetensors")
    assert not torch.equal(before.quantize.embedding.weight, after.quantize.embedding.weight)


def test_shift_equivariance_loss_is_zero_only_for_latents_that_move_with_the_picture():
    from nuwa_core.training.vqgan import shift_equivariance_loss
    ys, xs = torch.meshgrid(torch.arange(6.0), torch.arange(7.0), indexing="ij")
    field = lambda dy, dx: torch.stack([2 * (ys + dy) + 3 * (xs + dx), (ys + dy) - (xs + dx)])  # linear: bilinear is exact
    offsets = torch.tensor([[0.25, 0.5], [0.875, 0.0]])
    z = torch.stack([field(0, 0), field(0, 0)])
    moved = torch.stack([field(*o.tolist()) for o in offsets])
    assert shift_equivariance_loss(z, moved, offsets).item() < 1e-10
    assert shift_equivariance_loss(z, z, offsets).item() > 1e-3  # latents that stay put
    assert shift_equivariance_loss(10 * z, 10 * z, offsets).item() == pytest.approx(
        shift_equivariance_loss(z, z, offsets).item(), rel=1e-4)  # shrinking the latents does not pay


def test_shifted_pairs_are_the_same_pixels_moved_by_the_offsets():
    from nuwa_core.training.vqgan import shifted_pairs
    x = torch.randn(5, 3, 12, 12)
    crop, moved, offsets = shifted_pairs(x, 8, 4, torch.Generator().manual_seed(0))
    assert crop.shape == moved.shape == (5, 3, 8, 8) and torch.equal(crop, x[..., :8, :8])
    for b, (dy, dx) in enumerate(offsets.long().tolist()):
        assert 0 <= dy < 4 and 0 <= dx < 4 and dy + dx > 0
        assert torch.equal(moved[b], x[b, :, dy:dy + 8, dx:dx + 8])


def test_vqgan_shift_weight_adds_the_equivariance_loss(tmp_path):
    img = write_image(tmp_path / "a.png")
    torch.set_num_threads(1)
    res = train.main(vqgan_args(img, tmp_path / "a.safetensors", "--steps", "1", "--one-shot", "--shift-weight", "3"))
    assert res["shift"] > 0
    assert res["loss"] == pytest.approx(res["l1"] + 3 * res["shift"] + res["codebook"], rel=1e-5)


def test_decoder_finetune_keeps_the_tokens_and_swaps_into_a_bundle(tmp_path, tokenizer):
    img = write_image(tmp_path / "a.png")
    torch.set_num_threads(1)
    with pytest.raises(loop.TrainingError, match="--init"):
        train.main(vqgan_args(img, tmp_path / "x.safetensors", "--steps", "1", "--train", "decoder"))
    dec = tmp_path / "dec.safetensors"
    train.main(vqgan_args(img, dec, "--steps", "4", "--lr", "1e-2", "--train", "decoder", "--init", str(tokenizer),
                          "--save-dtype", "fp32"))
    before, after = load_vqgan(tokenizer).state_dict(), load_vqgan(dec).state_dict()
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv.", "quantize."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))

    bundle = tmp_path / "r.safetensors"
    train.main(renderer_args(img, tokenizer, bundle, "--steps", "1", "--save-dtype", "fp32"))
    train.main(["bundle", "--model", str(bundle), "--tokenizer", str(dec), "--out", str(tmp_path / "swapped.safetensors")])
    from nuwa_core.infinity.generation import NuwaInfinity
    old, new = NuwaInfinity.load(bundle), NuwaInfinity.load(tmp_path / "swapped.safetensors")
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.equal(old.vqgan.encode_tokens(x), new.vqgan.encode_tokens(x))
    for k, v in old.renderer.state_dict().items():
        assert torch.equal(v, new.renderer.state_dict()[k]), k
    ids = old.vqgan.encode_tokens(x)
    assert torch.equal(new.vqgan.decode_tokens(ids), load_vqgan(dec).decode_tokens(ids))
    assert not torch.equal(old.vqgan.decode_tokens(ids), new.vqgan.decode_tokens(ids))

    # a tokenizer trained whole makes other tokens: refused, saying why
    full = tmp_path / "full.safetensors"
    train.main(vqgan_args(img, full, "--steps", "2", "--lr", "1e-2", "--init", str(tokenizer), "--save-dtype", "fp32"))
    with pytest.raises(loop.TrainingError, match="other tokens"):
        train.main(["bundle", "--model", str(bundle), "--tokenizer", str(full), "--out", str(tmp_path / "bad.safetensors")])
    assert not (tmp_path / "bad.safetensors").exists()


def test_renderer_resume_equals_one_run_and_bundle_loads(tmp_path, tokenizer):
    img = write_image(tmp_path / "a.png")
    torch.set_num_threads(1)
    res = train.main(renderer_args(img, tokenizer, tmp_path / "one.safetensors", "--steps", "4", "--one-shot"))
    assert res["optimizer_steps"] == 4 * 4  # 2x2 patches per sample, one step each
    # the learning rate decays over --steps: a run cut short with --stop-at continues it exactly
    stopped = train.main(renderer_args(img, tokenizer, tmp_path / "two.safetensors", "--steps", "4", "--one-shot",
                                       "--stop-at", "2"))
    assert stopped["stopped"] == "stop-at" and stopped["step"] == 2
    train.main(renderer_args(img, tokenizer, tmp_path / "two.safetensors", "--steps", "4", "--one-shot", "--resume"))
    a, b = trained_weights(tmp_path / "one.safetensors"), trained_weights(tmp_path / "two.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # without decay, a run can also be extended: --steps 2, then --resume --steps 4
    for name, steps in (("three", "2"), ("three", "4"), ("four", "4")):
        train.main(renderer_args(img, tokenizer, tmp_path / f"{name}.safetensors", "--steps", steps, "--one-shot",
                                 "--decay", "none", *(["--resume"] if (name, steps) == ("three", "4") else [])))
    a, b = trained_weights(tmp_path / "three.safetensors"), trained_weights(tmp_path / "four.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    from nuwa_core.infinity.generation import NuwaInfinity
    from nuwa_core.infinity.patch_samplers import SamplerSettings
    m = NuwaInfinity.load(tmp_path / "one.safetensors")
    st = m.blank_canvas(1, 3)
    st = m.generate(st, m.plan_fill(st), SamplerSettings(top_k=8), generator=torch.Generator().manual_seed(0))
    assert st.known.all() and m.decode(st).shape == (1, 8, 24, 3)


def test_renderer_init_fine_tunes_a_bundle_and_refuses_one_that_does_not_fit(tmp_path, tokenizer):
    img = write_image(tmp_path / "a.png")
    torch.set_num_threads(1)
    base = tmp_path / "base.safetensors"
    train.main(renderer_args(img, tokenizer, base, "--steps", "2", "--save-dtype", "fp32"))
    from nuwa_core.infinity.generation import NuwaInfinity
    want = NuwaInfinity.load(base).renderer.state_dict()
    # lr 0: the run's weights are exactly where it started
    train.main(renderer_args(img, tokenizer, tmp_path / "ft.safetensors", "--steps", "1", "--lr", "0",
                             "--init", str(base), "--save-dtype", "fp32"))
    got = NuwaInfinity.load(tmp_path / "ft.safetensors").renderer.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)
    train.main(renderer_args(img, tokenizer, tmp_path / "fresh.safetensors", "--steps", "1", "--lr", "0", "--seed", "3",
                             "--save-dtype", "fp32"))
    fresh = NuwaInfinity.load(tmp_path / "fresh.safetensors").renderer.state_dict()
    assert not all(torch.equal(want[k], fresh[k]) for k in want)

    with pytest.raises(loop.TrainingError, match="d_model"):
        train.main(renderer_args(img, tokenizer, tmp_path / "x.safetensors", "--steps", "1", "--init", str(base),
                                 "--dim", "64"))
    torch.manual_seed(1)
    other = tmp_path / "other_vq.safetensors"
    save_vqgan(VQModel(get_config("tiny")), other)
    with pytest.raises(loop.TrainingError, match="other tokens"):
        train.main(renderer_args(img, other, tmp_path / "y.safetensors", "--steps", "1", "--init", str(base)))


def test_renderer_dropout_changes_training_only(tmp_path, tokenizer):
    """--dropout regularises training (other weights than the same run without it), is saved in the config,
    never drops during generation (same seed, same canvas twice), and a bundle trained without it can be
    fine-tuned with it."""
    from nuwa_core.infinity.generation import NuwaInfinity
    from nuwa_core.infinity.patch_samplers import SamplerSettings
    img = write_image(tmp_path / "a.png")
    torch.set_num_threads(1)
    plain, dropped = tmp_path / "plain.safetensors", tmp_path / "dropped.safetensors"
    train.main(renderer_args(img, tokenizer, plain, "--steps", "2", "--save-dtype", "fp32"))
    train.main(renderer_args(img, tokenizer, dropped, "--steps", "2", "--save-dtype", "fp32", "--dropout", "0.5"))
    a, b = trained_weights(plain), trained_weights(dropped)
    assert not all(torch.equal(a[k], b[k]) for k in a)
    m = NuwaInfinity.load(dropped)
    assert m.renderer.config.dropout == 0.5

    def canvas():
        st = m.blank_canvas(1, 2)
        return m.generate(st, m.plan_fill(st), SamplerSettings(top_k=8), generator=torch.Generator().manual_seed(0)).tokens
    torch.manual_seed(1)
    first = canvas()
    torch.manual_seed(2)  # dropout would draw from the global generator
    assert torch.equal(first, canvas())
    train.main(renderer_args(img, tokenizer, tmp_path / "ft.safetensors", "--steps", "1", "--lr", "0", "--init", str(plain),
                             "--dropout", "0.2", "--save-dtype", "fp32"))
    got = trained_weights(tmp_path / "ft.safetensors")
    assert all(torch.equal(a[k], got[k]) for k in a)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\).*got 1\.0"):
        train.main(renderer_args(img, tokenizer, tmp_path / "bad.safetensors", "--steps", "1", "--dropout", "1"))
    with pytest.raises(loop.TrainingError, match=r"--token-noise .*0 <= P < 1.*got 1\.0"):
        train.main(renderer_args(img, tokenizer, tmp_path / "bad.safetensors", "--steps", "1", "--token-noise", "1"))
    with pytest.raises(loop.TrainingError, match="--token-noise .*--decoder ar.*--decoder nar"):
        train.main(renderer_args(img, tokenizer, tmp_path / "bad.safetensors", "--steps", "1", "--token-noise", "0.2",
                                 "--decoder", "nar"))


def test_renderer_init_grows_an_image_model_into_a_video_model(tmp_path, tokenizer):
    """--init with a larger frame extent e_f (an image model fine-tuned on video): every weight carries over,
    and each new frame offset (dk, di, dj) of the relative-position table starts from the trained (0, di, dj)."""
    img = write_image(tmp_path / "a.png")
    torch.set_num_threads(1)
    base = tmp_path / "image.safetensors"
    train.main(renderer_args(img, tokenizer, base, "--steps", "2", "--save-dtype", "fp32"))
    from nuwa_core.infinity.generation import NuwaInfinity
    image_model = NuwaInfinity.load(base).renderer
    grown = tmp_path / "video.safetensors"
    train.main(renderer_args(img, tokenizer, grown, "--steps", "1", "--lr", "0", "--init", str(base),
                             "--save-dtype", "fp32", "--extent", "2,1,1"))
    video_model = NuwaInfinity.load(grown).renderer
    assert video_model.config.extent == (2, 1, 1)
    want, got = image_model.state_dict(), video_model.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want if k != "rel.table")
    small, large = image_model.rel, video_model.rel
    for dk in range(-2, 3):
        for di in (-1, 0, 1):
            for dj in (-1, 0, 1):
                assert torch.equal(large.table[:, large.index((dk, di, dj))], small.table[:, small.index((0, di, dj))])
    with pytest.raises(loop.TrainingError, match="only a larger frame extent"):  # a wider spatial extent is not grown
        train.main(renderer_args(img, tokenizer, tmp_path / "x.safetensors", "--steps", "1", "--init", str(base),
                                 "--extent", "1,2,1"))
    with pytest.raises(loop.TrainingError, match="extent"):  # nor a video model shrunk into an image model
        train.main(renderer_args(img, tokenizer, tmp_path / "y.safetensors", "--steps", "1", "--init", str(grown)))


def test_accumulate_counts_one_step_per_sample(tmp_path, tokenizer):
    img = write_image(tmp_path / "a.png")
    res = train.main(renderer_args(img, tokenizer, tmp_path / "acc.safetensors", "--steps", "3", "--accumulate"))
    assert res["optimizer_steps"] == 3


def test_resume_with_another_config_is_refused_naming_it(tmp_path, tokenizer):
    img = write_image(tmp_path / "a.png")
    train.main(renderer_args(img, tokenizer, tmp_path / "r.safetensors", "--steps", "1"))
    with pytest.raises(loop.TrainingError, match="d_model"):
        train.main(renderer_args(img, tokenizer, tmp_path / "r.safetensors", "--steps", "2", "--resume", "--dim", "64"))
    with pytest.raises(loop.TrainingError, match="no training checkpoint"):
        train.main(renderer_args(img, tokenizer, tmp_path / "none.safetensors", "--steps", "2", "--resume"))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tokenizer):
    img = write_image(tmp_path / "a.png")
    out = tmp_path / "n.safetensors"
    args = renderer_args(img, tokenizer, out, "--steps", "10", "--debug-nan-at", "3")
    args[args.index("--save-every") + 1] = "2"
    with pytest.raises(loop.TrainingDiverged, match=r"step 3.*last good checkpoint.*step 2"):
        train.main(args)
    state = torch.load(loop.train_paths(out)[1], weights_only=True)
    assert state["step"] == 2
    assert not out.exists()  # no model written from a diverged run
    v = vqgan_args(img, tmp_path / "v.safetensors", "--steps", "5", "--debug-nan-at", "1")
    with pytest.raises(loop.TrainingDiverged, match="NaN"):
        train.main(v)


def test_atomic_write_leaves_the_old_file_when_a_write_dies(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_write(path, lambda tmp: torch.save({"step": torch.tensor(1)}, tmp))

    def dies(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half a checkp")
        raise KeyboardInterrupt  # killed mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, dies)
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary left behind


def test_bad_inputs_name_the_problem(tmp_path, tokenizer):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(loop.TrainingError, match="no image files"):
        train.main(vqgan_args(empty, tmp_path / "x.safetensors", "--steps", "1"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad.png").write_bytes(b"not a png")
    with pytest.raises(loop.TrainingError, match="bad.png"):
        train.main(vqgan_args(broken, tmp_path / "x.safetensors", "--steps", "1"))
    small = write_image(tmp_path / "small" / "s.png", w=6, h=6)
    with pytest.raises(loop.TrainingError, match="s.png.*smaller than"):
        train.main(renderer_args(small, tokenizer, tmp_path / "x.safetensors", "--steps", "1"))
    with pytest.raises(loop.TrainingError, match="no such file"):
        train.main(vqgan_args(tmp_path / "missing", tmp_path / "x.safetensors", "--steps", "1"))
    assert train.cli(vqgan_args(empty, tmp_path / "x.safetensors", "--steps", "1")) == 2


def test_rgba_images_are_composited(tmp_path):
    img = write_image(tmp_path / "rgba.png", mode="RGBA")
    (x,) = data.load_images(str(img))
    assert x.shape == (3, 32, 64)


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env


@pytest.mark.slow
def test_sigterm_saves_before_exiting(tmp_path, tokenizer):
    import signal
    import time
    img = write_image(tmp_path / "a.png")
    out = tmp_path / "s.safetensors"
    args = renderer_args(img, tokenizer, out, "--steps", "100000")
    args[args.index("--save-every") + 1] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "nuwa_core.train", *args],
                            cwd=REPO, env=_env(), stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not loop.train_paths(out)[1].exists() and time.time() < deadline:  # the loop (and handler) runs
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    state = torch.load(loop.train_paths(out)[1], weights_only=True)
    assert state["step"] > 0 and out.is_file()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not found")
@pytest.mark.parametrize("stage", ["renderer", "vqgan"])
def test_two_process_ddp_keeps_replicas_identical(tmp_path, tokenizer, stage):
    img = write_image(tmp_path / "a.png")
    out = tmp_path / "ddp.safetensors"
    torchrun = str(Path(sys.executable).parent / "torchrun")
    args = (renderer_args(img, tokenizer, out, "--steps", "2", "--debug-dump-replicas") if stage == "renderer" else
            vqgan_args(img, out, "--steps", "4", "--debug-dump-replicas"))  # disc on from step 2, restart at the 4th
    cmd = [torchrun, "--nproc_per_node=2", "--master_port=29517", "-m", "nuwa_core.train", *args]
    res = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    a = torch.load(out.with_name(out.name + ".replica0.pt"), weights_only=True)
    b = torch.load(out.with_name(out.name + ".replica1.pt"), weights_only=True)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_token_bank_with_wrap_trains(tmp_path, tokenizer):
    img = write_image(tmp_path / "a.png")
    res = train.main(renderer_args(img, tokenizer, tmp_path / "b.safetensors", "--steps", "2", "--one-shot",
                                   "--token-bank", "3", "--wrap"))
    assert res["optimizer_steps"] == 8
    bank = renderer_stage.TokenBank([torch.arange(12).view(2, 6)], [None])
    crops = renderer_stage.token_crops(bank, 20, (2, 4), torch.Generator().manual_seed(0), wrap="x")
    assert crops.shape == (20, 1, 2, 4)
    assert ((crops[:, 0, 0, 1:] - crops[:, 0, 0, :-1]) % 6 == 1).all()  # consecutive columns, wrapping


def test_lr_warms_up_then_decays_linearly_to_zero_at_the_last_step():
    f = [loop.lr_factor(s, warmup=2, total=6) for s in range(7)]
    assert f == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]
    assert [loop.lr_factor(s, warmup=2) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]  # no total: constant


def test_train_box_keeps_only_that_part_of_every_image(tmp_path):
    img = write_image(tmp_path / "a.png", w=64, h=32)
    whole = data.load_images(str(img))[0]
    part = data.load_images(str(img), box=data.parse_box("8,4,40,20"))[0]
    assert torch.equal(part, whole[:, 4:24, 8:48])
    with pytest.raises(loop.TrainingError, match="reaches outside"):
        data.load_images(str(img), box=(40, 0, 40, 32))
    with pytest.raises(loop.TrainingError, match="X,Y,W,H"):
        data.parse_box("8,4,40")


def test_training_walks_cover_every_patch_once_and_mix_orders_as_outpainting_does():
    grid = (1, 3, 4)
    every = sorted(adc.split(grid, adc.Order.DOWN_RIGHT))
    basic = renderer_stage.training_steps(grid, torch.Generator().manual_seed(0), outpaint_share=0.0)
    assert sorted(c for _, c in basic) == every and len({o for o, _ in basic}) == 1
    mixed = 0
    for seed in range(20):
        walk = renderer_stage.training_steps(grid, torch.Generator().manual_seed(seed), outpaint_share=1.0)
        assert sorted(c for _, c in walk) == every, seed
        assert walk == renderer_stage.training_steps(grid, torch.Generator().manual_seed(seed), outpaint_share=1.0)
        mixed += len({o for o, _ in walk}) > 1
    assert mixed >= 10  # most outpainting plans grow on several sides, each strip in its own order


def test_render_and_optimize_takes_a_walk_with_mixed_orders():
    r = _tiny_renderer()
    opt = torch.optim.Adam(r.parameters(), lr=1e-3)
    tokens = torch.randint(64, (1, 1, 6, 8), generator=torch.Generator().manual_seed(1))  # 3 x 4 patches
    walk = renderer_stage.training_steps((1, 3, 4), torch.Generator().manual_seed(3), outpaint_share=1.0)
    res = renderer_stage.render_and_optimize(r, renderer_stage._TeacherForced(r), tokens, walk, opt, torch.Generator())
    assert res["patches"] == 12 and res["optimizer_steps"] == 12 and res["peak_pool"] >= 2


def test_a_strip_trains_on_caches_re_encoded_in_its_own_order_as_generation_reads_them():
    """A known column walked down-left, then the strip to its right (down-right): with re-encoding
    (the default), the strip's losses are those of a walk made in down-right throughout, which is
    what generate(reencode=True) feeds it at inference; without, they differ."""
    r = _tiny_renderer().eval()
    tokens = torch.randint(64, (1, 1, 4, 4), generator=torch.Generator().manual_seed(2))  # 2 x 2 patches
    known, strip = [(0, 0, 0), (0, 1, 0)], [(0, 0, 1), (0, 1, 1)]

    def strip_losses(known_order, reencode):
        losses = []
        walk = [(known_order, c) for c in known] + [(adc.Order.DOWN_RIGHT, c) for c in strip]
        renderer_stage.render_and_optimize(r, renderer_stage._TeacherForced(r), tokens, walk,
                                           torch.optim.SGD(r.parameters(), lr=0.0), torch.Generator(),
                                           check=lambda loss: losses.append(loss.item()), reencode=reencode)
        return losses[len(known):]

    made_in_order = strip_losses(adc.Order.DOWN_RIGHT, reencode=True)
    assert strip_losses(adc.Order.DOWN_LEFT, reencode=True) == pytest.approx(made_in_order, abs=1e-5)
    assert strip_losses(adc.Order.DOWN_LEFT, reencode=False) != pytest.approx(made_in_order, abs=1e-5)
