"""Issue 12: every output folder carries a run record (run.json) and every later command uses it.

The README's command chains run end to end on random weights (tiny model, a few bundled
photos); the same chain twice gives byte-identical folders (timings live only in
mutual's timing.json, which is excluded; mutual's summary.json counts of images processed /
resumed this run describe the invocation and are excluded from the kill-resume
comparison); a run killed at several points (a hook raising at the Nth batch / head /
class) and rerun gives the same files as an uninterrupted one.
"""
import filecmp
import json
import shutil
from pathlib import Path

import pytest
import torch

from fastinterp.cli import main
from fastinterp.io import read_run_record

SIZE = 72  # the tiny model's images are 64 x 64


class Killed(BaseException):
    """What the kill hook raises (not an Exception: nothing on the way catches it)."""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from fastinterp.images import demo_images

    root = tmp_path_factory.mktemp("data")
    flat, classes = root / "photos", root / "classes"
    for i, (name, im) in enumerate(demo_images().items()):
        im = im.resize((SIZE, SIZE))
        (flat).mkdir(exist_ok=True)
        im.save(flat / f"{name}.png")
        im.transpose(0).save(flat / f"{name}-flip.png")
        folder = classes / ("cat" if name == "chelsea" else "rocket" if name == "rocket" else "other")
        folder.mkdir(parents=True, exist_ok=True)
        im.save(folder / f"{name}.png")
        im.rotate(90).save(folder / f"{name}-rot.png")
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One embedding cache for this module's runs (encoding the text banks once)."""
    path = str(tmp_path_factory.mktemp("cache"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTINTERP_CACHE", path)
        yield path


@pytest.fixture()
def shared_cache(cache, monkeypatch):
    monkeypatch.setenv("FASTINTERP_CACHE", cache)


def _ok(*argv):
    rc = main([str(a) for a in argv])
    assert rc == 0, argv


def _ccs_chain(data, out: Path, prune: Path, snapshots: dict | None = None):
    _ok("ccs", "textspan", "--images", data / "photos", "--last-layers", 2, "--batch-size", 2, "--output", out,
        "--quiet")
    if snapshots is not None:
        shutil.copytree(out, snapshots["textspan"])
    _ok("ccs", "label", "--labeller", "clip", "--output", out, "--quiet")  # README: no model flags
    if snapshots is not None:
        shutil.copytree(out, snapshots["label"])
    _ok("ccs", "score", "--output", out, "--quiet")  # the labeller ccs label used
    _ok("ccs", "prune", "--ccs", out / "ccs.csv", "--images", data / "classes", "--output", prune, "--seeds", 2,
        "--high-min", 4, "--quiet")


def _sith_chain(data, out: Path):
    _ok("sith", "decompose", "--layers", 2, 3, "--rank", 8, "--sparsity", 3, "--batch-size", 8, "--fold-ln",
        "--images", data / "photos", "--output", out, "--quiet")
    files = sorted((out / "fastinterp-tiny-ViT" / "random" / "decompositions").glob("*.pt"))
    _ok("sith", "fidelity", *files, "--output", out, "--csv", out / "fidelity.csv", "--quiet")
    mult = out / "mult.pt"
    torch.save({2: torch.full((4, 8), 0.5)}, mult)
    _ok("sith", "edit", "--layers", 2, "--recipe", "multipliers", "--multipliers", mult, "--output", out,
        "--save", out / "edited.pt", "--quiet")


def _mutual(data, out: Path, *extra):
    _ok("mutual", "explain", data / "classes", "--output", out, "--parts", "kmeans", "--no-crf", "--u", 20,
        "--quiet", *extra)


@pytest.fixture(scope="module")
def runs(data, cache, tmp_path_factory):
    """Each README chain run once, uninterrupted, plus snapshots of the CCS folder after
    textspan and after label (where the kill tests start from)."""
    root = tmp_path_factory.mktemp("runs")
    snaps = {"textspan": root / "after-textspan", "label": root / "after-label"}
    _ccs_chain(data, root / "ccs", root / "prune", snaps)  # the tiny model has no CCS <= 1 head: reported
    _sith_chain(data, root / "sith")
    _mutual(data, root / "mutual")
    return root


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _json_without(path: Path, keys=()):
    data = json.loads(path.read_text())
    return {k: v for k, v in data.items() if k not in keys}


def assert_same_folder(a: Path, b: Path, *, skip=("timing.json",), summary_counts=False):
    files = [f for f in _tree(a) if Path(f).name not in skip]
    assert files == [f for f in _tree(b) if Path(f).name not in skip]
    for f in files:
        if summary_counts and Path(f).name == "summary.json":
            keys = ("processed_this_run", "resumed")
            assert _json_without(a / f, keys) == _json_without(b / f, keys), f
            continue
        assert filecmp.cmp(a / f, b / f, shallow=False), f"{f} differs between {a} and {b}"


# --------------------------------------------------------------------------------------
# the chains: records agree, later steps use them, the same run twice gives the same bytes
# --------------------------------------------------------------------------------------
def test_ccs_chain_records_agree_and_are_deterministic(runs, data, tmp_path, capsys, shared_cache):
    rec = read_run_record(runs / "ccs")
    assert set(rec["steps"]) == {"ccs textspan", "ccs label", "ccs score"}
    assert rec["model"]["name"] == "fastinterp-tiny-ViT" and rec["model"]["seed"] == 0
    assert len(rec["model"]["weights_sha256"]) == 64 and rec["fastinterp"]
    label_by = rec["steps"]["ccs label"]["settings"]["labeller"]
    assert label_by["kind"] == "clip" and label_by["threshold"] == 0.3 and label_by["vocabulary"]["builtin"] == "demo"
    assert rec["steps"]["ccs score"]["settings"]["labeller"] == label_by  # score used label's labeller
    assert json.loads((runs / "ccs" / "labels.json").read_text())["labeller"] == label_by
    assert json.loads((runs / "ccs" / "ccs.json").read_text())["meta"]["labeller"] == label_by
    prune = read_run_record(runs / "prune")
    assert prune["model"] == rec["model"]  # prune took the model from the CCS folder's record
    results = json.loads((runs / "prune" / "results.json").read_text())
    assert {s["set"] for s in results["skipped_sets"]} >= {"low"}  # reported, not dropped silently
    assert "could not be formed" in (runs / "prune" / "results.md").read_text()
    # a contradicting flag is refused, naming both values
    capsys.readouterr()
    assert main(["ccs", "score", "--output", str(runs / "ccs"), "--seed", "3", "--quiet"]) == 2
    assert "--seed 3 (the record says 0)" in capsys.readouterr().err
    # the same chain again: byte-identical folders
    _ccs_chain(data, tmp_path / "ccs", tmp_path / "prune")
    assert_same_folder(runs / "ccs", tmp_path / "ccs")
    assert_same_folder(runs / "prune", tmp_path / "prune")


def test_sith_chain_records_agree_and_are_deterministic(runs, data, tmp_path, shared_cache):
    mdir = runs / "sith" / "fastinterp-tiny-ViT" / "random"
    rec = read_run_record(mdir)
    assert set(rec["steps"]) == {"sith decompose", "sith fidelity", "sith edit"}
    dec = rec["steps"]["sith decompose"]
    assert dec["settings"]["fold_ln"] is True and dec["inputs"]["images"]["files"] == 8
    assert sorted(dec["files"]) == sorted(p.name for p in (mdir / "decompositions").glob("*.pt"))
    edit = rec["steps"]["sith edit"]["settings"]
    assert edit["fold_ln"] is True and edit["sparsity"] == 3  # taken from the decompose record
    assert main(["sith", "fidelity", *map(str, sorted((mdir / "decompositions").glob("*.pt"))),
                 "--model-name", "ViT-B-16", "--quiet"]) == 2
    _sith_chain(data, tmp_path / "sith")
    assert_same_folder(runs / "sith", tmp_path / "sith")


def test_mutual_record_and_determinism(runs, data, tmp_path, shared_cache):
    rec = read_run_record(runs / "mutual")
    step = rec["steps"]["mutual explain"]
    assert step["settings"]["parts"] == "kmeans" and step["inputs"]["images"]["files"] == 8
    assert "seconds" not in json.loads((runs / "mutual" / "summary.json").read_text())
    _mutual(data, tmp_path / "mutual")
    assert_same_folder(runs / "mutual", tmp_path / "mutual")
    # another setting into the same folder is refused, not mixed with the finished classes
    assert main(["mutual", "explain", str(data / "classes"), "--output", str(tmp_path / "mutual"), "--parts", "pca",
                 "--no-crf", "--u", "20", "--quiet"]) == 2


def test_mutual_class_names_are_checked_against_folders(data, tmp_path, capsys):
    names = tmp_path / "names.txt"
    names.write_text("rocket\ncat\nastronaut\n")  # 'other' has no name; 'astronaut' has no folder
    assert main(["mutual", "explain", str(data / "classes"), "--classes", str(names), "--output",
                 str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "['other']" in err and "['astronaut']" in err
    assert not (tmp_path / "o").exists()  # refused before any model was loaded


# --------------------------------------------------------------------------------------
# killed runs resume to the same result
# --------------------------------------------------------------------------------------
def _kill_at(monkeypatch, owner, name, n):
    """Make owner.name raise Killed on its n-th call (1-based)."""
    orig = getattr(owner, name)
    calls = [0]

    def hooked(*a, **k):
        calls[0] += 1
        if calls[0] == n:
            raise Killed(f"{name} call {n}")
        return orig(*a, **k)

    monkeypatch.setattr(owner, name, hooked)


def _killed_then_resumed(monkeypatch, owner, name, n, run):
    with monkeypatch.context() as m:
        _kill_at(m, owner, name, n)
        with pytest.raises(Killed):
            run()
    run()


@pytest.mark.parametrize("n", [2, 4])
def test_ccs_textspan_killed_resumes(runs, data, tmp_path, monkeypatch, capsys, n):
    import fastinterp.textspan as T

    out = tmp_path / "ccs"
    run = lambda: _ok("ccs", "textspan", "--images", data / "photos", "--last-layers", 2,  # noqa: E731
                      "--batch-size", 2, "--output", out, "--quiet")
    _killed_then_resumed(monkeypatch, T, "_decompose_batch", n, run)
    assert "resuming: " in capsys.readouterr().out
    assert_same_folder(runs / "after-textspan", out)


@pytest.mark.parametrize("step,method,n", [("label", "label", 3), ("score", "judge", 7), ("score", "judge", 31)])
def test_ccs_label_and_score_killed_resume(runs, tmp_path, monkeypatch, shared_cache, step, method, n):
    from fastinterp import llm

    out = tmp_path / "ccs"
    shutil.copytree(runs / ("after-textspan" if step == "label" else "after-label"), out)
    args = ["ccs", step, "--output", out, "--quiet"] + (["--labeller", "clip"] if step == "label" else [])
    _killed_then_resumed(monkeypatch, llm.ClipLabeller, method, n, lambda: _ok(*args))
    if step == "label":
        _ok("ccs", "score", "--output", out, "--quiet")
    assert_same_folder(runs / "ccs", out)


def test_ccs_label_never_reuses_another_labellers_labels(runs, tmp_path, capsys):
    out = tmp_path / "ccs"
    shutil.copytree(runs / "ccs", out)
    with pytest.warns(RuntimeWarning, match="another labeller"):
        _ok("ccs", "label", "--labeller", "clip", "--threshold", "0.5", "--output", out)
    assert "resuming" not in capsys.readouterr().out
    assert json.loads((out / "labels.json").read_text())["labeller"]["threshold"] == 0.5


@pytest.mark.parametrize("n", [2, 5])
def test_sith_decompose_killed_resumes(runs, data, tmp_path, monkeypatch, shared_cache, n):
    import fastinterp.sparse as S

    out = tmp_path / "sith"
    run = lambda: _ok("sith", "decompose", "--layers", 2, 3, "--rank", 8, "--sparsity", 3,  # noqa: E731
                      "--batch-size", 8, "--fold-ln", "--images", data / "photos", "--output", out, "--quiet")
    _killed_then_resumed(monkeypatch, S, "sparse_code", n, run)
    ref = runs / "sith" / "fastinterp-tiny-ViT" / "random"
    mine = out / "fastinterp-tiny-ViT" / "random"
    for sub in ("decompositions", "explanations", "dictionaries"):
        assert_same_folder(ref / sub, mine / sub)
    assert filecmp.cmp(ref / "image_mean.pt", mine / "image_mean.pt", shallow=False)
    assert read_run_record(mine)["steps"]["sith decompose"] == read_run_record(ref)["steps"]["sith decompose"]


@pytest.mark.parametrize("n", [2, 3])
def test_mutual_explain_killed_resumes(runs, data, tmp_path, monkeypatch, capsys, shared_cache, n):
    import fastinterp.mutual as M

    out = tmp_path / "mutual"
    _killed_then_resumed(monkeypatch, M, "explain", n, lambda: _mutual(data, out))
    assert "resuming: " in capsys.readouterr().out
    assert_same_folder(runs / "mutual", out, summary_counts=True)
