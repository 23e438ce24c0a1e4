//! The `rerank` stage (sharded by image; method.md section 6.2): ITM logits for the union of both
//! directions' ITC top-k pairs, each pair scored once, grouped by image so that each image's Z, its
//! Q-Pert perturbation and its cross-attention keys/values are computed once for all its pairs.
//!
//! Output `rerank/part-IIIII-of-NNNNN.parquet`, one row per scored pair: `image_idx`, `text_idx`
//! u32, `itc`, `itm`, `score` (= itm + itc) f32, and `in_i2t` / `in_t2i` bool saying which
//! direction's top-k selected the pair (each direction ranks only its own pairs).

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{BooleanArray, Float32Array, UInt32Array};
use burn::tensor::Tensor;

use super::index::IndexTables;
use super::runtime::{self, VisionBatch};
use super::vision_cache::VisionCache;
use super::{Context, Outcome, Stage};
use crate::config::Config;
use crate::data::tokenizer::{MAX_LEN, TokenBatch};
use crate::error::{Error, Result};
use crate::model::{Blip2Model, ItmTexts};
use crate::store::columns::{Table, record_batch};
use crate::store::{Fingerprint, Shard};
use crate::timing::TimeCounter;

/// Wall time of the ITM batches, from inputs to logits on the host (read by `qpert bench`).
pub static ITM_TIME: TimeCounter = TimeCounter::new();

/// The candidates (sim, which depends on the features and k), the perturbation settings and the
/// model (both through extract), and the tokens (through text).
pub fn fingerprint(config: &Config) -> Result<Fingerprint> {
    Ok(Fingerprint::new(Stage::Rerank.name())
        .with_input(Stage::Sim.name(), &super::sim::fingerprint(config)?)
        .with_input(Stage::Extract.name(), &super::extract::fingerprint(config)?)
        .with_input(Stage::Text.name(), &super::text::fingerprint(config)?))
}

/// A candidate pair of an image.
#[derive(Debug, Clone, Copy, Default)]
struct Candidate {
    itc: f32,
    in_i2t: bool,
    in_t2i: bool,
}

/// Rows of a `rerank` part.
#[derive(Default)]
struct ScoredPairs {
    image_idx: Vec<u32>,
    text_idx: Vec<u32>,
    itc: Vec<f32>,
    itm: Vec<f32>,
    in_i2t: Vec<bool>,
    in_t2i: Vec<bool>,
}

