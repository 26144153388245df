"""A stored erasure run, typed and versioned: one concept (:class:`ErasureRun`, ``erasure.json``) or several erased at
once (:class:`GroupRun`, ``group.json`` over member runs). Whether a folder holds one or the other is decided here
(:func:`load_run`) and nowhere else: both answer ``members`` (a single run is its own only member), ``guide`` and
``name``, so callers never ask which they hold.

    RUN/erasure.json   {"version": 2, "status": "finished", "concept": ..., "config": ..., "anchors": ...,
                        "calibration": {"prompt": ..., "image": ...}, "defaults": {"gate", "keep", "erase_with"}, ...}
    GROUP/group.json   {"version": 2, "status": "finished", "concepts": [...], "members": {name: relative path}, ...}

Version 1 runs (before 2026-12-06) kept calibration and recipe defaults mixed in one ``gate`` entry; they load as
version 2 (:meth:`ErasureRun.from_json`).
"""
from __future__ import annotations

import json
import logging
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import UnguideError
from ..guidance.config import Calibration, GateDefaults, GuidanceConfig
from ..guidance.group import group_guide
from ..guidance.unguidance import guide_for_run
from .adapters import LORA_FILE, AdapterConfig, GroupAdapter, load_adapter

METADATA_FILE = "erasure.json"
GROUP_FILE = "group.json"
RUN_VERSION = 2
LOG = logging.getLogger("unguide")
DEFAULT_KEYS = {"default": "gate", "keep": "keep", "erase_with": "erase_with"}  # version 1 names -> GateDefaults


@dataclass(frozen=True)
class ErasureRun:
    """One concept's finished run: what was erased (``concept``, a ConceptSpec's dict), how (``config``, the
    EraseConfig's), on which base model, the gates' ``calibration`` and the recipe's ``defaults``."""

    concept: dict
    config: dict
    anchors: list
    base_model: str
    base_fingerprint: str
    calibration: Calibration
    defaults: GateDefaults
    weights: str = LORA_FILE
    base_family: Optional[str] = None
    lora_loads_with: Optional[str] = None
    dtype: str = "float32"
    losses: list = field(default_factory=list)
    final_loss: Optional[float] = None
    train_seconds_this_process: Optional[float] = None
    # what this process spent: {"train_seconds", "train_evals", "calibration_seconds", "calibration_evals"} (UNet
    # image-evaluations: batch rows through the denoiser); a resumed run counts only what it did after resuming
    cost: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    path: Optional[Path] = field(default=None, compare=False)
    version: int = RUN_VERSION  # as stored (1: read from the old layout); always written as RUN_VERSION
    is_group = False  # a class attribute: answered here, never tested elsewhere

    @property
    def name(self) -> str:
        return self.concept.get("name") or "concept"

    @property
    def preset(self) -> str:
        return self.config["preset"]

    @property
    def members(self) -> dict[str, "ErasureRun"]:
        return {self.name: self}

    def guide(self, adapter, config: Optional[GuidanceConfig] = None):
        return guide_for_run(adapter, self, config or GuidanceConfig())

    def adapter_config(self) -> AdapterConfig:
        cfg = self.config
        return AdapterConfig(cfg["preset"], cfg["rank"], cfg["alpha"], cfg.get("a_init", "gaussian"))

    def prompt_gate_stale(self, bundle) -> bool:
        """Whether the calibrated prompt gate was measured in other units than today's: version 1 runs scored a
        v-prediction model's influence on v, not on the noise it stands for."""
        return self.version < 2 and bundle.prediction.kind != "epsilon" and bool(self.calibration.prompt.get("threshold"))

    def attach(self, bundle, name: Optional[str] = None):
        """This run's adapter on the bundle's UNet (peft adapter ``name``), refusing a run of another base model."""
        if self.base_fingerprint != bundle.fingerprint():
            raise UnguideError(f"erasure run {self.path} was trained on another base model ({self.base_model}, "
                               f"fingerprint {self.base_fingerprint}) than {bundle.name}: use `model` {self.base_model} "
                               "or retrain")
        if self.prompt_gate_stale(bundle):
            LOG.warning(f"erasure run {self.path} was calibrated before unguide read v-prediction outputs as noise: its "
                        "calibrated prompt gate's threshold is in other units; rerun the same `unguide erase` command "
                        "to recalibrate it (nothing is retrained; the image gate and the empty-prompt gate are unaffected)")
        return load_adapter(bundle.unet, self.path, self.adapter_config(), **({"name": name} if name else {}))

    def to_json(self) -> dict:
        out = {**asdict(self), "version": RUN_VERSION, "status": "finished"}
        out.pop("path")
        out["calibration"] = {"prompt": self.calibration.prompt, "image": self.calibration.image}
        return out

    @classmethod
    def from_json(cls, meta: dict, path: Optional[Path] = None) -> "ErasureRun":
        """A run as stored, version 1 (one ``gate`` entry) or 2."""
        meta = dict(meta)
        meta.pop("status", None)
        version = meta.pop("version", 1)
        if version < 2:
            gate = dict(meta.pop("gate", None) or {})
            defaults = {new: gate.pop(old) for old, new in DEFAULT_KEYS.items() if old in gate}
            meta["calibration"] = {"image": gate.pop("image", None), "prompt": gate}
            meta["defaults"] = defaults
        known = set(cls.__dataclass_fields__) - {"path", "version", "calibration", "defaults"}
        kept = {k: v for k, v in meta.items() if k in known}
        return cls(**kept, calibration=Calibration(**meta["calibration"]), defaults=GateDefaults(**meta["defaults"]),
                   path=path, version=version)


