"""Several concepts erased at once: a group run is a folder of ordinary single-concept runs plus ``group.json``.

    RUN/group.json      {"status": "finished", "concepts": ["sun", "star", "boat"], ...}
    RUN/sun/            an ordinary `unguide erase --concept sun` run (adapter, erasure.json, both gates)
    RUN/star/ ...

One adapter per concept, not one shared adapter: each member is erased, gated and calibrated exactly as it would be
alone (the single-concept path is the k = 1 case, bit for bit), a member can be added or retrained without touching
the others, and at generation each concept's gate decides for its own concept and only the flagged concepts'
adapters draw the prompt (:class:`~unguide.guidance.group.GroupGuide`). The measurement behind the choice is in
docs/findings-toyworld.md ("Several concepts at once").
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .concepts import ConceptSpec
from .runs import GROUP_FILE, RUN_VERSION, GroupRun, load_run, read_run
from .training import EraseConfig, erase
from ..errors import UnguideError
from ..io import write_json


def erase_group(bundle, specs: Sequence[ConceptSpec], out: str | Path, configs: Sequence[EraseConfig],
                progress: bool = True) -> GroupRun:
    """Erase each concept into ``out/<name>`` (each resumable on its own), then write ``group.json``."""
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise UnguideError(f"a concept is named twice in the group {names}: name each once")
    if any(c.preset == "full" for c in configs):
        raise UnguideError("a group erases with LoRA adapters (one per concept): use `preset` object or explicit")
    out = Path(out)
    for spec, cfg in zip(specs, configs):
        erase(bundle, spec, out / spec.name, cfg, progress=progress)
    return write_group(out, {n: out / n for n in names}, bundle)


def write_group(out: str | Path, members: dict[str, str | Path], bundle) -> GroupRun:
    """``out/group.json`` over finished member runs (folders anywhere; stored relative to ``out``)."""
    import os

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, run in members.items():
        read_run(run)  # finished, or one clear error
    meta = {"version": RUN_VERSION, "status": "finished", "concepts": list(members),
            "members": {n: os.path.relpath(Path(run).resolve(), out.resolve()) for n, run in members.items()},
            "base_model": bundle.name, "base_fingerprint": bundle.fingerprint(), "base_family": bundle.family.name}
    write_json(out / GROUP_FILE, meta)
    return load_run(out)
