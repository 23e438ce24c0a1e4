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
pub fn query_perturbation(keys: &[Tensor<4>], boxes: &BatchBoxes, settings: &QpertSettings) -> Option<Tensor<5>> {
    if boxes.is_empty() {
        return None;
    }
    let [images, heads, tokens, dim] = keys[0].dims();
    let device: Device = keys[0].device();
    let n = boxes.len();
    let weights = Tensor::<2>::from_data(TensorData::new(boxes.weights.clone(), [n, tokens]), &device);
    let image_index: Vec<i64> = boxes.image.iter().map(|&i| i as i64).collect();
    let image_index = Tensor::<1, Int>::from_data(TensorData::new(image_index, [n]), &device);
    let grams = gram::gram_matrices(keys, weights, image_index);
    let grams: Vec<f64> = grams.into_data().try_into_vec_as::<f64>().expect("f64 gram matrices");
    let pi = perturbation::image_perturbations(
        &perturbation::BoxGrams {
            grams: &grams,
            box_image: &boxes.image,
            box_area: &boxes.area,
            layers: keys.len(),
            heads,
            dim,
        },
        images,
        settings,
    );
    Some(Tensor::from_data(TensorData::new(pi, [images, keys.len(), heads, dim, dim]), &device))
}
