//! Counted floating-point operations of the BLIP-2 forwards, from the configuration alone: matrix
//! products only (2 m n k each), no softmax, LayerNorm or GELU. The counts are the work an
//! efficient implementation must do, with each image's cross-attention keys and values computed once
//! and reused by all its ITM pairs (so the Q-Pert keys are not counted a second time); this is the
//! arithmetic floor the issue's targets are measured against (ViT-g at 364 px: 1.43 TFLOP per image;
//! one ITM pair: about 12 GFLOP).

use crate::data::tokenizer::MAX_LEN;
use crate::model::Blip2Config;

/// FLOPs of one transformer self-attention block over `n` tokens of width `d`: the q, k, v and
/// output projections (8 n d^2) and the two attention products (4 n^2 d).
fn self_attention(n: f64, d: f64) -> f64 {
    8.0 * n * d * d + 4.0 * n * n * d
}

/// The vision tower on one image: patch embedding, then per layer attention and MLP.
pub fn vision(c: &Blip2Config) -> f64 {
    let v = &c.vision_config;
    let (d, i) = (v.hidden_size as f64, v.intermediate_size as f64);
    let patches = (v.grid() * v.grid()) as f64;
    let t = v.num_tokens() as f64;
    let embed = 2.0 * patches * (v.num_channels * v.patch_size * v.patch_size) as f64 * d;
    embed + v.num_hidden_layers as f64 * (self_attention(t, d) + 4.0 * t * d * i)
}

/// The cross-attention keys and values of one image in every cross-attention layer (computed once
/// per image, shared by the ITC pass, the Q-Pert Gram matrices and all the image's ITM pairs).
pub fn cross_kv(c: &Blip2Config) -> f64 {
    let q = &c.qformer_config;
    let t = c.vision_config.num_tokens() as f64;
    q.num_cross_layers() as f64 * 2.0 * 2.0 * t * c.vision_config.hidden_size as f64 * q.hidden_size as f64
}

/// One Q-Pert Gram matrix set of a box: K^T diag(w) K per cross-attention layer and head.
pub fn box_gram(c: &Blip2Config) -> f64 {
    let q = &c.qformer_config;
    let (t, d) = (c.vision_config.num_tokens() as f64, q.head_dim() as f64);
    (q.num_cross_layers() * q.num_attention_heads) as f64 * 2.0 * t * d * d
}

/// The query-side Q-Former layers for `rows` query rows in a joint pass of `n` tokens, excluding
/// the self-attention: cross-attention (queries against the image's T tokens, with the Q-Pert
/// product q Pi) and the query feed-forward block.
fn query_rows(c: &Blip2Config, rows: f64) -> f64 {
    let q = &c.qformer_config;
    let (dq, i, d) = (q.hidden_size as f64, q.intermediate_size as f64, q.head_dim() as f64);
    let t = c.vision_config.num_tokens() as f64;
    let cross = 4.0 * rows * dq * dq + 4.0 * rows * t * dq + 2.0 * rows * dq * d;
    q.num_cross_layers() as f64 * cross + q.num_hidden_layers as f64 * 4.0 * rows * dq * i
}

/// The ITC image features of one image (K/V excluded): the queries alone through the Q-Former,
/// then the ITC projection.
pub fn image_features(c: &Blip2Config) -> f64 {
    let q = &c.qformer_config;
    let (rows, dq) = (c.num_query_tokens as f64, q.hidden_size as f64);
    q.num_hidden_layers as f64 * self_attention(rows, dq)
        + query_rows(c, rows)
        + 2.0 * rows * dq * c.image_text_hidden_size as f64
}

/// The ITC text features of one caption (35 tokens): a text-only Q-Former pass and the projection.
pub fn text_features(c: &Blip2Config) -> f64 {
    let q = &c.qformer_config;
    let (l, dq, i) = (MAX_LEN as f64, q.hidden_size as f64, q.intermediate_size as f64);
    q.num_hidden_layers as f64 * (self_attention(l, dq) + 4.0 * l * dq * i) + 2.0 * dq * c.image_text_hidden_size as f64
}

/// One ITM pair (K/V excluded): the joint [queries; text] pass and the ITM head on the query rows.
pub fn itm_pair(c: &Blip2Config) -> f64 {
    let q = &c.qformer_config;
    let (rows, l, dq, i) =
        (c.num_query_tokens as f64, MAX_LEN as f64, q.hidden_size as f64, q.intermediate_size as f64);
    q.num_hidden_layers as f64 * (self_attention(rows + l, dq) + 4.0 * l * dq * i)
        + query_rows(c, rows)
        + 2.0 * rows * dq * 2.0
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
