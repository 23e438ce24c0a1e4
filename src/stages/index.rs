//! The `index` stage (method.md sections 2, 3 and 8): the retrieval split plus its boxes, from a
//! Flickr30K Entities folder or a COCO Entities JSON file (told apart by
//! [`coco_entities::detect`]) -> `index/images.parquet`, `index/boxes.parquet`,
//! `index/texts.parquet`. Image headers and Flickr Entities files are read in parallel (rayon); the
//! COCO Entities file is streamed once, before, keeping the split's images only. Errors and
//! warnings are reported in split order whatever the thread timing, so the output is deterministic.
//! The coverage summary is printed and stored in the manifest.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use arrow::array::{
    ArrayRef, BooleanArray, FixedSizeListArray, Float32Array, Float64Array, ListBuilder, StringArray, StringBuilder,
    UInt32Array,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use rayon::prelude::*;
use serde::Serialize;

use super::{Context, Outcome, Stage};
use crate::config::{Config, DatasetConfig};
use crate::data::captions::clean_caption;
use crate::data::coco_entities::{self, CocoEntities, EntitiesKind, ImageShapes};
use crate::data::dataset::{SplitImage, load_split, resolve_image_path};
use crate::data::flickr_entities::{ImageBoxes, KeptBox, image_boxes};
use crate::error::{Error, Result};
use crate::qpert::ObjectBox;
use crate::store::columns::Table;
use crate::store::{DataWarning, FileEntry, Fingerprint, Notes, StageDir, StageState};

/// Everything the index depends on: the split file's content, the split name, the image folder,
/// the byte size of each of the split's images (so an image replaced by another file makes every
/// stage stale; one parallel `stat` each, not a read), the box origin, and the content of the
/// Entities files (`Annotations/<id>.xml`, `Sentences/<id>.txt`) of the split's images, so an
/// edited annotation makes the index stale, or of the COCO Entities JSON (hashed once per copy).
/// Computed once per process and dataset config: every stage but `text` includes this one
/// (`qpert status` asks for it 16 times).
pub fn fingerprint(config: &Config) -> Result<Fingerprint> {
    let d = &config.dataset;
    let mut computed = COMPUTED.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((_, fp)) = computed.iter().find(|(dataset, _)| dataset == d) {
        return Ok(fp.clone());
    }
    let (_, split) = load_split(&d.annotations, &d.split)?;
    let images: Vec<PathBuf> = split
        .par_iter()
        .map(|s| resolve_image_path(&d.images, &s.path).unwrap_or_else(|| d.images.join(&s.path)))
        .collect();
    let mut fp = with_captions(Fingerprint::new(Stage::Index.name()), d)?
        .with("dataset.images", d.images.display())
        .with_file_sizes("dataset.images.sizes", &images)?
        .with("dataset.box_origin", d.box_origin);
    if let Some(entities) =
        d.entities.as_ref().filter(|e| coco_entities::detect(e).ok() == Some(EntitiesKind::CocoJson))
    {
        fp = fp.with("dataset.entities", entities.display()).with_large_file(
            "dataset.entities.file",
            entities,
            &config.output.dir,
        )?;
        if let Some(shapes) = &d.image_shapes {
            fp = fp.with_file_contents("dataset.image_shapes", shapes)?;
        }
    } else if let Some(entities) = &d.entities {
        let files: Vec<PathBuf> = split.iter().flat_map(|s| entities_files(entities, &image_id(&s.path))).collect();
        fp = fp.with("dataset.entities", entities.display()).with_files_contents("dataset.entities.files", &files)?;
    }
    computed.push((d.clone(), fp.clone()));
    Ok(fp)
}

/// What `texts.parquet` depends on: the split file's content and the split name. `text` takes
/// this part of the index fingerprint in place of the whole, so a replaced image or an edited box
/// annotation does not recompute its features.
pub fn captions_fingerprint(config: &Config) -> Result<Fingerprint> {
    with_captions(Fingerprint::new("index.texts"), &config.dataset)
}

