//! The BLIP-2 retrieval model and its public forwards: vision tokens Z, cross-attention keys,
//! ITC image and text features and ITM logits (method.md section 1, "Heads"), with the optional
//! Q-Pert perturbation Pi of method.md section 5. Follows `Blip2ForImageTextRetrieval.forward`
//! (both `use_image_text_matching_head` branches) in `models/blip_2/modeling_blip_2.py` of
//! transformers 5.24, the version that generated `tests/fixtures`. Every forward checks its inputs
//! and returns `Error::Input` naming the argument. Every forward casts its float inputs to the run
//! dtype ([`Blip2Model::dtype`]) and returns f32 (see the module docs of `model` on precision).

use std::path::Path;

use burn::module::{Initializer, Module, ModuleVisitor, Param};
use burn::nn::{Embedding, EmbeddingConfig, Linear};
use burn::tensor::{Device, FloatDType, Int, Tensor, TensorData};

use super::config::Blip2Config;
use super::linear;
use super::qformer::{BeforeCrossAttention, CrossInputs, CrossKv, ImageRows, QFormerModel};
use super::vision::VisionModel;
use super::weights::{Checkpoint, load_module, save_module};
use super::{AttentionKernel, MASKED_SCORE};
use crate::data::tokenizer::TokenBatch;
use crate::error::{Error, Result};

/// Word and position embeddings of the Q-Former text (`embeddings`). No token-type embedding and
/// no LayerNorm here: the Q-Former's `layernorm` normalises [queries; text] together.
#[derive(Module, Debug)]
pub struct TextEmbeddings {
    /// [V, dq].
    pub word_embeddings: Embedding,
    /// [P, dq].
    pub position_embeddings: Embedding,
}

impl TextEmbeddings {
    /// Shapes: input_ids [n,l] -> [n,l,dq] (word + position 0..l-1).
    pub fn forward(&self, input_ids: Tensor<2, Int>) -> Tensor<3> {
        let [_, l] = input_ids.dims();
        let positions = Tensor::<1, Int>::arange(0..l as i64, &input_ids.device()).reshape([1, l]);
        self.word_embeddings.forward(input_ids) + self.position_embeddings.forward(positions)
    }
}

/// A batch of images prepared for ITM ([`Blip2Model::itm_images`]).
pub struct ItmImages {
    /// Keys and values per cross-attention layer, [b_img,h,m,d] (`AttentionKernel::cross_attention_len`).
    cross: Vec<CrossKv>,
    /// Pi, [b_img,n_cross,h,d,d].
    perturbation: Option<Tensor<5>>,
    /// b_img.
    images: usize,
}

/// A batch of texts prepared for ITM ([`Blip2Model::itm_texts`]): the first Q-Former layer up to
/// its cross-attention, which depends on the text alone, computed once for all of a text's pairs.
#[derive(Debug, Clone)]
pub struct ItmTexts {
    /// The query rows after the first layer's self-attention, [n,q,dq], and the text rows after
    /// the first layer, [n,l,dq] (none when the first layer is the last: ITM reads query rows).
    first: BeforeCrossAttention,
    /// The attention bias of [queries; text], [n,1,1,q+l].
    mask_bias: Tensor<4>,
}

impl ItmTexts {
    /// The texts of `parts`, in order. Shapes: every part [n_i,...] with the same length l.
    pub fn cat(parts: Vec<Self>) -> Self {
        let join = |tensors: Vec<Option<Tensor<3>>>| {
            tensors.into_iter().collect::<Option<Vec<_>>>().map(|t| Tensor::cat(t, 0))
        };
        let (mut queries, mut text, mut mask_bias) = (Vec::new(), Vec::new(), Vec::new());
        for part in parts {
            queries.push(part.first.queries);
            text.push(part.first.text);
            mask_bias.push(part.mask_bias);
        }
        let first = BeforeCrossAttention { queries: join(queries), text: join(text) };
        Self { first, mask_bias: Tensor::cat(mask_bias, 0) }
    }

    /// The number of texts.
    fn len(&self) -> usize {
        self.mask_bias.dims()[0]
    }

