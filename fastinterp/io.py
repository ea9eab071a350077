"""File I/O every writer in the package uses: atomic writes, safe file names, JSON / tensor files.

An atomic write goes to a temporary file in the target's folder and is moved over the
target with `os.replace`, so a reader sees the old file or the new one, never half of
one; the temporary file is removed on every error path (including KeyboardInterrupt).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import IO, Iterator

import torch

__all__ = ["CorruptFileError", "MissingChecksumError", "RUN_RECORD", "atomic_open", "atomic_write_text", "atomic_write_json", "atomic_save",
           "content_hash", "files_fingerprint", "load_checked", "read_json", "read_run_record", "safe_name",
           "save_checked", "save_tensor_checked", "load_tensor_checked", "text_fingerprint", "write_run_record"]

CHECKSUM_KEY = "sha256"
"""The key under which `save_checked` stores the content hash beside the data."""


class CorruptFileError(ValueError):
    """A saved file that cannot be read, or whose contents do not match their checksum."""


class MissingChecksumError(CorruptFileError):
    """A saved file with no checksum to verify it against (another tool's, or an older version's)."""


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", *, encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file beside `path`; on a clean exit it replaces `path`.

    `mode` is "wb" or "w" (text, UTF-8 unless `encoding` says otherwise). Parent folders are
    created. On any exception the temporary file is deleted and `path` is left as it was.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{str(path)!r} is a folder, so no file can be written there; move or delete the "
                                f"folder, or choose another output path")
    if path.parent.exists() and not path.parent.is_dir():
        raise NotADirectoryError(f"{str(path.parent)!r} is a file, but {str(path)!r} needs it to be a folder; move "
                                 f"the file away or choose another output path")
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


def atomic_write_json(path: str | os.PathLike, obj, *, indent: int | None = 1, ensure_ascii: bool = True) -> None:
    """JSON-encode first (an unserialisable object fails before anything is written)."""
    text = json.dumps(obj, indent=indent, ensure_ascii=ensure_ascii)
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


def _hash_into(h, obj) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for key in sorted(obj, key=str):
            h.update(f"K{key!s}".encode())
            _hash_into(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for item in obj:
            _hash_into(h, item)
    elif obj is None or isinstance(obj, (str, int, float, bool)):
        h.update(("V" + json.dumps(obj)).encode())
    else:
        import numpy as np

        if isinstance(obj, np.ndarray):
            _hash_into(h, torch.from_numpy(np.ascontiguousarray(obj)))
        else:
            raise TypeError(f"content_hash: cannot hash a {type(obj).__name__}")


def content_hash(obj) -> str:
    """SHA-256 of nested dicts / lists / tensors / arrays / plain values: their bytes, dtypes,
    shapes and keys, independent of how the file holding them was serialised."""
    h = hashlib.sha256()
    _hash_into(h, obj)
    return h.hexdigest()


def save_checked(obj: dict, path: str | os.PathLike) -> None:
    """`atomic_save` of a dict with its content hash stored under CHECKSUM_KEY (still a plain
    dict for `torch.load`)."""
    if not isinstance(obj, dict) or CHECKSUM_KEY in obj:
        raise TypeError(f"save_checked takes a dict without a {CHECKSUM_KEY!r} key")
    atomic_save({**obj, CHECKSUM_KEY: content_hash(obj)}, path)


SIDECAR_SUFFIX = ".sha256"
"""`save_tensor_checked` writes the content hash of a bare-tensor file to `<file>.sha256`."""


def save_tensor_checked(tensor: torch.Tensor, path: str | os.PathLike) -> None:
    """`atomic_save` of a bare tensor (a file other tools read as a tensor, e.g. SITH's
    image_mean.pt) plus its content hash in `<path>.sha256`, written after it (a crash in
    between leaves a stale hash, which `load_tensor_checked` reports: never a silent read)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"save_tensor_checked takes a tensor, got {type(tensor).__name__}")
    atomic_save(tensor, path)
    atomic_write_text(os.fspath(path) + SIDECAR_SUFFIX, content_hash(tensor) + "\n")


def _torch_load(path: str, what: str):
    if os.path.isdir(path):
        raise CorruptFileError(f"{path!r} is a folder, not {what}; move it away")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # torch raises many types (with its own advice) for truncated / foreign files
        raise CorruptFileError(f"{path!r} cannot be read as {what} ({type(err).__name__}): it is truncated, corrupt "
                               f"or not a tensor file; delete it (it is rebuilt where fastinterp made it) or "
                               f"give a file saved with torch.save") from None


