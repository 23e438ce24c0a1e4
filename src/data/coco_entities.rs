//! COCO Entities (`coco_entities_release.json`, method.md sections 3 and 8), read directly instead of
//! through the released Python conversion to the Flickr30K Entities layout:
//!
//! ```text
//! { "<coco id>": { "<caption>": { "detections": { "<class>": [[det_id, [x1, y1, x2, y2]], ..] }, ..}, ..}, ..}
//! ```
//!
//! Boxes are 0-based floats. [`CocoEntities::load`] streams the file (about 400 MB) with a serde
//! visitor over the top-level map: the images not in the split are skipped with
//! [`serde::de::IgnoredAny`] (nothing of them is kept) and each split image is converted as soon as
//! its captions are read, so memory holds the converted boxes of the split only, never the file.
//!
//! The conversion of one image yields what the released conversion writes and the released loader
//! then keeps:
//!
//! * **chains**: the detection classes of all the image's captions, numbered in order of first
//!   appearance (captions in file order, classes in each caption's `detections` order). The released
//!   conversion numbers them through a Python `set`, whose order changes from run to run; only the
//!   numbering differs, not which boxes are kept.
//! * **mentioned**: a class is mentioned when some caption lists it among its *own* `detections`
//!   and its name occurs in that caption word-bounded with an optional plural `s` (the conversion's
//!   `\b{class}s?\b`, Unicode word boundaries, the class name taken literally), after the
//!   caption's `[...]` spans are removed (as the conversion does first).
//! * **written boxes**: every detection box, captions in file order, classes in `detections` order,
//!   boxes in list order, except a box whose L1 distance to a box already written for the image is
//!   `< 0.1` (the conversion's de-duplication, applied before the mention filter: a duplicate of an
//!   unmentioned class's box is dropped even if its own class is mentioned). A written box belongs
//!   to its class's chain.
//! * **kept boxes**: the written boxes whose chain is mentioned (the Flickr rule of
//!   [`super::flickr_entities`]).
//!
//! The conversion substitutes the classes one after another into the caption text and the released
//! loader then parses the result as a Flickr Sentences file; in rare captions (one class name inside
//! another, e.g. `hot dog` and `dog`, or a tag glued to punctuation) that text processing hides a
//! mention. qpert follows the rule above instead of reproducing those artefacts.
//!
//! The mask size is the image header's (the conversion took it from `coco_img_shapes.json`, which
//! holds the same COCO image sizes; given as `dataset.image_shapes`, [`load_image_shapes`] reads it
//! and the index warns about any image whose header disagrees). Split images are matched by the COCO id in their file name
//! (`val2014/COCO_val2014_000000391895.jpg` -> 391895); a split image absent from the file has no
//! annotation (object size -1, no perturbation).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::{BufReader, Read};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use regex::Regex;
use serde::Deserialize;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};

use super::dataset::json_error;
use super::flickr_entities::{ImageBoxes, KeptBox};
use crate::error::{Error, Result};

/// Boxes closer than this in L1 distance to an already written box are duplicates.
const DUPLICATE_L1: f64 = 0.1;

/// What a configured `dataset.entities` path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntitiesKind {
    /// A Flickr30K Entities folder (`Annotations/`, `Sentences/`).
    FlickrFolder,
    /// A COCO Entities JSON file.
    CocoJson,
}

/// Tells a Flickr30K Entities folder from a COCO Entities JSON file: a folder is Flickr; a file is
/// COCO when its name ends in `.json` or its first non-blank byte is `{`.
pub fn detect(path: &Path) -> Result<EntitiesKind> {
    let meta = std::fs::metadata(path).map_err(|e| Error::input(path, e))?;
    if meta.is_dir() {
        return Ok(EntitiesKind::FlickrFolder);
    }
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json")) {
        return Ok(EntitiesKind::CocoJson);
    }
    let mut head = [0u8; 256];
    let n = std::fs::File::open(path).and_then(|mut f| f.read(&mut head)).map_err(|e| Error::input(path, e))?;
    match head[..n].iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => Ok(EntitiesKind::CocoJson),
        _ => Err(Error::input(path, "neither a Flickr30K Entities folder nor a COCO Entities JSON file")),
    }
}

/// The COCO id in an image file name: the trailing digits of its stem
/// (`COCO_val2014_000000391895.jpg` -> 391895, `391895.jpg` -> 391895).
pub fn coco_id(file: &str) -> Option<u64> {
    let stem = Path::new(file).file_stem()?.to_str()?;
    let digits = stem.len() - stem.bytes().rev().take_while(u8::is_ascii_digit).count();
    stem[digits..].parse().ok()
}

