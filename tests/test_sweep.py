"""Sweeps (fastinterp.sweep): the spec's errors, the task graph's sharing, and one small
sweep run three ways (serial engine, local Ray, a Ray cluster started here on 127.0.0.1)
with byte-identical results equal to calling the API directly; a worker killed mid-task."""
from __future__ import annotations

import collections
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import fastinterp
from fastinterp.sweep import SpecError, build_graph, load_spec, parse_spec, run_sweep, sweep_status

SPEC = """
[sweep]
output = "{output}"
layers = [2, 3]
seed = 0
shard_size = 2
retries = {retries}

[[models]]
name = "tiny-s0"
model = "fastinterp-tiny-ViT"
seed = 0

[[models]]
name = "tiny-s1"
model = "fastinterp-tiny-ViT"
seed = 1

[dictionaries]
concepts = "demo"
colours = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple", "a dog", "a cat", "sky", "grass"]

[images]
photos = "demo"

[methods.sith]
steps = ["decompose", "fidelity"]
sparsity = 3
image_mean = "photos"

[methods.ccs]
steps = ["textspan"]
n_texts = 2

[methods.mutual]
steps = ["explain"]
"""
# wall times, and the image-digest cache (keyed by each output's own absolute photo folder):
# kept out of the compared results on purpose
UNCOMPARED = {"timing.json", "timings.json", "image-digests.json"}


def _write_spec(folder: Path, output: str, retries: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sweep.toml"
    path.write_text(SPEC.format(output=output, retries=retries), encoding="utf-8")
    return path


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in UNCOMPARED}


def _assert_same_tree(a: Path, b: Path) -> None:
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    differ = [k for k in fa if fa[k] != fb[k]]
    assert not differ, f"files differ between {a} and {b}: {differ[:10]}"


# --------------------------------------------------------------------------------------
# the spec and the graph (no model)
# --------------------------------------------------------------------------------------
def _parse(text: str, tmp_path):
    import tomllib

    return parse_spec(tomllib.loads(text), path=tmp_path / "s.toml", base=tmp_path)


@pytest.mark.parametrize("edit, key", [
    (("sparsity = 3", "sparsty = 3"), "methods.sith.sparsty"),
    (('concepts = "demo"', 'concepts = "nope.txt"'), "dictionaries.concepts"),
    (('image_mean = "photos"', 'image_mean = "elsewhere"'), "methods.sith.image_mean"),
    (('steps = ["textspan"]', 'steps = ["textspan", "judge"]'), "methods.ccs.steps"),
    (('name = "tiny-s1"', 'name = "tiny-s0"'), "models[1].name"),
    (("layers = [2, 3]", "layers = [2, 3.5]"), "sweep.layers[1]"),
])
def test_spec_errors_name_the_key(tmp_path, edit, key):
    text = SPEC.format(output="out", retries=2).replace(*edit)
    with pytest.raises(SpecError, match=key.replace("[", r"\[").replace("]", r"\]")):
        _parse(text, tmp_path)


def test_graph_shares_work_and_ids_are_stable(tmp_path):
    spec = _parse(SPEC.format(output="out", retries=2), tmp_path)
    g = build_graph(spec)
    kinds = collections.Counter(t.kind for t in g.tasks.values())
    assert kinds["encode"] == 4  # 2 models x 2 dictionaries, shared by sith, ccs and mutual
    assert kinds["image-mean"] == 2 and kinds["contributions"] == 4  # 2 models x 2 image shards
    assert kinds["sith.decompose"] == kinds["sith.fidelity"] == kinds["ccs.textspan"] == 8
    assert kinds["mutual.shard"] == 8 and kinds["mutual.explain"] == 4
    assert kinds["mutual.vision"] == 4  # 2 models x 2 class shards, shared by both dictionaries
    vision = {t.id for t in g.tasks.values() if t.kind == "mutual.vision"}
    assert all(len(vision & set(t.dep_ids)) == 1 for t in g.tasks.values() if t.kind == "mutual.shard")
    again = build_graph(_parse(SPEC.format(output="out", retries=2), tmp_path))
    assert [(t.id, t.key) for t in again.tasks.values()] == [(t.id, t.key) for t in g.tasks.values()]
    changed = build_graph(_parse(SPEC.format(output="out", retries=2).replace("sparsity = 3", "sparsity = 2"),
                                 tmp_path))
    same = {t.id for t in g.tasks.values()} & {t.id for t in changed.tasks.values()}
    assert all(g.tasks[i].kind not in ("sith.decompose", "sith.fidelity") for i in same)
    reseeded = build_graph(_parse(SPEC.format(output="out", retries=2).replace("seed = 0\nshard", "seed = 7\nshard"),
                                  tmp_path))
    assert [t.id for t in reseeded.tasks.values()] == [t.id for t in g.tasks.values()]
    assert not {t.key for t in reseeded.tasks.values()} & {t.key for t in g.tasks.values()}  # all rerun


