//! qpert's own TOML config (`configs/*.toml`): strict, every section `deny_unknown_fields`, one `///`
//! per field (the README's config reference mirrors them). [`Config::load`] reads a file, applies
//! `--set section.key=value` overrides to the parsed TOML before deserialising, so an override is
//! typed and validated exactly like the file, then runs [`Config::validate`]. Relative paths are
//! relative to the current working directory.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::model::AttentionKernel;

use crate::error::{Error, Result};
use crate::qpert::{AlphaWeight, Components, ProjectorKind, QpertSettings};

/// A whole config file.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The retrieval split and its object annotations.
    pub dataset: DatasetConfig,
    /// The BLIP-2 model folder and how to run it.
    pub model: ModelConfig,
    /// Object-Aware Query Perturbation settings (method.md sections 4-5).
    pub qpert: QpertConfig,
    /// ITM re-ranking of the ITC top-k (method.md section 6).
    pub rerank: RerankConfig,
    /// Where artifacts go.
    pub output: OutputConfig,
}

/// `[dataset]`: the retrieval split and its object annotations (method.md sections 3 and 8).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    /// A label for reports, e.g. `flickr30k-test`.
    pub name: String,
    /// The split JSON: LAVIS (`[{image, caption: [..]}]`) or Karpathy (`{images: [..]}`), auto-detected.
    pub annotations: PathBuf,
    /// The Karpathy split to keep (`split == this`); ignored for LAVIS JSON.
    #[serde(default = "default_split")]
    pub split: String,
    /// The image folder; JSON image paths are joined to it, falling back to the file name alone.
    pub images: PathBuf,
    /// Flickr30K Entities folder (`Annotations/<id>.xml` and `Sentences/<id>.txt`) or COCO
    /// Entities' `coco_entities_release.json`; optional.
    #[serde(default)]
    pub entities: Option<PathBuf>,
    /// COCO only, optional: the released conversion's `coco_img_shapes.json` (`{"<id>": [w, h]}`),
    /// checked against the image headers (a mismatch is warned; the header's size is used).
    #[serde(default)]
    pub image_shapes: Option<PathBuf>,
    /// Origin of the box coordinates: 1 = 1-based (Flickr30K Entities), 0 = 0-based (COCO).
    /// `1` on COCO reproduces the released code's off-by-one (spec section 3).
    pub box_origin: u8,
}

fn default_split() -> String {
    "test".to_string()
}

/// `[model]`: the BLIP-2 model and how to run it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// A Hugging Face model folder (`config.json`, `model.safetensors`, tokenizer files).
    pub dir: PathBuf,
    /// `cpu`, `cuda` or `wgpu`.
    pub device: DeviceKind,
    /// `f32`, `bf16` or `f16`.
    pub precision: Precision,
    /// Images per model batch in `extract` and `rerank`.
    #[serde(default = "default_image_batch")]
    pub image_batch: usize,
    /// Captions per model batch in `text`.
    #[serde(default = "default_text_batch")]
    pub text_batch: usize,
    /// (image, text) pairs per ITM batch in `rerank`.
    #[serde(default = "default_pair_batch")]
    pub pair_batch: usize,
    /// The vision tower's self-attention: `explicit` (default), `aligned` or `fused` (README, "GPU speed").
    #[serde(default)]
    pub attention: AttentionKernel,
}

fn default_image_batch() -> usize {
    16
}

fn default_text_batch() -> usize {
    256
}

fn default_pair_batch() -> usize {
    128
}

/// The compute device asked for in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    /// The CPU backend (burn-flex).
    Cpu,
    /// An NVIDIA GPU (needs the `cuda` cargo feature).
    Cuda,
    /// Any GPU that wgpu drives (Vulkan, Metal, DirectX 12), through CubeCL like CUDA (needs the
    /// `wgpu` cargo feature). On a CPU, Mesa's lavapipe Vulkan driver runs it: that is how the
    /// tests check the CubeCL code path without a GPU.
    Wgpu,
}

impl DeviceKind {
    /// The config spelling.
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
            DeviceKind::Wgpu => "wgpu",
        }
    }
}

/// Floating-point precision of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// 32-bit float.
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half.
    F16,
}

impl Precision {
    /// The burn dtype the model computes in.
    pub fn dtype(self) -> burn::tensor::FloatDType {
        match self {
            Precision::F32 => burn::tensor::FloatDType::F32,
            Precision::Bf16 => burn::tensor::FloatDType::BF16,
            Precision::F16 => burn::tensor::FloatDType::F16,
        }
    }
}

