"""Concept dictionaries: lists of texts, their CLIP text embeddings, and the on-disk cache.

A dictionary is a list of unique, non-empty strings in a fixed order (the row order of its
embedding matrix). Embeddings are cached under a key made of the model name, a hash of the
text-tower weights, a hash of the texts and the prompt template (and the precision), so a
changed model or list never reuses a stale file.

Text encoding (`encode_texts`) is exact and length-bucketed: texts are sorted by token
length and batched by a token budget, and where the text tower allows it (causal attention,
pooled at the end-of-text / argmax / first token: open_clip's CLIP text tower and
TextTransformer) each batch is cut to its longest sequence, since the tokens after the pooled
one cannot change it. Other towers (bidirectional, last-token pooling on padded input as in
SigLIP, CoCa's appended class token, HF towers, anything unknown) run at full context. See
`text_tower_plan`.

The cache: a dictionary of at most `chunk_size` texts is one checksummed `.pt` file
(`io.save_checked`); a larger one is a folder holding `embeddings.npy` (float32 (M, d),
preallocated and filled chunk by chunk) and `manifest.json` (model, weights hash, texts
hash, chunk size, a SHA-256 per finished chunk). An interrupted encode resumes from the
last finished chunk, a corrupt chunk is reported and re-encoded, and the finished matrix
opens memory-mapped (copy-on-write), so `fastinterp.sparse.comp_topk` can stream it.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .io import CorruptFileError, atomic_write_json, load_checked, read_json, save_checked
from .models import weights_hash

CACHE_FORMAT = 2
STORE_FORMAT = 1
DEFAULT_CHUNK_SIZE = 16384
"""Texts per resumable chunk of a large dictionary's cache (and the one-file limit)."""
PRECISIONS = ("fp32", "fp16", "bf16")


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
               progress: bool = True, chunk_size: int = DEFAULT_CHUNK_SIZE, precision: str = "fp32",
               token_budget: int | None = None) -> torch.Tensor:
        """Raw (unnormalised) text embeddings, shape (M, d), fp32 on CPU.

        `template` is a format string applied to each concept ("{}" = the raw text, as SITH
        does). Results are cached on disk (see `default_cache_dir` and the module docstring);
        a corrupt or mismatched cache file is reported and rebuilt. Dictionaries of more than
        `chunk_size` texts are encoded chunk by chunk into a resumable folder and returned
        memory-mapped (a copy-on-write view: writing to the tensor never changes the file).
        `precision`, `batch_size`, `token_budget`: as in `encode_texts`.
        """
        if "{}" not in template:
            raise ValueError(f"template {template!r} must contain '{{}}' where the concept goes")
        _check_precision(precision)
        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size}; need at least 1")
        model_name = getattr(model, "fastinterp_name", type(model).__name__)
        meta = {
            "format": CACHE_FORMAT,
            "model": model_name,
            "weights": weights_hash(model, exclude_prefix="visual."),
            "texts": self.texts_hash(template),
            "template": template,
            "size": len(self),
            "precision": precision,
        }
        opts = dict(batch_size=batch_size, device=device, precision=precision, token_budget=token_budget)
        if not use_cache:
            return encode_texts(model, tokenizer, self._formatted(template), progress=progress,
                                desc=f"encoding {self.name}", **opts)
        key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:24]
        safe_model = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_name)
        base = Path(cache_dir or default_cache_dir()) / f"text-{safe_model}-{self.name}-{key}"
        if len(self) > chunk_size:
            store = _ChunkStore(base, meta, chunk_size)
            return store.encode(lambda a, b: self._formatted(template, a, b), model, tokenizer,
                                progress=progress, desc=f"encoding {self.name}", **opts)
        path = base.with_name(base.name + ".pt")
        cached = _read_cache(path, meta)
        if cached is not None:
            return cached
        emb = encode_texts(model, tokenizer, self._formatted(template), progress=progress,
                           desc=f"encoding {self.name}", **opts)
        _write_cache(path, meta, emb)
        return emb

    def _formatted(self, template: str, start: int = 0, stop: int | None = None) -> list[str]:
        return [template.format(t) for t in self.texts[start:stop]]


# ----------------------------------------------------------------------------------------
# text towers: where a batch may be cut to its longest sequence
# ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TextTowerPlan:
    """How `encode_texts` runs a model's text tower.

    exact_cut: True when a batch cut to its longest (pooled) sequence gives exactly
    `encode_text`'s result; `reason` says why or why not. `tower` is the module holding
    token_embedding / positional_embedding / transformer / ln_final / text_projection /
    attn_mask (the model itself for open_clip's CLIP, `model.text` for a TextTransformer).
    """

    exact_cut: bool
    reason: str
    tower: object = field(default=None, repr=False, compare=False)
    pool: str = ""
    eos_id: int | None = None


