"""bench/xl_text_following.py's decoded references: its real frames are stills of unrelated scenes, so each
goes through the T-KLVAE alone (as one video, the temporal layers blended every frame with its neighbours'
skies, and the bench's ceiling with them)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from test_xl_chunks import random_vae

from nuwa_core.xl.model import XLModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
xl_text_following = pytest.importorskip("xl_text_following")


@torch.no_grad()
def test_real_stills_are_decoded_each_alone():
    vae = random_vae()  # temporal layers that mix frames, as a trained T-KLVAE's do
    vae.config.clip_frames = 3
    model = XLModel(vae, None, None)
    frames = torch.rand(6, 8, 8, 3, generator=torch.Generator().manual_seed(0))
    stills = xl_text_following.round_trip(model, frames, frames_apart=2)
    assert stills.shape == frames.shape
    reordered = xl_text_following.round_trip(model, frames[[5, 4, 2, 1, 0, 3]], frames_apart=2)
    assert torch.equal(reordered[2], stills[2])  # frame 2 between other neighbours: the same
    assert torch.equal(reordered[0], stills[5])
    as_one_video = xl_text_following.round_trip(model, frames)
    assert (as_one_video - stills).abs().amax() > 1e-3  # what decoding them as one video would have changed
