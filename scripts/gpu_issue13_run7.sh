#!/usr/bin/env bash
# Issue 13, run 7: run 6's PDL step with the MLP's silu * up read by the down projection (glu), the LM head in the
# Triton matmul, tiles per matrix size (triton_linear.plan_for), PDL on by default for small layers. SmolLM2's shapes
# (random weights) and the Llama-3.1-8B shape, one command:  bash scripts/gpu_issue13_run7.sh
# (a) CUDA tests, (b) SmolLM2's shapes, ratio 0.75, snapkv and adakv_snapkv: default (PDL) and the variants nopdl
# (run 5's step), tlin (Triton matmuls, no PDL), pdl_p3 (attention at 3 programs per SM), (c) Llama-3.1-8B shape,
# ratio 0.75, snapkv: default (no PDL for 33-235 MB matrices) and pdl. 5 files in $OUT.
TOTAL=${TOTAL_S:-420}
. "$(dirname "$0")/gpu_run_lib.sh"  # OUT, say, part, header, gpu_tests, finish

header "minikv issue 13 device run 7"
gpu_tests 110 280
part "e2e smollm2_shape" 150 110 "$OUT/e2e_log.txt" $PY -m minikv.gpu.e2e --model-kind smollm2_shape --ratios 0.75 \
  --presses snapkv,adakv_snapkv --step-variants nopdl,tlin,pdl_p3 --eager-ratios "" --repeats 5 --check-rows 4 \
  --budget-s 120 --out "$OUT"
part "e2e llama8b" 105 0 "$OUT/e2e_log.txt" $PY -m minikv.gpu.e2e --model-kind llama8b --ratios 0.75 --presses snapkv \
  --step-variants pdl --eager-ratios "" --repeats 5 --check-steps 6 --check-rows 2 --budget-s 75 --out "$OUT"
finish
