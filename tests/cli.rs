//! End-to-end tests of the `qpert` binary on the `flickr_mini` fixture: the `index` stage with exact
//! values read back from Parquet, both split formats, `status`, `--set`, `--shard`, stale detection,
//! `--strict`, and `run`.

mod common;

use arrow::datatypes::DataType;
use common::{Workspace, area, assert_fails, bools, boxes, chains, f64s, parts, stderr, stdout, strings, u32s};

const LAVIS: &str = "flickr30k_test.json";
const KARPATHY: &str = "dataset_flickr30k.json";

fn index(ws: &Workspace, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["stage", "index", "--config", "{config}"];
    args.extend_from_slice(extra);
    ws.qpert(&args)
}

#[test]
fn index_writes_exact_images_boxes_and_texts() {
    let ws = Workspace::new(LAVIS);
    let out = index(&ws, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report = stdout(&out);
    assert!(report.contains("5 images, 25 captions; 4 images with Entities annotations (1 without)"), "{report}");
    assert!(report.contains("boxes: 7 kept, 2 dropped (chain not mentioned), 1 outside their image"), "{report}");
    assert!(report.contains("annotated images without a kept box: 1"), "{report}");
    let warnings = stderr(&out);
    assert_eq!(warnings.lines().count(), 1, "{warnings}");
    assert!(
        warnings.starts_with("qpert: warning: ") && warnings.contains("1000003.xml: image 1000003: kept box 1"),
        "{warnings}"
    );

    let images = ws.table("index", "images");
    assert_eq!(u32s(&images, "image_idx"), [0, 1, 2, 3, 4]);
    assert_eq!(strings(&images, "image_id"), ["1000001", "1000002", "1000003", "1000004", "1000005"]);
    assert!(strings(&images, "path")[2].ends_with("flickr_mini/flickr30k-images/1000003.jpg"));
    assert_eq!(u32s(&images, "width"), [512, 512, 451, 600, 640]);
    assert_eq!(u32s(&images, "height"), [512, 512, 300, 400, 427]);
    let sizes = [
        area([100.0, 30.0, 400.0, 511.0], 512.0, 512.0),
        area([128.0, 64.0, 384.0, 448.0], 512.0, 512.0),
        area([100.0, 50.0, 459.0, 299.0], 451.0, 300.0),
        0.0,
        -1.0,
    ];
    assert_eq!(f64s(&images, "object_size"), sizes);
    assert_eq!(sizes[1], 0.375);
    assert_eq!(u32s(&images, "num_boxes"), [4, 1, 2, 0, 0]);
    assert_eq!(u32s(&images, "num_captions"), [5, 5, 4, 6, 5]);

    let b = ws.table("index", "boxes");
    assert_eq!(u32s(&b, "image_idx"), [0, 0, 0, 0, 1, 2, 2]);
    let expected: [[f64; 4]; 7] = [
        [100.0, 30.0, 400.0, 511.0],
        [10.0, 10.0, 90.0, 210.0],
        [300.0, 300.0, 340.0, 340.0],
        [350.0, 300.0, 390.0, 340.0],
        [128.0, 64.0, 384.0, 448.0],
        [100.0, 50.0, 459.0, 299.0],
        [20.0, 20.0, 120.0, 120.0],
    ];
    assert_eq!(boxes(&b), expected.map(|e| e.map(|v| v as f32)));
    let sizes = [(512.0, 512.0); 5].into_iter().chain([(451.0, 300.0); 2]);
    let areas: Vec<f64> = expected.iter().zip(sizes).map(|(e, (w, h))| area(*e, w, h)).collect();
    assert_eq!(f64s(&b, "area"), areas);
    assert_eq!(f64s(&b, "area")[2], 1600.0 / 262144.0);
    assert_eq!(chains(&b), [vec!["1"], vec!["2", "3"], vec!["4"], vec!["4"], vec!["10"], vec!["20"], vec!["21"]]);
    assert_eq!(bools(&b, "outside_image"), [false, false, false, false, false, true, false]);
    let DataType::FixedSizeList(item, 4) = b.schema().field_with_name("box").unwrap().data_type().clone() else {
        panic!("box must be FixedSizeList<float32, 4>")
    };
    assert_eq!(item.data_type(), &DataType::Float32);

    let texts = ws.table("index", "texts");
    assert_eq!(u32s(&texts, "text_idx"), (0..25).collect::<Vec<u32>>());
    let image_idx = u32s(&texts, "image_idx");
    assert_eq!(image_idx[..6], [0, 0, 0, 0, 0, 1]);
    assert_eq!(image_idx[13..15], [2, 3], "image 2 has four captions");
    assert_eq!(image_idx[24], 4);
    let captions = strings(&texts, "caption");
    let clean = strings(&texts, "caption_clean");
    assert_eq!(captions[3], "A person   with the \"shuttle\" (model).");
    assert_eq!(clean[3], "a person with the shuttle model");
    assert_eq!(clean[4], "an astronaut smiling happily");
    assert_eq!(clean[9], "a man looks through a camera");
    assert_eq!(clean[12], "a cat staring");
    assert_eq!(clean[13], "the cat's whiskers long & white very cute");
    assert_eq!(clean[23], "rocket\tat the pad");

    let manifest = std::fs::read_to_string(ws.path().join("out/index/manifest.json")).unwrap();
    assert!(manifest.contains("\"boxes_outside_image\": 1"), "{manifest}");
}

#[test]
fn lavis_and_karpathy_splits_give_identical_tables() {
    let (lavis, karpathy) = (Workspace::new(LAVIS), Workspace::new(KARPATHY));
    assert!(index(&lavis, &[]).status.success());
    let out = index(&karpathy, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    for table in ["images", "boxes", "texts"] {
        let (a, b) = (lavis.table("index", table), karpathy.table("index", table));
        assert_eq!(a.schema().fields(), b.schema().fields(), "{table}");
        assert_eq!(a.columns(), b.columns(), "{table}");
    }
}

#[test]
fn index_is_deterministic() {
    let ws = Workspace::new(LAVIS);
    assert!(index(&ws, &[]).status.success());
    let read = |t: &str| std::fs::read(ws.path().join("out/index").join(t)).unwrap();
    let first: Vec<Vec<u8>> = ["images.parquet", "boxes.parquet", "texts.parquet", "manifest.json"].map(read).to_vec();
    assert!(index(&ws, &["--force"]).status.success());
    let second: Vec<Vec<u8>> = ["images.parquet", "boxes.parquet", "texts.parquet", "manifest.json"].map(read).to_vec();
    assert!(first == second, "a rerun must give byte-identical artifacts");
}

#[test]
fn parquet_files_embed_the_fingerprint() {
    let ws = Workspace::new(LAVIS);
    assert!(index(&ws, &[]).status.success());
    let file = std::fs::File::open(ws.path().join("out/index/images.parquet")).unwrap();
    let reader = parquet::file::reader::SerializedFileReader::new(file).unwrap();
    use parquet::file::reader::FileReader;
    let kv = reader.metadata().file_metadata().key_value_metadata().unwrap().clone();
    let get = |k: &str| kv.iter().find(|e| e.key == k).and_then(|e| e.value.clone()).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ws.path().join("out/index/manifest.json")).unwrap()).unwrap();
    assert_eq!(get("qpert.fingerprint"), manifest["fingerprint"].as_str().unwrap());
    assert_eq!(get("qpert.stage"), "index");
    assert!(kv.iter().any(|e| e.key == "ARROW:schema"));
}

