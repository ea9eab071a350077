"""pytest configuration of the benchmark suite (this folder only; `pytest` alone runs tests/).

* collects ``bench_*.py`` files here (the project's testpaths stay ["tests"]);
* ``--preset quick|full|...`` sets FASTINTERP_BENCH_PRESET before the files are imported
  (each file sizes its cases from it, see benchmarks/presets.py);
* ``@pytest.mark.gpu`` cases are skipped, saying why, where CUDA is not available;
* the machine (CPU / GPU model, threads, versions, the fp32 matmul rate measured in this
  run) is recorded in the benchmark JSON under ``machine_info["fastinterp"]``.

    python -m pytest benchmarks --benchmark-only --preset quick
"""
from __future__ import annotations

import fnmatch
import os

import pytest

from benchmarks import machine, presets

_HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_addoption(parser):
    group = parser.getgroup("fastinterp benchmarks")
    group.addoption("--preset", default=None,
                    help=f"benchmark size preset: {' | '.join(presets.PRESETS)} (sets {presets.ENV_VAR}; "
                         f"default: the variable's value, else {presets.DEFAULT!r})")


def pytest_configure(config):
    name = config.getoption("--preset", default=None)
    if name:
        os.environ[presets.ENV_VAR] = name
    elif not os.environ.get(presets.ENV_VAR):
        os.environ[presets.ENV_VAR] = presets.DEFAULT
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped, with the reason, without one)")


def pytest_report_header(config):
    return (f"fastinterp benchmarks: preset {os.environ.get(presets.ENV_VAR)!r}, machine id "
            f"{machine.machine_id()!r} (recorded in the benchmark JSON under machine_info.fastinterp)")


def pytest_collect_file(file_path, parent):
    """Collect benchmarks/bench_*.py unless pytest's own python_files patterns already do."""
    if file_path.suffix != ".py" or not fnmatch.fnmatch(file_path.name, "bench_*.py"):
        return None
    if os.path.dirname(os.path.abspath(str(file_path))) != _HERE:
        return None
    if parent.session.isinitpath(file_path) or any(
            fnmatch.fnmatch(file_path.name, pat) for pat in parent.config.getini("python_files")):
        return None  # the python plugin collects it
    return pytest.Module.from_parent(parent, path=file_path)


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="GPU case: CUDA is not available on this machine "
                                   "(torch.cuda.is_available() is False); no GPU numbers were measured")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _case_peak_memory(request):
    """Every benchmark case records the peak RSS of its whole body (ours and its baselines,
    module-scoped set-up excluded) above the level at its start: extra_info["case_peak_rss_mib"]."""
    if "benchmark" not in request.fixturenames:
        yield
        return
    bench = request.getfixturevalue("benchmark")
    with machine.PeakMemory() as mem:
        yield
    bench.extra_info.setdefault("case_peak_rss_mib", mem.mib)
    bench.extra_info.setdefault("case_peak_rss_method", mem.method)
    if mem.gpu_mib is not None:
        bench.extra_info.setdefault("case_peak_gpu_mib", mem.gpu_mib)


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["fastinterp"] = machine.machine_info()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["fastinterp_preset"] = os.environ.get(presets.ENV_VAR)
