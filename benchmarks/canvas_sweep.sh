#!/usr/bin/env bash
# Canvas-length sweep for the bundled model (issue 3): the same starting weights fine-tuned for the same number
# of steps (same tokens) at each canvas length, then `dgemma eval` at the same denoising pace (C/4 steps per
# canvas, i.e. at least 4 tokens committed per decoder pass; the released model's pace is 256/48 = 5.3).
#
#   bash benchmarks/canvas_sweep.sh [INIT_CHECKPOINT] [STEPS]
#
# Writes runs/sweep-c{C}/ and benchmarks/results/canvas_sweep/c{C}.json; summarise with
#   python benchmarks/canvas_sweep_table.py
set -euo pipefail
INIT=${1:-runs/py-mini/checkpoints/step-000900}
STEPS=${2:-100}
DG=${DGEMMA:-.venv/bin/dgemma}
OUT=benchmarks/results/canvas_sweep
mkdir -p "$OUT"
for C in ${CANVASES:-16 32 64 128}; do
  rm -rf "runs/sweep-c$C"
  $DG train --data data/py --init-from "$INIT" --canvas-length "$C" --batch-size 8 --seq-len 256 \
    --steps "$STEPS" --lr 5e-4 --warmup-steps 10 --min-lr-ratio 0.2 --weight-decay 0.01 --beta2 0.95 \
    --no-bf16 --threads 2 --val-every 0 --val-batches 4 --ckpt-every 0 --log-every 20 --progress lines \
    --seed 1 --out "runs/sweep-c$C"
  $DG eval --model "runs/sweep-c$C/latest" --data data/py --prompts 16 --max-new-tokens 96 \
    --steps $((C / 4)) --judge auto --out "$OUT/c$C.json" | tail -n 25
done
