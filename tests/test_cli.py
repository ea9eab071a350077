import json
import subprocess
import sys

from pathlib import Path

import pytest

import fastinterp
from fastinterp.cli import main


def test_info_prints_versions_and_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "open_clip" in out and "backends available: torch=yes" in out


def test_demo_writes_report(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--output", str(out), "--quiet"]) == 0
    report = (out / "report.md").read_text()
    assert "fastinterp demo report" in report and "267 concepts" in report
    data = json.loads((out / "report.json").read_text())
    assert data["vit"]["layers"] == 4 and set(data["nearest_concepts"]) == {"astronaut", "coffee", "chelsea", "rocket"}
    assert (out / "nearest_concepts.png").stat().st_size > 10_000
    record = json.loads((out / "run.json").read_text())
    assert record["model"]["name"] == "fastinterp-tiny-ViT" and record["model"]["seed"] == 0
    assert len(record["model"]["weights_sha256"]) == 64 and list(record["steps"]) == ["demo"]


def test_cli_error_exit_code(tmp_path, capsys):
    assert main(["demo", "--model-name", "ViT-B-61", "--output", str(tmp_path)]) == 2
    assert "Did you mean" in capsys.readouterr().err


REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("where", ["outside", "checkout"])
def test_cli_runs_installed_and_from_a_checkout(tmp_path, where):
    # from the repository root the source folder shadows the installed package: both must work
    cwd = tmp_path if where == "outside" else REPO_ROOT
    r = subprocess.run([sys.executable, "-m", "fastinterp.cli", "info"], capture_output=True, text=True,
                       timeout=120, cwd=cwd)
    assert r.returncode == 0, r.stderr
    assert fastinterp.__version__ in r.stdout and "backends available" in r.stdout


def test_no_top_level_kernels_module_installed(tmp_path):
    # from a folder outside the repository, only fastinterp.kernels may resolve
    code = ("import importlib.util, fastinterp.kernels as K; "
            "print(importlib.util.find_spec('kernels') is None, K.__name__, hasattr(K, 'l2_normalize_rows'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "fastinterp.kernels", "True"]
