//! Integer-only inference for quantized networks exported by `qmomentum`.
//!
//! A model file (safetensors, specified in `doc/model-format.md`) holds a chain of layers:
//! dense layers with int8 weights over u8 activations (`dense_i8`) or ±1 bit weights over bit
//! activations (`dense_bin`), and for images (NHWC u8) 2-D convolutions with int8 weights
//! (`conv2d_i8`) and max, average and global average pooling. Between the u8 input and the
//! final logits everything is integer arithmetic: i32 accumulation, fixed-point
//! requantization to u8 ([`requant`]), or sign bits; only the last layer's per-channel scale
//! turns its i32 accumulators into `f32` logits. The result is bit-for-bit identical on every
//! machine and every kernel tier ([`KernelKind`]).
//!
//! Each layer kind lives in one file of `src/ops/` (reading, writing, validation, packing and
//! running); `doc/runtime.md` describes the structure.
//!
//! ```
//! use qmomentum_runtime::{InputSpec, Layer, Model, Output};
//!
//! // 4 inputs → 3 hidden (ReLU, u8) → 2 logits.
//! let hidden = Layer::DenseI8 {
//!     inputs: 4,
//!     outputs: 3,
//!     weight: vec![1, 2, 3, 4, -1, -2, -3, -4, 10, 0, 0, -10],
//!     bias: vec![0, 100, -5],
//!     input_zero_point: 0,
//!     // requant(acc) = acc · 2^30 · 2^-(31+1) = acc / 4, rounded half up.
//!     output: Output::U8 {
//!         relu: true,
//!         multiplier: vec![1 << 30; 3],
//!         shift: vec![1; 3],
//!         zero_point: 0,
//!         qmax: 255,
//!     },
//! };
//! let head = Layer::DenseI8 {
//!     inputs: 3,
//!     outputs: 2,
//!     weight: vec![1, 0, 0, 0, 1, 1],
//!     bias: vec![0, 0],
//!     input_zero_point: 0,
//!     output: Output::Logits { scale: vec![0.5, 0.25], bias: None },
//! };
//! let input = InputSpec { size: 4, scale: 1.0 / 255.0, zero_point: 0, binarize_at: None, shape: None };
//! let model = Model::new(input, vec![hidden, head])?;
//!
//! let x = [10u8, 20, 30, 40];
//! let mut ws = model.workspace(1);
//! let logits = model.run(&mut ws, &x, 1)?;
//! // hidden acc = [300, -200, -305] → relu(acc/4) = [75, 0, 0]; logits = [75·0.5, 0·0.25].
//! assert_eq!(logits, &[37.5, 0.0]);
//! assert_eq!(model.predict(&x, 1, 1)?, vec![0]);
//!
//! // Files round-trip exactly.
//! let again = Model::from_bytes(&model.to_bytes()?)?;
//! assert_eq!(again.layers(), model.layers());
//! # Ok::<(), qmomentum_runtime::Error>(())
//! ```

#![warn(missing_docs)]
// Every unsafe operation sits in its own `unsafe` block with a `// SAFETY:` comment, also
// inside `unsafe fn`s (whose preconditions are listed in their `# Safety` section).
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]

mod aligned;
pub mod engine;
mod error;
pub mod format;
pub mod io;
pub mod kernels;
mod kind;
pub mod lowbit;
mod model;
mod ops;
pub mod pool;
pub mod requant;

pub use engine::{argmax, Workspace};
pub use error::Error;
pub use format::InputSpec;
pub use kernels::KernelKind;
pub use model::Model;
pub use ops::{Layer, LayerStorage, Output};
pub use requant::{quantize_multiplier, requantize};
