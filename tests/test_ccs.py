"""CCS: aggregation, resumability on LLM failure, the CLI end to end on the tiny model, demo."""
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fastinterp.ccs import (CCSError, HeadScore, bucket, describe_heads, label_heads, read_descriptions, read_labels,
                            run_ccs, score_heads, summarize, write_results)
from fastinterp.cli import main
from fastinterp.llm import LLMError, LLMLabeller
from fastinterp.pruning import read_ccs_table


def _records(n_heads=4, n=5):
    return [{"layer": 10 + i // 2, "head": i % 2, "descriptions": [f"text {i}-{j}" for j in range(n)]}
            for i in range(n_heads)]


class _Rule:
    """Labels a head 'lab<layer><head>'; judges 1 where the description's last digit < the
    head's score (so head i gets CCS = its configured value)."""

    def __init__(self, ccs_by_text_prefix, fail_on=None):
        self.ccs, self.fail_on, self.calls = ccs_by_text_prefix, fail_on, 0

    def label(self, descriptions):
        self.calls += 1
        prefix = descriptions[0].rsplit("-", 1)[0]
        if self.fail_on == ("label", prefix):
            raise LLMError("endpoint timed out")
        return "lab " + prefix

    def judge(self, description, label):
        self.calls += 1
        prefix, j = description.rsplit("-", 1)
        if self.fail_on == ("judge", prefix):
            raise LLMError("HTTP 500")
        return int(int(j) < self.ccs[prefix])


def test_bucket_and_summary():
    assert [bucket(k) for k in range(6)] == ["low", "low", "", "moderate", "", "high"]
    with pytest.raises(ValueError):
        bucket(6)
    scores = [HeadScore(11, h, "x", ["a"] * 5, [1] * k + [0] * (5 - k)) for h, k in enumerate([5, 5, 3, 0, 1, 4, 2, 5])]
    s = summarize(scores)
    assert s["ccs_at_k"] == {"0": 1 / 8, "1": 1 / 8, "2": 1 / 8, "3": 1 / 8, "4": 1 / 8, "5": 3 / 8}
    assert sum(s["ccs_at_k"].values()) == pytest.approx(1.0)
    assert s["buckets"] == {"high": ["L11.H0", "L11.H1", "L11.H7"], "moderate": ["L11.H2"], "low": ["L11.H3", "L11.H4"]}
    assert s["mean_ccs"] == pytest.approx(25 / 8)


def test_pipeline_scores_and_files(tmp_path):
    recs = _records()
    rule = _Rule({"text 0": 5, "text 1": 3, "text 2": 0, "text 3": 1})
    scores, summary = run_ccs(recs, rule, output=tmp_path, progress=False)
    assert [s.ccs for s in scores] == [5, 3, 0, 1]
    assert [s.bucket for s in scores] == ["high", "moderate", "low", "low"]
    assert scores[1].judgements == [1, 1, 1, 0, 0]
    assert summary["ccs_at_k"]["5"] == 0.25
    rows = list(csv.DictReader((tmp_path / "ccs.csv").open(encoding="utf-8")))
    assert [(r["layer"], r["head"], r["ccs"], r["label"]) for r in rows] == [
        ("10", "0", "5", "lab text 0"), ("10", "1", "3", "lab text 1"), ("11", "0", "0", "lab text 2"),
        ("11", "1", "1", "lab text 3")]
    assert rows[0]["descriptions"].split(" | ") == recs[0]["descriptions"]
    data = json.loads((tmp_path / "ccs.json").read_text())
    assert data["summary"]["bucket_counts"] == {"high": 1, "moderate": 1, "low": 2}
    # the pruning engineer's reader understands both files
    assert [r["ccs"] for r in read_ccs_table(tmp_path / "ccs.csv")] == [5, 3, 0, 1]
    assert [r["label"] for r in read_ccs_table(tmp_path / "ccs.json")][0] == "lab text 0"


def test_llm_failure_keeps_finished_heads_and_resumes(tmp_path):
    recs = _records()
    ccs = {"text 0": 5, "text 1": 3, "text 2": 0, "text 3": 1}
    with pytest.raises(CCSError, match=r"labelling layer 11 head 0 failed: LLMError: endpoint timed out.*2 finished"):
        label_heads(recs, _Rule(ccs, fail_on=("label", "text 2")), output=tmp_path, progress=False)
    assert read_labels(tmp_path) == {"L10.H0": "lab text 0", "L10.H1": "lab text 1"}
    rule = _Rule(ccs)
    labels = label_heads(recs, rule, output=tmp_path, progress=False)
    assert rule.calls == 2 and len(labels) == 4  # only the two unfinished heads were asked
    changed = [dict(r) for r in recs]
    changed[0]["descriptions"] = changed[0]["descriptions"][::-1]  # a new TextSpan run: relabel that head
    rule = _Rule(ccs)
    label_heads(changed, rule, output=tmp_path, progress=False)
    assert rule.calls == 1
    label_heads(recs, _Rule(ccs), output=tmp_path, progress=False)
    with pytest.raises(CCSError, match="judging layer 11 head 1 failed"):
        score_heads(recs, labels, _Rule(ccs, fail_on=("judge", "text 3")), output=tmp_path, progress=False)
    rule = _Rule(ccs)
    scores = score_heads(recs, labels, rule, output=tmp_path, progress=False)
    assert rule.calls == 5 and [s.ccs for s in scores] == [5, 3, 0, 1]
    # a changed label is re-judged
    labels["L10.H0"] = "other"
    rule = _Rule(ccs)
    score_heads(recs, labels, rule, output=tmp_path, progress=False)
    assert rule.calls == 5


def test_junk_llm_replies_name_the_head(tmp_path):
    class Junk:
        def complete(self, messages):
            return "I cannot say what these lines have in common."

    with pytest.raises(CCSError, match="labelling layer 10 head 0 failed.*unusable label reply"):
        label_heads(_records(), LLMLabeller(Junk()), output=tmp_path, progress=False)


def test_head_selection_out_of_range():
    with pytest.raises(IndexError, match="L12.H0 has no descriptions"):
        label_heads(_records(), _Rule({}), heads=["L12.H0"], progress=False)
    with pytest.raises(ValueError, match="L<layer>.H<head>"):
        label_heads(_records(), _Rule({}), heads=["twelve"], progress=False)
    with pytest.raises(ValueError, match="no labels"):
        score_heads(_records(), {}, _Rule({}), progress=False)


def test_describe_heads_matches_textspan(tiny_clip, tmp_path):
    model, preprocess, tokenizer = tiny_clip
    g = torch.Generator().manual_seed(3)
    pixels = torch.randn(12, 3, 64, 64, generator=g)
    texts = [f"description number {i}" for i in range(40)]
    recs = describe_heads(model, pixels, texts, tokenizer=tokenizer, layers=[2, 3], n_texts=5, rank=80,
                          output=tmp_path, progress=False)
    assert len(recs) == 8 and all(len(r["descriptions"]) == 5 for r in recs)
    assert read_descriptions(tmp_path) == json.loads((tmp_path / "descriptions.json").read_text())["heads"]
    from fastinterp.reference.textspan import textspan_reference
    from fastinterp.textspan import head_contributions

    c = head_contributions(model, pixels, [2, 3], progress=False)
    from fastinterp.concepts import ConceptDictionary

    T = torch.nn.functional.normalize(ConceptDictionary(texts).encode(model, tokenizer, progress=False), dim=-1)
    ref, _ = textspan_reference(c.heads.double().numpy(), T.double().numpy(), 5, 80)
    assert [r["indices"] for r in recs] == ref.reshape(8, 5).tolist()
    with pytest.raises(ValueError, match="at most"):
        describe_heads(model, pixels[:3], texts, tokenizer=tokenizer, layers=[3], progress=False)


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    (root / "a" / "broken.png").write_bytes(b"not a png")
    return root


def test_cli_end_to_end(image_folder, tmp_path, capsys):
    out = tmp_path / "out"
    texts = tmp_path / "bank.txt"
    texts.write_text("\n".join(f"a photo of thing {i}" for i in range(30)), encoding="utf-8")
    with pytest.warns(RuntimeWarning, match="broken.png"):
        assert main(["ccs", "textspan", "--images", str(image_folder), "--texts", str(texts), "--last-layers", "2",
                     "--batch-size", "3", "--output", str(out), "--quiet"]) == 0
    recs = read_descriptions(out)
    assert [(r["layer"], r["head"]) for r in recs] == [(l, h) for l in (2, 3) for h in range(4)]
    assert "Layer 3, Head 2" in (out / "descriptions.txt").read_text()
    assert main(["ccs", "label", "--labeller", "clip", "--output", str(out), "--quiet"]) == 0
    labels = read_labels(out)
    assert len(labels) == 8 and all(isinstance(v, str) and v for v in labels.values())
    assert main(["ccs", "score", "--labeller", "clip", "--output", str(out), "--threshold", "-1", "--quiet"]) == 0
    rows = list(csv.DictReader((out / "ccs.csv").open(encoding="utf-8")))
    assert len(rows) == 8 and all(r["ccs"] == "5" and r["bucket"] == "high" for r in rows)  # threshold -1: all consistent
    assert "CCS@K" in capsys.readouterr().out


def test_cli_llm_endpoint(tmp_path, capsys, chat_server):
    """label/score through a local OpenAI-compatible server; a dead endpoint gives a clear error."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "descriptions.json").write_text(json.dumps({"heads": _records(2)}), encoding="utf-8")
    server = chat_server(lambda prompt: "location" if prompt.startswith("What is the common")
                         else ("1" if "-0\"" in prompt else "0"))
    url = server.url
    for cmd in ("label", "score"):
        assert main(["ccs", cmd, "--base-url", url, "--llm-model", "m", "--output", str(out), "--quiet"]) == 0
    server.stop()
    rows = list(csv.DictReader((out / "ccs.csv").open(encoding="utf-8")))
    assert [(r["label"], r["ccs"], r["bucket"]) for r in rows] == [("location", "1", "low")] * 2
    (out / "labels.json").unlink()
    rc = main(["ccs", "label", "--base-url", url, "--retries", "0", "--timeout", "1", "--output", str(out), "--quiet"])
    assert rc == 2
    assert "labelling layer 10 head 0 failed" in capsys.readouterr().err


def test_cli_bad_input(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["ccs", "textspan", "--images", str(tmp_path / "empty"), "--output", str(tmp_path / "o")]) == 2
    assert "no images" in capsys.readouterr().err
    assert main(["ccs", "label", "--labeller", "clip", "--output", str(tmp_path / "nothing")]) == 2
    assert "ccs textspan" in capsys.readouterr().err


def test_cli_layer_out_of_range(image_folder, tmp_path, capsys):
    out = str(tmp_path / "o")
    assert main(["ccs", "textspan", "--images", str(image_folder), "--layers", "2,4", "--output", out, "--quiet"]) == 2
    assert "layer 4 is out of range" in capsys.readouterr().err
    assert main(["ccs", "textspan", "--images", str(image_folder), "--last-layers", "5", "--output", out,
                 "--quiet"]) == 2
    assert "--last-layers 5 is out of range" in capsys.readouterr().err


def test_prune_subcommand_is_wired():
    from fastinterp.cli import build_parser

    args = build_parser().parse_args(["ccs", "prune", "--images", "x"])
    assert args.ccs_command == "prune"


def test_demo_section(tiny_clip, tmp_path):
    from fastinterp.cli.ccs import demo_section
    from fastinterp.concepts import ConceptDictionary
    from fastinterp.cli.demo import DemoContext
    from fastinterp.images import demo_images
    from fastinterp.models import vit_info

    model, preprocess, tokenizer = tiny_clip
    d = ConceptDictionary.builtin("demo")
    ctx = DemoContext(model, preprocess, tokenizer, vit_info(model), d, torch.zeros(len(d), 32), demo_images(),
                      tmp_path, 0)
    md = demo_section(ctx)
    assert md.startswith("## CCS")
    res = ctx.results["ccs"]
    assert res["images"] == 16 and len(res["heads"]) == 8
    assert sum(res["ccs_at_k"].values()) == pytest.approx(1.0)
    assert (tmp_path / "ccs" / "ccs.csv").is_file()
