#!/usr/bin/env bash
# Data-parallel training on this machine, side by side in one run: 1 process × 2 threads against
# 2 MPI ranks × 1 thread (and the rank-order sum), same global batch, interleaved rounds; then
# the allreduce time per buffer size on 2, 3 and 4 local ranks. Needs the `mpi` build:
#   cargo build --release -p qmomentum-cli --features mpi
# Usage: bash bench/distributed/run.sh [ROUNDS] [OUT_DIR]
# (On 2 cores this shows the cost of communication, not a speed-up: see doc/distributed.md.)
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-3}
out=${2:-$(mktemp -d)}
q=${QMOMENTUM:-target/release/qmomentum}
mpi=(mpirun --oversubscribe)
[ "$(id -u)" = 0 ] && mpi+=(--allow-run-as-root)
mkdir -p "$out"
run() { # name model batch epochs ranks [flags…]
    local name=$1 model=$2 batch=$3 epochs=$4 ranks=$5; shift 5
    local dir="$out/$name-r$r" launch=()
    [ "$ranks" -gt 1 ] && launch=("${mpi[@]}" -np "$ranks")
    rm -rf "$dir"
    "${launch[@]}" "$q" train --model "$model" --batch-size "$batch" --epochs "$epochs" --out "$dir" --quiet "$@" >/dev/null
}
for r in $(seq "$rounds"); do
    run mlp-1x2 mlp 128 4 1 --threads 2
    run mlp-2x1 mlp 128 4 2 --distributed
    run mlp-2x1-order mlp 128 4 2 --distributed --reduce-in-rank-order
    run cnn-1x2 cnn-small 256 1 1 --threads 2
    run cnn-2x1 cnn-small 256 1 2 --distributed
done
python3 - "$out" "$rounds" <<'PY'
import json, statistics, sys, os
out, rounds = sys.argv[1], int(sys.argv[2])
def epochs(name):
    rows = []
    for r in range(1, rounds + 1):
        h = json.load(open(os.path.join(out, f"{name}-r{r}", "history.json")))["epochs"]
        rows += h[1:] if len(h) > 1 else h  # the MLP's first epoch is warm-up
    return rows
print("| run | global batch | median epoch s | samples/s | allreduce share of the epoch | test acc |")
print("|---|---:|---:|---:|---:|---:|")
for name, label, batch in [("mlp-1x2", "MLP, 1 process × 2 threads", 128), ("mlp-2x1", "MLP, 2 ranks × 1 thread", 128),
                           ("mlp-2x1-order", "MLP, 2 ranks × 1 thread, rank-order sums", 128),
                           ("cnn-1x2", "cnn-small, 1 process × 2 threads", 256), ("cnn-2x1", "cnn-small, 2 ranks × 1 thread", 256)]:
    e = epochs(name)
    sec = statistics.median(x["seconds"] for x in e)
    comm = [x["comm_seconds"] / x["seconds"] for x in e if x.get("comm_seconds") is not None]
    acc = json.load(open(os.path.join(out, f"{name}-r1", "result.json")))["test_accuracy"]
    share = f"{100 * statistics.median(comm):.1f} %" if comm else "–"
    print(f"| {label} | {batch} | {sec:.3f} | {60000 / sec:.0f} | {share} | {acc:.4f} |")
PY
for np in 2 3 4; do
    "${mpi[@]}" -np "$np" "$q" bench allreduce
done
