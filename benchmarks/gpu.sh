#!/usr/bin/env bash
# GPU benchmark of issue 4 (item 4): the 26B-A4B shape with random bf16 weights on a lent H100/H200.
#
#   bash benchmarks/gpu.sh [gpu_bench.py flags...]        # from the repository root of a plain checkout
#   OUT=/some/dir bash benchmarks/gpu.sh                  # results folder (default benchmarks/results/gpu)
#   bash benchmarks/gpu.sh --pack-transformers            # HERE, before the device call: see below
#
# Writes to ${OUT:-benchmarks/results/gpu}: gpu_bench.json (rewritten after every phase), gpu_bench.log,
# nvidia-smi.txt and gpu.sh.log (everything this script printed). The last line printed is the JSON.
#
# Python: the device machine has no network, so nothing can be pip-installed there. The script takes $PYTHON if set,
# else the first of python3, .venv/bin/python whose torch sees a GPU (the device image's python3 has torch with
# CUDA), else the first with torch at all (a CPU run), else stops with status 3. dgemma itself is imported from this
# checkout (PYTHONPATH), so it needs no install; it needs torch and safetensors, both in the device image.
#
# transformers (optional part): the comparison needs transformers with DiffusionGemma (5.23.0, as the tests pin).
# If the device's own transformers lacks it, carry it: run `bash benchmarks/gpu.sh --pack-transformers` here; it
# packs this venv's transformers into .carry/transformers.tgz (about 10 MB, pure Python) and makes git ignore
# .carry; then name ".carry" in the device call's carry list. This script unpacks it into a temporary folder ahead
# of the device's own packages. Without it the comparison is skipped with the reason in the JSON.
#
# Time: the run is killed after ${BENCH_TIMEOUT:-480} s (SIGTERM: the script still prints and saves what it
# measured), and gpu_bench.py skips the optional transformers part when its --budget-s (420) is nearly spent.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

if [ "${1:-}" = "--pack-transformers" ]; then
  PY=${PYTHON:-.venv/bin/python}
  SITE=$("$PY" -c "import transformers, os; print(os.path.dirname(os.path.dirname(transformers.__file__)))") || {
    echo "gpu.sh: $PY has no transformers to pack" >&2; exit 2; }
  VER=$("$PY" -c "import transformers; print(transformers.__version__)")
  mkdir -p .carry
  grep -qx '/.carry/' .git/info/exclude 2>/dev/null || echo '/.carry/' >> .git/info/exclude
  tar czf .carry/transformers.tgz --exclude=__pycache__ -C "$SITE" transformers
  echo "packed transformers $VER from $SITE into .carry/transformers.tgz ($(du -h .carry/transformers.tgz | cut -f1));"
  echo "name \".carry\" in the device call's carry list"
  exit 0
fi

OUT_DIR=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT_DIR"

run() {
  echo "== dgemma gpu.sh: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname), git $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi 2>&1 | tee "$OUT_DIR/nvidia-smi.txt"
    nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
      --format=csv 2>&1 | tee -a "$OUT_DIR/nvidia-smi.txt"
  else
    echo "no nvidia-smi on this machine" | tee "$OUT_DIR/nvidia-smi.txt"
  fi

  # One probe per candidate (importing torch takes seconds): "cuda|cpu python-version torch-version cuda-version".
  local probe='import sys, torch; print("cuda" if torch.cuda.is_available() else "cpu", sys.version.split()[0], torch.__version__, torch.version.cuda)'
  local py="" info="" fallback="" fallback_info="" cand out
  local candidates=(python3 .venv/bin/python)
  [ -n "${PYTHON:-}" ] && candidates=("$PYTHON")  # an explicit choice is taken as it is
  for cand in "${candidates[@]}"; do
    command -v "$cand" >/dev/null 2>&1 || continue
    out=$("$cand" -c "$probe" 2>/dev/null) || continue
    if [ "${out%% *}" = cuda ]; then py=$cand; info=$out; break; fi
    [ -n "$fallback" ] || { fallback=$cand; fallback_info=$out; }
  done
  if [ -z "$py" ]; then
    if [ -z "$fallback" ]; then
      echo "gpu.sh: no python with torch (tried ${candidates[*]}); the device machine cannot pip install:"
      echo "use its image's python3 (it has torch with CUDA), or carry a virtual environment built for that machine"
      return 3
    fi
    py=$fallback; info=$fallback_info
    echo "gpu.sh: WARNING: torch sees no GPU; running on the CPU"
  fi
  local kind pyv tv cv
  read -r kind pyv tv cv <<< "$info"
  echo "python: $(command -v "$py"): python $pyv, torch $tv, CUDA $cv, device $kind"

  local site=""
  if [ -f .carry/transformers.tgz ]; then
    site=$(mktemp -d /tmp/dgemma-site.XXXXXX)
    if tar xzf .carry/transformers.tgz -C "$site"; then
      echo "transformers from .carry/transformers.tgz (unpacked in $site)"
    else
      echo "gpu.sh: could not unpack .carry/transformers.tgz"; site=""
    fi
  fi
  export PYTHONPATH="$ROOT${site:+:$site}${PYTHONPATH:+:$PYTHONPATH}"

  local rc=0
  PYTHONUNBUFFERED=1 timeout --signal=TERM --kill-after=30 "${BENCH_TIMEOUT:-480}" \
    "$py" benchmarks/gpu_bench.py --out "$OUT_DIR" "$@" || rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    echo "gpu.sh: gpu_bench.py hit the ${BENCH_TIMEOUT:-480} s timeout (status $rc)"
  fi
  if command -v nvidia-smi >/dev/null 2>&1; then  # to the file only: the JSON line stays the last one printed
    nvidia-smi --query-gpu=name,memory.used,clocks.sm,temperature.gpu,power.draw --format=csv,noheader \
      2>&1 | sed 's/^/after: /' >> "$OUT_DIR/nvidia-smi.txt"
  fi
  if ! tail -n 1 "$OUT_DIR/gpu_bench.log" 2>/dev/null | grep -q '^{'; then
    # gpu_bench.py died before its JSON line (killed, say): print what it saved after its last phase, as one line
    "$py" -c "import json, sys; print(json.dumps(json.load(open(sys.argv[1]))))" "$OUT_DIR/gpu_bench.json" \
      2>/dev/null || echo '{"complete": false, "error": "gpu_bench.py wrote no results"}'
  fi
  return $rc
}

run "$@" 2>&1 | tee "$OUT_DIR/gpu.sh.log"
exit "${PIPESTATUS[0]}"
