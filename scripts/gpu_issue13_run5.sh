#!/usr/bin/env bash
# Issue 13, run 5 (the final code), on one H200, in one command (from the repository root):
#     bash scripts/gpu_issue13_run5.sh
# (a) the CUDA tests of tests/test_gpu.py (-m gpu), (b) end-to-end decode of SmolLM2 (the GGUF at $MINIKV_MODEL,
# every row, plus the full cache and snapkv r0.75 with 1 and 2 row groups / CUDA streams),
# (c) end-to-end decode of a Llama-3.1-8B-shaped model with random weights (ratios 0.75 and 0.875, all three
# presses), (d) the attention plan sweep on small caches with the final defaults (python -m minikv.gpu.tune
# --parts attention). Every graph decoder is checked against a float32 forward (minikv.gpu.e2e.CHECK_CRITERION).
# Every part runs under its own time limit inside one overall budget (TOTAL_S, default 400 s), and a part that
# fails or times out does not stop the next. Everything lands in $OUT -- 6 files, the most that comes back is 8:
#   summary.txt  test_gpu_h200.txt  e2e_smollm2.json  e2e_llama8b.json  e2e_log.txt  tune_h200.json
TOTAL=${TOTAL_S:-400}
. "$(dirname "$0")/gpu_run_lib.sh"  # OUT, say, part, header, gpu_tests, finish

header "minikv issue 13 device run 5"

# (a) tests: the CUDA tests only (Triton kernels, any head dim, fused merge, step kernels, CUDA-graph decoder)
gpu_tests 70 320

# (b) end to end, SmolLM2 (real weights), batch 64 x 8k, every row (5 repeats: run 1's spreads were <= 1%);
#     fp32 check on 4 rows x 6 steps; variants: 1 and 2 streams
if [ -n "${MINIKV_MODEL:-}" ] && [ -f "${MINIKV_MODEL}" ]; then
  part "e2e smollm2" 140 170 "$OUT/e2e_log.txt" $PY -m minikv.gpu.e2e --model-kind smollm2 --repeats 5 --check-rows 4 \
    --stream-variants 1,2 --budget-s 110 --out "$OUT"
else
  say "SKIPPED e2e smollm2: MINIKV_MODEL='${MINIKV_MODEL:-}' is not a file"
fi

# (c) end to end, Llama-3.1-8B shapes (random weights, built on the GPU), batch 8 x 32k, ratios 0.75 and 0.875;
#     fp32 check on 2 rows x 6 steps; CriticalKV selects one batch row at a time (decoder.select_rows_per_chunk)
part "e2e llama8b" 105 60 "$OUT/e2e_log.txt" $PY -m minikv.gpu.e2e --model-kind llama8b --ratios 0.75,0.875 \
  --repeats 5 --check-steps 6 --check-rows 2 --budget-s 75 --out "$OUT"

# (d) attention alone on small caches: the split-plan sweep, with the final defaults as the "default" rows
part "tune attention" 60 0 "$OUT/e2e_log.txt" $PY -m minikv.gpu.tune --parts attention --rep-ms 20 --out "$OUT"

finish
