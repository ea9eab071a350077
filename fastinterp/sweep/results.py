"""The merged results table (one row per method task: the spec's coordinates plus the
method's headline figures) and the report (per model a figure across layers; across
models the headline figures side by side)."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from ..io import atomic_open, atomic_write_text, read_run_record
from .graph import RESULT_KINDS

__all__ = ["write_results", "COORDS", "HEADLINE"]

COORDS = ("task", "method", "status", "model", "layer", "dictionary", "images")
HEADLINE = {
    "sith.decompose": ("signals", "mean_top_score"),
    "sith.fidelity": ("fidelity", "fidelity_std", "fidelity_min", "fidelity_max"),
    "ccs.textspan": ("heads", "mean_top_std"),
    "ccs.label": ("distinct_labels",),
    "ccs.score": ("mean_ccs", "ccs_at_max", "high_heads", "moderate_heads", "low_heads"),
    "ccs.prune": ("acc_original", "acc_high", "acc_low", "acc_random"),
    "mutual.explain": ("images", "mi_pca", "auc_pca", "mi_kmeans", "auc_kmeans"),
}
LAYER_FIGURES = ("fidelity", "mean_top_score", "mean_top_std", "mean_ccs")
MODEL_FIGURES = ("fidelity", "mean_ccs", "acc_original", "acc_high", "mi_pca", "auc_pca", "mi_kmeans", "auc_kmeans")


def _rows(root: Path, graph, tasks: dict, status: dict) -> list[dict]:
    rows = []
    for tid, t in tasks.items():
        if t["kind"] not in RESULT_KINDS:
            continue
        rec = read_run_record(root / t["folder"]) if status[tid] == "done" else None
        row = {"task": tid, "method": t["kind"], "status": status[tid]}
        row.update({k: t["coords"].get(k) for k in COORDS[3:]})
        result = (rec or {}).get("result") or {}
        row.update({k: result.get(k) for k in HEADLINE[t["kind"]]})
        rows.append(row)
    return rows


def _columns() -> list[str]:
    cols = list(COORDS)
    for keys in HEADLINE.values():
        cols += [k for k in keys if k not in cols]
    return cols


def _csv_text(rows: list[dict], cols: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow(["" if r.get(c) is None else repr(r[c]) if isinstance(r[c], float) else r[c] for c in cols])
    return buf.getvalue()


def write_results(root, graph, tasks: dict, status: dict, *, report: bool = True) -> dict:
    """results.csv and results.json (same rows, graph order; floats at full precision),
    and report.md with figures/ when `report`."""
    root = Path(root)
    rows = _rows(root, graph, tasks, status)
    cols = _columns()
    atomic_write_text(root / "results.csv", _csv_text(rows, cols))
    with atomic_open(root / "results.json", "w") as f:
        f.write(json.dumps({"columns": cols, "rows": rows}, indent=1, sort_keys=True) + "\n")
    out = {"rows": len(rows), "csv": str(root / "results.csv"), "json": str(root / "results.json")}
    if report:
        out["report"] = str(_report(root, rows, status))
    return out


# --------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------
def _layer_figure(rows: list[dict], model: str, path: Path) -> Path | None:
    """One panel per layer-indexed figure (fidelity, TextSpan spread, CCS), a line per dictionary."""
    from matplotlib.figure import Figure

    mine = [r for r in rows if r["model"] == model and r["layer"] is not None]
    metrics = [m for m in LAYER_FIGURES if any(r.get(m) is not None for r in mine)]
    if not metrics:
        return None
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(4 * len(metrics), 3.2))
    for i, m in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), i + 1)
        for d in sorted({r["dictionary"] for r in mine if r.get(m) is not None}):
            pts = sorted((r["layer"], r[m]) for r in mine if r["dictionary"] == d and r.get(m) is not None)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=d)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
        ax.set_xlabel("layer")
        ax.set_title(m)
        ax.legend(fontsize=7)
    fig.suptitle(f"{model}: across layers")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, metadata={"Software": None})
    return path


def _model_means(rows: list[dict], models: list[str]) -> dict:
    return {m: {k: (float(np.mean(v)) if (v := [r[k] for r in rows if r["model"] == m and r.get(k) is not None])
                    else None) for k in MODEL_FIGURES} for m in models}


def _models_figure(means: dict, path: Path) -> Path | None:
    """One panel per headline figure (each on its own scale: fidelity is a cosine, accuracy a
    percentage), a bar per model; a model without that figure shows "n/a"."""
    from matplotlib.figure import Figure

    metrics = [k for k in MODEL_FIGURES if any(v[k] is not None for v in means.values())]
    if not metrics:
        return None
    models = list(means)
    panel_w = max(3.0, 0.45 * len(models) + 1.2)
    cols = max(1, min(4, len(metrics), int(16 // panel_w)))  # at most about 16 inches wide
    rows = -(-len(metrics) // cols)
    fig = Figure(figsize=(cols * panel_w, rows * 2.9))
    for i, k in enumerate(metrics):
        ax = fig.add_subplot(rows, cols, i + 1)
        values = [means[m][k] for m in models]
        bars = ax.bar(range(len(models)), [v or 0.0 for v in values], color=[f"C{j % 10}" for j in range(len(models))])
        for b, v in zip(bars, values):
            ax.annotate("n/a" if v is None else f"{v:.3g}", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(models)), models, rotation=30 if len(models) > 3 else 0, ha="right"
                      if len(models) > 3 else "center", fontsize=8)
        ax.set_title(k, fontsize=9)
        ax.margins(y=0.15)
    fig.suptitle("headline figures by model (mean over layers and dictionaries)")
    fig.tight_layout()
    fig.savefig(path, dpi=90, metadata={"Software": None})
    return path


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def _report(root: Path, rows: list[dict], status: dict) -> Path:
    models = list(dict.fromkeys(r["model"] for r in rows))
    figs = root / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    counts = {s: sum(v == s for v in status.values()) for s in ("done", "failed", "blocked", "pending")}
    lines = ["# Sweep report", "", "Tasks: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v) + ".",
             "Full table: `results.csv` / `results.json`; timings (not part of the results): `timings.json`.", ""]
    means = _model_means(rows, models)
    lines += ["## Across models", "", "| model | " + " | ".join(MODEL_FIGURES) + " |",
              "|---" * (len(MODEL_FIGURES) + 1) + "|"]
    lines += [f"| {m} | " + " | ".join(_fmt(means[m][k]) for k in MODEL_FIGURES) + " |" for m in models]
    if _models_figure(means, figs / "models.png"):
        lines += ["", "![models](figures/models.png)"]
    for m in models:
        lines += ["", f"## {m}", ""]
        p = _layer_figure(rows, m, figs / f"{m}-layers.png")
        if p:
            lines += [f"![{m} across layers](figures/{p.name})", ""]
        lines += ["| method | layer | dictionary | images | status | headline |", "|---|---|---|---|---|---|"]
        for r in rows:
            if r["model"] == m:
                head = ", ".join(f"{k} {_fmt(r[k])}" for k in HEADLINE[r["method"]] if r.get(k) is not None)
                lines.append(f"| {r['method']} | {_fmt(r['layer'])} | {r['dictionary'] or '-'} | {r['images'] or '-'} "
                             f"| {r['status']} | {head} |")
    path = root / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
