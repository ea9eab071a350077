"""A sweep's inputs: dictionaries from their spec source, image folders (the bundled demo
photos written once under the output), content fingerprints of both."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

__all__ = ["resolve_dictionary", "image_folder", "folder_digest", "list_images", "list_classes", "DIGEST_CACHE"]


def resolve_dictionary(name: str, source: dict):
    """The ConceptDictionary of a spec entry ({"builtin"} | {"file"} | {"texts"}), named `name`."""
    from ..concepts import ConceptDictionary

    if "texts" in source:
        return ConceptDictionary(source["texts"], name=name)
    if "file" in source:
        from ..mutual import load_descriptors  # .txt (one per line) or .json (class -> descriptors)

        return ConceptDictionary(load_descriptors(source["file"]).texts, name=name)
    b = source["builtin"]
    if b == "demo":
        d = ConceptDictionary.builtin("demo")
    elif b == "bpe":
        d = ConceptDictionary.bpe_vocabulary()
    elif b == "textspan":
        from ..textspan import builtin_text_bank

        d = ConceptDictionary(builtin_text_bank())
    elif b == "descriptors":
        from ..mutual import demo_descriptors

        d = demo_descriptors()
    else:
        raise ValueError(f"no built-in dictionary {b!r}")
    return ConceptDictionary(d.texts, name=name)


def image_folder(spec, name: str) -> Path:
    """The folder of `spec.images[name]`; the demo photos are written (once, PNG) to
    <output>/inputs/<name>/<photo>/<photo>.png (ImageFolder layout: one class per photo)."""
    from ..io import atomic_open

    src = spec.images[name]
    if "folder" in src:
        return Path(src["folder"])
    root = spec.output / "inputs" / name
    from ..images import demo_images

    for photo, im in demo_images().items():
        path = root / photo / f"{photo}.png"
        if not path.is_file():
            with atomic_open(path, "wb") as f:
                im.save(f, format="PNG")
    return root


def list_images(folder) -> list[str]:
    """Every image under `folder` (recursively, sorted), as paths relative to it."""
    from ..images import list_image_folder

    root = Path(folder)
    return [p.relative_to(root).as_posix() for p, _ in list_image_folder(root, labelled=False).items]


def list_classes(folder, what: str) -> list[str]:
    """The class folders of an ImageFolder (sorted); a clear error naming `what` without them."""
    root = Path(folder)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{what} ({str(root)!r}) has no class sub-folders: mutual explain and ccs prune need the "
                         f"ImageFolder layout <folder>/<class>/<image>")
    return classes


DIGEST_CACHE = "cache/image-digests.json"
"""Under a sweep's output: each image folder's content digest with the file listing (paths,
sizes, modification times) it was computed for; delete it to force re-hashing."""


def folder_digest(folder, cache: Path | None = None) -> dict:
    """SHA-256 over the sorted relative paths and bytes of every image under `folder`
    (independent of where the folder lives and of modification times). With `cache` (a
    JSON file), the bytes are read again only when the listing's paths, sizes or
    modification times changed: a dataset is hashed once, not on every run and status."""
    from ..io import atomic_open, files_fingerprint, read_json

    root = Path(folder)
    files = list_images(root)
    listing = files_fingerprint([root / rel for rel in files], root=root)["sha256"]
    key = str(root.resolve())
    known = (read_json(cache) or {}) if cache is not None else {}
    hit = known.get(key) if isinstance(known, dict) else None
    if isinstance(hit, dict) and hit.get("listing") == listing and isinstance(hit.get("digest"), dict):
        return hit["digest"]
    h = hashlib.sha256()
    for rel in files:
        h.update(rel.encode() + b"\0")
        with open(root / rel, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        h.update(b"\n")
    digest = {"files": len(files), "sha256": h.hexdigest()}
    if cache is not None:
        known = known if isinstance(known, dict) else {}
        known[key] = {"listing": listing, "digest": digest}
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(cache, "w") as f:
            json.dump(known, f, indent=1, sort_keys=True)
    return digest
