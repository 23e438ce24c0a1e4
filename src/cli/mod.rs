//! The command line: [`args`] parses it (clap), [`resolve`] turns it into a stage context, and
//! [`run`] dispatches the verb. [`parse`] turns clap's multi-line errors into one-line usage errors.

pub mod args;
pub mod resolve;

use clap::Parser;

pub use args::{Args, Command};

use crate::error::{Error, Result};
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
        Err(e) => Err(Error::Usage(first_line(&e.to_string()))),
    }
}

fn first_line(rendered: &str) -> String {
    let line = rendered.lines().find(|l| !l.trim().is_empty()).unwrap_or("bad command line");
    line.trim_start_matches("error: ").to_string() + " (see qpert --help)"
}

/// Runs a parsed command line.
pub fn run(args: Args) -> Result<()> {
    match &args.command {
        Command::Stage { stage, shard, force, common } => {
            let ctx = resolve::context(common, *force)?;
            if stages::run_stage(*stage, &ctx, *shard)? == stages::Outcome::UpToDate {
                ctx.reporter.info(&format!("{stage}: up to date (use --force to recompute)"));
            }
            Ok(())
        }
        Command::Run { common } => stages::run_pipeline(&resolve::context(common, false)?),
        Command::Status { common } => {
            let ctx = resolve::context(common, false)?;
            ctx.reporter.info(&format!("output: {}", ctx.config.output.dir.display()));
            stages::status(&ctx.config)?.iter().for_each(|line| ctx.reporter.info(line));
            Ok(())
        }
    }
}
