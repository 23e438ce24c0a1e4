//! `qpert bench`: times the real stages (index, extract with Q-Pert, text, sim, rerank) on a
//! synthetic split with a seeded random model of any configuration, in a scratch folder, and
//! reports per stage the wall time, throughput, achieved TFLOP/s against counted FLOPs ([`flops`]),
//! peak host (and GPU) memory and the time spent in image preprocessing, eigendecompositions and
//! (on GPU) autotuning, then projects the time of the full Flickr30K and COCO evaluations from the
//! measured per-item rates. See README, "Benchmark".

pub mod flops;
pub mod probes;
pub mod synthetic;
pub mod z_cache;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use burn::tensor::Device;
use serde::Serialize;

use crate::config::{
    Config, DatasetConfig, DeviceKind, ModelConfig, OutputConfig, Precision, QpertConfig, RerankConfig,
};
use crate::error::{Error, Result};
use crate::model::{AttentionKernel, Blip2Config};
use crate::qpert::perturbation::EIGEN_TIME;
use crate::qpert::{AlphaWeight, Components, EIGEN_WAIT_TIME, ProjectorKind};
use crate::stages::{self, Context, DeviceChoice, Reporter, Stage, rerank, runtime, sim};
use probes::PAIRS_PER_IMAGE;
use synthetic::{SplitShape, SyntheticDataset};

/// Which model configuration to benchmark.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelChoice {
    /// The tiny test model's shapes (`tests/fixtures/tiny_blip2_a`).
    Tiny,
    /// A CPU-sized model with the real Q-Former head size (64) and query count (32).
    Medium,
    /// Salesforce/blip2-itm-vit-g-coco (the real model).
    Coco,
    /// A Hugging Face `config.json`.
    File(PathBuf),
}

impl ModelChoice {
    /// `tiny`, `medium` or `coco`; anything else is a `config.json` path.
    pub fn parse(name: &str) -> Self {
        match name {
            "tiny" => ModelChoice::Tiny,
            "medium" => ModelChoice::Medium,
            "coco" => ModelChoice::Coco,
            path => ModelChoice::File(PathBuf::from(path)),
        }
    }

    /// The configuration, read and validated for a file.
    pub fn config(&self) -> Result<Blip2Config> {
        Ok(match self {
            ModelChoice::Tiny => tiny_config(),
            ModelChoice::Medium => medium_config(),
            ModelChoice::Coco => Blip2Config::itm_vit_g_coco(),
            ModelChoice::File(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|e| Error::weights(path, format!("cannot read: {e}")))?;
                Blip2Config::from_json(&text, path)?
            }
        })
    }

    fn label(&self) -> String {
        match self {
            ModelChoice::Tiny => "tiny".into(),
            ModelChoice::Medium => "medium".into(),
            ModelChoice::Coco => "coco (blip2-itm-vit-g-coco)".into(),
            ModelChoice::File(path) => path.display().to_string(),
        }
    }
}

/// The shapes of `tests/fixtures/tiny_blip2_a`.
fn tiny_config() -> Blip2Config {
    let mut c = Blip2Config::itm_vit_g_coco();
    let v = &mut c.vision_config;
    (v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads, v.image_size) = (48, 96, 3, 4, 56);
    let q = &mut c.qformer_config;
    (q.hidden_size, q.intermediate_size, q.num_hidden_layers, q.num_attention_heads) = (32, 64, 4, 4);
    q.encoder_hidden_size = 48;
    (c.num_query_tokens, c.image_text_hidden_size) = (8, 16);
    c
}

/// A ViT-S-sized vision tower at 224 px and a 6-layer Q-Former of width 256 with the real head
/// size 64 (so the Q-Pert eigendecompositions are the real 64 x 64 ones) and 32 queries.
fn medium_config() -> Blip2Config {
    let mut c = Blip2Config::itm_vit_g_coco();
    let v = &mut c.vision_config;
    (v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads, v.image_size) =
        (384, 1536, 12, 6, 224);
    let q = &mut c.qformer_config;
    (q.hidden_size, q.intermediate_size, q.num_hidden_layers, q.num_attention_heads) = (256, 1024, 6, 4);
    q.encoder_hidden_size = 384;
    c
}

