"""Benchmark suites: which concepts are erased, which prompts measure them, with which roles and judge.

A suite is data; :mod:`unguide.evaluation.benchmark` runs any of them the same way (erase, generate, judge, report):

* ``toy``: the embedded model's 10 classes, judged by the toy classifier (the toy world's plug-in builds it);
* ``cifar10``: the paper's Table 1 on Stable Diffusion: the 10 ``sd-*`` presets, zero-shot CLIP over {target, its
  synonyms, the 9 other classes};
* ``nudity``: the paper's explicit-content protocol: an I2P-style CSV, each row with its own seed, guidance and
  size (only rows with ``nudity_percentage`` > 0 when the column is there), NudeNet counts, CLIP score, optional FID.

Roles of a prompt: ``erased`` (the target), ``synonym`` (a synonym word), ``heldout`` (a held-out synonym word),
``anchor`` (another class the concept's anchors name: the selective recipe trains on it), ``other`` (a class no
recipe sees: Acc_s), ``prompt`` (a nudity-suite row).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Optional, Sequence, get_args

from ..erasure.concepts import ConceptSpec, load_preset
from ..errors import UnguideError

SuiteName = str  # a registered suite's name (SUITES)
MetricKind = Literal["table1", "nudity"]
CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass
class SuiteCase:
    """One erased concept and the prompts that measure it. ``rows``: dicts with prompt, role and class, and for CSV
    rows their own seed, guidance, width and height."""

    name: str
    spec: ConceptSpec
    rows: list[dict]
    classes: list[str] = field(default_factory=list)  # the classes a class judge scores over
    aliases: dict[str, list[str]] = field(default_factory=dict)  # class -> other words for it (synonyms)


@dataclass
class Suite:
    name: str
    cases: dict[str, SuiteCase]
    judge: str  # a judges.make_judge name
    metrics: MetricKind
    description: str = ""
    canonical_from: list[SuiteCase] = field(default_factory=list)  # every case of the suite, for stable file names

    def __post_init__(self):
        if self.metrics not in get_args(MetricKind):
            raise UnguideError(f"unknown suite metrics {self.metrics!r}: use table1 or nudity")

    def canonical_order(self) -> dict[str, int]:
        """Prompt -> index over all the suite's cases, so shared base images keep their file names whichever subset
        of concepts a run covers (a later run over more concepts reuses them)."""
        prompts = [r["prompt"] for case in (self.canonical_from or self.cases.values()) for r in case.rows]
        return {p: i for i, p in enumerate(dict.fromkeys(prompts))}


def concept_rows(spec: ConceptSpec) -> list[dict]:
    """Rows of (prompt, role, class) for an object concept: target, synonyms (trained, then held out), and the other
    classes split into anchor and held-out ("other") by the concept's anchors."""
    rows = [{"prompt": spec.target, "role": "erased", "class": spec.label}]
    rows += [{"prompt": p, "role": "synonym", "class": spec.label} for p in spec.synonym_prompts(heldout=False)]
    rows += [{"prompt": p, "role": "heldout", "class": spec.label} for p in spec.synonym_prompts(heldout=True)]
    anchors = set(spec.anchors)
    for p in spec.other:
        rows.append({"prompt": p, "role": "anchor" if p in anchors else "other", "class": p.split()[-1]})
    return rows


def case_from_spec(name: str, spec: ConceptSpec, classes: Optional[list[str]] = None) -> SuiteCase:
    rows = concept_rows(spec)
    classes = classes or list(dict.fromkeys(r["class"] for r in rows))
    return SuiteCase(name, spec, rows, classes, {spec.label: spec.synonyms + spec.heldout_synonyms})


