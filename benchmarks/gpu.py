"""One prepared GPU check: every Triton kernel run natively against its torch path and the
reference semantics, on the same GPU, in one command (issue 16).

    bash benchmarks/gpu_wheels.sh            # here, where pip works: the missing wheels -> .whl/
    # on the GPU machine (no registry; carry .whl):
    bash benchmarks/gpu_wheels.sh --install && export PYTHONPATH=/tmp/site:$PWD \
        && python3 -m benchmarks.gpu --output OUT/gpu
    python -m benchmarks.gpu --dry-run --output /tmp/gpu-dry   # CPU, tiny sizes, Triton interpreter

Stages, in this order (a run cut off early still holds the most important results):

  machine             GPU name, torch / triton versions, date; this GPU's own matmul rates
                      (bf16, fp16, fp32 without TF32, tf32: 8192^3), the "peak" below
  a_pursuit           select_atoms and comp_topk (COMP coh 0.3 / NNLS, OMP least squares),
                      Triton vs the torch path on CUDA, B = 1024, D = 768, M in {50k, 1M},
                      K = 5, fp32 / bf16 / fp16 dictionary storage; fp32 also vs the reference
  a_head_mask         masked_forward (ViT-B-16, ViT-L-14, random weights, C in {1, 48}
                      configurations; zero and mean ablation) Triton vs torch vs the reference
                      pruning / hooks; the kernel itself in fp32 / fp16 / bf16 vs float64
  a_normalize         l2_normalize_rows, Triton vs torch
  b_pursuit           throughput: Triton vs torch path vs reference vs K plain matmuls (vectors/s,
                      TFLOP/s of the K selection matmuls, fraction of the measured peak)
  b_head_mask         throughput: ablated images/s, equivalent TFLOP/s, fraction of fp32 peak
  b_normalize         throughput: GB/s
  c_textspan          TextSpan on CUDA tensors vs the same on the CPU vs the reference loop
  c_sinkhorn, c_mi    no GPU forms (Numba on the CPU): the CPU kernels checked on this machine
                      against POT / scikit-learn and the reference (torch reference on the GPU)
  c_mutual            skipped: the mutual-knowledge pipeline needs pydensecrf, which the GPU
                      image lacks; this check never imports it (an import hook refuses it)
  d_memory            peak GPU memory of every contender (torch.cuda.max_memory_allocated)

Writes DIR/gpu.json, DIR/gpu.md and DIR/gpu.png; both files are rewritten after every case,
so a run stopped from outside keeps what it measured. A time budget (--budget-s, default
420 s) skips what no longer fits, recorded as "skipped: budget". Triton compilation is kept
out of the throughput numbers (every contender runs once before it is timed; the first
call's extra time is reported as compile_s). Every case catches its own exceptions.

Exit status: 0 when every correctness verdict is true (or not applicable), 1 when any
correctness check failed or raised, 3 when only a non-correctness case raised.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
import traceback

STAGES = ["machine", "a_pursuit", "a_head_mask", "a_normalize", "b_pursuit", "b_head_mask",
          "b_normalize", "c_textspan", "c_sinkhorn", "c_mi", "c_mutual", "d_memory"]
CORRECTNESS_STAGES = ("a_pursuit", "a_head_mask", "a_normalize", "c_textspan", "c_sinkhorn", "c_mi")
BLOCKED_MODULES = ("pydensecrf",)

SIZES = {
    "gpu": {
        "pursuit": {"B": 1024, "D": 768, "M": [1_000_000, 50_000], "K": 5, "coh": 0.3, "D2": 128,
                    "dtypes": ["float32", "bfloat16", "float16"]},
        "head_mask": {"models": [("ViT-B-16", 16, 4), ("ViT-L-14", 8, 3)], "C": [48, 1], "ref_mean_configs": 4,
                      "kernel_images": 16, "dtypes": ["float32", "float16", "bfloat16"]},
        "normalize": {"N": 262_144, "D": 768, "dtypes": ["float32", "bfloat16"]},
        "textspan": {"images": 10_000, "layers": 4, "heads": 12, "dim": 512, "texts": 3_498, "n_texts": 5,
                     "rank": 80, "ref_heads": 2, "cpu_layers": 1},
        "sinkhorn": {"problems": 20_000, "pot_problems": 400, "shape": (5, 300), "fixed_problems": 2_000,
                     "ref_problems": 20},
        "mi": {"samples": 2_000_000, "classes": 1_000, "curves": 200, "ref_curves": 20},
        "matmul_n": 8192, "reps": 5, "max_case_s": 4.0,
    },
    "dry": {
        "pursuit": {"B": 16, "D": 16, "M": [384, 128], "K": 3, "coh": 0.3, "D2": 16,
                    "dtypes": ["float32", "bfloat16", "float16"]},
        "head_mask": {"models": [("fastinterp-tiny-ViT", 1, 2)], "C": [3, 1], "ref_mean_configs": 2,
                      "kernel_images": 1, "dtypes": ["float32", "float16", "bfloat16"]},
        "normalize": {"N": 64, "D": 48, "dtypes": ["float32", "bfloat16"]},
        "textspan": {"images": 120, "layers": 2, "heads": 2, "dim": 32, "texts": 60, "n_texts": 3,
                     "rank": 16, "ref_heads": 1, "cpu_layers": 1},
        "sinkhorn": {"problems": 40, "pot_problems": 10, "shape": (5, 30), "fixed_problems": 10,
                     "ref_problems": 3},
        "mi": {"samples": 20_000, "classes": 50, "curves": 10, "ref_curves": 4},
        "matmul_n": 256, "reps": 1, "max_case_s": 0.5,
    },
}

# Targets of issue 16 (measured on the GPU; a dry run lists them as not measured).
PURSUIT_SPEEDUP_TARGET = 5.0       # Triton pursuit >= 5x the torch path at M = 1M
PURSUIT_MATMUL_TARGET = 2.0        # Triton pursuit time <= 2x the K plain matmuls (same dtype)
MASK_SPEEDUP_TARGET = 2.0          # fused masking >= 2x the torch path at 48 configurations
EMBED_TOL = 1e-4                   # embeddings / scores: |diff| <= 1e-4 * max(1, scale)


# --------------------------------------------------------------------------------------
# setup that must happen before torch / triton are imported
# --------------------------------------------------------------------------------------
class _Refuse:
    """A meta-path finder that refuses BLOCKED_MODULES: the GPU image has no pydensecrf, and
    this check must not depend on it (so a code path that imports it fails here, loudly)."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED_MODULES:
            raise ImportError(f"{name}: not imported by the GPU check (no pydensecrf on the GPU image)")
        return None


def _prepare_environment(dry_run: bool) -> None:
    if not any(isinstance(f, _Refuse) for f in sys.meta_path):
        sys.meta_path.insert(0, _Refuse())
    if dry_run:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("--dry-run needs TRITON_INTERPRET=1 before triton is imported; run it as a fresh process")
        os.environ["TRITON_INTERPRET"] = "1"
    os.environ.pop("FASTINTERP_BACKEND", None)  # every call names its backend


# --------------------------------------------------------------------------------------
# the run: timing, memory, records, flushing
# --------------------------------------------------------------------------------------
def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _short(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}"
    return text if len(text) < 600 else text[:600] + " ..."


