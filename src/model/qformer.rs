//! The Q-Former: a post-norm BERT whose first Q rows (the learned queries) also cross-attend to the
//! vision tokens Z every `cross_attention_frequency` layers and have their own feed-forward block
//! (method.md section 1, "Q-Former"), with the Q-Pert hook of method.md section 5: in each
//! cross-attention layer l the query heads become q' = q + q Pi_l before the scaled dot product.
//! Follows `Blip2QFormerMultiHeadAttention`, `Blip2QFormerAttention`, `Blip2QFormerLayer` and
//! `Blip2QFormerModel` in `models/blip_2/modeling_blip_2.py` of transformers 5.24.

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::{Device, FloatDType, Tensor};

use super::config::QFormerConfig;
use super::{AttentionKernel, LayerNorm, gelu, linear, pad_keys, pad_tokens, padded_key_bias, softmax};

/// Query, key and value projections of one attention block (`attention.attention` or
/// `crossattention.attention`).
#[derive(Module, Debug)]
pub struct QFormerMultiHeadAttention {
    /// [dq, dq].
    pub query: Linear,
    /// [dq, dq] for self-attention, [dq, dv] for cross-attention.
    pub key: Linear,
    /// Same shape as `key`.
    pub value: Linear,
    num_heads: usize,
}

impl QFormerMultiHeadAttention {
    /// Shapes: x [b,n,dq] -> [b,h,n,d].
    fn split_heads(&self, x: Tensor<3>) -> Tensor<4> {
        let [b, n, width] = x.dims();
        x.reshape([b, n, self.num_heads, width / self.num_heads]).swap_dims(1, 2)
    }

    /// The keys of a sequence split into heads.
    /// Shapes: x [b,m,dk] -> [b,h,m,d] (dk = dq for self-attention, dv for cross-attention).
    pub fn key_heads(&self, x: Tensor<3>) -> Tensor<4> {
        self.split_heads(self.key.forward(x))
    }

    /// The values of a sequence split into heads.
    /// Shapes: x [b,m,dk] -> [b,h,m,d].
    pub fn value_heads(&self, x: Tensor<3>) -> Tensor<4> {
        self.split_heads(self.value.forward(x))
    }

    /// Scaled dot-product attention of `hidden`'s queries to given keys and values, padded as
    /// [`pad_keys`] says. The optional perturbation Pi turns every query head q into q + q Pi
    /// before the scores.
    /// Shapes: hidden [b,n,dq], keys/values [b,h,m,d], mask_bias [b or 1,1,1,m] (0 or `MASKED_SCORE`),
    /// perturbation [b,h,d,d] -> context [b,n,dq].
    pub fn forward(
        &self,
        hidden: Tensor<3>,
        keys: Tensor<4>,
        values: Tensor<4>,
        mask_bias: Option<Tensor<4>>,
        perturbation: Option<Tensor<4>>,
    ) -> Tensor<3> {
        let [b, n, dq] = hidden.dims();
        let [_, _, _, d] = keys.dims();
        let (keys, values, mask_bias) = pad_keys(keys, values, mask_bias, FloatDType::from(hidden.dtype()));
        let q = self.split_heads(self.query.forward(hidden));
        let q = match perturbation {
            Some(pi) => q.clone() + q.matmul(pi),
            None => q,
        };
        let scores = q.matmul(keys.swap_dims(2, 3)) / (d as f64).sqrt();
        let scores = match mask_bias {
            Some(bias) => scores + bias,
            None => scores,
        };
        softmax(scores, 3).matmul(values).swap_dims(1, 2).reshape([b, n, dq])
    }
}

/// `LN(dense(x) + residual)`: the `attention.output` / `output` / `output_query` blocks.
#[derive(Module, Debug)]
pub struct QFormerOutput {
    /// Projection back to dq.
    pub dense: Linear,
    /// HF name `LayerNorm` (see `weights::RENAMES`).
    pub layer_norm: LayerNorm,
}

