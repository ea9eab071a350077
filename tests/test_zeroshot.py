"""Zero-shot accuracy, retrieval metrics and MaxSkew against hand-computed small cases."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from fastinterp.ablation import head_set_masks, masked_forward
from fastinterp.zeroshot import (
    DEFAULT_TEMPLATES,
    class_names_from_folders,
    evaluate_image_folder,
    max_skew,
    pool_frames,
    read_templates,
    retrieval_metrics,
    retrieval_ranks,
    text_classifier,
    top1_accuracy,
)


def test_top1_accuracy_hand_case():
    classifier = torch.eye(3)
    emb = torch.tensor([[2.0, 0.1, 0.0], [0.0, 0.0, 5.0], [0.0, 1.0, 0.9], [1.0, 1.0, 0.0]])
    # predictions: 0, 2, 1, 0 (tie 0/1 -> lowest index)
    assert top1_accuracy(emb, classifier, [0, 2, 2, 1]).item() == pytest.approx(50.0)
    both = torch.stack([emb, emb[:, [1, 0, 2]]])  # second configuration predicts 1, 2, 1, 0
    torch.testing.assert_close(top1_accuracy(both, classifier, [0, 2, 2, 1]), torch.tensor([50.0, 25.0]))
    with pytest.raises(ValueError, match="labels must lie"):
        top1_accuracy(emb, classifier, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="4 images but 2 labels"):
        top1_accuracy(emb, classifier, [0, 1])


def test_text_classifier_is_the_normalised_template_mean(tiny_clip):
    model, _, tokenizer = tiny_clip
    templates = ["a photo of a {}.", "art of the {}."]
    cls = text_classifier(model, tokenizer, ["cat", "dog"], templates)
    assert cls.shape == (2, 32)
    with torch.no_grad():
        for i, name in enumerate(["cat", "dog"]):
            e = model.encode_text(tokenizer([t.format(name) for t in templates]))
            e = e / e.norm(dim=-1, keepdim=True)
            m = e.mean(0)
            torch.testing.assert_close(cls[i], m / m.norm(), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="'{}' slot"):
        text_classifier(model, tokenizer, ["cat"], ["no slot"])
    with pytest.raises(ValueError, match="no prompt templates"):
        text_classifier(model, tokenizer, ["cat"], [])


def test_retrieval_hand_case():
    # 4 pairs; scores = text @ video.T
    text = torch.eye(4)
    video = torch.tensor([[0.9, 0.0, 0.0, 0.0],   # video 0
                          [0.5, 0.2, 0.0, 0.0],   # video 1
                          [0.0, 0.3, 0.1, 0.0],   # video 2
                          [0.0, 0.0, 0.2, 0.7]])  # video 3
    # t2v: text i scores video j by video[j, i]
    # text 0: [0.9, 0.5, 0, 0] -> own rank 0; text 1: [0, .2, .3, 0] -> rank 1;
    # text 2: [0, 0, .1, .2] -> rank 1; text 3: [0, 0, 0, .7] -> rank 0
    assert retrieval_ranks(text, video).tolist() == [0, 1, 1, 0]
    m = retrieval_metrics(text, video)
    assert m["R1"].item() == pytest.approx(50.0)
    assert m["R5"].item() == pytest.approx(100.0)
    assert m["MedR"].item() == pytest.approx(1.5)
    assert m["MeanR"].item() == pytest.approx(1.5)
    # v2t: video i scores text j by video[i, j]; video 1: [.5, .2, 0, 0] -> rank 1
    assert retrieval_ranks(text, video, direction="v2t").tolist() == [0, 1, 1, 0]
    # ties broken by index like a stable sort: all-equal scores give rank = own index
    flat = torch.ones(3, 2)
    assert retrieval_ranks(flat, flat).tolist() == [0, 1, 2]
    # batched over configurations
    mb = retrieval_metrics(torch.stack([text, text]), torch.stack([video, text]))
    torch.testing.assert_close(mb["R1"], torch.tensor([50.0, 100.0], dtype=torch.float64))


def test_retrieval_matches_argsort_of_the_reference_loop():
    g = torch.Generator().manual_seed(0)
    text = torch.randn(60, 8, generator=g)
    video = torch.randn(60, 8, generator=g)
    ranks = []
    for i in range(60):
        scores = [-(text[i] @ video[j]).item() for j in range(60)]
        ranks.append(int(np.argwhere(np.argsort(scores, kind="stable") == i)[0][0]))
    ranks = np.array(ranks)
    m = retrieval_metrics(text, video)
    assert retrieval_ranks(text, video).tolist() == ranks.tolist()
    assert m["R50"].item() == pytest.approx(100 * np.mean(ranks < 50))
    assert m["MedR"].item() == pytest.approx(np.median(ranks) + 1)
    assert m["MeanR"].item() == pytest.approx(np.mean(ranks) + 1)


def test_pool_frames_normalises_then_averages():
    frames = torch.tensor([[[3.0, 4.0], [0.0, 2.0]]])  # one video, two frames
    torch.testing.assert_close(pool_frames(frames), torch.tensor([[0.3, 0.9]]))


def test_max_skew_hand_case():
    # 6 images: groups 0,0,0,0,1,1 (sizes 4, 2); query ranks images 4, 0, 5, 1, ...
    groups = [0, 0, 0, 0, 1, 1]
    sims = torch.tensor([[0.5, 0.3, 0.1, 0.0, 0.9, 0.4]])
    out = max_skew(sims, groups, k=3)
    # top-3: images 4 (g1), 0 (g0), 5 (g1): g1 2/3 vs 2/6 -> log 2; g0 1/3 vs 4/6 -> log 0.5
    assert out["per_query"].item() == pytest.approx(math.log(2.0))
    assert out["min_per_query"].item() == pytest.approx(math.log(0.5))
    # a second query whose top-2 is only group 0: skew log((2/2)/(4/6)) = log 1.5 (absent groups ignored)
    sims2 = torch.tensor([[0.5, 0.3, 0.1, 0.0, 0.9, 0.4], [1.0, 0.9, 0.0, 0.0, 0.0, 0.0]])
    out2 = max_skew(sims2, groups, k=2)
    # query 0 top-2: images 4 (g1), 0 (g0): g1 (1/2)/(2/6) = 1.5, g0 (1/2)/(4/6) = .75
    torch.testing.assert_close(out2["per_query"], torch.tensor([math.log(1.5), math.log(1.5)], dtype=torch.float64))
    assert out2["mean"].item() == pytest.approx(math.log(1.5))
    # ties keep image order (stable): all equal -> top-2 = images 0, 1 (group 0)
    tie = max_skew(torch.zeros(1, 6), groups, k=2)
    assert tie["per_query"].item() == pytest.approx(math.log(1.5))
    with pytest.raises(ValueError, match="k=7"):
        max_skew(sims, groups, k=7)
    with pytest.raises(ValueError, match="one group per image"):
        max_skew(sims, [0, 1], k=1)


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("red_car", "blue-sky", "tree"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "tree" / "broken.png").write_bytes(b"not an image")
    return tmp_path


def test_evaluate_image_folder_matches_direct_computation(tiny_clip, folder):
    model, preprocess, tokenizer = tiny_clip
    masks = head_set_masks(model, [[], [(3, 0), (2, 1)], [(0, 0)]])
    with pytest.warns(RuntimeWarning, match="unreadable"):
        res = evaluate_image_folder(model, preprocess, tokenizer, folder, masks, batch_size=4, progress=False)
    assert res["n_images"] == 6 and len(res["skipped"]) == 1
    assert res["classes"] == ["blue-sky", "red_car", "tree"]
    names = class_names_from_folders(res["classes"])
    assert names == ["blue sky", "red car", "tree"]
    classifier = text_classifier(model, tokenizer, names, DEFAULT_TEMPLATES)
    paths = sorted(p for p in folder.rglob("*.png") if p.name != "broken.png")
    labels = torch.tensor([res["classes"].index(p.parent.name) for p in paths])
    batch = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths])
    emb = masked_forward(model, batch, masks)
    torch.testing.assert_close(res["accuracy"].float(), top1_accuracy(emb, classifier, labels))


def test_evaluate_image_folder_bad_input(tiny_clip, tmp_path):
    model, preprocess, tokenizer = tiny_clip
    with pytest.raises(ValueError, match="no images"):
        evaluate_image_folder(model, preprocess, tokenizer, tmp_path, torch.ones(1, 4, 4), progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate_image_folder(model, preprocess, tokenizer, tmp_path / "missing", torch.ones(1, 4, 4), progress=False)
    (tmp_path / "only").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "only" / "a.png")
    with pytest.raises(ValueError, match="at least two class"):
        evaluate_image_folder(model, preprocess, tokenizer, tmp_path, torch.ones(1, 4, 4), progress=False)


def test_read_templates(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("# comment\na photo of a {}.\n\nart of {}\n")
    assert read_templates(p) == ["a photo of a {}.", "art of {}"]
    p.write_text("no slot here\n")
    with pytest.raises(ValueError, match="slot"):
        read_templates(p)
