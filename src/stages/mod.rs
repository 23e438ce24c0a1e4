//! The stage framework: the stages in pipeline order ([`Stage`]), the run [`Context`] the CLI hands
//! in (resolved config, device choice, strictness, output hooks), and the verbs built on them:
//! [`run_stage`], [`run_pipeline`] and [`status`]. Each stage lives in its own file, named like its
//! CLI verb and its output folder (`stages/index.rs` ↔ `qpert stage index` ↔ `<output.dir>/index/`),
//! and provides a `fingerprint(&Config)` and a `run(&Context)`.

pub mod cluster;
pub mod extract;
pub mod index;
pub mod report;
pub mod rerank;
pub mod runtime;
pub mod sim;
pub mod text;
pub mod vision_cache;

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use burn::tensor::Device;
use indicatif::{HumanDuration, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::config::{Config, DeviceKind};
use crate::error::{Error, Result};
use crate::store::{DataWarning, Fingerprint, Manifest, Shard, StageDir, StageState};

/// The stages, in pipeline order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    /// Annotations + Entities -> images / boxes / texts tables.
    Index,
    /// Images -> Q-Pert ITC image features (sharded by image).
    Extract,
    /// Captions -> ITC text features (sharded by caption).
    Text,
    /// ITC scores -> top-k candidates per query.
    Sim,
    /// ITM logits for the top-k pairs (sharded by image).
    Rerank,
    /// Ranks, recalls, size bins -> metrics.json and report.md.
    Report,
}

impl Stage {
    /// All stages, in the order `qpert run` runs them.
    pub const ALL: [Stage; 6] = [Stage::Index, Stage::Extract, Stage::Text, Stage::Sim, Stage::Rerank, Stage::Report];

    /// The stage names, in pipeline order (CLI verbs and folder names).
    pub const NAMES: [&'static str; 6] = ["index", "extract", "text", "sim", "rerank", "report"];

    /// The stage's name: its CLI verb, its file in `stages/` and its output folder.
    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }

    /// The stage's output folder under `output.dir`: its name, or `<name>-plain` for the stages
    /// whose output depends on Q-Pert when it is disabled, so that one cache holds a Q-Pert run and
    /// a plain BLIP-2 run side by side (the report compares them).
    pub fn dir_name(self, config: &Config) -> String {
        let depends_on_qpert = matches!(self, Stage::Extract | Stage::Sim | Stage::Rerank | Stage::Report);
        if depends_on_qpert && !config.qpert.enabled {
            format!("{}-plain", self.name())
        } else {
            self.name().to_string()
        }
    }

    /// The stage's output folder under `config`, opened with `fingerprint`.
    pub fn dir(self, config: &Config, fingerprint: Fingerprint) -> StageDir {
        StageDir::open(&config.output.dir, self.name(), fingerprint).in_folder(&self.dir_name(config))
    }

    /// Whether the stage takes `--shard I/N`.
    pub fn is_sharded(self) -> bool {
        matches!(self, Stage::Extract | Stage::Text | Stage::Rerank)
    }

    /// The fingerprint the stage's output must have under `config`.
    pub fn fingerprint(self, config: &Config) -> Result<Fingerprint> {
        match self {
            Stage::Index => index::fingerprint(config),
            Stage::Extract => extract::fingerprint(config),
            Stage::Text => text::fingerprint(config),
            Stage::Sim => sim::fingerprint(config),
            Stage::Rerank => rerank::fingerprint(config),
            Stage::Report => report::fingerprint(config),
        }
    }
}

impl FromStr for Stage {
    type Err = Error;

