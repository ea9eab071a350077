"""Sweeps: many models x layers x dictionaries x methods x image folders from one TOML spec,
expanded into a task graph with the shared work done once, run by the serial engine or on
Ray (local or a cluster), resumable, merged into one results table and a report.

    from fastinterp.sweep import load_spec, run_sweep, sweep_status
    spec = load_spec("sweep.toml")
    summary = run_sweep(spec, engine="ray", workers=2)      # or engine="serial"
    sweep_status(spec)["counts"]                            # {"done": ..., "pending": ..., "failed": ...}

The command is `fastinterp sweep run|status SPEC` (fastinterp.cli.sweep).
"""
from .graph import Graph, Task, build_graph
from .run import run_sweep, sweep_status
from .spec import Spec, SpecError, load_spec, parse_spec

__all__ = ["Graph", "Spec", "SpecError", "Task", "build_graph", "load_spec", "parse_spec", "run_sweep",
           "sweep_status"]
