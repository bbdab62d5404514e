"""VQGAN tokenizer: taming key layout, file loading (safetensors, Lightning .ckpt, guarded pickle),
token encode/decode, tiled decoding. Tiny configs on the CPU; f16 models only on the meta device."""
import dataclasses

import pytest
import torch
from safetensors.torch import save_file

from nuwa_core import checkpoint, images
from nuwa_core.infinity.vqgan import (PRESETS, _blend_weights, VectorQuantizer, VQModel, get_config, infer_config,
                             load_vqgan, save_vqgan)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return VQModel(get_config("tiny")).eval()


def images_like(n=1, h=16, w=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g) * 2 - 1


class NotATensor:  # pickled by reference: refused by weights_only loading
    def __init__(self):
        self.note = "arbitrary object"


# --- taming key layout -------------------------------------------------------------------------

def meta_model(name):
    with torch.device("meta"):
        return VQModel(get_config(name))


def test_f16_keys_match_taming_golden_list():
    sd = meta_model("f16_16384").state_dict()
    got = sorted(f"{k} {','.join(map(str, v.shape))}" for k, v in sd.items())
    assert got == GOLDEN_F16_16384.split("\n")[1:-1]
    assert len(sd) == 343
    assert tuple(sd["quantize.embedding.weight"].shape) == (16384, 256)
    for k in ("encoder.down.4.attn.1.proj_out.weight", "decoder.up.4.attn.2.q.weight",
              "decoder.up.0.block.2.conv2.bias", "encoder.down.1.downsample.conv.weight",
              "decoder.up.1.upsample.conv.weight", "encoder.down.2.block.0.nin_shortcut.weight"):
        assert k in sd
    assert not any(k.startswith(("encoder.down.4.downsample", "decoder.up.0.upsample",
                                 "encoder.down.3.attn", "decoder.up.3.attn", "loss.")) for k in sd)


def test_f16_1024_differs_only_in_codebook():
    a, b = meta_model("f16_1024").state_dict(), meta_model("f16_16384").state_dict()
    assert set(a) == set(b)
    assert [k for k in a if a[k].shape != b[k].shape] == ["quantize.embedding.weight"]
    assert tuple(a["quantize.embedding.weight"].shape) == (1024, 256)
    assert meta_model("f16_1024").downsample_factor == 16


def test_presets_and_unknown_preset():
    assert get_config("small_f8").downsample_factor == 8 and get_config("tiny").downsample_factor == 4
    small = sum(p.numel() for p in meta_model("small_f8").parameters())
    assert small * 2 < 8e6  # shipped fp16 demo tokenizer stays under 8 MB
    with pytest.raises(ValueError, match="f16_16384.*tiny"):
        get_config("f16_8192")
    get_config("tiny").n_embed = 5  # a copy: presets are not mutated
    assert PRESETS["tiny"].n_embed != 5


# --- quantizer ---------------------------------------------------------------------------------

def test_quantizer_legacy_beta_placement_and_straight_through():
    vq = VectorQuantizer(4, 2, beta=0.25)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[0., 0.], [1., 0.], [0., 1.], [1., 1.]]))
    z = torch.tensor([0.9, 0.2, 0.1, 0.8]).view(1, 2, 2, 1).permute(0, 1, 3, 2).contiguous().requires_grad_()
    # z: [1, 2, 1, 2]; positions (0.9, 0.1) -> code 1, (0.2, 0.8) -> code 2
    z_q, loss, ids = vq(z)
    assert ids.tolist() == [[[1, 2]]]
    assert torch.allclose(z_q, vq.embed(ids))  # forward value is the codeword
    loss.backward()
    diff = (z - vq.embed(ids)).detach()
    # legacy=True: the commitment term (gradient into z) has weight 1, beta weights the codebook term
    # (here the straight-through gradient adds nothing since only loss was backpropagated)
    assert torch.allclose(z.grad, 2 * diff / diff.numel())
    e_grad = vq.embedding.weight.grad
    assert torch.allclose(e_grad[1], -0.25 * 2 * diff[0, :, 0, 0] / diff.numel())
    assert torch.all(e_grad[0] == 0) and torch.all(e_grad[3] == 0)


