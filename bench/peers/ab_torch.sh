#!/usr/bin/env bash
# Two qmomentum builds and PyTorch side by side on the design document's MLP (not part of CI):
# for each seed, PyTorch (bench/peers/torch_ref.py), then build A, then build B, so that all three
# see the same state of this (noisy, shared) machine. Prints, per run, the median epoch of epochs
# 2..10 and the test accuracy.
#   bash bench/peers/ab_torch.sh BUILD_A BUILD_B [SEEDS]
#   e.g. git worktree add /tmp/before HEAD~3 && (cd /tmp/before && cargo build --release) &&
#        bash bench/peers/ab_torch.sh /tmp/before/target/release/qmomentum target/release/qmomentum
# Needs torch and numpy in $VENV (default /tmp/qmomentum-peers-venv, made by bench/peers/run.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
A=$1
B=$2
SEEDS=${3:-"0 1 2"}
VENV=${VENV:-/tmp/qmomentum-peers-venv}
OUT=$(mktemp -d)
median() {
    python3 - "$1" <<'PY'
import csv, json, statistics, sys
d = sys.argv[1]
rows = list(csv.DictReader(open(d + "/history.csv")))
acc = json.load(open(d + "/result.json"))["test_accuracy"]
print(f"epoch_s {statistics.median(float(r['seconds']) for r in rows[1:]):.4f} test_accuracy {acc}")
PY
}
for s in $SEEDS; do
    echo "torch seed $s: $("$VENV/bin/python" bench/peers/torch_ref.py --seed "$s")"
    for which in A B; do
        bin=$A
        [ "$which" = B ] && bin=$B
        QMOMENTUM_DATA="$PWD/data/fashion-mnist" "$bin" train --config configs/design_doc.toml \
            --seed "$s" --out "$OUT/$which-$s" --quiet > /dev/null
        echo "$which seed $s: $(median "$OUT/$which-$s")"
    done
done
