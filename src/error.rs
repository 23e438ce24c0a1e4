//! The one error type of the library. Each variant is a class of failure that maps to an exit code
//! (`Error::exit_code`), and every message names the file (or setting) it is about, so the CLI can
//! print it as one line, ripgrep style: `images/123.jpg: JPEG truncated`.

use std::path::{Path, PathBuf};

/// Everything that can go wrong in `qpert`, by class.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bad command line: unknown stage, malformed `--shard`, malformed `--set`.
    #[error("{0}")]
    Usage(String),
    /// A qpert config file (or a `--set` override) that does not parse or validate.
    #[error("{}: {msg}", path.display())]
    Config { path: PathBuf, msg: String },
    /// Bad dataset input: annotation JSON, Entities XML/TXT, an image that is missing or does not decode.
    #[error("{}: {msg}", path.display())]
    Input { path: PathBuf, msg: String },
    /// A model folder whose config, tokenizer or weights are missing, malformed or mis-shaped.
    #[error("{}: {msg}", path.display())]
    Weights { path: PathBuf, msg: String },
    /// A stage artifact (Parquet part, manifest) that is missing, corrupt or stale.
    #[error("{}: {msg}", path.display())]
    Artifact { path: PathBuf, msg: String },
    /// The compute device cannot be used (e.g. CUDA requested without a driver or without the feature).
    #[error("device: {0}")]
    Device(String),
}

/// Result with the crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Exit code of the CLI: 2 for usage and configuration errors, 1 for data and runtime errors.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Usage(_) | Error::Config { .. } => 2,
            Error::Input { .. } | Error::Weights { .. } | Error::Artifact { .. } | Error::Device(_) => 1,
        }
    }

    /// Bad dataset input at `path`.
    pub fn input(path: impl AsRef<Path>, msg: impl std::fmt::Display) -> Self {
        Error::Input { path: path.as_ref().to_path_buf(), msg: msg.to_string() }
    }

    /// A config problem in `path`.
    pub fn config(path: impl AsRef<Path>, msg: impl std::fmt::Display) -> Self {
        Error::Config { path: path.as_ref().to_path_buf(), msg: msg.to_string() }
    }

    /// A model-folder problem at `path`.
    pub fn weights(path: impl AsRef<Path>, msg: impl std::fmt::Display) -> Self {
        Error::Weights { path: path.as_ref().to_path_buf(), msg: msg.to_string() }
    }

    /// An artifact problem at `path`.
    pub fn artifact(path: impl AsRef<Path>, msg: impl std::fmt::Display) -> Self {
        Error::Artifact { path: path.as_ref().to_path_buf(), msg: msg.to_string() }
    }

    /// Device work that failed, most often because the GPU ran out of memory (the backend reports
    /// it when the result is read back). Names the config setting `knob` that sizes the work and
    /// its current value, so the message says which knob to turn.
    pub fn device_failed(work: &str, reason: impl std::fmt::Display, knob: Option<(&str, usize)>) -> Self {
        let reason = reason.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
        let hint = match knob {
            Some((name, value)) => {
                format!("lower {name} (now {value}), e.g. --set {name}={}", (value / 2).max(1))
            }
            None => "lower the batch sizes of [model]".to_string(),
        };
        Error::Device(format!("{work} failed on the device ({reason}); if it ran out of memory, {hint}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_failure_is_one_line_naming_the_knob() {
        let reason = "An error happened during execution\nCaused by:\n  failed to reserve 1024 bytes";
        let e = Error::device_failed("the ITM batch", reason, Some(("model.pair_batch", 256)));
        assert_eq!(
            e.to_string(),
            "device: the ITM batch failed on the device (An error happened during execution Caused by: failed to \
             reserve 1024 bytes); if it ran out of memory, lower model.pair_batch (now 256), e.g. --set \
             model.pair_batch=128"
        );
        assert_eq!(e.exit_code(), 1);
    }
}
