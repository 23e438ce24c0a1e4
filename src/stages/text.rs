//! The `text` stage (sharded by caption; method.md sections 1-2): cleaned captions -> BERT tokens
//! -> ITC text features.
//!
//! Output `text/part-IIIII-of-NNNNN.parquet`: `text_idx` u32, `embedding` FixedSizeList<float32, E>
//! (L2-normalised), and the tokens used: `input_ids` FixedSizeList<int32, 35>, `attention_mask`
//! FixedSizeList<uint8, 35>.

use std::sync::Arc;

use arrow::array::{Float32Array, Int32Array, UInt8Array, UInt32Array};
use arrow::record_batch::RecordBatch;

use super::index::{self, IndexTables};
use super::runtime::{self, ints};
use super::{Context, Outcome, Stage};
use crate::config::Config;
use crate::data::tokenizer::{CaptionTokenizer, MAX_LEN};
use crate::error::{Error, Result};
use crate::store::columns::{fixed_size_list, record_batch};
use crate::store::{Fingerprint, Shard};

/// The index's captions (not its images or boxes) and the model (Q-Pert settings do not touch
/// text features).
pub fn fingerprint(config: &Config) -> Result<Fingerprint> {
    let captions = index::captions_fingerprint(config)?;
    let fp = Fingerprint::new(Stage::Text.name()).with_input(Stage::Index.name(), &captions);
    runtime::with_model(fp, config)
}

/// Runs one shard of `text`; skips it when its part is fresh (unless `--force`);
/// fails when another live worker is computing it.
pub fn run(ctx: &Context, shard: Shard) -> Result<Outcome> {
    let stage = ctx.stage_dir(Stage::Text, fingerprint(&ctx.config)?);
    // Held until the part is written: no other worker computes this shard meanwhile.
    let Some(_claim) = stage.claim(shard, ctx.force)? else {
        stage.finish_parts(shard.count(), serde_json::Value::Null)?;
        return Ok(Outcome::UpToDate);
    };
    let index = IndexTables::read(&ctx.config)?;
    let tokenizer = CaptionTokenizer::from_model_dir(&ctx.config.model.dir)?;
    let (model, device) = runtime::load_model(ctx)?;
    let range = shard.batch_range(index.texts.len(), ctx.config.model.text_batch);
    let captions: Vec<String> = index.texts[range.clone()].iter().map(|t| t.caption_clean.clone()).collect();
    let tokens = tokenizer.encode(&captions)?;
    let bar = ctx.reporter.bar(captions.len() as u64, &format!("text {shard}"));

    let mut embeddings = Vec::new();
    let batch = ctx.config.model.text_batch;
    for start in (0..captions.len()).step_by(batch) {
        let n = batch.min(captions.len() - start);
        // A last, partial batch is padded to `batch` rows so that the device sees one shape; each
        // padding row attends to its first token only (an all-masked row would be NaN) and is dropped.
        let rows = start * MAX_LEN..(start + n) * MAX_LEN;
        let mut ids: Vec<i64> = tokens.input_ids[rows.clone()].iter().map(|&v| v as i64).collect();
        let mut mask: Vec<i64> = tokens.attention_mask[rows].iter().map(|&v| v as i64).collect();
        ids.resize(batch * MAX_LEN, 0);
        mask.resize(batch * MAX_LEN, 0);
        (n..batch).for_each(|row| mask[row * MAX_LEN] = 1);
        let (ids, mask) = (ints(ids, [batch, MAX_LEN], &device), ints(mask, [batch, MAX_LEN], &device));
        let knob = Some(("model.text_batch", batch));
        let features = runtime::host(model.text_features(ids, mask)?, "a text batch", knob)?;
        embeddings.extend_from_slice(&features[..features.len() / batch * n]);
        bar.inc(n as u64);
    }
    bar.finish_and_clear();

    let e = model.config().image_text_hidden_size;
    let text_idx: Vec<u32> = range.map(|t| t as u32).collect();
    let batch = text_batch(text_idx, embeddings, e, tokens.input_ids, tokens.attention_mask)
        .map_err(|err| Error::artifact(stage.path(), err))?;
    stage.write_part(shard, &batch.schema(), std::slice::from_ref(&batch))?;
    ctx.reporter.info(&format!(
        "text {shard}: {} -> {}{}",
        super::counted(batch.num_rows(), "caption"),
        stage.path().display(),
        super::empty_shard_note(shard, index.texts.len(), ctx.config.model.text_batch, "caption", "model.text_batch")
    ));
    stage.finish_parts(shard.count(), serde_json::json!({ "texts": index.texts.len() }))?;
    Ok(Outcome::Ran)
}

fn text_batch(
    text_idx: Vec<u32>,
    embeddings: Vec<f32>,
    e: usize,
    input_ids: Vec<i32>,
    attention_mask: Vec<u8>,
) -> std::result::Result<RecordBatch, arrow::error::ArrowError> {
    record_batch(vec![
        ("text_idx", Arc::new(UInt32Array::from(text_idx))),
        ("embedding", fixed_size_list(Arc::new(Float32Array::from(embeddings)), e)?),
        ("input_ids", fixed_size_list(Arc::new(Int32Array::from(input_ids)), MAX_LEN)?),
        ("attention_mask", fixed_size_list(Arc::new(UInt8Array::from(attention_mask)), MAX_LEN)?),
    ])
}
