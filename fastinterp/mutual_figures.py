"""Mutual-knowledge figures: parts overlays, MI curves and the vision / language concept sets.

Figures are drawn on a stand-alone `matplotlib.figure.Figure` (no pyplot state, no backend
switch). Re-exported by `fastinterp.mutual`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .kernels.mi import curve_auc

__all__ = ["PART_COLORS", "PART_METHOD_NAMES", "overlay_parts", "part_colors", "plot_concept_sets", "plot_mi_curves",
           "plot_parts"]

PART_COLORS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 165, 0],
                        [255, 192, 203], [160, 32, 240], [0, 255, 255], [128, 0, 0], [128, 128, 0]],
                       dtype=np.uint8)

def _figure(figsize):
    """A stand-alone `matplotlib.figure.Figure` (no pyplot state, no backend switch)."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


# after PART_COLORS (the reference's ten), more colours unlike those, then evenly spaced hues
_MORE_COLORS = np.array([[0, 128, 128], [0, 0, 128], [255, 127, 80], [128, 128, 128], [0, 100, 0],
                         [210, 105, 30], [255, 0, 255], [70, 130, 180], [154, 205, 50], [75, 0, 130]], dtype=np.uint8)


def part_colors(n: int) -> np.ndarray:
    """(n, 3) uint8 distinct colours for parts 0..n-1: `PART_COLORS` first, then ten more,
    then evenly spaced hues (so no two parts share a colour, however many there are)."""
    import colorsys

    base = np.concatenate([PART_COLORS, _MORE_COLORS])
    if n <= len(base):
        return base[:n].copy()
    extra = n - len(base)
    hues = [colorsys.hsv_to_rgb((k + 0.5) / extra, 0.65, 0.85) for k in range(extra)]
    return np.concatenate([base, (np.array(hues) * 255).round().astype(np.uint8)])


def _n_part_colors(pixel_parts: np.ndarray, part_ids=()) -> int:
    ids = [int(v) for v in np.unique(pixel_parts) if v >= 0] + [int(v) for v in part_ids]
    return max(ids) + 1 if ids else 0


def overlay_parts(image: np.ndarray, pixel_parts: np.ndarray, alpha: float = 0.5, *,
                  n_colors: int | None = None) -> np.ndarray:
    """(S, S, 3) uint8 with each part (pixel_parts >= 0) blended in its own colour
    (`part_colors`; part ids index the colours, so two parts never share one)."""
    out = image.astype(np.float32).copy()
    colors = part_colors(n_colors or _n_part_colors(pixel_parts))
    for pid in np.unique(pixel_parts):
        if pid < 0:
            continue
        m = pixel_parts == pid
        out[m] = (1 - alpha) * out[m] + alpha * colors[pid]
    return out.clip(0, 255).astype(np.uint8)


PART_METHOD_NAMES = {"pca": "PCA", "kmeans": "K-means"}


def _part_legend_label(part: dict, pixels: int, total: int) -> str:
    import textwrap

    desc = "; ".join(part.get("descriptors") or []) or "(no descriptor)"
    pct = 100 * pixels / total
    where = (f"{pct:.0f}%" if pct >= 1 else f"{pct:.1f}%" if pct >= 0.1 else "<0.1%") + " of the image" if pixels \
        else "no pixels left after trimming: ellipse only"
    return textwrap.fill(f"part {part['part']} ({where}): {desc}", 48)


