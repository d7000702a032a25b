//! Every kernel tier against the scalar reference, on random shapes that are deliberately not
//! multiples of the vector widths (4 inputs, 8/16 channels, 64 bits, 4-row tiles, the AMX
//! tiles' 16 rows and 64 inputs).

use proptest::prelude::*;
use qmomentum_runtime::kernels::{self, scalar, Dequant, KernelKind, PackedDenseBin, PackedDenseI8, Requant, SignBits};
use qmomentum_runtime::requant::{MULTIPLIER_MAX, MULTIPLIER_MIN, SHIFT_MAX, SHIFT_MIN};

mod common;
use common::tiers;

#[derive(Debug, Clone)]
struct DenseCase {
    inputs: usize,
    outputs: usize,
    rows: usize,
    x_pad: usize,
    acc_pad: usize,
    zp: u8,
    x: Vec<u8>,
    w: Vec<i8>,
    bias: Vec<i32>,
}

fn dense_case() -> impl Strategy<Value = DenseCase> {
    // Rows up to 69: the AMX tier takes 16 or more, in blocks of 32 (two tiles of ≤ 16 rows).
    (1usize..300, 1usize..70, 1usize..70, 0usize..5, 0usize..20, any::<u8>())
        .prop_flat_map(|(inputs, outputs, rows, x_pad, acc_pad, zp)| {
            let x_len = rows * (inputs + x_pad);
            (
                Just((inputs, outputs, rows, x_pad, acc_pad, zp)),
                prop::collection::vec(any::<u8>(), x_len),
                prop::collection::vec(i8::MIN..=i8::MAX, inputs * outputs),
                prop::collection::vec(prop_oneof![any::<i32>(), -100_000i32..100_000], outputs),
            )
        })
        .prop_map(|((inputs, outputs, rows, x_pad, acc_pad, zp), x, w, bias)| DenseCase {
            inputs,
            outputs,
            rows,
            x_pad,
            acc_pad,
            zp,
            x,
            w,
            bias,
        })
}

#[derive(Debug, Clone)]
struct BinCase {
    inputs: usize,
    outputs: usize,
    rows: usize,
    x_pad: usize,
    x: Vec<u64>,
    w: Vec<u64>,
}

/// Clears the bits past `inputs` in every `words`-word row.
fn clear_padding(v: &mut [u64], stride: usize, words: usize, inputs: usize) {
    if inputs.is_multiple_of(64) {
        return;
    }
    let keep = (1u64 << (inputs % 64)) - 1;
    for row in v.chunks_mut(stride) {
        if row.len() >= words {
            row[words - 1] &= keep;
        }
    }
}

