//! The one error type of the library. Each variant is a class of failure that maps to an exit code
//! (`Error::exit_code`), and every message names the file (or setting) it is about, so the CLI can
//! print it as one line, ripgrep style: `images/123.jpg: JPEG truncated`.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

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
    /// The reason is the device runtime's own panic when there was one (see [`catch_device_panics`]):
    /// it says what went wrong ("out of device memory allocating N bytes"), where the error that
    /// reaches qpert later says only that the device is in an invalid state.
    pub fn device_failed(work: &str, reason: impl std::fmt::Display, knob: Option<(&str, usize)>) -> Self {
        let reason = device_panic().unwrap_or_else(|| one_line(&reason.to_string()));
        let hint = match knob {
            Some((name, value)) => {
                format!("lower {name} (now {value}), e.g. --set {name}={}", (value / 2).max(1))
            }
            None => {
                "lower the batch sizes of [model] (model.image_batch, model.text_batch, model.pair_batch)".to_string()
            }
        };
        Error::Device(format!("{work} failed on the device ({reason}); if it ran out of memory, {hint}"))
    }

    /// Putting the model's weights (`what`: where they come from; `in_f32`: whether they are f32)
    /// on the device failed: most often they do not fit in its memory, which no batch size changes.
    /// The reason is as in [`Error::device_failed`].
    pub fn weights_do_not_fit(what: &str, in_f32: bool, reason: impl std::fmt::Display) -> Self {
        let reason = device_panic().unwrap_or_else(|| one_line(&reason.to_string()));
        let hint = if in_f32 {
            "use model.precision = \"bf16\" (half the memory) or a GPU with more memory"
        } else {
            "use a GPU with more memory"
        };
        Error::Device(format!(
            "putting {what} on the device failed ({reason}); if it ran out of memory, the model does not fit: {hint}"
        ))
    }
}

/// The crates of the device runtime. CubeCL runs device work on a thread of its own and catches the
/// panics there (an allocation that does not fit, a kernel that fails to launch): it fails only the
/// tasks that panicked and carries on, and the error reaches qpert later, if at all.
const DEVICE_RUNTIME: [&str; 4] = ["/cubecl-", "/cubek-", "/burn-cubecl", "/burn-fusion"];

/// What the panic hook reports of a panic, given the panics before it in the process.
#[derive(Debug, PartialEq)]
enum PanicReport {
    /// The device runtime's first panic, as one line: a warning now, and the reason of the error
    /// that follows.
    Warning(String),
    /// A consequence of a device-runtime panic before it (burn unwraps device errors in places):
    /// nothing now; [`catch_device_panics`] turns it into an error.
    Consequence,
    /// A bug in qpert.
    Bug,
}

/// The panics of one process, so far as the reports need them: the first of the device runtime.
struct PanicLog {
    first_device_panic: Mutex<Option<String>>,
}

impl PanicLog {
    const fn new() -> Self {
        PanicLog { first_device_panic: Mutex::new(None) }
    }

    /// Records a panic at `file` (its location) with `message`, and says how to report it.
    fn record(&self, file: &str, message: &str) -> PanicReport {
        let mut first = self.first_device_panic.lock().unwrap_or_else(PoisonError::into_inner);
        if first.is_some() {
            PanicReport::Consequence
        } else if DEVICE_RUNTIME.iter().any(|crate_dir| file.contains(crate_dir)) {
            // CubeCL's errors end with their backtrace, which is "No backtrace available" here.
            let message = one_line(message).replace(" No backtrace available", "");
            *first = Some(message.clone());
            PanicReport::Warning(message)
        } else {
            PanicReport::Bug
        }
    }

    fn device_panic(&self) -> Option<String> {
        self.first_device_panic.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

static PANICS: PanicLog = PanicLog::new();

/// The device runtime's first panic in this process, if it had one.
pub fn device_panic() -> Option<String> {
    PANICS.device_panic()
}

/// Installs the process's panic hook (see [`PanicReport`]). A device-runtime panic is reported as
/// a warning even when CubeCL recovers (an autotune candidate that fails, say); qpert then fails
/// its next read-back (see `model::read_back`), since a result may rest on a task that never ran.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let file = info.location().map_or("", |l| l.file());
        let payload = info.payload();
        let message =
            payload.downcast_ref::<&str>().copied().or_else(|| payload.downcast_ref::<String>().map(String::as_str));
        match PANICS.record(file, message.unwrap_or("(no message)")) {
            PanicReport::Warning(message) => eprintln!("qpert: warning: the device runtime failed: {message}"),
            PanicReport::Consequence => {}
            PanicReport::Bug => eprintln!("qpert: internal error (a bug): {info}"),
        }
    }));
}

/// Runs `run`, turning a panic that follows a device-runtime panic into the error that `failed`
/// makes of that panic's message; any other panic goes on unwinding (the hook has reported it as
/// a bug).
pub fn catch_device_panics<T>(run: impl FnOnce() -> Result<T>, failed: impl FnOnce(String) -> Error) -> Result<T> {
    std::panic::catch_unwind(AssertUnwindSafe(run)).unwrap_or_else(|payload| match device_panic() {
        Some(reason) => Err(failed(reason)),
        None => std::panic::resume_unwind(payload),
    })
}

/// `text` with its line breaks and runs of spaces as single spaces.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
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

    #[test]
    fn the_first_device_runtime_panic_is_the_reason_and_what_follows_its_consequence() {
        let registry = "/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f";
        let log = PanicLog::new();
        assert_eq!(log.record("src/stages/extract.rs", "index out of bounds"), PanicReport::Bug);
        assert_eq!(log.device_panic(), None);
        let oom = "failed to reserve 512 bytes of device memory: out of device memory allocating 7284736 bytes\nNo \
                   backtrace available";
        let reason = "failed to reserve 512 bytes of device memory: out of device memory allocating 7284736 bytes";
        let server = format!("{registry}/cubecl-cuda-0.11.0-pre.3/src/compute/server.rs");
        assert_eq!(log.record(&server, oom), PanicReport::Warning(reason.into()));
        // burn's unwrap of the device error, a second panic of the runtime, a qpert expect: all follow from it.
        let burn_nn = format!("{registry}/burn-nn-0.22.0-pre.3/src/modules/linear.rs");
        assert_eq!(log.record(&burn_nn, "called `Result::unwrap()` on an `Err` value"), PanicReport::Consequence);
        assert_eq!(log.record(&server, "failed to reserve 1024 bytes"), PanicReport::Consequence);
        assert_eq!(log.record("src/qpert/mod.rs", "f64 gram matrices"), PanicReport::Consequence);
        assert_eq!(log.device_panic().as_deref(), Some(reason));
    }

    #[test]
    fn a_panic_with_no_device_panic_before_it_keeps_unwinding() {
        // The process's own log has no device panic in the library's tests (no device runtime runs).
        let caught =
            std::panic::catch_unwind(|| catch_device_panics(|| -> Result<()> { panic!("a bug") }, Error::Device));
        assert!(caught.is_err());
    }
}