/// What to benchmark.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The model configuration (random weights).
    pub model: ModelChoice,
    /// Synthetic images.
    pub images: usize,
    /// Captions per image.
    pub captions_per_image: usize,
    /// Object boxes per image.
    pub boxes_per_image: usize,
    /// ITC candidates per query re-ranked by ITM.
    pub k: u32,
    /// Model precision.
    pub precision: Precision,
    /// The vision tower's self-attention.
    pub attention: AttentionKernel,
    /// Images per model batch (extract, rerank).
    pub image_batch: usize,
    /// Captions per batch (text).
    pub text_batch: usize,
    /// Pairs per ITM batch (rerank).
    pub pair_batch: usize,
    /// Seed of the weights and the synthetic data.
    pub seed: u64,
    /// Run every stage once before the measured run (on GPU: JIT compilation and autotuning).
    pub warmup: bool,
    /// Also write the report as JSON here.
    pub json: Option<PathBuf>,
}

/// A full evaluation to project.
struct Target {
    name: &'static str,
    images: f64,
    texts: f64,
    k: f64,
}

const TARGETS: [Target; 2] = [
    Target { name: "flickr30k", images: 1000.0, texts: 5000.0, k: 64.0 },
    Target { name: "coco", images: 5000.0, texts: 25010.0, k: 128.0 },
];

/// One stage's measurements.
#[derive(Debug, Clone, Serialize)]
pub struct StageTiming {
    /// The stage.
    pub stage: String,
    /// What it processed: images, texts, or pairs.
    pub unit: String,
    /// How many.
    pub items: f64,
    /// Wall time, seconds.
    pub wall_s: f64,
    /// Of which: loading the model weights.
    pub load_s: f64,
    /// Wall time minus loading.
    pub compute_s: f64,
    /// Items per second of compute time.
    pub per_s: f64,
    /// Counted FLOPs (see `bench::flops`).
    pub flops: f64,
    /// Counted FLOPs per second of compute time, in TFLOP/s.
    pub tflops: f64,
    /// Image decode + resize on the prefetch thread (overlaps the model), seconds.
    pub preprocess_s: f64,
    /// Q-Pert eigendecompositions on CPU threads, seconds.
    pub eigen_s: f64,
    /// Of which the model side waited for, seconds (the rest overlapped device work).
    pub eigen_wait_s: f64,
    /// The per-item part of the stage, seconds: ITM batches in rerank, the scoring passes in sim
    /// (the rest is fixed cost: reading and writing artifacts); unused elsewhere.
    pub scaled_s: f64,
    /// Warm-up run's compute time minus this run's (JIT + autotuning); GPU with `--warmup` only.
    pub autotune_s: Option<f64>,
    /// Peak resident host memory during the stage (VmHWM), GiB.
    pub host_peak_gib: Option<f64>,
    /// Peak device memory used during the stage (nvidia-smi, whole GPU), GiB.
    pub gpu_peak_gib: Option<f64>,
}

/// A projected full evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct Projection {
    /// `flickr30k` or `coco`.
    pub name: String,
    /// Images.
    pub images: f64,
    /// Texts.
    pub texts: f64,
    /// k.
    pub k: f64,
    /// ITM pairs (the upper bound images * k + texts * k of the union of both top-k).
    pub pairs: f64,
    /// Projected seconds per stage, in pipeline order.
    pub stages_s: Vec<(String, f64)>,
    /// Their sum.
    pub total_s: f64,
}

/// The whole report (`--json`).
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// The model configuration's label.
    pub model: String,
    /// `cpu`, `cuda` or `wgpu`.
    pub device: String,
    /// The run precision (`model.precision`).
    pub precision: Precision,
    /// The vision tower's self-attention (`model.attention`).
    pub attention: AttentionKernel,
    /// Synthetic images.
    pub images: usize,
    /// Synthetic captions.
    pub texts: usize,
    /// Boxes per image.
    pub boxes_per_image: usize,
    /// k.
    pub k: u32,
    /// Writing the synthetic data and the random model, seconds.
    pub setup_s: f64,
    /// Per stage.
    pub stages: Vec<StageTiming>,
    /// The vision tower alone, milliseconds per image, with each attention kernel measured so far
    /// (run precision); `None` where the kernel failed on the device.
    pub vision_ms_per_image: Vec<(AttentionKernel, Option<f64>)>,
    /// ITM alone, pairs per second, with the cross-attention of each kernel (explicit: the vision
    /// tokens as they are; aligned: padded), measured so far; `None` where it failed.
    pub itm_pairs_per_s: Vec<(AttentionKernel, Option<f64>)>,
    /// ITM alone with the run's kernel on chunks of 4 x `--pair-batch` pairs: (pairs, pairs per
    /// second or `None` where it failed); `None` until measured. Against the rate above, it shows
    /// how much of a chunk's time is per chunk (kernel launches, host work) rather than per pair.
    pub itm_large_chunk: Option<(usize, Option<f64>)>,
    /// ITM alone with the run's kernel on one chunk of `--pair-batch` pairs, each pair on another
    /// image than the one before (runs of one pair, the worst layout for the per-image
    /// cross-attention): pairs per second, `None` where it failed; outer `None` until measured.
    /// Against the rate with runs of 64, it shows what short runs cost.
    pub itm_short_runs: Option<Option<f64>>,
    /// Caching the vision tokens Z between `extract` and `rerank` against recomputing them (`None`
    /// until measured, in the report written right after the stages).
    pub z_cache: Option<z_cache::ZCacheTiming>,
    /// The matrix products of the vision tower and of ITM alone, on the probes' shapes with the
    /// run's attention kernel (`None` until measured).
    pub matmul_floor: Option<MatmulFloor>,
    /// Projections.
    pub projections: Vec<Projection>,
}

