"""Engines that run a sweep's tasks: `serial` (in this process, the reference) and `ray`
(a local Ray started in-process, or an existing cluster by address).

Both share one scheduler (`schedule`): a task is submitted once all its dependencies are
done, at most `slots` at a time (so the ones in flight are the ones running), the engine
choosing among the ready ones (serial: graph order; Ray: a worker that holds the model);
a task that fails after its retries is reported and everything depending on it is
blocked, while the other tasks finish.
"""
from __future__ import annotations

import collections
import json
import os
import time
import traceback

from .tasks import MODELS_KEPT, execute

__all__ = ["SerialEngine", "RayEngine", "schedule", "make_engine"]


class SerialEngine:
    """Runs each task in this process when waited on; exceptions are retried `retries` times."""

    name = "serial"

    def __init__(self, root, run: dict, retries: int):
        self.root, self.run, self.retries = root, run, retries
        self.queue: list[dict] = []
        self.startup_s = 0.0
        self.slots = 1

    def submit_one(self, ready: list[dict]) -> str:
        """The first ready task (graph order: the reference order)."""
        self.queue.append(ready[0])
        return ready[0]["id"]

    def wait(self) -> list[tuple[str, dict]]:
        task = self.queue.pop(0)
        err = None
        for attempt in range(self.retries + 1):  # execute sets the thread pools for the task, then back
            try:
                return [(task["id"], {"ok": True, "attempts": attempt + 1, **execute(task, self.root, self.run)})]
            except Exception as e:  # noqa: BLE001 - any failure of the task is reported, never raised
                err = e
        return [(task["id"], {"ok": False, "attempts": self.retries + 1, "error": f"{type(err).__name__}: {err}",
                              "traceback": "".join(traceback.format_exception(err))})]

    def close(self) -> None:
        pass


def model_key(task: dict) -> str | None:
    """Which model a task loads (None for merges that load none)."""
    m = task["payload"].get("model")
    return None if m is None else json.dumps(m, sort_keys=True)


class _Worker:
    """One slot of a sweep on Ray: a long-lived process (an actor) that keeps its loaded
    models and files between tasks, so the engine can send a task where its model is."""

    def __init__(self, methods):
        from .kinds import warm_up

        warm_up(methods)  # the imports and compiled kernels: start-up, not a task's work

    def execute(self, task, root, run):
        return execute(task, root, run)

    def pid(self) -> int:
        return os.getpid()


class RayEngine:
    """One Ray actor per slot (`threads` CPUs each, or a GPU when the node has CUDA). A task
    goes to a free actor that already holds its model when there is one (a model load per
    worker, not per task); an actor that dies (killed, out of memory) is restarted by Ray and
    its task retried, as are tasks that raise, `retries` times."""

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
        actor = ray.remote(_Worker).options(num_cpus=threads, num_gpus=gpus, max_restarts=-1,
                                            max_task_retries=retries)
        self.actors = [actor.remote(run["methods"]) for _ in range(self.slots)]
        ray.get([a.pid.remote() for a in self.actors])  # every worker started and warmed up
        ex = ray.exceptions
        self._died = (ex.ActorDiedError, ex.ActorUnavailableError, ex.WorkerCrashedError, ex.OutOfMemoryError)
        self.startup_s = time.perf_counter() - t0
        self.free = list(range(self.slots))
        self.held = [collections.deque(maxlen=MODELS_KEPT) for _ in self.actors]  # mirrors tasks._MODELS
        self.inflight: dict = {}  # ObjectRef -> (task id, actor index)

    def submit_one(self, ready: list[dict]) -> str:
        """Submit one of the `ready` tasks (in priority order) to a free actor: one whose
        model it holds; else one whose model no actor holds (models spread over the workers
        instead of each worker loading each one); else the first. Returns its id."""
        task, slot = next(((t, a) for t in ready for a in self.free if model_key(t) in self.held[a]), (None, None))
        if task is None:
            slot = min(self.free, key=lambda a: len(self.held[a]))
            anywhere = set().union(*self.held)
            task = next((t for t in ready if model_key(t) not in anywhere), ready[0])
        self.free.remove(slot)
        key = model_key(task)
        if key is not None:
            if key in self.held[slot]:
                self.held[slot].remove(key)
            self.held[slot].append(key)
        ref = self.actors[slot].execute.options(retry_exceptions=True).remote(task, str(self.root), self.run)
        self.inflight[ref] = (task["id"], slot)
        return task["id"]

    def wait(self) -> list[tuple[str, dict]]:
        ready, _ = self.ray.wait(list(self.inflight), num_returns=1)
        out = []
        for ref in ready:
            tid, slot = self.inflight.pop(ref)
            self.free.append(slot)
            try:
                out.append((tid, {"ok": True, **self.ray.get(ref)}))
            except Exception as e:  # noqa: BLE001 - RayTaskError, ActorDiedError, OutOfMemoryError, ...
                cause = getattr(e, "cause", None) or e
                error = f"{type(cause).__name__}: {str(cause).strip()[-2000:]}"
                if isinstance(e, self._died):
                    self.held[slot].clear()  # Ray restarts it holding nothing
                    error = f"the worker process died (killed, out of memory or crashed) running it; {error}"
                out.append((tid, {"ok": False, "error": error, "traceback": str(e)[-8000:]}))
        return out

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
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
        ready = []
        for tid in list(waiting):
            deps = tasks[tid]["dep_ids"]
            bad = next((d for d in deps if d in outcomes and not outcomes[d]["ok"]), None)
            if bad is not None:
                waiting.remove(tid)
                outcomes[tid] = {"ok": False, "blocked_by": outcomes[bad].get("blocked_by", bad)}
                if on_finish:
                    on_finish(tid, outcomes[tid])
            elif all(d in done for d in deps):
                ready.append(tasks[tid])
        while ready and len(running) < engine.slots:
            tid = engine.submit_one(ready)
            ready = [t for t in ready if t["id"] != tid]
            waiting.remove(tid)
            running.add(tid)
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
