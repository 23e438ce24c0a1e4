//! The command line (clap derive): verbs, options and their validation. Nothing here touches files;
//! `resolve` turns [`Args`] into a stage `Context`.

use std::path::PathBuf;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Parser, Subcommand};

use super::cluster::ShardArg;
use crate::config::DeviceKind;
use crate::stages::Stage;

/// qpert: BLIP-2 image-text retrieval with Object-Aware Query Perturbation, as staged, resumable,
/// shardable batch jobs writing Parquet artifacts.
#[derive(Debug, Parser)]
#[command(
    name = "qpert",
    version,
    about,
    after_help = "Examples:
  qpert stage index --config configs/flickr30k.toml
  qpert run --config configs/flickr30k.toml
  qpert status --config configs/flickr30k.toml --set output.dir=cache/alpha4"
)]
pub struct Args {
    /// The verb.
    #[command(subcommand)]
    pub command: Command,
}

/// The verbs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one stage (or one shard of a sharded stage).
    #[command(after_help = "Stages, in order: index, extract, text, sim, rerank, report.
extract, text and rerank are sharded; each stage skips work that is up to date (--force redoes it).

Examples:
  qpert stage index --config configs/flickr30k.toml
  qpert stage index --config configs/flickr30k.toml --set dataset.box_origin=0 --strict
  qpert stage extract --config configs/coco.toml --shard 2/8
  qpert stage extract --config configs/coco.toml --shard auto          (in a Slurm array task)
  qpert stage extract --config configs/coco.toml --shard auto --shards 8   (Kubernetes Indexed Job)
  qpert stage extract --config configs/coco.toml --finalize")]
    Stage {
        /// The stage to run.
        #[arg(value_parser = PossibleValuesParser::new(Stage::NAMES).try_map(|s| s.parse::<Stage>()))]
        stage: Stage,
        /// Process only slice I of N (1-based, e.g. `2/8`) of a sharded stage; `auto` takes I and N
        /// from a Slurm job array (`SLURM_ARRAY_TASK_ID`) or a Kubernetes Indexed Job
        /// (`JOB_COMPLETION_INDEX`, with `--shards N`).
        #[arg(long, value_name = "I/N|auto", value_parser = |s: &str| s.parse::<ShardArg>().map_err(|e| e.to_string()))]
        shard: Option<ShardArg>,
        /// The shard count N for `--shard auto` (required on Kubernetes and when resubmitting some
        /// Slurm array indices) or `--finalize`.
        #[arg(long, value_name = "N")]
        shards: Option<u32>,
        /// Write the manifest of a sharded stage whose parts are all done (normally the worker that
        /// finishes the last shard does it); computes nothing.
        #[arg(long, conflicts_with_all = ["shard", "force"])]
        finalize: bool,
        /// Recompute even if the stage is up to date.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Run all stages in order, skipping those already up to date.
    #[command(after_help = "Examples:
  qpert run --config configs/flickr30k.toml
  qpert run --config configs/flickr30k.toml --set qpert.alpha=4 --set output.dir=cache/alpha4
  qpert run --config configs/flickr30k.toml --from extract   (after replacing images in place)")]
    Run {
        /// Recompute this stage and every stage that uses its output (directly or not), even when
        /// up to date; the others are still skipped when up to date.
        #[arg(long, value_name = "STAGE", value_parser = PossibleValuesParser::new(Stage::NAMES).try_map(|s| s.parse::<Stage>()))]
        from: Option<Stage>,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Time the real stages on synthetic data with a random model; project Flickr30K and COCO.
    #[command(after_help = "Examples:
  qpert bench --model-config tiny --images 4
  qpert bench --model-config medium --images 16 --k 16
  qpert bench --model-config coco --device cuda --images 64 --warmup --json bench.json")]
    Bench(BenchArgs),
    /// Show, per stage, whether it is done, stale, partial (which shards are done, running, stale or
    /// missing) or missing, and the commands that rerun only the shards not done.
    #[command(after_help = "Examples:
  qpert status --config configs/flickr30k.toml
  qpert status --config configs/flickr30k.toml --set dataset.box_origin=0")]
    Status {
        #[command(flatten)]
        common: CommonArgs,
    },
}

/// Options of `qpert bench` (see README, "Benchmark").
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// The model configuration, with seeded random weights: `tiny` (the test model's shapes),
    /// `medium` (CPU-sized, real head size), `coco` (blip2-itm-vit-g-coco) or a config.json path.
    #[arg(long, value_name = "tiny|medium|coco|PATH", default_value = "coco")]
    pub model_config: String,
    /// Synthetic images (500 x 375 JPEGs).
    #[arg(long, default_value_t = 64)]
    pub images: usize,
    /// Captions per image.
    #[arg(long, default_value_t = 5)]
    pub captions_per_image: usize,
    /// Object boxes per image (all kept; Flickr30K Entities averages 8.7).
    #[arg(long, default_value_t = 8)]
    pub boxes_per_image: usize,
    /// ITC candidates per query re-ranked by ITM.
    #[arg(long, default_value_t = 16)]
    pub k: u32,
    /// `cpu`, `cuda` (a `--features cuda` build) or `wgpu` (a `--features wgpu` build).
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceKind,
    /// Model precision (`model.precision`): `f32`, `bf16` or `f16`.
    #[arg(long, value_parser = ["f32", "bf16", "f16"], default_value = "f32")]
    pub precision: String,
    /// The vision tower's self-attention (`model.attention`): `explicit`, `aligned` or `fused`.
    #[arg(long, value_parser = ["explicit", "aligned", "fused"], default_value = "explicit")]
    pub attention: String,
    /// Images per model batch (extract, rerank).
    #[arg(long, default_value_t = 16)]
    pub image_batch: usize,
    /// Captions per batch (text).
    #[arg(long, default_value_t = 256)]
    pub text_batch: usize,
    /// Pairs per ITM batch (rerank).
    #[arg(long, default_value_t = 128)]
    pub pair_batch: usize,
    /// Seed of the random weights and the synthetic data.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Run every stage once before measuring (on GPU the difference is JIT compilation + autotuning).
    #[arg(long)]
    pub warmup: bool,
    /// Also write the report as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

/// Options every verb takes.
#[derive(Debug, clap::Args)]
pub struct CommonArgs {
    /// The qpert TOML config (see configs/ and README "Config reference").
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Override a config value, typed and validated like the file: `--set qpert.alpha=4`.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Turn every data warning (e.g. a box reaching outside its image) into an error.
    #[arg(long)]
    pub strict: bool,
}

impl Command {
    /// The options shared by the verbs that take a config (all but `bench`).
    pub fn common(&self) -> Option<&CommonArgs> {
        match self {
            Command::Stage { common, .. } | Command::Run { common, .. } | Command::Status { common } => Some(common),
            Command::Bench(_) => None,
        }
    }
}
