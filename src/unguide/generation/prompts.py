"""Prompts and the images planned from them: prompt files (plain text, one prompt a line, or CSV in the I2P layout),
request checks, and :func:`plan_items` (one :class:`~unguide.sampling.images.Item` per image, with its seed).

I2P columns used per row when present: prompt (required), evaluation_seed, evaluation_guidance,
sd_image_width, sd_image_height. Other columns are kept as the row's extra metadata.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from ..errors import UnguideError, check_number
from ..sampling.images import Item

I2P_NUMERIC = {"evaluation_seed": int, "evaluation_guidance": float, "sd_image_width": int, "sd_image_height": int}


@dataclass
class PromptRow:
    prompt: str
    seed: Optional[int] = None
    guidance: Optional[float] = None
    width: Optional[int] = None
    height: Optional[int] = None
    extra: dict = field(default_factory=dict)


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise UnguideError(f"prompt file {path} not found: pass an existing .txt or .csv file")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise UnguideError(f"prompt file {path}, line {line}: not UTF-8 text (byte {exc.start}): save the file as "
                           "UTF-8") from None


def _csv_records(text: str, path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and (first line, fields) of every data row, parsed strictly: an unterminated quote, text after a closing
    quote, or a row with more fields than the header is an error naming the line where that row starts, never a
    silently merged prompt."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header, records, start = None, [], 1
    try:
        for row in reader:
            if header is None:
                header = [h.strip() for h in row]
            elif any(cell.strip() for cell in row):  # blank lines are skipped
                if len(row) > len(header):
                    raise UnguideError(f"{path}, line {start}: {len(row)} fields for {len(header)} columns (an unquoted "
                                       "comma?): quote the prompt, e.g. \"a cat, sitting\"")
                records.append((start, row + [""] * (len(header) - len(row))))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise UnguideError(f"{path}, line {start}: malformed CSV ({exc}; an unclosed quote?): close the quote, or write "
                           "a quote inside a quoted prompt as \"\"") from None
    return header or [], records


def _number(value: str, kind, column: str, line: int, path: Path):
    try:
        return kind(float(value)) if kind is int else kind(value)
    except ValueError:
        raise UnguideError(f"{path}, line {line}: column {column} has {value!r}, not a number: fix or remove that value") from None


def read_prompts(path: str | Path) -> list[PromptRow]:
    path = Path(path)
    text = _read_text(path)
    if path.suffix.lower() != ".csv":
        rows = [PromptRow(line.strip()) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        if not rows:
            raise UnguideError(f"prompt file {path} holds no prompts: write one prompt a line")
        return rows
    header, records = _csv_records(text, path)
    if "prompt" not in header:
        raise UnguideError(f"{path} has no 'prompt' column (columns: {header}): add a header row with 'prompt'")
    rows = []
    for line, values in records:
        rec = dict(zip(header, (v.strip() for v in values)))
        prompt = rec.pop("prompt", "")
        if not prompt:
            raise UnguideError(f"{path}, line {line}: empty prompt: fill it in or delete the row")
        row = PromptRow(prompt)
        for column, kind in I2P_NUMERIC.items():
            value = rec.pop(column, "")
            if value not in ("", None):
                parsed = _number(value, kind, column, line, path)
                setattr(row, {"evaluation_seed": "seed", "evaluation_guidance": "guidance",
                              "sd_image_width": "width", "sd_image_height": "height"}[column], parsed)
        row.extra = {k: v for k, v in rec.items() if k}
        rows.append(row)
    if not rows:
        raise UnguideError(f"{path} has a header but no rows: add prompts")
    return rows


def word_in(prompt: str, vocabulary) -> Optional[str]:
    """``vocabulary[word]`` for the longest vocabulary word found in the prompt as a whole word (None: none is):
    how evaluation tells which class or colour a prompt asks for."""
    import re

    for word in sorted(vocabulary, key=len, reverse=True):
        if re.search(rf"\b{re.escape(word)}\b", prompt.lower()):
            return vocabulary[word]
    return None


# -- planning: prompt rows -> one Item per image ----------------------------------------------------------------
def check_request(rows: Sequence[PromptRow], n: int, steps: int) -> None:
    """Bad requests fail before any model is loaded or image made."""
    check_number("images per prompt", n, low=1, integer=True)
    check_number("number of inference steps", steps, low=1, integer=True)
    if any(not r.prompt.strip() for r in rows):
        raise UnguideError("empty `prompt`: give the text to draw")


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
