#!/usr/bin/env bash
# Quick start on the bundled sample dataset: generate it (real formats), build its batches, train CMPC briefly with
# seeded stand-in backbone weights (no pretrained weights are bundled), test it with DenseCRF and PNGs.
# Usage: bash quickstart.sh [FOLDER] [ITERATIONS]
set -euo pipefail
cd "$(dirname "$0")"
root=${1:-sample_data}
iters=${2:-300}
size=64
python3 build_batches.py --make-sample "$root"
python3 build_batches.py -d unc -t train --data-root "$root" --output-dir "$root" --img-size "$size"
python3 build_batches.py -d unc -t val --data-root "$root" --output-dir "$root"
common=(-d unc -n CMPC_model -emb -f "$root/ckpts/cmpc_model" --img-size "$size" --batch-root "$root"
        --data-dir "$root/data")
python3 trainval_model.py -m train -t train "${common[@]}" -i "$iters" -s 100 --init-weights random --log-every 50
python3 trainval_model.py -m test -t val "${common[@]}" -i "$iters" -c -v --vis-dir "$root/visualization"
