"""The benchmark suite's own machinery (benchmarks/): presets, machine record, peak memory,
the report built from a pytest-benchmark JSON, and the regression gate's threshold.

The benchmark cases themselves run in CI through `python -m benchmarks.report --preset quick`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from benchmarks import machine, presets, report


def test_preset_comes_from_the_environment(monkeypatch):
    sizes = {"quick": {"n": 1}, "full": {"n": 2}, "medium": {"n": 3}}
    monkeypatch.delenv(presets.ENV_VAR, raising=False)
    assert presets.select(sizes) == {"n": 1}
    monkeypatch.setenv(presets.ENV_VAR, "full")
    assert presets.select(sizes) == {"n": 2}
    monkeypatch.setenv(presets.ENV_VAR, "medium")  # a file's own extra preset
    assert presets.select(sizes) == {"n": 3}
    with pytest.raises(ValueError, match="choose one of"):  # another file's extra preset
        presets.select({"quick": {}, "full": {}})
    monkeypatch.setenv(presets.ENV_VAR, "full")
    with pytest.raises(ValueError, match="defines only"):
        presets.select({"quick": {}})
    monkeypatch.setenv(presets.ENV_VAR, "huge")
    with pytest.raises(ValueError, match="choose one of"):
        presets.preset(sizes)


def test_machine_id_is_a_slug():
    mid = machine.machine_id()
    assert mid.endswith(f"{machine.cpu_cores()}c") or "-nvidia" in mid
    assert all(c.isalnum() or c == "-" for c in mid)
    assert machine._slug("Intel(R) Xeon(R) Platinum 8480+ CPU @ 2.00GHz") == "intel-xeon-platinum-8480"
    assert machine._slug("AMD EPYC 7763 64-Core Processor") == "amd-epyc-7763"


def test_matmul_rate_picks_the_closest_thread_count():
    info = {"matmul": {"cpu_gflops": {"1": 50.0, "8": 350.0}}}
    assert machine.matmul_rate(info, 1) == 50.0
    assert machine.matmul_rate(info, 6) == 350.0
    assert machine.matmul_rate(info, None) == 350.0
    assert machine.matmul_rate({}, 4) is None


def test_peak_memory_sees_an_allocation_inside_the_block():
    with machine.PeakMemory() as outer:
        with machine.PeakMemory() as inner:
            big = np.ones(64 * 2 ** 20 // 8)  # 64 MiB, touched
        del big
        with machine.PeakMemory() as later:
            small = np.ones(1024)
        del small
    assert inner.mib >= 60
    assert outer.mib >= 60, "a nested block's reset must not hide the outer block's peak"
    if later.method == "VmHWM reset":
        assert later.mib < 30


def _bench(name, median, extra, fullname="benchmarks/bench_x.py::" ):
    return {"name": name, "fullname": fullname + name, "group": None, "extra_info": extra,
            "stats": {"median": median, "min": median * 0.9, "rounds": 3}}


@pytest.fixture
def fake_run(tmp_path):
    info = {"machine_id": "test-2c", "cpu_model": "Test CPU", "cpu_cores": 2, "gpu": None,
            "matmul": {"n": 1024, "cpu_gflops": {"1": 50.0, "2": 100.0}}, "versions": {"torch": "x"}}
    benches = [
        _bench(f"test_sweep[{m}]", m / 1e5, {"M": m, "algo": "comp", "form": "sparse", "threads": 1,
                                            "signals_per_s": 1e5 / m, "ours_gflops": 40.0,
                                            "speedup_vs_reference": 4.0, "reference_status": "ok"})
        for m in (10_000, 100_000)
    ] + [
        _bench("test_peer", 0.5, {"ours_images_per_s": 20.0, "speedup_vs_sklearn": 25.0,
                                  "spams_status": "invalid: all-zero codes", "target_20x_met": False,
                                  "pot_scaling": "per problem (linear)"}),
    ]
    path = tmp_path / "pytest-benchmark.json"
    path.write_text(json.dumps({"machine_info": {"fastinterp": info}, "benchmarks": benches}))
    return path


def test_report_rows_table_and_plots(fake_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    meta = {"preset": "quick", "command": "test", "started": "now", "wall_s": 1.0}
    rep = report.build(fake_run, out, None, ["SKIPPED [1] x.py:1: GPU case"], meta)
    rows = {r["case"]: r for r in rep["rows"]}
    sweep = rows["test_sweep[10000]"]
    assert sweep["throughput"] == 10.0 and sweep["throughput_unit"] == "signals/s"
    assert sweep["speedups"] == {"reference": 4.0}
    assert sweep["fraction_of_matmul"] == 0.8  # 40 GFLOP/s over the 1-thread 50 GFLOP/s
    peer = rows["test_peer"]
    assert peer["speedups"] == {"sklearn": 25.0}
    assert "spams: invalid: all-zero codes" in peer["notes"]
    assert any("not met" in n for n in peer["notes"])
    md = (out / "benchmarks.md").read_text()
    assert md.count("\n| `test_") == 3 and "GPU case" in md and "AOT compilation not run" in md
    assert "throughput_vs_dictionary_size.png" in rep["plots"]
    assert (out / "throughput_vs_dictionary_size.png").stat().st_size > 1000
    assert json.loads((out / "benchmarks.json").read_text())["machine"]["machine_id"] == "test-2c"


def test_machine_slowdown_compares_the_matmul_rates(fake_run, tmp_path):
    slow = tmp_path / "slow.json"
    data = json.loads(fake_run.read_text())
    data["machine_info"]["fastinterp"]["matmul"]["cpu_gflops"] = {"2": 50.0, "4": 10.0}
    slow.write_text(json.dumps(data))
    assert report.machine_slowdown(fake_run, slow) == 2.0  # 100 / 50 at 2 threads, the most in both
    assert report.machine_slowdown(fake_run, fake_run) == 1.0
    data["machine_info"]["fastinterp"]["matmul"]["cpu_gflops"] = {"8": 1.0}
    slow.write_text(json.dumps(data))
    assert report.machine_slowdown(fake_run, slow) is None


def test_report_command_renders_an_existing_json(fake_run, tmp_path):
    out = tmp_path / "rendered"
    code = report.main(["--from-json", str(fake_run), "--output", str(out), "--no-aot"])
    assert code == 0
    assert "| `test_peer` |" in (out / "benchmarks.md").read_text()


def test_report_merges_several_runs(fake_run, tmp_path):
    other = tmp_path / "other.json"
    data = json.loads(fake_run.read_text())
    data["benchmarks"] = [_bench("test_other", 0.1, {"ours_images_per_s": 5.0})]
    other.write_text(json.dumps(data))
    out = tmp_path / "merged"
    assert report.main(["--from-json", str(fake_run), str(other), "--output", str(out), "--no-aot"]) == 0
    md = (out / "benchmarks.md").read_text()
    assert "| `test_peer` |" in md and "| `test_other` |" in md


BENCH_FILE = """
import os, time

