"""Mutual knowledge: text side, explain, dataset runner, CLI, demo (fastinterp.mutual)."""
import json
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import fastinterp
from fastinterp import mutual
from fastinterp.concepts import ConceptDictionary
from fastinterp.images import demo_images
from fastinterp.kernels.sinkhorn import sinkhorn_fixed
from fastinterp.reference.mi import mi_curve_reference, sinkhorn_reference
from fastinterp.reference.mutual import dataset_auc_reference, explain_reference

CLASSES = ["red disc", "green square", "blue stripes"]


# ---------------------------------------------------------------- text side on constructed matrices

def _plain_vision_descriptors(logits, rel, top_initial, offset, per_part):
    out = []
    for b, P in enumerate(logits):
        if P.shape[0] == 0:
            out.append(([], [], []))
            continue
        tops = [set(torch.topk(row, min(top_initial, row.numel())).indices.tolist()) for row in P]
        common = sorted(set.intersection(*tops))
        if not common:
            out.append(([[] for _ in range(P.shape[0])], [], []))
            continue
        r = [float(rel[b, c]) for c in common]
        mean_r = sum(r) / len(r)
        keep = [c for c, v in zip(common, r) if v > mean_r - offset]
        plan = sinkhorn_reference(P[:, keep].double(), scale=2.5, epsilon=1.0, iters=1000)
        k = min(per_part, len(keep))
        sub = P[:, keep]
        part_ids = [[keep[j] for j in sorted(range(len(keep)), key=lambda j: (-float(plan[r, j]), -float(sub[r, j])))[:k]]
                    for r in range(P.shape[0])]
        flat = []
        for row in part_ids:
            for i in row:
                if i not in flat:
                    flat.append(i)
        scores = [2.5 * float(rel[b, i]) for i in flat]
        order = sorted(range(len(flat)), key=lambda i: scores[i], reverse=True)
        out.append((part_ids, [flat[i] for i in order], [scores[i] for i in order]))
    return out


@pytest.mark.parametrize("top_initial,M", [(20, 40), (8, 12), (500, 30), (4, 50)])
def test_vision_descriptors_match_a_plain_implementation(top_initial, M):
    g = torch.Generator().manual_seed(top_initial + M)
    counts = [3, 0, 1, 5, 2]
    logits = [torch.randn(p, M, generator=g, dtype=torch.float64) * 0.3 for p in counts]
    rel = torch.randn(len(counts), M, generator=g, dtype=torch.float64) * 0.1
    ours = mutual.vision_descriptors(logits, rel, top_initial=top_initial)
    plain = _plain_vision_descriptors(logits, rel, top_initial, 0.02, 3)
    for o, (part_ids, ids, scores) in zip(ours, plain):
        assert o["part_ids"] == part_ids
        assert o["ids"] == ids
        np.testing.assert_allclose(o["scores"], scores, rtol=1e-12)
        assert o["scores"] == sorted(o["scores"], reverse=True)


def test_fewer_common_descriptors_than_top_k_and_empty_intersection():
    logits = torch.tensor([[0.9, 0.8, 0.7, 0.0, 0.1, 0.2],
                           [0.9, 0.8, 0.0, 0.7, 0.1, 0.2]])
    rel = torch.zeros(1, 6)
    rel[0, 1] = 0.01
    out = mutual.vision_descriptors([logits], rel, top_initial=3)[0]
    assert out["common"] == 2 and out["kept"] == 2
    assert all(sorted(p) == [0, 1] for p in out["part_ids"])   # only 2 candidates for top-3
    assert out["ids"] == [1, 0]                                  # ordered by relevance
    np.testing.assert_allclose(out["scores"], [0.025, 0.0])
    disjoint = torch.tensor([[1.0, 0.9, 0.0, 0.0], [0.0, 0.0, 1.0, 0.9]])
    out = mutual.vision_descriptors([disjoint], torch.zeros(1, 4), top_initial=2)[0]
    assert out["common"] == 0 and out["ids"] == [] and out["part_ids"] == [[], []]
    with pytest.raises(ValueError, match="relevance"):
        mutual.vision_descriptors([disjoint], torch.zeros(2, 4))
    with pytest.raises(ValueError, match="part_logits"):
        mutual.vision_descriptors([disjoint], torch.zeros(1, 5))


