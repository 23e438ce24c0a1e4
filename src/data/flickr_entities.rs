//! Flickr30K Entities (method.md section 3): `Annotations/<id>.xml` (image size and objects, each with
//! one or more `<name>` chain ids and either a `<bndbox>` or the `<nobndbox>`/`<scene>` flags), parsed
//! with quick-xml, and `Sentences/<id>.txt` (one caption per line, phrases written
//! `[/EN#<chain>/<type>[/<type>...] words ...]`), parsed by hand. [`image_boxes`] combines them into
//! an image's kept boxes: every `<bndbox>` whose object has a `<name>` mentioned in any caption of
//! the image, shifted by the dataset's coordinate origin, with its area ratio.

use std::collections::BTreeSet;
use std::path::Path;

use quick_xml::events::Event;

use crate::error::{Error, Result};

/// A parsed `Annotations/<id>.xml`.
#[derive(Debug, Clone, PartialEq)]
pub struct Annotation {
    /// Image width from `<size>`.
    pub width: u32,
    /// Image height from `<size>`.
    pub height: u32,
    /// The `<object>`s, in file order.
    pub objects: Vec<EntityObject>,
}

/// One `<object>`: its chain ids and its box, if it has one.
#[derive(Debug, Clone, PartialEq)]
pub struct EntityObject {
    /// All `<name>` chain ids of the object (several chains may share one box).
    pub names: Vec<String>,
    /// `[xmin, ymin, xmax, ymax]` as written (before the origin shift); `None` for objects marked
    /// `<nobndbox>` or `<scene>`. Of several `<bndbox>` the first counts, as in the official reader.
    pub bndbox: Option<[f64; 4]>,
    /// The `<nobndbox>` flag is set (> 0).
    pub nobndbox: bool,
    /// The `<scene>` flag is set (> 0).
    pub scene: bool,
}

/// A phrase of a Sentences line: `[/EN#<chain>/<type>... words]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Phrase {
    /// The chain id, e.g. `"18"`; `"0"` for phrases tagged `notvisual`.
    pub chain: String,
    /// Its types, e.g. `["people", "other"]` for `/people/other`.
    pub types: Vec<String>,
    /// The words inside the brackets.
    pub words: String,
}

/// One Sentences line: the caption with brackets removed, and its phrases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sentence {
    /// The caption text without the phrase markup.
    pub text: String,
    /// Its phrases, in order.
    pub phrases: Vec<Phrase>,
}

/// A kept box of an image, after the origin shift.
#[derive(Debug, Clone, PartialEq)]
pub struct KeptBox {
    /// `[xmin, ymin, xmax, ymax]` minus the origin.
    pub coords: [f64; 4],
    /// `(xmax - xmin) * (ymax - ymin) / (H * W)`, unclamped, with H and W from `<size>`.
    pub area: f64,
    /// All chain ids of the object.
    pub chains: Vec<String>,
    /// The box reaches outside `[0, W] x [0, H]`: the mask slicing clamps it (spec section 3).
    pub outside: bool,
}

impl KeptBox {
    /// Whether the box has no area (its end is not past its start on some axis): its mask is empty.
    pub fn is_empty(&self) -> bool {
        self.coords[2] <= self.coords[0] || self.coords[3] <= self.coords[1]
    }
}

/// An image's boxes after the keep-if-mentioned filter.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageBoxes {
    /// Width and height from the annotation's `<size>`.
    pub size: (u32, u32),
    /// The kept boxes, in file order.
    pub kept: Vec<KeptBox>,
    /// Boxes dropped because none of their chains is mentioned in the image's captions.
    pub dropped: usize,
}

/// Reads the boxes of `image_id` from an Entities folder, with coordinates shifted by `origin`
/// (1 for Flickr's 1-based boxes). `Ok(None)` when `Annotations/<id>.xml` does not exist; a present
/// annotation requires its `Sentences/<id>.txt`.
pub fn image_boxes(entities: &Path, image_id: &str, origin: u8) -> Result<Option<ImageBoxes>> {
    let xml_path = entities.join("Annotations").join(format!("{image_id}.xml"));
    let xml = match std::fs::read_to_string(&xml_path) {
        Ok(xml) => xml,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::input(&xml_path, e)),
    };
    let annotation = parse_annotation(&xml, &xml_path)?;
    let txt_path = entities.join("Sentences").join(format!("{image_id}.txt"));
    let txt = std::fs::read_to_string(&txt_path).map_err(|e| Error::input(&txt_path, e))?;
    let mentioned = mentioned_chains(&parse_sentences(&txt, &txt_path)?);
    Ok(Some(keep_mentioned(&annotation, &mentioned, origin)))
}

