//! Low-bit storage of int8 weight codes: 4 or 2 bits per code in the file.
//!
//! A `dense_i8` or `conv2d_i8` layer whose codes all fit a narrower signed range is stored with
//! the layer field `weight_bits` (4 or 2; 8, the default, is the plain I8 tensor) and its
//! `layers.i.weight` as a U8 tensor of shape `[out, ceil(k·bits/8)]`, `k` the codes per output
//! channel (`in`, or `kh·kw·c/groups`):
//! - 4 bits: two codes per byte, code `2m` in the low nibble (bits 0–3) of byte `m`, code
//!   `2m + 1` in the high nibble; each nibble is the code's 4-bit two's complement, [-8, 7].
//! - 2 bits: four codes per byte, code `4m + t` in bits `2t..2t+2` of byte `m` (lowest bits
//!   first), each the code's 2-bit two's complement, [-2, 1] (ternary models use {-1, 0, 1}).
//!
//! Every row starts on a byte; the bits after a row's last code are zero.
//!
//! The in-memory [`crate::Layer`] always holds the codes as `Vec<i8>`: the reader unpacks, the
//! writer packs with the narrowest width that holds every code of the layer
//! ([`narrowest_bits`]).

use safetensors::Dtype;

use crate::error::Error;
use crate::format::{Fields, Tensors, TensorsOut};

/// The weight widths the format allows.
pub const WEIGHT_BITS: [u8; 3] = [2, 4, 8];

/// The smallest width in [`WEIGHT_BITS`] whose signed range holds every code: 2 for [-2, 1],
/// 4 for [-8, 7], else 8.
pub fn narrowest_bits(codes: &[i8]) -> u8 {
    let (lo, hi) = codes.iter().fold((0i8, 0i8), |(lo, hi), &c| (lo.min(c), hi.max(c)));
    if lo >= -2 && hi <= 1 {
        2
    } else if lo >= -8 && hi <= 7 {
        4
    } else {
        8
    }
}

/// Bytes per row of `k` codes at `bits` bits.
pub fn row_bytes(k: usize, bits: u8) -> usize {
    match bits {
        2 => k.div_ceil(4),
        4 => k.div_ceil(2),
        _ => k,
    }
}

/// Packs `rows` rows of `k` codes (each within the signed `bits`-bit range, `bits` 2 or 4)
/// into `rows · row_bytes(k, bits)` bytes, as the module doc describes.
pub(crate) fn pack(codes: &[i8], rows: usize, k: usize, bits: u8) -> Vec<u8> {
    debug_assert!(bits == 2 || bits == 4);
    debug_assert_eq!(codes.len(), rows * k);
    let per = 8 / usize::from(bits);
    let mask = (1u8 << bits) - 1;
    let rb = row_bytes(k, bits);
    let mut out = vec![0u8; rows * rb];
    for (src, dst) in codes.chunks_exact(k.max(1)).zip(out.chunks_exact_mut(rb.max(1))) {
        for (m, chunk) in src.chunks(per).enumerate() {
            dst[m] = chunk
                .iter()
                .enumerate()
                .fold(0u8, |b, (t, &c)| b | ((c as u8 & mask) << (t * usize::from(bits))));
        }
    }
    out
}

/// Sign-extends the `bits`-bit two's complement code at bit `shift` of `byte`.
#[inline]
pub(crate) fn code_at(byte: u8, shift: u32, bits: u32) -> i8 {
    ((byte << (8 - bits - shift)) as i8) >> (8 - bits)
}

/// Unpacks [`pack`]ed bytes; the padding bits after each row's last code must be zero.
pub(crate) fn unpack(name: &str, bytes: &[u8], rows: usize, k: usize, bits: u8) -> Result<Vec<i8>, Error> {
    let per = 8 / usize::from(bits);
    let rb = row_bytes(k, bits);
    debug_assert_eq!(bytes.len(), rows * rb);
    let mut out = Vec::with_capacity(rows * k);
    for (r, row) in bytes.chunks_exact(rb.max(1)).take(rows).enumerate() {
        for kk in 0..k {
            let shift = ((kk % per) * usize::from(bits)) as u32;
            out.push(code_at(row[kk / per], shift, u32::from(bits)));
        }
        let used = (k % per) * usize::from(bits);
        if used > 0 {
            let last = row[rb - 1];
            let padding = last >> used;
            if padding != 0 {
                return Err(Error::value(
                    name,
                    format!("row {r} byte {}", rb - 1),
                    format!(
                        "0x{last:02x}: the padding bits {used}..8 after the row's last {bits}-bit code must be zero"
                    ),
                ));
            }
        }
    }
    Ok(out)
}

