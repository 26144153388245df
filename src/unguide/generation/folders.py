"""Generation into a folder (``unguide generate``, benchmarks, attacks): PNGs with metadata, an index and grids;
resumable and splittable across processes (``accelerate launch``) with per-image seeds."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from ..errors import UnguideError, check_number
from ..sampling.images import Item, PlainGuide, item_metadata, sample_images, save_grid, save_png, write_index
from ..io import output_lock, write_json
from .prompts import PromptRow


def plan_items(rows: Sequence[PromptRow], n: int, seed: int, guidance: float, height: int, width: int) -> list[Item]:
    """Image j of row i: seed (row's evaluation_seed, else --seed) + j; the row's guidance and size when given."""
    items = []
    for i, row in enumerate(rows):
        base_seed = row.seed if row.seed is not None else seed
        for j in range(n):
            items.append(Item(prompt=row.prompt, seed=base_seed + j, guidance=row.guidance if row.guidance is not None else guidance,
                              height=row.height or height, width=row.width or width, prompt_index=i, sample_index=j,
                              extra={"row": row.extra} if row.extra else {}))
    return items


def run_generation(bundle, items: Sequence[Item], out: str | Path, steps: int = 50, guide=None, batch_size: int = 32,
                   run_info: Optional[dict] = None, grid_rows: int = 16, progress: bool = True) -> Path:
    """Generate the items not yet on disk into ``out``; this process's share when under accelerate. One job at a
    time per folder (:func:`unguide.io.output_lock`)."""
    with output_lock(out, "a generation"):
        return _run_generation(bundle, items, Path(out), steps, guide, batch_size, run_info, grid_rows, progress)


def _run_generation(bundle, items, out: Path, steps, guide, batch_size, run_info, grid_rows, progress) -> Path:
    from accelerate import PartialState

    state = PartialState()
    guide = guide or PlainGuide()
    out.mkdir(parents=True, exist_ok=True)
    mine = list(items)[state.process_index::state.num_processes]
    todo = [it for it in mine if not (out / it.filename).exists()]
    if state.is_main_process and run_info is not None:
        write_json(out / "run.json", run_info)
    extra = {"guide": guide.name, **{k: run_info[k] for k in ("erasure", "dtype") if run_info and run_info.get(k)}}

    def save(batch, imgs, infos):
        for it, img, info in zip(batch, imgs, infos):
            save_png(out / it.filename, img, item_metadata(it, steps, bundle.name, info, extra))

    if todo:
        sample_images(bundle, todo, steps=steps, guide=guide, batch_size=batch_size, progress=progress and state.is_main_process,
                      on_batch=save)
    state.wait_for_everyone()
    if state.is_main_process:
        write_index(out)
        _write_grid(out, items, grid_rows)
    return out


def _write_grid(out: Path, items: Sequence[Item], grid_rows: int) -> None:
    import numpy as np
    from PIL import Image

    n = max(it.sample_index for it in items) + 1
    shown = [it for it in items if it.prompt_index < grid_rows]
    sizes = {(it.height, it.width) for it in shown}
    if len(sizes) != 1:
        return  # mixed sizes: no grid
    h, w = sizes.pop()
    blank = np.full((h, w, 3), 255, np.uint8)
    tiles = [np.asarray(Image.open(out / it.filename).convert("RGB")) if (out / it.filename).exists() else blank for it in shown]
    save_grid(out / "grid.png", tiles, ncol=n, scale=max(1, 128 // w))


def check_request(rows: Sequence[PromptRow], n: int, steps: int) -> None:
    """Bad requests fail before any model is loaded or image made."""
    check_number("images per prompt", n, low=1, integer=True)
    check_number("number of inference steps", steps, low=1, integer=True)
    if any(not r.prompt.strip() for r in rows):
        raise UnguideError("empty `prompt`: give the text to draw")
