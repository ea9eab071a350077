"""What machine a benchmark ran on, and how fast it multiplies matrices.

`machine_id()` names the folder of saved baselines (benchmarks/baselines/<id>/): a short
slug of the CPU model and core count, plus the GPU name when CUDA is available, so that a
regression comparison only ever compares runs of the same kind of machine.

`machine_info()` is recorded in every benchmark JSON (pytest-benchmark's ``machine_info``
-> ``fastinterp``): CPU / GPU model, core and thread counts, library versions, and the
fp32 matmul rate measured in the same run (`measure_matmul`), which the report uses to
express the pursuit kernels' GFLOP/s as a fraction of what this machine's BLAS achieves.

    python -m benchmarks.machine        # prints the id and the info as JSON
"""
from __future__ import annotations

import json
import os
import platform
import re
import time
from functools import lru_cache

MATMUL_SIZE = 1024
"""n of the (n x n) @ (n x n) fp32 matmul timed on the CPU (2 n^3 flops)."""
GPU_MATMUL_SIZE = 8192


def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC", "Intel(R) Xeon(R) ..."), best effort."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask, else os.cpu_count())."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def gpu_name() -> str | None:
    """The first CUDA device's name, or None without CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(0)


def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm)\)", "", text.lower())
    text = re.sub(r"\b(cpu|processor|with|radeon graphics|\d+-core)\b", " ", text)
    text = re.sub(r"@.*$", "", text)
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")[:40].strip("-") or "unknown"


def machine_id() -> str:
    """Short slug naming this kind of machine, e.g. "amd-epyc-2c" or
    "intel-xeon-platinum-8480-16c-nvidia-h100-80gb-hbm3"."""
    parts = [_slug(cpu_model()), f"{cpu_cores()}c"]
    gpu = gpu_name()
    if gpu:
        parts.append(_slug(gpu))
    return "-".join(parts)


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for name, module in (("torch", "torch"), ("triton", "triton"), ("numba", "numba"), ("numpy", "numpy"),
                         ("scipy", "scipy"), ("scikit-learn", "sklearn"), ("POT", "ot"), ("spams", "spams"),
                         ("open_clip", "open_clip"), ("fastinterp", "fastinterp")):
        try:
            mod = __import__(module)
            out[name] = getattr(mod, "__version__", "installed")
        except Exception:  # noqa: BLE001 - a missing or broken optional package is recorded as such
            out[name] = None
    return out


def _threads() -> dict:
    out = {"cpu_cores": cpu_cores(), "os_cpu_count": os.cpu_count()}
    try:
        import torch
        out["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    try:
        import numba
        out["numba_threads"] = numba.config.NUMBA_NUM_THREADS
    except ImportError:
        pass
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "FASTINTERP_BENCH_THREADS", "NUMBA_NUM_THREADS"):
        if os.environ.get(var):
            out[var] = os.environ[var]
    return out


def timed(fn, *args, **kwargs):
    """(fn(*args, **kwargs), seconds it took): one timed call of a baseline."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def _time_best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_matmul(n: int = MATMUL_SIZE, threads=None, repeat: int = 5) -> dict:
    """The fp32 (n x n) @ (n x n) matmul rate of torch on the CPU, best of `repeat`, for each
    intra-op thread count in `threads` (default: 1 and all cores), and on the GPU (n =
    GPU_MATMUL_SIZE, TF32 off) when CUDA exists.

    Returns {"n": n, "cpu_gflops": {threads: GFLOP/s}, "gpu_gflops": float | None, ...}.
    """
    import torch

    saved = torch.get_num_threads()
    counts = sorted(set(threads or (1, cpu_cores())))
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g)
    b = torch.randn(n, n, generator=g)
    out = torch.empty(n, n)
    rates = {}
    try:
        for t in counts:
            torch.set_num_threads(t)
            torch.matmul(a, b, out=out)  # warm-up
            rates[str(t)] = round(2.0 * n ** 3 / _time_best(lambda: torch.matmul(a, b, out=out), repeat) / 1e9, 2)
    finally:
        torch.set_num_threads(saved)
    result = {"n": n, "dtype": "float32", "cpu_gflops": rates, "gpu_gflops": None}
    if torch.cuda.is_available():
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            m = GPU_MATMUL_SIZE
            ag = torch.randn(m, m, device="cuda")
            bg = torch.randn(m, m, device="cuda")
            torch.matmul(ag, bg)
            torch.cuda.synchronize()

            def run():
                torch.matmul(ag, bg)
                torch.cuda.synchronize()

            result["gpu_gflops"] = round(2.0 * m ** 3 / _time_best(run, repeat) / 1e9, 1)
            result["gpu_n"] = m
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
    return result


@lru_cache(maxsize=1)
def machine_info() -> dict:
    """Everything recorded about this machine (measures the matmul rate once per process)."""
    info = {
        "machine_id": machine_id(),
        "cpu_model": cpu_model(),
        "cpu_cores": cpu_cores(),
        "gpu": gpu_name(),
        "cuda": None,
        "platform": platform.platform(),
        "threads": _threads(),
        "versions": _versions(),
        "matmul": measure_matmul(),
    }
    try:
        import torch
        info["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
    except ImportError:
        pass
    return info


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak resident memory of this process above its level at entry, in MiB, over a block.

    On Linux the peak-RSS high-water mark (VmHWM) is reset on entry through
    /proc/self/clear_refs, so the figure covers only the block; where that is not possible,
    `method` says "ru_maxrss" and the figure is the process's lifetime peak minus the RSS at
    entry (an upper bound). With CUDA, `gpu_mib` is torch's peak allocated memory over the block.

        with PeakMemory() as mem:
            run()
        mem.mib, mem.gpu_mib
    """

    _active: list = []  # open blocks, outermost first: a nested reset must not hide their peaks

    def __init__(self):
        self.mib = None
        self.gpu_mib = None
        self.method = None
        self._carried_kib = 0

    def __enter__(self):
        hwm = _status_kib("VmHWM")
        for outer in PeakMemory._active:  # the peak so far, before the reset below erases it
            outer._carried_kib = max(outer._carried_kib, hwm or 0)
        PeakMemory._active.append(self)
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self.method = "VmHWM reset"
        except OSError:
            self.method = "ru_maxrss"
        self._base = _status_kib("VmRSS")
        try:
            import torch
            self._cuda = torch.cuda.is_available()
            if self._cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                self._gpu_base = torch.cuda.memory_allocated()
        except ImportError:
            self._cuda = False
        return self

    def __exit__(self, *exc):
        if self in PeakMemory._active:
            PeakMemory._active.remove(self)
        if self.method == "VmHWM reset":
            peak = max(_status_kib("VmHWM") or 0, self._carried_kib)
        else:
            import resource
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if peak is not None and self._base is not None:
            self.mib = round(max(peak - self._base, 0) / 1024, 1)
        if self._cuda:
            import torch
            torch.cuda.synchronize()
            self.gpu_mib = round((torch.cuda.max_memory_allocated() - self._gpu_base) / 2 ** 20, 1)
        return False


def matmul_rate(info: dict, threads) -> float | None:
    """The measured CPU fp32 matmul GFLOP/s for `threads` intra-op threads (closest count
    measured), from a `machine_info()` dict; None when absent."""
    rates = ((info or {}).get("matmul") or {}).get("cpu_gflops") or {}
    if not rates:
        return None
    if threads is None:
        threads = max(int(k) for k in rates)
    key = min(rates, key=lambda k: abs(int(k) - int(threads)))
    return rates[key]


if __name__ == "__main__":
    print(json.dumps(machine_info(), indent=2))
