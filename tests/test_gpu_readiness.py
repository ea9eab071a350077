"""GPU readiness on a machine without a GPU: every Triton kernel configuration the
dispatchers launch (`AOT_SPECS` of each kernel module) compiles ahead of time for sm_80 and
sm_90 with no register spills (cuobjdump's STACK 0), via `fastinterp.kernels.aot`.

All specs are compiled once, in one subprocess without TRITON_INTERPRET (set by conftest),
and the table is shared by the tests of this file.
"""
from __future__ import annotations

import json

import pytest

from fastinterp.kernels import aot

SAMPLE_CUOBJDUMP = """
Resource usage:
 Common:
  GLOBAL:0
 Function _select_kernel:
  REG:168 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:504 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function other_kernel:
  REG:40 STACK:16 SHARED:2048 LOCAL:8 CONSTANT[0]:400 CONSTANT[2]:12 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_parser_reads_sample_output():
    usage = aot.parse_resource_usage(SAMPLE_CUOBJDUMP)
    assert set(usage) == {"_select_kernel", "other_kernel"}
    assert usage["_select_kernel"]["REG"] == 168
    assert usage["_select_kernel"]["STACK"] == 0
    assert usage["_select_kernel"]["SHARED"] == 0
    assert usage["_select_kernel"]["CONSTANT[0]"] == 504
    assert usage["other_kernel"] == {"REG": 40, "STACK": 16, "SHARED": 2048, "LOCAL": 8, "CONSTANT[0]": 400,
                                     "CONSTANT[2]": 12, "TEXTURE": 0, "SURFACE": 0, "SAMPLER": 0}
    assert aot.parse_resource_usage("Resource usage:\n Common:\n  GLOBAL:0\n") == {}


def test_discover_finds_every_triton_module():
    pytest.importorskip("triton")
    specs = aot.discover_specs()
    modules = {m for m, _ in specs}
    assert {"normalize", "pursuit", "head_mask"} <= modules
    names = [s["name"] for _, s in specs]
    assert len(names) == len(set(names)), "AOT spec names must be unique"
    for _, spec in specs:
        assert set(spec["constexprs"]) <= {k for k, v in spec["signature"].items() if v == "constexpr"}
        assert spec["num_warps"] in (1, 2, 4, 8, 16) and spec["num_stages"] >= 1
    assert aot.discover_specs(only="normalize") == [(m, s) for m, s in specs if m == "normalize"]


def test_format_table_marks_spills_and_failures():
    base = {"module": "m", "function": "f", "num_warps": 4, "num_stages": 2, "registers": 64,
            "shared_static_bytes": 0, "shared_dynamic_bytes": 1024, "local_bytes": 0}
    report = aot.AotReport(rows=[
        {**base, "kernel": "a", "target": "sm_80", "stack_bytes": 0, "error": None},
        {**base, "kernel": "b", "target": "sm_90", "stack_bytes": 32, "error": None},
        {**base, "kernel": "c", "target": "sm_90", "registers": None, "stack_bytes": None, "error": "boom"},
    ])
    lines = aot.format_table(report).splitlines()
    assert len(lines) == 5
    assert lines[2].endswith("| ok |") and "| 64 | 0 |" in lines[2]
    assert lines[3].endswith("| SPILLS |")
    assert "FAILED: boom" in lines[4]
    assert not report.ok
    assert aot.AotReport(rows=report.rows[:1]).ok
    skipped = aot.AotReport(skipped="no ptxas")
    assert not skipped.ok and "no ptxas" in aot.format_table(skipped)


@pytest.fixture(scope="session")
def aot_report():
    pytest.importorskip("triton")
    reason = aot.missing_tools()
    if reason:
        pytest.skip(reason)
    return aot.resource_table(timeout=600)


def test_table_has_a_row_per_spec_and_target(aot_report):
    specs = aot.discover_specs()
    assert aot_report.skipped is None
    got = sorted((r["kernel"], r["target"]) for r in aot_report.rows)
    want = sorted((s["name"], f"sm_{a}") for _, s in specs for a in aot.ARCHS)
    assert got == want


def test_every_spec_compiles_without_spills(aot_report):
    failed = [(r["kernel"], r["target"], r["error"]) for r in aot_report.rows if r["error"]]
    assert not failed, failed
    spills = [(r["kernel"], r["target"], r["stack_bytes"]) for r in aot_report.rows if r["stack_bytes"] != 0]
    assert not spills, f"register spills (STACK != 0): {spills}"
    for r in aot_report.rows:
        assert 0 < r["registers"] <= 255, r
        assert r["local_bytes"] == 0, r
        # every launch fits the 48 KiB of shared memory available without opt-in
        assert r["shared_dynamic_bytes"] + r["shared_static_bytes"] <= 48 * 1024, r
    assert aot_report.ok
    table = aot.format_table(aot_report)
    assert table.count("\n") == len(aot_report.rows) + 2 and "SPILLS" not in table


def test_aot_command_line(capsys):
    from fastinterp.cli import main

    if aot.missing_tools():
        pytest.skip(aot.missing_tools())
    assert main(["aot", "--only", "normalize", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]
    assert rows and {r["target"] for r in rows} == {"sm_80", "sm_90"} and all(r["stack_bytes"] == 0 for r in rows)
    assert main(["aot", "--arch", "x"]) == 2
    assert "--arch 'x'" in capsys.readouterr().err
