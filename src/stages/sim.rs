//! The `sim` stage (method.md section 6.1-6.3): ITC scores s_itc(I, T) = max over the Q query rows
//! of F_img . f_txt for all pairs, computed on the device in blocks so memory stays bounded (COCO is
//! 5,000 x 25,010), with each query's top-k candidates and each query's ground-truth ITC rank.
//!
//! Two passes over the blocks: the first keeps the top-k lists and the ground-truth scores, the
//! second counts, for every ground-truth pair, the items that outrank it. Both passes compute the
//! same blocks in the same shapes, so a ground-truth score is compared with bit-identical values.
//!
//! Outputs (`sim/`): `i2t_topk.parquet` (`image_idx`, `rank`, `text_idx`, `itc`),
//! `t2i_topk.parquet` (`text_idx`, `rank`, `image_idx`, `itc`), `i2t_ranks.parquet`
//! (`image_idx`, `itc_rank`) and `t2i_ranks.parquet` (`text_idx`, `itc_rank`); ranks 0-based, ties
//! broken by index.

use std::sync::Arc;

use arrow::array::{Float32Array, UInt32Array};
use arrow::record_batch::RecordBatch;
use burn::tensor::{Device, Tensor};

use super::extract::{self, EMBED_DIM_KEY, QUERIES_KEY};
use super::index::IndexTables;
use super::runtime::{self, floats};
use super::{Context, Outcome, Stage};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::metrics::{RankCounter, TopK};
use crate::store::columns::{Table, record_batch};
use crate::store::{FileEntry, Fingerprint, Notes};
use crate::timing::TimeCounter;

/// Wall time of the two scoring passes (ITC blocks, top-k, rank counting), read by `qpert bench`.
pub static SCORE_TIME: TimeCounter = TimeCounter::new();

/// Images per block (times Q query rows).
const IMAGE_BLOCK: usize = 256;
/// Texts per block.
const TEXT_BLOCK: usize = 4096;

/// The image and text features, and k.
pub fn fingerprint(config: &Config) -> Result<Fingerprint> {
    Ok(Fingerprint::new(Stage::Sim.name())
        .with_input(Stage::Extract.name(), &extract::fingerprint(config)?)
        .with_input(Stage::Text.name(), &super::text::fingerprint(config)?)
        .with("rerank.k", config.rerank.k))
}

/// The ITC features of the whole split, on the device.
/// The features zero-padded to whole blocks: every block has the same shape, so a GPU compiles and
/// autotunes one matmul (instead of up to four), and the padded scores are dropped on the host.
struct Features {
    /// [padded images * q, e]
    images: Tensor<2>,
    /// [padded texts, e]
    texts: Tensor<2>,
    n_images: usize,
    n_texts: usize,
    q: usize,
    /// Images per block: [`IMAGE_BLOCK`], or all images when there are fewer.
    image_block: usize,
    /// Texts per block: [`TEXT_BLOCK`], or all texts when there are fewer.
    text_block: usize,
}

