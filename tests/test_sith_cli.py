"""`fastinterp sith decompose | fidelity | edit` end to end on the tiny model, and the demo section."""
import json

import pytest
import torch

import fastinterp
from fastinterp import sith
from fastinterp.cli import main
from fastinterp.cli import sith as sith_cli


def _model():
    torch.manual_seed(0)  # what the CLI does for random-weight models (--seed 0)
    return fastinterp.load_clip(fastinterp.TINY_MODEL)


@pytest.fixture()
def image_folder(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        Image.fromarray((torch.rand(48, 48, 3, generator=g) * 255).byte().numpy()).save(folder / f"{i}.png")
    return folder


def _run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_decompose_fidelity_edit_end_to_end(tmp_path, image_folder, capsys, monkeypatch):
    out = tmp_path / "out"
    rc, stdout, err = _run(capsys, "sith", "decompose", "--layers", "2", "-1", "--rank", "8", "--sparsity", "3",
                           "--fold-ln", "--images", str(image_folder), "--output", str(out), "--quiet")
    assert rc == 0, err
    mdir = out / "fastinterp-tiny-ViT" / "random"
    names = [f"layer-{l:02d}_right_foldln_demo_comp-0.3_sparsity-3.pt" for l in (2, 3)]
    for n in names:
        assert (mdir / "decompositions" / n).exists()
        assert (mdir / "explanations" / (n[:-3] + ".md")).exists()
        assert (mdir / "explanations" / (n[:-3] + ".png")).exists()
        assert "written" in stdout
    assert (mdir / "image_mean.pt").exists() and (mdir / "dictionaries" / "demo.pt").exists()
    assert (out / "dictionaries" / "demo.txt").read_text().splitlines() == list(
        fastinterp.ConceptDictionary.builtin("demo").texts)

    # same numbers as the API with the same (seeded) model, image mean and dictionary
    model, preprocess, tok = _model()
    mean = sith.image_mean(model, preprocess, image_folder, progress=False)
    torch.testing.assert_close(torch.load(mdir / "image_mean.pt"), mean)
    emb = fastinterp.ConceptDictionary.builtin("demo").encode(model, tok, progress=False)
    api = sith.decompose(model, emb, [3], rank=8, sparsity=3, image_mean=mean, progress=False)[3]
    saved = torch.load(mdir / "decompositions" / names[1])
    assert torch.equal(saved["indices"], api["indices"])
    torch.testing.assert_close(saved["scores"], api["scores"])
    # SITH's readers: stem split on "_" into 6 fields; model / pretrained from the folders
    path = mdir / "decompositions" / names[0]
    layer, type_, fold, dname, method, sparsity = path.stem.split("_")
    assert (path.parent.parent.parent.name, path.parent.parent.name) == ("fastinterp-tiny-ViT", "random")
    assert (int(layer.split("-")[-1]), type_, fold, dname, method, int(sparsity.split("-")[-1])) == (
        2, "right", "foldln", "demo", "comp-0.3", 3)
    assert saved["scores"].shape == (4, 8, 3)

    # second run resumes: nothing recomputed
    rc, stdout, _ = _run(capsys, "sith", "decompose", "--layers", "2", "3", "--rank", "8", "--sparsity", "3",
                         "--fold-ln", "--output", str(out), "--quiet")
    assert rc == 0 and stdout.count("existing file kept") == 2

    # fidelity: reads the dictionary and image mean next to the files
    rc, stdout, err = _run(capsys, "sith", "fidelity", *(str(mdir / "decompositions" / n) for n in names),
                           "--output", str(out), "--quiet", "--csv", str(tmp_path / "fid.csv"))
    assert rc == 0, err
    rep = json.loads((mdir / "fidelity" / (names[1][:-3] + ".json")).read_text())
    expect = sith.fidelity_from_file(model, mdir / "decompositions" / names[1], emb, image_mean=mean)
    assert rep["overall"]["mean"] == pytest.approx(expect["overall"]["mean"], abs=1e-6)
    assert rep["heads"][2]["std"] == pytest.approx(expect["heads"][2]["std"], abs=1e-6)
    assert f"overall fidelity: {expect['overall']['mean']:.4f}" in stdout
    assert len((tmp_path / "fid.csv").read_text().strip().splitlines()) == 1 + 2 * 5

    # edit with explicit multipliers -> checkpoint that load_clip reads; VO scaled as asked
    mult = torch.ones(4, 8)
    mult[1, 0], mult[3, :] = 0.0, -1.0
    torch.save({3: mult}, tmp_path / "mult.pt")
    rc, stdout, err = _run(capsys, "sith", "edit", "--layers", "3", "--recipe", "multipliers", "--multipliers",
                           str(tmp_path / "mult.pt"), "--fold-ln", "--output", str(out), "--quiet",
                           "--save", str(tmp_path / "edited.pt"))
    assert rc == 0, err
    edited, _, _ = fastinterp.load_clip(fastinterp.TINY_MODEL, checkpoint=tmp_path / "edited.pt")
    u, s, vh = sith.vo_svd(model, 3)
    s2 = s.clone()
    s2[:, :8] *= mult
    torch.testing.assert_close(sith.vo_matrices(edited, 3), u @ torch.diag_embed(s2) @ vh, atol=2e-6, rtol=1e-4)

    # suppress from decisions files (SITH's format: one score per line, head-major)
    ddir = tmp_path / "decisions"
    ddir.mkdir()
    dec = torch.randint(1, 6, (4, 8), generator=torch.Generator().manual_seed(1))
    sith.write_decisions(dec, ddir / (names[1][:-3] + ".txt"))
    rc, stdout, err = _run(capsys, "sith", "edit", "--layers", "3", "--recipe", "suppress", "--dictionary", "demo",
                           "--sparsity", "3", "--fold-ln", "--decisions", str(ddir), "--output", str(out),
                           "--quiet", "--save", str(tmp_path / "edited2.pt"))
    assert rc == 0, err
    assert f"zeroed {int((dec >= 3).sum())}" in stdout
    edited2, _, _ = fastinterp.load_clip(fastinterp.TINY_MODEL, checkpoint=tmp_path / "edited2.pt")
    s3 = s.clone()
    s3[:, :8] *= sith.suppress_multipliers(dec).float()
    torch.testing.assert_close(sith.vo_matrices(edited2, 3), u @ torch.diag_embed(s3) @ vh, atol=2e-6, rtol=1e-4)

    # sign-flip scored by an (offline, fake) LLM endpoint; answers cached in the decisions file
    import fastinterp.llm as llm

    class FakeChat:
        def __init__(self, *a, **k):
            pass

        def complete(self, messages):
            text = messages[-1]["content"]
            return "Score: 3" if "unsafe" in text else "Score: 1"

    monkeypatch.setattr(llm, "OpenAIChat", FakeChat)
    rc, stdout, err = _run(capsys, "sith", "edit", "--layers", "3", "--recipe", "sign-flip", "--dictionary", "demo",
                           "--sparsity", "3", "--fold-ln", "--llm", "--output", str(out), "--quiet",
                           "--save", str(tmp_path / "edited3.pt"))
    assert rc == 0, err
    assert sith.read_decisions(mdir / "sign-flip-decisions" / (names[1][:-3] + ".txt")) == [3] * 32
    assert "flipped 32" in stdout

    # classification rescaling
    (tmp_path / "classes.txt").write_text("a small cat\nred car\n")
    rc, stdout, err = _run(capsys, "sith", "edit", "--layers", "2", "3", "--recipe", "classify", "--dictionary",
                           "demo", "--sparsity", "3", "--fold-ln", "--classes", str(tmp_path / "classes.txt"),
                           "--output", str(out), "--quiet", "--save", str(tmp_path / "edited4.pt"))
    assert rc == 0, err
    assert "task concepts:" in stdout and "layer 2: edited (4, 8)" in stdout


def test_cli_bad_inputs(tmp_path, capsys):
    out = str(tmp_path / "o")
    rc, _, err = _run(capsys, "sith", "decompose", "--layers", "9", "--output", out, "--quiet")
    assert rc == 2 and "layer 9 is out of range" in err
    rc, _, err = _run(capsys, "sith", "decompose", "--layers", "0", "--method", "ista", "--rank", "4",
                      "--output", out, "--quiet")
    assert rc == 2 and "unknown sparse-coding method 'ista'" in err
    rc, _, err = _run(capsys, "sith", "decompose", "--dictionary", str(tmp_path / "missing.txt"), "--output", out,
                      "--quiet")
    assert rc == 2 and "not a built-in" in err
    rc, _, err = _run(capsys, "sith", "decompose", "--image-mean", str(tmp_path / "nope.pt"), "--output", out,
                      "--quiet")
    assert rc == 2 and "does not exist" in err
    rc, _, err = _run(capsys, "sith", "edit", "--layers", "1", "--recipe", "suppress", "--dictionary", "demo",
                      "--output", out, "--quiet", "--save", str(tmp_path / "x.pt"))
    assert rc == 2 and "no decisions file" in err
    rc, _, err = _run(capsys, "sith", "fidelity", str(tmp_path / "not_a_sith_name.pt"), "--output", out, "--quiet")
    assert rc == 2 and "not a SITH decomposition file name" in err
    with pytest.raises(SystemExit):
        main(["sith", "decompose", "--sv-type", "up"])
    capsys.readouterr()
    # a dictionary file whose name has '_' is renamed for SITH's file names
    (tmp_path / "my_words.txt").write_text("cat\ndog\nsky\ncar\ntree\nboat\n")
    rc, stdout, err = _run(capsys, "sith", "decompose", "--layers", "0", "--rank", "2", "--sparsity", "2",
                           "--dictionary", str(tmp_path / "my_words.txt"), "--output", out, "--quiet", "--no-explain")
    assert rc == 0, err
    assert "layer-00_right_nofoldln_my-words_comp-0.3_sparsity-2.pt" in stdout


def test_demo_section(tmp_path):
    from fastinterp.cli.demo import DemoContext
    from fastinterp.images import demo_images

    model, preprocess, tok = _model()
    d = fastinterp.ConceptDictionary.builtin("demo")
    emb = d.encode(model, tok, progress=False)
    ctx = DemoContext(model, preprocess, tok, fastinterp.vit_info(model), d, emb, demo_images(), tmp_path, 0)
    md = sith_cli.demo_section(ctx)
    assert md.startswith("## SITH")
    r = ctx.results["sith"]
    assert r["layers"] == [2, 3] and r["rank"] == 16
    assert r["files"] == [f"layer-0{l}_right_foldln_demo_comp-0.3_sparsity-5.pt" for l in (2, 3)]
    assert r["undo_max_abs_diff"] == 0.0
    assert all(0.5 < c < 1.0 for c in r["edit_cosine_after_removing_top_sv"])
    for layer in ("2", "3"):
        assert f"| {layer} | {r['fidelity'][layer]['mean']:.4f} |" in md
    assert (tmp_path / "sith_explanations.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "sith" / "explanations-layer-03.csv").exists()
