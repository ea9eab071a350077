"""fastinterp: fast, reference-faithful CLIP interpretability (SITH, CCS, mutual knowledge).

Entry points (all loaded on first use, so `import fastinterp` stays fast):
    load_clip, vit_info, TINY_MODEL       -- models (fastinterp.models, fastinterp.vit)
    ConceptDictionary, center_embeddings  -- concept dictionaries (fastinterp.concepts)
    sinkhorn, mutual_info_score           -- POT / scikit-learn drop-ins (fastinterp.kernels)
    fastinterp.sith, .ccs, .mutual, .pruning, .textspan, .ablation, .sparse, ...  -- the methods
    fastinterp.kernels                    -- compute kernels and the backend dispatch rule
"""
import importlib as _importlib
import os as _os

# Installed, kernels/ is the sub-package fastinterp/kernels. In a source checkout that is
# imported directly (python started in the repository root), it is the sibling folder
# kernels/: put the checkout root on the package's search path so `fastinterp.kernels`
# resolves there too.
_checkout_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "kernels")) and _os.path.isfile(
        _os.path.join(_checkout_root, "kernels", "__init__.py")):
    __path__.append(_checkout_root)

__version__ = "0.1.0"

# public name -> the module that defines it
_NAMES = {
    "TINY_MODEL": "models",
    "load_clip": "models",
    "ViTInfo": "vit",
    "vit_info": "vit",
    "ConceptDictionary": "concepts",
    "center_embeddings": "concepts",
    "encode_texts": "concepts",
    "mutual_info_score": "kernels.mi",
    "sinkhorn": "kernels.sinkhorn",
}
_SUBMODULES = frozenset({
    "ablation", "ccs", "cli", "concepts", "images", "io", "kernels", "llm", "models", "mutual", "pruning",
    "reference", "sith", "sparse", "sweep", "textspan", "vision", "vit", "zeroshot",
})

__all__ = sorted(_NAMES)


def __getattr__(name):
    if name in _NAMES:
        value = getattr(_importlib.import_module(f".{_NAMES[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = _importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'fastinterp' has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_NAMES) | _SUBMODULES)
