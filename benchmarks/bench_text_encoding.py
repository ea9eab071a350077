"""Dictionary text encoding, texts/s: length-bucketed exact `encode_texts` vs open_clip's
`encode_text` at the full 77-token context, and a killed-then-resumed chunked encode.

    FASTINTERP_BENCH_PRESET=quick|full python -m pytest benchmarks/bench_text_encoding.py --benchmark-only

* short concepts: whole words of the BPE vocabulary (1-3 tokens each, as SITH dictionaries);
* descriptors: descriptor-length texts ("a bird with ... clearly visible", 10-20 tokens), the
  mutual-knowledge bank of `bench_mutual_pipeline`;
* baseline: what `encode_texts` did before, `model.encode_text(tokenizer(batch))` over
  batches of 256 at full context. Our embeddings are checked against it (max |diff| <= 1e-5)
  in the same run, before the ratio is reported;
* resume: a chunked `ConceptDictionary.encode` in a child process, SIGKILLed once half of
  its chunks are written, resumed in a second child; its embeddings.npy and manifest.json
  must equal (byte for byte) those of an uninterrupted child run.

Threads: FASTINTERP_BENCH_THREADS (default 2), the same for ours, the baseline and the
children.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from benchmarks.machine import timed
from benchmarks.presets import preset
import fastinterp
from fastinterp import concepts

SIZES = {
    "quick": {"model": fastinterp.TINY_MODEL, "concepts": 2000, "descriptors": 800,
              "resume_model": fastinterp.TINY_MODEL, "resume_texts": 6000, "resume_chunk": 1000},
    "full": {"model": "ViT-B-16", "concepts": 10_000, "descriptors": 4000,
             "resume_model": fastinterp.TINY_MODEL, "resume_texts": 100_000, "resume_chunk": 8192},
}
PRESET = preset(SIZES)
S = SIZES[PRESET]
THREADS = int(os.environ.get("FASTINTERP_BENCH_THREADS", "2"))
TARGETS = {"concepts": 10.0, "descriptors": 3.0}  # speed-ups asked for on ViT-B-16
ROOT = Path(__file__).resolve().parents[1]


def short_concepts(n: int) -> list[str]:
    return concepts.ConceptDictionary.bpe_vocabulary().texts[:n]


def descriptor_texts(n: int) -> list[str]:
    from benchmarks.bench_mutual_pipeline import make_bank

    return make_bank(n).texts


def many_concepts(n: int) -> list[str]:
    words = concepts.ConceptDictionary.bpe_vocabulary().texts
    forms = ["{}", "a photo of {}", "a {} in the wild", "the {} pattern", "a drawing of {}"]
    out = [f.format(w) for f in forms for w in words]
    if len(out) < n:
        raise ValueError(f"only {len(out)} generated concepts for {n}")
    return out[:n]


@torch.no_grad()
def full_context(model, tokenizer, texts, batch_size: int = 256) -> torch.Tensor:
    """The baseline: encode_text at the full context, batches of 256 in the given order."""
    return torch.cat([model.encode_text(tokenizer(texts[s:s + batch_size]), normalize=False).float()
                      for s in range(0, len(texts), batch_size)])


@pytest.fixture(scope="module")
def clip():
    torch.set_num_threads(THREADS)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    return fastinterp.load_clip(S["model"])


@pytest.mark.parametrize("kind", ["concepts", "descriptors"])
def test_dictionary_encoding_texts_per_s(benchmark, clip, kind):
    model, _, tokenizer = clip
    texts = short_concepts(S["concepts"]) if kind == "concepts" else descriptor_texts(S["descriptors"])
    concepts.encode_texts(model, tokenizer, texts[:64], progress=False)  # warm up
    ref, ref_s = timed(full_context, model, tokenizer, texts)
    ours = benchmark.pedantic(concepts.encode_texts, args=(model, tokenizer, texts),
                              kwargs={"progress": False}, rounds=1, iterations=1)
    ours_s = benchmark.stats.stats.median
    max_diff = float((ours - ref).abs().max())
    assert max_diff <= 1e-5, f"embeddings differ from encode_text by {max_diff:.3g}"
    lengths = concepts._pooled_lengths(concepts.text_tower_plan(model), tokenizer(texts)).float()
    speedup = ref_s / ours_s
    benchmark.extra_info.update({
        "preset": PRESET, "model": S["model"], "texts": len(texts), "kind": kind,
        "ours_texts_per_s": len(texts) / ours_s, "encode_text_full_context_texts_per_s": len(texts) / ref_s,
        "speedup_vs_encode_text_full_context": speedup, "ours_seconds": ours_s, "full_context_seconds": ref_s,
        "max_abs_diff": max_diff, "mean_tokens": float(lengths.mean()), "max_tokens": int(lengths.max()),
        "exact_cut": concepts.text_tower_plan(model).exact_cut, "torch_threads": torch.get_num_threads(),
    })
    if S["model"] == "ViT-B-16":
        benchmark.extra_info[f"target_{kind}_{TARGETS[kind]:g}x_met"] = speedup >= TARGETS[kind]
        assert speedup >= TARGETS[kind], f"{kind}: {speedup:.1f}x < {TARGETS[kind]}x"
    print(f"\n[{PRESET}] {S['model']} {kind}: {len(texts)} texts, ours {ours_s:.2f} s "
          f"({len(texts) / ours_s:.0f} texts/s), full context {ref_s:.2f} s: {speedup:.1f}x, max diff {max_diff:.2g}")


# ----------------------------------------------------------------------------------------
# killed and resumed
# ----------------------------------------------------------------------------------------

def _child(cache: Path, slow: bool = False) -> subprocess.Popen:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path, PYTHONWARNINGS="ignore", FASTINTERP_BENCH_PRESET=PRESET)
    cmd = [sys.executable, "-m", "benchmarks.bench_text_encoding", str(cache)] + (["--slow"] if slow else [])
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=3600)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def _chunks_done(cache: Path) -> int:
    for man in cache.glob("*/manifest.json"):
        try:
            return len(json.loads(man.read_text())["chunks"])
        except (OSError, ValueError, KeyError):
            pass
    return 0


def test_killed_encode_resumes_with_identical_bytes(benchmark, tmp_path):
    n_chunks = -(-S["resume_texts"] // S["resume_chunk"])
    killed, fresh = tmp_path / "killed", tmp_path / "fresh"
    proc = _child(killed, slow=True)
    t0 = time.perf_counter()
    while proc.poll() is None and _chunks_done(killed) < n_chunks // 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    at_kill = _chunks_done(killed)
    assert proc.returncode == -signal.SIGKILL and 0 < at_kill < n_chunks
    until_kill_s = time.perf_counter() - t0

    resumed = benchmark.pedantic(lambda: _finish(_child(killed)), rounds=1, iterations=1)
    whole = _finish(_child(fresh))
    (a,), (b,) = list(killed.glob("*/")), list(fresh.glob("*/"))
    same = all((a / f).read_bytes() == (b / f).read_bytes() for f in ("embeddings.npy", "manifest.json"))
    assert same, "the resumed cache differs from the uninterrupted one"
    assert resumed["chunks_encoded"] <= n_chunks - at_kill
    benchmark.extra_info.update({
        "preset": PRESET, "model": S["resume_model"], "texts": S["resume_texts"], "chunk_size": S["resume_chunk"],
        "chunks": n_chunks, "chunks_done_at_kill": at_kill, "chunks_encoded_on_resume": resumed["chunks_encoded"],
        "identical_bytes": same, "ours_texts_per_s": S["resume_texts"] / whole["encode_seconds"],
        "uninterrupted_encode_seconds": whole["encode_seconds"], "resume_encode_seconds": resumed["encode_seconds"],
        "seconds_until_kill": until_kill_s, "file_mib": (a / "embeddings.npy").stat().st_size / 2 ** 20,
    })
    print(f"\n[{PRESET}] {S['resume_texts']} concepts in {n_chunks} chunks: killed after {at_kill}, resume encoded "
          f"{resumed['chunks_encoded']} chunks in {resumed['encode_seconds']:.1f} s; uninterrupted "
          f"{whole['encode_seconds']:.1f} s; identical bytes: {same}")


def _child_main(argv) -> None:
    """A child process: encode the resume dictionary into the cache folder argv[0]."""
    torch.set_num_threads(THREADS)
    warnings.filterwarnings("ignore")
    calls = []
    real = concepts.encode_texts

    def counted(*a, **k):
        calls.append(1)
        out = real(*a, **k)
        if "--slow" in argv:  # give the parent time to kill between chunks; results unchanged
            time.sleep(0.5)
        return out

    concepts.encode_texts = counted
    torch.manual_seed(0)
    model, _, tokenizer = fastinterp.load_clip(S["resume_model"])
    d = concepts.ConceptDictionary(many_concepts(S["resume_texts"]), name="resume")
    t0 = time.perf_counter()
    d.encode(model, tokenizer, cache_dir=argv[0], chunk_size=S["resume_chunk"], progress="--slow" not in argv)
    print(json.dumps({"chunks_encoded": len(calls), "encode_seconds": time.perf_counter() - t0}))


if __name__ == "__main__":
    _child_main(sys.argv[1:])
