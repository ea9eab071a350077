"""A spec expanded into a task graph, shared work done once.

* one `encode` task per (model, dictionary content): every task that needs the embeddings
  depends on it and reads its checked file;
* one `image-mean` task per (model, image folder) (SITH's modality-gap correction) and
  `contributions` shard tasks per (model, image folder) (TextSpan's per-head pass over all
  the sweep's layers at once), shared by every layer and dictionary;
* mutual knowledge in shards of classes (the images of a class are explained together, as
  `mutual.run_dataset` does): one `mutual.vision` task per (model, image folder, shard)
  (the vision side: foreground, parts, part embeddings), read by one `mutual.shard` task
  per dictionary (the language side), merged by one `mutual.explain` task.

A task's id is the hash of its kind, coordinates and settings (stable across runs); its
key adds the fingerprints of its inputs (model weights source, dictionary texts, image
bytes), the sweep's seed and its dependencies' keys: a finished task is reused only when
its key matches.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from .spec import Spec

__all__ = ["Task", "Graph", "build_graph", "RESULT_KINDS", "GRAPH_FORMAT"]

GRAPH_FORMAT = 2  # 2: sweep.seed in every key; the mutual vision side its own task
RESULT_KINDS = ("sith.decompose", "sith.fidelity", "ccs.textspan", "ccs.label", "ccs.score", "ccs.prune",
                "mutual.explain")
"""The tasks that give a row of the results table (the others are shared intermediate work)."""


def _hash(obj, n: int) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=True).encode()).hexdigest()[:n]


@dataclass
class Task:
    id: str
    kind: str
    coords: dict
    settings: dict
    deps: dict  # role -> task id, or list of task ids
    inputs: dict  # fingerprints of the task's external inputs
    payload: dict  # what a worker needs that is not in coords/settings (paths, shard members)
    key: str = ""

    @property
    def dep_ids(self) -> list[str]:
        out = []
        for v in self.deps.values():
            out += v if isinstance(v, list) else [v]
        return out

    @property
    def name(self) -> str:
        c = self.coords
        parts = [c.get("model"), c.get("images"), c.get("dictionary"),
                 None if c.get("layer") is None else f"L{c['layer']}", c.get("shard")]
        return f"{self.kind} " + "/".join(str(p) for p in parts if p is not None)

    @property
    def folder(self) -> str:
        slug = "_".join(str(v).replace("/", "of") for k, v in sorted(self.coords.items()) if v is not None)
        return f"tasks/{self.kind}/{slug}-{self.id[:10]}"

    def describe(self) -> dict:
        return {"id": self.id, "kind": self.kind, "coords": self.coords, "settings": self.settings,
                "deps": self.deps, "inputs": self.inputs, "key": self.key, "folder": self.folder}


@dataclass
class Graph:
    spec: Spec
    tasks: dict[str, Task] = field(default_factory=dict)  # in topological order

    def add(self, kind: str, coords: dict, settings: dict, *, deps=None, inputs=None, payload=None) -> str:
        tid = _hash({"kind": kind, "coords": coords, "settings": settings}, 24)
        if tid in self.tasks:
            return tid
        deps = deps or {}
        t = Task(tid, kind, dict(coords), dict(settings), deps, inputs or {}, payload or {})
        dep_keys = {role: ([self.tasks[d].key for d in v] if isinstance(v, list) else self.tasks[v].key)
                    for role, v in deps.items()}
        t.key = _hash({"format": GRAPH_FORMAT, "id": tid, "inputs": t.inputs, "deps": dep_keys,
                       "seed": self.spec.seed}, 32)  # every task is seeded with it (tasks.seed_everything)
        self.tasks[tid] = t
        return tid

    def dependents(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {t: [] for t in self.tasks}
        for t in self.tasks.values():
            for d in t.dep_ids:
                out[d].append(t.id)
        return out

    def describe(self) -> dict:
        return {"format": GRAPH_FORMAT, "tasks": [t.describe() for t in self.tasks.values()]}


# --------------------------------------------------------------------------------------
# inputs and their fingerprints
# --------------------------------------------------------------------------------------
def model_input(m: dict) -> dict:
    """What identifies a model's weights: the name and the seed (random weights), the
    pretrained tag, or the checkpoint file (path, size, modification time)."""
    out = {"model": m["model"], "pretrained": m["pretrained"], "seed": m["seed"]}
    if m["checkpoint"]:
        st = Path(m["checkpoint"]).stat()
        out["checkpoint"] = {"path": m["checkpoint"], "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return out


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)] or [[]]


class _Inputs:
    """Dictionaries and image folders resolved once for the graph (texts, file lists, hashes)."""

    def __init__(self, spec: Spec):
        from .inputs import DIGEST_CACHE, folder_digest, image_folder, list_classes, list_images, resolve_dictionary

        self.spec = spec
        self.dicts = {n: resolve_dictionary(n, src) for n, src in spec.dictionaries.items()}
        self.dict_fp = {n: {"size": len(d), "sha256": d.texts_hash()} for n, d in self.dicts.items()}
        self.folders = {n: str(image_folder(spec, n)) for n in spec.images}
        self.image_fp = {n: folder_digest(f, cache=spec.output / DIGEST_CACHE) for n, f in self.folders.items()}
        self._list_images, self._list_classes = list_images, list_classes

    def images(self, name: str) -> list[str]:
        return self._list_images(self.folders[name])

    def classes(self, name: str) -> list[str]:
        return self._list_classes(self.folders[name], f"images.{name}")


# --------------------------------------------------------------------------------------
# the graph
# --------------------------------------------------------------------------------------
def build_graph(spec: Spec) -> Graph:
    """Expand the spec; raises SpecError/ValueError naming what is wrong (an image folder
    without class folders where mutual or pruning need classes, ...)."""
    g = Graph(spec)
    inp = _Inputs(spec)
    enc: dict = {}  # (model, dictionary fingerprint) -> encode task id
    vocab = _vocabulary(spec)

    def encode(m: dict, dname: str) -> str:
        fp = inp.dict_fp[dname]
        k = (m["name"], fp["sha256"])
        if k not in enc:  # the labeller's vocabulary is also written to the cache ClipLabeller reads
            seed_cache = vocab is not None and inp.dict_fp[vocab] == fp
            enc[k] = g.add("encode", {"model": m["name"], "dictionary": dname}, {"labeller_cache": seed_cache},
                           inputs={"model": model_input(m), "dictionary": fp},
                           payload={"model": m, "dictionary": spec.dictionaries[dname], "dictionary_name": dname})
        return enc[k]

    for m in spec.models:
        if "sith" in spec.methods:
            _sith_tasks(g, spec, inp, m, encode)
        if "ccs" in spec.methods:
            _ccs_tasks(g, spec, inp, m, encode)
        if "mutual" in spec.methods:
            _mutual_tasks(g, spec, inp, m, encode)
    return g


def _vocabulary(spec: Spec) -> str | None:
    s = spec.methods.get("ccs")
    if not s or not ({"label", "score", "prune"} & set(s["steps"])):
        return None
    return s["vocabulary"] or s["dictionaries"][0]


def _image_mean(g: Graph, spec: Spec, inp: _Inputs, m: dict, images: str) -> str:
    return g.add("image-mean", {"model": m["name"], "images": images}, {"batch_size": 64},
                 inputs={"model": model_input(m), "images": inp.image_fp[images]},
                 payload={"model": m, "folder": inp.folders[images]})


def _sith_tasks(g: Graph, spec: Spec, inp: _Inputs, m: dict, encode) -> None:
    s = spec.methods["sith"]
    settings = {k: s[k] for k in ("rank", "method", "sparsity", "sv_type", "fold_ln", "batch_size", "image_mean")}
    for dname in s["dictionaries"]:
        deps = {"encode": encode(m, dname)}
        if s["image_mean"]:
            deps["image_mean"] = _image_mean(g, spec, inp, m, s["image_mean"])
        for layer in m["layers"]:
            coords = {"model": m["name"], "dictionary": dname, "layer": layer}
            payload = {"model": m, "dictionary_name": dname}
            dec = g.add("sith.decompose", coords, settings, deps=dict(deps), inputs={"model": model_input(m)},
                        payload=payload)
            if "fidelity" in s["steps"]:
                g.add("sith.fidelity", coords, settings, deps=dict(deps, decompose=dec),
                      inputs={"model": model_input(m)}, payload=payload)


def _ccs_tasks(g: Graph, spec: Spec, inp: _Inputs, m: dict, encode) -> None:
    s = spec.methods["ccs"]
    vocab = _vocabulary(spec)
    for images in s["images"]:
        files = inp.images(images)
        shards = _chunks(files, spec.shard_size)
        contrib = [g.add("contributions", {"model": m["name"], "images": images, "shard": f"{i + 1}/{len(shards)}"},
                         {"layers": m["layers"], "batch_size": s["batch_size"]},
                         inputs={"model": model_input(m), "images": inp.image_fp[images]},
                         payload={"model": m, "folder": inp.folders[images], "files": shard})
                   for i, shard in enumerate(shards)]
        if "prune" in s["steps"]:
            inp.classes(images)  # a clear error now: pruning measures accuracy over class folders
        for dname in s["dictionaries"]:
            for layer in m["layers"]:
                coords = {"model": m["name"], "images": images, "dictionary": dname, "layer": layer}
                base = {"model": m, "dictionary_name": dname, "folder": inp.folders[images],
                        "layers": m["layers"], "vocabulary": vocab}
                ts = g.add("ccs.textspan", coords, {k: s[k] for k in ("n_texts", "rank")},
                           deps={"contributions": contrib, "encode": encode(m, dname)},
                           inputs={"model": model_input(m)}, payload=base)
                prev = ts
                lab_settings = {k: s[k] for k in ("labeller", "threshold")} | {"vocabulary": vocab}
                for step in ("label", "score", "prune"):
                    if step not in s["steps"]:
                        break
                    deps = {"textspan": ts, "previous": prev, "vocabulary": encode(m, vocab)}
                    st = dict(lab_settings, **({"seeds": s["prune_seeds"], "mode": s["prune_mode"]}
                                               if step == "prune" else {}))
                    inputs = {"model": model_input(m)}
                    if step == "prune":
                        inputs["images"] = inp.image_fp[images]
                    prev = g.add(f"ccs.{step}", coords, st, deps=deps, inputs=inputs, payload=base)


def _mutual_tasks(g: Graph, spec: Spec, inp: _Inputs, m: dict, encode) -> None:
    s = spec.methods["mutual"]
    vision_settings = {k: s[k] for k in ("parts", "n_parts", "facet", "crf", "batch_size")}
    settings = dict(vision_settings, **{k: s[k] for k in ("u", "language_from")})
    for images in s["images"]:
        classes = inp.classes(images)
        shards = _chunks(classes, spec.shard_size)
        vision = [g.add("mutual.vision", {"model": m["name"], "images": images, "shard": f"{i + 1}/{len(shards)}"},
                        dict(vision_settings, classes=classes),
                        inputs={"model": model_input(m), "images": inp.image_fp[images]},
                        payload={"model": m, "folder": inp.folders[images], "shard_classes": shard})
                  for i, shard in enumerate(shards)]
        for dname in s["dictionaries"]:
            ids = []
            for i, shard in enumerate(shards):
                coords = {"model": m["name"], "images": images, "dictionary": dname,
                          "shard": f"{i + 1}/{len(shards)}"}
                ids.append(g.add("mutual.shard", coords, dict(settings, classes=classes),
                                 deps={"encode": encode(m, dname), "vision": vision[i]},
                                 inputs={"model": model_input(m)},
                                 payload={"model": m, "classes": classes, "dictionary_name": dname}))
            g.add("mutual.explain", {"model": m["name"], "images": images, "dictionary": dname}, settings,
                  deps={"shards": ids}, inputs={}, payload={"model": m})
