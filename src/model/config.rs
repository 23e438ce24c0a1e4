//! The BLIP-2 model configuration, parsed leniently from a Hugging Face `config.json`
//! (method.md section 1). Every absent field takes the Hugging Face default, unknown keys are
//! ignored and `text_config` (the OPT/T5 language model, unused by retrieval) is skipped, the way
//! candle reads configs. [`Blip2Config::validate`] then rejects what this crate cannot run.
//! Defaults follow `Blip2VisionConfig`, `Blip2QFormerConfig` and `Blip2Config` in
//! `configuration_blip_2.py` of transformers 5.24, the version that generated `tests/fixtures`.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// The vision tower (EVA ViT-g), HF section `vision_config`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct VisionConfig {
    /// Width D_v of every vision token.
    pub hidden_size: usize,
    /// Width of the MLP between `fc1` and `fc2`.
    pub intermediate_size: usize,
    /// Number of pre-norm encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Input channels (3 for RGB).
    pub num_channels: usize,
    /// Input side S; images must be exactly S x S.
    pub image_size: usize,
    /// Patch side p (also the conv stride).
    pub patch_size: usize,
    /// Activation of the MLP; only exact (erf) `gelu` is supported.
    pub hidden_act: String,
    /// Epsilon of every vision LayerNorm, including `post_layernorm`.
    pub layer_norm_eps: f64,
    /// Whether the fused qkv projection has a bias (stored as `qkv.bias` or `q_bias` + `v_bias`).
    pub qkv_bias: bool,
}

impl Default for VisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 1408,
            intermediate_size: 6144,
            num_hidden_layers: 39,
            num_attention_heads: 16,
            num_channels: 3,
            image_size: 224,
            patch_size: 14,
            hidden_act: "gelu".into(),
            layer_norm_eps: 1e-6,
            qkv_bias: true,
        }
    }
}

impl VisionConfig {
    /// Patches per side, G = S / p.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Number of vision tokens T = G * G + 1 (CLS first).
    pub fn num_tokens(&self) -> usize {
        self.grid() * self.grid() + 1
    }
}

/// The Q-Former (a BERT with cross-attention), HF section `qformer_config`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct QFormerConfig {
    /// Word-piece vocabulary size V (the Hub checkpoint adds `[DEC]`: 30523).
    pub vocab_size: usize,
    /// Width D_q.
    pub hidden_size: usize,
    /// Number of BERT layers.
    pub num_hidden_layers: usize,
    /// Attention heads H_q (self- and cross-attention).
    pub num_attention_heads: usize,
    /// Width of both feed-forward blocks (query and text).
    pub intermediate_size: usize,
    /// Activation of the feed-forward blocks; only exact (erf) `gelu` is supported.
    pub hidden_act: String,
    /// Length of the learned position table (longest text).
    pub max_position_embeddings: usize,
    /// Epsilon of every Q-Former LayerNorm.
    pub layer_norm_eps: f64,
    /// Only `absolute` is supported.
    pub position_embedding_type: String,
    /// Layer j has cross-attention when j % frequency == 0.
    pub cross_attention_frequency: usize,
    /// Width of the vision tokens the cross-attention reads; `Blip2Config` overwrites it with the
    /// vision hidden size, as `Blip2Config.__init__` does.
    pub encoder_hidden_size: usize,
    /// Whether the Q-Former has the text feed-forward block (required for retrieval).
    pub use_qformer_text_input: bool,
}

impl Default for QFormerConfig {
    fn default() -> Self {
        Self {
            vocab_size: 30522,
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: "gelu".into(),
            max_position_embeddings: 512,
            layer_norm_eps: 1e-12,
            position_embedding_type: "absolute".into(),
            cross_attention_frequency: 2,
            encoder_hidden_size: 1408,
            // The HF default; `Blip2ForImageTextRetrieval` checkpoints set it to true.
            use_qformer_text_input: false,
        }
    }
}

impl QFormerConfig {
    /// Whether layer `j` has a cross-attention block.
    pub fn has_cross_attention(&self, j: usize) -> bool {
        j.is_multiple_of(self.cross_attention_frequency)
    }

    /// Number of cross-attention layers (6 for the real model).
    pub fn num_cross_layers(&self) -> usize {
        (0..self.num_hidden_layers).filter(|&j| self.has_cross_attention(j)).count()
    }