def test_image_folders_are_hashed_once_and_rehashed_on_change(tmp_path):
    from fastinterp.sweep.inputs import DIGEST_CACHE

    spec = _parse(SPEC.format(output="out", retries=2), tmp_path)
    keys = {t.id: t.key for t in build_graph(spec).tasks.values()}
    cache = spec.output / DIGEST_CACHE
    known = json.loads(cache.read_text())
    (entry,) = known.values()
    entry["digest"]["sha256"] = "0" * 64  # a stale cache with a matching listing is believed: it was used
    cache.write_text(json.dumps(known))
    assert {t.id: t.key for t in build_graph(spec).tasks.values()} != keys
    cache.unlink()  # deleting the cache re-hashes
    assert {t.id: t.key for t in build_graph(spec).tasks.values()} == keys
    photo = sorted((spec.output / "inputs" / "photos").rglob("*.png"))[0]
    os.utime(photo, ns=(photo.stat().st_atime_ns, photo.stat().st_mtime_ns + 10 ** 9))  # touched, same bytes
    assert {t.id: t.key for t in build_graph(spec).tasks.values()} == keys
    photo.write_bytes(photo.read_bytes() + b"\0")  # new bytes: every task that reads the photos reruns
    changed = {t.id: t.key for t in build_graph(spec).tasks.values()}
    g = build_graph(spec)
    assert {g.tasks[i].kind for i in keys if changed[i] != keys[i]} >= {"image-mean", "contributions", "mutual.vision"}
    assert all(changed[i] == keys[i] for i in keys if g.tasks[i].kind == "encode")


# --------------------------------------------------------------------------------------
# the serial engine, against the API
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def serial_run(tmp_path_factory):
    """The small sweep with the serial engine; every text list encoded is counted."""
    from benchmarks.bench_sweep import _serial_counted

    from fastinterp import vision

    base = tmp_path_factory.mktemp("serial")
    spec = load_spec(_write_spec(base, "out"))
    original, passes = vision.extract_visual_concepts, collections.Counter()

    def counted(model, preprocess, images, **kw):  # the vision side, per (model, image set)
        passes[(id(model), tuple(im.tobytes() for im in images))] += 1
        return original(model, preprocess, images, **kw)

    vision.extract_visual_concepts = counted
    try:
        summary, counts = _serial_counted(spec)
    finally:
        vision.extract_visual_concepts = original
    summary["vision_passes"] = passes
    return spec, summary, counts


def _rows(root: Path) -> list[dict]:
    return json.loads((root / "results.json").read_text())["rows"]


def test_serial_sweep_runs_and_encodes_each_dictionary_once(serial_run):
    spec, summary, counts = serial_run
    assert summary["ran"] == summary["tasks"] and not summary["failed"] and not summary["blocked"]
    assert max(counts.values()) == 1  # no text list (dictionary, class prompts) encoded twice by one model
    passes = summary["vision_passes"]  # one per (model, class of photos), shared by both dictionaries
    assert max(passes.values()) == 1 and len(passes) == 2 * len(list((spec.output / "inputs" / "photos").iterdir()))
    rows = _rows(spec.output)
    assert len(rows) == 8 + 8 + 8 + 4 and all(r["status"] == "done" for r in rows)
    assert (spec.output / "results.csv").read_text().count("\n") == len(rows) + 1
    assert (spec.output / "report.md").is_file() and (spec.output / "figures" / "models.png").is_file()
    assert sweep_status(spec)["counts"] == {"done": summary["tasks"], "pending": 0, "failed": 0}
    again = run_sweep(spec, engine="serial", progress=False)  # a rerun reuses every finished task
    assert again["ran"] == 0 and again["reused"] == summary["tasks"]


def _model(seed):
    torch.manual_seed(seed)
    return fastinterp.load_clip(fastinterp.TINY_MODEL)


def _row(rows, **coords):
    (r,) = [r for r in rows if all(r[k] == v for k, v in coords.items())]
    return r


