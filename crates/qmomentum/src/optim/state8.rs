//! 8-bit optimizer state: block-wise dynamic quantization of the momentum buffer (Dettmers et al.,
//! "8-bit Optimizers via Block-wise Quantization", ICLR 2022; bitsandbytes).
//!
//! A buffer is cut in blocks of [`BLOCK`] values; each block is normalised by its absolute
//! maximum and every value stored as the index of the nearest entry of a 256-entry *dynamic*
//! code (signed dynamic tree quantization: for decades 10⁻⁶ … 10⁰, 2^i evenly spaced means in
//! [0.1, 1] of each sign, plus 0 and 1 — bitsandbytes' `create_dynamic_map(signed=True)`), so small
//! and large values keep their relative precision. A step dequantizes a tensor's buffer, updates it
//! in f32 and quantizes it back. Tensors under [`MIN_VALUES`] values stay f32 (as bitsandbytes).
//! Memory: 1 byte per value plus 4 bytes per block, ≈ 0.25× of f32.

use std::sync::OnceLock;

/// Values per quantization block.
pub const BLOCK: usize = 2048;
/// Tensors smaller than this keep an f32 state.
pub const MIN_VALUES: usize = 4096;

/// The 256 code values, ascending.
pub fn dynamic_map() -> &'static [f32; 256] {
    static MAP: OnceLock<[f32; 256]> = OnceLock::new();
    MAP.get_or_init(|| {
        let mut data: Vec<f64> = Vec::with_capacity(256);
        let max_exponent_bits = 7i32;
        for i in 0..max_exponent_bits {
            // 2^i + 1 boundaries from 0.1 to 1, their 2^i midpoints, scaled to decade i − 6.
            let items = (1usize << i) + 1;
            let boundaries: Vec<f64> = (0..items).map(|k| 0.1 + 0.9 * k as f64 / (items - 1) as f64).collect();
            let scale = 10f64.powi(-(max_exponent_bits - 1) + i);
            for w in boundaries.windows(2) {
                let mean = (w[0] + w[1]) / 2.0;
                data.push(scale * mean);
                data.push(-scale * mean);
            }
        }
        data.push(0.0);
        data.push(1.0);
        data.sort_by(|a, b| a.total_cmp(b));
        let mut map = [0f32; 256];
        for (m, v) in map.iter_mut().zip(&data) {
            *m = *v as f32;
        }
        map
    })
}

/// The nearest entry by binary search (the definition; ties: the lower entry).
fn nearest_search(map: &[f32; 256], x: f32) -> u8 {
    let i = map.partition_point(|&m| m < x);
    if i == 0 {
        0
    } else if i == 256 {
        255
    } else if (x - map[i - 1]) <= (map[i] - x) {
        (i - 1) as u8
    } else {
        i as u8
    }
}

/// f32 → u32 in value order (negative values below positive ones).
fn ordered(x: f32) -> u32 {
    let b = x.to_bits();
    if b >> 31 == 1 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// The inverse of [`ordered`].
fn from_ordered(k: u32) -> f32 {
    f32::from_bits(if k >> 31 == 1 { k & 0x7FFF_FFFF } else { !k })
}

/// Per bfloat16 bucket (the top 16 bits of an f32): the code of the bucket's lowest value and the
/// lowest value of the bucket that takes the next code (+∞ when none does). The map's entries,
/// and so the midpoints between them, are further apart than a bucket is wide, so one threshold
/// per bucket is exact: `code = lo + (x ≥ threshold)` equals the binary search for every f32
/// (built by bisection against [`nearest_search`], checked by a test). This made the 8-bit state's
/// step a table lookup and a compare instead of a search.
fn bucket_table() -> &'static [(u8, f32)] {
    static TABLE: OnceLock<Vec<(u8, f32)>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let map = dynamic_map();
        (0..=u16::MAX as u32)
            .map(|key| {
                // The bucket's values in value order: from the bit patterns key<<16 .. +0xFFFF.
                let (a, b) = ((key << 16), (key << 16) | 0xFFFF);
                let (lo, hi) = {
                    let (x, y) = (ordered(f32::from_bits(a)), ordered(f32::from_bits(b)));
                    (x.min(y), x.max(y))
                };
                let code_lo = nearest_search(map, from_ordered(lo));
                let code_hi = nearest_search(map, from_ordered(hi));
                if code_lo == code_hi || from_ordered(lo).is_nan() {
                    return (code_lo, f32::INFINITY);
                }
                // Bisection for the first value (in order) that leaves code_lo.
                let (mut l, mut h) = (lo, hi);
                while h - l > 1 {
                    let m = l + (h - l) / 2;
                    if nearest_search(map, from_ordered(m)) == code_lo {
                        l = m;
                    } else {
                        h = m;
                    }
                }
                (code_lo, from_ordered(h))
            })
            .collect()
    })
}

/// Index of the entry of `map` nearest to `x` (ties: the lower one), by the bucket table.
#[inline]
fn nearest(_map: &[f32; 256], x: f32) -> u8 {
    let (code, thr) = bucket_table()[(x.to_bits() >> 16) as usize];
    code + (x >= thr) as u8
}

/// A buffer stored as 8-bit codes with one absmax per block.
#[derive(Clone, Debug, PartialEq)]
pub struct Quantized8 {
    /// One code per value.
    pub codes: Vec<u8>,
    /// One absmax per block of [`BLOCK`] values.
    pub absmax: Vec<f32>,
}