fn bin_case() -> impl Strategy<Value = BinCase> {
    (1usize..300, 1usize..70, 1usize..9, 0usize..3)
        .prop_flat_map(|(inputs, outputs, rows, x_pad)| {
            let words = inputs.div_ceil(64);
            (
                Just((inputs, outputs, rows, x_pad)),
                prop::collection::vec(any::<u64>(), rows * (words + x_pad)),
                prop::collection::vec(any::<u64>(), outputs * words),
            )
        })
        .prop_map(|((inputs, outputs, rows, x_pad), mut x, mut w)| {
            let words = inputs.div_ceil(64);
            clear_padding(&mut x, words + x_pad, words, inputs);
            clear_padding(&mut w, words, words, inputs);
            BinCase {
                inputs,
                outputs,
                rows,
                x_pad,
                x,
                w,
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn dense_i8_tiers_match_reference(c in dense_case()) {
        let x_stride = c.inputs + c.x_pad;
        let acc_stride = c.outputs + c.acc_pad;
        let mut want = vec![0i32; c.rows * acc_stride];
        scalar::dense_i8_reference(&c.x, x_stride, c.rows, &c.w, &c.bias, c.zp, &mut want, acc_stride);
        let packed = PackedDenseI8::new(c.inputs, c.outputs, &c.w, &c.bias, c.zp);
        for kind in tiers() {
            // Sentinel values check that padding entries of `acc` are left alone.
            let mut got = vec![0x5a5a_5a5a_i32; c.rows * acc_stride];
            kernels::dense_i8(kind, &packed, &c.x, x_stride, c.rows, &mut got, acc_stride).unwrap();
            for r in 0..c.rows {
                let row = &got[r * acc_stride..(r + 1) * acc_stride];
                prop_assert_eq!(&row[..c.outputs], &want[r * acc_stride..r * acc_stride + c.outputs], "{:?} row {}", kind, r);
                prop_assert!(row[c.outputs..].iter().all(|&v| v == 0x5a5a_5a5a), "{:?} wrote past outputs", kind);
            }
        }
    }

    /// The 4-bit storage: codes in [-8, 7] (or [-2, 1], 2-bit models) packed as nibbles, every
    /// tier against the scalar reference and against the int8 packing of the same codes.
    #[test]
    fn dense_i4_tiers_match_reference(c in dense_case(), two_bit in any::<bool>()) {
        let (lo, span) = if two_bit { (-2i32, 4i32) } else { (-8, 16) };
        let w: Vec<i8> = c.w.iter().map(|&v| (lo + (i32::from(v) + 128) % span) as i8).collect();
        let x_stride = c.inputs + c.x_pad;
        let acc_stride = c.outputs + c.acc_pad;
        let mut want = vec![0i32; c.rows * acc_stride];
        scalar::dense_i8_reference(&c.x, x_stride, c.rows, &w, &c.bias, c.zp, &mut want, acc_stride);
        let packed4 = PackedDenseI8::new_4bit(c.inputs, c.outputs, &w, &c.bias, c.zp);
        prop_assert_eq!(packed4.weight_bits(), 4);
        let packed8 = PackedDenseI8::new(c.inputs, c.outputs, &w, &c.bias, c.zp);
        for kind in tiers() {
            for (bits, packed) in [(4, &packed4), (8, &packed8)] {
                let mut got = vec![0x5a5a_5a5a_i32; c.rows * acc_stride];
                kernels::dense_i8(kind, packed, &c.x, x_stride, c.rows, &mut got, acc_stride).unwrap();
                for r in 0..c.rows {
                    let row = &got[r * acc_stride..(r + 1) * acc_stride];
                    prop_assert_eq!(&row[..c.outputs], &want[r * acc_stride..r * acc_stride + c.outputs], "{:?} {}-bit row {}", kind, bits, r);
                    prop_assert!(row[c.outputs..].iter().all(|&v| v == 0x5a5a_5a5a), "{:?} {}-bit wrote past outputs", kind, bits);
                }
            }
        }
    }

    #[test]
    fn dense_bin_tiers_match_reference(c in bin_case()) {
        let words = c.inputs.div_ceil(64);
        let x_stride = words + c.x_pad;
        let mut want = vec![0i32; c.rows * c.outputs];
        scalar::dense_bin_reference(&c.x, x_stride, c.rows, c.inputs, &c.w, c.outputs, &mut want, c.outputs);
        // The ±1 dot product from its definition, for one entry.
        let bit = |v: &[u64], i: usize| if v[i / 64] >> (i % 64) & 1 == 1 { 1i32 } else { -1 };
        let naive: i32 = (0..c.inputs).map(|i| bit(&c.x, i) * bit(&c.w, i)).sum();
        prop_assert_eq!(want[0], naive);
        let packed = PackedDenseBin::new(c.inputs, c.outputs, &c.w);
        for kind in tiers() {
            let mut got = vec![0i32; c.rows * c.outputs];
            kernels::dense_bin(kind, &packed, &c.x, x_stride, c.rows, &mut got, c.outputs).unwrap();
            prop_assert_eq!(&got, &want, "{:?}", kind);
        }
    }

    #[test]
    fn fused_dense_bin_sign_equals_dense_bin_then_sign_bits(
        c in bin_case(),
        seed in any::<u64>(),
        out_pad in prop_oneof![Just(0u64), Just(u64::MAX)],
    ) {
        let words = c.inputs.div_ceil(64);
        let x_stride = words + c.x_pad;
        let mut acc = vec![0i32; c.rows * c.outputs];
        scalar::dense_bin_reference(&c.x, x_stride, c.rows, c.inputs, &c.w, c.outputs, &mut acc, c.outputs);
        // Thresholds around the dot products' range, so both outcomes and the equality case
        // (`dot == threshold`) occur; a dot of the same parity as `in` can equal t.
        let n = c.inputs as i64;
        let mut state = seed | 1;
        let t: Vec<i32> = (0..c.outputs)
            .map(|j| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                match state % 4 {
                    0 => acc[j],
                    1 => acc[j] + 1,
                    _ => ((state >> 8) as i64 % (2 * n + 5) - n - 2) as i32,
                }
            })
            .collect();
        let out_words = c.outputs.div_ceil(64);
        let mut want = vec![0u64; c.rows * out_words];
        let sign = SignBits::new(&t);
        kernels::sign_bits(KernelKind::Scalar, &sign, &acc, c.outputs, c.rows, &mut want, out_words).unwrap();
        let packed = PackedDenseBin::new(c.inputs, c.outputs, &c.w);
        for kind in tiers() {
            // Garbage (all ones) or zeros in the output beforehand: padding must come out 0.
            let mut got = vec![out_pad; c.rows * out_words];
            kernels::dense_bin_sign(kind, &packed, &sign, &c.x, x_stride, c.rows, &mut got, out_words).unwrap();
            prop_assert_eq!(&got, &want, "{:?}", kind);
        }
    }

    #[test]
    fn requant_tiers_match_reference(
        (n, rows, acc, m, r) in (1usize..70, 1usize..5).prop_flat_map(|(n, rows)| (
            Just(n), Just(rows),
            prop::collection::vec(prop_oneof![any::<i32>(), -5000i32..5000], n * rows),
            prop::collection::vec(prop_oneof![Just(0), MULTIPLIER_MIN..=MULTIPLIER_MAX], n),
            prop::collection::vec(prop_oneof![SHIFT_MIN..=SHIFT_MAX, 0i32..12], n),
        )),
        (z, qmax) in any::<u8>().prop_flat_map(|z| (Just(z), prop_oneof![Just(255u8), z..=255])),
        relu in any::<bool>(),
    ) {
        let p = Requant::new(&m, &r, z, qmax, relu);
        let lo = if relu { z } else { 0 };
        let want: Vec<u8> = (0..rows * n)
            .map(|i| qmomentum_runtime::requant::requantize_u8(acc[i], m[i % n], r[i % n], z, lo, qmax))
            .collect();
        for kind in tiers() {
            let mut got = vec![0u8; rows * (n + 3)];
            kernels::requant_u8(kind, &p, &acc, n, rows, &mut got, n + 3).unwrap();
            for b in 0..rows {
                prop_assert_eq!(&got[b * (n + 3)..b * (n + 3) + n], &want[b * n..(b + 1) * n], "{:?}", kind);
                prop_assert!(got[b * (n + 3) + n..(b + 1) * (n + 3)].iter().all(|&v| v == 0));
            }
        }
    }

    #[test]
    fn sign_bits_tiers_match_reference(
        (n, rows, acc, t) in (1usize..200, 1usize..5).prop_flat_map(|(n, rows)| (
            Just(n), Just(rows),
            prop::collection::vec(-50i32..50, n * rows),
            prop::collection::vec(-10i32..10, n),
        )),
    ) {
        let words = n.div_ceil(64);
        let mut want = vec![0u64; rows * words];
        for b in 0..rows {
            for j in 0..n {
                if acc[b * n + j] >= t[j] {
                    want[b * words + j / 64] |= 1 << (j % 64);
                }
            }
        }
        let p = SignBits::new(&t);
        for kind in tiers() {
            let mut got = vec![u64::MAX; rows * words];
            kernels::sign_bits(kind, &p, &acc, n, rows, &mut got, words).unwrap();
            prop_assert_eq!(&got, &want, "{:?}", kind);
        }
    }

    #[test]
    fn dequantize_tiers_match_reference(
        (n, rows, acc, scale, bias) in (1usize..40, 1usize..5).prop_flat_map(|(n, rows)| (
            Just(n), Just(rows),
            prop::collection::vec(any::<i32>(), n * rows),
            prop::collection::vec(-1e3f32..1e3, n),
            prop::option::of(prop::collection::vec(-1e3f32..1e3, n)),
        )),
    ) {
        let p = Dequant::new(&scale, bias.as_deref());
        let want: Vec<u32> = (0..rows * n)
            .map(|i| {
                let j = i % n;
                let y = acc[i] as f32 * scale[j];
                bias.as_ref().map_or(y, |b| y + b[j]).to_bits()
            })
            .collect();
        for kind in tiers() {
            let mut got = vec![0f32; rows * n];
            kernels::dequantize(kind, &p, &acc, n, rows, &mut got, n).unwrap();
            let got: Vec<u32> = got.iter().map(|v| v.to_bits()).collect();
            prop_assert_eq!(&got, &want, "{:?}", kind);
        }
    }
}

#[test]
fn four_bit_packing_is_half_a_byte_per_weight_per_tier() {
    let (k, n) = (784, 128);
    let w: Vec<i8> = (0..k * n).map(|i| (i % 16) as i8 - 8).collect();
    let bias = vec![0; n];
    let p4 = PackedDenseI8::new_4bit(k, n, &w, &bias, 0);
    let p8 = PackedDenseI8::new(k, n, &w, &bias, 0);
    assert_eq!(PackedDenseI8::new_narrowest(k, n, &w, &bias, 0).weight_bits(), 4);
    let tiers4 = 1 + usize::from(KernelKind::Avx512Vnni.is_available());
    // Row-major nibbles plus, with VNNI, the nibble tile layout (k = 784 is a whole number of
    // 8-input pairs and n of 16-channel groups, so there is no padding).
    assert_eq!(p4.resident_weight_bytes(), tiers4 * k * n / 2);
    assert!(p8.resident_weight_bytes() >= k * n);
    let mut w9 = w.clone();
    w9[5] = 9;
    assert_eq!(PackedDenseI8::new_narrowest(k, n, &w9, &bias, 0).weight_bits(), 8);
}

#[test]
fn detect_picks_an_available_tier() {
    let best = KernelKind::detect();
    assert!(best.is_available());
    assert!(KernelKind::available().contains(&KernelKind::Scalar));
    assert_eq!(KernelKind::available().last(), Some(&best));
    eprintln!("kernel tiers on this CPU: {:?}", KernelKind::available());
}

#[test]
fn extreme_accumulators_wrap_identically() {
    // 300 inputs of 255 against weights of ±127 with a bias near i32::MAX: wrapping must agree.
    let (k, n) = (300, 33);
    let x = vec![255u8; k];
    let w: Vec<i8> = (0..k * n).map(|i| if i % 3 == 0 { -127 } else { 127 }).collect();
    let bias: Vec<i32> = (0..n).map(|j| i32::MAX - j as i32).collect();
    let mut want = vec![0; n];
    scalar::dense_i8_reference(&x, k, 1, &w, &bias, 255, &mut want, n);
    let packed = PackedDenseI8::new(k, n, &w, &bias, 255);
    for kind in KernelKind::available() {
        let mut got = vec![0; n];
        kernels::dense_i8(kind, &packed, &x, k, 1, &mut got, n).unwrap();
        assert_eq!(got, want, "{kind:?}");
    }
}
