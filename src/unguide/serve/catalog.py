"""Which erasure runs a server offers, by name: the page sends a name, never a path.

A run's name is its folder relative to the runs directory (``sun/selective``). Names are looked up in a listing made
on the server; anything not in it (``../etc``, an absolute path, a typo) is refused before the filesystem is touched.
Symbolic links are not followed, so a link inside the runs directory cannot lead outside it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..erasure.runs import GROUP_FILE, METADATA_FILE
from ..errors import UnguideError

MAX_DEPTH = 3  # runs/<concept>/<method> as the demo and benchmark write them, plus one level of grouping


@dataclass(frozen=True)
class RunEntry:
    name: str
    path: Path
    concept: str
    recipe: str  # "group" for a group run
    model: str


class RunCatalog:
    """The finished runs under ``root`` (listed again on every :meth:`refresh`)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        self._runs: dict[str, RunEntry] = {}
        self.refresh()

    def refresh(self) -> list[str]:
        runs = {}
        if self.root.is_dir():
            for folder, dirs, files in os.walk(self.root):  # followlinks=False: links are never entered
                here = Path(folder)
                depth = len(here.relative_to(self.root).parts)
                dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (here / d).is_symlink())
                if depth >= MAX_DEPTH:
                    dirs[:] = []
                entry = _entry(self.root, here, files)
                if entry is not None:
                    runs[entry.name] = entry
                    if entry.recipe == "group":
                        dirs[:] = []  # its members are offered through the group
        self._runs = runs
        return self.names()

    def names(self) -> list[str]:
        return sorted(self._runs)

    def get(self, name: Optional[str]) -> RunEntry:
        """The entry for a listed name; one clear error for anything else."""
        if not name:
            raise UnguideError("no erasure run chosen: pick one from the list (or erase a concept first)")
        entry = self._runs.get(str(name))
        if entry is None:
            self.refresh()  # a run finished since the page was loaded
            entry = self._runs.get(str(name))
        if entry is None:
            shown = str(name)[:80]
            raise UnguideError(f"unknown run {shown!r}: choose one of the listed runs "
                               f"({', '.join(self.names()) or 'none yet'})")
        return entry

    def new_run_path(self, name: str) -> Path:
        """Where a run the server trains goes; ``name`` is made by the server from a preset name and a recipe."""
        path = (self.root / name).resolve()
        if self.root not in path.parents:
            raise UnguideError(f"run name {name!r} leaves the runs directory")
        return path


def _entry(root: Path, folder: Path, files: list[str]) -> Optional[RunEntry]:
    name = folder.relative_to(root).as_posix()
    if name == ".":
        return None
    for meta_file, kind in ((GROUP_FILE, "group"), (METADATA_FILE, "single")):
        if meta_file not in files:
            continue
        try:
            meta = json.loads((folder / meta_file).read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if meta.get("status") != "finished":
            return None
        if kind == "group":
            return RunEntry(name, folder, "+".join(meta.get("concepts", [])), "group", str(meta.get("base_model")))
        return RunEntry(name, folder, str(meta.get("concept", {}).get("name", name)),
                        str(meta.get("config", {}).get("recipe", "reference")), str(meta.get("base_model")))
    return None
