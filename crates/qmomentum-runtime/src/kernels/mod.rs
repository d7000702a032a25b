//! Integer kernels: dense layers (int8 and binary) and the per-channel output steps.
//!
//! # Why hand-written kernels
//! The hot loop is a u8×i8 → i32 matrix product with a per-channel fixed-point epilogue. BLAS
//! and the float GEMM crates do not offer an exact integer u8×i8 GEMM, and none fuses this
//! format's requantization; `_mm512_dpbusd_epi32` (AVX-512 VNNI) does 64 such multiply-adds per
//! instruction, so a small register-blocked kernel over pre-packed weights is both the fastest
//! and the simplest exact option.
//!
//! # Integer by construction
//! The dense kernels take u8/i8/u64 inputs and produce i32 accumulators; [`requant_u8`] maps
//! i32 → u8 and [`sign_bits`] maps i32 → bits with integer arithmetic only. [`dequantize`] is
//! the single function that produces `f32`, and the engine only calls it for the last layer.
//!
//! # Tiers
//! [`KernelKind::Scalar`] runs anywhere; [`KernelKind::Avx2`] needs AVX2 and POPCNT;
//! [`KernelKind::Avx512Vnni`] needs AVX-512 F/BW/VL/VNNI (and uses VPOPCNTDQ for binary layers
//! when present). Every tier gives bit-identical results; [`KernelKind::detect`] picks the best.
//!
//! All kernel functions take row-major 2-D buffers described by `(rows, stride)`; they panic if
//! a buffer is too small for the shape (a programming error, never a data error).

pub mod bitimage;
pub mod conv;
pub mod pool;
pub mod scalar;

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod binary;

use crate::aligned::Aligned;
use crate::error::Error;

pub use crate::kind::KernelKind;
pub use conv::{ConvGeometry, Window};
pub use pool::DivRound;

/// `Ok` if this CPU can run `kind`, else [`Error::KernelUnavailable`].
fn check(kind: KernelKind) -> Result<(), Error> {
    if kind.is_available() {
        Ok(())
    } else {
        Err(Error::KernelUnavailable(kind))
    }
}

/// Whether the AMX tier can run here (CPU features and the OS's grant of the tile state).
#[cfg(target_arch = "x86_64")]
pub(crate) fn amx_available() -> bool {
    amx::available()
}

/// Channels per AVX-512 group (one zmm of i32).
pub(crate) const LANES: usize = 16;

/// Rounds `n` up to a multiple of [`LANES`]: the padded channel count of packed tensors.
pub(crate) fn padded(n: usize) -> usize {
    n.div_ceil(LANES) * LANES
}

/// Asserts that a `[rows, stride]` buffer of `len` elements holds `width` values per row.
fn check_2d(what: &str, len: usize, rows: usize, stride: usize, width: usize) {
    assert!(stride >= width, "{what}: stride {stride} < row width {width}");
    if rows > 0 {
        let need = (rows - 1) * stride + width;
        assert!(
            len >= need,
            "{what}: {len} elements, {rows} rows of stride {stride} need {need}"
        );
    }
}

/// An int8 dense layer's weights, packed once for every tier this CPU supports.
///
/// The input zero point is folded into the bias at pack time:
/// `Σ (x − z)·W + bias = Σ x·W + (bias − z·Σ W)`, so the kernels multiply the raw u8 input.
///
/// Two storages: [`PackedDenseI8::new`] keeps one byte per weight for every tier (int8);
/// [`PackedDenseI8::new_4bit`] keeps **4 bits per weight** (codes in [-8, 7]): the scalar tier
/// and the AVX-512 VNNI tier compute on the nibbles directly (the VNNI kernel expands them to
/// bytes in registers before `vpdpbusd`), so the resident packed weights are half a byte per
/// weight per tier. The AVX2 tier has no nibble kernel: the first time it runs a 4-bit layer it
/// builds (once, then keeps) its i16 layout from the nibbles.
#[derive(Clone, Debug)]
pub struct PackedDenseI8 {
    pub(crate) inputs: usize,
    pub(crate) outputs: usize,
    /// `[out, in]` as given (scalar tier); empty for a 4-bit layer.
    pub(crate) rowmajor: Aligned<i8>,
    /// `bias − z_in·Σ_k W[j,k]` (wrapping), zero-padded to a multiple of 16 channels.
    pub(crate) bias: Aligned<i32>,
    /// AVX2 layout, see `avx2.rs` (`None` for a 4-bit layer).
    pub(crate) avx2: Option<Aligned<i16>>,
    /// VNNI layout, see `avx512.rs` (`None` for a 4-bit layer).
    pub(crate) vnni: Option<Aligned<i8>>,
    /// The 4-bit storage, for a layer built with [`PackedDenseI8::new_4bit`].
    pub(crate) nibbles: Option<Nibbles>,
}

