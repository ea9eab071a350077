"""`fastinterp sweep run SPEC` and `fastinterp sweep status SPEC`."""
from __future__ import annotations

import sys

from ..sweep import load_spec, run_sweep, sweep_status


def cmd_run(args) -> int:
    spec = load_spec(args.spec, output=args.output)
    if args.threads is not None:
        spec.threads = args.threads
    if args.retries is not None:
        spec.retries = args.retries
    if args.device is not None:
        spec.device = args.device
    if args.engine == "serial" and (args.address or args.workers):
        raise ValueError("--address and --workers are for --engine ray")
    store = None if args.object_store_mb is None else int(args.object_store_mb * 2 ** 20)
    s = run_sweep(spec, engine=args.engine, workers=args.workers, address=args.address, object_store_memory=store,
                  progress=not args.quiet, report=not args.no_report)
    print(f"sweep: {s['tasks']} tasks: {s['ran']} ran, {s['reused']} already done, {len(s['failed'])} failed, "
          f"{len(s['blocked'])} blocked ({s['engine']} engine; start-up {s['startup_s']:.1f} s, "
          f"total {s['wall_s']:.1f} s)")
    for tid, err in s["failed"].items():
        print(f"  failed {tid[:10]}: {err}", file=sys.stderr)
    print(f"results: {s['results']['csv']} ({s['results']['rows']} rows), {s['results']['json']}"
          + (f"; report: {s['results']['report']}" if "report" in s["results"] else ""))
    return 1 if s["failed"] or s["blocked"] else 0


def cmd_status(args) -> int:
    spec = load_spec(args.spec, output=args.output)
    st = sweep_status(spec, verify=args.verify)
    c = st["counts"]
    print(f"{st['output']}: {c['done']} done, {c['pending']} pending, {c['failed']} failed")
    for r in st["tasks"]:
        if args.all or r["state"] != "done":
            print(f"  {r['state']:8s} {r['name']}" + (f"  -- {r['error']}" if r["error"] else ""))
    return 0


def register(sub) -> None:
    """`fastinterp sweep run|status SPEC`."""
    group = sub.add_parser("sweep", help="many models x layers x dictionaries x methods x image folders from a "
                                         "TOML spec; serial or on Ray (local or a cluster); resumable")
    ssub = group.add_subparsers(dest="sweep_command", required=True)
    p = ssub.add_parser("run", help="run every task of the spec not already done; merge results and report")
    p.add_argument("spec", help="the sweep's TOML file")
    p.add_argument("--engine", choices=("ray", "serial"), default="ray",
                   help="ray (default: a local Ray started in-process, or --address) or serial (this process, "
                        "no Ray; for debugging)")
    p.add_argument("--workers", type=int, default=None,
                   help="local Ray: worker processes (default: CPUs / threads); with --address: at most this many "
                        "tasks at once")
    p.add_argument("--address", default=None, help="join an existing Ray cluster: 'auto' or HOST:PORT")
    p.add_argument("--output", default=None, help="output folder (default: the spec's sweep.output)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (= CPUs) per task (default: the spec's)")
    p.add_argument("--retries", type=int, default=None, help="retries of a failed task (default: the spec's, 2)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                   help="auto (default): CUDA where the worker has it")
    p.add_argument("--object-store-mb", type=float, default=None, help="local Ray's object store size")
    p.add_argument("--no-report", action="store_true", help="results table only, no report.md / figures")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_run)
    p = ssub.add_parser("status", help="done / pending / failed tasks of a spec's sweep")
    p.add_argument("spec")
    p.add_argument("--output", default=None, help="output folder (default: the spec's sweep.output)")
    p.add_argument("--all", action="store_true", help="list done tasks too")
    p.add_argument("--verify", action="store_true", help="check every output's hash (default: sizes)")
    p.set_defaults(func=cmd_status)
