//! The vision cache (`rerank.vision_cache`): `extract` keeps each image batch's vision tokens Z and
//! Q-Pert perturbation Pi, and `rerank` reads them back instead of running the ViT and the
//! eigendecompositions a second time. Z is stored in the run dtype and Pi in f32, both exactly, so
//! a cached `rerank` is bit-identical to one that recomputes.
//!
//! One Arrow IPC file per image batch, `<extract folder>/vision/batch-BBBBBB.arrow`, where B is the
//! batch's global number (first image / `model.image_batch`): shards cut at batch boundaries, so B
//! names the same images whatever the shard layouts of `extract` and `rerank`. Columns: `image_idx`
//! u32, `z` FixedSizeBinary (t x dv values in the run dtype, row-major), `pi` FixedSizeBinary
//! (layers x h x d x d f32, null for an image that Pi leaves unchanged). The schema metadata holds
//! extract's fingerprint, the batch size, the dtype and the shapes: a file that does not match the
//! current config is never used.
//!
//! It is a cache, not a stage output: `extract` writes it when the option is on, `rerank` uses it
//! when every batch of its shard is there and current, and recomputes otherwise (saying why).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, FixedSizeBinaryArray, RecordBatch, UInt32Array};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::ipc::reader::FileReader;
use arrow::ipc::writer::FileWriter;
use burn::tensor::{DType, Device, FloatDType, Tensor, TensorData};

use super::runtime::VisionBatch;
use crate::error::{Error, Result};
use crate::model::read_back;
use crate::store::commit::{remove_abandoned_temporaries, write_atomically};
use crate::store::lock;

const FINGERPRINT_KEY: &str = "qpert.extract_fingerprint";
const IMAGE_BATCH_KEY: &str = "qpert.image_batch";
const DTYPE_KEY: &str = "qpert.z_dtype";
const Z_SHAPE_KEY: &str = "qpert.z_shape";
const PI_SHAPE_KEY: &str = "qpert.pi_shape";

/// The cache of one `extract` folder, valid for one extract fingerprint and batch size.
pub struct VisionCache {
    dir: PathBuf,
    fingerprint: String,
    image_batch: usize,
}

impl VisionCache {
    /// The cache inside `extract_dir` for extract's current fingerprint `digest`.
    pub fn new(extract_dir: &Path, digest: String, image_batch: usize) -> Self {
        VisionCache { dir: extract_dir.join("vision"), fingerprint: digest, image_batch }
    }

    fn path(&self, first_image: usize) -> PathBuf {
        self.dir.join(format!("batch-{:06}.arrow", first_image / self.image_batch))
    }

