//! The runtime's error type. Every variant names what went wrong and, where the user can act, what to do.

use std::path::PathBuf;

/// Result with the runtime's [`Error`].
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

    /// An image could not be decoded or encoded.
    #[error("{}: cannot read the image ({message}); give a PNG or JPEG file", path.display())]
    Image { path: PathBuf, message: String },

    /// A dataset file (data YAML, label txt, COCO json) is malformed; `line` is 1-based when known.
    #[error("{}{}: {message}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    Dataset {
        path: PathBuf,
        line: Option<usize>,
        message: String,
    },

    /// The model file is not something the runtime can use.
    #[error("{}: {message}", path.display())]
    Model { path: PathBuf, message: String },

    /// An input tensor or batch has the wrong shape for the engine.
    #[error("wrong input shape: {0}")]
    Shape(String),

    /// A backend failed while building or running an engine.
    #[error("{backend} backend: {message}")]
    Backend {
        backend: &'static str,
        message: String,
    },

    /// An engine file that cannot be used.
    #[error("{}: {reason}", path.display())]
    EngineFile { path: PathBuf, reason: String },

    /// A caller passed an argument outside its valid range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
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
        // A full disk or a file-size limit while writing (an engine file, the engine cache):
        // say which, and what to do, rather than the bare "os error 28".
        std::io::ErrorKind::StorageFull => {
            "no space left on the device; free some space or write to another disk, then retry"
                .into()
        }
        std::io::ErrorKind::QuotaExceeded => {
            "disk quota exceeded; free some space or raise the quota, then retry".into()
        }
        std::io::ErrorKind::FileTooLarge => "file too large for the file system or for this \
             process's file-size limit (`ulimit -f`, systemd LimitFSIZE=); raise the limit or \
             write to another disk, then retry"
            .into(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ENOSPC, EDQUOT and EFBIG (what a write gets on a full disk, over quota, past
    /// `ulimit -f`) read as the problem and its fix.
    #[test]
    fn full_disks_and_size_limits_are_named() {
        for (errno, needle) in [
            (28, "no space left on the device"),
            (122, "disk quota exceeded"),
            (27, "ulimit -f"),
        ] {
            let e = Error::io("x.engine", std::io::Error::from_raw_os_error(errno)).to_string();
            assert!(
                e.starts_with("x.engine: ") && e.contains(needle) && e.contains("retry"),
                "{errno}: {e}"
            );
        }
    }
}
