//! What the model stages share: the model folder's identity in a fingerprint, loading the model on
//! the resolved device, image batches prefetched on CPU threads, the Q-Pert perturbation of a
//! batch, and host vectors to tensors and back.

use std::ops::Range;
use std::path::Path;
use std::sync::mpsc::sync_channel;
use std::sync::{Mutex, PoisonError};

use burn::tensor::{Device, Int, Tensor, TensorData};

use super::Context;
use super::index::IndexTables;
use crate::config::Config;
use crate::data::image::preprocess_batch;
use crate::error::{Error, Result};
use crate::model::{Blip2Model, read_back};
use crate::qpert::{BatchBoxes, PatchGrid, PendingPerturbation, start_query_perturbation};
use crate::store::Fingerprint;
use crate::timing::TimeCounter;

/// Wall time spent decoding and resizing images, on the prefetch thread, overlapping the model
/// (read by `qpert bench`).
pub static PREPROCESS_TIME: TimeCounter = TimeCounter::new();
/// Wall time spent loading model weights (read by `qpert bench`).
pub static LOAD_TIME: TimeCounter = TimeCounter::new();

/// Adds the model folder's identity: `config.json`, the tokenizer files and the safetensors files
/// by content (the weights hashed once per copy, remembered in the output folder), and the run
/// precision and attention kernel.
pub fn with_model(fp: Fingerprint, config: &Config) -> Result<Fingerprint> {
    let dir = &config.model.dir;
    let mut fp = fp
        .with_file_contents("model.config", &dir.join("config.json"))?
        .with("model.precision", format!("{:?}", config.model.precision).to_lowercase())
        .with("model.attention", format!("{:?}", config.model.attention).to_lowercase());
    for name in ["vocab.txt", "tokenizer.json"] {
        let path = dir.join(name);
        if path.exists() {
            fp = fp.with_file_contents(&format!("model.{name}"), &path)?;
        }
    }
    for path in safetensors_files(dir)? {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        fp = fp.with_large_file(&format!("model.{name}"), &path, &config.output.dir)?;
    }
    Ok(fp)
}

fn safetensors_files(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| Error::weights(dir, format!("cannot read the model folder: {e}")))?;
    let mut files: Vec<_> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    Ok(files)
}

/// The model this process loaded last, with its device and the digest of [`with_model`]: `qpert
/// run` loads the weights once for extract, text and rerank (a few seconds each for the real
/// model). A clone shares the weights.
static LOADED_MODEL: Mutex<Option<(String, Device, Blip2Model)>> = Mutex::new(None);

/// Loads the model of `ctx`'s config on its device, in `model.precision` (README, "Precision"),
/// or reuses the one loaded last when its files, precision, attention and device are the same.
pub fn load_model(ctx: &Context) -> Result<(Blip2Model, Device)> {
    let device = ctx.device.require()?.clone();
    let key = with_model(Fingerprint::new("model"), &ctx.config)?.digest();
    let mut loaded = LOADED_MODEL.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((k, d, model)) = loaded.as_ref()
        && *k == key
        && *d == device
    {
        return Ok((model.clone(), device));
    }
    *loaded = None; // the previous model's memory is freed before the next one loads
    let dtype = ctx.config.model.precision.dtype();
    let model = LOAD_TIME
        .time(|| Blip2Model::load_with_dtype(&ctx.config.model.dir, &device, dtype))?
        .with_attention(ctx.config.model.attention);
    *loaded = Some((key, device.clone(), model.clone()));
    Ok((model, device))
}

/// Drops the model [`load_model`] keeps, so that the next stage loads it again (`qpert bench`
/// times each run's loading as `qpert run` pays it).
pub fn forget_loaded_model() {
    *LOADED_MODEL.lock().unwrap_or_else(PoisonError::into_inner) = None;
}

