//! `maxpool_u8`: max pooling over NHWC u8 images, on the input's grid.
//!
//! File: fields `in_shape [h, w, c]`, `kernel [kh, kw]`, `stride [sh, sw]`,
//! `padding [top, left, bottom, right]` (each below the kernel size; padded taps are ignored,
//! like PyTorch's −∞ padding); no tensors. Output `[oh, ow, c]`.

use std::sync::Arc;

use serde_json::{Map, Value};

use super::output::INPUT_GRID;
use super::spatial::{check_input, check_window, product, read_window};
use super::{ActSpec, Compiled, In, Layer, Op, Out, Output, Produces, Scratch, ScratchSize};
use crate::error::Error;
use crate::format::{Fields, Tensors, TensorsOut};
use crate::kernels::pool::maxpool_u8;
use crate::kernels::{KernelKind, Window};

/// The `maxpool_u8` op.
pub(crate) struct MaxPoolU8;

fn window(layer: &Layer) -> Window {
    match layer {
        Layer::MaxPoolU8 {
            in_shape,
            kernel,
            stride,
            padding,
        } => Window {
            in_shape: *in_shape,
            kernel: *kernel,
            stride: *stride,
            padding: *padding,
            dilation: [1, 1],
        },
        // `Layer::op` sends only `MaxPoolU8` layers here.
        _ => unreachable!("maxpool_u8 op given a {} layer", layer.kind_name()),
    }
}

impl Op for MaxPoolU8 {
    fn kind(&self) -> &'static str {
        "maxpool_u8"
    }

    fn read(&self, _i: usize, mut f: Fields<'_>, _t: &mut Tensors<'_>) -> Result<Layer, Error> {
        let in_shape = f.sizes("in_shape")?;
        let w = read_window(&mut f, in_shape, true)?;
        f.done()?;
        Ok(Layer::MaxPoolU8 {
            in_shape,
            kernel: w.kernel,
            stride: w.stride,
            padding: w.padding,
        })
    }

    fn write(&self, layer: &Layer, _i: usize, doc: &mut Map<String, Value>, _t: &mut TensorsOut) {
        super::spatial::write_window(doc, &window(layer), true);
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
        check_input(i, self.kind(), w.in_shape, input)?;
        let c = w.in_shape[2];
        let macs = product(&[oh, ow, c, w.kernel[0], w.kernel[1]]);
        Ok(ActSpec::image(i, self.kind(), [oh, ow, c], macs))
    }

    fn compile(&self, layer: &Layer) -> Result<Arc<dyn Compiled>, Error> {
        let w = window(layer);
        let out_hw = w
            .out_hw()
            .ok_or(Error::Internal("a validated max pooling has no output"))?;
        let size = out_hw[0] * out_hw[1] * w.in_shape[2];
        Ok(Arc::new(CompiledMaxPool { w, out_hw, size }))
    }
}

#[derive(Debug)]
struct CompiledMaxPool {
    w: Window,
    out_hw: [usize; 2],
    size: usize,
}

impl Compiled for CompiledMaxPool {
    fn produces(&self) -> Produces {
        Produces::U8 {
            size: self.size,
            stride: self.size,
        }
    }

    fn scratch(&self, _rows: usize) -> ScratchSize {
        ScratchSize::default()
    }

    fn run(&self, _kernel: KernelKind, x: In<'_>, rows: usize, y: Out<'_>, _s: &mut Scratch<'_>) -> Result<(), Error> {
        // Excluded by validation (a pooling layer reads and writes u8) and by the workspace.
        let (In::U8 { x, stride: xs }, Out::U8 { y, stride: ys }) = (x, y) else {
            return Err(Error::Internal("a maxpool_u8 layer without u8 input and output"));
        };
        maxpool_u8(&self.w, self.out_hw, x, xs, rows, y, ys);
        Ok(())
    }
}
