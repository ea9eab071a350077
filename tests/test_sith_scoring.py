"""SITH's offline edit scoring (ClipScorer, `fastinterp sith score`) and the input checks
`sith edit` runs before it loads the model (tiny model, random weights)."""
import pytest
import torch

import fastinterp
from fastinterp import sith
from fastinterp.cli import main
from fastinterp.cli import sith as sith_cli

TARGETS, CONTRAST = ["ocean", "beach", "forest"], ["dog", "car", "hat"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)  # what the CLI does (--seed 0)
    model, _, tok = fastinterp.load_clip(fastinterp.TINY_MODEL)
    return model, tok


@pytest.fixture(scope="module")
def scorer(tiny, tmp_path_factory):
    # anchors that are themselves the concepts: each concept's nearest anchor is itself,
    # whatever the (random) weights
    return sith.ClipScorer(*tiny, targets=TARGETS, contrast=CONTRAST, cache_dir=tmp_path_factory.mktemp("cache"))


def test_clip_scorer_maps_the_target_weight_share_to_1_5(scorer):
    assert scorer.nearest(["ocean", "dog"]) == [("ocean", True), ("dog", False)]
    assert scorer.score_concepts([(0.7, "beach"), (0.3, "forest")]) == 5
    assert scorer.score_concepts([(0.5, "dog"), (0.1, "car")]) == 1
    assert scorer.target_fraction([(0.6, "ocean"), (0.4, "hat")]) == pytest.approx(0.6)
    assert scorer.score_concepts([(0.6, "ocean"), (0.4, "hat")]) == 3  # 1 + round(2.4)
    assert scorer.score_concepts([(0.8, "ocean"), (0.2, "hat"), (0.0, "dog")]) == 4  # zero weights ignored
    with pytest.raises(ValueError, match="no concept with a positive weight"):
        scorer.score_concepts([(0.0, "ocean")])


def test_clip_scorer_presets(tiny, tmp_path):
    s = sith.ClipScorer(*tiny, "sign-flip", cache_dir=tmp_path)
    assert s.target == "unsafe" and s.targets == list(sith.CLIP_TARGETS["unsafe"][0])
    assert sith.ClipScorer(*tiny, "suppress", cache_dir=tmp_path).target == "background"
    with pytest.raises(ValueError, match="unknown target 'nsfw'"):
        sith.ClipScorer(*tiny, "nsfw", cache_dir=tmp_path)


def test_one_driver_two_scorers(scorer, tmp_path):
    concepts = TARGETS + CONTRAST
    # 2 heads x 3 singular vectors x K=2: (indices into concepts, weights)
    idx = torch.tensor([[[0, 3], [3, 4], [1, 2]], [[5, 0], [2, 1], [4, 5]]])
    w = torch.tensor([[[0.6, 0.4], [0.5, 0.5], [0.9, 0.1]], [[0.5, 0.5], [1.0, 0.0], [0.3, 0.3]]])
    expect = torch.tensor([[3, 1, 5], [3, 5, 1]])
    cache = tmp_path / "dec.txt"
    got = sith.score_singular_vectors(w, idx, concepts, scorer, cache=cache, progress=False)
    assert torch.equal(got, expect)
    assert sith.read_decisions(cache) == expect.reshape(-1).tolist()
    # resumes from the file: a scorer that must not be asked again
    assert torch.equal(sith.score_singular_vectors(w, idx, concepts, lambda p: 1 / 0, cache=cache,
                                                   progress=False), expect)
    # the LLM path of the same driver still gets the formatted prompt
    prompts = []
    sith.score_singular_vectors(w[:1, :1], idx[:1, :1], concepts, lambda p: prompts.append(p) or 2, progress=False)
    assert "- 0.60 ocean\n- 0.40 dog" in prompts[0]


def _run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def decomposed(tmp_path_factory):
    out = tmp_path_factory.mktemp("sith")
    assert main(["sith", "decompose", "--layers", "3", "--rank", "4", "--sparsity", "3", "--fold-ln",
                 "--output", str(out), "--quiet", "--no-explain"]) == 0
    return out, out / "fastinterp-tiny-ViT" / "random", "layer-03_right_foldln_demo_comp-0.3_sparsity-3"


def test_sith_score_clip_then_edit(decomposed, tiny, capsys, tmp_path):
    out, mdir, stem = decomposed
    args = ["--layers", "-1", "--recipe", "suppress", "--dictionary", "demo", "--sparsity", "3", "--fold-ln",
            "--output", str(out), "--quiet"]
    rc, stdout, err = _run(capsys, "sith", "score", *args, "--scorer", "clip")
    assert rc == 0, err
    dfile = mdir / "suppress-decisions" / f"{stem}.txt"
    dec = sith.read_decisions(dfile)
    assert len(dec) == 4 * 4 and set(dec) <= {1, 2, 3, 4, 5}
    assert f"layer 3: 16 singular vectors scored by clip" in stdout
    # the same numbers as the API with the same model and the recipe's preset
    data = sith.load_decomposition(mdir / "decompositions" / f"{stem}.pt")
    words = fastinterp.ConceptDictionary.builtin("demo").texts
    api = sith.score_singular_vectors(data["scores"], data["indices"], words, sith.ClipScorer(*tiny, "suppress"),
                                      progress=False)
    assert api.reshape(-1).tolist() == dec
    # edit reads the file the score step wrote
    rc, stdout, err = _run(capsys, "sith", "edit", *args, "--save", str(tmp_path / "e.pt"))
    assert rc == 0, err
    assert f"zeroed {sum(v >= 3 for v in dec)}" in stdout
    # a custom target list and --force rescoring
    rc, _, err = _run(capsys, "sith", "score", *args, "--scorer", "clip", "--force", "--target", words[0],
                      "--contrast", words[1])
    assert rc == 0, err
    assert len(sith.read_decisions(dfile)) == 16