/// Runs one shard of `rerank`; skips it when its part is fresh (unless `--force`);
/// fails when another live worker is computing it.
pub fn run(ctx: &Context, shard: Shard) -> Result<Outcome> {
    let stage = ctx.stage_dir(Stage::Rerank, fingerprint(&ctx.config)?);
    // Held until the part is written: no other worker computes this shard meanwhile.
    let Some(_claim) = stage.claim(shard, ctx.force)? else {
        stage.finish_parts(shard.count(), serde_json::Value::Null)?;
        return Ok(Outcome::UpToDate);
    };
    let index = IndexTables::read(&ctx.config)?;
    let candidates = read_candidates(ctx, index.images.len())?;
    let (ids, mask) = read_tokens(ctx, index.texts.len())?;
    let itm_lengths = itm_lengths(&mask);
    let (model, device) = runtime::load_model(ctx)?;
    let range = shard.batch_range(index.images.len(), ctx.config.model.image_batch);
    let pairs_in_shard: usize = candidates[range.clone()].iter().map(BTreeMap::len).sum();
    let bar = ctx.reporter.bar(pairs_in_shard as u64, &format!("rerank {shard}"));
    let pair_batch = ctx.config.model.pair_batch;
    let texts = ITM_TIME.time(|| {
        let shard_texts = candidates[range.clone()].iter().flat_map(BTreeMap::keys).copied();
        PreparedTexts::new(&model, shard_texts, (&ids, &mask), &itm_lengths, pair_batch, &device)
    })?;
    let mut out = ScoredPairs::default();
    let mut score_batch = |batch: VisionBatch| -> Result<()> {
        // (slot in the batch, image, text, candidate) in image then text order.
        let pairs: Vec<(usize, usize, u32, Candidate)> = batch
            .images
            .iter()
            .enumerate()
            .flat_map(|(slot, &image)| candidates[image].iter().map(move |(&text, &c)| (slot, image, text, c)))
            .collect();
        if pairs.is_empty() {
            return Ok(());
        }
        let knob = Some(("model.pair_batch", pair_batch));
        // Pairs in order of their ITM length, so that each chunk runs on few tokens.
        let mut order: Vec<usize> = (0..pairs.len()).collect();
        order.sort_by_key(|&i| itm_lengths[pairs[i].2 as usize]);
        let logits = ITM_TIME.time(|| -> Result<Vec<f32>> {
            let images = model.itm_images(batch.z, batch.perturbation)?;
            let mut logits = Vec::new();
            let same_length =
                |a: &usize, b: &usize| itm_lengths[pairs[*a].2 as usize] == itm_lengths[pairs[*b].2 as usize];
            for chunk in order.chunk_by(same_length).flat_map(|group| group.chunks(pair_batch)) {
                // Padded to pair_batch pairs by repeating the last one, so that the device sees one
                // ITM shape per length (CubeCL compiles and autotunes every new shape); the padding
                // is dropped.
                let padding = std::iter::repeat_n(chunk[chunk.len() - 1], pair_batch - chunk.len());
                let padded: Vec<&(usize, usize, u32, Candidate)> =
                    chunk.iter().copied().chain(padding).map(|i| &pairs[i]).collect();
                let slots: Vec<usize> = padded.iter().map(|&&(slot, ..)| slot).collect();
                let (prepared, rows) = texts.rows(padded.iter().map(|&&(_, _, text, _)| text));
                let chunk_logits = model.itm_pair_logits(&images, &slots, prepared, &rows, &device)?;
                logits.push(chunk_logits.narrow(0, 0, chunk.len()));
            }
            // One read-back per image batch: the device runs all its chunks without waiting for the host.
            let sorted = runtime::host(Tensor::cat(logits, 0), "an ITM batch", knob)?;
            let mut logits = vec![0.0; pairs.len()];
            for (&i, itm) in order.iter().zip(sorted) {
                logits[i] = itm;
            }
            Ok(logits)
        })?;
        for (&(_, image, text, c), itm) in pairs.iter().zip(logits) {
            out.push(image as u32, text, c, itm);
        }
        bar.inc(pairs.len() as u64);
        Ok(())
    };
    match usable_vision_cache(ctx, shard, range.clone())? {
        Some(cache) => runtime::prefetched(
            runtime::batches(range.clone(), ctx.config.model.image_batch),
            |images| cache.read_host(&images),
            |batch| score_batch(batch?.upload(&device)),
        )?,
        None => runtime::for_each_vision_batch(&index, range, &model, &ctx.config, &device, &mut score_batch)?,
    }
    bar.finish_and_clear();

    let rows = out.image_idx.len();
    let batch = out.into_batch().map_err(|e| Error::artifact(stage.path(), e))?;
    stage.write_part(shard, &batch.schema(), std::slice::from_ref(&batch))?;
    ctx.reporter.info(&format!(
        "rerank {shard}: {} scored with ITM -> {}{}",
        super::counted(rows, "pair"),
        stage.path().display(),
        super::empty_shard_note(shard, index.images.len(), ctx.config.model.image_batch, "image", "model.image_batch")
    ));
    stage.finish_parts(shard.count(), serde_json::json!({ "k": ctx.config.rerank.k }))?;
    Ok(Outcome::Ran)
}

impl ScoredPairs {
    fn push(&mut self, image: u32, text: u32, c: Candidate, itm: f32) {
        self.image_idx.push(image);
        self.text_idx.push(text);
        self.itc.push(c.itc);
        self.itm.push(itm);
        self.in_i2t.push(c.in_i2t);
        self.in_t2i.push(c.in_t2i);
    }

