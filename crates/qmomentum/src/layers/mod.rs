//! Layers. One file per concept: [`dense`], [`conv2d`], [`pool`], [`batch_norm`],
//! [`activation`], [`dropout`], the shared output stage [`epilogue`], and [`param`].
//!
//! Activations are NHWC: one sample is `h·w·c` values, channel fastest ([`Shape`]). A new layer is
//! a struct with `forward`/`backward` in its own file plus a variant of [`Layer`] (the match arms
//! below are the registration); what the optimizer, the checkpoint and the exporter see of it
//! comes from [`Layer::params`] and [`Layer::buffers`], never from special cases elsewhere.

pub mod activation;
pub mod batch_norm;
pub mod conv2d;
pub mod conv_implicit;
pub mod dense;
pub mod dropout;
pub mod epilogue;
pub mod folded_bn;
pub mod param;
pub mod pool;

pub use activation::Activation;
pub use batch_norm::{BatchNorm, BnMomentum};
pub use conv2d::Conv2d;
pub use dense::{BatchStats, Dense};
pub use dropout::Dropout;
pub use folded_bn::FoldedBn;
pub use param::{Buffer, Param, ParamKind};
pub use pool::{GlobalAvgPool, Pool2d, PoolGrid, PoolKind, PooledGrad};

use crate::quant::act::ActFakeQuant;
use crate::quant::weight::WeightFakeQuant;
use crate::rng::Rng;

/// The shape of one sample: height, width, channels (NHWC; a flat vector is `1×1×n`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Shape {
    /// Rows.
    pub h: usize,
    /// Columns.
    pub w: usize,
    /// Channels.
    pub c: usize,
}

impl Shape {
    /// `h × w × c`.
    pub fn new(h: usize, w: usize, c: usize) -> Self {
        Shape { h, w, c }
    }
    /// A flat vector of `n` values.
    pub fn flat(n: usize) -> Self {
        Shape { h: 1, w: 1, c: n }
    }
    /// Values per sample.
    pub fn len(&self) -> usize {
        self.h * self.w * self.c
    }
    /// True when a sample holds no value.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.h == 1 && self.w == 1 {
            write!(f, "{}", self.c)
        } else {
            write!(f, "{}×{}×{}", self.h, self.w, self.c)
        }
    }
}

/// A layer of a [`crate::model::Sequential`].
#[derive(Clone, Debug)]
pub enum Layer {
    /// Fully connected (with its own activation, as Keras `Dense(…, activation=…)`).
    Dense(Box<Dense>),
    /// 2-D convolution (with its own activation, as Keras `Conv2D(…, activation=…)`).
    Conv2d(Box<Conv2d>),
    /// Batch normalisation over the channels.
    BatchNorm(Box<BatchNorm>),
    /// Max or average pooling.
    Pool2d(Pool2d),
    /// Mean over all positions of each channel.
    GlobalAvgPool(GlobalAvgPool),
    /// Stand-alone element-wise activation (Keras `Activation`); softmax only as the last layer.
    Activation(Activation),
    /// Dropout.
    Dropout(Dropout),
    /// Flatten: NHWC rows are already flat, so it only changes the shape.
    Flatten,
    /// A batch norm or activation folded into the convolution at this index for QAT
    /// ([`FoldedBn`]): it computes nothing, and its output is its input's buffer.
    Folded(usize),
}

impl Layer {
    /// Output shape of one sample for an input of `input`.
    pub fn output_shape(&self, input: Shape) -> Shape {
        match self {
            Layer::Dense(d) => Shape::flat(d.outputs),
            Layer::Conv2d(c) => c.out_shape,
            Layer::Pool2d(p) => p.geo.output,
            Layer::GlobalAvgPool(g) => Shape::flat(g.input.c),
            Layer::Flatten => Shape::flat(input.len()),
            Layer::BatchNorm(_) | Layer::Activation(_) | Layer::Dropout(_) | Layer::Folded(_) => input,
        }
    }

