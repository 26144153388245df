"""Atomic file writes and safetensors-only state files.

Every file we write goes to a temporary name in the same directory and is renamed into place,
so an interruption (even kill -9) never leaves a half-written file behind.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


LOCK_FILE = ".unguide.lock"


@contextmanager
def output_lock(out: str | os.PathLike, what: str = "a job") -> Iterator[Path]:
    """Hold ``out`` for one job: a second unguide process pointed at the same folder stops with one line instead of
    interleaving its files with the first's. The lock (``flock`` on ``out/.unguide.lock``) dies with its process, so a
    killed job never leaves a stale lock. Under ``accelerate launch`` the main process takes it and tells the others
    (they share the job)."""
    import fcntl

    from accelerate import PartialState

    from .errors import UnguideError

    out, state = Path(out), PartialState()
    handle, ok = None, True
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        handle = open(out / LOCK_FILE, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            handle, ok = None, False
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        ok = broadcast_object_list([ok])[0]
    if not ok:
        raise UnguideError(f"{out} is in use by another unguide process ({what} is writing there): wait for it to "
                           "finish, or give another `out`")
    try:
        yield out
    finally:
        if handle is not None:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _unreadable(path, exc: Exception):
    from .errors import UnguideError

    if isinstance(exc, FileNotFoundError) or not Path(path).is_file():
        return UnguideError(f"{path} not found: the file is missing (rerun the command that writes it)")
    head = Path(path).read_bytes()[:2]
    kind = "a Python pickle, which unguide never loads" if head[:1] == b"\x80" or head == b"PK" else "damaged or not a safetensors file"
    return UnguideError(f"{path} is {kind} ({type(exc).__name__}): replace it with the safetensors file unguide wrote "
                        "(or rerun the command that writes it)")


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor file unguide reads comes through here (or :func:`tensor_metadata`): safetensors only, and a
    damaged, truncated or pickled file is one clear error, not a traceback."""
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types, OSError and others for a damaged file
        raise _unreadable(path, exc) from None


def tensor_metadata(path: str | os.PathLike) -> dict[str, str]:
    """A safetensors file's header metadata, checked like :func:`load_tensors`."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:
        raise _unreadable(path, exc) from None


def optimizer_tensors(opt: torch.optim.Optimizer, prefix: str = "opt.") -> dict[str, torch.Tensor]:
    """Flatten an optimizer's per-parameter state into safetensors-storable tensors."""
    out = {}
    for idx, state in opt.state_dict()["state"].items():
        for name, value in state.items():
            out[f"{prefix}{idx}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return out


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], prefix: str = "opt.") -> None:
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            idx, name = key[len(prefix):].split(".", 1)
            state.setdefault(int(idx), {})[name] = value
    sd["state"] = state
    opt.load_state_dict(sd)