    /// The rows of `indices`, on the device. Shapes: [n,...] -> [p,...].
    fn select(&self, indices: Tensor<1, Int>) -> Self {
        let rows = |x: &Option<Tensor<3>>| x.clone().map(|x| x.select(0, indices.clone()));
        let first = BeforeCrossAttention { queries: rows(&self.first.queries), text: rows(&self.first.text) };
        Self { first, mask_bias: self.mask_bias.clone().select(0, indices) }
    }
}

/// BLIP-2 for image-text retrieval (`Blip2ForImageTextRetrieval`), in f32, bf16 or f16.
#[derive(Module, Debug)]
pub struct Blip2Model {
    /// The vision tower.
    pub vision_model: VisionModel,
    /// The Q learned queries, [1, Q, dq].
    pub query_tokens: Param<Tensor<3>>,
    /// Text embeddings.
    pub embeddings: TextEmbeddings,
    /// The Q-Former.
    pub qformer: QFormerModel,
    /// ITC image head [E, dq].
    pub vision_projection: Linear,
    /// ITC text head [E, dq].
    pub text_projection: Linear,
    /// ITM head [2, dq] (index 1 is "match").
    pub itm_head: Linear,
    #[module(skip)]
    config: Blip2Config,
    /// The dtype of the weights and activations.
    #[module(skip)]
    dtype: FloatDType,
    /// How the vision tower's self-attention is computed.
    #[module(skip)]
    attention: AttentionKernel,
}

impl Blip2Config {
    /// Builds the model with lazily initialised (random) parameters, the burn way.
    pub fn init(&self, device: &Device) -> Blip2Model {
        let q = &self.qformer_config;
        let dq = q.hidden_size;
        let e = self.image_text_hidden_size;
        Blip2Model {
            vision_model: self.vision_config.init(device),
            query_tokens: Initializer::Normal { mean: 0.0, std: 0.02 }.init([1, self.num_query_tokens, dq], device),
            embeddings: TextEmbeddings {
                word_embeddings: EmbeddingConfig::new(q.vocab_size, dq).init(device),
                position_embeddings: EmbeddingConfig::new(q.max_position_embeddings, dq).init(device),
            },
            qformer: q.init(device),
            vision_projection: linear(dq, e, true, device),
            text_projection: linear(dq, e, true, device),
            itm_head: linear(dq, 2, true, device),
            config: self.clone(),
            dtype: FloatDType::F32,
            attention: AttentionKernel::Explicit,
        }
    }
}

/// Forces every lazily initialised parameter, so that random init is done before timing.
struct Materialize;

impl ModuleVisitor for Materialize {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let _ = param.val();
    }
}

/// L2 normalisation along the last axis, as `torch.nn.functional.normalize` (eps 1e-12), in f32.
fn l2_normalize(x: Tensor<3>) -> Tensor<3> {
    let x = f32s(x);
    let norm = x.clone().square().sum_dim(2).sqrt().clamp_min(1e-12);
    x / norm
}

/// A float tensor in f32 (a no-op when it is f32 already).
fn f32s<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    x.cast(FloatDType::F32)
}

/// Additive attention bias from a 0/1 mask in `dtype`: 0 where visible, [`MASKED_SCORE`] where masked.
/// Shapes: mask [b,n] Int -> [b,1,1,n].
fn mask_bias(mask: Tensor<2, Int>, dtype: FloatDType) -> Tensor<4> {
    let [b, n] = mask.dims();
    ((mask.float() - 1.0) * -MASKED_SCORE).reshape([b, 1, 1, n]).cast(dtype)
}

/// A bad forward argument, named like a path (`pixel_values: expected ...`).
fn bad_input(argument: &str, msg: impl std::fmt::Display) -> Error {
    Error::input(argument, msg)
}

/// The values of an Int tensor, read back to the host.
fn host_ints<const D: usize>(argument: &str, tensor: &Tensor<D, Int>) -> Result<Vec<i64>> {
    tensor.to_data().try_into_vec_as::<i64>().map_err(|e| bad_input(argument, format!("cannot read values: {e:?}")))
}

impl Blip2Model {
    /// Loads `<model_dir>/config.json` and the safetensors weights (converted to f32) onto `device`.
    /// Every parameter must be present with its exact shape; see `weights.rs`.
    pub fn load(model_dir: &Path, device: &Device) -> Result<Self> {
        Self::load_with_dtype(model_dir, device, FloatDType::F32)
    }

