//! A trainable tensor with its gradient.

/// What a parameter is, so the optimizer can put it in the right group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    /// A float (or latent float) weight.
    Weight,
    /// A bias.
    Bias,
    /// A learned scale (binary weight scale, LSQ step).
    Scale,
    /// A weight whose values are ±1 (trained by Bop).
    Binary,
}

/// A named parameter: values, gradient of the last backward pass, shape.
#[derive(Clone, Debug)]
pub struct Param {
    /// Unique name, e.g. `layers.0.weight`.
    pub name: String,
    /// Group for the optimizer.
    pub kind: ParamKind,
    /// Shape (row-major).
    pub shape: Vec<usize>,
    /// Values.
    pub value: Vec<f32>,
    /// Gradient (same length as `value`).
    pub grad: Vec<f32>,
    /// Frozen entries (iterative freezing, `quant::oscillation`): the optimizer leaves their
    /// values as they are and keeps their momentum at 0. Derived from the layer's
    /// `osc_frozen` buffer (which the checkpoint holds), so it is never saved itself.
    pub frozen: Option<Vec<bool>>,
}

impl Param {
    /// A parameter with the given values and a zero gradient.
    pub fn new(name: impl Into<String>, kind: ParamKind, shape: Vec<usize>, value: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), value.len());
        let grad = vec![0.0; value.len()];
        Param {
            name: name.into(),
            kind,
            shape,
            value,
            grad,
            frozen: None,
        }
    }
    /// Number of values.
    pub fn len(&self) -> usize {
        self.value.len()
    }
    /// True if empty.
    pub fn is_empty(&self) -> bool {
        self.value.is_empty()
    }
}

/// A named tensor that is state, not a parameter: checkpointed, never optimized or decayed
/// (batch norm's running statistics).
#[derive(Clone, Debug)]
pub struct Buffer {
    /// Unique name, e.g. `layers.1.running_mean`.
    pub name: String,
    /// Shape (row-major).
    pub shape: Vec<usize>,
    /// Values.
    pub value: Vec<f32>,
}

impl Buffer {
    /// A buffer with the given values.
    pub fn new(name: impl Into<String>, shape: Vec<usize>, value: Vec<f32>) -> Self {
        Buffer {
            name: name.into(),
            shape,
            value,
        }
    }
}