    /// Writes `batch`'s images (Z in `dtype`, Pi in f32; not the padding), atomically.
    pub fn write(&self, batch: &VisionBatch, dtype: FloatDType) -> Result<()> {
        let path = self.path(batch.images[0]);
        let artifact = |e: &dyn std::fmt::Display| Error::artifact(&path, e.to_string());
        let read = |t: Tensor<3>| read_back(t, "the vision cache", None);
        let b = batch.images.len();
        let [_, t, dv] = batch.z.dims();
        let z = read(batch.z.clone().narrow(0, 0, b).cast(dtype))?;
        let z_bytes = z.bytes.len() / b;
        let mut pi_shape = Vec::new();
        let pi: Vec<Option<Vec<u8>>> = match &batch.perturbation {
            Some(pi) => {
                pi_shape = pi.dims()[1..].to_vec();
                let data = read_back(pi.clone(), "the vision cache", None)?;
                let row = data.bytes.len() / pi.dims()[0];
                (0..b).map(|i| batch.perturbed[i].then(|| data.bytes[i * row..(i + 1) * row].to_vec())).collect()
            }
            None => vec![None; b],
        };
        let pi_bytes = pi_shape.iter().product::<usize>() * 4;
        let metadata = HashMap::from([
            (FINGERPRINT_KEY.to_string(), self.fingerprint.clone()),
            (IMAGE_BATCH_KEY.to_string(), self.image_batch.to_string()),
            (DTYPE_KEY.to_string(), format!("{:?}", z.dtype)),
            (Z_SHAPE_KEY.to_string(), format!("{t},{dv}")),
            (PI_SHAPE_KEY.to_string(), pi_shape.iter().map(usize::to_string).collect::<Vec<_>>().join(",")),
        ]);
        let schema = Arc::new(Schema::new_with_metadata(
            vec![
                Field::new("image_idx", DataType::UInt32, false),
                Field::new("z", DataType::FixedSizeBinary(z_bytes as i32), false),
                Field::new("pi", DataType::FixedSizeBinary(pi_bytes.max(1) as i32), true),
            ],
            metadata,
        ));
        let images = UInt32Array::from(batch.images.iter().map(|&i| i as u32).collect::<Vec<_>>());
        let z = FixedSizeBinaryArray::try_from_iter(z.bytes.chunks(z_bytes)).map_err(|e| artifact(&e))?;
        let pi = FixedSizeBinaryArray::try_from_sparse_iter_with_size(pi.into_iter(), pi_bytes.max(1) as i32)
            .map_err(|e| artifact(&e))?;
        let record = RecordBatch::try_new(schema.clone(), vec![Arc::new(images), Arc::new(z), Arc::new(pi)])
            .map_err(|e| artifact(&e))?;
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::artifact(&self.dir, e))?;
        write_atomically(&path, |out| {
            let mut writer = FileWriter::try_new(out, &schema).map_err(|e| artifact(&e))?;
            writer.write(&record).map_err(|e| artifact(&e))?;
            writer.finish().map_err(|e| artifact(&e))
        })
    }

    /// Why the cache cannot serve the images `range` (batches of `image_batch`), or `None` when every
    /// batch file is there and was written for the current fingerprint and batch size.
    pub fn unusable(&self, range: std::ops::Range<usize>) -> Option<String> {
        for first in range.step_by(self.image_batch) {
            let path = self.path(first);
            if !path.is_file() {
                return Some(format!("{} is missing", path.display()));
            }
            match self.is_current(&path) {
                Ok(true) => {}
                Ok(false) => return Some(format!("{} was written for another configuration", path.display())),
                Err(e) => return Some(e.to_string()),
            }
        }
        None
    }

    /// Removes the batch files of earlier runs (another fingerprint or batch size, or unreadable),
    /// which would otherwise stay on disk unused, e.g. after `model.image_batch` changed, and the
    /// temporary files of killed writers. Files of this run, including those another shard is
    /// writing, are current and stay. Returns how many were removed.
    pub fn remove_stale(&self) -> Result<usize> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return Ok(0) };
        let mut removed = remove_abandoned_temporaries(&self.dir, lock::stale_after());
        for entry in entries {
            let path = entry.map_err(|e| Error::artifact(&self.dir, e))?.path();
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if name.starts_with("batch-") && name.ends_with(".arrow") && !self.is_current(&path).unwrap_or(false) {
                std::fs::remove_file(&path).map_err(|e| Error::artifact(&path, e))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Whether the file at `path` was written for the current fingerprint and batch size. Reads
    /// only the footer and schema, where the metadata lives.
    fn is_current(&self, path: &Path) -> Result<bool> {
        let file = File::open(path).map_err(|e| Error::artifact(path, e))?;
        let reader = FileReader::try_new(file, None)
            .map_err(|e| Error::artifact(path, format!("not a readable Arrow IPC file: {e}")))?;
        Ok(current(reader.schema().metadata(), &self.fingerprint, self.image_batch))
    }

    fn read_record(&self, path: &Path) -> Result<RecordBatch> {
        let file = File::open(path).map_err(|e| Error::artifact(path, e))?;
        let reader = FileReader::try_new(file, None)
            .map_err(|e| Error::artifact(path, format!("not a readable Arrow IPC file: {e}")))?;
        let mut records = Vec::new();
        for record in reader {
            records.push(record.map_err(|e| Error::artifact(path, format!("not a readable Arrow IPC file: {e}")))?);
        }
        match records.len() {
            1 => Ok(records.remove(0)),
            n => Err(Error::artifact(path, format!("expected one record batch, found {n}"))),
        }
    }

    /// The cached batch of `images` (one whole batch, split positions), read and checked on the
    /// host (any thread: `rerank` reads the next batch while the device scores this one).
    pub fn read_host(&self, images: &[usize]) -> Result<HostVisionBatch> {
        let path = self.path(images[0]);
        let bad = |msg: &str| Error::artifact(&path, msg);
        let record = self.read_record(&path)?;
        if !current(record.schema_ref().metadata(), &self.fingerprint, self.image_batch) {
            return Err(bad("written for another configuration; rerun `qpert stage extract --force`"));
        }
        let stored: Vec<usize> = record
            .column(0)
            .as_any()
            .downcast_ref::<UInt32Array>()
            .ok_or_else(|| bad("column image_idx is not u32"))?
            .values()
            .iter()
            .map(|&i| i as usize)
            .collect();
        if stored != images {
            return Err(bad(&format!("holds images {stored:?}, expected {images:?}")));
        }
        let metadata = record.schema().metadata().clone();
        let shape = |key: &str| -> Result<Vec<usize>> {
            let text = metadata.get(key).ok_or_else(|| bad(&format!("no {key} in the schema metadata")))?;
            text.split(',').filter(|s| !s.is_empty()).map(|s| s.parse().map_err(|_| bad("malformed shape"))).collect()
        };
        let dtype = match metadata.get(DTYPE_KEY).map(String::as_str) {
            Some("F32") => DType::F32,
            Some("BF16") => DType::BF16,
            Some("F16") => DType::F16,
            other => return Err(bad(&format!("unknown Z dtype {other:?}"))),
        };
        let (b, z_shape, pi_shape) = (self.image_batch, shape(Z_SHAPE_KEY)?, shape(PI_SHAPE_KEY)?);
        let binary = |i: usize| {
            record.column(i).as_any().downcast_ref::<FixedSizeBinaryArray>().ok_or_else(|| bad("not a binary column"))
        };
        let (z, pi) = (binary(1)?, binary(2)?);
        let mut z_bytes = z.value_data().to_vec();
        z_bytes.resize(b * z.value_length() as usize, 0); // zero bits are 0.0 in every float dtype
        let z = TensorData::from_bytes_vec(z_bytes, [b, z_shape[0], z_shape[1]], dtype);
        let perturbed: Vec<bool> = (0..images.len()).map(|i| pi.is_valid(i)).collect();
        let perturbation = match perturbed.iter().any(|&p| p) {
            true => {
                let row = pi_shape.iter().product::<usize>();
                let mut values = vec![0f32; b * row];
                for i in (0..images.len()).filter(|&i| perturbed[i]) {
                    for (v, bytes) in values[i * row..(i + 1) * row].iter_mut().zip(pi.value(i).chunks_exact(4)) {
                        *v = f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
                    }
                }
                let [l, h, d, _] = pi_shape[..] else { return Err(bad("Pi shape is not layers,h,d,d")) };
                Some(TensorData::new(values, [b, l, h, d, d]))
            }
            false => None,
        };
        Ok(HostVisionBatch { images: images.to_vec(), z, perturbation, perturbed })
    }
}

/// A cached batch on the host, padded to `model.image_batch` rows with zeros as
/// [`super::runtime::for_each_image_batch`] pads: Z in its stored dtype, Pi in f32.
pub struct HostVisionBatch {
    images: Vec<usize>,
    z: TensorData,
    perturbation: Option<TensorData>,
    perturbed: Vec<bool>,
}

impl HostVisionBatch {
    /// The batch on `device`.
    pub fn upload(self, device: &Device) -> VisionBatch {
        VisionBatch {
            images: self.images,
            z: Tensor::<3>::from_data(self.z, device).cast(FloatDType::F32),
            perturbation: self.perturbation.map(|pi| Tensor::from_data(pi, device)),
            perturbed: self.perturbed,
        }
    }
}

/// Whether a cache file's schema `metadata` says it was written for extract's `fingerprint` with
/// batches of `image_batch`.
fn current(metadata: &HashMap<String, String>, fingerprint: &str, image_batch: usize) -> bool {
    metadata.get(FINGERPRINT_KEY).map(String::as_str) == Some(fingerprint)
        && metadata.get(IMAGE_BATCH_KEY) == Some(&image_batch.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().try_to_vec::<f32>().unwrap()
    }

    /// A batch of 2 images (padded to 3 rows) written in bf16 reads back on the host, from another
    /// thread, and uploads to the same Z (rounded to bf16), the same Pi for the perturbed image and
    /// zeros for the rest; asking for other images names the file and both lists.
    #[test]
    fn a_written_batch_reads_back_from_another_thread() {
        let dir = tempfile::tempdir().unwrap();
        let device = Device::flex();
        let cache = VisionCache::new(dir.path(), "digest".into(), 3);
        let z: Vec<f32> = (0..3 * 2 * 4).map(|i| i as f32 * 0.25 - 2.0).collect();
        let pi: Vec<f32> = (0..3 * 2 * 4).map(|i| 1.0 + i as f32 / 3.0).collect();
        let batch = VisionBatch {
            images: vec![3, 4],
            z: Tensor::<3>::from_data(TensorData::new(z.clone(), [3, 2, 4]), &device),
            perturbation: Some(Tensor::from_data(TensorData::new(pi.clone(), [3, 1, 2, 2, 2]), &device)),
            perturbed: vec![false, true],
        };
        cache.write(&batch, FloatDType::BF16).unwrap();

        let host = std::thread::scope(|s| s.spawn(|| cache.read_host(&[3, 4])).join().unwrap()).unwrap();
        let read = host.upload(&device);
        assert_eq!(read.images, [3, 4]);
        assert_eq!(read.perturbed, [false, true]);
        let bf16 = |v: f32| half::bf16::from_f32(v).to_f32();
        let expected_z: Vec<f32> = z[..16].iter().map(|&v| bf16(v)).chain([0.0; 8]).collect();
        assert_eq!(values(read.z), expected_z);
        let expected_pi: Vec<f32> = [0.0; 8].into_iter().chain(pi[8..16].iter().copied()).chain([0.0; 8]).collect();
        assert_eq!(values(read.perturbation.unwrap()), expected_pi);

        let err = cache.read_host(&[3, 5]).err().unwrap().to_string();
        assert!(err.contains("batch-000001.arrow") && err.contains("holds images [3, 4], expected [3, 5]"), "{err}");
    }
}
