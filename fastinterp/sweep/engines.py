"""Engines that run a sweep's tasks: `serial` (in this process, the reference) and `ray`
(a local Ray started in-process, or an existing cluster by address).

Both share one scheduler (`schedule`): a task is submitted once all its dependencies are
done, at most `slots` at a time (so the ones in flight are the ones running), in graph
order; a task that fails after its retries is reported and everything depending on it is
blocked, while the other tasks finish.
"""
from __future__ import annotations

import os
import time
import traceback

from .tasks import execute

__all__ = ["SerialEngine", "RayEngine", "schedule", "make_engine"]


def _numba_threads() -> int | None:
    try:
        import numba
    except ImportError:
        return None
    return numba.get_num_threads()


class SerialEngine:
    """Runs each task in this process when waited on; exceptions are retried `retries` times."""

    name = "serial"

    def __init__(self, root, run: dict, retries: int):
        self.root, self.run, self.retries = root, run, retries
        self.queue: list[dict] = []
        self.startup_s = 0.0
        self.slots = 1

    def submit(self, task: dict) -> None:
        self.queue.append(task)

    def wait(self) -> list[tuple[str, dict]]:
        import torch

        task = self.queue.pop(0)
        threads = torch.get_num_threads()
        numba_threads = _numba_threads()
        err = None
        try:
            for attempt in range(self.retries + 1):
                try:
                    return [(task["id"], {"ok": True, "attempts": attempt + 1, **execute(task, self.root, self.run)})]
                except Exception as e:  # noqa: BLE001 - any failure of the task is reported, never raised
                    err = e
        finally:
            torch.set_num_threads(threads)
            if numba_threads:
                import numba

                numba.set_num_threads(numba_threads)
        return [(task["id"], {"ok": False, "attempts": self.retries + 1, "error": f"{type(err).__name__}: {err}",
                              "traceback": "".join(traceback.format_exception(err))})]

    def close(self) -> None:
        pass


def _remote_execute(task, root, run):
    return execute(task, root, run)


def _warm(seconds: float) -> int:
    """Imports what every task needs (torch, open_clip, the methods) in a worker: start-up."""
    import open_clip  # noqa: F401

    from .. import ccs, mutual, sith  # noqa: F401

    time.sleep(seconds)
    return os.getpid()


class RayEngine:
    """Ray tasks: one CPU per torch thread (a GPU when the node has CUDA), retried by Ray
    after exceptions and worker deaths (killed, out of memory)."""

    name = "ray"

    def __init__(self, root, run: dict, retries: int, *, workers: int | None = None, address: str | None = None,
                 object_store_memory: int | None = None):
        os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
        try:
            import ray
        except ModuleNotFoundError:
            raise RuntimeError("the ray engine needs Ray: pip install 'fastinterp[sweep]' (or --engine serial)") from None
        self.ray, self.root, self.run = ray, root, run
        t0 = time.perf_counter()
        threads = run["threads"]
        self.owner = not ray.is_initialized()  # a Ray this process already joined is used as it is
        if self.owner and address is None:
            import torch

            n = workers or max(1, (os.cpu_count() or 1) // threads)
            ray.init(num_cpus=n * threads, num_gpus=torch.cuda.device_count(), include_dashboard=False,
                     object_store_memory=object_store_memory, log_to_driver=False, configure_logging=False,
                     _node_ip_address="127.0.0.1")  # a local Ray listens on the loopback only
        elif self.owner:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        res = ray.cluster_resources()
        gpus = 1 if res.get("GPU", 0) >= 1 and run.get("device") != "cpu" else 0
        self.slots = int(res.get("GPU", 0)) if gpus else max(1, int(res.get("CPU", 1) // threads))
        if (address is not None or not self.owner) and workers:
            self.slots = min(self.slots, workers)
        opts = dict(num_cpus=threads, num_gpus=gpus)
        self.remote = ray.remote(_remote_execute).options(max_retries=retries, retry_exceptions=True, **opts)
        ray.get([ray.remote(_warm).options(**opts).remote(0.3) for _ in range(self.slots)])
        self.startup_s = time.perf_counter() - t0
        self.inflight: dict = {}  # ObjectRef -> task id

    def submit(self, task: dict) -> None:
        self.inflight[self.remote.remote(task, str(self.root), self.run)] = task["id"]

    def wait(self) -> list[tuple[str, dict]]:
        ready, _ = self.ray.wait(list(self.inflight), num_returns=1)
        out = []
        for ref in ready:
            tid = self.inflight.pop(ref)
            try:
                out.append((tid, {"ok": True, **self.ray.get(ref)}))
            except Exception as e:  # noqa: BLE001 - RayTaskError, WorkerCrashedError, OutOfMemoryError, ...
                cause = getattr(e, "cause", None) or e
                out.append((tid, {"ok": False, "error": f"{type(cause).__name__}: {str(cause).strip()[-2000:]}",
                                  "traceback": str(e)[-8000:]}))
        return out

    def close(self) -> None:
        if self.owner:
            self.ray.shutdown()


def make_engine(name: str, root, run: dict, retries: int, **kw):
    if name == "serial":
        return SerialEngine(root, run, retries)
    if name == "ray":
        return RayEngine(root, run, retries, **kw)
    raise ValueError(f"engine {name!r}: choose 'serial' or 'ray'")


def schedule(engine, tasks: dict, todo: list[str], done: set[str], *, on_start=None, on_finish=None) -> dict:
    """Run the task ids `todo` (graph order) whose dependencies are in `done` or in `todo`.
    Returns {task id: outcome} with "ok" and, for failures, "error"; blocked tasks get
    {"ok": False, "blocked_by": id}."""
    waiting = list(todo)
    outcomes: dict = {}
    running: set = set()
    while waiting or running:
        for tid in list(waiting):
            if len(running) >= engine.slots:
                break
            deps = tasks[tid]["dep_ids"]
            bad = next((d for d in deps if d in outcomes and not outcomes[d]["ok"]), None)
            if bad is not None:
                waiting.remove(tid)
                outcomes[tid] = {"ok": False, "blocked_by": outcomes[bad].get("blocked_by", bad)}
                if on_finish:
                    on_finish(tid, outcomes[tid])
            elif all(d in done for d in deps):
                waiting.remove(tid)
                running.add(tid)
                engine.submit(tasks[tid])
                if on_start:
                    on_start(tid)
        if not running:
            if waiting:  # dependencies that are neither done nor scheduled
                for tid in waiting:
                    outcomes[tid] = {"ok": False, "blocked_by": "a dependency not in this run"}
            break
        for tid, outcome in engine.wait():
            running.discard(tid)
            outcomes[tid] = outcome
            if outcome["ok"]:
                done.add(tid)
            if on_finish:
                on_finish(tid, outcome)
    return outcomes