def test_serial_sweep_equals_the_api(serial_run):
    from fastinterp import sith
    from fastinterp.ccs import describe_heads
    from fastinterp.concepts import ConceptDictionary

    spec, _, _ = serial_run
    root = spec.output
    rows = _rows(root)
    folder = root / "inputs" / "photos"
    images = sorted(p for p in folder.rglob("*.png"))
    dicts = {"concepts": ConceptDictionary.builtin("demo").texts, "colours": spec.dictionaries["colours"]["texts"]}
    for seed in (0, 1):
        torch.set_num_threads(1)
        torch.manual_seed(seed)
        model, preprocess, tokenizer = fastinterp.load_clip(fastinterp.TINY_MODEL)
        mean = sith.image_mean(model, preprocess, folder, progress=False)
        for dname, texts in dicts.items():
            d = ConceptDictionary(texts, name=dname)
            emb = d.encode(model, tokenizer, use_cache=False, progress=False)
            res = sith.decompose(model, emb, [2, 3], sparsity=3, image_mean=mean, dictionary_name=dname,
                                 progress=False)
            for layer in (2, 3):
                r = _row(rows, method="sith.decompose", model=f"tiny-s{seed}", dictionary=dname, layer=layer)
                (f,) = (root / "tasks" / "sith.decompose").glob(f"{dname}_{layer}_tiny-s{seed}-*/layer-*.pt")
                saved = torch.load(f, weights_only=True)
                assert torch.equal(saved["scores"], res[layer]["scores"])
                assert torch.equal(saved["indices"], res[layer]["indices"])
                fid = sith.fidelity(model, layer, res[layer]["scores"], res[layer]["indices"],
                                    sith.prepare_dictionary(emb), image_mean=mean)
                r = _row(rows, method="sith.fidelity", model=f"tiny-s{seed}", dictionary=dname, layer=layer)
                assert r["fidelity"] == fid["overall"]["mean"]
                (desc,) = (root / "tasks" / "ccs.textspan").glob(f"{dname}_photos_{layer}_tiny-s{seed}-*")
                got = json.loads((desc / "descriptions.json").read_text())["heads"]
                expect = describe_heads(model, images, d.texts, preprocess=preprocess, text_embeddings=emb,
                                        layers=[layer], n_texts=2, progress=False)
                assert [h["indices"] for h in got] == [h["indices"] for h in expect]
            _check_mutual(model, preprocess, tokenizer, folder, d, emb,
                          _row(rows, method="mutual.explain", model=f"tiny-s{seed}", dictionary=dname))


def _check_mutual(model, preprocess, tokenizer, folder, d, emb, row):
    """mutual.explain class by class (the images of a class together, as run_dataset), each
    from seed 0 (OpenCV's generator too), merged: the sweep's figures exactly."""
    import numpy as np

    from fastinterp.images import load_images
    from fastinterp.kernels.mi import curve_auc, dataset_curve
    from fastinterp.mutual import class_embeddings, explain
    from fastinterp.sweep.tasks import seed_everything

    classes = sorted(p.name for p in folder.iterdir())
    cls = class_embeddings(model, tokenizer, classes, progress=False)
    records = []
    for i, c in enumerate(classes):
        seed_everything(0)
        ims = [im for _, im in load_images(sorted((folder / c).glob("*.png")))]
        records += explain(model, preprocess, tokenizer, ims, classes, d, labels=[i] * len(ims), parts="both",
                           descriptor_embeddings=emb, class_embeddings_=cls).records
    for m in ("pca", "kmeans"):
        assert row[f"mi_{m}"] == float(np.mean([r["methods"][m]["mi"] for r in records]))
        assert row[f"auc_{m}"] == curve_auc(dataset_curve([r["methods"][m]["mi_curve"] for r in records]))


def test_cli_status_and_run(serial_run, capsys):
    from fastinterp.cli import main

    spec, summary, _ = serial_run
    assert main(["sweep", "status", str(spec.path)]) == 0
    assert f"{summary['tasks']} done, 0 pending, 0 failed" in capsys.readouterr().out
    assert main(["sweep", "run", str(spec.path), "--engine", "serial", "--quiet", "--no-report"]) == 0
    assert f"0 ran, {summary['tasks']} already done" in capsys.readouterr().out


