"""UnGuidance for several concepts erased at once: one decision per concept, one drawing per prompt.

Each member concept keeps its own guide (:class:`~unguide.guidance.unguidance.UnGuide`: its gate, its calibration,
its adapter). A prompt is erased for every concept whose gate it is over, and drawn with exactly those concepts'
adapters on (the others off); a prompt under every gate is the base model's drawing, bit for bit. With the image
gate, every kept image is checked against every concept (the detectors share their common anchor prompts), and a
flagged image is redrawn with the flagged concepts' adapters; what still shows a concept after that is drawn from
that concept's reference prompt, as for one concept.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .image_gate import group_scores
from .unguidance import GuidanceConfig, UnGuide, guide_for_run, guided_noise_fn


class GroupGuide:
    """The guides of a group's members over one :class:`~unguide.erasure.adapters.GroupAdapter`."""

    def __init__(self, adapter, members: dict[str, UnGuide]):
        self.adapter, self.members = adapter, dict(members)
        first = next(iter(self.members.values()))
        self.mode, self.rule, self.name = first.mode, first.rule, first.name
        notes = [f"{k}: {g.note}" for k, g in self.members.items() if g.note]
        self.note = "; ".join(notes) or None
        gates = {k: g.image_gate for k, g in self.members.items() if g.image_gate is not None}
        self.image_gates = gates if self.mode == "unguide" else {}

    def settings(self) -> dict:
        return {"mode": self.mode, "group": list(self.members),
                "members": {k: g.settings() for k, g in self.members.items()}}

    # -- deciding ---------------------------------------------------------------------------------------------
    def prepare(self, bundle, items) -> list[dict]:
        """Each member decides for its concept (its adapter alone on while it scores); a row's w is the most erasing
        of its members' and ``concepts`` names the members whose gate it is over."""
        per = {}
        for name, guide in self.members.items():
            with self.adapter.only([name]):
                per[name] = guide.prepare(bundle, items)
        return [self._combine({k: per[k][r] for k in self.members}) for r in range(len(items))]

    def _combine(self, member_infos: dict) -> dict:
        if self.mode != "unguide":  # base / lora / fixed w: every member alike, all adapters on
            info = dict(next(iter(member_infos.values())))
            return {**info, "concepts": list(self.members) if info["w"] != 1 else []}
        flagged = [k for k, i in member_infos.items() if i["w"] != self.rule.w_keep]
        lead = min(member_infos, key=lambda k: member_infos[k]["w"]) if flagged else next(iter(member_infos))
        info = dict(member_infos[lead])
        scores = {k: {f: i[f] for f in ("score", "threshold") if f in i} for k, i in member_infos.items()}
        if any(scores.values()):
            info["members"] = scores
        return {**info, "concepts": flagged}

    # -- drawing ----------------------------------------------------------------------------------------------
    def noise_fn(self, bundle, cond, uncond, scale, infos: Sequence[dict]):
        def switch(rows: torch.Tensor):
            by_set: dict[tuple, list[int]] = {}
            for r in rows.tolist():
                by_set.setdefault(tuple(infos[r].get("concepts") or self.members), []).append(r)
            return [(torch.tensor(rs, device=rows.device), self.adapter.only(names)) for names, rs in by_set.items()]

        return guided_noise_fn(bundle, self.adapter, cond, uncond, scale, infos, switch)

    def review(self, bundle, items, latents: torch.Tensor, infos: list[dict], redraw) -> tuple[torch.Tensor, list[dict]]:
        """Every member's image gate on the rows no prompt gate erased; flagged rows redrawn with the flagged
        members' adapters, then the reference prompt of a concept the redrawing still shows."""
        if not self.image_gates:
            return latents, infos
        rows = [r for r, info in enumerate(infos) if info["w"] == self.rule.w_keep]
        if not rows:
            return latents, infos
        scores = self._scores(bundle, latents[rows], [items[r].seed for r in rows])
        infos, flagged = list(infos), []
        for j, r in enumerate(rows):
            hits = [k for k, g in self.image_gates.items() if scores[k][j] < g.threshold]
            infos[r] = {**infos[r], **self._image_info(scores, j), "image_flagged": bool(hits)}
            if hits:
                flagged.append(r)
                infos[r] = {**self.members[hits[0]].erased_info(infos[r]), "concepts": hits}
        if not flagged:
            return latents, infos
        latents = latents.clone()
        latents[flagged] = redraw(flagged, [infos[r] for r in flagged])
        again = self._scores(bundle, latents[flagged], [items[r].seed for r in flagged])
        still = []
        for j, r in enumerate(flagged):
            infos[r] = {**infos[r], "image_score_redrawn": min(float(again[k][j]) for k in again)}
            hits = [k for k, g in self.image_gates.items() if again[k][j] < g.threshold]
            if hits and self.members[hits[0]].substitute_prompt is not None:
                still.append(r)
                infos[r] = {**self.members[hits[0]].substituted_info(infos[r]), "concepts": []}
        if still:
            latents[still] = redraw(still, [infos[r] for r in still])
        return latents, infos

    def _scores(self, bundle, latents, seeds) -> dict:
        return {k: v.tolist() for k, v in group_scores(self.image_gates, bundle, self.adapter, latents, seeds).items()}

    def _image_info(self, scores: dict, j: int) -> dict:
        """Per-member image scores, and the nearest member's score and threshold under the single-concept keys."""
        margin = {k: scores[k][j] - g.threshold for k, g in self.image_gates.items()}
        lead = min(margin, key=margin.get)
        return {"image_score": scores[lead][j], "image_threshold": self.image_gates[lead].threshold,
                "image_scores": {k: round(scores[k][j], 5) for k in self.image_gates}}


def group_guide(adapter, meta: dict, config: GuidanceConfig) -> GroupGuide:
    """The group's guide under ``config``: each member's guide built from its own run as a single run's would be."""
    return GroupGuide(adapter, {name: guide_for_run(adapter.members[name], member, config)
                                for name, member in meta["members"].items()})