/// `[qpert]`: Object-Aware Query Perturbation (method.md sections 4-5).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QpertConfig {
    /// Apply the perturbation; `false` gives plain BLIP-2.
    pub enabled: bool,
    /// Perturbation strength alpha.
    pub alpha: f64,
    /// Key-subspace size: a ratio of explained variance in (0, 1) (e.g. `0.99`), or an integer count of
    /// principal components (e.g. `16`).
    pub npc: Components,
    /// Per-box weighting of the perturbation: `constant` (alpha, published), `norm_area` (alpha a),
    /// `norm_area_inv` (-alpha a, the released code), `centered_area` (alpha (a - 0.5)),
    /// `centered_area_inv` (alpha (0.5 - a)).
    pub weight: AlphaWeight,
    /// How the key-subspace projector is built: `official` (the released code's V^T D_m V, which gave
    /// the published numbers) or `principal` (V_m V_m^T, the method as described).
    pub projector: ProjectorKind,
}

/// `[rerank]`: ITM re-ranking of the ITC top-k.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RerankConfig {
    /// Re-rank with ITM; `false` reports ITC only.
    pub enabled: bool,
    /// Candidates per query re-ranked by ITM, at least 1.
    pub k: u32,
    /// `extract` keeps the vision tokens and Pi of every image so that `rerank` does not recompute
    /// them (default true; see README, "Artifacts"). Results are identical either way.
    #[serde(default = "default_vision_cache")]
    pub vision_cache: bool,
}

fn default_vision_cache() -> bool {
    true
}

/// `[output]`: where artifacts go.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// The artifact folder; each stage writes `<dir>/<stage>/`.
    pub dir: PathBuf,
}

impl QpertConfig {
    /// The method's settings, for the `qpert` module.
    pub fn settings(&self) -> QpertSettings {
        QpertSettings { alpha: self.alpha as f32, components: self.npc, weight: self.weight, projector: self.projector }
    }
}

impl Config {
    /// Reads `path`, applies `overrides` (`section.key=value`, value parsed as TOML, else taken as a
    /// string), deserialises strictly and validates. Every failure is an [`Error::Config`] naming the
    /// file (and line/column, or the `--set` override).
    pub fn load(path: &Path, overrides: &[String]) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::config(path, e))?;
        let mut table: toml::Table = toml::from_str(&text).map_err(|e| toml_error(path, &text, &e))?;
        let config = if overrides.is_empty() {
            toml::from_str::<Config>(&text).map_err(|e| toml_error(path, &text, &e))?
        } else {
            for o in overrides {
                apply_override(&mut table, o).map_err(|msg| Error::config(path, format!("--set {o}: {msg}")))?;
            }
            toml::Value::Table(table)
                .try_into::<Config>()
                .map_err(|e| Error::config(path, format!("with --set {}: {}", overrides.join(" "), e.message())))?
        };
        config.validate().map_err(|msg| {
            // Blame the overrides only when the file alone does not fail the same way.
            let file_fails_alike =
                || toml::from_str::<Config>(&text).ok().and_then(|c| c.validate().err()) == Some(msg.clone());
            match overrides.is_empty() || file_fails_alike() {
                true => Error::config(path, msg),
                false => Error::config(path, format!("with --set {}: {msg}", overrides.join(" "))),
            }
        })?;
        Ok(config)
    }

    /// Checks values that the types alone cannot: ranges and non-empty strings.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.dataset.box_origin > 1 {
            return Err(format!("dataset.box_origin must be 0 or 1, not {}", self.dataset.box_origin));
        }
        if self.dataset.name.trim().is_empty() {
            return Err("dataset.name must not be empty".into());
        }
        if !self.qpert.alpha.is_finite() {
            return Err(format!("qpert.alpha must be a finite number, not {}", self.qpert.alpha));
        }
        match self.qpert.npc {
            Components::Ratio(r) if !(r > 0.0 && r < 1.0) => {
                return Err(format!("qpert.npc ratio {r} must be in (0, 1)"));
            }
            Components::Count(0) => return Err("qpert.npc count must be at least 1".into()),
            _ => {}
        }
        if self.model.image_batch == 0 || self.model.text_batch == 0 || self.model.pair_batch == 0 {
            return Err("model.image_batch, model.text_batch and model.pair_batch must be at least 1".into());
        }
        if self.rerank.k == 0 {
            return Err("rerank.k must be at least 1".into());
        }
        Ok(())
    }
}

