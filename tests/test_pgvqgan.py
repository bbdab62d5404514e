"""Pixel-Guided VQGAN (NUWA-Infinity 3.3.2): the decoder, video decoding, files and pairing, the `pgvqgan`
training stage, the PG-VQGAN Decode node and the flicker bench's metrics. Tiny configs on the CPU."""
from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from _pack import node
from _tiny import tiny_model
from PIL import Image

from nuwa_core import train
from nuwa_core.checkpoint import CheckpointError, load_state_dict
from nuwa_core.infinity.pixel_guided_vqgan import (
    DecodeCancelled,
    PairError,
    PixelGuidedDecoder,
    check_pair,
    decode_video,
    load_pgvqgan,
    load_tokenizer,
    save_pgvqgan,
    token_fingerprint,
)
from nuwa_core.infinity.vqgan import VQModel, get_config, save_vqgan
from nuwa_core.training.cli import build_parser
from nuwa_core.training.loop import TrainingError
from nuwa_core.training.pgvqgan import temporal_loss, train_pgvqgan

REPO = Path(__file__).resolve().parent.parent
torch.set_num_threads(1)  # the machine's cores are shared with training runs


def tiny_vq(seed=0) -> VQModel:
    torch.manual_seed(seed)
    return VQModel(get_config("tiny")).eval()


def guided(vq: VQModel, seed=1) -> PixelGuidedDecoder:
    """A PG-VQGAN of `vq` whose fusions are random (as after training): its output depends on the guidance."""
    pg = PixelGuidedDecoder.from_vqgan(vq).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for level in [*pg.guide.down, pg.guide.mid]:
            level.out.weight.copy_(torch.randn(level.out.weight.shape, generator=g) * 0.2)
    return pg


def rand_tokens(shape, seed=0, n=64):
    return torch.randint(0, n, shape, generator=torch.Generator().manual_seed(seed))


