"""fastinterp: fast, reference-faithful CLIP interpretability (SITH, CCS, mutual knowledge).

Entry points:
    load_clip, vit_info, TINY_MODEL       -- models (fastinterp.models)
    ConceptDictionary, center_embeddings  -- concept dictionaries (fastinterp.concepts)
    fastinterp.kernels                    -- compute kernels and the backend dispatch rule
"""
import os as _os

# Installed, kernels/ is the sub-package fastinterp/kernels. In a source checkout that is
# imported directly (python started in the repository root), it is the sibling folder
# kernels/: put the checkout root on the package's search path so `fastinterp.kernels`
# resolves there too.
_checkout_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "kernels")) and _os.path.isfile(
        _os.path.join(_checkout_root, "kernels", "__init__.py")):
    __path__.append(_checkout_root)

from .concepts import ConceptDictionary, center_embeddings, encode_texts
from .models import TINY_MODEL, ViTInfo, load_clip, vit_info
from .kernels.mi import mutual_info_score
from .kernels.sinkhorn import sinkhorn

__version__ = "0.1.0"

__all__ = [
    "TINY_MODEL",
    "ConceptDictionary",
    "ViTInfo",
    "center_embeddings",
    "encode_texts",
    "load_clip",
    "mutual_info_score",
    "sinkhorn",
    "vit_info",
]
