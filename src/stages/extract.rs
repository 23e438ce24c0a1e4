//! The `extract` stage (sharded by image; method.md sections 1-5): decode and resize each image on
//! CPU threads while the model works on the previous batch, compute the vision tokens Z, the Q-Pert
//! perturbation from the image's kept boxes, and the (perturbed) ITC image features.
//!
//! Output `extract/part-IIIII-of-NNNNN.parquet`: `image_idx` u32, `query_embeds`
//! FixedSizeList<float32, Q*E> (row-major Q x E, rows L2-normalised), `perturbed` bool; Q and E in
//! the schema metadata (`qpert.queries`, `qpert.embed_dim`).
//!
//! With `rerank.vision_cache` on, each batch's Z and Pi also go to the vision cache
//! (`extract/vision/`, see [`super::vision_cache`]), so that `rerank` need not recompute them.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{BooleanArray, Float32Array, UInt32Array};
use arrow::record_batch::RecordBatch;

use super::index::{self, IndexTables};
use super::runtime;
use super::vision_cache::VisionCache;
use super::{Context, Outcome, Stage};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::store::columns::{fixed_size_list, record_batch_with_metadata};
use crate::store::{Fingerprint, Shard};

/// Schema metadata key for Q.
pub const QUERIES_KEY: &str = "qpert.queries";
/// Schema metadata key for E.
pub const EMBED_DIM_KEY: &str = "qpert.embed_dim";

/// The index, the model, and the Q-Pert settings (only when enabled): changing alpha or the
/// projector invalidates this stage and those after it, never `index` or `text`.
pub fn fingerprint(config: &Config) -> Result<Fingerprint> {
    let q = &config.qpert;
    let mut fp = Fingerprint::new(Stage::Extract.name())
        .with_input(Stage::Index.name(), &index::fingerprint(config)?)
        .with("qpert.enabled", q.enabled);
    if q.enabled {
        fp = fp
            .with("qpert.alpha", q.alpha)
            .with("qpert.npc", q.npc)
            .with("qpert.weight", format!("{:?}", q.weight))
            .with("qpert.projector", format!("{:?}", q.projector));
    }
    runtime::with_model(fp, config)
}

/// Runs one shard of `extract`; skips it when its part is fresh (unless `--force`);
/// fails when another live worker is computing it.
pub fn run(ctx: &Context, shard: Shard) -> Result<Outcome> {
    let stage = ctx.stage_dir(Stage::Extract, fingerprint(&ctx.config)?);
    // Held until the part is written: no other worker computes this shard meanwhile.
    let Some(_claim) = stage.claim(shard, ctx.force)? else {
        stage.finish_parts(shard.count(), serde_json::Value::Null)?;
        return Ok(Outcome::UpToDate);
    };
    let index = IndexTables::read(&ctx.config)?;
    let (model, device) = runtime::load_model(ctx)?;
    let range = shard.batch_range(index.images.len(), ctx.config.model.image_batch);
    let bar = ctx.reporter.bar(range.len() as u64, &format!("extract {shard}"));
    let mut features = ImageFeatures::default();
    let cache = (ctx.config.rerank.enabled && ctx.config.rerank.vision_cache)
        .then(|| VisionCache::new(stage.path(), stage.fingerprint().digest(), ctx.config.model.image_batch));
    if let Some(cache) = &cache {
        cache.remove_stale()?;
    }
    runtime::for_each_vision_batch(&index, range, &model, &ctx.config, &device, |batch| {
        if let Some(cache) = &cache {
            cache.write(&batch, model.dtype())?;
        }
        let knob = Some(("model.image_batch", ctx.config.model.image_batch));
        let mut embeds = runtime::host(model.image_features(batch.z, batch.perturbation)?, "an image batch", knob)?;
        embeds.truncate(embeds.len() / ctx.config.model.image_batch * batch.images.len()); // drop the padding
        features.push(&batch.images, &batch.perturbed, embeds);
        bar.inc(batch.images.len() as u64);
        Ok(())
    })?;
    bar.finish_and_clear();

    let (q, e) = (model.config().num_query_tokens, model.config().image_text_hidden_size);
    let perturbed = features.perturbed.iter().filter(|&&p| p).count();
    let batch = features.into_batch(q, e).map_err(|err| Error::artifact(stage.path(), err))?;
    stage.write_part(shard, &batch.schema(), std::slice::from_ref(&batch))?;
    let summary = serde_json::json!({ "images": batch.num_rows(), "perturbed_images": perturbed });
    let image_batch = ctx.config.model.image_batch;
    ctx.reporter.info(&format!(
        "extract {shard}: {} ({perturbed} perturbed) -> {}{}",
        super::counted(batch.num_rows(), "image"),
        stage.path().display(),
        super::empty_shard_note(shard, index.images.len(), image_batch, "image", "model.image_batch")
    ));
    stage.finish_parts(shard.count(), summary)?;
    Ok(Outcome::Ran)
}

/// The rows of an `extract` part, accumulated batch by batch.
#[derive(Default)]
struct ImageFeatures {
    image_idx: Vec<u32>,
    embeds: Vec<f32>,
    perturbed: Vec<bool>,
}

impl ImageFeatures {
    fn push(&mut self, images: &[usize], perturbed: &[bool], embeds: Vec<f32>) {
        self.image_idx.extend(images.iter().map(|&i| i as u32));
        self.perturbed.extend_from_slice(perturbed);
        self.embeds.extend(embeds);
    }

    fn into_batch(self, q: usize, e: usize) -> std::result::Result<RecordBatch, arrow::error::ArrowError> {
        let metadata =
            HashMap::from([(QUERIES_KEY.to_string(), q.to_string()), (EMBED_DIM_KEY.to_string(), e.to_string())]);
        record_batch_with_metadata(
            vec![
                ("image_idx", Arc::new(UInt32Array::from(self.image_idx))),
                ("query_embeds", fixed_size_list(Arc::new(Float32Array::from(self.embeds)), q * e)?),
                ("perturbed", Arc::new(BooleanArray::from(self.perturbed))),
            ],
            metadata,
        )
    }
}
