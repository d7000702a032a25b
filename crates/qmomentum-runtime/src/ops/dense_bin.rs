//! `dense_bin`: `dot[j] = in − 2·popcount(x XOR W[j])` over bit inputs, ±1 weights.
//!
//! File: fields `in`, `out` and the [`output`](super::output) fields; tensor
//! `layers.i.weight` U64 `[out, ceil(in/64)]` (bit b of word w is input `64·w + b`, 1 = +1,
//! padding bits 0).

use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::dense_i8::{check_sizes, produces};
use super::output::{self, After, Epilogue};
use super::{ActSpec, Compiled, In, Layer, Op, Out, Output, Produces, Scratch, ScratchSize, ACC_ROWS};
use crate::error::Error;
use crate::format::{tname, Fields, Tensors, TensorsOut};
use crate::kernels::{self, padded, KernelKind, PackedDenseBin};

/// The `dense_bin` op.
pub(crate) struct DenseBin;

/// The fields of a [`Layer::DenseBin`].
struct Parts<'a> {
    inputs: usize,
    outputs: usize,
    weight: &'a [u64],
    output: &'a Output,
}

fn parts(layer: &Layer) -> Parts<'_> {
    match layer {
        Layer::DenseBin {
            inputs,
            outputs,
            weight,
            output,
        } => Parts {
            inputs: *inputs,
            outputs: *outputs,
            weight,
            output,
        },
        // `Layer::op` sends only `DenseBin` layers here.
        _ => unreachable!("dense_bin op given a {} layer", layer.kind_name()),
    }
}

impl Op for DenseBin {
    fn kind(&self) -> &'static str {
        "dense_bin"
    }

    fn read(&self, i: usize, mut f: Fields<'_>, t: &mut Tensors<'_>) -> Result<Layer, Error> {
        let inputs = f.size("in")?;
        let outputs = f.size("out")?;
        let output = output::read(i, &mut f, t, outputs, After::Bin)?;
        f.done()?;
        Ok(Layer::DenseBin {
            inputs,
            outputs,
            weight: t.u64s(&tname(i, "weight"), &[outputs, inputs.div_ceil(64)])?,
            output,
        })
    }

    fn write(&self, layer: &Layer, i: usize, doc: &mut Map<String, Value>, t: &mut TensorsOut) {
        let p = parts(layer);
        doc.insert("in".into(), json!(p.inputs));
        doc.insert("out".into(), json!(p.outputs));
        t.u64s(tname(i, "weight"), vec![p.outputs, p.inputs.div_ceil(64)], p.weight);
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
        let Parts {
            inputs,
            outputs,
            weight,
            output,
        } = parts(layer);
        check_sizes(i, inputs, outputs, input)?;
        if !input.bits {
            return Err(Error::layer(
                i,
                format!("dense_bin reads sign bits but gets {}", input.desc),
            ));
        }
        let name = tname(i, "weight");
        let words = inputs.div_ceil(64);
        if Some(weight.len()) != outputs.checked_mul(words) {
            return Err(Error::tensor(
                &name,
                format!(
                    "has {} values, expected out × ceil(in/64) = {outputs} × {words}",
                    weight.len()
                ),
            ));
        }
        if !inputs.is_multiple_of(64) {
            let pad = !0u64 << (inputs % 64);
            for j in 0..outputs {
                let w = weight[j * words + words - 1];
                if w & pad != 0 {
                    return Err(Error::value(
                        &name,
                        format!("row {j} word {}", words - 1),
                        format!("padding bits set ({:#018x}) beyond input {inputs}", w & pad),
                    ));
                }
            }
        }
        output::validate(i, output, outputs, After::Bin)?;
        let macs = inputs as u128 * outputs as u128;
        Ok(ActSpec::layer_output(i, output, outputs, macs))
    }

    fn param_bytes(&self, layer: &Layer) -> usize {
        let p = parts(layer);
        8 * p.weight.len() + output::param_bytes(p.output)
    }

    fn weight_storage(&self, layer: &Layer) -> (usize, u8, usize) {
        let p = parts(layer);
        (p.inputs.saturating_mul(p.outputs), 1, 8 * p.weight.len())
    }

    fn compile(&self, layer: &Layer) -> Result<Arc<dyn Compiled>, Error> {
        let p = parts(layer);
        Ok(Arc::new(CompiledDenseBin {
            w: PackedDenseBin::new(p.inputs, p.outputs, p.weight),
            epilogue: Epilogue::new(p.output, 0..p.outputs)?,
            produces: produces(p.output, p.outputs)?,
        }))
    }
}

#[derive(Debug)]
struct CompiledDenseBin {
    w: PackedDenseBin,
    epilogue: Epilogue,
    produces: Produces,
}

impl Compiled for CompiledDenseBin {
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
        let In::Bits { x, words: xs } = x else {
            return Err(Error::Internal("a binary layer reads u8 activations"));
        };
        // A bit output skips the accumulator: one fused pass.
        if let (Epilogue::Sign(sign), Out::Bits { y, words }) = (&self.epilogue, &mut y) {
            return kernels::dense_bin_sign(kernel, &self.w, sign, x, xs, rows, y, *words);
        }
        let stride = padded(self.w.outputs());
        let ys = y.stride();
        let mut r0 = 0;
        while r0 < rows {
            let n = ACC_ROWS.min(rows - r0);
            let acc = &mut s.acc[..n * stride];
            kernels::dense_bin(kernel, &self.w, &x[r0 * xs..], xs, n, acc, stride)?;
            self.epilogue.apply(kernel, acc, stride, n, &mut y, r0 * ys, ys)?;
            r0 += n;
        }
        Ok(())
    }
}
