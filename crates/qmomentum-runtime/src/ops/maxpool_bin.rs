//! `maxpool_bin`: max pooling over bit images (`kernels::bitimage`).
//!
//! The max of ±1 values is +1 exactly when one of them is: the output pixel is the OR of the
//! window's pixels. Since sign is monotone, pooling the signs equals the sign of the pooled
//! values, so the training graph's `conv → batch norm → sign → max pool` runs as is.
//!
//! File: fields `in_shape [h, w, c]`, `kernel [kh, kw]`, `stride [sh, sw]`,
//! `padding [top, left, bottom, right]` (each below the kernel size; padded taps are ignored);
//! no tensors. Output: a bit image `[oh, ow, c]`.

use std::sync::Arc;

use serde_json::{Map, Value};

use super::output::INPUT_GRID;
use super::spatial::{check_bit_input, check_window, product, read_window};
use super::{ActSpec, Compiled, In, Layer, Op, Out, Output, Produces, Scratch, ScratchSize};
use crate::error::Error;
use crate::format::{Fields, Tensors, TensorsOut};
use crate::kernels::bitimage::{maxpool_bits, words};
use crate::kernels::{KernelKind, Window};

/// The `maxpool_bin` op.
pub(crate) struct MaxPoolBin;

fn window(layer: &Layer) -> Window {
    match layer {
        Layer::MaxPoolBin {
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
        // `Layer::op` sends only `MaxPoolBin` layers here.
        _ => unreachable!("maxpool_bin op given a {} layer", layer.kind_name()),
    }
}

impl Op for MaxPoolBin {
    fn kind(&self) -> &'static str {
        "maxpool_bin"
    }

    fn read(&self, _i: usize, mut f: Fields<'_>, _t: &mut Tensors<'_>) -> Result<Layer, Error> {
        let in_shape = f.sizes("in_shape")?;
        let w = read_window(&mut f, in_shape, true)?;
        f.done()?;
        Ok(Layer::MaxPoolBin {
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
        check_bit_input(i, self.kind(), w.in_shape, input)?;
        let c = w.in_shape[2];
        let macs = product(&[oh, ow, words(c), w.kernel[0], w.kernel[1]]);
        Ok(ActSpec::bit_image(i, self.kind(), [oh, ow, c], macs))
    }

    fn compile(&self, layer: &Layer) -> Result<Arc<dyn Compiled>, Error> {
        let w = window(layer);
        let out_hw = w
            .out_hw()
            .ok_or(Error::Internal("a validated max pooling has no output"))?;
        let words = out_hw[0] * out_hw[1] * words(w.in_shape[2]);
        Ok(Arc::new(CompiledMaxPoolBin { w, out_hw, words }))
    }
}

#[derive(Debug)]
struct CompiledMaxPoolBin {
    w: Window,
    out_hw: [usize; 2],
    words: usize,
}

impl Compiled for CompiledMaxPoolBin {
    fn produces(&self) -> Produces {
        Produces::Bits { bits: 64 * self.words }
    }

    fn scratch(&self, _rows: usize) -> ScratchSize {
        ScratchSize::default()
    }

    fn run(&self, _kernel: KernelKind, x: In<'_>, rows: usize, y: Out<'_>, _s: &mut Scratch<'_>) -> Result<(), Error> {
        // Excluded by validation (bits in and out) and by the workspace.
        let (In::Bits { x, words: xs }, Out::Bits { y, words: ys }) = (x, y) else {
            return Err(Error::Internal("a maxpool_bin layer without bit input and output"));
        };
        maxpool_bits(&self.w, self.out_hw, x, xs, rows, y, ys);
        Ok(())
    }
}
