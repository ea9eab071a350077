"""Head sets from a CCS table, pruning runs (resumable outputs) and `ccs prune` end to end."""
import argparse
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fastinterp.ablation import head_set_masks
from fastinterp.cli.ccs import add_prune_cli
from fastinterp.pruning import build_head_sets, read_ccs_table, run_pruning
from fastinterp.zeroshot import evaluate_image_folder

TABLE = [  # (layer, head, ccs, label)
    (2, 0, 5, "location"), (2, 1, 0, "color"), (2, 2, 3, "texture"), (2, 3, 1, "location"),
    (3, 0, 5, "counting"), (3, 1, 5, "geo-location"), (3, 2, 1, "color"), (3, 3, 2, "animals"),
]


def _write_csv(path):
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["layer", "head", "ccs", "label"])
        w.writerows(TABLE)
    return path


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "images"
    for cls in ("cat", "dog", "golden_fish"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(root / cls / f"{i}.jpg")
    return root


def test_read_ccs_table_csv_and_json(tmp_path):
    rows = read_ccs_table(_write_csv(tmp_path / "ccs.csv"))
    assert [(r["layer"], r["head"], r["ccs"], r["label"]) for r in rows] == [tuple(t) for t in TABLE]
    payload = {"heads": [{"Layer": l, "head": h, "CCS": c, "concept": lab} for l, h, c, lab in TABLE]}
    (tmp_path / "ccs.json").write_text(json.dumps(payload))
    assert read_ccs_table(tmp_path / "ccs.json") == rows
    (tmp_path / "bad.csv").write_text("layer,head\n1,2\n")
    with pytest.raises(ValueError, match="no ccs column"):
        read_ccs_table(tmp_path / "bad.csv")
    (tmp_path / "nan.csv").write_text("layer,head,ccs\n1,2,five\n")
    with pytest.raises(ValueError, match="non-numeric"):
        read_ccs_table(tmp_path / "nan.csv")
    with pytest.raises(FileNotFoundError, match="--heads"):
        read_ccs_table(tmp_path / "missing.csv")


def test_head_sets_by_hand(tmp_path):
    rows = read_ccs_table(_write_csv(tmp_path / "ccs.csv"))
    sets = {s["name"]: s for s in build_head_sets(rows, seeds=(0, 1), concepts=["location"],
                                                   explicit={"mine": ["L3.H3"]})}
    high = [(2, 0), (3, 0), (3, 1)]
    low = [(2, 1), (2, 3), (3, 2)]
    assert sets["original"]["heads"] == []
    assert sets["high"]["heads"] == high
    assert sets["low"]["heads"] == low
    for s in (0, 1):
        rnd = sets[f"random-s{s}"]["heads"]
        assert len(rnd) == 3 and not set(rnd) & set(high) and len(set(rnd)) == 3
        assert set(sets[f"high-eq-s{s}"]["heads"]) <= set(high) and len(sets[f"high-eq-s{s}"]["heads"]) == 3
        assert set(sets[f"low-eq-s{s}"]["heads"]) <= set(low)
    assert sets["random-s0"]["heads"] != sets["random-s1"]["heads"]  # different seeds, different draws here
    # seeded: the same seed gives the same draw
    again = {s["name"]: s for s in build_head_sets(rows, seeds=(0,))}
    assert again["random-s0"]["heads"] == sets["random-s0"]["heads"]
    assert sets["concept:location"]["heads"] == [(2, 0), (2, 3), (3, 1)]  # "geo-location" contains it
    assert sets["mine"]["heads"] == [(3, 3)]
    with pytest.raises(ValueError, match="labelled with 'music'"):
        build_head_sets(rows, concepts=["music"])
    with pytest.raises(ValueError, match="no head sets"):
        build_head_sets(None)


def test_run_pruning_equals_direct_evaluation_and_resumes(tiny_clip, folder, tmp_path):
    model, preprocess, tokenizer = tiny_clip
    sets = build_head_sets(None, explicit={"a": [(3, 1)], "b": [(0, 0), (2, 2)]})
    out = tmp_path / "out"
    rows = run_pruning(model, preprocess, tokenizer, folder, sets, output=out, progress=False)
    assert [r["name"] for r in rows] == ["original", "a", "b"]
    direct = evaluate_image_folder(model, preprocess, tokenizer, folder,
                                   head_set_masks(model, [[], [(3, 1)], [(0, 0), (2, 2)]]), progress=False)
    assert [r["accuracy"] for r in rows] == pytest.approx(direct["accuracy"].tolist())
    assert rows[2]["drop"] == pytest.approx(rows[0]["accuracy"] - rows[2]["accuracy"])
    for name in ("results.json", "results.csv", "results.md", "accuracy.png"):
        assert (out / name).stat().st_size > 0
    with (out / "results.csv").open() as fh:
        csv_rows = list(csv.DictReader(fh))
    assert csv_rows[2]["heads"] == "L0.H0 L2.H2" and float(csv_rows[1]["accuracy"]) == pytest.approx(rows[1]["accuracy"])
    # resume: stored rows are reused, not recomputed (mark one and check the mark survives)
    payload = json.loads((out / "results.json").read_text())
    payload["rows"][1]["accuracy"] = -1.0
    (out / "results.json").write_text(json.dumps(payload))
    more = build_head_sets(None, explicit={"a": [(3, 1)], "b": [(0, 0), (2, 2)], "c": [(1, 3)]})
    rows2 = run_pruning(model, preprocess, tokenizer, folder, more, output=out, progress=False)
    assert rows2[1]["accuracy"] == -1.0 and len(rows2) == 4
    # a different run (mode) does not reuse it
    rows3 = run_pruning(model, preprocess, tokenizer, folder, more, output=out, mode="mean", progress=False)
    assert rows3[1]["accuracy"] >= 0


def test_run_pruning_bad_heads(tiny_clip, folder):
    model, preprocess, tokenizer = tiny_clip
    with pytest.raises(IndexError, match="layer 11 is out of range"):
        run_pruning(model, preprocess, tokenizer, folder, build_head_sets(None, explicit={"x": ["L11.H0"]}),
                    progress=False)


def _parser():
    parser = argparse.ArgumentParser(prog="fastinterp")
    sub = parser.add_subparsers(dest="command", required=True)
    ccs = sub.add_parser("ccs")
    add_prune_cli(ccs.add_subparsers(dest="ccs_command", required=True))
    return parser


def test_cli_end_to_end(folder, tmp_path, capsys):
    table = _write_csv(tmp_path / "ccs.csv")
    out = tmp_path / "prune"
    args = _parser().parse_args(["ccs", "prune", "--ccs", str(table), "--images", str(folder), "--output", str(out),
                                 "--seeds", "2", "--concept", "location", "--heads", "mine=L3.H3,L0.H1", "--quiet"])
    torch.manual_seed(0)
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "| high | 3 |" in printed and "random (mean of 2 seeds)" in printed
    payload = json.loads((out / "results.json").read_text())
    names = [r["name"] for r in payload["rows"]]
    assert names == ["original", "high", "low", "random-s0", "random-s1", "high-eq-s0", "low-eq-s0",
                     "high-eq-s1", "low-eq-s1", "concept:location", "mine"]
    assert all(0 <= r["accuracy"] <= 100 for r in payload["rows"])
    assert payload["rows"][0]["n_images"] == 9
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_through_fastinterp_main_when_wired(folder, tmp_path):
    """Once fastinterp.ccs wires `prune` into the `ccs` group, the real CLI runs it too."""
    from fastinterp import cli

    parser = cli.build_parser()
    choices = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    if "ccs" not in choices:
        pytest.skip("the `ccs` command group is not registered yet")
    out = tmp_path / "prune"
    rc = cli.main(["ccs", "prune", "--heads", "x=L3.H0", "--images", str(folder), "--output", str(out), "--quiet"])
    assert rc == 0 and (out / "results.md").exists()


def test_cli_errors(folder, tmp_path):
    args = _parser().parse_args(["ccs", "prune", "--images", str(folder), "--output", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="no head sets"):
        args.func(args)
    empty = tmp_path / "empty"
    empty.mkdir()
    args = _parser().parse_args(["ccs", "prune", "--heads", "x=L1.H1", "--images", str(empty),
                                 "--output", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="no images"):
        args.func(args)
    args = _parser().parse_args(["ccs", "prune", "--heads", "x=L1.Hx", "--images", str(folder),
                                 "--output", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="cannot read head"):
        args.func(args)


def test_read_ccs_table_head_keys_in_one_column(tmp_path):
    (tmp_path / "k.json").write_text(json.dumps([{"head": "L3.H1", "ccs": 5, "label": "x"},
                                                 {"head": "L2.H0", "ccs": 0}]))
    rows = read_ccs_table(tmp_path / "k.json")
    assert [(r["layer"], r["head"], r["ccs"], r["label"]) for r in rows] == [(3, 1, 5.0, "x"), (2, 0, 0.0, "")]


def _demo_ctx(tiny_clip, tmp_path, results):
    from fastinterp.concepts import ConceptDictionary
    from fastinterp.cli.demo import DemoContext
    from fastinterp.images import demo_images
    from fastinterp.models import vit_info

    model, preprocess, tokenizer = tiny_clip
    images = dict(list(demo_images().items())[:3])
    return DemoContext(model, preprocess, tokenizer, vit_info(model), ConceptDictionary.builtin("demo"),
                       torch.zeros(1, 32), images, tmp_path, 0, results)


def test_demo_section(tiny_clip, tmp_path):
    from fastinterp.cli.ccs import prune_demo_section as demo_section

    ctx = _demo_ctx(tiny_clip, tmp_path, {})
    text = demo_section(ctx)
    res = ctx.results["pruning"]
    assert text.startswith("## Head pruning") and "single-head ablation effects" in text
    assert res["single_head_ablations"] == 16 and res["max_abs_diff_vs_reference"] < 1e-5
    assert set(res["accuracy"]) == {"original", "top-3 effect", "bottom-3 effect", "random-s0", "random-s1",
                                    "random-s2"}
    assert (tmp_path / "pruning" / "accuracy.png").exists()
    # with the CCS section's table the head sets come from it
    ccs = {"heads": [{"head": f"L{l}.H{h}", "label": "x", "ccs": (l + h) % 6} for l in range(2, 4) for h in range(4)]}
    ctx2 = _demo_ctx(tiny_clip, tmp_path / "b", {"ccs": ccs})
    text2 = demo_section(ctx2)
    assert "CCS section's table" in text2
    acc = ctx2.results["pruning"]["accuracy"]
    assert {"original", "high", "low", "random-s0"} <= set(acc)


def test_retrieval_and_skew_under_masks_match_pruned_models(tiny_clip):
    import torch.nn.functional as F

    from fastinterp.pruning import max_skew_under_masks, retrieval_under_masks
    from fastinterp.reference import ablation as ref
    from fastinterp.zeroshot import max_skew, retrieval_metrics

    model, _, tokenizer = tiny_clip
    g = torch.Generator().manual_seed(3)
    frames = torch.randn(5, 2, 3, 64, 64, generator=g)  # 5 videos of 2 frames
    captions = ["a dog", "a red car", "two people", "a city at night", "a bowl of soup"]
    sets = [[], [(3, 1), (2, 0)]]
    masks = head_set_masks(model, sets)
    got = retrieval_under_masks(model, tokenizer, frames, captions, masks, batch_size=4)
    with torch.no_grad():
        text = F.normalize(model.encode_text(tokenizer(captions)), dim=-1)
    for c, heads in enumerate(sets):
        emb = ref.pruned_encode(model, frames.reshape(10, 3, 64, 64), heads)
        video = F.normalize(emb, dim=-1).reshape(5, 2, -1).mean(1)
        expect = retrieval_metrics(text, video)
        for key in ("R1", "R5", "MedR", "MeanR"):
            assert got[key][c].item() == pytest.approx(expect[key].item())

    images = torch.randn(8, 3, 64, 64, generator=g)
    groups = [0, 0, 0, 1, 1, 1, 2, 2]
    queries = ["doctor", "nurse", "pilot"]
    skew = max_skew_under_masks(model, tokenizer, images, groups, queries, masks, k=4, batch_size=3)
    assert skew["per_query"].shape == (2, 3) and skew["mean"].shape == (2,)
    with torch.no_grad():
        q = F.normalize(model.encode_text(tokenizer([f"a photo of a {w}." for w in queries])), dim=-1)
    for c, heads in enumerate(sets):
        img = F.normalize(ref.pruned_encode(model, images, heads), dim=-1)
        expect = max_skew(q @ img.T, groups, 4)
        torch.testing.assert_close(skew["per_query"][c], expect["per_query"], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="one caption per video"):
        retrieval_under_masks(model, tokenizer, frames, captions[:2], masks)
