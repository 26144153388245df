#!/usr/bin/env bash
# The figures of the flow-matching issue on the embedded models, one heavy job after the other (2 CPU cores):
#   quality of toyworld-flow beside toyworld; the benchmark on toyworld-flow (the default method first, then the
#   paper's recipe, ESD-x's analogue and the other selective modes); the attack on sun, star, boat.
# Usage: scripts/toyworld_flow_figures.sh OUT   (a rerun resumes: finished runs and images are kept)
set -euo pipefail
OUT=${1:-work/flow-figures}
U=${UNGUIDE:-.venv/bin/unguide}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1
$U toy-quality --model toyworld --beside toyworld-flow --samples 32 --out "$OUT/quality.json" | tee "$OUT/quality.txt"
$U benchmark --model toyworld-flow --concepts all --samples 16 --methods base,selective,selective-image \
  --out "$OUT/bench" | tee "$OUT/bench-default.txt"
$U attack --model toyworld-flow --benchmark "$OUT/bench" --concepts sun,star,boat --methods selective,selective-image \
  | tee "$OUT/attack.txt"
$U benchmark --model toyworld-flow --concepts all --samples 16 \
  --methods base,lora,unguide,full,selective,selective-unguide,selective-image --out "$OUT/bench" \
  | tee "$OUT/bench-all.txt"
