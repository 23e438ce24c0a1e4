//! Parity of the burn BLIP-2 with the Hugging Face reference (method.md sections 1 and 5) on the
//! two tiny random models of `tests/fixtures/tiny_blip2_{a,b}` (see `tests/fixtures/README.md`),
//! plus the loader: the real checkpoint's names and shapes, sharded files, and every loader error.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Device, FloatDType, Int, Tensor, TensorData};
use qpert::Error;
use qpert::model::weights::hf_name;
use qpert::model::{AttentionKernel, Blip2Config, Blip2Model};
use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, TensorView};

const TOLERANCE: f32 = 1e-5;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// A tensor of a fixture file: shape, and values as f32 (floats) or i64 (integers).
struct Stored {
    shape: Vec<usize>,
    f32s: Vec<f32>,
    i64s: Vec<i64>,
}

fn read_safetensors(path: &Path) -> HashMap<String, Stored> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let file = SafeTensors::deserialize(&bytes).unwrap();
    file.tensors()
        .into_iter()
        .map(|(name, view)| {
            let data = view.data();
            let (f32s, i64s) = match view.dtype() {
                Dtype::F32 => {
                    (data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(), vec![])
                }
                Dtype::F16 => {
                    (data.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(), vec![])
                }
                Dtype::BF16 => {
                    (data.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(), vec![])
                }
                Dtype::I64 => {
                    (vec![], data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect())
                }
                Dtype::U8 => (vec![], data.iter().map(|&v| v as i64).collect()),
                other => panic!("{name}: unexpected dtype {other:?}"),
            };
            (name, Stored { shape: view.shape().to_vec(), f32s, i64s })
        })
        .collect()
}

struct Fixture {
    tensors: HashMap<String, Stored>,
    device: Device,
}

impl Fixture {
    fn get(&self, name: &str) -> &Stored {
        self.tensors.get(name).unwrap_or_else(|| panic!("fixture lacks `{name}`"))
    }

    fn float<const D: usize>(&self, name: &str) -> Tensor<D> {
        let s = self.get(name);
        Tensor::from_data(TensorData::new(s.f32s.clone(), s.shape.clone()), &self.device)
    }

    fn int<const D: usize>(&self, name: &str) -> Tensor<D, Int> {
        let s = self.get(name);
        Tensor::from_data(TensorData::new(s.i64s.clone(), s.shape.clone()), &self.device)
    }

    /// The rows of the 2-d integer tensor `name` picked by the 1-d index tensor `index`, gathered
    /// here on the host: the ITM pairs' token ids are then the fixture's own values, whatever a
    /// device kernel does (under `make cuda-preflight`'s stand-in driver no kernel runs, and the
    /// model's token-id check would stop the test before it launches the later kernels).
    fn int_rows(&self, name: &str, index: &str) -> Tensor<2, Int> {
        let (s, rows) = (self.get(name), &self.get(index).i64s);
        let width = s.shape[1];
        let values = rows.iter().flat_map(|&r| s.i64s[r as usize * width..][..width].iter().copied()).collect();
        Tensor::from_data(TensorData::new(values, vec![rows.len(), width]), &self.device)
    }
}

/// A tensor's shape and values, read back to the host.
fn host<const D: usize>(tensor: Tensor<D>) -> (Vec<usize>, Vec<f32>) {
    (tensor.dims().to_vec(), tensor.into_data().try_into_vec_as::<f32>().unwrap())
}

/// Largest absolute difference (infinite if any value is not finite); panics on a shape mismatch.
fn max_abs_diff(name: &str, (shape, actual): (Vec<usize>, Vec<f32>), expected: &Stored) -> f32 {
    assert_eq!(shape, expected.shape, "{name}: shape");
    actual
        .iter()
        .zip(&expected.f32s)
        .map(|(a, e)| (a - e).abs())
        .map(|d| if d.is_finite() { d } else { f32::INFINITY })
        .fold(0.0, f32::max)
}

