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

__all__ = ["explanation_rows", "plot_explanations", "write_explanations"]


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


def plot_explanations(result: dict, concepts: Sequence[str], path: str | os.PathLike, *,
                      heads: Sequence[int] | None = None, n_sv: int = 4, title: str | None = None) -> Path:
    """PNG figure: one panel per head, its first `n_sv` singular vectors as groups of
    horizontal bars (one bar per concept, length = weight)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    s = result["scores"]
    H, r, K = s.shape
    heads = list(range(H)) if heads is None else list(heads)
    n_sv = min(n_sv, r)
    cols = min(4, len(heads))
    rows_n = math.ceil(len(heads) / cols)
    fig = Figure(figsize=(4.2 * cols, 0.32 * n_sv * K * rows_n + 1.2 * rows_n))
    axes = fig.subplots(rows_n, cols, squeeze=False)
    colors = colormaps["tab10"]
    expl = explanation_rows(result, concepts, heads=heads, max_sv=n_sv)
    sv_vals = result.get("singular_values")
    for ax, h in zip(axes.flat, heads):
        items = [row for row in expl if row["head"] == h]
        labels, widths, cs = [], [], []
        for row in items:
            labels.append(f"sv{row['sv']}: {row['concept']}")
            widths.append(row["weight"])
            cs.append(colors(row["sv"] % 10))
        y = list(range(len(items)))[::-1]
        ax.barh(y, widths, color=cs)
        ax.set_yticks(y)
        ax.set_yticklabels(labels, fontsize=7)
        sub = "" if sv_vals is None else " (s=" + ", ".join(f"{float(v):.2g}" for v in sv_vals[h, :n_sv]) + ")"
        ax.set_title(f"head {h}{sub}", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    for ax in list(axes.flat)[len(heads):]:
        ax.set_axis_off()
    layer = (result.get("meta") or {}).get("layer")
    fig.suptitle(title or f"SITH: top concepts of the first {n_sv} singular vectors per head (layer {layer})",
                 fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format=path.suffix[1:].lower() or "png", dpi=100, bbox_inches="tight")
    return path