    fn from_str(s: &str) -> Result<Stage> {
        Stage::ALL
            .into_iter()
            .find(|stage| stage.name() == s)
            .ok_or_else(|| Error::Usage(format!("unknown stage `{s}`; the stages are {}", Stage::NAMES.join(", "))))
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A line-oriented output hook handed in by the CLI.
pub type Sink = Box<dyn Fn(&str) + Send + Sync>;

/// Where stages send what they have to say: results (`info`, stdout in the CLI), data warnings
/// (`warn`, stderr) and the progress of long loops (see [`Progress`]).
pub struct Reporter {
    info: Sink,
    warn: Sink,
    progress: Progress,
}

/// How a [`Reporter`] shows the progress of a long loop.
pub enum Progress {
    /// indicatif bars (stderr is a terminal).
    Bars,
    /// A plain line through the sink every `every`, for logs (Slurm, Kubernetes, `run-gpus.sh`,
    /// a redirected run), where bars are not drawn.
    Lines { every: Duration, sink: Arc<dyn Fn(&str) + Send + Sync> },
    /// Nothing.
    Off,
}

impl Reporter {
    /// A reporter with the given sinks and progress display.
    pub fn new(info: Sink, warn: Sink, progress: Progress) -> Self {
        Reporter { info, warn, progress }
    }

    /// A reporter that says nothing (library use and tests).
    pub fn quiet() -> Self {
        Reporter::new(Box::new(|_| {}), Box::new(|_| {}), Progress::Off)
    }

    /// Reports a result line.
    pub fn info(&self, msg: &str) {
        (self.info)(msg)
    }

    /// Reports a data warning.
    pub fn warn(&self, msg: &str) {
        (self.warn)(msg)
    }

    /// A progress bar over `len` items labelled `label`: drawn, reported as lines, or hidden.
    pub fn bar(&self, len: u64, label: &str) -> ProgressBar {
        match &self.progress {
            Progress::Off => ProgressBar::hidden(),
            Progress::Bars => {
                let style = ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({per_sec}, ETA {eta})")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> ");
                ProgressBar::new(len).with_style(style).with_message(label.to_string())
            }
            Progress::Lines { every, sink } => {
                let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::hidden())
                    .with_message(label.to_string());
                let (weak, every, sink) = (bar.downgrade(), *every, sink.clone());
                // Wakes every `every` until the bar is finished or dropped; never holds the bar.
                std::thread::spawn(move || {
                    loop {
                        std::thread::sleep(every);
                        match weak.upgrade() {
                            Some(bar) if !bar.is_finished() => sink(&progress_line(&bar)),
                            _ => return,
                        }
                    }
                });
                bar
            }
        }
    }
}

/// One progress line: `extract 2/4: 120/250 (48%) after 1m, 2.0/s, about 1m 5s left` (no rate
/// before the first item is done).
fn progress_line(bar: &ProgressBar) -> String {
    let (pos, len) = (bar.position(), bar.length().unwrap_or(0));
    let percent = (pos * 100).checked_div(len).unwrap_or(100);
    let mut line = format!("{}: {pos}/{len} ({percent}%) after {:#}", bar.message(), HumanDuration(bar.elapsed()));
    if pos > 0 {
        line += &format!(", {:.1}/s, about {:#} left", bar.per_sec(), HumanDuration(bar.eta()));
    }
    line
}

/// The compute device a model stage will use, as resolved by the CLI from `model.device` and the
/// features this binary was built with (the only place that knows them).
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceChoice {
    /// What the config asked for.
    pub kind: DeviceKind,
    /// The burn device, or why it cannot be used (e.g. CUDA asked of a CPU-only build).
    pub device: std::result::Result<Device, String>,
}

impl DeviceChoice {
    /// The device, or [`Error::Device`] if it cannot be used. Only model stages call this, so
    /// `index` runs on any build whatever the config asks.
    pub fn require(&self) -> Result<&Device> {
        self.device.as_ref().map_err(|why| Error::Device(why.clone()))
    }
}

/// Everything a stage needs to run: built by `cli::resolve`, never from clap types.
pub struct Context {
    /// The validated config, overrides applied.
    pub config: Config,
    /// The device model stages will use.
    pub device: DeviceChoice,
    /// Turn every data warning into an error.
    pub strict: bool,
    /// Recompute even when the stage is up to date.
    pub force: bool,
    /// Output hooks.
    pub reporter: Reporter,
}

impl Context {
    /// A data warning about `path`: reported and returned for the manifest, or an [`Error::Input`]
    /// under `--strict`.
    pub fn data_warning(&self, path: &Path, msg: &str) -> Result<DataWarning> {
        if self.strict {
            return Err(Error::input(path, format!("{msg} (a warning, fatal under --strict)")));
        }
        self.reporter.warn(&format!("{}: {msg}", path.display()));
        Ok(DataWarning { path: path.to_path_buf(), message: msg.to_string() })
    }

    /// Under `--strict`, fails on the first warning an up-to-date stage recorded when it ran, so
    /// `--strict` means the same whether or not the stage is recomputed.
    pub fn check_recorded_warnings(&self, manifest: &Manifest) -> Result<()> {
        match manifest.warnings.first() {
            Some(w) if self.strict => Err(Error::input(
                &w.path,
                format!("{} (a warning recorded in {}'s manifest, fatal under --strict)", w.message, manifest.stage),
            )),
            _ => Ok(()),
        }
    }

    /// The output folder of `stage`, opened with `fingerprint`.
    pub fn stage_dir(&self, stage: Stage, fingerprint: Fingerprint) -> StageDir {
        stage.dir(&self.config, fingerprint)
    }
}

