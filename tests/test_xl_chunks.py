"""T-KLVAE long videos in overlapping, cross-faded temporal windows (issue 15 item 5)."""
import pytest
import torch

from nuwa_core import checkpoint
from nuwa_core.xl.model import XLModel
from nuwa_core.xl.t_klvae import TKLVAE, TKLVAEConfig, load_t_klvae, save_t_klvae, temporal_windows


def random_vae(temporal: bool = True, seed: int = 0) -> TKLVAE:
    """A tiny T-KLVAE whose temporal layers are random too (fresh ones are the identity, so frames would
    not depend on their neighbours and chunking would change nothing)."""
    torch.manual_seed(seed)
    vae = TKLVAE(TKLVAEConfig.tiny(ch_mult=(1, 2, 2), temporal=temporal)).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "_t." in name:
                p.add_(torch.randn_like(p) * 0.3)
    return vae


def smooth_latents(frames: int, seed: int = 1) -> torch.Tensor:
    """[1, F, 4, 4, 4]: a straight line between two random latents (every step the same)."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(2, 4, 4, 4, generator=g)
    t = torch.linspace(0, 1, frames).view(frames, 1, 1, 1)
    return ((1 - t) * a + t * b)[None]


def jumps(video: torch.Tensor) -> torch.Tensor:
    """Mean |x[t+1] - x[t]| per frame pair of [1, F, ...] -> [F - 1]."""
    return (video[0, 1:] - video[0, :-1]).abs().flatten(1).mean(1)


@pytest.mark.parametrize("n,chunk,overlap", [(7, 4, None), (8, 4, 2), (16, 4, 1), (16, 4, 0), (30, 5, 3),
                                             (3, 4, None), (4, 4, 3), (17, 16, 8), (9, 1, 0)])
def test_windows_cover_every_frame_with_weights_summing_to_one(n, chunk, overlap):
    plan = temporal_windows(n, chunk, overlap)
    total = torch.zeros(n, dtype=torch.float64)
    for a, e, w in plan:
        assert 0 <= a < e <= n and e - a == min(chunk, n) and w.shape == (e - a,) and (w > 0).all()
        total[a:e] += w
    assert torch.allclose(total, torch.ones(n, dtype=torch.float64), atol=1e-12)
    assert plan[0][0] == 0 and plan[-1][1] == n


def test_default_plan_starts_a_window_at_every_frame_and_mixes_every_interior_frame_alike():
    plan = temporal_windows(12, 4)
    assert [a for a, _, _ in plan] == list(range(9))
    # frames 3..8 are each in 4 windows, at positions 3, 2, 1, 0: the same weights for every one of them
    mixes = [sorted(round(float(w[t - a]), 12) for a, e, w in plan if a <= t < e) for t in range(3, 9)]
    assert all(m == mixes[0] for m in mixes) and len(mixes[0]) == 4


@pytest.mark.parametrize("chunk,overlap,error,words", [
    (0, None, ValueError, "chunk"), (-2, None, ValueError, "chunk"), (2.5, None, TypeError, "chunk"),
    (True, None, TypeError, "chunk"), ("4", None, TypeError, "chunk"), (4, 4, ValueError, "0..3"),
    (4, -1, ValueError, "overlap"), (4, 1.5, TypeError, "overlap")])
def test_chunk_and_overlap_are_validated_with_a_clear_error(chunk, overlap, error, words):
    vae = random_vae()
    with pytest.raises(error, match=words):
        vae.decode(smooth_latents(6), chunk=chunk, overlap=overlap)
    with pytest.raises(error, match=words):
        vae.encode(torch.zeros(1, 6, 3, 8, 8), chunk=chunk, overlap=overlap)
    with pytest.raises(ValueError, match="clip_frames"):
        TKLVAEConfig.tiny(clip_frames=0)


@torch.no_grad()
def test_one_window_covering_the_clip_equals_the_plain_decode_and_encode_exactly():
    vae = random_vae()
    z = smooth_latents(6)
    plain = vae.decode(z)
    for chunk in (6, 7, 100):
        assert torch.equal(vae.decode(z, chunk=chunk), plain)
        assert torch.equal(vae.decode(z, chunk=chunk, overlap=0), plain)
    video = torch.rand(1, 6, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    assert torch.equal(vae.encode(video, chunk=6), vae.encode(video))
    draws = [vae.encode(video, sample=True, generator=torch.Generator().manual_seed(3), chunk=c) for c in (None, 6)]
    assert torch.equal(*draws)


def edge_and_inside(frames: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Frame pairs a hard cut of `chunk` frames falls between ((3, 4), (7, 8), ... for 4), and the others."""
    edge = torch.arange(chunk - 1, frames - 1, chunk)
    return edge, torch.tensor([t for t in range(frames - 1) if t % chunk != chunk - 1])


