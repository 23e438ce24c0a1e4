//! The BLIP-2 vision tower (EVA ViT-g) that turns an image into the vision tokens Z
//! (method.md section 1, "Vision tower"). Follows `Blip2VisionEmbeddings`, `Blip2Attention`,
//! `Blip2MLP`, `Blip2EncoderLayer` and `Blip2VisionModel` in `models/blip_2/modeling_blip_2.py` of
//! transformers 5.24: patch conv -> CLS + position -> pre-norm blocks with a fused qkv projection
//! and exact GELU -> `post_layernorm` on all T tokens.

use burn::module::{Initializer, Module, Param};
use burn::nn::Linear;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Device, FloatDType, Tensor};

use super::config::VisionConfig;
use super::{AttentionKernel, LayerNorm, attention, gelu, linear};

/// Patch, class and position embeddings (`vision_model.embeddings`).
#[derive(Module, Debug)]
pub struct VisionEmbeddings {
    /// The CLS token, [1, 1, dv].
    pub class_embedding: Param<Tensor<3>>,
    /// Conv with kernel = stride = p, [dv, 3, p, p].
    pub patch_embedding: Conv2d,
    /// One position per token, [1, t, dv].
    pub position_embedding: Param<Tensor<3>>,
}

impl VisionEmbeddings {
    /// Shapes: pixel_values [b,3,s,s] -> [b,t,dv] (CLS first, then patches row-major).
    ///
    /// The patch convolution runs in f32 whatever the run dtype: CubeCL's convolution accumulates in
    /// its input dtype, and its 3 x p x p-term sums in f16 deviated from f32 by four times what the
    /// same model's matmuls do (`make test-cubecl`, f16 parity). It is a negligible share of the
    /// FLOPs (ViT-g: 1.1 of 1,430 GFLOP per image).
    pub fn forward(&self, pixel_values: Tensor<4>) -> Tensor<3> {
        let [b, _, _, _] = pixel_values.dims();
        let dtype = FloatDType::from(pixel_values.dtype());
        let conv = &self.patch_embedding;
        let patches = conv2d(
            pixel_values.cast(FloatDType::F32),
            conv.weight.val().cast(FloatDType::F32),
            conv.bias.as_ref().map(|bias| bias.val().cast(FloatDType::F32)),
            ConvOptions::new(conv.stride, [0, 0], conv.dilation, conv.groups),
        )
        .cast(dtype); // [b, dv, g, g]
        let [_, dv, g, _] = patches.dims();
        let patches = patches.reshape([b, dv, g * g]).swap_dims(1, 2);
        let class = self.class_embedding.val().expand([b, 1, dv]);
        Tensor::cat(vec![class, patches], 1) + self.position_embedding.val()
    }
}

/// Multi-head self-attention with one fused qkv projection (`self_attn`).
#[derive(Module, Debug)]
pub struct VisionAttention {
    /// Fused projection, rows ordered q | k | v, each head-major: [3 dv, dv].
    pub qkv: Linear,
    /// Output projection [dv, dv].
    pub projection: Linear,
    num_heads: usize,
}

impl VisionAttention {
    /// Shapes: x [b,t,dv] -> [b,t,dv]. No mask; scale d^-0.5 applied to the scores.
    pub fn forward(&self, x: Tensor<3>, kernel: AttentionKernel) -> Tensor<3> {
        let [b, t, dv] = x.dims();
        let (h, d) = (self.num_heads, dv / self.num_heads);
        let qkv = self.qkv.forward(x);
        let heads = |i: usize| qkv.clone().narrow(2, i * dv, dv).reshape([b, t, h, d]).swap_dims(1, 2);
        let (q, k, v) = (heads(0), heads(1), heads(2));
        let context = attention(q, k, v, kernel); // [b, h, t, d]
        self.projection.forward(context.swap_dims(1, 2).reshape([b, t, dv]))
    }
}

/// The feed-forward block (`mlp`): fc2(gelu(fc1(x))).
#[derive(Module, Debug)]
pub struct VisionMlp {
    /// [intermediate, dv].
    pub fc1: Linear,
    /// [dv, intermediate].
    pub fc2: Linear,
}

impl VisionMlp {
    /// Shapes: x [b,t,dv] -> [b,t,dv].
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.fc2.forward(gelu(self.fc1.forward(x)))
    }
}

/// One pre-norm block (`vision_model.encoder.layers.i`).
#[derive(Module, Debug)]
pub struct VisionLayer {
    /// Self-attention.
    pub self_attn: VisionAttention,
    /// Norm before the attention.
    pub layer_norm1: LayerNorm,
    /// Feed-forward block.
    pub mlp: VisionMlp,
    /// Norm before the feed-forward block.
    pub layer_norm2: LayerNorm,
}

impl VisionLayer {
    /// Shapes: x [b,t,dv] -> [b,t,dv]: `x += attn(LN1(x)); x += mlp(LN2(x))`.
    pub fn forward(&self, x: Tensor<3>, kernel: AttentionKernel) -> Tensor<3> {
        let x = x.clone() + self.self_attn.forward(self.layer_norm1.forward(x), kernel);
        x.clone() + self.mlp.forward(self.layer_norm2.forward(x))
    }
}

/// The stack of blocks (`vision_model.encoder`).
#[derive(Module, Debug)]
pub struct VisionEncoder {
    /// The L blocks.
    pub layers: Vec<VisionLayer>,
}

/// The vision tower (`vision_model`).
#[derive(Module, Debug)]
pub struct VisionModel {
    /// Embeddings.
    pub embeddings: VisionEmbeddings,
    /// Blocks.
    pub encoder: VisionEncoder,
    /// Final norm over all tokens (eps from config.json: HF 1e-6, LAVIS 1e-5).
    pub post_layernorm: LayerNorm,
}

impl VisionModel {
    /// Shapes: pixel_values [b,3,s,s] -> z [b,t,dv]. The caller checks that s is the configured side.
    pub fn forward(&self, pixel_values: Tensor<4>, kernel: AttentionKernel) -> Tensor<3> {
        let x = self.embeddings.forward(pixel_values);
        let x = self.encoder.layers.iter().fold(x, |x, layer| layer.forward(x, kernel));
        self.post_layernorm.forward(x)
    }
}

impl VisionConfig {
    /// Builds the vision tower with lazily initialised (random) parameters.
    pub fn init(&self, device: &Device) -> VisionModel {
        let (dv, p) = (self.hidden_size, self.patch_size);
        let normal = Initializer::Normal { mean: 0.0, std: 0.02 };
        let norm = || LayerNorm::new(dv, self.layer_norm_eps, device);
        let embeddings = VisionEmbeddings {
            class_embedding: normal.init([1, 1, dv], device),
            patch_embedding: Conv2dConfig::new([self.num_channels, dv], [p, p]).with_stride([p, p]).init(device),
            position_embedding: normal.init([1, self.num_tokens(), dv], device),
        };
        let layers = (0..self.num_hidden_layers)
            .map(|_| VisionLayer {
                self_attn: VisionAttention {
                    qkv: linear(dv, 3 * dv, self.qkv_bias, device),
                    projection: linear(dv, dv, true, device),
                    num_heads: self.num_attention_heads,
                },
                layer_norm1: norm(),
                mlp: VisionMlp {
                    fc1: linear(dv, self.intermediate_size, true, device),
                    fc2: linear(self.intermediate_size, dv, true, device),
                },
                layer_norm2: norm(),
            })
            .collect();
        VisionModel { embeddings, encoder: VisionEncoder { layers }, post_layernorm: norm() }
    }
}
