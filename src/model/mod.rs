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
//! ([`Blip2Model::load_with_dtype`]: f32, bf16 or f16), except LayerNorm, softmax, GELU and the
//! vision patch convolution, which cast up to f32, compute and cast back ([`LayerNorm`], `softmax`,
//! `gelu`, `vision::VisionEmbeddings`), and the vision attention's scale, applied in f32. Every
//! public forward casts its float inputs to the run dtype and returns f32; the final L2
//! normalisation and the ITM mean run in f32. In f32 every cast is a no-op, so the f32 path is the plain burn computation.

pub mod blip2;
pub mod config;
pub mod qformer;
pub mod vision;
pub mod weights;

pub use blip2::{Blip2Model, ItmImages, ItmTexts};
pub use config::{Blip2Config, QFormerConfig, VisionConfig};
pub use weights::{Checkpoint, fuse_qkv_bias};

use burn::module::{Initializer, Module, Param};
use burn::nn::{Linear, LinearConfig, LinearLayout};
use burn::tensor::{Device, FloatDType, Tensor, TensorData};

use crate::error::{Error, Result, device_panic};

/// Waits for `tensor` and reads it back to the host: where device work is synchronised and its
/// failures surface (most often a GPU out of memory). burn hands back device memory lazily, so the
/// bytes are read here too; a failure of either step becomes an error saying what `work` failed
/// and which config `knob` (name, value) sizes it. So does a read that succeeds after the device
/// runtime panicked: CubeCL fails only the tasks that panicked and carries on, so what follows may
/// have read memory that was never written.
pub fn read_back<const D: usize>(tensor: Tensor<D>, work: &str, knob: Option<(&str, usize)>) -> Result<TensorData> {
    let data = tensor.try_into_data().map_err(|e| Error::device_failed(work, e, knob))?;
    data.bytes.read(Default::default()).map_err(|e| Error::device_failed(work, e, knob))?;
    match device_panic() {
        Some(reason) => Err(Error::device_failed(work, reason, knob)),
        None => Ok(data),
    }
}

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

/// How attention over the vision tokens is computed (`model.attention`): the vision tower's
/// self-attention, and the Q-Former's cross-attention of the queries to Z.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttentionKernel {
    /// Two matmuls and a softmax in f32: the reference computation, exact on every backend. Its
    /// keys are padded to a multiple of [`KEY_ROW_MULTIPLE`] and masked, as in every attention.
    #[default]
    Explicit,
    /// The explicit computation on vision tokens padded to a multiple of
    /// [`ALIGNED_SEQUENCE_TILE`], the padded keys masked out, in the vision tower
    /// ([`aligned_attention`]) and in the cross-attention ([`AttentionKernel::cross_attention_len`]).
    /// ViT-g's 677 tokens make rows of odd length, which GPU matmuls can only load one element at
    /// a time; 704 tokens load in full vector lines and whole tiles, for 8% more attention FLOPs
    /// (0.6% of the tower's).
    Aligned,
    /// burn's fused attention (CubeCL's flash-attention kernels on CUDA: f16 tiles, f32
    /// accumulation) in the vision tower, on shapes padded so that its tensor-core kernel applies
    /// ([`fused_attention`]); the cross-attention as [`AttentionKernel::Aligned`].
    Fused,
}

impl AttentionKernel {
    /// Every kernel, in the order the benchmark reports them.
    pub const ALL: [AttentionKernel; 3] = [Self::Explicit, Self::Aligned, Self::Fused];

    /// The number of key rows the Q-Former's cross-attention runs `t` vision tokens at: `t` padded
    /// to a multiple of [`KEY_ROW_MULTIPLE`] for the explicit kernel, else of
    /// [`ALIGNED_SEQUENCE_TILE`].
    pub fn cross_attention_len(self, t: usize) -> usize {
        match self {
            Self::Explicit => t.next_multiple_of(KEY_ROW_MULTIPLE),
            Self::Aligned | Self::Fused => t.next_multiple_of(ALIGNED_SEQUENCE_TILE),
        }
    }
}