def _fallback(reason: str) -> TextTowerPlan:
    return TextTowerPlan(False, reason + "; encoded at full context")


def _tower_of(model):
    """(tower, pool type, eos id, None) for a text tower fastinterp can cut, else
    (None, None, None, why not)."""
    import open_clip.model as ocm
    from open_clip.transformer import TextTransformer

    if "encode_text" in vars(model):
        return None, None, None, "encode_text is replaced on this model object"
    enc = getattr(type(model), "encode_text", None)
    if enc is ocm.CLIP.encode_text:
        return model, model.text_pool_type, getattr(model, "text_eos_id", None), None
    text = getattr(model, "text", None)
    if enc is ocm.CustomTextCLIP.encode_text and type(text) is TextTransformer:
        if text.cls_emb is not None:
            return None, None, None, "the text tower appends a class token and pools it (CoCa-style)"
        if text.output_tokens or text.use_pad_mask:
            return None, None, None, "the text tower returns tokens or masks padding"
        return text, text.pool_type, getattr(text, "eos_id", None), None
    return None, None, None, (f"{type(model).__name__} with a {type(text).__name__ if text is not None else 'built-in'} "
                              f"text tower is not one fastinterp knows")


def text_tower_plan(model) -> TextTowerPlan:
    """Decide, from the tower's own attributes, whether cutting padded batches is exact.

    Exact only for open_clip's CLIP text tower and a plain TextTransformer (in
    CustomTextCLIP) whose `attn_mask` is the causal mask over its positions and which pools
    the argmax (end-of-text) token, the first `eos_id` token or the first token: with causal
    attention position i sees only tokens <= i, so nothing after the pooled position changes
    the output. Everything else (no causal mask, last-token pooling, a class token, HF or
    unknown towers, a replaced `encode_text`) falls back to full context, which is always
    exact.
    """
    tower, pool, eos_id, why = _tower_of(model)
    if tower is None:
        return _fallback(why)
    mask = getattr(tower, "attn_mask", None)
    if mask is None:
        return _fallback("bidirectional attention (no causal mask): every token sees the padding")
    n = tower.positional_embedding.shape[0]
    causal = torch.full((n, n), float("-inf"), device=mask.device).triu_(1)
    if tuple(mask.shape) != (n, n) or not torch.equal(mask.float(), causal):
        return _fallback("the attention mask is not the causal mask over the context")
    if pool not in ("argmax", "eos", "first") or (pool == "eos" and eos_id is None):
        return _fallback(f"pools the {pool!r} token, whose value depends on the padding after the text")
    return TextTowerPlan(True, f"causal attention, {pool} pooling: batches cut to their longest sequence",
                         tower, pool, eos_id)


def _pooled_lengths(plan: TextTowerPlan, tokens: torch.Tensor) -> torch.Tensor:
    """(N,) int64: per row the length a cut must keep (pooled position + 1)."""
    if not plan.exact_cut:
        return torch.full((tokens.shape[0],), tokens.shape[1], dtype=torch.long)
    if plan.pool == "argmax":
        return tokens.argmax(dim=-1) + 1
    if plan.pool == "eos":
        return (tokens == plan.eos_id).int().argmax(dim=-1) + 1
    return torch.ones(tokens.shape[0], dtype=torch.long)


def _cut_forward(plan: TextTowerPlan, tokens: torch.Tensor) -> torch.Tensor:
    """`encode_text(normalize=False)` of (B, L) tokens cut to L <= context: the same steps
    with the positional embedding and the causal mask sliced to L."""
    from open_clip.transformer import text_global_pool

    t = plan.tower
    L = tokens.shape[1]
    cast = t.transformer.get_cast_dtype()
    x = t.token_embedding(tokens).to(cast)
    x = x + t.positional_embedding[:L].to(cast)
    x = t.transformer(x, attn_mask=t.attn_mask[:L, :L])
    x = t.ln_final(x)
    x = text_global_pool(x, tokens, plan.pool, eos_token_id=plan.eos_id)
    proj = t.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
    return x


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; choose one of {PRECISIONS}")


def _autocast(device: torch.device, precision: str):
    import contextlib

    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision='fp16' is a GPU option (CUDA autocast); on the CPU use 'bf16' or 'fp32'")
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _tokenize(tokenizer, texts: Sequence[str], block: int = 4096) -> torch.Tensor:
    return torch.cat([tokenizer(list(texts[s:s + block])) for s in range(0, len(texts), block)])


