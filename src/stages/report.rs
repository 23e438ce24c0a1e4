//! The `report` stage (method.md sections 6 and 7): the `sim` ranks (ITC) and, when re-ranking ran,
//! the `rerank` scores -> every query's rank in both directions -> R@1/5/10, median and mean rank,
//! MRR, the ten object-size bins and the "small" bin -> `report/metrics.json` (LAVIS key names),
//! `report/clip_benchmark.json`, `report/report.md` (beside the published numbers),
//! `report/per_query.parquet` and `report/recall_by_size.svg`.
//!
//! Re-rank ranks follow the released evaluation (section 6.2): each direction has its own score
//! matrix, where the pairs its own top-k selected score `itm + itc` and every other pair scores
//! [`UNSELECTED`]; ranks are against the full gallery, ties broken by index. Rows are built one query
//! at a time (never the whole matrix), in parallel over queries.

mod markdown;
mod svg;

use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Array, StringArray, UInt32Array};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use rayon::prelude::*;
use serde::Serialize;

use super::{Context, Outcome, Stage, index, rerank, sim};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::metrics::{NUM_BINS, RankSummary, best_rank, bin_bounds, bin_of};
use crate::qpert::{AlphaWeight, Components, ProjectorKind};
use crate::store::columns::Table;
use crate::store::commit::write_bytes_atomically;
use crate::store::{FileEntry, Fingerprint, Manifest, Notes, StageDir, StageState};

/// The score of a pair its direction's top-k did not select, as in the released evaluation.
pub const UNSELECTED: f32 = -100.0;

/// The report's files, in the order the manifest lists them.
pub const FILES: [&str; 5] =
    ["metrics.json", "clip_benchmark.json", "report.md", "per_query.parquet", "recall_by_size.svg"];

/// What the report depends on: `index` and `sim` (and `rerank` when enabled), plus the settings it
/// prints (dataset name, model folder name, Q-Pert settings, k).
pub fn fingerprint(config: &Config) -> Result<Fingerprint> {
    let q = &config.qpert;
    let mut fp = Fingerprint::new(Stage::Report.name())
        .with_input("index", &index::fingerprint(config)?)
        .with_input("sim", &sim::fingerprint(config)?)
        .with("dataset.name", &config.dataset.name)
        .with("model.dir", config.model.dir.display())
        .with("qpert.enabled", q.enabled)
        .with("rerank.enabled", config.rerank.enabled)
        .with("rerank.k", config.rerank.k);
    // Plain BLIP-2 does not depend on the Q-Pert settings (so any Q-Pert run finds its baseline).
    if q.enabled {
        fp = fp
            .with("qpert.alpha", q.alpha)
            .with("qpert.npc", q.npc)
            .with("qpert.weight", json_name(&q.weight))
            .with("qpert.projector", json_name(&q.projector));
    }
    if config.rerank.enabled {
        fp = fp.with_input("rerank", &rerank::fingerprint(config)?);
    }
    if let Some(plain) = plain_report(config)? {
        fp = fp.with("baseline", plain.manifest.fingerprint);
    }
    Ok(fp)
}

/// A finished plain BLIP-2 report (`qpert.enabled = false`, same settings otherwise) in the same
/// cache, which a Q-Pert report shows side by side with deltas.
struct PlainReport {
    manifest: Manifest,
    metrics: serde_json::Value,
}

fn plain_report(config: &Config) -> Result<Option<PlainReport>> {
    if !config.qpert.enabled {
        return Ok(None);
    }
    let mut plain = config.clone();
    plain.qpert.enabled = false;
    let Ok(fingerprint) = fingerprint(&plain) else { return Ok(None) };
    let dir = Stage::Report.dir(&plain, fingerprint);
    let StageState::Done(manifest) = dir.state()? else { return Ok(None) };
    let path = dir.path().join("metrics.json");
    let bytes = std::fs::read(&path).map_err(|e| Error::artifact(&path, e))?;
    let metrics = serde_json::from_slice(&bytes).map_err(|e| Error::artifact(&path, format!("not valid JSON: {e}")))?;
    Ok(Some(PlainReport { manifest, metrics }))
}

/// A unit enum's config spelling (`constant`, `official`).
fn json_name(value: &impl Serialize) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        other => format!("{other:?}"),
    }
}

/// Runs the report; skips it when up to date (unless `--force`).
pub fn run(ctx: &Context) -> Result<Outcome> {
    let config = &ctx.config;
    let stage = ctx.stage_dir(Stage::Report, fingerprint(config)?);
    if let (false, StageState::Done(_)) = (ctx.force, stage.state()?) {
        return Ok(Outcome::UpToDate);
    }
    let inputs = Inputs::read(ctx)?;
    let report = Report::new(config, &inputs);
    let plain = plain_report(config)?;
    let files = write_outputs(&stage, config, &inputs, &report, plain.as_ref().map(|p| &p.metrics))?;
    stage.finish(files, serde_json::to_value(report.summary()).unwrap_or_default(), Notes::default())?;
    for line in report.lines() {
        ctx.reporter.info(&line);
    }
    ctx.reporter.info(&format!("report: wrote {}", stage.path().join("report.md").display()));
    Ok(Outcome::Ran)
}