class Run:
    def __init__(self, args):
        import torch

        self.args = args
        self.dry = args.dry_run
        self.S = SIZES["dry" if self.dry else "gpu"]
        self.t0 = time.perf_counter()
        self.budget = float(args.budget_s)
        self.out = args.output
        os.makedirs(self.out, exist_ok=True)
        self.cuda = torch.cuda.is_available() and not self.dry
        self.device = torch.device("cuda" if self.cuda else "cpu")
        if not self.cuda and not self.dry:
            raise SystemExit("benchmarks.gpu: no CUDA device; use --dry-run for the CPU check")
        self.first_call: dict[str, float] = {}
        self._models: dict = {}
        self._dicts: dict = {}
        self.data = {
            "schema": 1, "what": "fastinterp GPU check (issue 16)", "dry_run": self.dry,
            "command": " ".join([os.path.basename(sys.executable), "-m", "benchmarks.gpu"] + list(args.argv)),
            "started": _now(), "budget_s": self.budget, "device": str(self.device),
            "machine": {}, "peak": {}, "stages": [], "targets": [],
        }

    # time -----------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def remaining(self) -> float:
        return self.budget - self.elapsed()

    def sync(self):
        if self.cuda:
            import torch
            torch.cuda.synchronize()

    def timed(self, fn):
        """(result, seconds) of one call; CUDA events on the GPU, perf_counter on the CPU."""
        import torch

        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            return out, start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0

    def first(self, key: str, fn):
        """Run fn once, remembering the time of the first call of `key` (compile included)."""
        out, s = self.timed(fn)
        self.first_call.setdefault(key, s)
        return out, s

    def bench(self, fn, *, reps=None, max_s=None, warm=None, key=None):
        """Median / min seconds of repeated calls (one untimed warm-up first; by default only
        when `key` has not run before, e.g. in the correctness stage),
        at least one timed call, at most `reps`, stopping once `max_s` is spent; and the
        peak GPU memory above the starting level (MiB)."""
        reps = reps or self.S["reps"]
        max_s = max_s or self.S["max_case_s"]
        if warm is None:
            warm = key is None or key not in self.first_call
        if warm:
            _, s0 = self.timed(fn)
            if key:
                self.first_call.setdefault(key, s0)
        base = self._mem_reset()
        times = []
        t_start = time.perf_counter()
        while True:
            _, s = self.timed(fn)
            times.append(s)
            if len(times) >= reps or time.perf_counter() - t_start + s > max_s:
                break
        times.sort()
        rec = {"median_s": times[len(times) // 2], "min_s": times[0], "reps": len(times),
               "peak_gpu_mib": self._mem_peak(base)}
        if key and key in self.first_call:
            rec["compile_s"] = max(0.0, self.first_call[key] - times[0])
        return rec

    # memory ---------------------------------------------------------------------------
    def _mem_reset(self):
        if not self.cuda:
            return None
        import torch
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()

    def _mem_peak(self, base):
        if base is None:
            return None
        import torch
        torch.cuda.synchronize()
        return round((torch.cuda.max_memory_allocated() - base) / 2 ** 20, 1)

    def free(self):
        import gc
        gc.collect()
        if self.cuda:
            import torch
            torch.cuda.empty_cache()

    # records --------------------------------------------------------------------------
    def stage(self, name: str, title: str, fn, *, min_s: float = 0.0):
        st = {"name": name, "title": title, "status": "running", "cases": [], "started_at_s": round(self.elapsed(), 1)}
        self.data["stages"].append(st)
        if min_s > 0 and self.remaining() < min_s:
            st["status"] = f"skipped: budget ({self.remaining():.0f} s left, needs about {min_s:.0f} s)"
            self.flush()
            return st
        self.flush()
        t0 = time.perf_counter()
        try:
            fn(st)
            st["status"] = "done"
        except Exception as err:  # noqa: BLE001 - a broken stage must not stop the later ones
            st["status"] = "error"
            st["error"] = _short(err)
            st["traceback"] = traceback.format_exc()[-3000:]
        st["seconds"] = round(time.perf_counter() - t0, 2)
        self.free()
        self.flush(plot=name.startswith("b_") or name == "d_memory")
        return st

    def case(self, st, name: str, fn, *, correctness: bool, min_s: float = 0.0, **fields):
        rec = {"case": name, **fields}
        if min_s > 0 and self.remaining() < min_s:
            rec.update(ok=None, skipped=f"budget ({self.remaining():.0f} s left)")
            st["cases"].append(rec)
            self.flush()
            return rec
        base = self._mem_reset()
        t0 = time.perf_counter()
        try:
            rec.update(fn() or {})
        except Exception as err:  # noqa: BLE001 - recorded, and the run goes on
            rec["error"] = _short(err)
            rec["traceback"] = traceback.format_exc()[-3000:]
            if correctness:
                rec["ok"] = False
        rec.setdefault("ok", None)
        rec["correctness"] = correctness
        rec["wall_s"] = round(time.perf_counter() - t0, 3)
        rec.setdefault("case_peak_gpu_mib", self._mem_peak(base))
        st["cases"].append(rec)
        self.free()
        self.flush()
        return rec

    # outputs --------------------------------------------------------------------------
    def verdicts(self):
        checks = [c for st in self.data["stages"] for c in st["cases"] if c.get("correctness")]
        failed = [c["case"] for c in checks if c.get("ok") is False]
        stage_errors = [st["name"] for st in self.data["stages"] if st["status"] == "error"]
        other_errors = [c["case"] for st in self.data["stages"] for c in st["cases"]
                        if c.get("error") and not c.get("correctness")]
        return {"checks": len(checks), "passed": sum(1 for c in checks if c.get("ok") is True),
                "failed": failed, "stage_errors": stage_errors, "other_errors": other_errors,
                "correct": not failed and not any(s in CORRECTNESS_STAGES for s in stage_errors)}

    def flush(self, plot: bool = False, final: bool = False):
        self.data["elapsed_s"] = round(self.elapsed(), 1)
        self.data["updated"] = _now()
        self.data["targets"] = targets(self)
        self.data["verdict"] = self.verdicts()
        self.data["finished"] = final
        if final:
            self.data["modules_never_imported"] = {m: m not in sys.modules for m in BLOCKED_MODULES}
        if plot or final:
            try:
                self.data["plot"] = write_plot(self)
            except Exception as err:  # noqa: BLE001 - no plot is no reason to lose the tables
                self.data["plot"] = f"not written: {_short(err)}"
        _write_atomic(os.path.join(self.out, "gpu.json"), json.dumps(self.data, indent=1, default=_jsonable))
        _write_atomic(os.path.join(self.out, "gpu.md"), render_md(self))


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------
# stage: the machine and its matmul rates
# --------------------------------------------------------------------------------------
def stage_machine(run: Run, st):
    import torch

    from benchmarks.machine import _versions, cpu_cores, cpu_model, machine_id

    m = {"date": datetime.date.today().isoformat(), "machine_id": machine_id(), "cpu_model": cpu_model(),
         "cpu_cores": cpu_cores(), "platform": platform.platform(), "versions": _versions(),
         "float32_matmul_precision": torch.get_float32_matmul_precision(),
         "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"), "gpu": None}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        m.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2 ** 30, 1), sm_count=p.multi_processor_count,
                 capability=f"{p.major}.{p.minor}", cuda=torch.version.cuda)
    run.data["machine"] = m
    # fp32 stays fp32 everywhere: matmuls (the default) and the patch-embedding convolution
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    m["cudnn_allow_tf32"] = False
    n = run.S["matmul_n"]
    peak = {"n": n, "device": str(run.device)}
    for name, dtype, tf32 in (("bfloat16", torch.bfloat16, False), ("float16", torch.float16, False),
                              ("float32", torch.float32, False), ("tf32", torch.float32, True)):
        if run.dry and name in ("float16", "tf32"):
            continue

        def one(dtype=dtype, tf32=tf32):
            g = torch.Generator(device=run.device).manual_seed(0)
            a = torch.randn(n, n, device=run.device, generator=g).to(dtype)
            b = torch.randn(n, n, device=run.device, generator=g).to(dtype)
            saved = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = tf32
            try:
                r = run.bench(lambda: a @ b, reps=10 if run.cuda else 3, max_s=2.0)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = saved
            tflops = 2.0 * n ** 3 / r["min_s"] / 1e12
            peak[name + "_tflops"] = round(tflops, 3)
            return {"tflops": round(tflops, 3), "median_s": r["median_s"], "reps": r["reps"]}

        run.case(st, f"matmul {name} {n}^3", one, correctness=False, dtype=name)
    run.data["peak"] = peak


# --------------------------------------------------------------------------------------
# pursuit problems and checks
# --------------------------------------------------------------------------------------
def _dtype(name):
    import torch
    return getattr(torch, name)


