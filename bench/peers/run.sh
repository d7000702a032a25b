#!/usr/bin/env bash
# Side-by-side peer comparison (not part of CI): Keras 3 and PyTorch in a throw-away venv, and
# qmomentum, on the same model, data and hyper-parameters, in one run; prints the ratios.
#   bash bench/peers/run.sh [LR] [SEEDS]      e.g. bash bench/peers/run.sh 0.001 "0 1 2"
# Needs ~8 GB of disk for the venv (the PyPI torch wheel pulls the CUDA libraries; a plain
# `pip install torch` works on CPU, `--no-deps` does not).
set -euo pipefail
cd "$(dirname "$0")/../.."
LR=${1:-0.001}
SEEDS=${2:-"0 1 2"}
VENV=${VENV:-/tmp/qmomentum-peers-venv}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q 'tensorflow-cpu==2.21.*' torch numpy
fi
# qmomentum's Python bindings, built from this checkout (the design document's program as Python
# users run it: bench/peers/python_ref.py).
"$VENV/bin/pip" install -q ./crates/qmomentum-py
cargo build --release -q
OUT=$(mktemp -d)
for s in $SEEDS; do
    "$VENV/bin/python" bench/peers/keras_ref.py --lr "$LR" --seed "$s" >> "$OUT/peers.jsonl"
    "$VENV/bin/python" bench/peers/torch_ref.py --lr "$LR" --seed "$s" >> "$OUT/peers.jsonl"
    QMOMENTUM_DATA="$PWD/data/fashion-mnist" "$VENV/bin/python" bench/peers/python_ref.py --lr "$LR" --seed "$s" >> "$OUT/peers.jsonl"
    ./target/release/qmomentum train --lr "$LR" --seed "$s" --out "$OUT/qm-$s" --quiet > /dev/null
    python3 - "$OUT/qm-$s" "$LR" "$s" >> "$OUT/peers.jsonl" <<'PY'
import json, sys, csv
d, lr, seed = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
rows = list(csv.DictReader(open(d + "/history.csv")))
secs = sorted(float(r["seconds"]) for r in rows[1:])
res = json.load(open(d + "/result.json"))
print(json.dumps({"peer": "qmomentum", "lr": lr, "seed": seed, "epoch_s": secs[len(secs) // 2], "test_accuracy": res["test_accuracy"]}))
PY
done
python3 - "$OUT/peers.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
by = {}
for r in rows:
    by.setdefault(r["peer"], []).append(r)
qm = by["qmomentum"]
qt = statistics.median(r["epoch_s"] for r in qm)
qa = statistics.mean(r["test_accuracy"] for r in qm)
print("| trainer | median epoch s | mean test accuracy | epoch time / qmomentum |")
print("|---|---|---|---|")
for peer, rs in by.items():
    t = statistics.median(r["epoch_s"] for r in rs)
    acc = statistics.mean(r["test_accuracy"] for r in rs)
    print(f"| {peer} | {t:.3f} | {acc:.4f} | {t / qt:.2f}× |")
PY
echo "raw results: $OUT/peers.jsonl"