def test_sleep(benchmark):
    benchmark.pedantic(time.sleep, args=(float(os.environ["SLEEP_S"]),), rounds=3, iterations=1)
"""


def test_regression_gate_fails_on_a_slowdown_beyond_the_threshold(tmp_path, monkeypatch):
    """The gate of `python -m benchmarks.report --compare` (the newest baseline saved for the
    preset, report.gate_args) fails a run 3x slower than the baseline and passes one at the
    same speed."""
    pytest.importorskip("pytest_benchmark")
    (tmp_path / "bench_sleep.py").write_text(textwrap.dedent(BENCH_FILE))
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    store = tmp_path / "baselines" / "test-machine"

    def run(sleep_s, *args):
        cmd = [sys.executable, "-m", "pytest", "bench_sleep.py", "-q", "-p", "no:cacheprovider",
               "--benchmark-only", f"--benchmark-storage=file://{store}", *args]
        return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "SLEEP_S": str(sleep_s)})

    for preset in ("full", "quick"):
        saved = run(0.02 if preset == "quick" else 0.2, f"--benchmark-save={preset}")
        assert saved.returncode == 0, saved.stdout + saved.stderr
    monkeypatch.setattr(report, "BASELINES", tmp_path / "baselines")
    baseline = report.saved_baseline("quick", "test-machine")
    assert report.saved_baseline("medium", "test-machine") is None
    assert baseline is not None and baseline.name.endswith("_quick.json")
    same = run(0.02, *report.gate_args(baseline))
    assert same.returncode == 0, same.stdout + same.stderr
    slow = run(0.06, *report.gate_args(baseline))
    assert slow.returncode != 0
    assert "Performance has regressed" in slow.stdout + slow.stderr