def test_forward_trains_through_straight_through(tiny):
    model = VQModel(get_config("tiny"))
    rec, loss, ids = model(images_like(2))
    assert rec.shape == (2, 3, 16, 16) and ids.shape == (2, 4, 4) and loss.ndim == 0
    (rec.square().mean() + loss).backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0  # reconstruction gradient reaches the encoder
    assert model.quantize.embedding.weight.grad.abs().sum() > 0


# --- tokens ------------------------------------------------------------------------------------

def test_encode_decode_shapes_and_determinism(tiny):
    x = images_like(2, 16, 24)
    ids = tiny.encode_tokens(x)
    assert ids.dtype == torch.long and ids.shape == (2, 4, 6)
    assert 0 <= ids.min() and ids.max() < tiny.config.n_embed
    assert torch.equal(ids, tiny.encode_tokens(x))
    assert torch.equal(ids[1:], tiny.encode_tokens(x[1:]))  # batch equals single
    y = tiny.decode_tokens(ids)
    assert y.shape == (2, 3, 16, 24) and torch.isfinite(y).all()
    assert torch.equal(y, tiny.decode_tokens(ids))


def test_size_not_multiple_of_f_names_valid_sizes(tiny):
    with pytest.raises(ValueError, match="18x16.*factor 4.*16 or 20"):
        tiny.encode_tokens(images_like(1, 18, 16))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        tiny.decode_tokens(torch.full((1, 2, 2), 64))


def test_rgba_and_gray_inputs_via_image_to_model(tiny):
    g = torch.Generator().manual_seed(1)
    gray = torch.rand(1, 16, 16, 1, generator=g)
    rgba = torch.cat([gray.expand(-1, -1, -1, 3), torch.ones(1, 16, 16, 1)], -1)
    a = tiny.encode_tokens(images.image_to_model(gray))
    b = tiny.encode_tokens(images.image_to_model(rgba))  # opaque alpha: same picture
    assert a.shape == (1, 4, 4) and torch.equal(a, b)


def test_tiled_decode_equals_full_when_windows_cover_canvas(tiny):
    ids = torch.randint(0, 64, (1, 6, 7), generator=torch.Generator().manual_seed(2))
    full = tiny.decode_tokens(ids)
    assert torch.equal(tiny.decode_tokens_tiled(ids, tile=8, overlap=0), full)
    # small tiles, but every window is the whole canvas: stitching must reproduce it exactly
    assert torch.equal(tiny.decode_tokens_tiled(ids, tile=2, overlap=3), full)


def test_tiled_decode_bounded_windows(tiny, monkeypatch):
    ids = torch.randint(0, 64, (1, 10, 13), generator=torch.Generator().manual_seed(3))
    full = tiny.decode_tokens(ids)
    seen = []
    original = VQModel.decode_tokens

    def spy(self, t):
        seen.append(tuple(t.shape))
        return original(self, t)
    monkeypatch.setattr(VQModel, "decode_tokens", spy)
    out = tiny.decode_tokens_tiled(ids, tile=4, overlap=1, max_windows=1)  # one window per call
    assert out.shape == full.shape and torch.isfinite(out).all()
    # (tile + 2*overlap)^2 at most; windows shifted inwards at the far border are not decoded twice
    assert max(max(s[1:]) for s in seen) <= 6 and len(seen) == 3 * 3 and all(s[0] == 1 for s in seen)
    seen.clear()  # batched (the default): the same 9 windows, several per call
    assert (tiny.decode_tokens_tiled(ids, tile=4, overlap=1) - out).abs().max() <= 5e-5
    assert sum(s[0] for s in seen) == 9 and len(seen) < 9 and max(max(s[1:]) for s in seen) <= 6
    # away from any cross-fade, pixels come from one window only, unchanged: the top-left corner
    # (tokens [0:3, 0:3]) from the first window, tokens [0:6, 0:6] ...
    assert torch.equal(out[..., :12, :12], tiny.decode_tokens(ids[:, :6, :6])[..., :12, :12])
    # ... and the bottom-right token (9, 12) from the last window, tokens [4:10, 7:13]
    assert torch.equal(out[..., 36:, 48:], tiny.decode_tokens(ids[:, 4:, 7:])[..., 20:, 20:])


