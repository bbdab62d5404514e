"""weights.json manifest and nuwa_core.weights: schema, verification, lookup errors, atomic fetch."""
import hashlib
import json

import pytest

from nuwa_core import weights as W


def test_manifest_schema():
    manifest = W.load_manifest()
    assert manifest, "weights.json must list at least the default model"
    raw = json.loads(W.MANIFEST_PATH.read_text())
    for item in raw["models"]:
        assert set(W.REQUIRED_FIELDS) <= set(item), item.get("name")
    default = manifest["nuwa_infinity_default.safetensors"]
    assert default.folder == "nuwa" and default.url is None and default.shipped
    vq = manifest["vqgan_imagenet_f16_16384.ckpt"]
    assert vq.url.startswith("https://heibox.uni-heidelberg.de/")
    assert any(e.kind == "open_clip_text" for e in manifest.values())
    for entry in manifest.values():
        assert entry.sha256 is None or len(entry.sha256) == 64


@pytest.mark.parametrize("bad, complaint", [
    ({"sha256": "XYZ"}, "sha256"),
    ({"size": -3}, "size"),
    ({"folder": "../escape"}, "folder"),
    ({"name": "sub/dir.bin"}, "plain file name"),
])
def test_manifest_rejects_bad_entries(tmp_path, bad, complaint):
    entry = {"name": "a.bin", "url": None, "sha256": None, "size": None, "licence": "MIT",
             "folder": "nuwa", "kind": "x", "description": "d"}
    entry.update(bad)
    path = tmp_path / "weights.json"
    path.write_text(json.dumps({"models": [entry]}))
    with pytest.raises(W.WeightsError, match=complaint):
        W.load_manifest(path)


def _entry(tmp_path, data: bytes, **kw):
    fields = dict(name="m.bin", url=None, sha256=hashlib.sha256(data).hexdigest(), size=len(data),
                  licence="MIT", folder="nuwa", kind="test", description="test file")
    fields.update(kw)
    return W.WeightEntry(**fields)


def test_verify_detects_mismatch(tmp_path):
    good = b"good weights" * 100
    entry = _entry(tmp_path, good)
    path = tmp_path / "m.bin"
    path.write_bytes(good)
    assert W.verify_file(entry, path).state == W.PRESENT
    path.write_bytes(b"bad! weights" * 100)  # same size, different bytes
    st = W.verify_file(entry, path)
    assert st.state == W.MISMATCH and entry.sha256 in st.detail
    path.write_bytes(b"short")
    assert W.verify_file(entry, path).state == W.SIZE_MISMATCH
    unhashed = _entry(tmp_path, good, sha256=None, size=None)
    assert W.verify_file(unhashed, path).state == W.UNVERIFIED == "unverified: no hash in manifest"


def test_verify_cli_fails_on_mismatch(tmp_path, capsys):
    data = b"x" * 10
    manifest = tmp_path / "weights.json"
    manifest.write_text(json.dumps({"models": [dict(
        name="m.bin", url=None, sha256=hashlib.sha256(b"other").hexdigest(), size=None,
        licence="MIT", folder="nuwa", kind="t", description="d")]}))
    (tmp_path / "models" / "nuwa").mkdir(parents=True)
    (tmp_path / "models" / "nuwa" / "m.bin").write_bytes(data)
    rc = W.main(["--manifest", str(manifest), "verify", "--models-dir", str(tmp_path / "models")])
    assert rc == 1
    assert W.MISMATCH in capsys.readouterr().out


def test_missing_file_error_names_file_folders_and_url(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    with pytest.raises(W.ModelNotFoundError) as info:
        W.find_model_file("vqgan_imagenet_f16_16384.ckpt", [a, b])
    msg = str(info.value)
    assert "vqgan_imagenet_f16_16384.ckpt" in msg and str(a) in msg and str(b) in msg
    assert "heibox.uni-heidelberg.de" in msg
    assert isinstance(info.value, ValueError) and isinstance(info.value, FileNotFoundError)
    with pytest.raises(W.ModelNotFoundError, match="not in the pack's weights.json"):
        W.find_model_file("nope.safetensors", [a])
    b.mkdir()
    (b / "x.safetensors").write_bytes(b"1")
    assert W.find_model_file("x.safetensors", [a, b]) == b / "x.safetensors"


def test_fetch_file_url_atomic(tmp_path):
    src = tmp_path / "src.bin"
    data = bytes(range(256)) * 4096
    src.write_bytes(data)
    entry = _entry(tmp_path, data, url=src.as_uri())
    dest = tmp_path / "models" / "nuwa"
    out = W.fetch(entry, dest, chunk=4096)
    assert out == dest / "m.bin" and out.read_bytes() == data
    assert sorted(p.name for p in dest.iterdir()) == ["m.bin"]


def test_fetch_rejects_bad_hash_and_leaves_nothing(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"tampered" * 1000)
    entry = _entry(tmp_path, b"expected" * 1000, url=src.as_uri())
    dest = tmp_path / "models"
    with pytest.raises(W.WeightsError, match="sha256"):
        W.fetch(entry, dest)
    assert list(dest.iterdir()) == []
    # an existing good file is not replaced by a bad download
    (dest / "m.bin").write_bytes(b"keep me")
    with pytest.raises(W.WeightsError):
        W.fetch(entry, dest)
    assert (dest / "m.bin").read_bytes() == b"keep me" and len(list(dest.iterdir())) == 1


def test_fetch_without_network_says_so(tmp_path):
    entry = _entry(tmp_path, b"", size=None, sha256=None, url="http://nuwa-weights.invalid/m.bin")
    with pytest.raises(W.WeightsError, match="offline") as info:
        W.fetch(entry, tmp_path, timeout=5)
    assert str(tmp_path / "m.bin") in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_fetch_refuses_entry_without_url(tmp_path):
    entry = W.load_manifest()["nuwa_infinity_default.safetensors"]
    with pytest.raises(W.WeightsError, match="no download URL"):
        W.fetch(entry, tmp_path)


def test_a_listed_file_must_match_its_hash_before_loading(tmp_path):
    from nuwa_core.weights import WeightEntry, WeightsError, check_listed_file
    import hashlib
    good = tmp_path / "listed.safetensors"
    good.write_bytes(b"weights")
    entry = WeightEntry(name="listed.safetensors", url=None, sha256=hashlib.sha256(b"weights").hexdigest(), size=7,
                        licence="MIT", folder="nuwa", kind="nuwa_infinity", description="test")
    check_listed_file(good, {entry.name: entry})  # matches: passes
    check_listed_file(tmp_path / "unlisted.safetensors", {entry.name: entry})  # not in the manifest: passes
    good.write_bytes(b"WEIGHTS")  # same size, other content
    with pytest.raises(WeightsError, match="sha256 .* the manifest expects"):
        check_listed_file(good, {entry.name: entry})


SHIPPED_BUDGET = 52_000_000  # bytes, all shipped model files together (20 MB; 40 for the video model; 48 for the text
# model; 52 for the wider NUWA-XL MTD, which draws the prompted sky that the small one missed)


def test_shipped_models_are_present_with_their_size_and_within_the_budget():
    shipped = [e for e in W.load_manifest().values() if e.shipped]
    sizes = {}
    for entry in shipped:
        path = W.PACK_MODELS_DIR / entry.folder / entry.name
        assert path.is_file(), f"{entry.name} is listed as shipped but {path} is absent"
        assert path.stat().st_size == entry.size, entry.name
        sizes[entry.name] = entry.size
    assert sum(sizes.values()) <= SHIPPED_BUDGET, sizes
