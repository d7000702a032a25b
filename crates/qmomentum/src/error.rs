//! One error type for the library. Every message names the file, field or value at fault.

use std::path::PathBuf;

/// Errors of the training library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O failure on a named file. (The OS error is part of the message and deliberately not
    /// exposed as `source()`, so error chains print it once.)
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    /// A data file whose content is wrong (magic, size, counts, labels).
    #[error("{path}: {msg}")]
    Data { path: PathBuf, msg: String },
    /// A hyper-parameter or configuration value that cannot work.
    #[error("invalid {field} = {value}: {why}")]
    Config { field: String, value: String, why: String },
    /// Shapes that do not fit together.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A checkpoint that cannot be read or does not belong to this model.
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },
    /// The loss or a gradient became NaN or infinite.
    #[error("{0}")]
    Diverged(String),
    /// The integer runtime refused what the exporter built (`context` says which layer/channel).
    #[error("{context}: {error}")]
    Runtime {
        context: String,
        error: qmomentum_runtime::Error,
    },
    /// Data-parallel training cannot start or go on (world size, ranks that disagree, MPI).
    #[error("distributed training: {0}")]
    Distributed(String),
    /// A checkpoint or other output could not be encoded (serialisation failed).
    #[error("cannot encode {what}: {why}")]
    Encode { what: String, why: String },
}

/// Short for `std::result::Result<T, Error>`.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A configuration error for `field` with the offending `value`.
    pub fn config(field: impl Into<String>, value: impl ToString, why: impl Into<String>) -> Self {
        Error::Config {
            field: field.into(),
            value: value.to_string(),
            why: why.into(),
        }
    }
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            error: source,
        }
    }
    /// A data error on `path`.
    pub fn data(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Data {
            path: path.into(),
            msg: msg.into(),
        }
    }
    /// An encoding failure of `what`.
    pub fn encode(what: impl Into<String>, why: impl ToString) -> Self {
        Error::Encode {
            what: what.into(),
            why: why.to_string(),
        }
    }
    /// A checkpoint error on `path`.
    pub fn checkpoint(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
