"""Labelled image grids for the reports: a few images of each (folder, prompt) cell, row and column labels legible
at 100% zoom on the report page."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from ..generation.folders import make_grid
from ..io import atomic_path

GRID_SAMPLES = 4  # images per cell


def save_labelled_grid(target: Path, cells: list[tuple[Path, str]], ncol: int, row_labels: list[str],
                       col_labels: list[str]) -> Path:
    """Up to GRID_SAMPLES images of each (folder, prompt) cell, row-major with ncol cells a row; white where images
    are missing; labelled."""
    from .evaluate import read_index

    tiles, size, indexes = [], None, {}
    for folder, prompt in cells:
        index = indexes.setdefault(folder, read_index(folder))
        files = [r["file"] for r in index if r["prompt"] == prompt][:GRID_SAMPLES]
        for f in files:
            tiles.append(np.asarray(Image.open(folder / f).convert("RGB")))
            size = size or tiles[-1].shape
        tiles += [None] * (GRID_SAMPLES - len(files))
    size = size or (32, 32, 3)
    tiles = [t if t is not None and t.shape == size else np.full(size, 255, np.uint8) for t in tiles]
    grid = make_grid(tiles, ncol=GRID_SAMPLES * ncol, scale=max(1, 96 // size[1]))
    with atomic_path(target) as tmp:
        label_grid(grid, row_labels, col_labels).save(tmp, format="PNG")
    return target


LABEL_SCREEN_WIDTH = 1200  # px: the report page's width (report.html's body); grids wider are shown shrunk to it
LABEL_SCREEN_SIZE = 15  # px: the labels' size on that page at 100% zoom (at least 14 px in the PNG itself)


def _label_font_size(width: int) -> int:
    """Label size in PNG pixels for a picture ``width`` px wide, so that shrunk to the page the text is still
    LABEL_SCREEN_SIZE px tall."""
    return max(14, round(LABEL_SCREEN_SIZE * width / LABEL_SCREEN_WIDTH))


def _wrap(font, text: str, width: float, breaks: str = " ") -> list[str]:
    """Greedy line breaking of ``text`` at ``breaks`` (a space is dropped at a break, '-' or '+' stays)."""
    tokens = [t for t in re.split("([" + re.escape(breaks) + "])", text) if t]
    words, word = [], ""
    for t in tokens:  # glue each separator to the word before it
        word += t
        if t in breaks:
            words.append(word)
            word = ""
    words += [word] if word else []
    lines, line = [], ""
    for w in words:
        if line and font.getlength((line + w).rstrip()) > width:
            lines.append(line.rstrip())
            line = ""
        line += w
    return lines + [line.rstrip()] if line.strip() else lines


def _fit_width(font, text: str, max_lines: int, max_width: float, breaks: str = " ") -> float:
    """The narrowest width (at most ``max_width``) at which ``text`` wraps into ``max_lines`` lines or fewer."""
    ends = [j for j in range(1, len(text) + 1) if j == len(text) or text[j - 1] in breaks]
    starts = [0] + ends[:-1]  # a line starts after a break and ends at one (or at the end)
    for width in sorted({font.getlength(text[i:j].strip()) for i in starts for j in ends if j > i}):
        if width > max_width:
            break
        if len(_wrap(font, text, width, breaks)) <= max_lines:
            return width
    return max_width


def _lines(font, text: str, width: float, max_lines: int, breaks: str = " ") -> list[str]:
    """``text`` wrapped at ``width``; past ``max_lines`` lines, or wider than ``width``, cut with '…'."""
    lines = _wrap(font, text, width, breaks) or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] += "…"
    while font.getlength(lines[-1]) > width and len(lines[-1]) > 1:
        lines[-1] = lines[-1][:-2] + "…"
    return lines


def label_grid(grid: Image.Image, row_labels: list[str], col_labels: list[str]) -> Image.Image:
    """Prompts down the left, methods across the top, so the picture reads without the caption. The font grows
    with the picture (:func:`_label_font_size`), so that the labels stay legible where the page shows the grid
    shrunk to its width; labels wrap (prompts within their row's height, methods within their column) and the
    margins follow the text."""
    from PIL import ImageDraw, ImageFont

    row_h, col_w = grid.height / len(row_labels), grid.width / len(col_labels)
    size = _label_font_size(grid.width)
    for _ in range(3):  # the left margin widens the picture, which enlarges the font: settle in a few steps
        font = ImageFont.load_default(size=size)
        line_h = round(1.2 * size)
        max_lines = max(1, int(row_h // line_h))
        width = max(_fit_width(font, t, max_lines, max(grid.width / 4, 12 * size)) for t in row_labels)
        rows = [_lines(font, t, width, max_lines) for t in row_labels]
        left = 2 * 6 + max(int(font.getlength(line)) for lines in rows for line in lines)
        new_size = _label_font_size(grid.width + left)
        if new_size <= size:
            break
        size = new_size
    cols = [_lines(font, t, col_w - 8, 3, breaks=" -+") for t in col_labels]
    top = line_h * max(len(lines) for lines in cols) + size // 2
    canvas = Image.new("RGB", (grid.width + left, grid.height + top), "white")
    canvas.paste(grid, (left, top))
    draw = ImageDraw.Draw(canvas)
    for i, lines in enumerate(rows):
        draw.multiline_text((6, top + (i + 0.5) * row_h), "\n".join(lines), fill="black", font=font, anchor="lm",
                            spacing=line_h - size)
    for j, lines in enumerate(cols):
        draw.multiline_text((left + (j + 0.5) * col_w, top / 2), "\n".join(lines), fill="black", font=font,
                            anchor="mm", align="center", spacing=line_h - size)
        if j:
            draw.line([(left + j * col_w, 0), (left + j * col_w, canvas.height)], fill="#888", width=2)
    return canvas