/// 0-based ranks of every query: image-to-text per image (`None` for an image without captions,
/// which is no query), text-to-image per text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ranks {
    /// Per image: the best rank among its captions.
    pub i2t: Vec<Option<usize>>,
    /// Per text: the rank of its image.
    pub t2i: Vec<usize>,
}

/// One pair scored by the `rerank` stage.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoredPair {
    /// The image.
    pub image: u32,
    /// The text.
    pub text: u32,
    /// `itm + itc`.
    pub score: f32,
    /// Selected by the image's top-k texts.
    pub in_i2t: bool,
    /// Selected by the text's top-k images.
    pub in_t2i: bool,
}

/// The ground truth: each text's image, and each image's texts.
#[derive(Debug, Clone)]
pub struct GroundTruth {
    /// Per text, its image.
    pub text_image: Vec<u32>,
    /// Per image, its texts in index order.
    pub image_texts: Vec<Vec<usize>>,
}

impl GroundTruth {
    /// From each text's image; `num_images` images in all. Fails on an image index out of range.
    pub fn new(num_images: usize, text_image: Vec<u32>) -> std::result::Result<Self, String> {
        let mut image_texts = vec![Vec::new(); num_images];
        for (t, &i) in text_image.iter().enumerate() {
            image_texts
                .get_mut(i as usize)
                .ok_or_else(|| format!("text {t} belongs to image {i}, but there are {num_images} images"))?
                .push(t);
        }
        Ok(GroundTruth { text_image, image_texts })
    }

    fn num_images(&self) -> usize {
        self.image_texts.len()
    }

    fn num_texts(&self) -> usize {
        self.text_image.len()
    }
}

/// Re-rank ranks under the released semantics: for image i, text t scores the pair's score if the
/// image's top-k selected it (`in_i2t`), else [`UNSELECTED`]; for text t, image i scores the pair's
/// score if the text's top-k selected it (`in_t2i`), else [`UNSELECTED`]. Ranks against the full
/// gallery, ties by index. Fails on a pair out of range or a pair listed twice.
pub fn rerank_ranks(pairs: &[ScoredPair], truth: &GroundTruth) -> std::result::Result<Ranks, String> {
    let (n_images, n_texts) = (truth.num_images(), truth.num_texts());
    if let Some(p) = pairs.iter().find(|p| p.image as usize >= n_images || p.text as usize >= n_texts) {
        return Err(format!(
            "pair (image {}, text {}) is out of range ({n_images} images, {n_texts} texts)",
            p.image, p.text
        ));
    }
    if let Some(p) = pairs.iter().find(|p| !p.score.is_finite()) {
        return Err(format!("pair (image {}, text {}) has score {}", p.image, p.text, p.score));
    }
    // Each direction's selected pairs, grouped by query: (query, candidate, score), sorted.
    let group = |direction: &str,
                 select: fn(&ScoredPair) -> Option<(u32, u32)>|
     -> std::result::Result<Vec<(u32, u32, f32)>, String> {
        let mut rows: Vec<(u32, u32, f32)> =
            pairs.iter().filter_map(|p| select(p).map(|(q, c)| (q, c, p.score))).collect();
        rows.sort_unstable_by_key(|&(q, c, _)| (q, c));
        match rows.windows(2).find(|w| (w[0].0, w[0].1) == (w[1].0, w[1].1)) {
            Some(w) => Err(format!("{direction} pair (query {}, candidate {}) is listed twice", w[0].0, w[0].1)),
            None => Ok(rows),
        }
    };
    let i2t = group("image-to-text", |p| p.in_i2t.then_some((p.image, p.text)))?;
    let t2i = group("text-to-image", |p| p.in_t2i.then_some((p.text, p.image)))?;
    let i2t_ranks = query_ranks(&i2t, n_images, n_texts, |i| truth.image_texts[i].clone());
    // Every text has exactly one target (its image), so every text-to-image rank exists.
    let t2i_ranks = query_ranks(&t2i, n_texts, n_images, |t| vec![truth.text_image[t] as usize]);
    Ok(Ranks { i2t: i2t_ranks, t2i: t2i_ranks.into_iter().flatten().collect() })
}

