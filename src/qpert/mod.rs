//! Object-Aware Query Perturbation (method.md sections 3-5): object boxes become token weights
//! ([`boxes`]), the keys under those weights become Gram matrices on the device ([`gram`]), their
//! eigendecompositions become key-subspace projectors ([`subspace`]), and the projectors of an
//! image's boxes combine into the per-layer, per-head perturbation Pi ([`perturbation`]) that the
//! model applies to its query rows.

pub mod boxes;
pub mod gram;
pub mod perturbation;
pub mod subspace;

use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::error::Result;
use crate::timing::TimeCounter;

pub use boxes::{ObjectBox, PatchGrid, patch_weights};
pub use perturbation::{AlphaWeight, QpertSettings};
pub use subspace::{Components, ProjectorKind};

/// The kept boxes of a batch of images, already turned into token weights.
#[derive(Debug, Clone, Default)]
pub struct BatchBoxes {
    /// Row-major [n_boxes, t] token weights (see [`patch_weights`]).
    pub weights: Vec<f32>,
    /// For each box, its image's position in the batch.
    pub image: Vec<usize>,
    /// For each box, its area ratio.
    pub area: Vec<f32>,
}

impl BatchBoxes {
    /// Adds a box of the batch's image `image`, whose mask is built at `mask_width` x `mask_height`
    /// (the annotation's image size) and whose area ratio is `area`.
    pub fn push(
        &mut self,
        image: usize,
        object: &ObjectBox,
        area: f32,
        mask_width: u32,
        mask_height: u32,
        grid: PatchGrid,
    ) {
        self.weights.extend(patch_weights(object, mask_width, mask_height, grid));
        self.image.push(image);
        self.area.push(area);
    }

    /// Number of boxes.
    pub fn len(&self) -> usize {
        self.image.len()
    }

    /// Whether no image of the batch has a box.
    pub fn is_empty(&self) -> bool {
        self.image.is_empty()
    }
}

/// Pi for a batch of `images`, from their cross-attention keys (one [b,h,t,d] tensor per layer).
/// Returns `None` when no image has a box (the model then runs unperturbed).
///
/// Shapes: keys [b,h,t,d] per layer -> Pi [b, layers, h, d, d].
pub fn query_perturbation(
    keys: &[Tensor<4>],
    boxes: &BatchBoxes,
    settings: &QpertSettings,
) -> Result<Option<Tensor<5>>> {
    Ok(start_query_perturbation(keys, boxes, settings)?.map(PendingPerturbation::finish))
}

/// [`query_perturbation`] in two halves, so that the caller keeps the device busy while the CPU
/// works: this half computes the Gram matrices on the device, waits for them, and starts their
/// eigendecompositions on CPU threads; [`PendingPerturbation::finish`] collects Pi.
pub fn start_query_perturbation(
    keys: &[Tensor<4>],
    boxes: &BatchBoxes,
    settings: &QpertSettings,
) -> Result<Option<PendingPerturbation>> {
    if boxes.is_empty() {
        return Ok(None);
    }
    let [images, heads, tokens, dim] = keys[0].dims();
    let device: Device = keys[0].device();
    let n = boxes.len();
    let weights = Tensor::<2>::from_data(TensorData::new(boxes.weights.clone(), [n, tokens]), &device);
    let image_index: Vec<i64> = boxes.image.iter().map(|&i| i as i64).collect();
    let image_index = Tensor::<1, Int>::from_data(TensorData::new(image_index, [n]), &device);
    let grams = gram::gram_matrices(keys, weights, image_index);
    // The boxes, and so the Gram matrices, grow with the image batch (the stages pad every batch
    // to `model.image_batch` images): that is the knob to turn when they do not fit.
    let grams = crate::model::read_back(grams, "the Q-Pert Gram matrices", Some(("model.image_batch", images)))?;
    let grams: Vec<f64> = grams.try_into_vec_as::<f64>().expect("f64 gram matrices");
    let layers = keys.len();
    let (box_image, box_area, settings) = (boxes.image.clone(), boxes.area.clone(), *settings);
    let worker = std::thread::spawn(move || {
        let grams =
            perturbation::BoxGrams { grams: &grams, box_image: &box_image, box_area: &box_area, layers, heads, dim };
        perturbation::image_perturbations(&grams, images, &settings)
    });
    Ok(Some(PendingPerturbation { worker, shape: [images, layers, heads, dim, dim], device }))
}

/// Wall time the caller spent waiting in [`PendingPerturbation::finish`] for eigendecompositions
/// that the device work in between did not hide (read by `qpert bench`).
pub static EIGEN_WAIT_TIME: TimeCounter = TimeCounter::new();

/// A batch's Pi being computed on CPU threads (see [`start_query_perturbation`]).
pub struct PendingPerturbation {
    worker: std::thread::JoinHandle<Vec<f32>>,
    shape: [usize; 5],
    device: Device,
}

impl PendingPerturbation {
    /// Waits for the eigendecompositions and uploads Pi [b, layers, h, d, d].
    pub fn finish(self) -> Tensor<5> {
        let pi = EIGEN_WAIT_TIME.time(|| self.worker.join()).unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        Tensor::from_data(TensorData::new(pi, self.shape), &self.device)
    }
}