/// Adds what the split's captions are read from.
fn with_captions(fp: Fingerprint, d: &DatasetConfig) -> Result<Fingerprint> {
    Ok(fp.with_file_contents("dataset.annotations", &d.annotations)?.with("dataset.split", &d.split))
}

/// The index fingerprints computed so far in this process, by dataset config.
static COMPUTED: Mutex<Vec<(DatasetConfig, Fingerprint)>> = Mutex::new(Vec::new());

/// An image's id: the stem of its file name (`flickr30k-images/123.jpg` -> `123`).
fn image_id(path: &str) -> String {
    Path::new(path).file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

fn entities_files(entities: &Path, image_id: &str) -> [PathBuf; 2] {
    [
        entities.join("Annotations").join(format!("{image_id}.xml")),
        entities.join("Sentences").join(format!("{image_id}.txt")),
    ]
}

/// The coverage summary of an index run (printed, and stored in the manifest).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Coverage {
    /// Images in the split.
    pub images: usize,
    /// Captions in the split.
    pub captions: usize,
    /// Images with an Entities annotation file.
    pub images_with_annotation: usize,
    /// Images whose annotation has no kept box (object size 0).
    pub images_without_kept_box: usize,
    /// Boxes kept (an object name is mentioned in the captions).
    pub boxes_kept: usize,
    /// Boxes dropped (no object name mentioned).
    pub boxes_dropped: usize,
    /// Kept boxes reaching outside their image (warned; fatal under `--strict`).
    pub boxes_outside_image: usize,
    /// Kept boxes without area (xmax <= xmin or ymax <= ymin): an empty mask, so a zero Gram matrix,
    /// whose projector is e1 e1^T by convention (`KeySubspace::of_gram`; warned; fatal under `--strict`).
    pub boxes_without_area: usize,
    /// COCO Entities only: boxes dropped as near-duplicates (L1 < 0.1) of a box of the same image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boxes_duplicate: Option<usize>,
}

impl Coverage {
    fn line(&self) -> String {
        let duplicates = self.boxes_duplicate.map(|n| format!(", {n} dropped (duplicate)")).unwrap_or_default();
        let without_area = match self.boxes_without_area {
            0 => String::new(),
            n => format!(", {n} without area"),
        };
        format!(
            "index: {} images, {} captions; {} images with Entities annotations ({} without); \
             boxes: {} kept, {} dropped (chain not mentioned){duplicates}, {} outside their image{without_area}; \
             annotated images without a kept box: {}",
            self.images,
            self.captions,
            self.images_with_annotation,
            self.images - self.images_with_annotation,
            self.boxes_kept,
            self.boxes_dropped,
            self.boxes_outside_image,
            self.images_without_kept_box
        )
    }
}

/// Where the boxes come from.
enum Source {
    /// No `dataset.entities`: every object size is -1.
    None,
    /// A Flickr30K Entities folder, read per image.
    Flickr(PathBuf),
    /// A COCO Entities file, already streamed for the split's images, and the optional
    /// `coco_img_shapes.json` to check the headers against.
    Coco(CocoEntities, Option<ImageShapes>),
}