/// For each of `n_queries` queries, builds its row of `gallery` scores from its selected
/// `(query, candidate, score)` rows (sorted by query), [`UNSELECTED`] elsewhere, and ranks the best
/// of its `targets`; `None` for a query without targets.
fn query_ranks(
    rows: &[(u32, u32, f32)],
    n_queries: usize,
    gallery: usize,
    targets: impl Fn(usize) -> Vec<usize> + Sync,
) -> Vec<Option<usize>> {
    let mut starts = vec![0usize; n_queries + 1];
    for &(q, _, _) in rows {
        starts[q as usize + 1] += 1;
    }
    for q in 0..n_queries {
        starts[q + 1] += starts[q];
    }
    (0..n_queries)
        .into_par_iter()
        .map(|q| {
            let targets = targets(q);
            if targets.is_empty() {
                return None;
            }
            let mut scores = vec![UNSELECTED; gallery];
            for &(_, c, s) in &rows[starts[q]..starts[q + 1]] {
                scores[c as usize] = s;
            }
            Some(best_rank(&scores, &targets))
        })
        .collect()
}

/// Everything the report reads, checked.
struct Inputs {
    object_size: Vec<f64>,
    truth: GroundTruth,
    itc: Ranks,
    rerank: Option<Ranks>,
    counts: Counts,
}

/// Query and pair counts, as `metrics.json` reports them.
#[derive(Debug, Clone, Default, Serialize)]
struct Counts {
    images: usize,
    texts: usize,
    /// Images with an object size (an Entities annotation); only these fall in a bin.
    images_with_size: usize,
    images_without_annotation: usize,
    /// Images of size 1 or more (a kept box covering the whole image, or reaching outside it with
    /// its unclamped area): past the last bin [0.9, 1.0), so in no bin.
    images_beyond_last_bin: usize,
    /// Images without captions: no image-to-text query.
    images_without_captions: usize,
    small_images: usize,
    small_texts: usize,
    /// Pairs the re-rank scored (the union of both directions), and per direction.
    rerank_pairs: Option<usize>,
    rerank_i2t_pairs: Option<usize>,
    rerank_t2i_pairs: Option<usize>,
}

impl Inputs {
    fn read(ctx: &Context) -> Result<Inputs> {
        let config = &ctx.config;
        let index_dir = ctx.stage_dir(Stage::Index, index::fingerprint(config)?);
        let images = index_dir.read_table("images")?;
        let images_path = index_dir.path().join("images.parquet");
        let texts_path = index_dir.path().join("texts.parquet");
        let image_idx = Table::new(&images, &images_path).u32s("image_idx")?.to_vec();
        if image_idx.iter().enumerate().any(|(i, &v)| v as usize != i) {
            return Err(Error::artifact(&images_path, "image_idx is not 0, 1, 2, ... in row order"));
        }
        let object_size = Table::new(&images, &images_path).f64s("object_size")?.to_vec();
        let texts = index_dir.read_table("texts")?;
        let text_idx = Table::new(&texts, &texts_path).u32s("text_idx")?.to_vec();
        if text_idx.iter().enumerate().any(|(t, &v)| v as usize != t) {
            return Err(Error::artifact(&texts_path, "text_idx is not 0, 1, 2, ... in row order"));
        }
        let truth = GroundTruth::new(object_size.len(), Table::new(&texts, &texts_path).u32s("image_idx")?.to_vec())
            .map_err(|e| Error::artifact(&texts_path, e))?;

        let sim_dir = ctx.stage_dir(Stage::Sim, sim::fingerprint(config)?);
        let sim_manifest = sim_dir.require_complete()?;
        let itc = itc_ranks(&sim_dir, &truth)?;
        let mut counts = Counts {
            images: truth.num_images(),
            texts: truth.num_texts(),
            images_with_size: object_size.iter().filter(|&&s| s >= 0.0).count(),
            images_without_annotation: object_size.iter().filter(|&&s| s < 0.0).count(),
            images_beyond_last_bin: object_size.iter().filter(|&&s| s >= bin_bounds(NUM_BINS - 1).1).count(),
            images_without_captions: truth.image_texts.iter().filter(|t| t.is_empty()).count(),
            ..Counts::default()
        };
        let small: Vec<bool> = object_size.iter().map(|&s| bin_of(s) == Some(0)).collect();
        counts.small_images = small.iter().filter(|&&s| s).count();
        counts.small_texts = truth.text_image.iter().filter(|&&i| small[i as usize]).count();
        let rerank = if config.rerank.enabled {
            let dir = ctx.stage_dir(Stage::Rerank, rerank::fingerprint(config)?);
            let pairs = read_pairs(&dir)?;
            check_pair_counts(&dir, &sim_manifest, &pairs)?;
            counts.rerank_pairs = Some(pairs.len());
            counts.rerank_i2t_pairs = Some(pairs.iter().filter(|p| p.in_i2t).count());
            counts.rerank_t2i_pairs = Some(pairs.iter().filter(|p| p.in_t2i).count());
            Some(rerank_ranks(&pairs, &truth).map_err(|e| Error::artifact(dir.path(), e))?)
        } else {
            None
        };
        Ok(Inputs { object_size, truth, itc, rerank, counts })
    }
}