def load_tensor_checked(path: str | os.PathLike, *, require_checksum: bool = False,
                        what: str = "a saved tensor") -> torch.Tensor:
    """A bare-tensor file (`weights_only=True`), verified against `<path>.sha256` when that
    exists (required with `require_checksum`). CorruptFileError naming the file, what is
    wrong and the fix, for a folder, an unreadable or non-tensor file, or a mismatch."""
    path = os.fspath(path)
    data = _torch_load(path, what)
    if not isinstance(data, torch.Tensor):
        raise CorruptFileError(f"{path!r} holds a {type(data).__name__}, not {what}: save the tensor itself "
                               f"(torch.save(tensor, path))")
    sidecar = Path(path + SIDECAR_SUFFIX)
    if sidecar.is_file():
        stored = sidecar.read_text(encoding="utf-8", errors="replace").strip()
        if stored != content_hash(data):
            raise CorruptFileError(f"{path!r}: its contents do not match the checksum in {sidecar.name} (the file "
                                   f"is corrupt, or was replaced without it); delete both to rebuild it")
    elif require_checksum:
        raise MissingChecksumError(f"{path!r} has no checksum file {sidecar.name}; delete it to rebuild it")
    return data


def load_checked(path: str | os.PathLike, *, require_checksum: bool = True) -> dict:
    """Load a file written by `save_checked` (tensors only, `weights_only=True`) and verify it.

    Raises CorruptFileError, naming the file, when it cannot be read, is not such a dict,
    has no checksum (unless `require_checksum=False`, for files of older versions), or its
    contents do not match the checksum. Returns the dict without the checksum key.
    """
    path = os.fspath(path)
    data = _torch_load(path, "a file fastinterp wrote")
    if not isinstance(data, dict):
        raise CorruptFileError(f"{path!r} holds a {type(data).__name__}, not the dict fastinterp writes")
    stored = data.pop(CHECKSUM_KEY, None)
    if stored is None:
        if require_checksum:
            raise MissingChecksumError(f"{path!r} carries no checksum (written by another tool or an older "
                                   f"version); delete it to rebuild it")
        return data
    if stored != content_hash(data):
        raise CorruptFileError(f"{path!r}: its contents do not match the checksum written with them (the file "
                               f"is corrupt); delete it to rebuild it")
    return data


# --------------------------------------------------------------------------------------
# run records and input fingerprints
# --------------------------------------------------------------------------------------
RUN_RECORD = "run.json"
"""The file name of an output folder's run record (what made the folder: model, inputs, settings)."""


def read_run_record(folder: str | os.PathLike) -> dict | None:
    """The run record `folder/run.json`, or None when the folder has none. A record that
    cannot be read is an error (CorruptFileError naming it), never silently ignored."""
    path = Path(folder) / RUN_RECORD
    if not path.is_file():
        return None
    data = read_json(path)
    if not isinstance(data, dict):
        raise CorruptFileError(f"{str(path)!r} is not a fastinterp run record (unreadable JSON); delete it only if "
                               f"you also delete the results beside it")
    return data


def write_run_record(folder: str | os.PathLike, record: dict) -> Path:
    """Write `folder/run.json` atomically (sorted keys, no timestamps: the same run gives the same bytes)."""
    path = Path(folder) / RUN_RECORD
    with atomic_open(path, "w") as f:
        f.write(json.dumps(record, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    return path


def text_fingerprint(path: str | os.PathLike) -> dict:
    """A text input (dictionary, text bank, class names...): its file name and the SHA-256 of its bytes."""
    path = Path(path)
    return {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def files_fingerprint(paths, root: str | os.PathLike | None = None) -> dict:
    """A set of files (an image folder): SHA-256 over the sorted paths relative to `root`
    (default: their common folder), sizes and modification times; independent of the
    working directory and of how the root was spelled."""
    resolved = sorted(Path(p).resolve() for p in paths)
    if not resolved:
        return {"files": 0, "sha256": hashlib.sha256(b"").hexdigest()}
    base = Path(root).resolve() if root is not None else Path(os.path.commonpath([p.parent for p in resolved]))
    h = hashlib.sha256()
    for p in resolved:
        try:
            st = p.stat()
            stamp = f"{st.st_size}\0{st.st_mtime_ns}"
        except FileNotFoundError:  # a missing file is part of what the inputs are (readers skip it and say so)
            stamp = "missing"
        h.update(f"{p.relative_to(base).as_posix()}\0{stamp}\n".encode())
    return {"files": len(resolved), "sha256": h.hexdigest()}
