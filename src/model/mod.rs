//! BLIP-2 for image-text retrieval in burn (method.md sections 1 and 5): the Hugging Face
//! `Blip2ForImageTextRetrieval` layout, loaded from a HF model folder, with the Q-Pert hook in the
//! Q-Former's cross-attention. One code path for every device: the backend is picked at run time by
//! the burn `Device`.
//!
//! - [`config`]: `Blip2Config`, lenient `config.json` parsing and validation.
//! - [`vision`]: the vision tower, pixels -> Z.
//! - [`qformer`]: the Q-Former with the perturbation hook.
//! - [`blip2`]: `Blip2Model` and its forwards (`vision_tokens`, `cross_attention_keys`,
//!   `image_features`, `text_features`, `itm_logits`).
//! - [`weights`]: safetensors loading, HF names, `fuse_qkv_bias`.
//!
//! Precision: the weights are stored and the activations computed in the run dtype
//! ([`Blip2Model::load_with_dtype`]: f32, bf16 or f16), except LayerNorm and softmax, which cast up
//! to f32, compute and cast back ([`LayerNorm`], `softmax`). Every public forward casts its
//! float inputs to the run dtype and returns f32; the final L2 normalisation and the ITM mean run
//! in f32. In f32 every cast is a no-op, so the f32 path is the plain burn computation.

pub mod blip2;
pub mod config;
pub mod qformer;
pub mod vision;
pub mod weights;

pub use blip2::Blip2Model;
pub use config::{Blip2Config, QFormerConfig, VisionConfig};
pub use weights::{Checkpoint, fuse_qkv_bias};

use burn::module::{Initializer, Module, Param};
use burn::nn::{Linear, LinearConfig, LinearLayout};
use burn::tensor::{Device, FloatDType, Tensor};

/// A Linear whose weight parameter has PyTorch's `[out, in]` shape (`LinearLayout::Col`), so HF
/// weights load without a transposition step.
fn linear(d_in: usize, d_out: usize, bias: bool, device: &Device) -> Linear {
    LinearConfig::new(d_in, d_out).with_bias(bias).with_layout(LinearLayout::Col).init(device)
}

/// LayerNorm over the last axis (`Y = norm(X) * gamma + beta`), computed in f32 whatever the
/// dtype of the input and of the parameters, and returned in the input's dtype. burn's own
/// `LayerNorm` widens f16 only; this one widens bf16 too. In f32 it is exactly burn's
/// `LayerNorm::forward`. The parameter names are burn's (`gamma`, `beta`; see `weights::RENAMES`).
#[derive(Module, Debug)]
pub struct LayerNorm {
    /// Scale, [d].
    pub gamma: Param<Tensor<1>>,
    /// Shift, [d].
    pub beta: Param<Tensor<1>>,
    epsilon: f64,
}

impl LayerNorm {
    /// Ones and zeros, as `torch.nn.LayerNorm` and burn initialise them.
    fn new(d: usize, epsilon: f64, device: &Device) -> Self {
        Self { gamma: Initializer::Ones.init([d], device), beta: Initializer::Zeros.init([d], device), epsilon }
    }

    /// Shapes: x [..., d] -> [..., d].
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dtype = FloatDType::from(x.dtype());
        burn::tensor::module::layer_norm(
            x.cast(FloatDType::F32),
            self.gamma.val().cast(FloatDType::F32),
            Some(self.beta.val().cast(FloatDType::F32)),
            self.epsilon,
        )
        .cast(dtype)
    }
}

/// Softmax along `dim` computed in f32, returned in the dtype of `x`.
fn softmax<const D: usize>(x: Tensor<D>, dim: usize) -> Tensor<D> {
    let dtype = FloatDType::from(x.dtype());
    burn::tensor::activation::softmax(x.cast(FloatDType::F32), dim).cast(dtype)
}