/// The ITC ranks from `sim/i2t_ranks.parquet` and `sim/t2i_ranks.parquet`: one row per query, each
/// rank within the gallery. Rows for images without captions are ignored.
fn itc_ranks(sim_dir: &StageDir, truth: &GroundTruth) -> Result<Ranks> {
    let read = |name: &str, key: &str, n_queries: usize, gallery: usize| -> Result<Vec<Option<usize>>> {
        let path = sim_dir.path().join(format!("{name}.parquet"));
        let table = sim_dir.read_table(name)?;
        let t = Table::new(&table, &path);
        let (queries, ranks) = (t.u32s(key)?, t.u32s("itc_rank")?);
        let mut out = vec![None; n_queries];
        for (&q, &r) in queries.iter().zip(ranks) {
            let slot = out
                .get_mut(q as usize)
                .ok_or_else(|| Error::artifact(&path, format!("{key} {q} is out of range ({n_queries} queries)")))?;
            if slot.is_some() {
                return Err(Error::artifact(&path, format!("{key} {q} has two rows")));
            }
            if r as usize >= gallery {
                return Err(Error::artifact(
                    &path,
                    format!("{key} {q}: itc_rank {r} is not below the gallery size {gallery}"),
                ));
            }
            *slot = Some(r as usize);
        }
        Ok(out)
    };
    let missing = |name: &str, q: usize| {
        Error::artifact(sim_dir.path().join(format!("{name}.parquet")), format!("no row for query {q}"))
    };
    let i2t_all = read("i2t_ranks", "image_idx", truth.num_images(), truth.num_texts())?;
    let mut i2t = Vec::with_capacity(i2t_all.len());
    for (i, rank) in i2t_all.into_iter().enumerate() {
        match (truth.image_texts[i].is_empty(), rank) {
            (true, _) => i2t.push(None),
            (false, Some(r)) => i2t.push(Some(r)),
            (false, None) => return Err(missing("i2t_ranks", i)),
        }
    }
    let t2i = read("t2i_ranks", "text_idx", truth.num_texts(), truth.num_images())?
        .into_iter()
        .enumerate()
        .map(|(t, r)| r.ok_or_else(|| missing("t2i_ranks", t)))
        .collect::<Result<Vec<usize>>>()?;
    Ok(Ranks { i2t, t2i })
}

/// All parts of `rerank/`, as pairs.
fn read_pairs(dir: &StageDir) -> Result<Vec<ScoredPair>> {
    let table = dir.read_parts()?;
    let path = dir.path();
    let t = Table::new(&table, path);
    let (image, text) = (t.u32s("image_idx")?, t.u32s("text_idx")?);
    let (score, in_i2t, in_t2i) = (t.f32s("score")?, t.bools("in_i2t")?, t.bools("in_t2i")?);
    Ok((0..table.num_rows())
        .map(|r| ScoredPair { image: image[r], text: text[r], score: score[r], in_i2t: in_i2t[r], in_t2i: in_t2i[r] })
        .collect())
}

/// Each direction's selected pairs must be exactly as many as `sim`'s top-k rows of that direction.
fn check_pair_counts(dir: &StageDir, sim: &Manifest, pairs: &[ScoredPair]) -> Result<()> {
    for (file, selected, flag) in [
        ("i2t_topk.parquet", pairs.iter().filter(|p| p.in_i2t).count(), "in_i2t"),
        ("t2i_topk.parquet", pairs.iter().filter(|p| p.in_t2i).count(), "in_t2i"),
    ] {
        if let Some(entry) = sim.files.iter().find(|f| f.name == file)
            && entry.rows != selected as u64
        {
            return Err(Error::artifact(
                dir.path(),
                format!(
                    "{selected} pairs have {flag}, but sim/{file} has {} rows; rerun `qpert stage rerank`",
                    entry.rows
                ),
            ));
        }
    }
    Ok(())
}

/// Recalls and rank statistics of one set of queries in both directions; `None` where a direction
/// has no queries. Recalls and their means in percent, `*_mdr` / `*_mer` 1-based, `*_mrr` in [0, 1].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub n_images: usize,
    pub n_texts: usize,
    pub txt_r1: Option<f64>,
    pub txt_r5: Option<f64>,
    pub txt_r10: Option<f64>,
    pub img_r1: Option<f64>,
    pub img_r5: Option<f64>,
    pub img_r10: Option<f64>,
    pub txt_r_mean: Option<f64>,
    pub img_r_mean: Option<f64>,
    pub r_mean: Option<f64>,
    pub txt_mdr: Option<f64>,
    pub txt_mer: Option<f64>,
    pub txt_mrr: Option<f64>,
    pub img_mdr: Option<f64>,
    pub img_mer: Option<f64>,
    pub img_mrr: Option<f64>,
}

