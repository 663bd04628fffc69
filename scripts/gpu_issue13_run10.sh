#!/usr/bin/env bash
# Issue 13, run 10: the final code of the third session. (a) every CUDA test of tests/test_gpu.py; (b) SmolLM2's shapes
# (random weights), AdaKV at ratio 0.75: the default step (PDL, the attention plan's 3 programs per SM for long
# chunks) beside run 9's explicit pdl_p3 variant, which the default should now equal. One command:
#     MINIKV_COMMIT=<hash> bash scripts/gpu_issue13_run10.sh
# Files in $OUT: summary.txt test_gpu_h200.txt e2e_smollm2_shape.json e2e_log.txt
TOTAL=${TOTAL_S:-260}
. "$(dirname "$0")/gpu_run_lib.sh"  # OUT, say, part, header, gpu_tests, finish

header "minikv issue 13 device run 10"
gpu_tests 120 100
part "e2e smollm2_shape" 100 0 "$OUT/e2e_log.txt" $PY -m minikv.gpu.e2e --model-kind smollm2_shape --ratios 0.75 \
  --presses adakv_snapkv --step-variants pdl_p3 --eager-ratios "" --repeats 5 --check-rows 4 --budget-s 80 --out "$OUT"
finish
