"""One-shot training of one image (nuwa_core/training/one_shot.py, `train one-shot`, NUWA Train One-Shot).

The runs use fixed step counts (a couple of steps each): what is tested is what the run writes, keeps and
refuses, not how good the model gets (README: one-shot evaluation)."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from nuwa_core import checkpoint, train
from nuwa_core.checkpoint import read_metadata
from nuwa_core.images import image_to_model, load_image
from nuwa_core.infinity.generation import NuwaInfinity
from nuwa_core.training import one_shot, renderer as renderer_stage
from nuwa_core.training.data import Augment, random_crops
from nuwa_core.training.loop import TrainingError

PAINTING = Path(__file__).resolve().parent.parent / "models" / "nuwa" / "nuwa_infinity_starry_night.jpg"
QUICK = {"tokenizer_steps": 2, "renderer_steps": 1}


@pytest.fixture(scope="module")
def painting() -> torch.Tensor:
    """A 192x128 px piece of The Starry Night, [3, H, W] in -1..1: 3x2 patches."""
    return image_to_model(load_image(PAINTING))[0, :, 100:228, 200:392].contiguous()


def test_cli_writes_a_model_with_its_record_and_keeps_the_run_out_of_the_loader_list(tmp_path, monkeypatch):
    image = tmp_path / "painting.png"
    from nuwa_core.images import save_image
    save_image(load_image(PAINTING)[:, 100:228, 200:392], image)
    out = tmp_path / "nuwa" / "mine.safetensors"
    res = train.main(["one-shot", str(image), "--out", str(out), "--tokenizer-steps", "2", "--renderer-steps", "2",
                      "--leave-out", "128,0,64,128", "--threads", "2"])
    assert res["stopped"] == "steps" and res["tokenizer_steps"] == 2 and res["renderer_steps"] == 2
    model = NuwaInfinity.load(out)
    assert model.renderer.config.patch_size == (1, 8, 8)
    record = json.loads(read_metadata(out)["one_shot"])
    assert record["settings"]["start_from"] == "shipped" and record["renderer_steps"] == 2
    work = out.parent / "training" / "mine"
    assert (work / "one_shot.json").is_file() and (work / "tokenizer.safetensors").is_file()
    # the run's working files sit in training/, which the Model Loader does not list
    import nodes._comfy as comfy_helpers
    monkeypatch.setenv("NUWA_MODELS_DIR", str(tmp_path))
    names = comfy_helpers.list_models()
    assert "mine.safetensors" in names and not any(n.startswith("training/") for n in names)


def test_the_left_out_region_never_reaches_a_crop_nor_a_token_crop():
    image = torch.full((3, 64, 96), -0.5)
    image[:, :, 64:] = 1.0  # the left-out strip, bright
    keep_out = torch.zeros(64, 96, dtype=torch.bool)
    keep_out[:, 64:] = True
    crops = random_crops([image], 40, (32, 32), torch.Generator().manual_seed(0), Augment(noise=0.0, brightness=0.0,
                         contrast=0.0, saturation=0.0), [keep_out])
    assert crops.max() < -0.4  # not a share of a bright pixel, also through the bilinear resampling
    tokens = torch.arange(8 * 12).view(8, 12)
    left_out = torch.zeros(8, 12, dtype=torch.bool)
    left_out[:, 8:] = True
    bank = renderer_stage.TokenBank([tokens], [left_out])
    crops = renderer_stage.token_crops(bank, 40, (4, 4), torch.Generator().manual_seed(0))
    assert (crops % 12 < 8).all()
    with pytest.raises(TrainingError, match="left-out region"):  # no room at all: said, not looped forever
        renderer_stage.token_crops(bank, 1, (4, 9), torch.Generator().manual_seed(0))


def test_trainable_part_cuts_to_what_the_mask_leaves_and_greys_it_out():
    image = torch.rand(3, 128, 256) * 2 - 1
    right_strip = torch.zeros(128, 256, dtype=torch.bool)
    right_strip[:, 192:] = True
    part, mask, box = one_shot.trainable_part(image, right_strip, "none")
    assert box == (0, 0, 192, 128) and mask is None and torch.equal(part, image[:, :, :192])
    hole = torch.zeros(128, 256, dtype=torch.bool)
    hole[40:60, 100:120] = True
    part, mask, box = one_shot.trainable_part(image, hole, "none")
    assert box == (0, 0, 256, 128) and torch.equal(mask, hole) and (part[:, hole] == 0).all()
    part, mask, box = one_shot.trainable_part(image, right_strip, "x")  # a wrapping image keeps its joint
    assert box == (0, 0, 256, 128) and mask is not None
    # and is continued across it, so training crops can hold the joint at any offset
    padded, padded_mask = one_shot.padded_for_wrap(part, mask, "x", 128)
    assert padded.shape == (3, 128, 512) and torch.equal(padded[:, :, :128], part[:, :, -128:])
    assert torch.equal(padded[:, :, -128:], part[:, :, :128]) and torch.equal(padded_mask[:, :128], mask[:, -128:])
    torus, _ = one_shot.padded_for_wrap(part, None, "xy", 64)
    assert torus.shape == (3, 256, 384) and torch.equal(torus[:, :64, 64:-64], part[:, -64:])


@pytest.mark.parametrize("size, mask, message", [
    ((100, 300), None, r"100 px.*at least 128x128 px"),
    ((128, 256), "all", "covers the whole image"),
    ((128, 256), "most", r"the part of the image the mask leaves is 64x128 px"),
])
def test_too_little_to_train_on_is_refused_before_anything_runs(tmp_path, size, mask, message):
    image = torch.zeros(3, *size)
    keep_out = None
    if mask == "all":
        keep_out = torch.ones(size, dtype=torch.bool)
    elif mask == "most":
        keep_out = torch.zeros(size, dtype=torch.bool)
        keep_out[:, 64:] = True
    with pytest.raises(TrainingError, match=message):
        one_shot.train_one_shot(image, tmp_path / "m.safetensors", one_shot.OneShotSettings(**QUICK), keep_out)
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("settings, message", [
    ({"minutes": 0}, "more than 0 minutes"),
    ({"wrap": "y"}, "wrap must be one of"),
    ({"start_from": "somewhere"}, "start_from must be one of"),
    ({"tokenizer_share": 1.0}, "strictly between 0 and 1"),
])
def test_bad_settings_are_named(tmp_path, painting, settings, message):
    with pytest.raises(TrainingError, match=message):
        one_shot.train_one_shot(painting, tmp_path / "m.safetensors", one_shot.OneShotSettings(**settings))


class _FakeRun:
    def __init__(self):
        self.args = type("Args", (), {"steps": 10 ** 9})()
        self.preview = None


def test_a_stage_fits_its_steps_to_the_time_left_and_stops_at_its_deadline(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(one_shot.time, "monotonic", lambda: now[0])
    clock = one_shot._RunState(one_shot.OneShotSettings(minutes=1.0), None, None, 0.0)
    budget = one_shot._StageBudget("renderer", deadline=160.0, fixed_steps=0, run_state=clock)
    run = _FakeRun()
    for step in range(one_shot._StageBudget.CALIBRATION_STEPS + 1):  # a step takes 2 s
        assert budget(run, step, {"loss": 1.0}) is None
        now[0] += 2.0
    # 5 steps timed in 10 s, at t = 110 s: 50 s left -> 25 more steps
    assert run.args.steps == one_shot._StageBudget.CALIBRATION_STEPS + 25
    now[0] = 160.0
    assert budget(run, 9, {"loss": 1.0}) == "budget"
    stopping = one_shot._RunState(one_shot.OneShotSettings(), None, lambda: True, 0.0)
    assert one_shot._StageBudget("tokenizer", 1e12, 0, stopping)(_FakeRun(), 0, {}) == "cancel"


def test_cancel_in_the_first_seconds_writes_nothing_then_continue_finishes(tmp_path, painting):
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"the previous model")
    res = one_shot.train_one_shot(painting, out, one_shot.OneShotSettings(**QUICK), should_stop=lambda: True)
    assert res["stopped"] == "cancel" and res["out"] is None and res["tokenizer_steps"] == 0
    assert out.read_bytes() == b"the previous model"
    with pytest.raises(TrainingError, match="another image"):  # continuing needs the same image and settings
        one_shot.train_one_shot(painting.flip(-1), out, one_shot.OneShotSettings(**QUICK), resume=True)
    with torch.inference_mode():  # as ComfyUI runs nodes: the image is an inference tensor, autograd off
        res = one_shot.train_one_shot(painting.clone(), out, one_shot.OneShotSettings(**QUICK), resume=True)
    assert res["stopped"] == "steps" and (res["tokenizer_steps"], res["renderer_steps"]) == (2, 1)
    NuwaInfinity.load(out)
    # continuing again trains the renderer further on the same tokenizer
    tokenizer = (tmp_path / "training" / "m" / "tokenizer.safetensors").read_bytes()
    res = one_shot.train_one_shot(painting, out, one_shot.OneShotSettings(**QUICK), resume=True)
    assert res["renderer_steps"] == 2 and (tmp_path / "training" / "m" / "tokenizer.safetensors").read_bytes() == tokenizer


def test_a_cancel_during_the_renderer_keeps_what_it_learned_and_a_full_disk_keeps_the_old_model(
        tmp_path, painting, monkeypatch):
    out = tmp_path / "m.safetensors"
    previews = []

    def stop_in_renderer(p):
        previews.append(p)

    res = one_shot.train_one_shot(painting, out, one_shot.OneShotSettings(tokenizer_steps=1, renderer_steps=5),
                                  on_progress=stop_in_renderer,
                                  should_stop=lambda: bool(previews) and previews[-1].stage == "renderer"
                                  and previews[-1].step >= 1, preview_every=1e-9)
    assert res["stopped"] == "cancel" and res["renderer_steps"] == 1 and res["out"] == str(out)
    assert any(p.preview is not None and p.stage == "renderer" for p in previews)
    assert all(0.0 <= p.fraction <= 1.0 for p in previews)
    before = out.read_bytes()
    real_save_file = checkpoint.save_file

    def disk_full(tensors, filename, metadata=None):
        if os.path.basename(filename).startswith(f".{out.name}."):  # the final model only
            Path(filename).write_bytes(b"half a fi")
            raise OSError(28, "No space left on device")
        return real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(TrainingError, match="No space left.*unchanged"):
        one_shot.train_one_shot(painting, out, one_shot.OneShotSettings(**QUICK), resume=True)
    assert out.read_bytes() == before and not list(tmp_path.glob(f".{out.name}.*"))


def test_memory_is_estimated_and_checked_before_training(tmp_path, painting, monkeypatch):
    asked = []
    monkeypatch.setattr("nuwa_core.memory.available_bytes", lambda device=None: 1000)
    with pytest.raises(TrainingError, match=r"needs about \d+ MiB but only 0 MiB is free in RAM"):
        one_shot.train_one_shot(painting, tmp_path / "m.safetensors", one_shot.OneShotSettings(**QUICK),
                                make_room=lambda needed, device: asked.append((needed, device.type)))
    assert asked and asked[0][0] > 50 * 2 ** 20 and asked[0][1] in ("cpu", "cuda")
    assert not (tmp_path / "training").exists() or not list((tmp_path / "training").rglob("*.safetensors"))


def test_the_node_trains_then_loads_unless_something_changed_and_continues_on_request(tmp_path, monkeypatch):
    from nodes.training_nodes import NUWATrainOneShot
    monkeypatch.setenv("NUWA_MODELS_DIR", str(tmp_path))
    runs = []
    real = one_shot.train_one_shot

    def quick(image, out, settings, *args, **kwargs):  # the node's run with fixed, tiny step counts
        runs.append(kwargs.get("resume"))
        return real(image, out, dataclasses.replace(settings, **QUICK), *args, **kwargs)

    monkeypatch.setattr(one_shot, "train_one_shot", quick)
    image = load_image(PAINTING)[:, 100:228, 200:392]
    node = NUWATrainOneShot()
    model, name = node.train(image, 1.0, "my painting", False)
    out = tmp_path / "nuwa" / "my painting.safetensors"
    assert name == out.name and out.is_file() and isinstance(model, NuwaInfinity) and runs == [False]
    assert NUWATrainOneShot.IS_CHANGED("my painting", False) == out.stat().st_mtime_ns
    node.train(image, 1.0, "my painting", False)  # same image and settings: loaded, not trained
    assert runs == [False]
    node.train(image, 1.0, "my painting", True)  # continue training
    assert runs == [False, True] and json.loads(read_metadata(out)["one_shot"])["renderer_steps"] == 2
    assert NUWATrainOneShot.IS_CHANGED("my painting", True) != NUWATrainOneShot.IS_CHANGED("my painting", True)
    first = out.read_bytes()
    node.train(image.flip(2), 1.0, "my painting", False)  # another image: trained anew, the old model kept aside
    assert runs[-1] is False and (tmp_path / "nuwa" / "training" / "my painting" / "previous.safetensors").read_bytes() == first
    with pytest.raises(ValueError, match="no folders"):
        node.train(image, 1.0, "../elsewhere", False)
    mask = torch.zeros(1, 128, 192)
    mask[:, :, 64:] = 1.0
    with pytest.raises(ValueError, match=r"at least 128x128 px.*leave less of it out"):
        node.train(image, 1.0, "masked", False, mask=mask)


def test_the_run_trains_on_the_device_it_is_given(tmp_path, painting, monkeypatch):
    from nuwa_core.training import loop, vqgan as vqgan_stage
    seen = []

    def tokenizer_stage(args, images, keep_out, monitor):
        seen.append((loop.Dist(args.device).device, images[0].device))
        return {"step": 0, "stopped": "cancel"}

    monkeypatch.setattr(vqgan_stage, "train_vqgan", tokenizer_stage)
    res = one_shot.train_one_shot(painting, tmp_path / "m.safetensors", one_shot.OneShotSettings(**QUICK),
                                  device=torch.device("meta"))
    # the stages get the device (ComfyUI's); images stay on the CPU, where crops are drawn, and move per batch
    assert res["stopped"] == "cancel" and seen == [(torch.device("meta"), torch.device("cpu"))]
