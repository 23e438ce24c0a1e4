//! The retrieval split (method.md section 8): the images in order, each with its captions, read from
//! a LAVIS or a Karpathy JSON file (auto-detected by the first character: `[` is LAVIS, `{` is
//! Karpathy). Image index = position in the list; text index = running index over the captions in
//! that order. Never assumes five captions per image.

use std::path::{Path, PathBuf};

use super::{karpathy_json, lavis_json};
use crate::error::{Error, Result};

/// One image of the split, as the JSON gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitImage {
    /// The image path as written in the JSON (LAVIS `image`, or Karpathy `filepath/filename`).
    pub path: String,
    /// Its captions, in order, as given (uncleaned).
    pub captions: Vec<String>,
}

/// Which JSON layout a split file uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitFormat {
    /// LAVIS: `[{"image": .., "caption": [..]}, ..]`.
    Lavis,
    /// Karpathy: `{"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}]}]}`.
    Karpathy,
}

/// Reads the split at `path`; `split` selects Karpathy images (ignored for LAVIS).
pub fn load_split(path: &Path, split: &str) -> Result<(SplitFormat, Vec<SplitImage>)> {
    let file = std::fs::read_to_string(path).map_err(|e| Error::input(path, e))?;
    // A UTF-8 byte order mark (some editors on Windows write one) is not JSON: skip it.
    let text = file.strip_prefix('\u{feff}').unwrap_or(&file);
    let images = match detect_format(text) {
        Some(SplitFormat::Lavis) => (SplitFormat::Lavis, lavis_json::parse(text, path)?),
        Some(SplitFormat::Karpathy) => (SplitFormat::Karpathy, karpathy_json::parse(text, path, split)?),
        None => {
            return Err(Error::input(
                path,
                "neither LAVIS JSON (an array) nor Karpathy JSON (an object with `images`)",
            ));
        }
    };
    if images.1.is_empty() {
        return Err(Error::input(path, format!("no images in the split (split = \"{split}\")")));
    }
    Ok(images)
}

fn detect_format(text: &str) -> Option<SplitFormat> {
    match text.trim_start().chars().next()? {
        '[' => Some(SplitFormat::Lavis),
        '{' => Some(SplitFormat::Karpathy),
        _ => None,
    }
}

/// Joins a JSON image path to the image folder; when that file does not exist, tries the file name
/// alone in the folder. Returns `None` when neither exists.
pub fn resolve_image_path(images_dir: &Path, given: &str) -> Option<PathBuf> {
    let joined = images_dir.join(given);
    if joined.is_file() {
        return Some(joined);
    }
    let by_name = images_dir.join(Path::new(given).file_name()?);
    by_name.is_file().then_some(by_name)
}

/// A serde_json error as one line with its position: `line 3, column 7: expected ...`.
pub(crate) fn json_error(path: &Path, e: &serde_json::Error) -> Error {
    let msg = e.to_string();
    let msg = msg.split(" at line ").next().unwrap_or(&msg);
    Error::input(path, format!("line {}, column {}: {msg}", e.line(), e.column()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_is_detected_by_first_character() {
        assert_eq!(detect_format("  [ {} ]"), Some(SplitFormat::Lavis));
        assert_eq!(detect_format("{\"images\": []}"), Some(SplitFormat::Karpathy));
        assert_eq!(detect_format("nope"), None);
        assert_eq!(detect_format(""), None);
    }

    #[test]
    fn a_byte_order_mark_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("split.json");
        std::fs::write(&path, "\u{feff}[{\"image\": \"a.jpg\", \"caption\": [\"A dog.\"]}]").unwrap();
        let (format, images) = load_split(&path, "test").unwrap();
        assert_eq!(format, SplitFormat::Lavis);
        assert_eq!(images, vec![SplitImage { path: "a.jpg".into(), captions: vec!["A dog.".into()] }]);
    }

    #[test]
    fn image_path_falls_back_to_the_file_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("1.jpg"), b"x").unwrap();
        assert_eq!(resolve_image_path(dir.path(), "1.jpg"), Some(dir.path().join("1.jpg")));
        assert_eq!(resolve_image_path(dir.path(), "flickr30k-images/1.jpg"), Some(dir.path().join("1.jpg")));
        assert_eq!(resolve_image_path(dir.path(), "2.jpg"), None);
    }
}
