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

pub mod blip2;
pub mod config;
pub mod qformer;
pub mod vision;
pub mod weights;

pub use blip2::Blip2Model;
pub use config::{Blip2Config, QFormerConfig, VisionConfig};
pub use weights::{Checkpoint, fuse_qkv_bias};

use burn::nn::{Linear, LinearConfig, LinearLayout};
use burn::tensor::Device;

/// A Linear whose weight parameter has PyTorch's `[out, in]` shape (`LinearLayout::Col`), so HF
/// weights load without a transposition step.
fn linear(d_in: usize, d_out: usize, bias: bool, device: &Device) -> Linear {
    LinearConfig::new(d_in, d_out)
        .with_bias(bias)
        .with_layout(LinearLayout::Col)
        .init(device)
}
