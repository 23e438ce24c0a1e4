//! Gram matrices of the keys under each box's token weights (method.md section 4), on the device:
//! C = (diag(w) K)^T (diag(w) K) = sum_t w_t^2 k_t k_t^T per box, cross-attention layer and head.
//!
//! The keys never leave the device; only these small d x d matrices cross to the host for the
//! eigendecompositions, and the combined Pi crosses back. The products are accumulated in f64: an
//! f32 Gram matrix moves the `official` projector by ~3e-5 (measured against the f64 reference),
//! and alpha = 8 multiplies that; the f64 work is a few GFLOP per image, negligible next to the ViT.

use burn::tensor::{FloatDType, Int, Tensor};

/// Shapes: keys per cross-attention layer [b,h,t,d], box_weights [n,t],
/// box_image [n] (index into b) -> grams [n, layers, h, d, d] (f64).
pub fn gram_matrices(keys: &[Tensor<4>], box_weights: Tensor<2>, box_image: Tensor<1, Int>) -> Tensor<5> {
    let [n, t] = box_weights.dims();
    let box_weights = box_weights.cast(FloatDType::F64);
    let squared = (box_weights.clone() * box_weights).reshape([n, 1, t, 1]);
    let per_layer: Vec<Tensor<4>> = keys
        .iter()
        .map(|k| {
            let k = k.clone().select(0, box_image.clone()).cast(FloatDType::F64);
            let weighted = k.clone() * squared.clone();
            weighted.swap_dims(2, 3).matmul(k)
        })
        .collect();
    Tensor::stack(per_layer, 1)
}
