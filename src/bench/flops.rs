//! The matrix products of the BLIP-2 forwards, from the configuration alone, and their counted
//! floating-point operations (2 m k n each; no softmax, LayerNorm or GELU). The counts are the work
//! an efficient implementation must do, with each image's cross-attention keys and values computed
//! once and reused by all its ITM pairs (so the Q-Pert keys are not counted a second time); this is
//! the arithmetic floor the issue's targets are measured against (ViT-g at 364 px: 1.43 TFLOP per
//! image; one ITM pair: about 12 GFLOP). The same lists give the bench's matmul-floor probe
//! (`probes::matmul_seconds`) its shapes.

use crate::data::tokenizer::MAX_LEN;
use crate::model::Blip2Config;

/// `count` matrix products [m, k] x [k, n] per item (an image, a text, a pair).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Matmul {
    /// How many times the item runs this product (layers, or q/k/v/output projections x layers).
    pub count: usize,
    /// `None`: a layer's weight [k, n], shared by the items, whose m rows stack into one product;
    /// `Some(h)`: h products of the item's own operands side by side (attention heads).
    pub heads: Option<usize>,
    /// For head products: how many consecutive items share the right operand and run as one
    /// product of `group` x m rows (in ITM's cross-attention, the pairs of one image run share its
    /// keys, values and Pi); 1 otherwise.
    pub group: usize,
    pub m: usize,
    pub k: usize,
    pub n: usize,
}

impl Matmul {
    /// FLOPs per item.
    pub fn flops(&self) -> f64 {
        2.0 * (self.count * self.heads.unwrap_or(1)) as f64 * (self.m * self.k * self.n) as f64
    }
}

/// FLOPs per item of a list of products.
pub fn total(matmuls: &[Matmul]) -> f64 {
    matmuls.iter().map(Matmul::flops).sum()
}

fn weight(count: usize, m: usize, k: usize, n: usize) -> Matmul {
    Matmul { count, heads: None, group: 1, m, k, n }
}

fn per_item(count: usize, heads: usize, m: usize, k: usize, n: usize) -> Matmul {
    Matmul { count, heads: Some(heads), group: 1, m, k, n }
}

/// A head product that `run` consecutive items share the right operand of.
fn per_run(count: usize, heads: usize, m: usize, k: usize, n: usize, run: usize) -> Matmul {
    Matmul { group: run, ..per_item(count, heads, m, k, n) }
}

/// The vision tower on one image: the patch embedding (a convolution in the model, a product of
/// the same size here), then per layer the fused qkv projection, the two attention products over
/// `attention_len` tokens (the real count, or the padded one an attention kernel runs), the output
/// projection and the MLP.
pub fn vision_matmuls(c: &Blip2Config, attention_len: usize) -> Vec<Matmul> {
    let v = &c.vision_config;
    let (layers, t, d, i, h) =
        (v.num_hidden_layers, v.num_tokens(), v.hidden_size, v.intermediate_size, v.num_attention_heads);
    let (dh, ta) = (d / h, attention_len);
    vec![
        weight(1, v.grid() * v.grid(), v.num_channels * v.patch_size * v.patch_size, d),
        weight(layers, t, d, 3 * d),
        per_item(layers, h, ta, dh, ta),
        per_item(layers, h, ta, ta, dh),
        weight(layers, t, d, d),
        weight(layers, t, d, i),
        weight(layers, t, i, d),
    ]
}

/// The self-attention (q, k, v and output projections, the two attention products over all
/// `queries + text` rows) and the text rows' feed-forward of `layers` Q-Former layers: the part of
/// a layer that depends on the text alone before the first cross-attention.
fn self_attention_and_text_ffn(c: &Blip2Config, queries: usize, text: usize, layers: usize) -> Vec<Matmul> {
    let q = &c.qformer_config;
    let (h, dq, i) = (q.num_attention_heads, q.hidden_size, q.intermediate_size);
    let (n, dh) = (queries + text, q.head_dim());
    let mut matmuls = vec![weight(4 * layers, n, dq, dq), per_item(layers, h, n, dh, n), per_item(layers, h, n, n, dh)];
    if text > 0 {
        matmuls.extend([weight(layers, text, dq, i), weight(layers, text, i, dq)]);
    }
    matmuls
}

