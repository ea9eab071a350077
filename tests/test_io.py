import json

import pytest
import torch

from fastinterp.io import (CorruptFileError, atomic_open, atomic_save, atomic_write_json, content_hash, load_checked,
                           read_json, safe_name, save_checked)


def test_atomic_write_replaces_or_keeps_and_never_leaves_a_temporary(tmp_path):
    path = tmp_path / "sub" / "out.json"
    atomic_write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_open(path, "w") as f:
            f.write("half")
            raise RuntimeError("boom")
    assert json.loads(path.read_text()) == {"a": 1}  # the old file, untouched
    with pytest.raises(TypeError):
        atomic_write_json(path, {"x": object()})  # unserialisable: fails before writing
    with pytest.raises(KeyboardInterrupt):
        with atomic_open(tmp_path / "t.pt", "wb"):
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["out.json", "sub"]
    with pytest.raises(ValueError, match="mode"):
        with atomic_open(path, "a"):
            pass


def test_read_json_default_for_missing_or_partial(tmp_path):
    assert read_json(tmp_path / "nope.json", {}) == {}
    (tmp_path / "half.json").write_text('{"a": ')
    assert read_json(tmp_path / "half.json") is None


def test_safe_name():
    assert safe_name("ViT-B-16") == "ViT-B-16"
    assert safe_name("a b/c") == "a_b_c"
    assert safe_name("laion2b_s34b", sep="-", keep="-.") == "laion2b-s34b"
    assert safe_name("") == "_" and safe_name("..") == "_" and safe_name("/") == "_"


def test_checksummed_file_round_trip_and_corruption(tmp_path):
    path = tmp_path / "c.pt"
    data = {"embeddings": torch.randn(64, 8), "meta": {"model": "m", "texts": ["a", "b"], "n": 2}}
    save_checked(data, path)
    back = load_checked(path)
    assert torch.equal(back["embeddings"], data["embeddings"]) and back["meta"] == data["meta"]
    assert "sha256" in torch.load(path, weights_only=True)  # still a plain dict for torch.load

    raw = bytearray(path.read_bytes())
    # flip a byte inside the tensor's storage: torch.load still reads it, the checksum does not match
    start = bytes(raw).find(data["embeddings"][0].numpy().tobytes())
    assert start > 0
    raw[start + 3] ^= 0x40
    path.write_bytes(bytes(raw))
    assert not torch.equal(torch.load(path, weights_only=True)["embeddings"], data["embeddings"])
    with pytest.raises(CorruptFileError, match="c.pt.*do not match the checksum"):
        load_checked(path)

    path.write_bytes(bytes(raw[: len(raw) // 2]))  # truncated
    with pytest.raises(CorruptFileError, match="cannot be read"):
        load_checked(path)
    atomic_save({"embeddings": torch.zeros(2)}, path)  # no checksum
    with pytest.raises(CorruptFileError, match="no checksum"):
        load_checked(path)
    assert set(load_checked(path, require_checksum=False)) == {"embeddings"}
    atomic_save(torch.zeros(2), path)
    with pytest.raises(CorruptFileError, match="holds a Tensor"):
        load_checked(path)
    with pytest.raises(CorruptFileError, match="is a folder"):
        load_checked(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_checked(tmp_path / "missing.pt")


def test_content_hash_sees_dtype_shape_and_values():
    a = torch.arange(6, dtype=torch.float32)
    assert content_hash({"x": a}) == content_hash({"x": a.clone()})
    assert content_hash({"x": a}) != content_hash({"x": a.reshape(2, 3)})
    assert content_hash({"x": a}) != content_hash({"x": a.double()})
    assert content_hash({"x": 1}) != content_hash({"x": "1"})
    with pytest.raises(TypeError, match="cannot hash"):
        content_hash({"x": object()})
