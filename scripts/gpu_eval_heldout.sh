#!/usr/bin/env bash
# The H200 run behind results/eval_heldout/ (issue: what the presses optimise, held-out and paired).
# On the GPU machine, from a copy of the repository, with SmolLM2 at $MINIKV_MODEL:
#   bash scripts/gpu_eval_heldout.sh $OUT/eval_heldout
# Three invocations of the same eval command into one folder (records are keyed by task, sample,
# press, ratio; the folder's settings.json ties them to one model, dtype and seed):
#   1. heldout:1024, every main press and the ablations (SnapKV window 8/16/32, max-pool 7, AdaKV alpha 0.05)
#   2. longppl:1024, qa:1024 and qa0:1024 (no same-template distractor), the main presses
#   3. heldout:4096, the main presses
set -u
out=${1:?usage: gpu_eval_heldout.sh OUT_DIR}
main="no_press,random,streaming_llm,knorm,snapkv,adakv_snapkv,critical_snapkv,critical_adakv_snapkv"
abl="snapkv+window_size=8,snapkv+window_size=16,snapkv+window_size=32,snapkv+pooling=max+kernel_size=7,adakv_snapkv+alpha_safeguard=0.05,adakv_snapkv+window_size=16"
common="--device cuda --dtype bfloat16 --ratios 0.25,0.5,0.75,0.875 --out $out --no-progress"
python3 -m minikv.evaluate $common --tasks heldout:1024 --samples 240 --batch-size 48 --presses "$main,$abl" --max-minutes ${M1:-3} || echo "FAILED part 1"
python3 -m minikv.evaluate $common --tasks longppl:1024,qa:1024,qa0:1024 --samples 240 --batch-size 48 --presses "$main" --max-minutes ${M2:-3} || echo "FAILED part 2"
python3 -m minikv.evaluate $common --tasks heldout:4096 --samples 64 --batch-size 16 --presses "$main" --max-minutes ${M3:-1.5} || echo "FAILED part 3"
python3 -m minikv.evaluate --out $out --summary-only > /dev/null && gzip -9 $out/samples.jsonl  # the committed form
[ $(stat -c %s $out/samples.jsonl.gz) -gt 15000000 ] && (cd $out && split -b 15000000 samples.jsonl.gz samples.jsonl.gz.part_ && rm samples.jsonl.gz)  # the device returns files of <= 16 MiB