    /// A short name (`dense`, `conv2d`, …).
    pub fn kind(&self) -> &'static str {
        match self {
            Layer::Dense(_) => "dense",
            Layer::Conv2d(_) => "conv2d",
            Layer::BatchNorm(_) => "batch_norm",
            Layer::Pool2d(p) if p.kind == PoolKind::Max => "max_pool2d",
            Layer::Pool2d(_) => "avg_pool2d",
            Layer::GlobalAvgPool(_) => "global_avg_pool",
            Layer::Activation(_) => "activation",
            Layer::Dropout(_) => "dropout",
            Layer::Flatten => "flatten",
            Layer::Folded(_) => "folded",
        }
    }

    /// Forward over `batch` samples (`logits`: leave a final softmax to the loss).
    pub fn forward(&mut self, x: &[f32], y: &mut [f32], batch: usize, training: bool, logits: bool, rng: &mut Rng) {
        match self {
            Layer::Dense(d) => d.forward(x, y, batch, training, logits),
            Layer::Conv2d(c) => c.forward(x, y, batch, training, logits),
            Layer::BatchNorm(b) => b.forward(x, y, x.len(), training),
            Layer::Pool2d(p) => p.forward(x, y, batch),
            Layer::GlobalAvgPool(g) => g.forward(x, y, batch),
            Layer::Activation(Activation::Relu) => relu_forward(x, y),
            Layer::Activation(a) => {
                let cols = x.len() / batch.max(1);
                for (yv, &xv) in y.iter_mut().zip(x) {
                    *yv = a.forward(xv);
                }
                if *a == Activation::Softmax && !logits {
                    activation::softmax_rows(y, cols);
                }
            }
            Layer::Dropout(d) => d.forward(x, y, training, rng),
            Layer::Flatten | Layer::Folded(_) => y.copy_from_slice(x),
        }
    }

    /// Backward: parameter gradients, and `dx` when given.
    pub fn backward(&mut self, x: &[f32], dy: &[f32], dx: Option<&mut [f32]>, batch: usize) {
        match self {
            Layer::Dense(d) => d.backward(x, dy, dx, batch),
            Layer::Conv2d(c) => c.backward(x, dy, dx, batch),
            Layer::BatchNorm(b) => b.backward(x, dy, dx, dy.len()),
            Layer::Pool2d(p) => {
                if let Some(dx) = dx {
                    p.backward(dy, dx, batch)
                }
            }
            Layer::GlobalAvgPool(g) => {
                if let Some(dx) = dx {
                    g.backward(dy, dx, batch)
                }
            }
            Layer::Activation(Activation::Relu) => {
                if let Some(dx) = dx {
                    for ((d, &g), &z) in dx.iter_mut().zip(dy).zip(x) {
                        *d = if z > 0.0 { g } else { 0.0 };
                    }
                }
            }
            Layer::Activation(a) => {
                if let Some(dx) = dx {
                    for ((d, &g), &z) in dx.iter_mut().zip(dy).zip(x) {
                        *d = g * a.derivative(z, a.forward(z));
                    }
                }
            }
            Layer::Dropout(d) => {
                if let Some(dx) = dx {
                    d.backward(dy, dx)
                }
            }
            Layer::Flatten | Layer::Folded(_) => {
                if let Some(dx) = dx {
                    dx.copy_from_slice(dy)
                }
            }
        }
    }

    /// Whether this layer computes `next` (the layer right after it) in its own passes, so that
    /// `next` has nothing left to do: a batch norm followed by a ReLU ([`BatchNorm::relu`]; in
    /// cnn-small this saves a read and a write of the largest activation in each direction). The
    /// model then gives both layers one output buffer and skips `next` in both passes
    /// ([`Layer::set_fused_next`]); the bits are those of the two layers.
    pub fn fuses_next(&self, next: &Layer) -> bool {
        matches!((self, next), (Layer::BatchNorm(_), Layer::Activation(Activation::Relu)))
    }

    /// Tell a layer whether it computes the next one too ([`Layer::fuses_next`]).
    pub fn set_fused_next(&mut self, on: bool) {
        if let Layer::BatchNorm(b) = self {
            b.relu = on;
        }
    }

    /// Whether [`Layer::backward_in_place`] applies: the input gradient has the output
    /// gradient's shape and each value is computed from its own position after any per-channel
    /// reductions, so both can share one buffer (the model then keeps one gradient buffer for a
    /// run of such layers).
    pub fn grad_in_place(&self) -> bool {
        matches!(
            self,
            Layer::BatchNorm(_) | Layer::Activation(_) | Layer::Dropout(_) | Layer::Flatten | Layer::Folded(_)
        )
    }

    /// Backward of a [`Layer::grad_in_place`] layer: `g` holds `∂L/∂y` and receives `∂L/∂x`
    /// (`x` is the forward input); parameter gradients as [`Layer::backward`].
    pub fn backward_in_place(&mut self, x: &[f32], g: &mut [f32]) {
        match self {
            Layer::BatchNorm(b) => b.backward_in_place(x, g, g.len()),
            Layer::Activation(Activation::Relu) => relu_backward_in_place(x, g),
            Layer::Activation(a) => {
                for (d, &z) in g.iter_mut().zip(x) {
                    *d *= a.derivative(z, a.forward(z));
                }
            }
            Layer::Dropout(d) => d.backward_in_place(g),
            Layer::Flatten | Layer::Folded(_) => {}
            _ => unreachable!("backward_in_place of a layer that is not grad_in_place"),
        }
    }

    /// The trainable parameters, in a fixed order (no allocation): what the optimizer steps, the
    /// checkpoint saves and the exporter reads.
    pub fn params(&self) -> impl Iterator<Item = &Param> {
        let slots: [Option<&Param>; 5] = match self {
            Layer::Dense(d) => [Some(&d.weight), Some(&d.bias), d.out.act.step.as_ref(), None, None],
            Layer::Conv2d(c) => {
                let bn = c.bn.as_deref().map(|f| &f.bn);
                [
                    Some(&c.weight),
                    Some(&c.bias),
                    c.out.act.step.as_ref(),
                    bn.map(|b| &b.gamma),
                    bn.map(|b| &b.beta),
                ]
            }
            Layer::BatchNorm(b) => [Some(&b.gamma), Some(&b.beta), None, None, None],
            _ => [None, None, None, None, None],
        };
        slots.into_iter().flatten()
    }

    /// [`Layer::params`], mutable.
    pub fn params_mut(&mut self) -> impl Iterator<Item = &mut Param> {
        let slots: [Option<&mut Param>; 5] = match self {
            Layer::Dense(d) => [
                Some(&mut d.weight),
                Some(&mut d.bias),
                d.out.act.step.as_mut(),
                None,
                None,
            ],
            Layer::Conv2d(c) => {
                let (g, b) = match c.bn.as_deref_mut() {
                    Some(f) => (Some(&mut f.bn.gamma), Some(&mut f.bn.beta)),
                    None => (None, None),
                };
                [Some(&mut c.weight), Some(&mut c.bias), c.out.act.step.as_mut(), g, b]
            }
            Layer::BatchNorm(b) => [Some(&mut b.gamma), Some(&mut b.beta), None, None, None],
            _ => [None, None, None, None, None],
        };
        slots.into_iter().flatten()
    }

    /// State that is checkpointed but not optimized, in a fixed order (no allocation): batch
    /// norm's running statistics (also of a batch norm folded into a convolution), and the
    /// oscillation/freezing state of a quantized kernel ([`WeightFakeQuant::buffer_slots`]).
    pub fn buffers(&self) -> impl Iterator<Item = &Buffer> {
        let (bn, kernel): ([Option<&Buffer>; 2], [Option<&Buffer>; 4]) = match self {
            Layer::BatchNorm(b) => ([Some(&b.running_mean), Some(&b.running_var)], [None; 4]),
            Layer::Dense(d) => ([None; 2], d.wq.buffer_slots()),
            Layer::Conv2d(c) => {
                let f = c.bn.as_deref().map(|f| &f.bn);
                (
                    [f.map(|b| &b.running_mean), f.map(|b| &b.running_var)],
                    c.wq.buffer_slots(),
                )
            }
            _ => ([None; 2], [None; 4]),
        };
        bn.into_iter().chain(kernel).flatten()
    }

    /// [`Layer::buffers`], mutable.
    pub fn buffers_mut(&mut self) -> impl Iterator<Item = &mut Buffer> {
        let (bn, kernel): ([Option<&mut Buffer>; 2], [Option<&mut Buffer>; 4]) = match self {
            Layer::BatchNorm(b) => (
                [Some(&mut b.running_mean), Some(&mut b.running_var)],
                [None, None, None, None],
            ),
            Layer::Dense(d) => ([None, None], d.wq.buffer_slots_mut()),
            Layer::Conv2d(c) => {
                let bn = match c.bn.as_deref_mut() {
                    Some(f) => [Some(&mut f.bn.running_mean), Some(&mut f.bn.running_var)],
                    None => [None, None],
                };
                (bn, c.wq.buffer_slots_mut())
            }
            _ => ([None, None], [None, None, None, None]),
        };
        bn.into_iter().chain(kernel).flatten()
    }

    /// The batch norm of this layer: a batch-norm layer, or one folded into a convolution.
    pub fn batch_norm(&self) -> Option<&BatchNorm> {
        match self {
            Layer::BatchNorm(b) => Some(b),
            Layer::Conv2d(c) => c.bn.as_deref().map(|f| &f.bn),
            _ => None,
        }
    }

    /// [`Layer::batch_norm`], mutable.
    pub fn batch_norm_mut(&mut self) -> Option<&mut BatchNorm> {
        match self {
            Layer::BatchNorm(b) => Some(b),
            Layer::Conv2d(c) => c.bn.as_deref_mut().map(|f| &mut f.bn),
            _ => None,
        }
    }

    /// The quantization components of a layer with weights and an output stage.
    pub fn quant_parts(&self) -> Option<(&WeightFakeQuant, &ActFakeQuant)> {
        match self {
            Layer::Dense(d) => Some((&d.wq, &d.out.act)),
            Layer::Conv2d(c) => Some((&c.wq, &c.out.act)),
            _ => None,
        }
    }

    /// The output quantizer, mutable (observers, LSQ steps).
    pub fn act_quant_mut(&mut self) -> Option<&mut ActFakeQuant> {
        match self {
            Layer::Dense(d) => Some(&mut d.out.act),
            Layer::Conv2d(c) => Some(&mut c.out.act),
            _ => None,
        }
    }

    /// The kernel and its weight fake-quantizer, for layers that have them.
    pub fn weight_quant(&self) -> Option<(&Param, &WeightFakeQuant)> {
        match self {
            Layer::Dense(d) => Some((&d.weight, &d.wq)),
            Layer::Conv2d(c) => Some((&c.weight, &c.wq)),
            _ => None,
        }
    }

    /// The kernel and its fake-quantizer, mutable (disjoint borrows).
    pub fn weight_quant_mut(&mut self) -> Option<(&mut Param, &mut WeightFakeQuant)> {
        match self {
            Layer::Dense(d) => Some((&mut d.weight, &mut d.wq)),
            Layer::Conv2d(c) => Some((&mut c.weight, &mut c.wq)),
            _ => None,
        }
    }

    /// The output quantizer.
    pub fn act_quant(&self) -> Option<&ActFakeQuant> {
        self.quant_parts().map(|p| p.1)
    }
}

crate::simd::widest! {
    /// `y = max(x, 0)`.
    fn relu_forward(x: &[f32], y: &mut [f32]) {
        for (yv, &xv) in y.iter_mut().zip(x) {
            *yv = xv.max(0.0);
        }
    }
}

crate::simd::widest! {
    /// `g ← g` where `x > 0`, else 0 (as `Layer::backward`: also 0 for NaN).
    fn relu_backward_in_place(x: &[f32], g: &mut [f32]) {
        for (d, &z) in g.iter_mut().zip(x) {
            *d = if z > 0.0 { *d } else { 0.0 };
        }
    }
}
