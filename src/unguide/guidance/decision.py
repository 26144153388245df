"""One image's decision: the weight w it was drawn with and why, as every reader sees it.

The guides write a :class:`Decision` per image (the prompt gate's score and threshold, the image gate's look, a
redraw, a substitute prompt, a group's per-concept decisions); the mixing reads its w and prompts; PNG metadata and
``index.jsonl`` store :meth:`Decision.record`; the benchmark, the cost report and the page read it back with
:meth:`Decision.from_record`. One definition, so a new field reaches every reader.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Optional

SCORE_FIELDS = ("score", "threshold", "score_empty", "suspects", "image_score", "image_threshold", "image_flagged",
                "concepts", "members", "image_scores")


@dataclass(frozen=True)
class Decision:
    """``w``: the image's weight (``w * base + (1 - w) * adapter``); ``gate``: the prompt gate that decided (``empty``,
    ``calibrated``, ``value``, ``none`` for the image gate alone; unset without UnGuidance); ``score`` /
    ``threshold`` / ``score_empty``: the prompt gate's numbers; ``suspects``: the concepts whose prompt gate the prompt
    is over where an image gate follows (``calibrated+image``): their image gates look at it more leniently; ``image_*``: the image gate's first look
    (``image_flagged``: it redrew the image) and second look at the redraw; ``negative_prompt``: erased rows guided away
    from the concept's prompt; ``substitute_prompt``: the redraw still showed the concept, so the base model drew
    this prompt instead; ``concepts`` / ``members`` / ``image_scores``: a group run's erased concepts and each member's
    numbers."""

    w: float
    gate: Optional[str] = None
    score: Optional[float] = None
    threshold: Optional[float] = None
    score_empty: Optional[float] = None
    suspects: Optional[tuple] = None
    image_score: Optional[float] = None
    image_threshold: Optional[float] = None
    image_flagged: Optional[bool] = None
    image_score_redrawn: Optional[float] = None
    image_scores: Optional[dict] = None
    negative_prompt: Optional[str] = None
    substitute_prompt: Optional[str] = None
    concepts: Optional[tuple] = None
    members: Optional[dict] = None

    def __post_init__(self):
        object.__setattr__(self, "w", float(self.w))
        for name in ("concepts", "suspects"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def redrawn(self) -> bool:
        return bool(self.image_flagged)

    @property
    def substituted(self) -> bool:
        return self.substitute_prompt is not None

    def but(self, **changes) -> "Decision":
        return replace(self, **changes)

    def record(self) -> dict:
        """The fields that are set, as JSON values (what PNG metadata and index.jsonl hold)."""
        out = {k: v for k, v in asdict(self).items() if v is not None}
        for name in ("concepts", "suspects"):
            if name in out:
                out[name] = list(out[name])
        return out

    def scores(self) -> dict:
        """The gates' numbers without w and prompts (``UnGuideOutput.scores``, the page)."""
        record = self.record()
        return {k: record[k] for k in SCORE_FIELDS if k in record}

    @classmethod
    def from_record(cls, row: dict) -> "Decision":
        """A decision read back from PNG metadata or an index row (other keys ignored; w 1 when none was stored: a
        base-model image)."""
        known = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in row.items() if k in known}, "w": row.get("w", 1.0)})