impl QFormerOutput {
    /// Shapes: x [b,n,k], residual [b,n,dq] -> [b,n,dq].
    pub fn forward(&self, x: Tensor<3>, residual: Tensor<3>) -> Tensor<3> {
        self.layer_norm.forward(self.dense.forward(x) + residual)
    }
}

/// An attention block with its output projection and post-norm (`attention` or `crossattention`).
#[derive(Module, Debug)]
pub struct QFormerAttention {
    /// Projections.
    pub attention: QFormerMultiHeadAttention,
    /// `LN(dense(ctx) + hidden)`.
    pub output: QFormerOutput,
}

/// The first half of a feed-forward block: gelu(dense(x)).
#[derive(Module, Debug)]
pub struct QFormerIntermediate {
    /// [intermediate, dq].
    pub dense: Linear,
}

impl QFormerIntermediate {
    /// Shapes: x [b,n,dq] -> [b,n,intermediate].
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        gelu(self.dense.forward(x))
    }
}

/// The keys and values of Z for one cross-attention layer, computed once per image, with t
/// vision tokens run as m key rows ([`AttentionKernel::cross_attention_len`]).
#[derive(Debug, Clone)]
pub struct CrossKv {
    /// [b,h,m,d]; rows past t are zero.
    pub keys: Tensor<4>,
    /// [b,h,m,d]; rows past t are zero.
    pub values: Tensor<4>,
    /// [1,1,1,m]: 0 for the t real keys, `MASKED_SCORE` for the padding; `None` when m = t.
    pub key_bias: Option<Tensor<4>>,
}

/// Which image's keys and values the query rows of each batch row attend to.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ImageRows<'a> {
    /// Row i attends to image i: the ITC pass, one row per image.
    OnePerImage,
    /// Consecutive runs of rows, `(image, rows)` each: an ITM chunk, whose pairs come grouped by
    /// image. A run's query rows attend to their image as one sequence (rows are independent in
    /// the cross-attention), so each image's keys, values and Pi are read once per run instead of
    /// being gathered per pair.
    Runs(&'a [(usize, usize)]),
}

impl CrossKv {
    /// The cross-attention context of `queries` through `attention`, each row attending to its
    /// image as `images` says, with the query heads perturbed by Pi when given.
    /// Shapes: queries [b,q,dq], keys/values [b_img,h,m,d], perturbation [b_img,h,d,d] -> [b,q,dq].
    fn attend(
        &self,
        attention: &QFormerMultiHeadAttention,
        queries: Tensor<3>,
        perturbation: Option<Tensor<4>>,
        images: ImageRows,
    ) -> Tensor<3> {
        let (keys, values, bias) = (self.keys.clone(), self.values.clone(), self.key_bias.clone());
        let ImageRows::Runs(runs) = images else {
            return attention.forward(queries, keys, values, bias, perturbation);
        };
        let [_, q, dq] = queries.dims();
        let mut start = 0;
        let mut contexts: Vec<Tensor<3>> = runs
            .iter()
            .map(|&(image, rows)| {
                let run = queries.clone().narrow(0, start, rows).reshape([1, rows * q, dq]);
                start += rows;
                let of_image = |x: Tensor<4>| x.narrow(0, image, 1);
                let pi = perturbation.clone().map(of_image);
                attention
                    .forward(run, of_image(keys.clone()), of_image(values.clone()), bias.clone(), pi)
                    .reshape([rows, q, dq])
            })
            .collect();
        match contexts.len() {
            1 => contexts.remove(0),
            _ => Tensor::cat(contexts, 0),
        }
    }
}

/// What the query rows cross-attend to: the images' keys and values per cross-attention layer,
/// their Pi and which image each batch row attends to.
/// Shapes: kv n_cross x [b_img,h,m,d], perturbation [b_img,n_cross,h,d,d].
#[derive(Debug, Clone)]
pub(crate) struct CrossInputs<'a> {
    pub kv: &'a [CrossKv],
    pub perturbation: Option<Tensor<5>>,
    pub rows: ImageRows<'a>,
}