# --------------------------------------------------------------------------------------
# Ray: local, killed workers, a cluster on 127.0.0.1
# --------------------------------------------------------------------------------------
ray = pytest.importorskip("ray", reason="the sweep extra (pip install 'fastinterp[sweep]') is not installed")


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for this module's local-Ray tests (2 CPUs, small object store)."""
    os.environ["RAY_DISABLE_USAGE_STATS"] = "1"
    ray.init(num_cpus=2, object_store_memory=10 ** 8, include_dashboard=False, log_to_driver=False,
             configure_logging=False, _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


def test_local_ray_gives_identical_results(serial_run, local_ray, tmp_path):
    spec = load_spec(_write_spec(tmp_path, "out"))
    s = run_sweep(spec, engine="ray", progress=False)
    assert s["ran"] == s["tasks"] and not s["failed"]
    _assert_same_tree(serial_run[0].output, spec.output)


def test_killed_worker_is_reported_then_rerun(serial_run, local_ray, tmp_path, monkeypatch):
    from fastinterp.sweep.tasks import FAULT_ENV

    spec = load_spec(_write_spec(tmp_path, "out", retries=0))
    monkeypatch.setenv(FAULT_ENV, f"kill:mutual.shard:{tmp_path / 'killed-once'}")
    s = run_sweep(spec, engine="ray", progress=False)
    assert len(s["failed"]) == 1 and len(s["blocked"]) == 1  # the shard, and the merge that needs it
    (err,) = s["failed"].values()
    assert "Worker" in err or "died" in err or "crash" in err.lower(), err
    assert s["ran"] == s["tasks"] - 2  # everything else finished
    st = sweep_status(spec)
    assert st["counts"]["failed"] == 1 and st["counts"]["pending"] == 1
    (failed,) = [t for t in st["tasks"] if t["state"] == "failed"]
    assert failed["kind"] == "mutual.shard" and failed["error"]
    # the rerun: killed again once, retried by Ray (retries = 1), then the merge
    spec.retries = 1
    monkeypatch.setenv(FAULT_ENV, f"kill:mutual.shard:{tmp_path / 'killed-twice'}")
    s = run_sweep(spec, engine="ray", progress=False)
    assert (tmp_path / "killed-twice").exists()
    assert s["ran"] == 2 and not s["failed"] and s["reused"] == s["tasks"] - 2
    _assert_same_tree(serial_run[0].output, spec.output)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_cluster_on_localhost(serial_run, tmp_path):
    if ray.is_initialized():
        ray.shutdown()
    ray_bin = Path(sys.executable).with_name("ray")
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env = dict(os.environ, RAY_DISABLE_USAGE_STATS="1")
    subprocess.run([str(ray_bin), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                    "--num-cpus=2", "--include-dashboard=false", f"--temp-dir={temp}",
                    "--object-store-memory=100000000", "--disable-usage-stats"],
                   check=True, env=env, capture_output=True, timeout=120)
    try:
        spec = load_spec(_write_spec(tmp_path, "out"))
        s = run_sweep(spec, engine="ray", address=f"127.0.0.1:{port}", progress=False)
        assert s["ran"] == s["tasks"] and not s["failed"]
        _assert_same_tree(serial_run[0].output, spec.output)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        subprocess.run([str(ray_bin), "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


LLM_SPEC = """
[sweep]
output = "out"
layers = [3]

[[models]]
name = "tiny"
model = "fastinterp-tiny-ViT"

[dictionaries]
concepts = "demo"

[images]
photos = "demo"

[methods.ccs]
steps = ["textspan", "label", "score"]
n_texts = 3
labeller = "openai"
"""


def test_llm_labeller_in_a_sweep(tmp_path, monkeypatch, chat_server):
    """ccs label / score through an OpenAI-compatible server on 127.0.0.1 (configured by the
    FASTINTERP_LLM_* variables, as a user would): the scores are the server's answers, and
    the API key reaches the server but no file of the sweep."""
    def answer(prompt):  # label: a fixed name; judge: consistent iff the description has an even length
        if prompt.startswith("What is the common"):
            return "colour"
        text = prompt.rsplit('Text: "', 1)[1].rstrip().removesuffix('"')
        return "1" if len(text) % 2 == 0 else "0"

    server = chat_server(answer)
    secret = "sk-test-not-a-real-key-7d1f"
    monkeypatch.setenv("FASTINTERP_LLM_BASE_URL", server.url)
    monkeypatch.setenv("FASTINTERP_LLM_MODEL", "stand-in")
    monkeypatch.setenv("FASTINTERP_LLM_API_KEY", secret)
    (tmp_path / "sweep.toml").write_text(LLM_SPEC, encoding="utf-8")
    spec = load_spec(tmp_path / "sweep.toml")
    s = run_sweep(spec, engine="serial", progress=False)
    assert s["ran"] == s["tasks"] and not s["failed"], s["failed"]
    assert server.requests and {r["auth"] for r in server.requests} == {f"Bearer {secret}"}
    (desc,) = (spec.output / "tasks" / "ccs.textspan").glob("*/descriptions.json")
    heads = json.loads(desc.read_text())["heads"]
    (scored,) = (spec.output / "tasks" / "ccs.score").glob("*/ccs.json")
    got = json.loads(scored.read_text())["heads"]
    assert [h["label"] for h in got] == ["colour"] * len(heads)
    assert [h["ccs"] for h in got] == [sum(len(d) % 2 == 0 for d in h["descriptions"]) for h in heads]
    row = _row(_rows(spec.output), method="ccs.score")
    assert row["mean_ccs"] == sum(h["ccs"] for h in got) / len(got)
    assert not [p for p in spec.output.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