@torch.no_grad()
def test_blended_decode_leaves_no_jump_at_window_edges_where_hard_cuts_do():
    """A straight line in latent space decoded by a fixed random T-KLVAE. Hard 4-frame chunks jump at
    every chunk edge (more than between the frames inside a chunk, and far more than the one-window
    decode anywhere); the default blended windows change from frame to frame as little as the
    one-window decode does, at every frame pair away from the clip's ends (those are clip edges in
    the one-window decode too). Half overlap (stride 2) mixes even and odd frames differently: on this
    model it flickers with period 2, which is why the default starts a window at every frame."""
    vae, z, chunk = random_vae(), smooth_latents(24), 4
    ref = jumps(vae.decode(z))[chunk:-chunk]
    hard = jumps(vae.decode(z, chunk=chunk, overlap=0))
    edge, inside = edge_and_inside(24, chunk)
    assert hard[edge].mean() > 1.3 * hard[inside].mean()  # the test sees a hard cut
    assert hard[edge].min() > 5 * ref.max()
    soft = jumps(vae.decode(z, chunk=chunk))[chunk:-chunk]
    assert soft.max() < 1.5 * ref.max(), (soft, ref)
    half = jumps(vae.decode(z, chunk=chunk, overlap=2))[chunk:-chunk]
    assert half.min() > 3 * ref.max()  # ... and a period-2 flicker


@torch.no_grad()
def test_blended_encode_leaves_no_jump_at_window_edges_where_hard_cuts_do():
    vae = random_vae()
    t = torch.linspace(0, 1, 24).view(1, 24, 1, 1, 1)
    a, b = torch.rand(2, 1, 1, 3, 8, 8, generator=torch.Generator().manual_seed(4)) * 2 - 1
    video = (1 - t) * a + t * b
    ref = jumps(vae.encode(video))[4:-4]
    hard = jumps(vae.encode(video, chunk=4, overlap=0))
    edge, inside = edge_and_inside(24, 4)
    assert hard[edge].mean() > 1.2 * hard[inside].mean()
    assert hard[edge].min() > 5 * ref.max()
    soft = jumps(vae.encode(video, chunk=4))[4:-4]
    assert soft.max() < 1.5 * ref.max(), (soft, ref)


@torch.no_grad()
def test_chunked_decode_and_encode_are_deterministic_and_bounded_to_the_window():
    vae = random_vae()
    z = smooth_latents(10)
    assert torch.equal(vae.decode(z, chunk=4), vae.decode(z, chunk=4))
    video = torch.rand(1, 10, 3, 8, 8, generator=torch.Generator().manual_seed(5)) * 2 - 1
    assert torch.equal(vae.encode(video, chunk=3, overlap=1), vae.encode(video, chunk=3, overlap=1))
    seen = []
    hook = vae.decoder.register_forward_pre_hook(lambda m, args: seen.append(args[1]))
    vae.decode(z, chunk=4)
    hook.remove()
    assert seen == [4] * 7  # windows of 4 frames starting at frames 0..6: never more than the chunk at once


@torch.no_grad()
def test_without_temporal_layers_windows_change_nothing():
    vae = random_vae(temporal=False)
    z = smooth_latents(9)
    assert torch.allclose(vae.decode(z, chunk=2), vae.decode(z), atol=1e-6)


@torch.no_grad()
def test_xl_model_decodes_in_the_trained_clip_length_and_keyframes_each_alone():
    vae = random_vae()
    vae.config.clip_frames = 3
    model = XLModel(vae, None, None)
    s = vae.config.latent_scale
    lat = smooth_latents(8)[0] * s
    assert torch.equal(model.decode(lat), vae.decode(lat[None] / s, chunk=3)[0])
    assert torch.equal(model.decode(lat, chunk=5, overlap=2), vae.decode(lat[None] / s, chunk=5, overlap=2)[0])
    alone = torch.cat([vae.decode(f[None, None] / s)[0] for f in lat])
    assert torch.equal(model.decode(lat, frames_apart=16), alone)
    frames = alone.clamp(-1, 1)
    assert torch.equal(model.encode(frames), vae.encode(frames[None], chunk=3)[0] * s)
    assert torch.equal(model.encode(frames, frames_apart=4), torch.cat([vae.encode(f[None, None])[0] for f in frames]) * s)


def test_clip_frames_is_saved_and_files_without_it_read_as_four(tmp_path):
    torch.manual_seed(0)
    save_t_klvae(TKLVAE(TKLVAEConfig.tiny(clip_frames=6)), tmp_path / "v.safetensors")
    assert load_t_klvae(tmp_path / "v.safetensors").config.clip_frames == 6
    assert checkpoint.config_from_json(TKLVAEConfig, '{"ch": 8, "ch_mult": [1, 2], "num_groups": 4}').clip_frames == 4
