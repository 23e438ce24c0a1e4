//! The `extract`/`rerank` design question of issue 5: cache the vision tokens Z between the two
//! stages, or recompute them in `rerank`? Measures both for one batch of the bench's model on its
//! device: the ViT pass, against moving Z to the host in f16, writing it as Arrow IPC, reading it
//! back (as `rerank` would) and uploading it again.

use std::sync::Arc;
use std::time::Instant;

use arrow::array::{FixedSizeBinaryArray, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::ipc::reader::FileReader;
use arrow::ipc::writer::FileWriter;
use burn::tensor::{Device, FloatDType, Tensor, TensorData};
use serde::Serialize;

use super::probes::{blank_images, sync, vision_ms_per_image};
use crate::error::{Error, Result};
use crate::model::Blip2Model;

/// Per-image costs of the two options, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct ZCacheTiming {
    /// Images in the measured batch.
    pub images: usize,
    /// Z of one image in f16, MiB.
    pub mib_per_image: f64,
    /// Recomputing: the ViT pass (synchronised by reading Z back).
    pub recompute_ms: f64,
    /// Caching: Z to the host in f16, IPC write, IPC read, upload.
    pub store_and_load_ms: f64,
}

/// Times both options on `images` blank images.
pub fn measure(model: &Blip2Model, images: usize, device: &Device, scratch: &std::path::Path) -> Result<ZCacheTiming> {
    let recompute_ms = vision_ms_per_image(model, images, device)?;
    let z = model.vision_tokens(blank_images(model, images, device))?;
    let [b, t, dv] = z.dims();

    let path = scratch.join("z-cache.arrow");
    let io = |e: &dyn std::fmt::Display| Error::artifact(&path, e.to_string());
    let start = Instant::now();
    let bytes = sync(z.cast(FloatDType::F16))?.bytes.to_vec();
    let row = t * dv * 2;
    let field = Field::new("z", DataType::FixedSizeBinary(row as i32), false);
    let schema = Arc::new(Schema::new(vec![field]));
    let column = FixedSizeBinaryArray::try_from_iter(bytes.chunks(row)).map_err(|e| io(&e))?;
    let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(column)]).map_err(|e| io(&e))?;
    let file = std::fs::File::create(&path).map_err(|e| io(&e))?;
    let mut writer = FileWriter::try_new(file, &schema).map_err(|e| io(&e))?;
    writer.write(&batch).map_err(|e| io(&e))?;
    writer.finish().map_err(|e| io(&e))?;
    let reader = FileReader::try_new(std::fs::File::open(&path).map_err(|e| io(&e))?, None).map_err(|e| io(&e))?;
    let mut read = Vec::with_capacity(bytes.len());
    for batch in reader {
        let batch = batch.map_err(|e| io(&e))?;
        let column =
            batch.column(0).as_any().downcast_ref::<FixedSizeBinaryArray>().ok_or_else(|| io(&"not binary"))?;
        read.extend_from_slice(column.value_data());
    }
    let data = TensorData::from_bytes_vec(read, [b, t, dv], burn::tensor::DType::F16);
    sync(Tensor::<3>::from_data(data, device).cast(FloatDType::F32))?;
    let store_and_load = start.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&path);
    Ok(ZCacheTiming {
        images,
        mib_per_image: row as f64 / (1024.0 * 1024.0),
        recompute_ms,
        store_and_load_ms: store_and_load * 1e3 / images as f64,
    })
}
