#!/usr/bin/env bash
# Side-by-side integer inference (not part of CI): TFLite int8, onnxruntime int8 (static QDQ,
# U8S8) and onnxruntime running qmomentum's own W8A8 ONNX export against qmomentum-runtime int8
# and fully binary, on the design document's MLP and the
# 10 000 Fashion-MNIST test images, 2 threads, each runtime in a fresh process, interleaved.
#   bash bench/peers/infer.sh [ROUNDS] [NET]     (default 3, mlp)
# NET=cnn-small: the CNN issue's network instead, TFLite int8 (Keras, 1 epoch) against
# qmomentum-runtime int8 (W8A8 QAT, 1 epoch), the same interleaving (no onnxruntime model).
# Prints one JSON line per runtime and round, then medians over the rounds.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${1:-3}
NET=${2:-mlp}
VENV=${VENV:-/tmp/qmomentum-peers-venv}
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import onnxruntime, onnx, tensorflow" 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q 'tensorflow-cpu==2.21.*' onnx onnxruntime numpy
fi
cargo build --release -q -p qmomentum-cli
QM=./target/release/qmomentum
DATA=data/fashion-mnist
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
if [ "$NET" = cnn-small ]; then
    (cd bench/peers && "$VENV/bin/python" infer_ref.py prepare --net cnn-small --out "$OUT/peers" --data "../../$DATA" >/dev/null 2>&1)
    $QM train --model cnn-small --quant w8a8 --lr 0.01 --epochs 1 --out "$OUT/cnn" --quiet --data "$DATA" >/dev/null
    $QM export "$OUT/cnn/checkpoint.safetensors" -o "$OUT/cnn.qmm" >/dev/null
    for _ in $(seq "$ROUNDS"); do
        (cd bench/peers && "$VENV/bin/python" infer_ref.py time --net cnn-small --runtime tflite --out "$OUT/peers" \
            --data "../../$DATA" 2>/dev/null | grep '^{')
        $QM bench runtime --model "$OUT/cnn.qmm" --data "$DATA" --threads 2 --rounds 7 |
            sed 's/^{/{"runtime": "qmomentum_cnn_w8a8", /'
    done | tee "$OUT/all.jsonl"
else
(cd bench/peers && "$VENV/bin/python" infer_ref.py prepare --out "$OUT/peers" --data "../../$DATA" >/dev/null 2>&1)
for q in w8a8 binary-all; do
    $QM train --quant "$q" --lr 0.01 --epochs 1 --out "$OUT/$q" --quiet --data "$DATA" >/dev/null
    $QM export "$OUT/$q/checkpoint.safetensors" -o "$OUT/$q.qmm" >/dev/null
done
$QM export "$OUT/w8a8/checkpoint.safetensors" --format onnx -o "$OUT/w8a8.onnx" >/dev/null
for _ in $(seq "$ROUNDS"); do
    for r in tflite ort; do
        (cd bench/peers && "$VENV/bin/python" infer_ref.py time --runtime $r --out "$OUT/peers" --data "../../$DATA" 2>/dev/null | grep '^{')
    done
    (cd bench/peers && "$VENV/bin/python" infer_ref.py time --runtime ort-qmomentum --model "$OUT/w8a8.onnx" \
        --out "$OUT/peers" --data "../../$DATA" 2>/dev/null | grep '^{')
    for q in w8a8 binary-all; do
        $QM bench runtime --model "$OUT/$q.qmm" --data "$DATA" --threads 2 --rounds 7 |
            sed "s/^{/{\"runtime\": \"qmomentum_$q\", /"
    done
done | tee "$OUT/all.jsonl"
fi
python3 - "$OUT/all.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
by = {}
for r in rows:
    by.setdefault(r["runtime"], []).append(r)
print("| runtime | batch-1 latency µs (median) | batch-10000 samples/s (median [min–max]) | test accuracy |")
print("|---|---|---|---|")
for name, rs in by.items():
    thr = [r["samples_per_s"] for r in rs]
    lat = statistics.median(r["latency_s"] for r in rs) * 1e6
    print(f"| {name} | {lat:.2f} | {statistics.median(thr):,.0f} [{min(thr):,.0f}–{max(thr):,.0f}] | {rs[0]['accuracy']:.4f} |")
PY