/// Why a shard of a batched stage has no rows, as a suffix for its summary line; empty when it has
/// some. Shards take whole batches ([`Shard::batch_range`], so that any sharding gives the same
/// bits), and a split of fewer batches than shards leaves some shards empty.
pub fn empty_shard_note(shard: Shard, len: usize, batch: usize, item: &str, batch_key: &str) -> String {
    if len == 0 || !shard.batch_range(len, batch).is_empty() {
        return String::new();
    }
    let batches = len.div_ceil(batch);
    let batches = if batches == 1 { "1 batch".to_string() } else { format!("{batches} batches") };
    format!(
        " (a shard takes whole batches: {} make {batches} of {batch_key} = {batch}, fewer than {} shards)",
        counted(len, item),
        shard.count()
    )
}

/// `n` and `noun`, pluralised with `s` unless `n` is 1: `counted(1, "image")` is "1 image".
pub fn counted(n: usize, noun: &str) -> String {
    if n == 1 { format!("1 {noun}") } else { format!("{n} {noun}s") }
}

/// What running a stage did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The stage computed and wrote its output.
    Ran,
    /// The output was already complete with the current fingerprint.
    UpToDate,
}

/// Runs one stage (or one shard of it). A shard of an unsharded stage is a usage error (exit 2).
pub fn run_stage(stage: Stage, ctx: &Context, shard: Option<Shard>) -> Result<Outcome> {
    if let Some(shard) = shard.filter(|s| *s != Shard::ALL && !stage.is_sharded()) {
        return Err(Error::Usage(format!("stage {stage} is not sharded; drop --shard {shard}")));
    }
    let run_shard: fn(&Context, Shard) -> Result<Outcome> = match stage {
        Stage::Index => return index::run(ctx),
        Stage::Sim => return sim::run(ctx),
        Stage::Report => return report::run(ctx),
        Stage::Extract => extract::run,
        Stage::Text => text::run,
        Stage::Rerank => rerank::run,
    };
    match shard {
        Some(shard) => run_shard(ctx, shard),
        None => run_remaining_shards(stage, ctx, run_shard),
    }
}

/// A sharded stage run without `--shard`: when earlier sharded runs left fresh parts of N shards,
/// computes only the shards of that layout that are not done (a plain `run` after 7 of 8 Slurm
/// tasks, or after a part was damaged, computes the 8th, not the whole stage again); otherwise
/// (nothing fresh on disk, or `--force`) the whole stage as one shard.
fn run_remaining_shards(
    stage: Stage,
    ctx: &Context,
    run_shard: fn(&Context, Shard) -> Result<Outcome>,
) -> Result<Outcome> {
    let layout = cluster::shard_table(stage, &ctx.config)?.filter(|t| !ctx.force && !t.done.is_empty());
    let Some(table) = layout else { return run_shard(ctx, Shard::ALL) };
    let remaining: Vec<String> = (1..=table.count).filter(|i| !table.done.contains(i)).map(|i| i.to_string()).collect();
    if !remaining.is_empty() {
        ctx.reporter.info(&format!(
            "{stage}: {} of {} shards are done; computing the rest of that layout: {}",
            table.done.len(),
            table.count,
            remaining.join(", ")
        ));
    }
    // Every shard, done ones included: the last call writes the manifest once all parts are there.
    let mut outcome = Outcome::UpToDate;
    for i in 1..=table.count {
        if run_shard(ctx, Shard::new(i, table.count)?)? == Outcome::Ran {
            outcome = Outcome::Ran;
        }
    }
    Ok(outcome)
}

/// Runs the stages in order, skipping those already up to date (and `rerank` when disabled); with
/// `from`, recomputes that stage and every stage that uses its output (`qpert run --from`), for
/// inputs no fingerprint sees (images replaced in place) or to redo work on purpose.
pub fn run_pipeline(mut ctx: Context, from: Option<Stage>) -> Result<()> {
    let recomputed = match from {
        Some(from) => {
            let stages = stage_and_its_users(from, &ctx.config)?;
            let names: Vec<&str> = stages.iter().map(|s| s.name()).collect();
            ctx.reporter.info(&format!("run --from {from}: recomputing {}", names.join(", ")));
            stages
        }
        None => Vec::new(),
    };
    for stage in Stage::ALL {
        if stage == Stage::Rerank && !ctx.config.rerank.enabled {
            ctx.reporter.info("rerank: disabled in the config ([rerank] enabled = false), skipped");
            continue;
        }
        ctx.force = recomputed.contains(&stage);
        if run_stage(stage, &ctx, None)? == Outcome::UpToDate {
            ctx.reporter.info(&format!("{stage}: up to date, skipped"));
        }
    }
    Ok(())
}

