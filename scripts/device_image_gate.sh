#!/usr/bin/env bash
# One-call GPU job (the device tool): the toy benchmark of issue 23 at 32 seeds on every class, erasures included.
# Carry: .whl (diffusers 0.42.1 and importlib_metadata wheels for Python 3.12) and .devcache (token states of every
# prompt, `python scripts/device_text_cache.py build .devcache`: the text encoder is too large to travel).
# Writes $OUT/bench.tgz (runs, report.json/md, grids).
# Measured 2026-12-04 on the lent H200: the ten erasures in parallel took 3 min 27 s (173-177 s each); the toy model
# is too small to keep the GPU busy (kernel-launch bound), and the 10-class benchmark at 32 seeds had not finished
# 5.5 min later, so that call ran out of its limit. Use it for the erasures and generate on the CPU, or give the
# benchmark a call of its own with fewer seeds (SAMPLES=8).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 TQDM_MININTERVAL=30
U="python3 scripts/device_text_cache.py run .devcache --"
B=/tmp/bench
log() { echo "[$(date +%T)] $*"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
log "erasures: one process per concept"
for c in sun moon star heart house tree fish flower boat umbrella; do
  $U erase --device cuda --concept "$c" --out "$B/runs/$c/selective" > "/tmp/erase_$c.log" 2>&1 &
done
wait
for c in sun moon star heart house tree fish flower boat umbrella; do tail -n 3 "/tmp/erase_$c.log" | grep -v '^$' | tail -n 1; done
log "benchmark"
$U benchmark --device cuda --concepts all --methods "${METHODS:-base,selective,selective-unguide,selective-image}" \
  --samples "${SAMPLES:-32}" --out "$B" 2>&1 | grep -v -E 'it/s|img/s|s/it|s/img' | tail -n 40
if [ -n "${VARIANT:-}" ]; then  # the image gate's other redraw, over the same runs and base images
  log "variant: selective-image --erase-with $VARIANT"
  V=/tmp/bench_$VARIANT; mkdir -p "$V/images"; ln -s "$B/runs" "$V/runs"; ln -s "$B/images/base" "$V/images/base"
  $U benchmark --device cuda --concepts all --methods selective-image --erase-with "$VARIANT" --samples "${SAMPLES:-32}" \
    --out "$V" 2>&1 | grep -v -E 'it/s|img/s|s/it|s/img' | tail -n 14
  tar czf "$OUT/variant.tgz" -C /tmp --exclude='images' "bench_$VARIANT"
fi
log "done"
mkdir -p "$B/logs" && cp /tmp/erase_*.log "$B/logs/"
tar czf "$OUT/bench.tgz" -C /tmp --exclude='bench/images' bench