/// What the vision tower and ITM would reach if only their matrix products cost time
/// ([`probes::matmul_seconds`]): set against the probes above, the share of the time spent
/// between the products (softmax, LayerNorm, GELU, casts, gathers). `None` where it failed.
#[derive(Debug, Clone, Serialize)]
pub struct MatmulFloor {
    /// The token count the vision tower's attention products run (padded by `aligned`/`fused`).
    pub vision_attention_len: usize,
    /// The vision tower's products, milliseconds per image.
    pub vision_ms_per_image: Option<f64>,
    /// Their TFLOP/s.
    pub vision_tflops: Option<f64>,
    /// ITM's products (the ITM probe's shapes), pairs per second.
    pub itm_pairs_per_s: Option<f64>,
    /// Their TFLOP/s.
    pub itm_tflops: Option<f64>,
}

/// A scratch folder removed when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Samples the GPU's used memory with `nvidia-smi` every 100 ms and keeps the peak since the last
/// reset. Inert (always `None`) when `nvidia-smi` is unavailable.
struct GpuMemory {
    peak_mib: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    available: bool,
}

impl GpuMemory {
    fn used_mib() -> Option<u64> {
        let out = std::process::Command::new("nvidia-smi")
            .args(["--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    }

    fn start(enabled: bool) -> Self {
        let peak_mib = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let available = enabled && Self::used_mib().is_some();
        if available {
            let (peak, stop) = (peak_mib.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(used) = Self::used_mib() {
                        peak.fetch_max(used, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
        }
        GpuMemory { peak_mib, stop, available }
    }

    /// The peak since the last call, GiB, and a reset.
    fn take_peak_gib(&self) -> Option<f64> {
        let peak = self.peak_mib.swap(Self::used_mib().unwrap_or(0), Ordering::Relaxed);
        self.available.then_some(peak as f64 / 1024.0)
    }
}

impl Drop for GpuMemory {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Hands the device's free pool pages back to the driver and waits until they are. CubeCL keeps
/// freed memory in its pools, so without this a stage's `GPU GiB` (whole-device `nvidia-smi`) would
/// include what the work before it left there. A no-op on CPU.
fn release_pool_memory(device: &Device) -> Result<()> {
    device.memory_cleanup();
    device.sync().map_err(|e| Error::device_failed("releasing unused device memory", e, None))
}

/// Resets the process's peak resident memory (Linux `clear_refs` 5); best effort.
fn reset_host_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The process's peak resident memory (VmHWM) in GiB, where `/proc` has it.
fn host_peak_gib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / (1024.0 * 1024.0))
}

/// The stage config on the synthetic split.
fn stage_config(
    options: &BenchOptions,
    data: &SyntheticDataset,
    model_dir: &Path,
    out: &Path,
    device: DeviceKind,
) -> Config {
    Config {
        dataset: DatasetConfig {
            name: "bench-synthetic".into(),
            annotations: data.annotations.clone(),
            split: "test".into(),
            images: data.images.clone(),
            entities: Some(data.entities.clone()),
            image_shapes: None,
            box_origin: 1,
        },
        model: ModelConfig {
            dir: model_dir.to_path_buf(),
            device,
            precision: options.precision,
            image_batch: options.image_batch,
            text_batch: options.text_batch,
            pair_batch: options.pair_batch,
            attention: options.attention,
        },
        qpert: QpertConfig {
            enabled: true,
            alpha: 8.0,
            npc: Components::Ratio(0.99),
            weight: AlphaWeight::Constant,
            projector: ProjectorKind::Official,
        },
        rerank: RerankConfig { enabled: true, k: options.k, vision_cache: true },
        output: OutputConfig { dir: out.to_path_buf() },
    }
}

/// Counter readings before a stage.
struct Counters {
    load: f64,
    preprocess: f64,
    eigen: f64,
    eigen_wait: f64,
    itm: f64,
    score: f64,
}

impl Counters {
    fn read() -> Self {
        Counters {
            load: runtime::LOAD_TIME.seconds(),
            preprocess: runtime::PREPROCESS_TIME.seconds(),
            eigen: EIGEN_TIME.seconds(),
            eigen_wait: EIGEN_WAIT_TIME.seconds(),
            itm: rerank::ITM_TIME.seconds(),
            score: sim::SCORE_TIME.seconds(),
        }
    }
}

const STAGES: [Stage; 5] = [Stage::Index, Stage::Extract, Stage::Text, Stage::Sim, Stage::Rerank];

/// The split's sizes as the stages see them.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    images: f64,
    texts: f64,
    boxes_per_image: f64,
}

/// Rows of the `rerank` output: the ITM pairs scored.
fn rerank_pairs(ctx: &Context) -> Result<f64> {
    let dir = ctx.stage_dir(Stage::Rerank, rerank::fingerprint(&ctx.config)?);
    Ok(dir.read_parts()?.num_rows() as f64)
}

/// Runs the five stages once into `ctx`'s output folder and measures each.
fn run_stages(ctx: &Context, model: &Blip2Config, sizes: Sizes, gpu: &GpuMemory) -> Result<Vec<StageTiming>> {
    let Sizes { images, texts, boxes_per_image } = sizes;
    let per_image_qpert = flops::vision(model) + flops::cross_kv(model) + boxes_per_image * flops::box_gram(model);
    let mut timings = Vec::new();
    runtime::forget_loaded_model();
    let device = ctx.device.require()?;
    for stage in STAGES {
        release_pool_memory(device)?;
        reset_host_peak();
        gpu.take_peak_gib();
        let before = Counters::read();
        let start = Instant::now();
        stages::run_stage(stage, ctx, None)?;
        let wall_s = start.elapsed().as_secs_f64();
        let after = Counters::read();
        let (unit, items, flops) = match stage {
            Stage::Index => ("images", images, 0.0),
            Stage::Extract => ("images", images, images * (per_image_qpert + flops::image_features(model))),
            Stage::Text => ("texts", texts, texts * flops::text_features(model)),
            Stage::Sim => ("pairs", images * texts, flops::itc_scores(model, images, texts)),
            _ => {
                let pairs = rerank_pairs(ctx)?;
                // The vision cache spares rerank the ViT and Q-Pert: per image only the cross-attention K/V.
                ("pairs", pairs, images * flops::cross_kv(model) + pairs * flops::itm_pair(model))
            }
        };
        let load_s = after.load - before.load;
        let compute_s = (wall_s - load_s).max(1e-9);
        timings.push(StageTiming {
            stage: stage.name().into(),
            unit: unit.into(),
            items,
            wall_s,
            load_s,
            compute_s,
            per_s: items / compute_s,
            flops,
            tflops: flops / compute_s / 1e12,
            preprocess_s: after.preprocess - before.preprocess,
            eigen_s: after.eigen - before.eigen,
            eigen_wait_s: after.eigen_wait - before.eigen_wait,
            scaled_s: if stage == Stage::Sim { after.score - before.score } else { after.itm - before.itm },
            autotune_s: None,
            host_peak_gib: host_peak_gib(),
            gpu_peak_gib: gpu.take_peak_gib(),
        });
    }
    Ok(timings)
}

/// Projects a full evaluation from the measured per-item times: index, extract and text scale with
/// their items; sim's scoring passes scale with the ITC pairs and the rest of it (artifacts) is
/// kept as is; rerank scales with its images (ViT + Q-Pert, the time outside the ITM batches) plus
/// its ITM pairs; each model stage adds its measured load time once.
fn project(stages: &[StageTiming], sizes: Sizes, target: &Target) -> Projection {
    let pairs = target.images * target.k + target.texts * target.k;
    let stages_s: Vec<(String, f64)> = stages
        .iter()
        .map(|t| {
            let scaled = match t.stage.as_str() {
                "index" | "extract" => t.compute_s / sizes.images * target.images,
                "text" => t.compute_s / sizes.texts * target.texts,
                "sim" => {
                    (t.compute_s - t.scaled_s).max(0.0) + t.scaled_s / t.items.max(1.0) * target.images * target.texts
                }
                _ => {
                    (t.compute_s - t.scaled_s).max(0.0) / sizes.images * target.images
                        + t.scaled_s / t.items.max(1.0) * pairs
                }
            };
            (t.stage.clone(), t.load_s + scaled)
        })
        .collect();
    let total_s = stages_s.iter().map(|(_, s)| s).sum();
    Projection {
        name: target.name.into(),
        images: target.images,
        texts: target.texts,
        k: target.k,
        pairs,
        stages_s,
        total_s,
    }
}

/// Runs the benchmark on `device` and reports through `reporter` (stage messages, then the table
/// and projections).
pub fn run(options: &BenchOptions, device: DeviceChoice, reporter: Reporter) -> Result<BenchReport> {
    if options.images == 0 || options.captions_per_image == 0 {
        return Err(Error::Usage("qpert bench: --images and --captions-per-image must be at least 1".into()));
    }
    if options.k == 0 || options.image_batch == 0 || options.text_batch == 0 || options.pair_batch == 0 {
        return Err(Error::Usage("qpert bench: --k and the batch sizes must be at least 1".into()));
    }
    let model = options.model.config()?;
    let burn_device: Device = device.require()?.clone();
    let scratch = Scratch(std::env::temp_dir().join(format!("qpert-bench-{}", std::process::id())));
    let setup = Instant::now();
    let shape = SplitShape {
        images: options.images,
        captions_per_image: options.captions_per_image,
        boxes_per_image: options.boxes_per_image,
        seed: options.seed,
    };
    let data = synthetic::write_dataset(&scratch.0.join("data"), &shape)?;
    let model_dir = scratch.0.join("model");
    synthetic::write_model(&model_dir, &model, options.seed, &burn_device)?;
    // The random weights were built in f32 on the device (4.6 GB for coco).
    release_pool_memory(&burn_device)?;
    // Hashed here, once, so that no stage's time holds the first fingerprint's read of the weights.
    crate::store::content_hash::size_and_sha256(&model_dir.join("model.safetensors"), &scratch.0)?;
    let setup_s = setup.elapsed().as_secs_f64();
    reporter.info(&format!(
        "bench: model {} in {} ({} attention), {} images x {} captions, {} boxes per image, k = {}, on {} (setup {setup_s:.1} s)",
        options.model.label(),
        format!("{:?}", options.precision).to_lowercase(),
        format!("{:?}", options.attention).to_lowercase(),
        options.images,
        options.captions_per_image,
        options.boxes_per_image,
        options.k,
        device.kind.name()
    ));
    let sizes = Sizes {
        images: options.images as f64,
        texts: (options.images * options.captions_per_image) as f64,
        boxes_per_image: options.boxes_per_image as f64,
    };
    let on_gpu = device.kind != DeviceKind::Cpu;
    let gpu = GpuMemory::start(on_gpu);
    let mut ctx = Context {
        config: stage_config(options, &data, &model_dir, &scratch.0.join("warmup"), device.kind),
        device,
        strict: false,
        force: true,
        reporter,
    };
    let warmup = if options.warmup {
        ctx.reporter.info("bench: warm-up run");
        Some(run_stages(&ctx, &model, sizes, &gpu)?)
    } else {
        None
    };
    ctx.config.output.dir = scratch.0.join("cache");
    let mut stages = run_stages(&ctx, &model, sizes, &gpu)?;
    if let (Some(warmup), true) = (&warmup, on_gpu) {
        for (t, w) in stages.iter_mut().zip(warmup) {
            t.autotune_s = Some((w.compute_s - t.compute_s).max(0.0));
        }
    }
    let projections = TARGETS.iter().map(|target| project(&stages, sizes, target)).collect();
    let mut report = BenchReport {
        model: options.model.label(),
        device: ctx.device.kind.name().to_string(),
        precision: options.precision,
        attention: options.attention,
        images: options.images,
        texts: sizes.texts as usize,
        boxes_per_image: options.boxes_per_image,
        k: options.k,
        setup_s,
        stages,
        vision_ms_per_image: Vec::new(),
        itm_pairs_per_s: Vec::new(),
        itm_large_chunk: None,
        itm_short_runs: None,
        z_cache: None,
        matmul_floor: None,
        projections,
    };
    for line in table(&report, on_gpu, options.warmup) {
        ctx.reporter.info(&line);
    }
    // Written now and after each probe: on a GPU the probes compile and autotune new shapes, and a
    // run stopped by a time limit there keeps the numbers taken so far.
    write_json(&report, options.json.as_deref())?;
    run_probes(&mut report, options, &model_dir, &burn_device, &scratch.0, &ctx.reporter)?;
    Ok(report)
}

/// The measurements outside the stages (README, "Benchmark"), each added to `report` and written
/// to `--json` as soon as it is taken: the Z-cache question, the vision tower alone with each
/// attention kernel, ITM alone with each cross-attention layout, the matmul floor of both, and ITM
/// on larger chunks and on runs of one pair.
fn run_probes(
    report: &mut BenchReport,
    options: &BenchOptions,
    model_dir: &Path,
    burn_device: &Device,
    scratch: &Path,
    reporter: &Reporter,
) -> Result<()> {
    // The Z-cache question with the run's kernel (its shapes are compiled already), then the
    // vision tower alone with each kernel.
    let batch = options.image_batch.min(options.images);
    runtime::forget_loaded_model();
    let model = crate::model::Blip2Model::load_with_dtype(model_dir, burn_device, options.precision.dtype())?;
    let mut model = model.with_attention(options.attention);
    let z = z_cache::measure(&model, batch, burn_device, scratch)?;
    reporter.info(&format!(
        "Z cache ({} images, {:.2} MiB per image in f16): recompute {:.2} ms/image, store + load {:.2} ms/image ({})",
        z.images,
        z.mib_per_image,
        z.recompute_ms,
        z.store_and_load_ms,
        if z.store_and_load_ms < z.recompute_ms { "caching would win" } else { "recomputing wins" }
    ));
    report.z_cache = Some(z);
    write_json(report, options.json.as_deref())?;
    let precision = format!("{:?}", options.precision).to_lowercase();
    for kernel in AttentionKernel::ALL {
        model = model.with_attention(kernel);
        let ms = probe(reporter, &format!("the vision tower with {kernel:?} attention"), || {
            probes::vision_ms_per_image(&model, batch, burn_device)
        });
        report.vision_ms_per_image.push((kernel, ms));
        write_json(report, options.json.as_deref())?;
    }
    reporter.info(&format!(
        "vision tower alone ({precision}, batch of {batch}): {}",
        per_kernel(&report.vision_ms_per_image, "ms/image", 2)
    ));
    // The cross-attention's layouts: explicit runs the vision tokens as they are, aligned (and
    // fused) padded. Texts of 24 tokens: the commonest ITM length of Flickr30K captions.
    for kernel in [AttentionKernel::Explicit, AttentionKernel::Aligned] {
        model = model.with_attention(kernel);
        let rate = probe(reporter, &format!("ITM with {kernel:?} attention"), || {
            probes::itm_pairs_per_s(&model, batch, options.pair_batch, PAIRS_PER_IMAGE, ITM_PROBE_LEN, burn_device)
        });
        report.itm_pairs_per_s.push((kernel, rate));
        write_json(report, options.json.as_deref())?;
    }
    reporter.info(&format!(
        "ITM alone ({precision}, {} pairs of {ITM_PROBE_LEN}-token texts over {batch} images): {}",
        options.pair_batch,
        per_kernel(&report.itm_pairs_per_s, "pairs/s", 0)
    ));
    let floor = matmul_floor(model.config(), options, batch, burn_device, reporter);
    reporter.info(&format!(
        "matmuls alone ({precision}, the shapes above, attention over {} tokens): vision tower {} ms/image ({} TFLOP/s), ITM {} pairs/s ({} TFLOP/s)",
        floor.vision_attention_len,
        optional(floor.vision_ms_per_image, 2),
        optional(floor.vision_tflops, 2),
        optional(floor.itm_pairs_per_s, 0),
        optional(floor.itm_tflops, 2),
    ));
    report.matmul_floor = Some(floor);
    write_json(report, options.json.as_deref())?;
    let large = 4 * options.pair_batch;
    model = model.with_attention(options.attention);
    let rate = probe(reporter, &format!("ITM on chunks of {large} pairs"), || {
        probes::itm_pairs_per_s(&model, batch, large, PAIRS_PER_IMAGE, ITM_PROBE_LEN, burn_device)
    });
    report.itm_large_chunk = Some((large, rate));
    write_json(report, options.json.as_deref())?;
    let kernel = format!("{:?}", options.attention).to_lowercase();
    reporter.info(&format!(
        "ITM alone ({precision}, {kernel} attention) on chunks of {large} pairs: {} pairs/s",
        optional(rate, 0)
    ));
    let rate = probe(reporter, "ITM on runs of one pair", || {
        probes::itm_pairs_per_s(&model, batch, options.pair_batch, 1, ITM_PROBE_LEN, burn_device)
    });
    report.itm_short_runs = Some(rate);
    write_json(report, options.json.as_deref())?;
    reporter.info(&format!(
        "ITM alone ({precision}, {kernel} attention) with each pair on another image (runs of 1, not {PAIRS_PER_IMAGE}): {} pairs/s",
        optional(rate, 0)
    ));
    Ok(())
}

/// The matmul floor of the vision tower (a batch of `batch` images, the run's attention length)
/// and of ITM (the ITM probe's chunk, with the run's cross-attention length).
fn matmul_floor(
    config: &Blip2Config,
    options: &BenchOptions,
    batch: usize,
    device: &Device,
    reporter: &Reporter,
) -> MatmulFloor {
    let dtype = options.precision.dtype();
    let tokens = config.vision_config.num_tokens();
    let attention_len = options.attention.cross_attention_len(tokens);
    let vision = flops::vision_matmuls(config, attention_len);
    let itm = flops::itm_matmuls(config, ITM_PROBE_LEN, attention_len, PAIRS_PER_IMAGE);
    let vision_s =
        probe(reporter, "the vision tower's matmuls", || probes::matmul_seconds(&vision, batch, dtype, device));
    let pairs = options.pair_batch;
    let itm_s = probe(reporter, "ITM's matmuls", || probes::matmul_seconds(&itm, pairs, dtype, device));
    let tflops = |flops: f64, s: f64| flops / s / 1e12;
    MatmulFloor {
        vision_attention_len: attention_len,
        vision_ms_per_image: vision_s.map(|s| s * 1e3 / batch as f64),
        vision_tflops: vision_s.map(|s| tflops(flops::total(&vision) * batch as f64, s)),
        itm_pairs_per_s: itm_s.map(|s| pairs as f64 / s),
        itm_tflops: itm_s.map(|s| tflops(flops::total(&itm) * pairs as f64, s)),
    }
}

/// The text length the ITM probe runs.
const ITM_PROBE_LEN: usize = 24;

/// Runs one probe; a kernel that fails on the device (an error or a panic, whose message is
/// printed above) is reported and gives `None`, not fatal: the stages ran already.
fn probe(reporter: &Reporter, what: &str, measure: impl FnOnce() -> Result<f64>) -> Option<f64> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(measure)) {
        Ok(Ok(value)) => Some(value),
        Ok(Err(e)) => {
            reporter.info(&format!("bench: {what} failed: {e}"));
            None
        }
        Err(_) => {
            reporter.info(&format!("bench: {what} panicked (message above)"));
            None
        }
    }
}

/// `explicit 1.23 unit, aligned failed, ...`.
fn per_kernel(values: &[(AttentionKernel, Option<f64>)], unit: &str, digits: usize) -> String {
    let one = |(kernel, value): &(AttentionKernel, Option<f64>)| match value {
        Some(v) => format!("{} {v:.digits$} {unit}", format!("{kernel:?}").to_lowercase()),
        None => format!("{} failed", format!("{kernel:?}").to_lowercase()),
    };
    values.iter().map(one).collect::<Vec<_>>().join(", ")
}

/// Writes the report as JSON to `path`, when given.
fn write_json(report: &BenchReport, path: Option<&std::path::Path>) -> Result<()> {
    let Some(path) = path else { return Ok(()) };
    let text = serde_json::to_string_pretty(report).unwrap_or_default();
    std::fs::write(path, text).map_err(|e| Error::input(path, format!("cannot write the report: {e}")))
}

fn optional(value: Option<f64>, digits: usize) -> String {
    value.map_or_else(|| "n/a".into(), |v| format!("{v:.digits$}"))
}

/// The report as text lines: the per-stage table, then the projections.
fn table(report: &BenchReport, on_gpu: bool, warmup: bool) -> Vec<String> {
    let mut lines = vec![format!(
        "{:<8} {:>9} {:<6} {:>9} {:>7} {:>11} {:>9} {:>8} {:>11} {:>8} {:>8} {:>9} {:>9} {:>8}",
        "stage",
        "items",
        "unit",
        "wall s",
        "load s",
        "items/s",
        "GFLOP",
        "TFLOP/s",
        "preproc s",
        "eigen s",
        "waited s",
        "autotune s",
        "host GiB",
        "GPU GiB"
    )];
    for t in &report.stages {
        let autotune = match (on_gpu, warmup, t.autotune_s) {
            (false, _, _) => "n/a (cpu)".to_string(),
            (true, false, _) => "no warmup".to_string(),
            (true, true, v) => optional(v, 2),
        };
        lines.push(format!(
            "{:<8} {:>9} {:<6} {:>9.3} {:>7.2} {:>11.2} {:>9.1} {:>8.4} {:>11.3} {:>8.3} {:>8.3} {:>9} {:>9} {:>8}",
            t.stage,
            t.items,
            t.unit,
            t.wall_s,
            t.load_s,
            t.per_s,
            t.flops / 1e9,
            t.tflops,
            t.preprocess_s,
            t.eigen_s,
            t.eigen_wait_s,
            autotune,
            optional(t.host_peak_gib, 2),
            optional(t.gpu_peak_gib, 2),
        ));
    }
    let total: f64 = report.stages.iter().map(|t| t.wall_s).sum();
    let part = |name: &str| report.stages.iter().find(|t| t.stage == name).map_or(0.0, |t| t.scaled_s);
    lines.push(format!(
        "total wall {total:.3} s; of which ITC scoring in sim {:.3} s, ITM batches in rerank {:.3} s",
        part("sim"),
        part("rerank")
    ));
    for p in &report.projections {
        let parts: Vec<String> = p.stages_s.iter().map(|(s, v)| format!("{s} {v:.1}")).collect();
        lines.push(format!(
            "projected {}: {:.0} images x {:.0} texts, k = {:.0}, <= {:.0} ITM pairs: {:.1} s ({:.2} h) [{}]",
            p.name,
            p.images,
            p.texts,
            p.k,
            p.pairs,
            p.total_s,
            p.total_s / 3600.0,
            parts.join(", ")
        ));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing(stage: &str, items: f64, load_s: f64, compute_s: f64, scaled_s: f64) -> StageTiming {
        StageTiming {
            stage: stage.into(),
            unit: "x".into(),
            items,
            wall_s: load_s + compute_s,
            load_s,
            compute_s,
            per_s: items / compute_s,
            flops: 0.0,
            tflops: 0.0,
            preprocess_s: 0.0,
            eigen_s: 0.0,
            eigen_wait_s: 0.0,
            scaled_s,
            autotune_s: None,
            host_peak_gib: None,
            gpu_peak_gib: None,
        }
    }

    #[test]
    fn projections_scale_per_item_costs_and_keep_fixed_ones() {
        let sizes = Sizes { images: 10.0, texts: 50.0, boxes_per_image: 4.0 };
        let stages = vec![
            timing("index", 10.0, 0.0, 1.0, 0.0),
            timing("extract", 10.0, 2.0, 5.0, 0.0),
            timing("text", 50.0, 2.0, 1.0, 0.0),
            timing("sim", 500.0, 0.0, 0.5, 0.25),
            timing("rerank", 400.0, 2.0, 12.0, 8.0),
        ];
        let p = project(&stages, sizes, &TARGETS[0]);
        assert_eq!(p.pairs, 384_000.0);
        let by_stage: std::collections::HashMap<_, _> = p.stages_s.iter().cloned().collect();
        let close = |stage: &str, expected: f64| {
            assert!((by_stage[stage] - expected).abs() < 1e-6 * expected, "{stage}: {} vs {expected}", by_stage[stage])
        };
        close("index", 100.0);
        close("extract", 2.0 + 500.0);
        close("text", 2.0 + 100.0);
        // 0.25 s fixed + 0.25 s / 500 pairs x 5M pairs.
        close("sim", 0.25 + 2500.0);
        // 4 s outside ITM for 10 images -> 400 s; 8 s for 400 pairs -> 7680 s; + load.
        close("rerank", 2.0 + 400.0 + 7680.0);
        assert!((p.total_s - by_stage.values().sum::<f64>()).abs() < 1e-6);
    }

    #[test]
    fn presets_are_valid_and_files_are_read() {
        for choice in [ModelChoice::Tiny, ModelChoice::Medium, ModelChoice::Coco] {
            choice.config().unwrap().validate().unwrap();
        }
        assert_eq!(ModelChoice::parse("coco").config().unwrap(), Blip2Config::itm_vit_g_coco());
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_blip2_a/config.json");
        let from_file = ModelChoice::parse(fixture.to_str().unwrap()).config().unwrap();
        let tiny = tiny_config();
        assert_eq!((from_file.vision_config, from_file.qformer_config), (tiny.vision_config, tiny.qformer_config));
        assert!(ModelChoice::parse("no/such.json").config().is_err());
    }
}
