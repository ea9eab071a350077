"""fastinterp: fast, reference-faithful CLIP interpretability (SITH, CCS, mutual knowledge).

Entry points:
    load_clip, vit_info, TINY_MODEL       -- models (fastinterp.models)
    ConceptDictionary, center_embeddings  -- concept dictionaries (fastinterp.concepts)
    fastinterp.kernels                    -- compute kernels and the backend dispatch rule
"""
from .concepts import ConceptDictionary, center_embeddings, encode_texts
from .models import TINY_MODEL, ViTInfo, load_clip, vit_info

__version__ = "0.1.0"

__all__ = [
    "TINY_MODEL",
    "ConceptDictionary",
    "ViTInfo",
    "center_embeddings",
    "encode_texts",
    "load_clip",
    "vit_info",
]
