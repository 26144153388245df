#!/usr/bin/env bash
# Same-figures check for a refactoring: the toy benchmark (sun, star, boat; base, selective, selective-image,
# unguide; 8 seeds), `generate` in three configurations and `attack` on sun, written under OUT by the code in SRC.
# Run it on the old and the new code (one at a time: heavy), then `python scripts/compare_figures.py OLD NEW`.
#   bash scripts/same_figures.sh SRC OUT        (SRC: a checkout's src/ folder, e.g. a git worktree of the old commit)
# Erasures use 40 iterations (what is compared is the code path, not the quality; the figures stay comparable).
set -euo pipefail
SRC=$(cd "$1" && pwd); OUT=$2
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONPATH="$SRC"
U() { .venv/bin/python -m unguide.cli "$@"; }
U benchmark --concepts sun,star,boat --methods base,selective,selective-image,unguide --samples 8 --iterations 40 \
  --out "$OUT/bench" | tee "$OUT/bench.txt"
P=(--prompt "a photo of the sun" --prompt "a photo of the sunburst" --prompt "a photo of the boat" --prompt "a photo of the moon")
U generate "${P[@]}" --n 4 --out "$OUT/gen_base"
U generate "${P[@]}" --n 4 --erasure "$OUT/bench/runs/sun/selective" --out "$OUT/gen_selective_default"
U generate "${P[@]}" --n 4 --erasure "$OUT/bench/runs/sun/selective" --gate calibrated+image --out "$OUT/gen_selective_both"
U generate "${P[@]}" --n 4 --erasure "$OUT/bench/runs/sun/object" --out "$OUT/gen_paper"
U attack --benchmark "$OUT/bench" --concepts sun --methods base,selective,selective-image,unguide --candidates 48 \
  --pairs 4 --inversion-steps 10 --samples 4 --out "$OUT/attack" | tee "$OUT/attack.txt"