/// Runs `sim`; skips it when up to date (unless `--force`).
pub fn run(ctx: &Context) -> Result<Outcome> {
    let stage = ctx.stage_dir(Stage::Sim, fingerprint(&ctx.config)?);
    if !ctx.force && stage.is_complete()? {
        return Ok(Outcome::UpToDate);
    }
    let index = IndexTables::read(&ctx.config)?;
    let device = ctx.device.require()?.clone();
    let features = read_features(ctx, &index, &device)?;
    let gt_image: Vec<usize> = index.texts.iter().map(|t| t.image_idx as usize).collect();
    let k = ctx.config.rerank.k as usize;

    let scoring = std::time::Instant::now();
    // Pass 1: top-k both ways and the ground-truth scores.
    // A list never holds more than the gallery: a k past it selects everything, and reserving k
    // slots for each of COCO's 30,010 queries at k = 4e9 would exceed the address space.
    let mut i2t: Vec<TopK> = (0..features.n_images).map(|_| TopK::new(k.min(features.n_texts))).collect();
    let mut t2i: Vec<TopK> = (0..features.n_texts).map(|_| TopK::new(k.min(features.n_images))).collect();
    let mut gt_score = vec![f32::NAN; features.n_texts];
    let blocks = block_count(&features);
    let bar = ctx.reporter.bar(2 * blocks as u64, "sim");
    for_each_block(&features, |image0, text0, bt, scores| {
        for (row, chunk) in scores.chunks(bt).enumerate() {
            let image = image0 + row;
            for (col, &s) in chunk.iter().enumerate() {
                let text = text0 + col;
                i2t[image].offer(text as u32, s);
                t2i[text].offer(image as u32, s);
                if gt_image[text] == image {
                    gt_score[text] = s;
                }
            }
        }
        bar.inc(1);
    })?;

    // Pass 2: for every ground-truth pair, count what outranks it in its row and its column.
    let mut in_row = vec![RankCounter::default(); features.n_texts];
    let mut in_column = vec![RankCounter::default(); features.n_texts];
    let texts_of_image = texts_by_image(&gt_image, features.n_images);
    for_each_block(&features, |image0, text0, bt, scores| {
        for (row, chunk) in scores.chunks(bt).enumerate() {
            let image = image0 + row;
            for &t in &texts_of_image[image] {
                for (col, &s) in chunk.iter().enumerate() {
                    in_row[t].count((text0 + col) as u32, s, t as u32, gt_score[t]);
                }
            }
            for (col, &s) in chunk.iter().enumerate() {
                let text = text0 + col;
                in_column[text].count(image as u32, s, gt_image[text] as u32, gt_score[text]);
            }
        }
        bar.inc(1);
    })?;
    bar.finish_and_clear();
    SCORE_TIME.add(scoring.elapsed());

    // An image without captions is no image-to-text query: it gets no row.
    let image_ranks: Vec<(u32, u32)> = texts_of_image
        .iter()
        .enumerate()
        .filter_map(|(i, texts)| Some((i as u32, texts.iter().map(|&t| in_row[t].rank() as u32).min()?)))
        .collect();
    let text_ranks: Vec<(u32, u32)> = in_column.iter().enumerate().map(|(t, c)| (t as u32, c.rank() as u32)).collect();

    let artifact = |e: arrow::error::ArrowError| Error::artifact(stage.path(), e);
    let tables = [
        ("i2t_topk", topk_batch(["image_idx", "rank", "text_idx", "itc"], i2t).map_err(artifact)?),
        ("t2i_topk", topk_batch(["text_idx", "rank", "image_idx", "itc"], t2i).map_err(artifact)?),
        ("i2t_ranks", ranks_batch("image_idx", image_ranks).map_err(artifact)?),
        ("t2i_ranks", ranks_batch("text_idx", text_ranks).map_err(artifact)?),
    ];
    let files: Vec<FileEntry> = tables
        .iter()
        .map(|(name, batch)| stage.write_table(name, &batch.schema(), std::slice::from_ref(batch)))
        .collect::<Result<_>>()?;
    let summary =
        serde_json::json!({ "images": features.n_images, "texts": features.n_texts, "k": k, "blocks": blocks });
    stage.finish(files, summary, Notes::default())?;
    ctx.reporter.info(&format!(
        "sim: {} x {} ITC scores in {blocks} blocks, top-{k} both ways -> {}",
        features.n_images,
        features.n_texts,
        stage.path().display()
    ));
    Ok(Outcome::Ran)
}

/// Reads the `extract` and `text` parts and checks they cover the index exactly, in order.
fn read_features(ctx: &Context, index: &IndexTables, device: &Device) -> Result<Features> {
    let config = &ctx.config;
    let images_dir = ctx.stage_dir(Stage::Extract, extract::fingerprint(config)?);
    let texts_dir = ctx.stage_dir(Stage::Text, super::text::fingerprint(config)?);
    let (images, texts) = (images_dir.read_parts()?, texts_dir.read_parts()?);
    let images_table = Table::new(&images, images_dir.path());
    let texts_table = Table::new(&texts, texts_dir.path());
    let (q, e) = (images_table.metadata_usize(QUERIES_KEY)?, images_table.metadata_usize(EMBED_DIM_KEY)?);
    check_sequence(images_table.u32s("image_idx")?, index.images.len(), images_dir.path())?;
    check_sequence(texts_table.u32s("text_idx")?, index.texts.len(), texts_dir.path())?;
    Ok(Features::new(
        images_table.f32_rows("query_embeds", q * e)?,
        texts_table.f32_rows("embedding", e)?,
        [index.images.len(), q, e],
        [IMAGE_BLOCK, TEXT_BLOCK],
        device,
    ))
}

impl Features {
    /// Uploads `images` ([n_images * q * e]) and `texts` ([n_texts * e]) zero-padded to whole blocks
    /// of at most `[images, texts]` per block.
    fn new(images: &[f32], texts: &[f32], [n_images, q, e]: [usize; 3], blocks: [usize; 2], device: &Device) -> Self {
        let n_texts = texts.len() / e;
        let (image_block, text_block) = (blocks[0].min(n_images).max(1), blocks[1].min(n_texts).max(1));
        let (padded_images, padded_texts) =
            (n_images.next_multiple_of(image_block), n_texts.next_multiple_of(text_block));
        let zero_padded = |rows: &[f32], len: usize| {
            let mut values = rows.to_vec();
            values.resize(len, 0.0);
            values
        };
        Features {
            images: floats(zero_padded(images, padded_images * q * e), [padded_images * q, e], device),
            texts: floats(zero_padded(texts, padded_texts * e), [padded_texts, e], device),
            n_images,
            n_texts,
            q,
            image_block,
            text_block,
        }
    }
}

