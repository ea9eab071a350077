"""Run the benchmark suite and write its report: a Markdown table, a JSON, PNG plots.

    python -m benchmarks.report --preset quick --output bench-out      # CI size, ~2 min on 2 cores
    python -m benchmarks.report --preset full --output bench-full      # a real measurement
    python -m benchmarks.report --only pursuit                         # a subset (pytest -k)
    python -m benchmarks.report --from-json a.json b.json    # re-render (and merge) saved runs

Runs ``pytest benchmarks --benchmark-only --benchmark-json ...`` in a subprocess, then writes

* ``DIR/benchmarks.md``: one row per case: our time (median), throughput, speed-up over each
  baseline, GFLOP/s and the fraction of this machine's fp32 matmul rate (measured in the
  same run, at the case's thread count) where the case counts flops, peak memory, and notes
  (baselines reported invalid or not run, targets missed); the skipped cases with their
  reason (GPU cases without CUDA); the AOT resource table of every Triton kernel
  (``fastinterp.kernels.aot``: registers, spill stack, shared memory for sm_80 / sm_90);
* ``DIR/benchmarks.json``: the same rows, the machine, the AOT table, the command;
* ``DIR/throughput_vs_dictionary_size.png``, ``DIR/throughput_vs_images.png``: where cases
  were run at several sizes;
* ``DIR/pytest-benchmark.json``: pytest-benchmark's own file (the machine is recorded under
  ``machine_info.fastinterp``).

``--save-baseline`` also stores the run as a regression baseline under
``benchmarks/baselines/<machine id>/`` (see README "Benchmarks" for the compare command).
Exit status: pytest's (non-zero when a case errors or fails), else 1 if a default Triton
configuration failed to compile or spills.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import machine, presets

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "benchmarks"
BASELINES = BENCH_DIR / "baselines"
BASELINE_WORDS = ("reference", "pot", "sklearn", "spams", "torch_f", "lower_bound", "torch_backend")
COMPARE_FAIL = "median:100%"
"""The default regression threshold: a case fails when its median time is more than twice the
baseline's. Back-to-back runs of unchanged code on the shared 2-core development machine
differ by up to 1.7x; on a dedicated machine pass a tighter one (--compare-fail median:20%)."""


# ----------------------------------------------------------------------------- running
def saved_baseline(preset: str, machine_id: str | None = None) -> Path | None:
    """The newest baseline saved for this preset on this kind of machine:
    benchmarks/baselines/<machine id>/<pytest-benchmark's platform folder>/NNNN_<preset>.json."""
    root = BASELINES / (machine_id or machine.machine_id())
    found = sorted(root.glob(f"*/[0-9][0-9][0-9][0-9]_{preset}.json"), key=lambda p: p.name)
    return found[-1] if found else None


def gate_args(baseline: Path, threshold: str = COMPARE_FAIL) -> list[str]:
    """pytest-benchmark flags that fail the run on a slowdown beyond `threshold` against a
    saved baseline file (named by its run number, looked up in --benchmark-storage)."""
    return [f"--benchmark-compare={baseline.name.split('_')[0]}", f"--benchmark-compare-fail={threshold}"]


def machine_slowdown(baseline_json: Path, current_json: Path) -> float | None:
    """How much slower this machine multiplied matrices in this run than when the baseline
    was saved (baseline fp32 matmul rate / current, at the most threads measured in both); a
    shared machine with a busy neighbour shows it, and the gate's verdict is then suspect."""
    rates = []
    for path in (baseline_json, current_json):
        info = (json.loads(Path(path).read_text()).get("machine_info") or {}).get("fastinterp") or {}
        rates.append(((info.get("matmul") or {}).get("cpu_gflops")) or {})
    common = set(rates[0]) & set(rates[1])
    if not common:
        return None
    key = max(common, key=int)
    return rates[0][key] / rates[1][key] if rates[1][key] else None


def run_pytest(preset: str, output: Path, only: str | None, save_baseline: bool,
               compare: Path | None = None, threshold: str = COMPARE_FAIL) -> tuple[int, str, list[str]]:
    """Run the suite; returns (exit code, captured output, the command)."""
    cmd = [sys.executable, "-m", "pytest", str(BENCH_DIR.relative_to(ROOT)), "--benchmark-only",
           "--preset", preset, f"--benchmark-json={output / 'pytest-benchmark.json'}", "-p", "no:cacheprovider",
           "-q", "-rs"]
    if only:
        cmd += ["-k", only]
    storage = BASELINES / machine.machine_id()
    if save_baseline or compare:
        cmd.append(f"--benchmark-storage=file://{storage}")
    if save_baseline:
        cmd.append(f"--benchmark-save={preset}")
    if compare:
        cmd += gate_args(compare, threshold)
    env = dict(os.environ, **{presets.ENV_VAR: preset})
    env.pop("TRITON_INTERPRET", None)
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # stream, so CI logs show progress
        sys.stdout.write(line)
        lines.append(line)
    return proc.wait(), "".join(lines), cmd