/// Runs every head of the model in `dir` on `device` in `dtype` and returns the max abs error per
/// output against the f32 reference.
fn parity_errors(dir: &Path, device: &Device, dtype: FloatDType, attention: AttentionKernel) -> Vec<(String, f32)> {
    let model = Blip2Model::load_with_dtype(dir, device, dtype).unwrap().with_attention(attention);
    assert_eq!(model.dtype(), dtype);
    let reference = Fixture { tensors: read_safetensors(&dir.join("reference.safetensors")), device: device.clone() };
    let mut errors = Vec::new();
    let mut check = |name: &str, actual: (Vec<usize>, Vec<f32>), expected: &Stored| {
        errors.push((name.to_string(), max_abs_diff(name, actual, expected)))
    };

    let pixels: Tensor<4> = reference.float("pixel_values");
    // The submodules compute in the run dtype: their input is cast, their output read as f32.
    let embeddings = model.vision_model.embeddings.forward(pixels.clone().cast(dtype));
    check("vision_embeddings", host(embeddings.clone()), reference.get("vision_embeddings"));
    let layer0 = model.vision_model.encoder.layers[0].forward(embeddings, attention);
    check("vision_layer0", host(layer0), reference.get("vision_layer0"));
    let z = model.vision_tokens(pixels).unwrap();
    check("vision_tokens", host(z.clone()), reference.get("vision_tokens"));
    check("query_output", host(model.query_output(z.clone(), None).unwrap()), reference.get("query_output"));
    let image_embeds = model.image_features(z.clone(), None).unwrap();
    check("image_embeds", host(image_embeds.clone()), reference.get("image_embeds"));

    let ids: Tensor<2, Int> = reference.int("input_ids");
    let mask: Tensor<2, Int> = reference.int("attention_mask");
    let text_cls = model.text_cls(ids.clone(), mask.clone()).unwrap();
    check("text_cls", host(text_cls), reference.get("text_cls"));
    let text_embeds = model.text_features(ids.clone(), mask.clone()).unwrap();
    check("text_embeds", host(text_embeds.clone()), reference.get("text_embeds"));
    check("itc", host(itc(image_embeds, text_embeds)), reference.get("itc"));

    let pair_image: Tensor<1, Int> = reference.int("itm_image_index");
    let pair_ids = reference.int_rows("input_ids", "itm_text_index");
    let pair_mask = reference.int_rows("attention_mask", "itm_text_index");
    let itm = model.itm_logits(z.clone(), pair_image.clone(), pair_ids.clone(), pair_mask.clone(), None).unwrap();
    check("itm_logits", host(itm), reference.get("itm_logits"));

    let qpert_path = dir.join("qpert.safetensors");
    if qpert_path.is_file() {
        let qpert = Fixture { tensors: read_safetensors(&qpert_path), device: device.clone() };
        // Key projections: n_cross x [b,h,t,d] against [b,n_cross,t,dq].
        let keys: Vec<Tensor<3>> = model
            .cross_attention_keys(z.clone())
            .unwrap()
            .into_iter()
            .map(|k| {
                let [b, h, t, d] = k.dims();
                k.swap_dims(1, 2).reshape([b, t, h * d])
            })
            .collect();
        let keys = Tensor::stack::<4>(keys, 1);
        check("cross_keys", host(keys), qpert.get("cross_keys"));
        for variant in ["principal", "official"] {
            let pi: Tensor<5> = qpert.float(&format!("pi_{variant}_constant"));
            let features = model.image_features(z.clone(), Some(pi.clone())).unwrap();
            check(&format!("image_embeds_{variant}"), host(features), qpert.get(&format!("image_embeds_{variant}")));
            let itm =
                model.itm_logits(z.clone(), pair_image.clone(), pair_ids.clone(), pair_mask.clone(), Some(pi)).unwrap();
            check(&format!("itm_logits_{variant}"), host(itm), qpert.get(&format!("itm_logits_{variant}")));
        }
    }
    errors
}

/// s_itc = max over the Q rows of F_img . f_txt. Shapes: [b,q,e], [n,e] -> [b,n].
fn itc(image: Tensor<3>, text: Tensor<2>) -> Tensor<2> {
    let [b, q, e] = image.dims();
    let [n, _] = text.dims();
    image.reshape([b * q, e]).matmul(text.transpose()).reshape([b, q, n]).max_dim(1).reshape([b, n])
}

