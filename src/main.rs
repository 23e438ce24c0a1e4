//! The `qpert` binary: parse the command line, run it, and turn any error into one line on stderr
//! (`qpert: <file>: <problem>`) and its exit code (2 usage/config, 1 data/runtime). Never a backtrace.

use qpert::cli::{self, Parsed};
use qpert::error::Error;

/// mimalloc keeps freed memory for reuse: glibc's malloc maps and unmaps every large tensor buffer,
/// and the page faults that follow cost 20-35% of the CPU stages (README, "Benchmark").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    qpert::error::install_panic_hook();
    // Test builds only: the fail points named in `FAILPOINTS` (e.g. `write-parquet=pause`, which
    // tests/pipeline.rs uses to kill a run mid-write).
    let _fail_points = fail::has_failpoints().then(fail::FailScenario::setup);
    let outcome = cli::parse().and_then(|parsed| match parsed {
        Parsed::Info(text) => {
            // `qpert --help | head` closes stdout early: not an error.
            let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes());
            Ok(())
        }
        Parsed::Args(args) => {
            qpert::error::catch_device_panics(|| cli::run(args), |reason| Error::device_failed("the run", reason, None))
        }
    });
    if let Err(e) = outcome {
        eprintln!("qpert: {}", e.to_string().replace('\n', " "));
        std::process::exit(e.exit_code());
    }
}
