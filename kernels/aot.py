"""Ahead-of-time compilation of every Triton kernel for sm_80 and sm_90, on any machine.

GPU readiness without a GPU: each Triton kernel module in this package exposes
`AOT_SPECS`, one dict per configuration its dispatcher launches::

    {"name": str, "fn": <@triton.jit function>, "signature": {arg: "*fp32" | "i32" | ... |
     "constexpr"}, "constexprs": {arg: value}, "num_warps": int, "num_stages": int}

This module compiles every spec with `triton.compile(ASTSource(...), target=GPUTarget(
"cuda", arch, 32))` (which needs only the ptxas shipped inside the triton wheel, no GPU and
no driver), then reads each cubin's resource usage with the wheel's
`cuobjdump --dump-resource-usage`: registers per thread (REG), stack frame bytes (STACK:
non-zero means register spills or local arrays), static shared memory (SHARED) and local
memory (LOCAL); the dynamic shared memory Triton allocates per launch comes from the
compiled kernel's metadata.

Compilation runs in a fresh interpreter without `TRITON_INTERPRET` (under the interpreter,
`@triton.jit` functions cannot be compiled; the test suite sets it), so `resource_table()`
can be called from anywhere.

    fastinterp aot                              # Markdown table, both targets
    fastinterp aot --json                       # the rows as JSON
    fastinterp aot --arch 90 --only pursuit     # (python -m fastinterp.kernels.aot: the same)
"""
from __future__ import annotations

import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

from .dispatch import env_value

__all__ = ["ARCHS", "AotReport", "discover_specs", "format_table", "missing_tools",
           "parse_resource_usage", "resource_table"]

ARCHS = (80, 90)
"""Compute capabilities compiled for: sm_80 (A100) and sm_90 (H100)."""

_SKIP_MODULES = {"aot", "dispatch", "__init__"}
_RESOURCE_LINE = re.compile(r"^\s*Function\s+(?P<name>\S+?):?\s*$")
_FIELD = re.compile(r"(?P<key>[A-Z_]+(?:\[\d+\])?):(?P<value>\d+)")


@dataclass
class AotReport:
    """Rows of the resource table, or the reason there are none.

    rows: one dict per (spec, target) with keys module, kernel, function, target, num_warps,
    num_stages, registers, stack_bytes, shared_static_bytes, shared_dynamic_bytes,
    local_bytes, error (None when it compiled).
    """

    rows: list[dict] = field(default_factory=list)
    skipped: str | None = None

    @property
    def ok(self) -> bool:
        """Every spec compiled with no stack frame (no register spills)."""
        return self.skipped is None and bool(self.rows) and all(
            r["error"] is None and r["stack_bytes"] == 0 for r in self.rows)


def _triton_bin(name: str) -> str | None:
    """Path of a tool shipped inside the triton wheel, or None."""
    try:
        import triton
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else None


def missing_tools() -> str | None:
    """Why AOT compilation cannot run here, or None if it can."""
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:
        return f"triton with triton.compiler.ASTSource / GPUTarget is not importable ({exc}); pip install triton"
    ptxas = env_value("TRITON_PTXAS_PATH") or _triton_bin("ptxas")
    if not ptxas or not os.path.exists(ptxas):
        return "ptxas not found (neither TRITON_PTXAS_PATH nor triton/backends/nvidia/bin/ptxas)"
    if _triton_bin("cuobjdump") is None:
        return "cuobjdump not found in triton/backends/nvidia/bin (this triton wheel does not ship it)"
    return None


def discover_specs(only: str | None = None) -> list[tuple[str, dict]]:
    """(module name, spec) for every `AOT_SPECS` entry of every module of this package.

    only: keep specs whose module or kernel name contains this substring.
    """
    package = importlib.import_module(__package__ or "fastinterp.kernels")
    found = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if info.name in _SKIP_MODULES:
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for spec in getattr(module, "AOT_SPECS", None) or []:
            missing = {"name", "fn", "signature", "constexprs", "num_warps", "num_stages"} - set(spec)
            if missing:
                raise ValueError(f"{module.__name__}.AOT_SPECS entry {spec.get('name')!r} lacks {sorted(missing)}")
            if only is None or only in info.name or only in spec["name"]:
                found.append((info.name, spec))
    return found


def parse_resource_usage(text: str) -> dict[str, dict[str, int]]:
    """Parse `cuobjdump --dump-resource-usage` output.

    Returns {function name: {"REG": int, "STACK": int, "SHARED": int, "LOCAL": int, ...}}
    for each ` Function <name>:` block (keys as printed, e.g. "CONSTANT[0]").
    """
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        m = _RESOURCE_LINE.match(line)
        if m:
            current = m.group("name")
            out[current] = {}
            continue
        if current is not None:
            fields = {f.group("key"): int(f.group("value")) for f in _FIELD.finditer(line)}
            if "REG" in fields:
                out[current].update(fields)
                current = None
    return out


