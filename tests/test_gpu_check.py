"""The prepared GPU check (`python -m benchmarks.gpu`, issue 16) in its CPU dry run: tiny
sizes, CPU tensors, the Triton interpreter. Run as a subprocess (TRITON_INTERPRET must be set
before triton is imported), so that the script that will run on the GPU never rots."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import gpu  # noqa: E402  (the module imports nothing heavy at import time)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    env = {k: v for k, v in os.environ.items() if k not in ("FASTINTERP_BACKEND", "CUDA_VISIBLE_DEVICES")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--dry-run", "--output", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return proc, out


def test_dry_run_exits_zero(dry_run):
    proc, _ = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def test_every_stage_ran_and_every_correctness_verdict_is_true(dry_run):
    proc, out = dry_run
    data = json.loads((out / "gpu.json").read_text())
    assert data["dry_run"] is True and data["finished"] is True
    names = [s["name"] for s in data["stages"]]
    assert names == gpu.STAGES
    for st in data["stages"]:
        assert st["status"] == "done", (st["name"], st.get("error"), st.get("traceback"))
        for case in st["cases"]:
            assert not case.get("error"), (st["name"], case["case"], case.get("traceback"))
            assert case.get("ok") is not False, (st["name"], case)
    for name in gpu.CORRECTNESS_STAGES:
        cases = next(s for s in data["stages"] if s["name"] == name)["cases"]
        assert any(c.get("ok") is True for c in cases), name
    verdict = data["verdict"]
    assert verdict["correct"] and not verdict["failed"] and verdict["passed"] >= 20
    # the kernels really ran as Triton (the interpreter), not silently on the torch path
    ran = [c for s in data["stages"] for c in s["cases"] if "last_backend" in c]
    assert ran and all("triton" in str(c["last_backend"]) for c in ran)
    # the CRF dependency is never imported; the pipeline that needs it is recorded as skipped
    assert data["modules_never_imported"] == {"pydensecrf": True}
    mutual = next(s for s in data["stages"] if s["name"] == "c_mutual")
    assert "pydensecrf" in mutual["note"] and mutual["cases"][0]["skipped"]
    # throughput rows and targets are produced (not judged in a dry run)
    b = next(s for s in data["stages"] if s["name"] == "b_pursuit")["cases"]
    assert any("speedup_vs_torch" in c and "triton_over_k_matmuls" in c for c in b)
    assert data["targets"] and all(t["pass"] is None for t in data["targets"][:-1])
    assert data["targets"][-1]["pass"] is True
    assert data["peak"].get("float32_tflops") and data["machine"]["versions"]["torch"]


def test_markdown_and_plot_written(dry_run):
    _, out = dry_run
    md = (out / "gpu.md").read_text()
    assert "DRY RUN" in md and "## Targets" in md
    for name in gpu.STAGES:
        assert f"## {name}:" in md
    assert "FAIL" not in md and "ERROR" not in md
    assert (out / "gpu.png").stat().st_size > 1000


def test_budget_skips_are_recorded(tmp_path):
    """A budget that is already spent skips every case and records why, without failing."""
    env = {k: v for k, v in os.environ.items() if k != "FASTINTERP_BACKEND"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--dry-run", "--output", str(tmp_path),
                           "--budget-s", "0", "--stages", "a_normalize,c_mutual"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "gpu.json").read_text())
    norm = next(s for s in data["stages"] if s["name"] == "a_normalize")
    assert norm["cases"] and all(c["skipped"].startswith("budget") for c in norm["cases"])