    fn into_batch(self) -> std::result::Result<arrow::record_batch::RecordBatch, arrow::error::ArrowError> {
        let score: Vec<f32> = self.itm.iter().zip(&self.itc).map(|(m, c)| m + c).collect();
        record_batch(vec![
            ("image_idx", Arc::new(UInt32Array::from(self.image_idx))),
            ("text_idx", Arc::new(UInt32Array::from(self.text_idx))),
            ("itc", Arc::new(Float32Array::from(self.itc))),
            ("itm", Arc::new(Float32Array::from(self.itm))),
            ("score", Arc::new(Float32Array::from(score))),
            ("in_i2t", Arc::new(BooleanArray::from(self.in_i2t))),
            ("in_t2i", Arc::new(BooleanArray::from(self.in_t2i))),
        ])
    }
}

/// The vision cache `extract` wrote, when `rerank.vision_cache` is on and it holds every batch of
/// `range` for the current configuration; otherwise `None` (and a line saying why, when it is on).
fn usable_vision_cache(ctx: &Context, shard: Shard, range: std::ops::Range<usize>) -> Result<Option<VisionCache>> {
    if !ctx.config.rerank.vision_cache {
        return Ok(None);
    }
    let extract = ctx.stage_dir(Stage::Extract, super::extract::fingerprint(&ctx.config)?);
    let cache = VisionCache::new(extract.path(), extract.fingerprint().digest(), ctx.config.model.image_batch);
    match cache.unusable(range) {
        None => Ok(Some(cache)),
        Some(why) => {
            ctx.reporter.info(&format!("rerank {shard}: recomputing vision tokens and Q-Pert ({why})"));
            Ok(None)
        }
    }
}

/// Per image, its candidate texts (union of both directions' top-k) in text order.
fn read_candidates(ctx: &Context, n_images: usize) -> Result<Vec<BTreeMap<u32, Candidate>>> {
    let sim = ctx.stage_dir(Stage::Sim, super::sim::fingerprint(&ctx.config)?);
    let mut candidates = vec![BTreeMap::new(); n_images];
    for (table, image_column, text_column, i2t) in
        [("i2t_topk", "image_idx", "text_idx", true), ("t2i_topk", "image_idx", "text_idx", false)]
    {
        let batch = sim.read_table(table)?;
        let path = sim.path().join(format!("{table}.parquet"));
        let t = Table::new(&batch, &path);
        let (images, texts, itc) = (t.u32s(image_column)?, t.u32s(text_column)?, t.f32s("itc")?);
        for ((&image, &text), &score) in images.iter().zip(texts).zip(itc) {
            let slot = candidates
                .get_mut(image as usize)
                .ok_or_else(|| Error::artifact(&path, format!("image {image} is not in the index")))?;
            let c: &mut Candidate = slot.entry(text).or_default();
            c.itc = score;
            if i2t { c.in_i2t = true } else { c.in_t2i = true }
        }
    }
    Ok(candidates)
}

/// The ITM texts of a shard ([`Blip2Model::itm_texts`]: each text's first Q-Former layer, computed
/// once for all its pairs), one batch per ITM length.
struct PreparedTexts {
    /// Per ITM length, the texts of that length.
    by_length: BTreeMap<usize, ItmTexts>,
    /// Per text index, its ITM length and its row in `by_length` (`None` for texts of no pair).
    rows: Vec<Option<(usize, usize)>>,
}

