# Shared by the scripts/gpu_issue13*.sh device runs (source it after setting TOTAL, the run's overall budget in s).
# Everything lands in $OUT; summary.txt gets one line per part (ok / FAILED / TIMED OUT / SKIPPED) and the tables.
set -u
OUT=${OUT:-/tmp/minikv_out}
mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 MPLBACKEND=Agg HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PYTHON:-python3}
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

# header TITLE: the run's title, date, commit, GPU and versions
header() {
  # MINIKV_COMMIT: the commit the working tree was copied from (the device's copy of .git can be older than it)
  say "$1, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit ${MINIKV_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo '?')}"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv >> "$SUMMARY" 2>&1 || say "nvidia-smi failed"
  $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__, '| transformers', transformers.__version__, '| gpu', torch.cuda.get_device_name())" >> "$SUMMARY" 2>&1 \
    || say "python environment check FAILED"
}

# gpu_tests CAP LATER: the CUDA tests of tests/test_gpu.py (-m gpu); 4 processes when pytest-xdist is there (most of
# the time is compiling Triton kernels)
gpu_tests() {
  local xdist=""
  $PY -c "import xdist" 2>/dev/null && xdist="-n 4"
  part "tests" "$1" "$2" "$OUT/test_gpu_h200.txt" $PY -m pytest -q -rA -p no:cacheprovider -m gpu $xdist tests/test_gpu.py
  grep -E "passed|failed|error" "$OUT/test_gpu_h200.txt" | tail -1 | sed 's/^/  tests: /' | tee -a "$SUMMARY"
}

# finish: the tables NOTES.md shows, from the JSON just written, and the run's total time
finish() {
  echo >> "$SUMMARY"
  $PY -m minikv.gpu.notes "$OUT" --bench results/gpu/decode_graphs_run1 >> "$SUMMARY" 2>&1 || say "notes tables FAILED"
  say "total $(( $(date +%s) - START )) s"
  ls -la "$OUT" >> "$SUMMARY"
}