    /// [`Blip2Model::load`] with the weights converted to `dtype` (f32, bf16 or f16), which is then
    /// the dtype the model computes in, LayerNorm and softmax excepted (they run in f32).
    pub fn load_with_dtype(model_dir: &Path, device: &Device, dtype: FloatDType) -> Result<Self> {
        if !matches!(dtype, FloatDType::F32 | FloatDType::BF16 | FloatDType::F16) {
            return Err(Error::config(model_dir, format!("model precision {dtype:?} is not one of f32, bf16, f16")));
        }
        let config = Blip2Config::from_model_dir(model_dir)?;
        let checkpoint = Checkpoint::open(model_dir)?;
        let what = format!("the weights of {}", model_dir.display());
        let in_f32 = dtype == FloatDType::F32;
        let mut model =
            on_device(&what, in_f32, device, || load_module(config.init(device), &checkpoint, device, dtype))?;
        model.dtype = dtype;
        Ok(model)
    }

    /// A model with random weights for benchmarks: same shapes and code path as a loaded one.
    pub fn init_random(config: &Blip2Config, seed: u64, device: &Device) -> Result<Self> {
        config.validate().map_err(|msg| Error::weights("config.json", msg))?;
        device.seed(seed);
        on_device("the random weights", false, device, || {
            let model = config.init(device);
            model.visit(&mut Materialize);
            Ok(model)
        })
    }

    /// Writes the weights to `path` as an f32 `model.safetensors` under the HF names, so that
    /// [`Blip2Model::load`] reads them back (with a `config.json` of the same configuration).
    pub fn save_safetensors(&self, path: &Path) -> Result<()> {
        save_module(self, path)
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &Blip2Config {
        &self.config
    }

    /// The dtype of the weights and of the activations.
    pub fn dtype(&self) -> FloatDType {
        self.dtype
    }

    /// The model with its vision tower's self-attention computed by `kernel` (default: explicit).
    pub fn with_attention(self, kernel: AttentionKernel) -> Self {
        Self { attention: kernel, ..self }
    }

    /// A float input in the run dtype (a no-op when it is already).
    fn run<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        x.cast(self.dtype)
    }

    fn check_z(&self, z: &Tensor<3>) -> Result<()> {
        let v = &self.config.vision_config;
        let [_, t, dv] = z.dims();
        if (t, dv) != (v.num_tokens(), v.hidden_size) {
            return Err(bad_input(
                "z",
                format!("expected [b, {}, {}], found {:?}", v.num_tokens(), v.hidden_size, z.dims()),
            ));
        }
        Ok(())
    }

    fn check_perturbation(&self, perturbation: Option<&Tensor<5>>, b: usize) -> Result<()> {
        let q = &self.config.qformer_config;
        let expected = [b, q.num_cross_layers(), q.num_attention_heads, q.head_dim(), q.head_dim()];
        match perturbation {
            Some(pi) if pi.dims() != expected => {
                Err(bad_input("perturbation", format!("expected {expected:?}, found {:?}", pi.dims())))
            }
            _ => Ok(()),
        }
    }

    fn check_text(&self, input_ids: &Tensor<2, Int>, attention_mask: &Tensor<2, Int>) -> Result<()> {
        let [n, l] = input_ids.dims();
        if attention_mask.dims() != [n, l] {
            return Err(bad_input(
                "attention_mask",
                format!("expected the shape of input_ids {:?}, found {:?}", [n, l], attention_mask.dims()),
            ));
        }
        self.check_length(l)?;
        self.check_token_values(host_ints("input_ids", input_ids)?, host_ints("attention_mask", attention_mask)?)
    }

    fn check_length(&self, l: usize) -> Result<()> {
        let max = self.config.qformer_config.max_position_embeddings;
        if l == 0 || l > max {
            return Err(bad_input("input_ids", format!("length {l} is not in 1..={max}")));
        }
        Ok(())
    }

    /// Out-of-range ids would index past the embedding table; a mask value other than 0/1 would
    /// scale the attention bias.
    fn check_token_values(
        &self,
        input_ids: impl IntoIterator<Item = i64>,
        attention_mask: impl IntoIterator<Item = i64>,
    ) -> Result<()> {
        let vocab = self.config.qformer_config.vocab_size as i64;
        if let Some(id) = input_ids.into_iter().find(|id| !(0..vocab).contains(id)) {
            return Err(bad_input("input_ids", format!("token id {id} is outside 0..{vocab}")));
        }
        if let Some(m) = attention_mask.into_iter().find(|&m| m != 0 && m != 1) {
            return Err(bad_input("attention_mask", format!("value {m} is not 0 or 1")));
        }
        Ok(())
    }

