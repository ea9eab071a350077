"""What one sweep task does, in whatever process runs it (the serial engine's or a Ray worker).

`execute(task, root, run)` seeds torch, sets the thread count, runs the task's kind,
writes every output atomically into the task's folder, then its run record (`run.json`:
key, coordinates, settings, output hashes, headline result) last; timings go to a separate
`timing.json` (never compared). A dependency's file is read only after its bytes match
the hash in that dependency's record, so nothing half-written is ever read.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import time
from pathlib import Path

import torch

from ..io import atomic_open, load_checked, read_run_record, save_checked, write_run_record
from .inputs import resolve_dictionary

__all__ = ["execute", "seed_everything", "task_done", "thread_limits", "MODELS_KEPT", "RECORD_FORMAT", "FAULT_ENV",
           "ERROR_FILE", "TIMING_FILE"]

RECORD_FORMAT = 1
FAULT_ENV = "FASTINTERP_SWEEP_FAULT"
"""Fault injection for tests, read by the driver: "kill:<kind>:<marker file>" SIGKILLs the
worker in the middle of the first task of that kind (after writing a half-finished output),
"raise:..." raises instead; the marker file makes it happen once."""
ERROR_FILE = "error.json"
TIMING_FILE = "timing.json"

MODELS_KEPT = 2
_MODELS: dict = {}  # this process's loaded models, least recently used first
_FILES: dict = {}  # (path, sha256) -> loaded dependency file


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def task_done(root, task: dict, *, verify: bool = True) -> bool:
    """True when the task's record matches its key and every output it lists is there
    (with the recorded hash when `verify`, else the recorded size)."""
    folder = Path(root) / task["folder"]
    try:
        rec = read_run_record(folder)
    except Exception:  # an unreadable record means "not done": the task reruns and rewrites it
        return False
    if not rec or rec.get("key") != task["key"]:
        return False
    for name, o in rec.get("outputs", {}).items():
        p = folder / name
        if not p.is_file() or p.stat().st_size != o["bytes"] or (verify and _sha256(p) != o["sha256"]):
            return False
    return True


def seed_everything(seed: int) -> None:
    """torch, NumPy's and Python's global generators and OpenCV's (cv2.fitEllipse perturbs
    degenerate point sets with it, so without a seed a task's result would depend on what
    its worker ran before)."""
    import random

    import numpy as np

    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    try:
        import cv2
    except ImportError:
        return
    cv2.setRNGSeed(seed)


def _device(run: dict) -> str:
    if run.get("device", "auto") == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return run["device"]


class Context:
    """A running task: its folder, model, dependencies and outputs."""

    def __init__(self, task: dict, root, run: dict):
        self.task, self.root, self.run = task, Path(root), run
        self.folder = self.root / task["folder"]
        self.coords, self.settings, self.payload = task["coords"], task["settings"], task["payload"]
        self.outputs: dict[str, dict] = {}
        self.device = _device(run)

    # ---- the model -----------------------------------------------------------------
    def model(self):
        from ..models import load_clip

        m = self.payload["model"]
        key = json.dumps([m, self.device], sort_keys=True)
        if key in _MODELS:
            _MODELS[key] = _MODELS.pop(key)  # most recently used last (the engine's RayEngine mirrors this)
        else:
            while len(_MODELS) >= MODELS_KEPT:
                _MODELS.pop(next(iter(_MODELS)))
            torch.manual_seed(m["seed"])  # random weights: the model's own seed, as `fastinterp --seed`
            _MODELS[key] = load_clip(m["model"], m["pretrained"], device=self.device, checkpoint=m["checkpoint"])
        seed_everything(self.run["seed"])
        return _MODELS[key]

    # ---- dependencies --------------------------------------------------------------
    def _dep_folder(self, role: str, index: int | None) -> Path:
        f = self.task["dep_folders"][role]
        return self.root / (f if index is None else f[index])

    def dep_record(self, role: str, index: int | None = None) -> dict:
        return read_run_record(self._dep_folder(role, index)) or {}

    def _checked_dep(self, role: str, name: str, index: int | None) -> tuple[Path, str]:
        """A dependency's output file and its SHA-256, after checking its bytes against the
        dependency's record (hashed once: the hash is also the load cache's key)."""
        folder = self._dep_folder(role, index)
        rec = read_run_record(folder) or {}
        out = (rec.get("outputs") or {}).get(name)
        p = folder / name
        if not out or not p.is_file() or _sha256(p) != out["sha256"]:
            raise RuntimeError(f"dependency output {str(p)!r} is missing or does not match its run record; "
                               f"rerun the sweep to rebuild it")
        return p, out["sha256"]

    def dep_path(self, role: str, name: str, index: int | None = None) -> Path:
        """A dependency's output file, after checking its bytes against the dependency's record."""
        return self._checked_dep(role, name, index)[0]

    def _load(self, role: str, name: str, index: int | None, loader):
        p, digest = self._checked_dep(role, name, index)
        key = (str(p), digest)
        if key not in _FILES:
            if len(_FILES) > 32:
                _FILES.clear()
            _FILES[key] = loader(p)
        return _FILES[key]

    def load_pt(self, role: str, name: str, index: int | None = None) -> dict:
        return self._load(role, name, index, load_checked)

    def load_json(self, role: str, name: str, index: int | None = None):
        return self._load(role, name, index, lambda p: json.loads(p.read_text(encoding="utf-8")))

    def embeddings(self, role: str = "encode") -> torch.Tensor:
        return self.load_pt(role, "embeddings.pt")["embeddings"]

    def dictionary(self, name: str | None = None):
        name = name or self.payload["dictionary_name"]
        return resolve_dictionary(name, self.run["dictionaries"][name])

    # ---- outputs -------------------------------------------------------------------
    def add_output(self, name: str) -> None:
        p = self.folder / name
        self.outputs[name] = {"sha256": _sha256(p), "bytes": p.stat().st_size}

    def save_pt(self, name: str, obj: dict) -> None:
        save_checked(obj, self.folder / name)
        self.add_output(name)

    def write_json(self, name: str, obj) -> None:
        with atomic_open(self.folder / name, "w") as f:
            f.write(json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
        self.add_output(name)


def _fault(task: dict, folder: Path, spec: str | None) -> None:
    if not spec:
        return
    action, kind, marker = spec.split(":", 2)
    if kind != task["kind"] or os.path.exists(marker):
        return
    Path(marker).write_text(str(os.getpid()))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "half-written.json").write_text('{"not": "finish')  # never listed in a record, never read
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"injected fault in {task['kind']} ({FAULT_ENV})")


def _start(folder: Path, key: str) -> None:
    """A folder left by another key's run is cleared; one left by a killed attempt of this
    key keeps its files (the methods' own checkpoints, e.g. SITH's .partial, resume)."""
    import shutil

    try:
        rec = read_run_record(folder)
    except Exception:
        rec = {"key": None}
    if rec is not None and rec.get("key") != key:
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.json").unlink(missing_ok=True)


@contextlib.contextmanager
def thread_limits(n: int):
    """torch's, Numba's, OpenCV's and every loaded BLAS / OpenMP pool at the task's `n` CPUs
    for the block, then back: workers side by side must not oversubscribe the node (a Ray
    worker starts with OpenCV's and Numba's pools sized to the whole machine)."""
    import cv2
    from threadpoolctl import threadpool_limits

    before = (torch.get_num_threads(), cv2.getNumThreads())
    try:
        import numba
    except ImportError:
        numba = None
    numba_before = numba.get_num_threads() if numba else None
    torch.set_num_threads(n)
    cv2.setNumThreads(n)
    if numba:
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    try:
        with threadpool_limits(limits=n):
            yield
    finally:
        torch.set_num_threads(before[0])
        cv2.setNumThreads(before[1])
        if numba:
            numba.set_num_threads(numba_before)


def execute(task: dict, root, run: dict) -> dict:
    """Run one task (a `Task.describe()` dict plus "payload" and "dep_folders"); returns
    {"id", "result", "seconds", "pid"}. `run`: seed, threads, device, dictionaries."""
    t0 = (time.perf_counter(), time.process_time(), time.thread_time())
    with thread_limits(run["threads"]):
        return _execute(task, root, run, t0)


def _execute(task: dict, root, run: dict, t0: tuple[float, float, float]) -> dict:
    from .kinds import KINDS

    ctx = Context(task, root, run)
    _start(ctx.folder, task["key"])
    _fault(task, ctx.folder, run.get("fault"))
    seed_everything(run["seed"])
    result = KINDS[task["kind"]](ctx)
    from .. import __version__

    record = {"format": RECORD_FORMAT, "fastinterp": __version__, "task": task["id"], "kind": task["kind"],
              "key": task["key"], "coords": task["coords"], "settings": task["settings"], "inputs": task["inputs"],
              "outputs": ctx.outputs, "result": result}
    seconds = time.perf_counter() - t0[0]
    with atomic_open(ctx.folder / TIMING_FILE, "w") as f:  # cpu < wall: the task waited for a core
        json.dump({"seconds": seconds, "cpu_seconds": time.process_time() - t0[1],  # all the process's threads
                   "thread_seconds": time.thread_time() - t0[2],  # the task's own thread
                   "pid": os.getpid(), "device": ctx.device}, f)
    write_run_record(ctx.folder, record)  # last: the task counts as done from here on
    (ctx.folder / ERROR_FILE).unlink(missing_ok=True)
    (ctx.folder / "half-written.json").unlink(missing_ok=True)
    return {"id": task["id"], "result": result, "seconds": seconds, "pid": os.getpid()}
