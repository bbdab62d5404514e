"""NUWA-XL training (`python -m nuwa_core.train t_klvae|xl`): data sampling, resume exactness, errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nuwa_core import train
from nuwa_core.checkpoint import load_state_dict
from nuwa_core.training import data as xt_data, loop, xl as xt
from nuwa_core.xl import model as nuwa_xl
from nuwa_core.xl.mask_temporal_diffusion import load_mtd
from nuwa_core.xl.t_klvae import load_t_klvae

from _eval_data import DATA

REAL_VIDEO = DATA / "video" / "vtest_opencv.avi"


def _frames(folder: Path, n=24, w=20, h=16) -> Path:
    """A blob moving right over a gradient, as numbered PNGs (20x16, centre-cropped to 16x16)."""
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:h, 0:w]
    for k in range(n):
        base = np.stack([xx / w, yy / h, np.full_like(xx, 0.3, dtype=float)], -1)
        blob = np.exp(-(((xx - (k % w)) ** 2 + (yy - h / 2) ** 2) / 6.0))[..., None]
        arr = np.clip(base * (1 - blob) + blob, 0, 1)
        Image.fromarray((arr * 255).astype(np.uint8)).save(folder / f"{k:04d}.png")
    return folder


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    return _frames(tmp_path_factory.mktemp("video") / "clip")


def _vae_args(frames, out, *extra):
    return ["t_klvae", "--videos", str(frames), "--out", str(out), "--preset", "tiny", "--size", "16",
            "--clip-frames", "3", "--batch", "2", "--warmup", "2", "--quiet", "--save-every", "0", *extra]


def _xl_args(frames, vae, out, *extra):
    return ["xl", "--videos", str(frames), "--vae", str(vae), "--out", str(out), "--preset", "tiny", "--size", "16",
            "--L", "3", "--depth", "3", "--batch", "2", "--warmup", "2", "--quiet", "--save-every", "0",
            "--context-dim", "8", *extra]


def _weights(out: Path):
    return load_state_dict(loop.train_paths(out)[0])[0]


def _same(a: Path, b: Path):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_frame_folder_reading_resizes_and_crops(frames):
    v, fps = xt_data.read_video(frames, (16, 16), frame_step=2)
    assert v.dtype == torch.uint8 and v.shape == (12, 3, 16, 16) and fps == 5.0
    assert xt_data.parse_size("64x48") == (64, 48) and xt_data.parse_size("32") == (32, 32)
    with pytest.raises(loop.TrainingError, match="WIDTHxHEIGHT"):
        xt_data.parse_size("wide")


@pytest.mark.skipif(not REAL_VIDEO.is_file(),
                    reason="the OpenCV sample video (../shared/data/video or $NUWA_SHARED_DATA) is absent")
def test_reads_a_video_file():
    v, fps = xt_data.read_video(REAL_VIDEO, (32, 24), frame_step=100)
    assert v.shape == (8, 3, 24, 32) and abs(fps - 0.1) < 1e-6


def test_xl_batch_samples_each_level_at_its_stride():
    L, depth = 3, 3
    lat = [torch.arange(30, dtype=torch.float32).view(30, 1, 1, 1).expand(30, 2, 2, 2).clone()]
    gen = torch.Generator().manual_seed(0)
    x0, ctx, cond, mask, lv = xt.xl_batch(lat, 24, L, depth, [0, 1, 2], gen, context_dim=5)
    assert x0.shape == (24, 3, 2, 2, 2) and ctx.shape == (24, 3, 1, 5) and not ctx.any()
    for i in range(24):
        level, frames = int(lv[i]), x0[i, :, 0, 0, 0]
        stride = (L - 1) ** (depth - 1 - level)
        assert torch.equal(frames[1:] - frames[:-1], torch.full((L - 1,), float(stride)))
        if level == 0:  # global: no visual condition
            assert not mask[i].any() and not cond[i].any()
        else:  # local: first and last given
            assert mask[i].tolist() == [1.0, 0.0, 1.0]
            assert torch.equal(cond[i, 0], x0[i, 0]) and torch.equal(cond[i, -1], x0[i, -1]) and not cond[i, 1].any()
    assert set(lv.tolist()) == {0, 1, 2}
    with pytest.raises(loop.TrainingError, match="needs 9 video frames"):
        xt.xl_batch([lat[0][:8]], 1, L, depth, [0], gen)
    with pytest.raises(loop.TrainingError, match="depth >= 2"):
        xt.role_levels("local", 1)


def test_role_levels_and_the_level_flag():
    assert xt.role_levels("both", 3) == [0, 1, 2] and xt.role_levels("global", 3) == [0]
    assert xt.role_levels("local", 3) == [1, 2] and xt.role_levels("local", 3, 2) == [2]
    for role, level, depth in [("global", 1, 3), ("both", 1, 3), ("local", 0, 3), ("local", 3, 3), ("local", -1, 2)]:
        with pytest.raises(loop.TrainingError, match=f"1..{depth - 1}"):
            xt.role_levels(role, depth, level)


def test_xl_batch_with_one_level_draws_only_that_level():
    L, depth = 3, 3
    lat = [torch.arange(30, dtype=torch.float32).view(30, 1, 1, 1).expand(30, 2, 2, 2).clone()]
    for level in (1, 2):
        x0, _, _, mask, lv = xt.xl_batch(lat, 16, L, depth, xt.role_levels("local", depth, level),
                                            torch.Generator().manual_seed(0), context_dim=4)
        assert lv.tolist() == [level] * 16 and (mask[:, [0, -1]] == 1).all()
        stride = xt.level_spacing(L, depth, level)
        assert torch.equal(x0[:, 1:, 0, 0, 0] - x0[:, :-1, 0, 0, 0], torch.full((16, L - 1), float(stride)))


def test_text_embeddings_follow_the_sampled_frames():
    lat = [torch.zeros(10, 2, 2, 2)]
    text = torch.arange(10, dtype=torch.float32).view(10, 1, 1).expand(10, 2, 4).clone()
    _, ctx, *_ = xt.xl_batch(lat, 8, 3, 2, [1], torch.Generator().manual_seed(1), text=text)
    assert ctx.shape == (8, 3, 2, 4)
    assert torch.equal(ctx[:, 2, 0, 0] - ctx[:, 0, 0, 0], torch.full((8,), 2.0))  # level 1 of depth 2: stride 1


def test_t_klvae_resume_equals_one_run(tmp_path, frames):
    torch.set_num_threads(1)
    res = train.main(_vae_args(frames, tmp_path / "one.safetensors", "--steps", "4"))
    assert res["step"] == 4 and res["latent_scale"] > 0
    train.main(_vae_args(frames, tmp_path / "two.safetensors", "--steps", "2"))
    train.main(_vae_args(frames, tmp_path / "two.safetensors", "--steps", "4", "--resume"))
    _same(tmp_path / "one.safetensors", tmp_path / "two.safetensors")
    vae = load_t_klvae(tmp_path / "one.safetensors")
    assert vae.config.latent_scale == pytest.approx(res["latent_scale"], rel=1e-5)


def test_t_klvae_fine_tunes_from_an_init_file(tmp_path, frames, vae_file):
    res = train.main(_vae_args(frames, tmp_path / "ft.safetensors", "--steps", "1", "--init", str(vae_file)))
    assert res["step"] == 1
    assert load_t_klvae(tmp_path / "ft.safetensors").config.latent_scale == pytest.approx(0.18215)  # kept


def test_xl_resume_equals_one_run_and_the_file_loads(tmp_path, frames, vae_file):
    torch.set_num_threads(1)
    res = train.main(_xl_args(frames, vae_file, tmp_path / "one.safetensors", "--steps", "4"))
    assert res["step"] == 4 and np.isfinite(res["loss"])
    train.main(_xl_args(frames, vae_file, tmp_path / "two.safetensors", "--steps", "2"))
    train.main(_xl_args(frames, vae_file, tmp_path / "two.safetensors", "--steps", "4", "--resume"))
    _same(tmp_path / "one.safetensors", tmp_path / "two.safetensors")
    assert load_mtd(tmp_path / "one.safetensors").config.context_dim == 8  # plain MTD loader reads it
    _, info = nuwa_xl.load_mtd_xl(tmp_path / "one.safetensors")
    assert info["prompts"] == "none" and info["L"] == 3 and info["depth"] == 3 and info["fps"] == 10.0
    bundle = nuwa_xl.XLModel.load(vae_file, tmp_path / "one.safetensors")
    video = bundle.generate(L=3, depth=2, steps=2, seed=0)
    assert video.shape == (5, 3, 16, 16) and torch.isfinite(video).all()
    assert torch.equal(video, bundle.generate(L=3, depth=2, steps=2, seed=0))


def test_xl_resume_with_another_role_is_refused(tmp_path, frames, vae_file):
    train.main(_xl_args(frames, vae_file, tmp_path / "r.safetensors", "--steps", "1"))
    with pytest.raises(loop.TrainingError, match="role"):
        train.main(_xl_args(frames, vae_file, tmp_path / "r.safetensors", "--steps", "2", "--resume", "--role", "local"))


def test_xl_with_text_embeddings_and_global_role(tmp_path, frames, vae_file):
    from safetensors.torch import save_file
    emb = tmp_path / "emb.safetensors"
    save_file({"embeddings": torch.randn(24, 2, 12)}, str(emb))
    res = train.main(_xl_args(frames, vae_file, tmp_path / "g.safetensors", "--steps", "1", "--role", "global",
                              "--text-embeddings", str(emb)))
    assert res["step"] == 1
    model, info = nuwa_xl.load_mtd_xl(tmp_path / "g.safetensors")
    assert model.config.context_dim == 12 and info["prompts"] == "text" and info["role"] == "global"
    save_file({"embeddings": torch.randn(5, 2, 12)}, str(emb))
    with pytest.raises(loop.TrainingError, match="frames=24"):
        train.main(_xl_args(frames, vae_file, tmp_path / "h.safetensors", "--steps", "1", "--text-embeddings", str(emb)))


def test_xl_info_records_the_levels_of_each_role(tmp_path, frames, vae_file, monkeypatch):
    drawn = []
    batch = xt.xl_batch

    def spy(*a, **k):
        out = batch(*a, **k)
        drawn.extend(out[-1].tolist())
        return out

    monkeypatch.setattr(xt, "xl_batch", spy)
    for role, extra, levels in [("both", [], [0, 1, 2]), ("global", [], [0]), ("local", [], [1, 2]),
                                ("local", ["--level", "1"], [1]), ("local", ["--level", "2"], [2])]:
        drawn.clear()
        out = tmp_path / f"{role}{''.join(extra)}.safetensors"
        train.main(_xl_args(frames, vae_file, out, "--steps", "2", "--role", role, *extra))
        info = nuwa_xl.load_mtd_xl(out)[1]
        assert info["levels"] == levels
        assert info["vae_latent_scale"] == pytest.approx(load_t_klvae(vae_file).config.latent_scale)
        assert set(drawn) <= set(levels) and len(drawn) == 4
    with pytest.raises(loop.TrainingError, match="1..2"):
        train.main(_xl_args(frames, vae_file, tmp_path / "x.safetensors", "--steps", "1", "--level", "1"))
    with pytest.raises(loop.TrainingError, match="1..2"):
        train.main(_xl_args(frames, vae_file, tmp_path / "x.safetensors", "--steps", "1", "--role", "local",
                            "--level", "3"))


def test_xl_level_resume_equals_one_run_and_another_level_is_refused(tmp_path, frames, vae_file):
    torch.set_num_threads(1)
    lv = ["--role", "local", "--level", "2"]
    train.main(_xl_args(frames, vae_file, tmp_path / "one.safetensors", "--steps", "4", *lv))
    train.main(_xl_args(frames, vae_file, tmp_path / "two.safetensors", "--steps", "2", *lv))
    train.main(_xl_args(frames, vae_file, tmp_path / "two.safetensors", "--steps", "4", "--resume", *lv))
    _same(tmp_path / "one.safetensors", tmp_path / "two.safetensors")
    with pytest.raises(loop.TrainingError, match="level"):
        train.main(_xl_args(frames, vae_file, tmp_path / "two.safetensors", "--steps", "5", "--resume", "--role",
                            "local", "--level", "1"))


def test_xl_nan_stops_without_overwriting(tmp_path, frames, vae_file):
    with pytest.raises(loop.TrainingDiverged, match="NaN"):
        train.main(_xl_args(frames, vae_file, tmp_path / "n.safetensors", "--steps", "3", "--debug-nan-at", "1"))
    assert not (tmp_path / "n.safetensors").exists()


def test_contact_sheet_layout():
    frames = torch.rand(5, 3, 4, 6) * 2 - 1
    sheet = nuwa_xl.contact_sheet(frames, cols=3)
    assert sheet.shape == (3, 8, 18)
    assert torch.equal(sheet[:, 4:8, 6:12], frames[4]) and (sheet[:, 4:, 12:] == -1).all()


def test_mtd_presets_grow_in_width_and_build():
    from nuwa_core.xl.mask_temporal_diffusion import MaskTemporalDiffusion
    widths = [xt.mtd_preset(name, 4, 64).model_channels for name in ("tiny", "small", "medium")]
    assert widths == sorted(widths) and len(set(widths)) == 3
    medium = MaskTemporalDiffusion(xt.mtd_preset("medium", 4, 64))
    small = MaskTemporalDiffusion(xt.mtd_preset("small", 4, 64))
    assert sum(p.numel() for p in medium.parameters()) > 2 * sum(p.numel() for p in small.parameters())
    with pytest.raises(loop.TrainingError, match="choose one of"):
        xt.mtd_preset("large", 4, 64)
