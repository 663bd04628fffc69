#!/usr/bin/env bash
# Issue 13 on one H200, in one command (from the repository root):
#     bash scripts/gpu_issue13.sh
# (a) the GPU tests, (b) the attention benchmark (4k shapes included), (c) end-to-end decode of SmolLM2
# (the GGUF at $MINIKV_MODEL), (d) end-to-end decode of a Llama-3.1-8B-shaped model with random weights.
# Every part runs under its own time limit inside one overall budget (TOTAL_S, default 465 s), and a part that
# fails or times out does not stop the next. Everything lands in $OUT -- 7 files, the most that comes back is 8:
#   summary.txt  test_gpu_h200.txt  bench_h200.json  bench_log.txt  e2e_smollm2.json  e2e_llama8b.json  e2e_log.txt
set -u
OUT=${OUT:-/tmp/minikv_out}
mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 MPLBACKEND=Agg HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PYTHON:-python3}
TOTAL=${TOTAL_S:-465}
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

say() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $(( TOTAL - ($(date +%s) - START) )); }

# part NAME CAP LATER LOG CMD...: run CMD (stdout+stderr appended to LOG) for at most CAP seconds, leaving LATER
# seconds for the parts after it; SIGINT first (Python saves what it has), SIGKILL 15 s later.
part() {
  local name=$1 cap=$2 later=$3 log=$4
  shift 4
  local limit=$(( $(left) - later ))
  [ "$limit" -gt "$cap" ] && limit=$cap
  if [ "$limit" -lt 30 ]; then
    say "SKIPPED $name: only $limit s left for it"
    return
  fi
  local t0=$(date +%s)
  echo "=== $name (limit $limit s) $(date -u +%H:%M:%S)" >> "$log"
  timeout --signal=INT --kill-after=15 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  local verdict=ok
  [ "$rc" -ne 0 ] && verdict=FAILED
  [ "$rc" -eq 124 ] && verdict="TIMED OUT"
  say "$name: $verdict (rc $rc), $(( $(date +%s) - t0 )) s of $limit s"
}

say "minikv issue 13 device run, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv >> "$SUMMARY" 2>&1 || say "nvidia-smi failed"
$PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__, '| transformers', transformers.__version__, '| gpu', torch.cuda.get_device_name())" >> "$SUMMARY" 2>&1 \
  || say "python environment check FAILED"

# (a) tests: CPU tests + every CUDA test (Triton kernels, any head dim, fused merge, CUDA-graph decoder);
#     4 processes when pytest-xdist is there (most of the time is compiling Triton kernels)
XDIST=""
$PY -c "import xdist" 2>/dev/null && XDIST="-n 4"
part "tests" 150 300 "$OUT/test_gpu_h200.txt" $PY -m pytest -q -rA -p no:cacheprovider $XDIST tests/test_gpu.py
grep -E "passed|failed|error" "$OUT/test_gpu_h200.txt" | tail -1 | sed 's/^/  tests: /' | tee -a "$SUMMARY"

# (b) attention benchmark: the whole grid (4k..128k, batch 1/8/32, both models) + compression overhead;
#     stops starting new shapes after --budget-s (4k shapes come first). minikv.gpu.bench = `python -m minikv bench`,
#     called directly so that this run does not depend on the command-line front end
part "bench" 130 200 "$OUT/bench_log.txt" $PY -m minikv.gpu.bench --overhead --rep-ms 30 --budget-s 100 --out "$OUT"

# (c) end to end, SmolLM2 (real weights), batch 64 x 8k
if [ -n "${MINIKV_MODEL:-}" ] && [ -f "${MINIKV_MODEL}" ]; then
  part "e2e smollm2" 120 110 "$OUT/e2e_log.txt" $PY -m minikv.gpu.e2e --model-kind smollm2 --budget-s 90 --out "$OUT"
else
  say "SKIPPED e2e smollm2: MINIKV_MODEL='${MINIKV_MODEL:-}' is not a file"
fi

# (d) end to end, Llama-3.1-8B shapes (random weights, built on the GPU), batch 8 x 32k
part "e2e llama8b" 170 0 "$OUT/e2e_log.txt" $PY -m minikv.gpu.e2e --model-kind llama8b --check-steps 4 --budget-s 105 --out "$OUT"

# the tables NOTES.md shows, from the JSON just written
echo >> "$SUMMARY"
$PY -m minikv.gpu.notes "$OUT" >> "$SUMMARY" 2>&1 || say "notes tables FAILED"
say "total $(( $(date +%s) - START )) s"
ls -la "$OUT" >> "$SUMMARY"
