"""File I/O every writer in the package uses: atomic writes, safe file names, JSON / tensor files.

An atomic write goes to a temporary file in the target's folder and is moved over the
target with `os.replace`, so a reader sees the old file or the new one, never half of
one; the temporary file is removed on every error path (including KeyboardInterrupt).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import IO, Iterator

import torch

__all__ = ["atomic_open", "atomic_write_text", "atomic_write_json", "atomic_save", "read_json", "safe_name"]


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", *, encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file beside `path`; on a clean exit it replaces `path`.

    `mode` is "wb" or "w" (text, UTF-8 unless `encoding` says otherwise). Parent folders are
    created. On any exception the temporary file is deleted and `path` is left as it was.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if mode == "w":
            f = os.fdopen(fd, "w", encoding=encoding or "utf-8", newline="")
        else:
            f = os.fdopen(fd, "wb")
        with f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, obj, *, indent: int | None = 1) -> None:
    """JSON-encode first (an unserialisable object fails before anything is written)."""
    text = json.dumps(obj, indent=indent)
    atomic_write_text(path, text)


def atomic_save(obj, path: str | os.PathLike) -> None:
    """`torch.save(obj)` to `path`, atomically."""
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def read_json(path: str | os.PathLike, default=None):
    """The parsed JSON file, or `default` when it is missing or unreadable (a partial write)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return default


def safe_name(text: str, *, sep: str = "_", keep: str = "._-") -> str:
    """`text` as one file-name component: every run of characters other than ASCII letters,
    digits and `keep` becomes `sep`; never empty, never "." or ".."."""
    name = re.sub("[^A-Za-z0-9" + re.escape(keep) + "]+", sep, str(text))
    return sep if name in ("", ".", "..") else name
