#!/usr/bin/env bash
# LoRA (rank 8, default targets) against full fine-tuning of the bundled model on python-functions, the same steps
# and batches, then `dgemma eval` of the base, the merged LoRA model and the fully fine-tuned model on the same
# held-out function requests (the val split's prompts). Logs and JSON go to benchmarks/results/finetune/.
#   STEPS=60 bash benchmarks/finetune_compare.sh            (CPU: both runs side by side, one thread each)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
OUT=benchmarks/results/finetune
STEPS=${STEPS:-60}
PROMPTS=${PROMPTS:-24}
NEW=${NEW:-128}
MODEL=models/dgemma-py-small
mkdir -p "$OUT"
[ -f data/pyfn/meta.json ] || $BIN/dgemma data prepare --source python-functions --tokenizer $MODEL --out data/pyfn
COMMON="--model $MODEL --data data/pyfn --steps $STEPS --batch-size 8 --seq-len 256 --warmup-steps 5 --val-every 20
        --val-batches 2 --ckpt-every 20 --threads 1 --progress lines --log-every 5 --seed 0"
rm -rf runs/pyfn-lora runs/pyfn-full
nice -n 19 $BIN/dgemma finetune $COMMON --out runs/pyfn-lora --lora-rank 8 --lr 2e-3 > "$OUT/train-lora.log" 2>&1 &
LORA=$!
nice -n 19 $BIN/dgemma finetune $COMMON --out runs/pyfn-full --lr 3e-4 > "$OUT/train-full.log" 2>&1 &
FULL=$!
EVAL="--prompts-file data/pyfn/eval_prompts.json --prompts $PROMPTS --max-new-tokens $NEW --judge none"
OMP_NUM_THREADS=1 nice -n 19 $BIN/dgemma eval --model $MODEL $EVAL --out "$OUT/eval-base.json" > "$OUT/eval-base.log" 2>&1
wait $LORA $FULL
$BIN/dgemma lora merge --model $MODEL --adapter runs/pyfn-lora/latest --out runs/pyfn-lora-merged --force
OMP_NUM_THREADS=1 nice -n 19 $BIN/dgemma eval --model runs/pyfn-lora-merged $EVAL --out "$OUT/eval-lora.json" > "$OUT/eval-lora.log" 2>&1 &
OMP_NUM_THREADS=1 nice -n 19 $BIN/dgemma eval --model runs/pyfn-full/latest $EVAL --out "$OUT/eval-full.json" > "$OUT/eval-full.log" 2>&1
wait
echo done
