#!/usr/bin/env bash
# LoRA (rank 8, default targets) against full fine-tuning of the bundled model on python-functions, the same steps
# and batches, then `dgemma eval` of the base, the merged LoRA model and the fully fine-tuned model on the same
# held-out function requests (the val split's prompts). Logs and eval JSON go to benchmarks/results/finetune/steps-N/.
#   STEPS=60 bash benchmarks/finetune_compare.sh     (CPU: the two runs side by side, one thread each, nice 19)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
STEPS=${STEPS:-60}
PROMPTS=${PROMPTS:-24}
NEW=${NEW:-128}
MODEL=models/dgemma-py-small
OUT=benchmarks/results/finetune/steps-$STEPS
mkdir -p "$OUT"
[ -f data/pyfn/meta.json ] || $BIN/dgemma data prepare --source python-functions --tokenizer $MODEL --out data/pyfn
COMMON="--model $MODEL --data data/pyfn --steps $STEPS --batch-size 8 --seq-len 256 --warmup-steps 5 --val-every 20
        --val-batches 2 --ckpt-every 20 --threads 1 --progress lines --log-every 5 --seed 0"
LORA_RUN=runs/pyfn-lora-$STEPS FULL_RUN=runs/pyfn-full-$STEPS
rm -rf $LORA_RUN $FULL_RUN
nice -n 19 $BIN/dgemma finetune $COMMON --out $LORA_RUN --lora-rank 8 --lr 2e-3 > "$OUT/train-lora.log" 2>&1 &
LORA=$!
nice -n 19 $BIN/dgemma finetune $COMMON --out $FULL_RUN --lr 3e-4 > "$OUT/train-full.log" 2>&1 &
FULL=$!
EVAL="--prompts-file data/pyfn/eval_prompts.json --prompts $PROMPTS --max-new-tokens $NEW --judge none"
[ -n "${SKIP_BASE:-}" ] || OMP_NUM_THREADS=1 nice -n 19 $BIN/dgemma eval --model $MODEL $EVAL \
    --out "$OUT/eval-base.json" > "$OUT/eval-base.log" 2>&1
wait $LORA $FULL
$BIN/dgemma lora merge --model $MODEL --adapter $LORA_RUN/latest --out $LORA_RUN-merged --force
OMP_NUM_THREADS=1 nice -n 19 $BIN/dgemma eval --model $LORA_RUN-merged $EVAL --out "$OUT/eval-lora.json" \
    > "$OUT/eval-lora.log" 2>&1 &
OMP_NUM_THREADS=1 nice -n 19 $BIN/dgemma eval --model $FULL_RUN/latest $EVAL --out "$OUT/eval-full.json" \
    > "$OUT/eval-full.log" 2>&1
wait
echo done