    /// Width of one head, d = D_q / H_q.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// The whole BLIP-2 retrieval model (`Blip2ForImageTextRetrieval`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct Blip2Config {
    /// The vision tower.
    pub vision_config: VisionConfig,
    /// The Q-Former.
    pub qformer_config: QFormerConfig,
    /// Number of learned queries Q.
    pub num_query_tokens: usize,
    /// Size E of the ITC embeddings.
    pub image_text_hidden_size: usize,
    /// Storage dtype written by newer transformers (`dtype`).
    pub dtype: Option<String>,
    /// Storage dtype written by older transformers (`torch_dtype`). Kept as its own field rather
    /// than a serde alias, because some exports write both keys.
    pub torch_dtype: Option<String>,
}

impl Default for Blip2Config {
    fn default() -> Self {
        Self {
            vision_config: VisionConfig::default(),
            qformer_config: QFormerConfig::default(),
            num_query_tokens: 32,
            image_text_hidden_size: 256,
            dtype: None,
            torch_dtype: None,
        }
    }
}

impl Blip2Config {
    /// The configuration of Salesforce/blip2-itm-vit-g-coco (the real model): HF defaults plus
    /// what its Hub `config.json` sets (image side 364, vocabulary 30523, text input on).
    pub fn itm_vit_g_coco() -> Self {
        let mut config = Self::default();
        config.vision_config.image_size = 364;
        config.qformer_config.vocab_size = 30523;
        config.qformer_config.use_qformer_text_input = true;
        config.torch_dtype = Some("float32".into());
        config
    }