def test_tiled_decode_cross_fades_between_windows(tiny):
    ids = torch.randint(0, 64, (1, 4, 12), generator=torch.Generator().manual_seed(4))
    out = tiny.decode_tokens_tiled(ids, tile=4, overlap=2)  # column windows [0:8], [2:10], [4:12]
    left, right = tiny.decode_tokens(ids[:, :, :8]), tiny.decode_tokens(ids[:, :, 4:])
    # pixel column 10 (token 2) lies where the second window fades in: a mix of the first two;
    # the last column of the canvas comes from the last window only
    middle = tiny.decode_tokens(ids[:, :, 2:10])
    col = out[..., 10]
    lo = torch.minimum(left[..., 10], middle[..., 2]) - 5e-5
    hi = torch.maximum(left[..., 10], middle[..., 2]) + 5e-5
    assert ((col >= lo) & (col <= hi)).all() and not torch.equal(col, left[..., 10])
    assert torch.allclose(out[..., -1], right[..., -1], atol=5e-5)  # decoded in a batch of windows: float rounding


@pytest.mark.parametrize("n,tile,overlap,f", [(10, 4, 1, 4), (13, 4, 2, 8), (16, 8, 2, 8), (7, 2, 3, 1), (9, 3, 0, 2)])
def test_blend_weights_partition_unity(n, tile, overlap, f):
    total = torch.zeros(n * f)
    for window, weight in _blend_weights(n, tile, overlap, f):
        assert weight.shape == ((window.stop - window.start) * f,) and (weight > 0).all()
        total[window.start * f:window.stop * f] += weight
    assert torch.allclose(total, torch.ones(n * f), atol=1e-6)


def test_tiled_encode(tiny):
    x = images_like(1, 24, 28)
    full = tiny.encode_tokens(x)
    assert torch.equal(tiny.encode_tokens_tiled(x, tile=8), full)
    assert torch.equal(tiny.encode_tokens_tiled(x, tile=2, overlap=4), full)  # windows cover the canvas
    assert tiny.encode_tokens_tiled(x, tile=2, overlap=1).shape == full.shape


# --- files -------------------------------------------------------------------------------------

def test_safetensors_round_trip(tiny, tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_vqgan(tiny, path)
    meta = checkpoint.read_metadata(path)
    assert meta["nuwa_kind"] == "vqgan"
    loaded = load_vqgan(path)
    assert loaded.config == tiny.config and not loaded.training
    x = images_like(1)
    assert torch.equal(loaded.encode_tokens(x), tiny.encode_tokens(x))
    ids = tiny.encode_tokens(x)
    assert torch.equal(loaded.decode_tokens(ids), tiny.decode_tokens(ids))
    save_vqgan(tiny, tmp_path / "half.safetensors", dtype=torch.float16)
    half, _ = checkpoint.load_state_dict(tmp_path / "half.safetensors")
    assert half["quantize.embedding.weight"].dtype == torch.float16
    assert load_vqgan(tmp_path / "half.safetensors").decode_tokens(ids).shape == (1, 3, 16, 16)


def test_lightning_ckpt_loads_dropping_loss_keys(tiny, tmp_path):
    state = dict(tiny.state_dict())
    state["loss.discriminator.main.0.weight"] = torch.zeros(4, 3, 4, 4)
    state["loss.perceptual_loss.net.slice1.0.weight"] = torch.zeros(2)
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, "global_step": 1234, "epoch": 3}, path)
    loaded = load_vqgan(path)  # no config in the file: inferred from shapes, the tiny preset
    assert loaded.config == get_config("tiny")
    ids = torch.randint(0, 64, (1, 3, 3))
    assert torch.equal(loaded.decode_tokens(ids), tiny.decode_tokens(ids))


def test_infer_non_preset_config_and_explicit_config(tmp_path):
    cfg = dataclasses.replace(get_config("tiny"), n_embed=100, num_res_blocks=2, attn_resolutions=())
    model = VQModel(cfg)
    assert infer_config(model.state_dict()) == dataclasses.replace(cfg, resolution=256)
    path = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))  # no metadata
    assert load_vqgan(path).config.n_embed == 100
    assert load_vqgan(path, config=cfg).config == cfg


def test_pickled_objects_need_allow_pickle(tiny, tmp_path):
    path = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": tiny.state_dict(), "hparams": NotATensor()}, path)
    with pytest.raises(checkpoint.CheckpointError, match="allow_pickle"):
        load_vqgan(path)
    assert load_vqgan(path, allow_pickle=True).config == get_config("tiny")


