//! [`super::Args`] -> stage [`Context`]: loads the config with its `--set` overrides, picks the device
//! (the only place that knows whether this binary was built with the `cuda` feature), and wires the
//! output hooks to stdout/stderr, with progress bars only when stderr is a terminal.

use std::io::{IsTerminal, Write};

use burn::tensor::Device;

use super::args::CommonArgs;
use crate::config::{Config, DeviceKind};
use crate::error::Result;
use crate::stages::{Context, DeviceChoice, Reporter};

/// Builds the run context for a verb.
pub fn context(common: &CommonArgs, force: bool) -> Result<Context> {
    let config = Config::load(&common.config, &common.overrides)?;
    let device = device_choice(config.model.device);
    Ok(Context { config, device, strict: common.strict, force, reporter: terminal_reporter() })
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

/// Results to stdout, warnings to stderr, progress bars when stderr is a terminal. A stdout that
/// has gone (`qpert status | head -3`) is not an error: the lines are dropped and the work goes on.
pub fn terminal_reporter() -> Reporter {
    Reporter::new(
        Box::new(|msg| {
            let _ = writeln!(std::io::stdout().lock(), "{msg}");
        }),
        Box::new(|msg| eprintln!("qpert: warning: {msg}")),
        std::io::stderr().is_terminal(),
    )
}