@torch.no_grad()
def encode_texts(model, tokenizer, texts: Sequence[str], *, batch_size: int = 256, device=None,
                 progress: bool = True, desc: str = "encoding texts", precision: str = "fp32",
                 token_budget: int | None = None,
                 on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
    """`model.encode_text(normalize=False)` of every text; returns (len(texts), d) fp32 on CPU,
    in the order given.

    Texts are sorted by token length (longest first) and batched by `token_budget` tokens
    (default `batch_size` x the context length, the memory of a full-context batch of
    `batch_size`); each batch is cut to its longest sequence where `text_tower_plan(model)`
    says that is exact, else run at full context. fp32 results equal `encode_text` to
    float rounding (about 1e-6). `precision` "fp16" (CUDA) / "bf16" runs the tower under
    autocast (faster on a GPU, about 1e-2 relative error; see README). `on_batch(n)` is called
    after each batch with the number of texts it finished (progress of an outer loop).
    """
    from tqdm.auto import tqdm

    _check_precision(precision)
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    if len(texts) == 0:
        return torch.empty(0, 0)
    plan = text_tower_plan(model)
    tokens = _tokenize(tokenizer, texts)
    lengths = _pooled_lengths(plan, tokens)
    order = torch.sort(lengths, descending=True, stable=True).indices
    budget = token_budget or batch_size * tokens.shape[1]
    out = None
    bar = tqdm(total=len(texts), desc=desc, disable=not progress, unit="texts", unit_scale=True)
    with bar, _autocast(device, precision):
        start = 0
        while start < len(texts):
            L = int(lengths[order[start]])
            rows = order[start:start + max(1, budget // L)]
            batch = tokens[rows].to(device)
            emb = _cut_forward(plan, batch[:, :L]) if plan.exact_cut and L < batch.shape[1] \
                else model.encode_text(batch, normalize=False)
            emb = emb.float().cpu()
            if out is None:
                out = torch.empty(len(texts), emb.shape[1])
            out[rows] = emb
            start += len(rows)
            bar.update(len(rows))
            if on_batch is not None:
                on_batch(len(rows))
    return out


# ----------------------------------------------------------------------------------------
# the cache: one checked file, or a resumable chunked folder
# ----------------------------------------------------------------------------------------

def _read_cache(path: Path, meta: dict) -> torch.Tensor | None:
    if not path.exists():
        return None
    try:
        payload = load_checked(path)
        emb = payload.get("embeddings")
        ok = (payload.get("meta") == meta and isinstance(emb, torch.Tensor) and emb.ndim == 2
              and emb.shape[0] == meta["size"] and bool(torch.isfinite(emb).all()))
        reason = "its metadata or contents do not match this model and dictionary"
    except CorruptFileError as err:
        ok, reason = False, str(err)
    if not ok:
        warnings.warn(f"ignoring concept cache {str(path)!r}: {reason}; rebuilding it", RuntimeWarning, stacklevel=3)
        return None
    return emb


def _write_cache(path: Path, meta: dict, emb: torch.Tensor) -> None:
    save_checked({"meta": meta, "embeddings": emb.contiguous()}, path)


_VERIFIED: dict = {}  # (npy path, size, mtime) -> True: chunks already checked in this process


class _ChunkStore:
    """A large dictionary's cache folder: `embeddings.npy` (float32 (M, d), filled chunk by
    chunk) and `manifest.json` (the cache meta, chunk size, d, SHA-256 of each finished
    chunk's bytes). Chunk k holds rows [k C, (k+1) C) in dictionary order."""

    def __init__(self, folder: Path, meta: dict, chunk_size: int):
        self.folder, self.meta, self.C = Path(folder), meta, int(chunk_size)
        self.M = int(meta["size"])
        self.n_chunks = -(-self.M // self.C)
        self.npy = self.folder / "embeddings.npy"
        self.manifest_path = self.folder / "manifest.json"

    def rows(self, k: int) -> tuple[int, int]:
        return k * self.C, min((k + 1) * self.C, self.M)

    def _header(self) -> dict:
        return {"store_format": STORE_FORMAT, "meta": self.meta, "chunk_size": self.C, "rows": self.M}

    def _warn(self, what: str) -> None:
        warnings.warn(f"concept cache {str(self.folder)!r}: {what}", RuntimeWarning, stacklevel=4)

    def _load_state(self) -> tuple[dict, int | None]:
        """(finished chunks {k: sha256} whose bytes check out, d) from the manifest."""
        man = read_json(self.manifest_path)
        if man is None:
            if self.folder.exists() and any(self.folder.iterdir()):
                self._warn("manifest.json is missing or unreadable; rebuilding the folder")
            return {}, None
        if {k: man.get(k) for k in self._header()} != self._header() or not isinstance(man.get("chunks"), dict):
            self._warn("manifest.json does not match this model, dictionary and chunk size; rebuilding the folder")
            return {}, None
        d = man.get("d")
        try:
            arr = np.load(self.npy, mmap_mode="r")
            if arr.shape != (self.M, d) or arr.dtype != np.float32:
                raise ValueError(f"shape {arr.shape} {arr.dtype}, expected ({self.M}, {d}) float32")
        except (OSError, ValueError) as err:
            self._warn(f"embeddings.npy cannot be used ({err}); rebuilding the folder")
            return {}, None
        done = {int(k): v for k, v in man["chunks"].items()}
        stamp = self._stamp()
        if _VERIFIED.get(stamp) == done:
            return done, d
        for k in sorted(done):
            a, b = self.rows(k)
            if hashlib.sha256(memoryview(np.ascontiguousarray(arr[a:b]))).hexdigest() != done[k]:
                self._warn(f"embeddings.npy rows {a}..{b - 1} (chunk {k}) do not match their checksum "
                           f"in manifest.json (the file is corrupt); re-encoding that chunk")
                del done[k]
        return done, d

    def _stamp(self):
        st = self.npy.stat()
        return (str(self.npy.resolve()), st.st_size, st.st_mtime_ns)

    def _save_manifest(self, done: dict, d: int | None) -> None:
        atomic_write_json(self.manifest_path, {**self._header(), "d": d, "complete": len(done) == self.n_chunks,
                                               "chunks": {str(k): done[k] for k in sorted(done)}})

    def encode(self, texts_of: Callable[[int, int], list], model, tokenizer, *, progress: bool, desc: str,
               **opts) -> torch.Tensor:
        from tqdm.auto import tqdm

        done, d = self._load_state()
        if not done:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        todo = [k for k in range(self.n_chunks) if k not in done]
        if todo:
            initial = self.M - sum(b - a for a, b in map(self.rows, todo))
            mm = np.lib.format.open_memmap(self.npy, mode="r+") if done else None
            with tqdm(total=self.M, initial=initial, desc=desc, disable=not progress, unit="texts",
                      unit_scale=True, smoothing=0.1) as bar:
                for k in todo:
                    a, b = self.rows(k)
                    emb = encode_texts(model, tokenizer, texts_of(a, b), progress=False, on_batch=bar.update, **opts)
                    rows = np.ascontiguousarray(emb.numpy(), dtype=np.float32)
                    if mm is None:
                        d = rows.shape[1]
                        mm = np.lib.format.open_memmap(self.npy, mode="w+", dtype=np.float32, shape=(self.M, d))
                    mm[a:b] = rows
                    mm.flush()
                    done[k] = hashlib.sha256(memoryview(rows)).hexdigest()
                    self._save_manifest(done, d)
            del mm
        _VERIFIED[self._stamp()] = dict(done)
        return torch.from_numpy(np.load(self.npy, mmap_mode="c"))


def open_embeddings(folder: str | os.PathLike) -> torch.Tensor:
    """The finished (M, d) matrix of a chunked cache folder, memory-mapped (copy-on-write),
    without checking it (`ConceptDictionary.encode` checks every chunk)."""
    folder = Path(folder)
    man = read_json(folder / "manifest.json")
    if not man or not man.get("complete"):
        raise ValueError(f"{str(folder)!r} is not a finished concept cache folder (no complete manifest.json)")
    return torch.from_numpy(np.load(folder / "embeddings.npy", mmap_mode="c"))


def center_embeddings(embeddings: torch.Tensor, *, out: str | os.PathLike | None = None,
                      chunk_rows: int = 65536) -> torch.Tensor:
    """SITH's dictionary preparation: L2-normalise rows, subtract the mean row, re-normalise.

    (M, d) -> (M, d) unit rows. With `out` (a .npy path) the work streams over `chunk_rows`
    rows at a time (mean accumulated in float64) into a float32 .npy file that is returned
    memory-mapped: a million-concept dictionary (e.g. a memory-mapped `encode` result) is
    never held in RAM, and `fastinterp.sparse.comp_topk` streams it. Equal to the in-memory
    result to float rounding.
    """
    if embeddings.ndim != 2 or embeddings.shape[0] == 0:
        raise ValueError(f"expected a non-empty (M, d) matrix, got shape {tuple(embeddings.shape)}")
    if out is None:
        g = F.normalize(embeddings.float(), dim=-1)
        return F.normalize(g - g.mean(0, keepdim=True), dim=-1)
    M, d = embeddings.shape
    total = torch.zeros(d, dtype=torch.float64)
    for s in range(0, M, chunk_rows):
        total += F.normalize(embeddings[s:s + chunk_rows].float(), dim=-1).sum(0, dtype=torch.float64)
    mean = (total / M).float()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(M, d))
    for s in range(0, M, chunk_rows):
        g = F.normalize(embeddings[s:s + chunk_rows].float(), dim=-1)
        mm[s:s + chunk_rows] = F.normalize(g - mean, dim=-1).numpy()
    mm.flush()
    del mm
    os.replace(tmp, out)
    return torch.from_numpy(np.load(out, mmap_mode="c"))