/// A Q-Former pass over `queries` query rows followed by `text` text rows, with the first layer's
/// self-attention and text feed-forward only when `with_first_layer` (an ITM pair reuses its
/// text's, `Blip2Model::itm_texts`): per layer the self-attention and each block's feed-forward on
/// its own rows; the query rows also cross-attend, in every cross-attention layer, to `kv_len` key
/// rows of the image (query and output projections, the Q-Pert product q Pi, and the two attention
/// products, the last three per run of `run` items of one image).
fn qformer_matmuls(
    c: &Blip2Config,
    queries: usize,
    text: usize,
    kv_len: usize,
    with_first_layer: bool,
    run: usize,
) -> Vec<Matmul> {
    let q = &c.qformer_config;
    let (layers, cross, h, dq, i) =
        (q.num_hidden_layers, q.num_cross_layers(), q.num_attention_heads, q.hidden_size, q.intermediate_size);
    let dh = q.head_dim();
    let mut matmuls = self_attention_and_text_ffn(c, queries, text, layers - usize::from(!with_first_layer));
    if queries > 0 {
        matmuls.extend([
            weight(2 * cross, queries, dq, dq),
            per_run(cross, h, queries, dh, dh, run),
            per_run(cross, h, queries, dh, kv_len, run),
            per_run(cross, h, queries, kv_len, dh, run),
            weight(layers, queries, dq, i),
            weight(layers, queries, i, dq),
        ]);
    }
    matmuls
}

/// One ITM pair with a text of `text_len` tokens against `kv_len` key rows, as `rerank` runs it
/// (K/V and the text's first layer excluded: computed once per image and per text): the joint
/// [queries; text] pass from the first cross-attention on, and the ITM head on the query rows;
/// the cross-attention products per run of `run` pairs of one image.
pub fn itm_matmuls(c: &Blip2Config, text_len: usize, kv_len: usize, run: usize) -> Vec<Matmul> {
    let q = c.num_query_tokens;
    let mut matmuls = qformer_matmuls(c, q, text_len, kv_len, false, run);
    matmuls.push(weight(1, q, c.qformer_config.hidden_size, 2));
    matmuls
}

/// One ITM text of `text_len` tokens: its first Q-Former layer up to the cross-attention, computed
/// once for all its pairs.
pub fn itm_text_matmuls(c: &Blip2Config, text_len: usize) -> Vec<Matmul> {
    self_attention_and_text_ffn(c, c.num_query_tokens, text_len, 1)
}

/// The vision tower on one image, unpadded.
pub fn vision(c: &Blip2Config) -> f64 {
    total(&vision_matmuls(c, c.vision_config.num_tokens()))
}

/// The cross-attention keys and values of one image in every cross-attention layer (computed once
/// per image, shared by the ITC pass, the Q-Pert Gram matrices and all the image's ITM pairs).
pub fn cross_kv(c: &Blip2Config) -> f64 {
    let q = &c.qformer_config;
    let v = &c.vision_config;
    total(&[weight(2 * q.num_cross_layers(), v.num_tokens(), v.hidden_size, q.hidden_size)])
}

/// One Q-Pert Gram matrix set of a box: K^T diag(w) K per cross-attention layer and head.
pub fn box_gram(c: &Blip2Config) -> f64 {
    let q = &c.qformer_config;
    let d = q.head_dim();
    total(&[per_item(q.num_cross_layers(), q.num_attention_heads, d, c.vision_config.num_tokens(), d)])
}

/// The ITC image features of one image (K/V excluded): the queries alone through the Q-Former,
/// then the ITC projection.
pub fn image_features(c: &Blip2Config) -> f64 {
    let q = c.num_query_tokens;
    let mut matmuls = qformer_matmuls(c, q, 0, c.vision_config.num_tokens(), true, 1);
    matmuls.push(weight(1, q, c.qformer_config.hidden_size, c.image_text_hidden_size));
    total(&matmuls)
}

/// The ITC text features of one caption (35 tokens): a text-only Q-Former pass and the projection.
pub fn text_features(c: &Blip2Config) -> f64 {
    let mut matmuls = qformer_matmuls(c, 0, MAX_LEN, 0, true, 1);
    matmuls.push(weight(1, 1, c.qformer_config.hidden_size, c.image_text_hidden_size));
    total(&matmuls)
}

/// One ITM pair at the full caption length, unpadded keys, its text's first layer included: the
/// issue's per-pair floor, which the bench's rerank TFLOP/s is counted against.
pub fn itm_pair(c: &Blip2Config) -> f64 {
    total(&itm_matmuls(c, MAX_LEN, c.vision_config.num_tokens(), 1)) + total(&itm_text_matmuls(c, MAX_LEN))
}

