//! LAVIS retrieval split JSON (`flickr30k_test.json`, `coco_karpathy_test.json`, method.md
//! section 8): an array of `{"image": "flickr30k-images/<id>.jpg", "caption": [..]}`. Other keys are
//! ignored; a single caption string (as in LAVIS train files) is accepted too.

use std::path::Path;

use serde::Deserialize;

use super::dataset::{SplitImage, json_error};
use crate::error::Result;

#[derive(Deserialize)]
struct Entry {
    image: String,
    caption: Captions,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Captions {
    Many(Vec<String>),
    One(String),
}

/// Parses LAVIS JSON text read from `path` (named in errors, with line and column).
pub fn parse(text: &str, path: &Path) -> Result<Vec<SplitImage>> {
    let entries: Vec<Entry> = serde_json::from_str(text).map_err(|e| json_error(path, &e))?;
    Ok(entries
        .into_iter()
        .map(|e| SplitImage {
            path: e.image,
            captions: match e.caption {
                Captions::Many(c) => c,
                Captions::One(c) => vec![c],
            },
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_lists_and_single_captions() {
        let text =
            r#"[{"image": "a/1.jpg", "caption": ["x", "y"], "image_id": 3}, {"image": "2.jpg", "caption": "z"}]"#;
        let split = parse(text, Path::new("s.json")).unwrap();
        assert_eq!(split[0], SplitImage { path: "a/1.jpg".into(), captions: vec!["x".into(), "y".into()] });
        assert_eq!(split[1].captions, ["z"]);
    }

    #[test]
    fn errors_carry_line_and_column() {
        let msg = parse("[\n{\"image\": 1}]", Path::new("s.json")).unwrap_err().to_string();
        assert!(msg.starts_with("s.json: line 2, column"), "{msg}");
    }
}