def test_single_part_plan_ties_go_to_the_most_similar_descriptors():
    # one part: the plan normalises to all ones, so the similarity decides the top-3
    logits = torch.tensor([[0.1, 0.5, 0.3, 0.9, 0.2]])
    out = mutual.vision_descriptors([logits], torch.zeros(1, 5), top_initial=5)[0]
    assert out["part_ids"] == [[3, 1, 2]]
    # at the reference's size our scaling-form plan is 1 +- an ulp, not exactly 1: still a tie
    logits = torch.rand(1, 500, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.3
    plan = np.asarray(sinkhorn_fixed([logits], scale=2.5, epsilon=1.0, iters=1000)[0])
    assert np.abs(plan - 1).max() < 1e-14
    out = mutual.vision_descriptors([logits], torch.zeros(1, 500), top_initial=500)[0]
    assert out["part_ids"] == [logits[0].argsort(descending=True)[:3].tolist()]


def test_relevance_filter_threshold():
    # all parts agree on everything; the filter keeps rel > mean(rel) - 0.02
    logits = torch.ones(2, 5) + torch.arange(5) * 1e-3
    rel = torch.tensor([[0.10, 0.08, 0.079, 0.05, 0.14]])     # mean 0.0898 -> threshold 0.0698
    out = mutual.vision_descriptors([logits], rel, top_initial=5, per_part=5)[0]
    assert out["common"] == 5 and out["kept"] == 4
    assert out["ids"] == [4, 0, 1, 2]


def test_language_descriptors_top_u():
    g = torch.Generator().manual_seed(0)
    cls, desc = torch.randn(4, 8, generator=g), torch.randn(30, 8, generator=g) * 3
    ids = mutual.language_descriptors(cls, desc, [2, 0], u=5)
    for row, c in zip(ids.tolist(), [2, 0]):
        sims = [float(F.cosine_similarity(cls[c], d, dim=0)) for d in desc]
        assert row == sorted(range(30), key=lambda i: -sims[i])[:5]
    assert mutual.language_descriptors(cls, desc, [1], u=100).shape == (1, 30)


def test_load_descriptors(tmp_path):
    (tmp_path / "d.txt").write_text("has wings\n\nhas wings\n  red color \n", encoding="utf-8")
    assert mutual.load_descriptors(tmp_path / "d.txt").texts == ["has wings", "red color"]
    (tmp_path / "d.json").write_text(json.dumps({"bird": ["has wings", "a beak"], "plane": ["has wings", "engines"]}))
    assert mutual.load_descriptors(tmp_path / "d.json").texts == ["has wings", "a beak", "engines"]
    (tmp_path / "l.json").write_text(json.dumps(["a", "b", "a"]))
    assert mutual.load_descriptors(tmp_path / "l.json").texts == ["a", "b"]
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        mutual.load_descriptors(tmp_path / "bad.json")
    (tmp_path / "num.json").write_text(json.dumps({"bird": 3}))
    with pytest.raises(ValueError, match="list of strings"):
        mutual.load_descriptors(tmp_path / "num.json")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mutual.load_descriptors(tmp_path / "missing.txt")
    assert len(mutual.demo_descriptors()) >= 250


# ---------------------------------------------------------------- explain end to end

def _images(n=4, seed=0):
    rng = np.random.default_rng(seed)
    ims = []
    for i in range(n):
        a = np.full((72, 90, 3), 20 + 25 * i, np.uint8)
        color = [(220, 40, 30), (40, 200, 60), (30, 60, 220)][i % 3]
        if i % 3 == 0:
            cv2.circle(a, (35 + 5 * i, 36), 20, color, -1)
        elif i % 3 == 1:
            cv2.rectangle(a, (20, 15), (60 + 3 * i, 55), color, -1)
        else:
            for y in range(5, 70, 12):
                cv2.rectangle(a, (10, y), (80, y + 5), color, -1)
        a = np.clip(a.astype(int) + rng.integers(-12, 12, a.shape), 0, 255).astype(np.uint8)
        ims.append(Image.fromarray(a))
    return ims


@pytest.fixture(scope="module")
def bank():
    return mutual.demo_descriptors()


@pytest.fixture(scope="module")
def explained(tiny_clip, bank, tmp_path_factory):
    model, preprocess, tokenizer = tiny_clip
    cache = tmp_path_factory.mktemp("mk-cache")
    exp = mutual.explain(model, preprocess, tokenizer, _images(), CLASSES, bank, labels=[0, 1, 2, 0],
                         parts="both", seed=0, cache_dir=cache)
    return exp, cache


def test_explain_records_are_consistent(tiny_clip, bank, explained):
    model, preprocess, tokenizer = tiny_clip
    exp, cache = explained
    # plain class embeddings and zero-shot prediction
    with torch.no_grad():
        acc = 0
        for tpl in mutual.IMAGENET_TEMPLATES:
            acc = acc + F.normalize(model.encode_text(tokenizer([tpl.format(c) for c in CLASSES])).float(), dim=-1)
        cls = F.normalize(acc, dim=-1)
        desc = F.normalize(model.encode_text(tokenizer(bank.texts)).float(), dim=-1)
    assert torch.allclose(mutual.class_embeddings(model, tokenizer, CLASSES, cache_dir=cache), cls, atol=1e-5)
    img = F.normalize(exp.visual.image_embeddings, dim=-1)
    assert [r["predicted"] for r in exp.records] == (img @ cls.T).argmax(1).tolist()
    for b, r in enumerate(exp.records):
        sims = (cls[r["predicted"]] @ desc.T).tolist()
        assert r["language_ids"] == sorted(range(len(bank)), key=lambda i: -sims[i])[:50]
        assert r["language_concepts"] == [bank[i] for i in r["language_ids"]]
        assert r["label"] == [0, 1, 2, 0][b] and r["foreground_patches"] == int(exp.visual.foreground[b].sum())
        for m in ("pca", "kmeans"):
            mm = r["methods"][m]
            assert [p["part"] for p in mm["parts"]] == exp.visual.parts[m].part_ids[b]
            assert mm["mi_curve"] == pytest.approx(mi_curve_reference(mm["vision_ids"], r["language_ids"],
                                                                      oov_id=len(bank) + 1))
            assert mm["mi"] == mm["mi_curve"][0] and mm["auc"] == pytest.approx(np.mean(mm["mi_curve"]))
            assert len(mm["mi_curve"]) == len(mm["vision_ids"]) + 1
            assert mm["vision_concepts"] == [bank[i] for i in mm["vision_ids"]]
            assert mm["scores"] == pytest.approx((2.5 * img[b] @ desc[mm["vision_ids"]].T).tolist(), abs=1e-5)
            assert sorted(mm["vision_ids"]) == sorted({i for p in mm["parts"] for i in p["descriptor_ids"]})
            sets = mm["concept_sets"]
            assert sets["language"] == r["language_concepts"][:15]
            assert sets["mutual"] == [t for t in sets["vision"] if t in sets["language"]]
            for p in mm["parts"]:
                assert len(p["descriptor_ids"]) <= 3 and len(set(p["descriptor_ids"])) == len(p["descriptor_ids"])
    json.dumps(exp.records)   # JSON-able


def test_explain_matches_the_reference_flow(tiny_clip, bank, explained):
    model, preprocess, tokenizer = tiny_clip
    exp, cache = explained
    desc = F.normalize(bank.encode(model, tokenizer, cache_dir=cache, progress=False), dim=-1)
    cls = mutual.class_embeddings(model, tokenizer, CLASSES, cache_dir=cache)
    for m in ("pca", "kmeans"):
        ref = explain_reference(model, preprocess, tokenizer, _images(), bank.texts, desc, cls, method=m, seed=0)
        for r, q in zip(exp.records, ref):
            mm = r["methods"][m]
            assert r["predicted"] == q["predicted"] and r["foreground_patches"] == q["foreground_patches"]
            assert [p["part"] for p in mm["parts"]] == q["part_ids"]
            assert [p["descriptor_ids"] for p in mm["parts"]] == q["part_descriptors"]
            assert mm["vision_ids"] == q["vision_ids"]
            np.testing.assert_allclose(mm["scores"], q["scores"], atol=1e-5)
            np.testing.assert_allclose(mm["mi_curve"], q["mi_curve"], rtol=1e-12)
        curve, auc = dataset_auc_reference(ref)
        ours = mutual.dataset_curve([r["methods"][m]["mi_curve"] for r in exp.records])
        np.testing.assert_allclose(ours, curve, rtol=1e-6)
        assert mutual.curve_auc(ours) == pytest.approx(auc, rel=1e-6)


def test_explain_is_deterministic_and_validates(tiny_clip, bank, explained):
    model, preprocess, tokenizer = tiny_clip
    exp, cache = explained
    again = mutual.explain(model, preprocess, tokenizer, _images(), CLASSES, bank, labels=[0, 1, 2, 0],
                           parts="both", seed=0, cache_dir=cache)
    assert again.records == exp.records
    one = _images()[:1]
    with pytest.raises(ValueError, match="labels="):
        mutual.explain(model, preprocess, tokenizer, one, CLASSES, bank, language_from="label", cache_dir=cache)
    with pytest.raises(ValueError, match="outside"):
        mutual.explain(model, preprocess, tokenizer, one, CLASSES, bank, labels=[7], cache_dir=cache)
    with pytest.raises(ValueError, match="parts="):
        mutual.explain(model, preprocess, tokenizer, one, CLASSES, bank, parts="nmf", cache_dir=cache)
    with pytest.raises(ValueError, match="unique"):
        mutual.class_embeddings(model, tokenizer, ["a", "a"])


def test_one_vision_pass_serves_many_banks(tiny_clip, bank, explained, tmp_path):
    """explain(visual=...) over a vision side saved and read back (a checked file without the
    images) gives the records of the full call; other images or settings are refused."""
    from fastinterp.io import load_checked, save_checked
    from fastinterp.vision import VisualConcepts, extract_visual_concepts

    model, preprocess, tokenizer = tiny_clip
    exp, cache = explained
    vc = extract_visual_concepts(model, preprocess, _images(), methods=("pca", "kmeans"), seed=0)
    save_checked({"visual": vc.state()}, tmp_path / "visual.pt")
    back = VisualConcepts.from_state(load_checked(tmp_path / "visual.pt")["visual"])
    assert back.images is None
    for m in ("pca", "kmeans"):
        np.testing.assert_array_equal(back.parts[m].pixel_parts, vc.parts[m].pixel_parts)
    shared = mutual.explain(model, preprocess, tokenizer, None, CLASSES, bank, labels=[0, 1, 2, 0], parts="both",
                            seed=0, cache_dir=cache, visual=back)
    assert shared.records == exp.records
    other = mutual.load_descriptors(bank.texts[:60])  # a second bank over the same vision pass
    direct = mutual.explain(model, preprocess, tokenizer, _images(), CLASSES, other, parts="pca", seed=0)
    assert mutual.explain(model, preprocess, tokenizer, None, CLASSES, other, parts="pca", seed=0,
                          visual=back).records == direct.records
    with pytest.raises(ValueError, match="n_parts=5 there, n_parts=3 here"):
        mutual.explain(model, preprocess, tokenizer, None, CLASSES, bank, parts="pca", n_parts=3, visual=back)
    with pytest.raises(ValueError, match="holds 4 images but 1 were given"):
        mutual.explain(model, preprocess, tokenizer, _images()[:1], CLASSES, bank, visual=back)
    pca_only = extract_visual_concepts(model, preprocess, _images(), methods=("pca",), seed=0)
    with pytest.raises(ValueError, match="no \\['kmeans'\\] parts"):
        mutual.explain(model, preprocess, tokenizer, None, CLASSES, bank, parts="both", visual=pca_only)


def test_explain_with_ground_truth_and_empty_foreground(tiny_clip, bank, tmp_path):
    model, preprocess, tokenizer = tiny_clip
    ims = [im for im in demo_images().values()]
    exp = mutual.explain(model, preprocess, tokenizer, ims, CLASSES + ["rocket"], bank, labels=[3, 3, 1, 0],
                         language_from="label", parts="pca", cache_dir=tmp_path)
    desc = F.normalize(bank.encode(model, tokenizer, cache_dir=tmp_path, progress=False), dim=-1)
    cls = mutual.class_embeddings(model, tokenizer, CLASSES + ["rocket"], cache_dir=tmp_path)
    empty = 0
    for r, lab in zip(exp.records, [3, 3, 1, 0]):
        assert r["language_ids"] == mutual.language_descriptors(cls, desc, [lab], 50)[0].tolist()
        if r["foreground_patches"] == 0:       # a defined result, not a crash
            empty += 1
            mm = r["methods"]["pca"]
            assert mm["parts"] == [] and mm["vision_ids"] == [] and mm["mi_curve"] == [0.0] and mm["auc"] == 0.0
            assert "empty foreground" in r["note"]
    assert empty >= 1   # with these random weights two of the photos have no foreground


# ---------------------------------------------------------------- dataset runner and CLI

def _image_folder(root: Path) -> Path:
    ims = _images(5, seed=1)
    (root / "disc").mkdir(parents=True)
    (root / "square").mkdir()
    (root / "zebra").mkdir()                                      # an empty class
    ims[0].save(root / "disc" / "a.png")
    ims[1].convert("L").save(root / "disc" / "b.png")             # grayscale
    ims[2].convert("RGBA").save(root / "disc" / "c.png")          # alpha
    ims[3].save(root / "square" / "d.jpg")
    ims[4].resize((9, 7)).save(root / "square" / "e.png")         # tiny
    (root / "square" / "broken.jpg").write_bytes(b"definitely not a jpeg")
    return root


def test_run_dataset_skips_bad_files_and_resumes(tiny_clip, bank, tmp_path):
    model, preprocess, tokenizer = tiny_clip
    root = _image_folder(tmp_path / "data")
    out = tmp_path / "out"
    kw = dict(output=out, seed=0, progress=False, cache_dir=tmp_path / "cache")
    with pytest.warns(RuntimeWarning):
        s = mutual.run_dataset(root, model, preprocess, tokenizer, bank, **kw)
    assert s["images_listed"] == 6 and s["images_with_results"] == 5 and s["processed_this_run"] == 5
    assert [u["path"] for u in s["unreadable"]] == [str(root / "square" / "broken.jpg")]
    assert s["empty_classes"] == ["zebra"] and s["resumed"] == 0
    files = sorted(p.relative_to(out).as_posix() for p in (out / "images").rglob("*.json"))
    assert files == ["images/disc/a.png.json", "images/disc/b.png.json", "images/disc/c.png.json",
                     "images/square/broken.jpg.json", "images/square/d.jpg.json", "images/square/e.png.json"]
    assert "unreadable" in json.loads((out / files.pop(3)).read_text())
    recs = [json.loads((out / f).read_text()) for f in files]
    for m in ("pca", "kmeans"):
        curves = [r["methods"][m]["mi_curve"] for r in recs]
        np.testing.assert_allclose(s["methods"][m]["dataset_curve"], mutual.dataset_curve(curves))
        assert s["methods"][m]["auc"] == pytest.approx(mutual.curve_auc(mutual.dataset_curve(curves)))
        assert s["methods"][m]["mi"] == pytest.approx(np.mean([r["methods"][m]["mi"] for r in recs]))
    assert [r["label"] for r in recs] == [0, 0, 0, 1, 1]
    figs = {p.name for p in (out / "figures").iterdir()}
    assert "dataset_mi_curves.png" in figs and "disc__a__pca_parts.png" in figs
    assert "square__d__kmeans_parts.png" in figs and "disc__a__concept_sets.png" in figs
    assert json.loads((out / "summary.json").read_text())["methods"] == s["methods"]

    # resume: nothing recomputed, same numbers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s2 = mutual.run_dataset(root, model, preprocess, tokenizer, bank, **kw)
    assert s2["processed_this_run"] == 0 and s2["resumed"] == 5 and s2["methods"] == s["methods"]
    assert s2["unreadable"] == s["unreadable"] and s2["images_with_results"] == 5
    # a lost file: only its class is recomputed, results identical to the first run
    (out / "images" / "disc" / "b.png.json").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s3 = mutual.run_dataset(root, model, preprocess, tokenizer, bank, **kw)
    assert s3["processed_this_run"] == 3 and s3["resumed"] == 2 and s3["methods"] == s["methods"]
    assert json.loads((out / "images" / "disc" / "b.png.json").read_text()) == recs[1]


def test_run_dataset_bad_layout_and_class_names(tiny_clip, bank, tmp_path):
    model, preprocess, tokenizer = tiny_clip
    flat = tmp_path / "flat"
    flat.mkdir()
    _images(1)[0].save(flat / "x.png")
    with pytest.raises(ValueError, match="ImageFolder"):
        mutual.run_dataset(flat, model, preprocess, tokenizer, bank, output=tmp_path / "o", progress=False)
    # a text file must name the same set as the folders (any order): never matched by position
    (tmp_path / "names.txt").write_text("Golden Retriever\ncat\n")
    assert mutual.read_class_names(tmp_path / "names.txt", ["cat", "golden_retriever"]) == ["cat", "Golden Retriever"]
    with pytest.raises(ValueError, match=r"folders without a name \['dog'\].*names without a folder \['cat'\]"):
        mutual.read_class_names(tmp_path / "names.txt", ["dog", "golden_retriever"])
    (tmp_path / "names.json").write_text(json.dumps({"a": "apple", "b": "bee"}))
    assert mutual.read_class_names(tmp_path / "names.json", ["b", "a"]) == ["bee", "apple"]
    with pytest.raises(ValueError, match=r"no name for folders \['c'\]"):
        mutual.read_class_names(tmp_path / "names.json", ["a", "b", "c"])
    assert mutual.read_class_names(None, ["golden_retriever"]) == ["golden retriever"]


def test_cli_mutual_explain(tmp_path, capsys):
    from fastinterp.cli import main

    root = _image_folder(tmp_path / "data")
    (tmp_path / "desc.txt").write_text("\n".join(mutual.demo_descriptors().texts[:120]))
    (tmp_path / "classes.json").write_text(json.dumps({"disc": "red disc", "square": "square", "zebra": "zebra"}))
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(["mutual", "explain", str(root), "--descriptors", str(tmp_path / "desc.txt"),
                   "--classes", str(tmp_path / "classes.json"), "--output", str(out), "--parts", "kmeans",
                   "--seed", "1", "--language-from", "label", "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "1 unreadable" in printed and "kmeans" in printed and "zebra" in printed
    s = json.loads((out / "summary.json").read_text())
    assert list(s["methods"]) == ["kmeans"] and s["descriptors"] == 120 and s["language_from"] == "label"
    rec = json.loads((out / "images" / "square" / "d.jpg.json").read_text())
    assert rec["label_class"] == "square" and set(rec["methods"]) == {"kmeans"}
    assert main(["mutual", "explain", str(tmp_path / "missing"), "--quiet"]) == 2


def test_demo_section(tiny_clip, tmp_path):
    from fastinterp.cli import mutual as mutual_cli
    from fastinterp.cli.demo import DemoContext, SECTIONS

    assert "fastinterp.cli.mutual:demo_section" in SECTIONS
    model, preprocess, tokenizer = tiny_clip
    words = ConceptDictionary.builtin("demo")
    ctx = DemoContext(model, preprocess, tokenizer, fastinterp.vit_info(model), words,
                      words.encode(model, tokenizer, progress=False), demo_images(), tmp_path, 0)
    md = mutual_cli.demo_section(ctx)
    assert md.startswith("## Mutual knowledge") and "| astronaut |" in md
    res = ctx.results["mutual"]
    for m in ("pca", "kmeans"):
        curves = [res["per_image"][n][m] for n in res["images"]]
        assert res["dataset"][m]["auc"] == pytest.approx(np.mean(res["dataset"][m]["curve"]))
        assert all(c["mi"] >= 0 for c in curves)
    for f in ("mutual_parts.png", "mutual_mi_curves.png", "mutual_concept_sets.png"):
        assert (tmp_path / f).stat().st_size > 1000