impl Source {
    /// Checks the configured entities path and, for COCO, streams the split's images out of it.
    fn open(ctx: &Context, split: &[SplitImage]) -> Result<Source> {
        let dataset = &ctx.config.dataset;
        let Some(entities) = &dataset.entities else { return Ok(Source::None) };
        let kind = coco_entities::detect(entities)?;
        if let (Some(shapes), EntitiesKind::FlickrFolder) = (&dataset.image_shapes, kind) {
            return Err(Error::input(
                shapes,
                "dataset.image_shapes is for COCO Entities only (dataset.entities is a folder)",
            ));
        }
        match kind {
            EntitiesKind::FlickrFolder => {
                check_entities_folder(entities)?;
                Ok(Source::Flickr(entities.clone()))
            }
            EntitiesKind::CocoJson => {
                let ids = split.iter().map(|s| split_coco_id(ctx, s)).collect::<Result<HashSet<u64>>>()?;
                ctx.reporter.info(&format!(
                    "index: streaming {} for {}",
                    entities.display(),
                    super::counted(ids.len(), "image")
                ));
                let coco = CocoEntities::load(entities, &ids)?;
                let mut missing: Vec<u64> = ids.into_iter().filter(|id| !coco.images.contains_key(id)).collect();
                if !missing.is_empty() {
                    missing.sort_unstable();
                    let list: Vec<String> = missing.iter().take(20).map(u64::to_string).collect();
                    let more = if missing.len() > 20 { ", ..." } else { "" };
                    ctx.reporter.info(&format!(
                        "index: no COCO Entities data for {} of the split (object size -1, not perturbed): {}{more}",
                        super::counted(missing.len(), "image"),
                        list.join(", ")
                    ));
                }
                let shapes = dataset.image_shapes.as_deref().map(coco_entities::load_image_shapes).transpose()?;
                Ok(Source::Coco(coco, shapes))
            }
        }
    }

    /// The file a data warning about `image_id` names.
    fn annotation_path(&self, image_id: &str) -> PathBuf {
        match self {
            Source::None => PathBuf::new(),
            Source::Flickr(entities) => entities_files(entities, image_id)[0].clone(),
            Source::Coco(coco, _) => coco.path.clone(),
        }
    }

    /// COCO with `dataset.image_shapes`: the warning for an image whose header size differs from
    /// the one the released conversion used.
    fn shape_mismatch(&self, record: &ImageRecord) -> Option<String> {
        let Source::Coco(_, Some(shapes)) = self else { return None };
        let &(w, h) = shapes.sizes.get(&coco_entities::coco_id(&record.image_id)?)?;
        ((w, h) != (record.width, record.height)).then(|| {
            format!(
                "image {}: size {w}x{h} differs from the image's {}x{}; the mask uses the image's (the released conversion used {w}x{h})",
                record.image_id, record.width, record.height
            )
        })
    }

    fn shapes_path(&self) -> PathBuf {
        match self {
            Source::Coco(_, Some(shapes)) => shapes.path.clone(),
            _ => PathBuf::new(),
        }
    }

    /// Near-duplicate boxes dropped over the split (COCO only).
    fn duplicates(&self) -> Option<usize> {
        match self {
            Source::Coco(coco, _) => Some(coco.images.values().map(|i| i.duplicates).sum()),
            _ => None,
        }
    }
}

/// The COCO id of a split image, from its file name (`val2014/COCO_val2014_000000391895.jpg`).
fn split_coco_id(ctx: &Context, image: &SplitImage) -> Result<u64> {
    coco_entities::coco_id(&image.path).ok_or_else(|| {
        Error::input(
            &ctx.config.dataset.annotations,
            format!("image `{}`: no COCO image id (trailing digits) in its file name", image.path),
        )
    })
}

/// One image of the split, resolved: its file, header size and kept boxes.
struct ImageRecord {
    image_id: String,
    path: PathBuf,
    width: u32,
    height: u32,
    boxes: Option<ImageBoxes>,
}

impl ImageRecord {
    /// -1 without annotation, 0 with no kept box, else the largest kept-box area ratio, in f64 as
    /// the released evaluation computes it: an f32 size would move images on a bin threshold to the
    /// next bin (f32 0.3 is above numpy's threshold 0.30000000000000004).
    fn object_size(&self) -> f64 {
        match &self.boxes {
            None => -1.0,
            Some(b) => b.kept.iter().map(|k| k.area).reduce(f64::max).unwrap_or(0.0),
        }
    }
}

