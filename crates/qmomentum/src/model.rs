//! `Sequential`: a stack of layers with the activation buffers of a batch (llm.c style: one
//! buffer per layer boundary, allocated once, reused every step).
//!
//! ```
//! use qmomentum::{config::ModelConfig, model::Sequential, quant::Scheme};
//! let mut m = Sequential::from_config(&ModelConfig::default(), Scheme::Fp32, false, 0).unwrap();
//! assert_eq!(m.param_count(), 109_386);
//! let x = vec![0.5f32; 2 * 784];
//! let p = m.predict(&x, 2);
//! assert_eq!(p.len(), 20);
//! assert!((p[..10].iter().sum::<f32>() - 1.0).abs() < 1e-5);
//! ```

use crate::config::{LayerConfig, ModelConfig};
use crate::error::{Error, Result};
use crate::layers::conv2d::Conv2dConfig;
use crate::layers::{
    Activation, BatchNorm, BnMomentum, Buffer, Conv2d, Dense, Dropout, GlobalAvgPool, Layer, Param, Pool2d, PoolKind,
    PooledGrad, Shape,
};
use crate::loss;
use crate::quant::Scheme;
use crate::rng::Rng;

/// The batch norm a config layer describes (Keras or PyTorch momentum convention).
fn batch_norm(index: usize, channels: usize, l: &LayerConfig) -> BatchNorm {
    let LayerConfig::BatchNorm {
        momentum,
        torch_momentum,
        epsilon,
    } = l
    else {
        unreachable!("batch_norm() of a {l:?}")
    };
    let rule = match (momentum, torch_momentum) {
        (_, Some(p)) => BnMomentum::Torch { momentum: *p },
        (m, None) => BnMomentum::Keras {
            momentum: m.unwrap_or(0.99),
        },
    };
    BatchNorm::new(index, channels, *epsilon, rule)
}

/// A sequential model.
#[derive(Clone, Debug)]
pub struct Sequential {
    /// Input features.
    pub input_size: usize,
    /// Shape of one input sample (NHWC).
    pub input_shape: Shape,
    /// Layers.
    pub layers: Vec<Layer>,
    /// Binarize the input at this threshold (`x ≥ t` → +1, else −1) before the first layer.
    pub binarize_input: Option<f32>,
    /// Activation buffers; activation `j` (the output of layer `j − 1`) is `acts[aslot[j]]`.
    acts: Vec<Vec<f32>>,
    aslot: Vec<usize>,
    /// Gradient buffers; the gradient of activation `j` is `grads[gslot[j]]`.
    grads: Vec<Vec<f32>>,
    gslot: Vec<usize>,
    /// [`Sequential::layout_key`] of the slots above.
    layout: u64,
    probs: Vec<f32>,
    sizes: Vec<usize>,
    cap: usize,
    /// Per parameter, where its gradient sum and its copy into a replica are split over the two
    /// cores ([`Sequential::add_grads`], [`Sequential::sync_from`]; measured, see
    /// [`qmomentum_runtime::pool::Balance`]).
    balance: Vec<[qmomentum_runtime::pool::Balance; 2]>,
}

impl Sequential {
    /// An empty model reading `input_size` features.
    pub fn new(input_size: usize) -> Self {
        Sequential {
            input_size,
            input_shape: Shape::flat(input_size),
            layers: Vec::new(),
            binarize_input: None,
            acts: Vec::new(),
            aslot: Vec::new(),
            grads: Vec::new(),
            gslot: Vec::new(),
            layout: 0,
            probs: Vec::new(),
            sizes: Vec::new(),
            cap: 0,
            balance: Vec::new(),
        }
    }