def skipped_cases(pytest_output: str) -> list[str]:
    """'SKIPPED [n] file:line: reason' lines of pytest's -rs summary."""
    return [ln.strip() for ln in pytest_output.splitlines() if ln.startswith("SKIPPED")]


# ----------------------------------------------------------------------------- rows
def _unit(key: str) -> str:
    name = re.sub(r"(^ours_|_ours$)", "", key).replace("_per_s", "/s")
    return name.replace("_", " ")


def _is_baseline_key(key: str) -> bool:
    low = key.lower()
    return any(word in low for word in BASELINE_WORDS)


def throughput(extra: dict) -> tuple[float | None, str | None]:
    """Our throughput: the first '*per_s*' figure of extra_info not about a baseline."""
    for key, value in extra.items():
        if "per_s" in key and not _is_baseline_key(key) and isinstance(value, (int, float)):
            return float(value), _unit(key)
    return None, None


def speedups(extra: dict) -> dict[str, float]:
    """{baseline label: our speed-up over it} from the 'speedup' figures of extra_info."""
    out = {}
    for key, value in extra.items():
        if "speedup" not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if key.startswith("speedup_vs_"):
            label = key[len("speedup_vs_"):]
        elif key == "speedup":
            label = "reference"
        else:
            head, _, tail = key.partition("_speedup")
            label = f"{tail.removeprefix('_vs_') or 'reference'} ({head.replace('_', ' ')})"
        out[label] = float(value)
    return out


def notes(extra: dict) -> list[str]:
    out = []
    for key, value in extra.items():
        if key.endswith("_status") and value != "ok":
            out.append(f"{key[:-len('_status')]}: {value}")
        elif key.startswith("target_") and value is False:
            out.append(f"{key[len('target_'):-len('_met')].replace('_', ' ')}: not met")
    for key in ("reference_scaling", "pot_scaling"):
        if key in extra:
            out.append(f"{key.split('_')[0]} timed on a subset, scaled {extra[key].split('(')[0].strip()}")
    return out


def case_row(bench: dict, info: dict) -> dict:
    extra = bench.get("extra_info", {})
    stats = bench["stats"]
    value, unit = throughput(extra)
    threads = extra.get("threads", extra.get("torch_threads"))
    gflops = extra.get("ours_gflops")
    rate = machine.matmul_rate(info, threads) if gflops is not None else None
    fraction = gflops / rate if gflops is not None and rate else None
    module = bench.get("fullname", "").split("::")[0].rsplit("/", 1)[-1].removesuffix(".py")
    return {
        "case": bench["name"], "file": module, "group": bench.get("group"),
        "ours_median_s": stats["median"], "ours_min_s": stats["min"], "rounds": stats["rounds"],
        "throughput": value, "throughput_unit": unit, "speedups": speedups(extra),
        "gflops": gflops, "matmul_gflops": rate, "threads": threads,
        "fraction_of_matmul": round(fraction, 3) if fraction is not None else None,
        "case_peak_rss_mib": extra.get("case_peak_rss_mib"),
        "ours_peak_rss_mib": extra.get("ours_peak_rss_mib"),
        "case_peak_gpu_mib": extra.get("case_peak_gpu_mib"),
        "notes": notes(extra), "extra_info": extra,
    }


