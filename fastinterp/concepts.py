"""Concept dictionaries: lists of texts, their CLIP text embeddings, and the on-disk cache.

A dictionary is a list of unique, non-empty strings in a fixed order (the row order of its
embedding matrix). Embeddings are cached under a key made of the model name, a hash of the
text-tower weights, a hash of the texts and the prompt template, so a changed model or list
never reuses a stale file.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import warnings
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from .io import atomic_save
from .models import weights_hash

CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """`$FASTINTERP_CACHE`, else `~/.cache/fastinterp`."""
    return Path(os.environ.get("FASTINTERP_CACHE") or Path.home() / ".cache" / "fastinterp")


class ConceptDictionary(Sequence[str]):
    """An ordered list of unique concept texts.

    Entries are stripped; blanks and later duplicates are dropped, first occurrences keep
    their order.
    """

    def __init__(self, texts: Iterable[str], *, name: str = "custom"):
        if isinstance(texts, (str, bytes)):
            raise TypeError("ConceptDictionary takes a list of strings, not a single string; "
                            "use ConceptDictionary.from_file(path) for a file")
        seen: dict[str, None] = {}
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"concept #{i} is {type(text).__name__} ({text!r}); every concept must be a str")
            text = text.strip()
            if text:
                seen.setdefault(text, None)
        if not seen:
            raise ValueError(f"concept dictionary {name!r} is empty (no non-blank entries)")
        self.texts: list[str] = list(seen)
        self.name = name

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, name: str | None = None) -> "ConceptDictionary":
        """One concept per line of a UTF-8 text file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"concept file {str(path)!r} does not exist")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise ValueError(
                f"concept file {str(path)!r} is not valid UTF-8 (byte {err.start}); re-save it as UTF-8"
            ) from err
        return cls(lines, name=name or path.stem)

    @classmethod
    def builtin(cls, name: str = "demo") -> "ConceptDictionary":
        """A small built-in list (`demo`: a few hundred everyday visual concepts)."""
        files = {"demo": "demo_concepts.txt"}
        if name not in files:
            raise ValueError(f"no built-in dictionary {name!r}; available: {sorted(files)}")
        text = resources.files("fastinterp.data").joinpath(files[name]).read_text(encoding="utf-8")
        return cls(text.splitlines(), name=name)

    @classmethod
    def bpe_vocabulary(cls, *, min_length: int = 3) -> "ConceptDictionary":
        """Whole words of open_clip's BPE vocabulary (tens of thousands, available offline)."""
        from open_clip.tokenizer import default_bpe

        with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
            # the tokenizer uses only the first 49152 - 256 - 2 merges of the file
            merges = f.read().split("\n")[1:49152 - 256 - 2 + 1]
        words = []
        for merge in merges:
            token = merge.replace(" ", "")
            if token.endswith("</w>"):
                word = token[: -len("</w>")]
                if len(word) >= min_length and word.isalpha() and word.isascii():
                    words.append(word)
        return cls(words, name="bpe")

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i):
        return self.texts[i]

    def __repr__(self) -> str:
        return f"ConceptDictionary(name={self.name!r}, size={len(self)})"

    def texts_hash(self, template: str = "{}") -> str:
        h = hashlib.sha256(template.encode())
        for t in self.texts:
            h.update(b"\0" + t.encode())
        return h.hexdigest()

    def encode(self, model, tokenizer, *, template: str = "{}", batch_size: int = 256,
               device=None, cache_dir: str | os.PathLike | None = None, use_cache: bool = True,
               progress: bool = True) -> torch.Tensor:
        """Raw (unnormalised) text embeddings, shape (M, d), fp32 on CPU.

        `template` is a format string applied to each concept ("{}" = the raw text, as SITH
        does). Results are cached on disk (see `default_cache_dir`); a corrupt or mismatched
        cache file is reported and rebuilt.
        """
        if "{}" not in template:
            raise ValueError(f"template {template!r} must contain '{{}}' where the concept goes")
        model_name = getattr(model, "fastinterp_name", type(model).__name__)
        meta = {
            "format": CACHE_FORMAT,
            "model": model_name,
            "weights": weights_hash(model, exclude_prefix="visual."),
            "texts": self.texts_hash(template),
            "template": template,
            "size": len(self),
        }
        path = None
        if use_cache:
            key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:24]
            safe_model = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_name)
            path = Path(cache_dir or default_cache_dir()) / f"text-{safe_model}-{self.name}-{key}.pt"
            cached = _read_cache(path, meta)
            if cached is not None:
                return cached
        emb = encode_texts(model, tokenizer, [template.format(t) for t in self.texts],
                           batch_size=batch_size, device=device, progress=progress,
                           desc=f"encoding {self.name}")
        if path is not None:
            _write_cache(path, meta, emb)
        return emb


@torch.no_grad()
def encode_texts(model, tokenizer, texts: Sequence[str], *, batch_size: int = 256, device=None,
                 progress: bool = True, desc: str = "encoding texts") -> torch.Tensor:
    """`model.encode_text(normalize=False)` over batches; returns (len(texts), d) fp32 on CPU."""
    from tqdm.auto import tqdm

    if device is None:
        device = next(model.parameters()).device
    out = []
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, disable=not progress, unit="batch"):
        tokens = tokenizer(list(texts[start:start + batch_size])).to(device)
        out.append(model.encode_text(tokens, normalize=False).float().cpu())
    return torch.cat(out) if out else torch.empty(0, 0)


def _read_cache(path: Path, meta: dict) -> torch.Tensor | None:
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        ok = (
            isinstance(payload, dict)
            and payload.get("meta") == meta
            and isinstance(payload.get("embeddings"), torch.Tensor)
            and payload["embeddings"].ndim == 2
            and payload["embeddings"].shape[0] == meta["size"]
            and bool(torch.isfinite(payload["embeddings"]).all())
        )
        reason = "its metadata or contents do not match this model and dictionary"
    except Exception as err:  # any unreadable file is rebuilt, whatever torch raised
        ok, reason = False, f"it cannot be read ({type(err).__name__}: {err})"
    if not ok:
        warnings.warn(f"ignoring concept cache {str(path)!r}: {reason}; rebuilding it", RuntimeWarning, stacklevel=3)
        return None
    return payload["embeddings"]


def _write_cache(path: Path, meta: dict, emb: torch.Tensor) -> None:
    atomic_save({"meta": meta, "embeddings": emb.contiguous()}, path)


def center_embeddings(embeddings: torch.Tensor) -> torch.Tensor:
    """SITH's dictionary preparation: L2-normalise rows, subtract the mean row, re-normalise.

    (M, d) -> (M, d) unit rows.
    """
    if embeddings.ndim != 2 or embeddings.shape[0] == 0:
        raise ValueError(f"expected a non-empty (M, d) matrix, got shape {tuple(embeddings.shape)}")
    g = F.normalize(embeddings.float(), dim=-1)
    return F.normalize(g - g.mean(0, keepdim=True), dim=-1)
