"""The image gate's decision sequence, written once: flag -> redraw -> second look -> substitute.

After the prompt gate has decided and the batch is drawn, the rows it kept are looked at by every image gate of the
guide (one per erased concept; a single run has one). A row some gate flags is redrawn from the same noise with the
erasure (the flagged concepts' adapters); the redraw is looked at again, and where it still shows a concept the base
model draws that concept's reference prompt instead (an attacker who beats the adapter, e.g. by inversion, meets the
base model drawing the reference). Where a prompt gate sits in front (``calibrated+image``), it erases nothing on its
own: a prompt over it is a *suspect* (``Decision.suspects``), and its image is looked at first under that concept's more
lenient threshold (:attr:`ImageGate.suspect_threshold`; the second look at a redraw uses the usual one), so the prompt's words raise the image gate's suspicion and an
unrelated prompt the words mislead keeps the base model's image unless the image itself looks like the concept. Single
runs, group runs and the attacker's defence all call :func:`review`, so the attack measures exactly the decision
generation makes.
"""
from __future__ import annotations

from typing import Callable, Optional, Protocol, Sequence

import torch

from .decision import Decision
from .image_gate import ImageGate, group_scores

# redraw(rows, decisions) -> the latents of those rows drawn again under their new decisions
Redraw = Callable[[list, list], torch.Tensor]


class Reviewer(Protocol):
    """What :func:`review` needs from a guide: its image gates by concept, the weight of kept prompts, and how a
    decision changes when a concept is flagged or substituted."""

    adapter: object
    image_gates: dict[str, ImageGate]
    keep_w: float

    def flagged(self, decision: Decision, hits: list[str], scores: dict[str, float]) -> Decision: ...

    def substitute_for(self, concept: str) -> Optional[str]: ...


def look(reviewer: Reviewer, bundle, latents: torch.Tensor, seeds: Sequence[int]) -> list[dict[str, float]]:
    """Each image's score under every image gate of the guide (gates with one detector share one pass)."""
    scores = {k: v.tolist() for k, v in group_scores(reviewer.image_gates, bundle, reviewer.adapter, latents,
                                                     seeds).items()}
    return [{k: scores[k][j] for k in scores} for j in range(len(latents))]


def hits_of(reviewer: Reviewer, scores: dict[str, float], suspects=()) -> list[str]:
    """The concepts whose image gate flags the image (a suspect concept's under its lenient threshold)."""
    return [k for k, g in reviewer.image_gates.items() if scores[k] < g.threshold_for(k in (suspects or ()))]


def review(reviewer: Reviewer, bundle, items, latents: torch.Tensor, decisions: list[Decision],
           redraw: Redraw) -> tuple[torch.Tensor, list[Decision]]:
    """The sequence over one drawn batch; returns the final latents and decisions. Without image gates, unchanged."""
    rows = [r for r, d in enumerate(decisions) if d.w == reviewer.keep_w] if reviewer.image_gates else []
    if not rows:
        return latents, decisions
    decisions, flagged = list(decisions), []
    for r, scores in zip(rows, look(reviewer, bundle, latents[rows], [items[r].seed for r in rows])):
        hits = hits_of(reviewer, scores, decisions[r].suspects)
        decisions[r] = reviewer.flagged(decisions[r], hits, scores)
        flagged += [r] if hits else []
    if not flagged:
        return latents, decisions
    latents = latents.clone()
    latents[flagged] = redraw(flagged, [decisions[r] for r in flagged])
    still = []
    # the second look judges the erasure's redraw as any redraw (the usual threshold): the prompt's words were
    # evidence about the base model's drawing, not about the adapter's
    for r, scores in zip(flagged, look(reviewer, bundle, latents[flagged], [items[r].seed for r in flagged])):
        hits = hits_of(reviewer, scores)
        decisions[r] = decisions[r].but(image_score_redrawn=min(scores.values()))
        prompt = reviewer.substitute_for(hits[0]) if hits else None
        if prompt is not None:
            still.append(r)
            decisions[r] = decisions[r].but(w=1.0, substitute_prompt=prompt, negative_prompt=None,
                                            concepts=() if decisions[r].concepts is not None else None)
    if still:
        latents[still] = redraw(still, [decisions[r] for r in still])
    return latents, decisions
