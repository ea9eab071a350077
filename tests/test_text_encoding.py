"""Length-bucketed exact text encoding (fastinterp.concepts.encode_texts) on every kind of
open_clip text tower, the cached weights hash, and the resumable chunked concept cache."""
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import fastinterp
import fastinterp.concepts as concepts
from fastinterp import ConceptDictionary
from fastinterp.models import invalidate_weights_hash, weights_hash

ROOT = Path(__file__).resolve().parents[1]

TINY_VISION = {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16}
TINY_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}

# name -> (extra text_cfg, custom_text, cut expected to be exact)
TOWERS = {
    "clip-argmax": ({}, False, True),
    "clip-eos": ({"pool_type": "eos", "eos_id": 49407}, False, True),
    "clip-first": ({"pool_type": "first"}, False, True),
    "custom-argmax": ({}, True, True),
    "custom-eos": ({"pool_type": "eos", "eos_id": 49407}, True, True),
    # must fall back to full context:
    "siglip-style": ({"no_causal_mask": True, "pool_type": "last", "proj_bias": True}, True, False),
    "clip-last": ({"pool_type": "last"}, False, False),
    "bidirectional-argmax": ({"no_causal_mask": True}, True, False),
    "coca-style-cls": ({"embed_cls": True}, True, False),
}

TEXTS = ["a", "dog", "a photo of a very small red car parked near the old stone bridge at dusk",
         "cat", "sky", "the", "a bird with a long curved beak and bright orange wings",
         " ".join(["word"] * 90),  # truncated at the context length: end-of-text at the last position
         "two dogs", "x y z", "a photo of a dog", "blue", "tree bark close up", "an apple"]


