#!/usr/bin/env bash
# Issue 13, run 8 (the final code of the third session), on one H200, in one command (from the repository root):
#     bash scripts/gpu_issue13_run8.sh
# (a) the CUDA tests of tests/test_gpu.py (-m gpu), (b) end-to-end decode of SmolLM2 (the GGUF at $MINIKV_MODEL,
# every row; the default step is now PDL + Triton matmuls, and at ratio 0.75 every press and the full cache also run
# the previous step, nopdl: cuBLAS matmuls, no PDL), (c) end-to-end decode of a Llama-3.1-8B-shaped model with random
# weights (ratios 0.75 and 0.875, all three presses; its default keeps PDL off -- its matrices are large -- and
# ratio 0.75 also runs with pdl). Every graph decoder is checked against a float32 forward.
# Everything lands in $OUT (5 files): summary.txt test_gpu_h200.txt e2e_smollm2.json e2e_llama8b.json e2e_log.txt
TOTAL=${TOTAL_S:-480}
. "$(dirname "$0")/gpu_run_lib.sh"  # OUT, say, part, header, gpu_tests, finish

header "minikv issue 13 device run 8"
gpu_tests 110 330
if [ -n "${MINIKV_MODEL:-}" ] && [ -f "${MINIKV_MODEL}" ]; then
  part "e2e smollm2" 190 130 "$OUT/e2e_log.txt" $PY -m minikv.gpu.e2e --model-kind smollm2 --repeats 5 --check-rows 4 \
    --step-variants nopdl --budget-s 160 --out "$OUT"
else
  say "SKIPPED e2e smollm2: MINIKV_MODEL='${MINIKV_MODEL:-}' is not a file"
fi
part "e2e llama8b" 120 0 "$OUT/e2e_log.txt" $PY -m minikv.gpu.e2e --model-kind llama8b --ratios 0.75,0.875 \
  --step-variants pdl --eager-ratios "" --repeats 5 --check-steps 6 --check-rows 2 --budget-s 90 --out "$OUT"
finish
