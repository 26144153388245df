"""Compare two outputs of scripts/same_figures.sh (old code, new code): every PNG pixel for pixel, every adapter tensor,
and every figure of the benchmark's and the attack's report.json (timings left out).

    python scripts/compare_figures.py OLD NEW        exit 0 when all is identical, 1 otherwise (each difference listed)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.numpy import load_file

TIMING = ("seconds", "time", "timings", "wall", "per_image", "train_seconds", "versions", "path", "out", "started", "finished",
          "request", "date")


def _figures(value, prefix=""):
    """Flatten a JSON value to {path: leaf}, leaving out timings and paths (they differ between any two runs)."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if any(t in str(k) for t in TIMING):
                continue
            out.update(_figures(v, f"{prefix}/{k}"))
        return out
    if isinstance(value, list):
        out = {}
        for i, v in enumerate(value):
            out.update(_figures(v, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def compare(old: Path, new: Path) -> list[str]:
    problems, counts = [], {"png": 0, "adapter": 0, "figures": 0}
    for a in sorted(old.rglob("*.png")):
        b = new / a.relative_to(old)
        if not b.exists():
            problems.append(f"missing in new: {b.relative_to(new)}")
            continue
        counts["png"] += 1
        if not np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))):
            problems.append(f"pixels differ: {a.relative_to(old)}")
    for a in sorted(old.rglob("*.safetensors")):
        b = new / a.relative_to(old)
        if not b.exists():
            problems.append(f"missing in new: {b.relative_to(new)}")
            continue
        ta, tb = load_file(str(a)), load_file(str(b))
        counts["adapter"] += 1
        if ta.keys() != tb.keys() or not all(np.array_equal(ta[k], tb[k]) for k in ta):
            problems.append(f"tensors differ: {a.relative_to(old)}")
    for name in ("bench/report.json", "attack/report.json"):
        if not (old / name).exists():
            continue
        fa, fb = (_figures(json.loads((d / name).read_text())) for d in (old, new))
        counts["figures"] += len(fa)
        for key in sorted(set(fa) | set(fb)):
            if fa.get(key) != fb.get(key):
                problems.append(f"{name}{key}: {fa.get(key)!r} -> {fb.get(key)!r}")
    print(f"compared {counts['png']} PNGs, {counts['adapter']} adapter files, {counts['figures']} report figures")
    return problems


if __name__ == "__main__":
    found = compare(Path(sys.argv[1]), Path(sys.argv[2]))
    for line in found:
        print(line)
    print("identical" if not found else f"{len(found)} differences")
    sys.exit(1 if found else 0)