#[test]
fn status_reports_missing_then_done() {
    let ws = Workspace::new(LAVIS);
    let before = stdout(&ws.qpert(&["status", "--config", "{config}"]));
    assert!(before.contains("index    missing"), "{before}");
    assert!(before.contains("extract  missing"), "{before}");
    assert!(index(&ws, &[]).status.success());
    let after = stdout(&ws.qpert(&["status", "--config", "{config}"]));
    assert!(after.contains("index    done (3 files, 1 shard(s), fingerprint "), "{after}");
}

#[test]
fn set_overrides_config_values() {
    let ws = Workspace::new(LAVIS);
    let out = index(&ws, &["--set", "output.dir=elsewhere", "--set", "dataset.box_origin=0"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let b = common::read_parquet(&ws.path().join("elsewhere/index/boxes.parquet"));
    assert_eq!(boxes(&b)[0], [101.0, 31.0, 401.0, 512.0], "origin 0 leaves coordinates as written");
    assert!(!ws.path().join("out").exists());
}

#[test]
fn bad_set_is_a_config_error() {
    let ws = Workspace::new(LAVIS);
    assert_fails(&index(&ws, &["--set", "rerank.k=many"]), 2, &["qpert.toml", "--set", "invalid type"]);
    assert_fails(&index(&ws, &["--set", "dataset.box_orign=0"]), 2, &["box_orign", "box_origin"]);
    assert_fails(&index(&ws, &["--set", "novalue"]), 2, &["--set novalue", "section.key=value"]);
    assert_fails(&index(&ws, &["--set", "dataset.box_origin=3"]), 2, &["box_origin must be 0 or 1"]);
}

#[test]
fn changed_config_value_makes_index_stale_and_run_recomputes_it() {
    let ws = Workspace::new(LAVIS);
    assert!(index(&ws, &[]).status.success());
    let again = index(&ws, &[]);
    assert!(stdout(&again).contains("index: up to date"), "{}", stdout(&again));

    let status = stdout(&ws.qpert(&["status", "--config", "{config}", "--set", "dataset.box_origin=0"]));
    assert!(status.contains("index    stale (dataset.box_origin: 1 -> 0)"), "{status}");

    let run = ws.qpert(&["run", "--config", "{config}", "--set", "dataset.box_origin=0"]);
    assert!(stdout(&run).contains("index: 5 images"), "run must recompute: {}", stdout(&run));
    let b = ws.table("index", "boxes");
    assert_eq!(boxes(&b)[0], [101.0, 31.0, 401.0, 512.0]);
    let status = stdout(&ws.qpert(&["status", "--config", "{config}"]));
    assert!(status.contains("index    stale (dataset.box_origin: 0 -> 1)"), "{status}");
}

#[test]
fn edited_entities_file_makes_index_stale() {
    let ws = Workspace::with_copy(LAVIS);
    assert!(index(&ws, &[]).status.success());
    let txt = ws.data.join("flickr30k_entities/Sentences/1000004.txt");
    std::fs::write(&txt, "[/EN#30/other A cup] of coffee .\n").unwrap();
    let status = stdout(&ws.qpert(&["status", "--config", "{config}"]));
    assert!(status.contains("index    stale (dataset.entities.files: "), "{status}");
    assert!(index(&ws, &[]).status.success());
    assert_eq!(u32s(&ws.table("index", "images"), "num_boxes"), [4, 1, 2, 1, 0]);
}

/// An image replaced by another file (another size in bytes) makes the index stale; rewriting
/// the same bytes does not.
#[test]
fn replaced_image_makes_index_stale() {
    let ws = Workspace::with_copy(LAVIS);
    assert!(index(&ws, &[]).status.success());
    let images = ws.data.join("flickr30k-images");
    let same = std::fs::read(images.join("1000005.jpg")).unwrap();
    std::fs::write(images.join("1000005.jpg"), &same).unwrap();
    assert!(stdout(&index(&ws, &[])).contains("index: up to date"));

    let other = std::fs::read(images.join("1000004.jpg")).unwrap();
    assert_ne!(other.len(), std::fs::metadata(images.join("1000003.jpg")).unwrap().len() as usize);
    std::fs::write(images.join("1000003.jpg"), &other).unwrap();
    let status = stdout(&ws.qpert(&["status", "--config", "{config}"]));
    assert!(status.contains("index    stale (dataset.images.sizes: sha256 "), "{status}");
    assert!(stdout(&index(&ws, &[])).contains("index: 5 images"), "index must be recomputed");
}

#[test]
fn strict_fails_on_a_box_outside_its_image() {
    let ws = Workspace::new(LAVIS);
    let out = index(&ws, &["--strict"]);
    assert_fails(&out, 1, &["1000003.xml", "image 1000003", "reaches outside", "--strict"]);
    assert!(!ws.path().join("out/index/manifest.json").exists());
    // Also on an up-to-date index: the warning recorded in its manifest is replayed.
    assert!(index(&ws, &[]).status.success());
    assert_fails(&index(&ws, &["--strict"]), 1, &["1000003.xml", "recorded in index's manifest", "--strict"]);
}

#[test]
fn shard_is_validated_and_rejected_for_the_unsharded_index() {
    let ws = Workspace::new(LAVIS);
    assert_fails(&index(&ws, &["--shard", "2/4"]), 2, &["stage index is not sharded"]);
    let whole = index(&ws, &["--shard", "1/1"]);
    assert!(whole.status.success(), "{}", stderr(&whole));
}

#[test]
fn run_goes_through_every_stage_and_then_finds_everything_up_to_date() {
    let ws = Workspace::new(LAVIS);
    let run = ws.qpert(&["run", "--config", "{config}"]);
    assert_eq!(run.status.code(), Some(0), "{}", stderr(&run));
    let log = stdout(&run);
    assert!(log.contains("index: 5 images"), "{log}");
    assert!(log.contains("extract 1/1: 5 images (3 perturbed)"), "{log}");
    assert!(log.contains("report: small objects [0, 0.1): 1 image, 6 captions;"), "{log}");
    for stage in ["index", "extract", "text", "sim", "rerank", "report"] {
        assert!(ws.path().join("out").join(stage).join("manifest.json").exists(), "{stage}");
    }
    let again = stdout(&ws.qpert(&["run", "--config", "{config}"]));
    for stage in ["index", "extract", "text", "sim", "rerank", "report"] {
        assert!(again.contains(&format!("{stage}: up to date, skipped")), "{again}");
    }
}

fn metrics(ws: &Workspace) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(ws.path().join("out/report/metrics.json")).unwrap()).unwrap()
}

