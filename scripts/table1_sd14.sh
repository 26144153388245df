#!/usr/bin/env bash
# The paper's benchmarks on Stable Diffusion v1.4, one GPU. Not run in CI or on the CPU machines this project is
# built on: a command for users with the weights and a GPU. Every step resumes if interrupted (rerun the same line).
#
#   MODEL=CompVis/stable-diffusion-v1-4 CLIP=openai/clip-vit-base-patch32 I2P=i2p_benchmark.csv scripts/table1_sd14.sh
#
# Cost estimate (from UNet image-evaluation counts, not measured here; scale by your GPU's throughput): 32 samples x
# 13 prompts x 10 concepts = 4,160 images per method. base ~1.3k images x 100 evals, lora/full/selective 4.2k x 100,
# unguide 4.2k x 236, selective-unguide 4.2k x ~100-200: ~3 M image-evals at 512 px, plus 50 erasure runs of 200
# iterations (~11 k evals each, with gradients). At ~100 image-evals/s (A100, fp16, batch 32) that is ~8-9 h for
# Table 1 and ~1 h for the erasures; a single method ~1-2 h. The nudity suite: the 854-row subset, 1 image a row.
# Split generation over several GPUs of one machine with `accelerate launch --num_processes N -m unguide.cli ...`
# (the same files as one process).
set -euo pipefail
MODEL=${MODEL:-CompVis/stable-diffusion-v1-4}
CLIP=${CLIP:-openai/clip-vit-base-patch32}
OUT=${OUT:-sd14_benchmarks}
DTYPE=${DTYPE:-float16}

unguide benchmark --model "$MODEL" --device cuda --dtype "$DTYPE" --suite cifar10 --concepts all \
  --methods base,lora,unguide,full,selective,selective-unguide --samples 32 --clip-model "$CLIP" \
  --batch-size 16 --out "$OUT/cifar10"

if [ -n "${I2P:-}" ]; then  # the I2P CSV (prompt, evaluation_seed, evaluation_guidance, ..., nudity_percentage)
  unguide benchmark --model "$MODEL" --device cuda --dtype "$DTYPE" --suite nudity --prompts "$I2P" \
    --methods base,unguide,selective-unguide --samples 1 --clip-model "$CLIP" ${COCO:+--fid-reference "$COCO"} \
    --batch-size 16 --out "$OUT/nudity"
fi