def _problem(run: Run, M: int):
    """(x (B, D) fp32, {dtype name: (M, D) dictionary}) with unit rows; one M kept at a time."""
    import torch

    P = run.S["pursuit"]
    if run._dicts.get("M") != M:
        run._dicts.clear()
        run.free()
        g = torch.Generator(device=run.device).manual_seed(M)
        G = torch.randn(M, P["D"], device=run.device, generator=g)
        G /= torch.linalg.vector_norm(G, dim=1, keepdim=True)
        x = torch.randn(P["B"], P["D"], device=run.device, generator=g)
        x /= torch.linalg.vector_norm(x, dim=1, keepdim=True)
        run._dicts.update(M=M, x=x, float32=G)
    if "float16" not in run._dicts:
        for name in ("bfloat16", "float16"):
            run._dicts[name] = run._dicts["float32"].to(_dtype(name))
    return run._dicts["x"], run._dicts


def _interp_skip(run: Run, dtype: str):
    """bf16 arithmetic is wrong in the Triton interpreter (see tests/test_sparse_kernels.py):
    in a dry run bf16 Triton cases are recorded as not run."""
    if run.dry and dtype == "bfloat16":
        return {"ok": None, "skipped": "bf16 is wrong in the Triton interpreter; runs on the GPU"}
    return None


def _scores64(q, G, idx, q2=None, G2=None, use_abs=False):
    s = (q.double() * G[idx].double()).sum(1)
    if q2 is not None:
        s = s + (q2.double() * G2[idx].double()).sum(1)
    return s.abs() if use_abs else s


def check_select(run: Run, M: int, dtype: str, *, use_abs: bool, q2: bool):
    """One selection step (masked: each signal's best atom and two random ones), Triton vs
    the torch path. fp32: the same atoms (an fp32-rounding near-tie, |exact score gap| <=
    1e-5, is the only allowed difference). fp16/bf16 storage: the kernel rounds the query to
    the storage dtype for tensor-core dots, so (1) vs the torch path on the rounded query: the
    same atoms; (2) vs the torch path on the fp32 query: Triton's pick is within the rigorous
    rounding bound 2 (||q~ - q|| max||g|| + ||q2~ - q2|| max||g2||) of the best exact score."""
    import torch

    from fastinterp.kernels.pursuit import select_atoms

    skip = _interp_skip(run, dtype)
    if skip:
        return skip
    P = run.S["pursuit"]
    x, dicts = _problem(run, M)
    G = dicts[dtype]
    B = x.shape[0]
    gen = torch.Generator(device=run.device).manual_seed(7)
    kw = {"use_abs": use_abs}
    if q2:
        q2v = 0.3 * torch.randn(B, P["D2"], device=run.device, generator=gen) / P["D2"] ** 0.5
        G2 = torch.randn(M, P["D2"], device=run.device, generator=gen)
        G2 = (G2 / torch.linalg.vector_norm(G2, dim=1, keepdim=True)).to(G.dtype)
        kw.update(q2=q2v, dictionary2=G2)
    best0 = select_atoms(x, G, None, backend="torch", screen=False, **kw)[0]
    masked = torch.cat([best0[:, None], torch.randint(0, M, (B, 2), device=run.device, generator=gen)], dim=1)
    tri, s = run.first(f"select {dtype} abs={use_abs} q2={q2} M={M}",
                       lambda: select_atoms(x, G, masked, backend="triton", **kw))
    rec = {"triton_first_call_s": round(s, 4), "last_backend": _backend_used("pursuit_select")}
    not_masked = bool((tri[0][:, None] != masked).all())
    half = dtype != "float32"
    q_ref = x.to(G.dtype).float() if half else x
    kw_ref = dict(kw)
    if half and q2:
        kw_ref["q2"] = kw["q2"].to(G.dtype).float()
    ref = select_atoms(q_ref, G, masked, backend="torch", screen=False, **kw_ref)
    same = tri[0] == ref[0]
    gap = (_scores64(q_ref, G, ref[0], kw_ref.get("q2"), kw.get("dictionary2"), use_abs)
           - _scores64(q_ref, G, tri[0], kw_ref.get("q2"), kw.get("dictionary2"), use_abs))
    raw_diff = float((tri[2] - ref[2])[same].abs().max()) if bool(same.any()) else float("inf")
    rec.update(same_atoms=float(same.float().mean()), max_gap_where_different=float(gap[~same].max()) if bool((~same).any()) else 0.0,
               max_raw_diff=raw_diff, masked_respected=not_masked)
    ok = not_masked and rec["same_atoms"] >= 0.999 and float(gap.max()) <= 1e-5 and raw_diff <= 1e-4
    if half:
        unr = select_atoms(x, G, masked, backend="torch", screen=False, **kw)
        gnorm = float(torch.linalg.vector_norm(G.float(), dim=1).max())
        bound = torch.linalg.vector_norm(q_ref - x, dim=1) * gnorm
        if q2:
            g2norm = float(torch.linalg.vector_norm(kw["dictionary2"].float(), dim=1).max())
            bound = bound + torch.linalg.vector_norm(kw_ref["q2"] - kw["q2"], dim=1) * g2norm
        bound = 2 * bound.double() + 1e-5
        gap_u = (_scores64(x, G, unr[0], kw.get("q2"), kw.get("dictionary2"), use_abs)
                 - _scores64(x, G, tri[0], kw.get("q2"), kw.get("dictionary2"), use_abs))
        within = bool((gap_u <= bound).all())
        rec.update(same_atoms_as_fp32_query=float((tri[0] == unr[0]).float().mean()),
                   max_gap_vs_fp32_query=float(gap_u.max()), max_rounding_bound=float(bound.max()),
                   within_rounding_bound=within)
        ok = ok and within
    rec["ok"] = bool(ok)
    return rec


def _backend_used(kernel: str):
    """What fastinterp.kernels.last_backend recorded for `kernel` (its most recent call)."""
    from fastinterp import kernels

    lb = dict(getattr(kernels, "last_backend", {}) or {})
    if kernel in lb:
        return str(lb[kernel])
    stem = kernel.split("_")[0]
    hits = [str(v) for k, v in lb.items() if stem in str(k)]
    return hits[0] if hits else None


def _agreement(ids_a, scores_a, ids_b, scores_b):
    """(fraction of rows with identical atom sets, max |score diff| on those rows)."""
    sa, oa = ids_a.sort(dim=1)
    sb, ob = ids_b.sort(dim=1)
    same = (sa == sb).all(dim=1)
    diff = (scores_a.gather(1, oa).double() - scores_b.gather(1, ob).double()).abs().amax(dim=1)
    return float(same.float().mean()), float(diff[same].max()) if bool(same.any()) else float("inf")


def _pursuit_kwargs(run: Run, algo: str):
    P = run.S["pursuit"]
    if algo == "comp":
        return {"k": P["K"], "coh": P["coh"], "positive": True}
    return {"k": P["K"], "coh": 0.0, "positive": False}


def check_pursuit(run: Run, algo: str, M: int, dtype: str):
    """The whole pursuit (K = 5, NNLS / least-squares refits), Triton vs the torch path; fp32
    also vs the reference semantics (dense scores). fp32: identical atom sets on >= 99.9 % of
    the signals and coefficients within 1e-4 there. fp16/bf16 storage: the query rounding (see
    check_select) changes the pick at near-ties, so identical atom sets on >= 85 % of the
    signals, coefficients within 1e-4 where identical, and a mean reconstruction error at
    most 2 % above the torch path's (the selection step itself is held to the exact
    rounding bound in check_select)."""
    import torch

    from fastinterp import sparse
    from fastinterp.reference import sparse as ref

    skip = _interp_skip(run, dtype)
    if skip:
        return skip
    x, dicts = _problem(run, M)
    G = dicts[dtype]
    kw = _pursuit_kwargs(run, algo)
    key = f"pursuit {algo} {dtype} M={M}"
    (ts, ti), t_first = run.first(key, lambda: sparse.comp_topk(x, G, backend="triton", **kw))
    (rs, ri), r_first = run.first(key + " torch", lambda: sparse.comp_topk(x, G, backend="torch", **kw))
    frac, diff = _agreement(ti, ts, ri, rs)
    G32 = dicts["float32"]

    def recon(s, i):
        return float((torch.linalg.vector_norm(x - sparse.decode(s, i, G32), dim=1)).mean())

    rec_t, rec_r = recon(ts, ti), recon(rs, ri)
    rec = {"triton_first_call_s": round(t_first, 4), "torch_first_call_s": round(r_first, 4),
           "same_atom_sets": frac, "max_coef_diff": diff, "recon_err_triton": rec_t, "recon_err_torch": rec_r}
    if dtype == "float32":
        ok = frac >= 0.999 and diff <= EMBED_TOL
        fn = (lambda: ref.coherent_orthogonal_matching_pursuit(x, G32, max_sparsity=kw["k"], coh=kw["coh"],
                                                               positive=True)) if algo == "comp" else \
            (lambda: ref.orthogonal_matching_pursuit(x, G32, max_sparsity=kw["k"], positive=False))
        codes, ref_s = run.timed(fn)
        ours = torch.zeros_like(codes).scatter_(1, ti, ts.to(codes.dtype))
        same = ((ours != 0) == (codes != 0)).all(dim=1)
        ref_frac = float(same.float().mean())
        ref_diff = float((ours - codes)[same].abs().max()) if bool(same.any()) else float("inf")
        del ours, codes
        rec.update(reference_s=round(ref_s, 4), same_support_as_reference=ref_frac, max_diff_vs_reference=ref_diff)
        ok = ok and ref_frac >= 0.999 and ref_diff <= EMBED_TOL
    else:
        ok = frac >= 0.85 and diff <= EMBED_TOL and rec_t <= 1.02 * rec_r
    rec["ok"] = bool(ok)
    return rec