/// Prints every head's f32 error for the model in `dir` and returns the heads outside `tolerance`.
fn parity_outliers(dir: &Path, device: &Device, tolerance: f32, attention: AttentionKernel) -> Vec<String> {
    let name = dir.file_name().unwrap().to_string_lossy();
    let errors = parity_errors(dir, device, FloatDType::F32, attention);
    for (output, error) in &errors {
        eprintln!("{name} {attention:?}: {output:<24} max abs error {error:.2e}");
    }
    assert!(errors.len() >= 14, "every head was compared: {errors:?}");
    errors
        .iter()
        .filter(|(_, e)| *e > tolerance)
        .map(|(output, e)| format!("{name} {attention:?} {output} {e:.2e}"))
        .collect()
}

fn assert_parity(dir: &Path, device: &Device, tolerance: f32, attention: AttentionKernel) {
    let bad = parity_outliers(dir, device, tolerance, attention);
    assert!(bad.is_empty(), "outside {tolerance:e}: {bad:?}");
}

#[test]
fn parity_tiny_a_f32_fused_qkv_bias() {
    assert_parity(&fixture("tiny_blip2_a"), &Device::default(), TOLERANCE, AttentionKernel::Explicit);
}

#[test]
fn parity_tiny_b_f16_split_qkv_bias() {
    assert_parity(&fixture("tiny_blip2_b"), &Device::default(), TOLERANCE, AttentionKernel::Explicit);
}

/// The fused vision attention pads the tiny model's head dim 12 -> 16 and its 17 tokens -> 128
/// (spare column included), the aligned one its 17 tokens -> 64; both must still give the
/// reference's numbers.
#[test]
fn parity_padded_attention_kernels() {
    for kernel in [AttentionKernel::Aligned, AttentionKernel::Fused] {
        assert_parity(&fixture("tiny_blip2_a"), &Device::default(), TOLERANCE, kernel);
        assert_parity(&fixture("tiny_blip2_b"), &Device::default(), TOLERANCE, kernel);
    }
}

/// The same parity on CUDA: `cargo test --features cuda --test parity -- --ignored`. Every kernel
/// and fixture is run and printed before the one assertion, so that a device run that fails one
/// (say f32 matmuls rounded as TF32) still reports all the others.
#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs a CUDA GPU"]
fn parity_cuda() {
    let device = Device::cuda(0);
    let mut bad = Vec::new();
    for kernel in AttentionKernel::ALL {
        for name in ["tiny_blip2_a", "tiny_blip2_b"] {
            bad.extend(parity_outliers(&fixture(name), &device, TOLERANCE, kernel));
        }
    }
    assert!(bad.is_empty(), "outside {TOLERANCE:e}: {bad:?}");
}

/// The CubeCL backend that CUDA uses (fusion, autotuned matmuls, the fused attention routine), run
/// by wgpu: on a CPU through Mesa's lavapipe, `make test-cubecl`.
#[cfg(feature = "wgpu")]
#[test]
fn parity_on_the_cubecl_backend() {
    let device = Device::wgpu(burn::tensor::DeviceKind::DefaultDevice);
    assert_parity(&fixture("tiny_blip2_a"), &device, TOLERANCE, AttentionKernel::Explicit);
    assert_parity(&fixture("tiny_blip2_b"), &device, TOLERANCE, AttentionKernel::Explicit);
    assert_parity(&fixture("tiny_blip2_a"), &device, TOLERANCE, AttentionKernel::Aligned);
    assert_parity(&fixture("tiny_blip2_a"), &device, TOLERANCE, AttentionKernel::Fused);
}

// ---------------------------------------------------------------------------------------------
// Reduced precision: bf16 and f16 against the f32 reference.
//
// Weights and activations in bf16/f16, LayerNorm and softmax in f32, outputs in f32 (see the
// `model` module docs). Measured on CPU (burn-flex), max abs deviation from the f32 reference over
// both fixtures (README, "Precision"):
//
// | output                             | bf16    | f16     |
// |------------------------------------|---------|---------|
// | itc                                | 1.33e-2 | 1.54e-3 |
// | itm_logits                         | 1.65e-2 | 2.28e-3 |
// | image_embeds_{principal,official}  | 3.39e-2 | 3.42e-3 |
// | itm_logits_{principal,official}    | 4.37e-2 | 2.33e-3 |
// | any intermediate (Z, keys, cls...) | 6.09e-2 | 8.63e-3 |
//
// The bounds are about twice the largest measured value, so that a backend that rounds
// differently (CUDA) passes, while a path left in f32 by mistake (deviation ~1e-6) or an op
// silently running in a narrower accumulation (deviations grow by 10x and more) does not go
// unnoticed. bf16 keeps 8 mantissa bits (relative step 3.9e-3), f16 11 (4.9e-4): the deviations
// are about 10 of those steps of the largest activations, after 2 + 2 tiny layers.