/// softmax(q k^T / sqrt(d)) v, with the softmax in f32 for the explicit kernels.
/// Shapes: q, k, v [b,h,t,d] -> [b,h,t,d].
fn attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, kernel: AttentionKernel) -> Tensor<4> {
    match kernel {
        AttentionKernel::Explicit => explicit_attention(q, k, v, None),
        AttentionKernel::Aligned => aligned_attention(q, k, v),
        AttentionKernel::Fused => fused_attention(q, k, v),
    }
}

/// Two matmuls and a softmax in f32, with `key_bias` ([1,1,1,t] f32) added to the scores; the keys
/// padded as [`pad_keys`] says.
fn explicit_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, key_bias: Option<Tensor<4>>) -> Tensor<4> {
    let d = q.dims()[3];
    let dtype = FloatDType::from(q.dtype());
    let (k, v, key_bias) = pad_keys(k, v, key_bias, FloatDType::F32);
    // Scaled in f32: burn rounds a scalar to the tensor's dtype, and 88^-0.5 in bf16 is 0.15% low,
    // the same bias on every score of ViT-g (PyTorch keeps the scalar in f32).
    let scores = q.matmul(k.swap_dims(2, 3)).cast(FloatDType::F32) * (d as f64).powf(-0.5);
    let scores = match key_bias {
        Some(bias) => scores + bias,
        None => scores,
    };
    burn::tensor::activation::softmax(scores, 3).cast(dtype).matmul(v)
}

/// Every attention's key count is padded to a multiple of this ([`pad_keys`]): 8 elements are 16
/// bytes in f16/bf16, the row alignment that CubeCL's TMA matmuls need on a GPU. CubeCL's autotune
/// keys a matmul by its sizes rounded to a bucket, so a bucket tuned on aligned rows (32 queries)
/// would replay a TMA kernel on unaligned ones (35 text tokens, 677 vision tokens) and fail
/// ("Should run when selected by autotune"; found by `scripts/cuda-preflight.sh`). With every key
/// count a multiple of 8, no matmul of the model has rows of unaligned length.
pub const KEY_ROW_MULTIPLE: usize = 8;

/// `keys` and `values` with zero rows appended up to a multiple of [`KEY_ROW_MULTIPLE`], and the
/// score bias extended (or created, in `bias_dtype`) to mask them: the attention is unchanged.
/// Shapes: keys/values [b,h,m,d], bias [b or 1,1,1,m] -> [b,h,m_pad,d], [b or 1,1,1,m_pad].
fn pad_keys(
    keys: Tensor<4>,
    values: Tensor<4>,
    bias: Option<Tensor<4>>,
    bias_dtype: FloatDType,
) -> (Tensor<4>, Tensor<4>, Option<Tensor<4>>) {
    let m = keys.dims()[2];
    let m_pad = m.next_multiple_of(KEY_ROW_MULTIPLE);
    if m_pad == m {
        return (keys, values, bias);
    }
    let device = keys.device();
    let bias = match bias {
        Some(bias) => {
            let [b, ..] = bias.dims();
            let masked =
                Tensor::<4>::full([b, 1, 1, m_pad - m], MASKED_SCORE, &device).cast(FloatDType::from(bias.dtype()));
            Tensor::cat(vec![bias, masked], 3)
        }
        None => padded_key_bias(m, m_pad, bias_dtype, &device),
    };
    (pad_tokens(keys, m_pad), pad_tokens(values, m_pad), Some(bias))
}

/// The sequence multiple of [`AttentionKernel::Aligned`]: 64 tokens, a whole tile of the GPU
/// matmuls in both dimensions that the sequence enters.
const ALIGNED_SEQUENCE_TILE: usize = 64;

/// `x` with zero tokens appended along the sequence axis up to `t_pad`.
/// Shapes: [b,h,t,d] -> [b,h,t_pad,d].
fn pad_tokens(x: Tensor<4>, t_pad: usize) -> Tensor<4> {
    let [b, h, t, d] = x.dims();
    if t_pad == t {
        return x;
    }
    let zeros = Tensor::<4>::zeros([b, h, t_pad - t, d], &x.device()).cast(FloatDType::from(x.dtype()));
    Tensor::cat(vec![x, zeros], 2)
}

