//! The trainer's errors.

/// Everything the trainer can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model spec or configuration (from the exporter).
    #[error(transparent)]
    Exporter(#[from] kestrel_exporter::Error),
    /// A tensor of the wrong shape for the network.
    #[error("{0}")]
    Shape(String),
    /// Reading a dataset, an image or labels (the runtime names the file and line).
    #[error(transparent)]
    Runtime(#[from] kestrel_runtime::Error),
    /// Training data that cannot be used, and why.
    #[error("{0}")]
    Data(String),
    /// A model that cannot be quantized or run as a graph, or a quantization checkpoint that
    /// does not fit the command.
    #[error("{0}")]
    Quantization(String),
    /// libtorch reported an error.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// The trainer's result type.
pub type Result<T> = std::result::Result<T, Error>;
