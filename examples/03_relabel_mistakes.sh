#!/usr/bin/env bash
# "Fix these mistakes": images/fixes.csv lists test images the example model gets wrong, with
# their true class as new_label (an ImageNet-A-style correction). Relabel them, then check.
#   bash examples/03_relabel_mistakes.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")"
L2UL=${L2UL:-l2ul}
# Extra options for forget/relabel, e.g. L2UL_ARGS="--n-adv 4 --attack-steps 10" for a quick run.
read -r -a EXTRA <<< "${L2UL_ARGS:-}"
OUT=${1:-$(mktemp -d)}
MODEL=fashion-mnist-lcnet_050.safetensors

$L2UL relabel "$MODEL" --manifest images/fixes.csv --out "$OUT/fixed.safetensors" \
  --report "$OUT/relabel.json" --eval images/test --force ${EXTRA[@]+"${EXTRA[@]}"}
echo "report in $OUT/relabel.json"