def test_wrong_shapes_name_the_keys(tiny, tmp_path):
    state = dict(tiny.state_dict())
    state["quantize.embedding.weight"] = torch.zeros(32, 16)
    del state["decoder.conv_out.bias"]
    path = tmp_path / "bad.safetensors"
    checkpoint.save_model_file(path, state, "vqgan", get_config("tiny"))
    with pytest.raises(checkpoint.CheckpointError) as err:
        load_vqgan(path)
    assert "quantize.embedding.weight: file (32, 16) vs model (64, 16)" in str(err.value)
    assert "decoder.conv_out.bias" in str(err.value)
    checkpoint.save_model_file(tmp_path / "other.safetensors", state, "renderer", get_config("tiny"))
    with pytest.raises(checkpoint.CheckpointError, match="renderer"):
        load_vqgan(tmp_path / "other.safetensors")


# Keys and shapes of taming's VQModel for vqgan_imagenet_f16_16384 (ddconfig: ch 128, ch_mult
# 1,1,2,2,4, num_res_blocks 2, attn_resolutions [16], z_channels 256; embed_dim 256), listed from
# taming's Encoder/Decoder/VectorQuantizer2 construction rules, without the training-only loss.*.
GOLDEN_F16_16384 = """
decoder.conv_in.bias 512
decoder.conv_in.weight 512,256,3,3
decoder.conv_out.bias 3
decoder.conv_out.weight 3,128,3,3
decoder.mid.attn_1.k.bias 512
decoder.mid.attn_1.k.weight 512,512,1,1
decoder.mid.attn_1.norm.bias 512
decoder.mid.attn_1.norm.weight 512
decoder.mid.attn_1.proj_out.bias 512
decoder.mid.attn_1.proj_out.weight 512,512,1,1
decoder.mid.attn_1.q.bias 512
decoder.mid.attn_1.q.weight 512,512,1,1
decoder.mid.attn_1.v.bias 512
decoder.mid.attn_1.v.weight 512,512,1,1
decoder.mid.block_1.conv1.bias 512
decoder.mid.block_1.conv1.weight 512,512,3,3
decoder.mid.block_1.conv2.bias 512
decoder.mid.block_1.conv2.weight 512,512,3,3
decoder.mid.block_1.norm1.bias 512
decoder.mid.block_1.norm1.weight 512
decoder.mid.block_1.norm2.bias 512
decoder.mid.block_1.norm2.weight 512
decoder.mid.block_2.conv1.bias 512
decoder.mid.block_2.conv1.weight 512,512,3,3
decoder.mid.block_2.conv2.bias 512
decoder.mid.block_2.conv2.weight 512,512,3,3
decoder.mid.block_2.norm1.bias 512
decoder.mid.block_2.norm1.weight 512
decoder.mid.block_2.norm2.bias 512
decoder.mid.block_2.norm2.weight 512
decoder.norm_out.bias 128
decoder.norm_out.weight 128
decoder.up.0.block.0.conv1.bias 128
decoder.up.0.block.0.conv1.weight 128,128,3,3
decoder.up.0.block.0.conv2.bias 128
decoder.up.0.block.0.conv2.weight 128,128,3,3
decoder.up.0.block.0.norm1.bias 128
decoder.up.0.block.0.norm1.weight 128
decoder.up.0.block.0.norm2.bias 128
decoder.up.0.block.0.norm2.weight 128
decoder.up.0.block.1.conv1.bias 128
decoder.up.0.block.1.conv1.weight 128,128,3,3
decoder.up.0.block.1.conv2.bias 128
decoder.up.0.block.1.conv2.weight 128,128,3,3
decoder.up.0.block.1.norm1.bias 128
decoder.up.0.block.1.norm1.weight 128
decoder.up.0.block.1.norm2.bias 128
decoder.up.0.block.1.norm2.weight 128
decoder.up.0.block.2.conv1.bias 128
decoder.up.0.block.2.conv1.weight 128,128,3,3
decoder.up.0.block.2.conv2.bias 128
decoder.up.0.block.2.conv2.weight 128,128,3,3
decoder.up.0.block.2.norm1.bias 128
decoder.up.0.block.2.norm1.weight 128
decoder.up.0.block.2.norm2.bias 128
decoder.up.0.block.2.norm2.weight 128
decoder.up.1.block.0.conv1.bias 128
decoder.up.1.block.0.conv1.weight 128,256,3,3
decoder.up.1.block.0.conv2.bias 128
decoder.up.1.block.0.conv2.weight 128,128,3,3
decoder.up.1.block.0.nin_shortcut.bias 128
decoder.up.1.block.0.nin_shortcut.weight 128,256,1,1
decoder.up.1.block.0.norm1.bias 256
decoder.up.1.block.0.norm1.weight 256
decoder.up.1.block.0.norm2.bias 128
decoder.up.1.block.0.norm2.weight 128
decoder.up.1.block.1.conv1.bias 128
decoder.up.1.block.1.conv1.weight 128,128,3,3
decoder.up.1.block.1.conv2.bias 128
decoder.up.1.block.1.conv2.weight 128,128,3,3
decoder.up.1.block.1.norm1.bias 128
decoder.up.1.block.1.norm1.weight 128
decoder.up.1.block.1.norm2.bias 128
decoder.up.1.block.1.norm2.weight 128
decoder.up.1.block.2.conv1.bias 128
decoder.up.1.block.2.conv1.weight 128,128,3,3
decoder.up.1.block.2.conv2.bias 128
decoder.up.1.block.2.conv2.weight 128,128,3,3
decoder.up.1.block.2.norm1.bias 128
decoder.up.1.block.2.norm1.weight 128
decoder.up.1.block.2.norm2.bias 128
decoder.up.1.block.2.norm2.weight 128
decoder.up.1.upsample.conv.bias 128
decoder.up.1.upsample.conv.weight 128,128,3,3
decoder.up.2.block.0.conv1.bias 256
decoder.up.2.block.0.conv1.weight 256,256,3,3
decoder.up.2.block.0.conv2.bias 256
decoder.up.2.block.0.conv2.weight 256,256,3,3
decoder.up.2.block.0.norm1.bias 256
decoder.up.2.block.0.norm1.weight 256
decoder.up.2.block.0.norm2.bias 256
decoder.up.2.block.0.norm2.weight 256
decoder.up.2.block.1.conv1.bias 256
decoder.up.2.block.1.conv1.weight 256,256,3,3
decoder.up.2.block.1.conv2.bias 256
decoder.up.2.block.1.conv2.weight 256,256,3,3
decoder.up.2.block.1.norm1.bias 256
decoder.up.2.block.1.norm1.weight 256
decoder.up.2.block.1.norm2.bias 256
decoder.up.2.block.1.norm2.weight 256
decoder.up.2.block.2.conv1.bias 256
decoder.up.2.block.2.conv1.weight 256,256,3,3
decoder.up.2.block.2.conv2.bias 256
decoder.up.2.block.2.conv2.weight 256,256,3,3
decoder.up.2.block.2.norm1.bias 256
decoder.up.2.block.2.norm1.weight 256
decoder.up.2.block.2.norm2.bias 256
decoder.up.2.block.2.norm2.weight 256
decoder.up.2.upsample.conv.bias 256
decoder.up.2.upsample.conv.weight 256,256,3,3
decoder.up.3.block.0.conv1.bias 256
decoder.up.3.block.0.conv1.weight 256,512,3,3
decoder.up.3.block.0.conv2.bias 256
decoder.up.3.block.0.conv2.weight 256,256,3,3
decoder.up.3.block.0.nin_shortcut.bias 256
decoder.up.3.block.0.nin_shortcut.weight 256,512,1,1
decoder.up.3.block.0.norm1.bias 512
decoder.up.3.block.0.norm1.weight 512
decoder.up.3.block.0.norm2.bias 256
decoder.up.3.block.0.norm2.weight 256
decoder.up.3.block.1.conv1.bias 256
decoder.up.3.block.1.conv1.weight 256,256,3,3
decoder.up.3.block.1.conv2.bias 256
decoder.up.3.block.1.conv2.weight 256,256,3,3
decoder.up.3.block.1.norm1.bias 256
decoder.up.3.block.1.norm1.weight 256
decoder.up.3.block.1.norm2.bias 256
decoder.up.3.block.1.norm2.weight 256
decoder.up.3.block.2.conv1.bias 256
decoder.up.3.block.2.conv1.weight 256,256,3,3
decoder.up.3.block.2.conv2.bias 256
decoder.up.3.block.2.conv2.weight 256,256,3,3
decoder.up.3.block.2.norm1.bias 256
decoder.up.3.block.2.norm1.weight 256
decoder.up.3.block.2.norm2.bias 256
decoder.up.3.block.2.norm2.weight 256
decoder.up.3.upsample.conv.bias 256
decoder.up.3.upsample.conv.weight 256,256,3,3
decoder.up.4.attn.0.k.bias 512
decoder.up.4.attn.0.k.weight 512,512,1,1
decoder.up.4.attn.0.norm.bias 512
decoder.up.4.attn.0.norm.weight 512
decoder.up.4.attn.0.proj_out.bias 512
decoder.up.4.attn.0.proj_out.weight 512,512,1,1
decoder.up.4.attn.0.q.bias 512
decoder.up.4.attn.0.q.weight 512,512,1,1
decoder.up.4.attn.0.v.bias 512
decoder.up.4.attn.0.v.weight 512,512,1,1
decoder.up.4.attn.1.k.bias 512
decoder.up.4.attn.1.k.weight 512,512,1,1
decoder.up.4.attn.1.norm.bias 512
decoder.up.4.attn.1.norm.weight 512
decoder.up.4.attn.1.proj_out.bias 512
decoder.up.4.attn.1.proj_out.weight 512,512,1,1
decoder.up.4.attn.1.q.bias 512
decoder.up.4.attn.1.q.weight 512,512,1,1
decoder.up.4.attn.1.v.bias 512
decoder.up.4.attn.1.v.weight 512,512,1,1
decoder.up.4.attn.2.k.bias 512
decoder.up.4.attn.2.k.weight 512,512,1,1
decoder.up.4.attn.2.norm.bias 512
decoder.up.4.attn.2.norm.weight 512
decoder.up.4.attn.2.proj_out.bias 512
decoder.up.4.attn.2.proj_out.weight 512,512,1,1
decoder.up.4.attn.2.q.bias 512
decoder.up.4.attn.2.q.weight 512,512,1,1
decoder.up.4.attn.2.v.bias 512
decoder.up.4.attn.2.v.weight 512,512,1,1
decoder.up.4.block.0.conv1.bias 512
decoder.up.4.block.0.conv1.weight 512,512,3,3
decoder.up.4.block.0.conv2.bias 512
decoder.up.4.block.0.conv2.weight 512,512,3,3
decoder.up.4.block.0.norm1.bias 512
decoder.up.4.block.0.norm1.weight 512
decoder.up.4.block.0.norm2.bias 512
decoder.up.4.block.0.norm2.weight 512
decoder.up.4.block.1.conv1.bias 512
decoder.up.4.block.1.conv1.weight 512,512,3,3
decoder.up.4.block.1.conv2.bias 512
decoder.up.4.block.1.conv2.weight 512,512,3,3
decoder.up.4.block.1.norm1.bias 512
decoder.up.4.block.1.norm1.weight 512
decoder.up.4.block.1.norm2.bias 512
decoder.up.4.block.1.norm2.weight 512
decoder.up.4.block.2.conv1.bias 512
decoder.up.4.block.2.conv1.weight 512,512,3,3
decoder.up.4.block.2.conv2.bias 512
decoder.up.4.block.2.conv2.weight 512,512,3,3
decoder.up.4.block.2.norm1.bias 512
decoder.up.4.block.2.norm1.weight 512
decoder.up.4.block.2.norm2.bias 512
decoder.up.4.block.2.norm2.weight 512
decoder.up.4.upsample.conv.bias 512
decoder.up.4.upsample.conv.weight 512,512,3,3
encoder.conv_in.bias 128
encoder.conv_in.weight 128,3,3,3
encoder.conv_out.bias 256
encoder.conv_out.weight 256,512,3,3
encoder.down.0.block.0.conv1.bias 128
encoder.down.0.block.0.conv1.weight 128,128,3,3
encoder.down.0.block.0.conv2.bias 128
encoder.down.0.block.0.conv2.weight 128,128,3,3
encoder.down.0.block.0.norm1.bias 128
encoder.down.0.block.0.norm1.weight 128
encoder.down.0.block.0.norm2.bias 128
encoder.down.0.block.0.norm2.weight 128
encoder.down.0.block.1.conv1.bias 128
encoder.down.0.block.1.conv1.weight 128,128,3,3
encoder.down.0.block.1.conv2.bias 128
encoder.down.0.block.1.conv2.weight 128,128,3,3
encoder.down.0.block.1.norm1.bias 128
encoder.down.0.block.1.norm1.weight 128
encoder.down.0.block.1.norm2.bias 128
encoder.down.0.block.1.norm2.weight 128
encoder.down.0.downsample.conv.bias 128
encoder.down.0.downsample.conv.weight 128,128,3,3
encoder.down.1.block.0.conv1.bias 128
encoder.down.1.block.0.conv1.weight 128,128,3,3
encoder.down.1.block.0.conv2.bias 128
encoder.down.1.block.0.conv2.weight 128,128,3,3
encoder.down.1.block.0.norm1.bias 128
encoder.down.1.block.0.norm1.weight 128
encoder.down.1.block.0.norm2.bias 128
encoder.down.1.block.0.norm2.weight 128
encoder.down.1.block.1.conv1.bias 128
encoder.down.1.block.1.conv1.weight 128,128,3,3
encoder.down.1.block.1.conv2.bias 128
encoder.down.1.block.1.conv2.weight 128,128,3,3
encoder.down.1.block.1.norm1.bias 128
encoder.down.1.block.1.norm1.weight 128
encoder.down.1.block.1.norm2.bias 128
encoder.down.1.block.1.norm2.weight 128
encoder.down.1.downsample.conv.bias 128
encoder.down.1.downsample.conv.weight 128,128,3,3
encoder.down.2.block.0.conv1.bias 256
encoder.down.2.block.0.conv1.weight 256,128,3,3
encoder.down.2.block.0.conv2.bias 256
encoder.down.2.block.0.conv2.weight 256,256,3,3
encoder.down.2.block.0.nin_shortcut.bias 256
encoder.down.2.block.0.nin_shortcut.weight 256,128,1,1
encoder.down.2.block.0.norm1.bias 128
encoder.down.2.block.0.norm1.weight 128
encoder.down.2.block.0.norm2.bias 256
encoder.down.2.block.0.norm2.weight 256
encoder.down.2.block.1.conv1.bias 256
encoder.down.2.block.1.conv1.weight 256,256,3,3
encoder.down.2.block.1.conv2.bias 256
encoder.down.2.block.1.conv2.weight 256,256,3,3
encoder.down.2.block.1.norm1.bias 256
encoder.down.2.block.1.norm1.weight 256
encoder.down.2.block.1.norm2.bias 256
encoder.down.2.block.1.norm2.weight 256
encoder.down.2.downsample.conv.bias 256
encoder.down.2.downsample.conv.weight 256,256,3,3
encoder.down.3.block.0.conv1.bias 256
encoder.down.3.block.0.conv1.weight 256,256,3,3
encoder.down.3.block.0.conv2.bias 256
encoder.down.3.block.0.conv2.weight 256,256,3,3
encoder.down.3.block.0.norm1.bias 256
encoder.down.3.block.0.norm1.weight 256
encoder.down.3.block.0.norm2.bias 256
encoder.down.3.block.0.norm2.weight 256
encoder.down.3.block.1.conv1.bias 256
encoder.down.3.block.1.conv1.weight 256,256,3,3
encoder.down.3.block.1.conv2.bias 256
encoder.down.3.block.1.conv2.weight 256,256,3,3
encoder.down.3.block.1.norm1.bias 256
encoder.down.3.block.1.norm1.weight 256
encoder.down.3.block.1.norm2.bias 256
encoder.down.3.block.1.norm2.weight 256
encoder.down.3.downsample.conv.bias 256
encoder.down.3.downsample.conv.weight 256,256,3,3
encoder.down.4.attn.0.k.bias 512
encoder.down.4.attn.0.k.weight 512,512,1,1
encoder.down.4.attn.0.norm.bias 512
encoder.down.4.attn.0.norm.weight 512
encoder.down.4.attn.0.proj_out.bias 512
encoder.down.4.attn.0.proj_out.weight 512,512,1,1
encoder.down.4.attn.0.q.bias 512
encoder.down.4.attn.0.q.weight 512,512,1,1
encoder.down.4.attn.0.v.bias 512
encoder.down.4.attn.0.v.weight 512,512,1,1
encoder.down.4.attn.1.k.bias 512
encoder.down.4.attn.1.k.weight 512,512,1,1
encoder.down.4.attn.1.norm.bias 512
encoder.down.4.attn.1.norm.weight 512
encoder.down.4.attn.1.proj_out.bias 512
encoder.down.4.attn.1.proj_out.weight 512,512,1,1
encoder.down.4.attn.1.q.bias 512
encoder.down.4.attn.1.q.weight 512,512,1,1
encoder.down.4.attn.1.v.bias 512
encoder.down.4.attn.1.v.weight 512,512,1,1
encoder.down.4.block.0.conv1.bias 512
encoder.down.4.block.0.conv1.weight 512,256,3,3
encoder.down.4.block.0.conv2.bias 512
encoder.down.4.block.0.conv2.weight 512,512,3,3
encoder.down.4.block.0.nin_shortcut.bias 512
encoder.down.4.block.0.nin_shortcut.weight 512,256,1,1
encoder.down.4.block.0.norm1.bias 256
encoder.down.4.block.0.norm1.weight 256
encoder.down.4.block.0.norm2.bias 512
encoder.down.4.block.0.norm2.weight 512
encoder.down.4.block.1.conv1.bias 512
encoder.down.4.block.1.conv1.weight 512,512,3,3
encoder.down.4.block.1.conv2.bias 512
encoder.down.4.block.1.conv2.weight 512,512,3,3
encoder.down.4.block.1.norm1.bias 512
encoder.down.4.block.1.norm1.weight 512
encoder.down.4.block.1.norm2.bias 512
encoder.down.4.block.1.norm2.weight 512
encoder.mid.attn_1.k.bias 512
encoder.mid.attn_1.k.weight 512,512,1,1
encoder.mid.attn_1.norm.bias 512
encoder.mid.attn_1.norm.weight 512
encoder.mid.attn_1.proj_out.bias 512
encoder.mid.attn_1.proj_out.weight 512,512,1,1
encoder.mid.attn_1.q.bias 512
encoder.mid.attn_1.q.weight 512,512,1,1
encoder.mid.attn_1.v.bias 512
encoder.mid.attn_1.v.weight 512,512,1,1
encoder.mid.block_1.conv1.bias 512
encoder.mid.block_1.conv1.weight 512,512,3,3
encoder.mid.block_1.conv2.bias 512
encoder.mid.block_1.conv2.weight 512,512,3,3
encoder.mid.block_1.norm1.bias 512
encoder.mid.block_1.norm1.weight 512
encoder.mid.block_1.norm2.bias 512
encoder.mid.block_1.norm2.weight 512
encoder.mid.block_2.conv1.bias 512
encoder.mid.block_2.conv1.weight 512,512,3,3
encoder.mid.block_2.conv2.bias 512
encoder.mid.block_2.conv2.weight 512,512,3,3
encoder.mid.block_2.norm1.bias 512
encoder.mid.block_2.norm1.weight 512
encoder.mid.block_2.norm2.bias 512
encoder.mid.block_2.norm2.weight 512
encoder.norm_out.bias 512
encoder.norm_out.weight 512
post_quant_conv.bias 256
post_quant_conv.weight 256,256,1,1
quant_conv.bias 256
quant_conv.weight 256,256,1,1
quantize.embedding.weight 16384,256
"""