/// One layer's cross-attention inputs: the image keys and values, Pi [b_img,h,d,d] and which image
/// each row attends to.
#[derive(Debug, Clone)]
struct LayerCross<'a> {
    kv: &'a CrossKv,
    perturbation: Option<Tensor<4>>,
    images: ImageRows<'a>,
}

/// One Q-Former layer (`qformer.encoder.layer.j`).
#[derive(Module, Debug)]
pub struct QFormerLayer {
    /// Self-attention over the whole sequence.
    pub attention: QFormerAttention,
    /// Cross-attention of the query rows to Z; present when j % frequency == 0.
    pub crossattention: Option<QFormerAttention>,
    /// Text feed-forward, first half.
    pub intermediate: QFormerIntermediate,
    /// Text feed-forward, second half and post-norm.
    pub output: QFormerOutput,
    /// Query feed-forward, first half.
    pub intermediate_query: QFormerIntermediate,
    /// Query feed-forward, second half and post-norm.
    pub output_query: QFormerOutput,
}

/// A layer's rows once its self-attention block and its text rows' feed-forward have run: what
/// the layer computes before it needs the image. The query rows still have to cross-attend and run
/// their own feed-forward ([`QFormerLayer::finish`]); the text rows are done.
#[derive(Debug, Clone)]
pub(crate) struct BeforeCrossAttention {
    /// [b,query_len,dq]; `None` for a text-only pass.
    pub queries: Option<Tensor<3>>,
    /// [b,rows-query_len,dq]; `None` when only query rows are kept.
    pub text: Option<Tensor<3>>,
}

impl QFormerLayer {
    /// The layer's output for the first `keep` rows (keys and values come from all n rows; rows
    /// are independent after the self-attention, so the others need not be computed when unused).
    /// Shapes: hidden [b,n,dq] (the first `query_len` <= `keep` rows are queries), mask_bias
    /// [b,1,1,n], cross: keys/values [b,h,m,d] and perturbation [b,h,d,d] for this layer
    /// -> [b,keep,dq].
    fn forward(
        &self,
        hidden: Tensor<3>,
        mask_bias: Option<Tensor<4>>,
        query_len: usize,
        cross: Option<LayerCross>,
        keep: usize,
    ) -> Tensor<3> {
        self.finish(self.before_cross_attention(hidden, mask_bias, query_len, keep), cross)
    }

    /// The self-attention block for the first `keep` rows, then the text rows' feed-forward.
    /// Shapes: hidden [b,n,dq], mask_bias [b,1,1,n] -> queries [b,query_len,dq], text
    /// [b,keep-query_len,dq].
    fn before_cross_attention(
        &self,
        hidden: Tensor<3>,
        mask_bias: Option<Tensor<4>>,
        query_len: usize,
        keep: usize,
    ) -> BeforeCrossAttention {
        let [_, n, _] = hidden.dims();
        let keep = keep.min(n);
        let this = &self.attention;
        let keys = this.attention.key_heads(hidden.clone());
        let values = this.attention.value_heads(hidden.clone());
        let rows = if keep < n { hidden.narrow(1, 0, keep) } else { hidden };
        let context = this.attention.forward(rows.clone(), keys, values, mask_bias, None);
        let attended = this.output.forward(context, rows);
        let text_ffn = |x: Tensor<3>| self.output.forward(self.intermediate.forward(x.clone()), x);
        match query_len {
            0 => BeforeCrossAttention { queries: None, text: Some(text_ffn(attended)) },
            _ if keep == query_len => BeforeCrossAttention { queries: Some(attended), text: None },
            _ => BeforeCrossAttention {
                queries: Some(attended.clone().narrow(1, 0, query_len)),
                text: Some(text_ffn(attended.narrow(1, query_len, keep - query_len))),
            },
        }
    }

