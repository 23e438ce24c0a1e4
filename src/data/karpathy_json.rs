//! Karpathy's split JSON (`dataset_flickr30k.json`, `dataset_coco.json`, method.md section 8):
//! `{"images": [{"filename", "filepath"?, "split", "sentences": [{"raw", ..}], ..}]}`, of which the
//! images with `split == <split>` are kept, in file order. The image path is `filepath/filename`
//! (COCO) or `filename` (Flickr30K). Other keys are ignored.

use std::path::Path;

use serde::Deserialize;

use super::dataset::{SplitImage, json_error};
use crate::error::Result;

#[derive(Deserialize)]
struct File {
    images: Vec<Image>,
}

#[derive(Deserialize)]
struct Image {
    filename: String,
    #[serde(default)]
    filepath: Option<String>,
    split: String,
    sentences: Vec<Sentence>,
}

#[derive(Deserialize)]
struct Sentence {
    raw: String,
}

/// Parses Karpathy JSON text read from `path`, keeping the images of `split`.
pub fn parse(text: &str, path: &Path, split: &str) -> Result<Vec<SplitImage>> {
    let file: File = serde_json::from_str(text).map_err(|e| json_error(path, &e))?;
    Ok(file
        .images
        .into_iter()
        .filter(|image| image.split == split)
        .map(|image| SplitImage {
            path: match image.filepath {
                Some(dir) if !dir.is_empty() => format!("{dir}/{}", image.filename),
                _ => image.filename,
            },
            captions: image.sentences.into_iter().map(|s| s.raw).collect(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_split_in_order_and_joins_filepath() {
        let text = r#"{"dataset": "coco", "images": [
            {"filename": "a.jpg", "filepath": "val2014", "split": "test", "sentences": [{"raw": "A."}, {"raw": "B"}]},
            {"filename": "b.jpg", "split": "train", "sentences": [{"raw": "C"}]},
            {"filename": "c.jpg", "split": "test", "sentences": [{"raw": "D", "tokens": ["d"]}]}]}"#;
        let split = parse(text, Path::new("d.json"), "test").unwrap();
        assert_eq!(split.len(), 2);
        assert_eq!(split[0], SplitImage { path: "val2014/a.jpg".into(), captions: vec!["A.".into(), "B".into()] });
        assert_eq!(split[1].path, "c.jpg");
    }
}
