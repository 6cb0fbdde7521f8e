//! The exporter's error type.

use std::path::PathBuf;

/// Result with the exporter's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    // The I/O error is part of the message, not a `source`, so `{:#}` chains don't repeat it.
    #[error("{}: {}", path.display(), describe_io(cause))]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },

    /// The file is not a readable ONNX model.
    #[error("{}: not an ONNX model: {reason}", path.display())]
    NotOnnx { path: PathBuf, reason: String },

    /// A model name that has no spec.
    #[error("unknown model '{name}'; known models: {known}")]
    UnknownModel { name: String, known: String },

    /// A configuration value outside what the model family supports.
    #[error("invalid model configuration: {0}")]
    InvalidConfig(String),

    /// A weights file that does not fit the model.
    #[error("{}: {message}", path.display())]
    Weights { path: PathBuf, message: String },

    /// The graph uses something shape inference or counting does not understand.
    #[error("graph: {0}")]
    Graph(String),

    /// The model cannot be quantized as asked (no convolutions, a missing or unusable amax).
    #[error("quantization: {0}")]
    Quantization(String),
}

impl Error {
    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            cause: source,
        }
    }
}

/// An I/O error in words, with the fix for the common cases.
fn describe_io(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file or folder".into(),
        std::io::ErrorKind::PermissionDenied => {
            "permission denied; check the file's permissions".into()
        }
        _ => e.to_string(),
    }
}
