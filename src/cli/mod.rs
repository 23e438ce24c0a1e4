//! The command line: [`args`] parses it (clap), [`resolve`] turns it into a stage context, and
//! [`run`] dispatches the verb. [`parse`] turns clap's multi-line errors into one-line usage errors.

pub mod args;
pub mod cluster;
pub mod resolve;

use clap::Parser;

pub use args::{Args, Command};

use crate::config::Precision;
use crate::error::{Error, Result};
use crate::model::AttentionKernel;
use crate::stages;

/// What parsing the command line gave: arguments to run, or help/version text to print.
pub enum Parsed {
    /// Run these.
    Args(Args),
    /// `--help` or `--version`: print this on stdout and exit 0.
    Info(String),
}

/// Parses the process arguments; a bad command line becomes a one-line [`Error::Usage`].
pub fn parse() -> Result<Parsed> {
    match Args::try_parse() {
        Ok(args) => Ok(Parsed::Args(args)),
        Err(e) if !e.use_stderr() => Ok(Parsed::Info(e.render().to_string())),
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            Err(Error::Usage("no command given: expected stage, run, status or bench (see qpert --help)".into()))
        }
        Err(e) => Err(Error::Usage(one_line(&e.to_string()))),
    }
}

/// Clap's multi-line error as one line: its message and hints, without the usage block.
fn one_line(rendered: &str) -> String {
    let parts: Vec<&str> = rendered
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .map(|l| l.trim_start_matches("error: "))
        .collect();
    format!("{} (see qpert --help)", parts.join("; "))
}

/// Runs a parsed command line.
pub fn run(args: Args) -> Result<()> {
    match &args.command {
        Command::Stage { stage, shard, shards, finalize, force, common } => {
            let ctx = resolve::context(common, *force)?;
            if *finalize {
                let manifest = stages::cluster::finalize(*stage, &ctx, *shards)?;
                let rows: u64 = manifest.files.iter().map(|f| f.rows).sum();
                ctx.reporter.info(&format!("{stage}: complete, {} parts, {rows} rows", manifest.shards));
                return Ok(());
            }
            let shard = cluster::resolve_shard(*shard, *shards, |name| std::env::var(name).ok())?;
            if stages::run_stage(*stage, &ctx, shard)? == stages::Outcome::UpToDate {
                ctx.reporter.info(&format!("{stage}: up to date (use --force to recompute)"));
            }
            Ok(())
        }
        Command::Run { common, from } => stages::run_pipeline(resolve::context(common, false)?, *from),
        Command::Bench(bench) => {
            let options = crate::bench::BenchOptions {
                model: crate::bench::ModelChoice::parse(&bench.model_config),
                images: bench.images,
                captions_per_image: bench.captions_per_image,
                boxes_per_image: bench.boxes_per_image,
                k: bench.k,
                precision: match bench.precision.as_str() {
                    "bf16" => Precision::Bf16,
                    "f16" => Precision::F16,
                    _ => Precision::F32,
                },
                attention: match bench.attention.as_str() {
                    "aligned" => AttentionKernel::Aligned,
                    "fused" => AttentionKernel::Fused,
                    _ => AttentionKernel::Explicit,
                },
                image_batch: bench.image_batch,
                text_batch: bench.text_batch,
                pair_batch: bench.pair_batch,
                seed: bench.seed,
                warmup: bench.warmup,
                json: bench.json.clone(),
            };
            crate::bench::run(&options, resolve::device_choice(bench.device), resolve::terminal_reporter()?).map(|_| ())
        }
        Command::Status { common } => {
            let ctx = resolve::context(common, false)?;
            ctx.reporter.info(&format!("output: {}", ctx.config.output.dir.display()));
            stages::status(&ctx.config)?.iter().for_each(|line| ctx.reporter.info(line));
            for table in stages::cluster::rerun_plan(&ctx.config)? {
                cluster::rerun_commands(&table, common).iter().for_each(|line| ctx.reporter.info(line));
            }
            Ok(())
        }
    }
}
