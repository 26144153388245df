"""``toyworld-flow`` as a model name: the toy world's second embedded model (an MMDiT trained by rectified flow).

It is the same world (its images are judged, benchmarked and attacked through :mod:`unguide.toyworld.plugin`, which a
loaded model names in ``info["world"]``); this plug-in only tells the loader where the flow model lies and how its
directory loads.
"""
from __future__ import annotations

from pathlib import Path

from . import model

NAME = "toyworld-flow"
MARKER = model.FLOW_MARKER


def default_model_dir() -> Path:
    return model.default_model_dir(model.FLOW_WEIGHTS_DIR, "reinstall unguide, or train them: `unguide train-toy "
                                   "--stage mmdit --out work/flowtrain`, then copy work/flowtrain/toyworld-flow there")


def load_bundle(path: Path):
    return model.load_flow_bundle(path)