def test_sith_score_needs_the_decomposition(tmp_path, capsys):
    rc, _, err = _run(capsys, "sith", "score", "--layers", "2", "--recipe", "sign-flip", "--dictionary", "demo",
                      "--scorer", "clip", "--output", str(tmp_path), "--quiet")
    assert rc == 2 and "no decomposition" in err and "sith decompose" in err


def test_edit_checks_inputs_before_loading_the_model(decomposed, tmp_path, capsys, monkeypatch):
    out, mdir, stem = decomposed

    def no_model(args):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(sith_cli, "load_model", no_model)
    base = ["sith", "edit", "--output", str(out), "--quiet", "--save", str(tmp_path / "x.pt")]
    dec_args = ["--recipe", "sign-flip", "--dictionary", "demo", "--sparsity", "3", "--fold-ln",
                "--decisions", str(tmp_path)]

    def edit(*extra):
        return _run(capsys, *base, *extra)

    rc, _, err = edit("--layers", "9", *dec_args)
    assert rc == 2 and "layer 9 is out of range for a ViT with 4 layers" in err
    rc, _, err = edit("--layers", "3", *dec_args)
    assert rc == 2 and "no decisions file" in err and "sith score" in err
    dfile = tmp_path / f"{stem}.txt"
    dfile.write_text("1\n2\nError\n")
    rc, _, err = edit("--layers", "3", *dec_args)
    assert rc == 2 and "'Error' is not an integer score" in err
    dfile.write_text("1\n" * 7)
    rc, _, err = edit("--layers", "3", *dec_args)
    assert rc == 2 and "7 scores; expected heads x rank = 4 x r" in err
    dfile.write_text("1\n" * 7 + "6\n")
    rc, _, err = edit("--layers", "3", *dec_args)
    assert rc == 2 and "integers 1-5, found [6]" in err
    rc, _, err = edit("--layers", "2", "--recipe", "classify", "--dictionary", "demo", "--sparsity", "3",
                      "--fold-ln", "--classes", str(dfile))
    assert rc == 2 and "no decomposition" in err
    torch.save({3: torch.ones(3, 4)}, tmp_path / "m.pt")
    rc, _, err = edit("--layers", "3", "--recipe", "multipliers", "--multipliers", str(tmp_path / "m.pt"))
    assert rc == 2 and "shape (3, 4); expected (heads=4, r) with 1 <= r <= 16" in err
    rc, _, err = edit("--layers", "2", "--recipe", "multipliers", "--multipliers", str(tmp_path / "m.pt"))
    assert rc == 2 and "no multipliers for layer 2" in err
    (tmp_path / "bad.pt").write_text("not a tensor file")
    rc, _, err = edit("--layers", "3", "--recipe", "multipliers", "--multipliers", str(tmp_path / "bad.pt"))
    assert rc == 2 and "cannot be read" in err
    rc, _, err = edit("--layers", "3", "--recipe", "multipliers", "--multipliers", str(tmp_path / "none.pt"))
    assert rc == 2 and "does not exist" in err


def test_sith_score_takes_the_decomposition_settings_from_the_run_record(decomposed, capsys):
    import json

    out, mdir, stem = decomposed
    # no --dictionary / --sparsity / --fold-ln: the folder's latest decompose says demo, 3, fold-ln
    rc, stdout, err = _run(capsys, "sith", "score", "--layers", "3", "--recipe", "sign-flip", "--scorer", "clip",
                           "--output", str(out), "--quiet")
    assert rc == 0, err
    assert (mdir / "sign-flip-decisions" / f"{stem}.txt").is_file()
    step = json.loads((mdir / "run.json").read_text())["steps"]["sith score sign-flip"]
    assert step["settings"]["dictionary"] == "demo" and step["settings"]["sparsity"] == 3
    assert step["settings"]["fold_ln"] is True and step["settings"]["scorer"] == "clip"
    assert step["decisions"] == {f"{stem}.pt": f"sign-flip-decisions/{stem}.txt"}
    # a model flag that contradicts the record is refused before anything is scored
    rc, _, err = _run(capsys, "sith", "score", "--layers", "3", "--recipe", "sign-flip", "--scorer", "clip",
                      "--seed", "7", "--output", str(out), "--quiet")
    assert rc == 2 and "--seed 7 (the record says 0)" in err