/// The ITC scores of `images` x `texts` pairs: every query row against every text.
pub fn itc_scores(c: &Blip2Config, images: f64, texts: f64) -> f64 {
    2.0 * images * c.num_query_tokens as f64 * texts * c.image_text_hidden_size as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_coco_model_matches_the_issue_figures() {
        let c = Blip2Config::itm_vit_g_coco();
        // ViT-g at 364 px: 1.43 TFLOP per image.
        assert!((vision(&c) / 1e12 - 1.434).abs() < 0.01, "{}", vision(&c));
        // One ITM pair with per-image K/V reuse: about 12 GFLOP.
        assert!((itm_pair(&c) / 1e9 - 12.4).abs() < 0.3, "{}", itm_pair(&c));
        // Flickr30K: 1,000 ViT passes + 384,000 ITM pairs, about 6 PFLOP.
        let flickr = 1000.0 * vision(&c) + 384_000.0 * itm_pair(&c);
        assert!((flickr / 1e15 - 6.2).abs() < 0.3, "{flickr}");
    }

    /// The lists against the closed forms, by hand: a transformer layer of n tokens of width d
    /// with MLP width i costs 8 n d^2 (projections) + 4 n^2 d (attention) + 4 n d i (MLP).
    #[test]
    fn the_lists_add_up_to_the_closed_forms() {
        let c = Blip2Config::itm_vit_g_coco();
        let v = &c.vision_config;
        let (t, d, i) = (v.num_tokens() as f64, v.hidden_size as f64, v.intermediate_size as f64);
        let embed = 2.0 * (v.grid() * v.grid() * 3 * v.patch_size * v.patch_size) as f64 * d;
        let layer = 8.0 * t * d * d + 4.0 * t * t * d + 4.0 * t * d * i;
        assert!((vision(&c) - embed - v.num_hidden_layers as f64 * layer).abs() < 1.0);

        let q = &c.qformer_config;
        let (rows, l, dq, iq) = (32.0, MAX_LEN as f64, q.hidden_size as f64, q.intermediate_size as f64);
        let n = rows + l;
        let self_attention = 8.0 * n * dq * dq + 4.0 * n * n * dq;
        let ffn = 4.0 * n * dq * iq;
        let cross = 4.0 * rows * dq * dq + 4.0 * rows * t * dq + 2.0 * rows * dq * q.head_dim() as f64;
        let expected = 12.0 * (self_attention + ffn) + 6.0 * cross + 2.0 * rows * dq * 2.0;
        assert!((itm_pair(&c) - expected).abs() < 1.0, "{} vs {expected}", itm_pair(&c));

        // Padding the attention to 704 tokens adds only attention products.
        let padded = total(&vision_matmuls(&c, 704));
        let extra = v.num_hidden_layers as f64 * 4.0 * (704.0 * 704.0 - t * t) * d;
        assert!((padded - vision(&c) - extra).abs() < 1.0);
        // Shorter texts cost less.
        assert!(total(&itm_matmuls(&c, 24, 677, 1)) < total(&itm_matmuls(&c, MAX_LEN, 677, 1)));
        // Runs change the products' shapes, not their FLOPs.
        assert_eq!(total(&itm_matmuls(&c, 24, 677, 64)), total(&itm_matmuls(&c, 24, 677, 1)));
        // The text's first layer, run once per text: one layer's self-attention and text FFN.
        let first_layer = 8.0 * n * dq * dq + 4.0 * n * n * dq + 4.0 * l * dq * iq;
        assert!((total(&itm_text_matmuls(&c, MAX_LEN)) - first_layer).abs() < 1.0);
        assert!((first_layer / itm_pair(&c) - 0.054).abs() < 0.002, "{}", first_layer / itm_pair(&c));
    }

    #[test]
    fn counts_scale_with_the_shapes() {
        let c = Blip2Config::itm_vit_g_coco();
        let mut deeper = c.clone();
        deeper.vision_config.num_hidden_layers *= 2;
        assert!(vision(&deeper) > 1.99 * vision(&c));
        assert_eq!(itc_scores(&c, 2.0, 3.0), 2.0 * 2.0 * 32.0 * 3.0 * 256.0);
        assert!(text_features(&c) < itm_pair(&c));
        assert!(cross_kv(&c) > 0.0 && box_gram(&c) > 0.0 && image_features(&c) > 0.0);
    }
}
