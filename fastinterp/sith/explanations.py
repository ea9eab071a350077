"""SITH explanations: each singular vector's concepts as rows, Markdown/CSV tables and a figure.

Figures are drawn on a `matplotlib.figure.Figure` (no pyplot state, no backend choice).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable, Sequence

import torch

from ..io import atomic_open, atomic_write_text

__all__ = ["explanation_rows", "explanations_figure", "plot_explanations", "write_explanations"]


def explanation_rows(result: dict, concepts: Sequence[str], *, heads: Iterable[int] | None = None,
                     max_sv: int | None = None, layer: int | None = None) -> list[dict]:
    """Flat rows {layer, head, sv, singular_value, rank_in_sv, concept, weight}, nonzero weights
    only, highest weight first within each singular vector."""
    s, i = result["scores"], result["indices"]
    H, r, K = s.shape
    if int(i.max()) >= len(concepts):
        raise ValueError(f"indices reach {int(i.max())} but only {len(concepts)} concept texts were given")
    sv_vals = result.get("singular_values")
    layer = layer if layer is not None else (result.get("meta") or {}).get("layer")
    rows = []
    for h in (range(H) if heads is None else heads):
        for j in range(r if max_sv is None else min(r, max_sv)):
            order = torch.argsort(s[h, j], descending=True, stable=True).tolist()
            n = 0
            for k in order:
                w = float(s[h, j, k])
                if w == 0:
                    continue
                rows.append({"layer": layer, "head": h, "sv": j,
                             "singular_value": None if sv_vals is None else round(float(sv_vals[h, j]), 6),
                             "rank_in_sv": n, "concept": concepts[int(i[h, j, k])], "weight": round(w, 6)})
                n += 1
    return rows


def write_explanations(result: dict, concepts: Sequence[str], path_stem: str | os.PathLike, *,
                       max_sv: int | None = None, layer: int | None = None) -> tuple[Path, Path]:
    """Write `<stem>.csv` (all rows) and `<stem>.md` (per head, one line per singular vector)."""
    import csv

    rows = explanation_rows(result, concepts, max_sv=max_sv, layer=layer)
    stem = Path(path_stem)
    csv_path, md_path = Path(f"{stem}.csv"), Path(f"{stem}.md")
    with atomic_open(csv_path, "w") as f:
        w = csv.DictWriter(f, fieldnames=["layer", "head", "sv", "singular_value", "rank_in_sv", "concept", "weight"])
        w.writeheader()
        w.writerows(rows)
    layer = rows[0]["layer"] if rows else layer
    lines = [f"# SITH explanations, layer {layer}", ""]
    by = {}
    for row in rows:
        by.setdefault((row["head"], row["sv"]), []).append(row)
    for h in sorted({k[0] for k in by}):
        lines += [f"## Head {h}", "", "| sv | singular value | concepts (weight) |", "|---:|---:|---|"]
        for (hh, j), items in sorted(by.items()):
            if hh != h:
                continue
            sv = items[0]["singular_value"]
            text = ", ".join(f"{it['concept']} ({it['weight']:.3f})" for it in items).replace("|", "\\|")
            lines.append(f"| {j} | {'' if sv is None else f'{sv:.4g}'} | {text} |")
        lines.append("")
    atomic_write_text(md_path, "\n".join(lines))
    return md_path, csv_path


RANDOM_WEIGHTS_NOTE = "random weights: the concepts are noise; the figure shows the format, not findings"


def _short(text: str, n: int = 28) -> str:
    return text if len(text) <= n else text[: n - 1] + "\u2026"


def _draw_head(ax, items: list[dict], h: int, colors, svals=None) -> None:
    """One panel: a head's singular vectors as groups of bars (nonzero coefficients only)."""
    y = list(range(len(items)))[::-1]
    if items:
        ax.barh(y, [row["weight"] for row in items], color=[colors(row["sv"] % 10) for row in items], height=0.8)
        ax.set_yticks(y)
        ax.set_yticklabels([f"sv{row['sv']}: {_short(row['concept'])}" for row in items], fontsize=8)
    else:
        ax.set_yticks([])
        ax.text(0.5, 0.5, "no nonzero concept", transform=ax.transAxes, ha="center", va="center", fontsize=8)
    sub = "" if svals is None else " (singular values " + ", ".join(f"{float(v):.3g}" for v in svals) + ")"
    ax.set_title(f"head {h}{sub}", fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(axis="x", alpha=0.3)


def plot_explanations(result: dict, concepts: Sequence[str], path: str | os.PathLike, *,
                      heads: Sequence[int] | None = None, n_sv: int = 4, title: str | None = None,
                      random_weights: bool = False, cols: int | None = None) -> Path:
    """Write `explanations_figure(...)` to `path` (PNG, or the format its suffix names)."""
    fig = explanations_figure(result, concepts, heads=heads, n_sv=n_sv, title=title, random_weights=random_weights,
                              cols=cols)
    path = Path(path)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format=path.suffix[1:].lower() or "png", dpi=100)
    return path


def explanations_figure(result: dict, concepts: Sequence[str], *, heads: Sequence[int] | None = None, n_sv: int = 4,
                        title: str | None = None, random_weights: bool = False, cols: int | None = None):
    """A `matplotlib.figure.Figure`: one panel per head, its first `n_sv` singular vectors as groups of
    horizontal bars (one bar per concept with a nonzero coefficient; length = the concept's
    coefficient in the singular vector's sparse code, one x scale for the whole figure).

    Args:
        random_weights: add a note that the model has random weights (pass
            `model.fastinterp_weights == "random"`).
        cols: panels per row (default: 4, fewer for fewer heads).
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    s = result["scores"]
    H, r, K = s.shape
    heads = list(range(H)) if heads is None else list(heads)
    n_sv = min(n_sv, r)
    cols = max(1, min(cols or 4, len(heads)))
    rows_n = math.ceil(len(heads) / cols)
    expl = explanation_rows(result, concepts, heads=heads, max_sv=n_sv)
    by_head = {h: [row for row in expl if row["head"] == h] for h in heads}
    bars = max([len(v) for v in by_head.values()] + [1])
    fig = Figure(figsize=(4.4 * cols, (0.24 * bars + 0.9) * rows_n + 1.1), layout="constrained")
    axes = fig.subplots(rows_n, cols, squeeze=False, sharex=True)
    colors = colormaps["tab10"]
    sv_vals = result.get("singular_values")
    for ax, h in zip(axes.flat, heads):
        _draw_head(ax, by_head[h], h, colors, None if sv_vals is None else sv_vals[h, :n_sv])
    for ax in list(axes.flat)[len(heads):]:
        ax.set_axis_off()
    top = max([row["weight"] for row in expl] + [1e-6])
    axes[0, 0].set_xlim(0, top * 1.05)
    for c in range(cols):  # the lowest drawn panel of each column carries the axis label
        col = [axes[rr, c] for rr in range(rows_n) if rr * cols + c < len(heads)]
        if col:
            col[-1].set_xlabel("coefficient in the sparse code", fontsize=8)
            col[-1].tick_params(axis="x", labelbottom=True)
    layer = (result.get("meta") or {}).get("layer")
    head_title = title or (f"SITH, layer {layer}: concepts of each head's first {n_sv} singular vectors "
                           f"(sv0 = largest singular value)")
    fig.suptitle(head_title + (f"\n{RANDOM_WEIGHTS_NOTE}" if random_weights else ""), fontsize=11)
    return fig
