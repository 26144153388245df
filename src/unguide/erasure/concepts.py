"""Concept specs: what to erase, what to steer towards, and what must be preserved.

A concept file is JSON::

    {
      "name": "sun",                         # optional; defaults to the file name
      "target": "a photo of the sun",        # required, non-empty: the prompt carrying the concept
      "reference": "a photo of the sky",     # required (may be ""): the anchor the adapter steers to
      "synonyms": ["sunshine", "sunburst"],  # other words for the concept (generalisation check)
      "other": ["a photo of the moon"],      # unrelated prompts that must keep their images
      "preset": "object",                    # default layer preset: object | explicit | full
      "anchors": ["a photo of the moon", ""], # prompts the selective recipe keeps unchanged ("" = the empty prompt)
      "anchors_file": "anchors.txt",         # and/or: a text file of anchors, one a line, relative to this file
      "vocabulary_file": "words.txt",        # optional: generic prompts trained as anchors, not calibrated on
      "anchors_per_step": 2,                 # optional: anchors drawn per iteration (selective recipe)
      "erase_synonyms": false,               # optional: erase the target alone even in the selective recipe
      "anchor_weight": 2.0,                  # optional: the selective recipe's anchor weight for this concept
      "gate_position": 0.3,                  # optional: where the calibrated gate sits (0 anchors .. 1 concept)
      "notes": "free text"
    }

Anchors are what the selective recipe trains the adapter to leave alone; they are never evaluation prompts
(the benchmark measures preservation on classes that are not anchors). In an anchors file a line ``""``
stands for the empty prompt and lines starting with ``#`` are comments.

A *vocabulary* (``vocabulary`` and/or ``vocabulary_file``, same format) is trained exactly like the anchors but the
gate is not calibrated on it: the gate's threshold sits between the highest anchor and the lowest concept prompt,
and in a broad word list the highest is often a word near the concept, which would lift the threshold past the
concept's own unseen words (measured on the toy model, docs/findings-toyworld.md).

Toy-world presets also carry ``label`` (the toy classifier's class or colour) and
``heldout_synonyms`` (synonyms the embedded model never saw in training).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from .adapters import LAYER_PRESETS
from ..errors import UnguideError

PRESET_DIR = Path(__file__).parent / "concepts_presets"
_FIELDS = {"name": str, "target": str, "reference": str, "synonyms": list, "other": list, "preset": str, "notes": str,
           "label": str, "attribute": str, "heldout_synonyms": list, "synonym_template": str, "model": str,
           "anchors": list, "anchors_file": str, "vocabulary": list, "vocabulary_file": str, "erase_synonyms": bool,
           "anchor_weight": (int, float), "anchors_per_step": int, "gate_position": (int, float)}


@dataclass
class ConceptSpec:
    target: str
    reference: str
    synonyms: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)
    name: str = ""
    preset: str = "object"
    notes: str = ""
    label: Optional[str] = None  # toy world: classifier label of the concept (object class or colour)
    attribute: Optional[str] = None  # "object" (default) or "colour"
    heldout_synonyms: list[str] = field(default_factory=list)
    synonym_template: str = "a photo of the {}"  # how a synonym word becomes a prompt
    model: Optional[str] = None  # the family the preset was written for: toyworld or sd
    anchors: list[str] = field(default_factory=list)  # prompts to preserve (selective recipe); "" allowed
    erase_synonyms: Optional[bool] = None  # None: the recipe decides (selective erases the trained synonyms too)
    anchor_weight: Optional[float] = None  # None: the recipe's (selective: 1); the reference recipe never uses it
    vocabulary: list[str] = field(default_factory=list)  # trained like anchors, left out of the gate's calibration
    anchors_per_step: Optional[int] = None  # None: the recipe's (selective: 1)
    gate_position: Optional[float] = None  # None: the recipe's (0.5); where the calibrated threshold sits

    def synonym_prompts(self, heldout: Optional[bool] = None) -> list[str]:
        words = {None: self.synonyms + self.heldout_synonyms, True: self.heldout_synonyms, False: self.synonyms}[heldout]
        return [self.synonym_template.format(w) for w in words]

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in (None, [], "")}


def _where(source: str) -> str:
    return f"concept {source}"


def concept_from_dict(data, source: str = "<dict>") -> ConceptSpec:
    """Validate a parsed concept; every problem is one UnguideError line naming the field and the fix."""
    if not isinstance(data, dict):
        raise UnguideError(f"{_where(source)}: expected a JSON object with 'target' and 'reference', got {type(data).__name__}")
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise UnguideError(f"{_where(source)}: unknown field(s) {unknown}: allowed are {sorted(_FIELDS)}")
    for key in ("target", "reference"):
        if key not in data:
            raise UnguideError(f"{_where(source)}: missing field '{key}': add \"{key}\": \"a prompt\"")
    for key, value in data.items():
        kind = _FIELDS[key]
        if not isinstance(value, kind) or (kind != bool and isinstance(value, bool)):
            name = "number" if isinstance(kind, tuple) else {int: "whole number"}.get(kind, kind.__name__)
            raise UnguideError(f"{_where(source)}: field '{key}' must be a {name}, got {type(value).__name__}")
        prompts = key in ("anchors", "vocabulary")  # lists where "" (the empty prompt) is allowed
        if prompts and not all(isinstance(v, str) for v in value):
            raise UnguideError(f"{_where(source)}: field '{key}' must be a list of prompts (\"\" is the empty prompt)")
        if kind is list and not prompts and not all(isinstance(v, str) and v.strip() for v in value):
            raise UnguideError(f"{_where(source)}: field '{key}' must be a list of non-empty strings")
    if not data["target"].strip():
        raise UnguideError(f"{_where(source)}: 'target' is empty: give the prompt that carries the concept")
    preset = data.get("preset", "object")
    if preset not in LAYER_PRESETS:
        raise UnguideError(f"{_where(source)}: unknown preset {preset!r}: use one of {', '.join(LAYER_PRESETS)}")
    if data.get("anchors_per_step", 1) < 1:
        raise UnguideError(f"{_where(source)}: field 'anchors_per_step' must be >= 1, got {data['anchors_per_step']}")
    if not 0 <= data.get("gate_position", 0.5) <= 1:
        raise UnguideError(f"{_where(source)}: field 'gate_position' must be between 0 (at the highest anchor score) "
                           f"and 1 (at the lowest concept-prompt score), got {data['gate_position']}")
    data = dict(data)
    base = Path(source).parent if source != "<dict>" else Path(".")
    for key, kind in (("anchors", "anchor"), ("vocabulary", "vocabulary")):  # the listed prompts first, then the file's
        if f"{key}_file" in data:
            listed = data.get(key, [])
            data[key] = list(dict.fromkeys(listed + read_anchor_file(base / data.pop(f"{key}_file"), kind)))
    spec = ConceptSpec(**data)
    if not spec.name:
        spec.name = Path(source).stem if source != "<dict>" else spec.target
    return spec


def load_concept_file(path: str | Path) -> ConceptSpec:
    path = Path(path)
    if not path.is_file():
        raise UnguideError(f"concept file {path} not found: pass an existing JSON file or use `concept` NAME")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UnguideError(f"concept file {path} is not UTF-8 text: save it as UTF-8 JSON") from None
    except json.JSONDecodeError as exc:
        raise UnguideError(f"concept file {path} is not valid JSON (line {exc.lineno}: {exc.msg}): fix the syntax") from None
    return concept_from_dict(data, str(path))


def read_anchor_file(path: str | Path, kind: str = "anchor") -> list[str]:
    """Anchor (or vocabulary: ``kind``) prompts, one a line; ``""`` is the empty prompt, ``#`` starts a comment line."""
    path = Path(path)
    if not path.is_file():
        raise UnguideError(f"{kind} file {path} not found: pass a text file with one prompt a line")
    try:
        lines = path.read_bytes().decode("utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise UnguideError(f"{kind} file {path} is not UTF-8 text: save it as UTF-8") from None
    anchors = ["" if line.strip() == '""' else line.strip() for line in lines
               if line.strip() and not line.lstrip().startswith("#")]
    if not anchors:
        raise UnguideError(f"{kind} file {path} holds no prompts: write one prompt a line")
    return list(dict.fromkeys(anchors))


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_preset(name: str) -> ConceptSpec:
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        raise UnguideError(f"unknown concept preset {name!r}: choose one of {', '.join(preset_names())} or pass `concept_file`")
    return load_concept_file(path)


def resolve_concept(name: Optional[str] = None, file: Optional[str] = None) -> ConceptSpec:
    if bool(name) == bool(file):
        raise UnguideError("give exactly one of `concept` NAME or `concept_file` FILE")
    return load_preset(name) if name else load_concept_file(file)


def resolve_concepts(names: Optional[str] = None, files: Optional[str] = None) -> list[ConceptSpec]:
    """Comma-separated preset names and/or concept files: one spec (a single run) or several (a group run)."""
    names_list = [n.strip() for n in (names or "").split(",") if n.strip()]
    files_list = [f.strip() for f in (files or "").split(",") if f.strip()]
    if not names_list and not files_list:
        raise UnguideError("give `concept` NAME[,NAME...] or `concept_file` FILE[,FILE...]")
    return [load_preset(n) for n in names_list] + [load_concept_file(f) for f in files_list]


EVERYDAY_ANCHORS = PRESET_DIR / "anchors" / "sd_everyday.txt"  # Stable Diffusion families' shipped anchors
_FILLER = {"a", "an", "the", "of", "photo", "picture", "image", "painting", "in", "on", "with", "and", "by"}


def _content_words(prompt: str) -> set[str]:
    words = {w.strip(".,;:!?\"'()").lower() for w in prompt.split()}
    return {w.removesuffix("s") for w in words if w and w not in _FILLER}


def default_anchors(concept: ConceptSpec, listed: Optional[list[str]] = None) -> tuple[list[str], int]:
    """The anchors a concept gets when its spec lists none: ``listed`` (a world's own list) or the shipped everyday
    list, minus every anchor that shares a content word with the concept's target or synonyms (an adapter cannot
    both erase and keep them). Returns (anchors, how many were dropped)."""
    pool = list(listed) if listed is not None else read_anchor_file(EVERYDAY_ANCHORS)
    own = set().union(*(_content_words(p) for p in [concept.target, *concept.synonym_prompts()]))
    kept = [a for a in pool if not (_content_words(a) & own)]
    return kept, len(pool) - len(kept)
