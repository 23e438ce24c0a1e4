//! The benchmark's synthetic inputs, written to a scratch folder so the real stage code reads them
//! exactly as it reads a dataset: JPEG images (so decode and resize are measured), a LAVIS split
//! JSON, Flickr30K Entities files with every box mentioned (so every box is kept), and a model
//! folder (`config.json`, `model.safetensors` with seeded random weights, a small `vocab.txt`).
//! Everything is deterministic in the seed.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use image::codecs::jpeg::JpegEncoder;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::model::{Blip2Config, Blip2Model};

/// Synthetic image size (a typical Flickr30K photo).
pub const IMAGE_WIDTH: u32 = 500;
/// Synthetic image height.
pub const IMAGE_HEIGHT: u32 = 375;

/// The words captions are made of; each is one token of the synthetic vocabulary.
const WORDS: [&str; 32] = [
    "a", "an", "the", "man", "woman", "child", "dog", "cat", "red", "blue", "green", "small", "large", "old", "young",
    "street", "park", "beach", "holds", "rides", "walks", "sits", "on", "in", "with", "near", "ball", "bike", "hat",
    "shirt", "car", "tree",
];

/// A small deterministic generator (xorshift64*), enough for synthetic pixels and boxes.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n`.
    fn below(&mut self, n: u32) -> u32 {
        (self.next() >> 33) as u32 % n.max(1)
    }
}

/// The sizes of a synthetic split.
#[derive(Debug, Clone, Copy)]
pub struct SplitShape {
    /// Images.
    pub images: usize,
    /// Captions per image.
    pub captions_per_image: usize,
    /// Object boxes per image (all mentioned, so all kept).
    pub boxes_per_image: usize,
    /// Seed of pixels, boxes and captions.
    pub seed: u64,
}

/// Where [`write_dataset`] put the split.
pub struct SyntheticDataset {
    /// The LAVIS split JSON.
    pub annotations: PathBuf,
    /// The image folder.
    pub images: PathBuf,
    /// The Flickr30K Entities folder (1-based boxes).
    pub entities: PathBuf,
}

fn io_error(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::input(path, format!("cannot write the synthetic benchmark data: {e}"))
}

fn write(path: &Path, contents: impl AsRef<[u8]>) -> Result<()> {
    fs::write(path, contents).map_err(|e| io_error(path, e))
}

/// A caption of 7 to 20 words (15.5 tokens on average with `[CLS]` and `[SEP]`, as Flickr30K's
/// 12.3 words are in BERT tokens): ITM runs each pair on its length rounded up (`rerank`).
fn caption(rng: &mut Rng) -> String {
    let n = 7 + rng.below(14) as usize;
    (0..n).map(|_| WORDS[rng.below(WORDS.len() as u32) as usize]).collect::<Vec<_>>().join(" ")
}

/// A smooth colour field with noise and a few flat rectangles: realistic JPEG decode cost.
fn pixels(rng: &mut Rng) -> Vec<u8> {
    let (w, h) = (IMAGE_WIDTH as usize, IMAGE_HEIGHT as usize);
    let base = [rng.below(256), rng.below(256), rng.below(256)];
    let mut rgb = vec![0u8; w * h * 3];
    for y in 0..h {
        for x in 0..w {
            for (c, &b) in base.iter().enumerate() {
                let v = b as usize + x * (c + 1) / 4 + y / (c + 1) + (rng.next() % 24) as usize;
                rgb[(y * w + x) * 3 + c] = (v % 256) as u8;
            }
        }
    }
    for _ in 0..4 {
        let (x0, y0) = (rng.below(IMAGE_WIDTH / 2) as usize, rng.below(IMAGE_HEIGHT / 2) as usize);
        let (bw, bh) = (40 + rng.below(160) as usize, 40 + rng.below(120) as usize);
        let colour = [rng.below(256) as u8, rng.below(256) as u8, rng.below(256) as u8];
        for y in y0..(y0 + bh).min(h) {
            for x in x0..(x0 + bw).min(w) {
                rgb[(y * w + x) * 3..][..3].copy_from_slice(&colour);
            }
        }
    }
    rgb
}

