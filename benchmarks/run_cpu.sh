#!/usr/bin/env bash
# The CPU benchmark runs behind the README's speed table. Run on an otherwise idle machine:
#   bash benchmarks/run_cpu.sh            # writes benchmarks/results/cpu-*.{json,log,png}
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results
mkdir -p "$OUT"
.venv/bin/dgemma bench --plot "$OUT/cpu-bench.png" --out "$OUT/cpu-bench.json" 2>&1 | grep -v Warning | tee "$OUT/cpu-bench.log"
.venv/bin/python benchmarks/canvas_speed.py 2>&1 | tee "$OUT/cpu-canvas-speed.log"