/// All chain ids that occur in any of the sentences.
pub fn mentioned_chains(sentences: &[Sentence]) -> BTreeSet<String> {
    sentences.iter().flat_map(|s| s.phrases.iter().map(|p| p.chain.clone())).collect()
}

/// Applies the keep-if-mentioned filter and the origin shift, and computes areas.
pub fn keep_mentioned(annotation: &Annotation, mentioned: &BTreeSet<String>, origin: u8) -> ImageBoxes {
    let (w, h) = (annotation.width as f64, annotation.height as f64);
    let mut kept = Vec::new();
    let mut dropped = 0;
    for object in &annotation.objects {
        let Some(raw) = object.bndbox else { continue };
        if !object.names.iter().any(|n| mentioned.contains(n)) {
            dropped += 1;
            continue;
        }
        let c = raw.map(|v| v - origin as f64);
        kept.push(KeptBox {
            coords: c,
            area: (c[2] - c[0]) * (c[3] - c[1]) / (h * w),
            chains: object.names.clone(),
            outside: c[0] < 0.0 || c[1] < 0.0 || c[2] > w || c[3] > h,
        });
    }
    ImageBoxes { size: (annotation.width, annotation.height), kept, dropped }
}

/// Parses an Entities annotation; `path` names the file in errors (with line and column).
pub fn parse_annotation(xml: &str, path: &Path) -> Result<Annotation> {
    let mut parser = AnnotationParser::default();
    let mut reader = quick_xml::Reader::from_str(xml);
    reader.config_mut().trim_text(true);
    loop {
        let at = |pos: u64| position(xml, pos as usize);
        let event = reader
            .read_event()
            .map_err(|e| Error::input(path, format!("malformed XML at {}: {e}", at(reader.error_position()))))?;
        let here = reader.buffer_position();
        let fail = |msg: String| Error::input(path, format!("{msg} (at {})", at(here)));
        match event {
            Event::Start(e) => parser.start_element(String::from_utf8_lossy(e.name().as_ref()).into_owned()),
            Event::End(_) => parser.end_element().map_err(fail)?,
            Event::Text(t) => {
                let text = t.decode().map_err(|e| fail(e.to_string()))?;
                parser.text(text.trim()).map_err(fail)?;
            }
            Event::Eof => break,
            _ => {}
        }
    }
    parser.finish().map_err(|msg| Error::input(path, msg))
}