def stage_a_pursuit(run: Run, st):
    P = run.S["pursuit"]
    for M in P["M"]:
        for dtype in P["dtypes"]:
            run.case(st, f"select {dtype} M={M} masked", lambda M=M, d=dtype: check_select(run, M, d, use_abs=False, q2=False),
                     correctness=True, min_s=5, kernel="pursuit_select", M=M, dtype=dtype)
            if M == min(P["M"]):
                run.case(st, f"select {dtype} M={M} abs", lambda M=M, d=dtype: check_select(run, M, d, use_abs=True, q2=False),
                         correctness=True, min_s=5, kernel="pursuit_select", M=M, dtype=dtype)
                run.case(st, f"select {dtype} M={M} coherence dictionary (q2)",
                         lambda M=M, d=dtype: check_select(run, M, d, use_abs=False, q2=True),
                         correctness=True, min_s=5, kernel="pursuit_select", M=M, dtype=dtype)
        for algo in ("comp", "omp"):
            for dtype in P["dtypes"]:
                run.case(st, f"{algo.upper()} {dtype} M={M}", lambda a=algo, M=M, d=dtype: check_pursuit(run, a, M, d),
                         correctness=True, min_s=10, kernel="pursuit_select", algo=algo, M=M, dtype=dtype)


def stage_b_pursuit(run: Run, st):
    from fastinterp import sparse
    from fastinterp.kernels.pursuit import selection_flops
    from fastinterp.reference import sparse as ref

    P = run.S["pursuit"]
    peak = run.data.get("peak", {})
    B, D, K = P["B"], P["D"], P["K"]
    sizes = P["M"][:1] if run.dry else P["M"]  # the dry run exercises the code, once
    order = [(M, algo, dtype) for M in sizes for algo, dtype in
             (("comp", "float32"), ("comp", "bfloat16"), ("omp", "float32"), ("omp", "bfloat16"),
              ("comp", "float16"), ("omp", "float16")) if dtype in P["dtypes"]]
    kmatmul_cache: dict = {}
    for M, algo, dtype in order:
        def one(M=M, algo=algo, dtype=dtype):
            skip = _interp_skip(run, dtype)
            if skip:
                return skip
            x, dicts = _problem(run, M)
            G = dicts[dtype]
            kw = _pursuit_kwargs(run, algo)
            key = f"pursuit {algo} {dtype} M={M}"
            flops = K * selection_flops(B, M, D)
            sparse.comp_topk(x[:2], G, backend="torch", **kw)  # the dictionary's one-time validation, untimed
            tri = run.bench(lambda: sparse.comp_topk(x, G, backend="triton", **kw), key=key)
            tor = run.bench(lambda: sparse.comp_topk(x, G, backend="torch", **kw), key=key + " torch")
            rec = {"triton": tri, "torch": tor, "selection_tflop": flops / 1e12}
            if (M, dtype) not in kmatmul_cache:  # K plain matmuls x @ G^T in the storage dtype
                xs = x.to(G.dtype)

                def kmm():
                    for _ in range(K):
                        out = xs @ G.T
                    return out

                kmatmul_cache[(M, dtype)] = run.bench(kmm)
            rec["k_matmuls"] = kmatmul_cache[(M, dtype)]
            if dtype == "float32":
                G32 = dicts["float32"]
                fn = (lambda: ref.coherent_orthogonal_matching_pursuit(x, G32, max_sparsity=K, coh=kw["coh"])) \
                    if algo == "comp" else (lambda: ref.orthogonal_matching_pursuit(x, G32, max_sparsity=K))
                if run.remaining() > 30 or run.dry:
                    rec["reference"] = run.bench(fn, reps=1, warm=False)
            pk = peak.get(("float32" if dtype == "float32" else dtype) + "_tflops")
            t = tri["median_s"]
            rec.update(
                triton_vectors_per_s=B / t, torch_vectors_per_s=B / tor["median_s"],
                triton_tflops=flops / t / 1e12, torch_tflops=flops / tor["median_s"] / 1e12,
                k_matmul_tflops=flops / rec["k_matmuls"]["median_s"] / 1e12,
                peak_tflops=pk, triton_fraction_of_peak=(flops / t / 1e12) / pk if pk else None,
                speedup_vs_torch=tor["median_s"] / t, triton_over_k_matmuls=t / rec["k_matmuls"]["median_s"],
                compile_s=tri.get("compile_s"))
            if "reference" in rec:
                rec["reference_vectors_per_s"] = B / rec["reference"]["median_s"]
                rec["speedup_vs_reference"] = rec["reference"]["median_s"] / t
            return rec

        run.case(st, f"{algo.upper()} {dtype} M={M}", one, correctness=False, min_s=15 if M >= 500_000 else 5,
                 kind="pursuit", algo=algo, M=M, dtype=dtype)


# --------------------------------------------------------------------------------------
# head masking
# --------------------------------------------------------------------------------------
def _model(run: Run, name: str):
    import torch

    import fastinterp

    if name not in run._models:
        run._models.clear()
        run.free()
        torch.manual_seed(0)
        model = fastinterp.load_clip(name, device=run.device)[0]
        run._models[name] = model
    return run._models[name]


def _images(run: Run, model, n: int):
    import torch

    import fastinterp
    info = fastinterp.vit_info(model)
    g = torch.Generator(device=run.device).manual_seed(1)
    return torch.randn(n, 3, *info.image_size, device=run.device, generator=g)


def _masks(info, C: int, last_layers: int):
    """C = 1: one random mask with a quarter of all heads zeroed (a CCS-style pruning);
    C > 1: single-head ablations of the last `last_layers` layers (the first C of them)."""
    import torch

    from fastinterp.ablation import head_set_masks

    if C == 1:
        g = torch.Generator().manual_seed(3)
        m = (torch.rand(1, info.layers, info.heads, generator=g) >= 0.25).float()
        heads = [[(int(a), int(b)) for a, b in (m[0] == 0).nonzero().tolist()]]
        return m, heads
    layers = range(max(0, info.layers - last_layers), info.layers)
    heads = [[(layer, h)] for layer in layers for h in range(info.heads)][:C]
    return head_set_masks((info.layers, info.heads), heads), heads