/// An image without captions is in the gallery but is no image-to-text query (a split need not give
/// every image five captions; `report` used to reject sim's rank for it), and a `rerank.k` past the
/// gallery selects every pair both ways.
#[test]
fn an_image_without_captions_and_a_k_past_the_gallery_run_to_the_report() {
    let ws = Workspace::with_copy(LAVIS);
    let split = ws.data.join("annotations/flickr30k_test.json");
    let mut images: serde_json::Value = serde_json::from_slice(&std::fs::read(&split).unwrap()).unwrap();
    images[1]["caption"] = serde_json::json!([]);
    std::fs::write(&split, images.to_string()).unwrap();

    let run = ws.qpert(&["run", "--config", "{config}", "--set", "rerank.k=4000000000"]);
    assert_eq!(run.status.code(), Some(0), "{}", stderr(&run));
    let ranks = ws.table("sim", "i2t_ranks");
    assert_eq!(u32s(&ranks, "image_idx"), [0, 2, 3, 4], "image 1 has no caption: no i2t query");
    assert!(u32s(&ranks, "itc_rank").iter().all(|&r| r < 20));
    // Every pair selected both ways: 5 images x 20 texts.
    let rerank = parts(&ws, "rerank");
    assert_eq!(rerank.num_rows(), 100);
    assert!(bools(&rerank, "in_i2t").iter().chain(&bools(&rerank, "in_t2i")).all(|&b| b));
    let m = metrics(&ws);
    assert_eq!((m["counts"]["images"].as_u64(), m["counts"]["texts"].as_u64()), (Some(5), Some(20)));
    assert_eq!(m["counts"]["images_without_captions"], 1);
    assert_eq!(ws.table("report", "per_query").num_rows(), 4 + 20);
}