/// `stage` and the stages that use its output, directly or through others, in pipeline order: those
/// whose fingerprint names one of them as an input (`input.<stage>`). A disabled rerank is none.
fn stage_and_its_users(stage: Stage, config: &Config) -> Result<Vec<Stage>> {
    if stage == Stage::Rerank && !config.rerank.enabled {
        return Err(Error::Usage("--from rerank: rerank is disabled in the config ([rerank] enabled = false)".into()));
    }
    let mut stages = vec![stage];
    for later in Stage::ALL.into_iter().filter(|s| *s > stage) {
        if later == Stage::Rerank && !config.rerank.enabled {
            continue;
        }
        let inputs = later.fingerprint(config)?;
        if stages.iter().any(|s| inputs.entries().contains_key(&format!("input.{}", s.name()))) {
            stages.push(later);
        }
    }
    Ok(stages)
}

/// One line of `qpert status` per stage: `index    done (3 files, fingerprint 1a2b3c4d5e6f)`,
/// `stale (dataset.box_origin: 1 -> 0)`, `damaged (t2i_ranks.parquet: missing)`, `partial: 2 of 4
/// shards done [1, 3]; running [2: host vm pid 12 since ...]; missing [4]`, `missing`.
pub fn status(config: &Config) -> Result<Vec<String>> {
    Stage::ALL.iter().map(|&stage| Ok(format!("{:<8} {}", stage.name(), describe(stage, config)?))).collect()
}

fn describe(stage: Stage, config: &Config) -> Result<String> {
    // A stage whose inputs cannot be fingerprinted (no model folder yet, say) is reported, not fatal.
    let fingerprint = match stage.fingerprint(config) {
        Ok(fingerprint) => fingerprint,
        Err(e) => return Ok(format!("missing (cannot fingerprint its inputs: {e})")),
    };
    let digest = fingerprint.digest();
    let dir = stage.dir(config, fingerprint);
    Ok(match dir.state()? {
        StageState::Done(m) => {
            format!("done ({} files, {} shard(s), fingerprint {})", m.files.len(), m.shards, &digest[..12])
        }
        StageState::Stale(changes) => format!("stale ({})", changes.join("; ")),
        StageState::Damaged(problems) => format!("damaged ({})", problems.join("; ")),
        // Parts, or only locks of workers that have not written their part yet.
        StageState::Partial(_) | StageState::Missing => {
            cluster::ShardTable::read(stage, &dir)?.map_or_else(|| "missing".to_string(), |t| t.describe())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_report_a_bar_until_it_is_finished() {
        let lines = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let sink_lines = lines.clone();
        let sink = Arc::new(move |line: &str| sink_lines.lock().unwrap().push(line.to_string()));
        let every = Duration::from_millis(10);
        let reporter = Reporter::new(Box::new(|_| {}), Box::new(|_| {}), Progress::Lines { every, sink });
        let bar = reporter.bar(5, "extract 2/4");
        bar.inc(2);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while lines.lock().unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "no progress line within 20 s");
            std::thread::sleep(every);
        }
        let first = lines.lock().unwrap()[0].clone();
        assert!(first.starts_with("extract 2/4: 2/5 (40%) after "), "{first}");
        assert!(first.contains("/s, about ") && first.ends_with(" left"), "{first}");

        bar.finish_and_clear();
        std::thread::sleep(5 * every);
        let after_finish = lines.lock().unwrap().len();
        std::thread::sleep(5 * every);
        assert_eq!(lines.lock().unwrap().len(), after_finish, "no line once the bar is finished");
    }

    #[test]
    fn stages_round_trip_through_their_names_in_pipeline_order() {
        for (i, stage) in Stage::ALL.iter().enumerate() {
            assert_eq!(stage.name(), Stage::NAMES[i]);
            assert_eq!(stage.name().parse::<Stage>().unwrap(), *stage);
        }
        assert!("nope".parse::<Stage>().is_err());
        assert!(Stage::ALL.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn strict_turns_warnings_into_input_errors() {
        let config: Config = toml::from_str(include_str!("../../configs/flickr30k.toml")).unwrap();
        let device = DeviceChoice { kind: DeviceKind::Cpu, device: Ok(Device::flex()) };
        let ctx = Context { config, device, strict: true, force: false, reporter: Reporter::quiet() };
        let err = ctx.data_warning(Path::new("a.xml"), "box outside").unwrap_err();
        assert_eq!(err.exit_code(), 1);
        assert_eq!(err.to_string(), "a.xml: box outside (a warning, fatal under --strict)");
    }

    #[test]
    fn unusable_device_is_a_device_error() {
        let d = DeviceChoice { kind: DeviceKind::Cuda, device: Err("built without cuda".into()) };
        assert!(matches!(d.require(), Err(Error::Device(_))));
    }
}