def _forward_flops(info, images: int) -> float:
    """About what one full image-tower forward costs (2 flops per MAC): per layer 24 N w^2
    (qkv, out_proj, MLP 4x) + 4 N^2 w (attention), plus the patch embedding."""
    N = info.num_patches + 1
    w = info.width
    per_layer = 24 * N * w * w + 4 * N * N * w
    patch = 2 * info.num_patches * 3 * (info.image_size[0] // info.patch_grid[0]) ** 2 * w
    return float(images) * (info.layers * per_layer + patch)


def check_masked_forward(run: Run, name: str, n_img: int, last: int, C: int, mode: str):
    import torch

    import fastinterp
    from fastinterp.ablation import head_output_means, masked_forward
    from fastinterp.reference import ablation as ref

    model = _model(run, name)
    info = fastinterp.vit_info(model)
    images = _images(run, model, n_img)
    masks, heads = _masks(info, C, last)
    means = head_output_means(model, images) if mode == "mean" else None
    key = f"mask {name} C={C} {mode}"
    tri, t_first = run.first(key, lambda: masked_forward(model, images, masks, mode=mode, means=means, backend="triton"))
    used = _backend_used("masked_head_projection")
    tor, _ = run.first(key + " torch", lambda: masked_forward(model, images, masks, mode=mode, means=means, backend="torch"))
    scale = max(1.0, float(tor.abs().max()))
    diff = float((tri - tor).abs().max())
    if mode == "zero":
        refs = [ref.pruned_encode(model, images, h, copy_model=False) for h in heads]
        n_ref = C
    else:
        n_ref = min(C, run.S["head_mask"]["ref_mean_configs"])
        refs = [ref.hooked_encode(model, images, masks[c].to(run.device), means=means) for c in range(n_ref)]
    expect = torch.stack(refs)
    ref_diff = float((tri[:n_ref] - expect).abs().max())
    return {"triton_first_call_s": round(t_first, 3), "embedding_scale": scale, "max_diff_vs_torch": diff,
            "max_diff_vs_reference": ref_diff, "reference_configs_checked": n_ref,
            "last_backend": used,
            "ok": diff <= EMBED_TOL * scale and ref_diff <= EMBED_TOL * scale}


def check_head_kernel(run: Run, dtype: str, mode: str):
    """masked_head_projection at a ViT-B-16 layer's size (ViT-B-16: R = images x 197 rows, H =
    12, hd = 64, D_out = 768), C = 48 configurations; zero mode with the head outputs shared by
    all configurations (x of leading size 1), mean mode with per-configuration x. Triton and
    torch vs a float64 evaluation of the formula on the same (rounded) inputs; tolerance
    relative to the output's scale: fp32 1e-5, fp16 2e-3, bf16 2e-2."""
    import torch

    from fastinterp.kernels.head_mask import masked_head_projection

    skip = _interp_skip(run, dtype)
    if skip:
        return skip
    if run.dry:
        R, H, hd, D_out, C, T = 2 * 17, 4, 16, 64, 4, 17
    else:
        R, H, hd, D_out, C, T = run.S["head_mask"]["kernel_images"] * 197, 12, 64, 768, 48, 197
    dt = _dtype(dtype)
    g = torch.Generator(device=run.device).manual_seed(5)
    Cx = 1 if mode == "zero" else C
    x = torch.randn(Cx, R, H, hd, device=run.device, generator=g).to(dt)
    w = (torch.randn(D_out, H * hd, device=run.device, generator=g) / (H * hd) ** 0.5).to(dt)
    bias = (0.1 * torch.randn(D_out, device=run.device, generator=g)).to(dt)
    a = (torch.rand(C, H, device=run.device, generator=g) > 0.3).float()
    a[:, 0] = 0.5  # a soft mask too
    kw = {}
    if mode == "mean":
        kw = {"y": torch.randn(T, H, hd, device=run.device, generator=g).to(dt), "b": 1 - a}
    out_t, t_first = run.first(f"head kernel {dtype} {mode}",
                               lambda: masked_head_projection(x, a, w, bias, backend="triton", **kw))
    out_r = masked_head_projection(x, a, w, bias, backend="torch", **kw)
    xs = x.double().expand(C, R, H, hd) * a.double()[:, None, :, None]
    if mode == "mean":
        yv = kw["y"].double().repeat(R // T, 1, 1)  # row r uses y[r mod T]
        xs = xs + yv[None] * kw["b"].double()[:, None, :, None]
    truth = xs.reshape(C, R, H * hd) @ w.double().T + bias.double()
    scale = float(truth.abs().max())
    err_t = float((out_t.double() - truth).abs().max()) / scale
    err_r = float((out_r.double() - truth).abs().max()) / scale
    tol = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 2e-2}[dtype]
    return {"triton_first_call_s": round(t_first, 4), "rel_err_triton": err_t, "rel_err_torch": err_r,
            "tolerance": tol, "ok": err_t <= tol}


def stage_a_head_mask(run: Run, st):
    H = run.S["head_mask"]
    for name, n_img, last in H["models"]:
        for C in H["C"]:
            run.case(st, f"masked_forward {name} C={C} zero", lambda n=name, i=n_img, l=last, C=C:
                     check_masked_forward(run, n, i, l, C, "zero"), correctness=True, min_s=15,
                     kernel="masked_head_projection", model=name, C=C, mode="zero")
        if name == H["models"][0][0]:
            C = max(H["C"])
            run.case(st, f"masked_forward {name} C={C} mean", lambda n=name, i=n_img, l=last, C=C:
                     check_masked_forward(run, n, i, l, C, "mean"), correctness=True, min_s=15,
                     kernel="masked_head_projection", model=name, C=C, mode="mean")
    for dtype in H["dtypes"]:
        for mode in ("zero", "mean"):
            run.case(st, f"masked_head_projection {dtype} {mode}", lambda d=dtype, m=mode: check_head_kernel(run, d, m),
                     correctness=True, min_s=3, kernel="masked_head_projection", dtype=dtype, mode=mode)


def stage_b_head_mask(run: Run, st):
    import fastinterp
    from fastinterp.ablation import head_output_means, masked_forward
    from fastinterp.reference import ablation as ref

    H = run.S["head_mask"]
    pk = run.data.get("peak", {}).get("float32_tflops")
    for name, n_img, last in H["models"]:
        for C in H["C"]:
            def one(name=name, n_img=n_img, last=last, C=C):
                model = _model(run, name)
                info = fastinterp.vit_info(model)
                images = _images(run, model, n_img)
                masks, heads = _masks(info, C, last)
                key = f"mask {name} C={C} zero"
                tri = run.bench(lambda: masked_forward(model, images, masks, backend="triton"), key=key)
                tor = run.bench(lambda: masked_forward(model, images, masks, backend="torch"), key=key + " torch")
                refb = run.bench(lambda: [ref.pruned_encode(model, images, h, copy_model=False) for h in heads],
                                 reps=2, warm=False)
                n = C * n_img
                flops = _forward_flops(info, n)
                t = tri["median_s"]
                return {"triton": tri, "torch": tor, "reference": refb, "ablated_images": n,
                        "triton_images_per_s": n / t, "torch_images_per_s": n / tor["median_s"],
                        "reference_images_per_s": n / refb["median_s"],
                        "speedup_vs_torch": tor["median_s"] / t, "speedup_vs_reference": refb["median_s"] / t,
                        "equivalent_tflops": flops / t / 1e12, "peak_tflops": pk,
                        "fraction_of_fp32_peak": flops / t / 1e12 / pk if pk else None,
                        "compile_s": tri.get("compile_s")}

            run.case(st, f"masked_forward {name} C={C} zero", one, correctness=False, min_s=15, kind="head_mask",
                     model=name, C=C, mode="zero")
        if name == H["models"][0][0]:
            C = max(H["C"])

            def mean_one(name=name, n_img=n_img, last=last, C=C):
                model = _model(run, name)
                info = fastinterp.vit_info(model)
                images = _images(run, model, n_img)
                masks, _ = _masks(info, C, last)
                means = head_output_means(model, images)
                key = f"mask {name} C={C} mean"
                tri = run.bench(lambda: masked_forward(model, images, masks, mode="mean", means=means,
                                                       backend="triton"), key=key)
                tor = run.bench(lambda: masked_forward(model, images, masks, mode="mean", means=means,
                                                       backend="torch"), key=key + " torch")
                n = C * n_img
                t = tri["median_s"]
                return {"triton": tri, "torch": tor, "ablated_images": n, "triton_images_per_s": n / t,
                        "torch_images_per_s": n / tor["median_s"], "speedup_vs_torch": tor["median_s"] / t,
                        "equivalent_tflops": _forward_flops(info, n) / t / 1e12, "compile_s": tri.get("compile_s")}

            run.case(st, f"masked_forward {name} C={C} mean", mean_one, correctness=False, min_s=10,
                     kind="head_mask", model=name, C=C, mode="mean")


# --------------------------------------------------------------------------------------
# l2_normalize_rows
# --------------------------------------------------------------------------------------
def _norm_input(run: Run, dtype: str):
    import torch
    Nn = run.S["normalize"]
    g = torch.Generator(device=run.device).manual_seed(11)
    return (torch.randn(Nn["N"], Nn["D"], device=run.device, generator=g) * 3).to(_dtype(dtype))


def stage_a_normalize(run: Run, st):
    from fastinterp.kernels import l2_normalize_rows

    for dtype in run.S["normalize"]["dtypes"]:
        def one(dtype=dtype):
            skip = _interp_skip(run, dtype)
            if skip:
                return skip
            x = _norm_input(run, dtype)
            tri, s = run.first(f"normalize {dtype}", lambda: l2_normalize_rows(x, backend="triton"))
            tor = l2_normalize_rows(x, backend="torch")
            diff = float((tri.float() - tor.float()).abs().max())
            tol = 1e-6 if dtype == "float32" else 2 ** -7
            return {"triton_first_call_s": round(s, 4), "max_diff": diff, "tolerance": tol, "ok": diff <= tol}

        run.case(st, f"l2_normalize_rows {dtype}", one, correctness=True, min_s=2, kernel="l2_normalize_rows",
                 dtype=dtype)


def stage_b_normalize(run: Run, st):
    from fastinterp.kernels import l2_normalize_rows

    for dtype in run.S["normalize"]["dtypes"]:
        def one(dtype=dtype):
            skip = _interp_skip(run, dtype)
            if skip:
                return skip
            x = _norm_input(run, dtype)
            nbytes = 2 * x.numel() * x.element_size()
            tri = run.bench(lambda: l2_normalize_rows(x, backend="triton"), reps=20 if run.cuda else 1,
                            key=f"normalize {dtype}")
            tor = run.bench(lambda: l2_normalize_rows(x, backend="torch"), reps=20 if run.cuda else 1)
            return {"triton": tri, "torch": tor, "triton_gb_per_s": nbytes / tri["median_s"] / 1e9,
                    "torch_gb_per_s": nbytes / tor["median_s"] / 1e9,
                    "speedup_vs_torch": tor["median_s"] / tri["median_s"]}

        run.case(st, f"l2_normalize_rows {dtype}", one, correctness=False, min_s=2, kind="normalize", dtype=dtype)


# --------------------------------------------------------------------------------------
# TextSpan, Sinkhorn, MI, the mutual-knowledge pipeline
# --------------------------------------------------------------------------------------
def stage_c_textspan(run: Run, st):
    import numpy as np
    import torch

    from fastinterp.reference.textspan import textspan_reference
    from fastinterp.textspan import textspan

    T_ = run.S["textspan"]

    def one():
        g = torch.Generator().manual_seed(0)
        K, L, H, d, M = T_["images"], T_["layers"], T_["heads"], T_["dim"], T_["texts"]
        scales = torch.logspace(0, -2, d)
        perm = torch.stack([torch.randperm(d, generator=g) for _ in range(L * H)]).view(L, H, d)
        C = (torch.randn(K, L, H, d, generator=g) * scales[perm] + 0.5 * torch.randn(L, H, d, generator=g)) / d ** 0.5
        T = torch.nn.functional.normalize(torch.randn(M, d, generator=g), dim=-1)
        Cd, Td = C.to(run.device), T.to(run.device)
        kw = {"n_texts": T_["n_texts"], "rank": T_["rank"]}
        dev = run.bench(lambda: textspan(Cd, Td, **kw), reps=3, key="textspan")
        idx_dev = textspan(Cd, Td, **kw)
        cl = T_["cpu_layers"]
        t0 = time.perf_counter()
        idx_cpu = textspan(C[:, :cl].contiguous(), T, **kw)
        cpu_s = time.perf_counter() - t0
        ref_heads = [(i // H, i % H) for i in range(T_["ref_heads"])]
        t0 = time.perf_counter()
        ref_idx, _ = textspan_reference(C.numpy(), T.numpy(), kw["n_texts"], kw["rank"], heads=ref_heads)
        ref_s = time.perf_counter() - t0
        same_ref = all(idx_dev[a, b].tolist() == np.asarray(ref_idx[a, b]).tolist() for a, b in ref_heads)
        same_cpu = float((idx_dev[:cl] == idx_cpu).all(-1).float().mean())
        heads = L * H
        return {"device_heads_per_s": heads / dev["median_s"], "cpu_heads_per_s": cl * H / cpu_s,
                "reference_heads_per_s": len(ref_heads) / ref_s, "device": dev,
                "speedup_vs_cpu": (cpu_s / (cl * H)) / (dev["median_s"] / heads),
                "speedup_vs_reference": (ref_s / len(ref_heads)) / (dev["median_s"] / heads),
                "same_picks_as_reference": same_ref, "reference_heads_checked": len(ref_heads),
                "same_picks_as_cpu_fraction": same_cpu, "ok": same_ref and same_cpu >= 0.9}

    run.case(st, f"textspan {T_['layers'] * T_['heads']} heads, {T_['images']} images, {T_['texts']} texts on "
             f"{run.device.type}", one, correctness=True, min_s=20, kernel="textspan (torch on the device)")


def stage_c_sinkhorn(run: Run, st):
    import warnings

    import numpy as np
    import torch

    from fastinterp.kernels import sinkhorn as sk
    from fastinterp.reference.mi import sinkhorn_reference

    Sx = run.S["sinkhorn"]
    st["note"] = "no GPU form: Sinkhorn is a Numba kernel on the CPU; checked here on this machine's CPU"

    def pot():
        try:
            import ot
        except ImportError:
            return {"ok": None, "skipped": "POT not importable"}
        rng = np.random.default_rng(1)
        mats = list(rng.random((Sx["problems"],) + tuple(Sx["shape"])))
        sk.sinkhorn_batched(None, None, mats[:4], 0.05, warn=False)
        n = Sx["pot_problems"]
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = [ot.sinkhorn([], [], m, 0.05) for m in mats[:n]]
        pot_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        plans = sk.sinkhorn_batched(None, None, mats, 0.05, warn=False)
        ours_s = time.perf_counter() - t0
        diff = max(float(np.abs(a - b).max()) for a, b in zip(plans[:n], ref))
        return {"max_diff_vs_pot": diff, "problems": len(mats), "ours_problems_per_s": len(mats) / ours_s,
                "pot_problems_per_s": n / pot_s, "speedup_vs_pot": (pot_s / n) / (ours_s / len(mats)),
                "ok": diff <= 1e-7}

    def fixed():
        rng = np.random.default_rng(2)
        sim = np.clip(rng.normal(0.22, 0.04, (Sx["fixed_problems"],) + tuple(Sx["shape"])), -1, 1)
        sk.sinkhorn_fixed(sim[:2])
        n = Sx["ref_problems"]
        simd = torch.from_numpy(sim[:n]).float().to(run.device)
        ref, ref_s = run.timed(lambda: [sinkhorn_reference(s) for s in simd])
        t0 = time.perf_counter()
        plans = sk.sinkhorn_fixed(sim)
        ours_s = time.perf_counter() - t0
        ok = all(np.allclose(a, b.cpu().numpy(), rtol=1e-4, atol=1e-6) for a, b in zip(plans[:n], ref))
        return {"ours_problems_per_s": sim.shape[0] / ours_s, "reference_problems_per_s_on_device": n / ref_s,
                "speedup_vs_reference_on_device": (ref_s / n) / (ours_s / sim.shape[0]), "ok": bool(ok)}

    run.case(st, "sinkhorn_batched (CPU) vs POT", pot, correctness=True, min_s=10, kernel="sinkhorn (Numba, CPU)")
    run.case(st, "sinkhorn_fixed (CPU) vs the reference loop (torch, on the device)", fixed, correctness=True,
             min_s=10, kernel="sinkhorn (Numba, CPU)")


def stage_c_mi(run: Run, st):
    import numpy as np

    from fastinterp.kernels.mi import mi_curves, mutual_info_score
    from fastinterp.reference.mi import mi_curve_reference

    Mx = run.S["mi"]
    st["note"] = "no GPU form: MI is a Numba kernel on the CPU; checked here on this machine's CPU"

    def score():
        from sklearn.metrics import mutual_info_score as sk_mi
        rng = np.random.default_rng(0)
        a = rng.integers(0, Mx["classes"], Mx["samples"])
        b = (a + rng.integers(0, 3, Mx["samples"])) % Mx["classes"]
        mutual_info_score(a[:100], b[:100])
        t0 = time.perf_counter()
        ours = mutual_info_score(a, b)
        ours_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref = sk_mi(a, b)
        sk_s = time.perf_counter() - t0
        return {"ours": ours, "sklearn": ref, "speedup_vs_sklearn": sk_s / ours_s, "ok": abs(ours - ref) <= 1e-9}

    def curves():
        rng = np.random.default_rng(1)
        vis = [rng.integers(0, 40, rng.integers(3, 12)).tolist() for _ in range(Mx["curves"])]
        lang = [rng.integers(0, 40, rng.integers(3, 12)).tolist() for _ in range(Mx["curves"])]
        mi_curves(vis[:2], lang[:2])
        t0 = time.perf_counter()
        ours = mi_curves(vis, lang)
        ours_s = time.perf_counter() - t0
        n = Mx["ref_curves"]
        t0 = time.perf_counter()
        ref = [mi_curve_reference(v, w) for v, w in zip(vis[:n], lang[:n])]
        ref_s = time.perf_counter() - t0
        diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(ours[:n], ref))
        return {"max_diff_vs_reference": diff, "speedup_vs_reference": (ref_s / n) / (ours_s / len(vis)),
                "ok": diff <= 1e-9}

    run.case(st, "mutual_info_score (CPU) vs scikit-learn", score, correctness=True, min_s=5, kernel="mi (Numba, CPU)")
    run.case(st, "mi_curves (CPU) vs the reference loop", curves, correctness=True, min_s=5, kernel="mi (Numba, CPU)")


def stage_c_mutual(run: Run, st):
    st["note"] = ("skipped: the mutual-knowledge pipeline's dense CRF needs pydensecrf, which the GPU image does not "
                  "have; this check never imports it (an import hook refuses pydensecrf). Its compute kernels "
                  "(Sinkhorn, MI) are checked above.")
    st["cases"].append({"case": "mutual-knowledge pipeline", "ok": None, "correctness": False,
                        "skipped": "needs pydensecrf (not on the GPU image)"})


def stage_d_memory(run: Run, st):
    rows = []
    for s in run.data["stages"]:
        if not s["name"].startswith("b_"):
            continue
        for c in s["cases"]:
            for who in ("triton", "torch", "reference", "k_matmuls"):
                if isinstance(c.get(who), dict) and c[who].get("peak_gpu_mib") is not None:
                    rows.append({"case": c["case"], "contender": who, "peak_gpu_mib": c[who]["peak_gpu_mib"]})
    st["rows"] = rows
    P = run.S["pursuit"]
    M = max(P["M"])
    st["note"] = (f"peak torch.cuda.max_memory_allocated above the level before each contender's timed calls (inputs, "
                  f"dictionary and model already allocated); the M = {M:,} fp32 dictionary itself is "
                  f"{M * P['D'] * 4 / 2 ** 30:.2f} GiB" + ("" if run.cuda else "; CPU dry run: no GPU memory"))


# --------------------------------------------------------------------------------------
# targets, report, plot
# --------------------------------------------------------------------------------------
def _cases(run: Run, stage: str):
    for s in run.data["stages"]:
        if s["name"] == stage:
            return s["cases"]
    return []


def targets(run: Run) -> list[dict]:
    out = []
    measured = not run.dry
    P = run.S["pursuit"]
    big = max(P["M"])
    for c in _cases(run, "b_pursuit"):
        if c.get("M") != big or "speedup_vs_torch" not in c:
            continue
        sp = c["speedup_vs_torch"]
        out.append({"target": f"Triton {c['algo'].upper()} {c['dtype']} >= {PURSUIT_SPEEDUP_TARGET:g}x the torch path, M = {big:,}",
                    "measured": f"{sp:.2f}x", "pass": (sp >= PURSUIT_SPEEDUP_TARGET) if measured else None})
        r = c["triton_over_k_matmuls"]
        frac = c.get("triton_fraction_of_peak")
        out.append({"target": f"Triton {c['algo'].upper()} {c['dtype']} within {PURSUIT_MATMUL_TARGET:g}x of the K matmuls "
                              f"({c['dtype']} matmul), M = {big:,}",
                    "measured": f"{r:.2f}x the K-matmul time; {c['triton_tflops']:.1f} TFLOP/s"
                                + (f" = {frac:.0%} of the measured {c['dtype']} peak" if frac else ""),
                    "pass": (r <= PURSUIT_MATMUL_TARGET) if measured else None})
    H = run.S["head_mask"]
    for c in _cases(run, "b_head_mask"):
        if c.get("C") == max(H["C"]) and "speedup_vs_torch" in c and c.get("mode") == "zero":
            sp = c["speedup_vs_torch"]
            out.append({"target": f"fused masking >= {MASK_SPEEDUP_TARGET:g}x the torch path, {c['model']}, C = {c['C']}",
                        "measured": f"{sp:.2f}x", "pass": (sp >= MASK_SPEEDUP_TARGET) if measured else None})
    checks = [c for s in CORRECTNESS_STAGES[:3] for c in _cases(run, s) if c.get("correctness")]
    if checks:
        bad = [c["case"] for c in checks if c.get("ok") is False]
        n_ok = sum(1 for c in checks if c.get("ok") is True)
        out.append({"target": "every Triton kernel agrees with the torch path (same atoms; embeddings to 1e-4)",
                    "measured": f"{n_ok} of {len(checks)} checks passed" + (f"; failed: {', '.join(bad)}" if bad else "")
                                + (f"; {len(checks) - n_ok - len(bad)} not run" if len(checks) - n_ok - len(bad) else ""),
                    "pass": not bad})
    return out


def _fmt(v, digits=3):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 1e4 or abs(v) < 1e-3:
            return f"{v:.2e}"
        return f"{v:.{digits}g}"
    return str(v)


def _verdict(c):
    if c.get("skipped"):
        return f"skipped: {c['skipped']}"
    if c.get("error"):
        return f"ERROR: {c['error']}"
    return {True: "pass", False: "FAIL", None: "-"}[c.get("ok")]


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(x).replace("|", "/") for x in r) + " |" for r in rows]
    return "\n".join(lines)