/// Runs the index stage; skips it when up to date (unless `--force`).
pub fn run(ctx: &Context) -> Result<Outcome> {
    let dataset = &ctx.config.dataset;
    let stage = ctx.stage_dir(Stage::Index, fingerprint(&ctx.config)?);
    if let (false, StageState::Done(manifest)) = (ctx.force, stage.state()?) {
        ctx.check_recorded_warnings(&manifest)?;
        return Ok(Outcome::UpToDate);
    }
    let (_, split) = load_split(&dataset.annotations, &dataset.split)?;
    let source = Source::open(ctx, &split)?;
    let records = read_images(ctx, &split, &source)?;
    let (coverage, warnings) = report_boxes(ctx, &split, &records, &source)?;
    let files = write_tables(&stage, &split, &records)?;
    let notes = Notes { warnings, ..Notes::default() };
    stage.finish(files, serde_json::to_value(&coverage).unwrap_or_default(), notes)?;
    ctx.reporter.info(&coverage.line());
    ctx.reporter.info(&format!("index: wrote {}", stage.path().display()));
    Ok(Outcome::Ran)
}

fn check_entities_folder(entities: &Path) -> Result<()> {
    for sub in ["Annotations", "Sentences"] {
        if !entities.join(sub).is_dir() {
            return Err(Error::input(entities, format!("not a Flickr30K Entities folder: no {sub}/ inside")));
        }
    }
    Ok(())
}

/// Resolves, measures and annotates every image in parallel; the first error in split order wins.
fn read_images(ctx: &Context, split: &[SplitImage], source: &Source) -> Result<Vec<ImageRecord>> {
    let bar = ctx.reporter.bar(split.len() as u64, "index: reading image headers");
    let results: Vec<Result<ImageRecord>> =
        split.par_iter().map(|image| read_image(ctx, image, source)).inspect(|_| bar.inc(1)).collect();
    bar.finish_and_clear();
    results.into_iter().collect()
}

fn read_image(ctx: &Context, image: &SplitImage, source: &Source) -> Result<ImageRecord> {
    let dataset = &ctx.config.dataset;
    let path = resolve_image_path(&dataset.images, &image.path)
        .ok_or_else(|| image_not_found(&dataset.images, &image.path))?;
    let (width, height) = image_size(&path)?;
    let image_id = image_id(&path.to_string_lossy());
    let boxes = match source {
        Source::None => None,
        Source::Flickr(entities) => image_boxes(entities, &image_id, dataset.box_origin)?,
        // The mask size is the header's: COCO Entities has no image size (spec section 3).
        Source::Coco(coco, _) => coco.image_boxes(split_coco_id(ctx, image)?, width, height, dataset.box_origin),
    };
    Ok(ImageRecord { image_id, path, width, height, boxes })
}

/// Names the file-name fallback as the missing file, and the joined path too when it differs.
fn image_not_found(images: &Path, given: &str) -> Error {
    let joined = images.join(given);
    let by_name = Path::new(given).file_name().map_or_else(|| joined.clone(), |name| images.join(name));
    if by_name == joined {
        Error::input(by_name, "image not found")
    } else {
        Error::input(by_name, format!("image not found (nor at {})", joined.display()))
    }
}

/// Width and height from the image header (the pixels are decoded later, by `extract`).
fn image_size(path: &Path) -> Result<(u32, u32)> {
    let bad = |e: &dyn std::fmt::Display| Error::input(path, format!("cannot read the image: {e}"));
    image::ImageReader::open(path)
        .map_err(|e| bad(&e))?
        .with_guessed_format()
        .map_err(|e| bad(&e))?
        .into_dimensions()
        .map_err(|e| bad(&e))
}

