"""Loading images: folders (ImageFolder layout for labels) and a few bundled demo photos."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def demo_images() -> dict[str, Image.Image]:
    """Real photos bundled with scikit-image (no download): name -> RGB PIL image."""
    import skimage.data

    names = ("astronaut", "coffee", "chelsea", "rocket")
    return {name: Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in names}


def open_rgb(path: str | Path) -> Image.Image:
    """Open any PIL-readable image as RGB (grayscale, palette and RGBA are converted)."""
    with Image.open(path) as im:
        im.load()
        if im.mode == "RGBA":  # composite on white rather than dropping alpha to black
            bg = Image.new("RGB", im.size, (255, 255, 255))
            bg.paste(im, mask=im.split()[-1])
            return bg
        return im.convert("RGB")


@dataclass
class ImageFolderListing:
    """Image files found under a root: `items` are (path, class_name or None); `skipped`
    are (path, reason) for files that could not be read."""

    root: Path
    items: list[tuple[Path, str | None]] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def list_image_folder(root: str | Path, *, labelled: bool | None = None) -> ImageFolderListing:
    """List the images under `root`.

    With sub-folders (ImageFolder layout: root/class_name/*.jpg) each image gets its folder
    as class; with `labelled=False` or no sub-folders, images are unlabelled. Raises
    FileNotFoundError if root is missing and ValueError if it holds no images.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    listing = ImageFolderListing(root=root)
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if labelled is None:
        labelled = bool(subdirs)
    if labelled:
        for d in subdirs:
            files = sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            listing.classes.append(d.name)
            if not files:
                listing.empty_classes.append(d.name)
            listing.items += [(p, d.name) for p in files]
    else:
        listing.items = [(p, None) for p in sorted(root.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not listing.items:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {str(root)!r}")
    if listing.empty_classes:
        warnings.warn(f"class folders with no images: {listing.empty_classes}", RuntimeWarning, stacklevel=2)
    return listing


def load_images(paths, *, listing: ImageFolderListing | None = None):
    """Open each path as RGB; unreadable files are skipped with a warning and recorded in
    `listing.skipped` (if given). Returns [(path, image)]."""
    out = []
    for p in paths:
        try:
            out.append((Path(p), open_rgb(p)))
        except (OSError, UnidentifiedImageError, ValueError) as err:
            warnings.warn(f"skipping unreadable image {str(p)!r}: {err}", RuntimeWarning, stacklevel=2)
            if listing is not None:
                listing.skipped.append((Path(p), str(err)))
    return out