/// Reads a layer's optional `weight_bits` field: 8 when absent, else 2, 4 or 8.
pub(crate) fn read_bits(f: &mut Fields<'_>) -> Result<u8, Error> {
    match f.opt_uint("weight_bits", u64::MAX)? {
        None => Ok(8),
        Some(b) => match u8::try_from(b) {
            Ok(b) if WEIGHT_BITS.contains(&b) => Ok(b),
            _ => Err(Error::field(f.name("weight_bits"), format!("{b}, expected 2, 4 or 8"))),
        },
    }
}

/// Reads the weight tensor `name` of `rows` rows of `k` codes: I8 of shape `shape8` at 8 bits,
/// else U8 `[rows, row_bytes(k, bits)]`, unpacked.
pub(crate) fn read_codes(
    t: &mut Tensors<'_>,
    name: &str,
    bits: u8,
    rows: usize,
    k: usize,
    shape8: &[usize],
) -> Result<Vec<i8>, Error> {
    if bits == 8 {
        return t.i8s(name, shape8);
    }
    let rb = row_bytes(k, bits);
    if let Some((dtype, shape)) = t.info(name) {
        if dtype != Dtype::U8 {
            return Err(Error::tensor(
                name,
                format!("dtype {dtype}, expected U8 for weight_bits {bits}"),
            ));
        }
        if shape != [rows, rb] {
            let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            return Err(Error::tensor(
                name,
                format!(
                    "shape {shape:?} ({} bytes), expected [{rows}, {rb}] ({} bytes) for weight_bits {bits}: {rows} rows of {k} codes, {rb} bytes each",
                    n.map_or("too many".to_string(), |n| n.to_string()),
                    rows.checked_mul(rb).map_or("too many".to_string(), |n| n.to_string())
                ),
            ));
        }
    }
    let bytes = t.raw(name, Dtype::U8, &[rows, rb])?;
    unpack(name, bytes, rows, k, bits)
}

/// Writes a weight tensor of `rows` rows of `k` codes at the narrowest width that holds them,
/// but at least `t.min_weight_bits`; returns the width (the caller writes `weight_bits` when it is not 8).
pub(crate) fn write_codes(
    t: &mut TensorsOut,
    name: String,
    codes: &[i8],
    rows: usize,
    k: usize,
    shape8: Vec<usize>,
) -> u8 {
    let bits = narrowest_bits(codes).max(t.min_weight_bits);
    if bits == 8 {
        t.i8s(name, shape8, codes);
    } else {
        t.u8s(name, vec![rows, row_bytes(k, bits)], pack(codes, rows, k, bits));
    }
    bits
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_unpack_round_trip_and_bit_order() {
        // Low nibble first, two's complement.
        assert_eq!(pack(&[1, -1, -8], 1, 3, 4), vec![0xf1, 0x08]);
        // Lowest bits first: 1 → 01, -1 → 11, 0 → 00, -2 → 10; then 1 → 01 and zero padding.
        assert_eq!(pack(&[1, -1, 0, -2, 1], 1, 5, 2), vec![0b10_00_11_01, 0b01]);
        for bits in [2u8, 4] {
            let lo = -(1i8 << (bits - 1));
            let hi = (1i8 << (bits - 1)) - 1;
            for k in 1..12 {
                let span = i32::from(hi) - i32::from(lo) + 1;
                let codes: Vec<i8> = (0..3 * k as i32)
                    .map(|i| (i32::from(lo) + i * 5 % span) as i8)
                    .collect();
                let p = pack(&codes, 3, k, bits);
                assert_eq!(p.len(), 3 * row_bytes(k, bits));
                assert_eq!(unpack("w", &p, 3, k, bits).unwrap(), codes);
            }
        }
    }

    #[test]
    fn padding_must_be_zero() {
        let err = unpack("layers.0.weight", &[0xf1, 0x18], 1, 3, 4).unwrap_err();
        assert_eq!(
            err.to_string(),
            "tensor 'layers.0.weight' row 0 byte 1: 0x18: the padding bits 4..8 after the row's last 4-bit code must be zero"
        );
        assert!(unpack("w", &[0b0100_0001], 1, 2, 2).is_err());
        assert!(unpack("w", &[0b0000_0001], 1, 2, 2).is_ok());
    }

    #[test]
    fn narrowest() {
        assert_eq!(narrowest_bits(&[]), 2);
        assert_eq!(narrowest_bits(&[-1, 0, 1]), 2);
        assert_eq!(narrowest_bits(&[-2, 1]), 2);
        assert_eq!(narrowest_bits(&[2]), 4);
        assert_eq!(narrowest_bits(&[-8, 7]), 4);
        assert_eq!(narrowest_bits(&[-9]), 8);
        assert_eq!(narrowest_bits(&[8]), 8);
    }
}
