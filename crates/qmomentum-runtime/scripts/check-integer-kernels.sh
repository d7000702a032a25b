#!/usr/bin/env bash
# Disassembles the runtime's kernels and counts floating-point arithmetic/conversion
# instructions in each (dense, binary, convolution gather, pooling and the epilogues; a
# convolution's multiply-adds run in the dense kernels). Every kernel must have none except the two `dequantize` functions,
# the final i32 → f32 step. Plain vector moves (vmovaps/vmovups) are bit copies and not counted.
#
# Every listed kernel must exist as a function of its own in the binary: a kernel that is not
# found (renamed, or inlined into its caller) fails the check, since its instructions would go
# unchecked. Mark such a function `#[inline(never)]` or list the function it now lives in.
#
# Usage: crates/qmomentum-runtime/scripts/check-integer-kernels.sh   (from the workspace root)
set -euo pipefail
cargo build -p qmomentum-runtime --release --example bench_kernels >/dev/null
bin=${CARGO_TARGET_DIR:-target}/release/examples/bench_kernels
asm=$(mktemp)
trap 'rm -f "$asm"' EXIT
objdump -d --no-show-raw-insn -C "$bin" >"$asm"
float='\s(v?(add|sub|mul|div|min|max|sqrt|rcp|rsqrt|round|fmadd|fmsub|fnmadd|cmp|ucomi|comi)[a-z0-9]*(ps|pd|ss|sd)|v?cvt[a-z0-9]*(ps|pd|ss|sd)[a-z0-9]*)\s'
status=0
missing=()
with_float=()
for f in kernels::scalar::dense_i8 kernels::scalar::dense_i4 kernels::avx512::dense_i4 kernels::scalar::dense_bin_reference kernels::scalar::requant_u8 \
    kernels::scalar::sign_bits kernels::avx2::dense_i8 kernels::avx512::dense_i8 \
    kernels::amx::dense_i8 kernels::avx512::requant_u8 kernels::avx512::sign_bits kernels::binary::popcnt_rows \
    kernels::binary::avx512::dense_bin kernels::binary::avx512::run kernels::binary::avx512::dense_bin_sign \
    kernels::binary::popcnt_sign_rows kernels::scalar::dense_bin_sign engine::pack_bits_avx512 \
    engine::pack_bits_scalar kernels::conv::im2col kernels::pool::maxpool_u8 kernels::pool::avgpool_u8 \
    kernels::pool::global_avgpool_u8 kernels::bitimage::im2col_bits kernels::bitimage::maxpool_bits \
    kernels::scalar::dequantize kernels::avx512::dequantize; do
    body=$(awk -v f="<qmomentum_runtime::$f>:" 'index($0, f) { p = 1; next } p && /^$/ { p = 0 } p' "$asm")
    if [ -z "$body" ]; then
        echo "$f: NOT FOUND in $bin (inlined, renamed or removed?)" >&2
        missing+=("$f")
        status=1
        continue
    fi
    n=$(grep -cE "$float" <<<"$body" || true)
    echo "$f: $n float instructions"
    case "$f" in
    *dequantize) ;;
    *) [ "$n" -eq 0 ] || { with_float+=("$f"); status=1; } ;;
    esac
done
if [ ${#with_float[@]} -gt 0 ]; then
    echo "FAIL: floating-point instructions in integer kernel(s): ${with_float[*]}" >&2
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "FAIL: listed kernel(s) not found in the disassembly: ${missing[*]}" >&2
fi
if [ $status -eq 0 ]; then
    echo "OK: every listed kernel was found; the integer kernels contain no floating-point instructions"
fi
exit $status