/// The largest allowed max abs deviation from the f32 reference of `output` in `dtype`.
fn precision_bound(dtype: FloatDType, output: &str) -> f32 {
    match (dtype, output) {
        (FloatDType::BF16, "itc") => 3e-2,
        (FloatDType::BF16, "itm_logits") => 4e-2,
        (FloatDType::BF16, _) => 1e-1,
        (FloatDType::F16, "itc") => 3e-3,
        (FloatDType::F16, "itm_logits") => 5e-3,
        (FloatDType::F16, _) => 1.5e-2,
        _ => unreachable!("only bf16 and f16 are bounded here"),
    }
}

/// Runs every head in `dtype` on both fixtures (the Q-Pert heads with the fixtures' Pi included),
/// prints the deviations from the f32 reference and returns those not within [`precision_bound`]
/// or zero (a zero deviation means the run was not really in reduced precision).
///
/// Fixture b goes first: its widths (36, 12) are rows of 72 and 24 bytes in bf16/f16, not the 16-byte
/// multiples TMA needs, and CubeCL's autotune shares one kernel choice across a size bucket (see
/// `KEY_ROW_MULTIPLE` in `src/model/mod.rs`). Tuned on fixture a's aligned rows first, a bucket can
/// replay a TMA matmul on fixture b's and panic (found by `make cuda-preflight`); tuned on b's first,
/// TMA fails there during tuning and is never chosen. The real BLIP-2's widths are all multiples of 8.
fn precision_outliers(device: &Device, dtype: FloatDType, attention: AttentionKernel) -> Vec<String> {
    let mut bad = Vec::new();
    for name in ["tiny_blip2_b", "tiny_blip2_a"] {
        let errors = parity_errors(&fixture(name), device, dtype, attention);
        for (output, error) in &errors {
            eprintln!("{name} {dtype:?} {attention:?}: {output:<24} max abs error {error:.2e}");
        }
        assert!(errors.len() >= 14, "every head was compared: {errors:?}");
        bad.extend(
            errors
                .iter()
                .filter(|(output, e)| *e > precision_bound(dtype, output) || *e < 1e-4)
                .map(|(output, e)| format!("{name} {dtype:?} {attention:?} {output} {e:.2e}")),
        );
    }
    bad
}

fn assert_precision(device: &Device, dtype: FloatDType, attention: AttentionKernel) {
    let bad = precision_outliers(device, dtype, attention);
    assert!(bad.is_empty(), "outside bounds: {bad:?}");
}

#[test]
fn bf16_stays_near_the_f32_reference() {
    for kernel in AttentionKernel::ALL {
        assert_precision(&Device::default(), FloatDType::BF16, kernel);
    }
}

#[test]
fn f16_stays_near_the_f32_reference() {
    assert_precision(&Device::default(), FloatDType::F16, AttentionKernel::Explicit);
}

/// f16 on the CubeCL backend (wgpu over lavapipe, `make test-cubecl`); WGSL has no bf16.
#[cfg(feature = "wgpu")]
#[test]
fn f16_on_the_cubecl_backend() {
    let device = Device::wgpu(burn::tensor::DeviceKind::DefaultDevice);
    for attention in AttentionKernel::ALL {
        assert_precision(&device, FloatDType::F16, attention);
    }
}

/// The same bounds on CUDA: `cargo test --features cuda --test parity -- --ignored`.
#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs a CUDA GPU"]
fn reduced_precision_cuda() {
    let device = Device::cuda(0);
    let mut bad = Vec::new();
    for attention in AttentionKernel::ALL {
        bad.extend(precision_outliers(&device, FloatDType::BF16, attention));
        bad.extend(precision_outliers(&device, FloatDType::F16, attention));
    }
    assert!(bad.is_empty(), "outside bounds: {bad:?}");
}

#[test]
fn other_dtypes_are_a_config_error() {
    let dir = fixture("tiny_blip2_a");
    match Blip2Model::load_with_dtype(&dir, &Device::default(), FloatDType::F64) {
        Err(Error::Config { path, msg }) => {
            assert_eq!(path, dir);
            assert!(msg.contains("F64") && msg.contains("bf16"), "{msg}");
        }
        other => panic!("expected a config error, got {:?}", other.map(|_| ())),
    }
}

