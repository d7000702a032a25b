//! The output step every accumulating op shares: what a layer does with its i32 accumulator.
//!
//! Everything about [`Output`] lives here: reading it from a layer's JSON object and tensors,
//! writing it back, validating it, and running it ([`Epilogue`]: requantization to u8 with
//! ReLU/`qmax`, sign bits, or the final dequantization to logits). Ops only say how many
//! channels they have and which accumulator they produce ([`After`]).

use std::ops::Range;

use serde_json::{json, Map, Value};

use crate::error::Error;
use crate::format::{tname, Fields, Tensors, TensorsOut};
use crate::kernels::{self, Dequant, KernelKind, Requant, SignBits};
use crate::requant::{multiplier_in_range, shift_in_range, SHIFT_MAX, SHIFT_MIN};

use super::Out;

/// What a layer does with its i32 accumulator (`acc` for `dense_i8`, `dot` for `dense_bin`).
#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    /// `y = clamp(requant(acc, m, r) + z_out, lo, qmax)` with `lo = z_out` (ReLU: the file's
    /// `relu_u8`) or `lo = 0` (the file's `u8`).
    U8 {
        /// ReLU fused into the clamp (`relu_u8` in the file).
        relu: bool,
        /// Per-channel multiplier `m`: 0 or in [2^30, 2^31 − 1].
        multiplier: Vec<i32>,
        /// Per-channel shift `r` in [-30, 31].
        shift: Vec<i32>,
        /// `z_out` (with `relu`, also the lower clamp).
        zero_point: u8,
        /// Upper clamp, `zero_point ≤ qmax` (255 for 8-bit grids, 15 for 4-bit, 3 for 2-bit);
        /// the file's optional `output_qmax`.
        qmax: u8,
    },
    /// One bit per channel: `acc ≥ 0` after `dense_i8` (`threshold: None`),
    /// `dot ≥ threshold[j]` after `dense_bin` (`threshold: Some`).
    SignBits {
        /// Per-channel thresholds; present exactly for `dense_bin` layers.
        threshold: Option<Vec<i32>>,
    },
    /// The final dequantization: `logit = scale[j]·acc (+ bias[j] after dense_bin)`.
    Logits {
        /// Per-channel scale, finite.
        scale: Vec<f32>,
        /// Per-channel bias, finite; present exactly for `dense_bin` layers.
        bias: Option<Vec<f32>>,
    },
    /// No output step: the u8 output lies on the grid of the layer's input. What
    /// [`Layer::output`](crate::Layer::output) returns for pooling layers (max commutes with
    /// the quantizer; the rounded mean stays on its grid). Never written in a file, and not an
    /// output dense or convolution layers may have.
    InputGrid,
}

/// [`Output::InputGrid`], for [`Layer::output`](crate::Layer::output) to borrow.
pub(crate) static INPUT_GRID: Output = Output::InputGrid;

impl Output {
    /// The name used in the file (`relu_u8`, `u8`, `sign_bits`, `logits`).
    pub fn kind_name(&self) -> &'static str {
        match self {
            Output::U8 { relu: true, .. } => "relu_u8",
            Output::U8 { relu: false, .. } => "u8",
            Output::SignBits { .. } => "sign_bits",
            Output::Logits { .. } => "logits",
            Output::InputGrid => "input_grid",
        }
    }

    /// Whether this output is u8 (what a `dense_i8` layer reads).
    pub fn is_u8(&self) -> bool {
        matches!(self, Output::U8 { .. } | Output::InputGrid)
    }

    /// Whether this output is the logits (only the last layer has them).
    pub fn is_logits(&self) -> bool {
        matches!(self, Output::Logits { .. })
    }
}

/// Which accumulator the output follows: the rules for `sign_bits` and `logits` differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum After {
    /// An int8 accumulator (`dense_i8`): sign bits at 0, logits without a float bias.
    I8(&'static str),
    /// A binary dot product (`dense_bin`): thresholds, logits with a float bias.
    Bin,
}

impl After {
    fn binary(self) -> bool {
        self == After::Bin
    }

    fn name(self) -> &'static str {
        match self {
            After::I8(kind) => kind,
            After::Bin => "dense_bin",
        }
    }
}