    /// Output shape of every layer boundary (input first).
    pub fn shapes(&self) -> impl Iterator<Item = Shape> + '_ {
        std::iter::once(self.input_shape).chain(self.layers.iter().scan(self.input_shape, |s, l| {
            *s = l.output_shape(*s);
            Some(*s)
        }))
    }

    /// Output features of the whole model.
    pub fn output_size(&self) -> usize {
        self.shapes().last().map(|s| s.len()).unwrap_or(self.input_size)
    }

    /// Number of classes (output features).
    pub fn classes(&self) -> usize {
        self.output_size()
    }

    /// Build from a config: Glorot init from `seed`, then the quantization of `scheme` (per-layer
    /// `quant` overrides win); `bop` makes binary weights ±1 parameters for Bop.
    pub fn from_config(cfg: &ModelConfig, scheme: Scheme, bop: bool, seed: u64) -> Result<Self> {
        cfg.validate()?;
        let plan = cfg.plan()?;
        let mut rng = Rng::new(seed, 0x1417);
        let mut m = Sequential::new(cfg.input);
        m.input_shape = cfg.input_shape()?;
        m.binarize_input = cfg.binarize_input.or(scheme.input_binarization());
        let weighted = cfg
            .layers
            .iter()
            .filter(|l| matches!(l, LayerConfig::Dense { .. } | LayerConfig::Conv2d { .. }))
            .count();
        let preset = scheme.layers(weighted);
        let mut d = 0;
        // Quantization-aware training folds each batch norm into the convolution before it
        // (`layers::folded_bn`); the positions of the batch norm and of the activation moved into
        // the convolution become `Layer::Folded`.
        let mut folded_into: Vec<Option<usize>> = vec![None; cfg.layers.len()];
        for (i, (l, p)) in cfg.layers.iter().zip(&plan).enumerate() {
            if let Some(k) = folded_into[i] {
                m.layers.push(Layer::Folded(k));
                continue;
            }
            let layer = match l {
                LayerConfig::Dense {
                    units,
                    activation,
                    quant,
                } => {
                    let mut dense = Dense::new(i, p.input.len(), *units, *activation, &mut rng);
                    let q = quant.unwrap_or(preset[d]);
                    q.validate(i)?;
                    dense.set_quant(q, bop);
                    d += 1;
                    Layer::Dense(Box::new(dense))
                }
                LayerConfig::Conv2d {
                    filters,
                    kernel_size,
                    strides,
                    padding,
                    dilation_rate,
                    groups,
                    activation,
                    quant,
                } => {
                    let c = Conv2dConfig {
                        filters: *filters,
                        kernel: kernel_size.get(),
                        stride: strides.get(),
                        padding: *padding,
                        dilation: dilation_rate.get(),
                        groups: *groups,
                    };
                    let mut conv = Conv2d::new(i, p.input, c, *activation, &mut rng)?;
                    let q = quant.unwrap_or(preset[d]);
                    q.validate(i)?;
                    if let (true, Some(LayerConfig::BatchNorm { .. })) = (q.is_quantized(), cfg.layers.get(i + 1)) {
                        if *activation != Activation::Linear {
                            return Err(Error::config(
                                format!("model.layers[{i}].activation"),
                                activation,
                                "a convolution followed by batch norm must be linear to be quantized (its batch norm is folded into it): move the activation after the batch norm",
                            ));
                        }
                        let binary = matches!(q.weights, Some(crate::quant::WeightQuant::Binary { .. }));
                        let bn = batch_norm(i + 1, p.output.c, &cfg.layers[i + 1]);
                        let act = match cfg.layers.get(i + 2) {
                            Some(LayerConfig::Activation { activation }) if *activation != Activation::Softmax => {
                                folded_into[i + 2] = Some(i);
                                *activation
                            }
                            _ => Activation::Linear,
                        };
                        folded_into[i + 1] = Some(i);
                        conv.fold_batch_norm(bn, act, binary);
                    }
                    conv.set_quant(q, bop);
                    d += 1;
                    Layer::Conv2d(Box::new(conv))
                }
                LayerConfig::MaxPool2d {
                    pool_size,
                    strides,
                    padding,
                } => Layer::Pool2d(Pool2d::new(
                    i,
                    PoolKind::Max,
                    p.input,
                    pool_size.get(),
                    strides.unwrap_or(*pool_size).get(),
                    *padding,
                )?),
                LayerConfig::AvgPool2d {
                    pool_size,
                    strides,
                    padding,
                } => Layer::Pool2d(Pool2d::new(
                    i,
                    PoolKind::Avg,
                    p.input,
                    pool_size.get(),
                    strides.unwrap_or(*pool_size).get(),
                    *padding,
                )?),
                LayerConfig::GlobalAvgPool => Layer::GlobalAvgPool(GlobalAvgPool { input: p.input }),
                LayerConfig::BatchNorm { .. } => {
                    if scheme != Scheme::Fp32 {
                        return Err(Error::config(
                            format!("model.layers[{i}]"),
                            "batch_norm",
                            format!("with quant = \"{scheme}\", a batch norm must follow a linear, quantized conv2d (it is folded into it for QAT): fold it yourself, or train in fp32 and use `qmomentum quantize`"),
                        ));
                    }
                    Layer::BatchNorm(Box::new(batch_norm(i, p.input.c, l)))
                }
                LayerConfig::Dropout { rate } => Layer::Dropout(Dropout::new(*rate)),
                LayerConfig::Activation { activation } => Layer::Activation(*activation),
                LayerConfig::Flatten => Layer::Flatten,
            };
            m.layers.push(layer);
        }
        Ok(m)
    }

    /// Turn every batch norm folded into a convolution for QAT into the folded kernel and bias
    /// of the integer model (running statistics; [`crate::layers::FoldedBn::fold`]): the forward
    /// pass is then exactly the deployed layer's. The exporters work on this form.
    pub fn bake_folded_batch_norm(&mut self) {
        for l in self.layers.iter_mut() {
            if let Layer::Conv2d(c) = l {
                // A batch norm after a binary kernel stays: the exporter turns it and the sign
                // into thresholds.
                if c.bn.as_deref().is_some_and(|f| f.fold_scale) {
                    if let Some(mut f) = c.bn.take() {
                        f.fold(&mut c.weight.value, &mut c.bias.value);
                    }
                }
            }
        }
    }

    /// Whether any batch norm is folded into a convolution (QAT of a batch-normalised model).
    pub fn has_folded_batch_norm(&self) -> bool {
        self.layers
            .iter()
            .any(|l| matches!(l, Layer::Conv2d(c) if c.bn.is_some()))
    }

    /// Whether any batch norm's scale `γ/σ` is folded into a convolution's kernel (all but the
    /// batch norms kept after binary kernels).
    pub fn has_scale_folded_batch_norm(&self) -> bool {
        self.layers
            .iter()
            .any(|l| matches!(l, Layer::Conv2d(c) if c.bn.as_deref().is_some_and(|f| f.fold_scale)))
    }

    /// Freeze (or not) the statistics of every folded batch norm (torch.ao's `freeze_bn_stats`):
    /// frozen, they normalise with the running statistics and stop moving them.
    pub fn set_batch_norm_frozen(&mut self, frozen: bool) {
        for l in self.layers.iter_mut() {
            if let Layer::Conv2d(c) = l {
                if let Some(f) = c.bn.as_deref_mut() {
                    f.frozen = frozen;
                }
            }
        }
    }

    /// The batch norm the config puts at layer `k`: that layer's, or the one folded into the
    /// convolution it belongs to.
    pub fn batch_norm_at(&self, k: usize) -> Option<&BatchNorm> {
        match self.layers.get(k)? {
            // The batch norm's position is the one right after its convolution (the next one
            // is the folded activation's).
            Layer::Folded(i) if k == i + 1 => self.layers.get(*i)?.batch_norm(),
            Layer::Folded(_) => None,
            l => l.batch_norm(),
        }
    }

    /// [`Sequential::batch_norm_at`], mutable.
    pub fn batch_norm_at_mut(&mut self, k: usize) -> Option<&mut BatchNorm> {
        let k = match self.layers.get(k)? {
            Layer::Folded(i) if k == i + 1 => *i,
            Layer::Folded(_) => return None,
            _ => k,
        };
        self.layers.get_mut(k)?.batch_norm_mut()
    }

    /// Whether layer `i` is a batch norm with its ReLU fused ([`Layer::fuses_next`]) followed by a
    /// 2×2/stride-2 max pooling, whose backward pass it then does too
    /// ([`BatchNorm::backward_in_place_through_pool`]; cnn-small's two blocks).
    fn pool_through_batch_norm(layers: &[Layer], i: usize) -> bool {
        match (layers.get(i), layers.get(i + 1), layers.get(i + 2)) {
            (Some(bn @ Layer::BatchNorm(_)), Some(relu), Some(Layer::Pool2d(p))) => bn.fuses_next(relu) && p.fast_2x2(),
            _ => false,
        }
    }

    /// For a 2×2/stride-2 max pooling at `p`: the convolution before it (past the layers folded
    /// into that convolution: QAT's batch norm and activation) when the convolution's output
    /// stage does the pooling's backward ([`Conv2d::backward_through_pool`]; cnn-small's QAT
    /// blocks: after the fused forward pass, or a ReLU/linear stage on a clipped-STE grid).
    fn conv_under_pool(layers: &[Layer], p: usize) -> Option<usize> {
        let Layer::Pool2d(pool) = layers.get(p)? else {
            return None;
        };
        if !pool.fast_2x2() {
            return None;
        }
        let mut j = p.checked_sub(1)?;
        while let Layer::Folded(k) = layers[j] {
            if k >= j {
                return None;
            }
            j = k;
        }
        match &layers[j] {
            Layer::Conv2d(c) if c.out.backward_reads_pooled() => Some(j),
            _ => None,
        }
    }

    /// The pooling whose backward the convolution at `i` does ([`Sequential::conv_under_pool`]).
    fn pool_over_conv(layers: &[Layer], i: usize) -> Option<usize> {
        if !matches!(layers.get(i)?, Layer::Conv2d(_)) {
            return None;
        }
        let mut p = i + 1;
        while matches!(layers.get(p)?, Layer::Folded(k) if *k == i) {
            p += 1;
        }
        (Self::conv_under_pool(layers, p) == Some(i)).then_some(p)
    }

    /// For a convolution at `i` with a folded batch norm (QAT) followed, past the layers folded
    /// into it, by a 2×2/stride-2 max pooling: that pooling, whose forward pass the convolution
    /// does ([`Conv2d::forward_through_pool`]). Decided by the layers alone (the same for every
    /// pass), as the forward loop skips the pooling by it.
    fn pool_after_conv(layers: &[Layer], i: usize) -> Option<usize> {
        match layers.get(i)? {
            Layer::Conv2d(c) if c.bn.is_some() => {}
            _ => return None,
        }
        let mut p = i + 1;
        while matches!(layers.get(p)?, Layer::Folded(k) if *k == i) {
            p += 1;
        }
        matches!(layers.get(p)?, Layer::Pool2d(pool) if pool.fast_2x2()).then_some(p)
    }

    /// Whether the pooling at `p` is computed by the convolution before it
    /// ([`Sequential::pool_after_conv`]).
    fn pooled_by_conv(layers: &[Layer], p: usize) -> bool {
        let Some(mut j) = p.checked_sub(1) else {
            return false;
        };
        while let Layer::Folded(k) = layers[j] {
            if k >= j {
                return false;
            }
            j = k;
        }
        Self::pool_after_conv(layers, j) == Some(p)
    }

    /// Whether layer `i` is computed by the layer before it ([`Layer::fuses_next`]).
    fn fused_into_previous(&self, i: usize) -> bool {
        i > 0 && self.layers[i - 1].fuses_next(&self.layers[i])
    }

    /// A key of what the buffer slots depend on: each layer's kind and the fusions between
    /// layers (`layers` is public: a layer replaced by one of another kind must not keep slots
    /// planned for the old one). Computed on every pass, without allocating.
    fn layout_key(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for (i, l) in self.layers.iter().enumerate() {
            std::mem::discriminant(l).hash(&mut h);
            (
                self.fused_into_previous(i),
                Self::pool_through_batch_norm(&self.layers, i),
            )
                .hash(&mut h);
        }
        h.finish()
    }

    fn ensure(&mut self, batch: usize) {
        let l = self.layers.len();
        let key = self.layout_key();
        if batch <= self.cap && self.aslot.len() == l + 1 && self.gslot.len() == l + 1 && self.layout == key {
            return;
        }
        self.layout = key;
        let sizes: Vec<usize> = self.shapes().map(|s| s.len()).collect();
        // A folded layer (a batch norm or activation computed inside the convolution before it)
        // outputs its input: one buffer for both.
        // So does a layer that the one before it computes (`Layer::fuses_next`).
        let mut aslot = vec![0usize; l + 1];
        let mut asizes = vec![sizes[0]];
        for i in 0..l {
            let fuses = i + 1 < l && self.layers[i].fuses_next(&self.layers[i + 1]);
            self.layers[i].set_fused_next(fuses);
            // Flatten too: NHWC rows are already flat.
            if matches!(self.layers[i], Layer::Folded(_) | Layer::Flatten) || self.fused_into_previous(i) {
                aslot[i + 1] = aslot[i];
            } else {
                aslot[i + 1] = asizes.len();
                // A batch norm that pools its own output writes only the pooling's buffer
                // (`BatchNorm::forward_through_pool`): its own is never written, and takes no
                // memory (cnn-small: 12.8 MB per replica at batch 128).
                let unwritten = Self::pool_through_batch_norm(&self.layers, i);
                asizes.push(if unwritten { 0 } else { sizes[i + 1] });
            }
        }
        self.acts = asizes.iter().map(|&s| vec![0.0; s * batch]).collect();
        self.aslot = aslot;
        // A layer whose backward works in place (batch norm, activations, dropout, flatten:
        // `Layer::grad_in_place`) writes its input gradient over its output gradient, so a run of
        // such layers shares one buffer (for cnn-small's two replicas: 40 MB less).
        let mut gslot = vec![0usize; l + 1];
        let mut gsizes = vec![sizes[l]];
        for i in (0..l).rev() {
            if self.layers[i].grad_in_place() && sizes[i] == sizes[i + 1] {
                gslot[i] = gslot[i + 1];
            } else {
                gslot[i] = gsizes.len();
                gsizes.push(sizes[i]);
            }
        }
        self.grads = gsizes.iter().map(|&s| vec![0.0; s * batch]).collect();
        self.gslot = gslot;
        self.probs = vec![0.0; self.classes() * batch];
        self.sizes = sizes;
        self.cap = batch;
    }

    /// The batch size evaluation uses: up to 1000 rows, but no more than fit 32 MiB of
    /// activations and gradients, unless the buffers already hold more (a CNN's training batch).
    /// The MLP evaluates 1000 rows at a time; cnn-small (≈126 k activations per sample) would
    /// need ~1 GB at 1000 rows and evaluates at its training batch instead.
    pub fn evaluation_batch(&self) -> usize {
        const BUDGET: usize = 32 << 20;
        let per_sample: usize = self.shapes().map(|s| s.len()).sum::<usize>().max(1) * 2 * 4;
        (BUDGET / per_sample).max(self.cap).clamp(1, 1000)
    }

    /// The input buffer of a batch of `batch` rows, to be filled by the caller.
    pub fn input_mut(&mut self, batch: usize) -> &mut [f32] {
        self.ensure(batch);
        let n = batch * self.input_size;
        &mut self.acts[0][..n]
    }

    /// Forward pass over the batch in the input buffer; returns the outputs (logits when
    /// `logits`, probabilities for a softmax model otherwise).
    pub fn forward(&mut self, batch: usize, training: bool, logits: bool, rng: &mut Rng) -> &[f32] {
        self.ensure(batch);
        let mut size = self.input_size;
        // The grid of each layer's input: pixels/255 for the model input (the data pipeline),
        // then each quantized layer's output grid.
        let mut in_scale = Some(crate::data::PIXEL_SCALE);
        if let Some(t) = self.binarize_input {
            for v in self.acts[0][..batch * size].iter_mut() {
                *v = if *v >= t { 1.0 } else { -1.0 };
            }
            in_scale = None;
        }
        for i in 0..self.layers.len() {
            let out = self.sizes[i + 1];
            // A pooling computed by the batch norm two layers down; a batch norm that pools.
            let pooled_below = i >= 2 && Self::pool_through_batch_norm(&self.layers, i - 2);
            let pools = Self::pool_through_batch_norm(&self.layers, i);
            let (conv_pools, pooled_by_conv) = (
                Self::pool_after_conv(&self.layers, i),
                Self::pooled_by_conv(&self.layers, i),
            );
            // A convolution before a batch norm that pools leaves its bias to it in training.
            let bias_to_bn = training && Self::pool_through_batch_norm(&self.layers, i + 1);
            let layer = &mut self.layers[i];
            // The grid each layer's input lies on: a quantized layer's output grid survives max
            // pooling, dropout (at inference) and flatten; anything else computes new values.
            match layer {
                Layer::Dense(d) => {
                    d.input_scale = in_scale;
                    in_scale = d.output_qparams().map(|q| q.scale);
                }
                Layer::Conv2d(c) => {
                    c.input_scale = in_scale;
                    in_scale = c.output_qparams().map(|q| q.scale);
                }
                Layer::Pool2d(p) if p.kind == PoolKind::Max => {}
                Layer::Dropout(_) | Layer::Flatten | Layer::Folded(_) => {}
                _ => in_scale = None,
            }
            let (from, into) = (self.aslot[i], self.aslot[i + 1]);
            if from == into || pooled_below || pooled_by_conv {
                // Nothing to compute, or computed by the batch norm two layers down or the
                // convolution before it (below).
                continue;
            }
            if let Some(p) = conv_pools {
                // A QAT convolution with its folded batch norm, then a 2×2 max pooling: the
                // convolution writes the pooling's output too (and its own, unless fused).
                let (lo, hi) = self.layers.split_at_mut(i + 1);
                if let (Layer::Conv2d(conv), Layer::Pool2d(pool)) = (&mut lo[i], &mut hi[p - i - 1]) {
                    let pooled = self.aslot[p + 1];
                    debug_assert!(from < into && into < pooled);
                    let (a, b) = self.acts.split_at_mut(pooled);
                    let (a0, a1) = a.split_at_mut(into);
                    conv.forward_through_pool(
                        &a0[from][..batch * size],
                        pool,
                        &mut a1[0][..batch * out],
                        &mut b[0][..batch * self.sizes[p + 1]],
                        batch,
                        training,
                        logits,
                    );
                }
                size = self.sizes[p + 1];
                continue;
            }
            if pools {
                // A batch norm + ReLU + 2×2 max pooling: the batch norm writes the pooled output
                // straight into the pooling's buffer (its own stays unwritten).
                let (lo, hi) = self.layers.split_at_mut(i + 1);
                let (before, lo) = lo.split_at_mut(i);
                // The bias of a convolution before that left it to the batch norm.
                let bias = match before.last() {
                    Some(Layer::Conv2d(conv)) if conv.bias_deferred() => Some(&conv.bias.value[..]),
                    _ => None,
                };
                if let (Layer::BatchNorm(bn), Layer::Pool2d(pool)) = (&mut lo[0], &mut hi[1]) {
                    let pooled = self.aslot[i + 3];
                    debug_assert!(pooled > from);
                    let (a, b) = self.acts.split_at_mut(pooled);
                    let n = batch * size;
                    bn.forward_through_pool(&mut a[from][..n], bias, pool, &mut b[0], n, training);
                }
                size = self.sizes[i + 3];
                continue;
            }
            let (a, b) = self.acts.split_at_mut(into);
            if let (Layer::Conv2d(conv), true) = (&mut *layer, bias_to_bn) {
                conv.forward_bias_to_batch_norm(&a[from][..batch * size], &mut b[0][..batch * out], batch);
                size = out;
                continue;
            }
            layer.forward(
                &a[from][..batch * size],
                &mut b[0][..batch * out],
                batch,
                training,
                logits,
                rng,
            );
            size = out;
        }
        &self.acts[self.aslot[self.layers.len()]][..batch * size]
    }

    /// One forward + backward pass for `labels` with the fused softmax cross-entropy loss,
    /// the loss being averaged over `norm` samples (the whole batch when this model computes only
    /// a share of it). Returns `(Σ loss over these rows, correct predictions)`; gradients are left
    /// in the parameters.
    pub fn forward_backward(&mut self, labels: &[u32], norm: usize, rng: &mut Rng) -> (f64, usize) {
        let batch = labels.len();
        let classes = self.classes();
        self.forward(batch, true, true, rng);
        let l = self.layers.len();
        let n = batch * classes;
        let loss =
            loss::softmax_crossentropy_forward(&self.acts[self.aslot[l]][..n], labels, classes, &mut self.probs[..n]);
        let correct = crate::metrics::correct(&self.probs[..n], labels, classes);
        let top = self.gslot[l];
        loss::softmax_crossentropy_backward(&self.probs[..n], labels, classes, &mut self.grads[top][..n]);
        if norm != batch && batch > 0 {
            let f = batch as f32 / norm as f32;
            self.grads[top][..n].iter_mut().for_each(|g| *g *= f);
        }
        // Backward, last layer first; the first layer needs no input gradient.
        let (sizes, gslot, acts, grads) = (&self.sizes, &self.gslot, &self.acts, &mut self.grads);
        for i in (0..l).rev() {
            let (into, from) = (gslot[i], gslot[i + 1]);
            if i > 0 && self.layers[i - 1].fuses_next(&self.layers[i]) {
                // Its backward is part of the previous layer's (which shares its buffers).
                debug_assert_eq!(into, from);
                continue;
            }
            if i >= 2 && Self::pool_through_batch_norm(&self.layers, i - 2) {
                // Done by the batch norm two layers down, from this layer's `dy` (below).
                continue;
            }
            if Self::conv_under_pool(&self.layers, i).is_some() {
                // Done by the convolution below (past the layers folded into it).
                continue;
            }
            let x = &acts[self.aslot[i]][..batch * sizes[i]];
            if let Some(p) = Self::pool_over_conv(&self.layers, i) {
                // The convolution's output stage reads the pooled gradient
                // (`grads[gslot[p + 1]]`); it writes its input gradient as usual.
                let (lo, hi) = self.layers.split_at_mut(i + 1);
                if let (Layer::Conv2d(conv), Layer::Pool2d(pool)) = (&mut lo[i], &hi[p - i - 1]) {
                    let dpool = gslot[p + 1];
                    debug_assert!(dpool < into);
                    let (a, b) = grads.split_at_mut(into);
                    let pooled = PooledGrad {
                        dpool: &a[dpool][..batch * sizes[p + 1]],
                        argmax: pool.argmax(),
                        grid: pool.grid(),
                    };
                    let dx = if i > 0 {
                        Some(&mut b[0][..batch * sizes[i]])
                    } else {
                        None
                    };
                    conv.backward_through_pool(x, pooled, dx, batch);
                }
                continue;
            }
            if Self::pool_through_batch_norm(&self.layers, i) {
                // A batch norm + ReLU + 2×2 max pooling: the batch norm's backward reads the
                // pooled gradient (`grads[gslot[i + 3]]`) and writes its input gradient into its
                // own buffer (shared with the ReLU's and the pooling's input gradients).
                let (lo, hi) = self.layers.split_at_mut(i + 1);
                let (before, lo) = lo.split_at_mut(i);
                // The bias gradient of a convolution before that left its bias to the batch norm.
                let bias_grad = match before.last_mut() {
                    Some(Layer::Conv2d(conv)) if conv.bias_deferred() => Some(&mut conv.bias.grad[..]),
                    _ => None,
                };
                if let (Layer::BatchNorm(bn), Layer::Pool2d(pool)) = (&mut lo[0], &hi[1]) {
                    let (g, dpool) = (gslot[i], gslot[i + 3]);
                    debug_assert!(g > dpool && g == from);
                    let (a, b) = grads.split_at_mut(g);
                    let n = batch * sizes[i];
                    bn.backward_in_place_through_pool(
                        x,
                        pool,
                        &a[dpool][..batch * sizes[i + 3]],
                        &mut b[0][..n],
                        n,
                        bias_grad,
                    );
                }
                continue;
            }
            if into == from {
                self.layers[i].backward_in_place(x, &mut grads[from][..batch * sizes[i + 1]]);
                continue;
            }
            // Two distinct buffers: `dy` read, `dx` written.
            let (dy, dx) = if from < into {
                let (lo, hi) = grads.split_at_mut(into);
                (&lo[from], &mut hi[0])
            } else {
                let (lo, hi) = grads.split_at_mut(from);
                (&hi[0], &mut lo[into])
            };
            let dx = if i > 0 { Some(&mut dx[..batch * sizes[i]]) } else { None };
            self.layers[i].backward(x, &dy[..batch * sizes[i + 1]], dx, batch);
        }
        (loss as f64 * batch as f64, correct)
    }

    /// Loss and correct predictions on a batch already in the input buffer (no training).
    pub fn evaluate_batch(&mut self, labels: &[u32], rng: &mut Rng) -> (f32, usize) {
        let batch = labels.len();
        let classes = self.classes();
        self.forward(batch, false, true, rng);
        let l = self.layers.len();
        let n = batch * classes;
        let loss =
            loss::softmax_crossentropy_forward(&self.acts[self.aslot[l]][..n], labels, classes, &mut self.probs[..n]);
        (loss, crate::metrics::correct(&self.probs[..n], labels, classes))
    }

    /// Outputs (probabilities for a softmax model) of `n` rows of `x`, in batches of 1024.
    ///
    /// # Panics
    /// If `x` holds fewer than `n × input_size` values (callers with untrusted data check the
    /// sizes first, as `train::evaluate` and the CLI do).
    pub fn predict(&mut self, x: &[f32], n: usize) -> Vec<f32> {
        let f = self.input_size;
        let c = self.classes();
        let mut out = Vec::with_capacity(n * c);
        let mut rng = Rng::new(0, 0);
        for start in (0..n).step_by(1024) {
            let b = (n - start).min(1024);
            self.input_mut(b).copy_from_slice(&x[start * f..(start + b) * f]);
            out.extend_from_slice(self.forward(b, false, false, &mut rng));
        }
        out
    }

    /// The output of layer `i` from the last forward pass over `batch` rows. Layers fused with
    /// the next ([`Layer::fuses_next`]) share its output: a batch norm followed by a ReLU gives
    /// the ReLU's output, and both are empty when the max pooling after them is computed in the
    /// same pass (their full-size output is never written: [`BatchNorm::forward_through_pool`]).
    /// After a QAT training pass, a folded convolution followed by a max pooling
    /// ([`Conv2d::forward_through_pool`]) and its folded layers hold an earlier pass's output
    /// (the fused pass writes only the pooled one); after an evaluation pass they are current.
    /// After a float training pass, a convolution that left its bias to the batch norm after it
    /// ([`Conv2d::forward_bias_to_batch_norm`]) holds its product without the bias.
    pub fn layer_output(&self, i: usize, batch: usize) -> &[f32] {
        let n = self.shapes().nth(i + 1).map(|s| s.len()).unwrap_or(0);
        self.acts[self.aslot[i + 1]].get(..batch * n).unwrap_or(&[])
    }

    /// All parameters in a fixed order (no allocation).
    pub fn params_iter(&self) -> impl Iterator<Item = &Param> {
        self.layers.iter().flat_map(|l| l.params())
    }

    /// All buffers (checkpointed state that is not optimized), in a fixed order.
    pub fn buffers_iter(&self) -> impl Iterator<Item = &Buffer> {
        self.layers.iter().flat_map(|l| l.buffers())
    }

    /// Whether any layer has an oscillation tracker.
    pub fn tracks(&self) -> bool {
        self.layers
            .iter()
            .any(|l| l.quant_parts().is_some_and(|(w, _)| w.tracker.is_some()))
    }

    /// The oscillation trackers' packed previous codes in their checkpointed form (one buffer
    /// `layers.{i}.osc_last` per tracked layer; made on request, see
    /// [`crate::quant::oscillation::OscillationTracker::state`]).
    pub fn tracker_states(&self) -> impl Iterator<Item = Buffer> + '_ {
        self.layers
            .iter()
            .filter_map(|l| l.quant_parts().and_then(|(w, _)| w.tracker.as_ref()))
            .map(|t| t.state())
    }

    /// [`Sequential::buffers_iter`], mutable.
    pub fn buffers_iter_mut(&mut self) -> impl Iterator<Item = &mut Buffer> {
        self.layers.iter_mut().flat_map(|l| l.buffers_mut())
    }

    /// All parameters, mutable, in the order of [`Sequential::params_iter`].
    pub fn params_iter_mut(&mut self) -> impl Iterator<Item = &mut Param> {
        self.layers.iter_mut().flat_map(|l| l.params_mut())
    }

    /// All parameters as a `Vec`.
    pub fn params(&self) -> Vec<&Param> {
        self.params_iter().collect()
    }

    /// All parameters as a `Vec`, mutable.
    pub fn params_mut(&mut self) -> Vec<&mut Param> {
        self.params_iter_mut().collect()
    }

    /// Number of trainable values.
    pub fn param_count(&self) -> usize {
        self.params_iter().map(|p| p.len()).sum()
    }

    /// The dense layers in order.
    pub fn dense(&self) -> impl Iterator<Item = &Dense> {
        self.layers.iter().filter_map(|l| match l {
            Layer::Dense(d) => Some(&**d),
            _ => None,
        })
    }

    /// The dense layers in order, mutable.
    pub fn dense_mut(&mut self) -> impl Iterator<Item = &mut Dense> {
        self.layers.iter_mut().filter_map(|l| match l {
            Layer::Dense(d) => Some(&mut **d),
            _ => None,
        })
    }

    /// The first parameter whose gradient is NaN or infinite, as `(name, index)`.
    pub fn first_non_finite_grad(&self) -> Option<(String, usize)> {
        for p in self.params_iter() {
            // A value is NaN or infinite iff its exponent bits are all ones; the integer max is a
            // reduction the compiler vectorises (a float sum would be a serial chain). The slow
            // search runs only when something is wrong.
            const EXP: u32 = 0x7f80_0000;
            let probe = p.grad.iter().fold(0u32, |m, g| m.max(g.to_bits() & EXP));
            if probe == EXP {
                let i = p.grad.iter().position(|g| !g.is_finite()).unwrap_or(0);
                return Some((p.name.clone(), i));
            }
        }
        None
    }

    /// Copy the parameter values, buffers and observer states of `src` (same architecture),
    /// except the kernels a [`Sequential::quantize_shared`] of this step handled (their
    /// quantizers are ready: copied there, or not read by this replica).
    pub fn sync_from(&mut self, src: &Sequential, threads: usize) {
        let mut k = 0;
        for (l, s) in self.layers.iter_mut().zip(&src.layers) {
            // A kernel [`Sequential::quantize_shared`] handled this step: copied already, or not
            // read by the replica ([`crate::quant::weight::WeightFakeQuant::quantize_shared`]).
            let copied = l.weight_quant().is_some_and(|(_, wq)| wq.is_ready());
            for (p, q) in l.params_mut().zip(s.params()) {
                if copied && p.kind == crate::layers::ParamKind::Weight {
                    p.frozen.clone_from(&q.frozen);
                } else {
                    if self.balance.len() <= k {
                        self.balance.resize(k + 1, Default::default());
                    }
                    Self::copy_param(p, q, threads, &mut self.balance[k][1]);
                }
                k += 1;
            }
        }
        self.sync_state_from(src);
    }

    /// Copy `q`'s values (and freeze mask) into `p`, in two shares on two cores when large
    /// (split where their measured times come out equal: `pool::Balance`).
    fn copy_param(p: &mut Param, q: &Param, threads: usize, bal: &mut qmomentum_runtime::pool::Balance) {
        if threads >= 2 && p.value.len() >= crate::optim::SPLIT_MIN {
            let n = p.value.len();
            let at = bal.split(n, 16);
            let (a0, a1) = p.value.split_at_mut(at);
            let (b0, b1) = q.value.split_at(at);
            bal.join(at, n, || a0.copy_from_slice(b0), || a1.copy_from_slice(b1));
        } else {
            p.value.copy_from_slice(&q.value);
        }
        // The freeze mask too: the replica's backward zeroes frozen weights' gradients like
        // the main model's (no allocation once both hold a mask).
        p.frozen.clone_from(&q.frozen);
    }

    /// The buffers, frozen codes, fixed scales and observer states of [`Sequential::sync_from`].
    fn sync_state_from(&mut self, src: &Sequential) {
        for (l, s) in self.layers.iter_mut().zip(&src.layers) {
            // A replica holds no oscillation tracker (only the main model tracks), but it needs
            // the frozen codes and fixed scales its forward pass uses.
            if let (Some((_, a)), Some((b, _))) = (l.weight_quant_mut(), s.quant_parts()) {
                a.sync_state_from(b);
                // A folded batch norm's running statistics and frozen flag (the fold reads them).
                if let (Layer::Conv2d(c), Layer::Conv2d(d)) = (&mut *l, s) {
                    if let (Some(f), Some(g)) = (c.bn.as_deref_mut(), d.bn.as_deref()) {
                        f.bn.running_mean.value.copy_from_slice(&g.bn.running_mean.value);
                        f.bn.running_var.value.copy_from_slice(&g.bn.running_var.value);
                        f.frozen = g.frozen;
                    }
                }
            } else {
                for (b, c) in l.buffers_mut().zip(s.buffers()) {
                    if b.value.len() == c.value.len() {
                        b.value.copy_from_slice(&c.value);
                    }
                }
            }
            if let (Some(a), Some(b)) = (l.act_quant_mut(), s.act_quant()) {
                a.observer.clone_from(&b.observer);
            }
        }
    }

    /// Quantize the kernels this model and its training `replica` share once, split over two
    /// cores ([`crate::quant::weight::WeightFakeQuant::quantize_shared`]), before a step whose
    /// forward passes then skip it; call [`Sequential::sync_from`] on the replica after it (it
    /// skips the kernels handled here). The replica needs this model's rules and fixed scales
    /// from an earlier sync, not its current kernel values. A kernel folded with a batch norm
    /// (its `ŵ` depends on the batch) and the kernels that path does not take are quantized by
    /// each forward pass as before. After the step, [`Sequential::release_shared`] on the
    /// replica.
    pub fn quantize_shared(&mut self, replica: &mut Sequential, threads: usize) {
        replica.release_shared();
        for (l, r) in self.layers.iter_mut().zip(replica.layers.iter_mut()) {
            if threads < 2 || matches!(&*l, Layer::Conv2d(c) if c.bn.is_some()) {
                continue;
            }
            if let (Some((w, a)), Some((rw, b))) = (l.weight_quant_mut(), r.weight_quant_mut()) {
                a.quantize_shared(b, &w.value, &mut rw.value);
            }
        }
    }

    /// Let go of every `ŵ` this (replica) model reads from its main model, and of any pending
    /// [`Sequential::quantize_shared`] (see
    /// [`crate::quant::weight::WeightFakeQuant::release_shared`]).
    pub fn release_shared(&mut self) {
        for l in self.layers.iter_mut() {
            if let Some((_, q)) = l.weight_quant_mut() {
                q.release_shared();
            }
        }
    }

    /// Turn iterative freezing on for every quantized layer (after the trackers exist).
    pub fn enable_freezing(&mut self) {
        for (i, l) in self.layers.iter_mut().enumerate() {
            if let Some((_, wq)) = l.weight_quant_mut() {
                wq.enable_freezing(i);
            }
        }
    }

    /// Make room for fixed weight scales in every layer on an integer grid.
    pub fn enable_fixed_scales(&mut self) {
        for (i, l) in self.layers.iter_mut().enumerate() {
            if let Some((_, wq)) = l.weight_quant_mut() {
                wq.enable_fixed_scales(i);
            }
        }
    }

    /// Fix the weight scales of every integer layer at their current values.
    pub fn fix_weight_scales(&mut self) {
        for l in self.layers.iter_mut() {
            if let Some((_, wq)) = l.weight_quant_mut() {
                wq.fix_scales();
            }
        }
    }

    /// Rebuild each weight's freeze mask from the frozen codes (after a checkpoint is loaded).
    pub fn refresh_freeze_masks(&mut self) {
        for l in self.layers.iter_mut() {
            if let Some((w, wq)) = l.weight_quant_mut() {
                wq.refresh_mask(w);
            }
        }
    }

    /// Drop the oscillation trackers (a replica, or a run with tracking off).
    pub fn drop_trackers(&mut self) {
        for l in self.layers.iter_mut() {
            if let Some((_, wq)) = l.weight_quant_mut() {
                wq.tracker = None;
            }
        }
    }

    /// Add the gradients of `other` (same architecture) to this model's. Returns whether every
    /// sum is finite (the NaN/inf test of the step, made in the pass that writes the sums
    /// instead of a pass of its own; see [`Sequential::first_non_finite_grad`]). Measured (MLP
    /// epoch, 4 interleaved rounds): 0.2205 s with the separate pass, 0.2091 s folded.
    /// Tensors of [`crate::optim::SPLIT_MIN`] values or more are summed in two halves on two
    /// cores when `threads` ≥ 2 (the same result: the sums are element-wise).
    pub fn add_grads(&mut self, other: &Sequential, threads: usize) -> bool {
        const EXP: u32 = 0x7f80_0000;
        // An integer max of the exponent bits vectorises with the add (a float test would
        // not); a sum is NaN or infinite iff its exponent bits are all ones.
        crate::simd::widest! {
            fn add(a: &mut [f32], b: &[f32], probe: u32) -> u32 {
                a.iter_mut().zip(b).fold(probe, |m, (a, &b)| {
                    *a += b;
                    m.max(a.to_bits() & 0x7f80_0000)
                })
            }
        }
        let mut probe = 0u32;
        let params = self.layers.iter_mut().flat_map(|l| l.params_mut());
        for (k, (p, q)) in params.zip(other.params_iter()).enumerate() {
            if threads >= 2 && p.grad.len() >= crate::optim::SPLIT_MIN {
                // Large tensors in two shares on two cores, split where their measured times
                // come out equal (`pool::Balance`); the probe is a max, the same at any split.
                if self.balance.len() <= k {
                    self.balance.resize(k + 1, Default::default());
                }
                let (bal, n) = (&mut self.balance[k][0], p.grad.len());
                let at = bal.split(n, 16);
                let (a0, a1) = p.grad.split_at_mut(at);
                let (b0, b1) = q.grad.split_at(at);
                let (x, y) = bal.join(at, n, || add(a0, b0, 0), || add(a1, b1, 0));
                probe = probe.max(x).max(y);
            } else {
                probe = add(&mut p.grad, &q.grad, probe);
            }
        }
        probe != EXP
    }

    /// After a step that is taken: feed every observer the merged range statistics of the batch
    /// over `parts` (this model's share and the replicas'), and move every batch norm's running
    /// statistics with the whole batch's sums.
    pub fn finish_step(&mut self, parts: &[&Sequential]) {
        self.merge_step_stats(parts);
        self.apply_step_stats();
    }

    /// Merge the batch statistics of `parts` (replicas that computed other rows of the same
    /// batch) into this model's: activation ranges and sums, batch-norm sums.
    pub fn merge_step_stats(&mut self, parts: &[&Sequential]) {
        for (k, l) in self.layers.iter_mut().enumerate() {
            if let Some(a) = l.act_quant_mut() {
                let mut stats = a.stats;
                for p in parts {
                    if let Some(o) = p.layers.get(k).and_then(|l| l.act_quant()) {
                        stats = stats.merge(o.stats);
                    }
                }
                a.stats = stats;
            }
            if let Some(b) = l.batch_norm_mut() {
                let (s1, s2, n) = &mut b.batch_sums;
                for p in parts {
                    if let Some(o) = p.layers.get(k).and_then(|l| l.batch_norm()) {
                        let (t1, t2, m) = &o.batch_sums;
                        s1.iter_mut().zip(t1).for_each(|(a, b)| *a += b);
                        s2.iter_mut().zip(t2).for_each(|(a, b)| *a += b);
                        *n += m;
                    }
                }
            }
        }
    }

    /// Feed every observer this model's (merged) batch statistics and move every batch norm's
    /// running statistics with its (merged) batch sums.
    pub fn apply_step_stats(&mut self) {
        for l in self.layers.iter_mut() {
            if let Some(a) = l.act_quant_mut() {
                a.observe(a.stats);
            }
            if let Some(b) = l.batch_norm_mut() {
                // Taken out and put back: no allocation in the step.
                let (s1, s2, n) = std::mem::take(&mut b.batch_sums);
                b.update_running(&s1, &s2, n);
                b.batch_sums = (s1, s2, n);
            }
        }
    }

    /// The batch statistics that data-parallel ranks must agree on, written to (`pack`) or read
    /// from (`!pack`) flat buffers: `sums` gets Σ|a| and the count of every quantized activation
    /// and the Σx, Σx² and count of every batch norm; `maxes` gets `−min` and `max` of every
    /// quantized activation (so one `max` reduction gives both ends of the range).
    pub fn visit_step_stats(&mut self, sums: &mut Vec<f64>, maxes: &mut Vec<f32>, pack: bool) {
        let (mut i, mut j) = (0usize, 0usize);
        if pack {
            sums.clear();
            maxes.clear();
        }
        for l in self.layers.iter_mut() {
            if let Some(a) = l.act_quant_mut() {
                let st = &mut a.stats;
                if pack {
                    sums.extend([st.sum_abs, st.count as f64]);
                    maxes.extend([-st.lo, st.hi]);
                } else {
                    st.sum_abs = sums[i];
                    st.count = sums[i + 1] as u64;
                    st.lo = -maxes[j];
                    st.hi = maxes[j + 1];
                    i += 2;
                    j += 2;
                }
            }
            if let Some(b) = l.batch_norm_mut() {
                let (s1, s2, n) = &mut b.batch_sums;
                if pack {
                    sums.extend_from_slice(s1);
                    sums.extend_from_slice(s2);
                    sums.push(*n as f64);
                } else {
                    let c = s1.len();
                    s1.copy_from_slice(&sums[i..i + c]);
                    s2.copy_from_slice(&sums[i + c..i + 2 * c]);
                    *n = sums[i + 2 * c] as u64;
                    i += 2 * c + 1;
                }
            }
        }
    }

    /// The same network with every batch norm folded into the convolution or dense layer before
    /// it ([`BatchNorm::fold_into`], running statistics), and an activation right after the batch
    /// norm moved into that layer: `Conv → BN → ReLU` becomes `Conv(relu)`, as the integer model
    /// computes it. Returns the folded config and model (float; quantize it with PTQ, then
    /// optionally fine-tune with QAT: the "fold, then fine-tune" recipe, which is QAT with batch
    /// norm frozen from the start). Evaluation outputs are unchanged up to rounding.
    pub fn fold_batch_norm(&self, cfg: &ModelConfig) -> Result<(ModelConfig, Sequential)> {
        if self.layers.len() != cfg.layers.len() {
            return Err(Error::Shape(format!(
                "the model has {} layers, its config {}",
                self.layers.len(),
                cfg.layers.len()
            )));
        }
        let mut layers = Vec::new();
        // (new index, old index of the weighted layer, old index of the folded batch norm)
        let mut map: Vec<(usize, usize, Option<usize>)> = Vec::new();
        let mut i = 0;
        while i < cfg.layers.len() {
            let l = &cfg.layers[i];
            let weighted = matches!(l, LayerConfig::Dense { .. } | LayerConfig::Conv2d { .. });
            let linear = match l {
                LayerConfig::Dense { activation, .. } | LayerConfig::Conv2d { activation, .. } => {
                    *activation == Activation::Linear
                }
                _ => false,
            };
            let next_bn = matches!(cfg.layers.get(i + 1), Some(LayerConfig::BatchNorm { .. }));
            if weighted && linear && next_bn {
                let act = match cfg.layers.get(i + 2) {
                    Some(LayerConfig::Activation { activation }) if *activation != Activation::Softmax => {
                        Some(*activation)
                    }
                    _ => None,
                };
                let mut folded = l.clone();
                if let (Some(a), LayerConfig::Dense { activation, .. } | LayerConfig::Conv2d { activation, .. }) =
                    (act, &mut folded)
                {
                    *activation = a;
                }
                map.push((layers.len(), i, Some(i + 1)));
                layers.push(folded);
                i += if act.is_some() { 3 } else { 2 };
            } else {
                if weighted {
                    map.push((layers.len(), i, None));
                }
                if let LayerConfig::BatchNorm { .. } = l {
                    return Err(Error::config(
                        format!("model.layers[{i}]"),
                        "batch_norm",
                        "only a batch norm right after a linear conv2d or dense layer can be folded",
                    ));
                }
                layers.push(l.clone());
                i += 1;
            }
        }
        let new_cfg = ModelConfig { layers, ..cfg.clone() };
        let mut m = Sequential::from_config(&new_cfg, Scheme::Fp32, false, 0)?;
        for (new, old, bn) in map {
            let (w_src, b_src) = match &self.layers[old] {
                Layer::Dense(d) => (&d.weight.value, &d.bias.value),
                Layer::Conv2d(c) => (&c.weight.value, &c.bias.value),
                _ => continue,
            };
            let (mut w, mut b) = (w_src.clone(), b_src.clone());
            // The batch norm of the float network, or one folded into the convolution for QAT.
            if let Some(n) = bn.and_then(|k| self.batch_norm_at(k)) {
                n.fold_into(&mut w, &mut b);
            }
            match &mut m.layers[new] {
                Layer::Dense(d) => {
                    d.weight.value = w;
                    d.bias.value = b;
                }
                Layer::Conv2d(c) => {
                    c.weight.value = w;
                    c.bias.value = b;
                }
                _ => {}
            }
        }
        Ok((new_cfg, m))
    }

    /// Check that a loss layer can be fused: the last layer must end in softmax or be linear.
    pub fn check_loss_compatible(&self) -> Result<()> {
        let last = self.layers.iter().rev().find_map(|l| match l {
            Layer::Dense(d) => Some(d.activation),
            Layer::Conv2d(c) => Some(c.out.activation),
            Layer::Activation(a) => Some(*a),
            _ => None,
        });
        match last {
            Some(Activation::Softmax) | Some(Activation::Linear) => Ok(()),
            other => Err(Error::config(
                "model.layers[last].activation",
                other.map(|a| a.to_string()).unwrap_or_else(|| "none".into()),
                "sparse categorical cross-entropy needs a softmax (or linear, from logits) output",
            )),
        }
    }
}