    /// The query rows' cross-attention to the image (in a layer that has one, when `cross` is given)
    /// and their feed-forward, joined with the text rows: the layer's output.
    /// Shapes: [b,q,dq] and [b,l,dq] -> [b,q+l,dq].
    fn finish(&self, rows: BeforeCrossAttention, cross: Option<LayerCross>) -> Tensor<3> {
        let queries = rows.queries.map(|mut queries| {
            if let (Some(block), Some(cross)) = (&self.crossattention, cross) {
                let context = cross.kv.attend(&block.attention, queries.clone(), cross.perturbation, cross.images);
                queries = block.output.forward(context, queries);
            }
            self.output_query.forward(self.intermediate_query.forward(queries.clone()), queries)
        });
        let mut parts: Vec<Tensor<3>> = queries.into_iter().chain(rows.text).collect();
        match parts.len() {
            1 => parts.remove(0),
            _ => Tensor::cat(parts, 1),
        }
    }
}

/// The layer stack (`qformer.encoder`).
#[derive(Module, Debug)]
pub struct QFormerEncoder {
    /// The layers.
    pub layer: Vec<QFormerLayer>,
}

/// The Q-Former (`qformer`): the input LayerNorm and the layers. The token embeddings live in
/// `Blip2Model::embeddings`, as in HF.
#[derive(Module, Debug)]
pub struct QFormerModel {
    /// LayerNorm over the concatenated [queries; text] input.
    pub layernorm: LayerNorm,
    /// The layers.
    pub encoder: QFormerEncoder,
}

impl QFormerModel {
    /// The cross-attention blocks, in layer order.
    pub fn cross_attention_blocks(&self) -> impl Iterator<Item = &QFormerAttention> {
        self.encoder.layer.iter().filter_map(|layer| layer.crossattention.as_ref())
    }

    /// Keys and values of Z for every cross-attention layer, as `kernel` runs them.
    /// Shapes: z [b,t,dv] -> n_cross x ([b,h,m,d], [b,h,m,d]), m = `kernel.cross_attention_len(t)`.
    pub fn cross_kv(&self, z: Tensor<3>, kernel: AttentionKernel) -> Vec<CrossKv> {
        let [_, t, _] = z.dims();
        let m = kernel.cross_attention_len(t);
        let key_bias = (m > t).then(|| padded_key_bias(t, m, FloatDType::from(z.dtype()), &z.device()));
        self.cross_attention_blocks()
            .map(|block| CrossKv {
                keys: pad_tokens(block.attention.key_heads(z.clone()), m),
                values: pad_tokens(block.attention.value_heads(z.clone()), m),
                key_bias: key_bias.clone(),
            })
            .collect()
    }

    /// Runs the layers on un-normalised embeddings and returns the first `keep` rows of the output,
    /// the rows the caller reads (the queries for ITC and ITM, the CLS row for text): the last
    /// layer computes only those. With `query_len` > 0 the first rows are queries (`keep` >=
    /// `query_len`) and `cross` must hold one entry per cross-attention layer (checked by the
    /// caller).
    /// Shapes: embeddings [b,n,dq], mask_bias [b,1,1,n], cross n_cross x [b,h,m,d],
    /// perturbation [b,n_cross,h,d,d] -> [b,keep,dq].
    pub(crate) fn forward(
        &self,
        embeddings: Tensor<3>,
        mask_bias: Option<Tensor<4>>,
        query_len: usize,
        cross: &[CrossKv],
        perturbation: Option<Tensor<5>>,
        keep: usize,
    ) -> Tensor<3> {
        let first = self.first_layer_before_cross_attention(embeddings, mask_bias.clone(), query_len, keep);
        let images = CrossInputs { kv: cross, perturbation, rows: ImageRows::OnePerImage };
        self.forward_from_first_layer(first, mask_bias, query_len, images, keep)
    }