/// Object sizes are f64, as in the released evaluation: an area of exactly 0.3 is below numpy's
/// threshold 3 * 0.1 = 0.30000000000000004, so in [0.2, 0.3) (as an f32, 0.3000000119, it was in
/// the bin above).
#[test]
fn an_object_size_on_a_bin_threshold_is_in_the_bin_below_it() {
    let ws = Workspace::with_copy(LAVIS);
    // Image 1000004 (600 x 400): its box of chain 30 becomes a mentioned one (33) of 180 x 400 px.
    let xml = ws.data.join("flickr30k_entities/Annotations/1000004.xml");
    let text = std::fs::read_to_string(&xml).unwrap().replacen("<name>30</name>", "<name>33</name>", 1);
    let text = text.replacen("<xmin>201</xmin>", "<xmin>1</xmin>", 1).replacen("<ymin>101</ymin>", "<ymin>1</ymin>", 1);
    let text =
        text.replacen("<xmax>401</xmax>", "<xmax>181</xmax>", 1).replacen("<ymax>301</ymax>", "<ymax>401</ymax>", 1);
    std::fs::write(&xml, text).unwrap();
    // Image 1000002 (512 x 512): its box covers the whole image, size 1: past the last bin.
    let xml = ws.data.join("flickr30k_entities/Annotations/1000002.xml");
    let text = std::fs::read_to_string(&xml).unwrap().replacen("<xmin>129</xmin>", "<xmin>1</xmin>", 1);
    let text =
        text.replacen("<ymin>65</ymin>", "<ymin>1</ymin>", 1).replacen("<xmax>385</xmax>", "<xmax>513</xmax>", 1);
    std::fs::write(&xml, text.replacen("<ymax>449</ymax>", "<ymax>513</ymax>", 1)).unwrap();

    let run = ws.qpert(&["run", "--config", "{config}"]);
    assert_eq!(run.status.code(), Some(0), "{}", stderr(&run));
    let sizes = f64s(&ws.table("index", "images"), "object_size");
    assert_eq!((sizes[1], sizes[3]), (1.0, 0.3));
    assert_eq!(
        ws.table("index", "images").schema().field_with_name("object_size").unwrap().data_type(),
        &DataType::Float64
    );
    // Sizes 0.55 (bin 5), 1 (none), 0.66 (bin 6), 0.3 (bin 2), -1 (none).
    let m = metrics(&ws);
    let bins = &m["itc"]["bins"];
    let n_images: Vec<u64> = (0..10).map(|k| bins[k]["n_images"].as_u64().unwrap()).collect();
    assert_eq!(n_images, [0, 0, 1, 0, 0, 1, 1, 0, 0, 0]);
    assert_eq!(bins[2]["n_texts"], 6, "the captions of image 1000004");
    assert_eq!(m["counts"]["images_beyond_last_bin"], 1);
    let md = std::fs::read_to_string(ws.path().join("out/report/report.md")).unwrap();
    assert!(md.contains("nor (here: 1 image) are those whose largest box covers the whole image or more"), "{md}");
}

