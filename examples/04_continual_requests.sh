#!/usr/bin/env bash
# Deletion requests arrive one at a time. Each runs on the previous output; --keep re-checks the
# earlier requests' images so they stay forgotten; --original names the checkpoint the stream
# began from, so each request pulls back towards it instead of adding to the drift of the ones
# before; the ledger in the checkpoint records it all.
#   bash examples/04_continual_requests.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")"
L2UL=${L2UL:-l2ul}
# Extra options for forget/relabel, e.g. L2UL_ARGS="--n-adv 4 --attack-steps 10" for a quick run.
read -r -a EXTRA <<< "${L2UL_ARGS:-}"
OUT=${1:-$(mktemp -d)}
MODEL=fashion-mnist-lcnet_050.safetensors

# Split the 8 example images into two requests of 4 (class folders kept).
mkdir -p "$OUT/req1" "$OUT/req2"
i=0
for f in images/forget/*/*.png; do
  cls=$(basename "$(dirname "$f")")
  dest=$([ $i -lt 4 ] && echo "$OUT/req1" || echo "$OUT/req2")
  mkdir -p "$dest/$cls" && cp "$f" "$dest/$cls/"
  i=$((i + 1))
done

$L2UL forget "$MODEL" --images "$OUT/req1" --out "$OUT/after1.safetensors" --request-id req-1 --force -q ${EXTRA[@]+"${EXTRA[@]}"}
$L2UL forget "$OUT/after1.safetensors" --images "$OUT/req2" --keep "$OUT/req1" --original "$MODEL" \
  --out "$OUT/after2.safetensors" --request-id req-2 --force ${EXTRA[@]+"${EXTRA[@]}"}
$L2UL history "$OUT/after2.safetensors"
$L2UL eval "$OUT/after2.safetensors" --images images/forget -q --report "$OUT/all-forgotten.json"
python3 -c "import json,sys; a=json.load(open(sys.argv[1]))['accuracy']; print(f'accuracy on all 8 forgotten images: {a:.0%}')" "$OUT/all-forgotten.json"