@pytest.fixture(scope="module")
def tower_models(tmp_path_factory):
    import open_clip

    folder = tmp_path_factory.mktemp("towers")
    for name, (extra, custom, _) in TOWERS.items():
        cfg = {"embed_dim": 16, "vision_cfg": TINY_VISION, "text_cfg": {**TINY_TEXT, **extra}}
        if custom:
            cfg["custom_text"] = True
        (folder / f"fi-test-{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(str(folder))
    out = {}
    for name in TOWERS:
        torch.manual_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = open_clip.create_model(f"fi-test-{name}", pretrained=None).eval()
        with torch.no_grad():  # non-trivial positional embeddings and projection bias
            model_text = getattr(model, "text", model)
            model_text.positional_embedding.normal_(0, 0.5)
            if getattr(model_text, "cls_emb", None) is not None:
                model_text.cls_emb.normal_(0, 0.5)
        out[name] = (model, open_clip.tokenizer.SimpleTokenizer(context_length=77))
    return out


@pytest.mark.parametrize("name", list(TOWERS))
def test_every_tower_type_matches_encode_text(tower_models, name):
    model, tok = tower_models[name]
    plan = concepts.text_tower_plan(model)
    assert plan.exact_cut is TOWERS[name][2], plan.reason
    with torch.no_grad():
        direct = model.encode_text(tok(TEXTS), normalize=False).float()
    for budget in (None, 160):  # 160 tokens: many small batches, rows come back in order
        got = concepts.encode_texts(model, tok, TEXTS, progress=False, token_budget=budget)
        assert got.shape == direct.shape
        assert float((got - direct).abs().max()) <= 1e-5
        torch.testing.assert_close(got, direct, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["siglip-style", "clip-last"])
def test_fallback_towers_would_be_wrong_if_cut(tower_models, name):
    """The reason they fall back: cutting the padding changes their output."""
    model, tok = tower_models[name]
    tokens = tok(["a dog", "a cat"])
    with torch.no_grad():
        full = model.encode_text(tokens)
        if hasattr(model, "text"):
            cut = model.text(tokens[:, :8])
        else:
            forced = concepts.TextTowerPlan(True, "forced", model, model.text_pool_type, None)
            cut = concepts._cut_forward(forced, tokens[:, :8])
    assert float((cut - full).abs().max()) > 1e-3


def test_unknown_or_replaced_encode_text_falls_back(tiny_clip):
    model, _, tok = tiny_clip
    assert concepts.text_tower_plan(model).exact_cut

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def encode_text(self, tokens, normalize=False):
            return self.inner.encode_text(tokens, normalize=normalize) * 2

    wrapped = Wrapped(model)
    plan = concepts.text_tower_plan(wrapped)
    assert not plan.exact_cut and "full context" in plan.reason
    with torch.no_grad():
        direct = wrapped.encode_text(tok(TEXTS))
    torch.testing.assert_close(concepts.encode_texts(wrapped, tok, TEXTS, progress=False), direct)
    # an instance-level replacement of encode_text is respected too
    model.encode_text = lambda tokens, normalize=False: type(model).encode_text(model, tokens, normalize) + 1
    try:
        assert not concepts.text_tower_plan(model).exact_cut
    finally:
        del model.encode_text


def test_precision_option(tiny_clip):
    model, _, tok = tiny_clip
    fp32 = concepts.encode_texts(model, tok, TEXTS, progress=False)
    bf16 = concepts.encode_texts(model, tok, TEXTS, progress=False, precision="bf16")
    rel = float((bf16 - fp32).norm(dim=1).max() / fp32.norm(dim=1).min())
    assert bf16.dtype == torch.float32 and 0 < rel < 0.1
    with pytest.raises(ValueError, match="GPU option"):
        concepts.encode_texts(model, tok, TEXTS, progress=False, precision="fp16")
    with pytest.raises(ValueError, match="precision"):
        concepts.encode_texts(model, tok, TEXTS, progress=False, precision="int8")


# ---------------------------------------------------------------- weights hash

def test_weights_hash_is_computed_once_and_follows_in_place_edits(tiny_clip, monkeypatch):
    from fastinterp import models
    from fastinterp.sith import apply_multipliers

    model, _, _ = tiny_clip
    invalidate_weights_hash(model)
    calls = []
    real = models.hashlib.sha256
    monkeypatch.setattr(models.hashlib, "sha256", lambda *a: calls.append(1) or real(*a))
    h0, t0 = weights_hash(model), weights_hash(model, exclude_prefix="visual.")
    assert weights_hash(model) == h0 and weights_hash(model, exclude_prefix="visual.") == t0
    assert len(calls) == 2  # once per (model, prefix)
    handle = apply_multipliers(model, 1, torch.full((4, 16), 0.5))  # edits visual weights in place
    try:
        h1 = weights_hash(model)
        assert h1 != h0 and weights_hash(model, exclude_prefix="visual.") == t0
        invalidate_weights_hash(model)
        assert weights_hash(model) == h1  # the cached value was the true hash of the edited weights
    finally:
        handle.undo()
    assert weights_hash(model) == h0
    with torch.no_grad():
        model.positional_embedding.add_(1.0)
    try:
        assert weights_hash(model, exclude_prefix="visual.") != t0
    finally:
        with torch.no_grad():
            model.positional_embedding.sub_(1.0)
    invalidate_weights_hash(model)


# ---------------------------------------------------------------- chunked cache

def _words(n):
    return [f"concept {i} {'x' * (i % 7)}" for i in range(n)]


def _is_mapped_from(t: torch.Tensor, path: Path) -> bool:
    ptr = t.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[-1] == str(path.resolve()):
            lo, hi = (int(v, 16) for v in parts[0].split("-"))
            if lo <= ptr < hi:
                return True
    return False


def test_chunked_cache_memory_mapped_resumable_and_checked(tiny_clip, tmp_path, monkeypatch):
    model, _, tok = tiny_clip
    d = ConceptDictionary(_words(70), name="big")
    emb = d.encode(model, tok, cache_dir=tmp_path, chunk_size=16, progress=False)
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    npy = folder / "embeddings.npy"
    assert not list(tmp_path.glob("*.pt")) and _is_mapped_from(emb, npy)
    torch.testing.assert_close(emb, concepts.encode_texts(model, tok, d.texts, progress=False), rtol=1e-5, atol=1e-6)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["chunks"]) == 5 and manifest["chunk_size"] == 16
    assert manifest["meta"]["weights"] == weights_hash(model, exclude_prefix="visual.")
    good = npy.read_bytes()
    emb[0, 0] = 123.0  # copy-on-write: the file never changes through the tensor
    assert npy.read_bytes() == good

    calls = []
    real = concepts.encode_texts
    monkeypatch.setattr(concepts, "encode_texts", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    again = d.encode(model, tok, cache_dir=tmp_path, chunk_size=16, progress=False)
    assert calls == [] and torch.equal(again, torch.from_numpy(np.frombuffer(good, np.float32)[-70 * 32:].copy()).reshape(70, 32))

    concepts._VERIFIED.clear()  # a new process: every chunk is checked again
    raw = bytearray(good)
    raw[-(70 - 40) * 32 * 4] ^= 0xFF  # a byte of row 40, in chunk 2 (rows 32..47)
    npy.write_bytes(bytes(raw))
    with pytest.warns(RuntimeWarning, match=r"embeddings.npy rows 32..47 \(chunk 2\)"):
        fixed = d.encode(model, tok, cache_dir=tmp_path, chunk_size=16, progress=False)
    assert calls == [16] and npy.read_bytes() == good and torch.equal(fixed, again)

    (folder / "manifest.json").write_text("{not json")
    with pytest.warns(RuntimeWarning, match="manifest.json is missing or unreadable"):
        d.encode(model, tok, cache_dir=tmp_path, chunk_size=16, progress=False)
    assert npy.read_bytes() == good and len(calls) == 6


def test_centered_memmap_streams_into_comp_topk(tiny_clip, tmp_path):
    from fastinterp.sparse import comp_topk

    model, _, tok = tiny_clip
    emb = ConceptDictionary(_words(300), name="c").encode(model, tok, cache_dir=tmp_path, chunk_size=64,
                                                          progress=False)
    g_ram = concepts.center_embeddings(emb.clone())
    g_map = concepts.center_embeddings(emb, out=tmp_path / "centered.npy", chunk_rows=50)
    assert _is_mapped_from(g_map, tmp_path / "centered.npy")
    torch.testing.assert_close(g_map, g_ram, rtol=0, atol=1e-6)
    x = torch.randn(6, g_ram.shape[1], generator=torch.Generator().manual_seed(0))
    s1, i1 = comp_topk(x, g_ram, k=5, coh=0.3, chunk_size=64)
    s2, i2 = comp_topk(x, g_map, k=5, coh=0.3, chunk_size=64)
    assert torch.equal(i1, i2)
    torch.testing.assert_close(s1, s2, rtol=1e-4, atol=1e-5)


CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(1)
import fastinterp, fastinterp.concepts as C
cache, slow = sys.argv[1], sys.argv[2] == "slow"
calls = []
real = C.encode_texts
def wrapped(*a, **k):
    calls.append(1)
    out = real(*a, **k)
    if slow:
        time.sleep(0.25)
    return out
C.encode_texts = wrapped
torch.manual_seed(0)
model, _, tok = fastinterp.load_clip(fastinterp.TINY_MODEL)
d = C.ConceptDictionary([f"concept {i} {'x' * (i % 7)}" for i in range(1200)], name="resume")
d.encode(model, tok, cache_dir=cache, chunk_size=100, progress=False)
print(json.dumps({"chunks_encoded": len(calls)}))
"""


def _encode_in_process(cache, monkeypatch):
    """The child's encode, here, on one thread (as the child runs): returns the chunks encoded."""
    calls = []
    real = concepts.encode_texts
    monkeypatch.setattr(concepts, "encode_texts", lambda *a, **k: calls.append(1) or real(*a, **k))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model, _, tok = fastinterp.load_clip(fastinterp.TINY_MODEL)
        d = ConceptDictionary([f"concept {i} {'x' * (i % 7)}" for i in range(1200)], name="resume")
        d.encode(model, tok, cache_dir=cache, chunk_size=100, progress=False)
    finally:
        torch.set_num_threads(threads)
        monkeypatch.setattr(concepts, "encode_texts", real)
    return len(calls)


def test_killed_encode_resumes_with_identical_bytes(tmp_path, monkeypatch):
    """SIGKILL a child process mid-encode, resume, and compare with an uninterrupted run."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    killed, fresh = tmp_path / "killed", tmp_path / "fresh"
    proc = subprocess.Popen([sys.executable, str(script), str(killed), "slow"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    done_at_kill = 0
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            for man in killed.glob("*/manifest.json"):
                try:
                    done_at_kill = len(json.loads(man.read_text())["chunks"])
                except (OSError, ValueError):
                    pass
            if done_at_kill >= 3:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert 3 <= done_at_kill < 12
    resumed_chunks = _encode_in_process(killed, monkeypatch)
    assert 1 <= resumed_chunks <= 12 - done_at_kill  # finished chunks are not encoded again
    assert _encode_in_process(fresh, monkeypatch) == 12
    (a,), (b,) = list(killed.glob("*/")), list(fresh.glob("*/"))
    assert a.name == b.name
    for name in ("embeddings.npy", "manifest.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
