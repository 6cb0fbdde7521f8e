//! The exporter's error type.

use std::path::PathBuf;

/// Result with the exporter's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
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
}

impl Error {
    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