/// Counts coverage and raises the data warnings (outside boxes, size mismatches), in split order.
fn report_boxes(
    ctx: &Context,
    split: &[SplitImage],
    records: &[ImageRecord],
    source: &Source,
) -> Result<(Coverage, Vec<DataWarning>)> {
    let mut warnings = Vec::new();
    let mut coverage = Coverage {
        images: records.len(),
        captions: split.iter().map(|s| s.captions.len()).sum(),
        boxes_duplicate: source.duplicates(),
        ..Coverage::default()
    };
    for record in records {
        if let Some(msg) = source.shape_mismatch(record) {
            warnings.push(ctx.data_warning(&source.shapes_path(), &msg)?);
        }
        let Some(boxes) = &record.boxes else { continue };
        let xml = source.annotation_path(&record.image_id);
        coverage.images_with_annotation += 1;
        coverage.boxes_kept += boxes.kept.len();
        coverage.boxes_dropped += boxes.dropped;
        coverage.images_without_kept_box += usize::from(boxes.kept.is_empty());
        if boxes.size != (record.width, record.height) {
            let (w, h) = boxes.size;
            let msg = format!(
                "image {}: annotation size {w}x{h} differs from the image's {}x{}; boxes use the annotation size",
                record.image_id, record.width, record.height
            );
            warnings.push(ctx.data_warning(&xml, &msg)?);
        }
        for (i, b) in boxes.kept.iter().enumerate().filter(|(_, b)| b.outside) {
            coverage.boxes_outside_image += 1;
            // A negative start wraps around in the released slicing (usually an empty mask axis,
            // e.g. COCO with box_origin = 1); a too-large end is clamped.
            let mask = if b.coords[0] < 0.0 || b.coords[1] < 0.0 {
                "its mask slice starts from the far side, as in Python (usually empty)"
            } else {
                "its mask is clamped"
            };
            let msg = format!(
                "image {}: kept box {} (chains {}) {:?} reaches outside the {}x{} image; {mask}, its area is not",
                record.image_id,
                i + 1,
                b.chains.join(","),
                b.coords,
                boxes.size.0,
                boxes.size.1
            );
            warnings.push(ctx.data_warning(&xml, &msg)?);
        }
        for (i, b) in boxes.kept.iter().enumerate().filter(|(_, b)| b.is_empty()) {
            coverage.boxes_without_area += 1;
            let msg = format!(
                "image {}: kept box {} (chains {}) {:?} has no area (its end is not past its start): its mask is \
                 empty, so Q-Pert gives it the projector of a zero Gram matrix, e1 e1^T (README: The method)",
                record.image_id,
                i + 1,
                b.chains.join(","),
                b.coords,
            );
            warnings.push(ctx.data_warning(&xml, &msg)?);
        }
    }
    Ok((coverage, warnings))
}

/// Writes the three tables, each atomically and fingerprinted.
fn write_tables(stage: &StageDir, split: &[SplitImage], records: &[ImageRecord]) -> Result<Vec<FileEntry>> {
    let artifact = |e: arrow::error::ArrowError| Error::artifact(stage.path(), e);
    let tables = [
        ("images", images_batch(split, records).map_err(artifact)?),
        ("boxes", boxes_batch(records).map_err(artifact)?),
        ("texts", texts_batch(split).map_err(artifact)?),
    ];
    tables.iter().map(|(name, batch)| stage.write_table(name, &batch.schema(), std::slice::from_ref(batch))).collect()
}

type ArrowResult<T> = std::result::Result<T, arrow::error::ArrowError>;

fn batch(columns: Vec<(&str, ArrayRef)>) -> ArrowResult<RecordBatch> {
    let fields: Vec<Field> = columns.iter().map(|(name, a)| Field::new(*name, a.data_type().clone(), false)).collect();
    let schema: SchemaRef = Arc::new(Schema::new(fields));
    RecordBatch::try_new(schema, columns.into_iter().map(|(_, a)| a).collect())
}

fn u32_column(values: impl Iterator<Item = usize>) -> ArrayRef {
    Arc::new(UInt32Array::from_iter_values(values.map(|v| v as u32)))
}