/// One image's files: its JPEG, its Entities annotation and sentences; returns its captions.
fn write_image(root: &Path, i: usize, shape: &SplitShape) -> Result<Vec<String>> {
    let mut rng = Rng::new(shape.seed ^ (i as u64).wrapping_mul(0x1000_0001));
    let id = format!("{i:06}");
    let jpeg_path = root.join("images").join(format!("{id}.jpg"));
    let mut jpeg = Vec::new();
    JpegEncoder::new_with_quality(&mut jpeg, 90)
        .encode(&pixels(&mut rng), IMAGE_WIDTH, IMAGE_HEIGHT, image::ExtendedColorType::Rgb8)
        .map_err(|e| io_error(&jpeg_path, e))?;
    write(&jpeg_path, jpeg)?;

    let mut xml = format!(
        "<annotation><filename>{id}.jpg</filename><size><width>{IMAGE_WIDTH}</width><height>{IMAGE_HEIGHT}</height><depth>3</depth></size>"
    );
    for chain in 1..=shape.boxes_per_image {
        let (x0, y0) = (1 + rng.below(IMAGE_WIDTH - 60), 1 + rng.below(IMAGE_HEIGHT - 60));
        let (x1, y1) = (x0 + 20 + rng.below(IMAGE_WIDTH - x0 - 20), y0 + 20 + rng.below(IMAGE_HEIGHT - y0 - 20));
        let _ = write!(
            xml,
            "<object><name>{chain}</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        );
    }
    xml.push_str("</annotation>\n");
    write(&root.join("entities/Annotations").join(format!("{id}.xml")), xml)?;

    let captions: Vec<String> = (0..shape.captions_per_image).map(|_| caption(&mut rng)).collect();
    // The first sentence mentions every chain, so every box is kept.
    let mut sentences = String::new();
    for (j, c) in captions.iter().enumerate() {
        if j == 0 {
            for chain in 1..=shape.boxes_per_image {
                let _ = write!(sentences, "[/EN#{chain}/other a {}] ", WORDS[chain % WORDS.len()]);
            }
        }
        sentences.push_str(c);
        sentences.push('\n');
    }
    write(&root.join("entities/Sentences").join(format!("{id}.txt")), sentences)?;
    Ok(captions)
}

/// Writes the split under `root` (`images/`, `entities/`, `split.json`), images in parallel.
pub fn write_dataset(root: &Path, shape: &SplitShape) -> Result<SyntheticDataset> {
    for sub in ["images", "entities/Annotations", "entities/Sentences"] {
        let dir = root.join(sub);
        fs::create_dir_all(&dir).map_err(|e| io_error(&dir, e))?;
    }
    let captions: Vec<Vec<String>> =
        (0..shape.images).into_par_iter().map(|i| write_image(root, i, shape)).collect::<Result<_>>()?;
    let split: Vec<serde_json::Value> = captions
        .into_iter()
        .enumerate()
        .map(|(i, caption)| serde_json::json!({ "image": format!("images/{i:06}.jpg"), "caption": caption }))
        .collect();
    let annotations = root.join("split.json");
    write(&annotations, serde_json::to_string(&split).unwrap_or_default())?;
    Ok(SyntheticDataset { annotations, images: root.to_path_buf(), entities: root.join("entities") })
}

/// The `config.json` of `config`: the fields `Blip2Config::from_json` reads.
fn config_json(c: &Blip2Config) -> serde_json::Value {
    let (v, q) = (&c.vision_config, &c.qformer_config);
    serde_json::json!({
        "model_type": "blip-2",
        "dtype": "float32",
        "num_query_tokens": c.num_query_tokens,
        "image_text_hidden_size": c.image_text_hidden_size,
        "vision_config": {
            "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_hidden_layers, "num_attention_heads": v.num_attention_heads,
            "num_channels": v.num_channels, "image_size": v.image_size, "patch_size": v.patch_size,
            "hidden_act": v.hidden_act, "layer_norm_eps": v.layer_norm_eps, "qkv_bias": v.qkv_bias,
        },
        "qformer_config": {
            "vocab_size": q.vocab_size, "hidden_size": q.hidden_size, "num_hidden_layers": q.num_hidden_layers,
            "num_attention_heads": q.num_attention_heads, "intermediate_size": q.intermediate_size,
            "hidden_act": q.hidden_act, "max_position_embeddings": q.max_position_embeddings,
            "layer_norm_eps": q.layer_norm_eps, "position_embedding_type": q.position_embedding_type,
            "cross_attention_frequency": q.cross_attention_frequency,
            "encoder_hidden_size": q.encoder_hidden_size, "use_qformer_text_input": q.use_qformer_text_input,
        },
    })
}

/// Writes a model folder for `config` with seeded random weights, built on `device`: what
/// `Blip2Model::load` and the caption tokenizer read. The vocabulary holds the BERT special tokens
/// and the caption words only (ids stay far below the model's vocabulary size).
pub fn write_model(dir: &Path, config: &Blip2Config, seed: u64, device: &Device) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
    let json = serde_json::to_string_pretty(&config_json(config)).unwrap_or_default();
    write(&dir.join("config.json"), json)?;
    let mut vocab: Vec<&str> = vec!["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];
    vocab.extend(WORDS);
    write(&dir.join("vocab.txt"), vocab.join("\n") + "\n")?;
    let model = Blip2Model::init_random(config, seed, device)?;
    model.save_safetensors(&dir.join("model.safetensors"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_split_has_every_file_and_is_deterministic() {
        let dir = std::env::temp_dir().join(format!("qpert-synthetic-test-{}", std::process::id()));
        let shape = SplitShape { images: 3, captions_per_image: 2, boxes_per_image: 4, seed: 7 };
        let data = write_dataset(&dir, &shape).unwrap();
        let split: serde_json::Value = serde_json::from_str(&fs::read_to_string(&data.annotations).unwrap()).unwrap();
        assert_eq!(split.as_array().unwrap().len(), 3);
        assert_eq!(split[2]["caption"].as_array().unwrap().len(), 2);
        let img = image::open(data.images.join("images/000001.jpg")).unwrap();
        assert_eq!((img.width(), img.height()), (IMAGE_WIDTH, IMAGE_HEIGHT));
        let xml = fs::read_to_string(data.entities.join("Annotations/000002.xml")).unwrap();
        assert_eq!(xml.matches("<bndbox>").count(), 4);
        let first = fs::read(data.images.join("images/000000.jpg")).unwrap();
        write_dataset(&dir, &shape).unwrap();
        assert_eq!(fs::read(data.images.join("images/000000.jpg")).unwrap(), first);
        fs::remove_dir_all(&dir).unwrap();
    }
}