impl Quantized8 {
    /// A zero buffer of `n` values.
    pub fn zeros(n: usize) -> Self {
        let zero = nearest(dynamic_map(), 0.0);
        Quantized8 {
            codes: vec![zero; n],
            absmax: vec![0.0; n.div_ceil(BLOCK)],
        }
    }

    /// Values held.
    pub fn len(&self) -> usize {
        self.codes.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.codes.is_empty()
    }

    /// Bytes of state (codes and block maxima).
    pub fn bytes(&self) -> usize {
        self.codes.len() + 4 * self.absmax.len()
    }

    /// `out = dequantize(self)`.
    pub fn dequantize(&self, out: &mut [f32]) {
        let map = dynamic_map();
        for ((o, c), &a) in out.chunks_mut(BLOCK).zip(self.codes.chunks(BLOCK)).zip(&self.absmax) {
            for (v, &k) in o.iter_mut().zip(c) {
                *v = map[k as usize] * a;
            }
        }
    }

    /// `self = quantize(x)`, block by block.
    pub fn quantize(&mut self, x: &[f32]) {
        let map = dynamic_map();
        let _ = bucket_table();
        for ((xb, c), a) in x
            .chunks(BLOCK)
            .zip(self.codes.chunks_mut(BLOCK))
            .zip(self.absmax.iter_mut())
        {
            let m = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            *a = m;
            let inv = if m > 0.0 { 1.0 / m } else { 0.0 };
            for (k, &v) in c.iter_mut().zip(xb) {
                *k = nearest(map, v * inv);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The map of bitsandbytes' `create_dynamic_map(signed=True)`: 256 sorted values, 0 and 1
    /// included, the smallest magnitude 10⁻⁶·0.55, symmetric but for the extra +1.
    /// The bucket table gives the same code as a binary search, for every bucket's edges and
    /// for values between.
    #[test]
    fn bucket_lookup_equals_binary_search() {
        let map = dynamic_map();
        let brute = |x: f32| nearest_search(map, x);
        let mut x = -1.0f32;
        while x <= 1.0 {
            assert_eq!(nearest(map, x), brute(x), "{x}");
            x += 1.0 / 65_537.0;
        }
        // Every bucket at its ends, middle and around its threshold: one transition at most.
        for (key, &(_, thr)) in bucket_table().iter().enumerate() {
            let k = (key as u32) << 16;
            for bits in [k, k | 0x7FFF, k | 0xFFFF] {
                let x = f32::from_bits(bits);
                if x.is_finite() && x.abs() <= 1.0 {
                    assert_eq!(nearest(map, x), brute(x), "{x}");
                }
            }
            if thr.is_finite() {
                let before = from_ordered(ordered(thr) - 1);
                assert_eq!(nearest(map, thr), brute(thr), "{thr}");
                assert_eq!(nearest(map, before), brute(before), "{before}");
            }
        }
        for &v in map.iter() {
            for d in [-1e-7f32, 0.0, 1e-7] {
                assert_eq!(nearest(map, v + d), brute(v + d), "{}", v + d);
            }
        }
    }

    #[test]
    fn the_dynamic_map() {
        let m = dynamic_map();
        assert!(m.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(m[255], 1.0);
        assert!(m.contains(&0.0));
        // The top decade: 65 boundaries in [0.1, 1], the largest mean 1 − 0.9/128.
        assert!((m[0] + 0.992_968_75).abs() < 1e-6, "{}", m[0]);
        let smallest = m.iter().filter(|v| **v > 0.0).fold(1.0f32, |a, &b| a.min(b));
        assert!((smallest - 0.55e-6).abs() < 1e-12, "{smallest}");
    }

    /// Round trip: every value comes back as the code entry nearest to `x/absmax` (checked by brute
    /// force), a positive block max is exact, values above a tenth of the max are within half the top
    /// decade's step (0.9/128 of the max), and zero stays zero.
    #[test]
    fn round_trip_is_the_nearest_code() {
        let n = 5000;
        let x: Vec<f32> = (0..n)
            .map(|i| (i as f32 * 0.37).sin() * 10f32.powi(-((i % 5) as i32)))
            .collect();
        let mut q = Quantized8::zeros(n);
        q.quantize(&x);
        let mut y = vec![0.0; n];
        q.dequantize(&mut y);
        assert_eq!(q.absmax.len(), 3);
        assert_eq!(q.bytes(), n + 12);
        let map = dynamic_map();
        for (b, (xb, yb)) in x.chunks(BLOCK).zip(y.chunks(BLOCK)).enumerate() {
            let m = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for (&a, &c) in xb.iter().zip(yb) {
                let best = map.iter().fold(f32::INFINITY, |d, &v| d.min((a / m - v).abs()));
                assert!(((a / m) - c / m).abs() <= best + 1e-6, "block {b}: {a} → {c}");
                if a.abs() >= 0.1 * m {
                    // The top decade's step is 0.9/64 of the block max: half of it at most.
                    assert!((a - c).abs() <= 0.0071 * m, "block {b}: {a} → {c}");
                }
                if a == m {
                    assert_eq!(a, c, "a positive block max is exact (the map holds +1, not −1)");
                }
            }
        }
        let mut z = Quantized8::zeros(10);
        z.quantize(&[0.0; 10]);
        let mut back = [1.0f32; 10];
        z.dequantize(&mut back);
        assert_eq!(back, [0.0; 10]);
    }
}