/// The released conversion's `coco_img_shapes.json`, read.
#[derive(Debug, Clone)]
pub struct ImageShapes {
    /// The file read.
    pub path: PathBuf,
    /// `(width, height)` by COCO id.
    pub sizes: HashMap<u64, (u32, u32)>,
}

/// Reads the released conversion's `coco_img_shapes.json`: `{"<coco id>": [width, height], ..}`.
pub fn load_image_shapes(path: &Path) -> Result<ImageShapes> {
    let file = std::fs::File::open(path).map_err(|e| Error::input(path, e))?;
    let shapes: HashMap<String, (u32, u32)> =
        serde_json::from_reader(BufReader::new(file)).map_err(|e| json_error(path, &e))?;
    let sizes = shapes
        .into_iter()
        .map(|(key, size)| match key.trim().parse() {
            Ok(id) => Ok((id, size)),
            Err(_) => Err(Error::input(path, format!("key `{key}` is not a COCO image id (expected digits)"))),
        })
        .collect::<Result<_>>()?;
    Ok(ImageShapes { path: path.to_path_buf(), sizes })
}

/// One box written by the conversion: its chain and its 0-based coordinates.
#[derive(Debug, Clone, PartialEq)]
pub struct CocoBox {
    /// The chain number of its class (order of first appearance in the image).
    pub chain: usize,
    /// Its class name.
    pub class: String,
    /// `[x1, y1, x2, y2]` as in the file.
    pub coords: [f64; 4],
    /// Its class is mentioned in some caption of the image.
    pub mentioned: bool,
}

/// One image converted: its written boxes and how many duplicates were dropped.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CocoImage {
    /// The written boxes, in conversion order.
    pub boxes: Vec<CocoBox>,
    /// Boxes dropped as near-duplicates (L1 < 0.1) of a written box.
    pub duplicates: usize,
}

impl CocoImage {
    /// The kept boxes (mentioned chains), shifted by `origin`, with areas over `width x height`.
    pub fn kept(&self, width: u32, height: u32, origin: u8) -> ImageBoxes {
        let (w, h) = (width as f64, height as f64);
        let kept = self
            .boxes
            .iter()
            .filter(|b| b.mentioned)
            .map(|b| {
                let c = b.coords.map(|v| v - origin as f64);
                KeptBox {
                    coords: c,
                    area: (c[2] - c[0]) * (c[3] - c[1]) / (h * w),
                    chains: vec![b.chain.to_string()],
                    outside: c[0] < 0.0 || c[1] < 0.0 || c[2] > w || c[3] > h,
                }
            })
            .collect::<Vec<_>>();
        let dropped = self.boxes.len() - kept.len();
        ImageBoxes { size: (width, height), kept, dropped }
    }
}

/// The split's images read from a COCO Entities file.
#[derive(Debug, Clone, Default)]
pub struct CocoEntities {
    /// The file read.
    pub path: PathBuf,
    /// The converted split images present in the file, by COCO id.
    pub images: HashMap<u64, CocoImage>,
}

impl CocoEntities {
    /// Streams `path`, converting the images whose COCO id is in `wanted` and skipping the rest.
    pub fn load(path: &Path, wanted: &HashSet<u64>) -> Result<CocoEntities> {
        let file = std::fs::File::open(path).map_err(|e| Error::input(path, e))?;
        let mut de = serde_json::Deserializer::from_reader(BufReader::with_capacity(1 << 20, file));
        let mut images = HashMap::new();
        let mut matcher = Matcher::default();
        TopLevel { wanted, images: &mut images, matcher: &mut matcher }
            .deserialize(&mut de)
            .and_then(|()| de.end())
            .map_err(|e| if e.is_io() { Error::input(path, e) } else { json_error(path, &e) })?;
        Ok(CocoEntities { path: path.to_path_buf(), images })
    }

    /// The kept boxes of image `id` with the mask size `width x height`; `None` when the file has
    /// no such image.
    pub fn image_boxes(&self, id: u64, width: u32, height: u32, origin: u8) -> Option<ImageBoxes> {
        self.images.get(&id).map(|image| image.kept(width, height, origin))
    }
}

/// One caption's entry; its other keys (`noun_chunks`, `split`, ...) are skipped.
#[derive(Deserialize)]
struct CaptionEntry {
    detections: Ordered<Vec<(IgnoredAny, [f64; 4])>>,
}

/// A JSON object read as its entries in file order.
struct Ordered<V>(Vec<(String, V)>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Ordered<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        struct OrderedVisitor<V>(PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for OrderedVisitor<V> {
            type Value = Ordered<V>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Self::Value, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(Ordered(entries))
            }
        }
        deserializer.deserialize_map(OrderedVisitor(PhantomData))
    }
}

