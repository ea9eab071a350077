import warnings

import pytest
import torch
import torch.nn.functional as F

import fastinterp
import fastinterp.concepts as concepts
from fastinterp import ConceptDictionary, center_embeddings


def test_strip_dedupe_keep_order():
    d = ConceptDictionary(["  dog", "cat", "", "dog ", "   ", "bird", "cat"])
    assert list(d) == ["dog", "cat", "bird"] and len(d) == 3 and d[1] == "cat"


def test_errors_for_bad_entries(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        ConceptDictionary(["", "  "])
    with pytest.raises(TypeError, match="concept #1 is int"):
        ConceptDictionary(["dog", 3])
    with pytest.raises(TypeError, match="not a single string"):
        ConceptDictionary("dog")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not valid UTF-8"):
        ConceptDictionary.from_file(bad)
    with pytest.raises(FileNotFoundError):
        ConceptDictionary.from_file(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="no built-in"):
        ConceptDictionary.builtin("nope")


def test_from_file_and_builtins(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("sky\n\nsea\nsky\n", encoding="utf-8")
    d = ConceptDictionary.from_file(f)
    assert list(d) == ["sky", "sea"] and d.name == "c"
    demo = ConceptDictionary.builtin("demo")
    assert 200 <= len(demo) < 1000 and "dog" in demo.texts
    bpe = ConceptDictionary.bpe_vocabulary()
    assert 20_000 < len(bpe) < 49_152 and all(w.isalpha() and len(w) >= 3 for w in bpe.texts[:500])


def test_encode_matches_model_and_uses_cache(tiny_clip, tmp_path, monkeypatch):
    model, _, tok = tiny_clip
    d = ConceptDictionary(["a dog", "a cat", "a red car"])
    emb = d.encode(model, tok, cache_dir=tmp_path, batch_size=2, progress=False)
    with torch.no_grad():
        direct = model.encode_text(tok(d.texts), normalize=False)
    torch.testing.assert_close(emb, direct, rtol=1e-5, atol=1e-6)
    assert len(list(tmp_path.glob("*.pt"))) == 1

    def fail(*a, **k):
        raise AssertionError("cache was not used")

    monkeypatch.setattr(concepts, "encode_texts", fail)
    again = d.encode(model, tok, cache_dir=tmp_path, progress=False)
    torch.testing.assert_close(again, emb)
    # a different template is a different key: it must encode (and so hit `fail`)
    with pytest.raises(AssertionError, match="cache was not used"):
        d.encode(model, tok, cache_dir=tmp_path, template="a photo of {}", progress=False)


@pytest.mark.parametrize("corruption", ["garbage", "truncated", "wrong-meta", "nan"])
def test_corrupt_cache_is_detected_and_rebuilt(tiny_clip, tmp_path, corruption):
    model, _, tok = tiny_clip
    d = ConceptDictionary(["sun", "moon"])
    emb = d.encode(model, tok, cache_dir=tmp_path, progress=False)
    (path,) = tmp_path.glob("*.pt")
    if corruption == "garbage":
        path.write_bytes(b"\x00not a torch file")
    elif corruption == "truncated":
        path.write_bytes(path.read_bytes()[:50])
    else:
        payload = torch.load(path, weights_only=True)
        if corruption == "wrong-meta":
            payload["meta"]["weights"] = "0" * 64
        else:
            payload["embeddings"][0, 0] = float("nan")
        torch.save(payload, path)
    with pytest.warns(RuntimeWarning, match="ignoring concept cache"):
        rebuilt = d.encode(model, tok, cache_dir=tmp_path, progress=False)
    torch.testing.assert_close(rebuilt, emb)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rebuilt file is good again
        torch.testing.assert_close(d.encode(model, tok, cache_dir=tmp_path, progress=False), emb)
    assert not list(tmp_path.glob("*.tmp"))


def test_template_must_have_placeholder(tiny_clip):
    model, _, tok = tiny_clip
    with pytest.raises(ValueError, match="must contain"):
        ConceptDictionary(["x"]).encode(model, tok, template="a photo", use_cache=False)


def test_center_embeddings():
    e = torch.randn(50, 8) * 3 + 1
    g = center_embeddings(e)
    torch.testing.assert_close(g.norm(dim=1), torch.ones(50))
    n = F.normalize(e, dim=1)
    expected = F.normalize(n - n.mean(0), dim=1)
    torch.testing.assert_close(g, expected)
    with pytest.raises(ValueError):
        center_embeddings(torch.randn(3))


def test_cache_file_is_checksummed_and_keyed_by_precision(tiny_clip, tmp_path):
    model, _, tok = tiny_clip
    d = ConceptDictionary(["sun", "moon", "a very long description of a cloudy evening sky"])
    fp32 = d.encode(model, tok, cache_dir=tmp_path, progress=False)
    (path,) = tmp_path.glob("*.pt")
    payload = torch.load(path, weights_only=True)
    assert "sha256" in payload and payload["meta"]["precision"] == "fp32"
    bf16 = d.encode(model, tok, cache_dir=tmp_path, progress=False, precision="bf16")
    assert len(list(tmp_path.glob("*.pt"))) == 2 and not torch.equal(bf16, fp32)
    with pytest.raises(ValueError, match="precision"):
        d.encode(model, tok, cache_dir=tmp_path, progress=False, precision="half")