// ---------------------------------------------------------------------------------------------
// Loader: the real checkpoint's layout.

/// The HF tensor names and shapes of `Blip2ForImageTextRetrieval`, written out from method.md's
/// table (independently of the module code), for a config's layer counts.
fn hf_tensor_table(c: &Blip2Config) -> Vec<(String, Vec<usize>)> {
    let v = &c.vision_config;
    let q = &c.qformer_config;
    let (dv, dq, iv, iq, e) =
        (v.hidden_size, q.hidden_size, v.intermediate_size, q.intermediate_size, c.image_text_hidden_size);
    let p = v.patch_size;
    let mut t: Vec<(String, Vec<usize>)> = vec![
        ("query_tokens".into(), vec![1, c.num_query_tokens, dq]),
        ("vision_model.embeddings.class_embedding".into(), vec![1, 1, dv]),
        ("vision_model.embeddings.position_embedding".into(), vec![1, v.num_tokens(), dv]),
        ("vision_model.embeddings.patch_embedding.weight".into(), vec![dv, 3, p, p]),
        ("vision_model.embeddings.patch_embedding.bias".into(), vec![dv]),
        ("vision_model.post_layernorm.weight".into(), vec![dv]),
        ("vision_model.post_layernorm.bias".into(), vec![dv]),
        ("embeddings.word_embeddings.weight".into(), vec![q.vocab_size, dq]),
        ("embeddings.position_embeddings.weight".into(), vec![q.max_position_embeddings, dq]),
        ("qformer.layernorm.weight".into(), vec![dq]),
        ("qformer.layernorm.bias".into(), vec![dq]),
    ];
    fn linear(t: &mut Vec<(String, Vec<usize>)>, name: String, d_in: usize, d_out: usize) {
        t.push((format!("{name}.weight"), vec![d_out, d_in]));
        t.push((format!("{name}.bias"), vec![d_out]));
    }
    for (name, d_out) in [("vision_projection", e), ("text_projection", e), ("itm_head", 2)] {
        linear(&mut t, name.into(), dq, d_out);
    }
    for i in 0..v.num_hidden_layers {
        let l = format!("vision_model.encoder.layers.{i}");
        for norm in ["layer_norm1", "layer_norm2"] {
            t.push((format!("{l}.{norm}.weight"), vec![dv]));
            t.push((format!("{l}.{norm}.bias"), vec![dv]));
        }
        linear(&mut t, format!("{l}.self_attn.qkv"), dv, 3 * dv);
        linear(&mut t, format!("{l}.self_attn.projection"), dv, dv);
        linear(&mut t, format!("{l}.mlp.fc1"), dv, iv);
        linear(&mut t, format!("{l}.mlp.fc2"), iv, dv);
    }
    for j in 0..q.num_hidden_layers {
        let l = format!("qformer.encoder.layer.{j}");
        let block = |t: &mut Vec<(String, Vec<usize>)>, kind: &str, dk: usize| {
            linear(t, format!("{l}.{kind}.attention.query"), dq, dq);
            linear(t, format!("{l}.{kind}.attention.key"), dk, dq);
            linear(t, format!("{l}.{kind}.attention.value"), dk, dq);
            linear(t, format!("{l}.{kind}.output.dense"), dq, dq);
            t.push((format!("{l}.{kind}.output.LayerNorm.weight"), vec![dq]));
            t.push((format!("{l}.{kind}.output.LayerNorm.bias"), vec![dq]));
        };
        block(&mut t, "attention", dq);
        if j % q.cross_attention_frequency == 0 {
            block(&mut t, "crossattention", dv);
        }
        for (inter, out) in [("intermediate", "output"), ("intermediate_query", "output_query")] {
            linear(&mut t, format!("{l}.{inter}.dense"), dq, iq);
            linear(&mut t, format!("{l}.{out}.dense"), iq, dq);
            t.push((format!("{l}.{out}.LayerNorm.weight"), vec![dq]));
            t.push((format!("{l}.{out}.LayerNorm.bias"), vec![dq]));
        }
    }
    t
}