/// Reads layer `i`'s `output` field and what it implies (`output_zero_point`,
/// `output_qmax`, and the tensors `multiplier`/`shift`, `threshold`, `scale`/`bias`, each of
/// shape `[channels]`).
pub(crate) fn read(
    i: usize,
    f: &mut Fields<'_>,
    t: &mut Tensors<'_>,
    channels: usize,
    after: After,
) -> Result<Output, Error> {
    let out_kind = f.str("output")?;
    let shape = [channels];
    Ok(match out_kind {
        "relu_u8" | "u8" => {
            let zero_point = f.uint("output_zero_point", 255)? as u8;
            let qmax = f.opt_uint("output_qmax", 255)?.unwrap_or(255) as u8;
            let multiplier = t.i32s(&tname(i, "multiplier"), &shape)?;
            let shift = t.i32s(&tname(i, "shift"), &shape)?;
            Output::U8 {
                relu: out_kind == "relu_u8",
                multiplier,
                shift,
                zero_point,
                qmax,
            }
        }
        "sign_bits" => Output::SignBits {
            threshold: if after.binary() {
                Some(t.i32s(&tname(i, "threshold"), &shape)?)
            } else {
                None
            },
        },
        "logits" => Output::Logits {
            scale: t.f32s(&tname(i, "scale"), &shape)?,
            bias: if after.binary() {
                Some(t.f32s(&tname(i, "bias"), &shape)?)
            } else {
                None
            },
        },
        other => {
            return Err(Error::field(
                f.name("output"),
                format!("{other:?}, expected \"relu_u8\", \"u8\", \"sign_bits\" or \"logits\""),
            ))
        }
    })
}

/// Writes `output` into layer `i`'s JSON object and its tensors (`[channels]` each).
pub(crate) fn write(i: usize, output: &Output, doc: &mut Map<String, Value>, t: &mut TensorsOut) {
    doc.insert("output".into(), json!(output.kind_name()));
    match output {
        Output::U8 {
            multiplier,
            shift,
            zero_point,
            qmax,
            ..
        } => {
            doc.insert("output_zero_point".into(), json!(zero_point));
            // Optional in the file, default 255: written only when it differs.
            if *qmax != 255 {
                doc.insert("output_qmax".into(), json!(qmax));
            }
            t.i32s(tname(i, "multiplier"), vec![multiplier.len()], multiplier);
            t.i32s(tname(i, "shift"), vec![shift.len()], shift);
        }
        Output::SignBits { threshold } => {
            if let Some(th) = threshold {
                t.i32s(tname(i, "threshold"), vec![th.len()], th);
            }
        }
        Output::Logits { scale, bias } => {
            t.f32s(tname(i, "scale"), vec![scale.len()], scale);
            if let Some(b) = bias {
                t.f32s(tname(i, "bias"), vec![b.len()], b);
            }
        }
        // Rejected by `validate`, so a model never holds it on a layer that writes an output.
        Output::InputGrid => {}
    }
}

/// Bytes of the output's tensors in the file.
pub(crate) fn param_bytes(output: &Output) -> usize {
    match output {
        Output::U8 { multiplier, shift, .. } => 4 * (multiplier.len() + shift.len()),
        Output::SignBits { threshold } => 4 * threshold.as_ref().map_or(0, Vec::len),
        Output::Logits { scale, bias } => 4 * (scale.len() + bias.as_ref().map_or(0, Vec::len)),
        Output::InputGrid => 0,
    }
}

/// Checks that a vector has `want` values (a tensor of shape `[want]`).
pub(crate) fn check_len<T>(name: &str, v: &[T], want: usize, what: &str) -> Result<(), Error> {
    if v.len() == want {
        Ok(())
    } else {
        Err(Error::tensor(
            name,
            format!("has {} values, expected {want} ({what})", v.len()),
        ))
    }
}

fn check_finite(name: &str, v: &[f32]) -> Result<(), Error> {
    match v.iter().position(|x| !x.is_finite()) {
        Some(j) => Err(Error::value(
            name,
            format!("channel {j}"),
            format!("value {} is not finite", v[j]),
        )),
        None => Ok(()),
    }
}