/// `images.parquet`: image_idx, image_id, path, width, height, object_size, num_boxes, num_captions.
fn images_batch(split: &[SplitImage], records: &[ImageRecord]) -> ArrowResult<RecordBatch> {
    batch(vec![
        ("image_idx", u32_column(0..records.len())),
        ("image_id", Arc::new(StringArray::from_iter_values(records.iter().map(|r| r.image_id.as_str())))),
        ("path", Arc::new(StringArray::from_iter_values(records.iter().map(|r| r.path.to_string_lossy())))),
        ("width", Arc::new(UInt32Array::from_iter_values(records.iter().map(|r| r.width)))),
        ("height", Arc::new(UInt32Array::from_iter_values(records.iter().map(|r| r.height)))),
        ("object_size", Arc::new(Float64Array::from_iter_values(records.iter().map(ImageRecord::object_size)))),
        ("num_boxes", u32_column(records.iter().map(|r| r.boxes.as_ref().map_or(0, |b| b.kept.len())))),
        ("num_captions", u32_column(split.iter().map(|s| s.captions.len()))),
    ])
}

/// `boxes.parquet`: image_idx, box [xmin, ymin, xmax, ymax], area, chains, outside_image, and the
/// annotation's size (`mask_width`, `mask_height`: the box mask is built at that size, spec section 3).
fn boxes_batch(records: &[ImageRecord]) -> ArrowResult<RecordBatch> {
    let kept: Vec<(usize, &KeptBox, (u32, u32))> = records
        .iter()
        .enumerate()
        .flat_map(|(i, r)| r.boxes.iter().flat_map(move |b| b.kept.iter().map(move |k| (i, k, b.size))))
        .collect();
    let coords = Float32Array::from_iter_values(kept.iter().flat_map(|(_, k, _)| k.coords.map(|c| c as f32)));
    let item = Arc::new(Field::new_list_field(DataType::Float32, false));
    let boxes = FixedSizeListArray::try_new(item, 4, Arc::new(coords), None)?;
    let mut chains =
        ListBuilder::new(StringBuilder::new()).with_field(Arc::new(Field::new_list_field(DataType::Utf8, false)));
    for (_, k, _) in &kept {
        k.chains.iter().for_each(|c| chains.values().append_value(c));
        chains.append(true);
    }
    batch(vec![
        ("image_idx", u32_column(kept.iter().map(|(i, _, _)| *i))),
        ("box", Arc::new(boxes)),
        ("area", Arc::new(Float64Array::from_iter_values(kept.iter().map(|(_, k, _)| k.area)))),
        ("chains", Arc::new(chains.finish())),
        ("outside_image", Arc::new(BooleanArray::from_iter(kept.iter().map(|(_, k, _)| Some(k.outside))))),
        ("mask_width", Arc::new(UInt32Array::from_iter_values(kept.iter().map(|(_, _, size)| size.0)))),
        ("mask_height", Arc::new(UInt32Array::from_iter_values(kept.iter().map(|(_, _, size)| size.1)))),
    ])
}

/// `texts.parquet`: text_idx, image_idx, caption, caption_clean.
fn texts_batch(split: &[SplitImage]) -> ArrowResult<RecordBatch> {
    let texts: Vec<(usize, &str)> =
        split.iter().enumerate().flat_map(|(i, s)| s.captions.iter().map(move |c| (i, c.as_str()))).collect();
    batch(vec![
        ("text_idx", u32_column(0..texts.len())),
        ("image_idx", u32_column(texts.iter().map(|(i, _)| *i))),
        ("caption", Arc::new(StringArray::from_iter_values(texts.iter().map(|(_, c)| *c)))),
        ("caption_clean", Arc::new(StringArray::from_iter_values(texts.iter().map(|(_, c)| clean_caption(c))))),
    ])
}

