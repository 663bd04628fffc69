#!/usr/bin/env bash
# Issue 13, run 9: run 8's code (+ baselines timed in every variant), SmolLM2 (the GGUF at $MINIKV_MODEL) again, so that
# (1) each full-cache baseline counts with its fastest variant in the same run (static SDPA with and without PDL),
# (2) run 8's SnapKV step at 1.99x its floor gets a second, independent sample, (3) PDL vs no PDL at every ratio,
# (4) PDL with the attention kernel at 3 programs per SM (AdaKV's ragged heads). One command:
#     MINIKV_COMMIT=<hash> bash scripts/gpu_issue13_run9.sh
# Files in $OUT: summary.txt test_gpu_h200.txt e2e_smollm2.json e2e_log.txt
TOTAL=${TOTAL_S:-300}
. "$(dirname "$0")/gpu_run_lib.sh"  # OUT, say, part, header, gpu_tests, finish

header "minikv issue 13 device run 9"
part "tests (PDL and the Triton matmul)" 60 220 "$OUT/test_gpu_h200.txt" $PY -m pytest -q -rA -p no:cacheprovider -m gpu \
  tests/test_gpu.py -k "pdl or linear"
if [ -n "${MINIKV_MODEL:-}" ] && [ -f "${MINIKV_MODEL}" ]; then
  part "e2e smollm2" 220 0 "$OUT/e2e_log.txt" $PY -m minikv.gpu.e2e --model-kind smollm2 --repeats 5 --check-rows 4 \
    --step-variants nopdl,pdl_p3 --step-variant-ratios 0.5,0.75,0.875 --eager-ratios "" --budget-s 190 --out "$OUT"
else
  say "SKIPPED e2e smollm2: MINIKV_MODEL='${MINIKV_MODEL:-}' is not a file"
fi
finish
