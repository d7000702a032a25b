//! `avgpool_u8`: average pooling over NHWC u8 images without padding.
//!
//! File: fields `in_shape [h, w, c]`, `kernel [kh, kw]`, `stride [sh, sw]`; no tensors.
//! Output `[oh, ow, c]` with `y = (Σ x + n/2) / n` over the `n = kh·kw` taps (integer, round
//! half up), at most [`MAX_WINDOW`] of them.

use std::sync::Arc;

use serde_json::{Map, Value};

use super::output::INPUT_GRID;
use super::spatial::{check_input, check_window, product, read_window};
use super::{ActSpec, Compiled, In, Layer, Op, Out, Output, Produces, Scratch, ScratchSize};
use crate::error::Error;
use crate::format::{Fields, Tensors, TensorsOut};
use crate::kernels::pool::avgpool_u8;
use crate::kernels::{DivRound, KernelKind, Window};

/// The `avgpool_u8` op.
pub(crate) struct AvgPoolU8;

/// Most taps one average may have.
pub(crate) const MAX_WINDOW: usize = 1 << 16;

fn window(layer: &Layer) -> Window {
    match layer {
        Layer::AvgPoolU8 {
            in_shape,
            kernel,
            stride,
        } => Window {
            in_shape: *in_shape,
            kernel: *kernel,
            stride: *stride,
            padding: [0; 4],
            dilation: [1, 1],
        },
        // `Layer::op` sends only `AvgPoolU8` layers here.
        _ => unreachable!("avgpool_u8 op given a {} layer", layer.kind_name()),
    }
}

impl Op for AvgPoolU8 {
    fn kind(&self) -> &'static str {
        "avgpool_u8"
    }

    fn read(&self, _i: usize, mut f: Fields<'_>, _t: &mut Tensors<'_>) -> Result<Layer, Error> {
        let in_shape = f.sizes("in_shape")?;
        let w = read_window(&mut f, in_shape, false)?;
        f.done()?;
        Ok(Layer::AvgPoolU8 {
            in_shape,
            kernel: w.kernel,
            stride: w.stride,
        })
    }

    fn write(&self, layer: &Layer, _i: usize, doc: &mut Map<String, Value>, _t: &mut TensorsOut) {
        super::spatial::write_window(doc, &window(layer), false);
    }

    fn inputs(&self, layer: &Layer) -> usize {
        window(layer).in_shape.iter().product()
    }

    fn output_shape(&self, layer: &Layer) -> Option<[usize; 3]> {
        window(layer).pooled_shape()
    }

    fn output<'a>(&self, _layer: &'a Layer) -> &'a Output {
        &INPUT_GRID
    }

    fn validate(&self, layer: &Layer, i: usize, input: &ActSpec) -> Result<ActSpec, Error> {
        let w = window(layer);
        let [oh, ow] = check_window(i, &w)?;
        let [kh, kw] = w.kernel;
        if kh * kw > MAX_WINDOW {
            return Err(Error::field(
                format!("layers[{i}].kernel"),
                format!("{:?} averages {} values, at most {MAX_WINDOW}", w.kernel, kh * kw),
            ));
        }
        check_input(i, self.kind(), w.in_shape, input)?;
        let c = w.in_shape[2];
        let macs = product(&[oh, ow, c, kh, kw]);
        Ok(ActSpec::image(i, self.kind(), [oh, ow, c], macs))
    }

    fn compile(&self, layer: &Layer) -> Result<Arc<dyn Compiled>, Error> {
        let w = window(layer);
        let out_hw = w
            .out_hw()
            .ok_or(Error::Internal("a validated average pooling has no output"))?;
        let size = out_hw[0] * out_hw[1] * w.in_shape[2];
        Ok(Arc::new(CompiledAvgPool {
            w,
            out_hw,
            size,
            div: DivRound::new(w.kernel[0] * w.kernel[1]),
        }))
    }
}

#[derive(Debug)]
struct CompiledAvgPool {
    w: Window,
    out_hw: [usize; 2],
    size: usize,
    div: DivRound,
}

impl Compiled for CompiledAvgPool {
    fn produces(&self) -> Produces {
        Produces::U8 {
            size: self.size,
            stride: self.size,
        }
    }

    fn scratch(&self, _rows: usize) -> ScratchSize {
        ScratchSize {
            sums: self.w.in_shape[2],
            ..ScratchSize::default()
        }
    }

    fn run(&self, _kernel: KernelKind, x: In<'_>, rows: usize, y: Out<'_>, s: &mut Scratch<'_>) -> Result<(), Error> {
        // Excluded by validation (a pooling layer reads and writes u8) and by the workspace.
        let (In::U8 { x, stride: xs }, Out::U8 { y, stride: ys }) = (x, y) else {
            return Err(Error::Internal("an avgpool_u8 layer without u8 input and output"));
        };
        avgpool_u8(&self.w, self.out_hw, &self.div, x, xs, rows, y, ys, s.sums);
        Ok(())
    }
}