_DETAIL_KEYS = ("same_atoms", "same_atoms_as_fp32_query", "within_rounding_bound", "max_raw_diff", "same_atom_sets",
                "max_coef_diff", "same_support_as_reference", "max_diff_vs_reference", "recon_err_triton",
                "recon_err_torch", "max_diff_vs_torch", "embedding_scale", "rel_err_triton", "rel_err_torch",
                "max_diff", "max_diff_vs_pot", "same_picks_as_reference", "same_picks_as_cpu_fraction",
                "triton_first_call_s", "last_backend")


def render_md(run: Run) -> str:
    d = run.data
    m = d.get("machine", {})
    v = d.get("verdict", {})
    lines = [f"# fastinterp GPU check{' (DRY RUN: CPU, tiny sizes, Triton interpreter; numbers mean nothing)' if run.dry else ''}",
             "", f"- command: `{d['command']}`",
             f"- GPU: {m.get('gpu') or 'none'}; torch {m.get('versions', {}).get('torch')}, triton "
             f"{m.get('versions', {}).get('triton')}, CUDA {m.get('cuda')}; date {m.get('date')}; machine id `{m.get('machine_id')}`",
             f"- started {d['started']}, {d['elapsed_s']} s elapsed of a {d['budget_s']:g} s budget"
             + ("; finished" if d.get("finished") else "; RUNNING or cut off (this file is rewritten after every case)"),
             f"- correctness: {v.get('passed')} of {v.get('checks')} checks passed"
             + (f"; FAILED: {', '.join(v['failed'])}" if v.get("failed") else "")
             + (f"; stage errors: {', '.join(v['stage_errors'])}" if v.get("stage_errors") else ""),
             "- pydensecrf: never imported (the mutual-knowledge pipeline is skipped on the GPU image)", ""]
    pk = d.get("peak", {})
    if pk:
        lines += ["Measured matmul rates (n = %s, this run, the 'peak' for the fractions below): " % pk.get("n")
                  + ", ".join(f"{k[:-7]} {pk[k]:.1f} TFLOP/s" for k in pk if k.endswith("_tflops")), ""]
    lines += ["## Targets", ""]
    lines.append(_table(["target", "measured", "pass"],
                        [[t["target"], t["measured"], {True: "pass", False: "FAIL", None: "not measured (dry run)"}[t["pass"]]]
                         for t in d.get("targets", [])]) if d.get("targets") else "(none measured yet)")
    lines.append("")
    for s in d["stages"]:
        lines += [f"## {s['name']}: {s['title']}", "", f"status: {s['status']}"
                  + (f", {s['seconds']} s" if "seconds" in s else "") + (f" — {s['error']}" if s.get("error") else ""), ""]
        if s.get("note"):
            lines += [s["note"], ""]
        if s["name"] == "d_memory":
            if s.get("rows"):
                lines.append(_table(["case", "contender", "peak GPU MiB"],
                                    [[r["case"], r["contender"], _fmt(r["peak_gpu_mib"])] for r in s["rows"]]))
                lines.append("")
            continue
        if s["name"] == "b_pursuit":
            rows = [[c["case"], _verdict(c) if c.get("error") or c.get("skipped") else "",
                     _fmt(c.get("triton_vectors_per_s")), _fmt(c.get("torch_vectors_per_s")),
                     _fmt(c.get("reference_vectors_per_s")), _fmt(c.get("speedup_vs_torch")),
                     _fmt(c.get("speedup_vs_reference")), _fmt(c.get("triton_tflops")),
                     _fmt(c.get("triton_fraction_of_peak")), _fmt(c.get("triton_over_k_matmuls")),
                     _fmt(c.get("compile_s")), _fmt((c.get("triton") or {}).get("peak_gpu_mib"))] for c in s["cases"]]
            lines.append(_table(["case", "status", "Triton vec/s", "torch vec/s", "reference vec/s", "x torch",
                                 "x reference", "Triton TFLOP/s", "of peak", "/ K matmuls", "compile s",
                                 "Triton peak MiB"], rows))
        elif s["name"] == "b_head_mask":
            rows = [[c["case"], _verdict(c) if c.get("error") or c.get("skipped") else "",
                     _fmt(c.get("triton_images_per_s")), _fmt(c.get("torch_images_per_s")),
                     _fmt(c.get("reference_images_per_s")), _fmt(c.get("speedup_vs_torch")),
                     _fmt(c.get("speedup_vs_reference")), _fmt(c.get("equivalent_tflops")),
                     _fmt(c.get("fraction_of_fp32_peak")), _fmt(c.get("compile_s"))] for c in s["cases"]]
            lines.append(_table(["case", "status", "Triton img/s", "torch img/s", "reference img/s", "x torch",
                                 "x reference", "equiv. TFLOP/s", "of fp32 peak", "compile s"], rows))
        else:
            rows = []
            for c in s["cases"]:
                keys = [k for k in _DETAIL_KEYS if k in c]
                extra = [k for k, val in c.items() if k.endswith(("_per_s", "speedup_vs_torch", "tflops"))
                         or k.startswith("speedup")]
                detail = "; ".join(f"{k} {_fmt(c[k])}" for k in keys + [k for k in extra if k not in keys])
                rows.append([c["case"], _verdict(c), detail, _fmt(c.get("wall_s"))])
            if rows:
                lines.append(_table(["case", "verdict", "details", "wall s"], rows))
        lines.append("")
    if d.get("plot"):
        lines += [f"Plot: {d['plot']}", ""]
    lines += ["Method: every contender runs once untimed (Triton compiles then; compile_s = that first call minus "
              "the fastest timed one), then up to %d timed calls (CUDA events) within %.0f s; the median is "
              "reported. TFLOP/s of a pursuit counts its K selection matmuls (K x 2 B M D); '/ K matmuls' is the "
              "Triton pursuit's time over K plain `x @ G.T` in the storage dtype (fp32 without TF32). Head "
              "masking's 'equivalent TFLOP/s' counts C x B full image-tower forwards (what the reference runs), "
              "so it can exceed what the fused pass executes. Results to be committed under "
              "benchmarks/results/<date>_<machine>/." % (run.S["reps"], run.S["max_case_s"]), ""]
    return "\n".join(lines)