/// A 4-bit layer's weights.
#[derive(Clone, Debug)]
pub(crate) struct Nibbles {
    /// `[out, ceil(in/2)]`: the file's 4-bit layout (two's complement, low nibble first, a zero
    /// nibble after an odd row), for the scalar tier.
    pub(crate) rowmajor: Aligned<u8>,
    /// Bytes per row of `rowmajor`.
    pub(crate) row_bytes: usize,
    /// VNNI nibble layout, see `avx512.rs` (`pack4`).
    pub(crate) vnni: Option<Aligned<u8>>,
    /// The AVX2 tier's i16 layout, built from `rowmajor` on its first use.
    pub(crate) avx2: std::sync::OnceLock<Aligned<i16>>,
}

impl PackedDenseI8 {
    /// Packs `weight` (`[outputs, inputs]`, row-major) and `bias` (`[outputs]`), one byte per
    /// weight.
    ///
    /// # Panics
    /// If `inputs` or `outputs` is 0 or the slice lengths do not match them.
    pub fn new(inputs: usize, outputs: usize, weight: &[i8], bias: &[i32], input_zero_point: u8) -> PackedDenseI8 {
        let bias = Self::fold(inputs, outputs, weight, bias, input_zero_point);
        #[cfg(target_arch = "x86_64")]
        let (avx2, vnni) = (
            KernelKind::Avx2
                .is_available()
                .then(|| avx2::pack(inputs, outputs, weight)),
            KernelKind::Avx512Vnni
                .is_available()
                .then(|| avx512::pack(inputs, outputs, weight)),
        );
        #[cfg(not(target_arch = "x86_64"))]
        let (avx2, vnni) = (None, None);
        PackedDenseI8 {
            inputs,
            outputs,
            rowmajor: Aligned::from_slice(weight),
            bias,
            avx2,
            vnni,
            nibbles: None,
        }
    }

    /// Packs weights whose codes are all in [-8, 7] with 4 bits per weight (see the type's
    /// doc); the results equal [`PackedDenseI8::new`]'s on every tier.
    ///
    /// # Panics
    /// As [`PackedDenseI8::new`], and if a code is outside [-8, 7].
    pub fn new_4bit(inputs: usize, outputs: usize, weight: &[i8], bias: &[i32], input_zero_point: u8) -> PackedDenseI8 {
        let bias = Self::fold(inputs, outputs, weight, bias, input_zero_point);
        assert!(
            weight.iter().all(|&w| (-8..=7).contains(&w)),
            "4-bit dense layer with a code outside [-8, 7]"
        );
        let row_bytes = inputs.div_ceil(2);
        let rowmajor = Aligned::from_slice(&crate::lowbit::pack(weight, outputs, inputs, 4));
        #[cfg(target_arch = "x86_64")]
        let vnni = KernelKind::Avx512Vnni
            .is_available()
            .then(|| avx512::pack4(inputs, outputs, weight));
        #[cfg(not(target_arch = "x86_64"))]
        let vnni = None;
        PackedDenseI8 {
            inputs,
            outputs,
            rowmajor: Aligned::zeroed(0),
            bias,
            avx2: None,
            vnni: None,
            nibbles: Some(Nibbles {
                rowmajor,
                row_bytes,
                vnni,
                avx2: std::sync::OnceLock::new(),
            }),
        }
    }

    /// [`PackedDenseI8::new_4bit`] when every code is in [-8, 7] (4- and 2-bit layers), else
    /// [`PackedDenseI8::new`].
    pub fn new_narrowest(
        inputs: usize,
        outputs: usize,
        weight: &[i8],
        bias: &[i32],
        input_zero_point: u8,
    ) -> PackedDenseI8 {
        if crate::lowbit::narrowest_bits(weight) <= 4 {
            Self::new_4bit(inputs, outputs, weight, bias, input_zero_point)
        } else {
            Self::new(inputs, outputs, weight, bias, input_zero_point)
        }
    }

