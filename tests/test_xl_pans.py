"""bench/_xl_pans.py, the captioned pans the shipped NUWA-XL model trains on: skies cut wide enough that the
three skies can be told apart in a 64x48 frame (what lets bench/xl_text_following.py judge the sky)."""
from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
_xl_pans = pytest.importorskip("_xl_pans")
_scenes = pytest.importorskip("_scenes")
from text_following import _sky_colour  # the sky-colour classifier's features both text benches use

if not _scenes.DATA.is_dir():
    pytest.skip(f"the real data is not here: {_scenes.DATA}", allow_module_level=True)


@pytest.mark.parametrize("sky", list(_scenes.SKIES))
def test_wide_sky_crops_stay_inside_their_box(sky):
    """At SKY_SCALE the crop is often capped by the box's width: it must still fit (the width recomputed from
    the capped height could round past the box) and come out at the band's size."""
    rng = random.Random(0)
    for _ in range(200):
        width, height = rng.randint(*_xl_pans.SECTION), rng.randint(*_xl_pans.HORIZON) + 2
        band = _xl_pans._band(_scenes.SKIES[sky], (width, height), rng, _xl_pans.SKY_SCALE)
        assert band.shape == (height, width, 3)


def _colour_accuracy(train_seed: int, test_seed: int) -> float:
    """Nearest class centroid of the sky band's colour: centroids from one set of real frames, scored on
    frames of other crops (skies in turn over every ground)."""
    def frames(seed):
        pairs = [p for g in _scenes.GROUNDS for p in _xl_pans.scene_frames(g, 12, seed + len(g), with_sky=True)]
        colour = _sky_colour([torch.from_numpy(f).float() / 255 for f, _ in pairs]).numpy()
        return colour, np.array([list(_scenes.SKIES).index(s) for _, s in pairs])

    x, y = frames(train_seed)
    centroids = np.stack([x[y == k].mean(0) for k in range(3)])
    xt, yt = frames(test_seed)
    found = np.linalg.norm(xt[:, None] - centroids[None], axis=-1).argmin(1)
    return float((found == yt).mean())


def test_the_three_skies_are_told_apart_by_colour_in_real_frames(monkeypatch):
    """Cut wide, a frame shows what tells its sky apart (the blue sky's cloud, the sunset's orange band); cut at
    the grounds' scale (2-3x, the pans before), most frames of every sky were the same plain blue-grey strip."""
    wide = _colour_accuracy(0, 1000)
    monkeypatch.setattr(_xl_pans, "SKY_SCALE", (2.0, 3.0))
    close = _colour_accuracy(0, 1000)
    assert wide >= 0.9, wide
    assert close < wide - 0.1, (close, wide)


def test_the_text_following_benchs_real_pans_are_one_scene_each_made_as_the_training_pans():
    xl_text_following = pytest.importorskip("xl_text_following")
    pans = xl_text_following.real_pans(1, seed=3)
    assert sorted((s, g) for _, s, g in pans) == [(s, g) for s in range(3) for g in range(3)]
    rng = random.Random(3)
    for clip, s, g in pans:  # the same draws as the training pans' own generator, one scene, no cross-fade
        frames, caps = _xl_pans.pan([(list(_scenes.SKIES)[s], list(_scenes.GROUNDS)[g])], rng)
        assert len(set(caps)) == 1 and clip.shape == (len(frames), 48, 64, 3)
        assert torch.equal(clip, torch.from_numpy(np.stack(frames)).float() / 255)


def test_cloudy_scenes_hold_their_skies_clouds_where_plain_ones_may_not():
    """bench/_scenes.py --cloudy: the blue and sunset skies are cropped again until their clouds cover the
    share; plain scenes of the same seed include cloudless bands (what the option exists to leave out)."""
    def shares(cloudy):
        return {sky: [_scenes.CLOUD_PIXELS[sky](np.asarray(img, dtype=np.float32)[:60] / 255).mean()
                      for caption, img in _scenes.scenes(4, 3, cloudy) if caption.startswith(sky)]
                for sky in _scenes.CLOUD_PIXELS}

    plain, cloudy = shares(0.0), shares(0.05)
    for sky in _scenes.CLOUD_PIXELS:
        assert min(plain[sky]) < 0.005, (sky, plain[sky])
        assert min(cloudy[sky]) > 0.01, (sky, cloudy[sky])
