//! # qmomentum
//!
//! Train quantized neural networks with the Momentum optimizer family, in Rust, on the CPU.
//!
//! The folders follow the stages of a run:
//!
//! | module | what |
//! |---|---|
//! | [`data`] | IDX datasets (MNIST, Fashion-MNIST, KMNIST), u8 in memory |
//! | [`gemm`] | matrix products (the `gemm` crate, AVX-512) |
//! | [`layers`] | `Dense` (with fake quantization), activations, dropout |
//! | [`loss`], [`metrics`] | softmax cross-entropy, accuracy |
//! | [`optim`] | Momentum (both conventions, Nesterov, dampening, decay, clipping, schedules), Bop |
//! | [`quant`] | quantizers, observers, LSQ, schemes, post-training calibration |
//! | [`model`] | `Sequential` |
//! | [`train`] | `Trainer`: fit / evaluate, history, NaN handling |
//! | [`distributed`] | data-parallel training: the collectives a step needs (MPI with feature `mpi`) |
//! | [`checkpoint`] | atomic safetensors checkpoints, exact resume |
//! | [`export`] | integer model files for `qmomentum-runtime` |
//! | [`config`] | TOML configuration |
//! | [`torch`] | PyTorch `state_dict`s (safetensors) in and out |
//!
//! The design document's Keras program, in Rust (see `examples/design_doc.rs`):
//!
//! ```no_run
//! use qmomentum::prelude::*;
//! let (train, test) = Dataset::load_mnist_dir("data/fashion-mnist".as_ref()).unwrap();
//! let mut cfg = TrainConfig::default(); // Dense(128, relu) → Dense(64, relu) → Dense(10, softmax)
//! cfg.optimizer = OptimizerConfig { lr: 0.001, momentum: 0.9, ..Default::default() };
//! cfg.epochs = 10;
//! cfg.batch_size = 128;
//! let mut model = Trainer::new(cfg).unwrap();
//! model.fit(&train, None, |_, _| {}).unwrap();
//! let (loss, accuracy) = model.evaluate(&test).unwrap();
//! println!("test loss {loss:.4}, accuracy {accuracy:.4}");
//! ```

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod display;
pub mod distributed;
pub mod error;
pub mod export;
pub mod gemm;
pub mod layers;
pub mod loss;
pub mod metrics;
pub mod model;
pub mod onnx;
pub mod optim;
pub mod quant;
pub mod rng;
mod simd;
pub mod torch;
pub mod train;

pub use error::{Error, Result};

/// The names most programs need.
pub mod prelude {
    pub use crate::config::{LayerConfig, ModelConfig, TrainConfig};
    pub use crate::data::Dataset;
    pub use crate::layers::Activation;
    pub use crate::model::Sequential;
    pub use crate::optim::{Convention, OptimizerConfig, Schedule};
    pub use crate::quant::Scheme;
    pub use crate::train::{History, Trainer};
}