def test_cpu_convolutions_run_on_channels_last_maps_and_hand_back_contiguous_ones(tiny, monkeypatch):
    ids = torch.randint(0, 64, (2, 5, 7), generator=torch.Generator().manual_seed(5))
    image = torch.rand(2, 3, 20, 28, generator=torch.Generator().manual_seed(6)) * 2 - 1
    layouts = []
    first_conv = tiny.decoder.conv_in.forward
    monkeypatch.setattr(tiny.decoder.conv_in, "forward",
                        lambda x: layouts.append(x.is_contiguous(memory_format=torch.channels_last)) or first_conv(x))
    out, tokens = tiny.decode_tokens(ids), tiny.encode_tokens(image)
    assert layouts == [True] and out.is_contiguous() and tiny.encode(image)[0].is_contiguous()
    # the layout changes float rounding only: against the maps as given, the same pixels and tokens
    monkeypatch.setattr(VQModel, "_conv_layout", staticmethod(lambda x: x))
    assert (out - tiny.decode_tokens(ids)).abs().max() <= 5e-5 and layouts[1:] == [False]
    assert torch.equal(tokens, tiny.encode_tokens(image))
    monkeypatch.undo()
    meta = torch.empty(1, 16, 3, 3, device="meta")  # other devices keep their layout
    assert VQModel._conv_layout(meta) is meta