/// `line L, column C` (1-based) of byte offset `pos` in `text`.
fn position(text: &str, pos: usize) -> String {
    let before = &text.as_bytes()[..pos.min(text.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let column = before.len() - before.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1) + 1;
    format!("line {line}, column {column}")
}

/// State of the XML walk: the open elements and what has been read so far.
#[derive(Default)]
struct AnnotationParser {
    stack: Vec<String>,
    width: Option<u32>,
    height: Option<u32>,
    objects: Vec<EntityObject>,
    current: Option<PartialObject>,
}

#[derive(Default)]
struct PartialObject {
    names: Vec<String>,
    bndboxes: Vec<[Option<f64>; 4]>,
    nobndbox: bool,
    scene: bool,
}

impl PartialObject {
    /// Text of `<object><element>` or `<bndbox><element>`.
    fn text(&mut self, parent: &str, element: &str, text: &str) -> std::result::Result<(), String> {
        const COORDS: [&str; 4] = ["xmin", "ymin", "xmax", "ymax"];
        match (parent, element) {
            ("object", "name") => self.names.push(text.to_string()),
            ("object", "nobndbox") => self.nobndbox = parse_number::<i64>(element, text)? > 0,
            ("object", "scene") => self.scene = parse_number::<i64>(element, text)? > 0,
            ("bndbox", _) => {
                if let (Some(slot), Some(bndbox)) =
                    (COORDS.iter().position(|c| *c == element), self.bndboxes.last_mut())
                {
                    let value: f64 = parse_number(element, text)?;
                    if !value.is_finite() {
                        return Err(format!("<{element}> is not a finite number: `{text}`"));
                    }
                    bndbox[slot] = Some(value);
                }
            }
            _ => {}
        }
        Ok(())
    }
}

impl AnnotationParser {
    fn start_element(&mut self, name: String) {
        match name.as_str() {
            "object" => self.current = Some(PartialObject::default()),
            "bndbox" => {
                if let Some(object) = self.current.as_mut() {
                    object.bndboxes.push([None; 4]);
                }
            }
            _ => {}
        }
        self.stack.push(name);
    }

    fn end_element(&mut self) -> std::result::Result<(), String> {
        if self.stack.last().map(String::as_str) == Some("object") {
            self.finish_object()?;
        }
        self.stack.pop();
        Ok(())
    }

    fn text(&mut self, text: &str) -> std::result::Result<(), String> {
        let n = self.stack.len();
        let (parent, element) = match n {
            0 => return Ok(()),
            1 => ("", self.stack[0].as_str()),
            _ => (self.stack[n - 2].as_str(), self.stack[n - 1].as_str()),
        };
        match (parent, element) {
            ("size", "width") => self.width = Some(parse_number(element, text)?),
            ("size", "height") => self.height = Some(parse_number(element, text)?),
            ("object", _) | ("bndbox", _) => {
                let (parent, element) = (parent.to_string(), element.to_string());
                if let Some(object) = self.current.as_mut() {
                    object.text(&parent, &element, text)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn finish_object(&mut self) -> std::result::Result<(), String> {
        let object = self.current.take().unwrap_or_default();
        if object.names.is_empty() {
            return Err(format!("<object> #{} has no <name>", self.objects.len() + 1));
        }
        let bndbox = match object.bndboxes.first() {
            Some(&[Some(a), Some(b), Some(c), Some(d)]) => Some([a, b, c, d]),
            Some(_) => return Err(format!("<bndbox> of object {} lacks a coordinate", object.names.join(","))),
            None => None,
        };
        self.objects.push(EntityObject { names: object.names, bndbox, nobndbox: object.nobndbox, scene: object.scene });
        Ok(())
    }

    fn finish(self) -> std::result::Result<Annotation, String> {
        if let Some(open) = self.stack.last() {
            return Err(format!("malformed XML: <{open}> is not closed at the end of the file"));
        }
        let (Some(width), Some(height)) = (self.width, self.height) else {
            return Err("no <size> with <width> and <height>".into());
        };
        if width == 0 || height == 0 {
            return Err(format!("image size {width}x{height} is empty"));
        }
        Ok(Annotation { width, height, objects: self.objects })
    }
}

fn parse_number<T: std::str::FromStr>(element: &str, text: &str) -> std::result::Result<T, String> {
    text.parse().map_err(|_| format!("<{element}> is not a number: `{text}`"))
}

/// Parses a Sentences file: one caption per line; empty lines are skipped.
pub fn parse_sentences(text: &str, path: &Path) -> Result<Vec<Sentence>> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| parse_sentence(line).map_err(|msg| Error::input(path, format!("line {}: {msg}", i + 1))))
        .collect()
}

/// Parses one Sentences line. A `[` not followed by `/EN#` is ordinary text.
fn parse_sentence(line: &str) -> std::result::Result<Sentence, String> {
    let mut text = String::new();
    let mut phrases = Vec::new();
    let mut rest = line;
    while let Some(open) = rest.find("[/EN#") {
        text.push_str(&rest[..open]);
        let inner = &rest[open + 1..];
        let close = inner.find(']').ok_or_else(|| format!("phrase `{}` is not closed by `]`", clip(&rest[open..])))?;
        let phrase = parse_phrase(&inner[..close])?;
        text.push_str(&phrase.words);
        phrases.push(phrase);
        rest = &inner[close + 1..];
    }
    text.push_str(rest);
    Ok(Sentence { text, phrases })
}

/// Parses `/EN#18/people/other A young man` (the inside of the brackets).
fn parse_phrase(inner: &str) -> std::result::Result<Phrase, String> {
    let (tag, words) = inner.split_once(char::is_whitespace).unwrap_or((inner, ""));
    let mut parts = tag.split('/').skip(1);
    let chain = parts.next().and_then(|p| p.strip_prefix("EN#")).unwrap_or_default();
    if chain.is_empty() || !chain.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("bad phrase tag `{tag}`: expected /EN#<number>/<type>"));
    }
    let types: Vec<String> = parts.map(str::to_string).collect();
    if types.is_empty() || types.iter().any(String::is_empty) {
        return Err(format!("bad phrase tag `{tag}`: expected a type after the chain id"));
    }
    Ok(Phrase { chain: chain.to_string(), types, words: words.trim().to_string() })
}

fn clip(s: &str) -> String {
    s.chars().take(40).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = r#"<annotation>
  <filename>1.jpg</filename>
  <size><width>500</width><height>400</height><depth>3</depth></size>
  <object><name>10</name><name>11</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>101</xmax><ymax>51</ymax></bndbox></object>
  <object><name>12</name><bndbox><xmin>201</xmin><ymin>101</ymin><xmax>301</xmax><ymax>201</ymax></bndbox></object>
  <object><name>12</name><bndbox><xmin>11</xmin><ymin>11</ymin><xmax>21</xmax><ymax>21</ymax></bndbox></object>
  <object><name>13</name><nobndbox>1</nobndbox><scene>0</scene></object>
  <object><name>14</name><nobndbox>0</nobndbox><scene>1</scene></object>
  <object><name>99</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>2</xmax><ymax>2</ymax></bndbox></object>
</annotation>"#;

    fn annotation() -> Annotation {
        parse_annotation(XML, Path::new("a.xml")).unwrap()
    }

    #[test]
    fn reads_size_names_boxes_and_flags() {
        let a = annotation();
        assert_eq!((a.width, a.height, a.objects.len()), (500, 400, 6));
        assert_eq!(a.objects[0].names, ["10", "11"]);
        assert_eq!(a.objects[0].bndbox, Some([1.0, 1.0, 101.0, 51.0]));
        assert_eq!((a.objects[3].bndbox, a.objects[3].nobndbox, a.objects[3].scene), (None, true, false));
        assert_eq!((a.objects[4].nobndbox, a.objects[4].scene), (false, true));
    }

    #[test]
    fn keeps_boxes_of_mentioned_chains_only() {
        let mentioned = BTreeSet::from(["11".to_string(), "12".to_string(), "13".to_string()]);
        let boxes = keep_mentioned(&annotation(), &mentioned, 1);
        assert_eq!(boxes.kept.len(), 3, "a box kept through its second name, and both boxes of chain 12");
        assert_eq!(boxes.dropped, 1);
        assert_eq!(boxes.kept[0].coords, [0.0, 0.0, 100.0, 50.0]);
        assert_eq!(boxes.kept[0].area, 100.0 * 50.0 / (500.0 * 400.0));
        assert_eq!(boxes.kept[0].chains, ["10", "11"]);
        assert!(boxes.kept.iter().all(|b| !b.outside));
    }

    #[test]
    fn origin_zero_keeps_coordinates_and_flags_outside_boxes() {
        let mut a = annotation();
        a.objects[0].bndbox = Some([-2.0, 0.0, 510.0, 10.0]);
        let boxes = keep_mentioned(&a, &BTreeSet::from(["10".to_string()]), 0);
        assert_eq!(boxes.kept[0].coords, [-2.0, 0.0, 510.0, 10.0]);
        assert!(boxes.kept[0].outside);
    }

    #[test]
    fn malformed_xml_reports_a_position() {
        let msg = parse_annotation("<annotation>\n<size><width>5</wdth>", Path::new("b.xml")).unwrap_err().to_string();
        assert!(msg.starts_with("b.xml: malformed XML at line 2"), "{msg}");
        let msg = parse_annotation("<annotation><size>", Path::new("c.xml")).unwrap_err().to_string();
        assert!(msg.contains("not closed"), "{msg}");
        let msg = parse_annotation("<annotation><size><width>x</width></size></annotation>", Path::new("d.xml"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("<width> is not a number") && msg.contains("line 1"), "{msg}");
    }

    #[test]
    fn parses_every_phrase_form() {
        let text = "[/EN#18/people A young man] in [/EN#19/clothing/other a white shirt] .\n\
                    [/EN#0/notvisual Someone] [looks] at [/EN#20/scene the sky]\n";
        let s = parse_sentences(text, Path::new("s.txt")).unwrap();
        assert_eq!(
            s[0].phrases[1],
            Phrase {
                chain: "19".into(),
                types: vec!["clothing".into(), "other".into()],
                words: "a white shirt".into()
            }
        );
        assert_eq!(s[0].text, "A young man in a white shirt .");
        assert_eq!(s[1].phrases[0].chain, "0");
        assert_eq!(s[1].phrases[0].types, ["notvisual"]);
        assert_eq!(s[1].text, "Someone [looks] at the sky", "a final period is optional");
        let chains: Vec<String> = mentioned_chains(&s).into_iter().collect();
        assert_eq!(chains, ["0", "18", "19", "20"]);
    }

    #[test]
    fn bad_phrases_name_the_line() {
        let msg = parse_sentences("ok\n[/EN#5/people a man", Path::new("s.txt")).unwrap_err().to_string();
        assert!(msg.starts_with("s.txt: line 2: phrase"), "{msg}");
        assert!(parse_sentences("[/EN#x/people a]", Path::new("s.txt")).is_err());
        assert!(parse_sentences("[/EN#5 a]", Path::new("s.txt")).is_err());
    }
}
