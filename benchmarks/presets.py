"""Benchmark size presets.

Every `bench_*.py` file defines its sizes as ``SIZES = {"quick": {...}, "full": {...}}``
and picks one with the preset named by the environment variable FASTINTERP_BENCH_PRESET
(set by ``pytest benchmarks --preset NAME`` or ``python -m benchmarks.report --preset NAME``):

* ``quick``: seconds per file; what CI runs so the suite never rots (whole suite < 5 min
  on 2 cores).
* ``full``: a real measurement (minutes to an hour, ViT-B-16 sized inputs).

A file may define more presets (e.g. ``medium``); `preset(SIZES)` accepts them for that file.
"""
from __future__ import annotations

import os

ENV_VAR = "FASTINTERP_BENCH_PRESET"
PRESETS = ("quick", "full")
DEFAULT = "quick"


def preset(sizes: dict | None = None) -> str:
    """The preset name from FASTINTERP_BENCH_PRESET (default "quick"), validated.

    sizes: the calling file's SIZES dict; its keys are accepted besides quick / full, and
    the name must be one of its keys.
    """
    name = os.environ.get(ENV_VAR, "").strip() or DEFAULT
    allowed = tuple(PRESETS) + tuple(k for k in (sizes or {}) if k not in PRESETS)
    if name not in allowed:
        raise ValueError(f"{ENV_VAR}={name!r}: choose one of {allowed}")
    if sizes is not None and name not in sizes:
        raise ValueError(f"{ENV_VAR}={name!r}: this benchmark file defines only {tuple(sizes)}")
    return name


def select(sizes: dict) -> dict:
    """The calling file's sizes for the current preset: ``S = select(SIZES)``."""
    return sizes[preset(sizes)]
