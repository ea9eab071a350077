"""Offline scoring of singular vectors for the suppress / sign-flip edit recipes.

`ClipScorer` is the CLIP-text-similarity counterpart of `fastinterp.llm.LLMScorer` (as
`ClipLabeller` is for CCS's LLM labeller): no network. Each concept of a singular vector is
matched to its nearest anchor text by centred CLIP text cosine; the anchors are a few
descriptions of the recipe's target (e.g. "a landscape", "a street") and of what it is
contrasted with (e.g. "an object", "an animal"), the same rubric the LLM prompts state.
The score is

    1 + round(4 * f),  f = (weight of the concepts whose nearest anchor is a target) / (total weight)

so 1 = no target concept, 5 = all of the weight on target concepts, 3 = about half.
Both scorers go through one driver, `score_singular_vectors` (and its decisions files):
the driver calls `score_concepts([(weight, concept), ...])` on scorers that have it and
`scorer(prompt)` on the rest.
"""
from __future__ import annotations

from typing import Sequence

__all__ = ["CLIP_TARGETS", "ClipScorer"]

# (targets, contrast): the LLM prompts' rubric as short texts (PROMPT_BACKGROUND, PROMPT_UNSAFE)
CLIP_TARGETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "background": (
        ("a place", "scenery", "a landscape", "a setting", "an environment", "a lake", "a desert", "a street",
         "a beach", "a forest", "a mountain", "a city", "a room"),
        ("an object", "an animal", "a person", "a style", "an attribute", "a colour", "a texture", "a tool",
         "food", "a vehicle", "clothing", "a shape"),
    ),
    "unsafe": (
        ("sexual content", "explicit content", "nudity", "pornography", "graphic violence", "gore", "blood",
         "not safe for work"),
        ("safe content", "an everyday object", "an animal", "a person", "a place", "a style", "a colour",
         "food", "a vehicle", "clothing"),
    ),
}
RECIPE_TARGETS = {"suppress": "background", "sign-flip": "unsafe"}


class ClipScorer:
    """Score a singular vector's concept list 1-5 by CLIP text similarity (offline).

    Args:
        model, tokenizer: the CLIP model whose text tower embeds concepts and anchors.
        target: a key of `CLIP_TARGETS` ("background" for suppress, "unsafe" for sign-flip),
            or a recipe name ("suppress", "sign-flip").
        targets, contrast: anchor texts overriding the preset's (either or both).
        vocabulary: the texts whose mean direction is removed before cosines (default: the
            built-in demo dictionary; see `fastinterp.llm.ClipLabeller`, which does the embedding).
        center: centre embeddings by that mean (CLIP text embeddings share a large common
            component, so raw cosines are all high).
    """

    def __init__(self, model, tokenizer, target: str = "background", *, targets: Sequence[str] | None = None,
                 contrast: Sequence[str] | None = None, vocabulary=None, center: bool = True, cache_dir=None,
                 progress: bool = False):
        from ..llm import ClipLabeller

        name = RECIPE_TARGETS.get(target, target)
        if name not in CLIP_TARGETS and (targets is None or contrast is None):
            raise ValueError(f"unknown target {target!r}: use one of {sorted(CLIP_TARGETS)} (or a recipe: "
                             f"{sorted(RECIPE_TARGETS)}), or give both targets= and contrast=")
        preset_t, preset_c = CLIP_TARGETS.get(name, ((), ()))
        self.target = name
        self.targets = [t.strip() for t in (preset_t if targets is None else targets) if t.strip()]
        self.contrast = [t.strip() for t in (preset_c if contrast is None else contrast) if t.strip()]
        if not self.targets or not self.contrast:
            raise ValueError("ClipScorer needs at least one target text and one contrast text")
        self._text = ClipLabeller(model, tokenizer, vocabulary, center=center, cache_dir=cache_dir, progress=progress)
        anchors = self._text.embed(self.targets + self.contrast)
        self._anchors = anchors  # (T + C, d) unit, centred
        self._n_targets = len(self.targets)

    def __repr__(self) -> str:
        return f"ClipScorer(target={self.target!r}, targets={len(self.targets)}, contrast={len(self.contrast)})"

    def prepare(self, concepts: Sequence[str]) -> None:
        """Embed these concept texts now, in batches (the driver calls this with every concept
        it is about to score, so scoring never encodes one text at a time)."""
        self._text.embed(list(dict.fromkeys(concepts)))

    def nearest(self, concepts: Sequence[str]) -> list[tuple[str, bool]]:
        """Each concept's nearest anchor text and whether that anchor is a target."""
        sims = self._text.embed(list(concepts)) @ self._anchors.T  # (n, T + C)
        best = sims.argmax(dim=1).tolist()
        anchors = self.targets + self.contrast
        return [(anchors[b], b < self._n_targets) for b in best]

    def target_fraction(self, pairs: Sequence[tuple[float, str]]) -> float:
        """The weight share of the concepts whose nearest anchor is a target (positive weights)."""
        pairs = [(float(w), c) for w, c in pairs if float(w) > 0]
        if not pairs:
            raise ValueError("this singular vector has no concept with a positive weight to score")
        hits = self.nearest([c for _, c in pairs])
        total = sum(w for w, _ in pairs)
        return sum(w for (w, _), (_, is_target) in zip(pairs, hits) if is_target) / total

    def score_concepts(self, pairs: Sequence[tuple[float, str]]) -> int:
        """[(weight, concept), ...] -> 1 + round(4 f) in 1..5 (f: `target_fraction`)."""
        f = self.target_fraction(pairs)
        return 1 + min(4, int(4.0 * f + 0.5))