/// The parts must hold the indices 0..n exactly once, in order.
fn check_sequence(indices: &[u32], n: usize, path: &std::path::Path) -> Result<()> {
    if indices.len() != n || indices.iter().enumerate().any(|(i, &v)| v as usize != i) {
        return Err(Error::artifact(path, format!("the parts do not cover the index's {n} rows in order")));
    }
    Ok(())
}

fn block_count(f: &Features) -> usize {
    f.n_images.div_ceil(f.image_block) * f.n_texts.div_ceil(f.text_block)
}

/// Calls `visit(first_image, first_text, texts_in_block, scores)` for each block in a fixed order
/// (image blocks outer, text blocks inner); `scores` is row-major [images_in_block, texts_in_block].
fn for_each_block(f: &Features, mut visit: impl FnMut(usize, usize, usize, &[f32])) -> Result<()> {
    let (image_block, text_block) = (f.image_block, f.text_block);
    for image0 in (0..f.n_images).step_by(image_block) {
        let bi = image_block.min(f.n_images - image0);
        let queries = f.images.clone().narrow(0, image0 * f.q, image_block * f.q);
        for text0 in (0..f.n_texts).step_by(text_block) {
            let bt = text_block.min(f.n_texts - text0);
            let texts = f.texts.clone().narrow(0, text0, text_block);
            let scores = queries.clone().matmul(texts.transpose()).reshape([image_block, f.q, text_block]).max_dim(1);
            let padded = runtime::host(scores, "an ITC score block", None)?;
            let real: Vec<f32> = padded.chunks(text_block).take(bi).flat_map(|row| &row[..bt]).copied().collect();
            visit(image0, text0, bt, &real);
        }
    }
    Ok(())
}

fn texts_by_image(gt_image: &[usize], n_images: usize) -> Vec<Vec<usize>> {
    let mut by_image = vec![Vec::new(); n_images];
    for (t, &i) in gt_image.iter().enumerate() {
        by_image[i].push(t);
    }
    by_image
}

/// One row per (query, position in its top-k).
fn topk_batch(names: [&str; 4], lists: Vec<TopK>) -> std::result::Result<RecordBatch, arrow::error::ArrowError> {
    let (mut query, mut rank, mut item, mut score) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (q, list) in lists.into_iter().enumerate() {
        for (r, s) in list.into_sorted().into_iter().enumerate() {
            query.push(q as u32);
            rank.push(r as u32);
            item.push(s.index);
            score.push(s.score);
        }
    }
    record_batch(vec![
        (names[0], Arc::new(UInt32Array::from(query))),
        (names[1], Arc::new(UInt32Array::from(rank))),
        (names[2], Arc::new(UInt32Array::from(item))),
        (names[3], Arc::new(Float32Array::from(score))),
    ])
}

/// One row per (query, its ITC rank).
fn ranks_batch(query: &str, ranks: Vec<(u32, u32)>) -> std::result::Result<RecordBatch, arrow::error::ArrowError> {
    record_batch(vec![
        (query, Arc::new(UInt32Array::from_iter_values(ranks.iter().map(|&(q, _)| q)))),
        ("itc_rank", Arc::new(UInt32Array::from_iter_values(ranks.iter().map(|&(_, r)| r)))),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks that do not divide the data (padded) give exactly the scores of one unpadded block,
    /// and those are the max over query rows of the dot products.
    #[test]
    fn padded_blocks_give_every_score_once() {
        let (n_images, q, e, n_texts) = (5, 2, 3, 7);
        let value = |i: usize| ((i * 37 % 11) as f32 - 5.0) / 4.0;
        let images: Vec<f32> = (0..n_images * q * e).map(value).collect();
        let texts: Vec<f32> = (0..n_texts * e).map(|i| value(i + 3)).collect();
        let device = Device::flex();
        let scores = |blocks: [usize; 2]| {
            let features = Features::new(&images, &texts, [n_images, q, e], blocks, &device);
            let mut all = vec![f32::NAN; n_images * n_texts];
            let mut visits = 0;
            for_each_block(&features, |image0, text0, bt, block| {
                visits += 1;
                for (row, values) in block.chunks(bt).enumerate() {
                    for (col, &v) in values.iter().enumerate() {
                        assert!(all[(image0 + row) * n_texts + text0 + col].is_nan(), "scored twice");
                        all[(image0 + row) * n_texts + text0 + col] = v;
                    }
                }
            })
            .unwrap();
            assert_eq!(visits, block_count(&features));
            all
        };
        let padded = scores([2, 3]);
        assert_eq!(block_count(&Features::new(&images, &texts, [n_images, q, e], [2, 3], &device)), 9);
        for (i, (&a, &b)) in padded.iter().zip(&scores([256, 4096])).enumerate() {
            let (image, text) = (i / n_texts, i % n_texts);
            let dot = |row: usize| (0..e).map(|d| images[(image * q + row) * e + d] * texts[text * e + d]).sum::<f32>();
            let expected = dot(0).max(dot(1));
            assert!((a - expected).abs() < 1e-6 && (b - expected).abs() < 1e-6, "{image},{text}: {a} {b} {expected}");
        }
    }
}
