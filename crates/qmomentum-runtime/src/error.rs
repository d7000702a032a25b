//! The crate's error type.
//!
//! Every message names what is wrong and where: the file, the tensor and channel, the metadata
//! field, or the argument, together with the offending value.

use std::path::PathBuf;

use crate::kind::KernelKind;

/// Everything that can go wrong while loading, validating, saving or running a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O error while reading or writing `path`.
    #[error("file '{}': {source}", path.display())]
    Io {
        /// The file being read or written.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A model file was read but its contents are invalid; `source` says why.
    #[error("file '{}': {source}", path.display())]
    InFile {
        /// The file being loaded.
        path: PathBuf,
        /// What is wrong with its contents.
        source: Box<Error>,
    },
    /// The 8-byte header length points past the end of the file.
    #[error("truncated: header says {header_len} bytes, file has {file_len}")]
    Truncated {
        /// The JSON header length stated in the first 8 bytes.
        header_len: u64,
        /// The whole file's length.
        file_len: usize,
    },
    /// The safetensors container itself is malformed (offsets, dtypes, JSON syntax).
    #[error("not a valid safetensors file: {0}")]
    Container(String),
    /// A field of the `qmomentum` metadata document is missing or has a bad value.
    #[error("metadata field '{field}': {detail}")]
    Field {
        /// The field's path, e.g. `layers[1].out`.
        field: String,
        /// What is wrong with it.
        detail: String,
    },
    /// A tensor is missing, unexpected, or has the wrong dtype or shape.
    #[error("tensor '{name}': {detail}")]
    Tensor {
        /// The tensor's name in the file, e.g. `layers.0.weight`.
        name: String,
        /// What is wrong with it.
        detail: String,
    },
    /// One value of a tensor is out of range.
    #[error("tensor '{name}' {at}: {detail}")]
    TensorValue {
        /// The tensor's name in the file, e.g. `layers.1.shift`.
        name: String,
        /// Where in the tensor, e.g. `channel 3` or `row 2 column 17`.
        at: String,
        /// What is wrong with the value.
        detail: String,
    },
    /// Layers do not fit together (sizes do not chain, wrong input kind, misplaced logits).
    #[error("layer {layer}: {detail}")]
    Layer {
        /// The layer index.
        layer: usize,
        /// What is wrong.
        detail: String,
    },
    /// A real multiplier cannot be represented as `m·2^-(31+r)` with `r` in [-30, 31].
    #[error("multiplier {real:e}: {detail}")]
    Multiplier {
        /// The real multiplier that was asked for.
        real: f64,
        /// Why it cannot be represented.
        detail: String,
    },
    /// An input buffer has the wrong length for the requested batch.
    #[error("input has {got} values, expected {expected} (batch {batch} × {size})")]
    InputLength {
        /// Values supplied.
        got: usize,
        /// Values expected.
        expected: usize,
        /// The batch size asked for.
        batch: usize,
        /// Values per sample.
        size: usize,
    },
    /// An output buffer has the wrong length.
    #[error("output has {got} values, expected {expected}")]
    OutputLength {
        /// Values supplied.
        got: usize,
        /// Values expected.
        expected: usize,
    },
    /// The batch is larger than the workspace was sized for.
    #[error("batch {batch} exceeds the workspace's max_batch {max_batch}")]
    BatchTooLarge {
        /// The batch size asked for.
        batch: usize,
        /// What the workspace was built for.
        max_batch: usize,
    },
    /// The workspace was created by a different model.
    #[error("workspace was created for a different model")]
    WorkspaceMismatch,
    /// An invariant the loader guarantees did not hold: a bug in this crate, never the caller's
    /// input (validated models cannot reach it).
    #[error("internal error (a bug in qmomentum-runtime, please report it): {0}")]
    Internal(&'static str),
    /// The requested kernel tier is not supported by this CPU.
    #[error("kernel {0:?} is not available on this CPU")]
    KernelUnavailable(KernelKind),
    /// A worker thread panicked (a bug; reported rather than propagated).
    #[error("a worker thread panicked")]
    WorkerPanicked,
}

impl Error {
    pub(crate) fn field(field: impl Into<String>, detail: impl Into<String>) -> Error {
        Error::Field {
            field: field.into(),
            detail: detail.into(),
        }
    }

    pub(crate) fn tensor(name: impl Into<String>, detail: impl Into<String>) -> Error {
        Error::Tensor {
            name: name.into(),
            detail: detail.into(),
        }
    }

    pub(crate) fn value(name: impl Into<String>, at: impl Into<String>, detail: impl Into<String>) -> Error {
        Error::TensorValue {
            name: name.into(),
            at: at.into(),
            detail: detail.into(),
        }
    }

    pub(crate) fn layer(layer: usize, detail: impl Into<String>) -> Error {
        Error::Layer {
            layer,
            detail: detail.into(),
        }
    }
}
