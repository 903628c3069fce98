#!/usr/bin/env bash
# Forget 8 Fashion-MNIST training images from the example model, then measure what changed:
# accuracy on 300 held-out test images before/after, and a membership-inference check.
#   bash examples/02_forget_and_evaluate.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")"
L2UL=${L2UL:-l2ul}
# Extra options for forget/relabel, e.g. L2UL_ARGS="--n-adv 4 --attack-steps 10" for a quick run.
read -r -a EXTRA <<< "${L2UL_ARGS:-}"
OUT=${1:-$(mktemp -d)}
MODEL=fashion-mnist-lcnet_050.safetensors

$L2UL forget "$MODEL" --images images/forget --out "$OUT/forgot.safetensors" \
  --report "$OUT/forget.json" --eval images/test --force ${EXTRA[@]+"${EXTRA[@]}"}
$L2UL eval "$OUT/forgot.safetensors" --images images/test --compare "$MODEL" \
  --forget images/forget --report "$OUT/eval.json"
echo "reports in $OUT"
