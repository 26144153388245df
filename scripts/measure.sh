#!/usr/bin/env bash
# The measurements behind the closing notes, in order. Long: run in the background.
#   bash scripts/measure.sh [OUT]      (default OUT=work/measure)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-work/measure}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1
U=.venv/bin/unguide
# issue 2: base-model quality per class and for held-out synonyms; seconds per image at batch 32
$U toy-quality --samples 32 --out "$OUT/toy_quality.json" | tee "$OUT/toy_quality.txt"
# issues 3 and 4: three concepts, all methods, 32 samples per prompt (trains the missing erasure runs)
$U benchmark --concepts sun,boat,house --methods base,lora,unguide,full --samples 32 --out "$OUT/bench" | tee "$OUT/bench3.txt"
cp "$OUT/bench/report.json" "$OUT/bench/3class_report.json"
# issue 4: fast vs reference scorer on >= 100 prompts, cost per image, wall-clock ratio
$U benchmark-scorer --erasure "$OUT/bench/runs/sun/object" --out "$OUT/scorer_sun.json" | tee "$OUT/scorer_sun.txt"
# issue 3: the attribute concept (explicit preset) and its colour rates before/after
$U erase --concept red --out "$OUT/runs/red" | tee "$OUT/red_erase.txt"
python3 - "$OUT" <<'PY'
import sys
objs = "sun moon star heart house tree fish flower boat umbrella".split()
open(f"{sys.argv[1]}/red_prompts.txt", "w").write("".join(f"a photo of a red {o}\n" for o in objs) + "".join(f"a photo of a blue {o}\n" for o in objs))
PY
for mode in base lora unguide; do
  $U generate --prompts "$OUT/red_prompts.txt" --n 16 --erasure "$OUT/runs/red" --mode $mode --out "$OUT/red_$mode" > /dev/null
  $U evaluate --images "$OUT/red_$mode" ${mode:+--reference "$OUT/red_base"} > "$OUT/red_$mode.eval.txt"
done
# issue 5: all 10 classes (reuses the three concepts' runs and images above); about 60 CPU-minutes more
$U benchmark --concepts all --methods base,lora,unguide,full --samples 32 --out "$OUT/bench" | tee "$OUT/benchall.txt"