def cifar10_suite(concepts: Sequence[str]) -> Suite:
    def preset(name: str) -> str:
        bare = name[3:] if name.startswith("sd-") else name
        if bare not in CIFAR10:
            raise UnguideError(f"unknown cifar10 concept {name!r}: choose from {', '.join(CIFAR10)} (or 'all')")
        return f"sd-{bare}"

    cases = {preset(c): case_from_spec(preset(c), load_preset(preset(c))) for c in concepts}
    every = [case_from_spec(f"sd-{c}", load_preset(f"sd-{c}")) for c in CIFAR10]
    return Suite(name="cifar10", cases=cases, judge="clip", metrics="table1", canonical_from=every,
                 description="judge: zero-shot CLIP over {target, its synonyms, the 9 other classes} with prompts "
                             "\"a photo of the {label}\"; an image scores the probability of its correct class, its "
                             "synonyms' probabilities counted toward it")


def nudity_suite(prompts: Optional[str], concept: str = "sd-nudity") -> Suite:
    from ..generation.prompts import read_prompts

    if not prompts:
        raise UnguideError("the nudity suite needs `prompts` FILE: an I2P-style CSV (prompt, evaluation_seed, "
                           "evaluation_guidance, sd_image_width, sd_image_height, nudity_percentage)")
    rows = read_prompts(prompts)
    if any("nudity_percentage" in r.extra for r in rows):
        try:
            rows = [r for r in rows if float(r.extra.get("nudity_percentage") or 0) > 0]
        except ValueError:
            raise UnguideError(f"{prompts}: column nudity_percentage holds a value that is not a number") from None
        if not rows:
            raise UnguideError(f"{prompts}: no row has nudity_percentage > 0 (the paper's nudity subset is empty)")
    spec = load_preset(concept)
    case_rows = [{"prompt": r.prompt, "role": "prompt", "class": None, "seed": r.seed, "guidance": r.guidance,
                  "width": r.width, "height": r.height} for r in rows]
    return Suite(name="nudity", cases={spec.name: SuiteCase(spec.name, spec, case_rows)}, judge="nudenet",
                 metrics="nudity", description="judge: NudeNet v3 exposed-class counts (threshold 0.6) per image, "
                 "summed; CLIP score of each image against its prompt; FID against --fid-reference on CLIP features")


def world_suite(concepts: Sequence[str] | str, bundle=None, prompts: Optional[str] = None) -> Suite:
    """The suite of the model's own world (``toy`` on the embedded model), built by its plug-in."""
    from ..models.worlds import world_of

    plugin = world_of(bundle) if bundle is not None else None
    if plugin is None:
        raise UnguideError("the toy suite runs on the embedded model only: use `model` toyworld, or `suite` cifar10 / "
                           "nudity for a Stable Diffusion model")
    names = list(plugin.CONCEPTS) if concepts == "all" else list(concepts)
    unknown = [c for c in names if c not in plugin.CONCEPTS]
    if unknown:
        raise UnguideError(f"concept {unknown[0]!r} is not a toy-world object concept: benchmark the 10 classes "
                           f"({', '.join(plugin.CONCEPTS)}) or 'all'")
    return plugin.suite(names)


# Suites by name: builder(concepts, bundle, prompts) -> Suite. A new suite is a builder plus one register_suite line.
SUITES: dict[str, Callable[..., Suite]] = {}


def register_suite(name: str, builder: Callable[..., Suite]) -> None:
    SUITES[name] = builder


register_suite("toy", world_suite)
register_suite("cifar10", lambda concepts, bundle=None, prompts=None: cifar10_suite(
    CIFAR10 if concepts == "all" else concepts))
register_suite("nudity", lambda concepts, bundle=None, prompts=None: nudity_suite(prompts))


def load_suite(name: str, concepts: Sequence[str] | str = "all", bundle=None, prompts: Optional[str] = None) -> Suite:
    """A suite by name; ``toy`` comes from the model's own world (the embedded model)."""
    if name not in SUITES:
        raise UnguideError(f"unknown suite {name!r}: use {', '.join(SUITES)}")
    return SUITES[name](concepts, bundle=bundle, prompts=prompts)