def write_plot(run: Run):
    rows = []
    for stage in ("b_pursuit", "b_head_mask", "b_normalize"):
        for c in _cases(run, stage):
            if "speedup_vs_torch" in c:
                rows.append((c["case"], c["speedup_vs_torch"], c.get("speedup_vs_reference")))
    if not rows:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 0.35 * len(rows) + 1.5))
    ys = range(len(rows))
    ax.barh([y + 0.2 for y in ys], [r[1] for r in rows], height=0.4, label="Triton vs torch path (same device)")
    ax.barh([y - 0.2 for y in ys], [r[2] if r[2] else float("nan") for r in rows], height=0.4,
            label="Triton vs reference (same device)")
    ax.set_yticks(list(ys))
    ax.set_yticklabels([r[0] for r in rows], fontsize=7)
    ax.set_xscale("log")
    ax.axvline(1, color="k", lw=0.8)
    ax.set_xlabel("speed-up (x)")
    title = run.data["machine"].get("gpu") or "CPU dry run (meaningless numbers)"
    ax.set_title(f"fastinterp GPU check: {title}", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = os.path.join(run.out, "gpu.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return "gpu.png"


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------
def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, help="folder for gpu.json, gpu.md, gpu.png")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU tensors, tiny sizes, TRITON_INTERPRET=1 (the test suite's check of this script)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="skip what no longer fits after this many seconds (default 420)")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of: " + ", ".join(STAGES))
    args = p.parse_args(argv)
    args.argv = list(argv)
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    _prepare_environment(args.dry_run)
    wanted = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(STAGES))
    if unknown:
        raise SystemExit(f"unknown stages {unknown}; choose from {STAGES}")
    if "machine" not in wanted:
        wanted.insert(0, "machine")
    import torch

    if args.dry_run:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    run = Run(args)
    table = {
        "machine": ("machine record and this device's matmul rates", stage_machine, 0),
        "a_pursuit": ("(a) pursuit selection kernel and pursuits: Triton vs torch path (vs reference)", stage_a_pursuit, 20),
        "a_head_mask": ("(a) head masking: Triton vs torch path vs reference", stage_a_head_mask, 20),
        "a_normalize": ("(a) l2_normalize_rows: Triton vs torch path", stage_a_normalize, 2),
        "b_pursuit": ("(b) pursuit throughput", stage_b_pursuit, 20),
        "b_head_mask": ("(b) head-masking throughput", stage_b_head_mask, 20),
        "b_normalize": ("(b) l2_normalize_rows throughput", stage_b_normalize, 2),
        "c_textspan": ("(c) TextSpan on the device", stage_c_textspan, 20),
        "c_sinkhorn": ("(c) Sinkhorn (no GPU form)", stage_c_sinkhorn, 10),
        "c_mi": ("(c) mutual information (no GPU form)", stage_c_mi, 5),
        "c_mutual": ("(c) mutual-knowledge pipeline", stage_c_mutual, 0),
        "d_memory": ("(d) peak GPU memory", stage_d_memory, 0),
    }
    for name in STAGES:
        if name not in wanted:
            continue
        title, fn, min_s = table[name]
        if run.dry:
            min_s = 0
        run.stage(name, title, lambda st, fn=fn: fn(run, st), min_s=min_s)
        print(f"[benchmarks.gpu] {name}: {run.data['stages'][-1]['status']} ({run.elapsed():.0f} s)", flush=True)
    run.flush(final=True)
    v = run.data["verdict"]
    print(f"[benchmarks.gpu] {v['passed']} of {v['checks']} correctness checks passed; wrote "
          f"{os.path.join(run.out, 'gpu.md')} and gpu.json in {run.elapsed():.0f} s", flush=True)
    if not v["correct"]:
        print(f"[benchmarks.gpu] FAILED: {v['failed'] or v['stage_errors']}", flush=True)
        return 1
    if v["other_errors"] or v["stage_errors"]:
        print(f"[benchmarks.gpu] errors outside the correctness checks: {v['other_errors'] or v['stage_errors']}",
              flush=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
