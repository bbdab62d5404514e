"""NUWA-Infinity video: training the renderer on clips, image animation, and the bounds of both."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _pack import import_pack, node
from _tiny import tiny_model
from _training import renderer_args
from PIL import Image

from nuwa_core import train
from nuwa_core.infinity import arbitrary_direction_controller as adc
from nuwa_core.infinity.generation import NuwaInfinity
from nuwa_core.infinity.patch_samplers import SamplerSettings
from nuwa_core.infinity.vqgan import VQModel, get_config, save_vqgan
from nuwa_core.training.loop import TrainingError
from nuwa_core.training.renderer import VideoTokenBank, training_steps, video_token_clips

FAST = SamplerSettings(top_k=8)
GREEDY = SamplerSettings(top_k=1)  # a random tiny renderer's context moves its logits a little: argmax shows it


def write_frames(folder, n=6, size=(32, 32), shift=3):
    """A folder of n frames of stripes moving `shift` px a frame."""
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    xx = np.arange(w)[None, :, None]
    for t in range(n):
        arr = (127 + 120 * np.sin((xx + shift * t) / 4.0 + np.arange(3))) * np.ones((h, 1, 1))
        Image.fromarray(arr.astype(np.uint8)).save(folder / f"frame_{t:03d}.png")
    return folder


@pytest.fixture
def tokenizer(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "tok.safetensors"
    save_vqgan(VQModel(get_config("tiny")), path)
    return path


def video_args(frames, tok, out, *extra):
    args = renderer_args("x", tok, out, "--extent", "1,1,1", "--frames", "2", "--video-size", "32x32",
                         "--steps", "2", *extra)
    i = args.index("--images")
    return args[:i] + ["--videos", str(frames)] + args[i + 2:]


def test_clips_are_frames_a_stride_apart_in_one_window():
    # token "videos" whose value says where it came from: 1000 * frame + 10 * row + column
    t, h, w = 20, 6, 7
    video = (1000 * torch.arange(t)[:, None, None] + 10 * torch.arange(h)[None, :, None]
             + torch.arange(w)[None, None, :])
    bank = VideoTokenBank([video, video])  # one video, "plain and mirrored"
    clips, sources = video_token_clips(bank, 64, 3, (2, 3), 4, torch.Generator().manual_seed(0))
    assert clips.shape == (64, 3, 2, 3) and sources == [0] * 64
    frames, rows, cols = clips // 1000, clips % 1000 // 10, clips % 10
    strides = frames[:, 1:, 0, 0] - frames[:, :-1, 0, 0]
    assert (strides == strides[:, :1]).all() and strides.min() >= 1 and strides.max() <= 4
    assert len(set(strides[:, 0].tolist())) > 1  # the stride is drawn, not fixed
    assert (frames == frames[:, :, :1, :1]).all()  # one frame per clip frame
    assert (rows[:, :, 1] - rows[:, :, 0] == 1).all() and (cols[:, :, :, 2] - cols[:, :, :, 0] == 2).all()
    again, _ = video_token_clips(bank, 64, 3, (2, 3), 4, torch.Generator().manual_seed(0))
    assert torch.equal(clips, again)
    # a video just long enough for the clip: stride 1 only
    short, _ = video_token_clips(VideoTokenBank([video[:3]] * 2), 8, 3, (2, 3), 4, torch.Generator().manual_seed(1))
    assert (short // 1000 == torch.arange(3)[None, :, None, None]).all()


def test_a_clip_is_walked_frames_forward_in_one_order():
    for seed in range(8):
        walk = training_steps((3, 2, 2), torch.Generator().manual_seed(seed), outpaint_share=1.0)
        assert len({order for order, _ in walk}) == 1
        frames = [c[0] for _, c in walk]
        assert frames == sorted(frames) and len(walk) == 12


def test_the_renderer_trains_on_video_clips(tmp_path, tokenizer):
    frames = write_frames(tmp_path / "frames")
    out = tmp_path / "video.safetensors"
    res = train.main(video_args(frames, tokenizer, out))
    assert res["step"] == 2 and res["optimizer_steps"] == 2 * 2 * 2 * 2  # 2 samples of 2 frames x 2x2 patches
    model = NuwaInfinity.load(out)
    assert model.renderer.config.extent == (1, 1, 1)


def test_video_input_errors_name_what_is_wrong(tmp_path, tokenizer):
    frames = write_frames(tmp_path / "frames", n=3)
    out = tmp_path / "v.safetensors"
    with pytest.raises(TrainingError, match=r"--frames 2 trains less than the frame extent e_f = 2"):
        train.main(video_args(frames, tokenizer, out, "--extent", "2,1,1"))
    with pytest.raises(TrainingError, match=r"frames a training clip needs \(frames kept: frames: 3\)"):
        train.main(video_args(frames, tokenizer, out, "--frames", "4", "--extent", "1,1,1"))
    with pytest.raises(TrainingError, match=r"--frame-range"):
        train.main(video_args(frames, tokenizer, out, "--frame-range", "5,2"))
    with pytest.raises(TrainingError, match=r"--video-size 30x32 must be whole"):
        train.main(video_args(frames, tokenizer, out, "--video-size", "30x32"))
    broken = tmp_path / "broken.avi"
    broken.write_bytes(b"RIFF this is not a video")
    with pytest.raises(TrainingError, match=r"cannot decode the video .*broken\.avi"):
        train.main(video_args(broken, tokenizer, out))
    Image.new("RGB", (40, 32)).save(frames / "frame_999.png")
    with pytest.raises(TrainingError, match=r"mixed sizes .*frame_999\.png is 40x32"):
        train.main(video_args(frames, tokenizer, out))


def video_model(e_f=1) -> NuwaInfinity:
    return tiny_model(extent=(e_f, 1, 1))


def still(seed=0, h=32, w=48):
    return torch.rand(1, h, w, 3, generator=torch.Generator().manual_seed(seed))


def test_image_animation_keeps_the_image_as_frame_0_and_is_seeded():
    m = video_model()
    st = m.canvas_from_image(still())
    plan = m.plan_frames(st, 3)
    assert plan.grid == (4, 2, 3) and len(plan) == 3 * 2 * 3
    a = m.generate(st, plan, FAST, generator=torch.Generator().manual_seed(0))
    b = m.generate(st, plan, FAST, generator=torch.Generator().manual_seed(0))
    assert a.known.all() and torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.tokens[:, 0], st.tokens[:, 0])  # the image's tokens stay frame 0
    frames = m.decode(a)
    assert frames.shape == (4, 32, 48, 3)
    assert torch.allclose(frames[0], still(), atol=1e-6)  # frame 0 shows the image itself
    # the next frames depend on the image: another still, other frames
    mine, other = (m.generate(m.canvas_from_image(still(n)), plan, GREEDY) for n in (0, 1))
    assert not torch.equal(other.tokens[:, 1:], mine.tokens[:, 1:])


def test_frames_see_earlier_frames_only_within_e_f():
    # with e_f = 0 the frames after the image do not depend on it at all; with e_f = 1 they do
    for e_f, depends in ((0, False), (1, True)):
        m = video_model(e_f)
        runs = [m.generate(s, m.plan_frames(s, 1), GREEDY)
                for s in (m.canvas_from_image(still(0)), m.canvas_from_image(still(1)))]
        assert (not torch.equal(runs[0].tokens[:, 1], runs[1].tokens[:, 1])) == depends


def test_the_pool_stays_bounded_as_frames_grow():
    m = video_model()
    peaks = []
    for frames in (2, 10):
        st = m.canvas_from_image(still())
        out = m.generate(st, m.plan_frames(st, frames), FAST, generator=torch.Generator().manual_seed(0))
        peaks.append(out.pool.peak_size)
    assert peaks[0] == peaks[1] <= 2 * 6  # at most two frames of 2 x 3 patches, whatever the length


def test_growing_a_video_in_two_calls_continues_the_first():
    m = video_model()
    st = m.canvas_from_image(still())
    first = m.generate(st, m.plan_frames(st, 2), FAST, generator=torch.Generator().manual_seed(0))
    second = m.generate(first, m.plan_frames(first, 2), FAST, generator=torch.Generator().manual_seed(1))
    assert second.grid == (5, 2, 3) and second.known.all()
    assert torch.equal(second.tokens[:, :3], first.tokens[:, :3])


def test_text_to_video_trains_on_captioned_videos_and_the_prompt_steers_the_frames(tmp_path, tokenizer):
    from safetensors.torch import save_file
    videos = tmp_path / "videos"
    write_frames(videos / "left", shift=3)
    write_frames(videos / "right", shift=-3)
    gen = torch.Generator().manual_seed(0)
    embeddings = tmp_path / "captions.safetensors"
    save_file({"left": torch.randn(3, 8, generator=gen), "right": torch.randn(3, 8, generator=gen)}, embeddings)
    out = tmp_path / "t2v.safetensors"
    train.main(video_args(videos, tokenizer, out, "--text-embeddings", str(embeddings)))
    model = NuwaInfinity.load(out)
    assert model.renderer.config.text_dim == 8
    prompts = torch.randn(2, 1, 3, 8, generator=gen)
    runs = []
    for prompt in prompts:  # text-to-video: a blank canvas of 3 frames, from the prompt alone
        canvas = model.blank_canvas(2, 2, frames=3)
        runs.append(model.generate(canvas, model.plan_fill(canvas), GREEDY, text=prompt))
    assert all(r.known.all() for r in runs) and not torch.equal(runs[0].tokens, runs[1].tokens)
    missing = tmp_path / "one.safetensors"
    save_file({"left": torch.randn(3, 8)}, missing)
    with pytest.raises(TrainingError, match="no embedding for 1 training image.*right"):
        train.main(video_args(videos, tokenizer, out, "--text-embeddings", str(missing)))


def test_frame_and_prompt_errors():
    m = video_model()
    st = m.canvas_from_image(still())
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="frames to add must be a whole number >= 1"):
            m.plan_frames(st, bad)
    with pytest.raises(ValueError, match="no text path"):
        m.generate(st, m.plan_frames(st, 1), FAST, text=torch.zeros(1, 3, 8))


def test_the_planner_adds_frames_for_video_models_only():
    plan = node(import_pack().NODE_CLASS_MAPPINGS, "NUWADirectionPlanner")
    m = video_model()
    st = m.canvas_from_image(still())
    spec, preview = plan(m, st, 0, 0, 0, 0, 0, 0, "center", frames_to_add=5)
    assert len(spec) == 5 * 6 and spec.plans[0].grid == (6, 2, 3)
    assert preview.shape[0] == 3  # the first new frames are drawn
    with pytest.raises(ValueError, match="frames_to_add plans new frames only"):
        plan(m, st, 0, 1, 0, 0, 0, 0, "center", frames_to_add=5)
    image_model = tiny_model()
    with pytest.raises(ValueError, match="trained on images"):
        plan(image_model, image_model.canvas_from_image(still()), 0, 0, 0, 0, 0, 0, "center", frames_to_add=5)
    grid = adc.split((6, 2, 3), spec.plans[0].segments[0].order)
    assert [c for c in grid if c[0] > 0] == spec.plans[0].segments[0].patches


def test_one_shot_on_a_video_writes_a_video_model_and_its_pgvqgan(tmp_path, monkeypatch):
    from nuwa_core.checkpoint import read_metadata
    from nuwa_core.infinity.pixel_guided_vqgan import check_pair, load_pgvqgan
    from nuwa_core.training import one_shot
    monkeypatch.setattr(one_shot, "SHIPPED_VIDEO_MODEL", tmp_path / "absent.safetensors")  # as before one ships
    frames = write_frames(tmp_path / "clip", n=6, size=(160, 136), shift=4)
    out = tmp_path / "nuwa" / "walk.safetensors"
    res = train.main(["one-shot", str(frames), "--out", str(out), "--tokenizer-steps", "1", "--renderer-steps", "1",
                      "--pgvqgan-steps", "1", "--threads", "2"])
    assert res["stopped"] == "steps" and (res["tokenizer_steps"], res["renderer_steps"], res["pgvqgan_steps"]) == (1,) * 3
    model = NuwaInfinity.load(out)
    assert model.renderer.config.extent == one_shot.VIDEO_EXTENT
    pg_path = one_shot.pgvqgan_path_for(out)
    assert pg_path == tmp_path / "nuwa" / "pgvqgan" / "walk.safetensors"
    check_pair(load_pgvqgan(pg_path), model.vqgan, pg_path, out)  # made for the model's own tokens
    record = json.loads(read_metadata(out)["one_shot"])
    assert record["video"] == [6, 3, 128, 128]  # centre-cropped to whole 64 px patches
    with pytest.raises(TrainingError, match="needs at least 4"):
        one_shot.train_one_shot(torch.zeros(3, 3, 128, 128), tmp_path / "short.safetensors")
    with pytest.raises(TrainingError, match="trim the video instead"):
        one_shot.train_one_shot(torch.zeros(5, 3, 128, 128), tmp_path / "m.safetensors",
                                keep_out=torch.ones(128, 128))


def test_text_to_video_reads_captions_through_a_text_encoder(tmp_path, tokenizer):
    """T2V uses the same text path as text to image: a video's same-name .txt through --text-encoder, whose
    name the bundle records; a video without its caption is named."""
    from nuwa_core.text_encoder import WordTextConfig, WordTextEncoder
    videos = tmp_path / "videos"
    write_frames(videos / "left", shift=3)
    write_frames(videos / "right", shift=-3)
    (videos / "left.txt").write_text("the scene moves left", encoding="utf-8")
    (videos / "right.txt").write_text("the scene moves right", encoding="utf-8")
    torch.manual_seed(0)
    WordTextEncoder(WordTextConfig(vocab=("the", "scene", "moves", "left", "right"), width=8, heads=2)).save(
        tmp_path / "words.safetensors")
    out = tmp_path / "t2v.safetensors"
    train.main(video_args(videos, tokenizer, out, "--text-encoder", str(tmp_path / "words.safetensors")))
    model = NuwaInfinity.load(out)
    assert (model.text_encoder["name"], model.text_encoder["width"], model.renderer.config.text_dim) == ("words", 8, 8)
    (videos / "right.txt").unlink()
    with pytest.raises(TrainingError, match=r"--text-encoder: no caption .*right"):
        train.main(video_args(videos, tokenizer, out, "--text-encoder", str(tmp_path / "words.safetensors")))


REPO = Path(__file__).resolve().parents[1]
SHIPPED_TEXT_MODEL = REPO / "models" / "nuwa" / "nuwa_infinity_scenes.safetensors"


@pytest.mark.skipif(not SHIPPED_TEXT_MODEL.is_file(), reason="models/nuwa/nuwa_infinity_scenes.safetensors is absent")
def test_the_shipped_text_model_makes_videos_whose_frames_continue_the_one_before():
    """text_to_video's model: a prompt -> frames; frame 0 is the picture text to image draws with that seed, and
    the later frames repeat much more of the frame before than the same model without frame context does."""
    from nuwa_core.text_encoder import load_text_encoder
    torch.set_num_threads(1)
    m = NuwaInfinity.load(SHIPPED_TEXT_MODEL)
    assert m.renderer.config.extent[0] == 2
    text = load_text_encoder(REPO / "models" / "nuwa" / "text_encoders" / "nuwa_text_scenes.safetensors").encode(
        ["a blue sky over a green meadow"])
    settings = SamplerSettings(temperature=0.7, epsilon=0.01)
    video = m.blank_canvas(2, 2, frames=3)
    still = m.blank_canvas(2, 2)

    def carried(extent=None):  # share of tokens equal to the previous frame's at the same place
        out = m.generate(video, m.plan_fill(video), settings, text=text, generator=0, extent=extent).tokens[0]
        return out, float((out[1:] == out[:-1]).float().mean())

    tokens, with_frames = carried()
    _, without = carried((0, 1, 1))
    picture = m.generate(still, m.plan_fill(still), settings, text=text, generator=0).tokens[0, 0]
    assert torch.equal(tokens[0], picture)
    assert with_frames > without + 0.2, (with_frames, without)
