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

import json
import warnings
from pathlib import Path
from typing import Sequence

from .adapters import AdapterConfig, GroupAdapter, load_adapter
from .concepts import ConceptSpec
from .training import EraseConfig, attach_erasure, erase, read_run
from ..errors import UnguideError
from ..io import write_json

GROUP_FILE = "group.json"


def is_group(run_dir: str | Path) -> bool:
    return (Path(run_dir) / GROUP_FILE).is_file()


def erase_group(bundle, specs: Sequence[ConceptSpec], out: str | Path, configs: Sequence[EraseConfig],
                progress: bool = True) -> dict:
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


def write_group(out: str | Path, members: dict[str, str | Path], bundle) -> dict:
    """``out/group.json`` over finished member runs (folders anywhere; stored relative to ``out``)."""
    import os

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, run in members.items():
        read_run(run)  # finished, or one clear error
    meta = {"status": "finished", "concepts": list(members),
            "members": {n: os.path.relpath(Path(run).resolve(), out.resolve()) for n, run in members.items()},
            "base_model": bundle.name, "base_fingerprint": bundle.fingerprint(), "base_family": bundle.family.name}
    write_json(out / GROUP_FILE, meta)
    return meta


def read_group(run_dir: str | Path) -> dict:
    path = Path(run_dir) / GROUP_FILE
    try:
        group = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise UnguideError(f"{path} is not a readable group file: rerun `unguide erase` with the same concepts") from None
    if group.get("status") != "finished" or not group.get("concepts"):
        raise UnguideError(f"{run_dir} is not a finished group run: rerun `unguide erase` with the same concepts")
    return group


def attach(bundle, run_dir: str | Path):
    """A finished run (single or group) attached to the bundle's UNet: (adapter, metadata). A group's metadata holds
    each member's erasure.json under ``members``; its adapter is a :class:`GroupAdapter`."""
    if not is_group(run_dir):
        return attach_erasure(bundle, run_dir)
    group = read_group(run_dir)
    metas, adapters = {}, {}
    try:
        for i, name in enumerate(group["concepts"]):
            member = Path(run_dir) / group["members"][name]
            meta = read_run(member)
            if meta["base_fingerprint"] != bundle.fingerprint():
                raise UnguideError(f"group member {member} was trained on another base model ({meta['base_model']}): "
                                   f"use `model` {meta['base_model']} or retrain")
            cfg = meta["config"]
            if cfg["preset"] == "full":
                raise UnguideError(f"group member {member} is a full fine-tune: a group holds LoRA runs only")
            with warnings.catch_warnings():  # peft warns that a second adapter joins the first: that is the point
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                adapters[name] = load_adapter(bundle.unet, member, AdapterConfig(cfg["preset"], cfg["rank"], cfg["alpha"],
                                                                                 cfg.get("a_init", "gaussian")),
                                              name=f"erasure_{i}")
            metas[name] = meta
    except Exception:
        if adapters:
            bundle.unet.unload_lora()
        raise
    first = next(iter(metas.values()))
    meta = {"group": group["concepts"], "members": metas, "concept": {"name": "+".join(group["concepts"])},
            "config": {"preset": first["config"]["preset"]}, "base_model": group["base_model"],
            "base_fingerprint": group["base_fingerprint"]}
    return GroupAdapter(bundle.unet, adapters), meta