impl Summary {
    /// Summarises image-to-text ranks `i2t` and text-to-image ranks `t2i`.
    pub fn of(i2t: &[usize], t2i: &[usize]) -> Summary {
        let (txt, img) = (RankSummary::of(i2t), RankSummary::of(t2i));
        let mean3 = |s: &Option<RankSummary>| s.map(|s| (s.r1 + s.r5 + s.r10) / 3.0);
        let (txt_r_mean, img_r_mean) = (mean3(&txt), mean3(&img));
        Summary {
            n_images: i2t.len(),
            n_texts: t2i.len(),
            txt_r1: txt.map(|s| s.r1),
            txt_r5: txt.map(|s| s.r5),
            txt_r10: txt.map(|s| s.r10),
            img_r1: img.map(|s| s.r1),
            img_r5: img.map(|s| s.r5),
            img_r10: img.map(|s| s.r10),
            txt_r_mean,
            img_r_mean,
            r_mean: txt_r_mean.zip(img_r_mean).map(|(a, b)| (a + b) / 2.0),
            txt_mdr: txt.map(|s| s.median_rank),
            txt_mer: txt.map(|s| s.mean_rank),
            txt_mrr: txt.map(|s| s.mrr),
            img_mdr: img.map(|s| s.median_rank),
            img_mer: img.map(|s| s.mean_rank),
            img_mrr: img.map(|s| s.mrr),
        }
    }
}

/// One object-size bin's recalls: images whose size is in [lo, hi), and their captions.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BinRecalls {
    pub lo: f64,
    pub hi: f64,
    pub n_images: usize,
    pub n_texts: usize,
    pub txt_r1: Option<f64>,
    pub txt_r5: Option<f64>,
    pub txt_r10: Option<f64>,
    pub img_r1: Option<f64>,
    pub img_r5: Option<f64>,
    pub img_r10: Option<f64>,
}

/// The "small" bin, [0, 0.1), with every statistic.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SmallBin {
    pub lo: f64,
    pub hi: f64,
    #[serde(flatten)]
    pub summary: Summary,
}

/// One scoring's metrics (ITC, or ITM re-ranking): overall, the small bin and all ten bins.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Block {
    #[serde(flatten)]
    pub overall: Summary,
    pub small: SmallBin,
    pub bins: Vec<BinRecalls>,
}

/// A bin's bounds for display: `bin_bounds` rounded to one decimal (membership uses the exact ones).
fn display_bounds(k: usize) -> (f64, f64) {
    let (lo, hi) = bin_bounds(k);
    ((lo * 10.0).round() / 10.0, (hi * 10.0).round() / 10.0)
}

impl Block {
    /// The metrics of `ranks`; bins by each image's `object_size` (a text by its image's).
    pub fn of(ranks: &Ranks, truth: &GroundTruth, object_size: &[f64]) -> Block {
        let image_bin: Vec<Option<usize>> = object_size.iter().map(|&s| bin_of(s)).collect();
        let select = |bin: Option<usize>| -> (Vec<usize>, Vec<usize>) {
            let keep = |i: usize| bin.is_none() || image_bin[i] == bin;
            let i2t = ranks.i2t.iter().enumerate().filter(|&(i, _)| keep(i)).filter_map(|(_, r)| *r).collect();
            let t2i =
                ranks.t2i.iter().zip(&truth.text_image).filter(|&(_, &i)| keep(i as usize)).map(|(r, _)| *r).collect();
            (i2t, t2i)
        };
        let summary = |bin: Option<usize>| {
            let (i2t, t2i) = select(bin);
            Summary::of(&i2t, &t2i)
        };
        let bins = (0..NUM_BINS)
            .map(|k| {
                let s = summary(Some(k));
                let (lo, hi) = display_bounds(k);
                BinRecalls {
                    lo,
                    hi,
                    n_images: s.n_images,
                    n_texts: s.n_texts,
                    txt_r1: s.txt_r1,
                    txt_r5: s.txt_r5,
                    txt_r10: s.txt_r10,
                    img_r1: s.img_r1,
                    img_r5: s.img_r5,
                    img_r10: s.img_r10,
                }
            })
            .collect();
        let (lo, hi) = display_bounds(0);
        Block { overall: summary(None), small: SmallBin { lo, hi, summary: summary(Some(0)) }, bins }
    }
}

/// The Q-Pert settings the run used, as `metrics.json` records them (only `enabled` when off: a plain
/// run does not depend on the others).
#[derive(Debug, Clone, Serialize)]
struct QpertRecord {
    enabled: bool,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    settings: Option<QpertValues>,
}

/// The settings of an enabled Q-Pert.
#[derive(Debug, Clone, Serialize)]
struct QpertValues {
    alpha: f64,
    npc: Components,
    weight: AlphaWeight,
    projector: ProjectorKind,
}

/// `metrics.json`.
#[derive(Debug, Clone, Serialize)]
struct MetricsFile {
    dataset: String,
    units: &'static str,
    k: u32,
    qpert: QpertRecord,
    counts: Counts,
    itc: Block,
    rerank: Option<Block>,
}