# ----------------------------------------------------------------------------- formatting
def _num(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if x == 0:
        return "0"
    mag = math.floor(math.log10(abs(x)))
    if mag >= 5:
        return f"{x:,.0f}"
    return f"{x:.{max(digits - 1 - mag, 0)}f}"


def _seconds(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.0f} us"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def markdown(rows: list[dict], info: dict, aot_md: str, skipped: list[str], meta: dict) -> str:
    cpu = f"{info.get('cpu_model')} ({info.get('cpu_cores')} cores)"
    mm = (info.get("matmul") or {})
    rates = ", ".join(f"{v} GFLOP/s with {k} thread{'s' if k != '1' else ''}"
                      for k, v in (mm.get("cpu_gflops") or {}).items())
    lines = [
        f"# fastinterp benchmarks ({meta['preset']} preset)",
        "",
        f"- machine id `{info.get('machine_id')}`: {cpu}; GPU: {info.get('gpu') or 'none (CUDA not available)'}",
        f"- fp32 matmul ({mm.get('n')}^3, torch, same run): {rates or 'not measured'}"
        + (f"; GPU {mm['gpu_gflops']} GFLOP/s" if mm.get("gpu_gflops") else ""),
        f"- versions: " + ", ".join(f"{k} {v}" for k, v in (info.get("versions") or {}).items() if v),
        f"- command: `{meta['command']}`; started {meta['started']} UTC, {meta['wall_s']:.0f} s",
        "",
        "Our time is the median over the rounds; speed-up = baseline time / our time on the same "
        "inputs in the same run (each baseline's output validated first; an invalid one is listed "
        "in the notes, not timed). GFLOP/s counts the pursuit's selection matmuls; the fraction "
        "divides by the fp32 matmul rate above at the case's thread count (above 1 where the selection "
        "screens in bf16, doing fewer fp32 flops than counted: `bf16_screen` in the JSON). Peak memory: "
        "RSS above the level at the case's start (ours alone / the whole case with its baselines).",
        "",
        "| case | file | ours | throughput | speed-up over baselines | GFLOP/s (fraction of matmul) "
        "| peak memory MiB (ours / case) | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        thr = f"{_num(r['throughput'])} {r['throughput_unit']}" if r["throughput"] is not None else "-"
        sp = ", ".join(f"{k} {_num(v)}x" for k, v in r["speedups"].items()) or "-"
        gf = "-"
        if r["gflops"] is not None:
            gf = _num(r["gflops"]) + (f" ({r['fraction_of_matmul']:.2f})" if r["fraction_of_matmul"] is not None else "")
        mem = f"{_num(r['ours_peak_rss_mib'])} / {_num(r['case_peak_rss_mib'])}"
        if r.get("case_peak_gpu_mib") is not None:
            mem += f" (GPU {_num(r['case_peak_gpu_mib'])})"
        note = "; ".join(r["notes"]).replace("|", "/") or ""
        lines.append(f"| `{r['case']}` | {r['file']} | {_seconds(r['ours_median_s'])} | {thr} | {sp} | {gf} "
                     f"| {mem} | {note} |")
    if skipped:
        lines += ["", "Skipped cases:", ""] + [f"- {s}" for s in skipped]
    lines += ["", "## Triton kernels compiled ahead of time (no GPU needed)", "",
              "`fastinterp aot`: every configuration in the kernels' `AOT_SPECS`, "
              "compiled with `triton.compile` for `GPUTarget('cuda', 80|90, 32)`; registers per thread, "
              "stack frame bytes (non-zero = register spills) and shared memory from the triton wheel's "
              "`cuobjdump --dump-resource-usage` (static; sm_90 reserves 1 KiB) and Triton's metadata "
              "(dynamic, per launch).", "", aot_md.rstrip(), ""]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plots
def _series(rows, x_key, pred):
    """{label: [(x, throughput)]} for rows whose extra_info has x_key and pred(row) holds."""
    out: dict[str, list] = {}
    for r in rows:
        e = r["extra_info"]
        if x_key not in e or r["throughput"] is None or not pred(r):
            continue
        base = r["case"].split("[")[0].removeprefix("test_")
        tags = [str(e[k]) for k in ("algo", "form", "device") if k in e]
        label = " ".join([base] + tags) + f" ({r['throughput_unit']})"
        out.setdefault(label, []).append((e[x_key], r["throughput"]))
    return {k: sorted(v) for k, v in out.items() if len({x for x, _ in v}) > 1}


def plots(rows: list[dict], output: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for x_key, name, xlabel in (("M", "throughput_vs_dictionary_size.png", "dictionary size M (atoms)"),
                                ("images", "throughput_vs_images.png", "number of images")):
        series = _series(rows, x_key, lambda r: True)
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, pts in series.items():
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("throughput (ours; unit in the legend)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(output / name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written


# ----------------------------------------------------------------------------- main
def build(pytest_json: Path | list[Path], output: Path, aot_report, skipped: list[str], meta: dict) -> dict:
    """Write the report of one or several pytest-benchmark JSONs (rows in the given order;
    the machine record of the first) into `output`; returns the report dict."""
    paths = [pytest_json] if isinstance(pytest_json, (str, Path)) else list(pytest_json)
    runs = [json.loads(Path(p).read_text()) for p in paths]
    info = (runs[0].get("machine_info") or {}).get("fastinterp") or machine.machine_info()
    rows = []
    for data in runs:
        # each case's GFLOP/s is set against the matmul rate measured in its own run
        run_info = (data.get("machine_info") or {}).get("fastinterp") or info
        rows += [case_row(b, run_info) for b in data.get("benchmarks", [])]
    from fastinterp.kernels import aot

    aot_md = aot.format_table(aot_report) if aot_report is not None else "AOT compilation not run (--no-aot)\n"
    md = markdown(rows, info, aot_md, skipped, meta)
    (output / "benchmarks.md").write_text(md)
    figures = plots(rows, output)
    report = {"preset": meta["preset"], "command": meta["command"], "started_utc": meta["started"],
              "wall_s": meta["wall_s"], "machine": info, "rows": rows, "skipped": skipped, "plots": figures,
              "aot": None if aot_report is None else {"rows": aot_report.rows, "skipped": aot_report.skipped},
              "pytest_benchmark_json": [str(p) for p in paths]}
    (output / "benchmarks.json").write_text(json.dumps(report, indent=1, default=str))
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default=os.environ.get(presets.ENV_VAR) or presets.DEFAULT,
                        help="size preset: quick (CI) or full (a real measurement)")
    parser.add_argument("--output", default="bench-out", help="output folder (default: bench-out)")
    parser.add_argument("--only", default=None, help="run only cases matching this pytest -k expression")
    parser.add_argument("--save-baseline", action="store_true",
                        help="also save the run under benchmarks/baselines/<machine id>/")
    parser.add_argument("--compare", action="store_true",
                        help="fail on a regression vs the newest baseline saved for this preset on this machine id")
    parser.add_argument("--compare-fail", default=COMPARE_FAIL, metavar="FIELD:PCT",
                        help=f"the gate's threshold, as pytest-benchmark's --benchmark-compare-fail (default {COMPARE_FAIL})")
    parser.add_argument("--no-aot", action="store_true", help="skip the ahead-of-time Triton compilation table")
    parser.add_argument("--from-json", nargs="+", default=None, metavar="JSON",
                        help="render existing pytest-benchmark JSONs (merged, in order) instead of running the suite")
    args = parser.parse_args(argv)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    t0 = time.perf_counter()
    skipped: list[str] = []
    if args.from_json:
        code, command = 0, "(rendered from " + ", ".join(args.from_json) + ")"
        pytest_json = [Path(p) for p in args.from_json]
    else:
        if args.preset not in presets.PRESETS:  # a file's own extra preset: run that file with pytest
            parser.error(f"--preset must be one of {presets.PRESETS} for the whole suite")
        baseline = saved_baseline(args.preset) if args.compare else None
        if args.compare and baseline is None:
            print(f"no {args.preset!r} baseline saved for machine id {machine.machine_id()!r} under {BASELINES}: "
                  "running without the regression gate (save one with --save-baseline)", flush=True)
        elif baseline is not None:
            print(f"regression gate: {args.compare_fail} slower than {baseline} fails", flush=True)
        code, out, cmd = run_pytest(args.preset, output, args.only, args.save_baseline, baseline, args.compare_fail)
        skipped = skipped_cases(out)
        pytest_json = [output / "pytest-benchmark.json"]
        command = "python -m benchmarks.report " + " ".join(argv if argv is not None else sys.argv[1:])
        if not pytest_json[0].exists():
            print(f"pytest wrote no benchmark JSON (exit {code}); no report", file=sys.stderr)
            return code or 1
        slowdown = machine_slowdown(baseline, pytest_json[0]) if baseline is not None else None
        if slowdown is not None and slowdown > 1.25:
            print(f"warning: this machine's matmul ran {slowdown:.2f}x slower than when the baseline was "
                  "saved (a busy neighbour?): a failed gate may be the machine, not the code; rerun when quiet",
                  file=sys.stderr, flush=True)
    aot_report = None
    if not args.no_aot:
        from fastinterp.kernels import aot

        print("compiling the Triton kernels ahead of time for sm_80 / sm_90 ...", flush=True)
        aot_report = aot.resource_table()
    meta = {"preset": args.preset, "command": command, "started": started, "wall_s": time.perf_counter() - t0}
    report = build(pytest_json, output, aot_report, skipped, meta)
    print(f"\nwrote {output / 'benchmarks.md'}, {output / 'benchmarks.json'}"
          + "".join(f", {output / p}" for p in report["plots"]))
    print(f"machine (CPU/GPU model, threads, versions, matmul rate) recorded in {output / 'benchmarks.json'} "
          f"(\"machine\") and {', '.join(map(str, pytest_json))} (machine_info.fastinterp); machine id {report['machine']['machine_id']!r}")
    if code:
        return code
    if aot_report is not None and not aot_report.skipped and not aot_report.ok:
        print("a Triton kernel failed to compile ahead of time or spills registers (see the AOT table)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
