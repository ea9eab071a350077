"""Loading open_clip CLIP models and hashing their weights (the ViT view is `fastinterp.vit`).

`load_clip` is the one way fastinterp builds a model: an open_clip name plus either a
pretrained tag (downloaded by open_clip where there is internet), a local checkpoint file,
or neither (random weights, what the tests and the offline demo use).
"""
from __future__ import annotations

import difflib
import functools
import hashlib
import os
from importlib import resources

import torch

# the ViT view lives in fastinterp.vit; these names stay importable from here
from .vit import ViTInfo, check_layers, vision_transformer, vit_info  # noqa: F401

TINY_MODEL = "fastinterp-tiny-ViT"
"""A 4-layer, 64-wide, 4-head ViT registered with open_clip so tests run in seconds."""

_configs_registered = False


def _register_configs() -> None:
    global _configs_registered
    if _configs_registered:
        return
    import open_clip

    open_clip.add_model_config(str(resources.files("fastinterp.model_configs")))
    _configs_registered = True


def _parse_device(device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"device={device!r} is not a device torch understands; use 'cpu', 'cuda' or 'cuda:N'"
        ) from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={device!r} asks for CUDA but torch sees no GPU here "
                f"(torch {torch.__version__}); use device='cpu'"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible; "
                f"use an index below that"
            )
    return dev


def _checkpoint_problem(path: str, name: str, err: Exception) -> str:
    """Our diagnosis first (which file, what is wrong, the fix), then the library's first line."""
    first = (str(err).strip().splitlines() or [""])[0][:200]
    if "state_dict" in str(err) or isinstance(err, KeyError):
        what = (f"it was saved for another model than {name!r} (its tensors do not match this config); pass the "
                f"--model-name it was saved for")
    else:
        what = ("the file is truncated, corrupt or not a torch / open_clip checkpoint; save it again "
                "(torch.save(model.state_dict(), path)) or copy it again")
    return f"could not load checkpoint {path!r} into {name!r}: {what}. ({type(err).__name__}: {first})"


def load_clip(name: str, pretrained: str | None = None, *, device="cpu", checkpoint: str | os.PathLike | None = None):
    """Build an open_clip CLIP model.

    Args:
        name: open_clip model name, e.g. "ViT-B-16", or `fastinterp.TINY_MODEL`.
        pretrained: open_clip pretrained tag (e.g. "laion2b_s34b_b88k"); downloads need internet.
        device: "cpu", "cuda" or "cuda:N".
        checkpoint: path to a local state-dict / open_clip checkpoint file; excludes `pretrained`.

    Returns:
        (model, preprocess, tokenizer): model in eval mode on `device`, the eval image
        transform, and the text tokenizer. With neither `pretrained` nor `checkpoint`
        the weights are random (seeded by torch's global RNG).
    """
    import open_clip

    _register_configs()
    dev = _parse_device(device)
    known = open_clip.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(
            f"unknown open_clip model {name!r}.{hint} `open_clip.list_models()` lists all "
            f"{len(known)} names; fastinterp adds {TINY_MODEL!r} for quick tests."
        )
    if pretrained is not None and checkpoint is not None:
        raise ValueError("give either pretrained= (an open_clip tag) or checkpoint= (a local file), not both")
    if checkpoint is not None:
        path = os.fspath(checkpoint)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"checkpoint {path!r} does not exist; pass the path of a saved state dict or "
                f"open_clip checkpoint (.pt/.bin/.safetensors)"
            )
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=dev)
    if checkpoint is not None:
        try:
            open_clip.load_checkpoint(model, path, device=dev)
        except Exception as err:  # open_clip / torch raise many types (with their own advice) for bad files
            raise ValueError(_checkpoint_problem(path, name, err)) from None
    model.eval()
    model.fastinterp_name = name
    model.fastinterp_weights = checkpoint and os.fspath(checkpoint) or pretrained or "random"
    tokenizer = _tokenizer(name)
    return model, preprocess, tokenizer


@functools.lru_cache(maxsize=8)
def _tokenizer(name: str):
    """open_clip's tokenizer for `name`, built once per process (parsing the BPE merges costs
    0.2 s, paid by every model load of a sweep worker otherwise; nothing here changes a
    tokenizer after it is built); SigLIP / SigLIP2 / multilingual configs use a Hugging
    Face tokenizer, which needs `transformers` and a one-time download: a clear error then."""
    import open_clip

    try:
        return open_clip.get_tokenizer(name)
    except (ImportError, OSError, ValueError) as err:
        raise RuntimeError(
            f"model {name!r} tokenizes text with a Hugging Face tokenizer, which could not be loaded ({err}). "
            f"Install the text extra (`pip install 'fastinterp[hf-text]'`: transformers, sentencepiece) and "
            f"let it download once, or use cached files with HF_HUB_OFFLINE=1. Image-side methods "
            f"(head masking, ablation) do not need it: build the model with open_clip.create_model."
        ) from err


_HASH_CACHE_ATTR = "_fastinterp_weights_hashes"


def _weights_key(state: dict, exclude_prefix: str | None) -> tuple:
    """What identifies the current weights without reading them: per tensor its name,
    storage address, shape, dtype, device and version counter (bumped by every in-place
    write through the tensor or a view of it: `copy_`, `mul_`, `load_state_dict`...)."""
    return tuple((k, t.data_ptr(), tuple(t.shape), t.dtype, str(t.device), t._version)
                 for k, t in sorted(state.items())
                 if not (exclude_prefix and k.startswith(exclude_prefix)))


def weights_hash(model, *, exclude_prefix: str | None = None) -> str:
    """SHA-256 over the state dict (names, shapes, dtypes, bytes), skipping keys that start
    with `exclude_prefix` (e.g. "visual." to key text embeddings on the text tower only).

    Computed once per model and reused while the weights are unchanged: the cached value is
    keyed by every tensor's storage address and version counter, so an in-place edit (e.g.
    `fastinterp.sith.apply_multipliers`, `load_state_dict`) or a move recomputes it. An edit
    that bypasses autograd's version counter (writing through `param.data`) is not seen:
    call `invalidate_weights_hash(model)` after one.
    """
    state = model.state_dict(keep_vars=True)
    key = _weights_key(state, exclude_prefix)
    cache = model.__dict__.get(_HASH_CACHE_ATTR)
    if cache is not None and cache.get(exclude_prefix, (None,))[0] == key:
        return cache[exclude_prefix][1]
    h = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        if exclude_prefix and name.startswith(exclude_prefix):
            continue
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    digest = h.hexdigest()
    if cache is None:
        cache = {}
        object.__setattr__(model, _HASH_CACHE_ATTR, cache)
    cache[exclude_prefix] = (key, digest)
    return digest


def invalidate_weights_hash(model) -> None:
    """Forget `weights_hash`'s cached values for `model` (after editing weights through
    `.data`, which the version counters do not record)."""
    model.__dict__.pop(_HASH_CACHE_ATTR, None)
