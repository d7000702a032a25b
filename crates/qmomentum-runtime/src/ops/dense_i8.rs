//! `dense_i8`: `acc[j] = Σ_k (x[k] − z_in)·W[j,k] + bias[j]` over u8 inputs, int8 weights.
//!
//! File: fields `in`, `out`, `input_zero_point`, optional `weight_bits` (2, 4 or 8) and the
//! [`output`](super::output) fields; tensors `layers.i.weight` (I8 `[out, in]` at 8 bits, U8
//! `[out, ceil(in·bits/8)]` packed codes at 4 or 2, see [`crate::lowbit`]) and `layers.i.bias`
//! I32 `[out]`.

use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::output::{self, After, Epilogue};
use super::{ActSpec, Compiled, In, Layer, Op, Out, Output, Produces, Scratch, ScratchSize, ACC_ROWS};
use crate::error::Error;
use crate::format::{tname, Fields, Tensors, TensorsOut};
use crate::kernels::{self, padded, KernelKind, PackedDenseI8};
use crate::lowbit;

/// The `dense_i8` op.
pub(crate) struct DenseI8;

/// The fields of a [`Layer::DenseI8`].
struct Parts<'a> {
    inputs: usize,
    outputs: usize,
    weight: &'a [i8],
    bias: &'a [i32],
    input_zero_point: u8,
    output: &'a Output,
}

fn parts(layer: &Layer) -> Parts<'_> {
    match layer {
        Layer::DenseI8 {
            inputs,
            outputs,
            weight,
            bias,
            input_zero_point,
            output,
        } => Parts {
            inputs: *inputs,
            outputs: *outputs,
            weight,
            bias,
            input_zero_point: *input_zero_point,
            output,
        },
        // `Layer::op` sends only `DenseI8` layers here.
        _ => unreachable!("dense_i8 op given a {} layer", layer.kind_name()),
    }
}

/// Checks what every dense layer checks first: non-empty, an `in` the i32 accumulator can
/// hold, and `in` equal to what the previous layer produces.
pub(super) fn check_sizes(i: usize, inputs: usize, outputs: usize, input: &ActSpec) -> Result<(), Error> {
    if inputs == 0 {
        return Err(Error::field(format!("layers[{i}].in"), "must be at least 1"));
    }
    if outputs == 0 {
        return Err(Error::field(format!("layers[{i}].out"), "must be at least 1"));
    }
    if i32::try_from(inputs).is_err() {
        return Err(Error::field(
            format!("layers[{i}].in"),
            format!("{inputs} is too large: the i32 accumulator holds dot products over at most 2147483647 inputs"),
        ));
    }
    if inputs != input.size {
        return Err(Error::layer(
            i,
            format!("in = {inputs} does not match {} size {}", input.desc, input.size),
        ));
    }
    Ok(())
}

