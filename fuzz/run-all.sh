#!/usr/bin/env bash
# Runs every fuzz target (two at a time, one per core) and prints the executions of each.
#   bash fuzz/run-all.sh [SECONDS_PAIR1] [SECONDS_PAIR2]      needs: cargo install cargo-fuzz; nightly
set -uo pipefail
cd "$(dirname "$0")"
T1=${1:-240}
T2=${2:-180}
mkdir -p corpus logs
for t in idx checkpoint config model; do mkdir -p corpus/$t; cp -n seeds/$t/* corpus/$t/ 2>/dev/null; done
run() { cargo +nightly fuzz run "$1" "corpus/$1" -- -max_total_time="$2" -rss_limit_mb=2048 -malloc_limit_mb=1024 > "logs/$1.log" 2>&1; echo "$1: exit $?"; }
run idx "$T1" & run checkpoint "$T1" & wait
run config "$T2" & run model "$T2" & wait
total=0
for t in idx checkpoint config model; do
    n=$(grep -oE '^Done [0-9]+ runs' "logs/$t.log" | awk '{print $2}')
    crash=$(ls artifacts/$t 2>/dev/null | wc -l)
    echo "$t: ${n:-0} executions, $crash crash artifacts"
    total=$((total + ${n:-0}))
done
echo "total: $total executions"