/// The top-level map `{ "<coco id>": {captions..}, .. }`, visited entry by entry.
struct TopLevel<'a> {
    wanted: &'a HashSet<u64>,
    images: &'a mut HashMap<u64, CocoImage>,
    matcher: &'a mut Matcher,
}

impl<'de> DeserializeSeed<'de> for TopLevel<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> std::result::Result<(), D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for TopLevel<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a COCO Entities object keyed by COCO image id")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<(), A::Error> {
        while let Some(key) = map.next_key::<String>()? {
            let id: u64 = key.trim().parse().map_err(|_| {
                serde::de::Error::custom(format!("key `{key}` is not a COCO image id (expected digits)"))
            })?;
            if self.wanted.contains(&id) {
                let captions: Ordered<CaptionEntry> = map.next_value()?;
                self.images.insert(id, convert(&captions.0, self.matcher));
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

/// Compiled mention patterns, one per class name, and the `[...]` remover.
#[derive(Default)]
struct Matcher {
    classes: HashMap<String, Regex>,
    brackets: Option<Regex>,
}

impl Matcher {
    /// `class` (or `class` + `s`) occurs word-bounded in `caption`, once its `[...]` spans are removed.
    fn mentions(&mut self, caption: &str, class: &str) -> bool {
        let brackets = self.brackets.get_or_insert_with(|| Regex::new(r"\[.*?\]").expect("a valid regex"));
        let caption = brackets.replace_all(caption, "");
        let pattern = self
            .classes
            .entry(class.to_string())
            .or_insert_with(|| Regex::new(&format!(r"\b{}s?\b", regex::escape(class))).expect("an escaped class name"));
        pattern.is_match(&caption)
    }
}

/// Converts one image's captions (see the module docs).
fn convert(captions: &[(String, CaptionEntry)], matcher: &mut Matcher) -> CocoImage {
    let mut classes: Vec<(&str, bool)> = Vec::new();
    for (caption, entry) in captions {
        for (class, _) in &entry.detections.0 {
            let chain = chain_of(&mut classes, class);
            if !classes[chain].1 && matcher.mentions(caption, class) {
                classes[chain].1 = true;
            }
        }
    }
    let mut image = CocoImage::default();
    for (_, entry) in captions {
        for (class, detections) in &entry.detections.0 {
            let chain = chain_of(&mut classes, class);
            for (_, coords) in detections {
                if image.boxes.iter().any(|b| l1(&b.coords, coords) < DUPLICATE_L1) {
                    image.duplicates += 1;
                    continue;
                }
                image.boxes.push(CocoBox { chain, class: class.clone(), coords: *coords, mentioned: classes[chain].1 });
            }
        }
    }
    image
}

/// The chain number of `class`, numbering a new class next.
fn chain_of<'a>(classes: &mut Vec<(&'a str, bool)>, class: &'a str) -> usize {
    classes.iter().position(|(c, _)| *c == class).unwrap_or_else(|| {
        classes.push((class, false));
        classes.len() - 1
    })
}