impl Op for DenseI8 {
    fn kind(&self) -> &'static str {
        "dense_i8"
    }

    fn read(&self, i: usize, mut f: Fields<'_>, t: &mut Tensors<'_>) -> Result<Layer, Error> {
        let inputs = f.size("in")?;
        let outputs = f.size("out")?;
        let input_zero_point = f.uint("input_zero_point", 255)? as u8;
        let bits = lowbit::read_bits(&mut f)?;
        let output = output::read(i, &mut f, t, outputs, After::I8(self.kind()))?;
        f.done()?;
        Ok(Layer::DenseI8 {
            inputs,
            outputs,
            weight: lowbit::read_codes(t, &tname(i, "weight"), bits, outputs, inputs, &[outputs, inputs])?,
            bias: t.i32s(&tname(i, "bias"), &[outputs])?,
            input_zero_point,
            output,
        })
    }

    fn write(&self, layer: &Layer, i: usize, doc: &mut Map<String, Value>, t: &mut TensorsOut) {
        let p = parts(layer);
        doc.insert("in".into(), json!(p.inputs));
        doc.insert("out".into(), json!(p.outputs));
        doc.insert("input_zero_point".into(), json!(p.input_zero_point));
        let shape8 = vec![p.outputs, p.inputs];
        let bits = lowbit::write_codes(t, tname(i, "weight"), p.weight, p.outputs, p.inputs, shape8);
        if bits != 8 {
            doc.insert("weight_bits".into(), json!(bits));
        }
        t.i32s(tname(i, "bias"), vec![p.outputs], p.bias);
        output::write(i, p.output, doc, t);
    }

    fn inputs(&self, layer: &Layer) -> usize {
        parts(layer).inputs
    }

    fn outputs(&self, layer: &Layer) -> usize {
        parts(layer).outputs
    }

    fn output<'a>(&self, layer: &'a Layer) -> &'a Output {
        parts(layer).output
    }

    fn validate(&self, layer: &Layer, i: usize, input: &ActSpec) -> Result<ActSpec, Error> {
        let p = parts(layer);
        check_sizes(i, p.inputs, p.outputs, input)?;
        if input.bits {
            return Err(Error::layer(i, format!("dense_i8 reads u8 but gets {}", input.desc)));
        }
        if Some(p.weight.len()) != p.outputs.checked_mul(p.inputs) {
            return Err(Error::tensor(
                tname(i, "weight"),
                format!(
                    "has {} values, expected out × in = {} × {}",
                    p.weight.len(),
                    p.outputs,
                    p.inputs
                ),
            ));
        }
        output::check_len(&tname(i, "bias"), p.bias, p.outputs, "out")?;
        output::validate(i, p.output, p.outputs, After::I8(self.kind()))?;
        let macs = p.inputs as u128 * p.outputs as u128;
        Ok(ActSpec::layer_output(i, p.output, p.outputs, macs))
    }

    fn param_bytes(&self, layer: &Layer) -> usize {
        let p = parts(layer);
        p.weight.len() + 4 * p.bias.len() + output::param_bytes(p.output)
    }

    fn weight_storage(&self, layer: &Layer) -> (usize, u8, usize) {
        let p = parts(layer);
        let (rows, k) = (p.outputs, p.inputs);
        let bits = lowbit::narrowest_bits(p.weight);
        (p.weight.len(), bits, rows * lowbit::row_bytes(k, bits))
    }

    fn compile(&self, layer: &Layer) -> Result<Arc<dyn Compiled>, Error> {
        let p = parts(layer);
        Ok(Arc::new(CompiledDenseI8 {
            w: PackedDenseI8::new_narrowest(p.inputs, p.outputs, p.weight, p.bias, p.input_zero_point),
            epilogue: Epilogue::new(p.output, 0..p.outputs)?,
            produces: produces(p.output, p.outputs)?,
        }))
    }
}

/// What a dense layer with `outputs` channels and output step `output` writes per sample.
pub(super) fn produces(output: &Output, outputs: usize) -> Result<Produces, Error> {
    Ok(match output {
        // Rows padded to 64 bytes: the next layer's loads start on a cache line.
        Output::U8 { .. } => Produces::U8 {
            size: outputs,
            stride: outputs.next_multiple_of(64),
        },
        Output::SignBits { .. } => Produces::Bits { bits: outputs },
        Output::Logits { .. } => Produces::Logits { classes: outputs },
        // Excluded by `output::validate`.
        Output::InputGrid => return Err(Error::Internal("a dense layer without an output step")),
    })
}

#[derive(Debug)]
struct CompiledDenseI8 {
    w: PackedDenseI8,
    epilogue: Epilogue,
    produces: Produces,
}

impl Compiled for CompiledDenseI8 {
    fn produces(&self) -> Produces {
        self.produces
    }

    fn scratch(&self, rows: usize) -> ScratchSize {
        ScratchSize {
            acc: rows.min(ACC_ROWS) * padded(self.w.outputs()),
            ..ScratchSize::default()
        }
    }

    fn run(
        &self,
        kernel: KernelKind,
        x: In<'_>,
        rows: usize,
        mut y: Out<'_>,
        s: &mut Scratch<'_>,
    ) -> Result<(), Error> {
        // Excluded by validation (layer kinds chain) and by how the workspace is built.
        let In::U8 { x, stride: xs } = x else {
            return Err(Error::Internal("a dense_i8 layer reads bit activations"));
        };
        let stride = padded(self.w.outputs());
        let ys = y.stride();
        // Dense kernel and epilogue alternate on small row groups so the i32 accumulator tile
        // stays in L1.
        let mut r0 = 0;
        while r0 < rows {
            let n = ACC_ROWS.min(rows - r0);
            let acc = &mut s.acc[..n * stride];
            kernels::dense_i8(kernel, &self.w, &x[r0 * xs..], xs, n, acc, stride)?;
            self.epilogue.apply(kernel, acc, stride, n, &mut y, r0 * ys, ys)?;
            r0 += n;
        }
        Ok(())
    }
}