    /// The vision tokens Z. Rejects images that are not S x S with the configured channels.
    /// Shapes: pixel_values [b,3,s,s] -> z [b,t,dv].
    pub fn vision_tokens(&self, pixel_values: Tensor<4>) -> Result<Tensor<3>> {
        let v = &self.config.vision_config;
        let [_, c, h, w] = pixel_values.dims();
        if (c, h, w) != (v.num_channels, v.image_size, v.image_size) {
            return Err(bad_input(
                "pixel_values",
                format!(
                    "expected [b, {}, {s}, {s}], found {:?}",
                    v.num_channels,
                    pixel_values.dims(),
                    s = v.image_size
                ),
            ));
        }
        Ok(f32s(self.vision_model.forward(self.run(pixel_values), self.attention)))
    }

    /// The key projection of Z in every cross-attention layer, split into heads: what Q-Pert builds
    /// its subspaces from (method.md section 4).
    /// Shapes: z [b,t,dv] -> n_cross x [b,h,t,d].
    pub fn cross_attention_keys(&self, z: Tensor<3>) -> Result<Vec<Tensor<4>>> {
        self.check_z(&z)?;
        let z = self.run(z);
        Ok(self.qformer.cross_attention_blocks().map(|block| f32s(block.attention.key_heads(z.clone()))).collect())
    }

    /// The Q-Former output of the queries alone against Z, before the ITC projection; with Pi
    /// applied in every cross-attention layer when given.
    /// Shapes: z [b,t,dv], perturbation [b,n_cross,h,d,d] -> [b,q,dq].
    pub fn query_output(&self, z: Tensor<3>, perturbation: Option<Tensor<5>>) -> Result<Tensor<3>> {
        Ok(f32s(self.query_output_run(z, perturbation)?))
    }

    /// [`Blip2Model::query_output`] in the run dtype.
    fn query_output_run(&self, z: Tensor<3>, perturbation: Option<Tensor<5>>) -> Result<Tensor<3>> {
        self.check_z(&z)?;
        let [b, _, _] = z.dims();
        self.check_perturbation(perturbation.as_ref(), b)?;
        let [_, q, dq] = self.query_tokens.dims();
        let queries = self.query_tokens.val().expand([b, q, dq]);
        let cross = self.qformer.cross_kv(self.run(z), self.attention);
        let perturbation = perturbation.map(|pi| self.run(pi));
        Ok(self.qformer.forward(queries, None, q, &cross, perturbation, q))
    }

    /// ITC image features F_img, L2-normalised.
    /// Shapes: z [b,t,dv], perturbation [b,n_cross,h,d,d] -> [b,q,e].
    pub fn image_features(&self, z: Tensor<3>, perturbation: Option<Tensor<5>>) -> Result<Tensor<3>> {
        let out = self.query_output_run(z, perturbation)?;
        Ok(l2_normalize(self.vision_projection.forward(out)))
    }

    /// The Q-Former output at the CLS position of a text-only pass, before the ITC projection.
    /// Shapes: input_ids [n,l] Int, attention_mask [n,l] Int -> [n,dq].
    pub fn text_cls(&self, input_ids: Tensor<2, Int>, attention_mask: Tensor<2, Int>) -> Result<Tensor<2>> {
        Ok(f32s(self.text_cls_run(input_ids, attention_mask)?))
    }

    /// [`Blip2Model::text_cls`] in the run dtype.
    fn text_cls_run(&self, input_ids: Tensor<2, Int>, attention_mask: Tensor<2, Int>) -> Result<Tensor<2>> {
        self.check_text(&input_ids, &attention_mask)?;
        let [n, _] = input_ids.dims();
        let out = self.qformer.forward(
            self.embeddings.forward(input_ids),
            Some(mask_bias(attention_mask, self.dtype)),
            0,
            &[],
            None,
            1,
        );
        let [_, _, dq] = out.dims();
        Ok(out.reshape([n, dq]))
    }