#[test]
fn real_checkpoint_layout_has_809_tensors_and_1_172_623_618_parameters() {
    let table = hf_tensor_table(&Blip2Config::itm_vit_g_coco());
    assert_eq!(table.len(), 809);
    let params: usize = table.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    assert_eq!(params, 1_172_623_618);
}

/// Collects (HF name, shape) of every parameter of a module without initialising it.
#[derive(Default)]
struct ParamNames {
    path: Vec<String>,
    names: Vec<(String, Vec<usize>)>,
}

impl ModuleVisitor for ParamNames {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let name = hf_name(&self.path.join("."));
        self.names.push((name, param.lazy_shape().to_vec()));
    }
}

#[test]
fn the_full_model_has_exactly_the_real_checkpoint_tensors() {
    let config = Blip2Config::itm_vit_g_coco();
    let model = config.init(&Device::default()); // lazy: nothing is allocated
    let mut visitor = ParamNames::default();
    model.visit(&mut visitor);
    let mut ours = visitor.names;
    let mut real = hf_tensor_table(&config);
    ours.sort();
    real.sort();
    assert_eq!(ours, real);
}

/// Deterministic pseudo-random f16 bytes (xorshift), small values.
fn random_f16_bytes(n: usize, seed: &mut u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 * n);
    for _ in 0..n {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        let unit = (*seed >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
        out.extend(half::f16::from_f32((unit - 0.5) * 0.04).to_le_bytes());
    }
    out
}

/// Writes `tensors` (name, shape, dtype, bytes) as a safetensors file without `__metadata__`.
fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Dtype, Vec<u8>)]) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(name, shape, dtype, bytes)| (name.clone(), TensorView::new(*dtype, shape.clone(), bytes).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn small_real_config() -> Blip2Config {
    let mut config = Blip2Config::itm_vit_g_coco();
    config.vision_config.num_hidden_layers = 1;
    config.qformer_config.num_hidden_layers = 2;
    config
}

fn write_config(dir: &Path, config: &Blip2Config) {
    let v = &config.vision_config;
    let q = &config.qformer_config;
    let json = serde_json::json!({
        "torch_dtype": "float16",
        "vision_config": {"image_size": v.image_size, "num_hidden_layers": v.num_hidden_layers},
        "qformer_config": {"use_qformer_text_input": true, "vocab_size": q.vocab_size,
                           "num_hidden_layers": q.num_hidden_layers},
    });
    std::fs::write(dir.join("config.json"), json.to_string()).unwrap();
}

#[test]
fn loads_the_real_layout_from_f16_without_metadata() {
    let config = small_real_config();
    let dir = tempfile::tempdir().unwrap();
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let tensors: Vec<_> = hf_tensor_table(&config)
        .into_iter()
        .map(|(name, shape)| {
            let bytes = random_f16_bytes(shape.iter().product(), &mut seed);
            (name, shape, Dtype::F16, bytes)
        })
        .collect();
    write_safetensors(&dir.path().join("model.safetensors"), &tensors);
    write_config(dir.path(), &config);

    let device = Device::default();
    let model = Blip2Model::load(dir.path(), &device).unwrap();
    let mut expected_config = config.clone();
    expected_config.torch_dtype = Some("float16".into());
    assert_eq!(model.config(), &expected_config);
    // One stored value comes back exactly (f16 -> f32 is exact), in the right place.
    let (name, shape, _, bytes) = tensors.iter().find(|(n, ..)| n == "itm_head.weight").unwrap();
    assert_eq!(shape, &vec![2, 768]);
    let expected = half::f16::from_le_bytes([bytes[2 * 769], bytes[2 * 769 + 1]]).to_f32(); // [1, 1]
    let weight = model.itm_head.weight.val(); // burn stores Linear weights [in, out]
    let actual = weight.slice([1..2, 1..2]).into_data().try_into_vec_as::<f32>().unwrap()[0];
    assert_eq!(actual, expected, "{name}[1, 1]");

    // The forwards run with the real shapes.
    let s = config.vision_config.image_size;
    let pixels = Tensor::<4>::zeros([1, 3, s, s], &device);
    let z = model.vision_tokens(pixels).unwrap();
    assert_eq!(z.dims(), [1, 677, 1408]);
    assert_eq!(model.cross_attention_keys(z.clone()).unwrap()[0].dims(), [1, 12, 677, 64]);
    assert_eq!(model.image_features(z.clone(), None).unwrap().dims(), [1, 32, 256]);
    let ids = Tensor::<2, Int>::from_data(TensorData::new(vec![101i64, 2000, 102, 0], [1, 4]), &device);
    let mask = Tensor::<2, Int>::from_data(TensorData::new(vec![1i64, 1, 1, 0], [1, 4]), &device);
    assert_eq!(model.text_features(ids.clone(), mask.clone()).unwrap().dims(), [1, 256]);
    let pair = Tensor::<1, Int>::from_data(TensorData::new(vec![0i64], [1]), &device);
    assert_eq!(model.itm_logits(z, pair, ids, mask, None).unwrap().dims(), [1]);
}

// ---------------------------------------------------------------------------------------------
// Loader: sharded files and errors.

/// The tensors of tiny model a as (name, shape, dtype, bytes), sorted by name.
fn tiny_a_tensors() -> Vec<(String, Vec<usize>, Dtype, Vec<u8>)> {
    let bytes = std::fs::read(fixture("tiny_blip2_a").join("model.safetensors")).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<_> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| (name, view.shape().to_vec(), view.dtype(), view.data().to_vec()))
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors
}