def rand_pixels(shape, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --- the decoder --------------------------------------------------------------------------------

def test_fresh_pgvqgan_decodes_exactly_as_its_vqgan_and_every_fusion_is_wired():
    vq = tiny_vq()
    pg = PixelGuidedDecoder.from_vqgan(vq).eval()
    tokens, prev = rand_tokens((2, 6, 5)), rand_pixels((2, 3, 24, 20))
    assert (pg.decode_tokens(tokens, prev) - vq.decode_tokens(tokens)).abs().max() <= 1e-6
    wrap = (True, False)
    tiled = pg.decode_tokens_tiled(tokens, prev, tile=2, overlap=1, wrap=wrap)
    assert (tiled - vq.decode_tokens_tiled(tokens, tile=2, overlap=1, wrap=wrap)).abs().max() <= 1e-6
    # every level's fusion (and the mid block's) reaches the output at the matching shape
    fusions = [*pg.guide.down, pg.guide.mid]
    assert len(fusions) == len(vq.config.ch_mult) + 1
    base = pg.decode_tokens(tokens, prev)
    g = torch.Generator().manual_seed(0)
    for level in fusions:
        with torch.no_grad():
            level.out.weight.copy_(torch.randn(level.out.weight.shape, generator=g) * 0.2)
        assert (pg.decode_tokens(tokens, prev) - base).abs().max() > 1e-4
        with torch.no_grad():
            level.out.weight.zero_()


def test_guidance_changes_the_output_and_tiles_crop_the_previous_frame():
    vq = tiny_vq()
    pg = guided(vq)
    tokens, prev = rand_tokens((1, 4, 6)), rand_pixels((1, 3, 16, 24))
    out = pg.decode_tokens(tokens, prev)
    assert (out - pg.decode_tokens(tokens, -prev)).abs().max() > 1e-3
    # one window over the whole grid: exactly the untiled decode
    assert torch.equal(pg.decode_tokens_tiled(tokens, prev, tile=8, overlap=2), out)
    # no overlap: every tile is decoded on its own tokens, guided by the previous frame's pixels under it
    tiled = pg.decode_tokens_tiled(tokens, prev, tile=2, overlap=0, max_windows=1)  # batched: tests/test_vqgan_batched_decode.py
    assert torch.allclose(tiled[..., 8:16, 8:16], pg.decode_tokens(tokens[:, 2:4, 2:4], prev[..., 8:16, 8:16]),
                          atol=1e-6)
    with pytest.raises(ValueError, match=r"previous frame must be \[B, 3, H, W\] = \[1, 3, 16, 24\]"):
        pg.decode_tokens_tiled(tokens, prev[..., :8], tile=2, overlap=0)


def test_decode_video_frame_by_frame():
    vq = tiny_vq()
    pg = guided(vq)
    tokens, first = rand_tokens((4, 4, 4)), rand_pixels((3, 16, 16))
    plain = decode_video(vq, None, tokens, None, tile=2)
    for n in range(4):
        assert torch.allclose(plain[n], vq.decode_tokens_tiled(tokens[n:n + 1], 2, 0).clamp(-1, 1)[0], atol=1e-6)
    seen = []
    video = decode_video(vq, pg, tokens, first, tile=2, callback=lambda n, f, x: seen.append((n, f, x.shape)))
    assert seen == [(n, 4, (3, 16, 16)) for n in range(4)]
    assert torch.equal(video[0], first)  # image animation: frame 0 is the given image
    for n in range(1, 4):  # each later frame guided by the previous decoded one
        expected = pg.decode_tokens_tiled(tokens[n:n + 1], video[n - 1:n], tile=2, overlap=0).clamp(-1, 1)[0]
        assert torch.allclose(video[n], expected, atol=1e-5)
    t2v = decode_video(vq, pg, tokens, None, tile=2)
    assert torch.equal(t2v[0], plain[0]) and not torch.allclose(t2v[1], plain[1], atol=1e-3)
    calls = []
    with pytest.raises(DecodeCancelled, match="after frame 2 of 4"):
        decode_video(vq, pg, tokens, None, tile=2, callback=lambda n, f, x: calls.append(n) or n < 1)
    assert calls == [0, 1]
    with pytest.raises(ValueError, match=r"first_frame must be \[3, H, W\] = \[3, 16, 16\]"):
        decode_video(vq, pg, tokens, first[:, :8], tile=2)


# --- files and pairing ---------------------------------------------------------------------------

def test_save_load_and_refuse_another_tokenizer(tmp_path):
    vq = tiny_vq()
    pg = guided(vq)
    path = tmp_path / "pg.safetensors"
    save_pgvqgan(pg, path, token_fingerprint(vq), dtype=torch.float16)
    loaded = load_pgvqgan(path)
    assert loaded.config == pg.config
    tokens, prev = rand_tokens((1, 4, 4)), rand_pixels((1, 3, 16, 16))
    assert torch.allclose(loaded.decode_tokens(tokens, prev), pg.decode_tokens(tokens, prev), atol=0.05)
    _, meta = load_state_dict(path)
    assert meta["nuwa_kind"] == "pgvqgan" and meta["vqgan_fingerprint"] == token_fingerprint(vq)
    # the same VQGAN, stored at fp16 (a bundle's precision), pairs; another one is refused naming both files
    vq_path = tmp_path / "vq16.safetensors"
    save_vqgan(vq, vq_path, dtype=torch.float16)
    check_pair(loaded, load_tokenizer(vq_path), path, vq_path)
    other = tiny_vq(seed=1)
    with pytest.raises(PairError, match=r"pg\.safetensors.*other\.safetensors"):
        check_pair(loaded, other, path, tmp_path / "other.safetensors")
    bigger = VQModel(dataclasses.replace(get_config("tiny"), n_embed=128))
    with pytest.raises(PairError, match="n_embed 64 vs 128"):
        check_pair(loaded, bigger, path, "big.safetensors")
    with pytest.raises(CheckpointError, match="holds a vqgan model, not a PG-VQGAN"):
        load_pgvqgan(vq_path)


# --- the training stage --------------------------------------------------------------------------

def write_frames(folder: Path, n=5, size=32):
    """A textured pattern moving 1 px right per frame, as PNG frames."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = (rng.random((size, size * 2, 3)) * 255).astype(np.uint8)
    for t in range(n):
        Image.fromarray(np.ascontiguousarray(base[:, t:t + size])).save(folder / f"{t:03d}.png")
    return folder


def pg_args(videos, tok, out, *extra):
    return ["pgvqgan", "--videos", str(videos), "--tokenizer", str(tok), "--out", str(out), "--size", "32x32",
            "--crop", "16", "--batch", "2", "--warmup", "1", "--lr", "1e-2", "--quiet", "--save-every", "0",
            "--save-dtype", "fp32", "--threads", "1", *extra]


def test_train_stage_learns_guidance_keeps_tokens_and_resumes(tmp_path):
    vq = tiny_vq()
    tok = tmp_path / "tok.safetensors"
    save_vqgan(vq, tok)
    frames = write_frames(tmp_path / "video")
    out = tmp_path / "pg.safetensors"
    res = train.main(pg_args(frames, tok, out, "--steps", "4", "--frame-range", "0,4"))
    assert res["step"] == 4
    pg = load_pgvqgan(out)
    check_pair(pg, load_tokenizer(tok), out, tok)
    assert torch.equal(pg.quantize.embedding.weight, vq.quantize.embedding.weight)  # frozen
    assert any(level.out.weight.abs().sum() > 0 for level in pg.guide.down)  # the fusions learned
    assert not torch.equal(pg.decoder.conv_out.weight, vq.decoder.conv_out.weight)  # the decoder copy trains
    # stopping at 2 and resuming to 4 gives the same weights as 4 straight
    again = tmp_path / "again.safetensors"
    train.main(pg_args(frames, tok, again, "--steps", "4", "--frame-range", "0,4", "--stop-at", "2"))
    train.main(pg_args(frames, tok, again, "--steps", "4", "--frame-range", "0,4", "--resume"))
    a, b = load_state_dict(out)[0], load_state_dict(again)[0]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # continuing from a trained PG-VQGAN, guided by its own decodes; not from one of another tokenizer
    more = tmp_path / "more.safetensors"
    res = train.main(pg_args(frames, tok, more, "--steps", "1", "--init", str(out), "--recon-guidance", "1",
                             "--pg-guidance", "1"))
    assert res["pg_guided"] == 2
    other = tmp_path / "other.safetensors"
    save_vqgan(tiny_vq(seed=7), other)
    with pytest.raises(TrainingError, match=r"--init .*pg\.safetensors.*other\.safetensors"):
        train.main(pg_args(frames, other, more, "--steps", "1", "--init", str(out)))


def test_temporal_loss_compares_the_decoded_change_with_the_real_one(tmp_path):
    prev, cur = rand_pixels((2, 3, 8, 8), seed=1), rand_pixels((2, 3, 8, 8), seed=2)
    guide = rand_pixels((2, 3, 8, 8), seed=3)  # a decoded previous frame, not the real one
    # moving from the guidance exactly as the real frames move: no loss, whatever the guidance is
    assert temporal_loss(guide + (cur - prev), guide, cur, prev).item() == pytest.approx(0, abs=1e-6)
    # guided by the real previous frame it is the L1 loss
    out = rand_pixels((2, 3, 8, 8), seed=4)
    assert torch.allclose(temporal_loss(out, prev, cur, prev), (out - cur).abs().mean(), atol=1e-6)
    # a still scene: re-inventing detail the guidance had costs, repeating the guidance does not
    assert temporal_loss(guide, guide, prev, prev).item() == 0
    assert temporal_loss(out, guide, prev, prev).item() > 0.1
    # in the stage: opt-in, logged, recorded in the config only when used, negative refused
    vq = tiny_vq()
    tok = tmp_path / "tok.safetensors"
    save_vqgan(vq, tok)
    frames = write_frames(tmp_path / "video")
    out_file = tmp_path / "pg.safetensors"
    res = train.main(pg_args(frames, tok, out_file, "--steps", "2", "--recon-guidance", "1", "--pg-guidance", "0.5",
                             "--temporal-weight", "1"))
    assert res["step"] == 2 and res["temporal"] > 0
    assert res["loss"] == pytest.approx(res["l1"] + res["temporal"], rel=1e-5)
    check_pair(load_pgvqgan(out_file), load_tokenizer(tok), out_file, tok)
    res = train.main(pg_args(frames, tok, tmp_path / "off.safetensors", "--steps", "1"))
    assert res["temporal"] == 0 and res["loss"] == pytest.approx(res["l1"], rel=1e-6)
    with pytest.raises(TrainingError, match="--temporal-weight must be >= 0"):
        train.main(pg_args(frames, tok, out_file, "--steps", "1", "--temporal-weight", "-1"))


def test_train_pgvqgan_on_frames_a_caller_holds_and_a_bundle_tokenizer(tmp_path):
    bundle = tmp_path / "bundle.safetensors"
    tiny_model().save(bundle)
    video = torch.randint(0, 256, (6, 3, 24, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    args = build_parser().parse_args(pg_args("unused", bundle, tmp_path / "pg.safetensors", "--steps", "2",
                                             "--frame-range", "2,6"))
    res = train_pgvqgan(args, videos=[video])
    assert res["stopped"] == "steps"
    check_pair(load_pgvqgan(tmp_path / "pg.safetensors"), load_tokenizer(bundle))


def test_train_bad_inputs_are_named(tmp_path):
    tok = tmp_path / "tok.safetensors"
    save_vqgan(tiny_vq(), tok)
    frames = write_frames(tmp_path / "video", n=3)
    out = tmp_path / "pg.safetensors"
    broken = tmp_path / "broken.avi"
    broken.write_bytes(b"this is not a video" * 10)
    with pytest.raises(TrainingError, match="broken.avi"):
        train.main(pg_args(broken, tok, out, "--steps", "1"))
    with pytest.raises(TrainingError, match="--frame-range '5,3'"):
        train.main(pg_args(frames, tok, out, "--steps", "1", "--frame-range", "5,3"))
    with pytest.raises(TrainingError, match="needs 2 consecutive frames, the clip has 1"):
        train.main(pg_args(frames, tok, out, "--steps", "1", "--frame-range", "2,3"))
    with pytest.raises(TrainingError, match="--crop 48 is larger than the frames"):
        train.main(pg_args(frames, tok, out, "--steps", "1", "--crop", "48"))
    with pytest.raises(TrainingError, match="expected uint8 frames"):
        train_pgvqgan(build_parser().parse_args(pg_args("unused", tok, out, "--steps", "1")),
                      videos=[torch.zeros(4, 3, 32, 32)])


# --- the node ------------------------------------------------------------------------------------

def video_canvas(model, frames=3):
    """Frame 0 encoded from an image (given pixels), later frames random tokens, one patch of the last unknown."""
    image = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    canvas = model.canvas_from_image(image, frames=frames)
    canvas.tokens[:, 1:] = rand_tokens(canvas.tokens[:, 1:].shape, seed=3)
    canvas.known[:] = True
    canvas.tokens[:, -1, :4, :4] = -1
    canvas.known[-1, 0, 0] = False
    return canvas


def test_pgvqgan_decode_node(pack, tmp_path, monkeypatch):
    monkeypatch.setenv("NUWA_MODELS_DIR", str(tmp_path))
    (tmp_path / "nuwa" / "pgvqgan").mkdir(parents=True)
    tiny_model().save(tmp_path / "nuwa" / "tiny.safetensors")
    (model,) = node(pack, "NUWAModelLoader")("tiny.safetensors")
    save_pgvqgan(guided(model.vqgan), tmp_path / "nuwa" / "pgvqgan" / "pg.safetensors", "x")
    save_pgvqgan(guided(tiny_vq(seed=5)), tmp_path / "nuwa" / "pgvqgan" / "wrong.safetensors", "y")
    combo = pack["NUWAPGVQGANDecode"].INPUT_TYPES()["required"]["pgvqgan_name"][0]
    assert combo[0] == "none" and {"pg.safetensors", "wrong.safetensors"} <= set(combo)  # + the pack's shipped ones
    assert not any(n.startswith("pgvqgan/") for n in pack["NUWAModelLoader"].INPUT_TYPES()["required"]["model_name"][0])
    canvas = video_canvas(model)
    plain, fps = node(pack, "NUWAPGVQGANDecode")(model, canvas, "none", 12.5)
    assert fps == 12.5 and plain.shape == (3, 32, 32, 3)
    assert torch.allclose(plain, model.decode(canvas), atol=1e-6)  # 'none' = VQGAN Decode, frame by frame
    images, _ = node(pack, "NUWAPGVQGANDecode")(model, canvas, "pg.safetensors", 10.0)
    assert torch.equal(images[0], plain[0])  # the given frame as VQGAN Decode shows it
    assert (images[1] - plain[1]).abs().max() > 1e-3  # later frames guided
    assert torch.all(images[2, :16, :16] == 0.5)  # unknown patches grey
    with pytest.raises(PairError, match=r"wrong\.safetensors.*tiny\.safetensors"):
        node(pack, "NUWAPGVQGANDecode")(model, canvas, "wrong.safetensors", 10.0)


# --- the bench's metrics -------------------------------------------------------------------------

def test_flicker_bench_metrics_rank_the_controls():
    pytest.importorskip("cv2")
    spec = importlib.util.spec_from_file_location("pgvqgan_flicker", REPO / "bench" / "pgvqgan_flicker.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rng = np.random.default_rng(0)
    base = np.clip(np.kron(rng.random((16, 24, 3)), np.ones((4, 4, 1))), 0, 1).astype(np.float32)  # 64 x 96
    real = np.stack([np.roll(base, 2 * t, axis=1)[:, 16:80] for t in range(5)])  # moving 2 px per frame
    flows = bench.real_flows(real)
    ok = bench.scores(real, real, flows)
    shuffled = bench.scores(real[[3, 0, 4, 1, 2]], real, flows)
    still = bench.scores(np.repeat(real[:1], 5, 0), real, flows)  # copies one frame: no flicker, low PSNR
    assert ok["warp_error"] < 0.5 * shuffled["warp_error"]
    assert still["flicker"] == 0 and still["psnr"] < 15 and ok["psnr"] == float("inf")