    /// ITC text features f_txt, L2-normalised.
    /// Shapes: input_ids [n,l] Int, attention_mask [n,l] Int -> [n,e].
    pub fn text_features(&self, input_ids: Tensor<2, Int>, attention_mask: Tensor<2, Int>) -> Result<Tensor<2>> {
        let cls = self.text_cls_run(input_ids, attention_mask)?;
        let [n, dq] = cls.dims();
        let features = l2_normalize(self.text_projection.forward(cls.reshape([n, 1, dq])));
        let [_, _, e] = features.dims();
        Ok(features.reshape([n, e]))
    }

    /// ITM logits s_itm of pairs (image `pair_image[i]`, text i): [`Blip2Model::itm_images`] of the
    /// batch, then [`Blip2Model::itm_pair_logits`].
    /// Shapes: z [b_img,t,dv], pair_image [p] Int (index into b_img), input_ids [p,l] Int,
    /// attention_mask [p,l] Int, perturbation [b_img,n_cross,h,d,d] -> [p].
    pub fn itm_logits(
        &self,
        z: Tensor<3>,
        pair_image: Tensor<1, Int>,
        input_ids: Tensor<2, Int>,
        attention_mask: Tensor<2, Int>,
        perturbation: Option<Tensor<5>>,
    ) -> Result<Tensor<1>> {
        let indices = host_ints("pair_image", &pair_image)?;
        if pair_image.dims() != [input_ids.dims()[0]] {
            let found = pair_image.dims();
            return Err(bad_input("pair_image", format!("expected [{}], found {found:?}", input_ids.dims()[0])));
        }
        if attention_mask.dims() != input_ids.dims() {
            let (want, found) = (input_ids.dims(), attention_mask.dims());
            return Err(bad_input(
                "attention_mask",
                format!("expected the shape of input_ids {want:?}, found {found:?}"),
            ));
        }
        let (ids, mask) = (host_ints("input_ids", &input_ids)?, host_ints("attention_mask", &attention_mask)?);
        self.check_token_values(ids.iter().copied(), mask.iter().copied())?;
        // In range now: ids below the vocabulary size, masks 0 or 1.
        let tokens = TokenBatch {
            input_ids: ids.into_iter().map(|id| id as i32).collect(),
            attention_mask: mask.into_iter().map(|m| m as u8).collect(),
            len: input_ids.dims()[1],
        };
        let device = input_ids.device();
        let images = self.itm_images(z, perturbation)?;
        let texts = self.itm_texts(&tokens, &device)?;
        let indices: Vec<usize> = indices.iter().map(|&i| usize::try_from(i).unwrap_or(usize::MAX)).collect();
        let pair_text: Vec<usize> = (0..indices.len()).collect();
        self.itm_pair_logits(&images, &indices, &texts, &pair_text, &device)
    }

    /// What ITM needs of a batch of images, computed once for all their pairs: the keys and values
    /// of Z in every cross-attention layer, and Pi, in the run dtype.
    /// Shapes: z [b_img,t,dv], perturbation [b_img,n_cross,h,d,d].
    pub fn itm_images(&self, z: Tensor<3>, perturbation: Option<Tensor<5>>) -> Result<ItmImages> {
        self.check_z(&z)?;
        let [images, _, _] = z.dims();
        self.check_perturbation(perturbation.as_ref(), images)?;
        Ok(ItmImages {
            cross: self.qformer.cross_kv(self.run(z), self.attention),
            perturbation: perturbation.map(|pi| self.run(pi)),
            images,
        })
    }

