//! [`super::Args`] -> stage [`Context`]: loads the config with its `--set` overrides, picks the device
//! (the only place that knows whether this binary was built with the `cuda` feature), and wires the
//! output hooks to stdout/stderr, with progress bars only when stderr is a terminal.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::Duration;

use burn::tensor::Device;

use super::args::CommonArgs;
use crate::config::{Config, DeviceKind};
use crate::error::{Error, Result};
use crate::stages::{Context, DeviceChoice, Progress, Reporter};

/// Builds the run context for a verb.
pub fn context(common: &CommonArgs, force: bool) -> Result<Context> {
    let config = Config::load(&common.config, &common.overrides)?;
    let device = device_choice(config.model.device);
    Ok(Context { config, device, strict: common.strict, force, reporter: terminal_reporter()? })
}

/// The device for `requested`: burn-flex on the CPU; CUDA only in a `cuda` build on a machine whose
/// driver library loads (selecting CUDA without one would abort the process inside the backend);
/// wgpu only in a `wgpu` build.
pub fn device_choice(requested: DeviceKind) -> DeviceChoice {
    let device = match requested {
        DeviceKind::Cpu => Ok(Device::flex()),
        DeviceKind::Cuda => cuda_device(),
        DeviceKind::Wgpu => wgpu_device(),
    };
    DeviceChoice { kind: requested, device }
}

#[cfg(feature = "cuda")]
fn cuda_device() -> std::result::Result<Device, String> {
    let driver_present = ["libcuda.so.1", "libcuda.so"].iter().any(|name| {
        std::env::var("LD_LIBRARY_PATH")
            .unwrap_or_default()
            .split(':')
            .chain(["/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/local/cuda/lib64", "/usr/lib/wsl/lib"])
            .any(|dir| !dir.is_empty() && std::path::Path::new(dir).join(name).exists())
    });
    if driver_present {
        Ok(Device::cuda(0))
    } else {
        Err("model.device = \"cuda\" but no CUDA driver (libcuda.so.1) was found; use --set model.device=cpu".into())
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_device() -> std::result::Result<Device, String> {
    Err("model.device = \"cuda\" but this qpert was built without the `cuda` feature; \
         rebuild with `cargo build --release --features cuda` or use --set model.device=cpu"
        .into())
}

/// wgpu's default adapter. wgpu only picks it on first use, and with none it panics on CubeCL's
/// device thread, so a one-element tensor is made here, with panic output silenced, to turn that
/// into an error.
#[cfg(feature = "wgpu")]
fn wgpu_device() -> std::result::Result<Device, String> {
    let device = Device::wgpu(burn::tensor::DeviceKind::DefaultDevice);
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let probe = std::panic::catch_unwind(|| burn::tensor::Tensor::<1>::zeros([1], &device).into_data());
    std::panic::set_hook(hook);
    match probe {
        Ok(_) => Ok(device),
        Err(_) => Err("model.device = \"wgpu\" but wgpu finds no adapter (no GPU driver; on a CPU, Mesa's \
                       lavapipe provides one: apt-get install mesa-vulkan-drivers); use --set model.device=cpu"
            .into()),
    }
}

#[cfg(not(feature = "wgpu"))]
fn wgpu_device() -> std::result::Result<Device, String> {
    Err("model.device = \"wgpu\" but this qpert was built without the `wgpu` feature; \
         rebuild with `cargo build --release --features wgpu` or use --set model.device=cpu"
        .into())
}

/// Results to stdout, warnings to stderr, progress as bars when stderr is a terminal and else as a
/// line every `QPERT_PROGRESS_SECS` (default 30; 0 turns them off). A stdout that has gone (`qpert
/// status | head -3`) is not an error: the lines are dropped and the work goes on.
pub fn terminal_reporter() -> Result<Reporter> {
    let progress = if std::io::stderr().is_terminal() {
        Progress::Bars
    } else {
        match progress_every()? {
            Some(every) => Progress::Lines { every, sink: Arc::new(|msg| eprintln!("qpert: progress: {msg}")) },
            None => Progress::Off,
        }
    };
    Ok(Reporter::new(
        Box::new(|msg| {
            let _ = writeln!(std::io::stdout().lock(), "{msg}");
        }),
        Box::new(|msg| eprintln!("qpert: warning: {msg}")),
        progress,
    ))
}

/// The interval of progress lines: `QPERT_PROGRESS_SECS` (seconds, fractions allowed), default 30 s;
/// `None` for 0.
fn progress_every() -> Result<Option<Duration>> {
    let Ok(value) = std::env::var(PROGRESS_SECS_VAR) else { return Ok(Some(Duration::from_secs(30))) };
    match value.trim().parse::<f64>() {
        Ok(0.0) => Ok(None),
        Ok(secs) if secs.is_finite() && secs > 0.0 => Ok(Some(Duration::from_secs_f64(secs))),
        _ => Err(Error::Usage(format!(
            "{PROGRESS_SECS_VAR}={value}: not a number of seconds (e.g. 30 for a progress line every 30 s, 0 for none)"
        ))),
    }
}

/// The environment variable setting the interval of progress lines in logs.
pub const PROGRESS_SECS_VAR: &str = "QPERT_PROGRESS_SECS";
