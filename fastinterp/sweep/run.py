"""Run a sweep (`run_sweep`) and tell where one stands (`sweep_status`)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..io import atomic_open, read_json
from .engines import make_engine, schedule
from .graph import build_graph
from .spec import Spec
from .tasks import ERROR_FILE, task_done

__all__ = ["run_sweep", "sweep_status", "task_dicts", "GRAPH_FILE", "TIMINGS_FILE"]

GRAPH_FILE = "sweep.json"
TIMINGS_FILE = "timings.json"


def _write_json(path: Path, obj) -> None:
    with atomic_open(path, "w") as f:
        f.write(json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n")


def task_dicts(graph) -> dict[str, dict]:
    """What a worker gets for each task: its description, payload and the folders of its
    dependencies (by role)."""
    out = {}
    for t in graph.tasks.values():
        d = t.describe()
        d["payload"] = t.payload
        d["dep_ids"] = t.dep_ids
        d["dep_folders"] = {r: ([graph.tasks[i].folder for i in v] if isinstance(v, list) else graph.tasks[v].folder)
                            for r, v in t.deps.items()}
        out[t.id] = d
    return out


def _run_settings(spec: Spec) -> dict:
    import os

    from .tasks import FAULT_ENV

    return {"seed": spec.seed, "threads": spec.threads, "device": spec.device, "dictionaries": spec.dictionaries,
            "methods": sorted(spec.methods), "fault": os.environ.get(FAULT_ENV)}


class _Progress:
    """One bar over all tasks; its postfix names the running ones."""

    def __init__(self, tasks: dict, total: int, initial: int, enabled: bool):
        from tqdm.auto import tqdm

        self.tasks, self.running = tasks, []
        self.bar = tqdm(total=total, initial=initial, desc="sweep", unit="task", disable=not enabled)

    def _show(self):
        names = [self.tasks[t]["name"] for t in self.running]
        self.bar.set_postfix_str("; ".join(names)[:160], refresh=True)

    def start(self, tid):
        self.running.append(tid)
        self._show()

    def finish(self, tid, outcome):
        if tid in self.running:
            self.running.remove(tid)
        self.bar.update(1)
        if not outcome["ok"] and "error" in outcome:
            self.bar.write(f"failed: {self.tasks[tid]['name']}: {outcome['error']}")
        self._show()

    def close(self):
        self.bar.close()


def _record_failure(root: Path, task: dict, outcome: dict) -> None:
    if "error" in outcome:  # blocked tasks write nothing: they never started
        _write_json(root / task["folder"] / ERROR_FILE,
                    {"key": task["key"], "error": outcome["error"], "traceback": outcome.get("traceback", "")})


def run_sweep(spec: Spec, *, engine: str = "serial", workers: int | None = None, address: str | None = None,
              object_store_memory: int | None = None, progress: bool = True, report: bool = True) -> dict:
    """Run every task of the spec's graph that is not already done (same key, outputs
    intact); write the merged results table and (with `report`) the report. Returns
    {"tasks", "ran", "reused", "failed", "blocked", "startup_s", "wall_s", "results"}."""
    from .results import write_results

    t0 = time.perf_counter()
    root = spec.output
    root.mkdir(parents=True, exist_ok=True)
    graph = build_graph(spec)
    _write_json(root / GRAPH_FILE, graph.describe())
    tasks = task_dicts(graph)
    for t in tasks.values():
        t["name"] = graph.tasks[t["id"]].name
    done = {tid for tid, t in tasks.items() if task_done(root, t)}
    todo = [tid for tid in tasks if tid not in done]
    bar = _Progress(tasks, len(tasks), len(done), progress)
    outcomes: dict = {}
    startup = 0.0
    try:
        if todo:
            eng = make_engine(engine, root, _run_settings(spec), spec.retries, **(
                {"workers": workers, "address": address, "object_store_memory": object_store_memory}
                if engine == "ray" else {}))
            startup = eng.startup_s
            try:
                t_sched = time.perf_counter()
                outcomes = schedule(eng, tasks, todo, done, on_start=bar.start, on_finish=bar.finish)
                sched_s = time.perf_counter() - t_sched
            finally:
                eng.close()
        else:
            sched_s = 0.0
    finally:
        bar.close()
    for tid, o in outcomes.items():
        if not o["ok"]:
            _record_failure(root, tasks[tid], o)
    summary = {"tasks": len(tasks), "reused": len(tasks) - len(todo),
               "ran": sum(o["ok"] for o in outcomes.values()),
               "failed": {tid: o["error"] for tid, o in outcomes.items() if "error" in o},
               "blocked": {tid: o["blocked_by"] for tid, o in outcomes.items() if "blocked_by" in o},
               "engine": engine, "startup_s": startup, "schedule_s": sched_s}
    status = {tid: ("done" if tid in done else "failed" if tid in summary["failed"] else
                    "blocked" if tid in summary["blocked"] else "pending") for tid in tasks}
    summary["results"] = write_results(root, graph, tasks, status, report=report)
    summary["wall_s"] = time.perf_counter() - t0
    _write_timings(root, tasks, outcomes, summary, workers)
    return summary


def _write_timings(root: Path, tasks: dict, outcomes: dict, summary: dict, workers) -> None:
    """timings.json: engine, start-up, wall time and each task's seconds (kept out of the
    results and records, so those compare byte for byte across engines)."""
    per_task = {}
    for tid, t in tasks.items():
        rec = read_json(root / t["folder"] / "timing.json")
        if rec:
            per_task[tid] = {"name": t["name"], "seconds": rec["seconds"], "cpu_seconds": rec.get("cpu_seconds"),
                             "ran_now": tid in outcomes}
    _write_json(root / TIMINGS_FILE, {
        "engine": summary["engine"], "workers": workers, "startup_s": summary["startup_s"],
        "schedule_s": summary["schedule_s"], "wall_s": summary["wall_s"], "tasks": per_task,
        "task_seconds_this_run": sum(v["seconds"] for v in per_task.values() if v["ran_now"])})


def sweep_status(spec: Spec, *, verify: bool = False) -> dict:
    """Each task's state: done (record matches, outputs there), failed (an error for this
    key), pending. Returns {"counts", "tasks": [{"id", "name", "state", "error"}]}."""
    root = spec.output
    graph = build_graph(spec)
    tasks = task_dicts(graph)
    rows = []
    for tid, t in tasks.items():
        state, err = "pending", None
        if task_done(root, t, verify=verify):
            state = "done"
        else:
            e = read_json(root / t["folder"] / ERROR_FILE)
            if isinstance(e, dict) and e.get("key") == t["key"]:
                state, err = "failed", e.get("error")
        rows.append({"id": tid, "name": graph.tasks[tid].name, "kind": t["kind"], "state": state, "error": err})
    counts = {s: sum(r["state"] == s for r in rows) for s in ("done", "pending", "failed")}
    return {"output": str(root), "counts": counts, "tasks": rows}