@dataclass(frozen=True)
class GroupRun:
    """Several concepts erased at once: ordinary single runs (each with its own adapter, gates and calibration)."""

    members: dict
    base_model: str
    base_fingerprint: str
    base_family: Optional[str] = None
    path: Optional[Path] = field(default=None, compare=False)
    is_group = True

    @property
    def name(self) -> str:
        return "+".join(self.members)

    @property
    def preset(self) -> str:
        return next(iter(self.members.values())).preset

    def guide(self, adapter, config: Optional[GuidanceConfig] = None):
        return group_guide(adapter, self, config or GuidanceConfig())

    def attach(self, bundle) -> GroupAdapter:
        """Every member's LoRA on the bundle's UNet, each under its own peft name (any subset can be switched on)."""
        adapters = {}
        try:
            for i, (name, member) in enumerate(self.members.items()):
                if member.preset == "full":
                    raise UnguideError(f"group member {member.path} is a full fine-tune: a group holds LoRA runs only")
                with warnings.catch_warnings():  # peft warns that a second adapter joins the first: that is the point
                    warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                    adapters[name] = member.attach(bundle, name=f"erasure_{i}")
        except Exception:
            if adapters:
                bundle.unet.unload_lora()
            raise
        return GroupAdapter(bundle.unet, adapters)


def is_group(run_dir: str | Path) -> bool:
    return (Path(run_dir) / GROUP_FILE).is_file()


def read_run(run_dir: str | Path) -> ErasureRun:
    """A finished single run, with clear errors for anything else."""
    run_dir = Path(run_dir)
    meta_path = run_dir / METADATA_FILE
    if not run_dir.is_dir():
        raise UnguideError(f"erasure run {run_dir} not found: pass the `out` directory of `unguide erase`")
    if not meta_path.is_file():
        raise UnguideError(f"{run_dir} is not a finished erasure run (no {METADATA_FILE}): rerun `unguide erase` to finish it")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        raise UnguideError(f"{meta_path} is not valid JSON: the run directory is damaged, rerun `unguide erase`") from None
    if meta.get("status") != "finished" or not (run_dir / meta.get("weights", LORA_FILE)).is_file():
        raise UnguideError(f"{run_dir} is not a finished erasure run: rerun `unguide erase` to finish it")
    return ErasureRun.from_json(meta, run_dir)


def read_group_file(run_dir: str | Path) -> dict:
    path = Path(run_dir) / GROUP_FILE
    try:
        group = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise UnguideError(f"{path} is not a readable group file: rerun `unguide erase` with the same concepts") from None
    if group.get("status") != "finished" or not group.get("concepts"):
        raise UnguideError(f"{run_dir} is not a finished group run: rerun `unguide erase` with the same concepts")
    return group


def load_run(run_dir: str | Path) -> ErasureRun | GroupRun:
    """The finished run in ``run_dir``, one concept or a group: the one place that tells them apart."""
    if not is_group(run_dir):
        return read_run(run_dir)
    group = read_group_file(run_dir)
    members = {n: read_run(Path(run_dir) / group["members"][n]) for n in group["concepts"]}
    return GroupRun(members, group["base_model"], group["base_fingerprint"], group.get("base_family"), Path(run_dir))