/// The computed report, before it is written.
struct Report {
    metrics: MetricsFile,
}

impl Report {
    fn new(config: &Config, inputs: &Inputs) -> Report {
        let q = &config.qpert;
        let block = |ranks: &Ranks| Block::of(ranks, &inputs.truth, &inputs.object_size);
        Report {
            metrics: MetricsFile {
                dataset: config.dataset.name.clone(),
                units: "percent",
                k: config.rerank.k,
                qpert: QpertRecord {
                    enabled: q.enabled,
                    settings: q.enabled.then_some(QpertValues {
                        alpha: q.alpha,
                        npc: q.npc,
                        weight: q.weight,
                        projector: q.projector,
                    }),
                },
                counts: inputs.counts.clone(),
                itc: block(&inputs.itc),
                rerank: inputs.rerank.as_ref().map(block),
            },
        }
    }

    /// The block the headline numbers come from: re-ranking when it ran, else ITC.
    fn headline(&self) -> (&'static str, &Block) {
        match &self.metrics.rerank {
            Some(b) => ("itm_rerank", b),
            None => ("itc", &self.metrics.itc),
        }
    }

    /// The manifest summary: the overall LAVIS keys of each block.
    fn summary(&self) -> serde_json::Value {
        let overall = |b: &Block| serde_json::to_value(&b.overall).unwrap_or_default();
        serde_json::json!({
            "dataset": self.metrics.dataset,
            "itc": overall(&self.metrics.itc),
            "rerank": self.metrics.rerank.as_ref().map(overall),
        })
    }

    /// The lines printed when the report is written.
    fn lines(&self) -> Vec<String> {
        let line = |label: &str, s: &Summary| {
            format!(
                "report: {label:<8} image->text R@1/5/10 {} / {} / {}   text->image R@1/5/10 {} / {} / {}",
                pct(s.txt_r1),
                pct(s.txt_r5),
                pct(s.txt_r10),
                pct(s.img_r1),
                pct(s.img_r5),
                pct(s.img_r10)
            )
        };
        let mut lines = vec![line("ITC", &self.metrics.itc.overall)];
        if let Some(b) = &self.metrics.rerank {
            lines.push(line("re-rank", &b.overall));
        }
        let (_, head) = self.headline();
        let small = &head.small.summary;
        lines.push(format!(
            "report: small objects [0, 0.1): {}, {}; image->text R@1 {}, text->image R@1 {}",
            super::counted(small.n_images, "image"),
            super::counted(small.n_texts, "caption"),
            pct(small.txt_r1),
            pct(small.img_r1)
        ));
        lines
    }
}

/// A percentage with two decimals, or `-` for none.
fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.2}"))
}

/// `clip_benchmark.json`: a CLIP_benchmark result record (`task` `zeroshot_retrieval`, recalls as
/// fractions; `image_retrieval` = text-to-image), from the re-rank block when present, else ITC.
#[derive(Debug, Clone, Serialize)]
struct ClipBenchmark {
    dataset: String,
    /// The model folder's name, e.g. `blip2-itm-vit-g-coco`.
    model: String,
    /// The model folder as configured.
    pretrained: String,
    task: &'static str,
    /// `itm_rerank` or `itc` (not a CLIP_benchmark key).
    scoring: &'static str,
    metrics: ClipMetrics,
}

/// CLIP_benchmark's retrieval metric names, fractions in [0, 1].
#[derive(Debug, Clone, Serialize)]
struct ClipMetrics {
    #[serde(rename = "image_retrieval_recall@1")]
    image_r1: Option<f64>,
    #[serde(rename = "image_retrieval_recall@5")]
    image_r5: Option<f64>,
    #[serde(rename = "image_retrieval_recall@10")]
    image_r10: Option<f64>,
    #[serde(rename = "text_retrieval_recall@1")]
    text_r1: Option<f64>,
    #[serde(rename = "text_retrieval_recall@5")]
    text_r5: Option<f64>,
    #[serde(rename = "text_retrieval_recall@10")]
    text_r10: Option<f64>,
}

fn clip_benchmark(config: &Config, report: &Report) -> ClipBenchmark {
    let (scoring, block) = report.headline();
    let s = &block.overall;
    // Percent to fraction, rounded to 10 decimals so 90.04 reads 0.9004, not 0.9004000000000001.
    let frac = |v: Option<f64>| v.map(|v| (v * 1e8).round() / 1e10);
    let model = config.model.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    ClipBenchmark {
        dataset: config.dataset.name.clone(),
        model,
        pretrained: config.model.dir.display().to_string(),
        task: "zeroshot_retrieval",
        scoring,
        metrics: ClipMetrics {
            image_r1: frac(s.img_r1),
            image_r5: frac(s.img_r5),
            image_r10: frac(s.img_r10),
            text_r1: frac(s.txt_r1),
            text_r5: frac(s.txt_r5),
            text_r10: frac(s.txt_r10),
        },
    }
}

