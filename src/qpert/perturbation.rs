//! The per-image query perturbation Pi (method.md sections 4-5): for every cross-attention layer
//! and head, the mean over the image's kept boxes of alpha_o * P_o, where P_o projects onto the
//! box's key subspace. The model applies it as q' = q + q Pi to the query rows.
//!
//! This file is host-side arithmetic on small matrices; the Gram matrices come from the device
//! (see [`super::gram`]) and Pi goes back to it.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::subspace::{Components, KeySubspace, ProjectorKind};
use crate::timing::TimeCounter;

/// Wall time spent in the key-subspace eigendecompositions (read by `qpert bench`).
pub static EIGEN_TIME: TimeCounter = TimeCounter::new();

/// How each box's perturbation strength depends on its area a (`[qpert] weight`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlphaWeight {
    /// alpha for every box (the published setting).
    Constant,
    /// alpha * a.
    NormArea,
    /// -alpha * a: what the released code does (its comment says 1 - a).
    NormAreaInv,
    /// alpha * (a - 0.5).
    CenteredArea,
    /// alpha * (0.5 - a).
    CenteredAreaInv,
}

impl AlphaWeight {
    /// The weight alpha_o of a box of area ratio `area`.
    pub fn alpha_for(self, alpha: f32, area: f32) -> f32 {
        match self {
            AlphaWeight::Constant => alpha,
            AlphaWeight::NormArea => alpha * area,
            AlphaWeight::NormAreaInv => -alpha * area,
            AlphaWeight::CenteredArea => alpha * (area - 0.5),
            AlphaWeight::CenteredAreaInv => alpha * (0.5 - area),
        }
    }
}

/// The method's settings, as in the `[qpert]` config section.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QpertSettings {
    pub alpha: f32,
    pub components: Components,
    pub weight: AlphaWeight,
    pub projector: ProjectorKind,
}

impl QpertSettings {
    /// The published setting: alpha 8, tau 0.99, constant weight, official projector.
    pub fn published() -> Self {
        QpertSettings {
            alpha: 8.0,
            components: Components::Ratio(0.99),
            weight: AlphaWeight::Constant,
            projector: ProjectorKind::Official,
        }
    }
}

/// Gram matrices of a batch of boxes, as they come back from the device.
pub struct BoxGrams<'a> {
    /// Row-major [n_boxes, layers, heads, d, d].
    pub grams: &'a [f64],
    /// For each box, the index of its image in the batch.
    pub box_image: &'a [usize],
    /// For each box, its area ratio (for the area weights).
    pub box_area: &'a [f32],
    pub layers: usize,
    pub heads: usize,
    pub dim: usize,
}

/// Pi for each image of a batch: row-major [images, layers, heads, d, d]. Images without boxes get
/// zeros, which leaves their queries exactly unchanged (q + q 0 = q).
pub fn image_perturbations(boxes: &BoxGrams<'_>, images: usize, settings: &QpertSettings) -> Vec<f32> {
    let d2 = boxes.dim * boxes.dim;
    let per_image = boxes.layers * boxes.heads * d2;
    let mut boxes_of_image = vec![0usize; images];
    for &i in boxes.box_image {
        boxes_of_image[i] += 1;
    }
    // One projector per (box, layer, head), decomposed in parallel.
    let projectors: Vec<Vec<f32>> = EIGEN_TIME.time(|| {
        boxes
            .grams
            .par_chunks(d2)
            .map(|gram| {
                let subspace = KeySubspace::of_gram(gram, boxes.dim);
                let m = subspace.num_components(settings.components);
                subspace.projector(settings.projector, m)
            })
            .collect()
    });
    let mut pi = vec![0f32; images * per_image];
    for (o, &image) in boxes.box_image.iter().enumerate() {
        let alpha = settings.weight.alpha_for(settings.alpha, boxes.box_area[o]);
        let scale = alpha / boxes_of_image[image] as f32;
        let target = &mut pi[image * per_image..(image + 1) * per_image];
        for (lh, projector) in
            projectors[o * boxes.layers * boxes.heads..][..boxes.layers * boxes.heads].iter().enumerate()
        {
            for (t, p) in target[lh * d2..(lh + 1) * d2].iter_mut().zip(projector) {
                *t += scale * p;
            }
        }
    }
    pi
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn area_weights_follow_the_released_semantics() {
        assert_eq!(AlphaWeight::Constant.alpha_for(8.0, 0.25), 8.0);
        assert_eq!(AlphaWeight::NormArea.alpha_for(8.0, 0.25), 2.0);
        assert_eq!(AlphaWeight::NormAreaInv.alpha_for(8.0, 0.25), -2.0);
        assert_eq!(AlphaWeight::CenteredArea.alpha_for(8.0, 0.25), -2.0);
        assert_eq!(AlphaWeight::CenteredAreaInv.alpha_for(8.0, 0.25), 2.0);
    }

    #[test]
    fn pi_is_the_mean_of_weighted_projectors_and_zero_without_boxes() {
        // d = 2, one layer, one head; image 0 has two boxes along e_1 and e_2, image 1 none.
        let grams = [4.0, 0.0, 0.0, 0.0, /* box 1 */ 0.0, 0.0, 0.0, 9.0];
        let boxes = BoxGrams { grams: &grams, box_image: &[0, 0], box_area: &[0.5, 0.5], layers: 1, heads: 1, dim: 2 };
        let settings = QpertSettings { components: Components::Count(1), ..QpertSettings::published() };
        let pi = image_perturbations(&boxes, 2, &settings);
        // mean(8 e1 e1^T, 8 e2 e2^T) = 4 I.
        assert_eq!(pi, vec![4.0, 0.0, 0.0, 4.0, 0.0, 0.0, 0.0, 0.0]);
    }
}