/// A model folder with tiny model a's config and the given tensors in `model.safetensors`.
fn tiny_a_dir(tensors: &[(String, Vec<usize>, Dtype, Vec<u8>)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("tiny_blip2_a").join("config.json"), dir.path().join("config.json")).unwrap();
    write_safetensors(&dir.path().join("model.safetensors"), tensors);
    dir
}

fn weights_error(dir: &Path) -> (PathBuf, String) {
    match Blip2Model::load(dir, &Device::default()) {
        Err(Error::Weights { path, msg }) => (path, msg),
        Err(other) => panic!("expected Error::Weights, got {other:?}"),
        Ok(_) => panic!("expected Error::Weights, got a model"),
    }
}

/// Splits tiny model a into two shards with an index; returns the folder.
fn sharded_tiny_a() -> tempfile::TempDir {
    let tensors = tiny_a_tensors();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("tiny_blip2_a").join("config.json"), dir.path().join("config.json")).unwrap();
    let half = tensors.len() / 2;
    let mut weight_map = serde_json::Map::new();
    for (i, part) in [&tensors[..half], &tensors[half..]].into_iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        write_safetensors(&dir.path().join(&file), part);
        for (name, ..) in part {
            weight_map.insert(name.clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    dir
}

#[test]
fn sharded_checkpoint_loads_like_the_single_file() {
    let device = Device::default();
    let dir = sharded_tiny_a();
    let sharded = Blip2Model::load(dir.path(), &device).unwrap();
    let single = Blip2Model::load(&fixture("tiny_blip2_a"), &device).unwrap();
    let reference = read_safetensors(&fixture("tiny_blip2_a").join("reference.safetensors"));
    let px = &reference["pixel_values"];
    let pixels = Tensor::<4>::from_data(TensorData::new(px.f32s.clone(), px.shape.clone()), &device);
    let a = sharded.vision_tokens(pixels.clone()).unwrap().into_data().try_into_vec_as::<f32>().unwrap();
    let b = single.vision_tokens(pixels).unwrap().into_data().try_into_vec_as::<f32>().unwrap();
    assert_eq!(a, b);
}

#[test]
fn missing_shard_is_named() {
    let dir = sharded_tiny_a();
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let (path, msg) = weights_error(dir.path());
    assert!(path.ends_with("model-00002-of-00002.safetensors"), "{}", path.display());
    assert!(msg.contains("model.safetensors.index.json"), "{msg}");
}

#[test]
fn missing_tensor_is_named() {
    let mut tensors = tiny_a_tensors();
    let name = "qformer.encoder.layer.2.crossattention.attention.key.weight";
    tensors.retain(|(n, ..)| n != name);
    let dir = tiny_a_dir(&tensors);
    let (path, msg) = weights_error(dir.path());
    assert!(path.ends_with("model.safetensors"), "{}", path.display());
    assert!(msg.contains(name) && msg.contains("missing") && msg.contains("[32, 48]"), "{msg}");
}

#[test]
fn missing_layer_norm_is_named_by_its_hf_name() {
    let mut tensors = tiny_a_tensors();
    let name = "qformer.encoder.layer.1.output_query.LayerNorm.bias";
    tensors.retain(|(n, ..)| n != name);
    let (_, msg) = weights_error(tiny_a_dir(&tensors).path());
    assert!(msg.contains(name), "{msg}");
}

#[test]
fn mis_shaped_tensor_names_expected_and_found_shapes() {
    let mut tensors = tiny_a_tensors();
    let name = "vision_model.encoder.layers.1.mlp.fc1.weight"; // [96, 48]
    let entry = tensors.iter_mut().find(|(n, ..)| n == name).unwrap();
    entry.1 = vec![48, 96];
    let (_, msg) = weights_error(tiny_a_dir(&tensors).path());
    assert!(msg.contains(name) && msg.contains("expected shape [96, 48]") && msg.contains("found [48, 96]"), "{msg}");
}

#[test]
fn missing_config_json_is_named() {
    let dir = tiny_a_dir(&tiny_a_tensors());
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let (path, _) = weights_error(dir.path());
    assert!(path.ends_with("config.json"), "{}", path.display());
}

#[test]
fn malformed_config_json_is_named() {
    let dir = tiny_a_dir(&tiny_a_tensors());
    std::fs::write(dir.path().join("config.json"), "{\"vision_config\": {\"hidden_size\": \"wide\"").unwrap();
    let (path, msg) = weights_error(dir.path());
    assert!(path.ends_with("config.json"), "{}", path.display());
    assert!(msg.contains("malformed"), "{msg}");
}

#[test]
fn missing_weights_file_is_named() {
    let dir = tiny_a_dir(&tiny_a_tensors());
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let (path, msg) = weights_error(dir.path());
    assert!(path.ends_with("model.safetensors"), "{}", path.display());
    assert!(msg.contains("model.safetensors.index.json"), "{msg}");
}

#[test]
fn bad_inputs_are_rejected() {
    let device = Device::default();
    let model = Blip2Model::load(&fixture("tiny_blip2_a"), &device).unwrap();
    let wrong_side = Tensor::<4>::zeros([1, 3, 28, 56], &device);
    assert!(matches!(model.vision_tokens(wrong_side), Err(Error::Input { .. })));
    let z = Tensor::<3>::zeros([2, 17, 48], &device);
    let pi = Tensor::<5>::zeros([2, 3, 4, 8, 8], &device); // tiny a has 2 cross layers
    assert!(matches!(model.image_features(z.clone(), Some(pi)), Err(Error::Input { .. })));
    let ids = Tensor::<2, Int>::zeros([1, 4], &device);
    let mask = Tensor::<2, Int>::ones([1, 4], &device);
    let out_of_range = Tensor::<1, Int>::from_data(TensorData::new(vec![2i64], [1]), &device);
    let err = model.itm_logits(z, out_of_range, ids.clone(), mask.clone(), None).unwrap_err();
    assert!(matches!(err, Error::Input { .. }) && err.to_string().contains("pair_image"), "{err}");
    let bad_id = Tensor::<2, Int>::from_data(TensorData::new(vec![101i64, 30523], [1, 2]), &device);
    let mask2 = Tensor::<2, Int>::ones([1, 2], &device);
    let err = model.text_features(bad_id, mask2.clone()).unwrap_err();
    assert!(err.to_string().contains("30523"), "{err}");
    let bad_mask = Tensor::<2, Int>::from_data(TensorData::new(vec![1i64, 2], [1, 2]), &device);
    let err = model.text_features(ids.narrow(1, 0, 2), bad_mask).unwrap_err();
    assert!(err.to_string().starts_with("attention_mask: "), "{err}");
    let too_long = Tensor::<2, Int>::zeros([1, 513], &device);
    let err = model.text_features(too_long.clone(), too_long).unwrap_err();
    assert!(err.to_string().contains("length 513"), "{err}");
}

#[test]
fn init_random_is_seeded() {
    let device = Device::default();
    let config = Blip2Config::from_model_dir(&fixture("tiny_blip2_a")).unwrap();
    let features = |seed: u64| {
        let model = Blip2Model::init_random(&config, seed, &device).unwrap();
        let z = model.vision_tokens(Tensor::<4>::ones([1, 3, 56, 56], &device)).unwrap();
        host(model.image_features(z, None).unwrap()).1
    };
    let a = features(7);
    assert!(a.iter().all(|v| v.is_finite()));
    assert_eq!(a, features(7));
    assert_ne!(a, features(8));
}