/// What a masked key adds to its score (the text masks and the padded vision keys): its softmax
/// weight, exp(-10000 + ...) in f32, is exactly 0, and stays so after rounding to f16 or bf16
/// (the masks are added in the run dtype). Finite, unlike -inf, which WGSL lets a shader compiler
/// assume away.
const MASKED_SCORE: f64 = -10000.0;

/// The score bias that masks padded keys: 0 for the first `t` keys, [`MASKED_SCORE`] for the rest.
/// Shapes: -> [1,1,1,t_pad] in `dtype`.
fn padded_key_bias(t: usize, t_pad: usize, dtype: FloatDType, device: &Device) -> Tensor<4> {
    Tensor::<1>::cat(vec![Tensor::zeros([t], device), Tensor::full([t_pad - t], MASKED_SCORE, device)], 0)
        .reshape([1, 1, 1, t_pad])
        .cast(dtype)
}

/// [`explicit_attention`] on q, k, v padded with zero tokens to a multiple of
/// [`ALIGNED_SEQUENCE_TILE`]: padded keys are masked and padded query rows dropped, so the result
/// is the unpadded attention.
fn aligned_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    let t = q.dims()[2];
    let t_pad = t.next_multiple_of(ALIGNED_SEQUENCE_TILE);
    if t_pad == t {
        return explicit_attention(q, k, v, None);
    }
    let key_bias = padded_key_bias(t, t_pad, FloatDType::F32, &q.device());
    explicit_attention(pad_tokens(q, t_pad), pad_tokens(k, t_pad), pad_tokens(v, t_pad), Some(key_bias)).narrow(2, 0, t)
}

/// The fused kernel's tensor-core path needs the head dim to be a multiple of 16 and the sequence
/// a multiple of its query stage (up to 8 planes x 16 rows); ViT-g has d = 88 and t = 677.
const HEAD_DIM_TILE: usize = 16;
const SEQUENCE_TILE: usize = 128;
/// The score that padded keys get (before the softmax): exp(-1000) is 0 in f32.
const PADDED_KEY_SCORE: f64 = -1000.0;

/// burn's `module::attention` on padded shapes, equal to the unpadded attention:
/// - the head dim grows with zero columns, which leave q k^T unchanged; q is scaled by
///   sqrt(d_pad / d) because the kernel divides by sqrt(d_pad) (a custom scale would send burn to
///   its unfused fallback);
/// - the sequence grows with padded tokens; a spare head column, 1 in every query and
///   PADDED_KEY_SCORE * sqrt(d_pad) in padded keys only, gives those keys a score of -1000, so
///   they get no weight (no mask needed); padded query rows are computed and dropped.
fn fused_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    let [b, h, t, d] = q.dims();
    let t_pad = t.next_multiple_of(SEQUENCE_TILE);
    let spare = usize::from(t_pad > t);
    let d_pad = (d + spare).next_multiple_of(HEAD_DIM_TILE);
    let device = q.device();
    let dtype = FloatDType::from(q.dtype());
    let full = |dims: [usize; 4], value: f64| Tensor::<4>::full(dims, value, &device).cast(dtype);
    // [x | spare column | zeros] along the head dim, then `pad_row` repeated below.
    let pad = |x: Tensor<4>, spare_value: f64, pad_row_spare: f64| {
        let mut columns = vec![x];
        if spare == 1 {
            columns.push(full([b, h, t, 1], spare_value));
        }
        if d_pad > d + spare {
            columns.push(full([b, h, t, d_pad - d - spare], 0.0));
        }
        let x = Tensor::cat(columns, 3);
        match t_pad > t {
            true => {
                let mut rows = vec![full([b, h, t_pad - t, d], 0.0), full([b, h, t_pad - t, 1], pad_row_spare)];
                if d_pad > d + 1 {
                    rows.push(full([b, h, t_pad - t, d_pad - d - 1], 0.0));
                }
                Tensor::cat(vec![x, Tensor::cat(rows, 3)], 2)
            }
            false => x,
        }
    };
    // The factor applied in f32 (in bf16 sqrt(96/88) would round 0.23% high), then cast back.
    let q = pad((q.cast(FloatDType::F32) * (d_pad as f64 / d as f64).sqrt()).cast(dtype), 1.0, 1.0);
    let k = pad(k, 0.0, PADDED_KEY_SCORE * (d_pad as f64).sqrt());
    let v = pad(v, 0.0, 0.0);
    let options = burn::tensor::ops::AttentionModuleOptions::default();
    burn::tensor::module::attention(q, k, v, None, None, options).slice([0..b, 0..h, 0..t, 0..d])
}