/// A kept box without area (here zero width) has an empty mask: warned (a data warning, so fatal
/// under `--strict`) and counted; its image is still perturbed, by the projector of a zero Gram
/// matrix.
#[test]
fn a_box_without_area_is_warned_and_counted() {
    let ws = Workspace::with_copy(LAVIS);
    let xml = ws.data.join("flickr30k_entities/Annotations/1000004.xml");
    let text = std::fs::read_to_string(&xml).unwrap().replacen("<name>30</name>", "<name>33</name>", 1);
    std::fs::write(&xml, text.replacen("<xmax>401</xmax>", "<xmax>201</xmax>", 1)).unwrap();

    let out = index(&ws, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("1 outside their image, 1 without area;"), "{}", stdout(&out));
    let warnings = stderr(&out);
    assert!(
        warnings
            .contains("1000004.xml: image 1000004: kept box 1 (chains 33) [200.0, 100.0, 200.0, 300.0] has no area"),
        "{warnings}"
    );
    assert_eq!(f64s(&ws.table("index", "images"), "object_size")[3], 0.0);

    let run = ws.qpert(&["run", "--config", "{config}"]);
    assert_eq!(run.status.code(), Some(0), "{}", stderr(&run));
    assert!(stdout(&run).contains("extract 1/1: 5 images (4 perturbed)"), "{}", stdout(&run));
}