/// Checks layer `i`'s output against the format's rules for `channels` channels after `after`.
/// (Where the layer sits, e.g. logits only last, is checked by the model.)
pub(crate) fn validate(i: usize, output: &Output, channels: usize, after: After) -> Result<(), Error> {
    let binary = after.binary();
    match output {
        Output::U8 {
            multiplier,
            shift,
            zero_point,
            qmax,
            ..
        } => {
            if zero_point > qmax {
                return Err(Error::field(
                    format!("layers[{i}].output_qmax"),
                    format!("{qmax} is below output_zero_point {zero_point}"),
                ));
            }
            let (mname, sname) = (tname(i, "multiplier"), tname(i, "shift"));
            check_len(&mname, multiplier, channels, "out")?;
            check_len(&sname, shift, channels, "out")?;
            for (j, &m) in multiplier.iter().enumerate() {
                if !multiplier_in_range(m) {
                    return Err(Error::value(
                        &mname,
                        format!("channel {j}"),
                        format!("multiplier {m} outside {{0}} ∪ [2^30, 2^31 - 1]"),
                    ));
                }
            }
            for (j, &r) in shift.iter().enumerate() {
                if !shift_in_range(r) {
                    return Err(Error::value(
                        &sname,
                        format!("channel {j}"),
                        format!("shift {r} outside [{SHIFT_MIN}, {SHIFT_MAX}]"),
                    ));
                }
            }
        }
        Output::SignBits { threshold } => {
            let name = tname(i, "threshold");
            match (threshold, binary) {
                (Some(t), true) => check_len(&name, t, channels, "out")?,
                (None, false) => {}
                (None, true) => {
                    return Err(Error::tensor(
                        &name,
                        "missing: sign_bits after dense_bin needs thresholds",
                    ))
                }
                (Some(_), false) => {
                    return Err(Error::tensor(
                        &name,
                        format!("unexpected: sign_bits after {} has no thresholds", after.name()),
                    ))
                }
            }
        }
        Output::Logits { scale, bias } => {
            let name = tname(i, "scale");
            check_len(&name, scale, channels, "out")?;
            check_finite(&name, scale)?;
            let bname = tname(i, "bias");
            match (bias, binary) {
                (Some(b), true) => {
                    check_len(&bname, b, channels, "out")?;
                    check_finite(&bname, b)?;
                }
                (None, false) => {}
                (None, true) => {
                    return Err(Error::tensor(
                        &bname,
                        "missing: logits after dense_bin needs a float bias",
                    ))
                }
                (Some(_), false) => {
                    return Err(Error::tensor(
                        &bname,
                        format!("unexpected: logits after {} take no float bias", after.name()),
                    ))
                }
            }
        }
        Output::InputGrid => {
            return Err(Error::field(
                format!("layers[{i}].output"),
                format!(
                    "input_grid is the output of pooling layers; {} needs relu_u8, u8, sign_bits or logits",
                    after.name()
                ),
            ))
        }
    }
    Ok(())
}

/// A validated [`Output`], prepared for the kernels.
#[derive(Clone, Debug)]
pub(crate) enum Epilogue {
    /// `relu_u8` / `u8`.
    Requant(Requant),
    /// `sign_bits`.
    Sign(SignBits),
    /// `logits`.
    Logits(Dequant),
}

impl Epilogue {
    /// The epilogue of channels `channels` of a validated `output` (an op whose channels are
    /// computed in groups gets one epilogue per group).
    pub(crate) fn new(output: &Output, channels: Range<usize>) -> Result<Epilogue, Error> {
        Ok(match output {
            Output::U8 {
                relu,
                multiplier,
                shift,
                zero_point,
                qmax,
            } => Epilogue::Requant(Requant::new(
                &multiplier[channels.clone()],
                &shift[channels],
                *zero_point,
                *qmax,
                *relu,
            )),
            Output::SignBits { threshold } => Epilogue::Sign(match threshold {
                Some(t) => SignBits::new(&t[channels]),
                None => SignBits::new(&vec![0; channels.len()]),
            }),
            Output::Logits { scale, bias } => Epilogue::Logits(Dequant::new(
                &scale[channels.clone()],
                bias.as_ref().map(|b| &b[channels]),
            )),
            // Rejected by `validate` for every op that has an epilogue.
            Output::InputGrid => return Err(Error::Internal("an epilogue for a layer without an output step")),
        })
    }

    /// Applies the epilogue to `rows` accumulator rows (`acc`, row stride `acc_stride`),
    /// writing row `b` at element `at + b·stride` of `y` (words for bit outputs).
    #[allow(clippy::too_many_arguments)]
    #[inline]
    pub(crate) fn apply(
        &self,
        kernel: KernelKind,
        acc: &[i32],
        acc_stride: usize,
        rows: usize,
        y: &mut Out<'_>,
        at: usize,
        stride: usize,
    ) -> Result<(), Error> {
        match (self, y) {
            (Epilogue::Requant(p), Out::U8 { y, .. }) => {
                kernels::requant_u8(kernel, p, acc, acc_stride, rows, &mut y[at..], stride)
            }
            (Epilogue::Sign(p), Out::Bits { y, .. }) => {
                kernels::sign_bits(kernel, p, acc, acc_stride, rows, &mut y[at..], stride)
            }
            (Epilogue::Logits(p), Out::Logits { y, .. }) => {
                kernels::dequantize(kernel, p, acc, acc_stride, rows, &mut y[at..], stride)
            }
            // The workspace builds each layer's output buffer from `Compiled::produces`.
            _ => Err(Error::Internal("a layer's output buffer does not match its epilogue")),
        }
    }
}