    /// The pass up to the first layer's cross-attention: the input LayerNorm, the first layer's
    /// self-attention and its text rows' feed-forward. The query rows start as the same learned
    /// tokens in every ITM pair, so there this depends on the text alone and runs once per text
    /// (`Blip2Model::itm_texts`). All n rows are kept unless the first layer is the last.
    /// Shapes: embeddings [b,n,dq], mask_bias [b,1,1,n] -> queries [b,query_len,dq], text rows.
    pub(crate) fn first_layer_before_cross_attention(
        &self,
        embeddings: Tensor<3>,
        mask_bias: Option<Tensor<4>>,
        query_len: usize,
        keep: usize,
    ) -> BeforeCrossAttention {
        let hidden = self.layernorm.forward(embeddings);
        let [_, n, _] = hidden.dims();
        let rows = if self.encoder.layer.len() == 1 { keep } else { n };
        self.encoder.layer[0].before_cross_attention(hidden, mask_bias, query_len, rows)
    }

    /// The rest of the pass from [`QFormerModel::first_layer_before_cross_attention`]: the first
    /// layer's query rows, then the other layers, returning the first `keep` rows; the query rows
    /// of each batch row cross-attend to the image `images` says.
    /// Shapes: as [`QFormerModel::forward`].
    pub(crate) fn forward_from_first_layer(
        &self,
        first: BeforeCrossAttention,
        mask_bias: Option<Tensor<4>>,
        query_len: usize,
        images: CrossInputs,
        keep: usize,
    ) -> Tensor<3> {
        // The cross-attention inputs of each layer that has a cross-attention block, in order.
        let mut c = 0;
        let mut cross_of = |layer: &QFormerLayer| match (&layer.crossattention, images.kv.get(c)) {
            (Some(_), Some(kv)) if query_len > 0 => {
                let perturbation = images.perturbation.as_ref().map(|pi| {
                    let [b, _, h, d, _] = pi.dims();
                    pi.clone().narrow(1, c, 1).reshape([b, h, d, d])
                });
                c += 1;
                Some(LayerCross { kv, perturbation, images: images.rows })
            }
            _ => None,
        };
        let (first_layer, rest) = self.encoder.layer.split_first().expect("validated: at least one Q-Former layer");
        let mut hidden = first_layer.finish(first, cross_of(first_layer));
        let [_, n, _] = hidden.dims();
        for (j, layer) in rest.iter().enumerate() {
            let rows = if j + 1 == rest.len() { keep } else { n };
            hidden = layer.forward(hidden, mask_bias.clone(), query_len, cross_of(layer), rows);
        }
        hidden
    }
}

impl QFormerConfig {
    /// Builds the Q-Former with lazily initialised (random) parameters.
    pub fn init(&self, device: &Device) -> QFormerModel {
        let dq = self.hidden_size;
        let norm = || LayerNorm::new(dq, self.layer_norm_eps, device);
        let output = |from: usize| QFormerOutput { dense: linear(from, dq, true, device), layer_norm: norm() };
        let attention = |dk: usize| QFormerAttention {
            attention: QFormerMultiHeadAttention {
                query: linear(dq, dq, true, device),
                key: linear(dk, dq, true, device),
                value: linear(dk, dq, true, device),
                num_heads: self.num_attention_heads,
            },
            output: output(dq),
        };
        let intermediate = || QFormerIntermediate { dense: linear(dq, self.intermediate_size, true, device) };
        let layer = (0..self.num_hidden_layers)
            .map(|j| QFormerLayer {
                attention: attention(dq),
                crossattention: self.has_cross_attention(j).then(|| attention(self.encoder_hidden_size)),
                intermediate: intermediate(),
                output: output(self.intermediate_size),
                intermediate_query: intermediate(),
                output_query: output(self.intermediate_size),
            })
            .collect();
        QFormerModel { layernorm: norm(), encoder: QFormerEncoder { layer } }
    }
}