/// A float tensor from host values.
pub fn floats<const D: usize>(values: Vec<f32>, shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// An int tensor from host values.
pub fn ints<const D: usize>(values: Vec<i64>, shape: [usize; D], device: &Device) -> Tensor<D, Int> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// A float tensor's values on the host, row-major. This is where device failures surface: one
/// becomes an error saying what `work` failed and which config `knob` (name, value) sizes it.
pub fn host<const D: usize>(tensor: Tensor<D>, work: &str, knob: Option<(&str, usize)>) -> Result<Vec<f32>> {
    let data = read_back(tensor, work, knob)?;
    Ok(data.try_into_vec_as::<f32>().expect("model outputs are float tensors"))
}

/// Runs `produce` on each of `inputs` in order on another thread, at most two results ahead of
/// `consume`, which takes them in order on this thread: host work (decoding images, reading the
/// vision cache) overlaps the device work `consume` starts. Stops at `consume`'s first error.
pub fn prefetched<I, T>(
    inputs: I,
    produce: impl Fn(I::Item) -> T + Send,
    mut consume: impl FnMut(T) -> Result<()>,
) -> Result<()>
where
    I: IntoIterator,
    I::IntoIter: Send,
    T: Send,
{
    std::thread::scope(|scope| {
        let (sender, receiver) = sync_channel::<T>(2);
        let inputs = inputs.into_iter();
        scope.spawn(move || {
            for input in inputs {
                if sender.send(produce(input)).is_err() {
                    return; // the consuming side stopped on an error
                }
            }
        });
        for value in receiver {
            consume(value)?;
        }
        Ok(())
    })
}

/// The split positions of `range` in consecutive batches of `batch_size` (the last may be shorter).
pub fn batches(range: Range<usize>, batch_size: usize) -> impl Iterator<Item = Vec<usize>> + Send {
    let end = range.end;
    range.step_by(batch_size).map(move |start| (start..(start + batch_size).min(end)).collect())
}

/// Decodes and resizes the images `range` of the split in batches of `batch_size` on the rayon
/// pool, ahead of the model ([`prefetched`]), and calls `work(split_positions, pixel_values)`
/// for each batch in order on this thread. A last, partial batch is padded with black images to
/// `batch_size`, so that the model sees one shape (CubeCL compiles and autotunes every new shape);
/// rows past `split_positions.len()` are padding. The first image that fails to decode stops the
/// stage with an error naming it (parts already written stay).
/// Shapes: pixel_values [batch_size,3,s,s].
pub fn for_each_image_batch(
    index: &IndexTables,
    range: Range<usize>,
    batch_size: usize,
    size: usize,
    device: &Device,
    mut work: impl FnMut(&[usize], Tensor<4>) -> Result<()>,
) -> Result<()> {
    let images = &index.images;
    let decode = |batch: Vec<usize>| {
        let paths: Vec<&Path> = batch.iter().map(|&i| images[i].path.as_path()).collect();
        let pixels = PREPROCESS_TIME.time(|| preprocess_batch(&paths, size as u32));
        (batch, pixels)
    };
    prefetched(batches(range, batch_size), decode, |(batch, pixels)| {
        let mut pixels: Vec<f32> = pixels.into_iter().collect::<Result<Vec<_>>>()?.concat();
        pixels.resize(batch_size * 3 * size * size, 0.0);
        work(&batch, floats(pixels, [batch_size, 3, size, size], device))
    })
}

/// The kept boxes of a batch's images (`images` = split positions) as Q-Pert token weights.
pub fn batch_boxes(index: &IndexTables, images: &[usize], grid: PatchGrid) -> BatchBoxes {
    let mut boxes = BatchBoxes::default();
    for (slot, &image) in images.iter().enumerate() {
        for b in &index.boxes[image] {
            boxes.push(slot, &b.object, b.area as f32, b.mask_width, b.mask_height, grid);
        }
    }
    boxes
}

/// A batch of images through the vision tower, with its Q-Pert perturbation.
pub struct VisionBatch {
    /// Split positions of the batch's images.
    pub images: Vec<usize>,
    /// Vision tokens [B,t,dv], B = `model.image_batch`: rows past `images.len()` are padding.
    pub z: Tensor<3>,
    /// Pi [B, layers, h, d, d] (zero for padding); `None` when Q-Pert is off or no image of the
    /// batch has a box.
    pub perturbation: Option<Tensor<5>>,
    /// Per image: whether Pi perturbs it (Q-Pert on and the image has a kept box).
    pub perturbed: Vec<bool>,
}

/// Runs the vision tower and Q-Pert over the images `range` in batches of `model.image_batch` and
/// calls `work` for each batch in order. Software-pipelined so that neither side waits: while
/// batch i's eigendecompositions run on CPU threads, the device computes batch i+1's vision tokens
/// and then `work` on batch i-1 (whose Pi is ready by then). Images are decoded ahead on other
/// threads ([`for_each_image_batch`]).
pub fn for_each_vision_batch(
    index: &IndexTables,
    range: Range<usize>,
    model: &Blip2Model,
    config: &Config,
    device: &Device,
    mut work: impl FnMut(VisionBatch) -> Result<()>,
) -> Result<()> {
    let grid = patch_grid(model);
    let settings = config.qpert.settings();
    let mut in_flight: Option<(VisionBatch, Option<PendingPerturbation>)> = None;
    let finish = |(mut batch, pending): (VisionBatch, Option<PendingPerturbation>)| {
        batch.perturbation = pending.map(PendingPerturbation::finish);
        batch
    };
    for_each_image_batch(index, range, config.model.image_batch, grid.image_size, device, |images, pixel_values| {
        let boxes = batch_boxes(index, images, grid);
        let z = model.vision_tokens(pixel_values)?;
        let pending = match config.qpert.enabled && !boxes.is_empty() {
            true => start_query_perturbation(&model.cross_attention_keys(z.clone())?, &boxes, &settings)?,
            false => None,
        };
        let perturbed = (0..images.len()).map(|slot| pending.is_some() && boxes.image.contains(&slot)).collect();
        let batch = VisionBatch { images: images.to_vec(), z, perturbation: None, perturbed };
        if let Some(previous) = in_flight.replace((batch, pending)) {
            work(finish(previous))?;
        }
        Ok(())
    })?;
    in_flight.map_or(Ok(()), |last| work(finish(last)))
}

/// The vision tower's patch grid.
pub fn patch_grid(model: &Blip2Model) -> PatchGrid {
    let v = &model.config().vision_config;
    PatchGrid { image_size: v.image_size, patch_size: v.patch_size }
}