/// Exact (erf) GELU computed in f32, returned in the dtype of `x`: burn's CubeCL GELU otherwise
/// rounds each of its steps (and the 1/sqrt(2) scalar) to bf16/f16.
fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let dtype = FloatDType::from(x.dtype());
    burn::tensor::activation::gelu(x.cast(FloatDType::F32)).cast(dtype)
}

/// Softmax along `dim` computed in f32, returned in the dtype of `x`.
fn softmax<const D: usize>(x: Tensor<D>, dim: usize) -> Tensor<D> {
    let dtype = FloatDType::from(x.dtype());
    burn::tensor::activation::softmax(x.cast(FloatDType::F32), dim).cast(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    /// 35 text keys (the text stage's length) become 40: zero rows, masked by the extended bias;
    /// and the attention over them equals the one over the 35 keys.
    #[test]
    fn pad_keys_pads_to_a_multiple_of_8_and_masks_the_padding() {
        let device = Device::flex();
        let [b, h, m, d] = [2, 3, 35, 4];
        let ramp = |n: usize, scale: f32| (0..n).map(|i| ((i % 13) as f32 - 6.0) * scale).collect::<Vec<_>>();
        let keys = Tensor::<4>::from_data(TensorData::new(ramp(b * h * m * d, 0.1), [b, h, m, d]), &device);
        let values = Tensor::<4>::from_data(TensorData::new(ramp(b * h * m * d, 0.3), [b, h, m, d]), &device);
        let q = Tensor::<4>::from_data(TensorData::new(ramp(b * h * 5 * d, 0.2), [b, h, 5, d]), &device);
        // A text mask: the last 3 keys of the second text are padding.
        let mask: Vec<f32> = (0..b * m).map(|i| if i >= 2 * m - 3 { MASKED_SCORE as f32 } else { 0.0 }).collect();
        let bias = Tensor::<4>::from_data(TensorData::new(mask, [b, 1, 1, m]), &device);

        let (padded_keys, padded_values, padded_bias) =
            pad_keys(keys.clone(), values.clone(), Some(bias.clone()), FloatDType::F32);
        assert_eq!(padded_keys.dims(), [b, h, 40, d]);
        assert_eq!(padded_values.dims(), [b, h, 40, d]);
        let padded_bias = padded_bias.unwrap();
        assert_eq!(padded_bias.dims(), [b, 1, 1, 40]);
        let values_of = |t: Tensor<4>| t.into_data().try_to_vec::<f32>().unwrap();
        assert!(values_of(padded_keys.clone().narrow(2, m, 5)).iter().all(|&x| x == 0.0));
        assert!(values_of(padded_values.clone().narrow(2, m, 5)).iter().all(|&x| x == 0.0));
        let tail = values_of(padded_bias.clone().narrow(3, m, 5));
        assert!(tail.iter().all(|&x| x == MASKED_SCORE as f32), "{tail:?}");

        let attend = |k: Tensor<4>, v: Tensor<4>, bias: Tensor<4>| {
            let scores = q.clone().matmul(k.swap_dims(2, 3)) + bias;
            burn::tensor::activation::softmax(scores, 3).matmul(v)
        };
        let padded = values_of(attend(padded_keys, padded_values, padded_bias));
        let plain = values_of(attend(keys.clone(), values.clone(), bias));
        let difference = padded.iter().zip(&plain).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(difference < 1e-6, "{difference}");

        // A count that is already a multiple of 8 is left as it is, without a bias.
        let keys_32 = keys.narrow(2, 0, 32);
        let (same, _, no_bias) = pad_keys(keys_32.clone(), values.narrow(2, 0, 32), None, FloatDType::F32);
        assert_eq!(same.dims(), keys_32.dims());
        assert!(no_bias.is_none());
    }
}