    /// What ITM needs of a batch of texts, computed once for all their pairs: the first Q-Former
    /// layer of the joint [queries; text] pass up to its cross-attention, which depends on the text
    /// alone (the query rows start as the same learned tokens in every pair). Tokens come from the
    /// host and are checked there.
    /// Shapes: tokens [n,l] -> [`ItmTexts`] of n texts of length l.
    pub fn itm_texts(&self, tokens: &TokenBatch, device: &Device) -> Result<ItmTexts> {
        let (n, l) = (tokens.n(), tokens.len);
        if tokens.input_ids.len() != n * l || tokens.attention_mask.len() != n * l {
            let (ids, mask) = (tokens.input_ids.len(), tokens.attention_mask.len());
            return Err(bad_input("input_ids", format!("{ids} ids and {mask} mask values are not rows of length {l}")));
        }
        self.check_length(l)?;
        let ids: Vec<i64> = tokens.input_ids.iter().map(|&id| i64::from(id)).collect();
        let mask: Vec<i64> = tokens.attention_mask.iter().map(|&m| i64::from(m)).collect();
        self.check_token_values(ids.iter().copied(), mask.iter().copied())?;
        let input_ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [n, l]), device);
        let attention_mask = Tensor::<2, Int>::from_data(TensorData::new(mask, [n, l]), device);
        let [_, q, dq] = self.query_tokens.dims();
        let queries = self.query_tokens.val().expand([n, q, dq]);
        let embeddings = Tensor::cat(vec![queries, self.embeddings.forward(input_ids)], 1);
        let mask = Tensor::cat(vec![Tensor::<2, Int>::ones([n, q], device), attention_mask], 1);
        let mask_bias = mask_bias(mask, self.dtype);
        // ITM reads the query rows: a one-layer Q-Former keeps only those.
        let first = self.qformer.first_layer_before_cross_attention(embeddings, Some(mask_bias.clone()), q, q);
        Ok(ItmTexts { first, mask_bias })
    }

    /// ITM logits of pairs (image `pair_image[i]` of `images`, text `pair_text[i]` of `texts`): the
    /// mean over the Q query rows of `itm_head(out)[1]` for the joint pass [queries; text] against
    /// that image's keys and values, from the text's prepared first layer (gathered per pair).
    /// Consecutive pairs of one image cross-attend to it as one sequence, so pass them grouped by
    /// image: any order is right, grouped is fast. Indices come from the host and are checked
    /// there, so nothing is read back from the device and the host never waits for it.
    /// Shapes: pair_image and pair_text p indices -> [p].
    pub fn itm_pair_logits(
        &self,
        images: &ItmImages,
        pair_image: &[usize],
        texts: &ItmTexts,
        pair_text: &[usize],
        device: &Device,
    ) -> Result<Tensor<1>> {
        let p = pair_text.len();
        if pair_image.len() != p {
            return Err(bad_input("pair_image", format!("expected {p} indices, found {}", pair_image.len())));
        }
        if let Some(bad) = pair_image.iter().find(|&&i| i >= images.images) {
            return Err(bad_input("pair_image", format!("index {bad} is outside 0..{}", images.images)));
        }
        if let Some(bad) = pair_text.iter().find(|&&i| i >= texts.len()) {
            return Err(bad_input("pair_text", format!("index {bad} is outside 0..{}", texts.len())));
        }
        let pair_text =
            Tensor::<1, Int>::from_data(TensorData::new(pair_text.iter().map(|&i| i as i64).collect(), [p]), device);
        let texts = texts.select(pair_text);
        // Consecutive pairs of one image cross-attend to it together (rerank groups them so).
        let runs: Vec<(usize, usize)> = pair_image.chunk_by(|a, b| a == b).map(|run| (run[0], run.len())).collect();
        let cross =
            CrossInputs { kv: &images.cross, perturbation: images.perturbation.clone(), rows: ImageRows::Runs(&runs) };
        let q = self.config.num_query_tokens;
        let out = self.qformer.forward_from_first_layer(texts.first, Some(texts.mask_bias), q, cross, q);
        let logits = f32s(self.itm_head.forward(out)); // [p, q, 2]
        Ok(logits.narrow(2, 1, 1).mean_dim(1).reshape([p]))
    }
}

/// Runs `put`, which puts the model's weights (`what`, f32 or not) on `device`, and waits for the
/// device: weights that do not fit fail here, as [`Error::weights_do_not_fit`], rather than at the
/// first batch (burn also unwraps some device errors while it puts a parameter on the device: those
/// panics become the same error).
fn on_device(
    what: &str,
    in_f32: bool,
    device: &Device,
    put: impl FnOnce() -> Result<Blip2Model>,
) -> Result<Blip2Model> {
    let model = crate::error::catch_device_panics(put, |reason| Error::weights_do_not_fit(what, in_f32, reason))?;
    device.sync().map_err(|e| Error::weights_do_not_fit(what, in_f32, e))?;
    match crate::error::device_panic() {
        Some(reason) => Err(Error::weights_do_not_fit(what, in_f32, reason)),
        None => Ok(model),
    }
}