/// `per_query.parquet`: every image-to-text query (by image), then every text-to-image query.
fn per_query_batch(inputs: &Inputs) -> std::result::Result<RecordBatch, arrow::error::ArrowError> {
    let mut direction = Vec::new();
    let mut query = Vec::new();
    let mut size = Vec::new();
    let mut itc = Vec::new();
    let mut rerank: Vec<Option<u32>> = Vec::new();
    for (i, rank) in inputs.itc.i2t.iter().enumerate() {
        let Some(rank) = rank else { continue };
        direction.push("i2t");
        query.push(i as u32);
        size.push(inputs.object_size[i]);
        itc.push(*rank as u32);
        rerank.push(inputs.rerank.as_ref().and_then(|r| r.i2t[i]).map(|r| r as u32));
    }
    for (t, rank) in inputs.itc.t2i.iter().enumerate() {
        direction.push("t2i");
        query.push(t as u32);
        size.push(inputs.object_size[inputs.truth.text_image[t] as usize]);
        itc.push(*rank as u32);
        rerank.push(inputs.rerank.as_ref().map(|r| r.t2i[t] as u32));
    }
    let schema = Arc::new(Schema::new(vec![
        Field::new("direction", DataType::Utf8, false),
        Field::new("query_idx", DataType::UInt32, false),
        Field::new("object_size", DataType::Float64, false),
        Field::new("itc_rank", DataType::UInt32, false),
        Field::new("rerank_rank", DataType::UInt32, true),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(direction)),
        Arc::new(UInt32Array::from(query)),
        Arc::new(Float64Array::from(size)),
        Arc::new(UInt32Array::from(itc)),
        Arc::new(UInt32Array::from(rerank)),
    ];
    RecordBatch::try_new(schema, columns)
}

/// Writes the five files, each atomically; the caller writes the manifest last.
fn write_outputs(
    stage: &StageDir,
    config: &Config,
    inputs: &Inputs,
    report: &Report,
    plain: Option<&serde_json::Value>,
) -> Result<Vec<FileEntry>> {
    let per_query = per_query_batch(inputs).map_err(|e| Error::artifact(stage.path(), e))?;
    let per_query_entry = stage.write_table("per_query", &per_query.schema(), std::slice::from_ref(&per_query))?;
    let texts: [(&str, Vec<u8>); 4] = [
        ("metrics.json", pretty_json(stage, &report.metrics)?),
        ("clip_benchmark.json", pretty_json(stage, &clip_benchmark(config, report))?),
        ("report.md", markdown::render(config, &report.metrics, plain, "recall_by_size.svg").into_bytes()),
        ("recall_by_size.svg", svg::render(&report.metrics).into_bytes()),
    ];
    for (name, bytes) in &texts {
        write_bytes_atomically(&stage.path().join(name), bytes)?;
    }
    // Non-tabular files list 0 rows.
    Ok(FILES
        .iter()
        .map(|&name| {
            if name == per_query_entry.name {
                per_query_entry.clone()
            } else {
                FileEntry { name: name.to_string(), rows: 0 }
            }
        })
        .collect())
}

/// Pretty JSON with a trailing newline.
fn pretty_json(stage: &StageDir, value: &impl Serialize) -> Result<Vec<u8>> {
    let mut text = serde_json::to_string_pretty(value).map_err(|e| Error::artifact(stage.path(), e))?;
    text.push('\n');
    Ok(text.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 3 images x 6 texts: texts 0, 1 -> image 0; 2, 3 -> image 1; 4, 5 -> image 2.
    fn truth() -> GroundTruth {
        GroundTruth::new(3, vec![0, 0, 1, 1, 2, 2]).unwrap()
    }

    fn pair(image: u32, text: u32, score: f32, in_i2t: bool, in_t2i: bool) -> ScoredPair {
        ScoredPair { image, text, score, in_i2t, in_t2i }
    }

    /// k = 2 per query in each direction (see `tests/report.rs` for the same case end to end).
    pub(super) fn pairs() -> Vec<ScoredPair> {
        vec![
            pair(0, 0, 1.0, true, true),
            pair(0, 2, 2.0, true, true),
            pair(1, 3, 0.5, true, true),
            pair(1, 4, 0.5, true, false),
            pair(2, 1, 0.7, true, false),
            pair(2, 5, 0.7, true, false),
            pair(1, 0, 3.0, false, true),
            pair(1, 1, 0.2, false, true),
            pair(0, 1, 0.1, false, true),
            pair(1, 2, 1.5, false, true),
            pair(2, 3, 0.5, false, true),
            pair(2, 4, 0.9, false, true),
            pair(0, 4, 0.95, false, true),
            pair(0, 5, 0.3, false, true),
            pair(1, 5, 0.4, false, true),
        ]
    }

    #[test]
    fn rerank_ranks_by_hand() {
        let ranks = rerank_ranks(&pairs(), &truth()).unwrap();
        // Image 0: text 2 (2.0), text 0 (1.0) -> best truth rank 1.
        // Image 1: texts 3 and 4 tie at 0.5; 3 comes first by index -> 0.
        // Image 2: texts 1 and 5 tie at 0.7; 5 comes after 1 -> 1 (text 4 is unselected: 5).
        assert_eq!(ranks.i2t, [Some(1), Some(0), Some(1)]);
        // Text 1: (2, 1) was chosen by image 2 only, so it is -100 here: image 1 (0.2) > image 0 (0.1).
        // Text 3: images 1 and 2 tie at 0.5 -> image 1 first.
        // Text 5: its image 2 was chosen by i2t only (0.7): -100 for t2i, below images 0 and 1.
        assert_eq!(ranks.t2i, [1, 1, 1, 0, 1, 2]);
    }

    #[test]
    fn direction_flags_matter() {
        // The same pairs all flagged for both directions give different ranks: text 5 finds image 2 first.
        let both: Vec<ScoredPair> =
            pairs().into_iter().map(|p| ScoredPair { in_i2t: true, in_t2i: true, ..p }).collect();
        let ranks = rerank_ranks(&both, &truth()).unwrap();
        assert_eq!(ranks.t2i[5], 0);
        assert_ne!(ranks, rerank_ranks(&pairs(), &truth()).unwrap());
    }

    #[test]
    fn unselected_ground_truth_ranks_behind_every_selected_pair_then_by_index() {
        // Image 0 selects texts 4 and 5 only: its captions 0 and 1 sit at -100 with texts 2, 3;
        // text 0 is first of them by index -> rank 2.
        let pairs = [pair(0, 4, -3.0, true, false), pair(0, 5, -7.0, true, false)];
        assert_eq!(rerank_ranks(&pairs, &truth()).unwrap().i2t[0], Some(2));
        // No pairs at all: every score is -100 and ranks are by index.
        let ranks = rerank_ranks(&[], &truth()).unwrap();
        assert_eq!(ranks.i2t, [Some(0), Some(2), Some(4)]);
        assert_eq!(ranks.t2i, [0, 0, 1, 1, 2, 2]);
    }

    #[test]
    fn bad_pairs_are_refused() {
        assert!(rerank_ranks(&[pair(3, 0, 1.0, true, true)], &truth()).unwrap_err().contains("out of range"));
        let twice = [pair(0, 1, 1.0, true, false), pair(0, 1, 2.0, true, true)];
        assert!(rerank_ranks(&twice, &truth()).unwrap_err().contains("twice"));
        assert!(GroundTruth::new(1, vec![0, 1]).is_err());
    }

    #[test]
    fn an_image_without_captions_is_no_query() {
        let truth = GroundTruth::new(2, vec![0, 0]).unwrap();
        let ranks = rerank_ranks(&[pair(1, 1, 1.0, true, true)], &truth).unwrap();
        assert_eq!(ranks.i2t, [Some(0), None]);
        assert_eq!(ranks.t2i, [0, 1]);
    }

    #[test]
    fn block_bins_images_and_their_captions() {
        let ranks = Ranks { i2t: vec![Some(1), Some(0), Some(1)], t2i: vec![1, 1, 1, 0, 1, 2] };
        let block = Block::of(&ranks, &truth(), &[0.05, 0.35, -1.0]);
        let o = &block.overall;
        assert_eq!((o.n_images, o.n_texts), (3, 6));
        assert!((o.txt_r1.unwrap() - 100.0 / 3.0).abs() < 1e-9);
        assert!((o.img_r1.unwrap() - 100.0 / 6.0).abs() < 1e-9);
        assert_eq!((o.txt_r5, o.img_r5, o.txt_r10), (Some(100.0), Some(100.0), Some(100.0)));
        assert!((o.r_mean.unwrap() - (o.txt_r_mean.unwrap() + o.img_r_mean.unwrap()) / 2.0).abs() < 1e-12);
        assert_eq!((o.txt_mdr, o.img_mdr, o.img_mer), (Some(2.0), Some(2.0), Some(2.0)));
        let small = &block.small.summary;
        assert_eq!(
            (small.n_images, small.n_texts, small.txt_r1, small.img_r1, small.img_r5),
            (1, 2, Some(0.0), Some(0.0), Some(100.0))
        );
        assert_eq!(block.bins.len(), NUM_BINS);
        let third = &block.bins[3];
        assert_eq!((third.lo, third.hi, third.n_images, third.n_texts), (0.3, 0.4, 1, 2));
        assert_eq!((third.txt_r1, third.img_r1), (Some(100.0), Some(50.0)));
        let empty = &block.bins[5];
        assert_eq!((empty.n_images, empty.txt_r1, empty.img_r10), (0, None, None));
        // Image 2 (size -1) is in no bin.
        assert_eq!(block.bins.iter().map(|b| b.n_images).sum::<usize>(), 2);
    }
}