    /// Checks the shapes and folds the input zero point into the bias.
    fn fold(inputs: usize, outputs: usize, weight: &[i8], bias: &[i32], input_zero_point: u8) -> Aligned<i32> {
        assert!(inputs > 0 && outputs > 0, "empty dense_i8 layer");
        assert_eq!(weight.len(), inputs * outputs, "weight length");
        assert_eq!(bias.len(), outputs, "bias length");
        let mut folded = Aligned::<i32>::zeroed(padded(outputs));
        for j in 0..outputs {
            let colsum = weight[j * inputs..(j + 1) * inputs]
                .iter()
                .fold(0i32, |s, &w| s.wrapping_add(i32::from(w)));
            folded[j] = bias[j].wrapping_sub(i32::from(input_zero_point).wrapping_mul(colsum));
        }
        folded
    }

    /// Input features.
    pub fn inputs(&self) -> usize {
        self.inputs
    }

    /// Output channels.
    pub fn outputs(&self) -> usize {
        self.outputs
    }

    /// Bits per resident weight: 4 ([`PackedDenseI8::new_4bit`]) or 8.
    pub fn weight_bits(&self) -> u8 {
        if self.nibbles.is_some() {
            4
        } else {
            8
        }
    }

    /// Bytes of packed weights held in memory now, over all tiers (without the bias).
    pub fn resident_weight_bytes(&self) -> usize {
        let int8 = self.rowmajor.len()
            + self.avx2.as_ref().map_or(0, |a| 2 * a.len())
            + self.vnni.as_ref().map_or(0, |a| a.len());
        int8 + self.nibbles.as_ref().map_or(0, |n| {
            n.rowmajor.len() + n.vnni.as_ref().map_or(0, |a| a.len()) + n.avx2.get().map_or(0, |a| 2 * a.len())
        })
    }
}