/// `sum |a - b|`, summed left to right as numpy does for four values.
fn l1(a: &[f64; 4], b: &[f64; 4]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, |s, d| s + d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(text: &str, wanted: &[u64]) -> Result<CocoEntities> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.json");
        std::fs::write(&path, text).unwrap();
        CocoEntities::load(&path, &wanted.iter().copied().collect())
    }

    #[test]
    fn ids_come_from_file_names() {
        assert_eq!(coco_id("val2014/COCO_val2014_000000391895.jpg"), Some(391_895));
        assert_eq!(coco_id("COCO_val2014_000000035498.jpg"), Some(35_498));
        assert_eq!(coco_id("123.jpg"), Some(123));
        assert_eq!(coco_id("astronaut.jpg"), None);
    }

    #[test]
    fn mentions_are_word_bounded_with_an_optional_plural() {
        let mut m = Matcher::default();
        assert!(m.mentions("Two dogs play.", "dog"));
        assert!(m.mentions("A dog.", "dog"));
        assert!(!m.mentions("Hotdogs for sale", "dog"));
        assert!(!m.mentions("A woman smiles", "man"));
        assert!(!m.mentions("A doggy", "dog"));
        assert!(m.mentions("A teddy bears picnic", "teddy bear"));
        assert!(!m.mentions("A [dog] sleeps", "dog"), "[...] spans are removed first");
        assert!(!m.mentions("A d.g", "d.g.") && m.mentions("x d.g y", "d.g"), "the class is literal");
        assert!(!m.mentions("A d-g", "d.g"));
    }

    #[test]
    fn converts_chains_mentions_duplicates_and_origin() {
        let text = r#"{
          "7": {
            "Two dogs and a frisbee. ": {"detections": {"dog": [[0, [0.0, 10.0, 50.0, 60.0]], [1, [60.0, 10.0, 90.0, 40.0]]],
                                                    "person": [[2, [100.0, 0.0, 150.0, 80.0]]]},
                                         "noun_chunks": [["dogs", "dog"]], "split": "test"},
            "A dog with a ball": {"detections": {"dog": [[0, [0.05, 10.0, 50.0, 60.0]]], "ball": [[3, [60.04, 10.0, 90.0, 40.0]]],
                                                 "frisbee": [[4, [5.0, 5.0, 15.0, 15.0]]]}}
          },
          "8": {"skipped": {"anything": [1, {"x": null}]}}
        }"#;
        let e = load_str(text, &[7, 9]).unwrap();
        assert_eq!(e.images.keys().collect::<Vec<_>>(), [&7], "8 is not wanted, 9 is absent");
        let image = &e.images[&7];
        let summary: Vec<(usize, &str, [f64; 4], bool)> =
            image.boxes.iter().map(|b| (b.chain, b.class.as_str(), b.coords, b.mentioned)).collect();
        assert_eq!(
            summary,
            [
                (0, "dog", [0.0, 10.0, 50.0, 60.0], true),
                (0, "dog", [60.0, 10.0, 90.0, 40.0], true),
                (1, "person", [100.0, 0.0, 150.0, 80.0], false),
                // frisbee is in the first caption's text but not among its detections, and the
                // second caption, whose detections have it, does not say it.
                (3, "frisbee", [5.0, 5.0, 15.0, 15.0], false),
            ]
        );
        assert_eq!(image.duplicates, 2, "dog 0.05 away and ball 0.04 away (its class mentioned, but a duplicate)");

        let boxes = e.image_boxes(7, 200, 100, 0).unwrap();
        assert_eq!(boxes.dropped, 2);
        assert_eq!(
            boxes.kept.iter().map(|k| k.coords).collect::<Vec<_>>(),
            [[0.0, 10.0, 50.0, 60.0], [60.0, 10.0, 90.0, 40.0]]
        );
        assert_eq!(boxes.kept[0].area, 50.0 * 50.0 / 20000.0);
        assert_eq!(boxes.kept[0].chains, ["0"]);
        assert!(!boxes.kept[0].outside);
        let shifted = e.image_boxes(7, 200, 100, 1).unwrap();
        assert_eq!(shifted.kept[0].coords, [-1.0, 9.0, 49.0, 59.0]);
        assert_eq!(shifted.kept[0].area, boxes.kept[0].area);
        assert!(shifted.kept[0].outside, "the released shift moves a border box outside");
        assert!(e.image_boxes(9, 200, 100, 0).is_none());
    }

    #[test]
    fn errors_name_the_position() {
        let msg = load_str("{\"7\": {\"c\": {\"nodetections\": {}}}}", &[7]).unwrap_err().to_string();
        assert!(msg.contains("e.json: line 1, column") && msg.contains("missing field `detections`"), "{msg}");
        let msg = load_str("{\"x7\": {}}", &[7]).unwrap_err().to_string();
        assert!(msg.contains("key `x7` is not a COCO image id"), "{msg}");
        let msg =
            load_str("{\"7\": {\"c\": {\"detections\": {\"dog\": [[0, [1, 2, 3]]]}}}}", &[7]).unwrap_err().to_string();
        assert!(msg.contains("line 1, column"), "{msg}");
        assert!(load_str("[]", &[7]).is_err());
        assert!(load_str("{} x", &[7]).is_err(), "trailing characters");
    }

    #[test]
    fn image_shapes_are_width_then_height_by_id() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shapes.json");
        std::fs::write(&path, r#"{"391895": [640, 360], "7": [1, 2]}"#).unwrap();
        let shapes = load_image_shapes(&path).unwrap();
        assert_eq!((shapes.sizes[&391_895], shapes.sizes.len()), ((640, 360), 2));
        std::fs::write(&path, r#"{"x": [1, 2]}"#).unwrap();
        assert!(load_image_shapes(&path).unwrap_err().to_string().contains("key `x` is not a COCO image id"));
        std::fs::write(&path, r#"{"7": [1]}"#).unwrap();
        assert!(load_image_shapes(&path).unwrap_err().to_string().contains("shapes.json: line 1, column"));
    }

    #[test]
    fn detects_folders_and_json_files() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(detect(dir.path()).unwrap(), EntitiesKind::FlickrFolder);
        let json = dir.path().join("entities");
        std::fs::write(&json, "  {}").unwrap();
        assert_eq!(detect(&json).unwrap(), EntitiesKind::CocoJson);
        std::fs::write(&json, "<xml/>").unwrap();
        assert!(detect(&json).unwrap_err().to_string().contains("neither a Flickr30K Entities folder"));
        assert!(detect(&dir.path().join("nope")).is_err());
    }
}
