"""UnGuidance for several concepts erased at once: one decision per concept, one drawing per prompt.

Each member concept keeps its own guide (:class:`~unguide.guidance.unguidance.UnGuide`: its gate, its calibration,
its adapter). A prompt is erased for every concept whose gate it is over, and drawn with exactly those concepts'
adapters on (the others off); a prompt under every gate is the base model's drawing, bit for bit. With the image
gate, every kept image is checked against every concept (the detectors share their common anchor prompts), and a
flagged image is redrawn with the flagged concepts' adapters; what still shows a concept after that is drawn from
that concept's reference prompt, as for one concept (the same :func:`~unguide.guidance.review.review`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .config import GuidanceConfig
from .decision import Decision
from .image_gate import ImageGate
from .mixing import guided_noise_fn
from .review import review
from .unguidance import UnGuide, guide_for_run


class GroupGuide:
    """The guides of a group's members over one :class:`~unguide.erasure.adapters.GroupAdapter`."""

    def __init__(self, adapter, members: dict[str, UnGuide]):
        self.adapter, self.members = adapter, dict(members)
        first = next(iter(self.members.values()))
        self.mode, self.rule, self.name = first.mode, first.rule, first.name
        notes = [f"{k}: {g.note}" for k, g in self.members.items() if g.note]
        self.note = "; ".join(notes) or None
        gates = {k: g.image_gate for k, g in self.members.items() if g.image_gate is not None}
        self.image_gates: dict[str, ImageGate] = gates if self.mode == "unguide" else {}

    @property
    def keep_w(self) -> float:
        return self.rule.w_keep

    def settings(self) -> dict:
        return {"mode": self.mode, "group": list(self.members),
                "members": {k: g.settings() for k, g in self.members.items()}}

    # -- deciding ---------------------------------------------------------------------------------------------
    def decide(self, bundle, prompts: Sequence[str], guidance: float) -> list[Decision]:
        """The group's prompt-side decision for each prompt at one guidance scale, as :meth:`prepare` makes it (what
        ``unguide attack`` asks of a defence)."""
        per = {}
        for name, guide in self.members.items():
            with self.adapter.only([name]):
                per[name] = guide.decide(bundle, prompts, guidance)
        return [self._combine({k: per[k][r] for k in self.members}) for r in range(len(prompts))]

    def prepare(self, bundle, items) -> list[Decision]:
        """Each member decides for its concept (its adapter alone on while it scores); a row's w is the most erasing
        of its members' and ``concepts`` names the members whose gate it is over."""
        per = {}
        for name, guide in self.members.items():
            with self.adapter.only([name]):
                per[name] = guide.prepare(bundle, items)
        return [self._combine({k: per[k][r] for k in self.members}) for r in range(len(items))]

    def _combine(self, member_decisions: dict[str, Decision]) -> Decision:
        if self.mode != "unguide":  # base / lora / fixed w: every member alike, all adapters on
            d = next(iter(member_decisions.values()))
            return d.but(concepts=list(self.members) if d.w != 1 else [])
        flagged = [k for k, d in member_decisions.items() if d.w != self.rule.w_keep]
        lead = min(member_decisions, key=lambda k: member_decisions[k].w) if flagged else next(iter(member_decisions))
        scores = {k: {f: getattr(d, f) for f in ("score", "threshold") if getattr(d, f) is not None}
                  for k, d in member_decisions.items()}
        suspects = [k for k, d in member_decisions.items() if d.suspects]
        return member_decisions[lead].but(concepts=flagged, members=scores if any(scores.values()) else None,
                                          suspects=suspects or None)

    # -- drawing ----------------------------------------------------------------------------------------------
    def noise_fn(self, bundle, cond, uncond, scale, decisions: Sequence[Decision]):
        def switch(rows: torch.Tensor):
            by_set: dict[tuple, list[int]] = {}
            for r in rows.tolist():
                by_set.setdefault(tuple(decisions[r].concepts or self.members), []).append(r)
            return [(torch.tensor(rs, device=rows.device), self.adapter.only(names)) for names, rs in by_set.items()]

        return guided_noise_fn(bundle, self.adapter, cond, uncond, scale, decisions, switch)

    # -- the review sequence's questions ----------------------------------------------------------------------
    def flagged(self, decision: Decision, hits: list[str], scores: dict[str, float]) -> Decision:
        """Every member's image score, the nearest member's under the single-concept fields; a flagged row is erased
        with the flagged members' adapters."""
        limit = {k: g.threshold_for(k in (decision.suspects or ())) for k, g in self.image_gates.items()}
        margin = {k: scores[k] - limit[k] for k in self.image_gates}
        lead = min(margin, key=margin.get)
        looked = decision.but(image_score=scores[lead], image_threshold=limit[lead],
                              image_scores={k: round(scores[k], 5) for k in self.image_gates},
                              image_flagged=bool(hits))
        return self.members[hits[0]].erased(looked).but(concepts=hits) if hits else looked

    def substitute_for(self, concept: str) -> Optional[str]:
        return self.members[concept].substitute_prompt

    def review(self, bundle, items, latents, decisions: list[Decision], redraw):
        return review(self, bundle, items, latents, decisions, redraw)


def group_guide(adapter, run, config: GuidanceConfig) -> GroupGuide:
    """The group's guide under ``config``: each member's guide built from its own run as a single run's would be."""
    return GroupGuide(adapter, {name: guide_for_run(adapter.members[name], member, config)
                                for name, member in run.members.items()})
