//! [`super::Args`] -> stage [`Context`]: loads the config with its `--set` overrides, picks the device
//! (the only place that knows whether this binary was built with the `cuda` feature), and wires the
//! output hooks to stdout/stderr, with progress bars only when stderr is a terminal.

use std::io::IsTerminal;

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

/// The device for `requested`, marked unavailable when CUDA is asked of a CPU-only build.
pub fn device_choice(requested: DeviceKind) -> DeviceChoice {
    match requested {
        DeviceKind::Cpu => DeviceChoice { name: "cpu".into(), unavailable: None },
        DeviceKind::Cuda if cfg!(feature = "cuda") => DeviceChoice { name: "cuda".into(), unavailable: None },
        DeviceKind::Cuda => DeviceChoice {
            name: "cuda".into(),
            unavailable: Some(
                "model.device = \"cuda\" but this qpert was built without the `cuda` feature; \
                 rebuild with `cargo build --release --features cuda` or use --set model.device=cpu"
                    .into(),
            ),
        },
    }
}

fn terminal_reporter() -> Reporter {
    Reporter::new(
        Box::new(|msg| println!("{msg}")),
        Box::new(|msg| eprintln!("qpert: warning: {msg}")),
        std::io::stderr().is_terminal(),
    )
}
