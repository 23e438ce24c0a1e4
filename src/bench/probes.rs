//! The model's two hot paths timed outside the stages, on synthetic inputs of the bench's model:
//! the vision tower (per attention kernel) and ITM (per cross-attention layout), and the matrix
//! products of each alone. Each runs once to pay kernel compilation and autotuning on a GPU, then
//! once timed.

use std::time::Instant;

use burn::tensor::module::linear;
use burn::tensor::{Device, Distribution, FloatDType, Tensor, TensorData};

use crate::data::tokenizer::TokenBatch;
use crate::error::Result;
use crate::model::{Blip2Model, read_back};

use super::flops::Matmul;

/// Waits for `x` and reads it back: where device work is synchronised and its failures surface.
pub fn sync<const D: usize>(x: Tensor<D>) -> Result<TensorData> {
    read_back(x, "a bench measurement", None)
}

/// `images` black images of the model's input size.
pub fn blank_images(model: &Blip2Model, images: usize, device: &Device) -> Tensor<4> {
    let s = model.config().vision_config.image_size;
    Tensor::<4>::zeros([images, 3, s, s], device)
}

/// Milliseconds per image of the vision tower alone on a batch of `images` blank images (the ViT's
/// cost does not depend on the pixels).
pub fn vision_ms_per_image(model: &Blip2Model, images: usize, device: &Device) -> Result<f64> {
    sync(model.vision_tokens(blank_images(model, images, device))?)?;
    let start = Instant::now();
    sync(model.vision_tokens(blank_images(model, images, device))?)?;
    Ok(start.elapsed().as_secs_f64() * 1e3 / images as f64)
}

/// ITM pairs per second: one batch of `pairs` pairs over `images` images (random Z, a zero Q-Pert
/// perturbation so that its product is paid) with texts of `len` tokens, as one `rerank` chunk
/// runs them: grouped by image, `run` consecutive pairs each ([`PAIRS_PER_IMAGE`] as in
/// Flickr30K). The images' keys and values and the texts' first layer are computed outside the
/// timing, as `rerank` computes them once for all the pairs of an image batch and of a text.
pub fn itm_pairs_per_s(
    model: &Blip2Model,
    images: usize,
    pairs: usize,
    run: usize,
    len: usize,
    device: &Device,
) -> Result<f64> {
    let config = model.config();
    let (v, q) = (&config.vision_config, &config.qformer_config);
    let z = Tensor::<3>::random([images, v.num_tokens(), v.hidden_size], Distribution::Normal(0.0, 1.0), device);
    let pi_shape = [images, q.num_cross_layers(), q.num_attention_heads, q.head_dim(), q.head_dim()];
    let itm = model.itm_images(z, Some(Tensor::<5>::zeros(pi_shape, device)))?;
    let slots: Vec<usize> = (0..pairs).map(|i| (i / run) % images).collect();
    // Token 1 is in every vocabulary; the texts' content does not change the cost.
    let tokens = TokenBatch { input_ids: vec![1; pairs * len], attention_mask: vec![1; pairs * len], len };
    let texts = model.itm_texts(&tokens, device)?;
    let pair_text: Vec<usize> = (0..pairs).collect();
    sync(model.itm_pair_logits(&itm, &slots, &texts, &pair_text, device)?)?;
    let start = Instant::now();
    sync(model.itm_pair_logits(&itm, &slots, &texts, &pair_text, device)?)?;
    Ok(pairs as f64 / start.elapsed().as_secs_f64())
}

/// How many consecutive pairs of a chunk the ITM probe gives each image: in Flickr30K at k = 64,
/// each image has its 64 image-to-text candidates and more, so a `rerank` chunk holds few images.
pub const PAIRS_PER_IMAGE: usize = 64;

/// Seconds for `items` items to run just the matrix products `matmuls` in `dtype`, on random
/// operands: a weight product as the model's `Linear` runs it (burn's `linear` on [items, m, k]
/// with a weight stored [n, k], PyTorch's layout, used transposed), an attention product as a
/// batched matmul over [items, h], or over [items / group, h] with group x m rows each when
/// `group` items share its right operand. It is the floor the forward would reach if everything between
/// its products (softmax, LayerNorm, GELU, bias, casts, gathers) were free. Each shape runs once
/// to pay compilation and autotuning, then up to [`MATMUL_REPEATS`] times timed, scaled to its
/// count.
pub fn matmul_seconds(matmuls: &[Matmul], items: usize, dtype: FloatDType, device: &Device) -> Result<f64> {
    let mut seconds = 0.0;
    for mm in matmuls {
        // Grouped head products cover whole groups: time them for as many items as they hold.
        let groups = items.div_ceil(mm.group);
        let covered = if mm.heads.is_some() { groups * mm.group } else { items };
        let product: Box<dyn Fn() -> Tensor<4>> = match mm.heads {
            None => {
                let input = random([items, mm.m, mm.k], dtype, device);
                let weight = random([mm.n, mm.k], dtype, device).transpose();
                Box::new(move || linear(input.clone(), weight.clone(), None).unsqueeze())
            }
            Some(h) => {
                let lhs = random([groups, h, mm.group * mm.m, mm.k], dtype, device);
                let rhs = random([groups, h, mm.k, mm.n], dtype, device);
                Box::new(move || lhs.clone().matmul(rhs.clone()))
            }
        };
        sync(product())?;
        let repeats = mm.count.min(MATMUL_REPEATS);
        let start = Instant::now();
        // Every product is kept until the last is read back, so none can be skipped.
        let products: Vec<Tensor<4>> = (0..repeats).map(|_| product()).collect();
        sync(products[repeats - 1].clone())?;
        seconds += start.elapsed().as_secs_f64() * mm.count as f64 / repeats as f64 * items as f64 / covered as f64;
    }
    Ok(seconds)
}

/// The most products of one shape [`matmul_seconds`] times (their outputs stay in memory until
/// read back: 8 of ViT-g's MLP products over 32 images take 2.2 GB in bf16).
const MATMUL_REPEATS: usize = 8;

/// Standard normal values in `dtype`.
fn random<const D: usize>(dims: [usize; D], dtype: FloatDType, device: &Device) -> Tensor<D> {
    Tensor::<D>::random(dims, Distribution::Normal(0.0, 1.0), device).cast(dtype)
}