/// Images are in no fingerprint: one replaced in place (other pixels, same size) leaves every stage
/// up to date, and `run --from extract` recomputes extract and the stages that use it, not text.
#[test]
fn run_from_a_stage_recomputes_it_and_the_stages_that_use_it() {
    let ws = Workspace::with_copy(LAVIS);
    assert!(ws.qpert(&["run", "--config", "{config}"]).status.success());
    let features = |ws: &Workspace| {
        let part = parts(ws, "extract");
        let col = part.column_by_name("query_embeds").unwrap();
        let list = col.as_any().downcast_ref::<arrow::array::FixedSizeListArray>().unwrap();
        (0..arrow::array::Array::len(list)).map(|i| f32s_of(&list.value(i))).collect::<Vec<_>>()
    };
    let before = features(&ws);
    // Other pixels in a file of the same byte size: the DC entry of the first quantisation table
    // (the byte after the DQT marker's length and table id) is doubled.
    let photo = ws.data.join("flickr30k-images/1000002.jpg");
    let mut jpeg = std::fs::read(&photo).unwrap();
    let dqt = jpeg.windows(2).position(|w| w == [0xFF, 0xDB]).unwrap();
    jpeg[dqt + 5] = if jpeg[dqt + 5] < 128 { jpeg[dqt + 5] * 2 } else { jpeg[dqt + 5] / 2 };
    std::fs::write(&photo, &jpeg).unwrap();

    let again = stdout(&ws.qpert(&["run", "--config", "{config}"]));
    assert!(again.contains("extract: up to date, skipped"), "no fingerprint sees the pixels: {again}");
    let run = ws.qpert(&["run", "--config", "{config}", "--from", "extract"]);
    assert_eq!(run.status.code(), Some(0), "{}", stderr(&run));
    let log = stdout(&run);
    assert!(log.starts_with("run --from extract: recomputing extract, sim, rerank, report\n"), "{log}");
    for skipped in ["index", "text"] {
        assert!(log.contains(&format!("{skipped}: up to date, skipped")), "{log}");
    }
    for recomputed in ["extract 1/1: 5 images", "sim: 5 x 25 ITC scores", "rerank 1/1:", "report: wrote"] {
        assert!(log.contains(recomputed), "{log}");
    }
    let after = features(&ws);
    let changed: Vec<bool> = before.iter().zip(&after).map(|(b, a)| b != a).collect();
    assert_eq!(changed, [false, true, false, false, false], "only the replaced image's features change");

    // Another file (another byte size) in its place: every stage but text, whose fingerprint takes
    // index's captions only, is stale and recomputed.
    std::fs::copy(ws.data.join("flickr30k-images/1000004.jpg"), &photo).unwrap();
    let status = stdout(&ws.qpert(&["status", "--config", "{config}"]));
    assert!(status.contains("\ntext     done ("), "{status}");
    assert!(status.contains("\nextract  stale (index changed)\n"), "{status}");
    let log = stdout(&ws.qpert(&["run", "--config", "{config}"]));
    assert!(log.contains("text: up to date, skipped"), "{log}");
    for recomputed in ["index: 5 images", "extract 1/1: 5 images", "sim: 5 x 25 ITC scores", "report: wrote"] {
        assert!(log.contains(recomputed), "{log}");
    }

    let disabled = ws.qpert(&["run", "--config", "{config}", "--from", "rerank", "--set", "rerank.enabled=false"]);
    assert_fails(&disabled, 2, &["--from rerank: rerank is disabled in the config"]);
}

fn f32s_of(array: &arrow::array::ArrayRef) -> Vec<f32> {
    array.as_any().downcast_ref::<arrow::array::Float32Array>().unwrap().values().to_vec()
}

/// `qpert status | head -1`, `qpert run | head`: a reader that stops early is not an error, and
/// the run goes on to the end (it used to panic on the first line it could not print).
#[test]
fn a_closed_stdout_is_not_an_error_and_the_run_goes_on() {
    let ws = Workspace::new(LAVIS);
    let closed_pipe = || {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        writer
    };
    for args in [vec!["run", "--config"], vec!["status", "--config"], vec!["--help"]] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_qpert"));
        cmd.args(&args).current_dir(ws.path()).stdout(closed_pipe());
        if args.len() > 1 {
            cmd.arg(ws.config());
        }
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        assert!(!stderr(&out).contains("internal error"), "{args:?}: {}", stderr(&out));
    }
    assert!(ws.path().join("out/report/manifest.json").exists());
}

