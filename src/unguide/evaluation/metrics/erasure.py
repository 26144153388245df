"""Object-erasure metrics of the UnGuide paper.

Protocol: every evaluated image is classified over a fixed label set (e.g. with zero-shot CLIP) and
scored by the probability of its *correct* label. Three groups of images are averaged separately:

* ``erased``   -- images prompted with the erased class; correct label = erased class (Acc_e, lower is better);
* ``other``    -- images of the other, non-erased classes; correct label = their own class (Acc_s, higher is better);
* ``synonyms`` -- images prompted with synonyms of the erased class; correct label = the erased class
  (Acc_g, lower is better).

The overall score is the harmonic mean H_o = 3 / (1/(1-Acc_e) + 1/Acc_s + 1/(1-Acc_g)).
All accuracies are fractions in [0, 1].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

GROUPS = {"erased": "acc_e", "synonyms": "acc_g", "other": "acc_s"}


def correct_label_probability(probs: Tensor, labels: Tensor) -> Tensor:
    """Probability assigned to each image's correct label: ``probs[N, L]``, ``labels[N]`` -> ``[N]``."""
    return probs.gather(1, labels.long().view(-1, 1)).squeeze(1)


def top1(probs: Tensor, labels: Tensor) -> Tensor:
    """1.0 where the arg-max label is the correct one, else 0.0 -> ``[N]``."""
    return (probs.argmax(dim=1) == labels.long()).float()


def harmonic_overall(acc_e: float, acc_s: float, acc_g: float) -> float:
    """H_o = 3 / (1/(1-acc_e) + 1/acc_s + 1/(1-acc_g)); 0.0 when any of the three terms is 0."""
    terms = [1.0 - float(acc_e), float(acc_s), 1.0 - float(acc_g)]
    if any(math.isnan(t) for t in terms):
        return float("nan")
    if min(terms) <= 0.0:
        return 0.0
    return 3.0 / sum(1.0 / t for t in terms)


def _table(groups: dict, suffix: str = "") -> dict:
    accs = {GROUPS[g]: float(torch.as_tensor(v, dtype=torch.float64).mean()) for g, v in groups.items() if g in GROUPS}
    missing = set(GROUPS) - set(groups)
    if missing:
        raise KeyError(f"missing groups {sorted(missing)}; expected {sorted(GROUPS)}")
    accs["h_o"] = harmonic_overall(accs["acc_e"], accs["acc_s"], accs["acc_g"])
    return {k + suffix: v for k, v in accs.items()}


def erasure_table(groups: dict, top1_groups: dict | None = None) -> dict:
    """Acc_e, Acc_s, Acc_g and H_o from per-group correct-label probabilities.

    ``groups`` maps "erased", "synonyms", "other" to a tensor of per-image correct-label probabilities
    (or their mean); each is averaged. ``top1_groups`` (same keys, 0/1 values) adds the same four numbers
    with a ``_top1`` suffix ("acc_e_top1", ..., "h_o_top1").
    """
    out = _table(groups)
    if top1_groups is not None:
        out.update(_table(top1_groups, "_top1"))
    return out


# role of a prompt -> the Table-1 figure its images count toward (synonym images count for Acc_g, both kinds)
ROLE_FIGURES = {"acc_e": ("erased",), "acc_s": ("other",), "acc_anchor": ("anchor",), "acc_g": ("synonym", "heldout"),
                "acc_g_heldout": ("heldout",)}


def table1_metrics(p_correct: Tensor, top1: Tensor, roles) -> dict:
    """The paper's Table-1 figures from per-image values: ``p_correct`` (probability of each image's correct class),
    ``top1`` (1.0 where the judge's arg-max is that class) and each image's role (see :mod:`unguide.evaluation.suites`).
    Acc_e / Acc_s / Acc_g and H_o, Acc_anchor and Acc_g on held-out words apart, and top-1 variants. A figure with
    no image is NaN. This is the one place these numbers are computed (evaluate and benchmark both call it)."""
    import numpy as np

    roles = np.asarray(list(roles))

    def mean(values: Tensor, which) -> float:
        mask = torch.from_numpy(np.isin(roles, which))
        return values[mask].mean().item() if mask.any() else float("nan")

    m = {key: mean(p_correct, which) for key, which in ROLE_FIGURES.items()}
    m.update({f"{key}_top1": mean(top1, ROLE_FIGURES[key]) for key in ("acc_e", "acc_s", "acc_g")})
    m["h_o"] = harmonic_overall(m["acc_e"], m["acc_s"], m["acc_g"])
    m["h_o_top1"] = harmonic_overall(m["acc_e_top1"], m["acc_s_top1"], m["acc_g_top1"])
    # a figure of a role the prompts do not have (no anchor classes, no held-out words) is left out, not NaN
    return {k: v for k, v in m.items() if not math.isnan(v)}