    /// Parses a `config.json` text (lenient: HF defaults for absent fields, unknown keys ignored).
    /// `path` only names the file in errors. The result is validated.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let mut config: Self =
            serde_json::from_str(text).map_err(|e| Error::weights(path, format!("malformed config.json: {e}")))?;
        // As in `Blip2Config.__init__`: the cross-attention always reads the vision width.
        config.qformer_config.encoder_hidden_size = config.vision_config.hidden_size;
        config.validate().map_err(|msg| Error::weights(path, msg))?;
        Ok(config)
    }

    /// Reads and parses `<model_dir>/config.json`.
    pub fn from_model_dir(model_dir: &Path) -> Result<Self> {
        let path = model_dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::weights(&path, format!("cannot read config.json: {e}")))?;
        Self::from_json(&text, &path)
    }

    /// The storage dtype named by the config (`dtype`, else `torch_dtype`), if any. Informational:
    /// the loader converts whatever the safetensors files hold to f32.
    pub fn storage_dtype(&self) -> Option<&str> {
        self.dtype.as_deref().or(self.torch_dtype.as_deref())
    }

    /// Rejects configurations this crate cannot run, with a message naming the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let v = &self.vision_config;
        let q = &self.qformer_config;
        if !q.use_qformer_text_input {
            return Err("qformer_config.use_qformer_text_input is false: the Q-Former has no text \
                        feed-forward block, so retrieval (ITC text features, ITM) cannot run"
                .into());
        }
        let positive = [
            ("vision_config.hidden_size", v.hidden_size),
            ("vision_config.intermediate_size", v.intermediate_size),
            ("vision_config.num_attention_heads", v.num_attention_heads),
            ("vision_config.num_channels", v.num_channels),
            ("vision_config.image_size", v.image_size),
            ("vision_config.patch_size", v.patch_size),
            ("qformer_config.vocab_size", q.vocab_size),
            ("qformer_config.hidden_size", q.hidden_size),
            ("qformer_config.num_hidden_layers", q.num_hidden_layers),
            ("qformer_config.num_attention_heads", q.num_attention_heads),
            ("qformer_config.intermediate_size", q.intermediate_size),
            ("qformer_config.max_position_embeddings", q.max_position_embeddings),
            ("qformer_config.cross_attention_frequency", q.cross_attention_frequency),
            ("num_query_tokens", self.num_query_tokens),
            ("image_text_hidden_size", self.image_text_hidden_size),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, value)| *value == 0) {
            return Err(format!("{name} must be positive"));
        }
        if !v.hidden_size.is_multiple_of(v.num_attention_heads) {
            return Err(format!(
                "vision_config.hidden_size {} is not divisible by num_attention_heads {}",
                v.hidden_size, v.num_attention_heads
            ));
        }
        if !q.hidden_size.is_multiple_of(q.num_attention_heads) {
            return Err(format!(
                "qformer_config.hidden_size {} is not divisible by num_attention_heads {}",
                q.hidden_size, q.num_attention_heads
            ));
        }
        if !v.image_size.is_multiple_of(v.patch_size) {
            return Err(format!(
                "vision_config.image_size {} is not a multiple of patch_size {}",
                v.image_size, v.patch_size
            ));
        }
        for (name, act) in [("vision_config", &v.hidden_act), ("qformer_config", &q.hidden_act)] {
            if act != "gelu" {
                return Err(format!("{name}.hidden_act {act:?} is not supported (only \"gelu\")"));
            }
        }
        if q.position_embedding_type != "absolute" {
            return Err(format!(
                "qformer_config.position_embedding_type {:?} is not supported (only \"absolute\")",
                q.position_embedding_type
            ));
        }
        if q.encoder_hidden_size != v.hidden_size {
            return Err(format!(
                "qformer_config.encoder_hidden_size {} differs from vision_config.hidden_size {}",
                q.encoder_hidden_size, v.hidden_size
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Blip2Config> {
        Blip2Config::from_json(text, Path::new("config.json"))
    }

    #[test]
    fn absent_fields_take_hf_defaults() {
        let config = parse(r#"{"qformer_config": {"use_qformer_text_input": true}}"#).unwrap();
        let v = &config.vision_config;
        assert_eq!(
            (v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads),
            (1408, 6144, 39, 16)
        );
        assert_eq!((v.patch_size, v.image_size, v.layer_norm_eps), (14, 224, 1e-6));
        let q = &config.qformer_config;
        assert_eq!(
            (q.hidden_size, q.num_hidden_layers, q.num_attention_heads, q.intermediate_size),
            (768, 12, 12, 3072)
        );
        assert_eq!((q.cross_attention_frequency, q.layer_norm_eps), (2, 1e-12));
        assert_eq!((q.max_position_embeddings, q.encoder_hidden_size, q.vocab_size), (512, 1408, 30522));
        assert_eq!((config.num_query_tokens, config.image_text_hidden_size), (32, 256));
        assert_eq!(q.num_cross_layers(), 6);
        assert_eq!(q.head_dim(), 64);
    }

    #[test]
    fn hub_config_matches_the_preset() {
        // The fields the Hub config.json of blip2-itm-vit-g-coco sets, plus keys we ignore.
        let text = r#"{
            "architectures": ["Blip2ForImageTextRetrieval"],
            "model_type": "blip-2",
            "torch_dtype": "float32",
            "qformer_config": {"model_type": "blip_2_qformer", "use_qformer_text_input": true,
                               "vocab_size": 30523, "classifier_dropout": null},
            "text_config": {"model_type": "opt", "hidden_size": 2560, "whatever": [1, 2]},
            "vision_config": {"image_size": 364, "model_type": "blip_2_vision_model"}
        }"#;
        let config = parse(text).unwrap();
        assert_eq!(config, Blip2Config::itm_vit_g_coco());
        assert_eq!(config.vision_config.num_tokens(), 677);
        assert_eq!(config.storage_dtype(), Some("float32"));
    }

    #[test]
    fn dtype_and_torch_dtype_are_both_accepted() {
        let t = r#"{"dtype": "bfloat16", "torch_dtype": "float16",
                    "qformer_config": {"use_qformer_text_input": true}}"#;
        assert_eq!(parse(t).unwrap().storage_dtype(), Some("bfloat16"));
    }

    #[test]
    fn encoder_hidden_size_follows_the_vision_width() {
        let t = r#"{"vision_config": {"hidden_size": 32, "num_attention_heads": 4},
                    "qformer_config": {"use_qformer_text_input": true}}"#;
        assert_eq!(parse(t).unwrap().qformer_config.encoder_hidden_size, 32);
    }

    #[test]
    fn unrunnable_configs_are_rejected() {
        for (text, needle) in [
            (r#"{}"#, "use_qformer_text_input"),
            (r#"{"qformer_config": {"use_qformer_text_input": false}}"#, "use_qformer_text_input"),
            (r#"{"qformer_config": {"use_qformer_text_input": true, "num_attention_heads": 7}}"#, "not divisible"),
            (
                r#"{"qformer_config": {"use_qformer_text_input": true}, "vision_config": {"hidden_act": "quick_gelu"}}"#,
                "hidden_act",
            ),
            (
                r#"{"qformer_config": {"use_qformer_text_input": true}, "vision_config": {"image_size": 100}}"#,
                "multiple",
            ),
            (r#"{"num_query_tokens": "many"}"#, "malformed"),
        ] {
            let err = parse(text).unwrap_err();
            assert!(matches!(err, Error::Weights { .. }), "{text}: {err}");
            assert!(err.to_string().contains(needle), "{text}: {err}");
            assert!(err.to_string().starts_with("config.json: "), "{err}");
        }
    }
}