def _compile_one(module: str, spec: dict, arch: int, cuobjdump: str) -> dict:
    """Compile one spec for one target and read its resources (call with TRITON_INTERPRET unset)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = {"module": module, "kernel": spec["name"], "function": getattr(spec["fn"], "__name__", "?"),
           "target": f"sm_{arch}", "num_warps": spec["num_warps"], "num_stages": spec["num_stages"],
           "registers": None, "stack_bytes": None, "shared_static_bytes": None,
           "shared_dynamic_bytes": None, "local_bytes": None, "error": None}
    try:
        src = ASTSource(spec["fn"], spec["signature"], constexprs=spec["constexprs"])
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "kernel.cubin")
            with open(path, "wb") as fh:
                fh.write(kernel.asm["cubin"])
            res = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True,
                                 text=True, timeout=60)
        if res.returncode != 0:
            raise RuntimeError(f"cuobjdump failed: {res.stderr.strip()[-300:]}")
        usage = parse_resource_usage(res.stdout)
        name = kernel.metadata.name
        fields = usage.get(name) or (next(iter(usage.values())) if len(usage) == 1 else None)
        if fields is None:
            raise RuntimeError(f"no resource line for {name!r} in cuobjdump output: {res.stdout[-300:]!r}")
        row.update(registers=fields.get("REG"), stack_bytes=fields.get("STACK"),
                   shared_static_bytes=fields.get("SHARED"), local_bytes=fields.get("LOCAL"),
                   shared_dynamic_bytes=int(getattr(kernel.metadata, "shared", 0) or 0))
    except Exception as exc:  # noqa: BLE001 - one spec's failure is a row, not the end of the table
        row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"[:400]
    return row


def _compile_all(archs, only) -> AotReport:
    reason = missing_tools()
    if reason:
        return AotReport(skipped=reason)
    from .dispatch import triton_interpreting

    if triton_interpreting():
        raise RuntimeError("AOT compilation needs TRITON_INTERPRET unset; use resource_table(), "
                           "which runs it in a fresh interpreter")
    cuobjdump = _triton_bin("cuobjdump")
    rows = [_compile_one(module, spec, arch, cuobjdump)
            for module, spec in discover_specs(only) for arch in archs]
    return AotReport(rows=rows)


def resource_table(archs=ARCHS, only: str | None = None, timeout: float = 900.0) -> AotReport:
    """Compile every AOT spec for each arch in a fresh interpreter (TRITON_INTERPRET unset).

    Returns an AotReport; `.skipped` says why when the tools are missing. Raises
    RuntimeError if the compiling process itself fails.
    """
    reason = missing_tools()
    if reason:
        return AotReport(skipped=reason)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-c", "import sys; from fastinterp.kernels.aot import _compile_all_json; "
           "_compile_all_json(sys.argv[1], sys.argv[2])", ",".join(str(a) for a in archs), only or ""]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"AOT compilation process failed (exit {res.returncode}): {res.stderr[-2000:]}")
    data = json.loads(res.stdout.strip().splitlines()[-1])
    return AotReport(rows=data["rows"], skipped=data["skipped"])


def format_table(report: AotReport) -> str:
    """The report as a Markdown table (or a line saying why it was skipped)."""
    if report.skipped:
        return f"AOT compilation skipped: {report.skipped}\n"
    lines = ["| kernel | target | warps | stages | registers | stack (spill) bytes | shared static B "
             "| shared dynamic B | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report.rows:
        if r["error"]:
            status = f"FAILED: {r['error']}"
        else:
            status = "ok" if r["stack_bytes"] == 0 else "SPILLS"
        cells = [f"`{r['kernel']}`", r["target"], r["num_warps"], r["num_stages"], r["registers"],
                 r["stack_bytes"], r["shared_static_bytes"], r["shared_dynamic_bytes"], status]
        lines.append("| " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _compile_all_json(archs: str, only: str) -> None:
    """The child process of `resource_table`: compile here, print the rows as one JSON line."""
    report = _compile_all(tuple(int(a) for a in archs.split(",")), only or None)
    print(json.dumps({"rows": report.rows, "skipped": report.skipped}))


def run(archs=ARCHS, only: str | None = None, *, as_json: bool = False) -> int:
    """Compile, print the table (or JSON); 0 when every configuration compiled without spills."""
    report = resource_table(archs, only)
    if as_json:
        print(json.dumps({"rows": report.rows, "skipped": report.skipped}))
    else:
        print(format_table(report), end="")
    return 0 if (report.ok or report.skipped) else 1


if __name__ == "__main__":  # an entry point: the command line lives in fastinterp.cli (`fastinterp aot`)
    from fastinterp.cli import main

    sys.exit(main(["aot", *sys.argv[1:]]))
