"""Figures a reader can read without the code: their structure (panels, axis labels, legend
entries, tick labels), at the sizes users make (ViT-B-16: 12 heads, ViT-L-14: 16 heads)."""
import numpy as np
import pytest
import torch

from fastinterp import mutual, pruning, sith

WORDS = [f"concept {i}" for i in range(300)]


def _decomposition(H, r=8, K=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(H, r, K, generator=g)
    s[:, :, -2:] = 0.0  # two zero-weight concepts per singular vector
    s[1, 0] = 0.0  # a singular vector with no concept at all
    i = torch.randint(0, len(WORDS), (H, r, K), generator=g)
    return {"scores": s, "indices": i, "singular_values": torch.rand(H, r, generator=g) + 1, "meta": {"layer": 11}}


@pytest.mark.parametrize("H", [4, 12, 16])
def test_sith_explanations_figure(H, tmp_path):
    res = _decomposition(H)
    fig = sith.explanations_figure(res, WORDS, n_sv=3, random_weights=True)
    axes = [ax for ax in fig.axes if ax.axison]
    assert len(axes) == H
    # no zero-weight bars: 3 nonzero concepts x 3 singular vectors, head 1's sv0 has none
    bars = {int(ax.get_title().split()[1]): len(ax.patches) for ax in axes}
    assert bars[0] == 9 and bars[1] == 6
    assert all(p.get_width() > 0 for ax in axes for p in ax.patches)
    # one x scale for the whole figure, labelled with the coefficient on the bottom panels
    assert len({ax.get_xlim() for ax in axes}) == 1
    labelled = [ax for ax in axes if ax.get_xlabel()]
    assert labelled and all("coefficient" in ax.get_xlabel() for ax in labelled)
    assert len(labelled) == min(4, H)
    # the figure title is the figure's (laid out above the panels), with the random-weights note
    assert "random weights" in fig._suptitle.get_text()
    assert fig.get_layout_engine() is not None
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    r = canvas.get_renderer()
    sup = fig._suptitle.get_window_extent(r)
    assert all(ax.title.get_window_extent(r).y1 <= sup.y0 + 1 for ax in axes)  # no overlap
    path = sith.plot_explanations(res, WORDS, tmp_path / "x.png", n_sv=3)
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert "random weights" not in sith.explanations_figure(res, WORDS)._suptitle.get_text()


def _parts(n_parts, S=64):
    pp = np.full((S, S), -1, np.int16)
    for k in range(n_parts - 1):  # the last part keeps no pixels
        pp[k * 4:(k + 1) * 4, :] = k
    parts = [{"part": k, "pixels": int((pp == k).sum()), "descriptors": [f"d{k}"] if k else [],
              "ellipse": {"center": [10, 10], "axes": [5, 4], "angle": 0.0}} for k in range(n_parts)]
    return pp, {"predicted_class": "cat", "methods": {"kmeans": {"parts": parts}}}


@pytest.mark.parametrize("n_parts", [5, 14])
def test_parts_figure_shows_every_part(n_parts, tmp_path):
    pp, rec = _parts(n_parts)
    img = np.zeros((64, 64, 3), np.uint8)
    fig = mutual.plot_parts(img, pp, rec, "kmeans", tmp_path / "p.png", title="cat.jpg: predicted cat")
    legend = fig.axes[1].get_legend()
    texts = [t.get_text() for t in legend.get_texts()]
    assert len(texts) == n_parts
    assert texts[0].startswith("part 0") and "(no descriptor)" in texts[0]
    assert "no pixels" in texts[-1]
    colors = [tuple(np.round(h.get_facecolor()[:3], 3)) for h in legend.legend_handles]
    assert len(set(colors)) == n_parts  # distinct colours
    assert "K-means" in fig.axes[1].get_title()
    # every part with pixels is visible in the overlay, in its own colour
    over = mutual.overlay_parts(img, pp, alpha=1.0)
    seen = {tuple(over[pp == k][0]) for k in range(n_parts - 1)}
    assert len(seen) == n_parts - 1
    assert len({tuple(c) for c in mutual.part_colors(40)}) == 40


def test_concept_sets_figure_names_image_and_method(tmp_path):
    sets = {"vision": WORDS[:30], "language": WORDS[20:50], "mutual": WORDS[20:30]}
    fig = mutual.plot_concept_sets(sets, tmp_path / "c.png", image="dog.jpg", method="pca")
    title = fig.axes[0].get_title()
    assert "dog.jpg" in title and "PCA" in title
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert any("(+5 more)" in t for t in texts)  # 20 vision-only concepts, 15 listed


def test_pruning_figure_labels_and_error_bars(tmp_path):
    rows = [{"name": "original", "kind": "original", "seed": None, "n_heads": 0, "accuracy": 70.0},
            {"name": "high", "kind": "high", "seed": None, "n_heads": 1, "accuracy": 60.0},
            {"name": "low", "kind": "low", "seed": None, "n_heads": 3, "accuracy": 68.0}]
    rows += [{"name": f"random-s{s}", "kind": "random", "seed": s, "n_heads": 1, "accuracy": 64.0 + s}
             for s in range(3)]
    fig = pruning.results_figure(rows)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert "high\n(1 head)" in labels and "low\n(3 heads)" in labels and "original\n(0 heads)" in labels
    assert not any("1 heads" in t for t in labels)
    # one error bar: the seeded set only
    bars = [c for c in ax.containers if c.__class__.__name__ == "ErrorbarContainer"]
    assert len(bars) == 1 and len(bars[0].lines[2][0].get_segments()) == 1
    pruning.plot_results(rows, tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
    # no seeded sets: no error bars at all
    assert not [c for c in pruning.results_figure(rows[:3]).axes[0].containers
                if c.__class__.__name__ == "ErrorbarContainer"]