/// The index tables, read back for the later stages.
pub struct IndexTables {
    /// Per image: its file and header size.
    pub images: Vec<IndexImage>,
    /// Per image: its kept boxes (empty without annotation or kept box).
    pub boxes: Vec<Vec<IndexBox>>,
    /// Per caption, in text_idx order: its image and cleaned caption.
    pub texts: Vec<IndexText>,
}

/// One image of the split.
pub struct IndexImage {
    pub path: PathBuf,
    /// Max kept-box area ratio; 0 with no kept box; -1 without annotation.
    pub object_size: f64,
}

/// One kept box, as the Q-Pert weights need it.
pub struct IndexBox {
    pub object: ObjectBox,
    pub area: f64,
    /// The annotation's image size, at which the released code builds the box mask.
    pub mask_width: u32,
    pub mask_height: u32,
}

/// One caption of the split.
pub struct IndexText {
    pub image_idx: u32,
    pub caption_clean: String,
}

impl IndexTables {
    /// Reads the complete, fresh index of `config` (an error names what to run otherwise).
    pub fn read(config: &Config) -> Result<IndexTables> {
        let stage = StageDir::open(&config.output.dir, Stage::Index.name(), fingerprint(config)?);
        let (images, boxes, texts) =
            (stage.read_table("images")?, stage.read_table("boxes")?, stage.read_table("texts")?);
        let path = |name: &str| stage.path().join(format!("{name}.parquet"));
        let (images_path, boxes_path, texts_path) = (path("images"), path("boxes"), path("texts"));

        let t = Table::new(&images, &images_path);
        let paths = t.strings("path")?;
        let sizes = t.f64s("object_size")?;
        let images: Vec<IndexImage> = (0..images.num_rows())
            .map(|i| IndexImage { path: PathBuf::from(paths.value(i)), object_size: sizes[i] })
            .collect();

        let t = Table::new(&boxes, &boxes_path);
        let (owner, coords, area) = (t.u32s("image_idx")?, t.f32_rows("box", 4)?, t.f64s("area")?);
        let (mask_width, mask_height) = (t.u32s("mask_width")?, t.u32s("mask_height")?);
        let mut per_image: Vec<Vec<IndexBox>> = (0..images.len()).map(|_| Vec::new()).collect();
        for (o, &image) in owner.iter().enumerate() {
            let c = &coords[o * 4..o * 4 + 4];
            let slot = per_image.get_mut(image as usize).ok_or_else(|| {
                Error::artifact(&boxes_path, format!("box {o} names image {image}, not in the index"))
            })?;
            slot.push(IndexBox {
                object: ObjectBox { xmin: c[0], ymin: c[1], xmax: c[2], ymax: c[3] },
                area: area[o],
                mask_width: mask_width[o],
                mask_height: mask_height[o],
            });
        }

        let t = Table::new(&texts, &texts_path);
        let (owner, captions) = (t.u32s("image_idx")?, t.strings("caption_clean")?);
        let texts = owner
            .iter()
            .enumerate()
            .map(|(i, &image_idx)| IndexText { image_idx, caption_clean: captions.value(i).to_string() })
            .collect();
        Ok(IndexTables { images, boxes: per_image, texts })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_run_over_captions_in_split_order_with_uneven_counts() {
        let split = vec![
            SplitImage { path: "a.jpg".into(), captions: vec!["A dog.".into()] },
            SplitImage { path: "b.jpg".into(), captions: vec!["B!".into(), "C  d".into(), "E".into()] },
        ];
        let batch = texts_batch(&split).unwrap();
        let image_idx = batch.column(1).as_any().downcast_ref::<UInt32Array>().unwrap();
        assert_eq!(image_idx.values().to_vec(), [0, 1, 1, 1]);
        let clean = batch.column(3).as_any().downcast_ref::<StringArray>().unwrap();
        assert_eq!(clean.iter().flatten().collect::<Vec<_>>(), ["a dog", "b", "c d", "e"]);
    }
}
