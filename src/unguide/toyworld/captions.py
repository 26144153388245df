"""Caption grammar of the toy world, and each class's synonyms.

``TRAIN_SYNONYMS`` may appear in training captions; ``HELDOUT_SYNONYMS`` never do, so that
erasure can be tested on words the model only knows through its frozen text encoder.
"""
from __future__ import annotations

import itertools
from typing import Optional

import numpy as np

from .render import OBJECTS, SCENE_NAMES, Scene, allowed_colours

TRAIN_SYNONYMS = {
    "sun": ("sunshine",), "moon": ("half moon",), "star": ("starlight",), "heart": ("love heart",),
    "house": ("cottage",), "tree": ("oak",), "fish": ("goldfish",), "flower": ("daisy",),
    "boat": ("sailboat",), "umbrella": ("brolly",),
}
HELDOUT_SYNONYMS = {
    "sun": ("sunburst", "solar disc"), "moon": ("crescent", "lunar crescent"), "star": ("pentagram", "twinkle"),
    "heart": ("valentine", "cardioid"), "house": ("home", "cabin"), "tree": ("sapling", "maple"),
    "fish": ("trout", "minnow"), "flower": ("blossom", "bloom"), "boat": ("ship", "vessel"),
    "umbrella": ("parasol", "sunshade"),
}
SCENE_WORDS = {"sky": "sky", "grass": "grass", "night": "night sky", "sand": "sand"}
_PREP = {"sky": "in", "grass": "on", "night": "in", "sand": "on"}
P_TRAIN_SYNONYM = 0.15
P_DROP = 0.1  # caption dropout to "" for classifier-free guidance

_OBJECT_TEMPLATES = (  # (weight, template); {a} is the article that fits the next word
    (0.22, "a photo of the {noun}"),
    (0.12, "a photo of {a} {colour} {noun}"),
    (0.16, "{a} {colour} {noun} {prep} the {scene}"),
    (0.10, "{a} {noun} {prep} the {scene}"),
    (0.10, "{a} {size} {colour} {noun}"),
    (0.08, "a drawing of {a} {noun}"),
    (0.08, "{noun}"),
    (0.14, "{a} {colour} {noun}"),
)
_EMPTY_TEMPLATES = ("a photo of the {scene}", "the {scene}", "an empty {scene}")


def object_prompt(obj: str) -> str:
    """The evaluation prompt of a class, the analogue of the paper's "a photo of the {class}"."""
    return f"a photo of the {obj}"


def scene_prompt(scene: str) -> str:
    return f"a photo of the {SCENE_WORDS[scene]}"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _size_word(size: float) -> str:
    return "small" if size < 0.55 else ("big" if size > 0.7 else "")


def _fill(template: str, noun: str, colour: str, scene: str, size: str) -> str:
    text = template.replace("{size} ", f"{size} " if size else "")
    first = text.split("{a} ", 1)[1].split()[0] if "{a} " in text else "x"
    nxt = {"{colour}": colour, "{noun}": noun, "{size}": size}.get(first, first)
    return text.format(a=_article(nxt), noun=noun, colour=colour, scene=SCENE_WORDS[scene], prep=_PREP[scene], size=size)


def caption(scene: Scene, rng: np.random.Generator, p_drop: float = P_DROP) -> str:
    """A random true training caption for a scene (or "" with probability p_drop)."""
    if rng.random() < p_drop:
        return ""
    if scene.obj is None:
        return _EMPTY_TEMPLATES[rng.integers(len(_EMPTY_TEMPLATES))].format(scene=SCENE_WORDS[scene.scene])
    noun = scene.obj
    if rng.random() < P_TRAIN_SYNONYM:
        noun = TRAIN_SYNONYMS[noun][rng.integers(len(TRAIN_SYNONYMS[noun]))]
    weights = np.array([w for w, _ in _OBJECT_TEMPLATES])
    template = _OBJECT_TEMPLATES[rng.choice(len(weights), p=weights / weights.sum())][1]
    return _fill(template, noun, scene.colour, scene.scene, _size_word(scene.size))


def all_training_captions() -> list[str]:
    """Every caption :func:`caption` can produce (used to pre-encode the text once)."""
    out = {""}
    for scene in SCENE_NAMES:
        out.update(t.format(scene=SCENE_WORDS[scene]) for t in _EMPTY_TEMPLATES)
        for obj, colour, size, (_, template) in itertools.product(OBJECTS, allowed_colours(scene), ("small", "big", ""),
                                                                  _OBJECT_TEMPLATES):
            for noun in (obj,) + TRAIN_SYNONYMS[obj]:
                out.add(_fill(template, noun, colour, scene, size))
    return sorted(out)


def class_of_word(word: str) -> Optional[str]:
    """Map a class name or any of its synonyms back to the class."""
    for obj in OBJECTS:
        if word == obj or word in TRAIN_SYNONYMS[obj] or word in HELDOUT_SYNONYMS[obj]:
            return obj
    return None


assert not set(itertools.chain(*HELDOUT_SYNONYMS.values())) & set(itertools.chain(*TRAIN_SYNONYMS.values()))
assert all(len(v) >= 2 for v in HELDOUT_SYNONYMS.values())