def plot_parts(image: np.ndarray, pixel_parts: np.ndarray, record: dict, method: str, path, *, title: str = ""):
    """Image | parts overlay: every part in its own colour, outlined, with its ellipse, and a
    legend entry per part (its share of the image and its descriptors), including parts that
    keep no pixels."""
    import textwrap

    import matplotlib.patches as mpatches

    parts = sorted(record["methods"][method]["parts"], key=lambda p: p["part"])
    n = max(_n_part_colors(pixel_parts, [p["part"] for p in parts]), 1)
    colors = part_colors(n) / 255.0
    fig = _figure((10.5, 4.6))
    fig.set_layout_engine("constrained", w_pad=0.15)
    axes = fig.subplots(1, 2)
    axes[0].imshow(image)
    axes[0].set_title(textwrap.fill(title or record.get("predicted_class", ""), 50), fontsize=10)
    axes[1].imshow(overlay_parts(image, pixel_parts, n_colors=n))
    handles = []
    for part in parts:
        pid, color = part["part"], colors[part["part"]]
        mask = pixel_parts == pid
        if mask.any():
            axes[1].contour(mask.astype(np.float32), levels=[0.5], colors=[color], linewidths=1.2)
        e = part["ellipse"]
        axes[1].add_patch(mpatches.Ellipse(e["center"], e["axes"][0], e["axes"][1], angle=e["angle"],
                                           fill=False, edgecolor=color, linewidth=1.5, linestyle="--"))
        handles.append(mpatches.Patch(facecolor=color, edgecolor="black", linewidth=0.5,
                                      label=_part_legend_label(part, int(mask.sum()), mask.size)))
    name = PART_METHOD_NAMES.get(method, method)
    axes[1].set_title(f"{len(parts)} parts by {name}", fontsize=10)
    for ax in axes:
        ax.set_axis_off()
    if handles:
        axes[1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False,
                       title=f"{name} parts (outline: its pixels, dashed: its ellipse)", title_fontsize=8,
                       alignment="left")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return fig


def plot_mi_curves(curves: dict, path, *, title: str = "MI dynamics"):
    """One line per entry name -> curve (MI after removing t vision concepts), AUC in the legend."""
    fig = _figure((5, 3.5))
    ax = fig.subplots()
    for name, curve in curves.items():
        c = np.asarray(curve, dtype=float)
        ax.plot(np.arange(len(c)), c, marker="o", markersize=3,
                label=f"{name} (AUC {curve_auc(c):.3f})" if len(c) else name)
    ax.set_xlabel("vision concepts removed (most important first)")
    ax.set_ylabel("mutual information (nats)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _listed(items: Sequence[str], limit: int) -> str:
    if not items:
        return "(none)"
    shown = [t if len(t) <= 30 else t[:29] + "\u2026" for t in items[:limit]]
    more = len(items) - len(shown)
    return "\n".join(shown + ([f"(+{more} more)"] if more > 0 else []))


def plot_concept_sets(concept_sets: dict, path, *, title: str = "", image: str | None = None,
                      method: str | None = None, max_items: int = 15):
    """Two overlapping circles: vision-only, mutual (the overlap) and language-only concepts.

    `image` (its name) and `method` (the part method the vision concepts came from) go in the
    title; at most `max_items` concepts are listed per region, with a count of the rest."""
    import matplotlib.patches as mpatches

    vision, language, mutual = concept_sets["vision"], concept_sets["language"], concept_sets["mutual"]
    only_v = [t for t in vision if t not in set(mutual)]
    only_l = [t for t in language if t not in set(mutual)]
    fig = _figure((10, 5.8))
    ax = fig.subplots()
    ax.add_patch(mpatches.Circle((0.33, 0.5), 0.3, alpha=0.25, color="tab:blue"))
    ax.add_patch(mpatches.Circle((0.67, 0.5), 0.3, alpha=0.25, color="tab:orange"))
    ax.text(0.2, 0.86, f"vision encoder only ({len(only_v)})", ha="center", fontsize=10)
    ax.text(0.8, 0.86, f"language encoder only ({len(only_l)})", ha="center", fontsize=10)
    ax.text(0.5, 0.14, f"mutual: in both ({len(mutual)})", ha="center", fontsize=10)
    for x, items in ((0.2, only_v), (0.5, mutual), (0.8, only_l)):
        ax.text(x, 0.5, _listed(items, max_items), ha="center", va="center", fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0.08, 0.92)
    ax.set_aspect("equal")
    ax.set_axis_off()
    if not title:
        how = f" (vision concepts from {PART_METHOD_NAMES.get(method, method)} parts)" if method else ""
        title = (f"{image}\n" if image else "") + f"concepts of the vision and language encoders{how}"
    ax.set_title(title, fontsize=10)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return fig
