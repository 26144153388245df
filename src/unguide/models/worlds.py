"""Worlds: models that come with a world of their own (the embedded toy model) ship a plug-in beside them.

A plug-in is a module that names its world (``NAME``), the file that marks a model directory as its own
(``MARKER``), where its default model lies (``default_model_dir()``), how to load such a directory
(``load_bundle(path)``), and what the rest of unguide may ask of it: its judges (``JUDGES``: judge name -> class), its
benchmark suite (``suite(concepts)``), prompt sets (``decision_prompts``, ``concept_images``) and commands
(``train``, ``quality``). Plug-ins are found through the ``unguide.worlds`` entry-point group (pyproject.toml), or
registered at run time with :func:`register_world`, so no library module imports a world: the toy world sits at the
edge of the package and Stable Diffusion never needs it.
"""
from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Optional

from ..errors import UnguideError

GROUP = "unguide.worlds"
_WORLDS: dict[str, object] = {}
_discovered = False


def register_world(plugin) -> None:
    """Make a world plug-in (a module or an object with the attributes above) known under its ``NAME``."""
    _WORLDS[str(plugin.NAME)] = plugin


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    for ep in entry_points(group=GROUP):
        if ep.name not in _WORLDS:
            register_world(ep.load())


def world_names() -> list[str]:
    _discover()
    return sorted(_WORLDS)


def get_world(name: str):
    """The plug-in of a named world; an unknown name is a clear error (the installed worlds listed)."""
    _discover()
    if name not in _WORLDS:
        raise UnguideError(f"no world named {name!r} is installed (known: {', '.join(sorted(_WORLDS)) or 'none'}): "
                           "reinstall unguide (`pip install -e .`) so its entry points are registered")
    return _WORLDS[name]


def world_of(bundle) -> Optional[ModuleType]:
    """The plug-in of the world a loaded model was trained on, or None for a model from outside (Stable Diffusion)."""
    name = (bundle.info or {}).get("world")
    return get_world(name) if name else None


def world_for_directory(path: Path):
    """The plug-in whose marker file the directory holds, or None."""
    _discover()
    for plugin in _WORLDS.values():
        if (Path(path) / plugin.MARKER).is_file():
            return plugin
    return None


def world_judge_names() -> list[str]:
    _discover()
    return [name for plugin in _WORLDS.values() for name in getattr(plugin, "JUDGES", {})]


def judge_class(name: str):
    """A judge a world ships (the toy classifier's "toy"), or None."""
    _discover()
    for plugin in _WORLDS.values():
        if name in getattr(plugin, "JUDGES", {}):
            return plugin.JUDGES[name]
    return None