impl PreparedTexts {
    /// Prepares `texts` (indices into the `text` stage's `tokens`: ids and masks, row-major [texts,
    /// MAX_LEN]) on their ITM lengths, in batches of `batch` texts padded by repeating the last one,
    /// so that the device sees the ITM chunks' shapes.
    fn new(
        model: &Blip2Model,
        texts: impl IntoIterator<Item = u32>,
        (ids, mask): (&[i32], &[u8]),
        itm_lengths: &[usize],
        batch: usize,
        device: &burn::tensor::Device,
    ) -> Result<Self> {
        let mut of_length: BTreeMap<usize, Vec<u32>> = BTreeMap::new();
        for text in texts.into_iter().collect::<std::collections::BTreeSet<u32>>() {
            of_length.entry(itm_lengths[text as usize]).or_default().push(text);
        }
        let mut rows = vec![None; itm_lengths.len()];
        let mut by_length = BTreeMap::new();
        for (len, texts) in of_length {
            let mut parts = Vec::new();
            for chunk in texts.chunks(batch) {
                let padded = chunk.iter().chain(std::iter::repeat_n(&chunk[chunk.len() - 1], batch - chunk.len()));
                let token_rows = |t: &u32| *t as usize * MAX_LEN..*t as usize * MAX_LEN + len;
                let tokens = TokenBatch {
                    input_ids: padded.clone().flat_map(|t| ids[token_rows(t)].iter().copied()).collect(),
                    attention_mask: padded.flat_map(|t| mask[token_rows(t)].iter().copied()).collect(),
                    len,
                };
                parts.push(model.itm_texts(&tokens, device)?);
            }
            for (row, &text) in texts.iter().enumerate() {
                rows[text as usize] = Some((len, row));
            }
            by_length.insert(len, ItmTexts::cat(parts));
        }
        Ok(Self { by_length, rows })
    }

    /// The prepared texts of one ITM length and the rows of `texts` in them (all of that length).
    fn rows(&self, texts: impl Iterator<Item = u32>) -> (&ItmTexts, Vec<usize>) {
        let located: Vec<(usize, usize)> =
            texts.map(|t| self.rows[t as usize].expect("every text of a pair is prepared")).collect();
        let len = located[0].0;
        (&self.by_length[&len], located.into_iter().map(|(_, row)| row).collect())
    }
}

/// ITM runs a chunk of pairs on the first `len` tokens of their texts: the longest text of the
/// chunk rounded up to a multiple of this, at most `MAX_LEN`. Padding tokens are masked out of
/// every row that ITM reads (the queries'), so dropping them changes no logit; and a chunk of
/// Flickr30K captions (about 17 tokens) runs 56 instead of 67 rows per pair. Lengths stay few
/// (8, 16, 24, 32, 35): CubeCL compiles and autotunes one ITM shape per length.
const ITM_LENGTH_STEP: usize = 8;

/// Per text, the token count ITM runs it on: its last real token's position + 1, rounded up to
/// [`ITM_LENGTH_STEP`], at most [`MAX_LEN`].
fn itm_lengths(mask: &[u8]) -> Vec<usize> {
    mask.chunks(MAX_LEN)
        .map(|row| {
            let real = row.iter().rposition(|&m| m != 0).map_or(1, |last| last + 1);
            real.next_multiple_of(ITM_LENGTH_STEP).min(MAX_LEN)
        })
        .collect()
}

/// The token ids and masks the `text` stage used, row-major [texts, MAX_LEN].
fn read_tokens(ctx: &Context, n_texts: usize) -> Result<(Vec<i32>, Vec<u8>)> {
    let text = ctx.stage_dir(Stage::Text, super::text::fingerprint(&ctx.config)?);
    let batch = text.read_parts()?;
    let t = Table::new(&batch, text.path());
    if batch.num_rows() != n_texts {
        return Err(Error::artifact(text.path(), format!("{} captions, the index has {n_texts}", batch.num_rows())));
    }
    let ids = t.i32_rows("input_ids", MAX_LEN)?.to_vec();
    let mask = t.u8_rows("attention_mask", MAX_LEN)?.to_vec();
    Ok((ids, mask))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn itm_lengths_round_the_last_real_token_up_to_a_step() {
        let row = |real: usize| -> Vec<u8> { (0..MAX_LEN).map(|i| u8::from(i < real)).collect() };
        let masks: Vec<u8> = [1, 8, 9, 17, 32, 33, MAX_LEN].iter().flat_map(|&n| row(n)).collect();
        assert_eq!(itm_lengths(&masks), [8, 8, 16, 24, 32, 35, 35]);
        // A hole in the mask does not shorten the row: the length runs to the last real token.
        let mut holed = row(20);
        holed[5] = 0;
        assert_eq!(itm_lengths(&holed), [24]);
    }
}
