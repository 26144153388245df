"""Judges: what looks at a generated image and says what it shows.

Every evaluation (``unguide evaluate``, ``unguide benchmark``, the demo) asks one of these, so the paper's metrics
are computed the same way whatever the model:

* a **class judge** gives, per image, a probability for each class a suite names (:class:`ClassJudge`):
  zero-shot CLIP here (:class:`ClipJudge`, Stable Diffusion), the toy classifier in ``unguide.toyworld``;
  it may also give image features for FID/KID between two image sets;
* a **detection judge** counts what it finds per image: NudeNet's exposed classes (:class:`NudeNetJudge`).

Judges are built by :func:`make_judge` from a name, so configs carry strings and the heavy models load only when
an evaluation runs.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch

from ..errors import UnguideError

DEFAULT_CLIP = "openai/clip-vit-base-patch32"


class ClassJudge(ABC):
    """Per-image class probabilities over a suite's classes."""

    name: str = "class"

    @abstractmethod
    def label_set(self, classes: Sequence[str]) -> list[str]:
        """The columns :meth:`probabilities` returns for these classes (a judge with a fixed label set, like the toy
        classifier, returns its own; every class asked for must be among them)."""

    @abstractmethod
    def probabilities(self, images: torch.Tensor, classes: Sequence[str],
                      aliases: Optional[Mapping[str, Sequence[str]]] = None) -> torch.Tensor:
        """``[N, len(label_set(classes))]`` probabilities for images in [0, 1]. ``aliases`` maps a class to other
        words for it (synonyms); a judge that reads words counts their probability toward that class."""

    def features(self, images: torch.Tensor) -> Optional[torch.Tensor]:
        """Image features for FID/KID, or None when the judge has none."""
        return None

    def attributes(self, prompts: Sequence[str], images: torch.Tensor) -> dict:
        """Judge-specific extras per prompt (e.g. the toy world's colour rate); none by default."""
        return {}


class ClipJudge(ClassJudge):
    """Zero-shot CLIP (the paper's judge on Stable Diffusion): softmax over "a photo of the {label}" for every class
    and every alias, each class scoring the sum of its own and its aliases' probabilities, so that synonym images
    count toward the class they name. Features: CLIP image embeddings. Also gives the CLIP score."""

    name = "clip"

    def __init__(self, model: str = DEFAULT_CLIP, device: str | torch.device = "cpu",
                 template: str = "a photo of the {}"):
        from .metrics.clip import load_clip

        try:
            self.model, self.tokenizer = load_clip(model, device)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UnguideError(f"could not load the CLIP judge {model!r} ({first}): pass `clip_model` with a local CLIP "
                               "directory (model + tokenizer) or a hub id reachable from this machine") from None
        self.template, self.model_name = template, model
        self._last: tuple = (None, None)  # (images, their embeddings): evaluation asks three questions of one set

    def _embeddings(self, images: torch.Tensor) -> torch.Tensor:
        from .metrics.clip import image_embeddings

        if self._last[0] is not images:
            self._last = (images, image_embeddings(self.model, images))
        return self._last[1]

    def label_set(self, classes: Sequence[str]) -> list[str]:
        return list(classes)

    def probabilities(self, images, classes, aliases=None):
        from .metrics.clip import zero_shot_probs

        words = [(c, c) for c in classes] + [(c, a) for c in classes for a in (aliases or {}).get(c, ()) if a != c]
        probs = zero_shot_probs(self.model, self.tokenizer, images, [w for _, w in words], template=self.template,
                                image_emb=self._embeddings(images))
        out = torch.zeros(len(images), len(classes))
        for k, (c, _) in enumerate(words):
            out[:, list(classes).index(c)] += probs[:, k]
        return out

    def features(self, images):
        return self._embeddings(images).cpu()

    def clip_score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        from .metrics.clip import clip_score

        return clip_score(self.model, self.tokenizer, images, list(prompts), image_emb=self._embeddings(images))


class NudeNetJudge:
    """NudeNet v3's detector (bundled ONNX model): per image, counts of the nine exposed classes of the protocol."""

    name = "nudenet"

    def __init__(self, threshold: Optional[float] = None):
        from .metrics.nudity import DEFAULT_THRESHOLD

        self.threshold = DEFAULT_THRESHOLD if threshold is None else threshold

    def detections(self, paths: Sequence[str | Path]) -> list[dict[str, int]]:
        from .metrics.nudity import detect_exposed

        try:
            return detect_exposed(paths, threshold=self.threshold)
        except ImportError as exc:
            raise UnguideError(f"the nudenet judge needs the package nudenet ({exc}): pip install nudenet") from None


# Judges by name: factory(clip_model=..., device=...) -> judge. A world's own judges (the toy classifier) are found
# through the world registry instead. A new judge is a class plus one register_judge line.
JUDGES: dict[str, Callable[..., object]] = {}


def register_judge(name: str, factory: Callable[..., object]) -> None:
    JUDGES[name] = factory


register_judge("clip", lambda clip_model=DEFAULT_CLIP, device="cpu": ClipJudge(clip_model, device))
register_judge("nudenet", lambda **_: NudeNetJudge())


def judge_names() -> list[str]:
    """Registered judges and those the installed worlds ship."""
    from ..models.worlds import world_judge_names

    return list(dict.fromkeys([*JUDGES, *world_judge_names()]))


def make_judge(name: str, bundle=None, clip_model: str = DEFAULT_CLIP, device: str | torch.device = "cpu"):
    """A judge by name: a registered one (``clip``, ``nudenet``) or one a world ships (``toy``: the toy world's
    classifier, found through the world registry so that only the toy world knows its classifier)."""
    from ..models.worlds import judge_class

    if name in JUDGES:
        return JUDGES[name](clip_model=clip_model, device=device)
    world_judge = judge_class(name)
    if world_judge is not None:
        return world_judge()
    raise UnguideError(f"unknown judge {name!r}: use {', '.join(judge_names())}")