#[test]
fn damaged_artifacts_are_reported_and_only_their_stages_recomputed() {
    let ws = Workspace::new(LAVIS);
    assert!(ws.qpert(&["run", "--config", "{config}"]).status.success());
    let out = ws.path().join("out");
    let metrics = std::fs::read(out.join("report/metrics.json")).unwrap();
    let ranks = ws.table("sim", "t2i_ranks");
    std::fs::remove_file(out.join("sim/t2i_ranks.parquet")).unwrap();
    let part = out.join("extract/part-00001-of-00001.parquet");
    let bytes = std::fs::read(&part).unwrap();
    std::fs::write(&part, &bytes[..bytes.len() / 2]).unwrap();
    std::fs::write(out.join("report/manifest.json"), "{\"stage\": ").unwrap();

    let status = stdout(&ws.qpert(&["status", "--config", "{config}"]));
    assert!(status.contains("extract  damaged (part-00001-of-00001.parquet: not a readable Parquet file"), "{status}");
    assert!(status.contains("sim      damaged (t2i_ranks.parquet: missing)"), "{status}");
    assert!(status.contains("rerank   done"), "{status}");
    assert!(status.contains("report   damaged (manifest.json: corrupt manifest: EOF while parsing"), "{status}");
    assert_fails(
        &ws.qpert(&["stage", "report", "--config", "{config}", "--force"]),
        1,
        &["out/sim: damaged (t2i_ranks.parquet: missing); rerun `qpert stage sim`"],
    );

    // A killed run leaves temporary files; those idle for longer than the lock limit (10 min) go
    // when their folder is written again, a fresh one (a live writer's) stays.
    let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    let abandoned = [
        "sim/.i2t_ranks.parquet.gone.4242.tmp",
        "report/.metrics.json.gone.7.tmp",
        "extract/vision/.batch-000000.arrow.gone.7.tmp",
    ];
    for name in abandoned {
        std::fs::File::create(out.join(name)).unwrap().set_modified(hour_ago).unwrap();
    }
    std::fs::write(out.join("sim/.i2t_ranks.parquet.live.8.tmp"), "").unwrap();

    let run = stdout(&ws.qpert(&["run", "--config", "{config}"]));
    for name in abandoned {
        assert!(!out.join(name).exists(), "{name} is removed");
    }
    assert!(out.join("sim/.i2t_ranks.parquet.live.8.tmp").exists());
    for stage in ["index", "text", "rerank"] {
        assert!(run.contains(&format!("{stage}: up to date, skipped")), "{run}");
    }
    for stage in ["extract", "sim", "report"] {
        assert!(!run.contains(&format!("{stage}: up to date")), "{stage} must be recomputed: {run}");
    }
    let status = stdout(&ws.qpert(&["status", "--config", "{config}"]));
    assert_eq!(status.matches(" done (").count(), 6, "{status}");
    assert_eq!(ws.table("sim", "t2i_ranks"), ranks);
    assert_eq!(std::fs::read(out.join("report/metrics.json")).unwrap(), metrics);
}

#[test]
fn help_has_examples() {
    let ws = Workspace::new(LAVIS);
    for verb in ["stage", "run", "status"] {
        let out = ws.qpert(&[verb, "--help"]);
        assert!(out.status.success());
        assert!(stdout(&out).contains("Examples:"), "{verb}");
    }
}

/// Without a terminal (a log file, a pipe) progress is a line on stderr every `QPERT_PROGRESS_SECS`
/// instead of a bar; 0 turns the lines off.
#[test]
fn progress_is_a_line_on_stderr_when_stderr_is_not_a_terminal() {
    let ws = Workspace::new(LAVIS);
    assert_eq!(index(&ws, &[]).status.code(), Some(0));
    let extract = |secs: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_qpert"))
            .args(["stage", "extract", "--force", "--config"])
            .arg(ws.config())
            .env("QPERT_PROGRESS_SECS", secs)
            .current_dir(ws.path())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        stderr(&out).lines().filter(|l| l.starts_with("qpert: progress: ")).map(String::from).collect::<Vec<_>>()
    };
    let lines = extract("0.001");
    assert!(!lines.is_empty(), "a line every millisecond while extract runs");
    for line in &lines {
        assert!(line.starts_with("qpert: progress: extract 1/1: ") && line.contains("/5 ("), "{line}");
    }
    assert!(extract("0").is_empty());
}