/// Sets `section.key` (any depth) in `table` to `value` parsed as a TOML value, else as a string.
fn apply_override(table: &mut toml::Table, assignment: &str) -> std::result::Result<(), String> {
    let (key, raw) = assignment.split_once('=').ok_or("expected section.key=value")?;
    let path: Vec<&str> = key.trim().split('.').collect();
    if path.len() < 2 || path.iter().any(|p| p.is_empty()) {
        return Err(format!("`{}` is not a section.key path", key.trim()));
    }
    let value = parse_override_value(raw.trim());
    let (last, sections) = path.split_last().ok_or("empty key")?;
    let mut current = table;
    for section in sections {
        let entry = current.entry(section.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = entry.as_table_mut().ok_or_else(|| format!("`{section}` is a value, not a section"))?;
    }
    current.insert(last.to_string(), value);
    Ok(())
}

fn parse_override_value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

/// One line: `<file>: line L, column C in [section]: <message>`.
fn toml_error(path: &Path, text: &str, e: &toml::de::Error) -> Error {
    let Some(span) = e.span() else { return Error::config(path, e.message()) };
    let before = &text[..span.start.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    Error::config(path, format!("line {line}, column {column}{}: {}", section_of(before), e.message().trim()))
}

/// ` in [section]` for an error inside a section's keys; empty at top level or on a header line.
fn section_of(before: &str) -> String {
    let (complete, current) = before.rsplit_once('\n').unwrap_or(("", before));
    if current.trim_start().starts_with('[') {
        return String::new();
    }
    complete
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && !l.starts_with("[[") && l.contains(']'))
        .and_then(|l| l.split(']').next())
        .map(|header| format!(" in {header}]"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[dataset]
name = "t"
annotations = "a.json"
images = "img"
box_origin = 1
[model]
dir = "m"
device = "cpu"
precision = "f32"
[qpert]
enabled = true
alpha = 8.0
npc = 0.99
weight = "constant"
projector = "official"
[rerank]
enabled = true
k = 64
[output]
dir = "out"
"#;

    fn load(text: &str, overrides: &[&str]) -> Result<Config> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).unwrap();
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        Config::load(&path, &overrides)
    }

    #[test]
    fn defaults_fill_optional_fields() {
        let c = load(MINIMAL, &[]).unwrap();
        assert_eq!(c.dataset.split, "test");
        assert_eq!(c.dataset.entities, None);
        assert_eq!(c.qpert.npc, Components::Ratio(0.99));
    }

    #[test]
    fn unknown_key_names_it_its_line_and_the_known_keys() {
        let text = MINIMAL.replace("box_origin = 1", "box_origin = 1\nbox_orign = 0");
        let msg = load(&text, &[]).unwrap_err().to_string();
        assert!(msg.contains("line 7"), "{msg}");
        assert!(msg.contains("in [dataset]"), "{msg}");
        assert!(msg.contains("box_orign"), "{msg}");
        assert!(msg.contains("box_origin") && msg.contains("annotations"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }

    #[test]
    fn unknown_section_is_not_placed_inside_the_previous_one() {
        let msg = load(&format!("{MINIMAL}\n[extras]\nx = 1\n"), &[]).unwrap_err().to_string();
        assert!(msg.contains("line 23, column 2: unknown field `extras`"), "{msg}");
        assert_eq!(section_of("[a]\nx = 1\n[b]\ny"), " in [b]");
        assert_eq!(section_of("x"), "");
    }

    #[test]
    fn overrides_are_typed_like_the_file() {
        let c = load(MINIMAL, &["qpert.alpha=4", "rerank.k=16", "qpert.npc=12", "output.dir=cache/x"]).unwrap();
        assert_eq!((c.qpert.alpha, c.rerank.k, c.qpert.npc), (4.0, 16, Components::Count(12)));
        assert_eq!(c.output.dir, PathBuf::from("cache/x"));
        let bad_type = load(MINIMAL, &["rerank.k=many"]).unwrap_err().to_string();
        assert!(bad_type.contains("invalid type"), "{bad_type}");
        let unknown = load(MINIMAL, &["rerank.kk=3"]).unwrap_err().to_string();
        assert!(unknown.contains("kk") && unknown.contains("expected"), "{unknown}");
        assert!(load(MINIMAL, &["rerank"]).is_err());
    }

    #[test]
    fn validation_rejects_out_of_range_values() {
        for o in ["dataset.box_origin=2", "qpert.npc=1.5", "qpert.npc=0", "rerank.k=0"] {
            let err = load(MINIMAL, &[o]).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{o}");
            assert!(err.to_string().contains(&format!(": with --set {o}: ")), "{err}");
        }
        // A range error of the file itself is the file's, whatever else is set; an override can fix it.
        let zero_k = MINIMAL.replace("k = 64", "k = 0");
        let msg = load(&zero_k, &["qpert.alpha=4"]).unwrap_err().to_string();
        assert!(msg.ends_with("c.toml: rerank.k must be at least 1"), "{msg}");
        assert_eq!(load(&zero_k, &["rerank.k=5"]).unwrap().rerank.k, 5);
    }
}
