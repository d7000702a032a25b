//! `global_avgpool_u8`: the mean of each channel over the whole image.
//!
//! File: field `in_shape [h, w, c]`; no tensors. Output `[1, 1, c]` with
//! `y[c] = (Σ x + n/2) / n` over the `n = h·w` positions (integer, round half up), at most
//! [`DivRound::MAX_N`] of them.

use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::output::INPUT_GRID;
use super::spatial::{check_dims, check_input, product};
use super::{ActSpec, Compiled, In, Layer, Op, Out, Output, Produces, Scratch, ScratchSize};
use crate::error::Error;
use crate::format::{Fields, Tensors, TensorsOut};
use crate::kernels::pool::global_avgpool_u8;
use crate::kernels::{DivRound, KernelKind};

/// The `global_avgpool_u8` op.
pub(crate) struct GlobalAvgPoolU8;

fn in_shape(layer: &Layer) -> [usize; 3] {
    match layer {
        Layer::GlobalAvgPoolU8 { in_shape } => *in_shape,
        // `Layer::op` sends only `GlobalAvgPoolU8` layers here.
        _ => unreachable!("global_avgpool_u8 op given a {} layer", layer.kind_name()),
    }
}

impl Op for GlobalAvgPoolU8 {
    fn kind(&self) -> &'static str {
        "global_avgpool_u8"
    }

    fn read(&self, _i: usize, mut f: Fields<'_>, _t: &mut Tensors<'_>) -> Result<Layer, Error> {
        let in_shape = f.sizes("in_shape")?;
        f.done()?;
        Ok(Layer::GlobalAvgPoolU8 { in_shape })
    }

    fn write(&self, layer: &Layer, _i: usize, doc: &mut Map<String, Value>, _t: &mut TensorsOut) {
        doc.insert("in_shape".into(), json!(in_shape(layer)));
    }

    fn inputs(&self, layer: &Layer) -> usize {
        in_shape(layer).iter().product()
    }

    fn output_shape(&self, layer: &Layer) -> Option<[usize; 3]> {
        Some([1, 1, in_shape(layer)[2]])
    }

    fn output<'a>(&self, _layer: &'a Layer) -> &'a Output {
        &INPUT_GRID
    }

    fn validate(&self, layer: &Layer, i: usize, input: &ActSpec) -> Result<ActSpec, Error> {
        let s = in_shape(layer);
        check_dims(i, "in_shape", s, 1)?;
        let [h, w, c] = s;
        if h * w > DivRound::MAX_N {
            return Err(Error::field(
                format!("layers[{i}].in_shape"),
                format!("{s:?} averages {} positions, at most {}", h * w, DivRound::MAX_N),
            ));
        }
        check_input(i, self.kind(), s, input)?;
        Ok(ActSpec::image(i, self.kind(), [1, 1, c], product(&[h, w, c])))
    }

    fn compile(&self, layer: &Layer) -> Result<Arc<dyn Compiled>, Error> {
        let s = in_shape(layer);
        Ok(Arc::new(CompiledGlobalAvgPool {
            in_shape: s,
            div: DivRound::new(s[0] * s[1]),
        }))
    }
}

#[derive(Debug)]
struct CompiledGlobalAvgPool {
    in_shape: [usize; 3],
    div: DivRound,
}

impl Compiled for CompiledGlobalAvgPool {
    fn produces(&self) -> Produces {
        let c = self.in_shape[2];
        Produces::U8 { size: c, stride: c }
    }

    fn scratch(&self, _rows: usize) -> ScratchSize {
        ScratchSize {
            sums: self.in_shape[2],
            ..ScratchSize::default()
        }
    }

    fn run(&self, _kernel: KernelKind, x: In<'_>, rows: usize, y: Out<'_>, s: &mut Scratch<'_>) -> Result<(), Error> {
        // Excluded by validation (a pooling layer reads and writes u8) and by the workspace.
        let (In::U8 { x, stride: xs }, Out::U8 { y, stride: ys }) = (x, y) else {
            return Err(Error::Internal("a global_avgpool_u8 layer without u8 input and output"));
        };
        global_avgpool_u8(self.in_shape, &self.div, x, xs, rows, y, ys, s.sums);
        Ok(())
    }
}
