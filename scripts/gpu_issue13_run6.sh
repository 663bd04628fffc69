#!/usr/bin/env bash
# Issue 13, run 6 (third session): does programmatic dependent launch (PDL) take the small ops' latency out of the
# SmolLM2 step? One H200, one command, no model file needed (SmolLM2's shapes with random weights):
#     bash scripts/gpu_issue13_run6.sh
# (a) the CUDA tests of tests/test_gpu.py (-m gpu; the new ones: minikv.gpu.triton_linear, every step kernel with PDL,
#     graph decoders with PDL), (b) the step's matmuls alone: cuBLAS against the Triton matmul over a grid of tiles
#     (python -m minikv.gpu.tune --parts linear), (c) end to end, SmolLM2's shapes, batch 64 x 8k, ratio 0.75, snapkv and
#     adakv_snapkv, each with the step variants pdl (Triton matmuls + PDL), tlin (Triton matmuls, no PDL) and pdlcublas
#     (PDL for the Triton kernels, cuBLAS matmuls), the full-cache baselines with the same variants, (d) the
#     Llama-3.1-8B shape, ratio 0.75, snapkv, default and pdl.
# Everything lands in $OUT (6 files): summary.txt test_gpu_h200.txt tune_h200.json e2e_smollm2_shape.json
# e2e_llama8b.json e2e_log.txt
TOTAL=${TOTAL_S:-540}
. "$(dirname "$0")/gpu_run_lib.sh"  # OUT, say, part, header, gpu_tests, finish

header "minikv issue 13 device run 6"
gpu_tests 110 400
part "tune linear" 80 300 "$OUT/e2e_log.txt" $PY -m minikv.gpu.tune --parts linear --rep-ms 10 --out "$OUT"
part "e2e smollm2_shape" 170 110 "$OUT/e2e_log.txt" $PY -m minikv.gpu.e2e --model-kind smollm2_shape --ratios 0.75 \
  --presses snapkv,adakv_snapkv --step-variants pdl,tlin,pdlcublas --eager-ratios "" --repeats 5 --check-rows 4 \
  --budget-s 140 --out "$OUT"
part "e2e llama8b" 105 0 "$OUT/e2e_log.txt" $PY -m minikv.gpu.e2e --model-kind llama8b --ratios 0.75 --presses snapkv \
  --step-variants pdl --eager-ratios "" --repeats 5 --check-steps 6 --check-rows 2 --budget-s 75 --out "$OUT"
finish