/// `acc[b][j] = Σ_k (x[b][k] − z_in)·W[j][k] + bias[j]` for `rows` rows (i32, wrapping).
///
/// `x` is `[rows, x_stride]` u8, `acc` is `[rows, acc_stride]` i32; only the first
/// `outputs` entries of each `acc` row are written.
pub fn dense_i8(
    kind: KernelKind,
    w: &PackedDenseI8,
    x: &[u8],
    x_stride: usize,
    rows: usize,
    acc: &mut [i32],
    acc_stride: usize,
) -> Result<(), Error> {
    check(kind)?;
    check_2d("dense_i8 input", x.len(), rows, x_stride, w.inputs);
    check_2d("dense_i8 acc", acc.len(), rows, acc_stride, w.outputs);
    if let Some(n) = &w.nibbles {
        return dense_i4(kind, w, n, x, x_stride, rows, acc, acc_stride);
    }
    match kind {
        KernelKind::Scalar => scalar::dense_i8(w, x, x_stride, rows, acc, acc_stride),
        #[cfg(target_arch = "x86_64")]
        KernelKind::Avx2 => {
            let packed = w.avx2.as_ref().ok_or(Error::KernelUnavailable(kind))?;
            // SAFETY: `check(kind)?` above returned Ok, so `KernelKind::Avx2.is_available()`:
            // `is_x86_feature_detected!` found AVX2 (and POPCNT). The two `check_2d` calls above
            // asserted `(rows − 1)·stride + width ≤ len` for `x` (width `w.inputs`) and `acc`
            // (width `w.outputs`). `packed` is `w.avx2`, which `PackedDenseI8::new` built with
            // `avx2::pack(inputs, outputs, ..)` for this very layer: an `Aligned` buffer, so
            // 64-byte aligned and of the length the kernel reads.
            unsafe { avx2::dense_i8(w, packed, x, x_stride, rows, acc, acc_stride) }
        }
        #[cfg(target_arch = "x86_64")]
        KernelKind::Amx if amx::fits(w, rows) => {
            let packed = w.vnni.as_ref().ok_or(Error::KernelUnavailable(kind))?;
            // SAFETY: `check(kind)?` above returned Ok, so `KernelKind::Amx.is_available()`:
            // `amx::available()` is true. `packed` is `w.vnni`, the layout of `avx512::pack` for
            // this layer; `fits` holds (the guard); `check_2d` above asserted the sizes of `x`
            // and `acc` (and `acc_stride ≥ outputs`); `w.bias` is padded to a multiple of 16 by
            // `PackedDenseI8::fold`.
            unsafe { amx::dense_i8(w, packed, x, x_stride, rows, acc, acc_stride) }
        }
        #[cfg(target_arch = "x86_64")]
        KernelKind::Avx512Vnni | KernelKind::Amx => {
            let packed = w.vnni.as_ref().ok_or(Error::KernelUnavailable(kind))?;
            // SAFETY: `check(kind)?` above returned Ok, so `KernelKind::Avx512Vnni.is_available()`
            // (the AMX tier requires it):
            // `is_x86_feature_detected!` found AVX-512 F/BW/VL/VNNI. Sizes of `x` and `acc` were
            // asserted by `check_2d` above. `packed` is `w.vnni`, built by `avx512::pack` for
            // this layer in `PackedDenseI8::new`: an `Aligned` (64-byte) buffer of the length
            // the kernel reads.
            unsafe { avx512::dense_i8(w, packed, x, x_stride, rows, acc, acc_stride) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        _ => return Err(Error::KernelUnavailable(kind)),
    }
    Ok(())
}

/// [`dense_i8`] of a 4-bit layer; `check` and `check_2d` have been done by the caller.
#[allow(clippy::too_many_arguments)]
fn dense_i4(
    kind: KernelKind,
    w: &PackedDenseI8,
    n: &Nibbles,
    x: &[u8],
    x_stride: usize,
    rows: usize,
    acc: &mut [i32],
    acc_stride: usize,
) -> Result<(), Error> {
    match kind {
        KernelKind::Scalar => scalar::dense_i4(w, n, x, x_stride, rows, acc, acc_stride),
        #[cfg(target_arch = "x86_64")]
        KernelKind::Avx2 => {
            let packed = n.avx2.get_or_init(|| {
                let codes = crate::lowbit::unpack("", &n.rowmajor, w.outputs, w.inputs, 4)
                    .expect("packed by PackedDenseI8::new_4bit");
                avx2::pack(w.inputs, w.outputs, &codes)
            });
            // SAFETY: the caller (`dense_i8`) checked `kind` is available (AVX2 and POPCNT)
            // and asserted the sizes of `x` and `acc` with `check_2d`. `packed` was built by
            // `avx2::pack(w.inputs, w.outputs, ..)` for this layer: an `Aligned` buffer of the
            // length the kernel reads.
            unsafe { avx2::dense_i8(w, packed, x, x_stride, rows, acc, acc_stride) }
        }
        #[cfg(target_arch = "x86_64")]
        KernelKind::Avx512Vnni | KernelKind::Amx => {
            let packed = n.vnni.as_ref().ok_or(Error::KernelUnavailable(kind))?;
            // SAFETY: the caller (`dense_i8`) checked `kind` is available (AVX-512
            // F/BW/VL/VNNI) and asserted the sizes of `x` and `acc` with `check_2d`. `packed`
            // is `n.vnni`, built by `avx512::pack4(w.inputs, w.outputs, ..)` for this layer in
            // `PackedDenseI8::new_4bit`: an `Aligned` (64-byte) buffer of the length the
            // kernel reads.
            unsafe { avx512::dense_i4(w, packed, x, x_stride, rows, acc, acc_stride) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        _ => return Err(Error::KernelUnavailable(kind)),
    }
    Ok(())
}

/// A binary (±1) dense layer's weights, row-major and re-grouped for the SIMD tier.
#[derive(Clone, Debug)]
pub struct PackedDenseBin {
    pub(crate) inputs: usize,
    pub(crate) outputs: usize,
    pub(crate) words: usize,
    /// `[out, words]` as given.
    pub(crate) rowmajor: Aligned<u64>,
    /// `[ceil(out/8)][words][8]`, for VPOPCNTDQ (see `binary.rs`).
    pub(crate) grouped: Aligned<u64>,
}

impl PackedDenseBin {
    /// Packs `weight` (`[outputs, ceil(inputs/64)]`; bit b of word w is input `64·w + b`; bit 1
    /// means +1). Padding bits must be 0, in the weights and in the inputs given to the kernel.
    ///
    /// # Panics
    /// If `inputs` or `outputs` is 0, `inputs` exceeds `i32::MAX` (the dot product is an i32),
    /// or the slice length does not match.
    pub fn new(inputs: usize, outputs: usize, weight: &[u64]) -> PackedDenseBin {
        assert!(inputs > 0 && outputs > 0, "empty dense_bin layer");
        assert!(i32::try_from(inputs).is_ok(), "dense_bin layer with {inputs} inputs");
        let words = inputs.div_ceil(64);
        assert_eq!(weight.len(), words * outputs, "weight length");
        PackedDenseBin {
            inputs,
            outputs,
            words,
            rowmajor: Aligned::from_slice(weight),
            grouped: binary::pack(outputs, words, weight),
        }
    }

    /// Input bits.
    pub fn inputs(&self) -> usize {
        self.inputs
    }

    /// Output channels.
    pub fn outputs(&self) -> usize {
        self.outputs
    }

    /// u64 words per input row.
    pub fn words(&self) -> usize {
        self.words
    }
}

/// `dot[b][j] = in − 2·popcount(x[b] XOR W[j])` for `rows` rows.
///
/// `x` is `[rows, x_stride]` u64 words with zero padding bits, `acc` is `[rows, acc_stride]`.
pub fn dense_bin(
    kind: KernelKind,
    w: &PackedDenseBin,
    x: &[u64],
    x_stride: usize,
    rows: usize,
    acc: &mut [i32],
    acc_stride: usize,
) -> Result<(), Error> {
    check(kind)?;
    check_2d("dense_bin input", x.len(), rows, x_stride, w.words);
    check_2d("dense_bin acc", acc.len(), rows, acc_stride, w.outputs);
    // SAFETY: `check(kind)?` above returned Ok, so `kind.is_available()` on this CPU; the two
    // `check_2d` calls above asserted the sizes of `x` (`w.words` per row) and `acc`
    // (`w.outputs` per row). These are `binary::dense_bin`'s preconditions.
    unsafe { binary::dense_bin(kind, w, x, x_stride, rows, acc, acc_stride) };
    Ok(())
}

/// [`dense_bin`] followed by [`sign_bits`] in one pass: bit j of row b is
/// `in − 2·popcount(x[b] XOR W[j]) ≥ threshold[j]`, written to `out` (`out_words =
/// ceil(outputs/64)` u64 per row, padding bits 0) without an i32 accumulator in between.
///
/// The result equals `dense_bin` then `sign_bits` bit for bit, on every tier. The VPOPCNTDQ
/// kernel compares each channel's popcount with `⌊(in − threshold)/2⌋` and stores the 8-channel
/// compare mask as one byte, which saves the accumulator round trip (the separate `sign_bits`
/// pass was 12 % of the fully binary MLP's time).
#[allow(clippy::too_many_arguments)]
pub fn dense_bin_sign(
    kind: KernelKind,
    w: &PackedDenseBin,
    sign: &SignBits,
    x: &[u64],
    x_stride: usize,
    rows: usize,
    out: &mut [u64],
    out_words: usize,
) -> Result<(), Error> {
    check(kind)?;
    assert_eq!(sign.outputs, w.outputs, "dense_bin_sign thresholds");
    assert_eq!(out_words, w.outputs.div_ceil(64), "dense_bin_sign row words");
    check_2d("dense_bin_sign input", x.len(), rows, x_stride, w.words);
    check_2d("dense_bin_sign out", out.len(), rows, out_words, out_words);
    // SAFETY: `check(kind)?` above returned Ok, so `kind.is_available()` on this CPU; the
    // asserts above established `sign.outputs = w.outputs`, `out_words = ⌈outputs/64⌉`, and
    // (`check_2d`) the sizes of `x` (`w.words` per row) and `out` (`rows·out_words` words).
    // These are `binary::dense_bin_sign`'s preconditions.
    unsafe { binary::dense_bin_sign(kind, w, sign, x, x_stride, rows, out, out_words) };
    Ok(())
}

/// Per-channel fixed-point parameters of a `u8` / `relu_u8` output.
#[derive(Clone, Debug)]
pub struct Requant {
    pub(crate) outputs: usize,
    pub(crate) m: Aligned<i32>,
    pub(crate) r: Aligned<i32>,
    /// `m[j + 1]` at every even `j` (0 elsewhere): the odd channels' multipliers where
    /// `vpmuldq` reads them (see `avx512::requant_u8`).
    pub(crate) m_odd: Aligned<i32>,
    /// Per group of 16 channels: the rounding terms `2^(30+r)` of the 8 even channels, then of
    /// the 8 odd ones, as i64.
    pub(crate) round: Aligned<u64>,
    /// The shifts `31 + r` in the same order as `round`.
    pub(crate) shift: Aligned<u64>,
    pub(crate) z_out: u8,
    pub(crate) lo: u8,
    pub(crate) hi: u8,
}

impl Requant {
    /// `relu = true` clamps below at `zero_point` (`relu_u8`), else at 0 (`u8`); `qmax` is the
    /// upper clamp.
    ///
    /// # Panics
    /// If the lengths differ, `zero_point > qmax`, or a multiplier or shift is outside the
    /// spec's range.
    pub fn new(multiplier: &[i32], shift: &[i32], zero_point: u8, qmax: u8, relu: bool) -> Requant {
        assert_eq!(multiplier.len(), shift.len(), "multiplier/shift length");
        assert!(zero_point <= qmax, "zero point above qmax");
        let n = multiplier.len();
        let mut m = Aligned::zeroed(padded(n));
        let mut r = Aligned::zeroed(padded(n));
        let mut m_odd = Aligned::zeroed(padded(n));
        // Padding channels: m = 0 and r = 0, whose result is 0.
        let mut round = Aligned::from_slice(&vec![1u64 << 30; padded(n)]);
        let mut lane_shift = Aligned::from_slice(&vec![31u64; padded(n)]);
        for j in 0..n {
            assert!(
                crate::requant::multiplier_in_range(multiplier[j]) && crate::requant::shift_in_range(shift[j]),
                "requant parameters out of range"
            );
            m[j] = multiplier[j];
            r[j] = shift[j];
            if j % 2 == 1 {
                m_odd[j - 1] = multiplier[j];
            }
            // Channel j of group `j / 16` sits in lane `(j % 16) / 2` of the even or odd half.
            let at = j / LANES * LANES + (j % 2) * 8 + (j % LANES) / 2;
            round[at] = 1u64 << (30 + shift[j]);
            lane_shift[at] = (31 + shift[j]) as u64;
        }
        Requant {
            outputs: n,
            m,
            r,
            m_odd,
            round,
            shift: lane_shift,
            z_out: zero_point,
            lo: if relu { zero_point } else { 0 },
            hi: qmax,
        }
    }

    /// Output channels.
    pub fn outputs(&self) -> usize {
        self.outputs
    }
}

/// `out[b][j] = clamp(requant(acc[b][j], m[j], r[j]) + z_out, lo, qmax)`.
pub fn requant_u8(
    kind: KernelKind,
    p: &Requant,
    acc: &[i32],
    acc_stride: usize,
    rows: usize,
    out: &mut [u8],
    out_stride: usize,
) -> Result<(), Error> {
    check(kind)?;
    check_2d("requant acc", acc.len(), rows, acc_stride, p.outputs);
    check_2d("requant out", out.len(), rows, out_stride, p.outputs);
    match kind {
        #[cfg(target_arch = "x86_64")]
        KernelKind::Avx512Vnni | KernelKind::Amx => {
            // SAFETY: `check(kind)?` above returned Ok, so `is_x86_feature_detected!` found
            // AVX-512 F/BW/VL/VNNI (`KernelKind::Avx512Vnni.is_available()`), which covers the
            // F/BW/VL the kernel needs; the two `check_2d` calls above asserted the sizes of
            // `acc` and `out` (`p.outputs` per row).
            unsafe { avx512::requant_u8(p, acc, acc_stride, rows, out, out_stride) }
        }
        _ => scalar::requant_u8(p, acc, acc_stride, rows, out, out_stride),
    }
    Ok(())
}

/// Per-channel thresholds of a `sign_bits` output (all 0 after a `dense_i8` layer).
#[derive(Clone, Debug)]
pub struct SignBits {
    pub(crate) threshold: Aligned<i32>,
    pub(crate) outputs: usize,
}

impl SignBits {
    /// Bit j is `acc[j] ≥ threshold[j]`.
    pub fn new(threshold: &[i32]) -> SignBits {
        let mut t = Aligned::zeroed(padded(threshold.len()));
        t[..threshold.len()].copy_from_slice(threshold);
        SignBits {
            threshold: t,
            outputs: threshold.len(),
        }
    }

    /// Output channels (bits per row).
    pub fn outputs(&self) -> usize {
        self.outputs
    }
}

/// Packs `acc[b][j] ≥ threshold[j]` into `out[b]` (`out_words = ceil(outputs/64)` u64 per
/// row, bit j%64 of word j/64); padding bits are written as 0.
pub fn sign_bits(
    kind: KernelKind,
    p: &SignBits,
    acc: &[i32],
    acc_stride: usize,
    rows: usize,
    out: &mut [u64],
    out_words: usize,
) -> Result<(), Error> {
    check(kind)?;
    assert_eq!(out_words, p.outputs.div_ceil(64), "sign_bits row words");
    check_2d("sign_bits acc", acc.len(), rows, acc_stride, p.outputs);
    check_2d("sign_bits out", out.len(), rows, out_words, out_words);
    let t = &p.threshold[..p.outputs];
    match kind {
        #[cfg(target_arch = "x86_64")]
        KernelKind::Avx512Vnni | KernelKind::Amx => {
            // SAFETY: `check(kind)?` above returned Ok, so AVX-512 F/BW/VL/VNNI were detected
            // (`KernelKind::Avx512Vnni.is_available()`); `check_2d` above asserted the sizes of
            // `acc` (`p.outputs` per row) and `out` (`rows·out_words` words).
            unsafe { avx512::sign_bits(p, acc, acc_stride, rows, out, out_words) }
        }
        _ => scalar::sign_bits(t, acc, acc_stride, rows, out, out_words),
    }
    Ok(())
}

/// Per-channel float scale (and, after a binary layer, bias) of the `logits` output.
#[derive(Clone, Debug)]
pub struct Dequant {
    pub(crate) scale: Aligned<f32>,
    pub(crate) bias: Option<Aligned<f32>>,
    pub(crate) outputs: usize,
}

impl Dequant {
    /// `logit[j] = (acc[j] as f32)·scale[j] (+ bias[j])`.
    ///
    /// # Panics
    /// If `bias` is given with a different length.
    pub fn new(scale: &[f32], bias: Option<&[f32]>) -> Dequant {
        let n = scale.len();
        let pad = |v: &[f32]| {
            let mut a = Aligned::zeroed(padded(n));
            a[..n].copy_from_slice(v);
            a
        };
        if let Some(b) = bias {
            assert_eq!(b.len(), n, "logits bias length");
        }
        Dequant {
            scale: pad(scale),
            bias: bias.map(pad),
            outputs: n,
        }
    }

    /// Output channels (classes).
    pub fn outputs(&self) -> usize {
        self.outputs
    }
}

/// The final dequantization: `out[b][j] = (acc[b][j] as f32)·scale[j] (+ bias[j])`.
pub fn dequantize(
    kind: KernelKind,
    p: &Dequant,
    acc: &[i32],
    acc_stride: usize,
    rows: usize,
    out: &mut [f32],
    out_stride: usize,
) -> Result<(), Error> {
    check(kind)?;
    check_2d("logits acc", acc.len(), rows, acc_stride, p.outputs);
    check_2d("logits out", out.len(), rows, out_stride, p.outputs);
    let n = p.outputs;
    match kind {
        #[cfg(target_arch = "x86_64")]
        KernelKind::Avx512Vnni | KernelKind::Amx => {
            // SAFETY: `check(kind)?` above returned Ok, so AVX-512 F/BW/VL/VNNI were detected
            // (`KernelKind::Avx512Vnni.is_available()`); the two `check_2d` calls above asserted
            // the sizes of `acc` and `out` (`p.outputs` per row).
            unsafe { avx512::dequantize(p, acc, acc_stride, rows, out, out_stride) }
        }
        _ => scalar::dequantize(
            &p.scale[..n],
            p.bias.as_ref().map(|b| &b[..n]),
            acc,
            acc_stride,
            rows,
            out,
            out_stride,
        ),
    }
    Ok(())
}
